"""`danlu evaluate RUN --data FILE`: a run scored on data it has not seen, with its own tokenizer and labels.

A classifier or regressor is scored on a labelled file (streaming metrics, the most confident mistakes
gathered in the same pass, a report in RUN/eval/<file stem>/); a language model on a corpus (file,
folder or built-in name): loss, perplexity and token accuracy over every window.

>>> metrics = evaluate_run(load_run("runs/mine"), "reviews_2024.csv")   # doctest: +SKIP
>>> metrics["accuracy"]                                                # doctest: +SKIP
"""
from __future__ import annotations

import dataclasses
import os
import tempfile
import time

from danlu.data import encode_examples, read_split
from danlu.files import atomic_write_json
from danlu.jobs.pretrain import make_task
from danlu.registry import TASKS, ConfigError
from danlu.training.tasks import TASKS as TASK_CLASSES
from danlu.training.trainer import Trainer


def evaluate_run(run, path, out_dir=None, **data_overrides):
    """Metrics of `run` on `path`; with `out_dir`, also metrics.json and (classifiers) a report there."""
    data_cfg = dataclasses.replace(run.cfg.data, **data_overrides)
    device = str(next(run.model.parameters()).device)
    if run.cfg.task == "seq2seq" or (run.cfg.task == "causal_lm" and _pair_file(run, path, data_cfg)):
        return _evaluate_text_to_text(run, path, data_cfg, out_dir)
    if TASKS[run.cfg.task].language_model:
        from danlu.data.corpus import held_out_stream

        trainer = Trainer(run.model, make_task(run.cfg.task, run.spec), run.cfg.train, device=device)
        with tempfile.TemporaryDirectory(prefix="danlu-eval-") as tokens:
            stream = held_out_stream(path, run.tokenizer, data_cfg.block_size, run.cfg.task, tokens,
                                     data_cfg.text_column, data_cfg.encoding)
            metrics = trainer.evaluate(stream)
            del stream  # the memory map, before its folder goes
        _save(out_dir, path, metrics)
        return metrics
    if hasattr(run, "preprocess"):  # an image run: a labelled folder or table of images
        from danlu.evaluate.image_report import ImagePredictions, write_image_eval_report

        dataset, examples = run.read(path, **data_overrides)
        collector = ImagePredictions(len(dataset)) if out_dir else None
        write = write_image_eval_report
    else:
        regression = run.cfg.task == "regression"
        examples = read_split(path, data_cfg, numeric=regression)
        dataset = encode_examples(examples, run.tokenizer, run.labels, regression)
        collector = _collector(run.cfg.task) if out_dir else None
        write = _eval_report_writer()
    trainer = Trainer(run.model, TASK_CLASSES[run.cfg.task](run.labels), run.cfg.train, device=device)
    started = time.perf_counter()
    metrics = trainer.evaluate(dataset, on_batch=collector.update if collector else None)
    seconds = time.perf_counter() - started
    if out_dir and run.cfg.train.baseline:  # beside the baselines, fitted again on the run's training split
        metrics["baselines"] = _baselines(run, examples, dataset, metrics)
    _save(out_dir, path, metrics)
    if collector is not None and write is not None:  # the report, from what the same pass gathered
        write(run, path, metrics, out_dir, examples, dataset, collector, seconds)
    return metrics


def _baselines(run, examples, dataset, metrics):
    """The run's baselines scored on the evaluated file: no estimator is saved with a run (no pickles), so they
    are fitted again on its training split, read again as its config names it (seconds); when that data
    cannot be read any more, {"skipped": why}."""
    from danlu.data import DataError, read_splits
    from danlu.evaluate.baseline import run_baselines, text_baselines

    try:
        if hasattr(run, "preprocess"):
            from danlu.jobs.images import image_baseline, image_splits

            return image_baseline(image_splits(run)[0], dataset, run.labels, metrics)
        train = read_splits(run.cfg.data, run.cfg.run.seed, run.cfg.task == "regression")["train"]
    except (DataError, ConfigError, OSError) as e:
        return {"skipped": f"the run's training data could not be read again to fit it ({e})"}
    return run_baselines(lambda: text_baselines(train, examples, run.cfg.task, run.labels), metrics)


def _pair_file(run, path, data_cfg):
    """A chat run given a file of seq2seq pairs: its answers are generated and scored."""
    from danlu.data.chat import is_pair_file

    return run.cfg.finetune.base and is_pair_file(path, (data_cfg.source_column, data_cfg.target_column))


def _evaluate_text_to_text(run, path, data_cfg, out_dir):
    from danlu.jobs.seq2seq import evaluate_chat_pairs, evaluate_seq2seq, write_report

    if run.cfg.task == "causal_lm":
        metrics = evaluate_chat_pairs(run, path, data_cfg)
        _save(out_dir, path, metrics)
        return metrics
    metrics, examples = evaluate_seq2seq(run, path, data_cfg)
    _save(out_dir, path, metrics)
    if out_dir:  # scores beside the baselines, example tables
        name = os.path.splitext(os.path.basename(os.path.normpath(path)))[0]
        write_report(run, examples, [], out_dir, {name: metrics}, split=name)
    return metrics


def _save(out_dir, path, metrics):
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        atomic_write_json(os.path.join(out_dir, "metrics.json"), {"data": os.path.abspath(path), **metrics})


def _eval_report_writer():
    try:
        from danlu.evaluate.report import write_eval_report
    except ImportError:  # matplotlib missing: metrics.json only
        return None
    return write_eval_report


def _collector(task):
    try:
        from danlu.evaluate.report import mistakes_collector
    except ImportError:  # matplotlib missing: metrics.json only
        return None
    return mistakes_collector(task)
