"""BERT: a bidirectional Transformer encoder (Devlin et al. 2019).

Word + learned position + token-type embeddings, LayerNorm -> post-norm layers
(x = norm(x + attn(x)); x = norm(x + ffn(x)), as the original Transformer and BERT) -> either the
masked-LM head (spec.num_classes == 0; logits (B, T, vocab)) or a classifier (B, num_classes).
The math follows Hugging Face BertModel (LayerNorm eps 1e-12, erf GELU, pooler = dense + tanh over
position 0), so checkpoints such as all-MiniLM-L6-v2 load into it; `encode` returns the hidden states
that sentence-embedding models mean-pool.
"""
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from danlu.models.blocks import Attention, FeedForward, init_weights, mean_over_tokens, padding_mask
from danlu.models.shapes import TransformerShape
from danlu.schema import Annotated, Literal, Positive, Range


@dataclass(frozen=True)
class BERTConfig(TransformerShape):
    """The shared Transformer fields (danlu.models.shapes), BERT's defaults for some, and BERT's own."""

    kind: str = "bert"
    norm_eps: Annotated[float, Range(gt=0)] = 1e-12
    size: str = ""
    """A preset of SIZE_PRESETS below (tiny, small, minilm, base) whose values fill the keys this section leaves out."""
    max_positions: Positive = 512
    """Rows of the position table; the data's max_length is used when it is larger."""
    type_vocab_size: Positive = 2
    """Token types (segments A and B of a sentence pair)."""
    pooling: Literal["mean", "cls"] = "mean"
    """Classifier input: mean (over real tokens) or cls (pooler over position 0, as BERT fine-tuning)."""


# Presets are data: field overrides for BERTConfig, e.g. BERTConfig(**SIZE_PRESETS["minilm"]).
SIZE_PRESETS = {
    "tiny": dict(num_layers=2, embed_dim=64, num_heads=2, max_positions=128),  # for tests
    "small": dict(num_layers=4, embed_dim=256, num_heads=4),
    "minilm": dict(num_layers=6, embed_dim=384, num_heads=12, intermediate_dim=1536),  # all-MiniLM-L6-v2
    "base": dict(num_layers=12, embed_dim=768, num_heads=12, intermediate_dim=3072),  # bert-base
}


class EncoderLayer(nn.Module):
    """Post-norm Transformer layer (Vaswani et al. 2017; Devlin et al. 2019)."""

    def __init__(self, config):
        super().__init__()
        C = config.embed_dim
        self.attn = Attention(C, config.num_heads, bias=True, dropout=config.dropout)
        self.attn_norm = nn.LayerNorm(C, eps=config.norm_eps)
        self.ffn = FeedForward(C, config.ffn_dim, "gelu", bias=True, dropout=config.dropout)
        self.ffn_norm = nn.LayerNorm(C, eps=config.norm_eps)

    def forward(self, x, mask=None):
        x = self.attn_norm(x + self.attn(x, mask))  # (B, T, C)
        return self.ffn_norm(x + self.ffn(x))  # (B, T, C)


class MLMHead(nn.Module):
    """dense -> GELU -> LayerNorm -> decoder to the vocabulary (weights tied to the embeddings, own bias)."""

    def __init__(self, config, vocab_size):
        super().__init__()
        self.dense = nn.Linear(config.embed_dim, config.embed_dim)
        self.norm = nn.LayerNorm(config.embed_dim, eps=config.norm_eps)
        self.decoder = nn.Linear(config.embed_dim, vocab_size)

    def forward(self, x):
        return self.decoder(self.norm(F.gelu(self.dense(x))))  # (B, T, vocab)


class BERT(nn.Module):
    def __init__(self, config: BERTConfig, spec):
        super().__init__()
        self.config = config
        self.num_classes = spec.num_classes
        C = config.embed_dim
        self.embed = nn.Embedding(spec.vocab_size, C, padding_idx=spec.pad_id)
        self.positions = nn.Embedding(max(config.max_positions, spec.max_length), C)
        self.token_types = nn.Embedding(config.type_vocab_size, C)
        self.embed_norm = nn.LayerNorm(C, eps=config.norm_eps)
        self.dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(EncoderLayer(config) for _ in range(config.num_layers))
        if spec.num_classes > 0:
            if config.pooling == "cls":
                self.pooler = nn.Linear(C, C)
            self.head = nn.Linear(C, spec.num_classes)
        else:
            self.mlm = MLMHead(config, spec.vocab_size)
        init_weights(self)  # BERT keeps std 0.02 at every depth (no residual scaling)
        if spec.num_classes == 0:
            self.mlm.decoder.weight = self.embed.weight

    def encode(self, input_ids, attention_mask=None, token_type_ids=None):
        """Hidden states (B, T, C) of a right-padded batch; attention_mask (B, T) bool, True = real token."""
        B, T = input_ids.shape
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        x = self.embed(input_ids) + self.positions.weight[:T] + self.token_types(token_type_ids)  # (B, T, C)
        x = self.dropout(self.embed_norm(x))
        # No mask when nothing is padded lets SDPA use its fused kernels.
        mask = None if attention_mask is None or attention_mask.all() else padding_mask(attention_mask)
        for layer in self.layers:
            x = layer(x, mask)  # (B, T, C)
        return x

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        """MLM logits (B, T, vocab) when the data has no classes, else class logits (B, num_classes)."""
        x = self.encode(input_ids, attention_mask, token_type_ids)  # (B, T, C)
        if self.num_classes == 0:
            return self.mlm(x)  # (B, T, vocab)
        if self.config.pooling == "cls":
            pooled = torch.tanh(self.pooler(x[:, 0]))  # (B, C)
        else:
            pooled = mean_over_tokens(x, attention_mask)  # (B, C)
        return self.head(self.dropout(pooled))  # (B, num_classes)
