"""The `danlu` command: a table of verbs, one per stage of a model's life.

    danlu train configs/seed_lstm.yaml train.epochs=3 run.dir=runs/mine
    danlu evaluate runs/mine --data other.csv
    danlu predict runs/mine "质量很好，物流也快" "太差了，再也不买"
    danlu info runs/mine
    danlu tune configs/tune_zh_sentiment.yaml --trials 20 --jobs 2

Bad input ends with one clear paragraph and exit status 2; `--debug` shows the traceback. The flags of
`generate`, `chat` and `serve` are made from the fields of SamplingConfig and ServeOptions: their names,
defaults, checks and help are those of the dataclasses.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import warnings

from danlu import __version__
from danlu.registry import ConfigError


def cmd_train(args):
    from danlu.jobs.train import train

    from danlu.training.distributed import is_main

    run = train(args.config, *args.overrides, resume=args.resume, overwrite=args.overwrite)
    if is_main():  # under torchrun every process trains; one reports
        print(_metrics_line("test", run.metrics["test"]))
        _print_beside(run.metrics)
        data = run.metrics.get("data") or {}
        if data.get("tokenizer_choice"):
            print(f"tokenizer: {data['tokenizer']} ({data['tokenizer_choice']})")
        print(f"run directory: {run.path}")


def cmd_tune(args):
    from danlu.jobs.tune import tune

    result = tune(args.config, args.overrides, trials=args.trials, jobs=args.jobs, overwrite=args.overwrite)
    best, counts = result["best"], result["counts"]
    print(f"trials: {counts['complete']} completed, {counts['pruned']} pruned, {counts['failed']} failed")
    if best:
        test = f"  test {best['test']:.4f}" if best.get("test") is not None else ""
        print(f"best: {best['run']}  {result['metric']} {best['value']:.4f}{test}  "
              + "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in best["params"].items()))
    if result["report"]:
        print(f"report: {os.path.join(os.path.dirname(result['report']), 'report.html')}")


def cmd_evaluate(args):
    from danlu.jobs.evaluate import evaluate_run
    from danlu.runs import load_run

    run = load_run(args.run, device=args.device)
    overrides = {k: v for k, v in (("text_column", args.text_column), ("label_column", args.label_column),
                                   ("image_column", args.image_column), ("source_column", args.source_column),
                                   ("target_column", args.target_column)) if v}
    out_dir = os.path.join(run.path, "eval", _stem(args.data))
    metrics = evaluate_run(run, args.data, out_dir, **overrides)
    print(_metrics_line(os.path.basename(args.data), metrics))
    _print_beside(metrics)
    print(f"written to {out_dir}")


def _print_beside(metrics):
    """The baseline line under a classifier's or regressor's scores (danlu.evaluate.baseline)."""
    from danlu.evaluate.baseline import baseline_line

    line = baseline_line(metrics.get("baselines"))
    if line:
        print(line)


def cmd_predict(args):
    from danlu.runs import load_run

    run = load_run(args.run, device=args.device)
    from danlu.jobs.images import predict_images
    from danlu.data.images import refuse_images_for_text_run
    from danlu.runs.image import ImageRun

    if isinstance(run, ImageRun):  # image files, or --file: a list of paths, a table or a folder
        if args.explain:
            raise ConfigError(f"predict --explain: explanations are for text runs; {args.run} is an image run")
        return predict_images(run, args.texts, args.file, args.out, args.top_k)
    refuse_images_for_text_run(run, args.texts)
    if args.explain and run.cfg.task not in ("classification", "regression"):
        raise ConfigError(f"predict --explain: explanations are for classification and regression runs; "
                          f"{args.run} is a {run.cfg.task} run")
    if args.file:
        return _predict_file(run, args)
    if not args.texts:
        raise ConfigError("predict: give texts to classify, or --file FILE (CSV / TSV / JSONL with a text column)")
    if run.cfg.task == "seq2seq":  # generated text, one line per source
        options = {"beam_size": args.beam_size} if args.beam_size else {}
        for result in run.predict(args.texts, **options):
            print(result["text"])
        return
    if args.explain:
        return _print_explanations(run, args.texts, args.explain_method)
    for text, result in zip(args.texts, run.predict(args.texts, top_k=args.top_k)):
        if "value" in result:
            print(f"{result['value']:.4f}\t{text}")
        else:
            print(f"{result['label']}\t{result['score']:.4f}\t{text}")


def _print_explanations(run, texts, method):
    """Each prediction's line, then the text with its tokens coloured (a terminal) or scored (a pipe)."""
    from danlu.evaluate.explain import color_wanted, explain, render_terminal

    color = color_wanted(sys.stdout)
    for text, result in zip(texts, explain(run, texts, method)):
        head = f"{result['value']:.4f}" if "value" in result else f"{result['label']}\t{result['score']:.4f}"
        print(f"{head}\t{text}")
        print("\n".join(render_terminal(text, result, color)))


