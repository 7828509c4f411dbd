"""Transformer encoder classifier (Vaswani et al. 2017), trained from scratch.

Token embedding + positions -> pre-norm blocks (bidirectional attention, padding masked out) ->
final norm -> pooling over the sequence -> linear head. Pre-norm (Xiong et al. 2020) rather than the
paper's post-norm, because it trains stably without a long learning-rate warmup.
"""
import math
from dataclasses import dataclass

from torch import nn

from danlu.models.blocks import Block, init_weights, make_norm, mean_over_tokens, padding_mask, sinusoidal_table
from danlu.models.shapes import TransformerShape
from danlu.schema import Literal, Positive


@dataclass(frozen=True)
class TransformerConfig(TransformerShape):
    """The shared Transformer fields (danlu.models.shapes), this family's defaults for some, and its own."""

    kind: str = "transformer"
    embed_dim: Positive = 128
    num_layers: Positive = 2
    positions: Literal["learned", "sinusoidal"] = "learned"
    """learned (a trained table of max_positions rows) or sinusoidal (Vaswani et al. 2017, §3.5)."""
    max_positions: Positive = 512
    """Rows of the position table; the data's max_length is used when it is larger."""
    pooling: Literal["mean", "cls"] = "mean"
    """mean (over real tokens) or cls (the hidden state at position 0; the data adds no [CLS] token)."""
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"


class TransformerClassifier(nn.Module):
    def __init__(self, config: TransformerConfig, spec):
        super().__init__()
        self.config = config
        C = config.embed_dim
        num_positions = max(config.max_positions, spec.max_length)
        self.embed = nn.Embedding(spec.vocab_size, C, padding_idx=spec.pad_id)
        if config.positions == "learned":
            self.positions = nn.Embedding(num_positions, C)
        else:  # a fixed table: a buffer, not saved with the weights
            self.register_buffer("position_table", sinusoidal_table(num_positions, C), persistent=False)
        self.dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(
            Block(C, config.num_heads, None, config.ffn_dim, "gelu", config.norm, config.norm_eps,
                  dropout=config.dropout)
            for _ in range(config.num_layers)
        )
        self.norm = make_norm(config.norm, C, config.norm_eps)
        self.head = nn.Linear(C, max(spec.num_classes, 1))
        init_weights(self, num_layers=config.num_layers)

    def forward(self, input_ids, attention_mask=None):
        B, T = input_ids.shape
        x = self.embed(input_ids)  # (B, T, C)
        if self.config.positions == "learned":
            x = x + self.positions.weight[:T]  # (B, T, C)
        else:  # Vaswani et al. §3.4 scale the embeddings by sqrt(C) next to the unit-scale sinusoids
            x = x * math.sqrt(self.config.embed_dim) + self.position_table[:T].to(x.dtype)
        x = self.dropout(x)
        # No mask when nothing is padded lets SDPA use its fused kernels.
        mask = None if attention_mask is None or attention_mask.all() else padding_mask(attention_mask)
        for block in self.blocks:
            x = block(x, mask)  # (B, T, C)
        x = self.norm(x)
        if self.config.pooling == "cls":
            pooled = x[:, 0]  # (B, C)
        else:
            pooled = mean_over_tokens(x, attention_mask)  # (B, C)
        return self.head(self.dropout(pooled))  # (B, num_classes)
