"""quantize-dynamic: int8 weights, activations quantized at run time, for MatMul, Gemm, pointwise Conv and LSTM with constant weights.

Rewrites (every graph, If/Loop/Scan bodies included: a body's node is quantized when its weight is a
constant of that body; a weight defined outside the body is left float, reason "unsupported"):
  MatMul(x, W 2-D float32 constant)  => DynamicQuantizeLinear(x) -> MatMulInteger(x_q, W_q, x_zp) -> Cast
                                        -> Mul(x_scale * W_scale)
  Gemm(x, B, C, transA=0, transB, alpha, beta) => the same with W = B (or B^T), alpha folded into the scale,
                                        then Add(beta * C) in float when C is given
  Conv(x, W [M, C, 1, ..., 1], B), group 1, strides 1, no padding (a pointwise Conv: a product over channels)
                                     => Transpose(x, channels last) -> the MatMul form above with W as [C, M]
                                        -> Add(B) -> Transpose(back to channels first)
  LSTM(X, W, R, B, ...)              => com.microsoft DynamicQuantizeLSTM(X, W_q, R_q, B, ..., scales, zero points)
                                        with W and R transposed to [directions, K, 4*hidden] and quantized per
                                        gate column (per direction with per_channel=false); the node keeps its name
  A weight read by several nodes is quantized once (one int8 initializer and one scale); an activation
  read by several quantized nodes is quantized once (one DynamicQuantizeLinear).
W_q is int8, symmetric (no zero point), one scale per output column (per tensor with per_channel=false).
The activation is uint8 with its range taken per tensor at run time.

Weight bits (weight_bits=0, the default, decides by measurement): onnxruntime's u8s8 kernels on CPUs
without VNNI (AVX2) add pairs of uint8 x int8 products in int16, which saturates when both are large
(255 * 127 * 2 > 32767); weights in [-63, 63] (7 bits) cannot saturate. Both are tried on the calibration
feeds and the one closer to the float model is kept (PassContext.fidelity: the budget's metric where there
is one, else output cosine; reported in details["weight_bits"]).

Why this form (measured on all-MiniLM-L6-v2, 2-core AVX2, 2 threads, onnxruntime 1.32): onnxruntime fuses
it into DynamicQuantizeMatMul, or into one DynamicQuantizeLinear shared by MatMulIntegerToFloat nodes when
an activation feeds several weights (Q/K/V), and ran at 0.61x of fp32 against 0.70x for com.microsoft
DynamicQuantizeMatMul written directly (which quantizes the shared activation once per node) and 0.82x for
uint8 weights. It is also plain ONNX (opset 11), so other runtimes can load it.

Why pointwise Convs too: onnxruntime has no fast dynamic integer Conv (ConvInteger is what its own
quantize_dynamic writes: 5x slower than fp32 on YOLOv8n), but a 1x1 Conv is a matrix product over the
channel axis, and DynamicQuantizeMatMul runs it. PP-OCRv4 rec spends 45% of its kernel time in the eleven
such Convs this quantizes (240 and 480 channels on 12 x 80 and 6 x 80 feature maps); as
DynamicQuantizeMatMul between two Transposes its quantized model ran at 0.79 of the cleaned fp32 model,
against 0.97 with only its MatMuls quantized (2-core Zen 4 with AVX-512 VNNI, onnxruntime 1.32). The
Transposes, the activation that fp32's NCHWc Conv had absorbed and the layout reorders around the
neighbouring Convs are what this costs, so small Convs lose: the latency guard below judges each one, and
then the Convs as a group against the model without them.

Refused (node left float, listed in details["kept_float"] with a reason):
  requested    - the node's name matches `keep_float` (a regular expression)
  unsupported  - the weight (B) is computed at run time (attention scores), is not 2-D, is not float32
                 (DynamicQuantizeLinear takes float32 only), is defined outside the body, or Gemm has transA=1
  too small    - K*N below min_weight_elements: quantizing the activation costs more than the integer
                 product saves
  sensitive    - over the accuracy budget on the calibration feeds: nodes are ranked by their own output's
                 relative error when only they are quantized (numpy on the float inputs, one streamed run;
                 in bodies: the model's output cosine with only that node quantized; sensitivity=model
                 ranks every node that way, one model run each), and the most sensitive go back to float
                 until the budget holds (fallback=true; doubling then bisection)
  slower       - (latency_fallback=true; inside bodies too) onnxruntime's
                 per-node profile on two calibration feeds, with every candidate quantized, shows the node's
                 integer kernels (its share of a shared DynamicQuantizeLinear included) slower than its float
                 kernel (with a bias Add the integer kernel absorbed). Small LSTMs
                 (hidden 48, 2 directions: 0.93x) lose to quantizing the input at every step, large ones win
                 (hidden 256, 2 directions, 40 steps: 2.5x faster, measured on the 2-core AVX2 machine).
                 Pointwise Convs that survive this are then timed as a group (ctx.latency: the model with
                 them against the model without them, the other sites quantized in both) and all go back
                 to float when they do not make it faster: the reorders onnxruntime adds around the float
                 Convs next to them are charged to no node by the profile
  A Conv that is not pointwise (kernel larger than 1, groups, strides, padding) is unsupported: its
  patches would have to be gathered in float first.
  LSTM with layout=1 (batch first; DynamicQuantizeLSTM has no such attribute) is unsupported. GRU and RNN have
  no dynamic integer kernel in onnxruntime and are not candidates. The model is upgraded to opset 11 when
  older (reported in notes).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from graphopt.activations import intermediates
from graphopt.graph import (
    MS_DOMAIN,
    STANDARD_DOMAINS,
    NameGenerator,
    attribute,
    consumers,
    copy_model,
    drop_unread,
    initializer_bytes,
    iter_graphs,
    producers,
)
from graphopt.passes import qdq
from graphopt.passes_base import Pass, PassContext, PassError, PassResult, register

FORMAT = "DynamicQuantizeLinear -> MatMulInteger -> Cast -> Mul (onnxruntime: DynamicQuantizeMatMul / MatMulIntegerToFloat); LSTM -> com.microsoft DynamicQuantizeLSTM"
MIN_OPSET = 11  # DynamicQuantizeLinear
LSTM_ATTRIBUTES = ("activation_alpha", "activation_beta", "activations", "clip", "direction", "hidden_size", "input_forget")


@dataclass(frozen=True)
class _Site:
    """A node that can be quantized: its graph (position in `iter_graphs` order) and its first output."""

    graph: int
    output: str
    node: str
    op_type: str
    weight: str
    weight_elements: int
    recurrence: str = ""  # LSTM: R, quantized like W


@dataclass
class _Plan:
    sites: list[_Site] = field(default_factory=list)
    kept_float: list[dict] = field(default_factory=list)


@register
@dataclass
class QuantizeDynamic(Pass):
    name = "quantize-dynamic"
    description = "int8 per-channel weights and run-time quantized activations for MatMul/Gemm/pointwise Conv/LSTM with constant weights"
    lossless = False
    claims = "speed"
    fits_budget = True
    op_types = frozenset({"MatMul", "Gemm", "Conv", "LSTM"})  # what it can quantize (quantize-int8 reads it)

    per_channel: bool = True
    fallback: bool = True
    min_weight_elements: int = 4096
    ops: str = "MatMul,Gemm,Conv,LSTM"
    weight_bits: int = 0  # 8, 7, or 0: whichever is more accurate on this machine
    latency_fallback: bool = True  # nodes whose quantized kernels profile slower stay float
    sensitivity: str = "layer"  # how the fallback ranks nodes: "layer" (own output error) or "model" (see below)
    keep_float: str = ""  # a regular expression of node names to leave float (reason "requested")

    def __post_init__(self) -> None:
        self.kept_by_user = qdq.KeepFloat(self.keep_float)  # a bad expression is the user's error, now

    def run(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        notes = [n for n in [qdq.ensure_opset(model, MIN_OPSET)] if n]
        ops = {op.strip() for op in self.ops.split(",") if op.strip()}
        plan = _plan(model, ops, self.min_weight_elements, self.kept_by_user)
        notes += self.kept_by_user.unmatched_note(sum(k["reason"] == "requested" for k in plan.kept_float))
        details = {"quantized": {}, "kept_float": plan.kept_float, "format": FORMAT}
        if not plan.sites:
            return PassResult(changed=False, details=details, notes=notes, refused=_refusals(plan.kept_float))
        if self.sensitivity not in ("layer", "model"):
            raise PassError(f"quantize-dynamic: sensitivity must be 'layer' or 'model', not {self.sensitivity!r}")
        if self.weight_bits not in (0, 7, 8):
            raise PassError(f"quantize-dynamic: weight_bits must be 7, 8 or 0 (choose by measurement), not {self.weight_bits}")
        base = copy_model(model)
        if self.latency_fallback:
            plan.sites = _without_slower(base, plan.sites, ctx, plan.kept_float)
            plan.sites = _without_losing_convs(base, plan.sites, ctx, plan.kept_float)
            if not plan.sites:
                return PassResult(changed=False, details=details, notes=notes, refused=_refusals(plan.kept_float))
        reference = ctx.outputs(base)
        fmt, quantized, note = self._format(base, plan.sites, reference, ctx)
        notes += [note] if note else []
        chosen = plan.sites
        problem = ctx.budget_problem(reference, quantized) if reference else None
        if problem and self.fallback:
            chosen, problem = _back_off(base, plan.sites, fmt, reference, problem, ctx, plan.kept_float, self.sensitivity == "model")
            quantized = _quantized(base, chosen, fmt)
        if problem:
            notes.append(f"over budget on the calibration feeds even so: {problem}")
        if not chosen:
            return PassResult(changed=False, details=details, notes=notes, refused=_refusals(plan.kept_float))
        model.CopyFrom(quantized)
        details["quantized"] = dict(Counter(s.op_type for s in chosen))
        details["weight_bits"] = fmt.bits
        counts = {"nodes_quantized": len(chosen), "bytes_saved": initializer_bytes(base) - initializer_bytes(model)}
        return PassResult(changed=True, counts=counts, details=details, notes=notes, refused=_refusals(plan.kept_float))

    def _format(self, base, sites, reference, ctx) -> tuple["_Format", onnx.ModelProto, str | None]:
        """The weight format (bits) and the model quantized with it; with weight_bits=0, 8 and 7 bits are
        both tried and the one closer to the float model on the calibration feeds wins (ctx.fidelity)."""
        options = [_Format(self.per_channel, b) for b in ((8, 7) if self.weight_bits == 0 else (self.weight_bits,))]
        models = [_quantized(base, sites, f) for f in options]
        if len(options) == 1 or not reference:
            return options[0], models[0], None
        scores = [ctx.fidelity(reference, ctx.outputs(m)) for m in models]
        best = int(np.argmax(scores))
        note = f"{options[best].bits}-bit weights chosen by measurement: {ctx.fidelity_label} {scores[0]:.5f} with 8 bits, {scores[1]:.5f} with 7 bits on the calibration feeds"
        return options[best], models[best], note


@dataclass(frozen=True)
class _Format:
    per_channel: bool
    bits: int

    def quantize(self, w: np.ndarray) -> qdq.QuantizedWeight:
        """w as [K, N], int8 symmetric, per column or per tensor, within 2^(bits-1) - 1."""
        return qdq.quantize_per_channel(w, 1 if self.per_channel else None, self.bits)

    def quantize_recurrent(self, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """An LSTM weight [directions, 4*hidden, K] as DynamicQuantizeLSTM reads it: int8 [directions, K,
        4*hidden], and scales [directions, 4*hidden] (per gate column) or [directions]."""
        per_direction = [self.quantize(d.T) for d in w]
        return np.stack([q.values for q in per_direction]), np.stack([q.scale for q in per_direction]).astype(np.float32)


def _quantized(base: onnx.ModelProto, sites: list[_Site], fmt: _Format) -> onnx.ModelProto:
    candidate = copy_model(base)
    _apply(candidate, sites, fmt)
    return candidate


def _back_off(base, sites, fmt, reference, problem, ctx, kept_float, by_model: bool):
    """Return the most sensitive sites to float until the budget holds on the calibration feeds.
    The count is found by doubling, then bisection (the error is taken as monotone in the count)."""
    errors = _sensitivity(base, sites, ctx, fmt, reference, by_model)
    order = sorted(sites, key=lambda s: -errors[s])

    def problem_with(k: int) -> str | None:
        return ctx.budget_problem(reference, _quantized(base, order[k:], fmt))

    known: dict[int, str | None] = {0: problem}
    k = 1
    while k < len(order):
        known[k] = problem_with(k)
        if known[k] is None:
            break
        k *= 2
    else:
        k = len(order)
        known[k] = None  # all float: the input model itself
    ok = k
    low = max(n for n in known if known[n] is not None)
    while ok - low > 1:
        mid = (ok + low) // 2
        known[mid] = problem_with(mid)
        ok, low = (mid, low) if known[mid] is None else (ok, mid)
    for s in order[:ok]:
        measure = "model output cosine lost" if _judged_by_model(s, by_model) else "layer error"
        kept_float.append(_kept(s, "sensitive", f"{measure} {errors[s]:.4g}; returned to float to keep the budget ({problem})"))
    return order[ok:], known[ok]


def _sensitivity(base, sites, ctx, fmt: _Format, reference, all_by_model: bool = False) -> dict[_Site, float]:
    """How much each site suffers from quantization. Main-graph sites: the relative error of the node's
    output when only it is quantized, computed with numpy on its float input (one run exposing the
    inputs, streamed feed by feed). Sites inside bodies, whose inputs cannot be exposed, LSTMs, whose
    error runs through time, and every site with `all_by_model` (sensitivity=model): 1 - the lowest output
    cosine of the model with only that site quantized (one model run per site: slower, but it ranks by
    what reaches the outputs, which a layer's own error does not tell when residual paths dilute it)."""
    by_model = {s for s in sites if _judged_by_model(s, all_by_model)}
    errors = _layer_errors(base, [s for s in sites if s not in by_model], ctx.calibration, fmt)
    for s in sites:
        if s in by_model:
            errors[s] = 1.0 - min(qdq.output_cosines(reference, ctx.outputs(_quantized(base, [s], fmt))), default=1.0)
    return errors


def _judged_by_model(site: _Site, all_by_model: bool) -> bool:
    """Whether `site`'s sensitivity is the model's output error rather than its layer's (see _sensitivity)."""
    return all_by_model or site.graph != 0 or site.op_type == "LSTM"


def _layer_errors(model: onnx.ModelProto, sites: list[_Site], feeds, fmt: _Format) -> dict[_Site, float]:
    graph = model.graph
    made_by = producers(graph)
    nodes = {n.output[0]: n for n in graph.node if n.output}
    layers = {}
    for s in sites:
        node = nodes[s.output]
        w = _as_matrix(node, qdq.weight(graph, s.weight, made_by))
        layers[s] = (node.input[0], w, fmt.quantize(w).dequantized(), node.op_type == "Conv")
    squared = {s: [0.0, 0.0] for s in sites}
    for values in intermediates(model, feeds, sorted({x for x, _, _, _ in layers.values()})):
        for s, (x, w, w_deq, channels_first) in layers.items():
            if x not in values:
                continue
            rows = np.moveaxis(values[x], 1, -1) if channels_first else values[x]
            exact = rows @ w
            approx = qdq.fake_quantize_dynamic(rows) @ w_deq
            squared[s][0] += float(np.sum((approx - exact) ** 2))
            squared[s][1] += float(np.sum(exact**2))
    return {s: (np.sqrt(err / ref) if ref > 0 else 0.0) for s, (err, ref) in squared.items()}


def _refusals(kept_float: list[dict]) -> list[str]:
    return [f"{k['op_type']} '{k['node']}': {k['reason']} ({k['detail']})" for k in kept_float]


def _kept(site_or_node, reason: str, detail: str) -> dict:
    if isinstance(site_or_node, _Site):
        return {"node": site_or_node.node, "op_type": site_or_node.op_type, "reason": reason, "detail": detail}
    node = site_or_node
    return {"node": node.name or node.output[0], "op_type": node.op_type, "reason": reason, "detail": detail}


def _plan(model: onnx.ModelProto, ops: set[str], min_elements: int, keep: qdq.KeepFloat) -> _Plan:
    """Which nodes can be quantized, and why the others cannot (or, named by `keep`, are not)."""
    plan = _Plan()
    for index, graph in enumerate(iter_graphs(model.graph)):
        made_by = producers(graph)
        for node in graph.node:
            if node.op_type not in ops or node.op_type not in QuantizeDynamic.op_types or node.domain not in STANDARD_DOMAINS:
                continue
            if keep(node):
                plan.kept_float.append(_kept(node, "requested", keep.reason()))
                continue
            if node.op_type == "LSTM":
                _plan_lstm(plan, index, graph, node, made_by)
                continue
            why = _unsupported(graph, node, made_by)
            if why:
                plan.kept_float.append(_kept(node, "unsupported", why))
                continue
            w = qdq.weight(graph, node.input[1], made_by)
            if w.size < min_elements:
                plan.kept_float.append(_kept(node, "too small", f"weight has {w.size} elements < min_weight_elements={min_elements}"))
                continue
            plan.sites.append(_Site(index, node.output[0], node.name or node.output[0], node.op_type, node.input[1], int(w.size)))
    return plan


def _plan_lstm(plan: _Plan, index: int, graph: onnx.GraphProto, node: onnx.NodeProto, made_by) -> None:
    """An LSTM is a site when W and R are constant float32 [directions, 4*hidden, K] and the layout is
    onnxruntime's (time first). No size threshold: the latency guard measures each one."""
    weights = [qdq.weight(graph, name, made_by) for name in node.input[1:3]]
    if any(w is None for w in weights):
        why = "W or R is computed at run time or defined outside this graph, not a constant float weight"
    elif any(w.dtype != np.float32 or w.ndim != 3 for w in weights):
        why = "W and R must be float32 [directions, 4*hidden, K]"
    elif attribute(node, "layout", 0):
        why = "layout=1 (batch first): DynamicQuantizeLSTM takes time-first tensors only"
    else:
        why = None
    if why:
        plan.kept_float.append(_kept(node, "unsupported", why))
        return
    elements = sum(int(w.size) for w in weights)
    plan.sites.append(_Site(index, _key(node), node.name or _key(node), "LSTM", node.input[1], elements, node.input[2]))


def _key(node: onnx.NodeProto) -> str:
    """What identifies a site's node: its first named output (an LSTM may leave Y unnamed)."""
    return next((o for o in node.output if o), node.name)


def _without_slower(base: onnx.ModelProto, sites: list[_Site], ctx: PassContext, kept_float: list[dict]) -> list[_Site]:
    """`sites` without those whose quantized kernels take longer than their float kernels in onnxruntime's
    per-node profile (level all, two calibration feeds), everything quantized at once. A node inside an
    If/Loop/Scan body is profiled like any other, its time summed over the iterations of a run.

    Quantized side: the kernels of the nodes the rewrite made for the site, under the names it gave them
    (onnxruntime names DynamicQuantizeMatMul / MatMulIntegerToFloat after the MatMulInteger node it fuses),
    a DynamicQuantizeLinear shared by several sites split evenly among them. Float side: the site's node,
    under its name or a fusion's name built on it ("mm/MatMulAddFusion"), plus the nodes reading its output
    that the quantized profile no longer has (a bias Add fused into the integer kernel; not another site,
    which is gone because it was rewritten). The node making the site's input is charged to the quantized
    side when only the quantized profile shows it: the float kernel had absorbed it (PP-OCRv4's CTC head
    runs Transpose -> MatMul as one FusedMatMul with transA; quantized, the Transpose runs on its own). A
    site the float profile does not show (fused into something else) is not judged.

    A pointwise Conv runs in fp32 as onnxruntime's NCHWc Conv, named after the tensor it writes
    ("<output>_nchwc"), with the activation after it absorbed (Relu, Sigmoid, HardSigmoid and the Mul of
    x * HardSigmoid(x)), so it is found under its own output's name or its activation's; that activation
    runs on its own once the Conv is quantized, and is charged to the quantized side."""
    if not sites or not ctx.calibration:
        return sites
    named = copy_model(base)
    keys = {(s.graph, s.output) for s in sites}
    graphs = list(iter_graphs(named.graph))
    for graph in graphs:
        for node in graph.node:
            if node.output and not node.name:
                node.name = _key(node)  # names the two profiles share (sites' quantized nodes are named after them)
    readers, made_by = [consumers(graph) for graph in graphs], [producers(graph) for graph in graphs]
    site_nodes = {(index, _key(node)): node for index, graph in enumerate(graphs) for node in graph.node if node.output and (index, _key(node)) in keys}
    quantized = copy_model(named)
    charges = _apply(quantized, sites, _Format(True, 8))
    float_times, quant_times = ctx.node_times([named, quantized])
    float_names, quant_names, site_names = {t.name for t in float_times}, {t.name for t in quant_times}, {s.node for s in sites}
    slower = set()
    for s in sites:
        absorbed = _activation_after(s, readers[s.graph]) if s.op_type == "Conv" else []
        nchwc = {f"{o}_nchwc" for node in [site_nodes[(s.graph, s.output)], *absorbed] for o in node.output}
        mine = [t for t in float_times if t.name == s.node or t.name.startswith(s.node + "/") or t.name in nchwc]
        if not mine:
            continue
        fused_away = {r.name for r in readers[s.graph].get(s.output, []) if r.name and r.name not in quant_names and r.name not in site_names}
        f = sum(t.ms for t in mine) + sum(t.ms for t in float_times if t.name in fused_away)
        charged = [(t, len(charges[t.name])) for t in quant_times if s.node in charges.get(t.name, ())]
        unfused = {n.name for n in absorbed if n.name not in float_names}
        charged += [(t, 1) for t in quant_times if t.name in unfused]
        # the node making the site's input, when the float kernel absorbed it (a Transpose into FusedMatMul's
        # transA) and it runs on its own once the site is quantized, shared among the sites reading it
        source = made_by[s.graph].get(site_nodes[(s.graph, s.output)].input[0])
        if source is not None and source.name and source.name not in float_names:
            sharing = sum(1 for r in readers[s.graph].get(source.output[0], []) if r.output and (s.graph, _key(r)) in keys)
            charged += [(t, sharing) for t in quant_times if t.name == source.name]
        q = sum(t.ms / shared for t, shared in charged)
        if q > f:
            slower.add(s)
            detail = f"{_kernels(t for t, _ in charged)} {q:.3f} ms vs {_kernels(mine)} {f:.3f} ms per run (onnxruntime profile)"
            kept_float.append(_kept(s, "slower", detail))
    return [s for s in sites if s not in slower]


def _without_losing_convs(base: onnx.ModelProto, sites: list[_Site], ctx: PassContext, kept_float: list[dict]) -> list[_Site]:
    """`sites` without its pointwise Convs when the model quantized with them is not faster than the model
    quantized without them (ctx.latency, interleaved). The per-node profile cannot see what they cost
    their float neighbours: onnxruntime reorders a tensor out of its NCHWc layout and back around each
    float Conv they leave between them, in nodes it names only "ReorderInput" / "ReorderOutput"."""
    convs = [s for s in sites if s.op_type == "Conv"]
    if not convs or not ctx.calibration:
        return sites
    rest = [s for s in sites if s.op_type != "Conv"]
    fmt = _Format(True, 8)
    timings = ctx.latency([("without the pointwise Convs", _quantized(base, rest, fmt)), ("with them", _quantized(base, sites, fmt))])
    ratio = timings[1].ratio
    if ratio < 1.0:
        return sites
    for s in convs:
        kept_float.append(_kept(s, "slower", f"the {len(convs)} pointwise Convs the profile found faster, timed together: latency ratio {ratio:.3f} with them to without them"))
    return rest


ABSORBED_ACTIVATIONS = frozenset({"Relu", "Sigmoid", "HardSigmoid", "Clip", "LeakyRelu"})


def _activation_after(site: _Site, readers: dict[str, list[onnx.NodeProto]]) -> list[onnx.NodeProto]:
    """The activation an fp32 NCHWc Conv absorbs after the site's Conv: its one reader when that is an
    activation, and, after a Sigmoid or HardSigmoid, the Mul by the Conv's output that completes a
    SiLU or HardSwish."""
    after = readers.get(site.output, [])
    act = [r for r in after if r.op_type in ABSORBED_ACTIVATIONS and r.domain in STANDARD_DOMAINS]
    if len(act) != 1:
        return []
    gate = [r for r in after if r is not act[0]]
    if not gate:
        return act
    completes = act[0].op_type in ("Sigmoid", "HardSigmoid") and len(gate) == 1 and gate[0].op_type == "Mul"
    return act + gate if completes and act[0].output[0] in gate[0].input else []


def _kernels(times) -> str:
    return " + ".join(dict.fromkeys(t.op_type for t in times))


def _unsupported(graph: onnx.GraphProto, node: onnx.NodeProto, made_by) -> str | None:
    w = qdq.weight(graph, node.input[1], made_by)
    if w is None:
        return f"input {'W' if node.op_type == 'Conv' else 'B'} is computed at run time or defined outside this graph, not a constant float weight"
    if w.dtype != np.float32:
        return f"weight is {w.dtype}; DynamicQuantizeLinear takes float32 only"
    if node.op_type == "Conv":
        return _not_pointwise(node, w)
    if w.ndim != 2:
        return f"weight has rank {w.ndim}; only 2-D weights are quantized"
    if node.op_type == "Gemm" and attribute(node, "transA", 0):
        return "Gemm with transA=1 (the activation would need a Transpose first)"
    return None


def _not_pointwise(node: onnx.NodeProto, w: np.ndarray) -> str | None:
    """Why a Conv is not a product over its channels alone (None when it is)."""
    spatial = w.ndim - 2
    if spatial < 1 or any(d != 1 for d in w.shape[2:]):
        return f"kernel {list(w.shape[2:])} is not 1x1: only pointwise Convs are a matrix product"
    if attribute(node, "group", 1) != 1:
        return f"group={attribute(node, 'group', 1)}: only group 1 is one matrix product"
    if any(s != 1 for s in attribute(node, "strides", [1] * spatial)):
        return f"strides {list(attribute(node, 'strides'))}: only stride 1 reads every position"
    if any(attribute(node, "pads", [])):  # auto_pad SAME_* pads nothing for a 1x1 kernel at stride 1
        return f"pads {list(attribute(node, 'pads'))}: padded positions would need zeros written first"
    return None


def _as_matrix(node: onnx.NodeProto, w: np.ndarray) -> np.ndarray:
    """The weight as the [K, N] right-hand side of the integer product."""
    if node.op_type == "Conv":
        return w.reshape(w.shape[0], -1).T
    return w.T if node.op_type == "Gemm" and attribute(node, "transB", 0) else w


def _channels_last(rank: int) -> tuple[list[int], list[int]]:
    """Transpose permutations that move axis 1 last and back, for a tensor of `rank`."""
    return [0, *range(2, rank), 1], [0, rank - 1, *range(1, rank - 1)]


def _apply(model: onnx.ModelProto, sites: list[_Site], fmt: _Format) -> dict[str, list[str]]:
    """Rewrite the given sites in place. Returns, for each node the rewrite made, the sites (their `node`)
    it serves: what the latency guard charges its kernel time to."""
    if any(s.op_type == "LSTM" for s in sites):
        qdq.ensure_domain(model, MS_DOMAIN)
    names = NameGenerator(model)
    by_graph: dict[int, dict[str, _Site]] = {}
    for s in sites:
        by_graph.setdefault(s.graph, {})[s.output] = s
    graphs = list(enumerate(iter_graphs(model.graph)))
    # Innermost first: rebuilding a graph's node list copies its nodes, and so detaches the bodies they
    # hold from any reference taken before; bodies are therefore finished before their owners are rebuilt.
    charges: dict[str, list[str]] = {}
    for index, graph in reversed(graphs):
        if index in by_graph:
            rewriter = _GraphRewriter(graph, names, fmt)
            rewriter.rewrite(by_graph[index])
            charges.update(rewriter.charges)
    return charges


class _GraphRewriter:
    """Quantizes sites of one graph: weights once per initializer, activations once per tensor."""

    def __init__(self, graph: onnx.GraphProto, names: NameGenerator, fmt: _Format):
        self.graph, self.names, self.fmt = graph, names, fmt
        self.made_by = producers(graph)
        self.weights: dict[tuple[str, bool, float], tuple[str, str]] = {}
        self.recurrent: dict[str, tuple[str, str, str]] = {}
        self.activations: dict[str, tuple[str, str, str]] = {}
        self.quantizers: dict[str, str] = {}  # activation -> its DynamicQuantizeLinear node
        self.transposed: dict[str, tuple[str, str]] = {}  # a pointwise Conv's input -> (it channels last, the Transpose)
        self.charges: dict[str, list[str]] = {}  # node made -> the sites it serves

    def rewrite(self, sites: dict[str, _Site]) -> None:
        old = {s.weight for s in sites.values()} | {s.recurrence for s in sites.values() if s.recurrence}
        nodes: list[onnx.NodeProto] = []
        for node in self.graph.node:
            if node.output and _key(node) in sites:
                made, reads = (self._lstm(node), []) if node.op_type == "LSTM" else self._replacement(node)
                site = sites[_key(node)].node
                for n in made:
                    self.charges.setdefault(n.name, []).append(site)
                for shared in reads:  # made for an earlier site, now read by this one too
                    if shared not in {n.name for n in made}:
                        self.charges[shared].append(site)
                nodes.extend(made)
                old.update(node.input[2:3])
            else:
                nodes.append(node)
        del self.graph.node[:]
        self.graph.node.extend(nodes)
        drop_unread(self.graph, old)

    def _replacement(self, node: onnx.NodeProto) -> tuple[list[onnx.NodeProto], list[str]]:
        """The nodes replacing a MatMul, Gemm or pointwise Conv, and the names of the nodes made once per
        activation that it reads through (its Transpose, its DynamicQuantizeLinear), which may be among
        them or made for an earlier site."""
        x, y = node.input[0], node.output[0]
        alpha = float(attribute(node, "alpha", 1.0)) if node.op_type == "Gemm" else 1.0
        new: list[onnx.NodeProto] = []
        stem = node.name or y
        pointwise = node.op_type == "Conv"
        if pointwise:
            rank = qdq.weight(self.graph, node.input[1], self.made_by).ndim
            x = self._channels_last(x, rank, new)
        x_q, x_scale, x_zero = self._activation(x, new)
        reads = [self.quantizers[x]] + ([self.transposed[node.input[0]][1]] if pointwise else [])
        w_q, w_scale = self._weight(node, alpha)
        integer, as_float, scale = self.names(f"{y}_int32"), self.names(f"{y}_int_as_float"), self.names(f"{y}_scale")
        has_bias = node.op_type in ("Gemm", "Conv") and len(node.input) > 2 and node.input[2]
        result = self.names(f"{y}_channels_last") if pointwise else y
        product = self.names(f"{y}_product") if has_bias else result
        new += [
            helper.make_node("MatMulInteger", [x_q, w_q, x_zero], [integer], name=self.names(f"{stem}_MatMulInteger")),
            helper.make_node("Cast", [integer], [as_float], name=self.names(f"{stem}_Cast"), to=TensorProto.FLOAT),
            helper.make_node("Mul", [x_scale, w_scale], [scale], name=self.names(f"{stem}_scale_Mul")),
            helper.make_node("Mul", [as_float, scale], [product], name=self.names(f"{stem}_Mul")),
        ]
        if has_bias:
            new += self._bias(node, product, result, stem)
        if pointwise:
            new.append(helper.make_node("Transpose", [result], [y], name=self.names(f"{stem}_channels_first"), perm=_channels_last(rank)[1]))
        return new, reads

    def _channels_last(self, x: str, rank: int, new: list[onnx.NodeProto]) -> str:
        """`x` with its channel axis moved last, transposed once for all the pointwise Convs reading it."""
        if x not in self.transposed:
            self.transposed[x] = (self.names(f"{x}_channels_last"), self.names(f"{x}_Transpose"))
            new.append(helper.make_node("Transpose", [x], [self.transposed[x][0]], name=self.transposed[x][1], perm=_channels_last(rank)[0]))
        return self.transposed[x][0]

    def _lstm(self, node: onnx.NodeProto) -> list[onnx.NodeProto]:
        """DynamicQuantizeLSTM with the LSTM's inputs, attributes (layout is 0 here) and name."""
        (w_q, w_s, w_z), (r_q, r_s, r_z) = (self._recurrent_weight(name) for name in node.input[1:3])
        optional = (list(node.input[3:8]) + [""] * 5)[:5]  # B, sequence_lens, initial_h, initial_c, P
        inputs = [node.input[0], w_q, r_q, *optional, w_s, w_z, r_s, r_z]
        attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute if a.name in LSTM_ATTRIBUTES}
        name = node.name or _key(node)
        return [helper.make_node("DynamicQuantizeLSTM", inputs, list(node.output), name=name, domain=MS_DOMAIN, **attributes)]

    def _recurrent_weight(self, name: str) -> tuple[str, str, str]:
        """An LSTM's W or R as DynamicQuantizeLSTM's int8 weight, scale and zero point, made once per weight."""
        if name not in self.recurrent:
            values, scale = self.fmt.quantize_recurrent(qdq.weight(self.graph, name, self.made_by))
            q_name, s_name, z_name = self.names(f"{name}_quantized"), self.names(f"{name}_scale"), self.names(f"{name}_zero_point")
            self.graph.initializer.extend(
                [numpy_helper.from_array(values, q_name), qdq.float_tensor(s_name, scale), numpy_helper.from_array(np.zeros(scale.shape, np.int8), z_name)]
            )
            self.recurrent[name] = (q_name, s_name, z_name)
        return self.recurrent[name]

    def _activation(self, x: str, new: list[onnx.NodeProto]) -> tuple[str, str, str]:
        if x not in self.activations:
            outs = (self.names(f"{x}_quantized"), self.names(f"{x}_scale"), self.names(f"{x}_zero_point"))
            self.quantizers[x] = self.names(f"{x}_DynamicQuantizeLinear")
            new.append(helper.make_node("DynamicQuantizeLinear", [x], list(outs), name=self.quantizers[x]))
            self.activations[x] = outs
        return self.activations[x]

    def _weight(self, node: onnx.NodeProto, alpha: float) -> tuple[str, str]:
        name = node.input[1]
        key = (name, node.op_type == "Gemm" and bool(attribute(node, "transB", 0)), alpha)
        if key not in self.weights:
            q = self.fmt.quantize(_as_matrix(node, qdq.weight(self.graph, name, self.made_by)))
            scale = (q.scale * np.float32(alpha)).astype(np.float32)
            q_name, s_name = self.names(f"{name}_quantized"), self.names(f"{name}_scale")
            self.graph.initializer.extend([numpy_helper.from_array(np.ascontiguousarray(q.values), q_name), qdq.float_tensor(s_name, scale)])
            self.weights[key] = (q_name, s_name)
        return self.weights[key]

    def _bias(self, node: onnx.NodeProto, product: str, y: str, stem: str) -> list[onnx.NodeProto]:
        """Gemm's C, times beta, added in float."""
        beta = float(attribute(node, "beta", 1.0))
        c = node.input[2]
        value = qdq.weight(self.graph, c, self.made_by)
        if beta != 1.0 and value is not None:
            c = self.names(f"{c}_times_beta")
            self.graph.initializer.append(numpy_helper.from_array((value * beta).astype(value.dtype), c))
        elif beta != 1.0:
            beta_name, scaled = self.names(f"{stem}_beta"), self.names(f"{c}_times_beta")
            self.graph.initializer.append(qdq.float_tensor(beta_name, np.array(beta)))
            return [
                helper.make_node("Mul", [c, beta_name], [scaled], name=self.names(f"{stem}_beta_Mul")),
                helper.make_node("Add", [product, scaled], [y], name=self.names(f"{stem}_bias_Add")),
            ]
        return [helper.make_node("Add", [product, c], [y], name=self.names(f"{stem}_bias_Add"))]
