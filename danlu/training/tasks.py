"""Tasks own the loss and the metrics; models only return tensors (as Keras separates compute_loss from call).

A task has `loss(model, batch) -> (loss, outputs)`, `new_metrics()`, and `update(metrics, outputs, batch)`.
"""
from __future__ import annotations

import torch.nn.functional as F

from danlu.evaluate.metrics import ClassificationMetrics, RegressionMetrics


class ClassificationTask:
    """Softmax cross-entropy over class logits (the guide's sparse categorical cross-entropy)."""

    name = "classification"
    monitor = "accuracy"

    def __init__(self, labels):
        self.labels = tuple(labels)

    def loss(self, model, batch):
        logits = model(batch["input_ids"], batch["attention_mask"])  # (B, C)
        return F.cross_entropy(logits.float(), batch["labels"]), logits

    def new_metrics(self):
        return ClassificationMetrics(len(self.labels), self.labels)

    def update(self, metrics, outputs, batch):
        metrics.update(outputs, batch["labels"])


class RegressionTask:
    """Mean squared error on one numeric output."""

    name = "regression"
    monitor = "r2"

    def __init__(self, labels=()):
        self.labels = ()

    def loss(self, model, batch):
        out = model(batch["input_ids"], batch["attention_mask"]).squeeze(-1)  # (B,)
        return F.mse_loss(out.float(), batch["labels"]), out

    def new_metrics(self):
        return RegressionMetrics()

    def update(self, metrics, outputs, batch):
        metrics.update(outputs, batch["labels"])


TASKS = {"classification": ClassificationTask, "regression": RegressionTask}
