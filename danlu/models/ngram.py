"""A fastText-style classifier (Joulin et al. 2017, "Bag of Tricks for Efficient Text Classification").

Every n-gram of the run's tokens (with WordPiece: characters for Chinese, words and word pieces for
alphabetic text) has an embedding; the embeddings of a text's n-grams are averaged and a linear layer reads the average.
Unigrams keep a row of their own per token id; longer n-grams are hashed into `buckets` shared rows (the
hashing trick of fastText, Joulin et al. §2.2, which keeps the table's size fixed whatever the data).

The n-gram ids are computed inside `forward` from the token ids by integer arithmetic, so training,
`predict`, `serve` and the exported ONNX graph see the very same features from the same tokenizer.
Padding never reaches the average: an n-gram counts only when its last token is real (texts are padded on
the right), so appending padding leaves the logits unchanged.

With `weighting: idf` each row also has a weight, its n-gram's inverse document frequency on the training split
(measured by `adapt` before training, a buffer saved with the weights), and the text is the weighted sum of its
n-grams' embeddings divided by the L2 norm of their weights: the pooling of a TF-IDF row (Salton & Buckley 1988)
that a linear model then reads, with raw term frequencies (an n-gram seen twice counts twice), or with `tf:
sublinear` 1 + ln(count) as TfidfVectorizer(sublinear_tf=True) weighs them.

With `weighting: nb` (classification) the weight is the idf times the square root of the n-gram's naive-Bayes
log-count ratio (Wang & Manning 2012, "Baselines and Bigrams", whose NBSVM scales each feature by it): for each
class c, r_c = ln((1 + df_c) / |1 + df_c|_1) - ln((1 + df_not_c) / |1 + df_not_c|_1), the sums running over the
n-grams seen in training, and the n-gram keeps the largest |r_c| of its classes. An n-gram that says as much about
one class as about the others weighs little; one never seen in training weighs 0 (TfidfVectorizer drops it too).
The weights are measured once on the training split; nothing is learned from the validation or test labels.

With `char_ngrams` each vocabulary token also brings the character n-grams inside it (fastText's subwords,
Bojanowski et al. 2017, "Enriching Word Vectors with Subword Information"): `adapt` spells every token of the
run's tokenizer, marks a word's start with "<" (a WordPiece continuation "##ing" gets none, a byte-level BPE
"Ġword" gets one), hashes its n-grams into the same shared rows and keeps them in a (vocab, char_slots) table of
row ids (-1 for unused slots) saved with the weights, so predict, serve and ONNX read them with one gather. Each
occurrence of a token adds its n-grams to the text, so "recommended" and "recommends" share "<rec", "comm",
"mend". With idf weighting the character block is L2-normalised on its own and added to the token block, as the
baseline's word and character TF-IDF blocks are each normalised and then joined. One-character tokens (Chinese
characters) have no n-grams beyond themselves and keep an empty row.
"""
import zlib
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from torch.nn import functional as F

from danlu.registry import ConfigError
from danlu.schema import Annotated, Fraction, Positive, Range

# fastText's multiplier for word n-gram hashes (dictionary.cc, `h * 116049371 + id`); the running hash is kept
# below the Mersenne prime 2**31 - 1, so every product fits in int64 (also in ONNX) and nothing overflows.
HASH_MULTIPLIER = 116049371
HASH_MODULUS = 2**31 - 1


@dataclass(frozen=True)
class NgramConfig:
    kind: str = "ngram"
    embed_dim: Positive = 16
    """Width of every n-gram embedding and of the averaged text vector (fastText used 10 for sentiment)."""
    ngrams: tuple[Annotated[int, Range(ge=1, le=8)], ...] = (1, 2)
    """N-gram orders over the run's tokens: 1 is the tokens themselves, 2 adjacent pairs, and so on."""
    buckets: Annotated[int, Range(ge=1, le=2**24)] = 2**18
    """Hashed rows shared by every n-gram longer than one token (collisions share a row)."""
    dropout: Fraction = 0.0
    """Dropout on the averaged vector."""
    char_ngrams: tuple[Annotated[int, Range(ge=1, le=12)], ...] = ()
    """Orders of the character n-grams inside each token (fastText's subwords used 3 to 6); () for none."""
    char_slots: Annotated[int, Range(ge=1, le=256)] = 48
    """Character n-grams kept per token (the table's width; a longer token keeps its shorter n-grams first)."""
    tf: Literal["raw", "sublinear"] = "raw"
    """raw: an n-gram seen c times in a text counts c times. sublinear: 1 + ln(c) times, as TfidfVectorizer(
    sublinear_tf=True); a character n-gram counts the repeats of the token it comes from."""
    weighting: Literal["mean", "idf", "nb"] = "mean"
    """mean: the plain average of fastText. idf: each n-gram weighted by its inverse document frequency on the
    training split and the weighted sum divided by the weights' L2 norm, as TF-IDF rows are normalised. nb
    (classification): the idf times the square root of the n-gram's naive-Bayes log-count ratio on the training
    split, pooled as idf is (NBSVM's feature scaling, Wang & Manning 2012)."""

    def __post_init__(self):
        if not self.ngrams:  # each order's range is checked at load
            raise ConfigError("model.ngrams: expected at least one n-gram order, e.g. [1, 2, 3]")
        if len(set(self.ngrams)) != len(self.ngrams):
            raise ConfigError(f"model.ngrams: each order once, got {list(self.ngrams)}")
        if len(set(self.char_ngrams)) != len(self.char_ngrams):
            raise ConfigError(f"model.char_ngrams: each order once, got {list(self.char_ngrams)}")


