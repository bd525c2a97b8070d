import pytest

from optimum_oats.training.losparse import is_mask_step, remaining_ratio

T, TI, TF, FINAL = 100, 10, 20, 0.25


def formula(t: int) -> float:  # ALGORITHMS.md: final + (1 - final)(1 - (t - t_i)/(T - t_i - t_f))^3
    return FINAL + (1 - FINAL) * (1 - (t - TI) / (T - TI - TF)) ** 3


@pytest.mark.parametrize("step", [11, 20, 37, 50, 79, 80])
def test_decay_phase_matches_the_cubic_formula(step):
    assert remaining_ratio(step, T, TI, TF, FINAL) == pytest.approx(formula(step), abs=1e-12)


def test_chosen_values_and_phases():
    assert remaining_ratio(1, T, TI, TF, FINAL) == 1.0
    assert remaining_ratio(TI, T, TI, TF, FINAL) == 1.0  # last warm-up step
    assert remaining_ratio(45, T, TI, TF, FINAL) == pytest.approx(0.25 + 0.75 * 0.5**3)  # half-way: 0.34375
    assert remaining_ratio(T - TF, T, TI, TF, FINAL) == pytest.approx(FINAL)  # decay ends exactly at final
    assert remaining_ratio(T - TF + 1, T, TI, TF, FINAL) == FINAL
    assert remaining_ratio(T, T, TI, TF, FINAL) == FINAL
    ratios = [remaining_ratio(t, T, TI, TF, FINAL) for t in range(1, T + 1)]
    assert all(a >= b for a, b in zip(ratios, ratios[1:], strict=False))  # never increases


def test_mask_steps():
    masked = [t for t in range(1, T + 1) if is_mask_step(t, T, TI, TF, delta_t=10)]
    assert masked[:7] == [20, 30, 40, 50, 60, 70, 80]  # every ΔT while decaying, none during warm-up
    assert masked[7:] == list(range(81, 101))  # every step in the final phase


def test_no_decay_steps_is_an_error():
    with pytest.raises(ValueError, match="no decay steps"):
        remaining_ratio(5, 30, 10, 20, FINAL)
