"""The text-to-text job and run: train an encoder-decoder, decode the test split, score it beside baselines.

`danlu train` hands a config with `task: seq2seq` to `train_seq2seq`: pairs -> tokenizer(s) -> Seq2Seq ->
the one Trainer (Seq2SeqTask: label-smoothed cross-entropy) -> token-level test metrics -> beam search over
the test split -> BLEU / chrF / ROUGE / exact match, and the same scores of two baselines on the same
pairs (the source copied unchanged, and its lead sentence) -> run directory and report.md.

    runs/<name>/  config.yaml  tokenizer.json  [tokenizer_target.json]  model.safetensors  metrics.json
                  history.jsonl  report.md  checkpoints/

>>> run = load_run("runs/translate_en_de")                             # doctest: +SKIP
>>> run.predict(["In the beginning was the Word."])[0]["text"]         # doctest: +SKIP
"""
from __future__ import annotations

import dataclasses
import os
import sys
import time

import torch

from danlu import config as config_mod
from danlu.data import TextTokenizer
from danlu.data.seq2seq import build_seq2seq_data, encode_pairs, read_pairs, seq2seq_spec
from danlu.files import atomic_write_text, load_tensors, load_weights, read_json
from danlu.models import build_model, count_parameters
from danlu.registry import ConfigError
from danlu.runs import Run, prepare_run_dir, save_run, save_tokenizer
from danlu.training import distributed as dist
from danlu.training.tasks import Seq2SeqTask
from danlu.training.trainer import Trainer

TARGET_TOKENIZER = "tokenizer_target.json"


def train_seq2seq(cfg, resume=False, overwrite=False, loggers=()) -> "Seq2SeqRun":
    """Train, decode, score and save a seq2seq run (called by danlu.pipeline.train for task seq2seq)."""
    from danlu.pipeline import seed_everything

    main = dist.is_main()
    run_dir = prepare_run_dir(cfg.run.dir, overwrite=overwrite, resume=resume) if main else cfg.run.dir
    seed_everything(cfg.run.seed)
    say = lambda m: main and print(m, file=sys.stderr, flush=True)  # noqa: E731
    started = time.perf_counter()
    tokenizers = load_tokenizers(run_dir) if resume and os.path.exists(os.path.join(run_dir, "tokenizer.json")) else None
    data = build_seq2seq_data(cfg.data, cfg.run.seed, tokenizers)
    say(f"data: {len(data.train)} train / {len(data.val)} val / {len(data.test)} test pairs, vocabulary "
        f"{data.tokenizer.vocab_size_}" + (f" -> {data.target_tokenizer.vocab_size_}" if data.target_tokenizer else " (shared)")
        + (f", {data.skipped} bad rows skipped" if data.skipped else ""))
    if main:  # the config and tokenizers first, so that an interrupted run can be resumed
        atomic_write_text(os.path.join(run_dir, "config.yaml"), config_mod.dump(cfg))
        save_tokenizers(run_dir, data.tokenizer, data.target_tokenizer)
    model = build_model(cfg.model, data.spec)
    say(f"model: {cfg.model.kind}, {count_parameters(model):,} parameters; run directory: {run_dir}")
    task = Seq2SeqTask(label_smoothing=cfg.seq2seq.label_smoothing)
    trainer = Trainer(model, task, cfg.train, run_dir=run_dir, seed=cfg.run.seed, loggers=loggers)
    history = trainer.fit(data.train, data.val, resume=resume)
    model = trainer.model
    trainer.cfg = dataclasses.replace(trainer.cfg, eval_batches=0)
    test, val = trainer.evaluate(data.test), trainer.evaluate(data.val)
    decode_started = time.perf_counter()
    scores, baselines, examples = score_pairs(model, data.tokenizer, data.target, data.examples["test"], cfg.seq2seq)
    say(f"test: BLEU {scores['bleu']:.2f} (copy-the-source baseline {baselines['copy_source']['bleu']:.2f}), "
        f"chrF {scores['chrf']:.2f}, ROUGE-L {scores['rougeL']:.2f} on {scores['count']} pairs")
    metrics = {
        "test": merge_scores(test, scores),
        "val": val,
        "baselines": baselines,
        "best_epoch": trainer.best_epoch,
        "epochs_run": len(history),
        "parameters": count_parameters(model),
        "train_seconds": sum(r["seconds"] for r in history),
        "decode_seconds": time.perf_counter() - decode_started,
        "total_seconds": time.perf_counter() - started,
        "tokens_per_s": sum(r.get("tokens_per_s", 0.0) for r in history) / max(len(history), 1),
        "data": {"train": len(data.train), "val": len(data.val), "test": len(data.test), "skipped_rows": data.skipped},
    }
    run = Seq2SeqRun(run_dir, cfg, model, data.tokenizer, (), metrics, target_tokenizer=data.target_tokenizer)
    if main:
        save_run(run_dir, cfg, model, data.tokenizer, (), metrics)
        save_tokenizers(run_dir, data.tokenizer, data.target_tokenizer)
        write_report(run, examples, list(history))
    return run


