import csv
import os

import pytest
import torch

from danlu.testing import reviews

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

POSITIVE = ["很好", "喜欢", "满意", "推荐", "不错", "快", "值得", "完美", "good", "great"]
NEGATIVE = ["很差", "失望", "退货", "垃圾", "慢", "糟糕", "后悔", "坏了", "bad", "awful"]
FILLER = ["质量", "物流", "价格", "包装", "客服", "这个", "东西", "酒店", "房间", "书"]


def make_reviews(n, seed=0):
    """Synthetic two-class reviews that a small model learns in a few epochs."""
    return reviews(n, seed, POSITIVE, NEGATIVE, FILLER, max_filler=6)


def write_csv(path, rows, header=("text", "label"), delimiter=","):
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f, delimiter=delimiter)
        w.writerow(header)
        w.writerows(rows)
    return str(path)


@pytest.fixture
def one_thread():
    """Tiny models on a shared machine: one thread avoids waiting on a descheduled second one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def reviews_csv(tmp_path):
    return write_csv(tmp_path / "reviews.csv", make_reviews(400))


def tiny_config(train_path, run_dir, **sections):
    cfg = {
        "run": {"dir": str(run_dir), "seed": 0},
        "data": {"train": str(train_path), "tokenizer": {"kind": "char", "vocab_size": 500, "max_length": 32}},
        "model": {"kind": "lstm", "embed_dim": 16, "hidden_dim": 16},
        "train": {"epochs": 2, "batch_size": 16, "lr": 0.01},
    }
    for name, values in sections.items():
        if isinstance(values, dict):
            cfg.setdefault(name, {}).update(values)
        else:
            cfg[name] = values
    return cfg
