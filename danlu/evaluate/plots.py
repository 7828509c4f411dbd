"""Plots for reports, as PNG files: training curves, confusion matrix, per-class F1, text lengths, run comparison.

Every function takes plain data (history rows, metric dicts, lists) and a path, draws on the Agg
canvas outside pyplot (no global state, no display needed), and returns the path.

>>> plot_curves(history_rows, "runs/mine/plots/curves.png")                              # doctest: +SKIP
>>> plot_confusion(metrics["confusion_matrix"], metrics["labels"], "plots/confusion.png")   # doctest: +SKIP
"""
from __future__ import annotations

import os

from danlu.evaluate.fonts import display_labels, new_figure, plot_style

TRAIN_COLOR, VAL_COLOR = "#1f77b4", "#d62728"


def plot_curves(rows, path, best=None):
    """Train vs validation loss, and the task's score (accuracy, R², perplexity), per history row;
    `best` (1-based row number) marks the row whose weights were kept."""
    monitor = score_key(rows)
    x, x_label = x_axis(rows)
    with plot_style():
        fig = new_figure(10, 4)
        loss_ax, score_ax = fig.subplots(1, 2)
        _series(loss_ax, x, rows, "train_loss", "train", TRAIN_COLOR)
        _series(loss_ax, x, rows, "val_loss", "validation", VAL_COLOR)
        loss_ax.set(title="loss", xlabel=x_label, ylabel="loss")
        if monitor:
            _series(score_ax, x, rows, f"train_{monitor}", "train", TRAIN_COLOR)
            _series(score_ax, x, rows, f"val_{monitor}", "validation", VAL_COLOR)
            score_ax.set(title=monitor, xlabel=x_label, ylabel=monitor)
        if best and 1 <= best <= len(rows) and len(rows) > 1:
            for ax in (loss_ax, score_ax):
                ax.axvline(x[best - 1], color="gray", linestyle=":", label=f"kept ({x_label} {x[best - 1]})")
        for ax in (loss_ax, score_ax):
            ax.xaxis.get_major_locator().set_params(integer=True)
            if ax.get_legend_handles_labels()[0]:
                ax.legend()
        return save_figure(fig, path)


def score_key(rows):
    """The metric next to the loss in history rows: val_accuracy -> "accuracy" (or r2, perplexity, ...)."""
    keys = [k for r in rows for k in r]
    for prefix in ("val_", "train_"):
        found = next((k[len(prefix):] for k in keys if k.startswith(prefix) and k != f"{prefix}loss"), None)
        if found:
            return found
    return None


def x_axis(rows):
    """Epochs, or optimizer steps when a run logs several rows per epoch (eval intervals)."""
    epochs = [r.get("epoch") for r in rows]
    if len(set(epochs)) == len(epochs) and None not in epochs:
        return epochs, "epoch"
    return [r.get("step", i + 1) for i, r in enumerate(rows)], "step"


def plot_confusion(matrix, labels, path, title="confusion matrix"):
    """Heatmap of counts, rows true and columns predicted; cells are coloured by the share of their row."""
    import numpy as np

    cm = np.asarray(matrix, dtype=np.int64)
    n = len(cm)
    share = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    size = min(4 + 0.5 * n, 16)
    with plot_style():
        names = display_labels(labels)
        fig = new_figure(size + 1.5, size)
        ax = fig.subplots()
        image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
        fig.colorbar(image, ax=ax, label="share of the true class")
        ax.set(xticks=range(n), yticks=range(n), xlabel="predicted", ylabel="true", title=title)
        ax.set_xticklabels(names, rotation=45 if n > 4 else 0, ha="right" if n > 4 else "center")
        ax.set_yticklabels(names)
        ax.grid(False)
        if n <= 30:
            fontsize = 11 if n <= 8 else 7
            for i in range(n):
                for j in range(n):
                    text = f"{cm[i, j]}\n{share[i, j]:.0%}" if n <= 8 else str(cm[i, j])
                    ax.text(j, i, text, ha="center", va="center", fontsize=fontsize,
                            color="white" if share[i, j] > 0.5 else "black")
        return save_figure(fig, path)


