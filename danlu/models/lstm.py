"""The guide's §5.2 classifier: Embedding -> LSTM(128) -> Dense softmax.

Unlike the guide's Keras program, padding never reaches the state the classifier reads: it reads the
state after each text's last real token.
"""
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from danlu.schema import Fraction, Literal, Positive


@dataclass(frozen=True)
class LSTMConfig:
    kind: str = "lstm"
    embed_dim: Positive = 128
    hidden_dim: Positive = 128
    """Units of the LSTM (the guide's LSTM(128))."""
    num_layers: Positive = 1
    bidirectional: bool = False
    pooling: Literal["last", "mean", "max"] = "last"
    """last: the state after the last real token (the guide's model); mean or max: over all real steps."""
    embed_dropout: Fraction = 0.0
    """Spatial dropout on the embeddings: drops whole embedding channels (Keras SpatialDropout1D)."""
    dropout: Fraction = 0.0
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
        self.embed_dropout = nn.Dropout1d(config.embed_dropout)
        self.dropout = nn.Dropout(config.dropout)
        self.head = nn.Linear(directions * config.hidden_dim, max(spec.num_classes, 1))
        # forget-gate bias 1 so the state carries early words to the end of long reviews (Jozefowicz et al. 2015)
        with torch.no_grad():
            for name, p in self.lstm.named_parameters():
                if name.startswith("bias_ih"):
                    p[config.hidden_dim : 2 * config.hidden_dim].fill_(1.0)
                elif name.startswith("bias_hh"):
                    p[config.hidden_dim : 2 * config.hidden_dim].fill_(0.0)

    def forward(self, input_ids, attention_mask):
        lengths = attention_mask.sum(1).clamp(min=1)  # (B,)
        x = self.embed(input_ids)  # (B, T, E)
        if self.config.embed_dropout:
            x = self.embed_dropout(x.transpose(1, 2)).transpose(1, 2)  # spatial dropout: whole channels of (B, E, T)
        if self.config.bidirectional:
            # the backward direction must start at each row's last real token: pack by length
            packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
            out, (h, _) = self.lstm(packed)  # h: (layers * 2, B, H)
            out, _ = pad_packed_sequence(out, batch_first=True, total_length=x.size(1))  # (B, T, 2H)
            last = torch.cat([h[-2], h[-1]], dim=-1)  # (B, 2H)
        else:
            # Rows are right-padded, and a forward LSTM's output at step t depends on steps <= t only, so
            # the output at each row's last real token is exactly the unpadded final state. The unpacked
            # kernel is about 4x faster on CPU than the packed one, backward included.
            out, _ = self.lstm(x)  # (B, T, H)
            last = out[torch.arange(out.size(0), device=out.device), lengths - 1]  # (B, H)
        if self.config.pooling == "last":
            h = last
        else:
            mask = attention_mask.unsqueeze(-1)  # (B, T, 1)
            if self.config.pooling == "mean":
                h = (out * mask).sum(1) / mask.sum(1).clamp(min=1)
            else:
                h = out.masked_fill(~mask, float("-inf")).max(1).values
        return self.head(self.dropout(h))  # (B, C) logits; softmax lives in the loss
