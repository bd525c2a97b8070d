"""SparseGPT: one-shot pruning with OBS weight updates driven by the layer Hessian.

Frantar & Alistarh, "SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot", ICML 2023
(https://arxiv.org/abs/2301.00774); reference code `SparseGPT.fasterprune` in IST-DASLab/sparsegpt.

Three mask rules, all scored by `w^2 / [H^-1]_jj^2` on the weights as already updated by earlier columns:

- `sparsity=s` (the reference's unstructured rule, the default of `method="sparsegpt"`): in each block of
  `blocksize` columns, every score `<=` the sorted value at index `int(s · d_out · count)` of the whole block is
  pruned, jointly across rows, exactly as the reference thresholds (so one entry more than the index, plus any
  ties), and the number of kept weights varies from row to row.
- `keep_per_row=k` (row-balanced, an explicit option only): the same adaptive
  block-by-block selection, but the comparison group is each row of the block (as Wanda compares within a
  row). Row quotas are spread over the blocks in proportion to their width: after the block ending at column
  `c` every row has kept exactly `floor(k · c / d_in)` weights, so every row keeps exactly `k` in total.
- `nm=(N, M)`: in each row, every group of `M` consecutive columns keeps its `N` highest scores, chosen when
  the walk reaches the group (the reference's `prunen`/`prunem`; note the reference's `prunen` counts the
  *pruned* entries, here `N` counts the *kept* ones, as in the rest of the project).

Kept weights of dead inputs (`H_jj = 0`) are exactly zero, so with many dead inputs a row can hold fewer
non-zeros than its mask keeps.

Quantization (`quant=GroupSpec`, [`prune_and_quantize_with_factor`]): as the reference's joint mode, each column is
rounded as it is pruned, `q = quantize(w)` on the kept entries, and the OBS update spreads `(w - q) / d` (pruning
and rounding error together) over the columns not yet placed. A group's scale is taken, when the pass reaches the
group's first column, from the group's kept values as updated so far (GPTQ's dynamic groups); the block is widened to
the group when the group is wider than 128 columns, so a group never straddles two blocks.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from .budget import LayerBudget
from .method import HESSIAN, Algorithm, NoSettings
from .oats import Decomposition
from .quantize import GroupSpec, best_scale, round_to_grid

SPARSEGPT_PRECISION = torch.float32


def _check_arguments(
    d_in: int,
    keep_per_row: int | None,
    sparsity: float | None,
    nm: tuple[int, int] | None,
    blocksize: int,
    percdamp: float,
) -> None:
    if nm is not None:
        n, m = nm
        if not 0 < n <= m:
            raise ValueError(f"`nm` must be (N, M) with 0 < N <= M, got {nm}.")
        if d_in % m:
            raise ValueError(f"N:M sparsity needs `in_features` divisible by M={m}, got {d_in}.")
        if blocksize % m:
            raise ValueError(
                f"`blocksize` must be a multiple of M={m} so groups never straddle blocks, got {blocksize}."
            )
        if sparsity is not None or (keep_per_row is not None and keep_per_row != d_in * n // m):
            raise ValueError(
                f"With `nm`={nm} give neither `sparsity` nor a `keep_per_row` other than {d_in * n // m}; "
                f"got sparsity={sparsity}, keep_per_row={keep_per_row}."
            )
    elif (keep_per_row is None) == (sparsity is None):
        raise ValueError(
            f"Give exactly one of `keep_per_row` (row-balanced) or `sparsity` (joint per block), or `nm`; "
            f"got keep_per_row={keep_per_row}, sparsity={sparsity}."
        )
    elif keep_per_row is not None and not 0 <= keep_per_row <= d_in:
        raise ValueError(f"`keep_per_row` must be in [0, {d_in}], got {keep_per_row}.")
    elif sparsity is not None and not 0 <= sparsity < 1:
        raise ValueError(f"`sparsity` must be in [0, 1), got {sparsity}.")
    if blocksize < 1:
        raise ValueError(f"`blocksize` must be a positive integer, got {blocksize}.")
    if percdamp < 0:
        raise ValueError(f"`percdamp` must be >= 0, got {percdamp}.")


def inverse_hessian_factor(hessian: torch.Tensor, percdamp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """Upper Cholesky factor of the dampened `H^-1`, as in the reference, and the dead inputs.

    Dead inputs (`H_jj = 0`, never active in calibration) get `H_jj = 1` so `H` is invertible; the caller zeroes
    their weights, so the pruned layer does not depend on features calibration never saw.

    Args:
        hessian: `(d_in, d_in)`, `2 X^T X / n`; not modified.
        percdamp: damping `percdamp · mean(diag H)` added to the diagonal (after the dead-input fix).

    Returns:
        `Hinv`, `(d_in, d_in)` upper-triangular float32 with `Hinv^T Hinv = H^-1`, and bool `dead` `(d_in,)`.
    """
    H, dead = damped_hessian(hessian, percdamp)
    L, info = torch.linalg.cholesky_ex(H)
    del H
    if info.item() == 0:
        return inverse_factor_from_cholesky(L, percdamp), dead
    raise _not_positive_definite(percdamp)


def damped_hessian(hessian: torch.Tensor, percdamp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """A float32 copy of `hessian` with dead inputs set to 1 and `percdamp · mean(diag H)` on the diagonal, as the
    reference damps it before inverting; and the bool mask of dead inputs."""
    H = hessian.to(dtype=SPARSEGPT_PRECISION, copy=True)
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    H.diagonal().add_(percdamp * torch.mean(torch.diag(H)))
    return H, dead


def inverse_factor_from_cholesky(cholesky: torch.Tensor, percdamp: float = 0.01) -> torch.Tensor:
    """The reference's upper Cholesky factor of `H^-1`, from the lower Cholesky factor of the damped `H`."""
    factor, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(cholesky), upper=True)
    if info.item() != 0:
        raise _not_positive_definite(percdamp)
    return factor


