"""Compression algorithms as pure tensor functions, plus the registry of methods (`registry.py`).

This package imports only torch, numpy and the `kernels/` loader: the model traversal that feeds it is the engine's.
"""

from .budget import LayerBudget, layer_budget
from .hessian_slr import DEFAULT_HESSIAN_ITERATIONS, HassleSettings, hessian_sparse_low_rank
from .masks import nm_mask, rowwise_topk_mask, sparsity_mask
from .method import HESSIAN, INPUT_NORMS, Algorithm, NoSettings
from .oats import DEFAULT_SOLVER, SOLVERS, Decomposition, OATSSettings, oats_decompose, truncated_svd
from .owl import outlier_ratios, owl_block_rates
from .pruning import magnitude_prune, wanda_prune
from .quantize import DEFAULT_GROUP_SIZE, LOWRANK_BITS, NOT_QUANTIZED, VALUE_BITS, GroupSpec
from .registry import (
    ALGORITHMS,
    TRAINED_METHODS,
    QuantizationSettings,
    compress_layer,
    lowrank_spec,
    method_info,
    method_names,
    register_algorithm,
    resolve_method_settings,
    unregister_algorithm,
    value_spec,
)
from .sparsegpt import sparsegpt_prune

__all__ = [
    "ALGORITHMS",
    "DEFAULT_GROUP_SIZE",
    "LOWRANK_BITS",
    "NOT_QUANTIZED",
    "VALUE_BITS",
    "GroupSpec",
    "DEFAULT_HESSIAN_ITERATIONS",
    "DEFAULT_SOLVER",
    "HESSIAN",
    "INPUT_NORMS",
    "SOLVERS",
    "TRAINED_METHODS",
    "Algorithm",
    "Decomposition",
    "HassleSettings",
    "LayerBudget",
    "NoSettings",
    "QuantizationSettings",
    "OATSSettings",
    "hessian_sparse_low_rank",
    "layer_budget",
    "magnitude_prune",
    "method_info",
    "method_names",
    "nm_mask",
    "oats_decompose",
    "outlier_ratios",
    "owl_block_rates",
    "compress_layer",
    "lowrank_spec",
    "register_algorithm",
    "resolve_method_settings",
    "value_spec",
    "rowwise_topk_mask",
    "sparsegpt_prune",
    "sparsity_mask",
    "truncated_svd",
    "unregister_algorithm",
    "wanda_prune",
]
