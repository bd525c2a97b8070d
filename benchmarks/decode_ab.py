"""Greedy decode tokens/s, dense vs compressed (rho 0.5 random masks + rank-16 factors), SmolLM2-135M shapes, one
thread; prints one JSON line. Which optimum_oats is imported comes from PYTHONPATH, so two checkouts can be compared
side by side in one run (alternate them; on a loaded machine compare the compressed/dense ratio, not tokens/s):

    for i in 1 2 3; do for code in /path/to/main /path/to/branch; do
        OMP_NUM_THREADS=1 PYTHONPATH=$code python benchmarks/decode_ab.py float32; done; done
"""

import json
import statistics
import sys
import time

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import optimum_oats
from optimum_oats.nn import LinearSparseLowRank

torch.set_num_threads(1)
dtype = getattr(torch, sys.argv[1]) if len(sys.argv) > 1 else torch.float32
config = LlamaConfig(
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    vocab_size=49152,
    tie_word_embeddings=True,
)
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
ids = torch.randint(0, 49152, (1, 16), generator=g)
kw = dict(do_sample=False, eos_token_id=None, pad_token_id=0)
new = 24
rates = {"dense": [], "compressed": []}
with torch.no_grad():
    for model in (dense, comp):
        model.generate(ids, max_new_tokens=4, min_new_tokens=4, **kw)
    for rep in range(3):
        for name, model in (
            (("dense", dense), ("compressed", comp)) if rep % 2 == 0 else (("compressed", comp), ("dense", dense))
        ):
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
