import pytest

from optimum_oats import OATSConfig


def test_defaults_and_quant_method():
    cfg = OATSConfig()
    assert cfg.quant_method == "oats"
    assert (cfg.compression_rate, cfg.rank_ratio, cfg.method_settings.num_iterations) == (0.5, 0.1, 80)
    assert (cfg.method, cfg.sparsity_pattern, cfg.num_samples, cfg.seqlen) == ("oats", "unstructured", 128, 2048)


def test_round_trip_without_tokenizer():
    cfg = OATSConfig(
        compression_rate=0.3,
        method="wanda",
        sparsity_pattern="2:4",
        dataset=["a", "b"],
        modules_to_not_convert=["layers.1.mlp.down_proj"],
        tokenizer=object(),
        seed=3,
    )
    data = cfg.to_dict()
    assert "tokenizer" not in data and data["quant_method"] == "oats"
    again = OATSConfig.from_dict(data)
    assert again.to_dict() == data
    assert OATSConfig.from_dict(OATSConfig().to_dict()).to_dict() == OATSConfig().to_dict()


def test_diff_dict_only_holds_changes():
    assert OATSConfig(seed=7).to_diff_dict() == {"quant_method": "oats", "seed": 7}


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"compression_rate": 0.0}, r"`compression_rate` must be in \(0.0, 1.0\), got 0.0"),
        ({"compression_rate": 1.0}, r"`compression_rate` must be in \(0.0, 1.0\), got 1.0"),
        ({"compression_rate": float("nan")}, "compression_rate"),
        ({"rank_ratio": -0.1}, r"`rank_ratio` must be in \[0.0, 1.0\), got -0.1"),
        ({"rank_ratio": 1.0}, "rank_ratio"),
        ({"method_settings": {"num_iterations": 0}}, "`num_iterations` must be >= 1, got 0"),
        ({"num_samples": 0}, "`num_samples` must be >= 1"),
        ({"seqlen": -5}, "`seqlen` must be >= 1"),
        ({"method": "svd"}, "`method` must be one of"),
        ({"sparsity_pattern": "4:2"}, "`sparsity_pattern` must be 'unstructured' or 'N:M'"),
        ({"sparsity_pattern": "half"}, "sparsity_pattern"),
        ({"sparsity_pattern": "6:8", "rank_ratio": 0.3}, "nothing is compressed"),
        ({"dataset": []}, "non-empty list of strings"),
        ({"dataset": ""}, "`dataset` must be"),
        ({"modules_to_not_convert": "lm_head"}, "list of module names"),
        ({"method_settings": {"solver": "magic"}}, "`solver` must be one of"),
        ({"layerwise": "random"}, "`layerwise` must be one of"),
        ({"owl_lambda": 0.6}, r"`owl_lambda` must be in \[0.0, 0.5\)"),
        ({"owl_threshold": 0}, "`owl_threshold` must be in"),
        ({"refine_lowrank_lr": -1e-4}, r"`refine_lowrank_lr` must be in \[0.0, 1.0\)"),
        ({"refine_lr": 0.0}, r"`refine_lr` must be in \(0.0, 1.0\), got 0.0"),
    ],
)
def test_invalid_values_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        OATSConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs", [{"compression_rate": "0.5"}, {"method_settings": {"num_iterations": 2.5}}, {"seed": True}]
)
def test_wrong_types(kwargs):
    with pytest.raises(TypeError):
        OATSConfig(**kwargs)


def test_skip_matching_is_exact_or_dotted_suffix():
    cfg = OATSConfig(modules_to_not_convert=["layers.1.mlp.down_proj", "o_proj"])
    assert cfg.is_skipped("model.layers.1.mlp.down_proj")
    assert not cfg.is_skipped("model.layers.10.mlp.down_proj")
    assert cfg.is_skipped("model.layers.3.self_attn.o_proj")
    assert not cfg.is_skipped("model.layers.3.self_attn.xo_proj")


def test_an_unset_refine_lr_survives_the_round_trip():
    """`refine_lr=None` means "by the block's rate" (engine.refine.default_refine_lr); config.json keeps it unset."""
    cfg = OATSConfig(refine_steps=8)
    assert cfg.refine_lr is None
    assert OATSConfig.from_dict(cfg.to_dict()).refine_lr is None
    assert OATSConfig(refine_lr=3e-4).refine_lr == 3e-4


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"value_bits": 5}, ValueError, r"`value_bits` must be one of \(3, 4, 6, 8, 16\).*got 5"),
        ({"value_bits": 2}, ValueError, "`value_bits` must be one of"),
        ({"lowrank_bits": 6}, ValueError, r"`lowrank_bits` must be one of \(4, 8, 16\).*got 6"),
        ({"group_size": 0}, ValueError, "`group_size` must be >= 1, got 0"),
        ({"group_size": 96}, ValueError, "`group_size` must divide 128 or be a multiple of it.*got 96"),
        ({"value_bits": 4.0}, TypeError, "`value_bits` must be an integer"),
        ({"value_bits": 4, "refine_steps": 8}, NotImplementedError, "`refine_steps=8` with quantization"),
        ({"lowrank_bits": 8, "refine_steps": 8}, NotImplementedError, "off the quantization grid"),
        ({"value_bits": 4, "sparsity_pattern": "2:4"}, NotImplementedError, "`sparsity_pattern='2:4'`"),
    ],
)
def test_invalid_quantization_settings_name_the_field(kwargs, error, message):
    with pytest.raises(error, match=message):
        OATSConfig(**kwargs)


def test_quantization_settings_round_trip():
    cfg = OATSConfig(method="hassle", value_bits=3, group_size=64, lowrank_bits=8)
    assert cfg.quantized and not OATSConfig().quantized and OATSConfig(lowrank_bits=4).quantized
    again = OATSConfig.from_dict(cfg.to_dict())
    assert (again.value_bits, again.group_size, again.lowrank_bits) == (3, 64, 8)
    assert {k: v for k, v in cfg.to_diff_dict().items() if k != "method_settings"} == {
        "quant_method": "oats",
        "method": "hassle",
        "value_bits": 3,
        "group_size": 64,
        "lowrank_bits": 8,
    }
