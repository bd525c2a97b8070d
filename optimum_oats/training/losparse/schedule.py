"""The cubic schedule of LoSparse's remaining ratio of S (Li et al., ICML 2023; PLATON's schedule).

Steps are 0-based and count the optimizer steps completed *before* the current one, as the reference's
`completed_steps` does (`schedule_threshold_comb`); the callback evaluates the schedule right after each step.
"""

from __future__ import annotations


def remaining_ratio(
    step: int, total_steps: int, initial_warmup_steps: int, final_warmup_steps: int, final_ratio: float
) -> float:
    """Fraction of S kept after 0-based optimizer step `step`.

    `1.0` for `step <= t_i`; then `final + (1 - final) (1 - (step - t_i) / (T - t_i - t_f))^3`; `final` once
    `step > T - t_f` (the last `t_f` steps, the recovery phase).
    """
    decay_steps = total_steps - (final_warmup_steps + initial_warmup_steps)
    if decay_steps <= 0:
        raise ValueError(
            f"The warm-up ({initial_warmup_steps}) and final ({final_warmup_steps}) phases leave no decay steps in "
            f"{total_steps} total steps; shorten them or train longer."
        )
    if step <= initial_warmup_steps:
        return 1.0
    if step > total_steps - final_warmup_steps:
        return final_ratio
    factor = 1 - (step - initial_warmup_steps) / decay_steps
    return final_ratio + (1.0 - final_ratio) * (factor**3)


def is_mask_step(
    step: int, total_steps: int, initial_warmup_steps: int, final_warmup_steps: int, delta_t: int
) -> bool:
    """Whether rows are (re-)selected after 0-based `step`: every `ΔT` steps while decaying, every final step.

    Mask steps fall on `step % ΔT == 0`, the steps at which a finished window has just entered the EMA.
    """
    if step <= initial_warmup_steps:
        return False
    if step > total_steps - final_warmup_steps:
        return True
    return step % delta_t == 0
