"""smooth-quant: move activation outliers into the weights, so that activations quantize with less error.

For an activation x read by MatMul/Gemm nodes with constant weights, with per-channel maxima m_j = max|x_j|
over the calibration feeds (channel = last axis) and w_j = the largest |weight| in input row j across those
nodes, s_j = m_j^alpha / w_j^(1 - alpha). x is divided by s (folded into the node producing x) and every
weight's input row j is multiplied by s_j: exact in float, only the activation's range gets flatter.
x qualifies when max_j m_j / median_j m_j >= min_outlier_ratio (otherwise there is nothing to flatten).

Rewrites (main graph only; If/Loop/Scan bodies are left alone, their activations cannot be observed):
  LayerNormalization(axis=-1, scale, bias) -> x         => scale / s, bias / s
  MatMul(., W 2-D constant) -> x                         => W's output columns / s
  Gemm(., B constant, C constant or absent) -> x         => B's output columns / s (transB respected), C / s
  Mul(., c constant) -> x                                => c / s
  Add(y, c constant) -> x, y made by any case above      => c / s, and y's producer divided too (y read only here)
  GELU spelled out with Erf (x * 0.5 * (1 + erf(x / sqrt(2))), any order) -> x
                                                         => a Mul(x, 1 / s) after it, read by the MatMul/Gemm
                                                            readers only: onnxruntime fuses the spelled-out
                                                            GELU into one kernel only while its constants are
                                                            scalars (MiniLM: 4 of its 6 GELUs were no longer
                                                            fused when their 0.5 became per channel)
  x -> MatMul(x, W 2-D constant) / Gemm(x, B, transA=0)  => W's input rows * s (B's columns when transB=1)
  x -> any other reader (residual Add, ...)              => that reader gets Mul(x', s), with restore_others=true
  x -> Shape/Size                                        => unchanged (the shape does not change)

Refused (named in `refused` and details["refused"]):
  x has no outlier channels (ratio below min_outlier_ratio)
  x's producer is none of the cases above (Gelu, Reshape, a graph input ...), or a constant it needs is
    computed, or (Add) its other input's producer cannot be divided or is read elsewhere
  LayerNormalization normalizing over other axes than the last
  x has a reader other than such MatMul/Gemm and restore_others=false, or x is a graph output
  a constant that does not broadcast along x's last axis (its last dim is neither 1 nor x's channels)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper

from graphopt.activations import intermediates
from graphopt.graph import (
    STANDARD_DOMAINS,
    NameGenerator,
    attribute,
    consumers,
    drop_unread,
    is_op,
    output_names,
    producers,
    rename_node_reads,
)
from graphopt.passes import qdq
from graphopt.passes_base import Pass, PassContext, PassResult, register

SHAPE_ONLY = ("Shape", "Size")
ALPHA_GRID = (0.25, 0.5, 0.75, 0.9)  # tried with search=true
MIN_GAIN = 0.95  # smoothing must cut the estimated error by at least 5%
SAMPLE_ROWS = 32


class _Refused(Exception):
    """A candidate activation that cannot be smoothed; the message says why."""


@dataclass
class _Division:
    """A constant input of a producer node that must be divided by s along `axis` (None: the last axis)."""

    node: onnx.NodeProto
    input_index: int
    axis: int | None = None


@dataclass
class _Candidate:
    activation: str
    linear: list[onnx.NodeProto]  # MatMul/Gemm readers whose weights take s
    others: list[onnx.NodeProto]  # readers that get Mul(x', s)
    divisions: list[_Division] = field(default_factory=list)
    explicit: bool = False  # x / s is a Mul of its own that only the MatMul/Gemm readers read


@register
@dataclass
class SmoothQuant(Pass):
    name = "smooth-quant"
    description = "divide activations with outlier channels by a per-channel scale folded into the producer, multiply it into the MatMul/Gemm weights"
    lossless = False

    alpha: float = 0.5
    search: bool = True
    min_outlier_ratio: float = 5.0
    restore_others: bool = True

    def run(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        graph = model.graph
        refused: list[str] = []
        made_by, readers = producers(graph), consumers(graph)
        candidates = []
        for x, (linear, others) in _linear_readers(graph).items():
            try:
                candidates.append(self._candidate(graph, x, linear, others, made_by, readers))
            except _Refused as why:
                refused.append(f"{x}: {why}")
        maxima = _channel_maxima(model, [c.activation for c in candidates], ctx.calibration)
        outliers = []
        for c in candidates:
            try:
                ratio = _outlier_ratio(maxima.get(c.activation))
                if ratio < self.min_outlier_ratio:
                    raise _Refused(f"no outlier channels: max/median of per-channel max |x| is {ratio:.2f} < min_outlier_ratio={self.min_outlier_ratio}")
                outliers.append((c, ratio, _stacked_weights(graph, c, maxima[c.activation].size)))
            except _Refused as why:
                refused.append(f"{c.activation}: {why}")
        alphas = ALPHA_GRID if self.search else (self.alpha,)
        errors = _errors(model, ctx.calibration, [(c.activation, w, [None] + [_scales(maxima[c.activation], w, a) for a in alphas]) for c, _, w in outliers])
        names = NameGenerator(model)
        smoothed, replaced, restores = [], set(), []
        for c, ratio, w in outliers:
            before, *after = errors[c.activation]
            best = int(np.argmin(after))
            try:
                if not after[best] < MIN_GAIN * before:
                    raise _Refused(f"smoothing does not lower the estimated quantization error enough (relative error {before:.4g} -> {after[best]:.4g} at best, alpha={alphas[best]})")
                s = _scales(maxima[c.activation], w, alphas[best])
                replaced |= _rewrite(graph, c, s, names, restores)
            except _Refused as why:
                refused.append(f"{c.activation}: {why}")
                continue
            smoothed.append({
                "activation": c.activation, "alpha": alphas[best], "outlier_ratio": round(ratio, 2),
                "ratio_after": round(_outlier_ratio(maxima[c.activation] / s), 2),
                "estimated_error": [round(before, 5), round(after[best], 5)],
                "weights": [n.name or n.output[0] for n in c.linear], "restored_for": [] if c.explicit else [n.name or n.output[0] for n in c.others],
                "divided_by": "an explicit Mul (the producer ends a GELU)" if c.explicit else "the producer's constants",
            })
        _insert_after_producers(graph, restores)
        drop_unread(graph, replaced)
        details = {"smoothed": smoothed, "refused": refused}
        return PassResult(changed=bool(smoothed), counts={"activations_smoothed": len(smoothed)}, refused=refused, details=details)

    def _candidate(self, graph: onnx.GraphProto, x: str, linear, others, made_by, readers) -> _Candidate:
        if x in output_names(graph):
            raise _Refused("it is a graph output (its value must stay as it is)")
        if _ends_erf_gelu(made_by.get(x), made_by):
            return _Candidate(x, linear, others, explicit=True)
        if others and not self.restore_others:
            kinds = ", ".join(sorted({n.op_type for n in others}))
            raise _Refused(f"it is also read by {kinds}, not only by MatMul/Gemm with a constant weight (restore_others=false)")
        return _Candidate(x, linear, others, _divisions(graph, x, made_by, readers))


def _stacked_weights(graph: onnx.GraphProto, c: _Candidate, channels: int) -> np.ndarray:
    """The readers' weights side by side as [input channels, all their output channels]."""
    parts = []
    for node in c.linear:
        w = _input_rows(node, qdq.weight(graph, node.input[1]))
        if w.shape[0] != channels:
            raise _Refused(f"{node.op_type} '{node.name}' weight has {w.shape[0]} input rows, the activation {channels} channels")
        parts.append(w)
    return np.concatenate(parts, axis=1)


