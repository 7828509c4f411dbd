"""Model zoo: MODELS maps `model.kind` to (config dataclass, nn.Module class).

Every model is built as `Model(config, spec)` from its own config and the DataSpec of the data.
Classifiers take `(input_ids (B, T), attention_mask (B, T) bool)` and return logits `(B, C)`.
"""
from danlu.models.bert import BERT, BERTConfig
from danlu.models.gpt import GPT, GPTConfig
from danlu.models.lstm import LSTMClassifier, LSTMConfig
from danlu.models.mlp import MLPClassifier, MLPConfig
from danlu.models.seq2seq import Seq2Seq, Seq2SeqConfig
from danlu.models.textcnn import TextCNN, TextCNNConfig
from danlu.models.transformer import TransformerClassifier, TransformerConfig
from danlu.registry import resolve

MODELS = {
    "mlp": (MLPConfig, MLPClassifier),
    "lstm": (LSTMConfig, LSTMClassifier),
    "textcnn": (TextCNNConfig, TextCNN),
    "transformer": (TransformerConfig, TransformerClassifier),
    "gpt": (GPTConfig, GPT),
    "bert": (BERTConfig, BERT),
    "seq2seq": (Seq2SeqConfig, Seq2Seq),
}


def build_model(config, spec):
    """Build the model named by `config.kind` for data of shape `spec`."""
    _, cls = resolve(config.kind, MODELS, "model.kind")
    return cls(config, spec)


def compile_model(model):
    """torch.compile(model), the way `train.compile` does it: danlu's fused LM loss runs as written."""
    import torch

    from danlu.models.blocks import keep_loss_uncompiled

    keep_loss_uncompiled()
    return torch.compile(model)


def count_parameters(model):
    return sum(p.numel() for p in model.parameters())
