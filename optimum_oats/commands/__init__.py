"""Command line: `optimum-cli oats {compress,evaluate,push}` and the `optimum-oats` console script.

Arguments are declared in `optimum/commands/register/oats.py` (imported by every `optimum-cli` start, so kept free
of heavy imports), except `compress`'s compression flags, which `arguments.py` generates from the dataclasses when
`compress` first parses; each command's work is a `run(args) -> dict` in this package, executed by `runner.execute`.
"""
