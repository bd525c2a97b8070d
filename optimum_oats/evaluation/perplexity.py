"""Token perplexity on WikiText-2, computed the way the pruning papers (SparseGPT, Wanda, OWL, OATS) do.

The test split is joined into one string (`"\\n\\n".join(rows)` over the Hugging Face dataset rows), tokenized
once, cut into non-overlapping windows of `seqlen` tokens (the remainder is dropped), and the perplexity is
`exp(mean over windows of the mean next-token NLL)`. This is *token* perplexity on a fixed-length window, not
lm-eval's word perplexity per document (see `optimum_oats.evaluation.harness` for that).
"""

from __future__ import annotations

import logging
import math
import os
from typing import TYPE_CHECKING

from ..data.paths import DATA_DIR_ENV, resolve_data_dir
from ..data.text import leading_special_tokens

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

_SPLIT_FILES = {"test": "wiki.test.raw", "validation": "wiki.valid.raw", "valid": "wiki.valid.raw"}


def wikitext2_rows(data_dir: str | os.PathLike | None = None, split: str = "test") -> list[str]:
    """Rows of WikiText-2 raw (`wikitext-2-raw-v1`) exactly as the Hugging Face `wikitext` dataset holds them.

    Each row is a line of the raw file with its trailing `"\\n"`, and whitespace-only lines are `""` (this is
    what the dataset's loading script did, and what its parquet files now contain).

    Args:
        data_dir (`str` or `os.PathLike`, *optional*):
            Folder holding `wikitext2/wiki.{test,valid}.raw`. Defaults to `$OATS_DATA_DIR`; when neither is set,
            the rows are fetched with `datasets.load_dataset("wikitext", "wikitext-2-raw-v1")`.
        split (`str`, defaults to `"test"`):
            `"test"` or `"validation"` (alias `"valid"`). The train split is only available from the Hub.

    Returns:
        `list[str]`: the rows, in order (4358 for test, 3760 for validation).

    Raises:
        FileNotFoundError: no local folder is configured and the Hub cannot be reached, or the file is missing.
        ValueError: unknown split.
    """
    if split not in _SPLIT_FILES and split != "train":
        raise ValueError(f"Unknown WikiText-2 split {split!r}; use 'test' or 'validation'.")
    folder = resolve_data_dir(data_dir, required=False)
    if folder is None:
        return _rows_from_hub(split)
    if split == "train":
        raise FileNotFoundError(
            "The WikiText-2 train split is not available in the offline data folder; use 'validation' or 'test'."
        )
    path = folder / "wikitext2" / _SPLIT_FILES[split]
    if not path.is_file():
        raise FileNotFoundError(f"Missing WikiText-2 file {str(path)!r}; check {DATA_DIR_ENV} / data_dir.")
    with open(path, encoding="utf-8") as f:
        return [row if row.strip() else "" for row in f]


def _rows_from_hub(split: str) -> list[str]:
    hub_split = "validation" if split == "valid" else split
    logger.warning(
        "No data_dir and no $%s: loading WikiText-2 (%s) from the Hugging Face Hub", DATA_DIR_ENV, hub_split
    )
    try:
        import datasets

        return list(datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split=hub_split)["text"])
    except Exception as err:  # offline, missing cache, ...: all mean "no data"
        raise FileNotFoundError(
            f"Could not load WikiText-2 ({hub_split}) from the Hugging Face Hub ({type(err).__name__}: {err}). "
            f"Offline, point the {DATA_DIR_ENV} environment variable (or `data_dir=`) at the folder holding "
            "wikitext2/wiki.test.raw."
        ) from err


def wikitext2_text(data_dir: str | os.PathLike | None = None, split: str = "test") -> str:
    """The WikiText-2 evaluation string of the pruning papers: `"\\n\\n".join(rows)`.

    Args:
        data_dir (`str` or `os.PathLike`, *optional*):
            Folder holding `wikitext2/`. Defaults to `$OATS_DATA_DIR`, then to the Hugging Face Hub.
        split (`str`, defaults to `"test"`):
            `"test"` or `"validation"`.

    Returns:
        `str`: the joined text.
    """
    return "\n\n".join(wikitext2_rows(data_dir, split))