def score_pairs(model, tokenizer, target_tokenizer, examples, options, limit=None):
    """Decode the sources of `examples` (texts = sources, labels = targets) and score them, streaming;
    returns (scores, {baseline: scores}, report examples). Baselines are scored on the same pairs."""
    from danlu.decoding import decode_texts
    from danlu.evaluate.text_metrics import TextMetrics, lead_sentence

    limit = options.eval_limit if limit is None else limit
    sources, references = list(examples.texts), list(examples.labels)
    if limit:
        sources, references = sources[:limit], references[:limit]
    metrics = TextMetrics()
    copy, lead = TextMetrics(keep=0), TextMetrics(keep=0)
    copy.update(sources, references)
    lead.update([lead_sentence(s) for s in sources], references)
    pending = []
    for index, ids in decode_texts(model, tokenizer, target_tokenizer, sources, batch_size=options.batch_size,
                                   **options.decode_options()):
        pending.append((index, target_tokenizer.decode(ids)))
        if len(pending) >= options.batch_size:
            _flush(metrics, pending, sources, references)
    _flush(metrics, pending, sources, references)
    return metrics.compute(), {"copy_source": copy.compute(), "lead_sentence": lead.compute()}, metrics.examples()


def merge_scores(token_metrics, scores):
    """Token-level metrics (loss, perplexity, accuracy, count = target tokens) with the text scores
    (bleu, chrf, rouge*, exact_match; `pairs` = how many were decoded)."""
    return {**token_metrics, **{k: v for k, v in scores.items() if k != "count"}, "pairs": scores["count"]}


def _flush(metrics, pending, sources, references):
    if pending:
        pending.sort()
        metrics.update([h for _, h in pending], [references[i] for i, _ in pending], [sources[i] for i, _ in pending])
        pending.clear()


def write_report(run, examples, history, out_dir=None, metrics=None, split="test"):
    """report.md of the run (or of an evaluation, into out_dir with that evaluation's metrics)."""
    from danlu.evaluate.seq2seq_report import report_lines

    out_dir = out_dir or run.path
    path = os.path.join(out_dir, "report.md")
    lines = report_lines(run.path, metrics or run.metrics, examples, history, run.cfg, split)
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


# ---------------------------------------------------------------------------------------------
# the decoder-only way: a causal LM fine-tuned on pairs as chat (danlu.finetune), scored the same way


