"""The `danlu` command: a table of verbs, one per stage of a model's life.

    danlu train configs/seed_lstm.yaml train.epochs=3 run.dir=runs/mine
    danlu evaluate runs/mine --data other.csv
    danlu predict runs/mine "质量很好，物流也快" "太差了，再也不买"
    danlu info runs/mine

Bad input ends with one clear paragraph and exit status 2; `--debug` shows the traceback.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from danlu.registry import ConfigError


def cmd_train(args):
    from danlu.pipeline import train

    run = train(args.config, *args.overrides, resume=args.resume, overwrite=args.overwrite)
    test = run.metrics["test"]
    print(_metrics_line("test", test))
    print(f"run directory: {run.path}")


def cmd_evaluate(args):
    from danlu.files import atomic_write_json
    from danlu.runs import load_run

    run = load_run(args.run, device=args.device)
    overrides = {k: v for k, v in (("text_column", args.text_column), ("label_column", args.label_column)) if v}
    metrics = run.evaluate(args.data, **overrides)
    out_dir = os.path.join(run.path, "eval", _stem(args.data))
    os.makedirs(out_dir, exist_ok=True)
    atomic_write_json(os.path.join(out_dir, "metrics.json"), {"data": os.path.abspath(args.data), **metrics})
    try:
        from danlu.evaluate.report import write_eval_report
    except ImportError:
        write_eval_report = None
    if write_eval_report is not None:
        write_eval_report(run, args.data, metrics, out_dir, **overrides)
    print(_metrics_line(os.path.basename(args.data), metrics))
    print(f"written to {out_dir}")


def cmd_predict(args):
    from danlu.runs import load_run

    run = load_run(args.run, device=args.device)
    if args.file:
        return _predict_file(run, args)
    if not args.texts:
        raise ConfigError("predict: give texts to classify, or --file FILE (CSV / TSV / JSONL with a text column)")
    for text, result in zip(args.texts, run.predict(args.texts, top_k=args.top_k)):
        if "value" in result:
            print(f"{result['value']:.4f}\t{text}")
        else:
            print(f"{result['label']}\t{result['score']:.4f}\t{text}")


def _predict_file(run, args):
    from danlu.data.sources import read_examples
    from danlu.files import atomic_write_text

    column = args.text_column or run.cfg.data.text_column
    examples = read_examples(args.file, column, need_labels=False, on_bad_rows="error")
    results = run.predict(examples.texts, top_k=args.top_k)
    lines = [json.dumps({"text": t, **r}, ensure_ascii=False) for t, r in zip(examples.texts, results)]
    if args.out:
        atomic_write_text(args.out, "\n".join(lines) + "\n")
        print(f"{len(lines)} predictions written to {args.out}")
    else:
        print("\n".join(lines))


def cmd_info(args):
    from danlu.models import count_parameters
    from danlu.runs import load_run

    run = load_run(args.run)
    cfg = run.cfg
    size = os.path.getsize(os.path.join(run.path, "model.safetensors"))
    print(f"run:        {run.path}")
    print(f"task:       {cfg.task}")
    print(f"model:      {cfg.model.kind}, {count_parameters(run.model):,} parameters, {size / 1e6:.2f} MB on disk")
    print(f"data:       {cfg.data.train} (text column {cfg.data.text_column!r}, label column {cfg.data.label_column!r})")
    print(f"tokenizer:  {cfg.data.tokenizer.kind}, vocabulary {run.tokenizer.vocab_size_}, max length {run.tokenizer.max_length}")
    if run.labels:
        print(f"labels:     {', '.join(run.labels)}")
    print(f"training:   {cfg.train.epochs} epochs, batch {cfg.train.batch_size}, {cfg.train.optimizer} lr {cfg.train.lr}")
    for split in ("val", "test"):
        if split in run.metrics:
            print(_metrics_line(split, run.metrics[split]))
    files = sorted(os.listdir(run.path))
    print(f"files:      {', '.join(files)}")


def _metrics_line(name, m):
    keys = [k for k in ("accuracy", "loss", "mse", "mae", "r2", "perplexity") if k in m]
    parts = [f"{k} {m[k]:.4f}" for k in keys]
    if "macro" in m:
        parts.append(f"macro_f1 {m['macro']['f1']:.4f}")
    return f"{name}: " + "  ".join(parts) + (f"  ({m['count']} examples)" if "count" in m else "")


def _stem(path):
    return os.path.splitext(os.path.basename(os.path.normpath(path)))[0] or "data"


# ------------------------------------------------------------------------------------------------


def _add_config_args(p):
    p.add_argument("config", help="a YAML config file (or a run directory, to resume it)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.epochs=3 run.dir=runs/mine")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from its last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run directory")


def _add_run_arg(p):
    p.add_argument("run", help="a run directory, e.g. runs/seed_lstm")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto (default: cpu)")


def build_parser():
    parser = argparse.ArgumentParser(prog="danlu", description="danlu 丹炉: train, evaluate and serve deep-learning models.")
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for verb, (fn, help_text, add_args) in VERBS.items():
        p = sub.add_parser(verb, help=help_text, description=help_text)
        add_args(p)
        p.set_defaults(func=fn)
    return parser


def _train_args(p):
    _add_config_args(p)


def _evaluate_args(p):
    _add_run_arg(p)
    p.add_argument("--data", required=True, help="labelled CSV / TSV / JSONL file or class folder")
    p.add_argument("--text-column", help="text column (default: the run's data.text_column)")
    p.add_argument("--label-column", help="label column (default: the run's data.label_column)")


def _predict_args(p):
    _add_run_arg(p)
    p.add_argument("texts", nargs="*", help="texts to classify")
    p.add_argument("--file", help="CSV / TSV / JSONL file of texts to classify")
    p.add_argument("--out", help="write JSON lines here (default: print them)")
    p.add_argument("--text-column", help="text column of --file (default: the run's data.text_column)")
    p.add_argument("--top-k", type=int, default=None, help="list only the k most probable labels")


def _info_args(p):
    p.add_argument("run", help="a run directory")


VERBS = {
    "train": (cmd_train, "train and evaluate a model from a YAML config", _train_args),
    "evaluate": (cmd_evaluate, "evaluate a run on a labelled file", _evaluate_args),
    "predict": (cmd_predict, "classify texts with a run", _predict_args),
    "info": (cmd_info, "describe a run: model, data, metrics, files", _info_args),
}


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        args.func(args)
    except KeyboardInterrupt:
        print("interrupted; resume with: danlu train CONFIG --resume", file=sys.stderr)
        return 130
    except (ConfigError, FileNotFoundError, PermissionError, IsADirectoryError) as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
