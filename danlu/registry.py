"""Plain-dict registries: `resolve(kind, table, what)` looks a name up and says what exists when it fails;
`TASKS`, the one table of task names.
"""
from dataclasses import dataclass


class ConfigError(ValueError):
    """A config, a file or an argument is wrong; the message says where and what was expected."""


def resolve(kind, table, what="kind"):
    """Return `table[kind]`, or raise ConfigError naming the valid kinds.

    >>> resolve("adam", {"adam": 1, "sgd": 2}, "train.optimizer")
    1
    """
    try:
        return table[kind]
    except KeyError:
        valid = ", ".join(sorted(table))
        raise ConfigError(f"{what}: unknown value {kind!r}; expected one of: {valid}") from None


@dataclass(frozen=True)
class TaskKind:
    """What every layer may know of a task by its name; its loss and metrics live in danlu.training.tasks."""

    name: str
    verb: str
    """The command that trains it from scratch: train or pretrain."""
    language_model: bool = False
    """Scored per token (loss, perplexity); predict refuses it, generate / evaluate on a corpus take it."""
    finetune: bool = False
    """`danlu finetune` can start it from a pretrained base."""
    description: str = ""
    monitors: tuple = ()
    """(history column, higher is better) for every column early stopping and restore_best can watch."""


_CLASSIFIER = (("val_loss", False), ("val_accuracy", True), ("train_loss", False), ("train_accuracy", True))
_TOKENS = (("val_loss", False), ("val_perplexity", False), ("val_accuracy", True), ("train_loss", False),
           ("train_perplexity", False), ("train_accuracy", True))  # accuracy: of the next (or masked) token

TASKS = {t.name: t for t in (
    TaskKind("classification", "train", finetune=True, description="texts -> one of several classes (cross-entropy)",
             monitors=_CLASSIFIER),
    TaskKind("regression", "train", description="texts -> a number (mean squared error)",
             monitors=(("val_loss", False), ("val_r2", True), ("val_mae", False), ("train_loss", False))),
    TaskKind("causal_lm", "pretrain", language_model=True, finetune=True,
             description="next-token prediction (GPT); chat fine-tuning", monitors=_TOKENS),
    TaskKind("masked_lm", "pretrain", language_model=True, description="masked-token prediction (BERT)",
             monitors=_TOKENS),
    TaskKind("seq2seq", "train", description="text -> text: translation, summarization (encoder-decoder)",
             monitors=_TOKENS),
)}
"""Every task by name: the config, the jobs, the CLI, compare and serve read this one table."""


def tasks_for(verb):
    """Names of the tasks that `verb` (train, pretrain, finetune) takes."""
    if verb == "finetune":
        return tuple(name for name, t in TASKS.items() if t.finetune)
    return tuple(name for name, t in TASKS.items() if t.verb == verb)
