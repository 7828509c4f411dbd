"""Strong simple baselines beside every classifier and regressor: is the model any good?

A run scores two scikit-learn baselines on its own test split, fitted on its own training split:

- **linear**: TF-IDF n-grams + logistic regression (classification) or ridge regression (regression).
  Texts that are mostly Chinese / Japanese (danlu.data.tokenizer.choose_kind) use character 1-3-grams;
  alphabetic texts word 1-2-grams plus character 2-5-grams inside word boundaries (`char_wb`). Sublinear tf
  (1 + log tf) and a cap on the features keep it to seconds. Wang & Manning (2012), "Baselines and Bigrams",
  show such n-gram linear models are hard to beat on sentiment and topic classification.
  Image runs: logistic regression on the pixels, average-pooled to at most 16x16 and standardised.
- **majority** (classification): the most frequent training class for every example, scored with the
  training class frequencies as its probabilities; **mean** (regression): the training mean.

Both are scored with the metrics the model is scored with (danlu.evaluate.metrics), so the numbers line up.
Nothing is saved but the numbers (no pickled estimators): `danlu evaluate RUN --data FILE` fits the
baselines again on the run's training split, read again as the run's config names it.

>>> baselines = text_baselines(data.examples["train"], data.examples["test"], "classification", labels)  # doctest: +SKIP
>>> baselines["linear"]["accuracy"], baselines["majority"]["accuracy"]                                  # doctest: +SKIP
(0.8538, 0.5009)
"""
from __future__ import annotations

import time

import numpy as np
import torch

from danlu.evaluate.metrics import ClassificationMetrics, RegressionMetrics

MAX_FEATURES = 200_000  # per vectorizer: fast on CPU, and more adds nothing on review-sized sets
MIN_DF_FROM = 100  # training texts from which an n-gram must occur in two of them to be a feature
C = 4.0  # inverse regularisation of the logistic regression (docs/evaluation.md: C 1-30 within 0.01 on zh_sentiment)
MAX_IMAGE_SIDE = 16  # pixels per side the image baseline sees
MAX_IMAGE_TRAIN = 10_000  # training images the image baseline fits on (a seeded sample beyond that)
KEPT = ("accuracy", "loss", "count", "macro", "weighted", "mse", "mae", "r2")  # what metrics.json keeps of a score


NOT_INSTALLED = "scikit-learn is not installed (pip install scikit-learn)"


def run_baselines(fit, model_metrics):
    """`fit()` (text_baselines or image_baselines, bound to a split) beside `model_metrics`, for metrics.json;
    {"skipped": why} when scikit-learn is missing."""
    try:
        return compare_with_model(model_metrics, fit())
    except ImportError:
        return {"skipped": NOT_INSTALLED}
    except ValueError as e:  # e.g. no n-gram left: texts of punctuation only
        return {"skipped": f"scikit-learn could not fit it: {e}"}


def text_baselines(train, test, task, labels=()):
    """{"linear": scores, "majority" | "mean": scores} of `test` (Examples) for baselines fitted on `train`
    (Examples); `labels`: the run's classes in id order. Each score carries `name`, a description."""
    started = time.perf_counter()
    vectorizer, features = text_vectorizer(train.texts)
    x_train = vectorizer.fit_transform(train.texts)
    x_test = vectorizer.transform(test.texts)
    return _fit_and_score(x_train, train.labels, x_test, test.labels, task, labels, f"TF-IDF {features}", started)


def image_baselines(train_pixels, train_labels, test_pixels, test_labels, labels):
    """The same for images: `*_pixels` (N, C, H, W) uint8 arrays or tensors, `*_labels` class ids."""
    started = time.perf_counter()
    rng = np.random.default_rng(0)
    keep = np.arange(len(train_labels))
    if len(keep) > MAX_IMAGE_TRAIN:
        keep = np.sort(rng.choice(len(keep), MAX_IMAGE_TRAIN, replace=False))
    x_train, shape = _pooled(train_pixels, keep)
    x_test, _ = _pooled(test_pixels)
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6  # standardised with the training split's statistics
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    y_train = [labels[int(i)] for i in np.asarray(train_labels)[keep]]
    y_test = [labels[int(i)] for i in np.asarray(test_labels)]
    sample = f", {len(keep):,} of the training images" if len(keep) < len(train_labels) else ""
    return _fit_and_score(x_train, y_train, x_test, y_test, "classification", labels,
                          f"pixels average-pooled to {shape[0]}x{shape[1]}{sample}", started)


