"""The evaluation report of a run: `report.md` and a self-contained `report.html` (images inlined), plus `plots/`.

Sections: config summary, data summary (counts per split, class balance, text lengths), training
curves, metrics table, confusion matrix, per-class F1, the most confident mistakes, timing and
model size. `danlu train` writes one into the run directory; `danlu evaluate RUN --data FILE` writes
one into `RUN/eval/<file stem>/`. A language model's report (pretraining, chat fine-tuning) has its own
sections: a summary, loss and perplexity curves per optimizer step, and generated samples (causal LM)
or masked-token predictions (masked LM).

Mistakes are gathered while the evaluation streams, in a heap bounded to the k most confident
(as `heapq.nlargest` does), so the report costs O(k) memory however large the data is.

>>> write_run_report(run, data=data, history=history, trainer=trainer)          # doctest: +SKIP
>>> write_eval_report(run, "reviews_2024.csv", metrics, "runs/mine/eval/reviews_2024")  # doctest: +SKIP
"""
from __future__ import annotations

import base64
import dataclasses
import heapq
import html
import json
import os
import time

import torch

from danlu.evaluate.baseline import baseline_blocks
from danlu.files import atomic_write_text
from danlu.registry import TASKS

TOP_MISTAKES = 10


class ConfidentMistakes:
    """The k wrong predictions made with the highest probability (classification), or the k largest
    absolute errors (regression), kept in a min-heap of at most k entries.

    >>> mistakes = ConfidentMistakes(k=10)
    >>> trainer.evaluate(test, on_batch=mistakes.update)   # doctest: +SKIP
    >>> mistakes.largest()  # [(probability, index, true id, predicted id), ...], most confident first
    """

    def __init__(self, k=TOP_MISTAKES, regression=False):
        self.k, self.regression = k, regression
        self.heap = []  # (score, index, true, predicted); the root is the least confident one kept

    @torch.no_grad()
    def update(self, outputs, batch):
        if "labels" not in batch:
            return
        index, targets = batch["index"].cpu(), batch["labels"].cpu()
        if self.regression:
            predicted = outputs.detach().float().reshape(-1).cpu()  # (B,)
            score = (predicted - targets.float()).abs()  # (B,)
            wrong = torch.ones_like(score, dtype=torch.bool)
        else:
            probs = outputs.detach().float().softmax(-1).cpu()  # (B, C)
            score, predicted = probs.max(-1)  # (B,), (B,)
            wrong = predicted != targets
        # only this batch's k best candidates can enter the heap
        candidates = torch.nonzero(wrong).reshape(-1)
        if len(candidates) > self.k:
            candidates = candidates[score[candidates].topk(self.k).indices]
        for i in candidates.tolist():
            item = (score[i].item(), int(index[i]), _scalar(targets[i]), _scalar(predicted[i]))
            if len(self.heap) < self.k:
                heapq.heappush(self.heap, item)
            elif item[0] > self.heap[0][0]:
                heapq.heapreplace(self.heap, item)

    def largest(self):
        return sorted(self.heap, key=lambda item: (-item[0], item[1]))


def _scalar(t):
    return t.item() if t.is_floating_point() else int(t)


# ------------------------------------------------------------------------------------------------
# the entry points


def mistakes_collector(task, k=TOP_MISTAKES):
    """What the report gathers during a run's final test pass: the most confident mistakes of a classifier or
    the largest errors of a regressor (None for tasks whose report has no such section)."""
    if task in ("classification", "regression"):
        return ConfidentMistakes(k, task == "regression")
    return None


