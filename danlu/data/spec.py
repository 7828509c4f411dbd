"""DataSpec: what the data tells the model about its shape, once."""
from dataclasses import dataclass, field


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
    target_vocab_size: int = 0  # seq2seq with a target tokenizer of its own (0: the one vocabulary)
