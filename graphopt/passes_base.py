"""The pass contract: `Pass`, `PassResult`, `PassContext` and the registry of pass names.

A pass is a dataclass whose fields are its options (typed, with defaults).  It mutates the ModelProto
it is given in place and returns a `PassResult`; the pipeline copies the model beforehand so that a
failed or rolled-back pass leaves no trace.  Passes never open files, parse arguments or print.
"""

from __future__ import annotations

import dataclasses
import importlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import onnx

from graphopt import bench, profiling, runtime, validate
from graphopt.bench import Timing
from graphopt.errors import PassError, UserError
from graphopt.runtime import RuntimeSettings
from graphopt.validate import Budget

VALIDATION_SETTINGS = RuntimeSettings(level="disable_all")
# Lossy results are judged against the budget at the level users run: a quantized model's numerics are
# those of onnxruntime's fused integer kernels, not of the float simulation at disable_all (on CPUs
# without VNNI its u8s8 kernels saturate: YOLOv8n fully quantized scored detection F1 0.80 at level all,
# 0.84 at disable_all).
BUDGET_SETTINGS = RuntimeSettings(level="all")

# The pipeline's latency guard (passes whose `claims` is "speed" or "size"): the candidate is timed against
# the pass's input, interleaved, at the target settings. A speed claim must beat the input by SPEED_RATIO
# (a smaller margin is within the noise of one 30-round timing on a busy 2-core machine: identical
# sessions' paired ratios strayed from 1 by up to 3-6%, see graphopt.bench); a size claim may not be
# slower by more than the noise. A pass choosing between forms of its rewrite by timing holds them to the
# same margin.
SPEED_RATIO = 0.97
SIZE_RATIO = 1.03

if TYPE_CHECKING:
    from graphopt.activations import ActivationCache
    from graphopt.data import Feed


@dataclass
class PassResult:
    """What a pass did. `counts` feed the report (nodes_removed, bytes_saved, ...); `refused` lists
    rewrites that matched a pattern but were not made, each with the reason; `details` carries anything
    else the report should show (JSON-able: nodes kept float and why, calibration ranges, formats chosen);
    `notes` are sentences for the report (an opset upgrade, a decision taken by measurement)."""

    changed: bool
    counts: dict[str, int | float] = field(default_factory=dict)
    refused: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


@dataclass
class PassContext:
    """Built once per pipeline run and handed to every pass.

    calibration: feeds a pass may learn from (statistics, shapes, its own fidelity checks).
    validation: feeds the pipeline checks fidelity on; passes must not tune on them.
    activations: cache of activation statistics and observed shapes, shared between passes.
    threads: intra-op threads of the target onnxruntime settings (0 = onnxruntime's default).
    budget: what lossy passes may cost (fidelity floors or a task metric), see graphopt.validate.Budget.
    calibration_labels / validation_labels: the feeds' labels, when the data has them (for a metric budget).
    bench_rounds, timer: how latency is measured (`latency`); tests inject a stub timer.
    decisions: what a pass measured once and later passes of the same run may reuse (e.g. whether
    uint8 or int8 activations run faster on this CPU), by a key the pass chooses.
    """

    calibration: list[Feed]
    validation: list[Feed]
    activations: ActivationCache
    threads: int = 0
    budget: Budget = field(default_factory=lambda: Budget())
    calibration_labels: list | None = None
    validation_labels: list | None = None
    bench_rounds: int = 30
    timer: Callable[[], float] = time.perf_counter
    decisions: dict[str, Any] = field(default_factory=dict)

    def outputs(self, model: onnx.ModelProto, feeds: list[Feed] | None = None) -> list[dict]:
        """`model`'s outputs on the calibration feeds (or `feeds`), run as the pipeline judges the budget."""
        return runtime.run_all(model, self.calibration if feeds is None else feeds, BUDGET_SETTINGS, what="the candidate model")

    def budget_problem(self, reference: list[dict], model: onnx.ModelProto) -> str | None:
        """Why `model` breaks the budget against `reference` (outputs on the calibration feeds), or None.
        Passes use this to back off before the pipeline checks the held-out validation feeds."""
        return self.budget.violation(reference, self.outputs(model), self.calibration_labels)

    def fidelity(self, reference: list[dict], outputs: list[dict]) -> float:
        """How close `outputs` are to `reference` (both on the calibration feeds), higher is closer: what a
        pass choosing between variants of its rewrite (weight bits, range methods) ranks them by. The
        budget's metric where it has one and the feeds are labelled, since that is what the user judges
        by; else the mean over outputs of the worst-feed cosine. (MiniLM's raw output, padded positions
        included, had worst-feed cosines 0.64 / 0.70 with 8- / 7-bit weights, which picked 7 bits; the
        task's pooled-embedding cosine was 0.9975 / 0.9953, nearest-neighbour agreement 93.0% / 88.7%.)"""
        if self.budget.metric is not None and self.calibration_labels is not None:
            return float(self.budget.metric(outputs, self.calibration_labels))
        cosines = [d.cosine for d in validate.compare(reference, outputs).values() if d.cosine is not None]
        return float(np.mean(cosines)) if cosines else 1.0

    @property
    def fidelity_label(self) -> str:
        """What `fidelity` measures, for notes."""
        if self.budget.metric is not None and self.calibration_labels is not None:
            return f"metric {getattr(self.budget.metric, '__name__', 'metric')}"
        return "output cosine (worst feed, mean over outputs)"

    def node_times(self, models: list[onnx.ModelProto]) -> list[list[profiling.NodeTime]]:
        """onnxruntime's per-node profile of each of `models` at the target settings (level all, `threads`),
        on two calibration feeds, the models run in turn: what latency guards compare kernel by kernel."""
        settings = RuntimeSettings(level="all", threads=self.threads, memory_arena=True)
        return profiling.node_times(models, self.calibration[:2], settings, rounds=5)

    def latency(self, models: list[tuple[str, onnx.ModelProto]]) -> list[Timing]:
        """Interleaved timings of `models` at the target settings (all optimizations, `threads`);
        ratios are relative to the first model."""
        feeds = self.calibration[:4] or self.validation[:4]
        return bench.bench(models, feeds, threads=self.threads, rounds=self.bench_rounds, timer=self.timer)


