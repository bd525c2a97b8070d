"""The frontier: perplexity against bits per weight, the peer's points beside the project's (issue 35).

Reads the stored results of two benchmarks and prints one markdown table, optionally a plot:

- the peer's, `benchmarks/peer_llmcompressor.py` (`--peer`, default `bench_results/peer`): one JSON per cell and
  seed, `{cell}-s{seed}.json`, carrying `bits_per_weight` measured on the saved compressed-tensors checkpoint;
- the project's, `benchmarks/quality.py` (`--project`, any number of its `--output` folders): one JSON per
  entry, named by `quality.entry_key` (`{method}-{layerwise}-{rate}[...][-s{seed}][...]`).

    python benchmarks/frontier.py --project bench_results/sweep17 --plot docs/frontier.png

Bits per weight, over the compressed (or quantized) linear layers: every stored byte of those layers, values,
mask, scales, zero points and factors, times 8, over their dense weight count. A project result that carries
`bits_per_weight` is taken as stored (with `value_bits` and `lowrank_bits` where it says them); a quantized one
without it is refused. One that carries none of them is an unquantized sparse + low-rank checkpoint, whose format
is known: kept values in bf16, a 1-bit mask over every weight (`nn.packing`; rows pad to a byte, exact for
SmolLM2's widths), U and V in bf16, so over all compressed layers together

    bits_per_weight = (16 * nnz + 1 * d_in * d_out + 16 * rank * (d_in + d_out)) / (d_in * d_out)
                    = 16 * kept_fraction + 1,

with `kept_fraction` the report's kept parameters `nnz + rank (d_in + d_out)` over the dense ones (quality.py
stores it). The sweep scores these models with float32 values; the bits are those of their bf16 checkpoint.

Perplexity across seeds: the geometric mean. The interval column gives, where a row shares two or more seeds with
the reference (`--reference`, default llm-compressor GPTQ W4A16 g64), the 95% t interval of the per-seed ratio
row / reference (below 1: better); otherwise, with two or more seeds, the 95% t interval of the perplexity itself.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from statistics import fmean

from toolkit.cells import write_figure
from toolkit.intervals import geometric_interval

DENSE_BITS = 16.0  # the bf16 checkpoint of the dense model
MASK_BITS = 1.0
VALUE_BITS_UNQUANTIZED = 16
REFERENCE = "llm-compressor gptq-w4a16-g64"
KEY = re.compile(r"^(?P<method>[a-z_]+)-(?P<layerwise>uniform|owl)-(?P<rate>\d+(?:\.\d+)?)(?P<rest>.*)$")
SEED_TOKEN = re.compile(r"-s(\d+)(?=-|$)")
PEER_SEED = re.compile(r"^(?P<cell>.+)-s(?P<seed>\d+)$")


@dataclass
class Setting:
    """One row of the frontier: a method at one setting, over the seeds stored for it."""

    label: str
    source: str  # "peer", "project" or "dense"
    rate: float | None
    value_bits: float | None
    bits_per_weight: float
    perplexity: dict[int, float] = field(default_factory=dict)  # seed -> perplexity

    @property
    def mean(self) -> float:
        """Geometric mean over the seeds (ratios of perplexities average on the log scale)."""
        return math.exp(fmean(math.log(p) for p in self.perplexity.values()))


def unquantized_bits(kept_fraction: float) -> float:
    """Bits per weight of an unquantized sparse + low-rank checkpoint (bf16 values and U, V, 1-bit mask)."""
    return VALUE_BITS_UNQUANTIZED * kept_fraction + MASK_BITS


def _add(rows: dict[str, Setting], row: Setting, seed: int, perplexity: float) -> None:
    stored = rows.setdefault(row.label, row)
    if not math.isclose(stored.bits_per_weight, row.bits_per_weight, rel_tol=1e-3):
        raise ValueError(
            f"`{row.label}`: seeds disagree on bits per weight ({stored.bits_per_weight:.4f} vs "
            f"{row.bits_per_weight:.4f}); give each setting its own folder or key"
        )
    stored.perplexity[seed] = perplexity


def load_peer(folder: Path, rows: dict[str, Setting]) -> None:
    """Read `peer_llmcompressor.py`'s results; `dense.json` there is the same dense model and is skipped."""
    for file in sorted(folder.glob("*.json")):
        data = json.loads(file.read_text())
        if data.get("cell", file.stem) == "dense":
            continue
        match = PEER_SEED.match(file.stem)
        if match is None or "bits_per_weight" not in data:
            raise ValueError(f"{file}: not a peer result (`{{cell}}-s{{seed}}.json` with `bits_per_weight`)")
        scheme = data.get("scheme", {})
        row = Setting(
            label=f"llm-compressor {match['cell']}",
            source="peer",
            rate=scheme.get("sparsity"),
            value_bits=scheme.get("bits", VALUE_BITS_UNQUANTIZED),
            bits_per_weight=data["bits_per_weight"],
        )
        _add(rows, row, int(match["seed"]), data["perplexity"])


