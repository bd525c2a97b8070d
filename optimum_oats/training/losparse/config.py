"""`LoSparseConfig`: the settings of a LoSparse fine-tuning run."""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, fields
from typing import Any


@dataclass
class LoSparseConfig:
    """Settings of LoSparse (Li et al., ICML 2023): `W = U V + S`, rows of S pruned during fine-tuning.

    A separate dataclass rather than `OATSConfig(method="losparse")`: `OATSConfig` is a transformers
    quantization config that `from_pretrained` acts on at load time (calibrate, then compress), and most of its
    fields (calibration data, SVD solver, OWL) mean nothing here, while LoSparse's schedule and smoothing have no
    place there. The *result* of LoSparse is stored in the same compact format and described by an `OATSConfig`
    with `method="losparse"`, so it reloads like any OATS checkpoint.

    Args:
        low_rank_ratio (`float`, defaults to 0.05):
            p, the share of each layer's weights held by `U V`: `r = ceil(p · d_out d_in / (d_out + d_in))`.
        final_remaining_ratio (`float`, defaults to 0.2):
            The fraction of S's parameters (all target layers together) kept at the end, in (0, 1].
        total_steps (`int`, *optional*):
            T, the number of optimizer steps of the schedule; defaults to the Trainer's `max_steps`.
        initial_warmup_ratio (`float`, defaults to 0.1):
            t_i as a fraction of T: steps of plain fine-tuning before any pruning.
        final_warmup_ratio (`float`, defaults to 0.3):
            t_f as a fraction of T: the last steps, held at the final ratio (rows re-selected every step), in which
            the pruned model recovers. The reference's GLUE scripts use t_i = 1 and t_f = 3-5 units of a few
            percent of T each; 0.1 / 0.3 leave the middle 60% for the decay. A schedule with t_f = 0 reaches the
            final ratio only at the last step and is warned about.
        initial_warmup_steps (`int`, *optional*): t_i in steps; overrides `initial_warmup_ratio`.
        final_warmup_steps (`int`, *optional*): t_f in steps; overrides `final_warmup_ratio`.
        delta_t (`int`, defaults to 10): ΔT, sensitivity window length and pruning interval while decaying.
        beta1 (`float`, defaults to 0.85): EMA factor of the windowed sensitivity.
        beta2 (`float`, defaults to 1.0):
            EMA factor of PLATON's uncertainty term; 1 turns it off (LoSparse's default), a value in (0, 1) turns
            it on (score = EMA ⊙ uncertainty; the scores are then kept per weight, 3 tensors of the size of S).
        target_modules (`list[str]`, *optional*):
            Linear layers to substitute (exact names or dotted suffixes such as `"q_proj"`); defaults to every
            linear layer inside the model's repeated blocks.
        modules_to_not_convert (`list[str]`, *optional*): names (exact or dotted suffix) left dense.

    Example:
    ```python
    >>> config = LoSparseConfig(low_rank_ratio=0.125, final_remaining_ratio=0.43, initial_warmup_steps=50,
    ...                         final_warmup_steps=100)
    >>> apply_losparse(model, config)
    >>> Trainer(model=model, args=args, train_dataset=data, callbacks=[LoSparseCallback(config)]).train()
    >>> export_losparse(model).save_pretrained("out")  # compact; reloads with from_pretrained
    ```
    """

    low_rank_ratio: float = 0.05
    final_remaining_ratio: float = 0.2
    total_steps: int | None = None
    initial_warmup_ratio: float = 0.1
    final_warmup_ratio: float = 0.3
    initial_warmup_steps: int | None = None
    final_warmup_steps: int | None = None
    delta_t: int = 10
    beta1: float = 0.85
    beta2: float = 1.0
    target_modules: list[str] | None = None
    modules_to_not_convert: list[str] | None = None

    def __post_init__(self) -> None:
        _check_number("low_rank_ratio", self.low_rank_ratio, 0.0, 1.0, low_open=False, high_open=True)
        _check_number("final_remaining_ratio", self.final_remaining_ratio, 0.0, 1.0, low_open=True, high_open=False)
        _check_number("beta1", self.beta1, 0.0, 1.0, low_open=False, high_open=True)
        _check_number("beta2", self.beta2, 0.0, 1.0, low_open=True, high_open=False)
        _check_number("initial_warmup_ratio", self.initial_warmup_ratio, 0.0, 1.0, low_open=False, high_open=True)
        _check_number("final_warmup_ratio", self.final_warmup_ratio, 0.0, 1.0, low_open=False, high_open=True)
        for name in ("initial_warmup_steps", "final_warmup_steps"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), 0)
        _check_int("delta_t", self.delta_t, 1)
        if self.total_steps is not None:
            _check_int("total_steps", self.total_steps, 1)
            self.check_steps(self.total_steps)
        for name in ("target_modules", "modules_to_not_convert"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, str) or not all(isinstance(v, str) for v in value)):
                raise ValueError(f"`{name}` must be a list of module names, got {value!r}.")
            if value is not None:
                setattr(self, name, list(value))

    def phases(self, total_steps: int) -> tuple[int, int]:
        """`(t_i, t_f)` in steps for a run of `total_steps`: the step counts if given, else the ratios of T."""
        initial = self.initial_warmup_steps
        final = self.final_warmup_steps
        if initial is None:
            initial = round(self.initial_warmup_ratio * total_steps)
        if final is None:
            final = round(self.final_warmup_ratio * total_steps)
        return initial, final

    def check_steps(self, total_steps: int) -> tuple[int, int]:
        """The warm-up and final phases must leave a decay step; warns when no recovery phase is left."""
        initial, final = self.phases(total_steps)
        if initial + final >= total_steps:
            raise ValueError(
                f"t_i = {initial} + t_f = {final} steps (`initial_warmup_*` / `final_warmup_*`) leave no decay step "
                f"in {total_steps} total steps; shorten them or train longer."
            )
        if final == 0:
            warnings.warn(
                f"The LoSparse schedule has no final phase (t_f = 0 of {total_steps} steps): S reaches its final "
                "ratio only at the last step and the pruned model gets no recovery steps. Set "
                "`final_warmup_ratio` (default 0.3) or `final_warmup_steps` > 0.",
                UserWarning,
                stacklevel=2,
            )
        return initial, final

    def selects(self, module_name: str) -> bool:
        """Whether the linear layer `module_name` is substituted (dotted-suffix matches: `layers.1` ≠ `layers.10`)."""

        def matches(names: list[str] | None) -> bool:
            return any(module_name == n or module_name.endswith("." + n) for n in names or ())

        if matches(self.modules_to_not_convert):
            return False
        return self.target_modules is None or matches(self.target_modules)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LoSparseConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"Unknown LoSparseConfig fields {unknown}; known fields are {sorted(known)}.")
        return cls(**data)


def _check_number(name: str, value: Any, low: float, high: float, *, low_open: bool, high_open: bool) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"`{name}` must be a number, got {type(value).__name__} ({value!r}).")
    ok = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ValueError(f"`{name}` must be in {interval}, got {value}.")


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"`{name}` must be an integer, got {type(value).__name__} ({value!r}).")
    if value < minimum:
        raise ValueError(f"`{name}` must be >= {minimum}, got {value}.")
