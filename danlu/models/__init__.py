"""Model zoo: MODELS maps `model.kind` to (config dataclass, nn.Module class).

Every model is built as `Model(config, spec)` from its own config and the DataSpec of the data.
Classifiers take `(input_ids (B, T), attention_mask (B, T) bool)` and return logits `(B, C)`; image
classifiers (IMAGE_MODELS) take `pixel_values (B, C, H, W)`.
"""
from danlu.models.bert import BERT, BERTConfig
from danlu.models.cnn import CNN, CNNConfig
from danlu.models.gpt import GPT, GPTConfig
from danlu.models.lstm import LSTMClassifier, LSTMConfig
from danlu.models.mlp import MLPClassifier, MLPConfig
from danlu.models.ngram import NgramClassifier, NgramConfig
from danlu.models.seq2seq import Seq2Seq, Seq2SeqConfig
from danlu.models.textcnn import TextCNN, TextCNNConfig
from danlu.models.transformer import TransformerClassifier, TransformerConfig
from danlu.models.vit import ViT, ViTConfig
from danlu.registry import resolve

MODELS = {
    "mlp": (MLPConfig, MLPClassifier),
    "lstm": (LSTMConfig, LSTMClassifier),
    "textcnn": (TextCNNConfig, TextCNN),
    "ngram": (NgramConfig, NgramClassifier),
    "transformer": (TransformerConfig, TransformerClassifier),
    "gpt": (GPTConfig, GPT),
    "bert": (BERTConfig, BERT),
    "cnn": (CNNConfig, CNN),
    "vit": (ViTConfig, ViT),
    "seq2seq": (Seq2SeqConfig, Seq2Seq),
}
IMAGE_MODELS = frozenset({"cnn", "vit"})  # kinds that read images: danlu.jobs.images trains them


def build_model(config, spec):
    """Build the model named by `config.kind` for data of shape `spec`."""
    _, cls = resolve(config.kind, MODELS, "model.kind")
    return cls(config, spec)


def compile_model(model):
    """torch.compile(model), the way `train.compile` does it. The compiled module answers for the model's
    attributes, so a task reads them on it; the LM loss, fused by hand (danlu.kernels.lm_head_loss), runs
    outside it on the hidden states it returns, and the model compiles without a graph break."""
    import torch

    return torch.compile(model)


def count_parameters(model):
    return sum(p.numel() for p in model.parameters())
