"""`optimum-cli oats {compress,evaluate,push,verify,build-kernels}`, registered through optimum's
`optimum.commands.register` namespace.

optimum-cli imports every module of this namespace at start-up, whatever command is run, so this file only
declares arguments: importing `optimum_oats` (torch, transformers) costs seconds and happens when an `oats` command
actually runs (`optimum_oats.commands.runner.execute`). The same classes back the `optimum-oats` console script.
"""

from __future__ import annotations

from argparse import ArgumentParser

from optimum.commands.base import BaseOptimumCLICommand, CommandInfo

# OATSConfig's defaults, for the help text only (arguments default to None so that OATSConfig stays the single
# source of the values actually used; a test keeps this table in sync).
CONFIG_DEFAULTS = {
    "compression_rate": 0.5,
    "rank_ratio": 0.1,
    "method": "oats",
    "sparsity_pattern": "unstructured",
    "dataset": "c4",
    "num_samples": 128,
    "seqlen": 2048,
    "num_iterations": 80,
    "hessian_iterations": 2,
    "hessian_shrinkage": None,
    "seed": 0,
    "calibration_sampling": "joined",
    "svd": "fast",
    "layerwise": "uniform",
    "owl_threshold": 5.0,
    "owl_lambda": 0.08,
    "refine_steps": 0,
    "refine_lr": None,
    "refine_lowrank_lr": None,
    "value_bits": 16,
    "group_size": 128,
    "lowrank_bits": 16,
}
DTYPES = ("float32", "bfloat16", "float16")


def _model_argument(parser: ArgumentParser, name: str, what: str) -> None:
    parser.add_argument(
        name, metavar=name.upper(), help=f"{what}: a Hub id, a local folder, or `default` (embedded SmolLM2-135M)."
    )


def _runtime_arguments(parser: ArgumentParser) -> None:
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="Weights dtype (default: float32).")
    parser.add_argument(
        "--device", default=None, metavar="DEVICE", help="Torch device (default: cuda when available, else cpu)."
    )


def add_compress_arguments(parser: ArgumentParser) -> None:
    _model_argument(parser, "model", "Dense model to compress")
    parser.add_argument(
        "-o", "--output", required=True, metavar="DIR", help="Folder to write the compressed checkpoint to."
    )
    config = parser.add_argument_group("compression (OATSConfig)")

    def option(flag: str, kind: type, metavar: str, help_text: str) -> None:
        default = CONFIG_DEFAULTS[flag[2:].replace("-", "_")]
        config.add_argument(flag, type=kind, default=None, metavar=metavar, help=f"{help_text} (default: {default}).")

    option("--compression-rate", float, "RHO", "Fraction of each layer's parameters removed")
    option("--rank-ratio", float, "KAPPA", "Share of the kept parameters given to the low-rank term")
    option(
        "--method",
        str,
        "NAME",
        "Algorithm: `oats`, `hassle` (full-Hessian sparse + low-rank), or a baseline: `wanda`, `sparsegpt`",
    )
    option("--sparsity-pattern", str, "PATTERN", "`unstructured`, or N:M such as `2:4`")
    option("--dataset", str, "DATA", "Calibration text: `c4`, `wikitext2`, `self`, or a local .txt/.jsonl/.json file")
    option("--num-samples", int, "N", "Calibration sequences")
    option("--seqlen", int, "N", "Tokens per calibration sequence")
    option("--num-iterations", int, "N", "Alternating-thresholding iterations (OATS)")
    option("--hessian-iterations", int, "N", "SparseGPT / weighted-SVD alternations (method `hassle`)")
    option(
        "--hessian-shrinkage",
        float,
        "LAMBDA",
        "Metric (1 - LAMBDA) H + LAMBDA diag(H) (method `hassle`); None: 0.5 below rho 0.55, else 0",
    )
    option("--seed", int, "N", "Seed for calibration sampling")
    option(
        "--calibration-sampling",
        str,
        "HOW",
        "`joined` (documents joined, cut into windows), `documents` (OATS ref.) or `random_windows` (Wanda/SparseGPT)",
    )
    option("--svd", str, "SOLVER", "SVD solver inside OATS: `fast` (default, warm-started) or `exact` (the reference)")
    option("--layerwise", str, "MODE", "Per-block rates: `uniform`, or `owl` (outlier-weighted, OWL)")
    option("--owl-threshold", float, "M", "OWL outlier threshold M")
    option("--owl-lambda", float, "LAMBDA", "OWL half-spread of the per-block rates")
    option("--refine-steps", int, "N", "Block refinement: Adam steps per block matching the dense block's outputs")
    option(
        "--refine-lr",
        float,
        "LR",
        "Block refinement learning rate (unset: 1e-3 for blocks compressed at rate >= 0.55, else 1e-4)",
    )
    option("--refine-lowrank-lr", float, "LR", "Block refinement rate of U and V; None: --refine-lr, 0: frozen")
    option("--value-bits", int, "B", "Bits of the kept values: 16 (not quantized), 8, 6, 4 or 3")
    option("--group-size", int, "G", "Input columns sharing one fp16 scale of the quantized values and factors")
    option("--lowrank-bits", int, "B", "Bits of U and V: 16 (not quantized), 8 or 4")
    config.add_argument(
        "--modules-to-not-convert", nargs="+", default=None, metavar="NAME", help="Module names to keep dense."
    )
    scaling = parser.add_argument_group("scaling (docs/scaling.md)")
    scaling.add_argument(
        "--resume-dir",
        default=None,
        metavar="DIR",
        help="Save each finished block here; rerunning the same command after a crash continues from the last one.",
    )
    scaling.add_argument(
        "--offload-folder",
        default=None,
        metavar="DIR",
        help="Load the model with every block offloaded to this folder on disk and compress one block at a time "
        "(peak memory: about one block plus the calibration activations).",
    )
    _runtime_arguments(parser)


