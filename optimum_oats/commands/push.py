"""`oats push DIR --repo-id ID`: checkpoint + model card + plot + results to the Hub in one commit.

The token comes from the environment (`HF_TOKEN`) or `hf auth login`, never from the command line, where it would
end up in shell history and process listings.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def read_eval_json(path: str | None) -> dict[str, Any]:
    """`evaluate --output` files (`{"compressed": ..., "dense": ...}`), or a bare `{task: metrics}` dict."""
    if path is None:
        return {"compressed": None, "dense": None, "dense_model": None}
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object of evaluation results.")
    if "compressed" not in data:
        return {"compressed": data, "dense": None, "dense_model": None}
    return {"compressed": data.get("compressed"), "dense": data.get("dense"), "dense_model": data.get("dense_model")}


def run(args: argparse.Namespace) -> dict[str, Any]:
    from optimum_oats.hub.card import resolve_base_model
    from optimum_oats.hub.publish import publish_folder

    results = read_eval_json(args.eval_json)
    base_model = args.base_model or resolve_base_model(results["dense_model"])
    commit_url = publish_folder(
        args.directory,
        args.repo_id,
        eval_results=results["compressed"],
        dense_results=results["dense"],
        base_model=base_model,
        private=args.private,
        commit_message=args.commit_message,
        license=args.license,
    )
    return {"repo_id": args.repo_id, "commit_url": commit_url, "private": args.private, "base_model": base_model}
