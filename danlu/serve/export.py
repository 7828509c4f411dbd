"""Export a run to ONNX, checked against PyTorch in onnxruntime; OnnxModel runs the result alone.

    danlu export runs/seed_lstm --format onnx --out exported/seed_lstm

The exported folder is usable without danlu's model code: model.onnx, tokenizer.json (Hugging Face
`tokenizers`), labels.json, config.yaml (and chat_template.jinja for chat models), and export.json
saying what the graph takes and returns, how it compared with PyTorch and how fast it ran.

Graphs (inputs are int64, right-padded with the tokenizer's [PAD] id):

    classifier      input_ids (B, T), attention_mask (B, T) 1 = real  ->  logits (B, C)
    language model  input_ids (B, T)                                  ->  logits (B, T, vocab)   (no KV cache)
    seq2seq         encoder.onnx and decoder.onnx, one KV-cached step (danlu.serve.seq2seq_export)

The graph is captured with torch.export (the exporter behind `torch.onnx.export(dynamo=True)`).
A model whose forward branches on the data (`if attention_mask.all(): fast path`) is captured with
`draft_export` on a padded example, which records the general branch; an LSTM, whose packed
sequences do not export, is rewritten as plain LSTM calls that read each row's state at its last
real token (and run the backward direction on each row reversed within its length). When the
sequence axis cannot stay dynamic (stacked or bidirectional LSTMs) the graph takes a fixed length,
recorded in export.json, and OnnxModel pads to it. Whatever the route, the parity check on several
batch shapes decides whether the export is right.

>>> report = export("runs/seed_lstm", out="exported/seed_lstm")          # doctest: +SKIP
>>> OnnxModel("exported/seed_lstm").predict(["质量很好"])[0]["label"]     # doctest: +SKIP
"""
from __future__ import annotations

import json
import os
import shutil
import time

import numpy as np
import torch
from torch import nn

from danlu.registry import ConfigError
from danlu.serve.onnx_runtime import (
    TOLERANCE,
    convert,
    finish_report,
    latency_lines,
    median_ms_alternating,
    ort_session,
)

FORMATS = ("onnx", "gguf")
COPIED = ("tokenizer.json", "labels.json", "config.yaml", "chat_template.jinja")


def export(run, format="onnx", out=None, **options) -> dict:
    """Export a run (a directory or a loaded Run) in `format`; returns the report written to export.json."""
    if format not in FORMATS:
        raise ConfigError(f"export --format: unknown value {format!r}; expected one of: {', '.join(FORMATS)}")
    if format == "gguf":  # llama.cpp's format, for GPT language models (danlu.serve.gguf_export)
        from danlu.serve.gguf_export import export_gguf

        options.pop("opset", None)
        return export_gguf(run, out, **options)
    if options.pop("dtype", "f32") != "f32":
        raise ConfigError("export --dtype: a GGUF option (--format gguf); an ONNX graph keeps the run's fp32 weights")
    return export_onnx(run, out, **options)


def export_onnx(run, out=None, opset=18, check=True, batch_sizes=(1, 16), repeats=20, threads=1) -> dict:
    """Export to ONNX; with `check`, parity against PyTorch and latency of both, each with `threads` CPU threads
    (the same number for both: figures measured on more threads than the cores left free are noise)."""
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ConfigError(f"export --threads: expected a whole number of at least 1, got {threads!r}")
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401  (the torch.onnx exporter needs it)
    except ImportError as e:
        raise ConfigError(f"danlu export needs the export extra: pip install 'danlu[export]' ({e.name} is missing)") from None
    if not hasattr(run, "model"):
        from danlu.runs import load_run

        run = load_run(run)
    if hasattr(run, "preprocess"):  # an image run: the graph takes pixels (danlu.serve.image_export)
        from danlu.serve.image_export import export_image_onnx

        return export_image_onnx(run, out, opset, check, batch_sizes, repeats)
    if run.cfg.task == "seq2seq":  # encoder.onnx and a KV-cached decoder step (danlu.serve.seq2seq_export)
        from danlu.serve.seq2seq_export import export_seq2seq_onnx

        return export_seq2seq_onnx(run, out, opset, check, repeats, threads)
    out = os.fspath(out or os.path.join(run.path, "export", "onnx"))
    os.makedirs(out, exist_ok=True)
    model = run.model.eval().to("cpu")
    language_model = run.cfg.task == "causal_lm"
    pad_id = run.tokenizer.pad_id
    max_length = run.tokenizer.max_length or 128
    if language_model:
        graph, names, outputs = _LanguageModelGraph(model), ["input_ids"], ["logits"]
    elif isinstance(getattr(model, "lstm", None), nn.LSTM):
        graph, names, outputs = _LSTMGraph(model), ["input_ids", "attention_mask"], ["logits"]
    else:
        graph, names, outputs = _ClassifierGraph(model), ["input_ids", "attention_mask"], ["logits"]
    graph.eval()
    path = os.path.join(out, "model.onnx")
    started = time.perf_counter()
    fixed_length, min_length = _export_graph(graph, names, outputs, path, opset, pad_id, max_length, language_model)
    seconds = time.perf_counter() - started
    for name in COPIED:
        src = os.path.join(run.path, name)
        if os.path.exists(src):
            shutil.copyfile(src, os.path.join(out, name))
    report = {
        "format": "onnx",
        "opset": opset,
        "run": os.path.abspath(run.path),
        "task": run.cfg.task,
        "kind": "language_model" if language_model else "classifier",
        "model": run.cfg.model.kind,
        "inputs": names,
        "outputs": outputs,
        "padding": "right",
        "pad_id": pad_id,
        "fixed_length": fixed_length,
        "min_length": min_length,
        "max_length": max_length,
        "export_seconds": round(seconds, 2),
        "torch_version": torch.__version__,
    }
    if check:
        reference = _LanguageModelGraph(model) if language_model else _ClassifierGraph(model)
        report["parity"] = check_parity(reference, path, names, pad_id, run.tokenizer.vocab_size_, min_length,
                                        max_length, language_model)
        report["threads"] = threads
        report["latency"] = compare_latency(reference, path, names, pad_id, run.tokenizer.vocab_size_, fixed_length,
                                            batch_sizes=batch_sizes, repeats=repeats, threads=threads)
    return finish_report(report, out, path, check)