PREDICT_OPTIONS = {"text_column": "--text-column"}  # what error messages suggest: predict's own flags


def _predict_file(run, args):
    from danlu.data.sources import read_examples
    from danlu.files import atomic_write_text

    seq2seq = run.cfg.task == "seq2seq"  # {"source": ..., "text": generated} lines
    column = args.text_column or (run.cfg.data.source_column if seq2seq else run.cfg.data.text_column)
    examples = read_examples(args.file, column, need_labels=False, on_bad_rows="error", keep_fields=True,
                             options=PREDICT_OPTIONS)
    results = run.predict(examples.texts, top_k=args.top_k)
    if args.explain:
        from danlu.evaluate.explain import explain

        for result, explained in zip(results, explain(run, examples.texts, args.explain_method)):
            result["explanation"] = {"method": explained["method"], "tokens": explained["tokens"]}
    lines = [json.dumps(_scored_row(text, record, column, result, "source" if seq2seq else "text"), ensure_ascii=False)
             for text, record, result in zip(examples.texts, examples.fields, results)]
    if args.out:
        atomic_write_text(args.out, "\n".join(lines) + "\n")
        print(f"{len(lines)} predictions written to {args.out}")
    else:
        print("\n".join(lines))


def _scored_row(text, record, column, result, name="text"):
    """{name: the input text, the input's other fields (an id, ...), the prediction}; an input field that has
    the name of a prediction key (label, score, ...) is kept as input_<name>."""
    row = {name: text}
    for key, value in record.items():
        if key != column:
            row["input_" + key if key in result or key == name else key] = value
    row.update(result)
    return row


def cmd_compare(args):
    from danlu.evaluate.compare import compare_runs

    table, path = compare_runs(args.runs, out=args.out)
    print(table)
    print(f"validation curves: {path}")


