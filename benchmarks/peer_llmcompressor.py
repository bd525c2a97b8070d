"""The peer, side by side: llm-compressor's GPTQ / round-to-nearest / AWQ / SparseGPT on SmolLM2-135M, measured with
the project's own calibration windows and perplexity code (issue 35).

It runs in its own environment, made by `scripts/peer_env.sh` (llm-compressor pins its own transformers):

    bash scripts/peer_env.sh
    OATS_DATA_DIR=/work/shared/data OMP_NUM_THREADS=1 PYTHONPATH=$PWD .venv-peer/bin/python \\
        benchmarks/peer_llmcompressor.py                      # every cell, cheapest first
    ... benchmarks/peer_llmcompressor.py --cells gptq-w4a16-g64 --seed 0 1 2

Protocol (docs/quality.md's sweep): calibration on 16 x 1024 C4 tokens drawn by
`optimum_oats.data.text.sample_calibration_windows` ("joined", seeded by `--seed`), WikiText-2 test scored by
`optimum_oats.evaluation.perplexity.token_perplexity` on its first 16 windows of 1024 tokens (dense: 22.88).
The project's modules are imported from the repo (PYTHONPATH) without the package's `__init__`, which registers the
project with transformers and imports peft/optimum: only the protocol's code runs here, not the project's.

Each (cell, seed) is one JSON under `--output` (atomic write; a stopped run resumes): perplexity, the peer's
versions, the bytes of its saved compressed-tensors checkpoint and of its quantized linear layers alone, bits per
weight over those layers, wall seconds and the load average. `benchmarks/frontier.py` reads them.
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import shutil
import sys
import tempfile
import time
import types
from pathlib import Path

import torch
from toolkit.cells import read_cell, write_cell  # stdlib-only modules (tests/benchmarks/test_layout.py)
from toolkit.provenance import Provenance, processor, utc_now, versions

REPO = Path(__file__).resolve().parents[1]

# name -> (kind, description); kinds are built by `modifiers()`. Ordered cheapest first (RTN needs no calibration).
CELLS: dict[str, dict] = {
    "rtn-w4a16-g64": {"kind": "rtn", "bits": 4, "symmetric": True},
    "gptq-w8a16-g64": {"kind": "gptq", "bits": 8, "symmetric": True},
    "gptq-w4a16-g64": {"kind": "gptq", "bits": 4, "symmetric": True},
    "gptq-w3a16-g64": {"kind": "gptq", "bits": 3, "symmetric": True},
    "sparsegpt-50": {"kind": "sparsegpt", "sparsity": 0.5},
    # AWQ's usual scheme is asymmetric (llm-compressor's W4A16_ASYM preset); same group size as the rest.
    "awq-w4a16-asym-g64": {"kind": "awq", "bits": 4, "symmetric": False},
}
GROUP_SIZE = 64  # SmolLM2-135M's 576 input columns do not divide by llm-compressor's default 128
IGNORE = ["lm_head"]  # tied to the embeddings; the project does not compress it either
# Bytes per element of the safetensors dtypes a compressed-tensors checkpoint holds.
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
CHECKPOINT_DTYPE = torch.bfloat16
PEER_STACK = ("llmcompressor", "compressed-tensors", "transformers", "torch", "accelerate")


def project_module(name: str) -> types.ModuleType:
    """Import `optimum_oats.<name>` from the repo without running `optimum_oats/__init__.py`.

    The package's `__init__` registers with transformers and imports peft / optimum, which this environment need
    not have; the protocol's modules (data, evaluation, the default model) import only torch and transformers.
    """
    if "optimum_oats" not in sys.modules:
        package = types.ModuleType("optimum_oats")
        package.__path__ = [str(REPO / "optimum_oats")]
        sys.modules["optimum_oats"] = package
    return importlib.import_module(f"optimum_oats.{name}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", nargs="+", default=list(CELLS), help=f"which cells, of: {' '.join(CELLS)}")
    parser.add_argument("--seed", type=int, nargs="+", default=[0], help="calibration seeds")
    parser.add_argument("--num-samples", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=1024)
    parser.add_argument("--eval-seqlen", type=int, default=1024)
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--model", default=None, help="a Hugging Face folder (default: the embedded SmolLM2-135M)")
    parser.add_argument("--output", default="bench_results/peer")
    parser.add_argument("--keep-checkpoints", action="store_true", help="keep each saved checkpoint under --output")
    parser.add_argument("--skip-dense", action="store_true")
    args = parser.parse_args(argv)
    unknown = [c for c in args.cells if c not in CELLS]
    if unknown:
        parser.error(f"`--cells` {' '.join(unknown)}: unknown; allowed: {' '.join(CELLS)}")
    return args


def weight_scheme(bits: int, symmetric: bool):
    """Weight-only integer quantization in groups of `GROUP_SIZE` along the input dimension, activations untouched."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    weights = QuantizationArgs(
        num_bits=bits, type="int", symmetric=symmetric, strategy="group", group_size=GROUP_SIZE, dynamic=False
    )
    return {"group_0": QuantizationScheme(targets=["Linear"], weights=weights)}


