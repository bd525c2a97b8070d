"""A byte-level BPE tokenizer trained here, in a second, on a little text: the tiny models' tokenizer, so that their
tests need no model wheel. Built like SmolLM2's (no BOS added, `<|endoftext|>` as BOS, EOS and UNK, a ChatML chat
template)."""

from __future__ import annotations

SPECIAL = "<|endoftext|>"
CHAT_TOKENS = ["<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_bpe_tokenizer(texts: list[str], vocab_size: int = 1024):
    """A `PreTrainedTokenizerFast` whose merges are learned from `texts` (deterministic for the same texts)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[SPECIAL, *CHAT_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token=SPECIAL, eos_token=SPECIAL, unk_token=SPECIAL, model_max_length=8192
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer
