"""Tasks own the loss and the metrics; models only return tensors (as Keras separates compute_loss from call).

A task has `loss(model, batch) -> (loss, outputs)`, `new_metrics()`, `update(metrics, outputs, batch)`, and
for the training loop's running numbers `counts(outputs, batch)` and `train_metrics(loss_sum, count, correct)`.
It declares the metrics of its history rows and which way each is better (`metrics`), from which early
stopping and restore_best take their direction (`monitors()`).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from danlu.data.spec import IGNORE
from danlu.evaluate.metrics import ClassificationMetrics, LanguageModelMetrics, RegressionMetrics, top1
from danlu.kernels.lm_loss import lm_head_loss


def model_inputs(batch):
    """A classifier's positional inputs: `pixel_values` (B, C, H, W) for images, else `input_ids` and
    `attention_mask` (B, T)."""
    if "pixel_values" in batch:
        return (batch["pixel_values"],)
    return batch["input_ids"], batch["attention_mask"]


class Task:
    """What every task gives the loop besides its loss: per-batch counts and the train_* numbers of a row."""

    name = ""
    monitor = "accuracy"
    """The metric shown next to the loss (reports, plots)."""
    metrics = {"loss": "min", "accuracy": "max"}
    """The evaluation metrics a history row holds (as val_<name>), each with its better direction: max or min."""
    unit = "samples"
    """What throughput counts: samples (examples) or tokens."""

    def monitors(self):
        """{row column: whether higher is better} for every column early stopping can watch: val_<metric> for
        each of `metrics`, and train_<metric> for those the loop's running sums give (`train_metrics`).

        >>> ClassificationTask(["a", "b"]).monitors()
        {'val_loss': False, 'val_accuracy': True, 'train_loss': False, 'train_accuracy': True}
        """
        out = {f"val_{name}": better == "max" for name, better in self.metrics.items()}
        for column in self.train_metrics(0.0, 0, 0):
            out[column] = self.metrics[column.removeprefix("train_")] == "max"
        return out

    def higher_is_better(self, column, where="train.early_stopping.metric"):
        """Whether higher values of a history column are better; a ConfigError listing the valid columns when
        this task's rows have no such column."""
        monitors = self.monitors()
        if column not in monitors:
            from danlu.registry import ConfigError

            raise ConfigError(f"{where}: unknown metric {column!r} for task {self.name}; "
                              f"expected one of: {', '.join(monitors)}")
        return monitors[column]

    def counts(self, outputs, batch):
        """(count, correct, processed): the batch loss is a mean over `count` targets, `correct` of them
        predicted right; `processed` units (examples or tokens) went through the model."""
        n = len(batch["labels"])
        return n, (outputs.argmax(-1) == batch["labels"]).sum().item(), n

    def train_metrics(self, loss_sum, count, correct):
        return {"train_loss": loss_sum / max(count, 1), "train_accuracy": correct / max(count, 1)}


class ClassificationTask(Task):
    """Softmax cross-entropy over class logits (the guide's sparse categorical cross-entropy)."""

    name = "classification"
    monitor = "accuracy"
    metrics = {"loss": "min", "accuracy": "max"}

    def __init__(self, labels):
        self.labels = tuple(labels)

    def loss(self, model, batch):
        logits = model(*model_inputs(batch))  # (B, C)
        return F.cross_entropy(logits.float(), batch["labels"]), logits

    def new_metrics(self):
        return ClassificationMetrics(len(self.labels), self.labels)

    def update(self, metrics, outputs, batch):
        metrics.update(outputs, batch["labels"])


class RegressionTask(Task):
    """Mean squared error on one numeric output.

    With `target_mean` / `target_std` (from the training split: danlu train sets them) the model learns the
    standardised target (y - mean) / std, so that a target of 10,000 +- 2,000 trains as easily as one of
    0 +- 1; outputs, metrics and the loss columns are given back in the data's units. `standardised_head`
    folds the scale into the output layer, so a saved model predicts in those units itself."""

    name = "regression"
    monitor = "r2"
    metrics = {"loss": "min", "r2": "max", "mae": "min"}  # loss: the mean squared error

    def __init__(self, labels=(), target_mean=0.0, target_std=1.0):
        self.labels = ()
        self.target_mean, self.target_std = float(target_mean), float(target_std)

    def loss(self, model, batch):
        out = model(*model_inputs(batch)).squeeze(-1).float()  # (B,), standardised units
        target = (batch["labels"] - self.target_mean) / self.target_std
        return F.mse_loss(out, target), out * self.target_std + self.target_mean  # outputs in the data's units

    def new_metrics(self):
        return RegressionMetrics()

    def update(self, metrics, outputs, batch):
        metrics.update(outputs, batch["labels"])

    def counts(self, outputs, batch):
        n = len(batch["labels"])
        return n, 0, n

    def train_metrics(self, loss_sum, count, correct):
        return {"train_loss": loss_sum / max(count, 1) * self.target_std ** 2}  # the MSE in the data's units


