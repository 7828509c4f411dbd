"""What every ONNX export shares: the parity tolerance and error, a quiet torch.onnx, capturing a graph,
onnxruntime sessions and side-by-side latency."""
from __future__ import annotations

import contextlib
import logging
import os
import statistics
import time
import warnings

from danlu.registry import ConfigError

TOLERANCE = 1e-4


class ExportError(ConfigError):
    """The export failed, or its outputs differ from PyTorch's beyond the tolerance."""


@contextlib.contextmanager
def quiet():
    """torch.export and torch.onnx talk a lot at WARNING level; a CLI user needs none of it."""
    loggers = [logging.getLogger(name) for name in ("torch", "torch.export", "torch.onnx", "torch.fx",
                                                     "torch._dynamo", "torch.fx.experimental.symbolic_shapes",
                                                     "torch.export._draft_export", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def ort_session(path, threads=0):
    """An onnxruntime CPU session, quiet, with `threads` intra-op threads (0: onnxruntime's choice)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def median_ms_alternating(a, b, repeats, warmup=3):
    """Median milliseconds of calling a() and b(), alternated call by call so that both see the same machine."""
    for _ in range(warmup):
        a(), b()
    times = ([], [])
    for _ in range(repeats):
        for fn, out in ((a, times[0]), (b, times[1])):
            started = time.perf_counter()
            fn()
            out.append((time.perf_counter() - started) * 1000)
    return statistics.median(times[0]), statistics.median(times[1])


def finish_report(report, out, path, check):
    """Write export.json (atomically) beside the graph; with `check`, an ExportError when the parity failed."""
    from danlu.files import atomic_write_json

    atomic_write_json(os.path.join(out, "export.json"), report)
    report["out"] = out
    if check and not report["parity"]["passed"]:
        raise ExportError(f"{out}: onnxruntime and PyTorch differ by {report['parity']['max_abs_diff']:.3g} "
                          f"(tolerance {TOLERANCE:g}); the graph is in {path} for inspection")
    return report


def convert(graph, example, names, outputs, opset, dynamic=None):
    """An ONNXProgram with dynamic batch and sequence axes where torch.export keeps them (or the axes of
    `dynamic`, {input name: {axis: Dim}}): torch.onnx's own capture first; a forward that branches on the
    data then goes to draft_export, which records the branch the padded example takes."""
    import torch

    if dynamic is None:
        batch, length = torch.export.Dim("batch"), torch.export.Dim("sequence")
        dynamic = {name: {0: batch, 1: length} for name in names}
    options = {"input_names": names, "output_names": outputs, "opset_version": opset, "dynamo": True,
               "verbose": False, "optimize": True}
    with quiet(), _concrete_is_causal():
        try:
            return torch.onnx.export(graph, example, dynamic_shapes=dynamic, **options)
        except Exception:  # noqa: BLE001  data-dependent branches: record the branch the padded example takes
            try:
                program = torch.export.draft_export(graph, example, dynamic_shapes=dynamic, strict=False)
                return torch.onnx.export(program, example, **options)
            except Exception as e:  # noqa: BLE001
                raise ExportError(f"torch.export could not capture {type(graph.model).__name__}: "
                                  f"{_first_line(e)}") from None


def _first_line(error):
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


@contextlib.contextmanager
def _concrete_is_causal():
    """A model that computes SDPA's `is_causal` from the sequence length (`... and T > 1`) hands torch.export
    a symbolic bool, which SDPA's argument parser refuses. Deciding it here records a guard on the length
    instead (so the graph's shortest input becomes 2 tokens, padded by OnnxModel). Only while capturing."""
    import torch

    functional = torch.nn.functional
    original = functional.scaled_dot_product_attention

    def sdpa(*args, is_causal=False, **kwargs):
        return original(*args, is_causal=bool(is_causal), **kwargs)

    functional.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        functional.scaled_dot_product_attention = original


def latency_lines(report, what="latency", length="length"):
    """A blank line, then the report's latency rows as a markdown table."""
    threads = report.get("threads", 1)
    lines = ["", (f"{what}, median of alternating calls, {threads} CPU thread{'s' if threads != 1 else ''} for both "
                  "(--threads):"),
             f"| batch | {length} | PyTorch ms | ONNX Runtime ms | speed-up |", "|---:|---:|---:|---:|---:|"]
    return lines + [f"| {r['batch']} | {r['length']} | {r['torch_ms']:.3f} | {r['onnxruntime_ms']:.3f} | "
                    f"{r['speedup']:.2f}x |" for r in report["latency"]]