def modifiers(cell: dict) -> list:
    """The llm-compressor recipe of one cell."""
    kind = cell["kind"]
    if kind == "gptq":
        from llmcompressor.modifiers.quantization import GPTQModifier

        return [GPTQModifier(config_groups=weight_scheme(cell["bits"], cell["symmetric"]), ignore=IGNORE)]
    if kind == "rtn":
        from llmcompressor.modifiers.quantization import QuantizationModifier

        return [QuantizationModifier(config_groups=weight_scheme(cell["bits"], cell["symmetric"]), ignore=IGNORE)]
    if kind == "awq":
        from llmcompressor.modifiers.awq import AWQModifier

        return [AWQModifier(config_groups=weight_scheme(cell["bits"], cell["symmetric"]), ignore=IGNORE)]
    if kind == "sparsegpt":
        from llmcompressor.modifiers.pruning import SparseGPTModifier

        return [SparseGPTModifier(sparsity=cell["sparsity"], mask_structure="0:0", targets=["Linear"], ignore=IGNORE)]
    raise ValueError(f"`kind` {kind!r}: unknown; allowed: gptq, rtn, awq, sparsegpt")


def target_layers(model) -> dict[str, int]:
    """The linear layers every recipe here targets (`Linear` less `IGNORE`), with their dense weight counts."""
    return {
        name: module.in_features * module.out_features
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] not in IGNORE
    }


def cpu_workarounds(cell: dict) -> list[str]:
    """Make the cell's recipe run on a machine without an accelerator; returns what was changed, in words.

    llm-compressor 0.14's AWQ pins its cached activations (`IntermediatesCache.pin_memory`) before each grid search,
    which raises "Cannot access accelerator device" without one. Pinning only speeds host-to-device copies, so on
    such a machine it is skipped; the numbers are unchanged.
    """
    if cell["kind"] != "awq" or torch.accelerator.is_available():
        return []
    from llmcompressor.pipelines.cache import IntermediatesCache

    IntermediatesCache.pin_memory = lambda self, batch_index, input_names=None: None
    return ["IntermediatesCache.pin_memory skipped (it needs an accelerator; it only speeds host-to-device copies)"]