def add_evaluate_arguments(parser: ArgumentParser) -> None:
    _model_argument(parser, "model", "Model to evaluate (usually a compressed checkpoint)")
    parser.add_argument(
        "--dense",
        default=None,
        metavar="BASE",
        help="Dense base model evaluated alongside (Hub id, folder, `default`).",
    )
    parser.add_argument(
        "--tasks",
        nargs="+",
        default=None,
        metavar="TASK",
        help="lm-eval tasks, space- or comma-separated (default: the 8 zero-shot tasks of the pruning papers); "
        "`none` skips them.",
    )
    parser.add_argument(
        "--limit", type=float, default=None, metavar="N", help="Score only the first N documents of each task."
    )
    parser.add_argument(
        "--seqlen", type=int, default=2048, metavar="N", help="Perplexity window in tokens (default: 2048)."
    )
    parser.add_argument(
        "--max-windows", type=int, default=None, metavar="N", help="Score at most N perplexity windows."
    )
    parser.add_argument("--no-perplexity", action="store_true", help="Skip WikiText-2 token perplexity.")
    parser.add_argument(
        "--data-dir", default=None, metavar="DIR", help="Offline data folder (default: $OATS_DATA_DIR)."
    )
    parser.add_argument("--batch-size", type=int, default=1, metavar="N", help="lm-eval batch size (default: 1).")
    parser.add_argument(
        "--output", default=None, metavar="FILE", help="Also write the results to this JSON file (for `push`)."
    )
    _runtime_arguments(parser)


def add_push_arguments(parser: ArgumentParser) -> None:
    parser.add_argument("directory", metavar="DIR", help="Compressed checkpoint folder (written by `compress`).")
    parser.add_argument(
        "--repo-id", required=True, metavar="ID", help="Hub repository, e.g. `user/SmolLM2-135M-oats`."
    )
    parser.add_argument("--private", action="store_true", help="Create the repository as private.")
    parser.add_argument(
        "--eval-json", default=None, metavar="FILE", help="Results written by `evaluate --output`, for the card."
    )
    parser.add_argument(
        "--base-model",
        default=None,
        metavar="ID",
        help="Hub id of the dense model (default: the `--dense` of --eval-json).",
    )
    parser.add_argument(
        "--license", default=None, metavar="ID", help="License (default: the base model's, else `other`)."
    )
    parser.add_argument("--commit-message", default=None, metavar="TEXT", help="Commit message.")


def add_verify_arguments(parser: ArgumentParser) -> None:
    parser.add_argument("directory", metavar="DIR", help="Compressed checkpoint folder to check.")


class _OATSLeafCommand(BaseOptimumCLICommand):
    NAME = ""

    def run(self) -> None:
        from optimum_oats.commands.runner import execute

        execute(self.NAME, self.args)


class CompressCommand(_OATSLeafCommand):
    NAME = "compress"

    @staticmethod
    def parse_args(parser: ArgumentParser) -> None:
        add_compress_arguments(parser)


class EvaluateCommand(_OATSLeafCommand):
    NAME = "evaluate"

    @staticmethod
    def parse_args(parser: ArgumentParser) -> None:
        add_evaluate_arguments(parser)


class PushCommand(_OATSLeafCommand):
    NAME = "push"

    @staticmethod
    def parse_args(parser: ArgumentParser) -> None:
        add_push_arguments(parser)


class BuildKernelsCommand(_OATSLeafCommand):
    NAME = "build_kernels"

    @staticmethod
    def parse_args(parser: ArgumentParser) -> None:
        pass


class VerifyCommand(_OATSLeafCommand):
    NAME = "verify"

    @staticmethod
    def parse_args(parser: ArgumentParser) -> None:
        add_verify_arguments(parser)


class OATSCommand(BaseOptimumCLICommand):
    COMMAND = CommandInfo(
        name="oats", help="Sparse + low-rank (OATS) compression: compress, evaluate, push, verify, build-kernels."
    )
    SUBCOMMANDS = (
        CommandInfo(
            name="compress", help="Compress a model and save the checkpoint.", subcommand_class=CompressCommand
        ),
        CommandInfo(
            name="evaluate",
            help="Token perplexity and zero-shot accuracy, next to the dense model.",
            subcommand_class=EvaluateCommand,
        ),
        CommandInfo(
            name="push",
            help="Push a checkpoint with its model card to the Hub in one commit.",
            subcommand_class=PushCommand,
        ),
        CommandInfo(
            name="verify",
            help="Check a checkpoint's integrity records (sha256 of every tensor) and bitmask structure.",
            subcommand_class=VerifyCommand,
        ),
        CommandInfo(
            name="build-kernels",
            help="Compile the CPU kernels now (once per environment) instead of in the first forward pass.",
            subcommand_class=BuildKernelsCommand,
        ),
    )


REGISTER_COMMANDS = [OATSCommand]
