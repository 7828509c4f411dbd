"""Compare finished runs: a metrics table and one plot overlaying their validation curves.

Reads only each run's `config.yaml`, `metrics.json` and `history.jsonl`; no model is loaded.

    danlu compare runs/textcnn_zh_sentiment runs/transformer_zh_sentiment --out compare.png

>>> table, path = compare_runs(["runs/a", "runs/b"], out="compare.png")   # doctest: +SKIP
>>> print(table)                                                           # doctest: +SKIP
"""
from __future__ import annotations

import json
import os

import yaml

from danlu.registry import TASKS, ConfigError

CLASSIFICATION_COLUMNS = (("test acc", ("test", "accuracy")), ("test macro F1", ("test", "macro", "f1")),
                          ("test loss", ("test", "loss")), ("val acc", ("val", "accuracy")),
                          ("baseline acc", ("baselines", "linear", "accuracy")),
                          ("vs baseline", ("baselines", "model_minus_baseline", "accuracy")))
REGRESSION_COLUMNS = (("test mse", ("test", "mse")), ("test mae", ("test", "mae")), ("test r2", ("test", "r2")),
                      ("val r2", ("val", "r2")), ("baseline r2", ("baselines", "linear", "r2")),
                      ("vs baseline", ("baselines", "model_minus_baseline", "r2")))
"""Classifiers and regressors: the test scores, and the linear baseline's on the same split (danlu.evaluate.baseline)
with the model's difference from it (– for runs trained without one)."""
SIGNED = {"vs baseline"}  # differences, written with their sign
LM_COLUMNS = (("val loss", ("val", "loss")), ("val perplexity", ("val", "perplexity")),
              ("val token acc", ("val", "accuracy")), ("test perplexity", ("test", "perplexity")))
SEQ2SEQ_COLUMNS = (("test BLEU", ("test", "bleu")), ("test chrF", ("test", "chrf")), ("test ROUGE-L", ("test", "rougeL")),
                   ("copy BLEU", ("baselines", "copy_source", "bleu")), ("lead ROUGE-L", ("baselines", "lead_sentence", "rougeL")),
                   ("test loss", ("test", "loss")))
"""Text to text: the test scores, and the baselines' on the same pairs (copy the source, its lead sentence)."""


def read_run_summary(path):
    """{name, model, task, metrics, history} of a run directory, from its files alone."""
    path = os.fspath(path)
    metrics_file = os.path.join(path, "metrics.json")
    if not os.path.isdir(path):
        raise ConfigError(f"{path}: not a run directory (it does not exist)")
    if not os.path.exists(metrics_file):
        raise ConfigError(f"{path}: no metrics.json; is the run finished? (an interrupted run resumes with: "
                          f"danlu train {path} --resume)")
    with open(metrics_file, encoding="utf-8") as f:
        metrics = json.load(f)
    config = {}
    if os.path.exists(os.path.join(path, "config.yaml")):
        with open(os.path.join(path, "config.yaml"), encoding="utf-8") as f:
            config = yaml.safe_load(f) or {}
    history = []
    if os.path.exists(os.path.join(path, "history.jsonl")):
        with open(os.path.join(path, "history.jsonl"), encoding="utf-8") as f:
            history = [json.loads(line) for line in f if line.strip()]
    return {"name": os.path.basename(os.path.normpath(path)), "path": path,
            "model": (config.get("model") or {}).get("kind", "?"), "task": config.get("task", "classification"),
            "metrics": metrics, "history": history}


def compare_runs(paths, out="compare.png"):
    """Print-ready table of the runs' metrics, and the path of the plot of their validation curves."""
    runs = [read_run_summary(p) for p in paths]
    names = _unique_names(runs)
    regression = all(r["task"] == "regression" for r in runs)
    language_models = all(r["task"] in TASKS and TASKS[r["task"]].language_model for r in runs)  # trained in steps over windows
    columns = LM_COLUMNS if language_models else REGRESSION_COLUMNS if regression else CLASSIFICATION_COLUMNS
    if any("bleu" in (r["metrics"].get("test") or {}) for r in runs):  # seq2seq runs (or LMs scored on pairs)
        columns = SEQ2SEQ_COLUMNS
    extra = ["steps", "train s", "tokens/s", "MFU"] if language_models else ["best epoch", "epochs", "train s", "samples/s"]
    header = ["run", "model", "params"] + [c for c, _ in columns] + extra
    rows = []
    for name, r in zip(names, runs):
        m = r["metrics"]
        if language_models:
            last = r["history"][-1].get("step", "–") if r["history"] else "–"
            tail = [str(m.get("steps", last)), _fmt(m.get("train_seconds"), 1), _fmt(m.get("tokens_per_s"), 0),
                    "–" if m.get("mfu") is None else f"{m['mfu']:.1%}"]
        else:
            tail = [str(m.get("best_epoch", "–")), str(m.get("epochs_run", len(r["history"]))),
                    _fmt(m.get("train_seconds"), 1), _fmt(m.get("samples_per_s"), 0)]
        rows.append([name, r["model"], f"{m.get('parameters', 0):,}"] + [_fmt(_get(m, keys), signed=c in SIGNED) for c, keys in columns] + tail)
    table = format_table(header, rows)
    from danlu.evaluate.plots import plot_compare

    path = plot_compare({name: r["history"] for name, r in zip(names, runs)}, out)
    return table, path


def format_table(header, rows):
    """Plain-text table, columns padded to their widest cell (CJK characters count double)."""
    widths = [max(_width(str(row[i])) for row in [header] + rows) for i in range(len(header))]
    def line(cells):
        return "  ".join(_pad(str(c), w, i > 1) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(header), "  ".join("-" * w for w in widths)] + [line(r) for r in rows])


def _unique_names(runs):
    """Run folder names, or their full paths when two runs share a folder name."""
    names = [r["name"] for r in runs]
    return [r["path"] if names.count(r["name"]) > 1 else r["name"] for r in runs]


def _get(d, keys):
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def _fmt(value, digits=4, signed=False):
    if value is None:
        return "–"
    return f"{value:+,.{digits}f}" if signed else f"{value:,.{digits}f}"


def _width(s):
    import unicodedata

    return sum(2 if unicodedata.east_asian_width(ch) in "WF" else 1 for ch in s)


def _pad(s, width, right):
    fill = " " * (width - _width(s))
    return fill + s if right else s + fill