def cmd_info(args):
    from danlu.models import count_parameters
    from danlu.runs import load_run, weights_file

    run = load_run(args.run)
    cfg = run.cfg
    size = os.path.getsize(weights_file(run.path))  # a LoRA run keeps only its adapter (and the base's path)
    print(f"run:        {run.path}")
    print(f"task:       {cfg.task}")
    print(f"model:      {cfg.model.kind}, {count_parameters(run.model):,} parameters, {size / 1e6:.2f} MB on disk")
    language_model = run.language_model
    if language_model:  # a corpus of token blocks, trained for a number of steps
        print(f"data:       {cfg.data.train} (blocks of {cfg.data.block_size} tokens)")
        print(f"tokenizer:  {cfg.data.tokenizer.kind}, vocabulary {run.tokenizer.vocab_size_}")
        trained = (f"{run.metrics['steps']} steps" if "steps" in run.metrics  # pretraining counts steps
                   else f"{run.metrics.get('epochs_run', cfg.train.epochs)} epochs")  # fine-tuning, epochs
        print(f"training:   {trained}, batch {cfg.train.batch_size}, {cfg.train.optimizer} lr {cfg.train.lr}")
    elif hasattr(run, "preprocess"):  # an image run (danlu.runs.image)
        pre = run.preprocess
        print(f"data:       {cfg.data.train} (images: {pre.channels_} channel(s), resized to {pre.size_[0]}x{pre.size_[1]}, "
              f"model input {pre.input_size_[0]}x{pre.input_size_[1]})")
        print(f"training:   {cfg.train.epochs} epochs, batch {cfg.train.batch_size}, {cfg.train.optimizer} lr {cfg.train.lr}")
    else:
        print(f"data:       {cfg.data.train} (text column {cfg.data.text_column!r}, label column {cfg.data.label_column!r})")
        print(f"tokenizer:  {cfg.data.tokenizer.kind}, vocabulary {run.tokenizer.vocab_size_}, "
              f"max length {run.tokenizer.max_length}")
        print(f"training:   {cfg.train.epochs} epochs, batch {cfg.train.batch_size}, {cfg.train.optimizer} lr {cfg.train.lr}")
    if run.labels:
        print(f"labels:     {', '.join(run.labels)}")
    for split in ("val", "test"):
        if split in run.metrics:
            line = _metrics_line(split, run.metrics[split])
            print(line.replace(" examples)", " tokens)") if language_model else line)
    files = sorted(os.listdir(run.path))
    print(f"files:      {', '.join(files)}")


def cmd_pretrain(args):
    import shlex

    from danlu.jobs.pretrain import pretrain

    command = "danlu pretrain " + shlex.join([args.config, *args.overrides] + (["--resume"] if args.resume else []))
    run = pretrain(args.config, *args.overrides, resume=args.resume, overwrite=args.overwrite, command=command)
    val = run.metrics.get("val")
    if val:
        print(f"val: loss {val['loss']:.4f}  perplexity {val['perplexity']:.2f}  token accuracy {val['accuracy']:.4f}  "
              f"({val['count']:,} tokens)")
    print(f"run directory: {run.path}  (report: {os.path.join(run.path, 'report.md')})")


def cmd_generate(args):
    from danlu.generation import generate
    from danlu.sampling import SamplingConfig

    run = _language_model_run(args, "generate")
    if not args.prompts:
        raise ConfigError("generate: give one or more prompts, e.g. danlu generate RUN \"To be\"")
    options = _fields_of(args, SamplingConfig)
    if args.no_stream:
        for prompt, text in zip(args.prompts, generate(run.model, run.tokenizer, args.prompts, **options)):
            print(prompt + text)
        return
    for prompt in args.prompts:
        sys.stdout.write(prompt)
        _write_stream(run, prompt, options)


def _language_model_run(args, verb):
    """The causal language model run `args.run` that `verb` (generate, chat) decodes with, at --precision."""
    from danlu.generation import set_decode_precision
    from danlu.runs import load_run

    run = load_run(args.run, device=args.device)
    if run.cfg.task != "causal_lm":
        raise ConfigError(f"{args.run}: {verb} needs a causal language model run (task causal_lm), not {run.cfg.task}")
    set_decode_precision(run.model, args.precision)
    return run


def _write_stream(run, prompt, options):
    """Write what the model generates after `prompt` to stdout as it comes, then a newline -> that text."""
    from danlu.generation import stream_generate

    text = ""
    for delta in stream_generate(run.model, run.tokenizer, prompt, **options):
        text += delta
        sys.stdout.write(delta)
        sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()
    return text


def cmd_finetune(args):
    from danlu.jobs.finetune import finetune
    from danlu.runs.load import export_merged

    if args.merge:
        print(f"merged run written to {export_merged(args.config, args.merge)}")
        return
    run = finetune(args.config, *args.overrides, overwrite=args.overwrite)
    for split in ("test", "val"):
        if run.metrics.get(split):
            print(_metrics_line(split, run.metrics[split]))
    print(f"run directory: {run.path}")


