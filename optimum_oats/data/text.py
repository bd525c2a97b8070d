"""Calibration text: where it comes from and how it becomes model inputs.

Decoder LMs calibrate on `(num_samples, seqlen)` token windows cut from a joined stream (as in the papers);
encoders and encoder-decoders on documents tokenized as the model sees them (special tokens, truncated to the
model's length) in right-padded batches with attention masks (`sample_text_batches`).
"""

from __future__ import annotations

import json
import logging
import os
import random
import unicodedata
from pathlib import Path

import torch

from .paths import DATA_DIR_ENV, data_dir

logger = logging.getLogger(__name__)

# Samples per forward pass for padded text batches and image batches (token windows run one at a time).
CALIBRATION_BATCH_SIZE = 8
# Per-position inputs a tokenizer returns that are padded; anything else it returns is dropped.
_PAD_VALUES = {"input_ids": None, "attention_mask": 0, "token_type_ids": 0}
# Local copies under $OATS_DATA_DIR, tried before the Hub so that offline machines work.
_LOCAL_FILES = {"c4": ("c4/c4_sample.jsonl",), "wikitext2": ("wikitext2/wiki.train.raw", "wikitext2/wiki.valid.raw")}


class CalibrationDataError(ValueError):
    """The calibration data could not be found or is unusable."""


def read_text_file(path: str | os.PathLike) -> list[str]:
    """Texts from a `.txt` (one document per blank-line-separated paragraph block), `.jsonl` or `.json` file."""
    path = Path(path)
    try:
        if path.suffix in (".jsonl", ".json"):
            with path.open(encoding="utf-8") as handle:
                if path.suffix == ".json":
                    records = json.load(handle)
                else:
                    records = [json.loads(line) for line in handle if line.strip()]
            if not isinstance(records, list):
                raise CalibrationDataError(f"{path} must hold a list of records, got a {type(records).__name__}.")
            return [_record_text(record, path, number) for number, record in enumerate(records, 1)]
        return [path.read_text(encoding="utf-8")]
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CalibrationDataError(
            f"Calibration file {path} is not valid UTF-8 text/JSON ({error}). Save it as UTF-8 .txt or .jsonl."
        ) from error


def _record_text(record: object, path: Path, number: int) -> str:
    if isinstance(record, str):
        return record
    if isinstance(record, dict) and isinstance(record.get("text"), str):
        return record["text"]
    raise CalibrationDataError(
        f"Record {number} of {path} has no string 'text' field: each record must be a string or an object "
        'such as {"text": "..."}.'
    )


def _load_named(name: str) -> list[str]:
    root = data_dir()
    if root is not None:
        for relative in _LOCAL_FILES[name]:
            if (root / relative).is_file():
                logger.info("Calibration dataset %r read from %s", name, root / relative)
                return read_text_file(root / relative)
    import datasets

    try:
        if name == "c4":
            rows = datasets.load_dataset(
                "allenai/c4", data_files={"train": "en/c4-train.00000-of-01024.json.gz"}, split="train"
            )
        else:
            rows = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split="train")
    except Exception as error:  # the Hub raises many types; all mean "not reachable"
        raise CalibrationDataError(
            f"Calibration dataset {name!r} could not be loaded from the Hub ({type(error).__name__}: {error}) and "
            f"no local copy was found. Set {DATA_DIR_ENV} to a folder holding {' or '.join(_LOCAL_FILES[name])}, "
            "pass a local .txt/.jsonl path or a list of strings as `dataset`, or use `dataset='self'`."
        ) from error
    return [text for text in rows["text"] if text.strip()]


