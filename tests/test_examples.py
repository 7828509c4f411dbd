"""The examples are programs users copy: run each one, on a tiny subset."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_seed_lstm_example(tmp_path):
    plot = tmp_path / "curves.png"
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "seed_lstm.py"), "--limit", "300", "--epochs", "2",
                           "--plot", str(plot)], capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "test loss" in proc.stdout and "test accuracy" in proc.stdout
    assert plot.exists() and plot.stat().st_size > 5000
