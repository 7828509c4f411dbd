"""The report sections of a text-to-text run (seq2seq, or a chat fine-tune scored on pairs): scores beside the
baselines, the training table, and example tables (the first sources, the best and the worst by sentence
BLEU), as blocks of the one report writer (danlu.evaluate.report: report.md and report.html).

>>> write_blocks(report_blocks("runs/translate_en_de", metrics, examples, history), "runs/translate_en_de")  # doctest: +SKIP
"""
from __future__ import annotations

import os
import time

SCORES = (("BLEU", "bleu"), ("chrF", "chrf"), ("ROUGE-1", "rouge1"), ("ROUGE-2", "rouge2"), ("ROUGE-L", "rougeL"),
          ("exact match %", "exact_match"))
BASELINES = {"copy_source": "copy the source", "lead_sentence": "lead sentence of the source"}
CLIP = 220  # characters of a text in the example tables


def report_blocks(run_path, metrics, examples=None, history=(), config=None, split="test"):
    """The blocks of a seq2seq run's report (`metrics` as in its metrics.json)."""
    name = os.path.basename(os.path.normpath(run_path))
    blocks = [("h1", f"Run report: {name}"), ("p", f"Run directory `{run_path}`; written {time.strftime('%Y-%m-%d %H:%M')}.")]
    if config is not None:
        d, m, s = config.data, config.model, config.seq2seq
        counts = metrics.get("data", {})
        rows = [["data", f"`{d.train}`" + (" (reversed)" if d.reverse else "") + f"; {counts.get('train', '?')} train / "
                         f"{counts.get('val', '?')} val / {counts.get('test', '?')} test pairs"],
                ["tokenizer", f"{d.tokenizer.kind}, {'shared' if d.shared_tokenizer else 'one per side'}, vocabulary "
                              f"{d.tokenizer.vocab_size}, max length {d.tokenizer.max_length}"],
                ["model", f"{m.kind}, {metrics.get('parameters', 0):,} parameters (embed_dim {getattr(m, 'embed_dim', '?')}, "
                          f"layers {getattr(m, 'layers', '?')})"],
                ["decoding", f"beam {s.beam_size}, length penalty {s.length_penalty}, max {s.max_new_tokens} tokens"
                             + (f", no-repeat {s.no_repeat_ngram}-grams" if s.no_repeat_ngram else "")]]
        blocks += [("h2", "Setup"), ("table", ["", ""], rows)]
    blocks += score_blocks(metrics, split)
    if history:
        rows = [[str(r.get("epoch")), _f(r.get("train_loss")), _f(r.get("val_loss")), _f(r.get("val_perplexity"), 2),
                 _f(r.get("tokens_per_s"), 0), _f(r.get("seconds"), 1)] for r in history]
        blocks += [("h2", "Training"),
                   ("table", ["epoch", "train loss", "val loss", "val perplexity", "tokens/s", "seconds"], rows)]
    for key, title in (("first", "First examples"), ("best", "Best by sentence BLEU"), ("worst", "Worst by sentence BLEU")):
        blocks += example_blocks((examples or {}).get(key, []), title)
    return blocks


def score_blocks(metrics, split="test"):
    """The model's scores on `split` beside each baseline's on the same pairs."""
    scores = metrics.get(split) or {}
    if "bleu" not in scores:
        return []
    rows = [["model"] + [_f(scores.get(key), 2) for _, key in SCORES]]
    for key, label in BASELINES.items():
        baseline = (metrics.get("baselines") or {}).get(key)
        if baseline:
            rows.append([f"baseline: {label}"] + [_f(baseline.get(k), 2) for _, k in SCORES])
    return [("h2", f"Scores ({split}, {scores.get('pairs', scores.get('count', '?'))} pairs)"),
            ("table", ["system"] + [label for label, _ in SCORES], rows),
            ("p", f"Token-level: loss {_f(scores.get('loss'))}, perplexity {_f(scores.get('perplexity'), 2)}, "
                  f"accuracy {_f(scores.get('accuracy'))}. BLEU signature: `{scores.get('bleu_signature', '')}`. "
                  "ROUGE: F-measure, lowercased, CJK characters as tokens, no stemming.")]


def example_blocks(examples, title):
    if not examples:
        return []
    rows = [[_clip(e["source"]), _clip(e["reference"]), _clip(e["hypothesis"]), f"{e['bleu']:.1f}",
             f"{100 * e['rougeL']:.1f}"] for e in examples]
    return [("h2", title), ("table", ["source", "reference", "hypothesis", "BLEU", "ROUGE-L"], rows)]


def _clip(text):
    text = " ".join(str(text).split())
    return (text[: CLIP - 1] + "…" if len(text) > CLIP else text) or "∅"


def _f(value, digits=4):
    return "–" if value is None else f"{value:,.{digits}f}"