def load_calibration_texts(dataset: str | list[str]) -> list[str]:
    """Resolve `OATSConfig.dataset` to a list of documents (see its docstring for the accepted forms)."""
    if isinstance(dataset, list):
        texts = dataset
    elif dataset in _LOCAL_FILES:
        texts = _load_named(dataset)
    elif Path(dataset).is_file():
        texts = read_text_file(dataset)
    elif Path(dataset).is_dir():
        texts = _read_saved_dataset(Path(dataset))
    else:
        raise CalibrationDataError(
            f"`dataset={dataset!r}` is neither a local file or folder nor one of 'c4', 'wikitext2', 'self'. "
            "Pass a path to a .txt/.jsonl file, a list of strings, or a known name."
        )
    label = repr(dataset) if isinstance(dataset, str) else "given as a list"
    texts = [text for text in texts if text and text.strip()]
    if not texts:
        raise CalibrationDataError(f"Calibration dataset {label} holds no text.")
    readable = [text for text in texts if _has_visible_characters(text)]
    if not readable:
        sample = next(c for c in texts[0] if not c.isspace())
        raise CalibrationDataError(
            f"Calibration dataset {label} holds no real text, only control characters (such as {sample!r}): "
            "is it a binary file? Give UTF-8 text."
        )
    if len(readable) < len(texts):
        logger.warning("%d calibration documents hold only control characters; left out.", len(texts) - len(readable))
    return readable


def _has_visible_characters(text: str) -> bool:
    """Any character that is not whitespace or a control/format/unassigned code point (NUL, escape, ...)."""
    return any(not c.isspace() and unicodedata.category(c)[0] != "C" for c in text)


def _read_saved_dataset(folder: Path) -> list[str]:
    """The `text` column of a dataset saved by `datasets`' `save_to_disk`, with errors that name the folder."""
    if not any(folder.iterdir()):
        raise CalibrationDataError(
            f"Calibration folder {folder} is empty. Give a folder written by `datasets.Dataset.save_to_disk`, or a "
            ".txt/.jsonl file."
        )
    import datasets

    try:
        loaded = datasets.load_from_disk(str(folder))
    except FileNotFoundError as error:
        raise CalibrationDataError(
            f"Calibration folder {folder} is not a dataset saved by `datasets.Dataset.save_to_disk` ({error}). Give "
            "such a folder, or a .txt/.jsonl file."
        ) from error
    if isinstance(loaded, datasets.DatasetDict):
        loaded = loaded["train"] if "train" in loaded else next(iter(loaded.values()))
    if "text" not in loaded.column_names:
        raise CalibrationDataError(
            f"The dataset saved in {folder} has no 'text' column (its columns: {loaded.column_names})."
        )
    return list(loaded["text"])


# How calibration windows are drawn (`OATSConfig.calibration_sampling`).
JOINED, DOCUMENTS, RANDOM_WINDOWS = "joined", "documents", "random_windows"
SAMPLINGS = (JOINED, DOCUMENTS, RANDOM_WINDOWS)
# `random_windows` draws documents until one is longer than a window; give up after this many draws.
_MAX_DRAWS_PER_SAMPLE = 1000


def leading_special_tokens(tokenizer) -> list[int]:
    """The ids the tokenizer puts before any text by default (the BOS of Llama-3, Gemma, OPT; none for SmolLM2).

    A model trained with them sees them at the start of every sequence; calibration windows and evaluation windows
    that start without them put the model out of distribution (Gemma's perplexity explodes).
    """
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    if not plain or plain[0] not in full:
        return []
    return list(full[: full.index(plain[0])])


