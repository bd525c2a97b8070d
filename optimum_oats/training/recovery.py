"""Recovery fine-tuning: train an OATS-compressed model a little after one-shot compression, mask fixed.

Two routes, both ending in the compact format:

- **Direct** ([`prepare_for_recovery`]): train the low-rank factors U, V (and optionally the kept values of S) of
  each [`LinearSparseLowRank`] in place with any training loop or `transformers.Trainer`. The layer stores only
  the kept values plus a bitmask *buffer*, so no gradient can ever reach the pattern: the mask is fixed by
  construction. The "decompress" execution mode is differentiable with respect to `weight`, U and V.
- **PEFT** (`peft_interop.to_peft_model` / `from_peft_model`): a LoRA `PeftModel` over the frozen sparse base
  (lora_B = U, lora_A = V), trained with PEFT as usual, then folded back.

After either, `model.save_pretrained(dir)` writes the compact checkpoint and `from_pretrained(dir)` reloads it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import torch
from torch import nn
from transformers import TrainerCallback

from ..nn import LinearSparseLowRank

logger = logging.getLogger(__name__)


@torch.no_grad()
def balance_factors(layer: LinearSparseLowRank) -> None:
    """Rewrite `U V` as `(A √Σ)(√Σ B^T)` from its own SVD: same product, factors of equal scale.

    OATS stores `U' = U_r Σ_r` and `V' = V_r^T / D` (D = input feature norms, often in the hundreds), so V's
    entries can be orders of magnitude smaller than U's. Adam moves every entry by about the learning rate, which
    then wrecks V at any rate that moves U usefully. Balanced factors (as LoSparse initialises them) train well.
    Costs two thin QRs and an `r × r` SVD.
    """
    if layer.rank == 0:
        return
    q_u, r_u = torch.linalg.qr(layer.lowrank_u.float())
    q_v, r_v = torch.linalg.qr(layer.lowrank_v.float().T)
    a, sigma, bh = torch.linalg.svd(r_u @ r_v.T)
    root = sigma.sqrt()
    layer.lowrank_u.copy_((q_u @ a) * root)
    layer.lowrank_v.copy_(root[:, None] * (bh @ q_v.T))
    layer.release_caches()


def prepare_for_recovery(
    model: nn.Module, *, train_sparse: bool = False, train_bias: bool = False, balance: bool = True
) -> int:
    """Freeze everything but the compressed layers' low-rank factors (and optionally their kept S values / bias).

    Also switches every compressed layer to the differentiable "decompress" execution mode. Returns the number of
    trainable parameters.

    Args:
        model (`nn.Module`): an OATS-compressed model.
        train_sparse (`bool`, defaults to `False`): also train the kept values of S (the pattern stays fixed).
        train_bias (`bool`, defaults to `False`): also train the compressed layers' biases.
        balance (`bool`, defaults to `True`): first give U and V equal scale ([`balance_factors`]); the model's
            function is unchanged (up to rounding).
    """
    layers = [module for module in model.modules() if isinstance(module, LinearSparseLowRank)]
    if not layers:
        raise ValueError("The model has no `LinearSparseLowRank` layer; compress it first (`optimum_oats.compress`).")
    if not any(layer.rank for layer in layers) and not train_sparse:
        raise ValueError(
            "Every compressed layer has rank 0 (a pruning baseline), so there are no low-rank factors to train; "
            "pass `train_sparse=True` to train the kept weights instead."
        )
    model.requires_grad_(False)
    for layer in layers:
        if balance:
            balance_factors(layer)
        layer.set_execution_mode("decompress")
        layer.lowrank_u.requires_grad_(True)
        layer.lowrank_v.requires_grad_(True)
        layer.weight.requires_grad_(train_sparse)
        if layer.bias is not None:
            layer.bias.requires_grad_(train_bias)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info("Recovery fine-tuning: %d trainable parameters in %d compressed layers", trainable, len(layers))
    return trainable


def token_windows(tokenizer, texts: str | Sequence[str], seqlen: int) -> list[dict[str, torch.Tensor]]:
    """Causal-LM training examples: the texts joined with `"\\n\\n"`, tokenized once, cut in `seqlen` windows.

    Each example is `{"input_ids", "labels"}` (labels = inputs; the model shifts them), the format `Trainer`
    batches with its default collator.
    """
    text = texts if isinstance(texts, str) else "\n\n".join(texts)
    ids = tokenizer(text, return_tensors="pt", verbose=False).input_ids[0]
    count = ids.numel() // seqlen
    if count == 0:
        raise ValueError(f"The text has {ids.numel()} tokens, fewer than one window of `seqlen={seqlen}`.")
    windows = ids[: count * seqlen].view(count, seqlen)
    return [{"input_ids": window, "labels": window.clone()} for window in windows]


class TimeBudgetCallback(TrainerCallback):
    """Stop training (after a full optimizer step) once `max_seconds` of wall time have passed."""

    def __init__(self, max_seconds: float) -> None:
        self.max_seconds = max_seconds
        self._start: float | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self._start = time.monotonic()

    def on_step_end(self, args, state, control, **kwargs):
        if self._start is not None and time.monotonic() - self._start > self.max_seconds:
            logger.info("Time budget of %.0f s reached after %d steps", self.max_seconds, state.global_step)
            control.should_training_stop = True
        return control


def mask_fingerprint(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of every compressed layer's packed mask (to check that training left the patterns alone)."""
    return {
        name: module.weight_mask.detach().clone()
        for name, module in model.named_modules()
        if isinstance(module, LinearSparseLowRank)
    }
