"""Lossless optimizers side by side on real models: graphopt's lossless preset, onnxslim, onnxsim.

For each model (PP-OCRv4 rec, YOLOv8n, MiniLM; see benchmarks/models.py) this runs, each in
try/except so a failing tool is recorded and the others go on:

    graphopt   graphopt.optimize(model, data=feeds)  (the default `lossless` preset)
    onnxslim   onnxslim.slim(model)
    onnxsim    onnxsim.simplify(model)

and prints one table per model with, per variant: node count (all graphs), serialized size, the max abs
error of its outputs vs the original on the same feeds (onnxruntime, ORT_DISABLE_ALL, graphopt.validate.compare),
its latency ratio to the original from ONE interleaved graphopt.bench.bench run of all variants
(onnxruntime level `all`, default threads unless --threads), and how long the tool took (wall clock, and
process CPU time over all threads, which other work on the machine does not inflate). Then graphopt's
per-pass report, and the op types whose counts differ between graphopt's output and the smallest
other tool's output (what is left to remove).

    python benchmarks/lossless.py                          # all models
    python benchmarks/lossless.py --models ppocr-rec --rounds 100 --json benchmarks/results/lossless.json

If a pass of the preset is not registered yet, the preset minus the missing passes runs and a line says so.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path

import onnx

import graphopt
from graphopt import bench, runtime, validate
from graphopt.data import Feed, FeedSet
from graphopt.graph import copy_model, iter_graphs, node_count
from graphopt.model import write_text
from graphopt.passes_base import presets
from graphopt.report import Report, table

sys.path.insert(0, str(Path(__file__).resolve().parent))
import models  # noqa: E402  (benchmarks/ is not a package; models.py sits beside this script)

REFERENCE = runtime.RuntimeSettings(level="disable_all")


@dataclass(frozen=True)
class BenchModel:
    path: Callable[[], Path]
    feeds: Callable[[int], list[Feed]]
    feeds_label: str


MODELS = {
    "ppocr-rec": BenchModel(models.ppocr_rec_path, models.ppocr_rec_feeds, "rendered text lines [1,3,48,320]"),
    "yolov8n": BenchModel(models.yolov8n_path, models.yolov8n_feeds, "synthetic scenes [1,3,320,320]"),
    "minilm": BenchModel(models.minilm_path, models.minilm_feeds, "real sentences [1,128]"),
}


@dataclass
class Variant:
    tool: str
    model: onnx.ModelProto | None = None
    seconds: float = 0.0
    cpu_seconds: float = 0.0  # process CPU time, all threads: a load-independent companion to `seconds`
    error: str = ""
    nodes: int | None = None
    size_bytes: int | None = None
    max_abs: float | None = None
    median_ms: float | None = None
    ratio: float | None = None
    notes: list[str] = field(default_factory=list)
    report: Report | None = None  # graphopt's per-pass report

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("model", "report")}


def make_graphopt(variant: Variant, original: onnx.ModelProto, feeds: FeedSet, threads: int) -> None:
    result = graphopt.optimize(original, data=feeds, max_feeds=len(feeds.feeds), threads=threads)
    variant.model, variant.report = result.model, result.report


def make_onnxslim(variant: Variant, original: onnx.ModelProto) -> None:
    import onnxslim

    variant.model = onnxslim.slim(copy_model(original))


def make_onnxsim(variant: Variant, original: onnx.ModelProto) -> None:
    import onnxsim

    variant.model, check_ok = onnxsim.simplify(copy_model(original))
    if not check_ok:
        variant.notes.append("onnxsim's own output check failed")



def build_variants(original: onnx.ModelProto, feeds: FeedSet, threads: int) -> list[Variant]:
    """The original and one variant per tool; a tool that raises leaves its variant with `error` set."""
    makers = {
        "graphopt": lambda v: make_graphopt(v, original, feeds, threads),
        "onnxslim": lambda v: make_onnxslim(v, original),
        "onnxsim": lambda v: make_onnxsim(v, original),
    }
    variants = [Variant("original", original)]
    for tool, make in makers.items():
        variant = Variant(tool)
        start, cpu_start = time.perf_counter(), time.process_time()
        try:
            make(variant)
        except Exception as exc:  # a tool may fail in any way; the table records it and the others go on
            variant.model, variant.error = None, f"{type(exc).__name__}: {_first_line(exc)}"
        variant.seconds, variant.cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
        variants.append(variant)
    return variants


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


def measure(variants: list[Variant], feeds: list[Feed], threads: int, rounds: int) -> None:
    """Fill in structure, fidelity and latency of every variant that was built."""
    reference = runtime.run_all(variants[0].model, feeds, REFERENCE, what="the original model")
    timed = []
    for v in variants:
        if v.model is None:
            continue
        v.nodes, v.size_bytes = node_count(v.model), v.model.ByteSize()
        try:
            outputs = runtime.run_all(v.model, feeds, REFERENCE, what=f"{v.tool}'s model")
        except graphopt.UserError as exc:
            v.error = str(exc)
            continue
        v.max_abs = validate.worst(validate.compare(reference, outputs))[0]
        timed.append(v)
    timings = bench.bench([(v.tool, v.model) for v in timed], feeds, threads=threads, level="all", rounds=rounds)
    for v, t in zip(timed, timings):
        v.median_ms, v.ratio = t.median_ms, t.ratio


def op_histogram(model: onnx.ModelProto) -> collections.Counter:
    return collections.Counter(n.op_type for g in iter_graphs(model.graph) for n in g.node)


def histogram_diff(ours: onnx.ModelProto, theirs: onnx.ModelProto) -> list[tuple[str, int, int]]:
    """(op type, count in ours, count in theirs) for every op type whose counts differ, biggest gap first."""
    a, b = op_histogram(ours), op_histogram(theirs)
    rows = [(op, a[op], b[op]) for op in set(a) | set(b) if a[op] != b[op]]
    return sorted(rows, key=lambda r: (-(r[1] - r[2]), r[0]))


def format_variants(variants: list[Variant]) -> str:
    rows = [("tool", "nodes", "size", "max abs err", "median ms", "latency ratio", "optimize s", "cpu s", "note")]
    for v in variants:
        rows.append(
            (
                v.tool,
                _or_dash(v.nodes),
                _or_dash(v.size_bytes, lambda n: f"{n / 2**20:.2f} MB"),
                _or_dash(v.max_abs, lambda x: f"{x:.2e}"),
                _or_dash(v.median_ms, lambda x: f"{x:.2f}"),
                _or_dash(v.ratio, lambda x: f"{x:.3f}"),
                "" if v.tool == "original" else f"{v.seconds:.1f}",
                "" if v.tool == "original" else f"{v.cpu_seconds:.1f}",
                "; ".join(([v.error] if v.error else []) + v.notes),
            )
        )
    return table(rows)


def _or_dash(value, fmt=str) -> str:
    return "-" if value is None else fmt(value)


def smallest_other(variants: list[Variant]) -> Variant | None:
    others = [v for v in variants if v.tool not in ("original", "graphopt") and v.model is not None and not v.error]
    return min(others, key=lambda v: v.nodes) if others else None


def bench_model(name: str, count: int, threads: int, rounds: int) -> dict:
    spec = MODELS[name]
    path = spec.path()
    original = graphopt.load(path)
    feeds = FeedSet(spec.feeds(count), None, spec.feeds_label)
    variants = build_variants(original, feeds, threads)
    report = variants[1].report
    measure(variants, feeds.feeds, threads, rounds)
    load = os.getloadavg()[0]
    print(f"\n=== {name}: {path.name}, {len(feeds.feeds)} feeds ({feeds.source}), {rounds} interleaved rounds, ORT level all, threads {threads or 'default'}, load average {load:.1f} on {os.cpu_count()} cores")
    print(format_variants(variants))
    result = {"model": name, "path": str(path), "feeds": feeds.source, "feed_count": len(feeds.feeds), "rounds": rounds, "threads": threads, "load_average": load}
    result["variants"] = [v.as_dict() for v in variants]
    if report is not None:
        print(f"\ngraphopt per-pass report ({name}):")
        print(report.summary())
        result["graphopt_report"] = report.to_dict()
    ours, other = variants[1], smallest_other(variants)
    if ours.model is not None and other is not None:
        diff = histogram_diff(ours.model, other.model)
        print(f"\nop types whose counts differ, graphopt ({ours.nodes} nodes) vs {other.tool} ({other.nodes} nodes):")
        print(table([("op type", "graphopt", other.tool, "graphopt - " + other.tool)] + [(op, a, b, f"{a - b:+d}") for op, a, b in diff]) if diff else "(none)")
        result["op_diff_vs"] = other.tool
        result["op_diff"] = [{"op": op, "graphopt": a, other.tool: b} for op, a, b in diff]
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=list(MODELS), help="which models (default: all)")
    parser.add_argument("--feeds", type=int, default=8, help="feeds per model, used for validation and timing (default 8)")
    parser.add_argument("--rounds", type=int, default=50, help="interleaved timing rounds (default 50)")
    parser.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (default: onnxruntime's)")
    parser.add_argument("--json", metavar="OUT", help="also write the results as JSON to OUT")
    args = parser.parse_args(argv)
    if args.json and not Path(args.json).parent.is_dir():
        parser.error(f"--json {args.json}: folder {Path(args.json).parent} does not exist")  # before the run, not after
    print(f"graphopt lossless preset: {', '.join(presets()['lossless'])}")
    results = [bench_model(name, args.feeds, args.threads, args.rounds) for name in args.models]
    if args.json:
        write_text(args.json, json.dumps({"models": results}, indent=2, default=str) + "\n")
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
