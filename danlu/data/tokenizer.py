"""Text tokenizers on the Hugging Face `tokenizers` library, fitted on the training split only.

Follows the scikit-learn contract: `fit` returns self, the fitted state is `tokenizer_`, and the
object saves to and loads from one file (`tokenizer.json`), used unchanged at prediction time.

>>> tok = TextTokenizer("char", vocab_size=5000).fit(["质量很好", "太差了"])
>>> tok.encode(["质量很好"])[0]  # doctest: +SKIP
"""
from __future__ import annotations

import json
import os

import numpy as np
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from danlu.registry import ConfigError

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "<s>", "</s>"]
KINDS = ("char", "bpe", "wordpiece")
SPECIAL_FILE = "special_tokens.json"  # written next to tokenizer.json by imported tokenizers only


class TextTokenizer:
    def __init__(self, kind="char", vocab_size=8000, min_frequency=1, max_length=128, lowercase=True):
        if kind not in KINDS:
            raise ConfigError(f"data.tokenizer.kind: unknown value {kind!r}; expected one of: {', '.join(KINDS)}")
        self.kind, self.vocab_size, self.min_frequency = kind, vocab_size, min_frequency
        self.max_length, self.lowercase = max_length, lowercase

    def fit(self, texts):
        norms = [normalizers.NFKC()] + ([normalizers.Lowercase()] if self.lowercase else [])
        if self.kind == "char":
            tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
            tok.normalizer = normalizers.Sequence(norms)
            tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
            tok.decoder = decoders.Fuse()
            trainer = trainers.WordLevelTrainer(
                vocab_size=self.vocab_size, min_frequency=self.min_frequency, special_tokens=SPECIAL_TOKENS, show_progress=False
            )
        elif self.kind == "bpe":
            tok = Tokenizer(models.BPE(unk_token=None))
            tok.normalizer = normalizers.Sequence(norms)
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
            tok.decoder = decoders.ByteLevel()
            trainer = trainers.BpeTrainer(
                vocab_size=self.vocab_size,
                min_frequency=self.min_frequency,
                special_tokens=SPECIAL_TOKENS,
                show_progress=False,
                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            )
        else:  # wordpiece: BERT-style, every CJK character its own word
            tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
            tok.normalizer = normalizers.BertNormalizer(lowercase=self.lowercase, handle_chinese_chars=True)
            tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
            tok.decoder = decoders.WordPiece()
            trainer = trainers.WordPieceTrainer(
                vocab_size=self.vocab_size, min_frequency=self.min_frequency, special_tokens=SPECIAL_TOKENS, show_progress=False
            )
        tok.train_from_iterator(texts, trainer=trainer)
        if self.max_length:
            tok.enable_truncation(self.max_length)
        self.tokenizer_ = tok
        return self

    # -- use ------------------------------------------------------------------------------------
    def encode(self, texts):
        """List of texts -> list of int32 arrays of token ids (cut to max_length)."""
        return [np.asarray(e.ids, dtype=np.int32) for e in self.tokenizer_.encode_batch(list(texts))]

    def decode(self, ids, skip_special_tokens=True):
        return self.tokenizer_.decode(list(map(int, ids)), skip_special_tokens=skip_special_tokens)

    def token_id(self, token):
        """Id of `token`; danlu's special names ([PAD], </s>, <s>, [UNK]) map to an imported model's own."""
        return self.tokenizer_.token_to_id(getattr(self, "special_", {}).get(token, token))

    @property
    def vocab_size_(self):
        return self.tokenizer_.get_vocab_size()

    @property
    def pad_id(self):
        return self.token_id("[PAD]")

    # -- files ----------------------------------------------------------------------------------
    def save(self, path):
        self.tokenizer_.save(str(path))
        special = getattr(self, "special_", {})
        if special:  # an imported tokenizer: its names for danlu's special tokens, next to tokenizer.json
            with open(os.path.join(os.path.dirname(os.fspath(path)) or ".", SPECIAL_FILE), "w", encoding="utf-8") as f:
                json.dump(special, f, ensure_ascii=False, indent=2)

    @classmethod
    def from_tokenizer(cls, tok, special=None, max_length=0):
        """Wrap an already-built `tokenizers.Tokenizer` (an imported checkpoint's). `special` maps danlu's
        special-token names to the checkpoint's, e.g. {"</s>": "<|im_end|>", "[PAD]": "<|im_end|>"}."""
        tok.no_padding()
        if max_length:
            tok.enable_truncation(max_length)
        else:
            tok.no_truncation()
        self = cls.__new__(cls)
        self.kind, self.vocab_size, self.min_frequency, self.lowercase = "imported", tok.get_vocab_size(), 1, False
        self.max_length, self.tokenizer_, self.special_ = max_length, tok, dict(special or {})
        return self

    @classmethod
    def load(cls, path):
        tok = Tokenizer.from_file(str(path))
        trunc = tok.truncation
        self = cls.__new__(cls)
        self.kind, self.vocab_size, self.min_frequency, self.lowercase = "loaded", tok.get_vocab_size(), 1, True
        self.max_length = trunc["max_length"] if trunc else 0
        self.tokenizer_ = tok
        special_file = os.path.join(os.path.dirname(os.fspath(path)) or ".", SPECIAL_FILE)
        self.special_ = {}
        if os.path.exists(special_file):
            with open(special_file, encoding="utf-8") as f:
                self.special_ = json.load(f)
        return self
