"""The guide's §5.2 classifier: Embedding -> LSTM(128) -> Dense softmax.

Unlike the guide's Keras program, padding never reaches the recurrent state: sequences are packed
by their true lengths, so the classifier reads the state after the last real token.
"""
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence


@dataclass(frozen=True)
class LSTMConfig:
    kind: str = "lstm"
    embed_dim: int = 128
    hidden_dim: int = 128
    """Units of the LSTM (the guide's LSTM(128))."""
    num_layers: int = 1
    bidirectional: bool = False
    dropout: float = 0.0
    """Dropout on the final state before the dense layer (and between stacked LSTM layers)."""


class LSTMClassifier(nn.Module):
    def __init__(self, config: LSTMConfig, spec):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(spec.vocab_size, config.embed_dim, padding_idx=spec.pad_id)
        self.lstm = nn.LSTM(
            config.embed_dim,
            config.hidden_dim,
            num_layers=config.num_layers,
            batch_first=True,
            bidirectional=config.bidirectional,
            dropout=config.dropout if config.num_layers > 1 else 0.0,
        )
        directions = 2 if config.bidirectional else 1
        self.dropout = nn.Dropout(config.dropout)
        self.head = nn.Linear(directions * config.hidden_dim, max(spec.num_classes, 1))

    def forward(self, input_ids, attention_mask):
        lengths = attention_mask.sum(1).clamp(min=1).cpu()  # (B,)
        x = self.embed(input_ids)  # (B, T, E)
        packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        _, (h, _) = self.lstm(packed)  # h: (layers * directions, B, H), state after each row's last real token
        if self.config.bidirectional:
            h = torch.cat([h[-2], h[-1]], dim=-1)  # (B, 2H)
        else:
            h = h[-1]  # (B, H)
        return self.head(self.dropout(h))  # (B, C) logits; softmax lives in the loss
