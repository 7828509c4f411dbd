"""File names of a run directory, and making one without losing the run that was there.

    runs/<name>/
      config.yaml         the resolved config that produced the run
      tokenizer.json      the fitted (or imported) tokenizer
      preprocess.json     image runs, in its place: the fitted image preprocessing (danlu.runs.image)
      tokenizer_target.json  seq2seq runs with a tokenizer per side: the target's (danlu.runs.seq2seq)
      labels.json         class names, in class-id order ([] for language models and regression)
      model.safetensors   the weights (a plain or a compressed run)
      adapter.safetensors LoRA runs saved as an adapter: the weights on top of `finetune.base`
      compression.json    compressed runs: the steps a rebuild needs before the weights load
      chat_template.jinja chat runs: the prompt format
      metrics.json  history.jsonl  report.md  report.html  plots/  checkpoints/  eval/

Every kind of run is recognised from its files alone (`run_kind`), so reading one imports no job.
"""
from __future__ import annotations

import os
import shutil
import uuid

from danlu.registry import ConfigError

CONFIG = "config.yaml"
TOKENIZER = "tokenizer.json"
PREPROCESS = "preprocess.json"
TARGET_TOKENIZER = "tokenizer_target.json"
LABELS = "labels.json"
WEIGHTS = "model.safetensors"
ADAPTER = "adapter.safetensors"
COMPRESSION = "compression.json"
TEMPLATE = "chat_template.jinja"
METRICS = "metrics.json"
HISTORY = "history.jsonl"
REPORT = "report.md"
PLOTS = "plots"
CHECKPOINTS = "checkpoints"


def run_kind(path) -> str:
    """plain, adapter (a LoRA run stored as its adapter) or compressed."""
    path = os.fspath(path)
    if os.path.exists(os.path.join(path, ADAPTER)) and not os.path.exists(os.path.join(path, WEIGHTS)):
        return "adapter"
    if os.path.exists(os.path.join(path, COMPRESSION)):
        return "compressed"
    return "plain"


def weights_file(path) -> str:
    """The file that holds a run's own weights: model.safetensors, or adapter.safetensors for an adapter run."""
    return os.path.join(os.fspath(path), ADAPTER if run_kind(path) == "adapter" else WEIGHTS)


class RunDirectory:
    """A run directory about to be written. An existing run is never lost to a command that cannot start:

    - without `overwrite` or `resume`, an existing non-empty directory is refused;
    - with `overwrite`, the old run is moved aside (a hidden sibling) and only deleted by `started()`,
      once the new run's data has been read and its model built; a job that fails before that puts
      the old run back (`abandon()`), so a wrong `data.train` costs nothing;
    - a fresh directory that a job abandons is removed, so a corrected command is not blocked by it.

    >>> directory = RunDirectory("runs/mine", overwrite=True)   # doctest: +SKIP
    >>> ...  # read data, build the model: may fail, and the old runs/mine comes back
    >>> directory.started()                                     # the old run is gone from here on
    """

    def __init__(self, path, overwrite=False, resume=False):
        self.path = os.fspath(path)
        self.resumed = False
        self.aside = None
        if os.path.isdir(self.path) and os.listdir(self.path):
            if resume:
                self.resumed = True
            elif not overwrite:
                raise ConfigError(
                    f"{self.path}: the run directory already exists. Pass --overwrite to replace it, --resume to "
                    f"continue it, or choose another with run.dir=...")
            else:
                parent, name = os.path.split(os.path.abspath(self.path))
                self.aside = os.path.join(parent, f".{name}.replaced-{uuid.uuid4().hex[:8]}")
                os.replace(self.path, self.aside)
        elif os.path.exists(self.path) and not os.path.isdir(self.path):
            raise ConfigError(f"{self.path}: run.dir names a file, not a directory")
        os.makedirs(self.path, exist_ok=True)

    def started(self):
        """The new run can start: the run it replaces is deleted."""
        if self.aside is not None:
            shutil.rmtree(self.aside, ignore_errors=True)
            self.aside = None

    def abandon(self):
        """The job failed before it started: remove what it wrote, put back what it replaced."""
        if self.resumed:
            return
        shutil.rmtree(self.path, ignore_errors=True)
        if self.aside is not None:
            os.replace(self.aside, self.path)
            self.aside = None


def prepare_run_dir(path, overwrite=False, resume=False):
    """Create the run directory for work that starts at once; refuse to touch an existing one unless asked."""
    directory = RunDirectory(path, overwrite, resume)
    directory.started()
    return directory.path
