"""One direction of dependency: every module of danlu sits in a layer, and imports only from its own layer
or below — imports inside functions included — with no cycle anywhere. docs/architecture.md draws it.

A module is placed by the longest prefix in LAYERS that names it, so a new file lands in its package's
layer; a new top-level module or package fails `test_every_module_has_a_layer` until it is placed.
"""
import ast
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

LAYERS = [  # bottom to top
    ("foundation", ["danlu.registry", "danlu.files", "danlu.schema", "danlu.sampling"]),
    ("kernels", ["danlu.kernels"]),
    ("data and models", ["danlu.data", "danlu.models", "danlu.chat_template", "danlu.generation", "danlu.decoding",
                         "danlu.evaluate.metrics", "danlu.evaluate.fonts", "danlu.evaluate.plots"]),
    ("config", ["danlu.config"]),
    ("training and compression", ["danlu.training", "danlu.compress"]),
    ("run directory", ["danlu.runs"]),
    ("evaluation", ["danlu.evaluate"]),
    ("jobs", ["danlu.jobs"]),
    ("serving", ["danlu.serve"]),
    ("interface", ["danlu.cli", "danlu.__main__", "danlu.testing", "danlu"]),
]


def modules():
    """Module name -> source file, for every .py under danlu/."""
    found = {}
    for path in sorted((ROOT / "danlu").rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def imports(name, path, known):
    """(imported danlu module, line, imported names) for every import statement in the file, at any depth."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield _module(alias.name, known), node.lineno, ()
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                yield (full, node.lineno, ()) if full in known else (_module(base, known), node.lineno, (alias.name,))


def _module(name, known):
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name


def layer_of(name):
    best = None
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if name == prefix or name.startswith(prefix + "."):
                if best is None or len(prefix) > len(best[1]):
                    best = (index, prefix)
    return None if best is None else best[0]


def graph():
    known = modules()
    edges = {}
    for name, path in known.items():
        edges[name] = {}
        for target, line, names in imports(name, path, known):
            if target.startswith("danlu") and target and target != name:
                edges[name].setdefault(target, (line, names))
    return known, edges


def test_every_module_has_a_layer():
    unplaced = [name for name in modules() if layer_of(name) is None]
    assert not unplaced, f"modules in no layer (add them to LAYERS in {__file__}): {unplaced}"


def test_no_module_imports_a_higher_layer():
    known, edges = graph()
    upward = []
    for name, targets in edges.items():
        for target, (line, _) in targets.items():
            if layer_of(target) > layer_of(name):
                upward.append(f"{known[name].relative_to(ROOT)}:{line} ({LAYERS[layer_of(name)][0]}) imports "
                              f"{target} ({LAYERS[layer_of(target)][0]})")
    assert not upward, "imports against the direction of dependency:\n" + "\n".join(upward)


def test_no_import_cycle():
    _, edges = graph()
    state, stack, cycles = {}, [], []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for target in edges.get(node, {}):
            if state.get(target) == "open":
                cycles.append(stack[stack.index(target):] + [target])
            elif target not in state:
                visit(target)
        stack.pop()
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_no_module_imports_another_modules_private_names():
    known, _ = graph()
    private = []
    for name, path in known.items():
        for target, line, names in imports(name, path, known):
            for imported in names:
                if imported.startswith("_") and not imported.startswith("__") and target != name:
                    private.append(f"{path.relative_to(ROOT)}:{line} imports {target}.{imported}")
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):  # torch's private helpers too
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("torch"):
                private += [f"{path.relative_to(ROOT)}:{node.lineno} imports {node.module}.{a.name}"
                            for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
    assert not private, "private names used across modules:\n" + "\n".join(private)


def test_the_layering_check_catches_an_upward_import(tmp_path):
    """The check above is not vacuous: a data module that imports a job is flagged."""
    assert layer_of("danlu.data.sources") < layer_of("danlu.jobs.train")
    assert layer_of("danlu.runs.adapter") < layer_of("danlu.jobs.finetune")
    assert layer_of("danlu.serve.app") > layer_of("danlu.runs.run")
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from danlu.jobs.train import train\n")
    found = list(imports("danlu.data.m", source, set(modules()) | {"danlu.data.m"}))
    assert found == [("danlu.jobs.train", 2, ("train",))]


def test_every_task_has_one_implementation():
    from danlu.registry import TASKS
    from danlu.training.tasks import TASKS as IMPLEMENTATIONS

    assert set(TASKS) == set(IMPLEMENTATIONS)
    for name, cls in IMPLEMENTATIONS.items():
        assert cls.name == name
        # the config checks train.early_stopping.metric against the registry; the loop reads the task's own
        assert dict(TASKS[name].monitors) == cls(()).monitors(), name


@pytest.mark.parametrize("verb", ["train", "pretrain", "finetune"])
def test_jobs_share_the_skeleton(verb):
    """Every training verb is a Job run by the one skeleton, not a copy of it."""
    import importlib

    from danlu.jobs.skeleton import Job

    module = importlib.import_module(f"danlu.jobs.{verb}")
    jobs = [v for v in vars(module).values() if isinstance(v, type) and issubclass(v, Job) and v is not Job]
    assert len(jobs) == 1
    assert "run_job(" in Path(module.__file__).read_text(encoding="utf-8")
    assert "Trainer(" not in Path(module.__file__).read_text(encoding="utf-8")


def test_reading_a_run_imports_no_job_and_no_training_loop():
    import subprocess
    import sys

    code = ("import sys, danlu.runs, danlu.runs.load, danlu.runs.adapter, danlu.runs.compressed; "
            "bad = [m for m in sys.modules if m.startswith(('danlu.jobs', 'danlu.training.trainer'))]; print(bad)")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout
    assert out.strip() == "[]"