def chat_answers(model, tokenizer, template, conversations, options):
    """(generated answers, references, sources) for conversations whose last turn is the reference answer:
    the turns before it are rendered with the chat template and continued greedily (temperature 0; the
    `seq2seq` section's temperature / top_k / top_p / max_new_tokens apply; beam search is for seq2seq)."""
    from danlu.chat_template import render_chat, stop_sequences
    from danlu.generation import generate

    names = {"bos_token": "<s>", "eos_token": "</s>"}
    variables = {k: tokenizer.tokenizer_.id_to_token(tokenizer.token_id(v)) or "" for k, v in names.items()}
    prompts = [render_chat(template, c[:-1], add_generation_prompt=True, **variables) for c in conversations]
    references = [c[-1]["content"] for c in conversations]
    sources = [next((m["content"] for m in c if m["role"] == "user"), "") for c in conversations]
    answers = []
    for start in range(0, len(prompts), options.batch_size):
        answers += generate(model, tokenizer, prompts[start : start + options.batch_size],
                            max_new_tokens=options.max_new_tokens, temperature=options.temperature,
                            top_k=options.top_k, top_p=options.top_p, repetition_penalty=options.repetition_penalty,
                            stop=list(stop_sequences(template)), seed=0)
    return [a.strip() for a in answers], references, sources


def score_answers(answers, references, sources):
    """(scores, baselines, report examples) of generated answers, as score_pairs gives them."""
    from danlu.evaluate.text_metrics import TextMetrics, lead_sentence

    metrics, copy, lead = TextMetrics(), TextMetrics(keep=0), TextMetrics(keep=0)
    metrics.update(answers, references, sources)
    copy.update(sources, references)
    lead.update([lead_sentence(s) for s in sources], references)
    return metrics.compute(), {"copy_source": copy.compute(), "lead_sentence": lead.compute()}, metrics.examples()


def score_chat_test(metrics, model, tokenizer, template, conversations, cfg):
    """Add BLEU / chrF / ROUGE of the generated test answers, and the baselines', to a fine-tuning run's metrics."""
    limit = cfg.seq2seq.eval_limit or len(conversations)
    answers, references, sources = chat_answers(model, tokenizer, template, conversations[:limit], cfg.seq2seq)
    scores, baselines, examples = score_answers(answers, references, sources)
    metrics["test"] = merge_scores(metrics.get("test", {}), scores)
    metrics["baselines"] = baselines
    if dist.is_main():  # the report: scores beside the baselines, and example answers
        from danlu.evaluate.seq2seq_report import report_lines

        lines = report_lines(cfg.run.dir, metrics, examples)
        atomic_write_text(os.path.join(cfg.run.dir, "report.md"), "\n".join(lines) + "\n")
    print(f"test: ROUGE-L {scores['rougeL']:.2f} (lead-sentence baseline {baselines['lead_sentence']['rougeL']:.2f}), "
          f"BLEU {scores['bleu']:.2f} on {scores['count']} pairs", file=sys.stderr, flush=True)
    return metrics


def evaluate_chat_pairs(run, path, data_cfg):
    """`danlu evaluate` of a causal-LM chat run on a file of seq2seq pairs: answers generated and scored."""
    from danlu.chat_template import load_template
    from danlu.data.chat import read_chat

    conversations = read_chat(path, run.cfg.finetune.system, data_cfg.encoding,
                              (data_cfg.source_column, data_cfg.target_column))
    answers, references, sources = chat_answers(run.model, run.tokenizer, load_template(run.path), conversations,
                                                run.cfg.seq2seq)
    scores, baselines, _ = score_answers(answers, references, sources)
    return {**{k: v for k, v in scores.items() if k != "count"}, "pairs": scores["count"], "baselines": baselines}


# ---------------------------------------------------------------------------------------------
# the run


def save_tokenizers(path, tokenizer, target_tokenizer=None):
    save_tokenizer(path, tokenizer)
    if target_tokenizer is not None:
        tmp = os.path.join(path, f".{TARGET_TOKENIZER}.tmp")
        target_tokenizer.save(tmp)
        os.replace(tmp, os.path.join(path, TARGET_TOKENIZER))


