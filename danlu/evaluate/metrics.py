"""Streaming metrics: memory stays constant however many examples pass through.

Classification accumulates a confusion matrix and the summed log loss; every other number
(accuracy, per-class and averaged precision / recall / F1) is derived from those at the end, with the
same definitions as scikit-learn's `precision_recall_fscore_support` (zero_division=0). Language models
accumulate the summed token cross-entropy and the right top-1 guesses (loss, perplexity, token accuracy).
This module is the one home of danlu's metrics; tasks (danlu.training.tasks) update them batch by batch.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from danlu.data.spec import IGNORE


class ClassificationMetrics:
    def __init__(self, num_classes, labels=None):
        self.num_classes = num_classes
        self.labels = list(labels) if labels else [str(i) for i in range(num_classes)]
        self.confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)  # rows: true, columns: predicted
        self.loss_sum = 0.0
        self.count = 0

    @torch.no_grad()
    def update(self, logits, targets):
        """logits (B, C) float, targets (B,) int64."""
        logits, targets = logits.detach().float().cpu(), targets.cpu()
        self.loss_sum += torch.nn.functional.cross_entropy(logits, targets, reduction="sum").item()
        pred = logits.argmax(-1)
        self.confusion += torch.bincount(targets * self.num_classes + pred, minlength=self.num_classes**2).view(
            self.num_classes, self.num_classes
        )
        self.count += len(targets)

    def compute(self):
        cm = self.confusion.double()
        tp = cm.diag()
        support, predicted = cm.sum(1), cm.sum(0)
        precision = _div(tp, predicted)
        recall = _div(tp, support)
        f1 = _div(2 * precision * recall, precision + recall)
        total = cm.sum().clamp(min=1)
        micro = (tp.sum() / total).item()
        weights = support / total
        out = {
            "accuracy": micro,
            "loss": self.loss_sum / max(self.count, 1),
            "count": self.count,
            "macro": {"precision": precision.mean().item(), "recall": recall.mean().item(), "f1": f1.mean().item()},
            "micro": {"precision": micro, "recall": micro, "f1": micro},
            "weighted": {
                "precision": (precision * weights).sum().item(),
                "recall": (recall * weights).sum().item(),
                "f1": (f1 * weights).sum().item(),
            },
            "per_class": {
                label: {"precision": precision[i].item(), "recall": recall[i].item(), "f1": f1[i].item(), "support": int(support[i])}
                for i, label in enumerate(self.labels)
            },
            "confusion_matrix": self.confusion.tolist(),
            "labels": self.labels,
        }
        return out


class RegressionMetrics:
    """MSE, MAE and R² from running sums (sum, sum of squares, sum of errors)."""

    def __init__(self):
        self.count = 0
        self.shift = None  # sums of (y - shift) keep R² precise when targets are large and close together
        self.sum_y = self.sum_y2 = self.sum_se = self.sum_ae = 0.0

    @torch.no_grad()
    def update(self, outputs, targets):
        pred = outputs.detach().float().reshape(-1).cpu().double()
        y = targets.detach().reshape(-1).cpu().double()
        err = pred - y
        if self.shift is None and len(y):
            self.shift = y[0].item()
        y = y - (self.shift or 0.0)
        self.count += len(y)
        self.sum_y += y.sum().item()
        self.sum_y2 += (y * y).sum().item()
        self.sum_se += (err * err).sum().item()
        self.sum_ae += err.abs().sum().item()

    def compute(self):
        n = max(self.count, 1)
        mse = self.sum_se / n
        variance = self.sum_y2 / n - (self.sum_y / n) ** 2
        r2 = 1.0 - mse / variance if variance > 0 else (1.0 if mse == 0 else 0.0)  # as scikit-learn's r2_score
        return {"loss": mse, "mse": mse, "mae": self.sum_ae / n, "r2": r2, "count": self.count}


def _div(a, b):
    return torch.where(b > 0, a / b.clamp(min=1e-300), torch.zeros_like(a))


def top1(logits, labels):
    """Whether each label has the highest logit (ties count as right): gather + amax, which is several
    times faster on CPU than comparing with argmax over a large vocabulary."""
    target = logits.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (...)
    return target >= logits.amax(-1)


class LanguageModelMetrics:
    """Streaming token-level cross-entropy, perplexity (exp of the mean loss) and accuracy."""

    def __init__(self):
        self.loss_sum, self.count, self.correct = 0.0, 0, 0

    @torch.no_grad()
    def update(self, logits, labels):
        """logits (..., V); labels (...) int64 with IGNORE where there is no target."""
        logits, labels = logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1)
        valid = labels != IGNORE
        self.loss_sum += F.cross_entropy(logits, labels, ignore_index=IGNORE, reduction="sum").item()
        self.correct += (top1(logits, labels) & valid).sum().item()
        self.count += valid.sum().item()

    def compute(self):
        loss = self.loss_sum / max(self.count, 1)
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "accuracy": self.correct / max(self.count, 1),
                "count": self.count}
