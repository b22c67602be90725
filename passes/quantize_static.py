"""quantize-static: static int8 QDQ around the nodes onnxruntime's CPU provider fuses into integer kernels.

Rewrites (main graph only):
  Conv(x, W, b) => DQ(Q(x)) -> Conv(DQ(W int8 per output channel, axis 0), DQ(b int32)) -> Q -> DQ  (QLinearConv)
  Gemm(x, B, C), alpha = beta = 1, transA = 0, C 1-D => the same with B's axis 0 (transB=1) or 1 (transB=0)  (QGemm)
  MatMul(x, W 2-D constant) => W per column (axis 1)  (QLinearMatMul);  MatMul(x, y) => both per tensor
  Add, Mul, Concat, Where, Sigmoid, LeakyRelu, AveragePool, GlobalAveragePool => Q/DQ on every float input
    and the output (QLinearAdd/Mul/Concat/Where/Sigmoid/LeakyRelu/AveragePool/GlobalAveragePool); a constant
    input becomes an integer initializer of the activation type with its own scale
  X -> Relu, X -> Clip(0, c) (the only reader of X's output) => the Q goes after the Relu/Clip and the range
    is calibrated there: the range starts at 0, so onnxruntime folds the Relu/Clip into the Q
  Reshape, Transpose, Flatten, Squeeze, Unsqueeze, MaxPool, Resize (nearest), Slice, Gather, Expand, Split,
    Identity between quantized tensors => their output gets a Q/DQ with their input's scale and zero point,
    so onnxruntime drops the pair and moves integers through them
Every quantized tensor gets one Q -> DQ pair that all its readers share (a graph output keeps its name: the
DQ writes it); a weight read by several quantized nodes is quantized once and has one DequantizeLinear.
A float Conv/ConvTranspose/Gemm reading a quantized tensor gets its own per-axis DequantizeLinear of it
(the same values): from the shared per-tensor one, onnxruntime would quantize it with per-tensor weights.
Weights are symmetric int8 (`per_channel`: one scale per output channel, else one per tensor) in 8 or 7
bits (`weight_bits`; 0 decides by measurement, see the guards), initializers or Constant nodes; activations asymmetric uint8 or int8 (`activations`); biases int32 with scale = input
scale x weight scale and zero point 0. Opsets below 13 are upgraded to 13 (per-axis DequantizeLinear).

Calibration: one streamed pass over the calibration feeds (graphopt.calibrate) for every tensor that gets its
own scale; `method` picks the range: minmax, percentile, entropy, mse, or auto (default: minmax and mse are
both tried, see the guards). No method wins everywhere: PP-OCRv4 rec with its 38 Convs quantized, softmax
cosine vs fp32 on 8 held-out text lines was 0.925 (minmax), 0.894 (percentile 99.999), 0.884 (mse), 0.745
(entropy), clipping hurts there; YOLOv8n, fully quantized, on 64 held-out images: box error vs fp32 2.57 px
and detection F1 0.83 with minmax, 1.69 px and 0.90 with mse (output cosine 0.99937 -> 0.99969). mse measures the error after the function the readers compute where that is one
Sigmoid or SiLU (reader_transfers, calibrate's `transfer`): a SiLU input is clipped where SiLU is flat.

Guards, on the calibration feeds (the pipeline then checks the held-out validation feeds and the latency),
with outputs run as the budget is judged (passes_base.BUDGET_SETTINGS: onnxruntime's integer kernels):
  range method and weight bits: with `method=auto` and `weight_bits=0`, the nodes the fusion and latency
    guards kept are quantized with minmax and with mse ranges, with 8- and with 7-bit weights, and the
    combination closest to the float outputs is kept (before the accuracy guard): on CPUs without VNNI
    onnxruntime's u8s8 kernels overflow int16 with 8-bit weights
  activation type: `activations=auto` builds uint8 and int8 models; the one onnxruntime fuses more of wins
    (on this AVX2 machine onnxruntime 1.32 fuses no int8-activation node with a non-zero zero point), a tie
    is timed (ctx.latency); the answer is cached in ctx.decisions["static-activation-type"] for the run
  fusion: onnxruntime's optimized graph (level all) is searched for DequantizeLinear -> op -> QuantizeLinear
    chains; a quantized node it did not fuse goes back to float, and so do the quantized readers of a float
    node caught between quantized tensors (reason "not fused"), until no chain is left
  accuracy (`fallback`): over budget, the quantized nodes are ranked by their local error (each node run
    alone on the float model's own activations with its inputs, weights and output quantized: normalized
    squared error, one onnxruntime run per feed for all nodes at once); the smallest number of the most
    sensitive ones to return to float is found by bisection (reason "sensitive"), judged against the
    budget; if even one quantized node breaks it the pass refuses. The margin for feeds the calibration
    never saw is the pipeline's: a result over budget on the validation feeds is fitted once more with
    half the allowed loss (fits_budget). Aiming at half the loss from the start returned 180 of the 262
    nodes of ddddocr's YOLOX detector (output cosine 0.9919 on the calibration feeds fully quantized, the
    bar 0.995), and quantize-int8 then rolled the remainder back as not faster; held to 0.99 it keeps all
    of them and holds on the validation feeds (1.89x)
  latency (`latency_fallback`): onnxruntime's per-node profile of the float and the quantized model (level
    all, ctx.threads); a Conv/Gemm/MatMul whose integer kernel plus the standalone QuantizeLinear and
    DequantizeLinear charged to it takes longer than the float node (plus its folded Relu/Clip) goes back
    to float (reason "slower"). NHWC layout Transposes are charged to no one. Add/Mul/Concat/Sigmoid/pooling
    nodes are not judged alone: between quantized neighbours their float version needs a DQ on each input
    and a Q after it (on YOLOv8n, returning the 31 Concat/Add nodes judged alone left 14 unfused chains).
    Names are mapped back as onnxruntime writes them: a fused kernel keeps the name of the node it
    replaces, the NHWC layout transformer appends `_token_<n>`; leftover Q/DQ nodes keep the names this
    pass gave them (`<tensor>_QuantizeLinear`), which say which tensor, hence which nodes.
    This guard runs before the accuracy guard (and again after it, when that returned nodes); then the
    model with every node it kept is timed against the float model (ctx.latency), and when its ratio is
    not below `max_latency_ratio` (1: faster) the pass refuses before any accuracy bisection, which only
    returns nodes to float.
  islands: after the other guards, a connected region of quantized nodes (joined by quantized tensors)
    without a quantized Conv/Gemm/MatMul goes back to float (reason "island"): bounded by float nodes, it
    only adds Q/DQ work
  `bias_correction`: each quantized Conv/Gemm bias is shifted by the mean per-channel output change that
    weight quantization causes, measured on the calibration feeds (a bias is added where there is none).

Kept float on request: nodes whose name `keep_float` (a regular expression) matches (reason "requested").
Refused (kept float, listed in details["kept_float"] with the reason "unsupported"):
  A Concat with an input spanning less than 1/16 of the output's range stays float (reason "sensitive";
  QLinearConcat would leave that input fewer than 16 levels).
  ConvTranspose (onnxruntime 1.32 has no QDQ fusion for it on CPU: measured), Gemm with alpha/beta != 1 or
  transA (not fused), Conv/Gemm/MatMul whose weight is computed or not float32, MatMul with a constant first
  input or a weight of rank > 2, Gemm with a 2-D C, nodes reading a tensor that is not floating point.
  Softmax, Resize (linear), Relu alone, Tanh, HardSigmoid, Sub, Div, Pad, ReduceMean, LayerNormalization:
  onnxruntime 1.32 runs them in float between a DQ and a Q (measured; QLinearSoftmax exists but is not in
  the shared table of fused ops), so they are not quantized. A model with nothing fusable is refused.
Subgraphs: nodes inside If/Loop/Scan bodies stay float (said in details["subgraphs"]); a body reading a
quantized tensor of the main graph reads its dequantized value.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper

from graphopt import calibrate, profiling, runtime
from graphopt.activations import cut_to, exposure_groups, exposure_limit
from graphopt.errors import PassError
from graphopt.graph import (
    NameGenerator,
    default_opset,
    attribute,
    consumers,
    copy_model,
    drop_unread,
    iter_graphs,
    output_names,
    producers,
    rename_node_reads,
)
from graphopt.passes_base import Pass, PassContext, PassResult, register
from graphopt.runtime import RuntimeSettings
from graphopt.passes import qdq

DECISION_KEY = "static-activation-type"
ACTIVATION_TYPES = {"uint8": np.uint8, "int8": np.int8}
# Which inputs of each fusable op are activations to quantize (None: all of them).
ACTIVATION_INPUTS: dict[str, tuple[int, ...] | None] = {
    "Conv": (0,),
    "Gemm": (0,),
    "MatMul": (0, 1),
    "Add": (0, 1),
    "Mul": (0, 1),
    "Concat": None,
    "Where": (1, 2),
    "Sigmoid": (0,),
    "LeakyRelu": (0,),
    "AveragePool": (0,),
    "GlobalAveragePool": (0,),
}
WEIGHTED = ("Conv", "Gemm", "MatMul")
BIAS_CORRECTED = ("Conv", "Gemm")
SENSITIVITY_FEEDS = 4
AUTO_METHODS = ("minmax", "mse")  # the range methods method=auto measures (percentile and entropy lost to them on PP-OCRv4 and YOLOv8n)
MAX_FUSION_ROUNDS = 20
CONCAT_MIN_SHARE = 16  # a Concat input must span at least 1/16 of the output's range (16 levels)
RANGES_SHOWN = 50
MAX_CONSTANT = 1e30  # beyond this a constant is a sentinel (a mask fill), not a value


@dataclass
class Unit:
    """A node to quantize (by its position in the main graph) and what it reads and writes."""

    index: int
    name: str
    op_type: str
    inputs: dict[int, str]  # input position -> activation tensor to quantize
    constants: dict[int, str] = field(default_factory=dict)  # input position -> constant quantized like an activation
    weight: str | None = None
    axis: int | None = None
    bias: str | None = None
    act: int | None = None  # position of a Relu/Clip folded into the output Q
    act_name: str = ""
    output: str = ""  # the tensor quantized after the node (after the Relu/Clip when folded)
    node_output: str = ""  # the node's own output (before the Relu/Clip)

    def tensors(self) -> list[str]:
        return list(dict.fromkeys([*self.inputs.values(), self.output]))


@dataclass
class Plan:
    """The float model prepared for quantization and what can be quantized in it."""

    model: onnx.ModelProto
    units: list[Unit]
    kept_float: list[dict]
    share: dict[str, str]  # data-movement output -> its input (same scale and zero point)
    constants: dict[str, np.ndarray]  # weights, biases and constant inputs by name
    _alone: dict[str, set[str]] = field(default_factory=dict)

    def tensors_alone(self, unit: Unit) -> set[str]:
        """The tensors quantized when `unit` alone is quantized (cached: it walks the graph)."""
        if unit.name not in self._alone:
            self._alone[unit.name] = set(quantized_tensors(self, [unit]))
        return self._alone[unit.name]


def kept(node: onnx.NodeProto, reason: str, detail: str) -> dict:
    return {"node": node.name, "op_type": node.op_type, "reason": reason, "detail": detail}


@register
@dataclass
class QuantizeStatic(Pass):
    name = "quantize-static"
    description = "static int8 QDQ (calibrated) around the nodes onnxruntime fuses into integer kernels, with accuracy and latency fallback"
    lossless = False
    claims = "speed"
    fits_budget = True
    op_types = frozenset(ACTIVATION_INPUTS)  # what it can quantize (quantize-int8 reads it)

    method: str = "auto"
    percentile: float = 99.999
    activations: str = "auto"
    per_channel: bool = True
    bias_correction: bool = True
    fallback: bool = True
    latency_fallback: bool = True
    ops: str = ""
    weight_bits: int = 0  # 8, 7, or 0: whichever onnxruntime's fused kernels run more accurately here
    max_latency_ratio: float = 1.0  # to its input, that the model must beat (quantize-int8: another candidate's)
    keep_float: str = ""  # a regular expression of node names to leave float (reason "requested")

    def __post_init__(self) -> None:
        self.kept_by_user = qdq.KeepFloat(self.keep_float)  # a bad expression is the user's error, now

    def run(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        self._check_options()
        if not ctx.calibration:
            raise PassError("quantize-static needs calibration feeds (give --data)")
        notes: list[str] = []
        work = copy_model(model)
        if upgraded := qdq.ensure_opset(work, qdq.PER_AXIS_OPSET):
            notes.append(f"{upgraded} for per-axis DequantizeLinear")
        plan = make_plan(work, self._allowed_ops(), self.kept_by_user)
        notes += self.kept_by_user.unmatched_note(sum(k["reason"] == "requested" for k in plan.kept_float))
        subgraph_nodes = sum(len(g.node) for g in iter_graphs(work.graph)) - len(work.graph.node)
        details: dict = {}
        if subgraph_nodes:
            details["subgraphs"] = f"{subgraph_nodes} nodes inside If/Loop/Scan bodies left float"
            notes.append(details["subgraphs"] + " (quantize-static quantizes the main graph only)")
        details["kept_float"] = plan.kept_float
        methods = AUTO_METHODS if self.method == "auto" else (self.method,)
        stats = calibrate.collect(work, ctx.calibration, calibrated_tensors(plan, plan.units), bins=max(calibrate.bins_for(m) for m in methods))
        drop_non_float(plan, stats)
        transfers = reader_transfers(work.graph)
        ranges = {m: {t: s.range(m, percentile=self.percentile, transfer=transfers.get(t) if m == "mse" else None) for t, s in stats.items()} for m in methods}
        drop_lopsided_concats(plan, ranges[methods[0]])
        if not plan.units:
            return PassResult(False, refused=["no node that onnxruntime fuses into an integer kernel can be quantized here" + _why(plan, subgraph_nodes)], details=details, notes=notes)
        bit_widths = (8, 7) if self.weight_bits == 0 else (self.weight_bits,)
        shifts = {bits: weight_shifts(plan, plan.units, ctx.calibration[:SENSITIVITY_FEEDS], self.per_channel, bits) if self.bias_correction else {} for bits in bit_widths}
        builders = {(m, bits): Builder(plan, ranges[m], self.per_channel, shifts[bits], bits) for m in methods for bits in bit_widths}
        first = next(iter(builders.values()))
        dtype_name, note = self._activation_type(first, ctx)
        notes.append(note)
        dtype = ACTIVATION_TYPES[dtype_name]
        units, problem = self._fast_units(first, dtype, model, ctx)
        if problem:
            return PassResult(False, refused=[problem], details=details, notes=notes)
        (method, _), builder, note = self._most_accurate(builders, units, dtype, model, ctx)
        if note:
            notes.append(note)
        units, problem = self._accurate_units(builder, units, dtype, model, ctx)
        if problem:
            return PassResult(False, refused=[problem], details=details, notes=notes)
        result = builder.build(units, dtype)
        chains = profiling.unfused_chains(profiling.optimized_graph(result, RuntimeSettings(level="all", threads=ctx.threads)))
        model.CopyFrom(result)
        shown = list(ranges[method].items())[:RANGES_SHOWN]
        details.update(
            quantized=dict(Counter(u.op_type for u in units)),
            calibration={"method": method, "tensors": len(ranges[method]), "ranges": {t: [float(lo), float(hi)] for t, (lo, hi) in shown}, "after_function": {t: f for t, f in transfers.items() if t in ranges[method]} if method == "mse" else {}},
            activation_type=dtype_name,
            weight_bits=builder.weight_bits,
            unfused_chains=[_chain_dict(c) for c in chains],
        )
        reasons = Counter(k["reason"] for k in plan.kept_float)
        counts = {"nodes_quantized": len(units), "kept_float": len(plan.kept_float), "unfused_chains": len(chains)}
        counts.update({f"kept_float_{reason.replace(' ', '_')}": n for reason, n in reasons.items()})
        return PassResult(True, counts=counts, details=details, notes=notes)

    def _fast_units(self, builder: Builder, dtype, original: onnx.ModelProto, ctx: PassContext) -> tuple[list[Unit], str | None]:
        """The units onnxruntime fuses and, with `latency_fallback`, runs faster quantized; or why none.

        Latency comes before accuracy (and before the weight format, which does not change the kernels),
        so that the accuracy bisection only weighs nodes worth quantizing, and the model with all of these
        quantized is timed against the float one: the accuracy guard only returns nodes to float, which
        takes integer kernels away, so when that model does not beat `max_latency_ratio` no subset the
        bisection could find does either, and the pass refuses without it (MiniLM: the bisection took 27 s
        of the 108 s int8 preset for a static model slower than the dynamic one)."""
        units = self._fused_only(builder, list(builder.plan.units), dtype)
        if self.latency_fallback:
            units = self._settled(builder, self._faster_only(builder, units, dtype, ctx), dtype)
            if units and (slow := self._not_faster(builder, units, dtype, original, ctx)):
                return [], slow
        return units, (None if units else "every quantizable node was returned to float")

    def _accurate_units(self, builder: Builder, units: list[Unit], dtype, original: onnx.ModelProto, ctx: PassContext) -> tuple[list[Unit], str | None]:
        """`units` after the accuracy guard, or why none. The latency guard runs again when that returned
        nodes: a node whose neighbours went float now pays for its own QuantizeLinear/DequantizeLinear.
        What the latency trim and the island/fusion clean-up return to float is judged by the budget again,
        since error is not monotone in the nodes quantized (YOLOv8n's F1 can fall when a node goes back to
        float); over budget, the guard returns more and the trim runs again. Each such round returns at
        least one node, so this ends."""
        if not self.fallback:
            units = self._settled(builder, units, dtype)
            return units, (None if units else "every quantizable node was returned to float")
        while True:
            before = len(units)
            units, problem = self._within_budget(builder, units, dtype, original, ctx)
            if problem:
                return [], problem
            accepted = len(units)
            if self.latency_fallback and units and accepted != before:
                units = self._faster_only(builder, units, dtype, ctx)
            units = self._settled(builder, units, dtype)
            if len(units) == accepted:
                return units, (None if units else "every quantizable node was returned to float")

    def _settled(self, builder: Builder, units: list[Unit], dtype) -> list[Unit]:
        """`units` without islands, with fusion checked again when that returned any."""
        kept = self._without_islands(builder.plan, units)
        return self._fused_only(builder, kept, dtype) if len(kept) != len(units) else kept

    def _not_faster(self, builder: Builder, units: list[Unit], dtype, original: onnx.ModelProto, ctx: PassContext) -> str | None:
        """Why the model with every unit in `units` quantized does not time below `max_latency_ratio` x
        `original`, or None."""
        timings = ctx.latency([("float", original), ("quantized", builder.build(units, dtype))])
        if timings[1].ratio < self.max_latency_ratio:
            return None
        than = "its input" if self.max_latency_ratio == 1.0 else f"{self.max_latency_ratio:.3f}x its input (max_latency_ratio)"
        return (
            f"not faster than {than} even with every node the latency guard kept quantized ({len(units)} nodes): "
            f"latency ratio {timings[1].ratio:.3f} ({timings[1].median_ms:.3f} ms vs {timings[0].median_ms:.3f} ms); "
            "returning nodes to float for accuracy would not make it faster, so nothing is quantized"
        )

    def _most_accurate(self, builders: dict[tuple[str, int], Builder], units: list[Unit], dtype, original: onnx.ModelProto, ctx: PassContext) -> tuple[tuple[str, int], Builder, str | None]:
        """The range method and weight bits whose model, with `units` quantized, has outputs closest to the
        float model's (run as the budget is judged, through onnxruntime's integer kernels; ctx.fidelity on
        the calibration feeds); ties go to the first offered (minmax, 8 bits).
        Bits: on CPUs without VNNI, onnxruntime's u8s8 kernels add pairs of products in int16, which
        full-range weights overflow (255 * 127 * 2 > 32767): a single quantized MatMul gave output cosine
        0.94-0.99 with 8 bits and 0.9999 with 7. Method: neither wins everywhere; PP-OCRv4 rec's softmax
        cosine was 0.925 with minmax and 0.884 with mse, while fully quantized YOLOv8n's box error vs fp32
        was 2.57 px with minmax and 1.69 px with mse (64 held-out images)."""
        if len(builders) == 1:
            key, builder = next(iter(builders.items()))
            return key, builder, None
        reference = ctx.outputs(original)
        scores = {key: ctx.fidelity(reference, ctx.outputs(b.build(units, dtype))) for key, b in builders.items()}
        best = max(scores, key=lambda key: scores[key])
        shown = ", ".join(f"{c:.5f} with {m} ranges and {bits}-bit weights" for (m, bits), c in scores.items())
        return best, builders[best], f"{best[0]} ranges and {best[1]}-bit weights chosen by measurement: {ctx.fidelity_label} {shown} on the calibration feeds, {len(units)} nodes quantized"

    def _check_options(self) -> None:
        if not self.max_latency_ratio > 0:
            raise PassError(f"quantize-static: max_latency_ratio must be positive, not {self.max_latency_ratio}")
        if self.weight_bits not in (0, 7, 8):
            raise PassError(f"quantize-static: weight_bits must be 7, 8 or 0 (choose by measurement), not {self.weight_bits}")
        if self.method not in ("auto", *calibrate.METHODS):
            raise PassError(f"quantize-static: method {self.method!r} is not auto or one of {', '.join(calibrate.METHODS)}")
        if self.activations not in ("auto", *ACTIVATION_TYPES):
            raise PassError(f"quantize-static: activations {self.activations!r} is not auto, uint8 or int8")
        unknown = set(self._allowed_ops()) - set(ACTIVATION_INPUTS)
        if unknown:
            raise PassError(f"quantize-static: ops {', '.join(sorted(unknown))} cannot be quantized; choose among {', '.join(ACTIVATION_INPUTS)}")

    def _allowed_ops(self) -> tuple[str, ...]:
        chosen = tuple(o.strip() for o in self.ops.split(",") if o.strip())
        return chosen or tuple(op for op in ACTIVATION_INPUTS if op in qdq.FUSED_OPS)

    def _activation_type(self, builder: Builder, ctx: PassContext) -> tuple[str, str]:
        """uint8 or int8 activations: the option, the cached decision, or a measurement."""
        if self.activations != "auto":
            return self.activations, f"{self.activations} activations (option)"
        if DECISION_KEY in ctx.decisions:
            return ctx.decisions[DECISION_KEY], f"{ctx.decisions[DECISION_KEY]} activations (measured earlier in this run)"
        units = builder.plan.units
        models = {name: builder.build(units, dtype) for name, dtype in ACTIVATION_TYPES.items()}
        unfused = {name: len(profiling.unfused_chains(profiling.optimized_graph(m, RuntimeSettings(level="all")))) for name, m in models.items()}
        fewest = min(unfused.values())
        candidates = [name for name in models if unfused[name] == fewest]
        if len(candidates) == 1:
            best, why = candidates[0], "onnxruntime fuses fewer nodes with " + ", ".join(f"{n} ({c} unfused chains)" for n, c in unfused.items() if n != candidates[0])
        else:
            timings = ctx.latency([(name, models[name]) for name in candidates])
            best = min(timings, key=lambda t: t.ratio).label  # paired round by round (graphopt.bench)
            why = f"faster on this CPU, median latency and ratio to {timings[0].label}: " + ", ".join(f"{t.label} {t.median_ms:.3f} ms ({t.ratio:.3f})" for t in timings)
        ctx.decisions[DECISION_KEY] = best
        return best, f"{best} activations ({why})"

    def _fused_only(self, builder: Builder, units: list[Unit], dtype) -> list[Unit]:
        """Return to float what leaves DequantizeLinear -> op -> QuantizeLinear chains in onnxruntime's
        optimized graph: a quantized node it did not fuse, or, for a float node caught between quantized
        tensors, the quantized nodes reading its output (which asked for the Q). Repeated until no chain is
        left, since each step can strand another float node."""
        for _ in range(MAX_FUSION_ROUNDS):
            chains = profiling.unfused_chains(profiling.optimized_graph(builder.build(units, dtype), RuntimeSettings(level="all")))
            if not chains:
                break
            names = {u.name for u in units}
            detail: dict[str, str] = {}
            for chain in chains:
                op = fused_origin(chain.op)
                if op in names:
                    detail.setdefault(op, "onnxruntime left it between DequantizeLinear and QuantizeLinear")
                    continue
                tensor = qdq_tensor(chain.q)
                for u in units:
                    if tensor != u.output and tensor in builder.plan.tensors_alone(u):
                        detail.setdefault(u.name, f"its input {tensor!r} comes from float {chain.op_type} {chain.op!r}, which onnxruntime would run between DequantizeLinear and QuantizeLinear")
            if not detail:
                break
            units = self._return(builder.plan, units, set(detail), "not fused", detail)
        return units

    def _within_budget(self, builder: Builder, units: list[Unit], dtype, original: onnx.ModelProto, ctx: PassContext) -> tuple[list[Unit], str | None]:
        """Return the most sensitive nodes to float until the calibration outputs are within the budget
        (the pipeline then judges feeds the calibration never saw)."""
        reference = ctx.outputs(original)

        def problem_with(kept: list[Unit]) -> str | None:
            return ctx.budget_problem(reference, builder.build(kept, dtype))

        problem = problem_with(units)
        if problem is None:
            return units, None
        errors = sensitivities(builder, units, dtype, ctx.calibration[:SENSITIVITY_FEEDS])
        rankings = {
            "local error": sorted(units, key=lambda u: -errors[u.name]),
            # error compounds towards the outputs: detection and recognition heads are the usual culprits
            "distance to the outputs": list(reversed(units)),
        }
        best: tuple[int, str] | None = None
        for name, ranked in rankings.items():
            returned = _fewest_to_return(ranked, problem_with, best[0] if best else len(ranked))
            if returned is not None and (best is None or returned < best[0]):
                best = (returned, name)
        if best is None:
            return units, f"no set of quantized nodes stays within the budget on the calibration feeds (all nodes quantized: {problem})"
        returned, name = best
        ranked = rankings[name]
        detail = {u.name: f"ranked by {name} (local error {errors[u.name]:.3g}); all quantized: {problem}" for u in ranked[:returned]}
        return self._return(builder.plan, units, {u.name for u in ranked[:returned]}, "sensitive", detail), None

    def _faster_only(self, builder: Builder, units: list[Unit], dtype, ctx: PassContext) -> list[Unit]:
        quant_model = builder.build(units, dtype)
        float_times, quant_times = ctx.node_times([builder.plan.model, quant_model])
        judged = [u for u in units if u.op_type in WEIGHTED]
        slower = slower_units(judged, float_times, quant_times, charges(builder.plan.model, quant_model, units))
        detail = {name: f"{q:.3f} ms quantized vs {f:.3f} ms float" for name, (q, f) in slower.items()}
        return self._return(builder.plan, units, set(slower), "slower", detail)

    def _without_islands(self, plan: Plan, units: list[Unit]) -> list[Unit]:
        """Return to float every region of quantized nodes (units joined by a quantized tensor) holding no
        quantized Conv/Gemm/MatMul: bounded by float nodes, such a region only adds QuantizeLinear and
        DequantizeLinear work (YOLOv8n with its head kept float for accuracy: the Sigmoid/Mul/Add/Concat
        left quantized there made it 1.17x slower than fp32)."""
        regions = quantized_regions(plan, units)
        islands = {u.name for region in regions if not any(u.op_type in WEIGHTED for u in region) for u in region}
        detail = "no quantized Conv, Gemm or MatMul among the quantized nodes it is connected to: it would only add QuantizeLinear/DequantizeLinear work"
        return self._return(plan, units, islands, "island", detail)

    @staticmethod
    def _return(plan: Plan, units: list[Unit], names: set[str], reason: str, detail) -> list[Unit]:
        """`units` without `names`, which are recorded as kept float for `reason`."""
        for u in units:
            if u.name in names:
                text = detail[u.name] if isinstance(detail, dict) else detail
                plan.kept_float.append({"node": u.name, "op_type": u.op_type, "reason": reason, "detail": text})
        return [u for u in units if u.name not in names]


def _fewest_to_return(ranked: list, problem_with, limit: int) -> int | None:
    """By bisection, the smallest k <= `limit` such that returning the first k of `ranked` to float meets
    the budget (`problem_with(the rest)` is None; k = 0 is known to fail). None when returning `limit`
    already fails, or when only returning all of them (the float model) would do."""
    if limit < len(ranked) and problem_with(ranked[limit:]):
        return None
    lo, hi = 0, limit
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if problem_with(ranked[mid:]):
            lo = mid
        else:
            hi = mid
    return hi if hi < len(ranked) else None


def _why(plan: Plan, subgraph_nodes: int) -> str:
    if not plan.kept_float:
        bodies = f" outside If/Loop/Scan bodies; the {subgraph_nodes} nodes inside them stay float" if subgraph_nodes else ""
        return f" (no Conv, Gemm, MatMul, Add, Mul, Concat, Where, Sigmoid, LeakyRelu or pooling node{bodies})"
    return f" ({len(plan.kept_float)} candidates unsupported, e.g. {plan.kept_float[0]['node']!r}: {plan.kept_float[0]['detail']})"


def _chain_dict(chain) -> dict:
    return {"dq": chain.dq, "op": chain.op, "op_type": chain.op_type, "q": chain.q}


# ----------------------------------------------------------------------------------------------- planning


def constant_of(graph: onnx.GraphProto, name: str, made_by: dict[str, onnx.NodeProto]) -> np.ndarray | None:
    """The value of a constant float32 tensor (initializer or Constant node), else None."""
    value = qdq.weight(graph, name, made_by)
    return value if value is not None and value.dtype == np.float32 else None


def is_constant(graph: onnx.GraphProto, name: str, made_by: dict[str, onnx.NodeProto]) -> bool:
    node = made_by.get(name)
    return name in {t.name for t in graph.initializer} - {i.name for i in graph.input} or (node is not None and node.op_type == "Constant")


def make_plan(model: onnx.ModelProto, allowed: Iterable[str], keep: qdq.KeepFloat = qdq.KeepFloat()) -> Plan:
    """Find the quantizable nodes of the main graph (opset already >= 13), except those `keep` names."""
    graph = model.graph
    made_by, readers, outs = producers(graph), consumers(graph), output_names(graph)
    plan = Plan(model, [], [], {}, {})
    allowed = set(allowed)
    for k, node in enumerate(graph.node):
        if node.op_type not in allowed or node.domain not in ("", "ai.onnx"):
            if node.op_type == "ConvTranspose":
                plan.kept_float.append(kept(node, "unsupported", "onnxruntime 1.32 has no QDQ ConvTranspose kernel on CPU"))
            continue
        if keep(node):
            plan.kept_float.append(kept(node, "requested", keep.reason()))
            continue
        unit_or_reason = _unit(graph, k, node, made_by, plan.constants)
        if isinstance(unit_or_reason, str):
            plan.kept_float.append(kept(node, "unsupported", unit_or_reason))
            continue
        _fold_activation(graph, unit_or_reason, readers, outs, plan.constants, made_by)
        plan.units.append(unit_or_reason)
    plan.share = _shared_scales(graph, made_by)
    return plan



def _unit(graph, k: int, node: onnx.NodeProto, made_by, constants: dict[str, np.ndarray]) -> Unit | str:
    """The Unit for a node of an allowed op type, or why it cannot be quantized."""
    op = node.op_type
    positions = ACTIVATION_INPUTS[op]
    positions = tuple(range(len(node.input))) if positions is None else positions
    unit = Unit(k, node.name or f"{op}_{k}", op, {}, node_output=node.output[0], output=node.output[0])
    if not node.name:
        node.name = unit.name
    if op in WEIGHTED and len(node.input) > 1 and is_constant(graph, node.input[1], made_by):
        w = constant_of(graph, node.input[1], made_by)
        if w is None:
            return f"weight {node.input[1]!r} is not a float32 constant"
        if op == "MatMul" and w.ndim != 2:
            return f"weight {node.input[1]!r} has rank {w.ndim}; only 2-D MatMul weights are quantized"
        if op == "Gemm" and (attribute(node, "alpha", 1.0) != 1.0 or attribute(node, "transA", 0) or (len(node.input) > 2 and attribute(node, "beta", 1.0) != 1.0)):
            return "Gemm with alpha or beta != 1 or transA is not fused by onnxruntime"
        unit.weight, unit.axis = node.input[1], qdq.weight_axis(node, w.ndim)
        constants[unit.weight] = w
        positions = (0,)
        if is_constant(graph, node.input[0], made_by):
            return f"input {node.input[0]!r} is a constant"
    elif op in ("Conv", "Gemm"):
        return f"weight {node.input[1]!r} is computed, not a constant"
    if op in BIAS_CORRECTED and len(node.input) > 2 and node.input[2]:
        b = constant_of(graph, node.input[2], made_by)
        channels = constants[unit.weight].shape[unit.axis]
        if b is None or b.ndim != 1 or b.shape[0] != channels:
            return f"bias {node.input[2]!r} is not a 1-D float32 constant with one value per output channel"
        unit.bias = node.input[2]
        constants[unit.bias] = b
    for p in positions:
        name = node.input[p] if p < len(node.input) else ""
        if not name:
            continue
        if is_constant(graph, name, made_by):
            if op == "MatMul":
                return "MatMul with a constant first input"
            value = constant_of(graph, name, made_by)
            if value is None:
                return f"input {name!r} is not a float32 constant"
            if value.size and not (np.all(np.isfinite(value)) and np.abs(value).max() < MAX_CONSTANT):
                return f"constant input {name!r} holds infinite or huge values (a mask fill such as -inf), which 8 bits cannot hold"
            constants[name] = value
            unit.constants[p] = name
        else:
            unit.inputs[p] = name
    return unit


def _fold_activation(graph, unit: Unit, readers, outs, constants, made_by) -> None:
    """Move the unit's output past a Relu or Clip(0, c) that is its only reader (onnxruntime folds it into the Q)."""
    users = readers.get(unit.node_output, [])
    if len(users) != 1 or unit.node_output in outs:
        return
    nxt = users[0]
    if nxt.op_type == "Relu":
        pass
    elif nxt.op_type == "Clip" and len(nxt.input) == 3:
        lo = constant_of(graph, nxt.input[1], made_by) if nxt.input[1] else None
        hi = constant_of(graph, nxt.input[2], made_by) if nxt.input[2] else None
        if lo is None or hi is None or float(lo) != 0.0:
            return
    else:
        return
    unit.act = list(graph.node).index(nxt)
    unit.act_name = nxt.name
    unit.output = nxt.output[0]


