"""`LoSparseCallback`: LoSparse's scoring and row pruning, driven by `transformers.Trainer`."""

from __future__ import annotations

import base64
import logging
from typing import Any

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from .config import LoSparseConfig
from .importance import new_state, row_scores, select_rows, sensitivity, update_scores, uses_uncertainty
from .model import losparse_layers
from .schedule import is_mask_step, remaining_ratio

logger = logging.getLogger(__name__)


def _encode(tensor: torch.Tensor) -> str:
    """float32 tensor -> base64 text: exact, and ~4x smaller than a JSON list in `trainer_state.json`."""
    return base64.b64encode(tensor.detach().float().cpu().contiguous().numpy().tobytes()).decode("ascii")


def _decode(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.float32).clone()


class LoSparseCallback(TrainerCallback, ExportableState):
    """Scores S by smoothed sensitivity after every optimizer step and selects whole rows on the cubic schedule.

    It runs in `on_optimizer_step`: after `optimizer.step()` and before `zero_grad()`, i.e. once per optimizer
    step with the gradient accumulated over all `gradient_accumulation_steps` micro-batches (and clipped) — where
    the reference calls `pruner.update_and_pruning(model, completed_steps)`. In that order: the step's sensitivity
    enters the scores (a finished window enters the EMA first), then, on a mask step, one global threshold over
    all LoSparse layers keeps the scheduled fraction of S's parameters and the other rows are zeroed.

    Regrowth, as in the reference: the mask is re-decided from the scores at every mask step, over *all* rows. A
    zeroed row still gets gradients and optimizer updates between mask steps (the forward pass does not mask), so
    it can score above the threshold again and be kept. In the final phase rows are re-selected every step. At the
    end of training the last selection is applied once more, so the trained model is the one `export_losparse`
    stores (this matters only when the schedule ends without a final phase).

    Its state (step, ratio, and the window / EMA scores of every layer) is an `ExportableState`, saved in each
    checkpoint's `trainer_state.json`; the row masks are buffers of the model, saved with its weights. Resume with
    `TrainingArguments(restore_callback_states_from_checkpoint=True)` (it refuses to continue otherwise, since it
    would start scoring from zero mid-schedule).

    Args:
        config ([`LoSparseConfig`] or `dict`): the schedule and smoothing settings (the same object given to
            `apply_losparse`).
    """

    def __init__(self, config: LoSparseConfig | dict[str, Any] | None = None) -> None:
        if config is None:
            config = LoSparseConfig()
        self.config = config if isinstance(config, LoSparseConfig) else LoSparseConfig.from_dict(config)
        self.step = 0
        self.ratio = 1.0
        self.threshold: float | None = None
        self.encoded_scores: dict[str, dict[str, str]] | None = None  # set when restored from a checkpoint
        self._scores: dict[str, dict[str, torch.Tensor]] = {}
        self._total_steps = self.config.total_steps
        self._phases = (0, 0)

    # -- Trainer events -------------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._total_steps = self.config.total_steps or state.max_steps
        self._phases = self.config.check_steps(self._total_steps)
        layers = losparse_layers(model)
        if not layers:
            raise ValueError("The model has no LoSparse layer: call `apply_losparse(model, config)` before training.")
        frozen = [f"{name}.weight" for name, layer in layers.items() if not layer.weight.requires_grad]
        if frozen:
            raise ValueError(
                f"LoSparse scores S by its gradient, but {frozen[:3]}{' ...' if len(frozen) > 3 else ''} "
                f"({len(frozen)} of {len(layers)}) do not require grad. Unfreeze them (`requires_grad_(True)`) or "
                "leave those layers dense with `LoSparseConfig(modules_to_not_convert=[...])`."
            )
        if self.encoded_scores is not None:
            self._scores = {name: _restore(entry, layers.get(name)) for name, entry in self.encoded_scores.items()}
            self.encoded_scores = None
        if state.global_step != self.step:
            raise ValueError(
                f"Training resumes at step {state.global_step} but the LoSparse pruning state is at step {self.step}. "
                "Pass `TrainingArguments(restore_callback_states_from_checkpoint=True)` so the scores saved in the "
                "checkpoint are restored."
            )
        if self._scores and set(self._scores) != set(layers):
            raise ValueError("The restored LoSparse scores name different layers than the model has.")

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.update(model, state.global_step)  # global_step counts the steps completed before this one
        return control

    def on_train_end(self, args, state, control, model=None, **kwargs):
        for layer in losparse_layers(model).values():
            layer.set_row_mask(layer.row_mask)  # zero rows regrown since the last selection
        return control

    def update(self, model: torch.nn.Module, step: int) -> bool:
        """Score this optimizer step and prune on a mask step (`step`: 0-based); returns whether rows were selected.

        The Trainer events call it; a hand-written loop calls it after each `optimizer.step()`, before
        `zero_grad()`, with the number of optimizer steps completed before.
        """
        config = self.config
        layers = losparse_layers(model)
        per_row = not uses_uncertainty(config.beta2)
        for name, layer in layers.items():
            grad = layer.weight.grad
            if grad is None:
                raise ValueError(
                    f"`{name}.weight.grad` is None after the optimizer step, so LoSparse cannot score S. The "
                    "parameter must be trainable and its full gradient present when `on_optimizer_step` runs: "
                    "unfreeze it or exclude the layer (`modules_to_not_convert`); DeepSpeed ZeRO-2/3 and FSDP "
                    "shard or free `.grad` and are not supported (train with DDP or a single process), and a "
                    "custom loop must call the callback before `zero_grad()`."
                )
            value = sensitivity(layer.weight, grad, per_row=per_row)
            entry = self._scores.get(name)
            if entry is None:
                entry = self._scores[name] = new_state(value, config.beta2)
            update_scores(entry, value, step, config.delta_t, config.beta1, config.beta2)
        self.step = step + 1
        total, (initial, final) = self._total_steps, self._phases
        if not is_mask_step(step, total, initial, final, config.delta_t):
            return False
        self._prune(layers, remaining_ratio(step, total, initial, final, config.final_remaining_ratio))
        return True

    # -- pruning ---------------------------------------------------------------------------------------------
    def _prune(self, layers, target: float) -> None:
        names = list(layers)
        keeps, threshold = select_rows(
            [row_scores(self._scores[n]).cpu() for n in names], [layers[n].in_features for n in names], target
        )
        for name, keep in zip(names, keeps, strict=True):
            layers[name].set_row_mask(keep)
        kept = sum(layers[n].kept_rows * layers[n].in_features for n in names)
        self.ratio = kept / sum(layers[n].out_features * layers[n].in_features for n in names)
        self.threshold = threshold
        logger.debug(
            "LoSparse step %d: target %.4f, kept %.4f, threshold %.3e", self.step, target, self.ratio, threshold
        )

    # -- checkpointing ---------------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        scores = (
            self.encoded_scores
            if self.encoded_scores is not None
            else {name: {key: _encode(value) for key, value in entry.items()} for name, entry in self._scores.items()}
        )
        return {
            "args": {"config": self.config.to_dict()},
            "attributes": {
                "step": self.step,
                "ratio": self.ratio,
                "threshold": self.threshold,
                "encoded_scores": scores,
            },
        }

    def scores(self) -> dict[str, torch.Tensor]:
        """The current row scores per layer (what the next selection ranks)."""
        return {name: row_scores(entry).clone() for name, entry in self._scores.items()}


def _restore(entry: dict[str, str], layer) -> dict[str, torch.Tensor]:
    """Decode one layer's saved scores: per-row `(out,)` or per-weight `(out, in)` tensors."""
    if layer is None:
        return {key: _decode(value) for key, value in entry.items()}
    out = {}
    for key, value in entry.items():
        tensor = _decode(value)
        out[key] = tensor if tensor.numel() == layer.out_features else tensor.view(layer.out_features, -1)
    return out