def target_scale(targets):
    """(mean, std) of a training split's numeric targets, for RegressionTask (std 1 when they do not vary)."""
    import numpy as np

    targets = np.asarray(targets, dtype=np.float64)
    std = float(targets.std()) if len(targets) else 0.0
    return (float(targets.mean()) if len(targets) else 0.0), (std if std > 1e-12 else 1.0)


@torch.no_grad()
def standardised_head(model, mean, std):
    """Fold y = out * std + mean into the model's output layer (a plain nn.Linear `head`), in place."""
    model.head.weight.mul_(std)
    model.head.bias.mul_(std).add_(mean)
    return model


# ---------------------------------------------------------------------------------------------
# language modelling


class _LanguageModelTask(Task):
    monitor = "perplexity"
    metrics = {"loss": "min", "perplexity": "min", "accuracy": "max"}  # accuracy: of the next (or masked) token
    unit = "tokens"

    def __init__(self, labels=()):
        self.labels = ()

    def new_metrics(self):
        return LanguageModelMetrics()

    def update(self, metrics, outputs, batch):
        metrics.update(outputs, batch["labels"])

    def counts(self, outputs, batch):
        if isinstance(outputs, Counted):
            return outputs.count, outputs.correct, batch["input_ids"].numel()
        labels = batch["labels"]
        valid = labels != IGNORE
        correct = (top1(outputs.detach(), labels) & valid).sum().item()
        return valid.sum().item(), correct, batch["input_ids"].numel()

    def train_metrics(self, loss_sum, count, correct):
        loss = loss_sum / max(count, 1)
        return {"train_loss": loss, "train_perplexity": math.exp(min(loss, 50.0)), "train_accuracy": correct / max(count, 1)}


class CausalLMTask(_LanguageModelTask):
    """Next-token cross-entropy (Radford et al. 2018) over packed windows.

    A batch from a TokenStream carries `labels` (B, T), the token after each position. A padded batch
    without labels (e.g. a TextDataset) predicts input_ids shifted by one, padding ignored.

    While training a model that has an `lm_head` (a plain bias-free linear output layer, see
    danlu.models.gpt) and whose forward takes `return_hidden=True`, the loss comes from its hidden states
    through `danlu.kernels.lm_head_loss`, which never holds the (B, T, vocab) logits; any other model, and
    evaluation, go through the logits.
    """

    name = "causal_lm"

    def loss(self, model, batch):
        if "labels" not in batch:
            ids, mask = batch["input_ids"], batch.get("attention_mask")
            labels = ids[:, 1:].masked_fill(~mask[:, 1:], IGNORE) if mask is not None else ids[:, 1:]
            batch["labels"] = F.pad(labels, (0, 1), value=IGNORE)  # (B, T): the last position has no next token
        head = getattr(model, "lm_head", None)
        if head is not None and torch.is_grad_enabled() and model.training:  # the logits are never held
            hidden = model(batch["input_ids"], batch.get("attention_mask"), return_hidden=True)  # (B, T, C)
            # the weight is read after the forward: under FSDP2 that is the gathered one the forward used
            loss, correct, count = lm_head_loss(hidden, head.weight, batch["labels"], IGNORE)
            return loss, Counted(count, correct)
        logits = model(batch["input_ids"], batch.get("attention_mask"))  # (B, T, V)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), batch["labels"].flatten(), ignore_index=IGNORE)
        return loss, logits


class Counted(NamedTuple):
    """Labels and right answers of a training batch whose loss came from lm_head_loss (no logits)."""

    count: int
    correct: int


