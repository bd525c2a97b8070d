"""Property-based tests of `OATSConfig`: every valid combination round-trips exactly, every invalid value is
refused with an error that names the field."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from optimum_oats import OATSConfig
from optimum_oats.algorithms import SOLVERS, method_info, method_names
from optimum_oats.config import LAYERWISE, NAMED_DATASETS, parse_nm

SETTINGS = settings(max_examples=150, deadline=None)

# ----------------------------------------------------------------------------------------------- valid configs
unit_open = st.floats(min_value=0.0, max_value=1.0, exclude_min=True, exclude_max=True, allow_nan=False)
rank_ratio = st.just(0.0) | st.floats(min_value=0.0, max_value=1.0, exclude_max=True, allow_nan=False)
positive = st.integers(min_value=1, max_value=10**9)
module_names = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_.0123456789", min_size=1, max_size=40)
layer_entry = st.fixed_dictionaries(
    {"rank": st.integers(0, 10**6), "nnz": st.integers(0, 10**9)},
    optional={"relative_error": st.floats(0, 10, allow_nan=False), "compression_rate": unit_open},
)


# The fields of OATSConfig.method_settings, by method, drawn in full so that the round trip compares every one.
METHOD_SETTINGS = {
    "oats": {"num_iterations": positive, "solver": st.sampled_from(SOLVERS)},
    "hassle": {
        "num_iterations": positive,
        "solver": st.sampled_from(SOLVERS),
        "hessian_iterations": st.integers(0, 100),
        "hessian_shrinkage": st.none() | st.floats(0.0, 1.0),
    },
}
# Checked by the method's settings dataclass, reached through `method_settings`.
SETTINGS_FIELDS = ("num_iterations", "solver")


def _kwargs(field: str, value) -> dict:
    return {"method_settings": {field: value}} if field in SETTINGS_FIELDS else {field: value}


@st.composite
def valid_kwargs(draw) -> dict:
    method = draw(st.sampled_from(method_names()))
    kwargs = {
        "compression_rate": draw(unit_open),
        "rank_ratio": draw(rank_ratio),
        "method": method,
        "method_settings": draw(st.fixed_dictionaries(METHOD_SETTINGS.get(method, {}))),
        "num_samples": draw(positive),
        "seqlen": draw(positive),
        "seed": draw(st.integers(0, 2**64 - 1)),
        "layerwise": draw(st.sampled_from(LAYERWISE)),
        "owl_threshold": draw(st.floats(min_value=0.0, exclude_min=True, allow_nan=False, allow_infinity=False)),
        "owl_lambda": draw(st.floats(min_value=0.0, max_value=0.5, exclude_max=True, allow_nan=False)),
        "dataset": draw(
            st.sampled_from(NAMED_DATASETS) | st.text(min_size=1) | st.lists(st.text(), min_size=1, max_size=5)
        ),
        "modules_to_not_convert": draw(st.none() | st.lists(module_names, max_size=4)),
        "layer_map": draw(st.none() | st.dictionaries(module_names, layer_entry, max_size=4)),
    }
    if kwargs["layerwise"] == "uniform" and draw(st.booleans()):
        m = draw(st.integers(2, 64))
        n = draw(st.integers(1, m - 1))
        if method_info(kwargs["method"]).uses_low_rank and n / m / (1 - kwargs["rank_ratio"]) >= 1:
            kwargs["rank_ratio"] = 0.0
        kwargs["sparsity_pattern"] = f"{n}:{m}"
    return kwargs


@SETTINGS
@given(valid_kwargs())
def test_every_valid_config_round_trips_exactly(kwargs):
    cfg = OATSConfig(**kwargs)
    data = cfg.to_dict()
    for name, value in kwargs.items():
        assert data[name] == value, name
    assert OATSConfig.from_dict(data).to_dict() == data
    for use_diff in (False, True):
        text = cfg.to_json_string(use_diff=use_diff)
        assert OATSConfig.from_dict(json.loads(text)).to_dict() == data
    assert OATSConfig.from_dict(json.loads(json.dumps(data))).to_json_string() == cfg.to_json_string()


@SETTINGS
@given(
    st.sampled_from(["num_iterations", "num_samples", "seqlen", "seed"]),
    st.sampled_from([np.int8, np.int32, np.int64, np.uint16]),
    st.integers(1, 100),
)
def test_numpy_integers_become_builtin_ints(field, dtype, value):
    data = OATSConfig(**_kwargs(field, dtype(value))).to_dict()
    data = data["method_settings"] if field in SETTINGS_FIELDS else data
    assert type(data[field]) is int and data[field] == value
    json.dumps(data)  # would raise on a numpy scalar


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_numpy_floats_become_builtin_floats(dtype):
    data = OATSConfig(compression_rate=dtype(0.25), owl_threshold=dtype(3)).to_dict()
    assert type(data["compression_rate"]) is float and data["compression_rate"] == 0.25
    assert type(data["owl_threshold"]) is float and data["owl_threshold"] == 3.0
    json.dumps(data)


# ----------------------------------------------------------------------------------------------- invalid values
def assert_refused(field: str, **kwargs) -> None:
    with pytest.raises((ValueError, TypeError)) as excinfo:
        OATSConfig(**kwargs)
    assert f"`{field}" in str(excinfo.value), str(excinfo.value)


not_a_number = st.one_of(
    st.booleans(), st.none(), st.text(max_size=5), st.lists(st.integers(), max_size=2), st.just(1j), st.just({})
)
special_floats = st.sampled_from([math.nan, math.inf, -math.inf, -0.0])
FLOAT_RANGES = {  # field: (low, high, low_inclusive)
    "compression_rate": (0.0, 1.0, False),
    "rank_ratio": (0.0, 1.0, True),
    "owl_threshold": (0.0, math.inf, False),
    "owl_lambda": (0.0, 0.5, True),
}
INT_MINIMUMS = {"num_iterations": 1, "num_samples": 1, "seqlen": 1, "seed": 0}


def _outside(value: float | int, low: float, high: float, low_inclusive: bool) -> bool:
    """Exact comparisons (Python compares big ints and floats exactly); NaN is outside every range."""
    return value != value or value >= high or (value < low if low_inclusive else value <= low)


@SETTINGS
@given(
    st.sampled_from(sorted(FLOAT_RANGES)),
    st.floats(allow_nan=True, allow_infinity=True) | special_floats | st.integers(-(10**400), 10**400),
)
def test_out_of_range_floats_name_the_field(field, value):
    low, high, low_inclusive = FLOAT_RANGES[field]
    if not _outside(value, low, high, low_inclusive):
        return  # inside the range: covered by the round-trip test
    assert_refused(field, **_kwargs(field, value))


@SETTINGS
@given(st.sampled_from(sorted(FLOAT_RANGES) + sorted(INT_MINIMUMS)), not_a_number)
def test_numbers_of_the_wrong_type_name_the_field(field, value):
    assert_refused(field, **_kwargs(field, value))


@SETTINGS
@given(
    st.sampled_from(sorted(INT_MINIMUMS)),
    st.floats(allow_nan=True) | st.integers(-(10**30), 0) | st.integers(2**64, 2**70),
)
def test_bad_integers_name_the_field(field, value):
    if isinstance(value, int) and INT_MINIMUMS[field] <= value <= (2**64 - 1 if field == "seed" else value):
        return
    assert_refused(field, **_kwargs(field, value))


@pytest.mark.parametrize("field", sorted(INT_MINIMUMS))
def test_bool_is_not_an_integer(field):
    assert_refused(field, **_kwargs(field, True))


@SETTINGS
@given(st.sampled_from(["method", "solver", "layerwise"]), st.text() | not_a_number)
def test_bad_choices_name_the_field(field, value):
    allowed = {"method": method_names(), "solver": SOLVERS, "layerwise": LAYERWISE}[field]
    if isinstance(value, str) and value in allowed:
        return
    assert_refused(field, **_kwargs(field, value))


def _valid_nm(text: str) -> bool:
    nm = parse_nm(text)
    return nm is not None and 0 < nm[0] < nm[1]


@SETTINGS
@given(
    st.text()
    | st.from_regex(r"\A[0-9]{1,3}:[0-9]{1,3}\Z")
    | st.sampled_from(["2:4\n", " 2:4", "2:4 ", "２:４", "2/4", "2:4:8", "0:4", "4:4", "8:4", "-1:4", "2:"])
)
def test_bad_sparsity_patterns_name_the_field(pattern):
    if pattern == "unstructured" or _valid_nm(pattern):
        return
    assert_refused("sparsity_pattern", sparsity_pattern=pattern, rank_ratio=0.0)


@pytest.mark.parametrize(
    "field, value",
    [  # traps found while writing the properties above, pinned so that every run checks them
        ("sparsity_pattern", "2:4\n"),  # `$` matches before a trailing newline
        ("sparsity_pattern", "\uff12:\uff14"),  # full-width digits: `\d` and int() accept them
        ("sparsity_pattern", " 2:4"),
        ("owl_threshold", 10**400),  # finite as an int, but float() overflows
        ("owl_threshold", math.inf),
        ("compression_rate", math.nan),
        ("rank_ratio", math.nan),
        ("owl_lambda", -math.inf),
        ("seed", 2**64),  # beyond torch.manual_seed
        ("modules_to_not_convert", 5),  # not iterable: used to fail with "'int' object is not iterable"
        ("modules_to_not_convert", {"a": 1}),
    ],
    ids=lambda value: repr(value)[:24],
)
def test_pinned_traps_name_the_field(field, value):
    assert_refused(field, **{field: value, "rank_ratio": 0.0} if field != "rank_ratio" else {field: value})


@pytest.mark.parametrize("pattern", [2, None, (2, 4), b"2:4"])
def test_sparsity_pattern_must_be_a_string(pattern):
    for layerwise in LAYERWISE:
        with pytest.raises(TypeError, match="`sparsity_pattern` must be a string"):
            OATSConfig(sparsity_pattern=pattern, layerwise=layerwise)


def test_nm_patterns_that_keep_everything_and_owl_with_nm_are_refused():
    assert_refused("sparsity_pattern", sparsity_pattern="3:4", rank_ratio=0.25)  # 3/4 / 0.75 = 100%
    OATSConfig(sparsity_pattern="3:4", rank_ratio=0.25, method="wanda")  # baselines have no low-rank term
    assert_refused("layerwise", layerwise="owl", sparsity_pattern="2:4")


@SETTINGS
@given(st.one_of(st.just(""), st.just([]), st.lists(st.integers() | st.none(), min_size=1), st.integers(), st.none()))
def test_bad_datasets_name_the_field(dataset):
    assert_refused("dataset", dataset=dataset)


@SETTINGS
@given(st.one_of(st.text(), st.integers(), st.lists(st.integers() | st.none(), min_size=1), st.just({"a": 1})))
def test_bad_modules_to_not_convert_name_the_field(value):
    assert_refused("modules_to_not_convert", modules_to_not_convert=value)


@SETTINGS
@given(
    st.one_of(
        st.just([]),
        st.just("x"),
        st.dictionaries(module_names, st.integers(), min_size=1, max_size=2),
        st.dictionaries(
            module_names,
            st.fixed_dictionaries(
                {"rank": st.integers(max_value=-1) | st.booleans() | st.floats(), "nnz": st.just(1)}
            ),
            min_size=1,
            max_size=2,
        ),
        st.dictionaries(module_names, st.fixed_dictionaries({"rank": st.just(1)}), min_size=1, max_size=2),
    )
)
def test_bad_layer_maps_name_the_field(layer_map):
    assert_refused("layer_map", layer_map=layer_map)


@SETTINGS
@given(valid_kwargs(), st.sampled_from(sorted(FLOAT_RANGES)), special_floats | st.floats(1.0, 1e9))
def test_update_is_validated_too(kwargs, field, value):
    cfg = OATSConfig(**kwargs)
    low, high, low_inclusive = FLOAT_RANGES[field]
    if not _outside(value, low, high, low_inclusive):
        return
    with pytest.raises(ValueError, match=f"`{field}`"):
        cfg.update(**{field: value})


def test_unknown_field_in_a_saved_config_is_named():
    data = OATSConfig().to_dict()
    data["compresion_rate"] = 0.5  # a typo in a hand-edited config.json
    with pytest.raises(TypeError, match="compresion_rate"):
        OATSConfig.from_dict(data)
