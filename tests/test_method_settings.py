"""Settings per method: `OATSConfig.method_settings` holds the method's own dataclass; the flat spelling of before
(`num_iterations=`, `svd=`, `hessian_*=`) still works for a release, with a FutureWarning, and loads silently from
config.json."""

from __future__ import annotations

import dataclasses
import json
import warnings

import pytest

from optimum_oats import OATSConfig
from optimum_oats.algorithms import ALGORITHMS, HassleSettings, NoSettings, OATSSettings, method_info
from optimum_oats.config import PYTHON_ONLY_FIELDS
from optimum_oats.legacy_settings import FLAT_METHOD_SETTINGS


def test_each_method_gets_its_own_settings_class_with_its_defaults():
    assert OATSConfig().method_settings == OATSSettings(num_iterations=80, solver="fast")
    assert OATSConfig(method="hassle").method_settings == HassleSettings(hessian_iterations=2)
    assert OATSConfig(method="wanda").method_settings == NoSettings()


def test_settings_are_given_as_the_dataclass_or_a_dict():
    given = HassleSettings(num_iterations=5, solver="exact", hessian_iterations=1)
    assert OATSConfig(method="hassle", method_settings=given).method_settings is given
    from_dict = OATSConfig(method="hassle", method_settings={"num_iterations": 5, "solver": "exact"})
    assert from_dict.method_settings == HassleSettings(num_iterations=5, solver="exact")


def test_a_setting_the_method_does_not_take_is_refused_by_name():
    with pytest.raises(ValueError, match=r"`method_settings` has \['hessian_iterations'\], which `method='oats'`"):
        OATSConfig(method_settings={"hessian_iterations": 3})
    with pytest.raises(TypeError, match="must be a HassleSettings or a dict of its fields, got OATSSettings"):
        OATSConfig(method="hassle", method_settings=OATSSettings())


def test_no_flat_method_setting_is_a_config_field():
    """The flat names moved out: what stays in OATSConfig is shared by every method."""
    names = {f.name for f in dataclasses.fields(OATSConfig)}
    assert not names & set(FLAT_METHOD_SETTINGS)
    assert "method_settings" in PYTHON_ONLY_FIELDS


def test_flat_keywords_warn_with_the_new_spelling_and_still_apply():
    with pytest.warns(FutureWarning, match=r"method_settings=\{'num_iterations': 5, 'solver': 'exact'\}") as caught:
        cfg = OATSConfig(num_iterations=5, svd="exact")
    assert cfg.method_settings == OATSSettings(num_iterations=5, solver="exact")
    assert caught[0].filename == __file__  # points at the caller's line
    with pytest.warns(FutureWarning, match=r"\['hessian_iterations'\] had and have no effect with `method='oats'`"):
        cfg = OATSConfig(num_iterations=5, hessian_iterations=3)
    assert cfg.method_settings == OATSSettings(num_iterations=5)
    with pytest.warns(FutureWarning):
        cfg = OATSConfig(method="hassle", hessian_shrinkage=0.3, svd="exact")
    assert cfg.method_settings == HassleSettings(solver="exact", hessian_shrinkage=0.3)


def test_flat_and_new_spelling_together_is_an_error():
    with pytest.raises(ValueError, match="`method_settings` or the flat"), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        OATSConfig(num_iterations=5, method_settings={"num_iterations": 6})


def test_reading_a_flat_setting_warns_and_reads_the_method_settings():
    cfg = OATSConfig(method_settings={"num_iterations": 7, "solver": "exact"})
    with pytest.warns(FutureWarning, match=r"config.method_settings.solver"):
        assert cfg.svd == "exact"
    with pytest.warns(FutureWarning):
        assert cfg.num_iterations == 7
    with pytest.raises(AttributeError):
        OATSConfig(method="wanda").num_iterations  # noqa: B018


def test_update_moves_flat_settings_and_keeps_shared_ones_across_methods():
    cfg = OATSConfig(method_settings={"num_iterations": 7})
    with pytest.warns(FutureWarning):
        cfg.update(svd="exact")
    assert cfg.method_settings == OATSSettings(num_iterations=7, solver="exact")
    cfg.update(method="hassle")
    assert cfg.method_settings == HassleSettings(num_iterations=7, solver="exact")
    cfg.update(method="wanda")
    assert cfg.method_settings == NoSettings()


def test_old_config_json_with_flat_keys_loads_silently():
    old = {"method": "hassle", "num_iterations": 9, "svd": "exact", "hessian_iterations": 1, "hessian_shrinkage": 0.2}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cfg = OATSConfig.from_dict({**old, "quant_method": "oats"})
        baseline = OATSConfig.from_dict({"method": "wanda", "num_iterations": 80, "svd": "fast"})
    assert cfg.method_settings == HassleSettings(9, "exact", 1, 0.2)
    assert baseline.method_settings == NoSettings()


def test_settings_round_trip_through_json():
    cfg = OATSConfig(method="hassle", method_settings=HassleSettings(num_iterations=3, hessian_shrinkage=0.4))
    data = json.loads(cfg.to_json_string(use_diff=False))
    assert data["method_settings"] == dataclasses.asdict(cfg.method_settings)
    assert OATSConfig.from_dict(data) == cfg
    assert json.loads(cfg.to_json_string())["method_settings"]["hessian_shrinkage"] == 0.4


def test_every_method_declares_a_settings_dataclass():
    for name in ALGORITHMS:
        settings = method_info(name).settings
        assert dataclasses.is_dataclass(settings) and settings() == settings(), name