class NgramClassifier(nn.Module):
    def __init__(self, config: NgramConfig, spec):
        super().__init__()
        self.config = config
        self.orders = tuple(sorted(int(n) for n in config.ngrams))
        self.vocab_size = spec.vocab_size
        self.char_orders = tuple(sorted(int(n) for n in config.char_ngrams))
        hashed = config.buckets if max(self.orders) > 1 or self.char_orders else 0
        self.embed = nn.Embedding(spec.vocab_size + hashed, config.embed_dim)
        self.weighted = config.weighting != "mean"
        if self.weighted:  # one weight per row, measured on the training split by `adapt`; saved with the model
            if config.weighting == "nb" and spec.num_classes < 2:
                raise ConfigError("model.weighting: nb weighs n-grams by how they split the classes, so it needs a "
                                  "classification task with two classes or more; use idf")
            self.register_buffer("idf", torch.ones(spec.vocab_size + hashed))
        if self.char_orders:  # each token's character n-gram rows, filled by `adapt` from the tokenizer; saved
            self.register_buffer("char_rows", torch.full((spec.vocab_size, config.char_slots), -1, dtype=torch.int32))
        # fastText's initialisation: uniform in +-1/dim, so that an average of many rows starts near zero
        nn.init.uniform_(self.embed.weight, -1.0 / config.embed_dim, 1.0 / config.embed_dim)
        self.dropout = nn.Dropout(config.dropout)
        self.head = nn.Linear(config.embed_dim, max(spec.num_classes, 1))

    def ngram_ids(self, input_ids, attention_mask):
        """The rows of every n-gram of every order, and which of them are real. (B, T) -> (B, T * orders) twice.

        The n-gram that ends at position t + n - 1 sits at position t of its order's block; the sequence is
        padded by the longest order first, so every order has T positions and no shape depends on T.
        """
        reach = max(self.orders) - 1
        ids = F.pad(input_ids.long(), (0, reach))  # (B, T + reach)
        mask = F.pad(attention_mask.bool(), (0, reach))  # (B, T + reach)
        length = input_ids.shape[1]
        rows, real = [], []
        for n in self.orders:
            if n == 1:
                rows.append(ids[:, :length])  # (B, T) the token ids themselves
            else:
                h = torch.full_like(ids[:, :length], n)  # (B, T); the order seeds the hash
                for k in range(n):
                    h = (h * HASH_MULTIPLIER + ids[:, k:k + length]) % HASH_MODULUS
                rows.append(self.vocab_size + h % self.config.buckets)  # (B, T) into the hashed rows
            real.append(mask[:, n - 1:n - 1 + length])  # (B, T): the n-gram's last token is real
        return torch.cat(rows, 1), torch.cat(real, 1)  # (B, T * orders) each

    def char_ids(self, input_ids, attention_mask):
        """The character n-gram rows of every token, and which are real. (B, T) -> (B, T * char_slots) twice."""
        rows = self.char_rows[input_ids.long()].long()  # (B, T, K) gathered from the table; -1 in unused slots
        real = (rows >= 0) & attention_mask.bool().unsqueeze(-1)  # (B, T, K)
        return rows.clamp(min=0).flatten(1), real.flatten(1)  # (B, T * K) each; unused slots weigh 0

    @torch.no_grad()
    def adapt(self, dataset, tokenizer=None, batch_size=256):
        """Fill the character n-gram table from `tokenizer` (a fitted danlu TextTokenizer) when `char_ngrams` is set,
        and measure the weight of every row on `dataset` (the training split: a TextDataset) when `weighting` is idf
        or nb.

        idf = ln((1 + N) / (1 + df)) + 1, with df the number of texts an n-gram occurs in (scikit-learn's smoothed
        idf, TfidfVectorizer(smooth_idf=True)); a row never seen in training gets the largest value, as there.
        nb: idf * sqrt(max_c |r_c|) with the log-count ratios r_c of the module's docstring; 0 for unseen rows.
        """
        if self.char_orders:
            if tokenizer is None:
                raise ValueError("model.char_ngrams needs the run's tokenizer: adapt(dataset, tokenizer)")
            vocab = tokenizer.tokenizer_.get_vocab()  # token -> id
            tokens = [""] * self.vocab_size
            for token, i in vocab.items():
                if i < self.vocab_size:
                    tokens[i] = token
            special = {t.content for t in tokenizer.tokenizer_.get_added_tokens_decoder().values()}  # [PAD], [UNK], ...
            self.char_rows.copy_(char_table(tokens, self.char_orders, self.char_rows.shape[1], self.vocab_size,
                                            self.config.buckets, skip=special))
        if not self.weighted:
            return
        from danlu.data.batching import iterate

        nb = self.config.weighting == "nb"
        classes = self.head.out_features if nb else 1
        df = torch.zeros(classes, self.embed.num_embeddings, dtype=torch.float64)  # (C, V) texts of each class
        for batch in iterate(dataset, batch_size, dataset.pad_id, shuffle=False, bucket=False):
            rows, real = self.ngram_ids(batch["input_ids"], batch["attention_mask"])  # (b, L)
            if self.char_orders:
                more, more_real = self.char_ids(batch["input_ids"], batch["attention_mask"])  # (b, T * K)
                rows, real = torch.cat([rows, more], 1), torch.cat([real, more_real], 1)
            labels = batch["labels"].long() if nb else torch.zeros(len(rows), dtype=torch.long)
            for r, keep, c in zip(rows, real, labels):
                df[c, torch.unique(r[keep])] += 1  # each text counts once per row
        n = len(dataset.ids)
        idf = torch.log((1.0 + n) / (1.0 + df.sum(0))) + 1.0
        self.idf.copy_(idf * log_count_ratio(df).sqrt() if nb else idf)

    def forward(self, input_ids, attention_mask=None):
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
        rows, real = self.ngram_ids(input_ids, attention_mask)  # (B, L)
        sublinear = self.config.tf == "sublinear"
        total, norm = self.pool(rows, real, repeats(rows, real, len(self.orders)) if sublinear else None)  # (B, E), (B, 1)
        if self.char_orders:
            count = repeats(input_ids, attention_mask.bool(), 1) if sublinear else None  # (B, T) a token's repeats
            chars, char_norm = self.char_block(input_ids, attention_mask, count)
            if self.weighted:  # each block normalised on its own, then joined
                total, norm = total / norm.clamp(min=1.0) + chars / char_norm.clamp(min=1.0), torch.ones_like(norm)
            else:  # one mean over tokens, token n-grams and character n-grams, as fastText averages them
                total, norm = total + chars, norm + char_norm
        pooled = total / norm.clamp(min=1.0)  # (B, E)
        return self.head(self.dropout(pooled))  # (B, C)

    def char_block(self, input_ids, attention_mask, count=None):
        """The weighted sum of the character n-grams' embeddings of every token occurrence, and its divisor, as
        `pool` gives for the rows of `char_ids` (a token's n-grams count as often as the token occurs).
        (B, T) -> (B, E), (B, 1).

        Each token's n-grams are summed once per distinct token of the batch when training (a batch repeats its
        tokens; Chinese characters have none) and once per position otherwise (no data-dependent shapes, for ONNX)."""
        if self.training:
            tokens, where = torch.unique(input_ids, return_inverse=True)  # (U,), (B, T)
        else:
            tokens, where = input_ids, None
        rows = self.char_rows[tokens.long()].long()  # (U, K) or (B, T, K); -1 in unused slots
        weight = (rows >= 0).to(self.embed.weight.dtype)
        rows = rows.clamp(min=0)
        if self.weighted:
            weight = weight * self.idf[rows]
        # the table read without calling `embed` itself: a hook on it (explanations) sees the n-gram rows only
        vectors = (F.embedding(rows, self.embed.weight) * weight.unsqueeze(-1)).sum(-2)  # (U, E) or (B, T, E)
        size = weight.square().sum(-1) if self.weighted else weight.sum(-1)  # (U,) or (B, T)
        if where is not None:
            vectors, size = vectors[where], size[where]  # (B, T, E), (B, T)
        f = attention_mask.to(weight.dtype)  # (B, T)
        c = torch.ones_like(f) if count is None else count.to(f.dtype).clamp(min=1.0)
        f = f * sublinear(c)  # 1 when count is None
        total = (vectors * f.unsqueeze(-1)).sum(1)  # (B, E)
        if self.weighted:  # the L2 norm of the block's TF-IDF row
            return total, (size * f.square() * c).sum(1, keepdim=True).sqrt()
        return total, (size * f).sum(1, keepdim=True)  # (B, 1) the number of n-grams: a mean

    def pool(self, rows, real, count=None):
        """The weighted sum of the rows' embeddings and its divisor. (B, L) twice -> (B, E), (B, 1).

        `count` (B, L): how often each position's n-gram occurs in its text, for sublinear tf: each occurrence
        then weighs (1 + ln c) / c, so that the c of them add up to 1 + ln c."""
        weight = real.to(self.embed.weight.dtype).unsqueeze(-1)  # (B, L, 1)
        if count is not None:
            c = count.to(weight.dtype).clamp(min=1.0).unsqueeze(-1)  # (B, L, 1)
            weight = weight * sublinear(c)
        if self.weighted:
            weight = weight * self.idf[rows].unsqueeze(-1)  # (B, L, 1) idf of each real n-gram, 0 on padding
            if count is not None:  # the L2 norm of the text's TF-IDF row: each n-gram's total is c times a position's
                norm = (weight.square() * c).sum(1).sqrt()  # (B, 1)
            else:
                norm = weight.square().sum(1).sqrt()  # (B, 1) L2 norm of the text's weights, as TF-IDF rows are normalised
        else:
            norm = weight.sum(1)  # (B, 1) the number of real n-grams: a mean
        return (self.embed(rows) * weight).sum(1), norm  # (B, E), (B, 1); padding zeroed


