"""Quantization side by side on real models: graphopt's int8/int4 presets vs onnxruntime.quantization.

For each model (PP-OCRv4 rec, YOLOv8n, the ddddocr captcha recognizer, MiniLM; see benchmarks/models.py) the feeds are split into a
calibration set and a scored set that no quantizer sees, and these variants are built, each in
try/except so a failure is recorded and the others go on:

    fp32            the original model as given (the baseline of every ratio)
    fp32 clean      graphopt's lossless preset (timed too: what clean-up alone gives)
    ort static      onnxruntime.quantization.quantize_static with its defaults (QDQ, MinMax)
    ort dynamic     quantize_dynamic with its defaults
    ort best        the best quality of a small grid of onnxruntime settings (per-channel on/off, U8/S8
                    activations, MinMax/Percentile/Entropy calibration, with and without quant_pre_process,
                    dynamic per-channel on/off); every grid point is listed with its quality
    ort int4        MiniLM only: MatMulNBitsQuantizer (weight-only int4, block 32, symmetric)
    graphopt int8   graphopt.optimize(model, preset="int8", data=<calibration feeds>)
    graphopt int4   MiniLM only: preset="int4"
    graphopt ... keep-float   with --keep-float REGEX: each graphopt row again with optimize(keep_float=REGEX)

Until the presets exist, the lossless preset followed by whichever of quantize-static, quantize-dynamic
and quantize-weights is registered runs instead, one row each; with none registered the graphopt rows are
skipped and a line says so.

Measured per variant: the task's quality on the scored set (benchmarks/tasks.py; onnxruntime level `all`,
the numerics a user gets), file size ratio, latency ratio to fp32 from ONE interleaved graphopt.bench.bench
run of the timed variants (fp32, fp32 clean, the onnxruntime defaults and best, graphopt), and the time to
quantize (wall and process CPU). A model onnxruntime cannot load or run is recorded as invalid.

    python benchmarks/quantize.py                              # all models, full counts
    python benchmarks/quantize.py --quick                      # smoke run: fewer samples, smaller grid
    python benchmarks/quantize.py --models minilm --rounds 100 --json benchmarks/results/quantize.json
    python benchmarks/quantize.py --models yolov8n --keep-float '^/model\.0/'   # also with the stem float
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime

import graphopt
from graphopt import bench, runtime
from graphopt.data import Feed, FeedSet
from graphopt.model import write_text
from graphopt.passes_base import presets, registry
from graphopt.report import Report, table
from graphopt.validate import Budget

sys.path.insert(0, str(Path(__file__).resolve().parent))
import models  # noqa: E402  (benchmarks/ is not a package)
import tasks  # noqa: E402

SCORING = "all"  # quality is measured at the onnxruntime level a user runs, where QDQ is fused
DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "quantize.json"
BEST_NOTE = "onnxruntime's best int8 setting"
FALLBACK_PASSES = {"int8": ("quantize-static", "quantize-dynamic"), "int4": ("quantize-weights",)}


# --- the models and their task metrics ---------------------------------------------------------------

@dataclass(frozen=True)
class Target:
    metric: str
    at_least: bool
    value: float

    def met(self, metrics: dict) -> bool | None:
        got = metrics.get(self.metric)
        if got is None:
            return None
        return got >= self.value if self.at_least else got <= self.value

    def __str__(self) -> str:
        return f"{self.metric} {'>=' if self.at_least else '<='} {self.value:g}"


@dataclass
class Workload:
    """One model: its feeds (calibration, scored + truth), its quality metrics and targets per preset."""

    name: str
    path: Callable[[], Path]
    calibration: Callable[[int], list[Feed]]
    scored: Callable[[int], tuple[list[Feed], object]]
    score: Callable[[list[dict], list[dict], object], dict]
    primary: str  # the quality metric (higher is better) that picks onnxruntime's best setting
    counts: tuple[int, int]  # scored samples: full, --quick
    presets: tuple[str, ...] = ("int8",)
    targets: dict[str, tuple[Target, ...]] = field(default_factory=dict)
    # the task budget graphopt is given (labels of the calibration feeds, Budget); None: the default floors
    budget: Callable[[list[Feed], str], tuple[list[np.ndarray], Budget]] | None = None  # (calibration, preset)


def ocr_calibration(count: int) -> list[Feed]:
    lines = models.render_text_lines(models.sentence_snippets(count), fonts=models.OCR_FONTS)
    return [{"x": lines[i : i + 1]} for i in range(count)]


def ocr_scored(count: int) -> tuple[list[Feed], tuple[list[str], list[str]]]:
    """Lines from the second half of the sentence file, all four DejaVu faces in turn; the truth is
    (texts, the model's CTC alphabet)."""
    texts = models.sentence_snippets(count, start=512)
    lines = models.render_text_lines(texts, fonts=models.OCR_FONTS)
    characters = tasks.ocr_characters(onnx.load(str(models.ppocr_rec_path()), load_external_data=False))
    return [{"x": lines[i : i + 1]} for i in range(count)], (texts, characters)


def ocr_texts(outputs: list[dict], characters: list[str]) -> list[str]:
    """Greedy CTC decoding of PP-OCR's [1, T, classes] output."""
    return [tasks.ctc_greedy_decode(next(iter(o.values())), characters)[0] for o in outputs]


def ocr_score(outputs: list[dict], reference: list[dict], truth: tuple[list[str], list[str]]) -> dict:
    texts, characters = truth
    return text_scores(ocr_texts(outputs, characters), texts)


def ocr_budget(calibration: list[Feed], preset: str) -> tuple[list[np.ndarray], Budget]:
    """Character accuracy on the calibration lines' own texts may drop by at most 1 point."""
    characters = tasks.ocr_characters(onnx.load(str(models.ppocr_rec_path()), load_external_data=False))
    return text_budget(models.sentence_snippets(len(calibration)), lambda outputs: ocr_texts(outputs, characters))


def text_scores(predicted: list[str], truth: list[str]) -> dict:
    return {"char_accuracy": tasks.character_accuracy(predicted, truth), "lines_exact": float(np.mean([p == t for p, t in zip(predicted, truth)]))}


def text_budget(texts: list[str], read: Callable[[list[dict]], list[str]]) -> tuple[list[np.ndarray], Budget]:
    """A recognizer's budget: character accuracy of `read(outputs)` against the calibration feeds' own
    `texts` may drop by at most 1 point. The texts travel as the feeds' labels (code points)."""
    labels = [np.array([ord(c) for c in text], np.int32) for text in texts]

    def character_accuracy(outputs: list[dict], labels: list[np.ndarray]) -> float:
        return tasks.character_accuracy(read(outputs), ["".join(map(chr, label)) for label in labels])

    return labels, Budget(metric=character_accuracy, max_drop=0.01)


def captcha_calibration(count: int) -> list[Feed]:
    return models.captchas(count, seed=0)[1]


def captcha_scored(count: int) -> tuple[list[Feed], tuple[list[str], list[str]]]:
    """Captchas from another seed; the truth is (texts, ddddocr's alphabet)."""
    texts, feeds = models.captchas(count, seed=1)
    return feeds, (texts, models.captcha_characters())


def captcha_texts(outputs: list[dict], characters: list[str]) -> list[str]:
    """Greedy CTC decoding of ddddocr's [T, 1, classes] output, case folded: the model reads most letters
    as lower case whatever their case, so the case is not part of its answer."""
    return [tasks.ctc_greedy_decode(next(iter(o.values())).transpose(1, 0, 2), characters)[0].lower() for o in outputs]


def captcha_score(outputs: list[dict], reference: list[dict], truth: tuple[list[str], list[str]]) -> dict:
    texts, characters = truth
    return text_scores(captcha_texts(outputs, characters), [t.lower() for t in texts])


def captcha_budget(calibration: list[Feed], preset: str) -> tuple[list[np.ndarray], Budget]:
    """Character accuracy on the calibration captchas' own texts (case folded) may drop by at most 1 point."""
    characters = models.captcha_characters()
    texts = [t.lower() for t in models.captchas(len(calibration), seed=0)[0]]
    return text_budget(texts, lambda outputs: captcha_texts(outputs, characters))


def yolo_budget(calibration: list[Feed], preset: str) -> tuple[list[np.ndarray], Budget]:
    """Detections after NMS must agree with fp32's (the labels) at F1 >= 0.97 (a margin under the 0.95 target)."""
    labels = [tasks.yolo_detections(o["output0"]) for o in runtime.run_all(graphopt.load(models.yolov8n_path()), calibration)]

    def detection_f1(outputs: list[dict], labels: list[np.ndarray]) -> float:
        return tasks.detection_f1(labels, [tasks.yolo_detections(o["output0"]) for o in outputs])

    return labels, Budget(metric=detection_f1, max_drop=0.03)


def yolo_calibration(count: int) -> list[Feed]:
    return models.photo_feeds(count, seed=2)


def yolo_scored(count: int) -> tuple[list[Feed], None]:
    return models.photo_feeds(count, seed=1), None


def yolo_score(outputs: list[dict], reference: list[dict], truth: None) -> dict:
    ours = [tasks.yolo_detections(o["output0"]) for o in outputs]
    fp32 = [tasks.yolo_detections(o["output0"]) for o in reference]
    return {"f1": tasks.detection_f1(fp32, ours), "detections": float(sum(len(d) for d in ours))}


def minilm_half(first: bool, count: int) -> list[Feed]:
    feeds = models.minilm_feeds(1024)
    half = len(feeds) // 2
    return (feeds[:half] if first else feeds[half:])[:count]


def minilm_budget(calibration: list[Feed], preset: str) -> tuple[list[np.ndarray], Budget]:
    """Mean cosine of the mask-pooled sentence embeddings vs fp32 >= 0.99 for int8, >= 0.98 for int4 (the
    targets).
    The label of a feed is its attention mask followed by fp32's pooled embedding: the metric needs both,
    and padding positions, whose hidden states nothing reads, must not count."""
    fp32 = runtime.run_all(graphopt.load(models.minilm_path()), calibration)
    labels = [np.concatenate([f["attention_mask"].reshape(-1).astype(np.float32), tasks.mean_pooled(o["last_hidden_state"], f["attention_mask"]).reshape(-1)]) for f, o in zip(calibration, fp32)]

    def pooled_cosine(outputs: list[dict], labels: list[np.ndarray]) -> float:
        cosines = []
        for out, label in zip(outputs, labels):
            hidden = out["last_hidden_state"]
            mask = label[: hidden.shape[1]].reshape(1, -1)
            cosines.append(tasks.cosines(label[hidden.shape[1] :].reshape(1, -1), tasks.mean_pooled(hidden, mask))[0])
        return float(np.mean(cosines))

    return labels, Budget(metric=pooled_cosine, max_drop=0.02 if preset == "int4" else 0.01)


def minilm_score(outputs: list[dict], reference: list[dict], truth: None) -> dict:
    def pooled(outs: list[dict]) -> np.ndarray:
        return np.concatenate([tasks.mean_pooled(o["last_hidden_state"], o["__mask"]) for o in outs])

    ours, fp32 = pooled(outputs), pooled(reference)
    cos = tasks.cosines(fp32, ours)
    return {"cosine": float(cos.mean()), "min_cosine": float(cos.min()), "nn_agreement": tasks.nearest_neighbour_agreement(fp32, ours)}


WORKLOADS = {
    "ppocr-rec": Workload(
        "ppocr-rec", models.ppocr_rec_path, ocr_calibration, ocr_scored, ocr_score, "char_accuracy", (256, 64),
        targets={"int8": (Target("drop_points", False, 1.0), Target("speedup", True, 1.8), Target("size_ratio", False, 0.3))},
        budget=ocr_budget,
    ),
    "yolov8n": Workload(
        "yolov8n", models.yolov8n_path, yolo_calibration, yolo_scored, yolo_score, "f1", (64, 24),
        targets={"int8": (Target("f1", True, 0.95), Target("speedup", True, 1.8))},
        budget=yolo_budget,
    ),
    "captcha": Workload(
        "captcha", models.captcha_path, captcha_calibration, captcha_scored, captcha_score, "char_accuracy", (200, 64),
        targets={"int8": (Target("drop_points", False, 1.0), Target("speedup", True, 1.0))},
        budget=captcha_budget,
    ),
    "minilm": Workload(
        "minilm", models.minilm_path, lambda n: minilm_half(True, n), lambda n: (minilm_half(False, n), None), minilm_score, "cosine", (512, 96),
        presets=("int8", "int4"),
        targets={
            "int8": (Target("cosine", True, 0.99), Target("nn_agreement", True, 0.97), Target("speedup", True, 2.0)),
            "int4": (Target("size_ratio", False, 0.2), Target("cosine", True, 0.98)),
        },
        budget=minilm_budget,
    ),
}


# --- variants ----------------------------------------------------------------------------------------

@dataclass
class Variant:
    label: str
    family: str  # fp32 | ort | ort-grid | graphopt
    config: dict = field(default_factory=dict)
    model: onnx.ModelProto | None = None
    seconds: float = 0.0
    cpu_seconds: float = 0.0
    error: str = ""
    size_bytes: int | None = None
    metrics: dict = field(default_factory=dict)
    median_ms: float | None = None
    notes: list[str] = field(default_factory=list)
    report: Report | None = None  # graphopt's per-pass report

    def as_dict(self) -> dict:
        keep = ("label", "family", "config", "seconds", "cpu_seconds", "error", "size_bytes", "metrics", "median_ms", "notes")
        return {k: getattr(self, k) for k in keep} | ({"graphopt_report": self.report.to_dict()} if self.report else {})


def build(variant: Variant, make: Callable[[], onnx.ModelProto]) -> Variant:
    """Run `make`, timing it; a failure is recorded in `error` and leaves no model."""
    start, cpu_start = time.perf_counter(), time.process_time()
    try:
        variant.model = make()
    except Exception as exc:  # a quantizer may fail in any way; the table records it and the others go on
        variant.model, variant.error = None, f"{type(exc).__name__}: {_first_line(exc)}"
    variant.seconds, variant.cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    return variant


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else ""


# --- onnxruntime.quantization (imported here only, to compare against) --------------------------------

@dataclass(frozen=True)
class OrtConfig:
    mode: str  # static | dynamic | int4
    per_channel: bool = False
    activation: str = "S8"  # static only: U8 | S8
    calibrate: str = "MinMax"  # static only: MinMax | Percentile | Entropy
    preprocess: bool = False
    default: bool = False  # the call with no options at all

    @property
    def label(self) -> str:
        if self.default:
            return f"ort {self.mode} default"
        if self.mode == "int4":
            return "ort int4 MatMulNBits"
        parts = [f"ort {self.mode}", "per-channel" if self.per_channel else "per-tensor"]
        if self.mode == "static":
            parts += [self.activation, self.calibrate]
        return " ".join(parts + (["pre"] if self.preprocess else []))


class FeedReader:
    """onnxruntime's CalibrationDataReader protocol over a list of feeds (with set_range for strided
    calibration, which keeps onnxruntime from holding every sample's activations at once)."""

    def __init__(self, feeds: list[Feed], names: set[str]):
        self.feeds = [{k: v for k, v in f.items() if k in names} for f in feeds]
        self.set_range(0, len(self.feeds))

    def __len__(self) -> int:
        return len(self.feeds)

    def set_range(self, start_index: int, end_index: int) -> None:
        self._pending = iter(self.feeds[start_index:end_index])

    def get_next(self) -> Feed | None:
        return next(self._pending, None)


def ort_quantize(config: OrtConfig, source: Path, calibration: list[Feed], workdir: Path, notes: list[str]) -> onnx.ModelProto:
    """onnxruntime's quantizer with `config`, run inside `workdir` (its shape inference leaves temporary
    files in the working directory)."""
    with contextlib.chdir(workdir), warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")  # its zero-point arithmetic warns on all-zero ranges, per tensor
        return _ort_quantize(config, source, calibration, workdir, notes)


def _ort_quantize(config: OrtConfig, source: Path, calibration: list[Feed], workdir: Path, notes: list[str]) -> onnx.ModelProto:
    from onnxruntime import quantization as q
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if config.preprocess:
        prepared = workdir / "pre.onnx"
        try:
            quant_pre_process(str(source), str(prepared))
        except Exception as exc:  # symbolic shape inference gives up on some dynamic shapes; users then skip it
            notes.append(f"pre-processed without symbolic shapes ({_first_line(exc)})")
            quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
        source = prepared
    out = workdir / "out.onnx"
    if config.mode == "int4":
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        quantizer = MatMulNBitsQuantizer(graphopt.load(source), block_size=32, is_symmetric=True)
        quantizer.process()
        return quantizer.model.model
    if config.mode == "dynamic":
        kwargs = {} if config.default else {"per_channel": config.per_channel}
        q.quantize_dynamic(str(source), str(out), **kwargs)
    else:
        names = {i.name for i in graphopt.load(source).graph.input}
        stride = next(s for s in (8, 4, 2, 1) if len(calibration) % s == 0)
        kwargs = {"extra_options": {"CalibStridedMinMax": stride}}
        if not config.default:
            kwargs |= {
                "per_channel": config.per_channel,
                "activation_type": q.QuantType.QUInt8 if config.activation == "U8" else q.QuantType.QInt8,
                "calibrate_method": getattr(q.CalibrationMethod, config.calibrate),
            }
        q.quantize_static(str(source), str(out), FeedReader(calibration, names), **kwargs)
    return graphopt.load(out)


DEFAULT_EQUIVALENTS = (OrtConfig("static"), OrtConfig("dynamic"))  # what the default calls run


def ort_grid(quick: bool, with_int4: bool) -> tuple[list[OrtConfig], list[OrtConfig]]:
    """(grid points besides the defaults, calibration methods to try on the best static point so far)."""
    if quick:
        first = [OrtConfig("static", pc, "U8", preprocess=True) for pc in (False, True)] + [OrtConfig("dynamic", True, preprocess=True)]
        return first + ([OrtConfig("int4")] if with_int4 else []), []
    first = [OrtConfig("static", pc, act, preprocess=pre) for pre in (False, True) for pc in (False, True) for act in ("U8", "S8")]
    first += [OrtConfig("dynamic", pc, preprocess=pre) for pre in (False, True) for pc in (False, True)]
    first = [c for c in first if c not in DEFAULT_EQUIVALENTS]
    return first + ([OrtConfig("int4")] if with_int4 else []), [OrtConfig("static", calibrate=c) for c in ("Percentile", "Entropy")]


# --- graphopt ----------------------------------------------------------------------------------------

def graphopt_plans(preset: str) -> tuple[list[tuple[str, dict]], str]:
    """(label, optimize() keyword arguments) per graphopt row for `preset`, and a note when the preset does
    not exist yet and registered passes stand in (or nothing can)."""
    if preset in presets():
        return [(f"graphopt {preset}", {"preset": preset})], ""
    known = registry()
    stand_ins = [p for p in FALLBACK_PASSES[preset] if p in known]
    if not stand_ins:
        return [], f"graphopt {preset}: no preset {preset!r} and none of {', '.join(FALLBACK_PASSES[preset])} registered; rows skipped"
    lossless = presets()["lossless"]
    plans = [(f"graphopt {p}", {"passes": [*lossless, p]}) for p in stand_ins]
    return plans, f"graphopt {preset}: no preset {preset!r} yet; lossless + {', '.join(stand_ins)} instead"


def graphopt_quantize(variant: Variant, original: onnx.ModelProto, calibration: list[Feed], threads: int, kwargs: dict, work: Workload) -> onnx.ModelProto:
    """graphopt.optimize on the calibration feeds (it splits them itself: the first half calibrates, the
    second validates the budget), with the workload's task budget; the scored feeds stay unseen."""
    labels, budget = work.budget(calibration, variant.config["preset"]) if work.budget else (None, None)
    feeds = FeedSet(calibration, labels, f"{len(calibration)} calibration feeds")
    result = graphopt.optimize(original, data=feeds, max_feeds=len(calibration), threads=threads, budget=budget, **kwargs)
    variant.report = result.report
    lossless = set(presets()["lossless"])
    said: dict[str, object] = {}  # per pass outside the lossless list: the round where it did something, else its last
    for r in result.report.records:
        if r.name not in lossless and (r.status != "no change" or r.name not in said):
            said[r.name] = r
    variant.notes += [f"{r.name}: {r.status}{': ' + r.reason if r.reason else ''}" for r in said.values()]
    return result.model


# --- measuring ---------------------------------------------------------------------------------------

def outputs_of(variant: Variant, feeds: list[Feed], threads: int) -> list[dict] | None:
    """Outputs on the scored feeds at onnxruntime level `all` (None and `error` set if it cannot run).
    MiniLM's attention mask rides along under `__mask` for pooling."""
    try:
        outs = runtime.run_all(variant.model, feeds, runtime.RuntimeSettings(level=SCORING, threads=threads), what=variant.label)
    except graphopt.UserError as exc:
        variant.error = f"invalid: {str(exc).removeprefix(f'onnxruntime cannot load {variant.label}: ')}"
        return None
    for out, feed in zip(outs, feeds):
        if "attention_mask" in feed:
            out["__mask"] = feed["attention_mask"]
    return outs


def score(variant: Variant, work: Workload, feeds: list[Feed], truth, reference: list[dict], base: Variant | None, threads: int) -> None:
    if variant.model is None:
        return
    variant.size_bytes = variant.model.ByteSize()
    outs = outputs_of(variant, feeds, threads)
    if outs is None:
        variant.model = None
        return
    variant.metrics = work.score(outs, reference, truth)
    if base is not None:
        variant.metrics["size_ratio"] = variant.size_bytes / base.size_bytes
        if "char_accuracy" in variant.metrics:
            variant.metrics["drop_points"] = 100.0 * (base.metrics["char_accuracy"] - variant.metrics["char_accuracy"])


def time_variants(timed: list[Variant], feeds: list[Feed], threads: int, rounds: int) -> None:
    timings = bench.bench([(v.label, v.model) for v in timed], feeds, threads=threads, level="all", rounds=rounds)
    for v, t in zip(timed, timings):
        v.median_ms = t.median_ms
        v.metrics["latency_ratio"] = t.ratio
        v.metrics["speedup"] = 1.0 / t.ratio if t.ratio > 0 else float("nan")


def run_workload(work: Workload, args: argparse.Namespace) -> dict:
    path = work.path()
    original = graphopt.load(path)
    scored_count = args.scored or work.counts[1 if args.quick else 0]
    calibration = work.calibration(args.calibration)
    feeds, truth = work.scored(scored_count)
    print(f"\n=== {work.name}: {path.name}; {len(calibration)} calibration feeds, {len(feeds)} scored feeds", flush=True)

    fp32 = Variant("fp32", "fp32", model=original)
    reference = outputs_of(fp32, feeds, args.threads)
    score(fp32, work, feeds, truth, reference, None, args.threads)
    fp32.metrics["size_ratio"] = 1.0
    if "char_accuracy" in fp32.metrics:
        fp32.metrics["drop_points"] = 0.0
    variants = [fp32]
    notes = []

    def add(variant: Variant, make: Callable[[], onnx.ModelProto]) -> Variant:
        build(variant, make)
        score(variant, work, feeds, truth, reference, fp32, args.threads)
        print(f"  {variant.label}: {_metrics_line(variant, work)} ({variant.seconds:.1f} s){'  ' + variant.error if variant.error else ''}", flush=True)
        variants.append(variant)
        return variant

    add(Variant("fp32 clean", "fp32"), lambda: graphopt.optimize(original, data=FeedSet(calibration, None, "calibration"), max_feeds=len(calibration), threads=args.threads).model)
    with tempfile.TemporaryDirectory(prefix="graphopt-bench-") as tmp:
        workdir = Path(tmp)

        def ort(config: OrtConfig) -> Variant:
            variant = Variant(config.label, "ort" if config.default else "ort-grid", vars(config))
            return add(variant, lambda: ort_quantize(config, path, calibration, workdir, variant.notes))

        first, calibrators = ort_grid(args.quick, "int4" in work.presets)
        configs = [OrtConfig("static", default=True), OrtConfig("dynamic", default=True), *first]
        ort_rows = [ort(c) for c in configs]
        statics = [(v, c) for v, c in zip(ort_rows, configs) if c.mode == "static" and v.model is not None]
        if statics and calibrators:
            _, best = max(statics, key=lambda vc: vc[0].metrics[work.primary])
            for method in calibrators:
                c = OrtConfig("static", best.per_channel, best.activation, method.calibrate, best.preprocess)
                ort_rows.append(ort(c))
    int8_rows = [v for v in ort_rows if v.model is not None and v.config.get("mode") != "int4"]
    if int8_rows:
        best = max(int8_rows, key=lambda v: v.metrics[work.primary])
        best.family = "ort"
        best.notes.append(BEST_NOTE)
    for preset in work.presets:
        plans, note = graphopt_plans(preset)
        if note:
            print(f"  {note}", flush=True)
            notes.append(note)
        if args.keep_float:
            plans += [(f"{label} keep-float", {**kwargs, "keep_float": args.keep_float}) for label, kwargs in plans]
        for label, kwargs in plans:
            v = Variant(label, "graphopt", {"preset": preset, **kwargs})
            add(v, lambda v=v, kwargs=kwargs: graphopt_quantize(v, original, calibration, args.threads, kwargs, work))

    timed = [v for v in variants if v.model is not None and (v.family in ("fp32", "ort", "graphopt") or v.config.get("mode") == "int4")]
    print(f"  timing {len(timed)} variants, {args.rounds} interleaved rounds, threads {args.threads} ...", flush=True)
    time_variants(timed, feeds[: args.timing_feeds], args.threads, args.rounds)
    load = os.getloadavg()[0]
    print(f"\n{work.name}: quality on {len(feeds)} scored samples, latency from one interleaved run ({args.rounds} rounds, ORT level all, threads {args.threads}, load average {load:.1f})")
    print(format_table(variants, work))
    verdicts = check_targets(variants, work)
    for line in verdicts:
        print("  " + line)
    for v in variants:
        if v.family == "graphopt" and v.report is not None:
            print(f"\n{v.label} report ({work.name}), as the command line prints it:\n{v.report.summary()}")
    for v in variants:
        v.model = None
    return {
        "model": work.name, "path": str(path), "calibration_feeds": len(calibration), "scored_feeds": len(feeds),
        "rounds": args.rounds, "threads": args.threads, "load_average": load, "notes": notes, "targets": verdicts,
        "variants": [v.as_dict() for v in variants],
    }


def _metrics_line(v: Variant, work: Workload) -> str:
    return ", ".join(f"{k} {x:.4f}" for k, x in v.metrics.items() if k not in ("size_ratio", "detections")) or "-"


def check_targets(variants: list[Variant], work: Workload) -> list[str]:
    lines = []
    for v in variants:
        if v.family != "graphopt":
            continue
        for target in work.targets.get(v.config["preset"], ()):
            met = target.met(v.metrics)
            got = v.metrics.get(target.metric)
            state = "n/a" if met is None else "met" if met else "MISSED"
            lines.append(f"{v.label}: {target} -> {'-' if got is None else f'{got:.4g}'} {state}")
    return lines


QUALITY_COLUMNS = {
    "ppocr-rec": (("char_accuracy", "char acc", "{:.2%}"), ("drop_points", "drop pts", "{:+.2f}"), ("lines_exact", "lines exact", "{:.1%}")),
    "yolov8n": (("f1", "F1 vs fp32", "{:.3f}"), ("detections", "detections", "{:.0f}")),
    "captcha": (("char_accuracy", "char acc", "{:.2%}"), ("drop_points", "drop pts", "{:+.2f}"), ("lines_exact", "captchas exact", "{:.1%}")),
    "minilm": (("cosine", "cosine", "{:.4f}"), ("min_cosine", "min cosine", "{:.4f}"), ("nn_agreement", "NN agree", "{:.1%}")),
}


def format_table(variants: list[Variant], work: Workload) -> str:
    quality = QUALITY_COLUMNS[work.name]
    rows = [("variant", *(q[1] for q in quality), "median ms", "speed-up", "size", "size ratio", "quantize s", "cpu s", "note")]
    for v in variants:
        m = v.metrics
        rows.append((
            v.label + (" *" if BEST_NOTE in v.notes else ""),
            *(_fmt(m.get(key), spec) for key, _, spec in quality),
            _fmt(v.median_ms, "{:.2f}"),
            _fmt(m.get("speedup"), "{:.2f}x"),
            _fmt(v.size_bytes and v.size_bytes / 2**20, "{:.2f} MB"),
            _fmt(m.get("size_ratio"), "{:.3f}"),
            "" if v.label == "fp32" else f"{v.seconds:.1f}",
            "" if v.label == "fp32" else f"{v.cpu_seconds:.1f}",
            _short("; ".join([v.error] * bool(v.error) + [n for n in v.notes if n != BEST_NOTE])),
        ))
    return table(rows) + "\n(* = onnxruntime's best setting by " + work.primary + "; speed-up = 1 / the median of per-round latency ratios to fp32)"


def _short(text: str, limit: int = 110) -> str:
    """Notes cut for the table (the JSON keeps them whole)."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _fmt(value, spec: str) -> str:
    return "-" if value is None else spec.format(value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=sorted(WORKLOADS), default=list(WORKLOADS), help="which models (default: all)")
    parser.add_argument("--quick", action="store_true", help="smoke run: fewer scored samples, a smaller onnxruntime grid")
    parser.add_argument("--calibration", type=int, default=64, help="calibration feeds, the same for every quantizer (default 64)")
    parser.add_argument("--scored", type=int, default=0, help="scored samples per model (default: 256 lines, 64 images, 200 captchas, 512 sentences; --quick 64, 24, 64, 96)")
    parser.add_argument("--rounds", type=int, default=50, help="interleaved timing rounds (default 50)")
    parser.add_argument("--timing-feeds", type=int, default=8, help="scored feeds cycled through by the timing (default 8)")
    parser.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads for scoring and timing (default 2)")
    parser.add_argument("--keep-float", metavar="REGEX", default="", help="also run each graphopt preset with these nodes left float (optimize's keep_float), as a row of its own")
    parser.add_argument("--json", metavar="OUT", default=str(DEFAULT_JSON), help=f"write the results as JSON (default {DEFAULT_JSON})")
    args = parser.parse_args(argv)
    if Path(args.json).resolve().parent == DEFAULT_JSON.parent:
        DEFAULT_JSON.parent.mkdir(exist_ok=True)  # ignored by git, so absent from a fresh clone
    elif not Path(args.json).parent.is_dir():
        parser.error(f"--json {args.json}: folder {Path(args.json).parent} does not exist")  # before the 20-minute run, not after
    logging.getLogger().setLevel(logging.ERROR)  # onnxruntime.quantization's advice to pre-process, per call
    onnxruntime.set_default_logger_severity(3)  # its calibration sessions' warnings, per run (ddddocr declares a wrong output shape)
    if args.quick:
        args.calibration = min(args.calibration, 16)
        args.rounds = min(args.rounds, 20)
    results = [run_workload(WORKLOADS[name], args) for name in args.models]
    write_text(args.json, json.dumps({"args": vars(args), "models": results}, indent=2, default=str) + "\n")
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
