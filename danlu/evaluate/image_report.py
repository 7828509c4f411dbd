"""The report of an image run: the text report's curves, metrics and confusion matrix, plus the images.

Two figures the text report has no counterpart for: a grid of the most confident mistakes, each image shown
with its true and predicted label and the probability given to the wrong answer, and a few correctly
classified examples per class. `image_sections` returns those as report blocks (markdown lines and PNG
paths), so any report writer can place them.

>>> predictions = ImagePredictions(len(test))
>>> trainer.evaluate(test, on_batch=predictions.update)                          # doctest: +SKIP
>>> blocks, pngs = image_sections(predictions, test.pixels, labels, "plots", "test")  # doctest: +SKIP
"""
from __future__ import annotations

import os
import time

import torch

from danlu.evaluate.baseline import baseline_blocks
from danlu.evaluate.report import (curves_section, metric_figures, metrics_section, plot, read_history,
                                   timing_section, write_blocks)

TOP_MISTAKES = 16
PER_CLASS = 6


class ImagePredictions:
    """Every evaluated image's true class, predicted class and top probability, filled batch by batch
    (three numbers an image: small next to the images themselves)."""

    def __init__(self, n):
        self.true = torch.full((n,), -1, dtype=torch.long)
        self.predicted = torch.full((n,), -1, dtype=torch.long)
        self.score = torch.zeros(n)

    @torch.no_grad()
    def update(self, outputs, batch):
        if "labels" not in batch:
            return
        index = batch["index"].cpu()
        score, predicted = outputs.detach().float().softmax(-1).max(-1)  # (B,), (B,)
        self.true[index], self.predicted[index], self.score[index] = batch["labels"].cpu(), predicted.cpu(), score.cpu()

    def mistakes(self, k=TOP_MISTAKES):
        """Indices of the k wrong predictions made with the highest probability, most confident first."""
        wrong = torch.nonzero((self.predicted != self.true) & (self.true >= 0)).reshape(-1)
        order = torch.argsort(self.score[wrong], descending=True, stable=True)
        return wrong[order][:k].tolist()

    def examples(self, label, k=PER_CLASS):
        """Up to k correctly classified images of class `label`, most confident first."""
        right = torch.nonzero((self.predicted == label) & (self.true == label)).reshape(-1)
        order = torch.argsort(self.score[right], descending=True, stable=True)
        return right[order][:k].tolist()


def image_sections(predictions, pixels, labels, plots_dir, split, origins=()):
    """Report blocks for the mistakes grid and the per-class examples -> (blocks, PNG paths)."""
    blocks, pngs = [], []
    title = f"Most confident mistakes ({split})"
    wrong = predictions.mistakes()
    if not wrong:
        blocks += [("h2", title), ("p", "None: every image was predicted correctly.")]
    else:
        captions = [f"true {labels[predictions.true[i]]}\npredicted {labels[predictions.predicted[i]]} "
                    f"({predictions.score[i]:.2f})" for i in wrong]
        path = plot_image_grid(pixels[wrong], captions, os.path.join(plots_dir, "mistakes.png"))
        pngs.append(path)
        rows = [[str(n + 1), _origin(origins, i), str(labels[predictions.true[i]]), str(labels[predictions.predicted[i]]),
                 f"{predictions.score[i]:.3f}"] for n, i in enumerate(wrong)]
        blocks += [("h2", title),
                   ("p", "The images the model got wrong with the highest probability on its (wrong) answer, as "
                         "the model saw them after resizing: often a badly written or mislabelled image, or a "
                         "pattern the model has not learned."),
                   ("image", path, title), ("table", ["#", "image", "true", "predicted", "probability"], rows)]
    chosen, captions = [], []
    for c, label in enumerate(labels):
        for i in predictions.examples(c):
            chosen.append(i)
            captions.append(f"{label} ({predictions.score[i]:.2f})")
    if chosen:
        path = plot_image_grid(pixels[chosen], captions, os.path.join(plots_dir, "examples_per_class.png"),
                               columns=PER_CLASS)
        pngs.append(path)
        blocks += [("h2", f"Examples per class ({split})"),
                   ("p", f"Up to {PER_CLASS} correctly classified images of each class, most confident first."),
                   ("image", path, "Examples per class")]
    return blocks, pngs


