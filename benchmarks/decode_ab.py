"""Greedy decode tokens/s, dense vs compressed (rho 0.5 random masks + rank-16 factors), SmolLM2-135M shapes, one
thread; prints one JSON line. Which optimum_oats is imported comes from PYTHONPATH, so two checkouts can be compared
side by side in one run (alternate them; on a loaded machine compare the compressed/dense ratio, not tokens/s):

    for i in 1 2 3; do for code in /path/to/main /path/to/branch; do
        OMP_NUM_THREADS=1 PYTHONPATH=$code python benchmarks/decode_ab.py float32; done; done
"""

import argparse
import json
import statistics
import sys
import time

import torch
from toolkit.models import SMOLLM2_DIMS
from toolkit.provenance import Provenance
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import optimum_oats
from optimum_oats.nn import LinearSparseLowRank


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dtype", nargs="?", default="float32", choices=["float32", "bfloat16", "float16"])
    args = parser.parse_args()
    provenance = Provenance.start()
    torch.set_num_threads(1)
    dtype = getattr(torch, args.dtype)
    config = LlamaConfig(**SMOLLM2_DIMS, tie_word_embeddings=True)
    torch.manual_seed(0)
    dense = LlamaForCausalLM(config).eval().to(dtype).requires_grad_(False)
    comp = LlamaForCausalLM(config).eval().to(dtype).requires_grad_(False)
    comp.load_state_dict(dense.state_dict())
    g = torch.Generator().manual_seed(0)
    for name, m in list(comp.named_modules()):
        if isinstance(m, nn.Linear) and ".layers." in name:
            keep = torch.rand(m.weight.shape, generator=g) < 0.5
            u = torch.randn(m.out_features, 16, generator=g) * 0.01
            v = torch.randn(16, m.in_features, generator=g) * 0.01
            comp.set_submodule(name, LinearSparseLowRank.from_linear(m, m.weight.detach() * keep, u, v))
    comp.requires_grad_(False)
    ids = torch.randint(0, config.vocab_size, (1, 16), generator=g)
    kw = dict(do_sample=False, eos_token_id=None, pad_token_id=0)
    new = 24
    rates = {"dense": [], "compressed": []}
    with torch.no_grad():
        for model in (dense, comp):
            model.generate(ids, max_new_tokens=4, min_new_tokens=4, **kw)
        for rep in range(3):
            pairs = (("dense", dense), ("compressed", comp))
            for name, model in pairs if rep % 2 == 0 else pairs[::-1]:
                t = time.perf_counter()
                model.generate(ids, max_new_tokens=new, min_new_tokens=new, **kw)
                rates[name].append(new / (time.perf_counter() - t))
    out = {k: statistics.median(v) for k, v in rates.items()}
    out.update(
        code=optimum_oats.__file__,
        dtype=str(dtype),
        ratio=out["compressed"] / out["dense"],
        load=open("/proc/loadavg").read().split()[0],
    )
    print(json.dumps(out))
    print(provenance.line(), file=sys.stderr)  # stdout stays one JSON line


if __name__ == "__main__":
    main()
