"""Fine-tuning: a pretrained base (a danlu run, a Hugging Face folder, a GGUF file) -> a new run.

    danlu finetune configs/finetune_minilm_en.yaml              # classification, every weight trained
    danlu finetune configs/lora_smollm2_chat.yaml               # chat, LoRA adapters only

The base gives the model config, weights and tokenizer; the config gives the task and data (the same
data.train / data.val / data.test keys as `danlu train`) and `finetune.method`:

    full    every weight trains
    lora    the base is frozen; low-rank adapters (and a new classification head) train
            (Hu et al. 2021); the run stores adapter.safetensors and a reference to the base
    freeze  the base is frozen; only the new classification head trains (linear probing)

Classification puts a new head on the backbone: the pooled encoder output (cls or mean) of a BERT,
the last real token of a GPT. Chat (task causal_lm) reads JSONL conversations or Alpaca rows, masks
the loss to the assistant turns and stores the chat template in the run (`chat_template.jinja`).

>>> run = finetune("configs/finetune_minilm_en.yaml", "train.epochs=1")   # doctest: +SKIP
>>> run.metrics["test"]["accuracy"]                                       # doctest: +SKIP
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys

from danlu.chat_template import DEFAULT_TEMPLATE
from danlu.data import DataError, encode_splits, read_splits
from danlu.data.chat import encode_chat, is_pair_file, read_chat
from danlu.files import atomic_write_json, atomic_write_text
from danlu.jobs.skeleton import Job, Plan, run_job
from danlu.models.lora import count_trainable, merge_lora
from danlu.registry import ConfigError
from danlu.runs import layout, run_spec, save_run
from danlu.runs.adapter import build_finetune_model, save_adapter
from danlu.runs.load import load_base
from danlu.training.tasks import TASKS, CausalLMTask


class FinetuneJob(Job):
    name = "finetune"

    def plan(self, cfg, run_dir, resume, say):
        base = load_base(cfg.finetune.base, cfg.data.tokenizer.max_length)
        cfg = prepare_config(cfg, base)
        tokenizer, files = base.tokenizer, {}
        if cfg.task == "classification":
            data = classification_data(cfg, tokenizer)
            splits, labels, task = {"train": data.train, "val": data.val, "test": data.test}, data.labels, TASKS["classification"](data.labels)
        else:
            files[layout.TEMPLATE] = base.chat_template or DEFAULT_TEMPLATE
            data, labels, task = None, (), CausalLMTask()
            splits = chat_data(cfg, tokenizer, files[layout.TEMPLATE])
        say(f"base: {base.path} ({cfg.model.kind}); data: "
            + ", ".join(f"{len(d)} {k}" for k, d in splits.items() if d is not None))
        model = build_finetune_model(cfg, base.weights, run_spec(cfg, tokenizer, labels))
        del base
        trainable, total = count_trainable(model)
        say(f"method: {cfg.finetune.method}, {trainable:,} of {total:,} parameters train ({trainable / total:.2%}); "
            f"run directory: {run_dir}")
        adapter_only = cfg.finetune.method == "lora"  # checkpoints of a frozen base would be the whole base, each time
        return Plan(cfg, model, task, splits["train"], splits.get("val"), splits.get("test"), tokenizer, labels,
                    files=files, checkpoints=not adapter_only, data=data)

    def summarize(self, plan, history, trainer, metrics):
        trainable, total = count_trainable(trainer.model)
        out = {"epochs_run": len(history), "trainable_parameters": trainable, "trainable_fraction": trainable / total,
               "method": plan.cfg.finetune.method, "base": plan.cfg.finetune.base}
        self.examples = None
        if plan.cfg.task == "classification":  # beside the same scikit-learn baselines as `danlu train`
            from danlu.jobs.train import text_baseline_summary

            out.update(text_baseline_summary(plan, metrics))
        if getattr(plan.test, "pairs", False):  # seq2seq pairs as chat: the test answers are generated and scored
            from danlu.jobs.seq2seq import score_chat_test

            scores, self.examples = score_chat_test(trainer.model, plan.tokenizer, plan.files[layout.TEMPLATE],
                                                    plan.test.conversations, plan.cfg, metrics.get("test"))
            out.update(scores)
        return out

    def report(self, run, plan, history, trainer, collector, eval_seconds, command):
        if self.examples is None:
            return super().report(run, plan, history, trainer, collector, eval_seconds, command)
        from danlu.evaluate.report import write_blocks
        from danlu.evaluate.seq2seq_report import report_blocks  # scores beside the baselines, example answers

        write_blocks(report_blocks(run.path, run.metrics, self.examples), run.path)

    def save(self, run, plan, history):
        cfg = run.cfg
        if cfg.finetune.method == "lora" and cfg.finetune.save == "adapter":
            atomic_write_text(os.path.join(run.path, layout.HISTORY),  # no checkpoints wrote it
                              "".join(json.dumps(r) + "\n" for r in history))
            run.metrics["adapter_bytes"] = save_adapter(run.path, cfg, run.model, run.labels)
            atomic_write_json(os.path.join(run.path, layout.METRICS), run.metrics)
            return
        if cfg.finetune.method == "lora":
            merge_lora(run.model)
            run.cfg = dataclasses.replace(cfg, finetune=dataclasses.replace(cfg.finetune, method="full"))
        save_run(run.path, run.cfg, run.model, run.tokenizer, run.labels, run.metrics)


def finetune(config=None, *overrides, overwrite=False, loggers=(), **sections):
    """Fine-tune a base on a task; save and return the Run. Keyword sections override the file."""
    return run_job(FinetuneJob(), config, overrides, overwrite=overwrite, loggers=loggers, **sections)


def prepare_config(cfg, base):
    """The run's resolved config: the base's model config (with finetune.pooling), the base's absolute
    path, and data lengths the model can hold (so that load_run rebuilds the same shapes)."""
    ft, model_cfg = cfg.finetune, base.model_config
    if cfg.task == "causal_lm" and model_cfg.kind != "gpt":
        raise ConfigError(f"task causal_lm needs a decoder base (gpt / Llama family), got {model_cfg.kind}")
    if ft.pooling and cfg.task == "classification":
        model_cfg = dataclasses.replace(model_cfg, pooling=check_pooling(ft.pooling, model_cfg))
    context = getattr(model_cfg, "max_positions", None) or 1 << 30  # recurrent and convolutional models have no cap
    tokenizer = dataclasses.replace(cfg.data.tokenizer, kind=base.tokenizer_kind)
    if cfg.task == "classification":
        tokenizer = dataclasses.replace(tokenizer, max_length=min(tokenizer.max_length, context))
        data = dataclasses.replace(cfg.data, tokenizer=tokenizer)
    else:
        data = dataclasses.replace(cfg.data, tokenizer=tokenizer, block_size=min(ft.max_length, context))
    return dataclasses.replace(cfg, model=model_cfg, data=data, finetune=dataclasses.replace(ft, base=base.path))


def check_pooling(pooling, model_cfg):
    """`finetune.pooling` if the base's family offers it (a GPT: last, mean; a BERT: cls, mean), else a ConfigError."""
    import typing

    from danlu.schema import choices

    field = typing.get_type_hints(type(model_cfg), include_extras=True).get("pooling")
    allowed = choices(field) if field is not None else ()
    if pooling not in allowed:
        offered = (f"a {model_cfg.kind} base pools {', '.join(allowed)}" if allowed
                   else f"a {model_cfg.kind} base has no pooling to choose; leave it empty")
        raise ConfigError(f"finetune.pooling: {pooling!r} does not apply to this base: {offered}")
    return pooling


