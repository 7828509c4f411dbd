"""Image classification (model.kind cnn, vit): the training job behind `danlu train`, and predict on files.

The same skeleton, Trainer, checkpoints and resume as text runs (danlu.jobs.skeleton); the run keeps its
fitted preprocessing as preprocess.json in place of a tokenizer (danlu.runs.image), and its report shows
the images: the most confident mistakes and examples per class (danlu.evaluate.image_report).

>>> run = train("configs/cnn_digits.yaml")               # doctest: +SKIP  (danlu.jobs.train.train)
"""
from __future__ import annotations

import dataclasses
import json
import os

from danlu.data.images import ImageExamples, build_image_data, encode_images, read_images
from danlu.data.sources import DataError
from danlu.files import atomic_write_text
from danlu.jobs.skeleton import Job, Plan
from danlu.models import build_model, count_parameters
from danlu.registry import ConfigError
from danlu.runs import layout
from danlu.runs.image import ImageRun
from danlu.training import distributed as dist
from danlu.training.tasks import TASKS


class ImageTrainJob(Job):
    name = "train"

    def plan(self, cfg, run_dir, resume, say):
        if cfg.task != "classification":
            raise ConfigError(f"task: image models ({cfg.model.kind}) classify; task {cfg.task!r} is not available for "
                              "images")
        data = build_image_data(cfg.data, cfg.run.seed)
        pre = data.preprocess
        say(f"data: {len(data.train)} train / {len(data.val)} val / {len(data.test)} test images, {len(data.labels)} "
            f"classes, {pre.channels_} channel(s), resized to {pre.size_[0]}x{pre.size_[1]}, model input "
            f"{pre.input_size_[0]}x{pre.input_size_[1]}" + (f", {data.skipped} bad images skipped" if data.skipped else ""))
        model = build_model(cfg.model, data.spec)
        say(f"model: {cfg.model.kind}, {count_parameters(model):,} parameters; run directory: {run_dir}")
        return Plan(cfg, model, TASKS[cfg.task](data.labels), data.train, data.val, data.test, None, data.labels,
                    files={layout.PREPROCESS: json.dumps(pre.to_dict(), indent=2) + "\n"}, data=data)

    def summarize(self, plan, history, trainer, metrics):
        data = plan.data
        summary = {"best_epoch": trainer.best_epoch, "epochs_run": len(history),
                   "data": {"train": len(data.train), "val": len(data.val), "test": len(data.test),
                            "skipped_rows": data.skipped}}
        if plan.cfg.train.baseline and "test" in metrics and dist.is_main():  # pixels + logistic regression, majority
            summary["baselines"] = image_baseline(data.train, data.test, data.labels, metrics["test"])
        return summary

    def make_run(self, cfg, model, plan, metrics):
        return ImageRun(cfg.run.dir, cfg, model, plan.data.preprocess, plan.labels, metrics)

    def collector(self, cfg, plan):
        from danlu.evaluate.image_report import ImagePredictions

        return ImagePredictions(len(plan.test))

    def report(self, run, plan, history, trainer, collector, eval_seconds, command):
        from danlu.evaluate.image_report import write_image_run_report

        write_image_run_report(run, plan.data, history, collector, eval_seconds)


def image_baseline(train, test, labels, model_metrics):
    """metrics.json's `baselines` of an image run: fitted on `train`, scored on `test` (ImageDatasets)."""
    from danlu.evaluate.baseline import image_baselines, run_baselines

    return run_baselines(lambda: image_baselines(train.pixels, train.targets, test.pixels, test.targets, labels),
                         model_metrics)


def predict_images(run, images=(), file=None, out=None, top_k=None):
    """`danlu predict RUN a.png b.jpg` and `--file`: a text file of image paths (one a line, relative to the
    list or to the working directory), a CSV / JSONL table with the run's image column, or a folder.
    Prints `label<TAB>score<TAB>image` per image, or JSON lines with --file (into `out` when given)."""
    import json

    if not images and not file:
        raise ConfigError("predict: give image files to classify, or --file FILE (a list of image paths, a table "
                          "with an image column, or a folder)")
    paths = list(images)
    if file:
        paths += _image_list(run, file)
    results = run.predict(paths, top_k=top_k)
    if not file:
        for path, result in zip(paths, results):
            print(f"{result['label']}\t{result['score']:.4f}\t{path}")
        return
    lines = [json.dumps({"image": p, **r}, ensure_ascii=False) for p, r in zip(paths, results)]
    if out:
        atomic_write_text(out, "\n".join(lines) + "\n")
        print(f"{len(lines)} predictions written to {out}")
    else:
        print("\n".join(lines))


def _image_list(run, file):
    if not os.path.exists(file):
        raise DataError(f"{file}: file not found")
    suffix = os.path.splitext(file)[1].lower()
    if os.path.isdir(file) or suffix in (".csv", ".tsv", ".jsonl", ".json", ".ndjson"):
        return list(read_images(file, dataclasses.replace(run.cfg.data, on_bad_rows="error"), need_labels=False).sources)
    base = os.path.dirname(os.path.abspath(file))
    paths = []
    with open(file, encoding="utf-8-sig") as f:
        for line in f:
            name = line.strip()
            if name and not name.startswith("#"):
                beside = os.path.join(base, name)
                paths.append(name if os.path.isabs(name) or not os.path.exists(beside) else beside)
    if not paths:
        raise DataError(f"{file}: no image paths in the list (one path a line)")
    return paths


def image_splits(run, limit=0):
    """(train, val, test) ImageDatasets of a run's own data, decoded with its saved preprocessing (not
    refitted): what compression's fine-tuning, calibration and scorecard measure on."""
    from danlu.data.images import read_image_splits

    cfg = run.cfg.data
    splits = read_image_splits(cfg, run.cfg.run.seed)
    out = []
    for name in ("train", "val", "test"):
        ex = splits[name]
        if limit:
            ex = ImageExamples(ex.sources[:limit], ex.labels[:limit], ex.origins[:limit], ex.skipped, ex.largest_pixel)
        out.append(encode_images(ex, run.preprocess, run.labels, cfg.on_bad_rows, augment=name == "train")[0])
    return out