def _is_data_movement(node: onnx.NodeProto) -> bool:
    if node.op_type not in qdq.DATA_MOVEMENT_OPS or node.domain not in ("", "ai.onnx"):
        return False
    return node.op_type != "Resize" or attribute(node, "mode", b"nearest") in (b"nearest", "nearest")


def _shared_scales(graph, made_by) -> dict[str, str]:
    """Data-movement output -> its data input (for those whose data input is computed)."""
    share = {}
    for node in graph.node:
        if _is_data_movement(node) and node.input and not is_constant(graph, node.input[0], made_by):
            for out in node.output:
                if out:
                    share[out] = node.input[0]
    return share


def quantized_tensors(plan: Plan, units: list[Unit]) -> list[str]:
    """Every tensor that gets a Q -> DQ pair when `units` are quantized, in graph order of their producers:
    the units' inputs and outputs, and back through data-movement nodes leading to a unit's input."""
    wanted = {t for u in units for t in u.tensors()}
    for node in reversed(plan.model.graph.node):
        if any(o in wanted and o in plan.share for o in node.output):
            wanted.add(node.input[0])
            wanted.update(o for o in node.output if o)  # onnxruntime drops a Split's pairs only when all outputs have one
    order = [i.name for i in plan.model.graph.input] + [o for n in plan.model.graph.node for o in n.output]
    return [t for t in order if t in wanted]


