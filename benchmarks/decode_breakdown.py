"""Where one greedy decode step spends its time: block linears (attention, MLP), the LM head, and everything else.

Each model (a saved checkpoint, or `default`: the embedded SmolLM2-135M) runs a prompt into its KV cache, then times
`--steps` single-token forwards; forward hooks time every linear layer (`nn.Linear` or `LinearSparseLowRank`).
"Everything else" (attention over the cache, norms, rotary, Python dispatch) is what no linear-layer kernel can
speed up. With the LM head left dense, the last column bounds what any block-linear kernel can buy: the step's
speed-up if the block linears took no time at all.

    OMP_NUM_THREADS=1 python benchmarks/decode_breakdown.py default CKPT CKPT-v4 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from toolkit.models import load_causal_lm
from toolkit.provenance import Provenance

import optimum_oats  # noqa: F401  (registers the "oats" quantization method for the checkpoints)
from optimum_oats.nn import LinearSparseLowRank
from optimum_oats.nn.quantized_embedding import TiedQuantizedHead

PARTS = ("attention linears", "MLP linears", "LM head")


def _part(name: str) -> str:
    if "self_attn" in name:
        return PARTS[0]
    return PARTS[1] if "mlp" in name else PARTS[2]


def _timed(module: torch.nn.Module, spent: dict[str, float], part: str) -> list:
    """Hooks that add the module's forward time to `spent[part]`."""
    started = []

    def before(mod, args):
        started.append(time.perf_counter())

    def after(mod, args, out):
        spent[part] += time.perf_counter() - started.pop()

    return [module.register_forward_pre_hook(before), module.register_forward_hook(after)]


def breakdown(model: torch.nn.Module, prompt_tokens: int, steps: int, seed: int = 0) -> dict[str, float]:
    """Milliseconds per decode step: the whole step and each part (timed by hooks around every linear)."""
    spent = dict.fromkeys(PARTS, 0.0)
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, (torch.nn.Linear, LinearSparseLowRank, TiedQuantizedHead)):
            handles += _timed(module, spent, _part(name))
    ids = torch.randint(0, 1000, (1, prompt_tokens), generator=torch.Generator().manual_seed(seed))
    try:
        with torch.no_grad():
            out = model(ids, use_cache=True)
            cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
            spent.update(dict.fromkeys(PARTS, 0.0))
            begin = time.perf_counter()
            for _ in range(steps):
                out = model(token, past_key_values=cache, use_cache=True)
                cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
            total = time.perf_counter() - begin
    finally:
        for handle in handles:
            handle.remove()
    result = {part: 1000 * seconds / steps for part, seconds in spent.items()}
    result["step"] = 1000 * total / steps
    result["everything else"] = result["step"] - sum(result[part] for part in PARTS)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", help="checkpoint folders, or `default` for the embedded SmolLM2-135M")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--steps", type=int, default=32, help="decode steps timed per round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds over all models, interleaved; median kept")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    provenance = Provenance.start()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    models = {name: load_causal_lm(None if name == "default" else name, dtype=dtype).eval() for name in args.models}
    rounds: dict[str, list[dict[str, float]]] = {name: [] for name in models}
    for _ in range(args.rounds):
        for name, model in models.items():
            rounds[name].append(breakdown(model, args.prompt_tokens, args.steps))
    columns = ("step", *PARTS, "everything else")
    print(
        f"\n### One decode step after a {args.prompt_tokens}-token prompt, {args.dtype}, threads={args.threads}, "
        f"ms per step (median of {args.rounds} interleaved rounds of {args.steps} steps)\n"
    )
    print("| model | " + " | ".join(columns) + " | step / (LM head + everything else) |")
    print("|---|" + "---:|" * (len(columns) + 1))
    for name, results in rounds.items():
        median = {column: statistics.median(r[column] for r in results) for column in columns}
        cells = " | ".join(f"{median[column]:.1f}" for column in columns)
        bound = median["step"] / (median["LM head"] + median["everything else"])
        print(f"| {name.rstrip('/').split('/')[-1]} | {cells} | {bound:.2f}x |")
    print("\n" + provenance.line())


if __name__ == "__main__":
    main()