def write_run_report(run, data, history, trainer, top_k=TOP_MISTAKES, mistakes=None, eval_seconds=None, command=None):
    """report.md, report.html and plots/ of a freshly trained run, with the sections of its task: language
    models get loss / perplexity curves and samples, classifiers and regressors the metrics, confusion matrix
    and mistakes. `mistakes` (filled while the test metrics were computed) spares a second pass."""
    rows = list(history)
    if TASKS[run.cfg.task].language_model:
        return write_blocks(_language_model_blocks(run, data, rows, command), run.path)
    plots = os.path.join(run.path, "plots")
    regression = run.cfg.task == "regression"
    test = run.metrics.get("test")
    if mistakes is None or test is None:
        mistakes = ConfidentMistakes(top_k, regression)
        started = time.perf_counter()
        test = trainer.evaluate(data.test, on_batch=mistakes.update)
        eval_seconds = time.perf_counter() - started
    best = run.metrics.get("best_epoch") if run.cfg.train.restore_best else None
    figures = {"curves": plot("plot_curves", rows, os.path.join(plots, "curves.png"), best) if rows else None}
    lengths = {name: [len(t) for t in ex.texts] for name, ex in data.examples.items()}
    figures["lengths"] = plot("plot_lengths", lengths, os.path.join(plots, "text_lengths.png"), _char_limit(run))
    figures.update(metric_figures(test, plots, "test"))
    blocks = [("h1", f"Run report: {os.path.basename(os.path.normpath(run.path))}"),
              ("p", f"Run directory `{run.path}`; written {time.strftime('%Y-%m-%d %H:%M')}.")]
    blocks += [("code", command)] if command else []
    blocks += _config_section(run)
    blocks += _data_section(run, data.examples, {"train": data.train, "val": data.val, "test": data.test},
                            figures["lengths"], data.skipped)
    blocks += curves_section(rows, figures["curves"])
    blocks += metrics_section({"validation": run.metrics.get("val"), "test": test}, figures, regression)
    blocks += baseline_blocks(test, run.metrics.get("baselines"))
    blocks += _mistakes_section(mistakes, data.examples["test"].texts, run.labels, regression, "test")
    blocks += explained_mistakes_section(run, mistakes, data.examples["test"].texts, "test")
    blocks += timing_section(run, rows, eval_seconds, len(data.test))
    return write_blocks(blocks, run.path)


def write_eval_report(run, data_path, metrics, out_dir, examples, dataset, mistakes, eval_seconds):
    """Plots and report of a run evaluated on a labelled file (`examples`, encoded as `dataset`), into `out_dir`
    (RUN/eval/<file stem>/); `mistakes` were gathered while `metrics` were computed."""
    regression = run.cfg.task == "regression"
    plots = os.path.join(out_dir, "plots")
    rows = read_history(run.path)
    best = run.metrics.get("best_epoch") if run.cfg.train.restore_best else None
    figures = {"curves": plot("plot_curves", rows, os.path.join(plots, "curves.png"), best) if rows else None}
    figures["lengths"] = plot("plot_lengths", {"evaluated": [len(t) for t in examples.texts]},
                               os.path.join(plots, "text_lengths.png"), _char_limit(run))
    name = os.path.basename(os.path.normpath(data_path))
    figures.update(metric_figures(metrics, plots, name))
    blocks = [("h1", f"Evaluation report: {os.path.basename(os.path.normpath(run.path))} on {name}"),
              ("p", (f"Run `{run.path}` evaluated on `{os.path.abspath(data_path)}`; written "
                     f"{time.strftime('%Y-%m-%d %H:%M')}."))]
    blocks += _config_section(run)
    blocks += _data_section(run, {"evaluated": examples}, {"evaluated": dataset}, figures["lengths"], examples.skipped)
    blocks += curves_section(rows, figures["curves"], note="Curves of the run's training, for reference.")
    blocks += metrics_section({name: metrics}, figures, regression)
    blocks += baseline_blocks(metrics, metrics.get("baselines"), name)
    blocks += _mistakes_section(mistakes, examples.texts, run.labels, regression, name)
    blocks += explained_mistakes_section(run, mistakes, examples.texts, name)
    blocks += timing_section(run, rows, eval_seconds, len(dataset))
    return write_blocks(blocks, out_dir)


# ------------------------------------------------------------------------------------------------
# sections: each returns a list of blocks ("h1" | "h2" | "p" | "table" | "image", ...)


