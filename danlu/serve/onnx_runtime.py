"""What every ONNX export shares: the parity tolerance and error, a quiet torch.onnx, onnxruntime sessions
and side-by-side latency."""
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
