"""Text tokenizers on the Hugging Face `tokenizers` library, fitted on the training split only.

Follows the scikit-learn contract: `fit` returns self, the fitted state is `tokenizer_` (and `kind_`, the
kind actually trained: `auto` looks at the texts first), and the object saves to and loads from one file
(`tokenizer.json`), used unchanged at prediction time.

>>> tok = TextTokenizer("char", vocab_size=5000).fit(["质量很好", "太差了"])
>>> tok.encode(["质量很好"])[0]  # doctest: +SKIP
"""
from __future__ import annotations

import itertools
import json
import os
import unicodedata

import numpy as np
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "<s>", "</s>"]
KINDS = ("auto", "char", "bpe", "wordpiece")
AUTO_SAMPLE = 2000  # texts `auto` reads to judge the script: enough for a share, cheap on any corpus
MODEL_KINDS = {"WordLevel": "char", "BPE": "bpe", "WordPiece": "wordpiece"}  # tokenizers' model -> danlu kind
CJK_SHARE = 0.3  # at least this share of the letters Chinese / Japanese: characters, else subwords
SPECIAL_FILE = "special_tokens.json"  # written next to tokenizer.json by imported tokenizers only


class TextTokenizer:
    def __init__(self, kind="char", vocab_size=8000, min_frequency=1, max_length=128, lowercase=True):
        self.kind, self.vocab_size, self.min_frequency = kind, vocab_size, min_frequency
        self.max_length, self.lowercase = max_length, lowercase

    def fit(self, texts):
        self.kind_, self.choice_ = self.kind, ""
        if self.kind == "auto":
            if isinstance(texts, (list, tuple)):
                self.kind_, self.choice_ = choose_kind(texts)
            else:  # a stream (a pretraining corpus): judged on its first pieces, then trained on all of it
                texts = iter(texts)
                first = list(itertools.islice(texts, AUTO_SAMPLE))
                self.kind_, self.choice_ = choose_kind(first)
                texts = itertools.chain(first, texts)
        norms = [normalizers.NFKC()] + ([normalizers.Lowercase()] if self.lowercase else [])
        if self.kind_ == "char":
            tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
            tok.normalizer = normalizers.Sequence(norms)
            tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
            tok.decoder = decoders.Fuse()
            trainer = trainers.WordLevelTrainer(
                vocab_size=self.vocab_size, min_frequency=self.min_frequency, special_tokens=SPECIAL_TOKENS, show_progress=False
            )
        elif self.kind_ == "bpe":
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
        texts = list(texts)
        table = self._char_table()
        if table is None:
            return [np.asarray(e.ids, dtype=np.int32) for e in self.tokenizer_.encode_batch(texts)]
        trunc = self.tokenizer_.truncation  # read at each call: fine-tuning changes it on a loaded tokenizer
        limit = trunc["max_length"] if trunc else 0
        out = [table.encode(t, limit) for t in texts]
        rest = [i for i, ids in enumerate(out) if ids is None]
        if rest:
            for i, e in zip(rest, self.tokenizer_.encode_batch([texts[i] for i in rest])):
                out[i] = np.asarray(e.ids, dtype=np.int32)
        return out

    def _char_table(self):
        """A _CharTable when `tokenizer_` is danlu's character pipeline, else None (checked once)."""
        if getattr(self, "_table_for", None) is not self.tokenizer_:
            self._table, self._table_for = _CharTable.of(self.tokenizer_), self.tokenizer_
        return self._table

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
        self.kind_, self.choice_ = "imported", ""
        return self

    @classmethod
    def load(cls, path):
        tok = Tokenizer.from_file(str(path))
        trunc = tok.truncation
        self = cls.__new__(cls)
        self.kind, self.vocab_size, self.min_frequency, self.lowercase = "loaded", tok.get_vocab_size(), 1, True
        self.max_length = trunc["max_length"] if trunc else 0
        self.tokenizer_ = tok
        self.kind_ = MODEL_KINDS.get(type(tok.model).__name__, "loaded")  # what it was trained as
        self.choice_ = ""
        special_file = os.path.join(os.path.dirname(os.fspath(path)) or ".", SPECIAL_FILE)
        self.special_ = {}
        if os.path.exists(special_file):
            with open(special_file, encoding="utf-8") as f:
                self.special_ = json.load(f)
        return self