def checkpoint_bytes(folder: Path, layers: dict[str, int]) -> dict:
    """Bytes of a saved compressed-tensors checkpoint: all its files, and every tensor of the target layers.

    A layer's bytes are all tensors stored under its name except the bias: the values however stored (`weight`,
    `weight_packed`, a sparse format's parts), scales, zero points and the small shape records. Bits per weight
    are those bytes times 8 over the layers' dense weight count, whatever format the peer chose to save.
    """
    from safetensors import safe_open

    total = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    by_tensor: dict[str, int] = {}  # "weight_scale" etc. -> bytes over all target layers
    found: set[str] = set()
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 (safe_open is not a mapping)
                layer, _, part = name.rpartition(".")
                if part != "weight" and layer not in layers:  # a sparse format's "weight.bitmask" and the like
                    layer, _, head = layer.rpartition(".")
                    part = f"{head}.{part}"
                if layer not in layers or part == "bias":
                    continue
                tensor = handle.get_slice(name)
                size = math.prod(tensor.get_shape()) * DTYPE_BYTES[tensor.get_dtype()]
                by_tensor[part] = by_tensor.get(part, 0) + size
                found.add(layer)
    missing = sorted(set(layers) - found)
    if missing:
        raise ValueError(f"the checkpoint in {folder} holds no tensor of {len(missing)} target layers: {missing[:3]}")
    layer_bytes, weights = sum(by_tensor.values()), sum(layers.values())
    return {
        "checkpoint_bytes": total,
        "layers": len(layers),
        "layer_bytes": layer_bytes,
        "layer_bytes_by_tensor": by_tensor,
        "layer_weights": weights,
        "bits_per_weight": 8 * layer_bytes / weights,
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    provenance = Provenance.start(*PEER_STACK)
    if not os.environ.get("OATS_DATA_DIR"):
        raise SystemExit("Set OATS_DATA_DIR to the data folder (C4 sample and WikiText-2), e.g. /work/shared/data.")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    text_data = project_module("data.text")
    perplexity = project_module("evaluation.perplexity")
    model_path = args.model or project_module("integrations.default_model").default_model_path()
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    wikitext = perplexity.wikitext2_text()
    calibration_texts = text_data.load_calibration_texts("c4")

    def evaluate(model) -> float:
        return perplexity.token_perplexity(
            model, tokenizer, wikitext, seqlen=args.eval_seqlen, max_windows=args.windows
        )

    def common(start: float, load_before: tuple) -> dict:
        return {
            "model": Path(model_path).name,
            "versions": versions(PEER_STACK),
            "protocol": {
                "calibration": f"{args.num_samples} x {args.seqlen} C4 tokens, joined sampling",
                "evaluation": f"WikiText-2 test, first {args.windows} windows of {args.eval_seqlen} tokens",
            },
            "seconds": time.perf_counter() - start,
            "loadavg_before": list(load_before),
            "loadavg_after": list(os.getloadavg()),
            "threads": torch.get_num_threads(),
            "machine": processor(),
            "date": utc_now(),
        }

    if not args.skip_dense and read_cell(out / "dense.json") is None:
        start, load = time.perf_counter(), os.getloadavg()
        ppl = evaluate(AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32))
        write_cell(out / "dense.json", {"cell": "dense", "perplexity": ppl, **common(start, load)})
        print(f"dense: perplexity {ppl:.2f}", flush=True)

    for seed in args.seed:
        windows = text_data.sample_calibration_windows(
            tokenizer, calibration_texts, args.num_samples, args.seqlen, seed
        )
        for name in args.cells:
            file = out / f"{name}-s{seed}.json"
            stored = read_cell(file)
            if stored is not None:
                print(f"{name} seed {seed}: stored, perplexity {stored['perplexity']:.2f}")
                continue
            result = run_cell(name, seed, windows, model_path, tokenizer, evaluate, out, args.keep_checkpoints)
            result.update(common(result.pop("_start"), result.pop("_load")))
            write_cell(file, result)
            print(f"{name} seed {seed}: perplexity {result['perplexity']:.2f}", flush=True)
    print(provenance.line())


def run_cell(name, seed, windows, model_path, tokenizer, evaluate, out: Path, keep: bool) -> dict:
    """Compress with llm-compressor's `oneshot`, score the model in memory, save it compressed and weigh it."""
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM

    cell = CELLS[name]
    start, load = time.perf_counter(), os.getloadavg()
    workarounds = cpu_workarounds(cell)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    calibration = Dataset.from_dict(
        {"input_ids": windows.tolist(), "attention_mask": torch.ones_like(windows).tolist()}
    )
    oneshot(
        model=model,
        dataset=calibration,
        recipe=modifiers(cell),
        num_calibration_samples=windows.shape[0],
        max_seq_length=windows.shape[1],
        shuffle_calibration_samples=False,
    )
    compress_seconds = time.perf_counter() - start
    layers = target_layers(model)
    ppl = evaluate(model)
    folder = Path(tempfile.mkdtemp(prefix=f".{name}-s{seed}-", dir=out))
    try:
        # Saved as shipped: in bf16, so the scales are bf16 (4 + 16 / 64 = 4.25 bits at W4 g64), the convention of
        # the project's bits too. Compression and scoring above ran in float32, as the project's sweep does.
        model.to(CHECKPOINT_DTYPE)
        model.save_pretrained(folder, save_compressed=True)
        tokenizer.save_pretrained(folder)
        sizes = checkpoint_bytes(folder, layers)
        if keep:
            target = out / f"{name}-s{seed}-checkpoint"
            shutil.rmtree(target, ignore_errors=True)
            folder.rename(target)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return {
        "cell": name,
        "method": f"llmcompressor {cell['kind']}",
        "scheme": {**cell, **({"group_size": GROUP_SIZE} if "bits" in cell else {})},
        "seed": seed,
        "perplexity": ppl,
        "checkpoint_dtype": str(CHECKPOINT_DTYPE).removeprefix("torch."),
        "compress_seconds": compress_seconds,
        "workarounds": workarounds,
        **sizes,
        "_start": start,
        "_load": load,
    }


if __name__ == "__main__":
    main()
