"""What a tighter accuracy budget costs in speed: MiniLM with quantize-dynamic at several budgets.

Issue 3 asks MiniLM int8 for pooled-embedding cosine >= 0.99, nearest-neighbour agreement >= 97% and 2x
speed at once. This shows how far the budget mechanism gets towards the agreement target: for each allowed
drop of the pooled cosine (the task budget of benchmarks/quantize.py, judged on the held-out half of 64
calibration sentences), graphopt.optimize runs quantize-dynamic alone, which returns the most sensitive
MatMuls to float until the budget holds, and the pipeline keeps the result only when it times faster.
Each result is scored on the 512 sentences of the second half of minilm_sentences.npz (cosine, worst
cosine, nearest-neighbour agreement vs fp32, at onnxruntime level all) and timed against fp32 in one
interleaved run.

    python benchmarks/budget_tradeoff.py                         # drops 0.01 .. 0.0005
    python benchmarks/budget_tradeoff.py --drops 0.01 0.001 --rounds 100
    python benchmarks/budget_tradeoff.py --fused                 # clean-up first, fuse-attention after
    python benchmarks/budget_tradeoff.py --fused --sensitivity model   # fallback ranked by the model's output

With --fused, the lossless clean-up runs before quantize-dynamic and fuse-attention after it, as in the int8
preset, so the speed-up includes the attention fusion (the accuracy cost is the quantization's alone).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import graphopt
from graphopt import bench
from graphopt.data import FeedSet
from graphopt.passes import RUNTIME_FUSIONS
from graphopt.passes_base import presets
from graphopt.report import table

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quantize  # noqa: E402  (benchmarks/ is not a package)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--drops", nargs="+", type=float, default=[0.01, 0.005, 0.002, 0.001, 0.0005])
    parser.add_argument("--calibration", type=int, default=64)
    parser.add_argument("--scored", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--fused", action="store_true", help="run the lossless preset before quantize-dynamic and fuse-attention after it")
    parser.add_argument("--sensitivity", choices=["layer", "model"], default="layer", help="how quantize-dynamic ranks MatMuls for the fallback")
    args = parser.parse_args(argv)
    dynamic = f"quantize-dynamic:sensitivity={args.sensitivity}"
    passes = [*presets()["lossless"], dynamic, *RUNTIME_FUSIONS] if args.fused else [dynamic]

    work = quantize.WORKLOADS["minilm"]
    original = graphopt.load(work.path())
    calibration = work.calibration(args.calibration)
    feeds, truth = work.scored(args.scored)
    labels, budget = work.budget(calibration, "int8")
    fp32 = quantize.Variant("fp32", "fp32", model=original)
    reference = quantize.outputs_of(fp32, feeds, args.threads)
    quantize.score(fp32, work, feeds, truth, reference, None, args.threads)

    variants = []
    for drop in args.drops:
        variant = quantize.Variant(f"drop {drop:g}", "graphopt", {"max_drop": drop})
        quantize.build(variant, lambda: _quantized(original, passes, calibration, labels, dataclasses.replace(budget, max_drop=drop), args.threads, variant))
        quantize.score(variant, work, feeds, truth, reference, fp32, args.threads)
        print(f"  {variant.label}: {variant.config} ({variant.seconds:.1f} s) {variant.metrics}", flush=True)
        variants.append(variant)

    timed = [v for v in variants if v.model is not None]
    timings = bench.bench([("fp32", original)] + [(v.label, v.model) for v in timed], feeds[:8], threads=args.threads, rounds=args.rounds)
    speed = {t.label: 1.0 / t.ratio for t in timings[1:]}
    rows = [("allowed cosine drop", "MatMuls int8", "cosine", "min cosine", "NN agreement", "speed-up vs fp32", "seconds")]
    for v in variants:
        m = v.metrics
        rows.append((
            f"{v.config['max_drop']:g}", str(v.config.get("quantized", "-")), f"{m.get('cosine', float('nan')):.5f}", f"{m.get('min_cosine', float('nan')):.4f}",
            f"{m.get('nn_agreement', float('nan')):.1%}", f"{speed.get(v.label, float('nan')):.2f}x", f"{v.seconds:.0f}",
        ))
    print(table(rows))
    return 0


def _quantized(original, passes, calibration, labels, budget, threads, variant):
    """`passes` (ending with quantize-dynamic) under `budget`; records in variant.config how many MatMuls stayed int8."""
    result = graphopt.optimize(original, passes, data=FeedSet(calibration, labels, "calibration"), max_feeds=len(calibration), threads=threads, budget=budget)
    record = next(r for r in result.report.records if r.name == "quantize-dynamic")
    variant.config["quantized"] = record.counts.get("nodes_quantized", 0) if record.status == "applied" else f"0 ({record.status}: {record.reason[:70]})"
    return result.model


if __name__ == "__main__":
    sys.exit(main())
