"""Cost of the resume folder's weight fingerprint (a sha256 of every weight) on SmolLM2-135M, beside its load time.

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python benchmarks/resume_fingerprint.py [--repeats 3]

Prints one JSON line: bytes hashed, the median time of `weights_fingerprint`, the throughput, and the time of
`from_pretrained` for comparison (a job with `checkpoint_dir` pays the fingerprint once per run).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

from toolkit.models import load_causal_lm, smollm2_path
from toolkit.provenance import Provenance


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    provenance = Provenance.start()

    from optimum_oats.engine.resume import weights_fingerprint

    path = smollm2_path()
    started = time.perf_counter()
    model = load_causal_lm(path)
    load_s = time.perf_counter() - started
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    size = sum(t.numel() * t.element_size() for t in tensors.values())
    times = []
    for _ in range(args.repeats):
        started = time.perf_counter()
        groups = weights_fingerprint(model)
        times.append(time.perf_counter() - started)
    median = statistics.median(times)
    print(
        json.dumps(
            {
                "model": path,
                "dtype": str(next(model.parameters()).dtype),
                "bytes_hashed": size,
                "groups": len(groups),
                "fingerprint_s": round(median, 3),
                "fingerprint_s_all": [round(t, 3) for t in times],
                "throughput_GBps": round(size / median / 1e9, 2),
                "from_pretrained_s": round(load_s, 3),
            }
        )
    )
    print(provenance.line(), file=sys.stderr)  # stdout stays one JSON line


if __name__ == "__main__":
    main()