def _model_device(model: PreTrainedModel) -> torch.device:
    device = getattr(model, "device", None)
    if device is not None:
        return device
    return next(model.parameters()).device


def token_perplexity(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    text: str,
    seqlen: int = 2048,
    max_windows: int | None = None,
    batch_size: int = 1,
    progress: bool = True,
) -> float:
    """Token perplexity of `text` in non-overlapping windows of `seqlen` tokens (SparseGPT / Wanda protocol).

    The text is tokenized once, the trailing partial window is dropped, every window starts with the tokenizer's
    BOS token(s) when it adds any (Llama-3, Gemma; see `leading_special_tokens`), and each window is scored on its
    own: the loss of a window is the mean cross-entropy (in float32) of its `seqlen - 1` next-token predictions.
    The result is `exp` of the mean window loss.

    Args:
        model (`PreTrainedModel`):
            A causal language model; it is run on its own device, in eval mode, without gradients.
        tokenizer (`PreTrainedTokenizerBase`):
            The model's tokenizer.
        text (`str`):
            The text to score, e.g. `wikitext2_text()`.
        seqlen (`int`, defaults to 2048):
            Window length in tokens (2048 in the papers for LLaMA-class models).
        max_windows (`int`, *optional*):
            Score only the first `max_windows` windows (for quick checks).
        batch_size (`int`, defaults to 1):
            Windows per forward pass. Does not change the result beyond floating-point noise.
        progress (`bool`, defaults to `True`):
            Show a tqdm progress bar.

    Returns:
        `float`: the perplexity.

    Raises:
        ValueError: `text` is shorter than one window, or an argument is out of range.
    """
    import torch
    import torch.nn.functional as F
    from tqdm.auto import tqdm

    if seqlen < 2:
        raise ValueError(f"seqlen must be >= 2, got {seqlen}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_windows is not None and max_windows < 1:
        raise ValueError(f"max_windows must be >= 1, got {max_windows}")

    prefix = leading_special_tokens(tokenizer)
    body = seqlen - len(prefix)
    if body < 2:
        raise ValueError(f"seqlen={seqlen} leaves fewer than 2 text tokens after the BOS token(s).")
    # With a BOS-adding tokenizer every window starts with the BOS, as the model saw in training (and as lm-eval's
    # rolling windows do); without one this is the papers' protocol unchanged: one tokenization, windows cut from it.
    input_ids = tokenizer(text, return_tensors="pt", add_special_tokens=not prefix, verbose=False).input_ids[0]
    n_windows = input_ids.numel() // body
    if n_windows == 0:
        raise ValueError(f"The text has {input_ids.numel()} tokens, fewer than one window of {seqlen}.")
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    windows = input_ids[: n_windows * body].view(n_windows, body)
    if prefix:
        windows = torch.cat([torch.tensor(prefix, dtype=windows.dtype).expand(n_windows, -1), windows], dim=1)
    logger.info("Token perplexity: %d windows of %d tokens", n_windows, seqlen)

    device = _model_device(model)
    was_training = model.training
    model.eval()
    window_losses: list[torch.Tensor] = []
    try:
        with torch.no_grad():
            for start in tqdm(
                range(0, n_windows, batch_size), desc=f"perplexity (seqlen={seqlen})", disable=not progress
            ):
                batch = windows[start : start + batch_size].to(device)
                logits = model(input_ids=batch, use_cache=False).logits
                shift_logits = logits[:, :-1, :].float()
                shift_labels = batch[:, 1:]
                nll = F.cross_entropy(shift_logits.transpose(1, 2), shift_labels, reduction="none")
                window_losses.append(nll.mean(dim=1).cpu())
    finally:
        model.train(was_training)

    mean_loss = torch.cat(window_losses).double().mean().item()
    return math.exp(mean_loss)