def _config_section(run):
    cfg = run.cfg
    model = {f.name: getattr(cfg.model, f.name) for f in dataclasses.fields(cfg.model)}
    t = cfg.train
    rows = [
        ["task", cfg.task],
        ["model", ", ".join(f"{k}={_short(v)}" for k, v in model.items())],
        ["data", f"{cfg.data.train}" + (f" (limit {cfg.data.limit} per split)" if cfg.data.limit else "")],
        ["tokenizer", (f"{cfg.data.tokenizer.kind}, vocabulary {run.tokenizer.vocab_size_}, "
                       f"max_length {cfg.data.tokenizer.max_length}")],
        ["training", f"{t.epochs} epochs, batch {t.batch_size}, {t.optimizer} lr {t.lr}, schedule {t.schedule}"
                     + (f", weight decay {t.weight_decay}" if t.weight_decay else "")
                     + (f", early stopping on {t.early_stopping.metric} (patience {t.early_stopping.patience})"
                        if t.early_stopping.patience else "")],
        ["seed", str(cfg.run.seed)],
    ]
    return [("h2", "Configuration"), ("table", ["", ""], rows),
            ("p", "The full resolved config is `config.yaml` in the run directory.")]


def _data_section(run, examples, datasets, length_figure, skipped=0):
    blocks = [("h2", "Data")]
    max_length = run.cfg.data.tokenizer.max_length
    header = ["split", "examples", "median characters", "95th percentile", f"cut at max_length {max_length}"]
    rows = []
    for name, ex in examples.items():
        lengths = sorted(len(t) for t in ex.texts)
        tokens = datasets[name].lengths
        cut = float((tokens >= max_length).mean()) if max_length and len(tokens) else 0.0
        rows.append([name, str(len(ex.texts)), str(_percentile(lengths, 50)), str(_percentile(lengths, 95)),
                     f"{cut:.1%}"])
    blocks.append(("table", header, rows))
    if skipped:
        blocks.append(("p", f"{skipped} bad rows were skipped."))
    if run.cfg.task != "regression" and run.labels:
        counts = {name: _count(ex.labels) for name, ex in examples.items()}

        def cell(name, label):
            n = counts[name].get(label, 0)
            return f"{n} ({n / max(len(examples[name].labels), 1):.1%})"

        rows = [[str(label)] + [cell(name, label) for name in examples] for label in run.labels]
        header = ["class", *examples]
        blocks += [("h3", "Class balance"), ("table", header, rows)]
    blocks.append(("image", length_figure, "Text lengths in characters"))
    return blocks


def curves_section(rows, figure, note=""):
    if not rows:
        return [("h2", "Training curves"), ("p", "No training history was found.")]
    return [("h2", "Training curves"), *([("p", note)] if note else []), ("image", figure, "Loss and score per epoch")]


def metrics_section(named_metrics, figures, regression):
    named_metrics = {k: v for k, v in named_metrics.items() if v}
    blocks = [("h2", "Metrics")]
    names = list(named_metrics)
    if regression:
        keys = ["mse", "mae", "r2", "count"]
        rows = [[k] + [_fmt(named_metrics[n].get(k)) for n in names] for k in keys]
        return blocks + [("table", ["metric"] + names, rows)]
    rows = [["accuracy"] + [_fmt(m["accuracy"]) for m in named_metrics.values()],
            ["log loss"] + [_fmt(m["loss"]) for m in named_metrics.values()]]
    for avg in ("macro", "micro", "weighted"):
        for key in ("precision", "recall", "f1"):
            rows.append([f"{avg} {key}"] + [_fmt(m[avg][key]) for m in named_metrics.values()])
    rows.append(["examples"] + [str(m["count"]) for m in named_metrics.values()])
    blocks.append(("table", ["metric"] + names, rows))
    last = named_metrics[names[-1]]
    per_class = [[str(label), _fmt(v["precision"]), _fmt(v["recall"]), _fmt(v["f1"]), str(v["support"])]
                 for label, v in last["per_class"].items()]
    blocks += [("h3", f"Per class ({names[-1]})"),
               ("table", ["class", "precision", "recall", "f1", "support"], per_class)]
    if figures.get("per_class"):
        blocks.append(("image", figures["per_class"], f"Per-class F1 ({names[-1]})"))
    labels = last["labels"]
    cm_rows = [[f"**{labels[i]}**"] + [str(c) for c in row] for i, row in enumerate(last["confusion_matrix"])]
    blocks += [("h3", f"Confusion matrix ({names[-1]})"),
               ("p", "Rows are the true classes, columns the predicted ones."),
               ("table", ["true \\ predicted"] + [str(x) for x in labels], cm_rows)]
    if figures.get("confusion"):
        blocks.append(("image", figures["confusion"], f"Confusion matrix ({names[-1]})"))
    return blocks


