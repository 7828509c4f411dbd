"""danlu 丹炉 — one toolkit for a model's whole life: data, model, (pre)training, fine-tuning,
compression, evaluation and deployment.

>>> import danlu
>>> run = danlu.train("configs/seed_lstm.yaml", train={"epochs": 3})    # doctest: +SKIP
>>> danlu.load(run.path).predict(["质量很好，物流也快"])                  # doctest: +SKIP
"""
__version__ = "0.1.0"


def train(config=None, *overrides, **kwargs):
    """Train, evaluate and save a run from a YAML config; see danlu.jobs.train.train."""
    from danlu.jobs.train import train as _train

    return _train(config, *overrides, **kwargs)


def load(path, device="cpu"):
    """Load a run directory, ready to `.predict(texts)`."""
    from danlu.runs import load_run

    return load_run(path, device)


def evaluate_run(run, data, **data_overrides):
    """Metrics of a run (a Run or its directory) on a labelled file, or a language model's on a corpus.
    (Not `danlu.evaluate`: that name is the sub-package of metrics and reports.)"""
    from danlu.jobs.evaluate import evaluate_run
    from danlu.runs import load_run

    return evaluate_run(run if hasattr(run, "model") else load_run(run), data, **data_overrides)


def __getattr__(name):  # lazy: `import danlu` stays cheap and free of side effects
    if name == "Trainer":
        from danlu.training.trainer import Trainer

        return Trainer
    raise AttributeError(f"module 'danlu' has no attribute {name!r}")
