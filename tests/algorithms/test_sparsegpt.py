import pytest
import torch

from optimum_oats.algorithms import magnitude_prune, wanda_prune
from optimum_oats.algorithms.sparsegpt import sparsegpt_prune
from optimum_oats.engine.statistics import HessianAccumulator


def _layer(d_out=24, d_in=96, tokens=512, seed=0):
    """A random weight and correlated calibration inputs with a few outlier features."""
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(d_in, d_in, generator=g) / d_in**0.5 + torch.eye(d_in)
    X = torch.randn(tokens, 8, generator=g) @ torch.randn(8, d_in, generator=g)  # shared low-rank component
    X = X + 0.5 * torch.randn(tokens, d_in, generator=g) @ mixing
    X[:, :3] *= 10
    W = torch.randn(d_out, d_in, generator=g)
    return W, X


def _hessian(X):
    return (2 * X.double().T @ X.double() / X.shape[0]).float()


def _output_error(W, W_hat, X):
    return float(((W - W_hat) @ X.T).norm())


def test_row_balanced_keeps_exactly_k_per_row():
    W, X = _layer(d_in=100)  # 100 columns in blocks of 32: the last block is partial
    for keep in (0, 1, 37, 50, 99, 100):
        out = sparsegpt_prune(W, _hessian(X), keep_per_row=keep, blocksize=32)
        assert out.dtype == torch.float32 and out.shape == W.shape
        assert ((out != 0).sum(1) == keep).all(), keep


def test_keeping_everything_changes_nothing():
    W, X = _layer()
    torch.testing.assert_close(sparsegpt_prune(W, _hessian(X), keep_per_row=W.shape[1]), W)
    # sparsity=0 with the reference's `<=` threshold at index 0 still prunes each block's lowest score
    out = sparsegpt_prune(W, _hessian(X), sparsity=0.0, blocksize=32)
    assert [int((out[:, i : i + 32] == 0).sum()) for i in range(0, W.shape[1], 32)] == [1] * (W.shape[1] // 32)


@pytest.mark.parametrize("sparsity", [0.5, 0.7])
def test_joint_rule_hits_the_rate_in_every_block(sparsity):
    W, X = _layer(d_out=20, d_in=80)
    out = sparsegpt_prune(W, _hessian(X), sparsity=sparsity, blocksize=32)
    for i1 in range(0, 80, 32):
        block = out[:, i1 : i1 + 32]
        assert int((block == 0).sum()) == int(block.numel() * sparsity) + 1  # the reference's `<=` at that index
    assert len(set((out != 0).sum(1).tolist())) > 1  # chosen jointly: rows keep different counts


@pytest.mark.parametrize("n,m", [(2, 4), (2, 8), (4, 8)])
def test_nm_groups_are_valid(n, m):
    W, X = _layer(d_in=64)
    out = sparsegpt_prune(W, _hessian(X), nm=(n, m), blocksize=32)
    assert ((out != 0).view(W.shape[0], -1, m).sum(-1) == n).all()


def test_beats_wanda_and_magnitude_on_correlated_inputs():
    W, X = _layer(seed=1)
    keep = W.shape[1] // 2
    H = _hessian(X)
    norms = X.norm(dim=0)  # sqrt(diag(X^T X))
    errors = {
        "sparsegpt": _output_error(W, sparsegpt_prune(W, H, keep_per_row=keep, blocksize=32), X),
        "sparsegpt_joint": _output_error(W, sparsegpt_prune(W, H, sparsity=0.5, blocksize=32), X),
        "wanda": _output_error(W, wanda_prune(W, norms, keep_per_row=keep), X),
        "magnitude": _output_error(W, magnitude_prune(W, keep_per_row=keep), X),
    }
    assert errors["sparsegpt"] < 0.8 * errors["wanda"] < errors["magnitude"], errors
    assert errors["sparsegpt_joint"] < 0.8 * errors["wanda"], errors
    nm_errors = [
        _output_error(W, sparsegpt_prune(W, H, nm=(2, 4)), X),
        _output_error(W, wanda_prune(W, norms, keep_per_row=0, nm=(2, 4)), X),
    ]
    assert nm_errors[0] < 0.8 * nm_errors[1], nm_errors


def test_dead_input_is_zeroed_and_harmless():
    W, X = _layer(d_in=64)
    X[:, 5] = 0
    out = sparsegpt_prune(W, _hessian(X), keep_per_row=20, blocksize=16)
    assert torch.isfinite(out).all()
    assert (out[:, 5] == 0).all()
    assert ((out != 0).sum(1) == 20).all()
    assert _output_error(W, out, X) < _output_error(W, wanda_prune(W, X.norm(dim=0), keep_per_row=20), X)


def test_deterministic_and_inputs_untouched():
    W, X = _layer()
    H = _hessian(X)
    W_copy, H_copy = W.clone(), H.clone()
    first = sparsegpt_prune(W, H, keep_per_row=40, blocksize=32)
    assert torch.equal(first, sparsegpt_prune(W, H, keep_per_row=40, blocksize=32))
    assert torch.equal(W, W_copy) and torch.equal(H, H_copy)


def test_accepts_half_precision_weight():
    W, X = _layer()
    out = sparsegpt_prune(W.bfloat16(), _hessian(X), keep_per_row=30)
    assert out.dtype == torch.float32 and ((out != 0).sum(1) == 30).all()


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({}, "exactly one of"),
        ({"keep_per_row": 4, "sparsity": 0.5}, "exactly one of"),
        ({"keep_per_row": 97}, r"keep_per_row.*\[0, 96\]"),
        ({"sparsity": 1.0}, r"sparsity.*\[0, 1\)"),
        ({"nm": (2, 5)}, "divisible by M=5"),
        ({"nm": (2, 8), "blocksize": 12}, "multiple of M=8"),
        ({"nm": (2, 4), "sparsity": 0.5}, "nm"),
        ({"nm": (2, 4), "keep_per_row": 10}, "other than 48"),
        ({"keep_per_row": 4, "percdamp": -0.1}, "percdamp"),
        ({"keep_per_row": 4, "blocksize": 0}, "blocksize"),
    ],
)
def test_invalid_arguments(kwargs, match):
    W, X = _layer()
    with pytest.raises(ValueError, match=match):
        sparsegpt_prune(W, _hessian(X), **kwargs)


