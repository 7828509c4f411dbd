"""Knowledge distillation (Hinton et al. 2015) as a Task, run by the same Trainer as any other.

The student learns from the teacher's softened class probabilities and from the true labels:

    loss = alpha * CE(student, labels) + (1 - alpha) * T² * KL(softmax(teacher / T) || softmax(student / T))

T² keeps the soft term's gradients on the scale of the hard one as T changes (Hinton et al. §2). The
weighting follows Keras's `Distiller` (alpha on the hard loss). alpha = 1 is plain training, which is
how a benchmark trains "the same student without the teacher" through the same code. Evaluation (run
under torch.no_grad) reports the hard cross-entropy and classification metrics, without the teacher.

>>> task = DistillationTask(teacher_run.model, labels, temperature=2.0, alpha=0.5)  # doctest: +SKIP
>>> Trainer(student, task, cfg.train).fit(data.train, data.val)                     # doctest: +SKIP
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from danlu.evaluate.metrics import ClassificationMetrics
from danlu.training.tasks import Task


class DistillationTask(Task):
    name = "distillation"
    monitor = "accuracy"

    def __init__(self, teacher, labels, temperature=2.0, alpha=0.5, teacher_logits=None):
        """teacher_logits: optional (N, C) logits of the teacher for the training set, looked up by the
        batch's `index` (see `teacher_logits`), so that the teacher runs once instead of once an epoch."""
        self.teacher = teacher.eval()
        self.cached = teacher_logits
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.labels = tuple(labels)
        self.temperature, self.alpha = float(temperature), float(alpha)

    def loss(self, model, batch):
        logits = model(batch["input_ids"], batch["attention_mask"])  # (B, C)
        hard = F.cross_entropy(logits.float(), batch["labels"])
        if not torch.is_grad_enabled() or self.alpha >= 1.0:  # evaluation: the hard loss only
            return hard, logits
        T = self.temperature
        with torch.no_grad():
            teacher = self._teacher(batch).float()  # (B, C)
        soft = F.kl_div(F.log_softmax(logits.float() / T, -1), F.log_softmax(teacher / T, -1),
                        reduction="batchmean", log_target=True) * T * T
        return self.alpha * hard + (1 - self.alpha) * soft, logits

    def _teacher(self, batch):
        ids = batch["input_ids"]
        if self.cached is not None and "index" in batch:
            return self.cached[batch["index"].cpu()].to(ids.device)
        if next(self.teacher.parameters()).device != ids.device:
            self.teacher.to(ids.device)
        return self.teacher(ids, batch["attention_mask"])

    def new_metrics(self):
        return ClassificationMetrics(len(self.labels), self.labels)

    def update(self, metrics, outputs, batch):
        metrics.update(outputs, batch["labels"])


@torch.no_grad()
def teacher_logits(teacher, dataset, batch_size=128):
    """(N, C) logits of `teacher` (in eval mode, so fixed) for every example of a TextDataset, in its order."""
    from danlu.data.batching import iterate

    teacher.eval()
    out = None
    for batch in iterate(dataset, batch_size, dataset.pad_id, shuffle=False):
        logits = teacher(batch["input_ids"], batch["attention_mask"]).float()  # (B, C)
        if out is None:
            out = torch.empty(len(dataset), logits.shape[-1])
        out[batch["index"]] = logits
    return out


def distill(teacher, student, labels, train, val=None, train_cfg=None, temperature=2.0, alpha=0.5, seed=0):
    """Train `student` (a freshly built model) on `train` with `teacher`'s soft targets; returns the student,
    with the weights of its best validation epoch when the config asks for restore_best."""
    import tempfile

    from danlu.training.trainer import Trainer

    cached = teacher_logits(teacher, train) if alpha < 1 and hasattr(train, "ids") else None
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory(prefix="danlu-distill-") as scratch:  # the best-epoch checkpoint lives here
        trainer = Trainer(student, DistillationTask(teacher, labels, temperature, alpha, cached), train_cfg,
                          run_dir=scratch, seed=seed)
        trainer.fit(train, val)
    return trainer.model.cpu()
