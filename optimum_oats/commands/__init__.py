"""Command line: `optimum-cli oats {compress,evaluate,push}` and the `optimum-oats` console script.

Arguments are declared in `optimum/commands/register/oats.py` (imported by every `optimum-cli` start, so kept free
of heavy imports); each command's work is a `run(args) -> dict` in this package, executed by `runner.execute`.
"""
