"""onnxruntime latency, the one timing mechanism of the project.

Models are timed interleaved (A B A B ..., the order alternating each round) after a warm-up, so that
machine noise lands on all of them alike. Sessions run with intra-op thread spinning off: two spinning
sessions taking turns on two cores were measured slowing each other by up to 2x, and a byte-identical
copy then timed at 0.85x. Each model's latency is the median (and p90) over its runs.

A model's ratio is the median, over rounds, of its run's time over the first model's run in the same
round, not the ratio of the two medians: the runs of one round see the same state of the machine, and on
a shared machine that state drifts and jumps between modes. Measured on the 2-core development machine,
four sessions of the same model timed together (30 rounds, 5 repeats, 30 pairs of sessions per model):
the ratio of medians strayed from 1 by 3.6% / 2.8% / 3.0% on average and up to 15% / 13% / 12%
(PP-OCRv4 rec, YOLOv8n, the captcha model), the median of paired ratios by 1.6% / 1.2% / 1.0%, at
most 6.0% / 4.3% / 3.5%.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx

from graphopt import runtime
from graphopt.report import table
from graphopt.runtime import RuntimeSettings


@dataclass
class Timing:
    label: str
    load_seconds: float
    runs_ms: list[float]
    ratio: float = 1.0

    @property
    def median_ms(self) -> float:
        return float(np.median(self.runs_ms))

    @property
    def p90_ms(self) -> float:
        return float(np.percentile(self.runs_ms, 90))

    def as_dict(self) -> dict:
        return {"label": self.label, "median_ms": self.median_ms, "p90_ms": self.p90_ms, "ratio": self.ratio, "load_seconds": self.load_seconds, "runs": len(self.runs_ms)}


def bench(
    models: list[tuple[str, onnx.ModelProto | str]],
    feeds: list[dict[str, np.ndarray]],
    *,
    threads: int = 0,
    level: str = "all",
    warmup: int = 5,
    rounds: int = 50,
    timer: Callable[[], float] = time.perf_counter,
) -> list[Timing]:
    """Time each (label, model) on `feeds`, interleaved; returns one Timing per model, in order."""
    if not feeds:
        raise ValueError("bench needs at least one feed")
    settings = RuntimeSettings(level=level, threads=threads, spinning=False, memory_arena=True)
    sessions, timings = [], []
    for label, model in models:
        start = timer()
        sessions.append(runtime.session(model, settings, what=label))
        timings.append(Timing(label, timer() - start, []))
    for (label, _), sess in zip(models, sessions):
        try:  # a model that cannot run fails here, before any timing
            for k in range(max(warmup, 1)):
                runtime.run(sess, feeds[k % len(feeds)])
        except Exception as exc:
            raise runtime.run_failure(label, exc) from exc
    order = list(range(len(models)))
    for r in range(rounds):
        feed = feeds[r % len(feeds)]
        for i in order if r % 2 == 0 else reversed(order):
            start = timer()
            runtime.run(sessions[i], feed)
            timings[i].runs_ms.append((timer() - start) * 1000.0)
    base = np.asarray(timings[0].runs_ms)
    for t in timings:
        t.ratio = float(np.median(np.asarray(t.runs_ms) / base)) if np.all(base > 0) else float("nan")
    return timings


def format_timings(timings: list[Timing]) -> str:
    rows = [("model", "median ms", "p90 ms", "paired ratio", "load s")]  # ratio: see the module docstring
    rows += [(t.label, f"{t.median_ms:.3f}", f"{t.p90_ms:.3f}", f"{t.ratio:.3f}", f"{t.load_seconds:.2f}") for t in timings]
    return table(rows)