def cmd_chat(args):
    """Interactive chat in the terminal: one user turn per stdin line, the reply streamed; /exit quits."""
    from danlu.chat_template import render_chat, stop_sequences
    from danlu.sampling import SamplingConfig

    run = _language_model_run(args, "chat")
    template = run.chat_template
    names = {"bos_token": "<s>", "eos_token": "</s>"}
    variables = {k: run.tokenizer.tokenizer_.id_to_token(run.tokenizer.token_id(v)) or "" for k, v in names.items()}
    messages = [{"role": "system", "content": args.system}] if args.system else []
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            sys.stdout.write("> ")
            sys.stdout.flush()
        line = sys.stdin.readline()
        if not line or line.strip() == "/exit":
            return
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line.rstrip("\n")})
        prompt = render_chat(template, messages, add_generation_prompt=True, **variables)
        sampling = {**_fields_of(args, SamplingConfig), "stop": list(stop_sequences(template))}
        reply = _write_stream(run, prompt, sampling)
        messages.append({"role": "assistant", "content": reply.strip()})


def _metrics_line(name, m):
    keys = [k for k in ("accuracy", "loss", "mse", "mae", "r2", "perplexity") if k in m]
    parts = [f"{k} {m[k]:.4f}" for k in keys]
    parts += [f"{k} {m[k]:.2f}" for k in ("bleu", "chrf", "rouge1", "rouge2", "rougeL") if k in m]  # seq2seq
    if "bleu" in (m.get("baselines") or {}).get("copy_source", {}):
        parts.append(f"(copy-the-source bleu {m['baselines']['copy_source']['bleu']:.2f})")
    if "macro" in m:
        parts.append(f"macro_f1 {m['macro']['f1']:.4f}")
    unit = "tokens" if "perplexity" in m else "examples"  # a language model counts predicted tokens
    return f"{name}: " + "  ".join(parts) + (f"  ({m['count']:,} {unit})" if "count" in m else "")


def cmd_serve(args):
    from danlu.serve.app import ServeOptions
    from danlu.serve.server import serve

    options = _fields_of(args, ServeOptions)
    options["api_key"] = options.get("api_key") or os.environ.get("DANLU_API_KEY")
    serve(args.run, host=args.host, port=args.port, device=args.device, threads=args.threads,
          access_log=not args.no_access_log, precision=args.precision, **options)


def cmd_export(args):
    from danlu.serve.export import export, format_report
    from danlu.serve.gguf_export import format_gguf_report

    report = export(args.run, args.format, out=args.out, opset=args.opset, check=not args.no_check, threads=args.threads,
                    dtype=args.dtype)
    print(format_gguf_report(report) if args.format == "gguf" else format_report(report))


def cmd_compress(args):
    from danlu.jobs.compress import compress_run

    run = compress_run(args.run, args.recipe, out=args.out, quick=args.quick, measure=not args.no_scorecard,
                       overwrite=args.overwrite)
    if run.scorecard:
        from danlu.compress.scorecard import markdown

        print(markdown(run.scorecard))
    print(f"run directory: {run.path}")


def _stem(path):
    return os.path.splitext(os.path.basename(os.path.normpath(path)))[0] or "data"


# ------------------------------------------------------------------------------------------------


def _add_config_args(p, what="a YAML config file (or a run directory, to resume it)",
                     example="train.epochs=3 run.dir=runs/mine", resume=True):
    p.add_argument("config", help=what)
    p.add_argument("overrides", nargs="*", help=f"dotted overrides, e.g. {example}")
    if resume:
        p.add_argument("--resume", action="store_true", help="continue an interrupted run from its last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run directory")


def _add_run_arg(p):
    p.add_argument("run", help="a run directory, e.g. runs/seed_lstm")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto (default: cpu)")


