"""Where the time goes: onnxruntime's kernel time per op type, fp32 (after the lossless clean-up) against
graphopt's preset output, from one per-node profile with the two models run in turn
(graphopt.profiling.node_times, level all).

It answers what quantization can still win on a model: the integer kernels replace only the matrix
products (Conv, MatMul, Gemm, LSTM and their fusions); everything else (attention glue, normalization,
activations, data movement) runs as before. A fused attention (MultiHeadAttention, from the presets'
fuse-attention) counts as matrix products: it is the fp32 side's two batched MatMuls plus the glue it
absorbed. The last lines give that split and the whole model's speed-up if the matrix products ran 2x
faster than fp32 with the rest unchanged.

The fp32 side is the lossless preset run on the calibration feeds, as quantize.py's "fp32 clean" row. It
validates on all of them, while the preset validates on its held-out half, so a clean-up step close to its
tolerance can be kept in one and not the other (PP-OCRv4 rec's BatchNorm folding: rolled back on 64 feeds).

    python benchmarks/op_profile.py --models minilm
    python benchmarks/op_profile.py --models ppocr-rec yolov8n captcha minilm --preset int8 --rounds 20
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import graphopt
from graphopt import profiling
from graphopt.data import FeedSet
from graphopt.report import table
from graphopt.runtime import RuntimeSettings

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quantize  # noqa: E402  (benchmarks/ is not a package)

MATRIX_PRODUCTS = frozenset(
    {"Conv", "ConvTranspose", "MatMul", "Gemm", "FusedMatMul", "FusedConv", "FusedGemm", "NchwcConv", "LSTM", "GRU", "RNN", "Attention", "MultiHeadAttention"}
    | {"QLinearConv", "QLinearMatMul", "QGemm", "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "DynamicQuantizeLSTM", "MatMulNBits", "MatMulInteger", "ConvInteger", "QAttention"}
)


def by_op_type(times: list[profiling.NodeTime]) -> dict[str, tuple[float, int]]:
    ms: dict[str, float] = defaultdict(float)
    count: dict[str, int] = defaultdict(int)
    for t in times:
        ms[t.op_type] += t.ms
        count[t.op_type] += 1
    return {op: (ms[op], count[op]) for op in ms}


def profile(name: str, preset: str, calibration_count: int, feeds_count: int, rounds: int, threads: int) -> None:
    work = quantize.WORKLOADS[name]
    original = graphopt.load(work.path())
    calibration = work.calibration(calibration_count)
    clean = graphopt.optimize(original, data=FeedSet(calibration, None, "calibration"), max_feeds=len(calibration), threads=threads).model
    variant = quantize.Variant(f"graphopt {preset}", "graphopt", {"preset": preset})
    quantized = quantize.graphopt_quantize(variant, original, calibration, threads, {"preset": preset}, work)
    feeds = work.scored(feeds_count)[0]
    settings = RuntimeSettings(level="all", threads=threads, memory_arena=True)
    fp32, ours = (by_op_type(p) for p in profiling.node_times([clean, quantized], feeds, settings, rounds=rounds))
    total = [sum(ms for ms, _ in p.values()) for p in (fp32, ours)]
    rows = []
    for op in sorted(set(fp32) | set(ours), key=lambda o: -max(fp32.get(o, (0, 0))[0], ours.get(o, (0, 0))[0])):
        cells = []
        for p, whole in zip((fp32, ours), total):
            ms, count = p.get(op, (0.0, 0))
            cells += [f"{ms:.3f}" if count else "", f"{ms / whole:.1%}" if count else "", str(count) if count else ""]
        rows.append((op, *cells))
    print(f"\n=== {name}: kernel ms per run, {len(feeds)} scored feeds x {rounds} rounds, threads {threads}")
    print(table([("op type", "fp32 ms", "share", "nodes", f"{preset} ms", "share", "nodes"), *rows]))
    for label, p, whole in (("fp32", fp32, total[0]), (preset, ours, total[1])):
        products = sum(ms for op, (ms, _) in p.items() if op in MATRIX_PRODUCTS)
        print(f"{label}: {whole:.3f} ms in kernels, matrix products {products:.3f} ms ({products / whole:.1%}), the rest {whole - products:.3f} ms")
    products = sum(ms for op, (ms, _) in fp32.items() if op in MATRIX_PRODUCTS)
    print(f"kernel-time ratio fp32 / {preset}: {total[0] / total[1]:.2f}x; with fp32's matrix products 2x faster and the rest unchanged: {total[0] / (total[0] - products / 2):.2f}x")
    for note in variant.notes:
        print(f"  {note}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["minilm"], choices=list(quantize.WORKLOADS))
    parser.add_argument("--preset", default="int8", choices=["int8", "int4"])
    parser.add_argument("--calibration", type=int, default=64, help="calibration feeds given to graphopt (default 64)")
    parser.add_argument("--feeds", type=int, default=8, help="scored feeds profiled (default 8)")
    parser.add_argument("--rounds", type=int, default=10, help="passes over the feeds (default 10)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    for name in args.models:
        profile(name, args.preset, args.calibration, args.feeds, args.rounds, args.threads)


if __name__ == "__main__":
    main()
