"""Calibration statistics of chosen layers of the dense model, for the benchmarks that work layer by layer.

The windows are the first C4 documents joined and cut in order (no sampling: the same tokens for every run), and
the statistics are the library's own (`optimum_oats.engine.statistics.collect_statistics`): Wanda/OATS's input norms
`D = ||X_j||_2` or SparseGPT's Hessian `H = 2 X^T X / n`, accumulated exactly as `compress()` does.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from optimum_oats.engine.statistics import collect_statistics

from .data import c4_sample


def c4_token_windows(tokenizer, sequences: int, seqlen: int, root: Path | None = None) -> torch.Tensor:
    """`(sequences, seqlen)` token ids: the first C4 documents joined with a blank line, cut into consecutive windows.

    Only as many documents are read as the windows need (about 4 characters a token, read twice over).
    """
    file = c4_sample(root)
    texts, chars = [], 0
    with file.open(encoding="utf-8") as handle:
        for line in handle:
            texts.append(json.loads(line)["text"])
            chars += len(texts[-1])
            if chars > 8 * sequences * seqlen:
                break
    ids = tokenizer("\n\n".join(texts), return_tensors="pt").input_ids[0]
    if ids.numel() < sequences * seqlen:
        raise SystemExit(f"{file} holds {ids.numel()} tokens, fewer than {sequences} x {seqlen}")
    return ids[: sequences * seqlen].view(sequences, seqlen)


def layer_statistics(model, names: list[str], windows: torch.Tensor, statistic: str) -> dict[str, torch.Tensor]:
    """`statistic` (`optimum_oats.algorithms.INPUT_NORMS` or `HESSIAN`) of each named linear layer of `model`, from
    the `(n, seqlen)` token `windows` run through it one at a time."""
    modules = dict(model.named_modules())
    linears = {name: modules[name] for name in names}
    with torch.no_grad(), collect_statistics(linears, (statistic,)) as accumulators:
        for window in windows:
            model(window[None])
    return {name: accumulators[name][statistic].finalize() for name in names}
