"""Reports, plots, run comparison and tracking, on tiny runs of synthetic reviews."""
import base64
import io
import json
import os
import pathlib
import re
import sys
import warnings

import numpy as np
import pytest
from conftest import make_reviews, tiny_config, write_csv
from PIL import Image

import danlu
from danlu import cli
from danlu.evaluate import fonts, plots
from danlu.evaluate.report import to_html, to_markdown
from danlu.registry import ConfigError

PLOTS = {"curves.png", "confusion_matrix.png", "per_class_f1.png", "text_lengths.png"}


def read(path):
    return pathlib.Path(path).read_text(encoding="utf-8")


def assert_real_png(path_or_bytes, min_size=(300, 150)):
    """A PNG of a sensible size that is not one flat colour."""
    data = path_or_bytes if isinstance(path_or_bytes, bytes) else pathlib.Path(path_or_bytes).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    image = Image.open(io.BytesIO(data)).convert("L")
    assert image.size[0] >= min_size[0] and image.size[1] >= min_size[1]
    pixels = np.asarray(image)
    assert pixels.std() > 5 and (pixels < 128).mean() > 0.005  # something dark is drawn: lines, text, cells


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny classification run (the report is written by train), and a held-out labelled file."""
    root = tmp_path_factory.mktemp("report")
    rows = make_reviews(300, seed=1)
    rows[0] = ("质量很好|物流\n很快", rows[0][1])  # a pipe and a newline must not break the markdown table
    train_csv = write_csv(root / "reviews.csv", rows)
    held_out = write_csv(root / "held_out.csv", make_reviews(60, seed=2))
    run = danlu.train(tiny_config(train_csv, root / "run", train={"epochs": 2}))
    return run, held_out, root


def test_train_writes_a_report_with_plots(trained):
    run, _, _ = trained
    assert PLOTS <= set(os.listdir(os.path.join(run.path, "plots")))
    for name in PLOTS:
        assert_real_png(os.path.join(run.path, "plots", name))
    md = read(os.path.join(run.path, "report.md"))
    for section in ("## Configuration", "## Data", "### Class balance", "## Training curves", "## Metrics",
                    "### Per class (test)", "### Confusion matrix (test)", "## Most confident mistakes (test)",
                    "## Timing and model size"):
        assert section in md
    metrics = run.metrics["test"]
    assert f"| accuracy | {run.metrics['val']['accuracy']:.4f} | {metrics['accuracy']:.4f} |" in md
    assert "| 正面 |" in md and "| 负面 |" in md
    assert f"| parameters | {sum(p.numel() for p in run.model.parameters()):,} |" in md
    for image in re.findall(r"!\[[^]]*\]\(([^)]+)\)", md):
        assert os.path.exists(os.path.join(run.path, image)), image
    assert "质量很好\\|物流 很快" in md or "质量很好" not in md  # escaped when it is among the mistakes


def test_html_report_is_self_contained(trained):
    run, _, _ = trained
    page = read(os.path.join(run.path, "report.html"))
    assert page.startswith("<!DOCTYPE html>") and "</html>" in page
    images = re.findall(r'<img src="([^"]+)"', page)
    assert len(images) == len(PLOTS)
    for src in images:
        assert src.startswith("data:image/png;base64,")
        assert_real_png(base64.b64decode(src.split(",", 1)[1]))
    assert "plots/" not in page  # no link to a file next to it


def test_most_confident_mistakes_come_from_the_test_split(trained):
    run, _, _ = trained
    md = read(os.path.join(run.path, "report.md"))
    section = md.split("## Most confident mistakes (test)")[1].split("## ")[0]
    rows = [line for line in section.splitlines() if re.match(r"\| \d+ \|", line)]
    cm = run.metrics["test"]["confusion_matrix"]
    errors = sum(map(sum, cm)) - sum(cm[i][i] for i in range(len(cm)))
    assert len(rows) == min(10, errors)
    probabilities = [float(r.rstrip(" |").rsplit("|", 1)[1]) for r in rows]
    assert probabilities == sorted(probabilities, reverse=True) and all(0.5 <= p <= 1 for p in probabilities)
    for row in rows:
        true, predicted = [c.strip() for c in row.split("|")[3:5]]
        assert true != predicted and {true, predicted} <= {"正面", "负面"}


def test_evaluate_command_writes_a_report_per_file(trained, capsys):
    run, held_out, _ = trained
    assert cli.main(["evaluate", run.path, "--data", held_out]) == 0
    out_dir = os.path.join(run.path, "eval", "held_out")
    assert {"metrics.json", "report.md", "report.html", "plots"} <= set(os.listdir(out_dir))
    for name in PLOTS:
        assert_real_png(os.path.join(out_dir, "plots", name))
    metrics = json.loads(read(os.path.join(out_dir, "metrics.json")))
    md = read(os.path.join(out_dir, "report.md"))
    assert "held_out.csv" in md and f"{metrics['accuracy']:.4f}" in md
    assert "| evaluated | 60 |" in md
    assert "written to" in capsys.readouterr().out


def test_compare_command_prints_a_table_and_writes_a_plot(trained, tmp_path, capsys):
    run, _, root = trained
    other = danlu.train(tiny_config(os.path.join(root, "reviews.csv"), tmp_path / "other",
                                    model={"kind": "mlp", "embed_dim": 16, "hidden_dim": 16}, train={"epochs": 3}))
    out = tmp_path / "cmp.png"
    assert cli.main(["compare", run.path, other.path, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    lines = printed.splitlines()
    assert lines[0].split()[:3] == ["run", "model", "params"]
    assert any(line.startswith("run ") and "lstm" in line for line in lines)
    assert any(line.startswith("other ") and "mlp" in line and f"{other.metrics['test']['accuracy']:.4f}" in line
               for line in lines)
    assert_real_png(str(out))
    assert cli.main(["compare", str(tmp_path / "missing")]) == 2


def test_plot_curves_without_validation_and_for_regression(tmp_path):
    rows = [{"epoch": e, "step": 10 * e, "train_loss": 1 / e, "val_loss": 1.2 / e, "val_r2": 1 - 1 / (e + 1)}
            for e in range(1, 4)]
    assert_real_png(plots.plot_curves(rows, tmp_path / "reg.png"))
    only_train = [{"epoch": 1, "step": 5, "train_loss": 0.7, "train_accuracy": 0.5}]
    assert_real_png(plots.plot_curves(only_train, tmp_path / "one.png"))
    assert plots.score_key(rows) == "r2" and plots.x_axis(rows) == ([1, 2, 3], "epoch")
    intervals = [{"epoch": 1, "step": 50}, {"epoch": 1, "step": 100}]
    assert plots.x_axis(intervals) == ([50, 100], "step")


def test_history_plot_draws_the_curves(tmp_path):
    from danlu.training.trainer import History

    history = History({"epoch": e, "step": e, "train_loss": 1 / e, "train_accuracy": 0.5 + e / 10,
                       "val_loss": 1.1 / e, "val_accuracy": 0.45 + e / 10} for e in range(1, 4))
    assert_real_png(history.plot(tmp_path / "curves.png"))


def test_plots_fall_back_without_a_cjk_font(tmp_path, monkeypatch):
    monkeypatch.setattr(fonts, "cjk_font", lambda: None)
    monkeypatch.setattr(fonts, "_warned", [])
    matrix, labels = [[5, 1], [2, 7]], ["正面", "负面"]
    with pytest.warns(UserWarning, match="apt-get install fonts-wqy-microhei") as caught:
        assert_real_png(plots.plot_confusion(matrix, labels, tmp_path / "cm.png"))
    messages = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    assert len(messages) == 1, messages  # ours, once: matplotlib's warning per missing glyph is silenced
    assert fonts.display_labels(labels) == ["class 0", "class 1"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second plot does not warn again
        per_class = {x: {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 3} for x in labels}
        assert_real_png(plots.plot_per_class(per_class, tmp_path / "f1.png"), min_size=(300, 80))
    assert fonts.display_labels(["pos", "neg"]) == ["pos", "neg"]


@pytest.mark.skipif(fonts.cjk_font() is None, reason="no CJK font installed (apt-get install fonts-wqy-microhei)")
def test_chinese_labels_render_with_the_cjk_font():
    assert fonts.can_render("负面 正面 很好")
    assert fonts.display_labels(["负面", "正面"]) == ["负面", "正面"]

    def pixels(text):
        with fonts.plot_style():
            fig = fonts.new_figure(1.5, 0.6)
            fig.text(0.05, 0.2, text, fontsize=20)
            fig.canvas.draw()
            return np.asarray(fig.canvas.buffer_rgba())

    # missing glyphs are all the same box: two different characters drawing differently means real glyphs
    assert not np.array_equal(pixels("正 ok"), pixels("负 ok"))
    assert (pixels("正") < 128).any()


def test_markdown_and_html_rendering_escape_cells(tmp_path):
    blocks = [("h1", "T"), ("table", ["a", "b"], [["x|y", "<b>&"]]), ("p", "see `config.yaml`")]
    md = to_markdown(blocks, str(tmp_path))
    assert "| x\\|y | <b>& |" in md
    page = to_html(blocks)
    assert "<td>&lt;b&gt;&amp;</td>" in page and "<code>config.yaml</code>" in page


def test_tensorboard_logger_writes_event_files(tmp_path, reviews_csv):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = danlu.train(tiny_config(reviews_csv, tmp_path / "tb", train={"epochs": 2, "log": ["tensorboard"]}))
    log_dir = os.path.join(run.path, "tensorboard")
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(log_dir))
    events = EventAccumulator(log_dir)
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"loss/train", "loss/val", "accuracy/train", "accuracy/val", "lr"} <= tags
    assert [e.step for e in events.Scalars("loss/train")] == [1, 2]
    history = [json.loads(line) for line in read(os.path.join(run.path, "history.jsonl")).splitlines()]
    assert [e.value for e in events.Scalars("accuracy/val")] == pytest.approx([r["val_accuracy"] for r in history])


def test_tensorboard_missing_is_a_clear_config_error(tmp_path, reviews_csv, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # import tensorboard now raises ImportError
    with pytest.raises(ConfigError, match="pip install tensorboard"):
        danlu.train(tiny_config(reviews_csv, tmp_path / "no_tb", train={"epochs": 1, "log": ["tensorboard"]}))