def quantized_regions(plan: Plan, units: list[Unit]) -> list[list[Unit]]:
    """`units` grouped into connected regions: two units are in one region when they share a quantized
    tensor (directly, or through the data-movement nodes that carry a scale between them)."""
    leader = {u.name: u.name for u in units}

    def find(name: str) -> str:
        while leader[name] != name:
            leader[name] = leader[leader[name]]
            name = leader[name]
        return name

    first_with: dict[str, str] = {}
    for u in units:
        for tensor in plan.tensors_alone(u):
            other = first_with.setdefault(tensor, u.name)
            leader[find(u.name)] = find(other)
    regions: dict[str, list[Unit]] = defaultdict(list)
    for u in units:
        regions[find(u.name)].append(u)
    return list(regions.values())


def root(plan: Plan, tensor: str, wanted: set[str]) -> str:
    """The tensor whose scale `tensor` uses (itself, or the first tensor up a data-movement chain)."""
    while tensor in plan.share and plan.share[tensor] in wanted:
        tensor = plan.share[tensor]
    return tensor


def reader_transfers(graph: onnx.GraphProto) -> dict[str, str]:
    """Tensors from which all readers compute one elementwise function, by calibrate.TRANSFERS name: only
    a Sigmoid ("sigmoid"), or a Sigmoid and a Mul of the tensor by that Sigmoid ("silu"). Graph outputs
    are read as they are, so they have none."""
    readers = consumers(graph)
    outputs = output_names(graph)
    found = {}
    for tensor, nodes in readers.items():
        if tensor in outputs or any(n.op_type not in ("Sigmoid", "Mul") for n in nodes):
            continue
        sigmoids = [n for n in nodes if n.op_type == "Sigmoid"]
        muls = [n for n in nodes if n.op_type == "Mul"]
        if len(sigmoids) != 1 or len(muls) > 1:
            continue
        if not muls:
            found[tensor] = "sigmoid"
        elif sorted(muls[0].input) == sorted([tensor, gate := sigmoids[0].output[0]]) and gate not in outputs and len(readers.get(gate, [])) == 1:
            found[tensor] = "silu"
    return found


