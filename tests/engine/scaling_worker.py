"""A compression job run in its own process by tests/engine/test_scaling.py (resume after SIGKILL, torchrun,
determinism).

Builds a seeded tiny Llama, compresses it with the OATSConfig given as JSON, and writes every tensor of the result
to `--out` (safetensors; `--out` gets `.rank<N>` appended under torchrun, so each rank's full model can be
checked). Under torchrun (WORLD_SIZE > 1) it initialises a gloo process group first.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: `tests.helpers`


def build_job(tokenizer, texts: list[str], layers: int, hidden: int, config_json: str):
    """The seeded tiny Llama and the OATSConfig of one job."""
    from optimum_oats import OATSConfig
    from tests.helpers.tiny_models import _tiny_configs, build_tiny_model

    config = _tiny_configs()["llama"]
    config.num_hidden_layers = layers
    config.hidden_size = hidden
    config.intermediate_size = 2 * hidden
    return build_tiny_model(config), OATSConfig(dataset=texts, **json.loads(config_json))


def save_result(model, path: str) -> None:
    """Every tensor of the compressed model, its layer_map and its report's numbers, to one safetensors file."""
    from safetensors.torch import save_file

    from optimum_oats import compression_report

    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    state.pop("lm_head.weight", None)  # tied to the embeddings; safetensors refuses shared storage
    layer_map = json.dumps(
        {"layer_map": model.config.quantization_config.layer_map, "numbers": compression_report(model).to_dict()},
        sort_keys=True,
    )
    save_file(state, path, metadata={"layer_map": layer_map})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--config", default="{}")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--resume-dir", default=None)
    args = parser.parse_args()

    import torch.distributed as dist

    from optimum_oats import compress
    from tests.helpers.tiny_tokenizer import build_bpe_tokenizer

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1:
        dist.init_process_group("gloo")
    data = Path(os.environ["OATS_DATA_DIR"]) / "wikitext2" / "wiki.valid.raw"
    texts = [t for t in data.read_text().split("\n\n") if t.strip()]
    tokenizer = build_bpe_tokenizer(texts)  # the `tokenizer` fixture's: trained on the same texts
    model, cfg = build_job(tokenizer, texts, args.layers, args.hidden, args.config)
    compress(model, cfg, tokenizer, progress=False, checkpoint_dir=args.resume_dir)
    save_result(model, args.out + (f".rank{dist.get_rank()}" if world_size > 1 else ""))
    if world_size > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
