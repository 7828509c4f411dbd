"""Run the benchmarks: one markdown table each, printed and saved under benchmarks/results/.

    python benchmarks/run.py [--only NAME] [--quick] [--device auto|cpu|cuda] [--threads N]

A benchmark is a module next to this file with a `NAME`, a `run(args) -> list[dict]` (one dict a
table row, the same keys in every row) and optionally `add_arguments(parser)` for its own options.
results/ is git-ignored: figures quoted in README are copied from it by hand, with the command.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import shlex
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def discover():
    """NAME -> module, for every benchmark module in this folder (sorted by file name). The folder goes on sys.path,
    so that the modules import their shared helpers (_gpt2, _timing) however the harness was started."""
    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))
    modules = {}
    for path in sorted(HERE.glob("*.py")):
        if path.stem == "run" or path.stem.startswith("_"):
            continue
        spec = importlib.util.spec_from_file_location(f"benchmarks.{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        if hasattr(module, "NAME") and hasattr(module, "run"):
            modules[module.NAME] = module
    return modules


def parse_args(argv, modules):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=sorted(modules), help="run this benchmark only")
    parser.add_argument("--quick", action="store_true", help="a small subset, for tests and smoke runs")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto: cuda when torch sees a GPU, else cpu")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads (default: torch's choice); 1 is faster on a busy machine")
    parser.add_argument("--results", default=str(HERE / "results"), help="folder for <name>.md and <name>.json")
    for module in modules.values():
        if hasattr(module, "add_arguments"):
            module.add_arguments(parser)
    return parser.parse_args(argv)


def markdown_table(rows):
    columns = list(dict.fromkeys(key for row in rows for key in row))
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(key)) for key in columns) + " |")
    return "\n".join(lines)


def _cell(value):
    if value is None:
        return ""
    if isinstance(value, float):
        value = round(value, 12) + 0.0  # no "-0.0000" from rounding noise
        return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.2f}" if abs(value) >= 1 else f"{value:.4f}"
    return str(value)


def environment(device):
    import torch

    if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        hardware = torch.cuda.get_device_name(0)
    else:
        hardware = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"
    return {"python": platform.python_version(), "torch": torch.__version__, "hardware": hardware}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    modules = discover()
    args = parse_args(argv, modules)
    selected = [modules[args.only]] if args.only else list(modules.values())
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # danlu's jobs keep it (train.threads 0 defers to it)
    command = shlex.join(["python", "benchmarks/run.py", *argv])
    os.makedirs(args.results, exist_ok=True)
    for module in selected:
        rows = module.run(args)
        env = environment(args.device)
        when = datetime.datetime.now().isoformat(timespec="seconds")
        table = markdown_table(rows)
        header = f"## {module.NAME}\n\n`{command}`  \n{when}; " + "; ".join(f"{k} {v}" for k, v in env.items())
        print(f"{header}\n\n{table}\n", flush=True)
        path = os.path.join(args.results, module.NAME)
        with open(path + ".md", "w", encoding="utf-8") as f:
            f.write(f"{header}\n\n{table}\n")
        with open(path + ".json", "w", encoding="utf-8") as f:
            json.dump({"name": module.NAME, "command": command, "date": when, "environment": env,
                       "args": vars(args), "rows": rows}, f, ensure_ascii=False, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