def calibrated_tensors(plan: Plan, units: list[Unit]) -> list[str]:
    wanted = quantized_tensors(plan, units)
    return list(dict.fromkeys(root(plan, t, set(wanted)) for t in wanted))


def drop_non_float(plan: Plan, stats: dict) -> None:
    """Units reading or writing a tensor without statistics (not floating point) stay float."""
    keep = []
    for u in plan.units:
        alone = plan.tensors_alone(u)
        missing = sorted(t for t in alone if root(plan, t, alone) not in stats)
        if missing:
            plan.kept_float.append({"node": u.name, "op_type": u.op_type, "reason": "unsupported", "detail": f"tensor {missing[0]!r} is not floating point"})
        else:
            keep.append(u)
    plan.units = keep


def qdq_tensor(name: str) -> str:
    """The tensor a Q/DQ node of this pass was made for, from its name in onnxruntime's optimized graph
    (`<tensor>_QuantizeLinear`, to which onnxruntime may append `/duplicated` and `_token_<n>`)."""
    name = re.sub(r"(/duplicated)?(_token_\d+)?$", "", name)
    return re.sub(r"_(QuantizeLinear|DequantizeLinear)(_\d+)?$", "", name)


def drop_lopsided_concats(plan: Plan, ranges: dict[str, tuple[float, float]]) -> None:
    """A Concat whose output range dwarfs one input's keeps float: QLinearConcat requantizes each input to
    the output's scale, so a narrow input is left with a few levels (YOLOv8n's last Concat joins boxes in
    [0, 330] and class scores in [0, 1]: quantized, 83 detections on 50 photos became 30)."""
    keep = []
    for u in plan.units:
        if u.op_type == "Concat":
            alone = plan.tensors_alone(u)
            width = {t: np.subtract(*ranges[root(plan, t, alone)][::-1]) for t in alone}
            narrow = [t for t in u.inputs.values() if width[t] * CONCAT_MIN_SHARE < width[u.output]]
            if narrow:
                detail = f"input {narrow[0]!r} spans {width[narrow[0]]:.3g}, the output {width[u.output]:.3g}: it would keep fewer than {256 // CONCAT_MIN_SHARE} of 256 levels"
                plan.kept_float.append({"node": u.name, "op_type": u.op_type, "reason": "sensitive", "detail": detail})
                continue
        keep.append(u)
    plan.units = keep


