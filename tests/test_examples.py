"""The examples are programs users copy: run each one, on a tiny subset."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_seed_lstm_example(tmp_path):
    plot = tmp_path / "curves.png"
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "seed_lstm.py"), "--limit", "300", "--epochs", "2",
                           "--plot", str(plot)], capture_output=True, text=True, cwd=tmp_path, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "test loss" in proc.stdout and "test accuracy" in proc.stdout
    assert plot.exists() and plot.stat().st_size > 5000


def test_pretrain_gpt_example(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"第{i}天，我们在中国学习人民日报的文章。\n" for i in range(3000)), encoding="gb18030")
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "pretrain_gpt.py"), "--corpus", str(corpus),
                           "--steps", "6", "--dir", str(tmp_path / "run"), "--score", str(corpus)],
                          capture_output=True, text=True, cwd=tmp_path, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("validation perplexity") and lines[1].startswith("中国")
    assert "corpus.txt: perplexity" in proc.stdout and (tmp_path / "run" / "report.md").exists()
    assert "GB18030" in proc.stderr  # the GBK corpus was recognised, not read as garbled UTF-8