def _not_positive_definite(percdamp: float) -> ValueError:
    return ValueError(
        f"The dampened Hessian is not positive definite (`percdamp`={percdamp}); increase `percdamp` "
        "or check the calibration statistics for NaN/inf."
    )


def _prune_block_mask(scores: torch.Tensor, prune: int, jointly: bool) -> torch.Tensor:
    """True where pruned: the reference's joint threshold over the whole block (`jointly`: every score `<=` the
    sorted value at index `prune`), or the `prune` lowest scores of each row."""
    if jointly:
        threshold = torch.sort(scores.flatten())[0][prune]
        return scores <= threshold
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if prune == 0:
        return mask
    mask.scatter_(1, scores.topk(prune, dim=1, largest=False, sorted=False).indices, True)
    return mask


def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    *,
    keep_per_row: int | None = None,
    sparsity: float | None = None,
    nm: tuple[int, int] | None = None,
    blocksize: int = 128,
    percdamp: float = 0.01,
) -> torch.Tensor:
    """Prune `weight` column block by column block, compensating each pruned weight on the later columns (OBS).

    Exactly one mask rule is used (see the module docstring): `nm`, else `sparsity` (joint per block, the
    reference's unstructured rule), else `keep_per_row` (row-balanced, explicit only). TF32 is off for the OBS
    work on CUDA, as in the reference.

    Args:
        weight: `(d_out, d_in)`; not modified.
        hessian: `(d_in, d_in)` layer Hessian `2 X^T X / n` (see `optimum_oats.engine.statistics.HessianAccumulator`).
        keep_per_row: weights kept in every row, in `[0, d_in]`.
        sparsity: fraction of each column block pruned jointly across rows, in `[0, 1)`.
        nm: `(N, M)`: keep N of every M consecutive columns of each row.
        blocksize: columns per block (reference: 128); a multiple of M with `nm`.
        percdamp: diagonal damping as a fraction of `mean(diag H)` (reference: 0.01).

    Returns:
        The pruned and updated weight, `(d_out, d_in)` float32, zeros where pruned.
    """
    if weight.dim() != 2:
        raise ValueError(f"`weight` must be 2-D (d_out, d_in), got shape {tuple(weight.shape)}.")
    d_out, d_in = weight.shape
    if hessian.shape != (d_in, d_in):
        raise ValueError(f"`hessian` must have shape ({d_in}, {d_in}), got {tuple(hessian.shape)}.")
    _check_arguments(d_in, keep_per_row, sparsity, nm, blocksize, percdamp)

    with no_tf32():
        Hinv, dead = inverse_hessian_factor(hessian.to(weight.device), percdamp)
        return prune_with_factor(
            weight, Hinv, dead, keep_per_row=keep_per_row, sparsity=sparsity, nm=nm, blocksize=blocksize
        )


def sparsegpt_prune_quantized(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    quant: GroupSpec,
    *,
    sparsity: float,
    blocksize: int = 128,
    percdamp: float = 0.01,
) -> tuple[torch.Tensor, torch.Tensor]:
    """[`sparsegpt_prune`]'s joint rule with every kept weight rounded inside the pass (the reference's joint
    pruning + quantization); returns the on-grid weight and its scales (see [`prune_and_quantize_with_factor`])."""
    d_out, d_in = weight.shape
    if hessian.shape != (d_in, d_in):
        raise ValueError(f"`hessian` must have shape ({d_in}, {d_in}), got {tuple(hessian.shape)}.")
    _check_arguments(d_in, None, sparsity, None, blocksize, percdamp)
    with no_tf32():
        Hinv, dead = inverse_hessian_factor(hessian.to(weight.device), percdamp)
        return prune_and_quantize_with_factor(weight, Hinv, dead, quant, sparsity=sparsity, blocksize=blocksize)