def classification_data(cfg, tokenizer):
    """Splits read exactly as `danlu train` reads them, encoded with the base's tokenizer (a DataBundle)."""
    tokenizer.max_length = cfg.data.tokenizer.max_length
    tokenizer.tokenizer_.enable_truncation(tokenizer.max_length)
    return encode_splits(read_splits(cfg.data, cfg.run.seed), tokenizer)


def chat_data(cfg, tokenizer, template):
    """Chat / Alpaca JSONL -> ChatDatasets (train, and val / test from their files or split off train)."""
    import numpy as np

    tokenizer.tokenizer_.no_truncation()
    tokenizer.max_length = 0
    pairs = (cfg.data.source_column, cfg.data.target_column)  # seq2seq pair files read as conversations too
    read = lambda p: read_chat(p, cfg.finetune.system, cfg.data.encoding, pairs)  # noqa: E731
    train = read(cfg.data.train)
    splits = {"train": train}
    order = np.random.default_rng(cfg.run.seed).permutation(len(train))
    cut = 0
    for name, fraction in (("val", cfg.data.val_fraction), ("test", cfg.data.test_fraction)):
        if getattr(cfg.data, name):
            splits[name] = read(getattr(cfg.data, name))
        elif int(len(train) * fraction) >= 1 and len(train) >= 20:
            n = int(len(train) * fraction)
            splits[name] = [train[i] for i in order[cut : cut + n]]
            cut += n
    if cut:
        held = set(order[:cut].tolist())
        splits["train"] = [c for i, c in enumerate(train) if i not in held]
    if cfg.data.limit:
        splits = {k: v[: cfg.data.limit] for k, v in splits.items()}
    encoded = {k: encode_chat(v, tokenizer, template, cfg.data.block_size) for k, v in splits.items()}
    for name, dataset in encoded.items():  # seq2seq pairs: their test answers are generated and scored
        dataset.pairs = is_pair_file(getattr(cfg.data, name) or cfg.data.train, pairs)
    train = encoded["train"]
    if train.supervised_tokens == 0:
        raise DataError(f"{cfg.data.train}: none of the {len(train)} training conversations keeps an answer token "
                        f"within finetune.max_length={cfg.data.block_size} tokens, so there is nothing to learn; "
                        f"raise finetune.max_length or shorten the prompts")
    if train.lost:
        print(f"warning: {cfg.data.train}: {train.lost} of {len(train)} training conversations lose their whole answer "
              f"to finetune.max_length={cfg.data.block_size} tokens (they train on nothing); raise it to keep them",
              file=sys.stderr, flush=True)
    return encoded