def float_weighted_input(node: onnx.NodeProto, tensor: str, graph: onnx.GraphProto, made_by) -> tuple[int, int] | None:
    """(axis, length) of the channel axis of `tensor` when `node` is a float Conv, ConvTranspose or Gemm
    reading it as input 0 with a constant weight; else None.

    onnxruntime's WeightBiasQuantization (level basic) quantizes such a node itself when its input comes
    from a per-tensor DequantizeLinear and its output goes to a QuantizeLinear: it becomes a QLinearConv
    with per-tensor weights, and a node the guards returned to float for accuracy or speed would not be
    float. A per-axis DequantizeLinear of the same values does not match that pattern."""
    if node.op_type not in ("Conv", "ConvTranspose", "Gemm") or node.domain not in ("", "ai.onnx") or len(node.input) < 2 or node.input[0] != tensor:
        return None
    w = qdq.weight(graph, node.input[1], made_by)
    if w is None:
        return None
    if node.op_type == "Gemm":
        if w.ndim != 2:
            return None
        inner = w.shape[1] if attribute(node, "transB", 0) else w.shape[0]
        return (0 if attribute(node, "transA", 0) else 1), int(inner)
    if w.ndim < 3:
        return None
    channels = w.shape[0] if node.op_type == "ConvTranspose" else w.shape[1] * attribute(node, "group", 1)
    return 1, int(channels)


