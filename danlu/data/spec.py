"""DataSpec: what the data tells the model about its shape, once."""
from dataclasses import dataclass, field

IGNORE = -100
"""The label of a position without a target (cross_entropy's ignore_index)."""


@dataclass(frozen=True)
class DataSpec:
    vocab_size: int
    pad_id: int = 0
    num_classes: int = 0  # 0 for language models; 1 for a numeric (regression) target
    max_length: int = 128
    labels: tuple = field(default_factory=tuple)
    mask_id: int | None = None
    bos_id: int | None = None
    eos_id: int | None = None
    channels: int = 0  # images: channels of a model input (0 for text)
    image_size: tuple = ()  # images: (height, width) of a model input
    target_vocab_size: int = 0  # seq2seq with a target tokenizer of its own (0: the one vocabulary)
