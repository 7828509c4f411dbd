"""The training loop's events, loop state and policies (danlu.training.callbacks, danlu.training.trainer)."""
import json
import re

import pytest
import torch

from danlu.config import DataConfig, EarlyStopping, TokenizerConfig, TrainConfig
from danlu.registry import ConfigError
from danlu.training import allocator
from danlu.training.callbacks import Callback
from danlu.training.tasks import TASKS, CausalLMTask, ClassificationTask, RegressionTask
from danlu.training.trainer import LoopState, Trainer

from test_flops import Windows, tiny_gpt


@pytest.fixture
def data(reviews_csv):
    from danlu.data import build_data

    return build_data(DataConfig(train=reviews_csv, tokenizer=TokenizerConfig(vocab_size=200, max_length=32)))


def lstm(data):
    from danlu.models.lstm import LSTMClassifier, LSTMConfig

    torch.manual_seed(0)
    return LSTMClassifier(LSTMConfig(embed_dim=16, hidden_dim=16), data.spec)


class Events(Callback):
    """Records the events it sees, and the allocator setting in force during training."""

    def __init__(self):
        self.seen, self.allocator = [], None

    def on_train_begin(self, trainer):
        self.seen.append("train_begin")
        self.allocator = allocator._current

    def on_epoch_begin(self, trainer):
        self.seen.append("epoch_begin")

    def on_batch_end(self, trainer, state):
        self.seen.append("batch")

    def on_step_end(self, trainer, state):
        self.seen.append("step")

    def on_epoch_end(self, trainer, row):
        self.seen.append(f"row {row['epoch']}")

    def on_train_end(self, trainer):
        self.seen.append("train_end")