def text_vectorizer(texts):
    """(an unfitted scikit-learn vectorizer, its features in words) suited to the script of `texts`."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.pipeline import FeatureUnion

    from danlu.data.tokenizer import choose_kind

    texts = list(texts)
    common = {"sublinear_tf": True, "max_features": MAX_FEATURES, "dtype": np.float32,
              "min_df": 2 if len(texts) >= MIN_DF_FROM else 1}  # an n-gram seen in one text only is noise
    if choose_kind(texts)[0] == "char":  # no spaces between words: character n-grams are the words
        return TfidfVectorizer(analyzer="char", ngram_range=(1, 3), **common), "character 1-3-grams"
    words = TfidfVectorizer(analyzer="word", ngram_range=(1, 2), token_pattern=r"(?u)\b\w+\b", **common)
    pieces = TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5), **common)
    return FeatureUnion([("words", words), ("pieces", pieces)]), "word 1-2-grams + character 2-5-grams"


def _fit_and_score(x_train, y_train, x_test, y_test, task, labels, features, started):
    if task == "regression":
        from sklearn.linear_model import Ridge

        y = np.asarray(y_train, dtype=np.float64)
        predicted = Ridge(alpha=1.0).fit(x_train, y).predict(x_test)
        linear = {**_regression_scores(predicted, y_test), "name": f"{features} + ridge regression"}
        mean = {**_regression_scores(np.full(len(y_test), y.mean()), y_test),
                "name": f"the training mean ({y.mean():.4g}) for every example"}
        linear["seconds"] = time.perf_counter() - started
        return {"linear": linear, "mean": mean}
    from sklearn.linear_model import LogisticRegression

    index = {label: i for i, label in enumerate(labels)}
    y = np.asarray([index[v] for v in y_train])
    targets = np.asarray([index.get(v, -1) for v in y_test])
    known = targets >= 0  # a test label unknown to training is the model's error to report, not the baseline's
    classes = np.unique(y)
    if len(classes) < 2:  # one class in training: the linear model is the majority line
        model_probs = np.zeros((len(targets), len(labels)))
        model_probs[:, classes[0]] = 1.0
    else:
        model = LogisticRegression(C=C, max_iter=1000)  # lbfgs, multinomial: 1.8 s on zh_sentiment, liblinear 3.1 s
        model.fit(x_train, y)
        model_probs = np.zeros((len(targets), len(labels)))
        model_probs[:, model.classes_] = model.predict_proba(x_test)
    prior = np.bincount(y, minlength=len(labels)) / len(y)
    linear = {**_classification_scores(model_probs[known], targets[known], labels),
              "name": f"{features} + logistic regression (C={C:g})", "seconds": time.perf_counter() - started}
    majority = {**_classification_scores(np.tile(prior, (int(known.sum()), 1)), targets[known], labels),
                "name": f"the most frequent training class ({labels[int(prior.argmax())]}) for every example"}
    return {"linear": linear, "majority": majority}


def _classification_scores(probs, targets, labels):
    metrics = ClassificationMetrics(len(labels), labels)
    if len(targets):
        log_probs = torch.from_numpy(np.log(np.clip(probs, 1e-12, 1.0)))  # (N, C): their cross-entropy is the log loss
        metrics.update(log_probs, torch.from_numpy(targets).long())
    return {k: v for k, v in metrics.compute().items() if k in KEPT}


def _regression_scores(predicted, targets):
    metrics = RegressionMetrics()
    metrics.update(torch.as_tensor(np.asarray(predicted, dtype=np.float64)),
                   torch.as_tensor(np.asarray(targets, dtype=np.float64)))
    return {k: v for k, v in metrics.compute().items() if k in KEPT}


def _pooled(pixels, keep=None):
    """(N, C * h * w) float32 of uint8 images (N, C, H, W) average-pooled to at most MAX_IMAGE_SIDE a side."""
    x = torch.as_tensor(np.asarray(pixels) if not torch.is_tensor(pixels) else pixels)
    if keep is not None:
        x = x[torch.as_tensor(keep)]
    h, w = x.shape[-2:]
    size = (min(h, MAX_IMAGE_SIDE), min(w, MAX_IMAGE_SIDE))
    x = torch.nn.functional.adaptive_avg_pool2d(x.float() / 255.0, size)  # (N, C, h, w)
    return x.reshape(len(x), -1).numpy(), size


# ------------------------------------------------------------------------------------------------
# beside the model: metrics.json, the summary line, the report section


def compare_with_model(model_metrics, baselines):
    """`baselines` with `model_minus_baseline`: the model's score less the linear baseline's (accuracy and
    macro F1; R² and MAE for regression), as metrics.json keeps it for `danlu compare`."""
    linear = baselines.get("linear")
    if not linear or not model_metrics:
        return baselines
    if "r2" in linear:
        diff = {"r2": model_metrics["r2"] - linear["r2"], "mae": model_metrics["mae"] - linear["mae"]}
    else:
        diff = {"accuracy": model_metrics["accuracy"] - linear["accuracy"],
                "macro_f1": model_metrics["macro"]["f1"] - linear["macro"]["f1"]}
    return {**baselines, "model_minus_baseline": diff}


def baseline_line(baselines):
    """One line for a terminal: the linear baseline's score and the model's difference, or why there is none
    ("" for anything else, e.g. a text-to-text run's copy-the-source baselines)."""
    if not _ours(baselines):
        return ""
    if "skipped" in baselines:
        return f"baseline: none ({baselines['skipped']})"
    linear, diff = baselines["linear"], baselines.get("model_minus_baseline", {})
    if "r2" in linear:
        text = f"baseline: r2 {linear['r2']:.4f}  mae {linear['mae']:.4f} ({linear['name']}); mean predictor r2 " \
               f"{baselines['mean']['r2']:.4f}"
        return text + (f"; model r2 {diff['r2']:+.4f} vs the baseline" if diff else "")
    text = f"baseline: accuracy {linear['accuracy']:.4f}  macro_f1 {linear['macro']['f1']:.4f} ({linear['name']}); " \
           f"majority class {baselines['majority']['accuracy']:.4f}"
    return text + (f"; model accuracy {diff['accuracy']:+.4f} vs the baseline" if diff else "")


def baseline_blocks(model_metrics, baselines, split="test"):
    """The report's "Baseline" section (blocks, as danlu.evaluate.report renders them): the model beside the
    baselines on the same examples, with the difference."""
    if not _ours(baselines):
        return []
    blocks = [("h2", "Baseline")]
    if "skipped" in baselines:
        return blocks + [("p", f"No baseline: {baselines['skipped']}.")]
    regression = "r2" in baselines["linear"]
    other = "mean" if regression else "majority"
    keys = [("mse", None), ("mae", None), ("r2", None)] if regression else \
        [("accuracy", None), ("macro", "f1"), ("loss", None)]
    header = ["", *("macro F1" if sub else "log loss" if key == "loss" else key for key, sub in keys)]

    def cells(m):
        return [_number(m.get(key) if sub is None else (m.get(key) or {}).get(sub)) for key, sub in keys]

    linear = baselines["linear"]
    rows = [["**model**", *cells(model_metrics)], [f"linear baseline: {linear['name']}", *cells(linear)],
            [f"{other}: {baselines[other]['name']}", *cells(baselines[other])],
            ["model − linear baseline", *(_signed(None if m is None or b is None else m - b)
                                           for m, b in zip(_values(model_metrics, keys), _values(linear, keys)))]]
    fitted = f"fitted on the run's training split in {linear['seconds']:.1f} s" if "seconds" in linear else ""
    note = (f"The same {split} examples, scored by scikit-learn baselines {fitted}. A model below the linear "
            "baseline does worse than a linear model on simple features (n-grams, pixels); `train.baseline: false` "
            "turns this off.")
    return blocks + [("p", note), ("table", header, rows)]


def _ours(baselines):
    return isinstance(baselines, dict) and ("linear" in baselines or "skipped" in baselines)


def _values(m, keys):
    return [m.get(key) if sub is None else (m.get(key) or {}).get(sub) for key, sub in keys]


def _number(v):
    return "–" if v is None else f"{v:.4f}"


def _signed(v):
    return "–" if v is None else f"{v:+.4f}"