def load_project(folder: Path, rows: dict[str, Setting]) -> float | None:
    """Read `quality.py`'s results; returns the dense perplexity when the folder has one."""
    dense = None
    for file in sorted(folder.glob("*.json")):
        data = json.loads(file.read_text())
        if file.stem == "dense":
            dense = data["perplexity"]
            continue
        match = KEY.match(file.stem)
        if match is None:
            raise ValueError(f"{file}: not a quality.py result (`{{method}}-{{layerwise}}-{{rate}}...json`)")
        seeds = SEED_TOKEN.findall(match["rest"])
        seed = int(seeds[0]) if seeds else 0
        rest = SEED_TOKEN.sub("", match["rest"]).lstrip("-")
        if "bits_per_weight" in data:
            bits, value_bits = data["bits_per_weight"], data.get("value_bits")
        elif any(
            data.get(k, VALUE_BITS_UNQUANTIZED) != VALUE_BITS_UNQUANTIZED for k in ("value_bits", "lowrank_bits")
        ):
            raise ValueError(
                f"{file}: quantized (`value_bits` {data.get('value_bits')}, `lowrank_bits` {data.get('lowrank_bits')})"
                " but no `bits_per_weight`; the bf16 formula would overstate its size. Rerun it with a quality.py "
                "that records `bits_per_weight`"
            )
        elif "kept_fraction" in data:
            bits, value_bits = unquantized_bits(data["kept_fraction"]), VALUE_BITS_UNQUANTIZED
        else:
            raise ValueError(f"{file}: neither `bits_per_weight` nor `kept_fraction`; cannot place it on the frontier")
        layerwise = "" if match["layerwise"] == "uniform" else f" {match['layerwise']}"
        label = f"{match['method']}{layerwise} {match['rate']}" + (f" ({rest})" if rest else "")
        if value_bits is not None and value_bits != VALUE_BITS_UNQUANTIZED:
            label += f" q{value_bits:g}"
        if data.get("lowrank_bits") not in (None, VALUE_BITS_UNQUANTIZED):  # None: a method without U, V
            label += f" uv{data['lowrank_bits']:g}"
        row = Setting(label, "project", float(match["rate"]), value_bits, bits)
        _add(rows, row, seed, data["perplexity"])
    return dense


def interval(row: Setting, reference: Setting | None) -> str:
    """Paired ratio interval against the reference where they share >= 2 seeds, else the plain interval."""
    if reference is not None and reference is not row:
        shared = sorted(set(row.perplexity) & set(reference.perplexity))
        if len(shared) >= 2:
            mean, (low, high) = geometric_interval([row.perplexity[s] / reference.perplexity[s] for s in shared])
            return f"ratio {mean:.3f} [{low:.3f}, {high:.3f}] paired, {len(shared)} seeds"
    if len(row.perplexity) >= 2:
        _, (low, high) = geometric_interval(list(row.perplexity.values()))
        return f"ppl [{low:.2f}, {high:.2f}]"
    return "-"