def fused_origin(name: str) -> str:
    """The original node name of a kernel in onnxruntime's optimized graph (the NHWC transformer appends
    `_token_<n>`)."""
    head, sep, tail = name.rpartition("_token_")
    return head if sep and tail.isdigit() else name


# ----------------------------------------------------------------------------------------------- building


class Builder:
    """Makes quantized models from a plan for any subset of its units and activation type."""

    def __init__(self, plan: Plan, ranges: dict[str, tuple[float, float]], per_channel: bool, shifts: dict[str, np.ndarray], weight_bits: int = 8):
        self.plan = plan
        self.ranges = ranges
        self.per_channel = per_channel
        self.shifts = shifts
        self.weight_bits = weight_bits
        self._weights: dict[tuple[str, int | None], qdq.QuantizedWeight] = {}

    def quantized_weight(self, unit: Unit) -> qdq.QuantizedWeight:
        key = (unit.weight, unit.axis)
        if key not in self._weights:
            self._weights[key] = qdq.quantize_per_channel(self.plan.constants[unit.weight], unit.axis if self.per_channel else None, self.weight_bits)
        return self._weights[key]

    def params(self, tensor: str, wanted: set[str], dtype) -> tuple[np.float32, np.integer]:
        lo, hi = self.ranges[root(self.plan, tensor, wanted)]
        return qdq.activation_params(lo, hi, dtype)

    def bias_values(self, unit: Unit, input_scale: np.float32) -> tuple[np.ndarray, np.ndarray] | None:
        """int32 bias and its scale (input scale x weight scale), with the correction applied."""
        if unit.bias is None and unit.name not in self.shifts:
            return None
        w = self.quantized_weight(unit)
        channels = self.plan.constants[unit.weight].shape[unit.axis]
        bias = self.plan.constants[unit.bias].astype(np.float64) if unit.bias else np.zeros(channels)
        bias = bias - self.shifts.get(unit.name, 0.0)
        scale = (np.float32(input_scale) * np.broadcast_to(w.scale, (channels,))).astype(np.float32)
        scale = np.where(scale > 0, scale, np.float32(1e-12)).astype(np.float32)
        info = np.iinfo(np.int32)
        values = np.clip(np.rint(bias / scale.astype(np.float64)), info.min, info.max).astype(np.int32)
        return values, scale

    def _per_axis_dequantize(self, b: qdq.QdqBuilder, tensor: str, quantized: str, wanted: set[str], dtype, axis: int, channels: int) -> str:
        """A DequantizeLinear of `quantized` with the tensor's one scale and zero point repeated along
        `axis`: the same values, but not per tensor, so onnxruntime leaves the float reader float (see
        float_weighted_input)."""
        scale, zero = self.params(tensor, wanted, dtype)
        s = b.initializer(f"{tensor}_scale_per_axis", np.full(channels, scale, np.float32))
        z = b.initializer(f"{tensor}_zero_point_per_axis", np.full(channels, zero, dtype))
        return b.dequantize(f"{tensor}_per_axis", quantized, s, z, axis=axis)

    def build(self, units: list[Unit], dtype) -> onnx.ModelProto:
        """A copy of the plan's model with `units` quantized."""
        model = copy_model(self.plan.model)
        graph = model.graph
        names = NameGenerator(model)
        b = qdq.QdqBuilder(graph, names)
        nodes = list(graph.node)
        wanted_list = quantized_tensors(self.plan, units)
        wanted = set(wanted_list)
        readers = consumers(graph)
        outs = output_names(graph)
        made_by = producers(graph)
        after: dict[int, list[onnx.NodeProto]] = defaultdict(list)  # node position -> Q/DQ nodes to put after it
        position = {id(n): k for k, n in enumerate(nodes)}
        front: list[onnx.NodeProto] = []
        renames: dict[int, dict[str, str]] = defaultdict(dict)
        param_names: dict[str, tuple[str, str]] = {}
        unit_nodes = {id(nodes[u.index]) for u in units}
        for tensor in wanted_list:
            base = root(self.plan, tensor, wanted)
            if base not in param_names:
                scale, zero = self.params(tensor, wanted, dtype)
                param_names[base] = (b.initializer(f"{base}_scale", np.array(scale, np.float32)), b.initializer(f"{base}_zero_point", np.array(zero, dtype)))
            s, z = param_names[base]
            source, dq_name = tensor, None
            prod = made_by.get(tensor)
            if tensor in outs:
                source = names(f"{tensor}_float")
                prod.output[list(prod.output).index(tensor)] = source
                dq_name = tensor
            quantized = b.quantize(tensor, source, s, z)
            dq_out = b.dequantize(tensor, quantized, s, z)
            if dq_name is not None:
                b.new_nodes[-1].output[0] = dq_name
            per_axis: dict[tuple[int, int], str] = {}
            for reader in readers.get(tensor, []):
                spread = None if id(reader) in unit_nodes else float_weighted_input(reader, tensor, graph, made_by)
                if spread is not None:
                    if spread not in per_axis:
                        per_axis[spread] = self._per_axis_dequantize(b, tensor, quantized, wanted, dtype, *spread)
                    renames[id(reader)][tensor] = per_axis[spread]
                elif dq_name is None:
                    renames[id(reader)][tensor] = dq_out
            (after[position[id(prod)]] if prod is not None else front).extend(b.new_nodes)
            b.new_nodes = []
        for node in nodes:
            if id(node) in renames:
                rename_node_reads(node, renames[id(node)])
        weight_dq: dict[tuple[str, int | None], str] = {}
        const_dq: dict[str, str] = {}
        for u in units:
            node = nodes[u.index]
            if u.weight:
                if (u.weight, u.axis) not in weight_dq:
                    weight_dq[u.weight, u.axis] = b.weight(u.weight, self.quantized_weight(u))
                node.input[1] = weight_dq[u.weight, u.axis]
                biased = self.bias_values(u, self.params(u.inputs[0], wanted, dtype)[0])
                if biased is not None:
                    values, scale = biased
                    hint = f"{u.name}_bias"
                    q = b.initializer(f"{hint}_quantized", values)
                    sc = b.initializer(f"{hint}_scale", scale)
                    zp = b.initializer(f"{hint}_zero_point", np.zeros(scale.shape, np.int32))
                    dq_out = b.dequantize(hint, q, sc, zp, axis=0)
                    if len(node.input) > 2:
                        node.input[2] = dq_out
                    else:
                        node.input.append(dq_out)
            for p, name in u.constants.items():
                if name not in const_dq:
                    value = self.plan.constants[name]
                    scale, zero = qdq.activation_params(float(value.min()), float(value.max()), dtype)
                    ints = np.clip(np.rint(value / scale) + int(zero), np.iinfo(dtype).min, np.iinfo(dtype).max).astype(dtype)
                    q = b.initializer(f"{name}_quantized", ints)
                    sc = b.initializer(f"{name}_scale", np.array(scale, np.float32))
                    zp = b.initializer(f"{name}_zero_point", np.array(zero, dtype))
                    const_dq[name] = b.dequantize(name, q, sc, zp)
                node.input[p] = const_dq[name]
        front.extend(b.new_nodes)
        b.new_nodes = []
        ordered = list(front)
        for k, node in enumerate(nodes):
            ordered.append(node)
            ordered.extend(after.get(k, []))
        del graph.node[:]
        graph.node.extend(ordered)
        drop_unread(graph, {w for w, _ in weight_dq} | set(const_dq) | {u.bias for u in units if u.bias})
        return model


