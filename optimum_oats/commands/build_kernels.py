"""`oats build-kernels`: compile the CPU kernels now (the set-up script runs it), not in a user's first call."""

from __future__ import annotations

import argparse
from typing import Any


def run(args: argparse.Namespace) -> dict[str, Any]:
    from optimum_oats.kernels import build_kernels

    try:
        return build_kernels()
    except RuntimeError as err:  # a user-fixable environment problem: report it as such
        raise OSError(str(err)) from err