def markdown_table(rows: list[Setting], reference_label: str = REFERENCE) -> str:
    """The frontier as markdown, rows by bits per weight (smallest first)."""
    reference = next((r for r in rows if r.label == reference_label), None)
    lines = [
        "| method | rho | value bits | bits / weight | perplexity per seed | mean | "
        f"95% interval (vs {reference_label}) |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in sorted(rows, key=lambda r: (r.bits_per_weight, r.mean)):
        seeds = " ".join(
            f"{p:.2f}" + ("" if row.source == "dense" else f" (s{s})") for s, p in sorted(row.perplexity.items())
        )
        rate = "-" if row.rate is None else f"{row.rate:g}"
        value_bits = "-" if row.value_bits is None else f"{row.value_bits:g}"
        lines.append(
            f"| {row.label} | {rate} | {value_bits} | {row.bits_per_weight:.2f} | {seeds} | {row.mean:.2f} | "
            f"{interval(row, reference)} |"
        )
    return "\n".join(lines)


def plot(rows: list[Setting], path: Path, title: str, ceiling: float = 500.0) -> Path:
    """Perplexity (log) against bits per weight: peer points as squares, each project method as a line over rho.

    A point is the geometric mean over its seeds, its bar their range. Points above `ceiling` (a collapsed model)
    are drawn as a triangle on the top edge with their value, so that they do not squash the region that matters."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FormatStrFormatter

    fig = Figure(figsize=(9, 5.5), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()

    def bars(group: list[Setting]) -> tuple[list[float], list[float], list[list[float]]]:
        xs = [r.bits_per_weight for r in group]
        ys = [r.mean for r in group]
        err = [[max(0.0, y - min(r.perplexity.values())) for r, y in zip(group, ys, strict=True)]]
        err.append([max(0.0, max(r.perplexity.values()) - y) for r, y in zip(group, ys, strict=True)])
        return xs, ys, err

    lines: dict[str, list[Setting]] = {}
    for row in rows:
        if row.source == "project":
            # One line per method and setting suffix, across rho (the rate is dropped from the label).
            name = re.sub(r" \d+(?:\.\d+)?(?= |$)", "", row.label, count=1)
            lines.setdefault(name, []).append(row)
    for index, (name, group) in enumerate(sorted(lines.items())):
        group.sort(key=lambda r: r.bits_per_weight)
        xs, ys, err = bars(group)
        shown = [min(y, ceiling) for y in ys]
        ax.errorbar(xs, shown, yerr=err, marker="o", color=f"C{index % 10}", capsize=3, label=name)
        for row, x, y in zip(group, xs, ys, strict=True):
            note = f"{row.rate:g}" if y <= ceiling else f"{row.rate:g}: {y:.3g} (off scale)"
            ax.annotate(
                note,
                (x, min(y, ceiling)),
                fontsize=6,
                xytext=(3, 3 if y <= ceiling else -10),
                textcoords="offset points",
            )
            if y > ceiling:
                ax.plot([x], [ceiling], marker="^", color=f"C{index % 10}", markersize=9)
    for row in rows:
        if row.source == "peer":
            xs, ys, err = bars([row])
            ax.errorbar(xs, ys, yerr=err, marker="s", color="black", linestyle="none", capsize=3)
            ax.annotate(
                row.label.removeprefix("llm-compressor "),
                (xs[0], ys[0]),
                fontsize=7,
                xytext=(4, -9),
                textcoords="offset points",
            )
        elif row.source == "dense":
            ax.axhline(row.mean, color="grey", linewidth=0.8, linestyle=":", label=f"dense bf16 ({row.mean:.2f})")
    ax.plot([], [], marker="s", color="black", linestyle="none", label="llm-compressor (peer)")
    ax.set_yscale("log")
    ax.set_ylim(top=ceiling * 1.05)
    ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.yaxis.set_minor_formatter(FormatStrFormatter("%g"))
    ax.set_xlabel("bits per weight of the compressed linear layers (all bytes x 8 / dense weights)")
    ax.set_ylabel("WikiText-2 token perplexity (log)")
    ax.set_title(title)
    ax.legend(fontsize=7)
    return write_figure(fig, path)


def collect(peer: list[Path], project: list[Path]) -> list[Setting]:
    """Every row from the given folders, the dense model first when one of them stored it."""
    rows: dict[str, Setting] = {}
    dense = None
    for folder in peer:
        if not folder.is_dir():
            raise FileNotFoundError(f"`--peer` {folder}: no such folder; run benchmarks/peer_llmcompressor.py first")
        load_peer(folder, rows)
        if dense is None and (folder / "dense.json").is_file():
            dense = json.loads((folder / "dense.json").read_text())["perplexity"]
    for folder in project:
        if not folder.is_dir():
            raise FileNotFoundError(f"`--project` {folder}: no such folder; give a benchmarks/quality.py --output")
        found = load_project(folder, rows)
        dense = dense if dense is not None else found
    result = list(rows.values())
    if dense is not None:
        result.insert(0, Setting("dense", "dense", None, VALUE_BITS_UNQUANTIZED, DENSE_BITS, {0: dense}))
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peer", nargs="*", type=Path, default=[Path("bench_results/peer")])
    parser.add_argument("--project", nargs="*", type=Path, default=[])
    parser.add_argument("--reference", default=REFERENCE, help="the row the paired interval divides by")
    parser.add_argument("--plot", type=Path, default=None, help="write the frontier plot to this PNG")
    parser.add_argument("--ceiling", type=float, default=500.0, help="perplexities above this sit on the top edge")
    parser.add_argument("--title", default="SmolLM2-135M: calib 16x1024 C4, WikiText-2 16x1024")
    args = parser.parse_args(argv)
    rows = collect(args.peer, args.project)
    if not rows:
        raise SystemExit("No results found: give `--peer` and/or `--project` folders that hold result JSONs.")
    print(markdown_table(rows, args.reference))
    if args.plot:
        print(f"\nplot: {plot(rows, args.plot, args.title, args.ceiling)}")


if __name__ == "__main__":
    main()
