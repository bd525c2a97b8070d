"""`torch.compile(fullgraph=True)` traces a compressed model on the CPU: the layer's forward is one custom op
(`optimum_oats::sparse_lowrank_linear`) whose offset lookup happens inside, so Dynamo sees no data pointer, no
version counter and no Python-side kernel choice, and the compiled outputs match eager. The same model through the
Triton paths (under the interpreter) is in tests/nn/test_triton_kernels.py."""

from __future__ import annotations

import pytest
import torch

from optimum_oats.nn import set_execution_mode
from tests.helpers.compressed import tiny_compressed_llama


@pytest.fixture(scope="module")
def model():
    return tiny_compressed_llama()


def _logits(model, ids):
    return model(input_ids=ids, use_cache=False).logits


@pytest.mark.parametrize("mode", ["auto", "sparse_kernel", "workspace"])
def test_compressed_llama_traces_with_no_graph_break(model, mode):
    set_execution_mode(model, mode)
    torch._dynamo.reset()
    with torch.no_grad():
        for tokens in (1, 40):  # decode (the C++ kernel) and prefill (the workspace) lengths
            ids = torch.arange(tokens).view(1, tokens) % 128
            explanation = torch._dynamo.explain(_logits)(model, ids)
            assert explanation.graph_break_count == 0, explanation.break_reasons
            assert explanation.graph_count == 1
    set_execution_mode(model, "auto")


def test_fullgraph_compile_matches_eager(model):
    torch._dynamo.reset()
    compiled = torch.compile(_logits, fullgraph=True, backend="aot_eager", dynamic=False)
    with torch.no_grad():
        for tokens in (1, 40):
            ids = (torch.arange(tokens).view(1, tokens) * 7) % 128
            torch.testing.assert_close(compiled(model, ids), _logits(model, ids), rtol=1e-5, atol=1e-5)


def test_inductor_fullgraph_compile_of_the_model_matches_eager(model):
    """The user's call: `torch.compile(model, fullgraph=True)` with the default (Inductor) backend."""
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    with torch.no_grad():
        expected = model(input_ids=ids, use_cache=False).logits
        torch.testing.assert_close(compiled(input_ids=ids, use_cache=False).logits, expected, rtol=1e-4, atol=1e-4)


def test_int8_embedding_and_tied_head_trace_with_no_graph_break():
    """`embedding_bits=8`: the lookup and the head's int8 GEMM (decode) or decode + GEMM (prefill) trace whole."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from optimum_oats.engine.embeddings import quantize_embeddings
    from tests.helpers.compressed import compress_randomly
    from tests.helpers.tiny_models import TINY

    torch.manual_seed(0)
    config = LlamaConfig(**TINY, vocab_size=128, tie_word_embeddings=True)
    model = AutoModelForCausalLM.from_config(config).eval().requires_grad_(False)
    compress_randomly(model, seed=0)
    quantize_embeddings(model)
    torch._dynamo.reset()
    compiled = torch.compile(_logits, fullgraph=True, backend="aot_eager", dynamic=False)
    with torch.no_grad():
        for tokens in (1, 40):
            ids = (torch.arange(tokens).view(1, tokens) * 7) % 128
            explanation = torch._dynamo.explain(_logits)(model, ids)
            assert explanation.graph_break_count == 0, explanation.break_reasons
            torch.testing.assert_close(compiled(model, ids), _logits(model, ids), rtol=1e-5, atol=1e-5)