def choose_kind(texts, sample=AUTO_SAMPLE):
    """("char" or "bpe", the reason in words) for texts: characters when at least CJK_SHARE of their letters
    are Chinese or Japanese (no spaces between words, one character carries meaning), byte-level BPE subwords
    for alphabetic scripts, where a character alone carries little and words share pieces.

    >>> choose_kind(["质量很好", "太差了"])[0], choose_kind(["great value", "broke after a day"])[0]
    ('char', 'bpe')
    """
    step = max(1, len(texts) // sample)
    letters = cjk = 0
    for text in texts[::step][:sample]:
        for c in str(text):
            if c.isalpha():
                letters += 1
                cjk += _is_cjk(ord(c))
    if not letters:
        return "char", "auto: no letters in the training texts, so one token per character"
    share = cjk / letters
    if share >= CJK_SHARE:
        return "char", f"auto: {share:.0%} of the letters are Chinese / Japanese characters, so one token per character"
    return "bpe", f"auto: {1 - share:.0%} of the letters are alphabetic, so byte-level BPE subwords"


def _is_cjk(cp):
    """Han ideographs (URO, extensions A-B, compatibility), hiragana, katakana and half-width katakana."""
    return (0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0x20000 <= cp <= 0x2A6DF or 0xF900 <= cp <= 0xFAFF
            or 0x3040 <= cp <= 0x30FF or 0x31F0 <= cp <= 0x31FF or 0xFF66 <= cp <= 0xFF9F)


class _CharTable:
    """The character tokenizer's ids, a dictionary lookup per character: 5x faster than the `tokenizers`
    pipeline (NFKC, lowercase, a regex split per character, WordLevel), which costs ~50 us per short text,
    more than the LSTM classifier itself when a server scores one request.

    Each character's ids come from the real tokenizer, the first time the character is seen, so the
    vocabulary, [UNK], NFKC and lowercase are the tokenizer's own (Unicode tables included). A text falls
    back to the tokenizer when characters in it can interact: combining marks and the other characters
    that compose with the one before them (NFKC composition), newlines (the split keeps a run of them as
    one piece) and a special token written out, such as "[SEP]".
    """

    def __init__(self, tokenizer, added):
        self.tokenizer, self.added = tokenizer, added
        self.ids = {}  # character -> tuple of ids, or None when it must go through the tokenizer

    @classmethod
    def of(cls, tokenizer):
        d = json.loads(tokenizer.to_str())
        norms = d.get("normalizer") or {}
        norms = norms.get("normalizers", []) if norms.get("type") == "Sequence" else [norms]
        pre = d.get("pre_tokenizer") or {}
        if not (
            d["model"]["type"] == "WordLevel"
            and [n.get("type") for n in norms] in (["NFKC"], ["NFKC", "Lowercase"])
            and pre == {"type": "Split", "pattern": {"Regex": "."}, "behavior": "Isolated", "invert": False}
            and d.get("post_processor") is None
            and d.get("padding") is None
            and (d.get("truncation") is None or d["truncation"]["direction"] == "Right")
        ):
            return None
        return cls(tokenizer, [t["content"] for t in d.get("added_tokens", [])])

    def encode(self, text, max_length=0):
        """int32 ids of `text` (the first max_length, if not 0), or None when it has to go through the tokenizer."""
        out = []
        for c in text:
            ids = self.ids.get(c, False)
            if ids is False:
                ids = self.ids[c] = self._lookup(c)
            if ids is None:
                return None
            out.extend(ids)
        if any(a in text for a in self.added):
            return None
        return np.array(out[:max_length] if max_length else out, dtype=np.int32)

    def _lookup(self, c):
        if c == "\n" or _composes(unicodedata.normalize("NFKD", c)[0]):
            return None
        try:
            return tuple(self.tokenizer.encode(c, add_special_tokens=False).ids)
        except Exception:  # noqa: BLE001  e.g. a lone surrogate: the tokenizer path raises its own error
            return None


_SECONDS = None  # characters that are the second of a canonical composition pair


def _composes(c):
    """True when `c` may combine with the character before it under NFC/NFKC composition."""
    global _SECONDS
    if _SECONDS is None:
        seconds = set()
        for cp in range(0x110000):
            d = unicodedata.decomposition(chr(cp))
            if d and not d.startswith("<") and len(d.split()) == 2:
                seconds.add(chr(int(d.split()[1], 16)))
        _SECONDS = seconds
    cp = ord(c)
    return (unicodedata.combining(c) != 0 or c in _SECONDS or 0x1160 <= cp <= 0x11FF  # Hangul vowel / final jamo
            or 0xD7B0 <= cp <= 0xD7FF or unicodedata.category(c) == "Cn")
