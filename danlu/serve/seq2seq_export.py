"""ONNX export of a seq2seq run: the encoder and one KV-cached decoder step, checked in onnxruntime.

    danlu export runs/translate_en_de --format onnx

Two graphs (int64 ids, sources right-padded with the source tokenizer's [PAD] id; L decoder layers, K
key/value heads of D dimensions):

    encoder.onnx  input_ids (B, S), attention_mask (B, S) 1 = real
                  ->  memory_kv (2L, B, K, S, D): each decoder layer's cross-attention keys, then values,
                      computed once per source
    decoder.onnx  input_ids (B, 1) the latest target token (BOS first), past (2L, P, B, K, D) the
                  self-attention keys and values of the P tokens before it (P = 0 at BOS), memory_kv,
                  attention_mask (B, S)
                  ->  logits (B, target vocab) of the next token, present (2L, P + 1, B, K, D)

so greedy decoding is: memory_kv = encoder(ids, mask); past = zeros (2L, 0, B, K, D); then
logits, past = decoder(next, past, memory_kv, mask) until EOS. The folder also holds tokenizer.json
(and tokenizer_target.json when the target side has its own), config.yaml and export.json; OnnxSeq2Seq
decodes with it using onnxruntime, tokenizers and numpy only.

The check compares logits (every step of random target prefixes, against the model's full forward) and
whole outputs: greedy decoding driven from onnxruntime must give danlu's greedy tokens on every source.

>>> report = export(load_run("runs/translate_en_de"))                                    # doctest: +SKIP
>>> OnnxSeq2Seq("runs/translate_en_de/export/onnx").translate(["In the beginning was the Word."])  # doctest: +SKIP
"""
from __future__ import annotations

import json
import os
import shutil
import time

import numpy as np
import torch
from torch import nn

COPIED = ("tokenizer.json", "tokenizer_target.json", "config.yaml")


class EncoderGraph(nn.Module):
    """Source ids and mask -> every decoder layer's memory keys and values, stacked (2L, B, K, S, D)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        from danlu.models.blocks import padding_mask

        memory = self.model.encode_with_key_mask(input_ids, padding_mask(attention_mask.bool()))  # (B, S, C)
        return torch.cat([torch.stack(layer.cross.memory_kv(memory)) for layer in self.model.decoder])  # (2L, B, K, S, D)


class DecoderStepGraph(nn.Module):
    """One decoding step on the model's own cache: the past slots grow by one position, which this step fills."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, past, memory_kv, attention_mask):
        from danlu.models.blocks import padding_mask
        from danlu.models.seq2seq import Seq2SeqCache

        slots = torch.cat([past, past.new_zeros(past.shape[0], 1, *past.shape[2:])], dim=1)  # (2L, P+1, B, K, D)
        pairs = [(memory_kv[2 * i], memory_kv[2 * i + 1]) for i in range(len(self.model.decoder))]
        cache = Seq2SeqCache(slots, pairs, padding_mask(attention_mask.bool()), length=past.shape[1])
        logits = self.model.decode(input_ids, cache=cache)  # (B, 1, V)
        return logits[:, -1], cache.slots  # (B, V), (2L, P+1, B, K, D)


