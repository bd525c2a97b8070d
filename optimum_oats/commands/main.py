"""`optimum-oats`: the `optimum-cli oats` commands as a standalone console script.

A fallback for environments where optimum's CLI namespace is not picked up; it builds its parser from the very
command classes `optimum-cli` registers, so both spellings accept the same arguments.
"""

from __future__ import annotations

from collections.abc import Sequence


def build_parser():
    """The root optimum command with every `oats` subcommand registered under it."""
    from optimum.commands.base import RootOptimumCLICommand

    from optimum.commands.register.oats import OATSCommand

    usage = "optimum-oats {compress,evaluate,push,verify,build-kernels} ..."
    root = RootOptimumCLICommand("optimum-oats", usage=usage)
    for info in OATSCommand.SUBCOMMANDS:
        root.register_subcommand(info)
    return root.parser


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        raise SystemExit(1)
    args.func(args).run()


if __name__ == "__main__":
    main()
