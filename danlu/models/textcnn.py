"""TextCNN (Kim 2014, "Convolutional Neural Networks for Sentence Classification").

Embedding -> parallel 1-D convolutions of several widths -> ReLU -> max over time -> dropout -> linear.
Padding never decides the result: pad embeddings are zeroed, and only windows that start within the
text and stay inside it (or the single first window of a text shorter than the kernel) enter the max,
so appending padding leaves the logits unchanged. Texts are padded on the right.
"""
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from danlu.registry import ConfigError
from danlu.schema import Fraction, Positive


@dataclass(frozen=True)
class TextCNNConfig:
    kind: str = "textcnn"
    embed_dim: Positive = 128
    kernel_sizes: tuple[Positive, ...] = (3, 4, 5)
    """Widths of the convolution windows, in tokens (Kim 2014 used 3, 4 and 5)."""
    num_filters: Positive = 100
    """Feature maps per window width; the pooled vector has len(kernel_sizes) * num_filters features."""
    dropout: Fraction = 0.5
    """Dropout on the pooled vector (Kim 2014: 0.5)."""

    def __post_init__(self):
        if not self.kernel_sizes:  # each width's range is checked at load
            raise ConfigError("model.kernel_sizes: expected at least one window width, e.g. [3, 4, 5]")


class TextCNN(nn.Module):
    def __init__(self, config: TextCNNConfig, spec):
        super().__init__()
        self.config = config
        self.kernel_sizes = tuple(int(k) for k in config.kernel_sizes)
        self.embed = nn.Embedding(spec.vocab_size, config.embed_dim, padding_idx=spec.pad_id)
        self.convs = nn.ModuleList(nn.Conv1d(config.embed_dim, config.num_filters, k) for k in self.kernel_sizes)
        self.dropout = nn.Dropout(config.dropout)
        self.head = nn.Linear(len(self.kernel_sizes) * config.num_filters, max(spec.num_classes, 1))

    def forward(self, input_ids, attention_mask=None):
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
        lengths = attention_mask.sum(1)  # (B,)
        x = self.embed(input_ids) * attention_mask.unsqueeze(-1).to(self.embed.weight.dtype)  # (B, T, E)
        x = x.transpose(1, 2)  # (B, E, T), channels first for Conv1d
        shortfall = max(self.kernel_sizes) - x.shape[-1]
        if shortfall > 0:  # a batch shorter than the widest kernel: zero-pad the time axis
            x = F.pad(x, (0, shortfall))  # (B, E, max(kernel_sizes))
        pooled = []
        for k, conv in zip(self.kernel_sizes, self.convs):
            h = conv(x)  # (B, F, T - k + 1)
            start = torch.arange(h.shape[-1], device=h.device)  # (T - k + 1,) window starts
            valid = start[None, :] <= (lengths[:, None] - k).clamp(min=0)  # (B, T - k + 1)
            h = h.masked_fill(~valid[:, None, :], float("-inf"))
            # max then ReLU equals ReLU then max (ReLU is monotone), on a tensor T times smaller
            pooled.append(F.relu(h.amax(-1)))  # (B, F)
        features = torch.cat(pooled, dim=-1)  # (B, len(kernel_sizes) * F)
        return self.head(self.dropout(features))  # (B, num_classes)