def export_seq2seq_onnx(run, out=None, opset=18, check=True, repeats=20, threads=1) -> dict:
    """Write encoder.onnx and decoder.onnx for a seq2seq run; with `check`, parity and greedy-decoding latency
    against PyTorch (both on `threads` CPU threads)."""
    from danlu.serve.onnx_runtime import convert, finish_report, quiet

    out = os.fspath(out or os.path.join(run.path, "export", "onnx"))
    os.makedirs(out, exist_ok=True)
    model = run.model.eval().to("cpu")
    c, layers = model.config, len(model.decoder)
    pad_id, target = run.tokenizer.pad_id, run.target
    positions = int(model.position_table.shape[0])  # sources and targets are at most this long
    batch = torch.export.Dim("batch")
    source, past = torch.export.Dim("source", max=positions), torch.export.Dim("past", max=positions - 1)
    ids, mask = _sources(3, 8, pad_id, run.tokenizer.vocab_size_, seed=0)
    started = time.perf_counter()
    encoder = convert(EncoderGraph(model).eval(), (ids, mask), ["input_ids", "attention_mask"], ["memory_kv"], opset,
                       dynamic={"input_ids": {0: batch, 1: source}, "attention_mask": {0: batch, 1: source}})
    encoder.save(os.path.join(out, "encoder.onnx"))
    with torch.inference_mode():
        memory_kv = EncoderGraph(model)(ids, mask)  # (2L, B, K, S, D)
    example = (torch.full((3, 1), target.token_id("<s>")), torch.zeros(2 * layers, 2, 3, c.kv_heads, c.head_dim),
               memory_kv, mask)
    decoder = convert(DecoderStepGraph(model).eval(), example, ["input_ids", "past", "memory_kv", "attention_mask"],
                       ["logits", "present"], opset,
                       dynamic={"input_ids": {0: batch}, "past": {1: past, 2: batch}, "memory_kv": {1: batch, 3: source},
                                "attention_mask": {0: batch, 1: source}})
    decoder.save(os.path.join(out, "decoder.onnx"))
    seconds = time.perf_counter() - started
    for name in COPIED:
        if os.path.exists(os.path.join(run.path, name)):
            shutil.copyfile(os.path.join(run.path, name), os.path.join(out, name))
    report = {"format": "onnx", "opset": opset, "run": os.path.abspath(run.path), "task": run.cfg.task,
              "kind": "seq2seq", "model": run.cfg.model.kind, "graphs": ["encoder.onnx", "decoder.onnx"],
              "encoder": {"inputs": ["input_ids", "attention_mask"], "outputs": ["memory_kv"]},
              "decoder": {"inputs": ["input_ids", "past", "memory_kv", "attention_mask"], "outputs": ["logits", "present"],
                          "kv_cache": True},
              "cache_shape": [2 * layers, "past", "batch", c.kv_heads, c.head_dim], "padding": "right",
              "pad_id": pad_id, "bos_id": target.token_id("<s>"), "eos_id": target.token_id("</s>"),
              "unk_id": run.tokenizer.token_id("[UNK]"), "max_new_tokens": run.cfg.seq2seq.max_new_tokens,
              "max_positions": positions,
              "target_tokenizer": "tokenizer_target.json" if run.target_tokenizer is not None else "tokenizer.json",
              "export_seconds": round(seconds, 2), "torch_version": torch.__version__}
    if check:
        with open(os.path.join(out, "export.json"), "w", encoding="utf-8") as f:  # OnnxSeq2Seq reads it; rewritten below
            json.dump(report, f)
        alone = OnnxSeq2Seq(out)
        with quiet():
            report["parity"] = check_seq2seq_parity(model, alone, run)
        report["threads"] = threads
        report["latency"] = compare_greedy_latency(model, out, run, repeats=repeats, threads=threads)
    return finish_report(report, out, os.path.join(out, "decoder.onnx"), check)