def log_count_ratio(df):
    """max over classes of |r_c|, each row's naive-Bayes log-count ratio (Wang & Manning 2012, with their smoothing
    of 1): df (C, V), the training texts of each class that hold each row -> (V,); 0 for rows in no text.

    r_c = ln(p_c / |p_c|_1) - ln(q_c / |q_c|_1) with p_c = 1 + df_c and q_c = 1 + the texts of the other classes,
    the norms summed over the rows seen in training (a hashed table's empty rows would otherwise weigh in), the
    classes those of the training texts (a class found only in other splits says nothing about any row)."""
    df = df[df.sum(1) > 0]  # (C', V)
    seen = df.sum(0) > 0  # (V,)
    p = 1.0 + df[:, seen]  # (C, S)
    q = 1.0 + df[:, seen].sum(0, keepdim=True) - df[:, seen]  # (C, S) the other classes
    r = (p / p.sum(1, keepdim=True)).log() - (q / q.sum(1, keepdim=True)).log()  # (C, S)
    out = torch.zeros(df.shape[1], dtype=df.dtype)
    out[seen] = r.abs().amax(0)
    return out


def sublinear(c):
    """The weight of each of an n-gram's c occurrences under sublinear tf: (1 + ln c) / c, so that together they
    weigh 1 + ln c, as TfidfVectorizer(sublinear_tf=True) counts them."""
    return (1.0 + torch.log(c)) / c


