"""The guide's §4.3 classifier: embedding, mean pooling over real tokens, two dense layers."""
from dataclasses import dataclass

from torch import nn

from danlu.schema import Fraction, Positive


@dataclass(frozen=True)
class MLPConfig:
    kind: str = "mlp"
    embed_dim: Positive = 128
    hidden_dim: Positive = 256
    dropout: Fraction = 0.1


class MLPClassifier(nn.Module):
    def __init__(self, config: MLPConfig, spec):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(spec.vocab_size, config.embed_dim, padding_idx=spec.pad_id)
        self.hidden = nn.Linear(config.embed_dim, config.hidden_dim)
        self.dropout = nn.Dropout(config.dropout)
        self.head = nn.Linear(config.hidden_dim, max(spec.num_classes, 1))

    def forward(self, input_ids, attention_mask):
        mask = attention_mask.unsqueeze(-1).to(self.embed.weight.dtype)  # (B, T, 1)
        x = self.embed(input_ids) * mask  # (B, T, E), padding zeroed
        pooled = x.sum(1) / mask.sum(1).clamp(min=1.0)  # (B, E) mean over real tokens
        h = self.dropout(nn.functional.relu(self.hidden(pooled)))  # (B, H)
        return self.head(h)  # (B, C)