def _scales(x_max: np.ndarray, w: np.ndarray, alpha: float) -> np.ndarray:
    """s_j = max|x_j|^alpha / max|W_j|^(1-alpha); 1 where either is zero."""
    w_max = np.abs(w).max(axis=1)
    ok = (x_max > 0) & (w_max > 0)
    s = np.ones_like(x_max, dtype=np.float64)
    s[ok] = x_max[ok] ** alpha / w_max[ok] ** (1.0 - alpha)
    return np.clip(s, 1e-5, 1e5)


def _errors(model: onnx.ModelProto, feeds, jobs) -> dict[str, list[float]]:
    """For each (activation, stacked weight, scale options): the relative error of x @ W when x / s is
    quantized per tensor (uint8, this feed's range, as DynamicQuantizeLinear does) and s * W per column
    (int8), for each option (None: no smoothing). Streamed feed by feed; at most SAMPLE_ROWS rows of each
    feed enter the products (the range is taken over the whole tensor)."""
    totals = {x: np.zeros((len(options), 2)) for x, _, options in jobs}
    if not jobs or not feeds:
        return {x: [0.0] * len(options) for x, _, options in jobs}
    quantized_w = {x: [qdq.quantize_per_channel(w * (1.0 if s is None else s[:, None]), 1).dequantized() for s in options] for x, w, options in jobs}
    for values in intermediates(model, feeds, [x for x, _, _ in jobs]):
        for x, w, options in jobs:
            if x not in values:
                continue
            rows = np.asarray(values[x], dtype=np.float32).reshape(-1, w.shape[0])
            sample = rows[:: max(1, len(rows) // SAMPLE_ROWS)]
            exact = sample @ w
            for k, s in enumerate(options):
                scaled = rows if s is None else rows / s.astype(np.float32)
                lo, hi = float(scaled.min()), float(scaled.max())
                xs = scaled[:: max(1, len(rows) // SAMPLE_ROWS)]
                approx = qdq.fake_quantize_dynamic(xs, lo, hi) @ quantized_w[x][k]
                totals[x][k] += (float(np.sum((approx - exact) ** 2)), float(np.sum(exact**2)))
    return {x: [float(np.sqrt(e / r)) if r > 0 else 0.0 for e, r in t] for x, t in totals.items()}


def _linear_readers(graph: onnx.GraphProto) -> dict[str, tuple[list, list]]:
    """Activations read as input A by MatMul/Gemm with a constant 2-D float weight -> (those readers,
    the other readers that need the unscaled value; Shape/Size excluded)."""
    readers = consumers(graph)
    found: dict[str, tuple[list, list]] = {}
    for node in graph.node:
        if _takes_row_scaling(graph, node) and node.input[0] not in found:
            x = node.input[0]
            linear = [n for n in readers.get(x, []) if _takes_row_scaling(graph, n) and n.input[0] == x and x not in n.input[1:]]
            others = [n for n in readers.get(x, []) if all(n is not m for m in linear) and n.op_type not in SHAPE_ONLY]
            found[x] = (linear, others)
    return found


def _takes_row_scaling(graph: onnx.GraphProto, node: onnx.NodeProto) -> bool:
    if node.domain not in STANDARD_DOMAINS or node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2:
        return False
    if node.op_type == "Gemm" and attribute(node, "transA", 0):
        return False
    w = qdq.weight(graph, node.input[1])
    return w is not None and w.ndim == 2


def _input_rows(node: onnx.NodeProto, w: np.ndarray) -> np.ndarray:
    """The weight as [input channels, output channels]."""
    return w.T if node.op_type == "Gemm" and attribute(node, "transB", 0) else w


def _divisions(graph: onnx.GraphProto, x: str, made_by, readers) -> list[_Division]:
    """The constants to divide by s so that the node producing `x` outputs x / s."""
    node = made_by.get(x)
    if node is None:
        raise _Refused("it is a graph input or initializer; no producer to fold the division into")
    if node.domain not in STANDARD_DOMAINS:
        raise _Refused(f"its producer {node.op_type} ({node.domain}) cannot absorb a per-channel scale")
    constant = lambda k: len(node.input) > k and node.input[k] and qdq.weight(graph, node.input[k]) is not None  # noqa: E731
    if node.op_type == "LayerNormalization":
        if attribute(node, "axis", -1) != -1:
            raise _Refused("its LayerNormalization normalizes over more than the last axis")
        if not constant(1) or (len(node.input) > 2 and node.input[2] and not constant(2)):
            raise _Refused("its LayerNormalization's scale or bias is computed")
        return [_Division(node, k) for k in (1, 2) if len(node.input) > k and node.input[k]]
    if node.op_type in ("MatMul", "Gemm") and _takes_row_scaling(graph, node):
        if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2] and not constant(2):
            raise _Refused("its Gemm's C is computed")
        weight_axis = 0 if node.op_type == "Gemm" and attribute(node, "transB", 0) else 1
        extra = [_Division(node, 2)] if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2] else []
        return [_Division(node, 1, weight_axis)] + extra
    if node.op_type == "Mul" and len(node.input) == 2:
        k = 1 if constant(1) else 0 if constant(0) else None
        if k is None:
            raise _Refused("its Mul has no constant operand")
        return [_Division(node, k)]
    if node.op_type == "Add" and len(node.input) == 2 and (constant(0) or constant(1)):
        k = 1 if constant(1) else 0
        y = node.input[1 - k]
        if len(readers.get(y, [])) != 1 or y in output_names(graph):
            raise _Refused(f"its Add's other input {y} is read elsewhere too")
        return [_Division(node, k)] + _divisions(graph, y, made_by, readers)
    raise _Refused(f"its producer {node.op_type} cannot absorb a per-channel scale")


def _ends_erf_gelu(node: onnx.NodeProto | None, made_by) -> bool:
    """`node` is the last Mul of a GELU spelled out with Erf: an Erf within three Add/Mul steps up."""

    def erf_above(name: str, steps: int) -> bool:
        p = made_by.get(name)
        return p is not None and (is_op(p, "Erf") or (steps > 1 and (is_op(p, "Add") or is_op(p, "Mul")) and any(erf_above(i, steps - 1) for i in p.input)))

    return is_op(node, "Mul") and any(erf_above(i, 3) for i in node.input)


def _channel_maxima(model: onnx.ModelProto, names: list[str], feeds) -> dict[str, np.ndarray]:
    """Per-channel (last axis) max |x| over the feeds, streamed one feed at a time."""
    maxima: dict[str, np.ndarray] = {}
    if not names or not feeds:
        return maxima
    for values in intermediates(model, feeds, names):
        for name, value in values.items():
            a = np.abs(np.asarray(value, dtype=np.float64)).reshape(-1, value.shape[-1]).max(axis=0)
            maxima[name] = np.maximum(maxima[name], a) if name in maxima else a
    return maxima


def _outlier_ratio(channel_max: np.ndarray | None) -> float:
    if channel_max is None or channel_max.size == 0:
        raise _Refused("no calibration statistics (no feeds, or the activation was empty)")
    median = float(np.median(channel_max))
    return float(channel_max.max()) / median if median > 0 else float("inf")


def _rewrite(graph: onnx.GraphProto, c: _Candidate, s: np.ndarray, names: NameGenerator, restores: list) -> set[str]:
    """Divide the producer's constants by s (or x by an explicit Mul), multiply the readers' weight rows by
    s, restore x for others (the new Mul nodes are appended to `restores`, to be placed once all rewrites
    are done: rebuilding the node list detaches the node objects other candidates hold). Every changed constant becomes a new
    initializer (the old one may be shared with other nodes); returns the names replaced."""
    if c.explicit:
        restores.append(_divide_explicitly(graph, c, s, names))
        return {n.input[1] for n in c.linear}
    channels = s.size
    updates = []
    for d in c.divisions:
        value = qdq.weight(graph, d.node.input[d.input_index])
        updates.append((d.node, d.input_index, _divide(value, s, d.axis, channels)))
    replaced = {d.node.input[d.input_index] for d in c.divisions} | {n.input[1] for n in c.linear}
    builder = qdq.QdqBuilder(graph, names)
    _scale_weights(graph, c, s, builder)
    for node, k, value in updates:
        node.input[k] = builder.initializer(f"{node.input[k]}_smoothed", value)
    if c.others:
        restores.append(_restore(graph, c, s, names))
    return replaced


def _scale_weights(graph: onnx.GraphProto, c: _Candidate, s: np.ndarray, builder: qdq.QdqBuilder) -> None:
    """Multiply the input rows of the readers' weights by s (new initializers; a shared one scaled once)."""
    scaled: dict[tuple[str, bool], str] = {}
    for node in c.linear:
        trans = node.op_type == "Gemm" and bool(attribute(node, "transB", 0))
        key = (node.input[1], trans)
        if key not in scaled:
            w = qdq.weight(graph, node.input[1])
            new = (w * s[None, :] if trans else w * s[:, None]).astype(w.dtype)
            scaled[key] = builder.initializer(f"{node.input[1]}_smoothed", new)
        node.input[1] = scaled[key]


def _divide_explicitly(graph: onnx.GraphProto, c: _Candidate, s: np.ndarray, names: NameGenerator) -> onnx.NodeProto:
    """The MatMul/Gemm readers read x * (1 / s) from a Mul of their own, with s in their weights; returns
    that Mul. The other readers keep reading x."""
    dtype = qdq.weight(graph, c.linear[0].input[1]).dtype
    builder = qdq.QdqBuilder(graph, names)
    inverse = builder.initializer(f"{c.activation}_smoothing_inverse", (1.0 / s).astype(dtype))
    divided = names(f"{c.activation}_smoothed")
    for node in c.linear:
        rename_node_reads(node, {c.activation: divided})
    _scale_weights(graph, c, s, builder)
    return helper.make_node("Mul", [c.activation, inverse], [divided], name=names(f"{c.activation}_smooth_Mul"))


def _divide(value: np.ndarray, s: np.ndarray, axis: int | None, channels: int) -> np.ndarray:
    if axis is not None:
        shape = [1] * value.ndim
        shape[axis] = channels
        return (value / s.reshape(shape)).astype(value.dtype)
    if value.ndim and value.shape[-1] not in (1, channels):
        raise _Refused(f"a constant of shape {list(value.shape)} does not broadcast along the {channels} channels")
    return (value / s).astype(value.dtype)


def _restore(graph: onnx.GraphProto, c: _Candidate, s: np.ndarray, names: NameGenerator) -> onnx.NodeProto:
    """Readers other than the MatMul/Gemm read x' * s (= x up to rounding) instead; returns that Mul."""
    dtype = qdq.weight(graph, c.linear[0].input[1]).dtype
    scale = qdq.QdqBuilder(graph, names).initializer(f"{c.activation}_smoothing_scale", s.astype(dtype))
    restored = names(f"{c.activation}_unsmoothed")
    for node in c.others:
        rename_node_reads(node, {c.activation: restored})
    return helper.make_node("Mul", [c.activation, scale], [restored], name=names(f"{c.activation}_unsmooth_Mul"))


def _insert_after_producers(graph: onnx.GraphProto, muls: list[onnx.NodeProto]) -> None:
    """Place each Mul right after the node producing its input (one rebuild of the node list)."""
    if not muls:
        return
    after = {m.input[0]: m for m in muls}
    nodes = []
    for node in graph.node:
        nodes.append(node)
        nodes.extend(after[o] for o in node.output if o in after)
    del graph.node[:]
    graph.node.extend(nodes)
