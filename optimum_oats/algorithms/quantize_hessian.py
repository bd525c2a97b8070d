"""Rounding inside hassle's steps (`hessian_slr.quantized_hessian_sparse_low_rank`).

Every S-step ends, after the refit of the kept values, with one OBS pass on the fixed support that rounds each kept
value and spreads its rounding error over the values not yet rounded (GPTQ on the refitted S: the refit is the
optimum on the support, so the pass minimises exactly the extra error of the rounding). The L-step fits U V to what
the *rounded* S leaves, rounds V, refits U to the rounded V in the metric (a least-squares solve of `r x r`) and
rounds U.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .quantize import GroupSpec, quantize_rtn
from .sparsegpt import SPARSEGPT_PRECISION, prune_and_quantize_with_factor

if TYPE_CHECKING:
    from .hessian_slr import HessianMetric


def quantize_on_support(
    sparse: torch.Tensor, metric: HessianMetric, quant: GroupSpec
) -> tuple[torch.Tensor, torch.Tensor]:
    """Round S's kept values with OBS compensation on its own support: `(on-grid S, scales)`."""
    inverse_factor = metric.inverse_factor()
    return prune_and_quantize_with_factor(sparse, inverse_factor, metric.dead, quant, support=sparse != 0)


def quantize_factors(
    residual: torch.Tensor, lowrank_u: torch.Tensor, lowrank_v: torch.Tensor, metric: HessianMetric, quant: GroupSpec
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round V, refit U to the rounded V in the metric, round U: `(U, V, U's scales, V's scales)`.

    The refit is `argmin_U tr((R - U V) H (R - U V)^T) = R H V^T (V H V^T)^-1`, one `r x r` solve.
    """
    lowrank_v = lowrank_v.float().clone()
    lowrank_v[:, metric.dead] = 0  # no response to features calibration never saw; 0 is a level of this grid
    lowrank_v, v_scales = quantize_rtn(lowrank_v, quant)
    hessian_vt = metric.hessian() @ lowrank_v.T  # (d_in, r)
    gram = lowrank_v @ hessian_vt
    gram.diagonal().add_(gram.diagonal().mean().clamp_min(1e-30) * 1e-8)  # a zero row of V leaves it singular
    refit = torch.linalg.solve(gram, (residual.to(SPARSEGPT_PRECISION) @ hessian_vt).T).T
    lowrank_u, u_scales = quantize_rtn(refit, quant)
    return lowrank_u, lowrank_v, u_scales, v_scales