def build_parser(verbs=None):
    """The `danlu` parser. `verbs`: build only these verbs' arguments (main builds the one it runs, so that
    a verb's flags, made from its own module's dataclasses, import nothing for the other verbs)."""
    parser = argparse.ArgumentParser(prog="danlu", description="danlu 丹炉: train, evaluate and serve deep-learning models.")
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    parser.add_argument("--version", action="version", version=f"danlu {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for verb, (fn, help_text, add_args) in VERBS.items():
        p = sub.add_parser(verb, help=help_text, description=help_text)
        if verbs is None or verb in verbs:
            add_args(p)
        p.set_defaults(func=fn)
    return parser


def add_field_flags(p, cls, defaults=None, skip=(), names=None, shown=None):
    """One flag per field of the dataclass `cls`: --field-name (or `names[field]`), its value converted and
    checked by the field's type (Literal choices, Range bounds: danlu.schema), its help the field's
    docstring, its default the field's value in `defaults` (an instance of cls; cls() when None), which
    the help shows unless `shown[field]` says otherwise."""
    import dataclasses
    import typing

    from danlu.schema import choices, field_docs, flag_type

    defaults = cls() if defaults is None else defaults
    hints = typing.get_type_hints(cls, include_extras=True)
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        tp = _not_none(hints[f.name])
        default = getattr(defaults, f.name)
        flags = (names or {}).get(f.name) or ("--" + f.name.replace("_", "-"),)
        text = docs.get(f.name, "").replace("%", "%%")
        said = (shown or {}).get(f.name, "none" if default is None else default)
        kw = dict(dest=f.name, default=default, help=f"{text} (default: {said})".strip())
        if tp is bool:
            p.add_argument(*flags, action=argparse.BooleanOptionalAction, **kw)
        elif typing.get_origin(tp) is tuple:
            p.add_argument(*flags, action="append", type=flag_type(typing.get_args(tp)[0], flags[0]),
                           **{**kw, "default": list(default)})
        else:
            allowed = choices(tp)  # shown in the usage; flag_type checks them (with a did-you-mean)
            p.add_argument(*flags, type=flag_type(tp, flags[0]), metavar="{" + ",".join(allowed) + "}" if allowed else None,
                           **kw)


def _not_none(tp):
    """X for `X | None`."""
    import types
    import typing

    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else tp
    return tp


def _fields_of(args, cls):
    """The parsed values of the flags that add_field_flags made for `cls`, by field name."""
    import dataclasses

    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}


def _train_args(p):
    _add_config_args(p)


def _tune_args(p):
    from danlu.schema import NonNegative, flag_type

    p.add_argument("config", help="a YAML config with a tune section (tune.space: the keys to search)")
    p.add_argument("overrides", nargs="*", help="dotted overrides of the config, e.g. train.epochs=3 tune.dir=runs/t")
    p.add_argument("--trials", type=flag_type(NonNegative, "--trials"), default=0, help="trials in all (default: tune.trials); running the same "
                                                          "command again resumes the search")
    p.add_argument("--jobs", type=flag_type(NonNegative, "--jobs"), default=0, help="trials at once, each in its own process with free cores // "
                                                        "JOBS threads (default: tune.jobs)")
    p.add_argument("--overwrite", action="store_true", help="start the search again, deleting the tune directory")


def _evaluate_args(p):
    _add_run_arg(p)
    p.add_argument("--data", required=True, help="labelled CSV / TSV / JSONL file or class folder")
    p.add_argument("--text-column", help="text column (default: the run's data.text_column)")
    p.add_argument("--label-column", help="label column (default: the run's data.label_column)")
    p.add_argument("--image-column", help="image runs: image-path column of a table (default: the run's data.image_column)")
    p.add_argument("--source-column", help="seq2seq: source column (default: the run's data.source_column)")
    p.add_argument("--target-column", help="seq2seq: target column (default: the run's data.target_column)")


