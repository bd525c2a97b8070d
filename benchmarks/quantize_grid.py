"""Which value grid earns its bytes: round-to-nearest error of SmolLM2-135M's pruned layers under three grids.

Every linear layer of the blocks is magnitude-pruned per row to `--rate` (the kept values are the large ones), then
its kept values are rounded group-wise (groups of `--group` input columns, scales over the kept values only):

- `zero-free`: the project's grid (`optimum_oats.algorithms.quantize`): `(q - (2^b-1)/2) s`, no level at 0, fp16 s;
- `int-sym`: GPTQ's symmetric integer grid `q s`, `q` in `[-2^(b-1), 2^(b-1))`, scale `max|w| / (2^(b-1) - 1)`,
  fp16 s (a kept value that rounds to 0 is counted as error, as it would leave the mask);
- `asym`: min-max asymmetric `(q - zp) s` with an fp16 zero point per group (16 bits more per group).

All three use plain min-max scales (the grids compared alone); `zero-free + clip search` adds the library's search
of the clipping ratio. Prints the relative
Frobenius error of the kept values summed over layers and the scale (and zero point) bits per kept value.

    python benchmarks/quantize_grid.py --rate 0.4 --group 128
"""

from __future__ import annotations

import argparse

import torch
from toolkit.models import load_causal_lm
from toolkit.provenance import Provenance

from optimum_oats.algorithms.quantize import GroupSpec, expand_scales, group_scales, round_to_grid


def int_symmetric(values: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    out = torch.zeros_like(values)
    top = 2 ** (bits - 1) - 1
    for start in range(0, values.shape[1], group):
        block = values[:, start : start + group]
        scale = (block.abs().amax(1, keepdim=True) / top).clamp_min(1e-8).half().float()
        out[:, start : start + group] = torch.round(block / scale).clamp(-top - 1, top) * scale * (block != 0)
    return out


def asymmetric(values: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    out = torch.zeros_like(values)
    top = 2**bits - 1
    big = torch.finfo(values.dtype).max
    for start in range(0, values.shape[1], group):
        block = values[:, start : start + group]
        kept = block != 0
        low = torch.where(kept, block, big).amin(1, keepdim=True).where(kept.any(1, keepdim=True), 0)
        high = torch.where(kept, block, -big).amax(1, keepdim=True).where(kept.any(1, keepdim=True), 0)
        scale = ((high - low) / top).clamp_min(1e-8).half().float()
        zero = (-low / scale).half().float()
        out[:, start : start + group] = (torch.round(block / scale + zero).clamp(0, top) - zero) * scale * kept
    return out


def zero_free(values: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    spec = GroupSpec(bits, group)
    scales = group_scales(values, spec, ratios=(1.0,))
    return round_to_grid(values, expand_scales(scales, values.shape[1], spec), spec)


def zero_free_clip(values: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    spec = GroupSpec(bits, group)
    return round_to_grid(values, expand_scales(group_scales(values, spec), values.shape[1], spec), spec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=0.4)
    parser.add_argument("--group", type=int, default=128)
    parser.add_argument("--bits", type=int, nargs="+", default=[3, 4])
    args = parser.parse_args()
    provenance = Provenance.start()
    model = load_causal_lm(dtype=torch.float32)
    weights = [m.weight.detach() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "layers" in n]
    pruned = []
    for weight in weights:
        keep = int(round((1 - args.rate) * weight.shape[1]))
        index = weight.abs().topk(keep, dim=1).indices
        pruned.append(torch.zeros_like(weight).scatter(1, index, weight.gather(1, index)))
    kept_per_group = (1 - args.rate) * args.group
    extra = {"zero-free": 16, "zero-free + clip search": 16, "int-sym": 16, "asym": 32}
    grids = (("zero-free", zero_free), ("zero-free + clip search", zero_free_clip))
    grids += (("int-sym", int_symmetric), ("asym", asymmetric))
    print(f"SmolLM2-135M, {len(pruned)} layers magnitude-pruned to rho={args.rate}, groups of {args.group} columns")
    print("| grid | bits | relative error of kept values | scale (+zero) bits per kept value |")
    print("|---|---|---|---|")
    for bits in args.bits:
        for name, fn in grids:
            num = sum(float((fn(w, bits, args.group) - w).square().sum()) for w in pruned)
            den = sum(float(w.square().sum()) for w in pruned)
            print(f"| {name} | {bits} | {(num / den) ** 0.5:.4f} | {extra[name] / kept_per_group:.3f} |")
    print(f"\n{provenance.line()}")


if __name__ == "__main__":
    main()
