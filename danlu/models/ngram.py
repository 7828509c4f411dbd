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
that a linear model then reads, with raw term frequencies (an n-gram seen twice counts twice).
"""
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
    weighting: Literal["mean", "idf"] = "mean"
    """mean: the plain average of fastText. idf: each n-gram weighted by its inverse document frequency on the
    training split and the weighted sum divided by the weights' L2 norm, as TF-IDF rows are normalised."""

    def __post_init__(self):
        if not self.ngrams:  # each order's range is checked at load
            raise ConfigError("model.ngrams: expected at least one n-gram order, e.g. [1, 2, 3]")
        if len(set(self.ngrams)) != len(self.ngrams):
            raise ConfigError(f"model.ngrams: each order once, got {list(self.ngrams)}")


class NgramClassifier(nn.Module):
    def __init__(self, config: NgramConfig, spec):
        super().__init__()
        self.config = config
        self.orders = tuple(sorted(int(n) for n in config.ngrams))
        self.vocab_size = spec.vocab_size
        hashed = config.buckets if max(self.orders) > 1 else 0
        self.embed = nn.Embedding(spec.vocab_size + hashed, config.embed_dim)
        if config.weighting == "idf":  # one weight per row, measured on the training split by `adapt`; saved with the model
            self.register_buffer("idf", torch.ones(spec.vocab_size + hashed))
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

    @torch.no_grad()
    def adapt(self, dataset, batch_size=256):
        """Measure the idf of every row on `dataset` (the training split: a TextDataset) when `weighting` is idf.

        idf = ln((1 + N) / (1 + df)) + 1, with df the number of texts an n-gram occurs in (scikit-learn's smoothed
        idf, TfidfVectorizer(smooth_idf=True)); a row never seen in training gets the largest value, as there.
        """
        if self.config.weighting != "idf":
            return
        from danlu.data.batching import iterate

        df = torch.zeros(self.embed.num_embeddings, dtype=torch.float64)
        for batch in iterate(dataset, batch_size, dataset.pad_id, shuffle=False, bucket=False):
            rows, real = self.ngram_ids(batch["input_ids"], batch["attention_mask"])  # (b, L)
            for r, keep in zip(rows, real):
                df[torch.unique(r[keep])] += 1  # each text counts once per row
        n = len(dataset.ids)
        self.idf.copy_(torch.log((1.0 + n) / (1.0 + df)) + 1.0)

    def forward(self, input_ids, attention_mask=None):
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
        rows, real = self.ngram_ids(input_ids, attention_mask)  # (B, L)
        weight = real.to(self.embed.weight.dtype).unsqueeze(-1)  # (B, L, 1)
        if self.config.weighting == "idf":
            weight = weight * self.idf[rows].unsqueeze(-1)  # (B, L, 1) idf of each real n-gram, 0 on padding
            norm = weight.square().sum(1).sqrt()  # (B, 1) L2 norm of the text's weights, as TF-IDF rows are normalised
        else:
            norm = weight.sum(1)  # (B, 1) the number of real n-grams: a mean
        x = self.embed(rows) * weight  # (B, L, E), padding zeroed
        pooled = x.sum(1) / norm.clamp(min=1.0)  # (B, E)
        return self.head(self.dropout(pooled))  # (B, C)