def _mistakes_section(mistakes, texts, labels, regression, split):
    items = mistakes.largest()
    title = f"Largest errors ({split})" if regression else f"Most confident mistakes ({split})"
    if not items:
        return [("h2", title), ("p", "None: every example was predicted correctly.")]
    if regression:
        header = ["#", "text", "true", "predicted", "absolute error"]
        rows = [[str(n + 1), _clip(texts[i]), f"{t:.4g}", f"{p:.4g}", f"{s:.4g}"]
                for n, (s, i, t, p) in enumerate(items)]
    else:
        header = ["#", "text", "true", "predicted", "probability"]
        rows = [[str(n + 1), _clip(texts[i]), str(labels[t]), str(labels[p]), f"{s:.3f}"]
                for n, (s, i, t, p) in enumerate(items)]
    note = ("The examples the model got wrong with the highest probability on its (wrong) answer: "
            "often label noise, or a pattern the model has not learned.")
    return [("h2", title), ("p", "" if regression else note), ("table", header, rows)]


EXPLAINED_MISTAKES = 3


def explained_mistakes_section(run, mistakes, texts, split, count=EXPLAINED_MISTAKES):
    """The `count` most confident mistakes with the tokens that pushed each wrong decision (danlu.evaluate.explain):
    green towards the predicted label, red against it; in report.md the tokens pushing towards it are in bold."""
    from danlu.evaluate.explain import explain

    items = mistakes.largest()[:count]
    if not items:
        return []
    chosen = [texts[i] for _, i, _, _ in items]
    regression = run.cfg.task == "regression"
    blocks = [("h3", f"Why the model decided so ({split})"),
              ("p", "The " + ("largest errors" if regression else "most confident mistakes") + " above, each token "
                    "scored by how much it pushed the model towards its answer (" + ("a higher value" if regression
                    else "the predicted label") + "), from `danlu predict RUN TEXT --explain`.")]
    for n, ((_, i, true, predicted), explained) in enumerate(zip(items, explain(run, chosen))):
        answer = (f"true {true:.4g}, predicted {predicted:.4g}" if regression
                  else f"true {run.labels[true]}, predicted {run.labels[predicted]}")
        blocks.append(("explained", texts[i], explained["tokens"], f"{n + 1}. {answer} ({explained['method']})"))
    return blocks


def timing_section(run, rows, eval_seconds, eval_count):
    params = sum(p.numel() for p in run.model.parameters())
    in_memory = sum(t.numel() * t.element_size() for t in run.model.state_dict().values())
    weights = os.path.join(run.path, "model.safetensors")
    table = []
    if rows:
        seconds = [r.get("seconds", 0.0) for r in rows]
        table += [["epochs run", str(len({r.get("epoch") for r in rows}))],
                  ["seconds per epoch (mean)" if len(rows) == len({r.get("epoch") for r in rows})
                   else "seconds per evaluation interval (mean)", f"{sum(seconds) / len(seconds):.1f}"],
                  ["training time", f"{sum(seconds):.1f} s"]]
        rate = next((k for k in rows[-1] if k.endswith("_per_s")), None)  # samples_per_s (tokens_per_s for LMs)
        if rate:
            mean = sum(r.get(rate, 0.0) for r in rows) / len(rows)
            table.append(["training throughput (mean)", f"{mean:.0f} {rate[: -len('_per_s')]}/s"])
    rate = eval_count / max(eval_seconds, 1e-9)
    table += [["evaluation throughput", f"{rate:.0f} samples/s ({eval_count} examples)"],
              ["parameters", f"{params:,}"],
              ["weights in memory", _bytes(in_memory)]]
    if os.path.exists(weights):
        table.append(["model.safetensors", _bytes(os.path.getsize(weights))])
    return [("h2", "Timing and model size"), ("table", ["", ""], table)]


# ------------------------------------------------------------------------------------------------
# language models

SAMPLE_PROMPTS = 4