def sample_calibration_windows(
    tokenizer, texts: list[str], num_samples: int, seqlen: int, seed: int = 0, sampling: str = JOINED
) -> torch.Tensor:
    """`num_samples` windows of `seqlen` tokens, shuffled by `seed`; `(num_samples, seqlen)` int64.

    `sampling` chooses how, each time with the tokenizer's leading special tokens (BOS) where it adds them:

    - `"joined"` (default): documents in a seeded random order, joined with EOS into one stream that is cut into
      non-overlapping windows, each starting with BOS when the tokenizer adds one. Every token is usable, so it
      works with short documents (most of C4's).
    - `"documents"`: as the OATS reference (SliceGPT's `prepare_dataloader`): from a random start, consecutive
      documents joined with blank lines until a window is full, the text then tokenized as a whole (BOS first);
      used documents are not drawn again.
    - `"random_windows"`: as the Wanda / SparseGPT reference (`get_c4`): a random document longer than a window
      (tokenized with its BOS), then a random window inside it.
    """
    if sampling not in SAMPLINGS:
        raise ValueError(f"`calibration_sampling` must be one of {SAMPLINGS}, got {sampling!r}.")
    if sampling == DOCUMENTS:
        return _document_windows(tokenizer, texts, num_samples, seqlen, seed)
    if sampling == RANDOM_WINDOWS:
        return _random_windows(tokenizer, texts, num_samples, seqlen, seed)
    prefix = leading_special_tokens(tokenizer)
    body = seqlen - len(prefix)
    if body < 1:
        raise CalibrationDataError(f"`seqlen={seqlen}` leaves no room for text after the BOS token(s).")
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    separator = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    needed = num_samples * body
    stream: list[int] = []
    for index in order:
        stream.extend(tokenizer(texts[index], add_special_tokens=False)["input_ids"])
        stream.extend(separator)
        if len(stream) >= needed:
            break
    if len(stream) < needed:
        if len(stream) < body:
            raise CalibrationDataError(
                f"The calibration text holds {len(stream)} tokens, fewer than one window of `seqlen={seqlen}`. "
                "Give more text or lower `seqlen`."
            )
        available = len(stream) // body
        logger.warning(
            "Calibration text holds %d tokens: %d windows of %d instead of the %d requested.",
            len(stream),
            available,
            seqlen,
            num_samples,
        )
        num_samples = available
    windows = torch.tensor(stream[: num_samples * body], dtype=torch.long).view(num_samples, body)
    if prefix:
        windows = torch.cat([torch.tensor(prefix, dtype=torch.long).expand(num_samples, -1), windows], dim=1)
    return windows


def _document_windows(tokenizer, texts: list[str], num_samples: int, seqlen: int, seed: int) -> torch.Tensor:
    """SliceGPT/OATS `prepare_dataloader` with `varied_seqlen=False`, keeping samples of exactly `seqlen` tokens."""
    generator = torch.Generator().manual_seed(seed)
    indices = [i for i, text in enumerate(texts) if text]
    samples: list[list[int]] = []
    while len(samples) < num_samples and indices:
        start = int(torch.randint(0, len(indices), (1,), generator=generator))
        index, tokens = start, []
        while len(tokens) < seqlen and index < len(indices):
            tokens += tokenizer.tokenize(("\n\n" if tokens else "") + texts[indices[index]])
            index += 1
        indices = indices[:start] + indices[index:]
        if len(tokens) >= seqlen:
            ids = tokenizer(tokenizer.convert_tokens_to_string(tokens[:seqlen]))["input_ids"][:seqlen]
            if len(ids) == seqlen:  # re-tokenizing can merge tokens; such a sample would need padding
                samples.append(ids)
    if not samples:
        raise CalibrationDataError(f"The calibration text cannot fill one window of `seqlen={seqlen}` tokens.")
    if len(samples) < num_samples:
        logger.warning("Calibration text gives %d document windows of %d, not %d.", len(samples), seqlen, num_samples)
    return torch.tensor(samples, dtype=torch.long)


def _random_windows(tokenizer, texts: list[str], num_samples: int, seqlen: int, seed: int) -> torch.Tensor:
    """Wanda/SparseGPT `get_c4`: a random document longer than `seqlen` tokens, then a random window of it."""
    draw = random.Random(seed)
    samples = []
    for _ in range(num_samples):
        for _ in range(_MAX_DRAWS_PER_SAMPLE):
            ids = tokenizer(texts[draw.randint(0, len(texts) - 1)])["input_ids"]
            if len(ids) > seqlen:
                break
        else:
            raise CalibrationDataError(
                f"No document longer than `seqlen={seqlen}` tokens was found in {_MAX_DRAWS_PER_SAMPLE} draws: "
                "`calibration_sampling='random_windows'` needs long documents. Lower `seqlen` or use 'joined'."
            )
        start = draw.randint(0, len(ids) - seqlen - 1)
        samples.append(ids[start : start + seqlen])
    return torch.tensor(samples, dtype=torch.long)


