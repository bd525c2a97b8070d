"""A whitespace tokenizer with the interface calibration and evaluation use, that adds a BOS (as Llama-3 and Gemma
tokenizers do) or not. SmolLM2's real tokenizer adds none, so the BOS paths need this stand-in."""

from __future__ import annotations

import torch


class WordTokenizer:
    bos_token_id = 1
    eos_token_id = 2

    def __init__(self, add_bos: bool = True) -> None:
        self.add_bos = add_bos
        self.vocab: dict[str, int] = {}

    def __len__(self) -> int:
        return 3 + len(self.vocab)

    def _id(self, word: str) -> int:
        return self.vocab.setdefault(word, 3 + len(self.vocab))

    def tokenize(self, text: str) -> list[str]:
        return text.replace("\n\n", " \n\n ").split()

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return " ".join(tokens)

    def __call__(self, text: str, add_special_tokens: bool = True, return_tensors=None, verbose=True):
        ids = [self._id(word) for word in self.tokenize(text)]
        if add_special_tokens and self.add_bos:
            ids = [self.bos_token_id, *ids]
        if return_tensors == "pt":
            return _Encoding(torch.tensor([ids]))
        return {"input_ids": ids}


class _Encoding(dict):
    def __init__(self, input_ids: torch.Tensor) -> None:
        super().__init__(input_ids=input_ids)
        self.input_ids = input_ids
