"""The Python API; the command line is a thin layer over it.

    import graphopt
    result = graphopt.optimize("model.onnx", data="feeds.npz")
    graphopt.save(result.model, "model.opt.onnx")
    print(result.report.summary())
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx

from graphopt import data as data_mod
from graphopt import model as model_io
from graphopt import randomness, runtime
from graphopt.activations import ActivationCache
from graphopt.errors import UserError
from graphopt.passes_base import Pass, PassContext, make_pass, presets, takes_option
from graphopt.pipeline import Pipeline
from graphopt.report import Report
from graphopt.runtime import RuntimeSettings
from graphopt.validate import Budget

Metric = Callable[[list[dict[str, np.ndarray]], list[np.ndarray]], float]


@dataclass
class OptimizeResult:
    model: onnx.ModelProto
    report: Report


def parse_pass_spec(spec: str) -> Pass:
    """`"fold-constants:max_growth_bytes=2048"` -> that pass with that option."""
    name, *options = spec.strip().split(":")
    pairs = {}
    for item in options:
        key, sep, value = item.partition("=")
        if not sep:
            raise UserError(f"pass option {item!r} in {spec!r}: expected KEY=VALUE")
        pairs[key.strip()] = value.strip()
    return make_pass(name.strip(), pairs)


def resolve_passes(passes: list[str | Pass] | str | None, preset: str | None) -> list[Pass]:
    """Pass instances from names/specs/instances, or the preset's list when `passes` is None."""
    if passes is None:
        known = presets()
        name = preset or "lossless"
        if name not in known:
            raise UserError(f"unknown preset {name!r}; presets: {', '.join(sorted(known))}")
        passes = list(known[name])
    if isinstance(passes, str):
        passes = [p for p in passes.split(",") if p.strip()]
    return [p if isinstance(p, Pass) else parse_pass_spec(p) for p in passes]


def with_keep_float(passes: list[Pass], pattern: str) -> list[Pass]:
    """`passes` with `pattern` as the `keep_float` option of those that take one and were given none."""
    if not pattern:
        return passes
    if not any(takes_option(p, "keep_float") for p in passes):
        raise UserError(f"--keep-float {pattern!r}: none of the passes ({', '.join(p.name for p in passes)}) quantizes anything; use it with --preset int8 or int4 or a quantize pass")
    return [dataclasses.replace(p, keep_float=pattern) if takes_option(p, "keep_float") and not p.keep_float else p for p in passes]


def accuracy(outputs: list[dict[str, np.ndarray]], labels: list[np.ndarray]) -> float:
    """Share of samples whose argmax over the last axis of the first output equals the label."""
    hits = total = 0
    for out, label in zip(outputs, labels):
        scores = np.asarray(next(iter(out.values())))
        predicted = np.argmax(scores, axis=-1).reshape(-1)
        truth = np.asarray(label).reshape(-1)
        hits += int(np.sum(predicted == truth))
        total += truth.size
    return hits / total if total else float("nan")


def _capped(given: data_mod.FeedSet, role: str, max_feeds: int) -> tuple[data_mod.FeedSet, list[str]]:
    """The first `max_feeds` feeds of `given` (labels alike), and the report's note when that left some
    unused, so that a user who gave more data than was used knows it, and how to use it."""
    if len(given.feeds) <= max_feeds:
        return given, []
    note = f"only the first {max_feeds} of the {len(given.feeds)} feeds of {role} ({given.source}) were used; raise max_feeds (--max-feeds) to use them all"
    return given.split(max_feeds)[0], [note]


def optimize(
    model: onnx.ModelProto | str | os.PathLike,
    passes: list[str | Pass] | str | None = None,
    *,
    preset: str | None = None,
    data: data_mod.FeedSet | str | os.PathLike | list | None = None,
    val: data_mod.FeedSet | str | os.PathLike | list | None = None,
    shapes: dict[str, list[int]] | None = None,
    batch: int = 1,
    max_feeds: int = 16,
    seed: int = 0,
    threads: int = 0,
    metric: Metric | None = None,
    budget: Budget | None = None,
    fixed_point: bool = True,
    rounding_floor: bool = True,
    strict: bool = False,
    bench_rounds: int = 30,
    latency_guard: bool = True,
    keep_float: str = "",
) -> OptimizeResult:
    """Run passes (default: the `lossless` preset) on a model, validating each with onnxruntime.

    `data` gives the feeds (see graphopt.data); without it feeds are synthesized. At most `max_feeds`
    feeds are used. When any pass is lossy the feeds are split: the first half calibrates, the second
    half (never seen by a pass) validates; with `val`, all of `data` calibrates and `val` validates.
    `budget` is what lossy passes may cost (default: cosine and top-1 agreement >= 0.99 per output).
    `metric(outputs, labels)` is reported before and after when the feeds carry labels.
    `bench_rounds` is how many interleaved runs the latency guard times per model; `latency_guard=False`
    keeps passes that claim speed or size without timing them (when this machine is not the target). `rounding_floor=False` holds lossless passes to the fixed float tolerance
    even where onnxruntime's own optimizations differ by more (see graphopt.validate).
    `keep_float`, a regular expression of node names, is the `keep_float` option of every pass that has
    one and was not given its own (the quantize passes: those nodes stay float).
    """
    if not isinstance(model, onnx.ModelProto):
        model = model_io.load(model)
    model, deployed_note = randomness.as_deployed(model)
    pass_list = with_keep_float(resolve_passes(passes, preset), keep_float)
    feeds = data_mod.feed_set(data, model, count=4, seed=seed, shapes=shapes, batch=batch)
    used, notes = _capped(feeds, "data", max_feeds)
    if not used.feeds:
        raise UserError("no feeds to validate on; give --data with at least one sample")
    lossy = any(not p.lossless for p in pass_list)
    if val is not None:
        calibration = used
        validation, val_notes = _capped(data_mod.feed_set(val, model, shapes=shapes, batch=batch), "val", max_feeds)
        notes += val_notes
    elif lossy and len(used.feeds) >= 2:
        calibration, validation = used.split(len(used.feeds) // 2)
    else:
        calibration = validation = used
    settings = RuntimeSettings(level="disable_all")
    budget = budget or Budget()
    ctx = PassContext(
        calibration=calibration.feeds,
        validation=validation.feeds,
        activations=ActivationCache(calibration.feeds, settings),
        threads=threads,
        budget=budget,
        calibration_labels=calibration.labels,
        validation_labels=validation.labels,
        bench_rounds=bench_rounds,
    )
    pipeline = Pipeline(pass_list, fixed_point=fixed_point, budget=budget, strict=strict, rounding_floor=rounding_floor, latency_guard=latency_guard)
    label = f"{len(validation.feeds)} validation feeds from {validation.source}"
    with data_mod.explaining(used):
        optimized, report = pipeline.run(model, ctx, label)
    if lossy and feeds.source == data_mod.SYNTHESIZED:
        report.notes.append("lossy passes were calibrated and validated on synthesized random feeds; give real data (--data) for a meaningful result")
    report.notes.extend(notes)
    if deployed_note:
        report.notes.insert(0, deployed_note)
    if metric is not None and validation.labels is not None:
        before = metric(runtime.run_all(model, validation.feeds, settings), validation.labels)
        after = metric(runtime.run_all(optimized, validation.feeds, settings), validation.labels)
        report.metrics[getattr(metric, "__name__", "metric")] = {"before": before, "after": after}
    return OptimizeResult(optimized, report)