def sample_text_batches(
    tokenizer,
    texts: list[str],
    num_samples: int,
    max_length: int,
    *,
    batch_size: int = CALIBRATION_BATCH_SIZE,
    seed: int = 0,
) -> list[dict[str, torch.Tensor]]:
    """`num_samples` calibration sequences for an encoder (or encoder-decoder), in right-padded batches.

    Documents are visited in a seeded random order; each is tokenized with the model's special tokens and cut
    into pieces of at most `max_length` tokens (a fast tokenizer's overflowing tokens), so short documents stay
    whole and long ones are used in full. Sequences are grouped by length to keep padding small; padding
    positions have `attention_mask == 0`, and the calibration statistics leave them out.

    Returns:
        A list of batches `{"input_ids", "attention_mask"[, "token_type_ids"]}`, each `(batch, seq)` int64.
    """
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    samples: list[dict[str, list[int]]] = []
    for index in order:
        encoded = tokenizer(texts[index], truncation=True, max_length=max_length, return_overflowing_tokens=True)
        pieces = encoded["input_ids"]
        if pieces and isinstance(pieces[0], int):  # tokenizers without overflow support return one sequence
            encoded = {key: [value] for key, value in encoded.items()}
            pieces = encoded["input_ids"]
        for piece in range(len(pieces)):
            samples.append({key: list(encoded[key][piece]) for key in _PAD_VALUES if key in encoded})
            if len(samples) == num_samples:
                break
        if len(samples) == num_samples:
            break
    if not samples:
        raise CalibrationDataError("The calibration text produced no tokens.")
    if len(samples) < num_samples:
        logger.warning("Calibration text holds %d sequences instead of the %d requested.", len(samples), num_samples)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return pad_batches(samples, pad_id if pad_id is not None else 0, batch_size)


def pad_batches(
    samples: list[dict[str, list[int]]], pad_token_id: int, batch_size: int = CALIBRATION_BATCH_SIZE
) -> list[dict[str, torch.Tensor]]:
    """Group tokenized sequences by length into batches of `batch_size`, padded on the right.

    Right padding keeps every real token at the same position as without padding, so (with the attention mask)
    a model computes the same values there; left padding would shift positions for absolute-position models.
    """
    if not samples:
        return []
    ordered = sorted(samples, key=lambda sample: len(sample["input_ids"]))
    batches = []
    for start in range(0, len(ordered), batch_size):
        chunk = ordered[start : start + batch_size]
        width = max(len(sample["input_ids"]) for sample in chunk)
        batch = {}
        for key, fill in _PAD_VALUES.items():
            if key not in chunk[0] and key != "attention_mask":
                continue
            fill = pad_token_id if fill is None else fill
            rows = []
            for sample in chunk:
                values = sample.get(key, [1] * len(sample["input_ids"]))
                rows.append(values + [fill] * (width - len(values)))
            batch[key] = torch.tensor(rows, dtype=torch.long)
        batches.append(batch)
    return batches


@torch.no_grad()
def generate_self_texts(model, tokenizer, num_tokens: int, seed: int = 0, chunk: int = 256) -> list[str]:
    """Text the model writes itself, sampled from BOS, so compression needs no data at all (LLM-QAT's idea)."""
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    device = next(model.parameters()).device
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    texts, produced = [], 0
    try:
        while produced < num_tokens:
            out = model.generate(
                torch.tensor([[start]], device=device),
                do_sample=True,
                top_p=0.95,
                max_new_tokens=chunk,
                pad_token_id=tokenizer.eos_token_id,
            )
            produced += out.shape[1]
            texts.append(tokenizer.decode(out[0], skip_special_tokens=True))
    finally:
        torch.random.set_rng_state(generator_state)
    return texts