def _predict_args(p):
    _add_run_arg(p)
    p.add_argument("texts", nargs="*", help="texts to classify (image files, for an image run)")
    p.add_argument("--file", help="CSV / TSV / JSONL file of texts to classify; for an image run, a list of image "
                                  "paths (one a line), a table with an image column, or a folder")
    p.add_argument("--out", help="write JSON lines here (default: print them)")
    p.add_argument("--text-column", help="text column of --file (default: the run's data.text_column)")
    p.add_argument("--top-k", type=int, default=None, help="list only the k most probable labels")
    p.add_argument("--beam-size", type=int, default=None, help="seq2seq: beam size (default: the run's seq2seq.beam_size)")
    p.add_argument("--explain", action="store_true",
                   help="show the tokens that pushed each decision (coloured on a terminal, scored otherwise; "
                        "with --file, an explanation field per row)")
    p.add_argument("--explain-method", default="auto", choices=("auto", "integrated_gradients", "occlusion"),
                   help="auto (default): integrated gradients through the token embedding, or occlusion for "
                        "models gradients do not reach")


def _compare_args(p):
    p.add_argument("runs", nargs="+", help="run directories, e.g. runs/textcnn_zh_sentiment runs/lstm_zh")
    p.add_argument("--out", default="compare.png", help="the plot of validation curves (default: compare.png)")


def _info_args(p):
    p.add_argument("run", help="a run directory")


def _generate_args(p):
    from danlu.sampling import SamplingConfig

    _add_run_arg(p)
    p.add_argument("prompts", nargs="*", help="texts to continue (each is streamed in turn)")
    add_field_flags(p, SamplingConfig)
    p.add_argument("--no-stream", action="store_true", help="generate all prompts as one batch, print at the end")
    _add_precision_arg(p)


def _add_precision_arg(p, what="weights while decoding"):
    import typing

    from danlu.sampling import DecodePrecision

    p.add_argument("--precision", default="fp32", choices=typing.get_args(DecodePrecision),
                   help=f"{what} (default fp32); bf16 reads half the bytes: faster on GPUs, and on CPUs with "
                        "AVX512-BF16 or AMX once the weights outgrow the cache (slightly different numbers)")


def _finetune_args(p):
    _add_config_args(p, "a YAML config with finetune.base (or, with --merge, a LoRA run directory)",
                     "finetune.method=lora train.epochs=3", resume=False)
    p.add_argument("--merge", metavar="OUT", help="write the LoRA run CONFIG as a plain run with merged weights at OUT")


def _chat_args(p):
    _add_run_arg(p)
    from danlu.sampling import CHAT_SAMPLING, SamplingConfig

    p.add_argument("--system", default="", help="system prompt at the start of the conversation")
    add_field_flags(p, SamplingConfig, defaults=CHAT_SAMPLING, skip=("stop",))  # replies stop where the template says
    _add_precision_arg(p)