@contextmanager
def no_tf32():
    """The reference sets `torch.backends.cuda.matmul.allow_tf32 = False`: OBS updates need full fp32 products."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def prune_with_factor(
    weight: torch.Tensor,
    Hinv: torch.Tensor,
    dead: torch.Tensor,
    *,
    keep_per_row: int | None = None,
    sparsity: float | None = None,
    nm: tuple[int, int] | None = None,
    blocksize: int = 128,
) -> torch.Tensor:
    """[`sparsegpt_prune`] with the factor of [`inverse_hessian_factor`] given, for callers that prune several
    matrices under one Hessian (the alternating sparse + low-rank method); arguments are not re-checked."""
    return _obs_pass(weight, Hinv, dead, keep_per_row, sparsity, nm, blocksize, None, None)[0]


def prune_and_quantize_with_factor(
    weight: torch.Tensor,
    Hinv: torch.Tensor,
    dead: torch.Tensor,
    quant: GroupSpec,
    *,
    sparsity: float | None = None,
    support: torch.Tensor | None = None,
    blocksize: int = 128,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One OBS pass that prunes and rounds jointly (see the module docstring): returns the on-grid weight
    `(d_out, d_in)` float32, zeros where pruned, and its fp16-exact scales `(d_out, ceil(d_in / group_size))`.

    Args:
        sparsity: the reference's joint mask per block, chosen as the pass goes (as [`sparsegpt_prune`]).
        support: instead of `sparsity`, a fixed bool mask `(d_out, d_in)` of the entries kept (GPTQ on a given
            support: the pass only rounds and compensates, e.g. after a refit of the kept values).
    """
    if (sparsity is None) == (support is None):
        raise ValueError(f"Give exactly one of `sparsity` or `support`, got sparsity={sparsity}, support={support}.")
    if quant.group_size % blocksize == 0:
        blocksize = quant.group_size
    elif blocksize % quant.group_size:
        raise ValueError(
            f"`group_size` ({quant.group_size}) must divide `blocksize` ({blocksize}) or be a multiple of it."
        )
    W, scales = _obs_pass(weight, Hinv, dead, None, sparsity, None, blocksize, quant, support)
    return W, scales


def _obs_pass(weight, Hinv, dead, keep_per_row, sparsity, nm, blocksize, quant, support):
    d_out, d_in = weight.shape
    W = weight.detach().to(SPARSEGPT_PRECISION, copy=True)
    W[:, dead] = 0
    scales = None if quant is None else W.new_zeros(d_out, quant.num_groups(d_in))
    scale = None
    for i1 in range(0, d_in, blocksize):
        i2 = min(i1 + blocksize, d_in)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        d = torch.diag(Hinv1)

        if support is not None:
            mask1 = ~support[:, i1:i2]
        elif nm is not None:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)  # filled group by group below
        elif sparsity is not None:
            # `int(numel * sparsity)` as the reference (no epsilon: its index is what users compare against)
            mask1 = _prune_block_mask(W1**2 / d**2, int(W1.numel() * sparsity), jointly=True)
        else:
            quota = keep_per_row * i2 // d_in - keep_per_row * i1 // d_in
            mask1 = _prune_block_mask(W1**2 / d**2, count - quota, jointly=False)

        for i in range(count):
            if nm is not None and i % nm[1] == 0:
                n, m = nm
                scores = W1[:, i : i + m] ** 2 / d[i : i + m] ** 2
                mask1[:, i : i + m] = True
                mask1[:, i : i + m].scatter_(1, scores.topk(n, dim=1, sorted=False).indices, False)
            w = W1[:, i]
            q = w.masked_fill(mask1[:, i], 0)
            if quant is not None:
                if (i1 + i) % quant.group_size == 0:  # the group's mask is fixed, its values updated so far
                    group = slice(i, i + quant.group_size)
                    scale = best_scale(W1[:, group].masked_fill(mask1[:, group], 0), quant).squeeze(1)
                    scales[:, (i1 + i) // quant.group_size] = scale
                q = round_to_grid(q, scale, quant)
            Q1[:, i] = q
            err1 = (w - q) / d[i]
            W1[:, i:] -= err1.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err1

        W[:, i1:i2] = Q1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return W, scales


def run_sparsegpt(
    weight: torch.Tensor, stats: dict[str, torch.Tensor], budget: LayerBudget, settings: NoSettings
) -> Decomposition:
    """The reference's joint mask per 128-column block (IST-DASLab/sparsegpt `fasterprune`); N:M per row.

    With a value grid (`budget.values`) the column loop rounds as it prunes, as the reference's quantizer does."""
    if budget.nm is not None:
        return Decomposition(sparsegpt_prune(weight, stats[HESSIAN], nm=budget.nm))
    sparsity = budget.layer_sparsity(weight.shape[1])
    if budget.values is not None:
        sparse, scales = sparsegpt_prune_quantized(weight, stats[HESSIAN], budget.values, sparsity=sparsity)
        return Decomposition(sparse, value_scales=scales)
    return Decomposition(sparsegpt_prune(weight, stats[HESSIAN], sparsity=sparsity))


SPARSEGPT = Algorithm(
    "sparsegpt", "SparseGPT pruning", (HESSIAN,), uses_low_rank=False, run=run_sparsegpt, quantizes_jointly=True
)
