import warnings

import pytest

from optimum_oats.training.losparse import LoSparseConfig, is_mask_step, remaining_ratio

T, TI, TF, FINAL = 100, 10, 20, 0.25


def formula(t: int) -> float:  # ALGORITHMS.md: final + (1 - final)(1 - (t - t_i)/(T - t_i - t_f))^3
    return FINAL + (1 - FINAL) * (1 - (t - TI) / (T - TI - TF)) ** 3


@pytest.mark.parametrize("step", [11, 20, 37, 50, 79, 80])
def test_decay_phase_matches_the_cubic_formula(step):
    assert remaining_ratio(step, T, TI, TF, FINAL) == pytest.approx(formula(step), abs=1e-12)


def test_chosen_values_and_phases():
    assert remaining_ratio(0, T, TI, TF, FINAL) == 1.0
    assert remaining_ratio(TI, T, TI, TF, FINAL) == 1.0  # last warm-up step
    assert remaining_ratio(45, T, TI, TF, FINAL) == pytest.approx(0.25 + 0.75 * 0.5**3)  # half-way: 0.34375
    assert remaining_ratio(T - TF, T, TI, TF, FINAL) == pytest.approx(FINAL)  # decay ends exactly at final
    assert remaining_ratio(T - TF + 1, T, TI, TF, FINAL) == FINAL
    assert remaining_ratio(T - 1, T, TI, TF, FINAL) == FINAL
    ratios = [remaining_ratio(t, T, TI, TF, FINAL) for t in range(T)]
    assert all(a >= b for a, b in zip(ratios, ratios[1:], strict=False))  # never increases


def test_mask_steps():
    masked = [t for t in range(T) if is_mask_step(t, T, TI, TF, delta_t=10)]  # 0-based steps 0 .. T-1
    assert masked[:7] == [20, 30, 40, 50, 60, 70, 80]  # every ΔT while decaying, none during warm-up
    assert masked[7:] == list(range(81, 100))  # every step in the final phase


def test_no_decay_steps_is_an_error():
    with pytest.raises(ValueError, match="no decay steps"):
        remaining_ratio(5, 30, 10, 20, FINAL)
    with pytest.raises(ValueError, match="no decay step"):
        LoSparseConfig(initial_warmup_steps=10, final_warmup_steps=20, total_steps=30)


def test_default_phases_are_fractions_of_the_run():
    config = LoSparseConfig()
    assert config.phases(1000) == (100, 300)
    assert config.phases(37) == (4, 11)
    assert LoSparseConfig(initial_warmup_steps=5, final_warmup_ratio=0.5).phases(100) == (5, 50)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert config.check_steps(1000) == (100, 300)


def test_a_schedule_without_recovery_phase_is_warned_about():
    with pytest.warns(UserWarning, match="no final phase"):
        LoSparseConfig(final_warmup_steps=0, total_steps=100)
    with pytest.warns(UserWarning, match="no final phase"):
        LoSparseConfig(final_warmup_ratio=0.0).check_steps(100)


@pytest.mark.parametrize("beta2", [0.0, 1.5, 2.0])
def test_beta2_outside_its_range_is_refused(beta2):
    with pytest.raises(ValueError, match="beta2"):
        LoSparseConfig(beta2=beta2)
