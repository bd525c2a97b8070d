"""What quantizing the tied token embedding / LM head costs: WikiText-2 perplexity of the *dense* SmolLM2-135M with
only its embedding table rounded to nearest at each width (the grid with a zero level and the clip search of
`optimum_oats.algorithms.quantize`), so the number is the embedding's own cost, apart from any block compression.

It is why `OATSConfig(embedding_bits=...)` offers 8 only:

    OATS_DATA_DIR=../shared/data OMP_NUM_THREADS=1 python benchmarks/embedding_bits.py --widths 8 6 4
"""

from __future__ import annotations

import argparse

import torch
from toolkit.data import data_root
from toolkit.models import load_causal_lm, load_tokenizer
from toolkit.provenance import Provenance

from optimum_oats.algorithms.quantize import GroupSpec, quantize_rows_int8, quantize_rtn
from optimum_oats.evaluation.perplexity import token_perplexity, wikitext2_text


def rounded_table(weight: torch.Tensor, bits: int, group_size: int | None) -> torch.Tensor:
    """The table as the int8 rows store it (8 bits, one scale per row), or rounded to `bits` in groups."""
    if bits == 8 and group_size is None:
        codes, scales = quantize_rows_int8(weight)
        return codes.float() * scales.unsqueeze(1)
    return quantize_rtn(weight, GroupSpec(bits, group_size or weight.shape[1], zero_level=True))[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--widths", type=int, nargs="+", default=[8, 6, 4], help="bits of the embedding table")
    parser.add_argument("--group-sizes", type=int, nargs="+", default=[64, 32], help="for widths below 8")
    parser.add_argument("--seqlen", type=int, default=1024)
    parser.add_argument("--windows", type=int, default=16, help="first windows of WikiText-2 test")
    args = parser.parse_args()
    provenance = Provenance.start()
    tokenizer, text = load_tokenizer(), wikitext2_text(data_root())
    model = load_causal_lm(dtype=torch.float32).eval()
    table = model.get_input_embeddings().weight
    if model.get_output_embeddings() is None or model.get_output_embeddings().weight is not table:
        raise SystemExit("This benchmark expects a model whose LM head is tied to its embedding (SmolLM2 is).")
    dense = table.detach().clone()
    settings = [(None, None)] + [
        (bits, None if bits == 8 else group)
        for bits in args.widths
        for group in ([None] if bits == 8 else args.group_sizes)
    ]
    print(
        f"\n### Dense SmolLM2-135M, only the tied embedding rounded; WikiText-2 test, {args.windows} x {args.seqlen}\n"
    )
    print("| embedding | group | perplexity | vs float | relative error of the table |")
    print("|---|---|---:|---:|---:|")
    baseline = None
    for bits, group in settings:
        rounded = dense if bits is None else rounded_table(dense, bits, group)
        with torch.no_grad():
            table.copy_(rounded)
        perplexity = token_perplexity(
            model, tokenizer, text, seqlen=args.seqlen, max_windows=args.windows, progress=False
        )
        baseline = baseline or perplexity
        error = ((rounded - dense).norm() / dense.norm()).item()
        label = "float32" if bits is None else f"{bits}-bit"
        grouping = "-" if bits is None else ("row" if group is None else str(group))
        print(f"| {label} | {grouping} | {perplexity:.3f} | {perplexity / baseline:.4f}x | {error:.4f} |", flush=True)
    print("\n" + provenance.line())


if __name__ == "__main__":
    main()
