"""`graphopt optimize | inspect | bench | compare | passes | demo`, a thin layer over the API.

Exit codes: 0 done; 2 bad input (a file, a feed, an option: the message says what to do); 1 a graphopt
failure. `optimize` writes the output model (and report) only when everything succeeded.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from importlib import resources
from pathlib import Path

from graphopt import api, bench, data, inspect, model, randomness, runtime, validate
from graphopt.errors import UserError
from graphopt.passes_base import presets, registry
from graphopt.report import table

EXIT_USER_ERROR = 2
EXIT_FAILURE = 1


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.handler(args)
    except UserError as exc:
        print(f"graphopt {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("graphopt: interrupted; nothing was written", file=sys.stderr)
        return 130
    except Exception as exc:
        print(f"graphopt {args.command}: failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_FAILURE


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="graphopt", description="Make ONNX models smaller and faster; every rewrite is validated with onnxruntime.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("optimize", help="run passes on a model, validating each one")
    p.add_argument("model", help="input .onnx")
    p.add_argument("-o", "--output", required=True, help="output .onnx (written only on success)")
    p.add_argument("--preset", default=None, help=f"pass list to run (default lossless); one of: {', '.join(presets())}")
    p.add_argument("--passes", default=None, help="comma-separated pass names, each optionally NAME:KEY=VALUE:...; overrides --preset")
    p.add_argument("--report", help="write the JSON report here")
    p.add_argument("--markdown", help="write the pass table as markdown here")
    p.add_argument("--max-feeds", type=int, default=16, help="use at most this many feeds of --data, and of --val (default 16); with lossy passes and no --val, the first half calibrates and the second validates")
    p.add_argument("--no-fixed-point", action="store_true", help="run the pass list once instead of until nothing changes")
    p.add_argument("--external-data", choices=("auto", "yes", "no"), default="auto", help="auto: external data past 2 GB or when the input used it")
    p.add_argument("--force", action="store_true", help="allow the output to overwrite the input")
    p.add_argument("--strict-rounding", action="store_true", help="hold lossless passes to the fixed float tolerance even where onnxruntime's own optimizations differ by more")
    p.add_argument("--metric", help="MODULE:FUNCTION called as f(outputs, labels) -> float (higher is better), reported before and after; `accuracy` for argmax accuracy")
    p.add_argument("--max-drop", type=float, help="with --metric and labelled feeds: lossy passes may lower the metric by at most this much (replaces the fidelity floors)")
    p.add_argument("--min-fidelity", default="", help="fidelity floors of lossy passes vs the original, per output: cosine=0.99,top1=0.99,rel=0.05 or OUTPUT:KEY=VALUE (default cosine=0.99,top1=0.99)")
    p.add_argument("--val", help="held-out validation feeds (.npz or folder); default: the second half of --data")
    p.add_argument("--latency-rounds", type=int, default=30, help="interleaved runs per model when a pass's speed or size claim is timed (default 30)")
    p.add_argument("--keep-float", default="", help="regular expression searched in node names: the nodes it matches stay float in every quantize pass, e.g. '^/model\\.0/'")
    p.add_argument("--no-latency-guard", action="store_true", help="keep passes that claim speed or size without timing them here (this machine is not the deployment target)")
    _feed_args(p)
    p.set_defaults(handler=_optimize)

    p = sub.add_parser("inspect", help="opsets, inputs, op counts, parameters, duplicates, MACs")
    p.add_argument("model")
    p.add_argument("--shape", action="append", help="NAME=DIMS pin for MACs: input name (images=1x3x224x224) or symbolic dim name (seq=128)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(handler=_inspect)

    p = sub.add_parser("bench", help="onnxruntime latency, models interleaved")
    p.add_argument("models", nargs="+")
    p.add_argument("--rounds", type=int, default=50)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--level", choices=list(runtime.LEVELS), default="all", help="onnxruntime graph optimization level (default all)")
    p.add_argument("--json", action="store_true")
    _feed_args(p)
    p.set_defaults(handler=_bench)

    p = sub.add_parser("compare", help="output differences between two models")
    p.add_argument("reference")
    p.add_argument("candidate")
    p.add_argument("--max-feeds", type=int, default=64)
    p.add_argument("--json", action="store_true")
    _feed_args(p)
    p.set_defaults(handler=_compare)

    p = sub.add_parser("passes", help="list the registered passes")
    p.set_defaults(handler=_passes)

    p = sub.add_parser("demo", help="optimize the embedded digits CNN and show accuracy before and after")
    p.add_argument("-o", "--output", help="also save the optimized demo model here")
    p.set_defaults(handler=_demo)
    return parser


def _feed_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", help=".npz (arrays named after the inputs, optional `labels`) or a folder of them; default: synthesized feeds")
    p.add_argument("--shape", action="append", help="NAME=DIMS for synthesized feeds: input name (images=1x3x224x224) or symbolic dim name (seq=128)")
    p.add_argument("--batch", type=int, default=1, help="samples per feed when arrays are stacked along the batch axis (default 1)")
    p.add_argument("--ignore-array", action="append", default=[], help="an array of the .npz that is not a model input (e.g. text)")
    p.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (default: onnxruntime's choice)")


def _feeds(args, m, path: str | None = None) -> data.FeedSet:
    return data.feed_set(path or args.data, m, count=8, shapes=data.parse_shapes(args.shape), batch=args.batch, ignore=tuple(args.ignore_array))


def _budget(args, metric) -> validate.Budget:
    overall, per_output = validate.parse_fidelity(args.min_fidelity)
    budget = validate.Budget(per_output=per_output)
    for key, attr in (("cosine", "min_cosine"), ("top1", "min_top1"), ("rel", "max_rel")):
        if key in overall:
            setattr(budget, attr, overall[key])
    if args.max_drop is not None:
        if metric is None:
            raise UserError("--max-drop needs --metric (the task metric whose drop it bounds)")
        budget.metric, budget.max_drop = metric, args.max_drop
    return budget


def _optimize(args) -> int:
    source = Path(args.model)
    if Path(args.output).exists() and Path(args.output).resolve() == source.resolve() and not args.force:
        raise UserError(f"{args.output} is the input model; choose another output path (or pass --force to overwrite it)")
    m, info = model.load_with_info(source)
    metric = _metric(args.metric)
    result = api.optimize(
        m,
        passes=args.passes,
        preset=args.preset,
        data=_feeds(args, m),
        val=_feeds(args, m, args.val) if args.val else None,
        max_feeds=args.max_feeds,
        threads=args.threads,
        metric=metric,
        budget=_budget(args, metric),
        fixed_point=not args.no_fixed_point,
        rounding_floor=not args.strict_rounding,
        bench_rounds=args.latency_rounds,
        latency_guard=not args.no_latency_guard,
        keep_float=args.keep_float,
    )
    external = {"auto": True if info.external_data else None, "yes": True, "no": False}[args.external_data]
    model.save(result.model, args.output, external_data=external, source=source, force=args.force)
    if args.report:
        model.write_text(args.report, result.report.to_json())
    if args.markdown:
        model.write_text(args.markdown, result.report.to_markdown() + "\n")
    print(result.report.summary())
    print(f"wrote {args.output}")
    return 0


def _metric(spec: str | None):
    if not spec:
        return None
    if spec == "accuracy":
        return api.accuracy
    module, _, name = spec.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as exc:
        raise UserError(f"--metric {spec!r}: cannot import it ({exc}); give MODULE:FUNCTION importable from here") from None


def _inspect(args) -> int:
    m, info = model.load_with_info(args.model)
    details = inspect.inspect_model(m, file_size=info.total_size, external_data=list(info.external_data), shapes=data.parse_shapes(args.shape))
    print(json.dumps(details, indent=2) if args.json else inspect.format_inspect(details))
    return 0


def _bench(args) -> int:
    loaded = [(path, model.load(path)) for path in args.models]
    feeds = _feeds(args, loaded[0][1])
    with data.explaining(feeds):
        timings = bench.bench(loaded, feeds.feeds, threads=args.threads, level=args.level, warmup=args.warmup, rounds=args.rounds)
    if args.json:
        print(json.dumps([t.as_dict() for t in timings], indent=2))
    else:
        print(f"{len(feeds.feeds)} feeds ({feeds.source}), {args.rounds} interleaved rounds, level {args.level}, threads {args.threads or 'default'}")
        print(bench.format_timings(timings))
    return 0


def _compare(args) -> int:
    ref_model, ref_note = randomness.as_deployed(model.load(args.reference), args.reference)
    cand_model, cand_note = randomness.as_deployed(model.load(args.candidate), args.candidate)
    for note in filter(None, (ref_note, cand_note)):
        print(f"note: {note}", file=sys.stderr)
    given = _feeds(args, ref_model)
    feeds = given.feeds[: args.max_feeds]
    settings = runtime.RuntimeSettings(level="disable_all")
    with data.explaining(given):
        ref = runtime.run_all(ref_model, feeds, settings, what=args.reference)
        cand = runtime.run_all(cand_model, feeds, settings, what=args.candidate)
    diffs = validate.compare(ref, cand)
    if args.json:
        print(json.dumps({k: v.as_dict() for k, v in diffs.items()}, indent=2))
        return 0
    rows = [("output", "max abs", "max rel", "cosine", "top-1", "note")]
    for d in diffs.values():
        rows.append((d.name, f"{d.max_abs:.3g}", f"{d.max_rel:.3g}", _opt(d.cosine), _opt(d.top1), d.shape_mismatch or ("NaNs differ" if d.nan_mismatch else "")))
    print(f"{len(feeds)} feeds ({_feeds_source(args)})")
    print(table(rows))
    return 0


def _feeds_source(args) -> str:
    return args.data or "synthesized"


def _opt(x) -> str:
    return "-" if x is None else f"{x:.6f}"


def _passes(args) -> int:
    rows = [("pass", "kind", "description")]
    rows += [(name, "lossless" if cls.lossless else "lossy", cls.description) for name, cls in sorted(registry().items())]
    print(table(rows))
    for name, names in presets().items():
        print(f"\npreset {name}: {', '.join(names)}")
    return 0


def _demo(args) -> int:
    folder = resources.files("graphopt.demo")
    with resources.as_file(folder / "digits_cnn.onnx") as model_path, resources.as_file(folder / "digits_test.npz") as data_path:
        m = model.load(model_path)
        feeds = data.load_feeds(data_path, m)
        print(f"demo: digits CNN ({model_path.stat().st_size / 1024:.1f} KB), {len(feeds.feeds)} held-out test images (scikit-learn digits)")
        result = api.optimize(m, data=feeds, max_feeds=len(feeds.feeds), metric=api.accuracy)
    print(result.report.summary())
    timings = bench.bench([("original", m), ("optimized", result.model)], feeds.feeds[:32], rounds=300)
    print(
        f"latency (onnxruntime, interleaved, {len(timings[0].runs_ms)} runs each): medians {timings[0].median_ms:.4f} ms -> {timings[1].median_ms:.4f} ms; "
        f"ratio {timings[1].ratio:.2f}x (the median of each round's optimized / original run)"
    )
    if args.output:
        model.save(result.model, args.output)
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