def _sources(batch, length, pad_id, vocab_size, seed, lengths=None):
    """Random right-padded source ids and mask (B, S) int64 (real ids avoid the special tokens 0..6); the first
    row is full and the second short, so that the padded branch is the one recorded."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(min(7, vocab_size - 1), vocab_size, (batch, length), generator=g)
    if lengths is None:
        lengths = torch.randint(1, length + 1, (batch,), generator=g)
        lengths[0] = length
        if batch > 1:
            lengths[1] = max(1, length // 3)
    mask = (torch.arange(length)[None, :] < torch.as_tensor(lengths)[:, None]).long()  # (B, S)
    return ids.masked_fill(mask == 0, pad_id), mask


def check_seq2seq_parity(model, alone, run):
    """Largest |onnxruntime - PyTorch| of the next-token logits at every step of random target prefixes (the
    model's full forward against the cached ONNX steps), and whether greedy decoding from onnxruntime gives
    danlu's greedy tokens on every source."""
    from danlu.decoding import decode_ids
    from danlu.serve.onnx_runtime import TOLERANCE

    vocab, target_vocab = run.tokenizer.vocab_size_, run.target.vocab_size_
    worst, cases = 0.0, []
    for i, (batch, length) in enumerate([(1, 1), (2, 5), (4, 17)]):
        ids, mask = _sources(batch, length, alone.pad_id, vocab, seed=i + 1)
        prefix = torch.randint(min(7, target_vocab - 1), target_vocab, (batch, 6), generator=torch.Generator().manual_seed(i))
        prefix[:, 0] = alone.bos_id
        with torch.inference_mode():
            expected = model(ids, mask.bool(), prefix).float().numpy()  # (B, T, V)
        got = np.stack(list(alone.step_logits(ids.numpy(), mask.numpy(), prefix.numpy())), axis=1)  # (B, T, V)
        diff = float(np.abs(got - expected).max()) if got.shape == expected.shape else float("inf")
        worst = max(worst, diff)
        cases.append({"batch": batch, "length": length, "steps": int(prefix.shape[1]), "max_abs_diff": diff})
    ids, mask = _sources(8, 12, alone.pad_id, vocab, seed=9)
    limit = min(32, alone.meta["max_new_tokens"])
    want = decode_ids(model, ids, mask.bool(), bos_id=alone.bos_id, eos_id=alone.eos_id, max_new_tokens=limit)
    got = alone.generate_ids(ids.numpy(), mask.numpy(), max_new_tokens=limit)
    same = sum(a == b for a, b in zip(got, want)) / len(want)
    return {"max_abs_diff": worst, "tolerance": TOLERANCE, "greedy_same_tokens": same,
            "greedy_sources": len(want), "greedy_max_new_tokens": limit,
            "passed": worst <= TOLERANCE and same == 1.0, "cases": cases}


def compare_greedy_latency(model, out, run, batch_sizes=(1, 16), length=24, repeats=20, threads=1):
    """Median milliseconds of greedy-decoding a batch of sources up to 32 new tokens: danlu's decode_ids
    (KV-cached, inference mode) against OnnxSeq2Seq, each on `threads` CPU threads, alternating call by call."""
    from danlu.decoding import decode_ids
    from danlu.serve.onnx_runtime import median_ms_alternating

    alone = OnnxSeq2Seq(out, threads=threads)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    rows = []
    try:
        for batch in batch_sizes:
            ids, mask = _sources(batch, length, alone.pad_id, run.tokenizer.vocab_size_, seed=99, lengths=[length] * batch)
            feed, real = (ids.numpy(), mask.numpy()), mask.bool()

            def run_torch(ids=ids, real=real):
                decode_ids(model, ids, real, bos_id=alone.bos_id, eos_id=alone.eos_id, max_new_tokens=32)

            torch_ms, ort_ms = median_ms_alternating(run_torch, lambda feed=feed: alone.generate_ids(*feed, 32), repeats)
            rows.append({"batch": batch, "length": length, "torch_ms": round(torch_ms, 3),
                         "onnxruntime_ms": round(ort_ms, 3), "speedup": round(torch_ms / ort_ms, 2) if ort_ms else None})
    finally:
        torch.set_num_threads(previous)
    return rows


def format_seq2seq_report(report) -> str:
    from danlu.serve.onnx_runtime import latency_lines

    lines = [(f"exported {report['model']} (seq2seq) to {report.get('out', '')}/encoder.onnx and decoder.onnx "
              f"(one KV-cached step) in {report['export_seconds']:.1f} s")]
    if "parity" in report:
        p = report["parity"]
        verdict = "passed" if p["passed"] else "FAILED"
        lines.append(f"parity: max |onnxruntime - pytorch| = {p['max_abs_diff']:.2e} over decoding steps; greedy tokens "
                     f"the same on {p['greedy_same_tokens']:.0%} of {p['greedy_sources']} sources "
                     f"({verdict}, tolerance {p['tolerance']:g})")
        lines += latency_lines(report, "greedy decoding latency (up to 32 new tokens)", "source length")
    return "\n".join(lines)


class OnnxSeq2Seq:
    """An exported seq2seq folder, decoded greedily with onnxruntime + tokenizers + numpy only.

    >>> m = OnnxSeq2Seq("exported/translate_en_de")                 # doctest: +SKIP
    >>> m.translate(["In the beginning was the Word."])              # doctest: +SKIP
    """

    def __init__(self, path, threads=0):
        from tokenizers import Tokenizer

        from danlu.serve.onnx_runtime import ort_session

        self.path = os.fspath(path)
        with open(os.path.join(self.path, "export.json"), encoding="utf-8") as f:
            self.meta = json.load(f)
        self.tokenizer = Tokenizer.from_file(os.path.join(self.path, "tokenizer.json"))
        self.target_tokenizer = Tokenizer.from_file(os.path.join(self.path, self.meta["target_tokenizer"]))
        self.encoder = ort_session(os.path.join(self.path, "encoder.onnx"), threads=threads)
        self.decoder = ort_session(os.path.join(self.path, "decoder.onnx"), threads=threads)
        self.pad_id, self.bos_id, self.eos_id = self.meta["pad_id"], self.meta["bos_id"], self.meta["eos_id"]

    def encode(self, texts):
        """Right-padded int64 source ids and mask (B, S), as danlu's decoding encodes sources (an empty one: [UNK])."""
        rows = [enc.ids or [self.meta["unk_id"]] for enc in self.tokenizer.encode_batch(list(texts))]
        ids = np.full((len(rows), max(len(r) for r in rows)), self.pad_id, dtype=np.int64)
        mask = np.zeros(ids.shape, dtype=np.int64)
        for i, r in enumerate(rows):
            ids[i, : len(r)], mask[i, : len(r)] = r, 1
        return ids, mask

    def _start(self, ids, mask):
        memory_kv = self.encoder.run(None, {"input_ids": ids, "attention_mask": mask})[0]  # (2L, B, K, S, D)
        L2, B, K, _, D = memory_kv.shape
        return memory_kv, np.zeros((L2, 0, B, K, D), dtype=memory_kv.dtype)  # no past yet

    def _step(self, tokens, past, memory_kv, mask):
        return self.decoder.run(None, {"input_ids": tokens[:, None].astype(np.int64), "past": past,
                                       "memory_kv": memory_kv, "attention_mask": mask})  # logits (B, V), present

    def step_logits(self, ids, mask, prefix):
        """Yield the next-token logits (B, V) after each position of target prefixes (B, T) (BOS first)."""
        memory_kv, past = self._start(ids, mask)
        for t in range(prefix.shape[1]):
            logits, past = self._step(prefix[:, t], past, memory_kv, mask)
            yield logits

    def generate_ids(self, ids, mask, max_new_tokens=None):
        """Greedy target ids of each source row (without BOS and EOS), as danlu.decoding's greedy decodes them."""
        limit = max_new_tokens or self.meta["max_new_tokens"]
        memory_kv, past = self._start(ids, mask)
        tokens = np.full(len(ids), self.bos_id, dtype=np.int64)
        done = np.zeros(len(ids), dtype=bool)
        out = []
        for _ in range(limit):
            logits, past = self._step(tokens, past, memory_kv, mask)
            tokens = np.where(done, self.eos_id, logits.argmax(-1))  # (B,)
            done |= tokens == self.eos_id
            out.append(tokens)
            if done.all():
                break
        rows = np.stack(out, axis=1).tolist() if out else [[] for _ in ids]
        return [row[: row.index(self.eos_id)] if self.eos_id in row else row for row in rows]

    def translate(self, texts, max_new_tokens=None):
        """Greedy target text of each source text."""
        ids, mask = self.encode(texts)
        return [self.target_tokenizer.decode(row) for row in self.generate_ids(ids, mask, max_new_tokens)]
