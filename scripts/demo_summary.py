"""The demo's last table: what compressing the embedded SmolLM2 gained and lost, side by side with the dense model.

Usage: python scripts/demo_summary.py COMPRESSED_DIR [--new-tokens 32] [--reps 3] [--generations 3]
Reads COMPRESSED_DIR/eval_results.json (written by `optimum-cli oats evaluate --output`) for the quality rows.
Speed and memory are measured here, each model in a fresh process (peak resident memory of load + generation),
and a few greedy answers to chat prompts (the model's own chat template) are printed dense beside compressed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path


def _checkpoint_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors")) / 2**20


# Chat prompts for the side-by-side answers: a fact, a story opening, an instruction.
PROMPTS = (
    "What is the capital of France?",
    "Write the first two sentences of a story about a lighthouse keeper.",
    "Give three tips for staying focused while studying.",
)


def _answers(model, tokenizer, count: int, new_tokens: int = 48) -> list[str]:
    answers = []
    for text in PROMPTS[:count]:
        chat = [{"role": "user", "content": text}]
        prompt = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        output = model.generate(**prompt, max_new_tokens=new_tokens, do_sample=False)
        answers.append(tokenizer.decode(output[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True).strip())
    return answers


def _measure(path: str, new_tokens: int, reps: int, generations: int = 0) -> None:
    """Child process: tokens/s of greedy generation (median of `reps`), peak RSS and chat answers, as one JSON line."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import optimum_oats  # noqa: F401  (compressed checkpoints load through the plugin)

    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    prompt = tokenizer("The capital of France is", return_tensors="pt")
    speeds = []
    with torch.no_grad():
        for _ in range(reps):
            start = time.perf_counter()
            model.generate(**prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
            speeds.append(new_tokens / (time.perf_counter() - start))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with torch.no_grad():
        answers = _answers(model, tokenizer, generations)
    print(json.dumps({"tokens_per_s": statistics.median(speeds), "peak_mb": peak, "answers": answers}))


def _run(path: str, args: argparse.Namespace) -> dict:
    code = "import sys, runpy; runpy.run_path(sys.argv[1])['_measure'](sys.argv[2], *map(int, sys.argv[3:6]))"
    out = subprocess.run(
        [sys.executable, "-c", code, __file__, path, str(args.new_tokens), str(args.reps), str(args.generations)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


_DTYPE_BITS = {"float32": 32, "float16": 16, "bfloat16": 16}


def _dtype(folder: Path) -> str:
    config = json.loads((folder / "config.json").read_text())
    return str(config.get("dtype") or config.get("torch_dtype") or "float32")


def _bits_per_weight(folder: Path) -> float | None:
    """From the checkpoint's `oats_report.json` (None when the report predates the number)."""
    report = folder / "oats_report.json"
    if not report.is_file():
        return None
    return json.loads(report.read_text()).get("summary", {}).get("bits_per_weight")


def _stderr(m: dict, n: int | None) -> float:
    return m.get("acc_stderr") or (math.sqrt(m["acc"] * (1 - m["acc"]) / n) if n else float("nan"))


def _noise(m: dict, d: dict, n: int | None) -> str:
    """' (noise)' when the difference is within two standard errors of a difference of two independent scores."""
    if "acc" not in d:
        return ""
    bound = 2 * math.sqrt(_stderr(m, n) ** 2 + _stderr(d, n) ** 2)
    return " (noise)" if abs(m["acc"] - d["acc"]) < bound else ""


def _quality_rows(results: dict) -> list[str]:
    rows = []
    compressed, dense = results.get("compressed") or {}, results.get("dense") or {}
    if "wikitext2" in compressed:
        c, d = compressed["wikitext2"], dense.get("wikitext2", {})
        windows = c.get("max_windows", "all")
        rows.append(
            f"| WikiText-2 token perplexity ({windows} windows of {c.get('seqlen')}) | "
            f"{d.get('token_perplexity', float('nan')):.2f} | {c['token_perplexity']:.2f} | "
            f"{c['token_perplexity'] / d.get('token_perplexity', float('nan')):.2f}x |"
        )
    for task, metrics in compressed.items():
        if not isinstance(metrics, dict) or "acc" not in metrics:
            continue
        n = metrics.get("n_samples")
        d = dense.get(task, {})

        def cell(m: dict, n: int | None = n) -> str:
            if "acc" not in m:
                return "n/a"
            return f"{m['acc']:.3f} ± {_stderr(m, n):.3f}"

        diff = metrics["acc"] - d.get("acc", float("nan"))
        noise = _noise(m=metrics, d=d, n=n)
        rows.append(f"| {task} accuracy ({n} documents) | {cell(d)} | {cell(metrics)} | {diff:+.3f}{noise} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("compressed", type=Path)
    parser.add_argument("--dense", type=Path, default=None, help="dense folder (default: the embedded SmolLM2)")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--generations", type=int, default=3, help=f"chat answers to print (at most {len(PROMPTS)})")
    args = parser.parse_args()
    if args.dense is None:
        from optimum_oats.integrations.default_model import default_model_path

        args.dense = Path(default_model_path())
    dense, compressed = _run(str(args.dense), args), _run(str(args.compressed), args)
    size_d, size_c = _checkpoint_mb(args.dense), _checkpoint_mb(args.compressed)
    load = os.getloadavg()[0]
    print(f"\n## What compression gained and lost (SmolLM2-135M, float32, 1 thread, load average {load:.1f})\n")
    print("| | dense | compressed | compressed / dense |")
    print("|---|---|---|---|")
    print(f"| checkpoint size (MB, all weights) | {size_d:.1f} | {size_c:.1f} | {size_c / size_d:.2f}x |")
    bits = _bits_per_weight(args.compressed)
    if bits is not None:
        dense_bits = _DTYPE_BITS.get(_dtype(args.dense), float("nan"))
        print(
            f"| bits per weight, compressed layers (values, mask, scales, factors) | {dense_bits:.0f} | {bits:.2f} | "
            f"{bits / dense_bits:.2f}x |"
        )
    print(
        f"| greedy generation, {args.new_tokens} tokens (tokens/s, median of {args.reps}) | "
        f"{dense['tokens_per_s']:.1f} | {compressed['tokens_per_s']:.1f} | "
        f"{compressed['tokens_per_s'] / dense['tokens_per_s']:.2f}x |"
    )
    print(
        f"| peak resident memory, load + generation (MB) | {dense['peak_mb']:.0f} | {compressed['peak_mb']:.0f} | "
        f"{compressed['peak_mb'] / dense['peak_mb']:.2f}x |"
    )
    results_file = args.compressed / "eval_results.json"
    if results_file.is_file():
        for row in _quality_rows(json.loads(results_file.read_text())):
            print(row)
    print(
        "\nAccuracy is ± one standard error over the documents scored; a difference marked (noise) is within two "
        "standard errors of the difference and is not evidence of a change. Speed on a busy machine (load average "
        "near or above the number of cores) is not a claim: rerun it on a quiet one."
    )
    for prompt, before, after in zip(PROMPTS, dense["answers"], compressed["answers"], strict=False):
        print(f"\n### {prompt}\n- dense:      {before!r}\n- compressed: {after!r}")


if __name__ == "__main__":
    main()
