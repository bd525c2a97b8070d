"""LoSparse (Li et al., ICML 2023): fine-tune `W = U V + S` and prune whole rows of S during training.

Usage: `apply_losparse(model, config)`, train with `transformers.Trainer(..., callbacks=[LoSparseCallback(config)])`,
then `export_losparse(model)` gives a compact OATS-format model that `save_pretrained` / `from_pretrained` handle.
"""

from .callback import LoSparseCallback
from .config import LoSparseConfig
from .layer import LoSparseLinear, losparse_rank
from .model import apply_losparse, export_losparse, losparse_layers
from .schedule import is_mask_step, remaining_ratio

__all__ = [
    "LoSparseCallback",
    "LoSparseConfig",
    "LoSparseLinear",
    "apply_losparse",
    "export_losparse",
    "is_mask_step",
    "losparse_layers",
    "losparse_rank",
    "remaining_ratio",
]