def load_tokenizers(path):
    target = os.path.join(path, TARGET_TOKENIZER)
    return (TextTokenizer.load(os.path.join(path, "tokenizer.json")),
            TextTokenizer.load(target) if os.path.exists(target) else None)


class Seq2SeqRun(Run):
    """A trained text-to-text run: `predict(texts)` -> [{"text": generated}], `evaluate(pairs file)`."""

    def __init__(self, path, cfg, model, tokenizer, labels=(), metrics=None, target_tokenizer=None):
        super().__init__(path, cfg, model, tokenizer, labels, metrics)
        self.target_tokenizer = target_tokenizer
        self.task = Seq2SeqTask(label_smoothing=0.0)
        self.last_metrics, self.last_examples = None, None

    @property
    def target(self):
        return self.target_tokenizer or self.tokenizer

    @property
    def spec(self):
        return seq2seq_spec(self.tokenizer, self.target_tokenizer)

    def generate(self, prompts, **options):
        """Generated text of each source; options override the run's `seq2seq` section (beam_size, ...)."""
        from danlu.decoding import translate

        known = self.cfg.seq2seq.decode_options()
        unknown = set(options) - set(known) - {"batch_size", "seed"}
        if unknown:
            raise ConfigError(f"unknown decoding options: {', '.join(sorted(unknown))}; expected: {', '.join(known)}")
        batch_size = options.pop("batch_size", self.cfg.seq2seq.batch_size)
        return translate(self.model, self.tokenizer, self.target, prompts, batch_size=batch_size, **{**known, **options})

    def predict(self, texts, batch_size=None, top_k=None, **options):
        """[{"text": generated}] per source text, decoded as the run's `seq2seq` section says."""
        texts = list(texts)
        return [{"text": t} for t in self.generate(texts, batch_size=batch_size or self.cfg.seq2seq.batch_size, **options)]

    def predict_proba(self, texts, batch_size=64):
        raise ConfigError(f"{self.path}: a seq2seq run generates text; use predict (danlu predict RUN \"text\")")

    def evaluate(self, path, **data_overrides):
        """Token-level loss / perplexity and BLEU, chrF, ROUGE, exact match on a file of pairs."""
        data_cfg = dataclasses.replace(self.cfg.data, **data_overrides)
        examples = read_pairs(path, data_cfg)
        if data_cfg.reverse:
            examples = dataclasses.replace(examples, texts=examples.labels, labels=examples.texts)
        dataset = encode_pairs(examples, self.tokenizer, self.target_tokenizer)
        device = next(self.model.parameters()).device
        train_cfg = dataclasses.replace(self.cfg.train, eval_batches=0)
        metrics = Trainer(self.model, self.task, train_cfg, device=str(device)).evaluate(dataset)
        scores, baselines, examples_shown = score_pairs(self.model, self.tokenizer, self.target, examples,
                                                        self.cfg.seq2seq, limit=0)
        self.last_metrics = merge_scores(metrics, scores)
        self.last_examples = examples_shown
        return {**self.last_metrics, "baselines": baselines}


def load_seq2seq_run(path, cfg, device="cpu") -> Seq2SeqRun:
    """A seq2seq run directory -> Seq2SeqRun (called by danlu.runs.load_run)."""
    tokenizer, target_tokenizer = load_tokenizers(path)
    model = build_model(cfg.model, seq2seq_spec(tokenizer, target_tokenizer))
    weights = os.path.join(path, "model.safetensors")
    load_weights(model, load_tensors(weights)[0], where=weights)
    model.to(torch.device(device) if device != "auto" else torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    metrics_file = os.path.join(path, "metrics.json")
    metrics = read_json(metrics_file) if os.path.exists(metrics_file) else {}
    return Seq2SeqRun(path, cfg, model, tokenizer, (), metrics, target_tokenizer=target_tokenizer)


__all__ = ["Seq2SeqRun", "load_seq2seq_run", "score_pairs", "train_seq2seq"]
