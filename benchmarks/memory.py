"""Memory and time of quantizing real models, against the issue's bound: calibration memory under
4x (model + calibration data), and quantizing with 64 calibration feeds in under 60 s.

For each model (PP-OCRv4 rec, YOLOv8n, the ddddocr captcha recognizer, MiniLM; feeds and task budgets from benchmarks/quantize.py):

    calibration   graphopt.calibrate.collect over every float activation of the lossless model (the
                  most quantize-static could ask for), all the calibration feeds, keeping what the range
                  method needs (--method; auto, quantize-static's default, keeps the histograms mse needs;
                  minmax keeps none)
    <preset>      graphopt.optimize(original, preset=..., data=the calibration feeds, the task budget)

Memory is the growth of the resident set: peak RSS during the step (Linux VmHWM, reset through
/proc/self/clear_refs before it) minus RSS just before it, each step in a fresh process with the heap
trimmed (malloc_trim) first, so that memory freed earlier but kept by the allocator does not hide growth.
Python, onnxruntime's libraries, the model and the feeds already loaded are not counted; sessions,
copies of the model, activations and statistics are. "Bound" is 4 x (the model file + the calibration
feeds' bytes).

    python benchmarks/memory.py                              # all models, 64 feeds, int8 preset
    python benchmarks/memory.py --models ppocr-rec --feeds 64 --preset int8 --threads 2 --method entropy
"""

from __future__ import annotations

import argparse
import ctypes
import multiprocessing
import sys
import time
from pathlib import Path

import numpy as np

import graphopt
from graphopt import calibrate
from graphopt.activations import main_graph_tensors
from graphopt.data import FeedSet
from graphopt.graph import serialized
from graphopt.passes import quantize_static
from graphopt.report import table

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quantize  # noqa: E402  (benchmarks/ is not a package)

MB = 1 << 20


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


class Growth:
    """Peak RSS growth and wall time of the code inside `with` (Linux only)."""

    def __enter__(self) -> Growth:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        self.before = _status_kb("VmRSS") * 1024
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.start
        self.peak = _status_kb("VmHWM") * 1024
        self.growth = self.peak - self.before


def _inputs(name: str, feeds: int, preset: str):
    work = quantize.WORKLOADS[name]
    original = graphopt.load(work.path())
    calibration = work.calibration(feeds)
    labels, budget = work.budget(calibration, preset) if work.budget else (None, None)
    return original, calibration, FeedSet(calibration, labels, f"{feeds} calibration feeds"), budget


def methods_of(method: str) -> tuple[str, ...]:
    """The range methods quantize-static computes for `method` (auto: several, from one collection)."""
    return quantize_static.AUTO_METHODS if method == "auto" else (method,)


def _calibration_step(name: str, feeds: int, preset: str, threads: int, method: str) -> tuple[float, float, float]:
    original, calibration, data, _ = _inputs(name, feeds, preset)
    clean = graphopt.optimize(original, data=data, max_feeds=feeds, threads=threads).model
    del original
    with Growth() as step:
        calibrate.collect(clean, calibration, main_graph_tensors(clean), bins=max(calibrate.bins_for(m) for m in methods_of(method)))
    return step.before, step.growth, step.seconds


def _preset_step(name: str, feeds: int, preset: str, threads: int) -> tuple[float, float, float]:
    original, _, data, budget = _inputs(name, feeds, preset)
    with Growth() as step:
        graphopt.optimize(original, data=data, max_feeds=feeds, threads=threads, budget=budget, preset=preset)
    return step.before, step.growth, step.seconds


def _in_fresh_process(step, *args):
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(step, args)


def measure(name: str, feeds: int, preset: str, threads: int, method: str) -> dict:
    original, calibration, _, _ = _inputs(name, feeds, preset)
    model_bytes = len(serialized(original))
    data_bytes = sum(a.nbytes for feed in calibration for a in feed.values())
    params = sum(int(np.prod(t.dims)) for t in original.graph.initializer) + sum(
        int(np.prod(a.t.dims)) for n in original.graph.node if n.op_type == "Constant" for a in n.attribute if a.name == "value"
    )
    del original, calibration
    before, cal_growth, cal_seconds = _in_fresh_process(_calibration_step, name, feeds, preset, threads, method)
    _, whole_growth, whole_seconds = _in_fresh_process(_preset_step, name, feeds, preset, threads)
    return {
        "model": name, "params (M)": params / 1e6, "model MB": model_bytes / MB, "data MB": data_bytes / MB,
        "bound MB": 4 * (model_bytes + data_bytes) / MB, "rss before MB": before / MB,
        f"calibration ({method}) MB": cal_growth / MB, "calibration s": cal_seconds,
        f"{preset} MB": whole_growth / MB, f"{preset} s": whole_seconds,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(quantize.WORKLOADS), choices=list(quantize.WORKLOADS))
    parser.add_argument("--feeds", type=int, default=64)
    parser.add_argument("--preset", default="int8")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--method", default="auto", choices=("auto", *calibrate.METHODS), help="range method the calibration step collects for (default: auto, quantize-static's)")
    args = parser.parse_args(argv)
    rows = [measure(name, args.feeds, args.preset, args.threads, args.method) for name in args.models]
    print(table([tuple(rows[0])] + [tuple(f"{v:.1f}" if isinstance(v, float) else v for v in row.values()) for row in rows]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