def mask_tokens(input_ids, mask_id, vocab_size, num_special=7, rate=0.15, attention_mask=None, generator=None):
    """BERT's masking (Devlin et al. 2019, §3.1): choose `rate` of the real, non-special positions; of those
    80% become [MASK], 10% a random token and 10% stay. Returns (masked input_ids, labels) with labels IGNORE
    at unchosen positions. Special tokens (ids below num_special, padding included) are never chosen.

    >>> masked, labels = mask_tokens(ids, mask_id=4, vocab_size=8000)  # doctest: +SKIP
    """
    ids = input_ids.cpu()
    candidates = ids >= num_special  # (B, T)
    if attention_mask is not None:
        candidates &= attention_mask.cpu()
    chosen = (torch.rand(ids.shape, generator=generator) < rate) & candidates  # (B, T)
    if not chosen.any() and candidates.any():  # a short batch still gets one target
        chosen.view(-1)[candidates.view(-1).nonzero()[0]] = True
    action = torch.rand(ids.shape, generator=generator)  # (B, T)
    masked = ids.masked_fill(chosen & (action < 0.8), mask_id)
    swap = chosen & (action >= 0.8) & (action < 0.9)
    masked[swap] = torch.randint(num_special, vocab_size, (int(swap.sum()),), generator=generator)
    labels = ids.masked_fill(~chosen, IGNORE)
    return masked.to(input_ids.device), labels.to(input_ids.device)


class MaskedLMTask(_LanguageModelTask):
    """Masked-token cross-entropy over the chosen 15% (BERT's masked LM).

    Masks are drawn by a generator seeded from the batch's window starts (`index`), so that they are the
    same on every evaluation and on a resumed run, whatever the global random state.
    """

    name = "masked_lm"

    def __init__(self, labels=(), mask_id=4, vocab_size=0, num_special=7, rate=0.15):
        super().__init__(labels)
        self.mask_id, self.vocab_size, self.num_special, self.rate = mask_id, vocab_size, num_special, rate

    def loss(self, model, batch):
        generator = None
        if "index" in batch:
            generator = torch.Generator().manual_seed(hash(tuple(batch["index"].tolist())) & (2**63 - 1))
        vocab_size = self.vocab_size or model.embed.num_embeddings
        mask = batch.get("attention_mask")
        batch["input_ids"], batch["labels"] = mask_tokens(batch["input_ids"], self.mask_id, vocab_size,
                                                          self.num_special, self.rate, mask, generator)
        logits = model(batch["input_ids"], mask)  # (B, T, V)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), batch["labels"].flatten(), ignore_index=IGNORE)
        return loss, logits


# ---------------------------------------------------------------------------------------------
# text to text


class Seq2SeqTask(_LanguageModelTask):
    """Cross-entropy of the target tokens (labels: target + EOS, IGNORE on padding) given the source and the
    target prefix, with label smoothing (Szegedy et al. 2016) in training; evaluation reports the plain
    cross-entropy, perplexity and token accuracy (BLEU and ROUGE need decoding: danlu.jobs.seq2seq)."""

    name = "seq2seq"

    def __init__(self, labels=(), label_smoothing=0.0):
        super().__init__(labels)
        self.label_smoothing = label_smoothing

    def loss(self, model, batch):
        smoothing = self.label_smoothing if torch.is_grad_enabled() else 0.0
        head = getattr(model, "lm_head", None)
        if not smoothing and head is not None and torch.is_grad_enabled() and model.training:  # logits never held
            hidden = model(batch["input_ids"], batch["attention_mask"], batch["decoder_input_ids"], return_hidden=True)
            loss, correct, count = lm_head_loss(hidden, head.weight, batch["labels"], IGNORE)
            return loss, Counted(count, correct)
        logits = model(batch["input_ids"], batch["attention_mask"], batch["decoder_input_ids"])  # (B, T, V)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), batch["labels"].flatten(), ignore_index=IGNORE,
                               label_smoothing=smoothing)
        return loss, logits

    def counts(self, outputs, batch):
        count, correct, _ = super().counts(outputs, batch)
        return count, correct, int(batch["attention_mask"].sum()) + count  # source + target tokens


TASKS = {"classification": ClassificationTask, "regression": RegressionTask, "causal_lm": CausalLMTask,
         "masked_lm": MaskedLMTask, "seq2seq": Seq2SeqTask}
"""The implementation of each task named in danlu.registry.TASKS (tests/test_layering.py checks they match)."""
