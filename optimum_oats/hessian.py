"""The layer Hessian `H = 2 X^T X / n` that SparseGPT needs, accumulated batch by batch during calibration.

Frantar & Alistarh, "SparseGPT", ICML 2023 (https://arxiv.org/abs/2301.00774), reference `SparseGPT.add_batch`.
"""

from __future__ import annotations

import torch

HESSIAN_PRECISION = torch.float32


class HessianAccumulator:
    """Running average of `2 x^T x` over calibration tokens; `finalize()` gives `(d_in, d_in)` float32 `H`.

    Same interface as `InputNormAccumulator`. Like the reference, `H` is kept as a running average (rescaled by
    `n_old / n_new` before each addition) in float32, so it stays well scaled however many tokens are seen.
    Here `n` counts tokens; the reference counts sequences, which only rescales `H` and leaves SparseGPT's
    result unchanged (the damping is relative to `mean(diag H)` and the OBS update is scale-invariant).
    """

    def __init__(self, in_features: int, device: torch.device) -> None:
        self.hessian = torch.zeros(in_features, in_features, dtype=HESSIAN_PRECISION, device=device)
        self.tokens = 0

    def update(self, x: torch.Tensor) -> None:
        """Add a batch `x` of shape `(..., in_features)`, any float dtype."""
        flat = x.detach().reshape(-1, x.shape[-1]).to(device=self.hessian.device, dtype=HESSIAN_PRECISION)
        batch = flat.shape[0]
        if batch == 0:
            return
        total = self.tokens + batch
        self.hessian.addmm_(flat.T, flat, beta=self.tokens / total, alpha=2 / total)
        self.tokens = total

    def finalize(self) -> torch.Tensor:
        return self.hessian