# ----------------------------------------------------------------------------------------------- measuring


def _shadow(builder: Builder, units: list[Unit], dtype, weights_only: bool) -> tuple[onnx.ModelProto, dict[str, tuple[str, ...]]]:
    """The float model plus, for each unit, a copy of its node reading the float model's own activations,
    with its weights (and unless `weights_only`, its inputs and output) quantized. Returns the model and,
    per unit, the names of the extra outputs: (squared error, squared reference) or (the difference's mean
    per output channel,). Only these reductions are outputs: the differences themselves would be as large
    as every activation at once."""
    plan = builder.plan
    model = copy_model(plan.model)
    graph = model.graph
    names = NameGenerator(model)
    b = qdq.QdqBuilder(graph, names)
    wanted_list = quantized_tensors(plan, units)
    wanted = set(wanted_list)
    qdq_of: dict[str, str] = {}

    def quantized(tensor: str) -> str:
        if tensor not in qdq_of:
            scale, zero = builder.params(tensor, wanted, dtype)
            s = b.initializer(f"{tensor}_scale", np.array(scale, np.float32))
            z = b.initializer(f"{tensor}_zero_point", np.array(zero, dtype))
            qdq_of[tensor] = b.dequantize(tensor, b.quantize(tensor, tensor, s, z), s, z)
        return qdq_of[tensor]

    extra: dict[str, tuple[str, ...]] = {}
    float_nodes = list(graph.node)
    for u in units:
        node = onnx.NodeProto()
        node.CopyFrom(float_nodes[u.index])
        node.name = names(f"{u.name}_shadow")
        if u.weight:
            node.input[1] = b.weight(f"{u.weight}_shadow", builder.quantized_weight(u))
        if not weights_only:
            for p, tensor in u.inputs.items():
                node.input[p] = quantized(tensor)
        node.output[0] = names(f"{u.node_output}_shadow")
        b.new_nodes.append(node)
        out, reference = node.output[0], u.node_output
        if not weights_only and u.act is not None:
            act = onnx.NodeProto()
            act.CopyFrom(float_nodes[u.act])
            act.name, act.input[0], act.output[0] = names(f"{u.name}_act_shadow"), out, names(f"{u.output}_shadow")
            b.new_nodes.append(act)
            out, reference = act.output[0], u.output
        if not weights_only:
            scale, zero = builder.params(u.output, wanted, dtype)
            s = b.initializer(f"{u.output}_out_scale", np.array(scale, np.float32))
            z = b.initializer(f"{u.output}_out_zero_point", np.array(zero, dtype))
            out = b.dequantize(f"{u.output}_out", b.quantize(f"{u.output}_out", out, s, z), s, z)
        diff = names(f"{u.name}_difference")
        b.new_nodes.append(helper.make_node("Sub", [out, reference], [diff], name=names(f"{u.name}_Sub")))
        if weights_only:
            extra[u.name] = (_channel_mean(b, names, u, diff, builder.plan.constants[u.weight].ndim, default_opset(model) or 0),)
        else:
            err, ref = names(f"{u.name}_error"), names(f"{u.name}_reference")
            b.new_nodes.append(helper.make_node("ReduceSumSquare", [diff], [err], name=names(f"{u.name}_err_sum"), keepdims=0))
            b.new_nodes.append(helper.make_node("ReduceSumSquare", [reference], [ref], name=names(f"{u.name}_ref_sum"), keepdims=0))
            extra[u.name] = (err, ref)
    graph.node.extend(b.new_nodes)
    for outputs in extra.values():
        graph.output.extend(onnx.ValueInfoProto(name=n) for n in outputs)
    return model, extra