def plot_per_class(per_class, path, key="f1"):
    """Horizontal bars of one per-class metric (F1 by default), with the support of each class."""
    labels = list(per_class)
    values = [per_class[x][key] for x in labels]
    with plot_style():
        names = display_labels(labels)
        fig = new_figure(7, 1.2 + 0.45 * len(labels))
        ax = fig.subplots()
        bars = ax.barh(range(len(labels)), values, color=VAL_COLOR)
        ax.set(yticks=range(len(labels)), xlim=(0, 1.1), xlabel=key, title=f"per-class {key}")
        ax.set_yticklabels([f"{name} (n={per_class[x]['support']})" for name, x in zip(names, labels)])
        ax.invert_yaxis()
        for bar, v in zip(bars, values):
            ax.text(bar.get_width() + 0.01, bar.get_y() + bar.get_height() / 2, f"{v:.3f}", va="center")
        return save_figure(fig, path)


def plot_lengths(lengths, path, max_length=0, unit="characters"):
    """Histogram of text lengths per split: {split: [length, ...]}; a dashed line marks where texts are cut."""
    import numpy as np

    with plot_style():
        fig = new_figure(7, 3.5)
        ax = fig.subplots()
        everything = np.concatenate([np.asarray(v) for v in lengths.values() if len(v)] or [np.zeros(1)])
        top = max(1, int(np.percentile(everything, 99)), max_length)
        bins = np.linspace(0, top, 41)
        for name, values in lengths.items():
            values = np.minimum(np.asarray(values), top)
            weights = np.full(len(values), 1 / max(len(values), 1))  # each split sums to 1, whatever its size
            ax.hist(values, bins=bins, weights=weights, histtype="step", linewidth=1.8, label=f"{name} ({len(values)})")
        if max_length:
            ax.axvline(max_length, color="black", linestyle="--", linewidth=1, label=f"max_length {max_length}")
        ax.set(xlabel=f"{unit} per text (longer ones in the last bin)", ylabel="share of texts", title="text lengths",
               xlim=(0, top))
        ax.legend()
        return save_figure(fig, path)


def plot_compare(histories, path):
    """Validation curves of several runs overlaid: {run name: history rows}."""
    everything = [r for rows in histories.values() for r in rows]
    monitor = score_key(everything)
    x_label = "epoch" if all(x_axis(rows)[1] == "epoch" for rows in histories.values()) else "step"
    with plot_style():
        fig = new_figure(10, 4)
        loss_ax, score_ax = fig.subplots(1, 2)
        for name, rows in histories.items():
            x = [r.get(x_label, i + 1) for i, r in enumerate(rows)]
            line = _series(loss_ax, x, rows, "val_loss", name, None)
            if monitor:
                _series(score_ax, x, rows, f"val_{monitor}", name, line.get_color() if line else None)
        loss_ax.set(title="validation loss", xlabel=x_label, ylabel="loss")
        score_ax.set(title=f"validation {monitor or ''}", xlabel=x_label, ylabel=monitor or "")
        for ax in (loss_ax, score_ax):
            ax.xaxis.get_major_locator().set_params(integer=True)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8)
        return save_figure(fig, path)


def _series(ax, x, rows, key, label, color):
    points = [(e, r[key]) for e, r in zip(x, rows) if r.get(key) is not None]
    if not points:
        return None
    xs, ys = zip(*points)
    (line,) = ax.plot(xs, ys, marker="o", markersize=4, label=label, color=color)
    return line


def save_figure(fig, path):
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp.png"
    fig.savefig(tmp, format="png")
    os.replace(tmp, path)  # a reader never sees half a PNG
    return path


def plot_step_curves(rows, plots_dir):
    """A language model's loss and perplexity per optimizer step, train and validation:
    [("loss", plots/loss.png), ("perplexity", plots/perplexity.png)]."""
    steps = [r["step"] for r in rows]
    out = []
    for key, log in (("loss", False), ("perplexity", True)):
        with plot_style():
            fig = new_figure(7, 4)
            ax = fig.subplots()
            for split, color in (("train", "#1f77b4"), ("val", "#d62728")):
                _series(ax, steps, rows, f"{split}_{key}", "train" if split == "train" else "validation", color)
            if log and any(r.get("val_perplexity") for r in rows):
                ax.set_yscale("log")
            ax.set(xlabel="optimizer step", ylabel=key, title=f"{key} (per {'token' if not log else 'token, exp of loss'})")
            if ax.get_legend_handles_labels()[0]:
                ax.legend()
            out.append((key, save_figure(fig, os.path.join(plots_dir, f"{key}.png"))))
    return out