def plot_image_grid(pixels, captions, path, columns=8):
    """uint8 images (N, C, H, W) in a grid with a caption under each -> the PNG's path."""
    from danlu.evaluate.fonts import new_figure, plot_style
    from danlu.evaluate.plots import save_figure

    n = len(pixels)
    columns = max(1, min(columns, n))
    rows = -(-n // columns)
    with plot_style():
        fig = new_figure(1.5 * columns, 1.75 * rows)
        axes = fig.subplots(rows, columns, squeeze=False)
        for k, ax in enumerate(axes.flat):
            ax.axis("off")
            if k >= n:
                continue
            image = pixels[k].permute(1, 2, 0).numpy()  # (H, W, C)
            if image.shape[2] == 1:
                ax.imshow(image[:, :, 0], cmap="gray", vmin=0, vmax=255, interpolation="nearest")
            else:
                ax.imshow(image, interpolation="nearest")
            ax.set_title(captions[k], fontsize=8)
        return save_figure(fig, path)


def write_image_run_report(run, data, history, predictions, eval_seconds):
    """report.md / report.html of a freshly trained image run, into the run directory."""
    plots = os.path.join(run.path, "plots")
    rows = list(history)
    test = run.metrics["test"]
    best = run.metrics.get("best_epoch") if run.cfg.train.restore_best else None
    figures = {"curves": plot("plot_curves", rows, os.path.join(plots, "curves.png"), best) if rows else None}
    figures.update(metric_figures(test, plots, "test"))
    blocks = [("h1", f"Run report: {os.path.basename(os.path.normpath(run.path))}"),
              ("p", f"Run directory `{run.path}`; written {time.strftime('%Y-%m-%d %H:%M')}.")]
    blocks += _config_blocks(run)
    blocks += _data_blocks(run, {"train": data.train, "val": data.val, "test": data.test}, data.skipped)
    blocks += curves_section(rows, figures["curves"])
    blocks += metrics_section({"validation": run.metrics.get("val"), "test": test}, figures, False)
    blocks += baseline_blocks(test, run.metrics.get("baselines"))
    blocks += image_sections(predictions, data.test.pixels, run.labels, plots, "test", data.test.origins)[0]
    blocks += timing_section(run, rows, eval_seconds, len(data.test))
    return write_blocks(blocks, run.path)


def write_image_eval_report(run, data_path, metrics, out_dir, examples, dataset, predictions, eval_seconds):
    """The report of an image run evaluated on a labelled folder or table (`dataset`, read from `examples`),
    into `out_dir`; `predictions` were gathered while `metrics` were computed."""
    plots = os.path.join(out_dir, "plots")
    rows = read_history(run.path)
    best = run.metrics.get("best_epoch") if run.cfg.train.restore_best else None
    figures = {"curves": plot("plot_curves", rows, os.path.join(plots, "curves.png"), best) if rows else None}
    name = os.path.basename(os.path.normpath(data_path))
    figures.update(metric_figures(metrics, plots, name))
    blocks = [("h1", f"Evaluation report: {os.path.basename(os.path.normpath(run.path))} on {name}"),
              ("p", f"Run `{run.path}` evaluated on `{os.path.abspath(data_path)}`; written "
                    f"{time.strftime('%Y-%m-%d %H:%M')}.")]
    blocks += _config_blocks(run)
    blocks += _data_blocks(run, {"evaluated": dataset}, examples.skipped)
    blocks += curves_section(rows, figures["curves"], note="Curves of the run's training, for reference.")
    blocks += metrics_section({name: metrics}, figures, False)
    blocks += baseline_blocks(metrics, metrics.get("baselines"), name)
    blocks += image_sections(predictions, dataset.pixels, run.labels, plots, name, dataset.origins)[0]
    blocks += timing_section(run, rows, eval_seconds, len(dataset))
    return write_blocks(blocks, out_dir)


def _config_blocks(run):
    cfg, pre = run.cfg, run.preprocess
    model = ", ".join(f"{k} {v}" for k, v in vars(cfg.model).items() if k != "kind" and v != "")
    augment = [x for x in (f"pad-and-crop {pre.pad_crop} px" if pre.pad_crop else "",
                           "random crop" if pre.crop else "", "left-right flip" if pre.flip else "") if x]
    rows = [["task", cfg.task], ["data", f"`{cfg.data.train}`"], ["model", f"{cfg.model.kind} ({model})"],
            ["image", f"{pre.channels_} channel(s), resized to {pre.size_[0]}x{pre.size_[1]}, model input "
                      f"{pre.input_size_[0]}x{pre.input_size_[1]}"],
            ["normalisation", (f"mean {_floats(pre.mean_)}, std {_floats(pre.std_)} (training split)"
                               if pre.normalize else "none (pixels / 255)")],
            ["augmentation (training only)", ", ".join(augment) or "none"],
            ["training", f"{cfg.train.epochs} epochs, batch {cfg.train.batch_size}, {cfg.train.optimizer} "
                         f"lr {cfg.train.lr}, {cfg.train.schedule} schedule"]]
    return [("h2", "Configuration"), ("table", ["", ""], rows)]


def _data_blocks(run, datasets, skipped):
    labels = run.labels
    header = ["split", "images"] + [str(x) for x in labels]
    rows = []
    for name, ds in datasets.items():
        counts = torch.bincount(torch.from_numpy(ds.targets), minlength=len(labels)).tolist() if ds.targets is not None else []
        rows.append([name, str(len(ds))] + [str(c) for c in counts])
    note = f"{skipped} unreadable images were skipped (data.on_bad_rows=skip)." if skipped else ""
    return [("h2", "Data"), ("p", "Images per split and class."), ("table", header, rows), ("p", note)]


def _origin(origins, i):
    return f"`{os.path.basename(str(origins[i]))}`" if i < len(origins) else str(i)


def _floats(values):
    return "[" + ", ".join(f"{v:.3f}" for v in values) + "]"