def sensitivities(builder: Builder, units: list[Unit], dtype, feeds: list[dict]) -> dict[str, float]:
    """Per unit: squared error of its output when it alone is quantized (inputs, weights, output), on the
    float model's own activations, relative to the squared output."""
    err: dict[str, float] = defaultdict(float)
    ref: dict[str, float] = defaultdict(float)
    for extra, values in _shadow_runs(builder, units, dtype, False, feeds):
        for name, (e, r) in extra.items():
            err[name] += float(values[e])
            ref[name] += float(values[r])
    return {name: err[name] / ref[name] if ref[name] > 0 else (0.0 if err[name] == 0 else float("inf")) for name in err}


def weight_shifts(plan: Plan, units: list[Unit], feeds: list[dict], per_channel: bool, weight_bits: int = 8) -> dict[str, np.ndarray]:
    """Per Conv/Gemm unit: the mean change of each output channel caused by quantizing its weight."""
    targets = [u for u in units if u.op_type in BIAS_CORRECTED]
    sums: dict[str, np.ndarray] = {}
    for extra, values in _shadow_runs(Builder(plan, {}, per_channel, {}, weight_bits), targets, np.uint8, True, feeds):
        for name, (mean,) in extra.items():
            sums[name] = sums.get(name, 0.0) + values[mean].astype(np.float64)
    return {name: total / len(feeds) for name, total in sums.items()}


def _shadow_runs(builder: Builder, units: list[Unit], dtype, weights_only: bool, feeds: list[dict]):
    """Yield (extra outputs per unit, their values on one feed) from shadow models (`_shadow`) of groups of
    units, each cut down to what its group needs. onnxruntime keeps every float activation a shadow node
    reads alive until that node runs, which in its default order is near the end: one shadow model for
    all of PP-OCRv4 rec's 213 units took 315 MB, against 59 MB for the model itself. Groups are bounded
    like `graphopt.activations.intermediates` bounds exposed tensors, by the units' output sizes."""
    if not units or not feeds:
        return
    model = builder.plan.model
    by_output = {u.node_output: u for u in units}
    for group in exposure_groups(model, feeds, list(by_output), exposure_limit(model, feeds)):
        shadow, extra = _shadow(builder, [by_output[name] for name in group], dtype, weights_only)
        sess = runtime.session(cut_to(shadow, [n for names in extra.values() for n in names]), RuntimeSettings(), what="the shadow model")
        for feed in feeds:
            yield extra, runtime.run(sess, feed, [n for names in extra.values() for n in names])
        del sess


def _channel_mean(b: qdq.QdqBuilder, names: NameGenerator, unit: Unit, tensor: str, rank: int, opset: int) -> str:
    """A ReduceMean of `tensor` (a Conv/Gemm output of `rank` axes) over every axis but the channels (1)."""
    mean = names(f"{unit.name}_channel_shift")
    axes = [0, *range(2, rank)]
    if opset >= 18:  # axes became an input
        b.new_nodes.append(helper.make_node("ReduceMean", [tensor, b.initializer(f"{unit.name}_axes", np.array(axes, np.int64))], [mean], name=names(f"{unit.name}_ReduceMean"), keepdims=0))
    else:
        b.new_nodes.append(helper.make_node("ReduceMean", [tensor], [mean], name=names(f"{unit.name}_ReduceMean"), axes=axes, keepdims=0))
    return mean


def charges(float_model: onnx.ModelProto, quant_model: onnx.ModelProto, units: list[Unit]) -> dict[str, list[str]]:
    """Which units each Q/DQ node this pass added is charged to: a QuantizeLinear to the units reading its
    tensor, a DequantizeLinear to the unit writing it (or its readers when no unit writes it)."""
    writers = {u.output: u.name for u in units}
    reading: dict[str, list[str]] = defaultdict(list)
    for u in units:
        for t in u.inputs.values():
            reading[t].append(u.name)
    result: dict[str, list[str]] = {}
    for node in quant_model.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        tensor = qdq_tensor(node.name)
        owners = ([writers[tensor]] if tensor in writers else []) if node.op_type == "DequantizeLinear" else reading.get(tensor, [])
        result[node.name] = owners or reading.get(tensor, []) or ([writers[tensor]] if tensor in writers else [])
    return result


def slower_units(units: list[Unit], float_times: list, quant_times: list, charged: dict[str, list[str]]) -> dict[str, tuple[float, float]]:
    """Units whose quantized time (their fused kernel, plus the Q/DQ nodes charged to them, split evenly
    among the units sharing one) exceeds their float time (the node
    and its folded Relu/Clip). A pure function of the profiles. Returns name -> (quantized ms, float ms)."""
    float_ms: dict[str, float] = defaultdict(float)
    for t in float_times:
        float_ms[t.name] += t.ms
    quant_ms: dict[str, float] = defaultdict(float)
    for t in quant_times:
        owners = charged.get(t.name) or charged.get(re.sub(r"(/duplicated)?(_token_\d+)?$", "", t.name))
        if owners:
            for owner in owners:
                quant_ms[owner] += t.ms / len(owners)
        else:
            quant_ms[fused_origin(t.name)] += t.ms
    slower = {}
    for u in units:
        f = float_ms.get(u.name, 0.0) + (float_ms.get(u.act_name, 0.0) if u.act_name else 0.0)
        q = quant_ms.get(u.name, 0.0)
        if u.name in float_ms and q > f:
            slower[u.name] = (q, f)
    return slower