# ------------------------------------------------------------------------------------------------
# graphs: thin modules around the run's model with export-friendly signatures


class _ClassifierGraph(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids, attention_mask.bool())  # (B, C)


class _LanguageModelGraph(nn.Module):
    """No mask: with right padding (or none) a causal model's real tokens never see the padding."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        return self.model(input_ids)  # (B, T, vocab)


class _LSTMGraph(nn.Module):
    """LSTMClassifier without packed sequences, same numbers: each direction of each layer is one plain
    LSTM call; the forward state is read at each row's last real token, and the backward direction runs
    on each row reversed within its length, so that it starts at the last real token as packing does."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        lstm = model.lstm
        self.directions = 2 if lstm.bidirectional else 1
        self.num_layers = lstm.num_layers
        self.single = self.directions == 1 and self.num_layers == 1
        self.cells = nn.ModuleList()
        if not self.single:
            for layer in range(lstm.num_layers):
                for suffix in ("", "_reverse")[: self.directions]:
                    size = lstm.input_size if layer == 0 else lstm.hidden_size * self.directions
                    cell = nn.LSTM(size, lstm.hidden_size, batch_first=True, bias=lstm.bias)
                    for name in ("weight_ih", "weight_hh") + (("bias_ih", "bias_hh") if lstm.bias else ()):
                        setattr(cell, f"{name}_l0", getattr(lstm, f"{name}_l{layer}{suffix}"))
                    self.cells.append(cell)

    def forward(self, input_ids, attention_mask):
        lengths = attention_mask.sum(1).clamp(min=1)  # (B,)
        steps = torch.ones_like(input_ids).cumsum(1) - 1  # (B, T) 0..T-1
        last = (lengths - 1)[:, None, None]  # (B, 1, 1)
        x = self.model.embed(input_ids)  # (B, T, E)
        if self.single:
            out, _ = self.model.lstm(x)  # (B, T, H)
            h = out.gather(1, last.expand(-1, 1, out.shape[2]))[:, 0]  # (B, H)
            return self.model.head(h)
        finals = []
        for layer in range(self.num_layers):
            outs, finals = [], []
            for d in range(self.directions):
                cell = self.cells[layer * self.directions + d]
                inp = x if d == 0 else _reverse_within(x, lengths, steps)
                out, _ = cell(inp)  # (B, T, H)
                finals.append(out.gather(1, last.expand(-1, 1, out.shape[2]))[:, 0])  # (B, H)
                outs.append(out if d == 0 else _reverse_within(out, lengths, steps))
            x = torch.cat(outs, -1)  # (B, T, directions * H)
        return self.model.head(torch.cat(finals, -1))  # (B, C)


def _reverse_within(x, lengths, steps):
    """Reverse each row's first lengths[b] steps of x (B, T, E); padding stays where it is."""
    index = torch.where(steps < lengths[:, None], lengths[:, None] - 1 - steps, steps)  # (B, T)
    return x.gather(1, index[:, :, None].expand(-1, -1, x.shape[2]))


# ------------------------------------------------------------------------------------------------
# capture and convert


