"""`LoSparseCallback`: LoSparse's scoring and row pruning, driven by `transformers.Trainer`."""

from __future__ import annotations

import base64
import logging
from typing import Any

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from .config import LoSparseConfig
from .importance import row_sensitivity, select_rows, update_scores
from .model import losparse_layers
from .schedule import is_mask_step, remaining_ratio

logger = logging.getLogger(__name__)


def _encode(tensor: torch.Tensor) -> str:
    """float32 tensor -> base64 text: exact, and ~4x smaller than a JSON list in `trainer_state.json`."""
    return base64.b64encode(tensor.detach().float().cpu().contiguous().numpy().tobytes()).decode("ascii")


def _decode(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.float32).clone()


class LoSparseCallback(TrainerCallback, ExportableState):
    """Scores S by smoothed sensitivity after every optimizer step and prunes whole rows on the cubic schedule.

    It runs in `on_optimizer_step`: after `optimizer.step()` and before `zero_grad()`, i.e. once per optimizer
    step with the gradient accumulated over all `gradient_accumulation_steps` micro-batches (and clipped). One
    global threshold over all LoSparse layers keeps the scheduled fraction of S's parameters.

    Its state (step, ratio, and the per-row window and EMA of every layer) is an `ExportableState`, saved in each
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

    # -- Trainer events -------------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._total_steps = self.config.total_steps or state.max_steps
        self.config.check_steps(self._total_steps)
        layers = losparse_layers(model)
        if not layers:
            raise ValueError("The model has no LoSparse layer: call `apply_losparse(model, config)` before training.")
        if self.encoded_scores is not None:
            self._scores = {
                name: {key: _decode(value) for key, value in entry.items()}
                for name, entry in self.encoded_scores.items()
            }
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
        step = state.global_step + 1  # global_step counts *finished* steps; this one finishes now
        config = self.config
        layers = losparse_layers(model)
        for name, layer in layers.items():
            grad = layer.weight.grad
            value = torch.zeros(layer.out_features) if grad is None else row_sensitivity(layer.weight, grad).cpu()
            entry = self._scores.setdefault(
                name, {"window": torch.zeros(layer.out_features), "ema": torch.zeros(layer.out_features)}
            )
            entry["window"], entry["ema"] = update_scores(
                entry["window"], entry["ema"], value, step, config.delta_t, config.beta1
            )
        self.step = step
        schedule = (self._total_steps, config.initial_warmup_steps, config.final_warmup_steps)
        target = remaining_ratio(step, *schedule, config.final_remaining_ratio)
        # Nothing has entered the EMA before the first full window: LoSparse/PLATON do not prune on zero scores.
        if step > config.delta_t and is_mask_step(step, *schedule, config.delta_t):
            self._prune(layers, target)
        return control

    # -- pruning ---------------------------------------------------------------------------------------------
    def _prune(self, layers, target: float) -> None:
        names = list(layers)
        keeps, threshold = select_rows(
            [self._scores[n]["ema"] for n in names],
            [layers[n].in_features for n in names],
            [layers[n].row_mask.cpu() for n in names],
            target,
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
        """The current smoothed row scores (EMA) per layer."""
        return {name: entry["ema"].clone() for name, entry in self._scores.items()}
