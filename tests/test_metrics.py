"""Streaming metrics against scikit-learn on random data, and evaluation memory that stays flat as data grows."""
import sys
import tracemalloc

import numpy as np
import pytest
import torch

from danlu.evaluate.metrics import ClassificationMetrics, RegressionMetrics
from danlu.evaluate.report import ConfidentMistakes

metrics_sk = pytest.importorskip("sklearn.metrics")

torch.set_num_threads(1)


def random_classification(n, num_classes, seed, skew=0.0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, num_classes, generator=g) * 2
    targets = torch.randint(0, num_classes, (n,), generator=g)
    if skew:  # make the logits informative, so that the classes are neither all right nor all wrong
        logits[torch.arange(n), targets] += skew
    return logits, targets


def stream(metric, logits, targets, batch_size):
    for i in range(0, len(targets), batch_size):
        metric.update(logits[i : i + batch_size], targets[i : i + batch_size])
    return metric.compute()


@pytest.mark.parametrize("num_classes, skew, batch_size, seed", [(2, 1.0, 7, 0), (5, 1.5, 64, 1), (7, 0.0, 1000, 2)])
def test_classification_metrics_match_sklearn(num_classes, skew, batch_size, seed):
    logits, targets = random_classification(1000, num_classes, seed, skew)
    labels = [f"类{i}" for i in range(num_classes)]
    m = stream(ClassificationMetrics(num_classes, labels), logits, targets, batch_size)
    y, pred = targets.numpy(), logits.argmax(-1).numpy()
    classes = list(range(num_classes))
    assert m["count"] == 1000
    assert m["accuracy"] == pytest.approx(metrics_sk.accuracy_score(y, pred), abs=1e-12)
    probabilities = logits.double().softmax(-1).numpy()
    assert m["loss"] == pytest.approx(metrics_sk.log_loss(y, probabilities, labels=classes), rel=1e-5)
    assert m["confusion_matrix"] == metrics_sk.confusion_matrix(y, pred, labels=classes).tolist()
    p, r, f, s = metrics_sk.precision_recall_fscore_support(y, pred, labels=classes, zero_division=0)
    for i, label in enumerate(labels):
        got = m["per_class"][label]
        assert (got["precision"], got["recall"], got["f1"]) == pytest.approx((p[i], r[i], f[i]), abs=1e-12)
        assert got["support"] == s[i]
    for average in ("macro", "micro", "weighted"):
        p, r, f, _ = metrics_sk.precision_recall_fscore_support(y, pred, labels=classes, average=average,
                                                                zero_division=0)
        assert (m[average]["precision"], m[average]["recall"], m[average]["f1"]) == pytest.approx((p, r, f), abs=1e-12)


def test_classification_metrics_with_a_class_never_predicted_or_seen():
    # class 2 never occurs and is never predicted; class 1 occurs but is never predicted: zero_division=0
    logits = torch.tensor([[5.0, 0, 0], [5.0, 0, 0], [0, 0.0, -5], [5.0, 0, 0]])
    targets = torch.tensor([0, 1, 1, 0])
    m = stream(ClassificationMetrics(3), logits, targets, 3)
    y, pred = targets.numpy(), logits.argmax(-1).numpy()
    p, r, f, _ = metrics_sk.precision_recall_fscore_support(y, pred, labels=[0, 1, 2], average="macro", zero_division=0)
    assert (m["macro"]["precision"], m["macro"]["recall"], m["macro"]["f1"]) == pytest.approx((p, r, f))
    assert m["per_class"]["2"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}