def repeats(rows, real, blocks):
    """How often each position's row occurs among the real positions of its text, within each of `blocks` equal
    blocks (one per n-gram order). (B, blocks * T) twice -> (B, blocks * T); an O(T^2) comparison per block."""
    grams = rows.reshape(rows.shape[0], blocks, -1)  # (B, blocks, T)
    keep = real.reshape(grams.shape).unsqueeze(2)  # (B, blocks, 1, T)
    same = (grams.unsqueeze(3) == grams.unsqueeze(2)) & keep  # (B, blocks, T, T)
    return same.sum(-1).reshape(rows.shape)  # (B, blocks * T)


def spell(token):
    """A vocabulary token as the characters its n-grams are read from: "<" where a word starts."""
    if token.startswith("##"):  # WordPiece: the rest of a word
        return token[2:]
    if token.startswith("\u0120"):  # byte-level BPE: a space, then a word
        return "<" + token[1:]
    return "<" + token


def token_char_ngrams(token, orders):
    """The character n-grams of one token, shortest orders first; none for a one-character token."""
    text = spell(token)
    if len(text.lstrip("<")) < 2:
        return []
    return [text[i:i + n] for n in orders for i in range(len(text) - n + 1)]


def char_table(tokens, orders, slots, vocab_size, buckets, skip=()):
    """(len(tokens), slots) int32 rows: each token's character n-grams hashed (CRC-32 of their UTF-8) into the
    `buckets` rows after the vocabulary, -1 in unused slots; tokens in `skip` (special tokens) get none."""
    table = torch.full((len(tokens), slots), -1, dtype=torch.int32)
    for i, token in enumerate(tokens):
        if not token or token in skip:
            continue
        grams = token_char_ngrams(token, orders)[:slots]
        if grams:
            table[i, :len(grams)] = torch.tensor([vocab_size + zlib.crc32(g.encode("utf-8")) % buckets for g in grams],
                                                 dtype=torch.int32)
    return table
