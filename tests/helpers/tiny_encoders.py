"""Tiny random encoder, encoder-decoder and vision models, a tiny WordPiece tokenizer and a tiny image processor,
all built locally (no Hub) for fast tests of issue 9's model families."""

from __future__ import annotations

import string
from collections import Counter

import torch

TEXT = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def build_wordpiece_tokenizer(texts: list[str], words: int = 400):
    """A BERT WordPiece tokenizer whose vocabulary is the specials, single characters and `texts`' common words."""
    from transformers import BertTokenizer

    chars = list(string.ascii_lowercase + string.digits + string.punctuation)
    counts = Counter(word for text in texts for word in text.lower().split() if word.isalpha())
    vocab = SPECIAL_TOKENS + chars + ["##" + c for c in chars] + [w for w, _ in counts.most_common(words)]
    return BertTokenizer(vocab={token: i for i, token in enumerate(dict.fromkeys(vocab))}, model_max_length=128)


def text_configs(vocab_size: int) -> dict:
    from transformers import BartConfig, BertConfig, DebertaV2Config, RobertaConfig, T5Config

    return {
        "bert": BertConfig(vocab_size=vocab_size, max_position_embeddings=128, **TEXT),
        "roberta": RobertaConfig(vocab_size=vocab_size, max_position_embeddings=130, pad_token_id=0, **TEXT),
        "deberta-v2": DebertaV2Config(
            vocab_size=vocab_size,
            max_position_embeddings=128,
            relative_attention=True,
            position_buckets=16,
            max_relative_positions=64,
            pos_att_type=["p2c", "c2p"],
            norm_rel_ebd="layer_norm",
            share_att_key=True,
            position_biased_input=False,
            type_vocab_size=0,
            **TEXT,
        ),
        "bart": BartConfig(
            vocab_size=vocab_size,
            d_model=64,
            encoder_layers=2,
            decoder_layers=2,
            encoder_attention_heads=4,
            decoder_attention_heads=4,
            encoder_ffn_dim=128,
            decoder_ffn_dim=128,
            max_position_embeddings=128,
            pad_token_id=0,
            bos_token_id=2,
            eos_token_id=3,
            decoder_start_token_id=2,
            forced_eos_token_id=None,
        ),
        "t5": T5Config(
            vocab_size=vocab_size,
            d_model=64,
            d_kv=16,
            d_ff=128,
            num_layers=2,
            num_decoder_layers=2,
            num_heads=4,
            pad_token_id=0,
            eos_token_id=3,
            decoder_start_token_id=0,
        ),
    }


def vision_configs() -> dict:
    from transformers import Dinov2Config, ViTConfig

    return {
        "vit": ViTConfig(image_size=32, patch_size=8, num_labels=3, **TEXT),
        "dinov2": Dinov2Config(
            image_size=32, patch_size=8, mlp_ratio=2, **{k: v for k, v in TEXT.items() if k != "intermediate_size"}
        ),
    }


def build_image_processor(size: int = 32):
    from transformers import ViTImageProcessorPil

    return ViTImageProcessorPil(size={"height": size, "width": size})


def build(auto_class, config, seed: int = 0):
    """`auto_class.from_config(config)` with seeded random weights, in eval mode."""
    import copy

    torch.manual_seed(seed)
    return auto_class.from_config(copy.deepcopy(config)).eval()
