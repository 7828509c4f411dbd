"""Text to text (task seq2seq): the training job, scoring by decoding, and the decoder-only way.

`danlu train` of a config with task seq2seq runs Seq2SeqTrainJob on the shared skeleton; the run format
is danlu.runs.seq2seq's, decoding danlu.decoding's, the metrics danlu.evaluate.text_metrics'. A causal LM
fine-tuned on pairs as chat (danlu.jobs.finetune) is scored the same way (score_chat_test).

>>> run = train("configs/translate_en_de.yaml")                        # doctest: +SKIP
>>> run.metrics["test"]["bleu"], run.metrics["baselines"]["copy_source"]["bleu"]   # doctest: +SKIP
"""
from __future__ import annotations

import dataclasses
import os
import sys
import time

from danlu.data.seq2seq import build_seq2seq_data, encode_pairs, read_pairs
from danlu.jobs.skeleton import Job, Plan, record_tokenizer_kind
from danlu.models import build_model, count_parameters
from danlu.runs import layout
from danlu.runs.seq2seq import Seq2SeqRun, load_tokenizers
from danlu.training.tasks import Seq2SeqTask
from danlu.training.trainer import Trainer


class Seq2SeqTrainJob(Job):
    """`danlu train` of a config with task seq2seq: pairs -> tokenizer(s) -> Seq2Seq -> the one Trainer
    (Seq2SeqTask: label-smoothed cross-entropy) -> token-level test metrics -> beam search over the test split
    -> BLEU / chrF / ROUGE / exact match beside two baselines on the same pairs (the source copied unchanged,
    and its lead sentence)."""

    name = "train"

    def plan(self, cfg, run_dir, resume, say):
        tokenizers = load_tokenizers(run_dir) if resume and os.path.exists(os.path.join(run_dir, layout.TOKENIZER)) else None
        data = build_seq2seq_data(cfg.data, cfg.run.seed, tokenizers)
        if data.target_tokenizer is None or data.target_tokenizer.kind_ == data.tokenizer.kind_:  # one kind to record
            cfg = record_tokenizer_kind(cfg, data.tokenizer, say)
        say(f"data: {len(data.train)} train / {len(data.val)} val / {len(data.test)} test pairs, vocabulary "
            f"{data.tokenizer.vocab_size_}" + (f" -> {data.target_tokenizer.vocab_size_}" if data.target_tokenizer else " (shared)")
            + (f", {data.skipped} bad rows skipped" if data.skipped else ""))
        model = build_model(cfg.model, data.spec)
        say(f"model: {cfg.model.kind}, {count_parameters(model):,} parameters; run directory: {run_dir}")
        files = {}
        if data.target_tokenizer is not None:  # written with the config, so that an interrupted run resumes
            files[layout.TARGET_TOKENIZER] = data.target_tokenizer.tokenizer_.to_str(pretty=True)
        return Plan(cfg, model, Seq2SeqTask(label_smoothing=cfg.seq2seq.label_smoothing), data.train, data.val,
                    data.test, data.tokenizer, files=files, data=data)

    def summarize(self, plan, history, trainer, metrics):
        data, started = plan.data, time.perf_counter()
        scores, baselines, self.examples = score_pairs(trainer.model, data.tokenizer, data.target, data.examples["test"],
                                                       plan.cfg.seq2seq)
        print(f"test: BLEU {scores['bleu']:.2f} (copy-the-source baseline {baselines['copy_source']['bleu']:.2f}), "
              f"chrF {scores['chrf']:.2f}, ROUGE-L {scores['rougeL']:.2f} on {scores['count']} pairs",
              file=sys.stderr, flush=True)
        return {"test": merge_scores(metrics["test"], scores), "baselines": baselines, "best_epoch": trainer.best_epoch,
                "epochs_run": len(history), "decode_seconds": time.perf_counter() - started,
                "data": {"train": len(data.train), "val": len(data.val), "test": len(data.test),
                         "skipped_rows": data.skipped}}

    def make_run(self, cfg, model, plan, metrics):
        return Seq2SeqRun(cfg.run.dir, cfg, model, plan.tokenizer, (), metrics, target_tokenizer=plan.data.target_tokenizer)

    def collector(self, cfg, plan):
        return None

    def report(self, run, plan, history, trainer, collector, eval_seconds, command):
        write_report(run, self.examples, list(history))


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
    """report.md / report.html of the run (or of an evaluation, into out_dir with that evaluation's metrics)."""
    from danlu.evaluate.report import write_blocks
    from danlu.evaluate.seq2seq_report import report_blocks

    return write_blocks(report_blocks(run.path, metrics or run.metrics, examples, history, run.cfg, split), out_dir or run.path)


# ---------------------------------------------------------------------------------------------
# the decoder-only way: a causal LM fine-tuned on pairs as chat (danlu.jobs.finetune), scored the same way


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


def score_chat_test(model, tokenizer, template, conversations, cfg, test_metrics):
    """BLEU / chrF / ROUGE of a chat fine-tune's generated test answers, and the baselines': the metrics.json
    entries ("test", "baselines") and the report's examples."""
    limit = cfg.seq2seq.eval_limit or len(conversations)
    answers, references, sources = chat_answers(model, tokenizer, template, conversations[:limit], cfg.seq2seq)
    scores, baselines, examples = score_answers(answers, references, sources)
    print(f"test: ROUGE-L {scores['rougeL']:.2f} (lead-sentence baseline {baselines['lead_sentence']['rougeL']:.2f}), "
          f"BLEU {scores['bleu']:.2f} on {scores['count']} pairs", file=sys.stderr, flush=True)
    return {"test": merge_scores(test_metrics or {}, scores), "baselines": baselines}, examples


def evaluate_chat_pairs(run, path, data_cfg):
    """`danlu evaluate` of a causal-LM chat run on a file of seq2seq pairs: answers generated and scored."""
    from danlu.data.chat import read_chat

    conversations = read_chat(path, run.cfg.finetune.system, data_cfg.encoding,
                              (data_cfg.source_column, data_cfg.target_column))
    answers, references, sources = chat_answers(run.model, run.tokenizer, run.chat_template, conversations,
                                                run.cfg.seq2seq)
    scores, baselines, _ = score_answers(answers, references, sources)
    return {**{k: v for k, v in scores.items() if k != "count"}, "pairs": scores["count"], "baselines": baselines}


def evaluate_seq2seq(run, path, data_cfg):
    """Token-level loss / perplexity and BLEU, chrF, ROUGE, exact match of a seq2seq run on a file of pairs;
    returns (metrics, the report's examples)."""
    examples = read_pairs(path, data_cfg)
    if data_cfg.reverse:
        examples = dataclasses.replace(examples, texts=examples.labels, labels=examples.texts)
    dataset = encode_pairs(examples, run.tokenizer, run.target_tokenizer)
    device = next(run.model.parameters()).device
    metrics = Trainer(run.model, Seq2SeqTask(), run.cfg.train, device=str(device)).evaluate(dataset)
    scores, baselines, shown = score_pairs(run.model, run.tokenizer, run.target, examples, run.cfg.seq2seq, limit=0)
    return {**merge_scores(metrics, scores), "baselines": baselines}, shown