def _language_model_blocks(run, corpus, rows, command, max_new_tokens=120):
    cfg, metrics = run.cfg, run.metrics
    figures = plot("plot_step_curves", rows, os.path.join(run.path, "plots"))
    blocks = [("h1", f"{'Pretraining' if 'corpus' in metrics else 'Fine-tuning'} report: "
                     f"{os.path.basename(os.path.normpath(run.path))}")]
    blocks += [("code", command)] if command else []
    t = cfg.train
    rows_table = [["task", cfg.task], ["model", f"{cfg.model.kind}, {metrics['parameters']:,} parameters"]]
    if "corpus" in metrics:
        c = metrics["corpus"]
        rows_table += [
            ["corpus", f"{c['source']}: {c['train_tokens']:,} train / {c['val_tokens']:,} validation tokens"],
            ["tokenizer", f"{cfg.data.tokenizer.kind}, vocabulary {c['vocab_size']:,}"],
            ["training", f"{metrics['steps']:,} steps x {t.batch_size * t.grad_accum} windows of {cfg.data.block_size} "
                         f"tokens = {metrics['tokens_seen']:,} tokens, {metrics['train_seconds'] / 60:.1f} min"],
            ["hardware", f"{metrics['device']}, {metrics['threads']} threads, precision {t.precision}"],
            ["throughput", f"{metrics['tokens_per_s']:,.0f} tokens/s, MFU {metrics['mfu']:.1%} of "
                           f"{(metrics['peak_flops'] or 0) / 1e9:,.0f} GFLOP/s measured peak"]]
    else:
        rows_table += [["base", str(cfg.finetune.base)], ["method", cfg.finetune.method],
                       ["training", f"{metrics.get('epochs_run', 0)} epochs, {metrics['train_seconds'] / 60:.1f} min, "
                                    f"{metrics.get('tokens_per_s', 0):,.0f} tokens/s"]]
    for split in ("val", "test"):
        m = metrics.get(split) or {}
        if m:
            rows_table.append([{"val": "validation", "test": "test"}[split],
                               f"loss {m['loss']:.4f}, perplexity {m['perplexity']:.2f}, token accuracy "
                               f"{m['accuracy']:.1%} ({m['count']:,} tokens)"])
    blocks += [("table", ["", ""], rows_table), ("h2", "Curves")]
    blocks += [("image", path, name) for name, path in figures]
    if corpus is None or not hasattr(corpus, "val"):  # chat data: no held-out text to open samples with
        return blocks
    if cfg.task == "causal_lm":
        from danlu.generation import generate

        prompts = sample_prompts(corpus)
        settings = dict(max_new_tokens=max_new_tokens, temperature=0.8, top_k=50, repetition_penalty=1.1, seed=0)
        samples = list(zip(prompts, generate(run.model, run.tokenizer, prompts, **settings)))
        blocks += [("h2", "Samples"),
                   ("p", f"Prompts are openings of held-out text; {max_new_tokens} new tokens, temperature 0.8, "
                         "top-k 50, repetition penalty 1.1, seed 0. The prompt is in bold.")]
        blocks += [("quote", prompt, text) for prompt, text in samples]
    else:
        samples = _fill_mask_samples(run, corpus)
        blocks += [("h2", "Masked-token predictions"),
                   ("p", "Held-out windows with 15% of the tokens masked; the model's top guess for each masked "
                         "position."),
                   ("table", ["original", "masked", "predicted"], [[f"`{c}`" for c in row] for row in samples])]
    return blocks