def _serve_args(p):
    from danlu.serve.app import ServeOptions

    _add_run_arg(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000; 0 picks a free one)")
    # allowed_hosts follows from --host: the loopback names when serving this machine only
    add_field_flags(p, ServeOptions, skip=("allowed_hosts",), names={"timeout_s": ("--timeout", "--timeout-s")},
                    shown={"api_key": "$DANLU_API_KEY"})
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads for the model (default: torch's choice)")
    p.add_argument("--no-access-log", action="store_true", help="do not log one line per request")
    _add_precision_arg(p, "weights of a language model while serving")


def _export_args(p):
    p.add_argument("run", help="a run directory")
    p.add_argument("--format", default="onnx", choices=["onnx", "gguf"],
                   help="onnx (any text or image run) or gguf (llama.cpp's format, GPT language models); default onnx")
    p.add_argument("--out", help="output folder (default: RUN/export/FORMAT)")
    p.add_argument("--dtype", default="f32", choices=["f32", "f16", "q8_0"],
                   help="GGUF tensor type of the weight matrices (default: f32; norms and biases stay f32)")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (default: 18)")
    p.add_argument("--no-check", action="store_true", help="skip the parity check (onnxruntime or the GGUF read back) and the latency check")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads for both PyTorch and onnxruntime while measuring latency (default: 1)")


def _compress_args(p):
    p.add_argument("run", help="a run directory")
    p.add_argument("--recipe", required=True,
                   help="int8, int8-per-channel, static-int8, woq-int8, woq-int4, prune-N, prune-ffn-N, prune-heads-N, "
                        "prune-channels-N, sparse-N, "
                        "distill-transformer|textcnn|lstm, chains such as prune-30+int8, or a YAML file of steps")
    p.add_argument("--out", help="the new run directory (default: RUN-RECIPE)")
    p.add_argument("--quick", action="store_true", help="measure on a small sample (smoke runs)")
    p.add_argument("--no-scorecard", action="store_true", help="skip the before/after measurements")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output run directory")


VERBS = {
    "train": (cmd_train, "train and evaluate a model from a YAML config", _train_args),
    "tune": (cmd_tune, "search hyperparameters over the config's tune.space (Optuna), trials as runs, a report",
             _tune_args),
    "evaluate": (cmd_evaluate, "evaluate a run on a labelled file", _evaluate_args),
    "predict": (cmd_predict, "classify texts with a run", _predict_args),
    "compare": (cmd_compare, "compare runs: a metrics table and one plot of their validation curves", _compare_args),
    "info": (cmd_info, "describe a run: model, data, metrics, files", _info_args),
    "pretrain": (cmd_pretrain, "pretrain a GPT (causal LM) or BERT (masked LM) on a raw text corpus", _train_args),
    "generate": (cmd_generate, "continue prompts with a pretrained causal language model, streaming", _generate_args),
    "serve": (cmd_serve, "serve a run over HTTP: predictions, an OpenAI-compatible API and a playground", _serve_args),
    "export": (cmd_export, "export a run to ONNX (checked in onnxruntime) or GGUF (checked token for token)", _export_args),
    "compress": (cmd_compress, "quantize, prune or distill a run into a new run, with a before/after scorecard",
                 _compress_args),
    "finetune": (cmd_finetune, "fine-tune a danlu run, Hugging Face folder or GGUF file (full, lora or freeze)",
                 _finetune_args),
    "chat": (cmd_chat, "chat with a causal language model run in the terminal, streaming (/exit quits)", _chat_args),
}


def _warning_line(message, category, filename, lineno, line=None, _default=warnings.formatwarning):
    """danlu's own warnings are messages for the user: one line, without the source line that raised them."""
    if os.path.dirname(os.path.abspath(__file__)) in os.path.abspath(filename):
        return f"warning: {message}\n"
    return _default(message, category, filename, lineno, line)


def main(argv=None):
    warnings.formatwarning = _warning_line
    argv = sys.argv[1:] if argv is None else list(argv)
    verb = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser([verb])
    args, rest = parser.parse_known_args(argv)
    # overrides after a flag (`train cfg.yaml --overwrite train.epochs=3`) arrive in `rest`
    extra = [r for r in rest if "=" in r and not r.startswith("-")]
    if len(extra) != len(rest) or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        args.func(args)
        sys.stdout.flush()  # here, so that a reader that went away is noticed below and not at exit
    except BrokenPipeError:
        # the reader of our output stopped early (`danlu predict ... | head -1`): stop quietly, as other
        # programs do, with the status of a process ended by SIGPIPE (128 + 13); the output left in the
        # buffer goes to /dev/null, not into a second error when Python flushes stdout at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except KeyboardInterrupt:
        if args.verb == "tune":  # the search resumes from its study; the running trial is re-run
            print("interrupted; resume with the same danlu tune command", file=sys.stderr)
            return 130
        verb = "pretrain" if args.verb == "pretrain" else "train"
        print(f"interrupted; resume with: danlu {verb} CONFIG --resume", file=sys.stderr)
        return 130
    except (ConfigError, FileNotFoundError, PermissionError, IsADirectoryError) as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