class Pass:
    """Base class. Subclasses are dataclasses and set the three class attributes below."""

    name: ClassVar[str]
    description: ClassVar[str]
    lossless: ClassVar[bool]
    # "speed": the pipeline keeps the pass only if the model got faster; "size": only if it got no slower
    claims: ClassVar[str] = ""
    # True: the pass backs off against ctx.budget on the calibration feeds, so when its result breaks the
    # budget on the validation feeds (by less than the pipeline's REFIT_REACH), the pipeline runs it once
    # more with ctx.budget tightened
    fits_budget: ClassVar[bool] = False

    def run(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:  # pragma: no cover
        raise NotImplementedError

    def options(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)} if dataclasses.is_dataclass(self) else {}


_REGISTRY: dict[str, type[Pass]] = {}


def register(cls: type[Pass]) -> type[Pass]:
    """Class decorator: adds the pass to the registry under `cls.name`."""
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise RuntimeError(f"two passes are named {cls.name!r}: {_REGISTRY[cls.name].__qualname__} and {cls.__qualname__}")
    _REGISTRY[cls.name] = cls
    return cls


def registry() -> dict[str, type[Pass]]:
    """All registered passes, by name. Importing the `graphopt.passes` package registers them."""
    importlib.import_module("graphopt.passes")
    return dict(_REGISTRY)


def presets() -> dict[str, list[str]]:
    """Named pass lists (`lossless`, ...), defined next to the passes."""
    return dict(importlib.import_module("graphopt.passes").PRESETS)


def takes_option(pass_or_class, option: str) -> bool:
    """Whether a pass (instance or class) has the option `option` (a dataclass field)."""
    return dataclasses.is_dataclass(pass_or_class) and any(f.name == option for f in dataclasses.fields(pass_or_class))


def make_pass(name: str, options: dict[str, str] | None = None) -> Pass:
    """Instantiate a registered pass, converting option strings to the field types."""
    passes = registry()
    if name not in passes:
        raise UserError(f"unknown pass {name!r}; `graphopt passes` lists the available ones: {', '.join(sorted(passes))}")
    cls = passes[name]
    fields = {f.name: f for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else {}
    kwargs: dict[str, Any] = {}
    for key, text in (options or {}).items():
        if key not in fields:
            raise UserError(f"pass {name!r} has no option {key!r}; its options are: {', '.join(fields) or 'none'}")
        kwargs[key] = _convert(text, fields[key], name)
    return cls(**kwargs)


def _convert(text: str, f: dataclasses.Field, pass_name: str) -> Any:
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    try:
        if kind == "bool":
            if text.lower() not in ("1", "0", "true", "false", "yes", "no"):
                raise ValueError(text)
            return text.lower() in ("1", "true", "yes")
        if kind == "int":
            return int(float(text)) if "e" in text.lower() else int(text)
        if kind == "float":
            return float(text)
    except ValueError:
        raise UserError(f"option {pass_name}.{f.name} expects {kind}, got {text!r}") from None
    return text


__all__ = ["Pass", "PassContext", "PassError", "PassResult", "make_pass", "presets", "register", "registry", "takes_option"]