def test_nm_accepts_consistent_keep_per_row():
    W, X = _layer()
    out = sparsegpt_prune(W, _hessian(X), nm=(2, 4), keep_per_row=48)
    assert ((out != 0).view(W.shape[0], -1, 4).sum(-1) == 2).all()


def test_non_positive_definite_hessian_is_reported():
    W, X = _layer(d_in=16)
    H = -torch.eye(16)
    with pytest.raises(ValueError, match="not positive definite"):
        sparsegpt_prune(W[:, :16], H, keep_per_row=8, percdamp=0.0)


def test_hessian_accumulator_matches_direct_formula():
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(*shape, 12, generator=g) for shape in [(2, 7), (1, 30), (5,), (3, 1, 4)]]
    batches[2] = batches[2].bfloat16()  # any dtype
    accumulator = HessianAccumulator(12, torch.device("cpu"))
    for batch in batches:
        accumulator.update(batch)
    H = accumulator.finalize()
    X = torch.cat([batch.reshape(-1, 12).double() for batch in batches])
    assert accumulator.tokens == X.shape[0] == 14 + 30 + 5 + 12
    assert H.dtype == torch.float32 and H.shape == (12, 12)
    torch.testing.assert_close(H.double(), 2 * X.T @ X / X.shape[0], rtol=1e-5, atol=1e-5)


def _reference_fasterprune(W, H, sparsity, prunen=0, prunem=0, blocksize=128, percdamp=0.01):
    """IST-DASLab/sparsegpt `SparseGPT.fasterprune`, transcribed (losses and printing dropped)."""
    W, H = W.clone().float(), H.clone()
    columns = W.shape[1]
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    damp = percdamp * torch.mean(torch.diag(H))
    diag = torch.arange(columns)
    H[diag, diag] += damp
    H = torch.linalg.cholesky(H)
    H = torch.cholesky_inverse(H)
    Hinv = torch.linalg.cholesky(H, upper=True)
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        if prunen == 0:
            tmp = W1**2 / (torch.diag(Hinv1).reshape((1, -1))) ** 2
            thresh = torch.sort(tmp.flatten())[0][int(tmp.numel() * sparsity)]
            mask1 = tmp <= thresh
        else:
            mask1 = torch.zeros_like(W1) == 1
        for i in range(count):
            w = W1[:, i]
            d = Hinv1[i, i]
            if prunen != 0 and i % prunem == 0:
                tmp = W1[:, i : (i + prunem)] ** 2 / (torch.diag(Hinv1)[i : (i + prunem)].reshape((1, -1))) ** 2
                mask1.scatter_(1, i + torch.topk(tmp, prunen, dim=1, largest=False)[1], True)
            q = w.clone()
            q[mask1[:, i]] = 0
            Q1[:, i] = q
            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1
        W[:, i1:i2] = Q1
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    return W


def test_matches_the_reference_code():
    W, X = _layer(d_out=16, d_in=64, seed=4)
    X[:, 7] = 0  # exercise the dead-input path too
    H = _hessian(X)
    # N:M: the reference's `prunen` counts pruned entries, ours kept ones; at 2:4 they coincide
    expected = _reference_fasterprune(W, H, 0, prunen=2, prunem=4, blocksize=32)
    torch.testing.assert_close(sparsegpt_prune(W, H, nm=(2, 4), blocksize=32), expected, rtol=1e-4, atol=1e-5)
    # unstructured: the same joint per-block threshold as the reference, at every sparsity
    for sparsity in (0.3, 0.5, 0.7):
        expected = _reference_fasterprune(W, H, sparsity, blocksize=32)
        out = sparsegpt_prune(W, H, sparsity=sparsity, blocksize=32)
        assert torch.equal(out == 0, expected == 0)
        torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
