"""`optimum-cli oats {compress,evaluate,push,verify,build-kernels}`, registered through optimum's
`optimum.commands.register` namespace.

optimum-cli imports every module of this namespace at start-up, whatever command is run, so this file only
declares arguments: importing `optimum_oats` (torch, transformers) costs seconds and happens when an `oats` command
actually runs (`optimum_oats.commands.runner.execute`). The same classes back the `optimum-oats` console script
(`main` below).

This module is the top of the import graph: it imports `optimum_oats` (lazily), nothing in `optimum_oats` imports it.
"""

from __future__ import annotations

from argparse import ArgumentParser
from collections.abc import Sequence

from optimum.commands.base import BaseOptimumCLICommand, CommandInfo

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


# What a run costs, where the user decides (measured in BENCHMARKS.md's log; docs/quality.md has the commands).
COMPRESS_TIME = (
    "Time, measured on SmolLM2-135M on a 2-core CPU VM, one thread per run: calibration 16 x 1024 tokens takes "
    "2-4 min with wanda, 3-5 min with sparsegpt, 3-7 min with oats, 7-12 min with hassle; 32 x 2048 took 32 min "
    "with hassle. "
    "The defaults (128 x 2048) read 4x the tokens of 32 x 2048 and were not timed: start with "
    "--num-samples 16 --seqlen 1024. Time grows with the model's linear parameters; on an H200 (--device cuda) "
    "the 16 x 1024 runs took 24 s (sparsegpt) to 104 s (hassle)."
)


def add_compress_arguments(parser: ArgumentParser) -> None:
    parser.epilog = COMPRESS_TIME
    _model_argument(parser, "model", "Dense model to compress")
    parser.add_argument(
        "-o", "--output", required=True, metavar="DIR", help="Folder to write the compressed checkpoint to."
    )
    _declare_config_arguments_on_first_use(parser)
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


def _declare_config_arguments_on_first_use(parser: ArgumentParser) -> None:
    """Add the compression flags when this parser is first used (to parse, or to print its help).

    They are generated from `OATSConfig` and every registered method's settings dataclass
    (`optimum_oats.commands.arguments`), which imports `optimum_oats` (torch); optimum-cli builds every command's
    parser at each start, whatever command runs, so they cannot be added then. argparse hands a subcommand's
    arguments to that parser's `parse_known_args`, which this wraps.
    """
    parse_known_args = parser.parse_known_args

    def declare_then_parse(args=None, namespace=None):
        if not getattr(parser, "_oats_config_declared", False):
            from optimum_oats.commands.arguments import add_config_arguments

            add_config_arguments(parser)
            parser._oats_config_declared = True
        return parse_known_args(args, namespace)

    parser.parse_known_args = declare_then_parse


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


def build_parser() -> ArgumentParser:
    """`optimum-oats`: the root optimum command with the `oats` subcommands registered directly under it."""
    from optimum.commands.base import RootOptimumCLICommand

    root = RootOptimumCLICommand("optimum-oats")  # usage generated by argparse from what is registered
    for info in OATSCommand.SUBCOMMANDS:
        root.register_subcommand(info)
    return root.parser


def main(argv: Sequence[str] | None = None) -> None:
    """The `optimum-oats` console script: a fallback where optimum's CLI namespace is not picked up."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        raise SystemExit(1)
    args.func(args).run()


if __name__ == "__main__":
    main()
