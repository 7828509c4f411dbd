"""Pretrain a small GPT on raw text, generate from it, and score it on other text — danlu's Python API.

Run:  python examples/pretrain_gpt.py                                  (People's Daily, 2,000 steps: ~6 min, one core)
      python examples/pretrain_gpt.py --corpus my_novel.txt --steps 300  (your own .txt / .jsonl file or folder;
                                                                        GBK and UTF-16 files are read as such)
"""
import argparse
from pathlib import Path

import danlu
from danlu.generation import generate
from danlu.jobs.pretrain import pretrain

parser = argparse.ArgumentParser()
parser.add_argument("--corpus", default="zh_peoples_daily", help="a .txt / .jsonl file, a folder, or a built-in corpus")
parser.add_argument("--steps", type=int, default=2000, help="optimizer steps of 16 windows of 128 characters")
parser.add_argument("--dir", default="runs/example_gpt", help="the run directory (replaced if it exists)")
parser.add_argument("--prompt", default="中国")
parser.add_argument("--score", help="a text file to measure the model's perplexity on")
args = parser.parse_args()

# 1. pretrain: the config sets the model (4 layers x 256, one token per character), AdamW with warmup and
#    cosine decay, bf16 where the CPU has it; keyword sections override it. Checkpoints, curves and a report
#    land in the run directory.
config = Path(__file__).resolve().parents[1] / "configs" / "pretrain_gpt_zh.yaml"
run = pretrain(config, data={"train": args.corpus}, run={"dir": args.dir},
               train={"max_steps": args.steps, "eval_every": max(args.steps // 10, 1)}, overwrite=True)
print(f"validation perplexity {run.metrics['val']['perplexity']:.1f} after {args.steps} steps")

# 2. generate: temperature and top-k sampling with the KV cache (danlu generate RUN "prompt" does the same)
print(args.prompt + generate(run.model, run.tokenizer, [args.prompt], max_new_tokens=60, temperature=0.8, top_k=50,
                                seed=0)[0])

# 3. score other text with the run's own tokenizer (danlu evaluate RUN --data FILE)
if args.score:
    scored = danlu.evaluate_run(run.path, args.score)
    print(f"{args.score}: perplexity {scored['perplexity']:.1f} over {scored['count']:,} tokens")
print("report:", Path(run.path) / "report.md")
