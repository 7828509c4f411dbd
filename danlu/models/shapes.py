"""What the model families' configs and constructors share.

`TransformerShape` holds the fields of every Transformer family (gpt, bert, transformer, seq2seq, vit):
width, heads, depth, feed-forward width, dropout and the norms' epsilon, the rule across them (embed_dim
divisible by num_heads, num_heads by the key/value heads) and the sizes derived from them. A family's
config subclasses it, declares the fields that are its own and redeclares a shared one only to give it
its own default:

    @dataclass(frozen=True)
    class ViTConfig(TransformerShape):
        kind: str = "vit"
        embed_dim: Positive = 64
        patch_size: NonNegative = 0

`image_input(config, spec)` is the (C, H, W) of one image for the image families (cnn, vit).
"""
from dataclasses import dataclass

from danlu.registry import ConfigError
from danlu.schema import Annotated, Fraction, NonNegative, Positive, Range


@dataclass(frozen=True)
class TransformerShape:
    kind: str
    """The family, a key of danlu.models.MODELS; each family's config gives its own as the default."""
    embed_dim: Positive = 256
    num_heads: Positive = 4
    num_layers: Positive = 4
    intermediate_dim: NonNegative = 0
    """Feed-forward width (0: 4 x embed_dim; gpt with mlp swiglu: 8/3 x embed_dim rounded up to 64)."""
    dropout: Fraction = 0.1
    """Dropout on the embeddings, attention weights and block outputs (bert, transformer: and the pooled vector)."""
    norm_eps: Annotated[float, Range(gt=0)] = 1e-5
    """Epsilon of the normalisation layers."""

    def __post_init__(self):
        if self.embed_dim % self.num_heads:
            raise ConfigError(f"model.embed_dim ({self.embed_dim}) must be divisible by "
                              f"model.num_heads ({self.num_heads})")
        if self.num_heads % self.kv_heads:
            raise ConfigError(f"model.num_heads ({self.num_heads}) must be divisible by "
                              f"model.num_kv_heads ({self.kv_heads})")

    @property
    def kv_heads(self):
        """Key/value heads: num_heads, unless a family with grouped-query attention sets fewer."""
        return getattr(self, "num_kv_heads", 0) or self.num_heads

    @property
    def head_dim(self):
        return self.embed_dim // self.num_heads

    @property
    def ffn_dim(self):
        return self.intermediate_dim or 4 * self.embed_dim


def image_input(config, spec):
    """(channels, height, width) of one image of the data `spec`, which an image model of `config` reads;
    a ConfigError when the data has no image shape (a text dataset)."""
    if not spec.channels or len(spec.image_size) != 2:
        raise ConfigError(f"model.kind {config.kind} classifies images; the data gives no image shape "
                          f"(a text dataset?)")
    return (spec.channels, *spec.image_size)