def test_events_come_in_order(data):
    events = Events()
    cfg = TrainConfig(epochs=2, batch_size=64, grad_accum=2, device="cpu")
    Trainer(lstm(data), ClassificationTask(data.labels), cfg, callbacks=[events]).fit(data.train, data.val)
    batches = -(-len(data.train) // 64)  # 5: steps after batches 2, 4 and 5 (the epoch's end)
    epoch = ["epoch_begin"] + ["batch", "batch", "step"] * (batches // 2) + ["batch", "step"] * (batches % 2)
    assert events.seen == ["train_begin"] + epoch + ["row 1"] + epoch + ["row 2", "train_end"]


def test_an_unknown_early_stopping_metric_fails_before_training(data):
    events = Events()
    cfg = TrainConfig(epochs=2, early_stopping=EarlyStopping(patience=1, metric="val_acuracy"))
    trainer = Trainer(lstm(data), ClassificationTask(data.labels), cfg, callbacks=[events])
    with pytest.raises(ConfigError, match=r"train.early_stopping.metric: unknown metric 'val_acuracy'.*"
                                          r"val_loss, val_accuracy, train_loss, train_accuracy"):
        trainer.fit(data.train, data.val)
    assert events.seen == [] and trainer.optimizer is None


def test_a_config_with_an_unknown_metric_fails_at_load():
    from danlu.config import load

    with pytest.raises(ConfigError, match=r"train.early_stopping.metric: unknown metric 'val_perplexity' for task "
                                          r"classification; expected one of: val_loss, val_accuracy"):
        load({"train": {"early_stopping": {"metric": "val_perplexity"}}}, fresh_dir=False)
    cfg = load({"task": "causal_lm", "model": {"kind": "gpt"}}, ["train.early_stopping.metric=val_perplexity"],
               fresh_dir=False)
    assert cfg.train.early_stopping.metric == "val_perplexity"


def test_each_task_declares_which_way_its_metrics_are_better():
    assert RegressionTask().monitors() == {"val_loss": False, "val_r2": True, "val_mae": False, "train_loss": False}
    assert CausalLMTask().monitors() == {"val_loss": False, "val_perplexity": False, "val_accuracy": True,
                                         "train_loss": False, "train_perplexity": False, "train_accuracy": True}
    for name, task in TASKS.items():  # every train_ column the loop writes has a declared direction
        assert set(task(("a", "b")).train_metrics(1.0, 2, 1)) <= set(task(("a", "b")).monitors()), name


def test_early_stopping_on_perplexity_keeps_the_lowest(tmp_path):
    """Perplexity ends in neither 'loss' nor 'accuracy': its direction comes from the task (lower is better)."""
    cfg = TrainConfig(epochs=6, batch_size=8, lr=3e-3, device="cpu", restore_best=True, peak_flops=1e11,
                      early_stopping=EarlyStopping(patience=2, metric="val_perplexity"))
    trainer = Trainer(tiny_gpt(), CausalLMTask(), cfg)
    history = trainer.fit(Windows(), Windows(16))
    values = history.series("val_perplexity")
    assert len(set(values)) > 1 and "val_accuracy" in history[-1]
    assert trainer.best_epoch == values.index(min(values)) + 1 != values.index(max(values)) + 1
    assert trainer.evaluate(Windows(16))["perplexity"] == pytest.approx(min(values), rel=1e-5)


def test_evaluate_takes_every_batch_unless_told(data):
    trainer = Trainer(lstm(data), ClassificationTask(data.labels), TrainConfig(batch_size=8, eval_batches=2))
    assert trainer.evaluate(data.val)["count"] == len(data.val)  # train.eval_batches is the loop's, not evaluate's
    assert trainer.evaluate(data.val, batch_size=8, max_batches=2)["count"] == 16
    assert trainer.evaluate(data.val, batch_size=8, max_batches=0)["count"] == 0


def test_the_loop_validates_on_eval_batches(data):
    counts = []
    cfg = TrainConfig(epochs=1, batch_size=8, eval_batches=2)
    trainer = Trainer(lstm(data), ClassificationTask(data.labels), cfg)
    trainer.evaluate = lambda dataset, **options: counts.append(options) or {"loss": 1.0, "accuracy": 0.5}
    trainer.fit(data.train, data.val)
    assert counts == [{"max_batches": 2}]


def test_the_constructor_only_stores(data, monkeypatch):
    """Under torchrun the process group is joined by fit, not by building a Trainer."""
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    trainer = Trainer(lstm(data), ClassificationTask(data.labels), TrainConfig(device="cpu"))
    assert not torch.distributed.is_initialized() and trainer.distributed == "none" and trainer.optimizer is None


def test_fit_adds_no_attributes_and_puts_the_allocator_back(data):
    events, setting = Events(), allocator._current  # None (glibc's own), unless the process set it for good
    trainer = Trainer(lstm(data), ClassificationTask(data.labels), TrainConfig(epochs=1, device="cpu"), callbacks=[events])
    before = set(vars(trainer))
    trainer.fit(data.train, data.val)
    assert set(vars(trainer)) == before
    if allocator._libc() is not None:  # glibc: kept during fit, the setting of before after it
        assert events.allocator == allocator.KEEP and allocator._current == setting
    off = Events()
    Trainer(lstm(data), ClassificationTask(data.labels), TrainConfig(epochs=1, device="cpu", keep_freed_memory=False),
            callbacks=[off]).fit(data.train)
    assert off.allocator == setting


def test_a_progress_line_with_the_time_left_when_stderr_is_not_a_terminal(data, capsys):
    cfg = TrainConfig(epochs=2, batch_size=8, device="cpu")
    trainer = Trainer(lstm(data), ClassificationTask(data.labels), cfg)
    trainer.fit(data.train, data.val)
    lines = capsys.readouterr().err.splitlines()
    batches = trainer.epoch_batches
    assert batches == 40  # 320 examples
    progress = [line for line in lines if re.match(r"epoch \d/2  batch \d+/40  loss \d\.\d{4}  [\d.]+ batches/s  "
                                                   r"ETA \d+m\d\ds$", line)]
    assert len(progress) == 20, lines  # every tenth of each epoch (a 30 s interval would add more)
    assert progress[0].startswith("epoch 1/2  batch 4/40")
    assert [line.split()[0:2] for line in lines if "train_loss" in line] == [["epoch", "1"], ["epoch", "2"]]


def test_the_loop_state_goes_through_json_unchanged():
    state = LoopState(epoch=2, batch=7, step=31, best=0.1 + 0.2, best_epoch=2, bad_epochs=1, sums=[1 / 3, 5, 4],
                      history=[{"epoch": 1, "val_loss": 2 / 3}, {"epoch": 2, "val_loss": 0.1 + 0.2}])
    again = LoopState.from_json(json.loads(json.dumps(state.to_json())))
    assert again.to_json() == state.to_json() and set(state.to_json()) == set(LoopState.SAVED)
    assert not {"units", "started", "seq_len"} & set(state.to_json())


def test_resume_is_exact_when_the_flops_peak_is_measured(tmp_path):
    """The peak's random matrices are drawn before the RNG is seeded or restored, so that dropout after a
    resume draws what it would have drawn in an uninterrupted run."""
    def fit(run_dir, epochs, resume=False):
        cfg = TrainConfig(epochs=epochs, batch_size=8, lr=3e-3, device="cpu", precision="auto")
        trainer = Trainer(tiny_gpt(dropout=0.2), CausalLMTask(), cfg, run_dir=str(run_dir))
        trainer.fit(Windows(), resume=resume)
        return trainer.model.state_dict()

    fit(tmp_path / "resumed", 1)
    resumed, straight = fit(tmp_path / "resumed", 2, resume=True), fit(tmp_path / "straight", 2)
    assert all(torch.equal(resumed[k], straight[k]) for k in straight)