def sample_prompts(corpus, count=SAMPLE_PROMPTS, tokens=6):
    """Openings for samples, taken from the held-out text: the first tokens of a few validation windows."""
    stream = corpus.val or corpus.train
    n = stream.num_windows(shuffle=False)
    prompts = []
    for i in range(count):
        start = (i * n // count) * stream.block_size
        ids = [int(t) for t in stream.tokens[start : start + tokens]]
        text = corpus.tokenizer.decode(ids).strip()
        if text and text not in prompts:
            prompts.append(text)
    return prompts


@torch.no_grad()
def _fill_mask_samples(run, corpus, count=3, length=48):
    from danlu.training.tasks import mask_tokens

    stream = corpus.val or corpus.train
    batch = next(stream.batches(count, shuffle=False))
    ids = batch["input_ids"][:, :length]
    spec = corpus.spec
    generator = torch.Generator().manual_seed(0)
    masked, labels = mask_tokens(ids, spec.mask_id, spec.vocab_size, generator=generator)
    run.model.eval()
    device = next(run.model.parameters()).device
    predicted = run.model(masked.to(device)).argmax(-1).cpu()  # (B, T)
    filled = torch.where(labels != -100, predicted, ids)
    tok = run.tokenizer
    show = lambda row: tok.decode(row, skip_special_tokens=False).replace("\n", " ").replace("`", "'")  # noqa: E731
    return [(show(ids[i]), show(masked[i]), show(filled[i])) for i in range(len(ids))]


def _md_escape(text):
    return "".join("\\" + ch if ch in "\\`*_[]<>#|" else ch for ch in text)


# ------------------------------------------------------------------------------------------------
# rendering


def write_blocks(blocks, out_dir):
    """report.md (images linked) and report.html (images inlined); returns the markdown path."""
    md = os.path.join(out_dir, "report.md")
    atomic_write_text(md, to_markdown(blocks, out_dir))
    atomic_write_text(os.path.join(out_dir, "report.html"), to_html(blocks))
    return md


def to_markdown(blocks, base_dir):
    out = []
    for kind, *rest in blocks:
        if kind in ("h1", "h2", "h3"):
            out.append(f"{'#' * int(kind[1])} {rest[0]}\n")
        elif kind == "p" and rest[0]:
            out.append(rest[0] + "\n")
        elif kind == "table":
            header, rows = rest
            out.append("| " + " | ".join(_md_cell(h) for h in header) + " |")
            out.append("|" + "|".join("---" for _ in header) + "|")
            out.extend("| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows)
            out.append("")
        elif kind == "image" and rest[0]:
            out.append(f"![{rest[1]}]({os.path.relpath(rest[0], base_dir)})\n")
        elif kind == "code":
            out.append(f"```\n{rest[0]}\n```\n")
        elif kind == "explained":  # (text, [{start, end, score}], caption): tokens pushing towards the answer in bold
            out.append(f"{rest[2]}: " + _explained_markdown(*rest[:2]) + "\n")
        elif kind == "quote":  # (bold opening, continuation): a sample of generated text
            bold = "\n".join(f"**{_md_escape(line)}**" if line.strip() else "" for line in rest[0].split("\n"))
            out.append(f"> {bold}{_md_escape(rest[1])}".replace("\n", "  \n> ") + "\n")
    return "\n".join(out)


def to_html(blocks):
    body = []
    for kind, *rest in blocks:
        if kind in ("h1", "h2", "h3"):
            body.append(f"<{kind}>{_inline(rest[0])}</{kind}>")
        elif kind == "p" and rest[0]:
            body.append(f"<p>{_inline(rest[0])}</p>")
        elif kind == "table":
            header, rows = rest
            head = "".join(f"<th>{_inline(h)}</th>" for h in header) if any(header) else ""
            lines = "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in row) + "</tr>" for row in rows)
            body.append(f"<table>{f'<thead><tr>{head}</tr></thead>' if head else ''}<tbody>{lines}</tbody></table>")
        elif kind == "image" and rest[0]:
            with open(rest[0], "rb") as f:
                data = base64.b64encode(f.read()).decode("ascii")
            body.append(f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(rest[1])}">'
                        f"<figcaption>{html.escape(rest[1])}</figcaption></figure>")
        elif kind == "code":
            body.append(f"<pre><code>{html.escape(rest[0])}</code></pre>")
        elif kind == "quote":
            body.append(f"<blockquote><b>{html.escape(rest[0])}</b>{html.escape(rest[1])}</blockquote>")
        elif kind == "explained":
            body.append(f"<p>{html.escape(rest[2])}<br><span class=\"explained\">{_explained_html(*rest[:2])}</span></p>")
    title = next((rest[0] for kind, *rest in blocks if kind == "h1"), "danlu report")
    return (f'<!DOCTYPE html>\n<html lang="zh"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{_CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


_CSS = ("body{font-family:system-ui,-apple-system,'Noto Sans CJK SC','PingFang SC','Microsoft YaHei',sans-serif;"
        "max-width:1000px;margin:2em auto;padding:0 1em;color:#222;line-height:1.5}"
        "blockquote{white-space:pre-wrap;border-left:3px solid #ccc;margin:0.5em 0;padding-left:1em}"
        "table{border-collapse:collapse;margin:0.5em 0 1em}td,th{border:1px solid #ccc;padding:4px 8px;"
        "text-align:left;vertical-align:top}th{background:#f3f3f3}img{max-width:100%}"
        "figure{margin:1em 0}figcaption{color:#666;font-size:0.9em}code{background:#f3f3f3;padding:0 3px}")


def _explained_pieces(text, tokens):
    """(piece of text, token or None) in order: the text between tokens comes with None."""
    at = 0
    for t in tokens:
        if t["start"] > at:
            yield text[at:t["start"]], None
        yield text[t["start"]:t["end"]], t
        at = max(at, t["end"])
    if at < len(text):
        yield text[at:], None


def _explained_markdown(text, tokens):
    strongest = max((abs(t["score"]) for t in tokens), default=0.0) or 1.0
    runs = []  # [bold?, text]: neighbouring bold tokens share one pair of ** (`**a****b**` is not bold)
    for piece, t in _explained_pieces(" ".join(text.split("\n")), tokens):
        bold = t is not None and t["score"] >= 0.25 * strongest
        if runs and runs[-1][0] == bold:
            runs[-1][1] += piece
        else:
            runs.append([bold, piece])
    return "".join(f"**{_md_escape(piece)}**" if bold else _md_escape(piece) for bold, piece in runs)


def _explained_html(text, tokens):
    strongest = max((abs(t["score"]) for t in tokens), default=0.0) or 1.0
    out = []
    for piece, t in _explained_pieces(text, tokens):
        if t is None:
            out.append(html.escape(piece))
            continue
        alpha = 0.75 * abs(t["score"]) / strongest
        colour = "22,163,74" if t["score"] >= 0 else "220,38,38"
        out.append(f'<span style="background:rgba({colour},{alpha:.3f})" title="{t["score"]:+.4f}">'
                   f"{html.escape(piece)}</span>")
    return "".join(out)


def _inline(text):
    """HTML for the few inline marks the blocks use: `code`, **bold** and [links](relative/path)."""
    import re

    s = html.escape(str(text))
    s = re.sub(r"`([^`]+)`", r"<code>\1</code>", s)
    s = re.sub(r"\[([^\]]+)\]\(([^)\s]+)\)", r'<a href="\2">\1</a>', s)
    return re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", s)


def _md_cell(text):
    return str(text).replace("\\", "\\\\").replace("|", "\\|").replace("\r", " ").replace("\n", " ")


# ------------------------------------------------------------------------------------------------
# helpers


def plot(name, *args):
    from danlu.evaluate import plots

    return getattr(plots, name)(*args)


def metric_figures(metrics, plots_dir, name):
    if "confusion_matrix" not in metrics:
        return {}
    return {
        "confusion": plot("plot_confusion", metrics["confusion_matrix"], metrics["labels"],
                           os.path.join(plots_dir, "confusion_matrix.png"), f"confusion matrix ({name})"),
        "per_class": plot("plot_per_class", metrics["per_class"], os.path.join(plots_dir, "per_class_f1.png")),
    }


def _char_limit(run):
    """max_length in characters, when tokens are characters (otherwise the histogram's unit differs)."""
    tokenizer = run.cfg.data.tokenizer
    return tokenizer.max_length if tokenizer.kind == "char" else 0


def read_history(run_dir):
    path = os.path.join(run_dir, "history.jsonl")
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _count(values):
    counts = {}
    for v in values:
        counts[v] = counts.get(v, 0) + 1
    return counts


def _percentile(sorted_values, q):
    if not sorted_values:
        return 0
    return sorted_values[min(len(sorted_values) - 1, round(q / 100 * (len(sorted_values) - 1)))]


def _clip(text, limit=160):
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _short(value):
    return json.dumps(list(value) if isinstance(value, tuple) else value, ensure_ascii=False)


def _fmt(value):
    if value is None:
        return "–"
    return str(value) if isinstance(value, int) else f"{value:.4f}"


def _bytes(n):
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