@pytest.mark.parametrize("batch_size", [1, 33, 5000])
def test_regression_metrics_match_sklearn(batch_size):
    g = torch.Generator().manual_seed(3)
    y = torch.randn(2000, generator=g) * 3 + 10
    pred = y + torch.randn(2000, generator=g)
    metric = RegressionMetrics()
    for i in range(0, len(y), batch_size):
        metric.update(pred[i : i + batch_size].unsqueeze(-1), y[i : i + batch_size])
    m = metric.compute()
    yn, pn = y.double().numpy(), pred.double().numpy()
    assert m["count"] == 2000
    assert m["mse"] == pytest.approx(metrics_sk.mean_squared_error(yn, pn), rel=1e-6)
    assert m["mae"] == pytest.approx(metrics_sk.mean_absolute_error(yn, pn), rel=1e-6)
    assert m["r2"] == pytest.approx(metrics_sk.r2_score(yn, pn), rel=1e-6)


def test_confident_mistakes_are_the_top_k_wrong_predictions():
    logits, targets = random_classification(500, 4, seed=5, skew=1.0)
    mistakes = ConfidentMistakes(k=8)
    for i in range(0, 500, 37):
        mistakes.update(logits[i : i + 37], {"index": torch.arange(i, min(i + 37, 500)), "labels": targets[i : i + 37]})
    probs = logits.softmax(-1)
    confidence, pred = probs.max(-1)
    wrong = torch.nonzero(pred != targets).reshape(-1).tolist()
    expected = sorted(wrong, key=lambda j: -confidence[j].item())[:8]
    got = mistakes.largest()
    assert [index for _, index, _, _ in got] == expected
    for p, index, true, predicted in got:
        assert true == targets[index].item() and predicted == pred[index].item() != true
        assert p == pytest.approx(confidence[index].item())


def test_largest_regression_errors():
    y = torch.arange(10, dtype=torch.float32)
    pred = y.clone()
    pred[3] += 5
    pred[7] -= 2
    mistakes = ConfidentMistakes(k=2, regression=True)
    mistakes.update(pred.unsqueeze(-1), {"index": torch.arange(10), "labels": y})
    assert [(index, round(err, 4)) for err, index, _, _ in mistakes.largest()] == [(3, 5.0), (7, 2.0)]


def footprint(obj, seen=None):
    """Bytes held by an object graph: tensor / array storage plus Python objects."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return obj.untyped_storage().nbytes()
    if isinstance(obj, np.ndarray):
        return obj.nbytes
    size = sys.getsizeof(obj)
    if isinstance(obj, dict):
        size += sum(footprint(k, seen) + footprint(v, seen) for k, v in obj.items())
    elif isinstance(obj, (list, tuple, set)):
        size += sum(footprint(x, seen) for x in obj)
    elif hasattr(obj, "__dict__"):
        size += footprint(vars(obj), seen)
    return size


def evaluate_synthetic(n, num_classes=10, batch_size=500):
    """Stream n synthetic examples through what an evaluation keeps (metrics + mistakes heap); memory used."""
    metric, mistakes = ClassificationMetrics(num_classes), ConfidentMistakes(k=10)
    g = torch.Generator().manual_seed(0)
    tracemalloc.start()
    for start in range(0, n, batch_size):
        logits = torch.randn(batch_size, num_classes, generator=g)
        labels = torch.randint(0, num_classes, (batch_size,), generator=g)
        batch = {"index": torch.arange(start, start + batch_size), "labels": labels}
        metric.update(logits, batch["labels"])
        mistakes.update(logits, batch)
        del logits, labels, batch
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    result = metric.compute()
    assert result["count"] == n
    return peak, footprint(metric) + footprint(mistakes)


def test_evaluation_memory_stays_flat_from_1k_to_100k_examples():
    evaluate_synthetic(1_000)  # warm up one-off allocations (lazy imports, caches)
    peak_small, size_small = evaluate_synthetic(1_000)
    peak_large, size_large = evaluate_synthetic(100_000)
    assert size_large < size_small + 1024, (size_small, size_large)  # a confusion matrix, a few sums, k heap entries
    assert peak_large < peak_small + 32 * 1024, (peak_small, peak_large)  # 100x the data, no growth