def _example(batch, length, pad_id, vocab_size, language_model, seed=0, lengths=None):
    """Random right-padded int64 inputs (real ids avoid the special tokens 0..6)."""
    g = torch.Generator().manual_seed(seed)
    low = min(7, vocab_size - 1)
    ids = torch.randint(low, vocab_size, (batch, length), generator=g)
    if language_model:
        return (ids,)
    if lengths is None:
        lengths = torch.randint(1, length + 1, (batch,), generator=g)
        lengths[0] = length  # one full row, one short row: the general (padded) branch is traced
        if batch > 1:
            lengths[1] = max(1, length // 3)
    mask = (torch.arange(length)[None, :] < torch.as_tensor(lengths)[:, None]).long()  # (B, T)
    return ids.masked_fill(mask == 0, pad_id), mask


def _export_graph(graph, names, outputs, path, opset, pad_id, max_length, language_model):
    """Write the ONNX file; returns None (dynamic length) or the fixed sequence length."""
    vocab = graph.model.embed.num_embeddings
    example = _example(3, min(8, max_length), pad_id, vocab, language_model)
    program = convert(graph, example, names, outputs, opset)
    fixed = None
    if _static_length(program) is not None:  # the length specialized: fix it at the tokenizer's max_length
        example = _example(3, max_length, pad_id, vocab, language_model)
        program = convert(graph, example, names, outputs, opset)
        fixed = max_length
    program.save(path)
    return fixed, fixed or _min_length(program)


def _min_length(program):
    """The shortest sequence the graph accepts: torch.export records a lower bound when the code branches on
    the length (TextCNN pads inputs shorter than its widest kernel; the graph keeps the other branch)."""
    try:
        program_ = program.exported_program
        for node in program_.graph.nodes:
            if node.op == "placeholder" and node.name in program_.graph_signature.user_inputs:
                bound = program_.range_constraints.get(node.meta["val"].shape[1].node.expr)
                return max(1, int(bound.lower)) if bound is not None else 1
    except (AttributeError, TypeError, ValueError):
        pass
    return 1


def _static_length(program):
    """The sequence length the graph's first input was fixed to, or None when it stayed dynamic."""
    dims = program.model_proto.graph.input[0].type.tensor_type.shape.dim
    return dims[1].dim_value if len(dims) > 1 and not dims[1].dim_param else None


# ------------------------------------------------------------------------------------------------
# checks


def check_parity(reference, path, names, pad_id, vocab_size, min_length, max_length, language_model):
    """Largest |onnxruntime - PyTorch| over batches of several shapes, with and without padding.
    `reference` is the run's own model (e.g. the packed LSTM, not its export rewrite), fed the unpadded
    batch; onnxruntime gets it right-padded to the graph's shortest (or fixed) length where it needs one."""
    session = ort_session(path)
    shapes = [(1, 1), (2, 5), (4, min(17, max_length)), (8, min(32, max_length))]
    worst, cases = 0.0, []
    for i, (batch, length) in enumerate(shapes):
        inputs = _example(batch, length, pad_id, vocab_size, language_model, seed=i + 1)
        padded = _pad_to(inputs, max(length, min_length), pad_id)
        with torch.inference_mode():
            expected = reference(*inputs).float().numpy()
        got = session.run(None, {n: t.numpy() for n, t in zip(names, padded)})[0]
        if language_model:  # logits of the real positions; right padding cannot change them in a causal model
            got = got[:, :length]
        diff = float(np.abs(got - expected).max()) if got.shape == expected.shape else float("inf")
        worst = max(worst, diff)
        cases.append({"batch": batch, "length": length, "fed_length": int(padded[0].shape[1]), "max_abs_diff": diff})
    return {"max_abs_diff": worst, "tolerance": TOLERANCE, "passed": worst <= TOLERANCE, "cases": cases}


def _pad_to(inputs, length, pad_id):
    ids = inputs[0]
    extra = length - ids.shape[1]
    padded = [torch.nn.functional.pad(ids, (0, extra), value=pad_id)]
    if len(inputs) > 1:
        padded.append(torch.nn.functional.pad(inputs[1], (0, extra), value=0))
    return tuple(padded)


def compare_latency(reference, path, names, pad_id, vocab_size, fixed_length, batch_sizes=(1, 16), length=32, repeats=20,
                    threads=1):
    """Median milliseconds per call, PyTorch (eager, inference mode) vs onnxruntime, both with `threads` CPU
    threads, same inputs, the two alternating call by call (load from elsewhere falls on both)."""
    session = ort_session(path, threads=threads)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _latency_rows(reference, session, names, pad_id, vocab_size, fixed_length, batch_sizes, length, repeats)
    finally:
        torch.set_num_threads(previous)


def _latency_rows(reference, session, names, pad_id, vocab_size, fixed_length, batch_sizes, length, repeats):
    rows = []
    length = fixed_length or length
    for batch in batch_sizes:
        inputs = _example(batch, length, pad_id, vocab_size, len(names) == 1, seed=99,
                          lengths=[length] * batch)
        feed = {n: t.numpy() for n, t in zip(names, inputs)}

        def run_torch(inputs=inputs):
            with torch.inference_mode():
                reference(*inputs)

        torch_ms, ort_ms = median_ms_alternating(run_torch, lambda feed=feed: session.run(None, feed), repeats)
        rows.append({"batch": batch, "length": length, "torch_ms": round(torch_ms, 3), "onnxruntime_ms": round(ort_ms, 3),
                     "speedup": round(torch_ms / ort_ms, 2) if ort_ms else None})
    return rows


def format_report(report) -> str:
    if report.get("kind") == "seq2seq":
        from danlu.serve.seq2seq_export import format_seq2seq_report

        return format_seq2seq_report(report)
    lines = [f"exported {report['model']} ({report['kind']}) to {report.get('out', '')}/model.onnx "
             f"in {report['export_seconds']:.1f} s"
             + (f"; fixed length {report['fixed_length']}" if report.get("fixed_length") else "")]
    if "parity" in report:
        p = report["parity"]
        lines.append(f"parity: max |onnxruntime - pytorch| = {p['max_abs_diff']:.2e} "
                     f"({'passed' if p['passed'] else 'FAILED'}, tolerance {p['tolerance']:g})")
        lines += latency_lines(report)
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# using an exported folder without danlu's models


class OnnxModel:
    """An exported folder, run with onnxruntime + tokenizers + numpy only.

    >>> m = OnnxModel("exported/seed_lstm")               # doctest: +SKIP
    >>> m.predict(["质量很好"])[0]["label"]                 # doctest: +SKIP
    """

    def __init__(self, path):
        from tokenizers import Tokenizer

        self.path = os.fspath(path)
        with open(os.path.join(self.path, "export.json"), encoding="utf-8") as f:
            self.meta = json.load(f)
        labels = os.path.join(self.path, "labels.json")
        self.labels = ()
        if os.path.exists(labels):
            with open(labels, encoding="utf-8") as f:
                self.labels = tuple(json.load(f))
        self.tokenizer = Tokenizer.from_file(os.path.join(self.path, "tokenizer.json"))
        self.session = ort_session(os.path.join(self.path, "model.onnx"))
        self.pad_id = self.meta["pad_id"]

    def encode(self, texts):
        """Right-padded int64 ids and mask (B, T), as danlu's TextTokenizer encodes them."""
        unk = self.tokenizer.token_to_id("[UNK]")
        rows = [enc.ids or [unk] for enc in self.tokenizer.encode_batch(list(texts))]
        width = self.meta.get("fixed_length") or max(self.meta.get("min_length", 1), max(len(r) for r in rows))
        ids = np.full((len(rows), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        for i, r in enumerate(rows):
            r = r[:width]
            ids[i, : len(r)] = r
            mask[i, : len(r)] = 1
        return ids, mask

    def predict_proba(self, texts):
        ids, mask = self.encode(texts)
        logits = self.session.run(None, {"input_ids": ids, "attention_mask": mask})[0]  # (B, C)
        if self.meta["task"] == "regression":
            return logits[:, 0]
        z = np.exp(logits - logits.max(-1, keepdims=True))
        return z / z.sum(-1, keepdims=True)

    def predict(self, texts):
        """[{label, score, probabilities}] per text, as Run.predict returns them."""
        probs = self.predict_proba(texts)
        if self.meta["task"] == "regression":
            return [{"value": float(v)} for v in probs]
        out = []
        for row in probs.tolist():
            best = int(np.argmax(row))
            pairs = sorted(zip(self.labels, row), key=lambda p: -p[1])
            out.append({"label": self.labels[best], "score": row[best], "probabilities": dict(pairs)})
        return out

    def logits(self, input_ids):
        """Language models: next-token logits (B, T, vocab) for int64 ids (B, T)."""
        ids = np.asarray(input_ids, dtype=np.int64)
        length = ids.shape[1]
        shortest = self.meta.get("min_length", 1)
        if length < shortest:  # right padding: a causal model's logits at the real positions do not change
            ids = np.pad(ids, ((0, 0), (0, shortest - length)), constant_values=self.pad_id)
        return self.session.run(None, {"input_ids": ids})[0][:, :length]

    def generate(self, prompt, max_new_tokens=32):
        """Greedy continuation of one prompt (no KV cache: each step re-reads the whole sequence)."""
        eos = self.tokenizer.token_to_id("</s>")
        ids = self.tokenizer.encode(prompt, add_special_tokens=False).ids or [eos]
        new = []
        for _ in range(max_new_tokens):
            token = int(self.logits(np.asarray([ids + new]))[0, -1].argmax())
            if token == eos:
                break
            new.append(token)
        return self.tokenizer.decode(new)
