"""`oats verify DIR`: check a checkpoint's integrity records and bitmask structure; exit status 1 when damaged."""

from __future__ import annotations

import argparse
import logging
from typing import Any

logger = logging.getLogger(__name__)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from optimum_oats.integrations.verify import verify_checkpoint

    summary = verify_checkpoint(args.directory)
    for problem in summary["problems"]:
        logger.error("%s", problem)
    if summary["records"] != "all" and not summary["damaged"]:
        logger.warning("Files without integrity records were checked for structure only; save again to add them.")
    return {**summary, "ok": not summary["damaged"]}
