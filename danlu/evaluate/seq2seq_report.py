"""The report of a text-to-text run, as markdown lines: scores beside the baselines, the training curve,
and example tables (the first sources, the best and the worst by sentence BLEU).

>>> lines = report_lines("runs/translate_en_de", metrics, examples, history)   # doctest: +SKIP
"""
from __future__ import annotations

import os
import time

SCORES = (("BLEU", "bleu"), ("chrF", "chrf"), ("ROUGE-1", "rouge1"), ("ROUGE-2", "rouge2"), ("ROUGE-L", "rougeL"),
          ("exact match %", "exact_match"))
BASELINES = {"copy_source": "copy the source", "lead_sentence": "lead sentence of the source"}
CLIP = 220  # characters of a text in the example tables


def report_lines(run_path, metrics, examples=None, history=(), config=None, split="test"):
    """Markdown lines of a seq2seq run's report (`metrics` as in its metrics.json)."""
    name = os.path.basename(os.path.normpath(run_path))
    lines = [f"# Run report: {name}", "",
             f"Run directory `{run_path}`; written {time.strftime('%Y-%m-%d %H:%M')}.", ""]
    if config is not None:
        d, m, s = config.data, config.model, config.seq2seq
        lines += ["## Setup", "",
                  f"- data: `{d.train}`" + (" (reversed)" if d.reverse else "") +
                  f"; {metrics.get('data', {}).get('train', '?')} train / {metrics.get('data', {}).get('val', '?')} val / "
                  f"{metrics.get('data', {}).get('test', '?')} test pairs",
                  f"- tokenizer: {d.tokenizer.kind}, {'shared' if d.shared_tokenizer else 'one per side'}, "
                  f"vocabulary {d.tokenizer.vocab_size}, max length {d.tokenizer.max_length}",
                  f"- model: {m.kind}, {metrics.get('parameters', 0):,} parameters "
                  f"(embed_dim {getattr(m, 'embed_dim', '?')}, layers {getattr(m, 'layers', '?')})",
                  f"- decoding: beam {s.beam_size}, length penalty {s.length_penalty}, max {s.max_new_tokens} tokens"
                  + (f", no-repeat {s.no_repeat_ngram}-grams" if s.no_repeat_ngram else ""), ""]
    lines += score_table(metrics, split)
    if history:
        lines += ["## Training", "", "| epoch | train loss | val loss | val perplexity | tokens/s | seconds |",
                  "|---:|---:|---:|---:|---:|---:|"]
        for row in history:
            lines.append(f"| {row.get('epoch')} | {_f(row.get('train_loss'))} | {_f(row.get('val_loss'))} | "
                         f"{_f(row.get('val_perplexity'), 2)} | {_f(row.get('tokens_per_s'), 0)} | {_f(row.get('seconds'), 1)} |")
        lines.append("")
    if examples:
        for key, title in (("first", "First examples"), ("best", "Best by sentence BLEU"),
                           ("worst", "Worst by sentence BLEU")):
            lines += example_table(examples.get(key, []), title)
    return lines


def score_table(metrics, split="test"):
    """The model's scores on `split` beside each baseline's on the same pairs."""
    scores = metrics.get(split) or {}
    if "bleu" not in scores:
        return []
    header = ["system"] + [label for label, _ in SCORES]
    rows = [["model"] + [_f(scores.get(key), 2) for _, key in SCORES]]
    for key, label in BASELINES.items():
        baseline = (metrics.get("baselines") or {}).get(key)
        if baseline:
            rows.append([f"baseline: {label}"] + [_f(baseline.get(k), 2) for _, k in SCORES])
    lines = [f"## Scores ({split}, {scores.get('pairs', scores.get('count', '?'))} pairs)", "",
             "| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * len(SCORES)) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    lines += ["", f"Token-level: loss {_f(scores.get('loss'))}, perplexity {_f(scores.get('perplexity'), 2)}, "
                  f"accuracy {_f(scores.get('accuracy'))}. BLEU signature: `{scores.get('bleu_signature', '')}`. "
                  "ROUGE: F-measure, lowercased, CJK characters as tokens, no stemming.", ""]
    return lines


def example_table(examples, title):
    if not examples:
        return []
    lines = [f"## {title}", "", "| source | reference | hypothesis | BLEU | ROUGE-L |", "|---|---|---|---:|---:|"]
    for e in examples:
        lines.append(f"| {_cell(e['source'])} | {_cell(e['reference'])} | {_cell(e['hypothesis'])} | "
                     f"{e['bleu']:.1f} | {100 * e['rougeL']:.1f} |")
    return lines + [""]


def _cell(text):
    text = " ".join(str(text).split())
    if len(text) > CLIP:
        text = text[: CLIP - 1] + "…"
    return text.replace("|", "\\|") or "∅"


def _f(value, digits=4):
    return "–" if value is None else f"{value:,.{digits}f}"
