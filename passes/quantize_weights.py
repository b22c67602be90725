"""quantize-weights: weight-only int4/int8 quantization of MatMul/Gemm/Conv/LSTM/GRU/RNN weights and Gather tables, for size.

Activations stay float; only constant weights are stored as integers plus scales. Rewrites (main graph):
  MatMul(x, W [K, N]) => MatMul(x, DequantizeLinear(W_q, scales, block_size along K))   format dequantize
  MatMul(x, W [K, N]) => com.microsoft.MatMulNBits(x, W_q packed [N, K/block, block*bits/8], scales)   format matmulnbits
  MatMul(x, W [K, N]) => MatMul(x, Reshape(Cast(W_q) [- zero] * scales))   format folded: only constants feed
    the restore, so onnxruntime's constant folding turns it back into the float W when it loads the model
    (file of int4, speed and memory of float; DequantizeLinear is the one op it never folds)
  Gemm(a, B, C) => the same with B's reduction axis following transB; as MatMulNBits (C as its bias) only
    when transA=0, alpha=beta=1 and C is absent or holds N values, else through DequantizeLinear
  Conv(x, W [M, C/group, k...]) => Conv(x, Reshape(restored W as [M, C/group * k...]))   formats dequantize /
    folded (any format name: MatMulNBits has no Conv form); blocks along the flattened kernel, per-channel
    scales per output channel; rounded to nearest (GPTQ would need the unfolded image patches)
  LSTM/GRU/RNN(x, W [D, G*H, I], R [D, G*H, H]) => the same with restored W and R, each quantized as its
    [D*G*H, I or H] view (blocks along the last axis, one scale per gate row), Reshape back; formats
    dequantize / folded, rounded to nearest
  Gather(T [V, D], ids, axis 0) => Gather(restored T, ids), blocks along D   formats dequantize / folded
  Gather(T [V, D], ids, axis 0) => com.microsoft.GatherBlockQuantized(T_q, ids, scales)   format matmulnbits
  MatMul/Gemm(x, Transpose(W)) (a tied embedding after fold-shared-weights) => the transposed weight's
    quantized form: stored once, read by the table's Gather and by the MatMul
  A weight read by several nodes is quantized once; one restore (or one packed tensor) serves all.
bits 4 or 8; block_size 16/32/64/128/... along the reduction axis, or 0 for one scale per output channel
(per row of a table); symmetric (zero point 0) or asymmetric (uint with zero points). method gptq rounds
MatMul/Gemm weights with GPTQ (passes/gptq.py) on H = 2 X^T X streamed over the calibration feeds; tables
always use round-to-nearest. format auto builds every applicable form and keeps the one onnxruntime runs
fastest on the target (ctx.latency, cached in ctx.decisions, said in the notes). DequantizeLinear with int4
or blocks and Cast from int4 need opset 21 (13 for per-axis int8): the pass upgrades the model and says so.

Accuracy guard: the quantized model is checked against the input on the calibration feeds
(ctx.budget_problem). Over budget, weights are ranked by their relative layer-output error (with X^T X
from the calibration feeds; a table by its relative weight error) and the worst move to int8 (when bits
is 4), then to float, in doubling steps until the budget holds (details int8_fallback / kept_float).

Refused (in `refused`, weight left float):
  a node whose name matches `keep_float` (a regular expression): it reads its weight float (a weight it
    shares with other nodes is quantized for them, and the float copy stays in the file)
  a weight computed from constants at run time (run fold-constants first) or overridable by a graph input
  weights that are not float32, not 2-D (a Conv kernel: rank >= 3; a recurrent W or R: rank 3), or smaller
    than min_weight_elements
  Gather on an axis other than 0
  a weight whose readers need different reduction axes (e.g. a Gather table also read as MatMul's [K, N])
MatMul/Gemm/Gather/Conv whose operand is an activation are not weights and are not listed, nor is a weight
already quantized (restored by a DequantizeLinear or a Cast of integers: another quantization pass's work).
Subgraphs (If/Loop/Scan bodies) are left float: their weights are not looked at (the notes say how many
weight-reading nodes that leaves).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper

from graphopt.activations import intermediates
from graphopt.errors import PassError
from graphopt.graph import MS_DOMAIN, STANDARD_DOMAINS, NameGenerator, attribute, constant_names, consumers, copy_model, drop_unread, initializer_bytes, iter_graphs, output_names, producers, remove_nodes
from graphopt.passes.gptq import Hessian, gptq
from graphopt.passes.qdq import (
    BLOCKED_OPSET,
    PER_AXIS_OPSET,
    KeepFloat,
    QdqBuilder,
    QuantizedWeight,
    ensure_domain,
    ensure_opset,
    float_tensor,
    int_tensor,
    integer_weights,
    pack_int4,
    quantize_blockwise,
    quantize_per_channel,
    restores_weight,
    weight,
)
from graphopt.passes_base import SPEED_RATIO, VALIDATION_SETTINGS, Pass, PassContext, PassResult, register

FORMATS = ("auto", "dequantize", "matmulnbits", "folded")
INT4_CAST_OPSET = 21
METHODS = ("rtn", "gptq")
FLOAT = 0  # bits of a weight left float


RECURRENT_OPS = ("LSTM", "GRU", "RNN")
VIEWED_OPS = ("Conv", *RECURRENT_OPS)  # their weights are quantized as a 2-D view and reshaped back


@dataclass
class _Use:
    """One reader of a weight: a MatMul/Gemm/Gather/Conv/recurrent node, possibly through a Transpose of
    the weight; `slot` is the input it reads the weight at."""

    node: onnx.NodeProto
    transpose: onnx.NodeProto | None = None
    slot: int = 1

    @property
    def gather(self) -> bool:
        return self.node.op_type == "Gather"


@dataclass
class _Weight:
    """A float initializer to quantize; `axis` is the reduction (block) axis of the stored tensor."""

    name: str
    value: np.ndarray
    axis: int
    uses: list[_Use] = field(default_factory=list)
    shape: tuple[int, ...] | None = None  # a Conv kernel's or recurrent weight's own shape; `value` is a 2-D view

    @property
    def table(self) -> bool:
        return any(u.gather for u in self.uses)

    @property
    def reshaped(self) -> bool:
        """Quantized as a 2-D view of the stored tensor, restored by a Reshape back."""
        return self.shape is not None

    def as_kn(self, array: np.ndarray) -> np.ndarray:
        """`array` (shaped like the stored weight) as [K, N]."""
        return array if self.axis == 0 else array.T


@register
@dataclass
class QuantizeWeights(Pass):
    name = "quantize-weights"
    description = "weight-only int4/int8 (blockwise or per channel) for MatMul/Gemm/Conv/LSTM/GRU/RNN weights and Gather tables, for size"
    lossless = False
    claims = "size"
    fits_budget = True
    bits: int = 4
    block_size: int = 32
    symmetric: bool = True
    method: str = "rtn"
    format: str = "auto"
    embeddings: bool = True
    min_weight_elements: int = 1024
    keep_float: str = ""  # a regular expression of node names whose weights stay float

    def __post_init__(self) -> None:
        self.kept_by_user = KeepFloat(self.keep_float)  # a bad expression is the user's error, now

    def run(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        self._check_options()
        weights, refused, matched = _find_weights(model.graph, self.embeddings, self.min_weight_elements, self.kept_by_user)
        notes = self.kept_by_user.unmatched_note(matched) + _bodies_note(model, self.embeddings)
        if not weights:
            return PassResult(False, refused=refused, notes=notes)
        hessians = _hessians(model, weights, ctx) if self.method == "gptq" else None
        levels = {name: self.bits for name in weights}
        quantized = {name: self._quantize(w, self.bits, hessians) for name, w in weights.items()}
        fmt = self._choose_format(model, weights, quantized, levels, ctx, notes)
        base, opset_note = _prepared(model, weights, quantized, levels, fmt)
        reference = ctx.outputs(model)
        candidate = _build(base, weights, quantized, levels, fmt)
        fallback: dict[str, str] = {}
        problem = ctx.budget_problem(reference, candidate)
        if problem:
            hessians = hessians or _hessians(model, weights, ctx)
            candidate, problem = self._back_off(base, weights, quantized, levels, fmt, hessians, reference, problem, fallback, ctx)
        if problem:
            return PassResult(False, refused=refused + [f"over budget even with every weight float: {problem}"], notes=notes)
        if all(level == FLOAT for level in levels.values()):
            reasons = sorted(set(fallback.values()))
            return PassResult(False, refused=refused + [f"every weight had to stay float to keep the budget: {'; '.join(reasons[:3])}"], notes=notes)
        notes += [opset_note] if opset_note else []
        saved = initializer_bytes(model) - initializer_bytes(candidate)
        model.CopyFrom(candidate)
        return PassResult(True, counts=_counts(levels, saved), refused=refused, details=_details(weights, levels, fmt, fallback), notes=notes)

    def _check_options(self) -> None:
        if self.bits not in (4, 8):
            raise PassError(f"quantize-weights: bits must be 4 or 8, got {self.bits}")
        if self.block_size and (self.block_size < 16 or self.block_size & (self.block_size - 1)):
            raise PassError(f"quantize-weights: block_size must be 0 (per channel) or a power of two >= 16, got {self.block_size}")
        if self.method not in METHODS or self.format not in FORMATS:
            raise PassError(f"quantize-weights: method is one of {METHODS} and format one of {FORMATS}; got {self.method!r}, {self.format!r}")

    def _quantize(self, w: _Weight, bits: int, hessians: dict[str, np.ndarray] | None) -> QuantizedWeight:
        """The weight's integers at `bits`, in the stored tensor's layout (GPTQ when a Hessian is given)."""
        block = self.block_size or (0 if self.symmetric else w.value.shape[w.axis])
        if hessians is not None and w.name in hessians:
            q = gptq(w.as_kn(w.value), hessians[w.name], bits, block, self.symmetric)
            return q if w.axis == 0 else _transposed(q)
        if block:
            return quantize_blockwise(w.value, w.axis, block, bits, self.symmetric)
        return quantize_per_channel(w.value, 1 - w.axis, bits)

    def _choose_format(self, model, weights, quantized, levels, ctx: PassContext, notes: list[str]) -> str:
        """`format`, or for auto the one onnxruntime runs fastest (measured once per run and cached), where
        fastest means faster than `folded` by the pipeline's speed margin: folded runs the input's own
        float kernels, so it is never slower than the input, while a format timed a little faster here
        can time slower than the input in the pipeline's guard (MiniLM int4: MatMulNBits 0.314 of
        dequantize against folded's 0.338 here, then 1.030 and 1.030 of the float input there, which
        rolled the pass back and left the file at 1.0x). Per-channel weights (block_size 0) have no
        MatMulNBits form."""
        if self.format != "auto":
            return self.format
        key = f"quantize-weights.format/bits={self.bits}/block={self.block_size}/symmetric={self.symmetric}"
        if key not in ctx.decisions:
            candidates = [fmt for fmt in FORMATS[1:] if self.block_size or fmt != "matmulnbits"]
            models = [(fmt, _build(_prepared(model, weights, quantized, levels, fmt)[0], weights, quantized, levels, fmt)) for fmt in candidates]
            timings = ctx.latency(models)
            best = min(timings, key=lambda t: t.ratio)  # paired with the first candidate round by round (graphopt.bench)
            folded = next(t for t in timings if t.label == "folded")
            why = ""
            if best is not folded and best.ratio > folded.ratio * SPEED_RATIO:
                why = f"; {best.label} was faster than folded by less than {1 - SPEED_RATIO:.0%}, and folded runs the input's own kernels"
                best = folded
            ctx.decisions[key] = (best.label, {t.label: (t.median_ms, t.ratio) for t in timings}, why)
        chosen, measured, why = ctx.decisions[key]
        shown = ", ".join(f"{label} {ms:.3f} ms ({ratio:.3f})" for label, (ms, ratio) in measured.items())
        notes.append(f"format {chosen} chosen by measurement (median latency and ratio to the first: {shown}){why}")
        return chosen

    def _back_off(self, base, weights, quantized, levels, fmt, hessians, reference, problem, fallback, ctx):
        """Move the most sensitive weights to int8 (from int4), then to float, doubling how many each
        step, until the budget holds. Returns the model and the remaining problem (None: within budget)."""
        order = sorted(weights, key=lambda n: _sensitivity(weights[n], quantized[n], hessians.get(n)), reverse=True)
        candidate = None
        for target in ([8] if self.bits == 4 else []) + [FLOAT]:
            count = 1
            while problem:
                for name in order[:count]:
                    if levels[name] != target:
                        fallback[name] = problem
                        levels[name] = target
                        quantized[name] = self._quantize(weights[name], 8, hessians if self.method == "gptq" else None) if target == 8 else None
                candidate = _build(base, weights, quantized, levels, fmt)
                problem = ctx.budget_problem(reference, candidate)
                if count >= len(order):
                    break
                count = min(2 * count, len(order))
        return candidate, problem


def _transposed(q: QuantizedWeight) -> QuantizedWeight:
    """A 2-D quantized weight for the transposed tensor."""
    zero = None if q.zero_point is None else q.zero_point.T
    scale = q.scale.T if q.block_size else q.scale
    return QuantizedWeight(q.values.T, scale, 1 - q.axis, q.bits, q.block_size, zero)


# ---- finding weights -------------------------------------------------------------------------------


def _bodies_note(model: onnx.ModelProto, embeddings: bool) -> list[str]:
    """What this pass leaves float inside If/Loop/Scan bodies, as a note (none when there is none)."""
    graphs = list(iter_graphs(model.graph))
    consts = set().union(*(constant_names(g) for g in graphs))  # a body may read a constant of the graph around it
    inside = Counter(n.op_type for g in graphs[1:] for n in g.node if _reads_weight_kind(n, embeddings) and any(n.input[k] in consts for k in _weight_slots(n)))
    if not inside:
        return []
    ops = ", ".join(f"{op} {k}" for op, k in sorted(inside.items()))
    return [f"nodes inside If/Loop/Scan bodies left float: {ops} (quantize-weights quantizes the main graph only)"]


def _reads_weight_kind(node: onnx.NodeProto, embeddings: bool) -> bool:
    """A node of a kind this pass quantizes the weight of (whether its operand is a weight or not)."""
    return node.domain in STANDARD_DOMAINS and node.op_type in ("MatMul", "Gemm", *VIEWED_OPS) + (("Gather",) if embeddings else ())


def _weight_slots(node: onnx.NodeProto) -> tuple[int, ...]:
    """The inputs of `node` that hold weights: a table's 0, a recurrent node's W and R, else B/W at 1."""
    if node.op_type == "Gather":
        return (0,)
    return (1, 2) if node.op_type in RECURRENT_OPS else (1,)


def _find_weights(graph: onnx.GraphProto, embeddings: bool, min_elements: int, keep: KeepFloat) -> tuple[dict[str, _Weight], list[str], int]:
    """The quantizable weights of the main graph with their readers, the refused ones with reasons, and
    how many nodes `keep` named: those are refused and read their weight float (other readers of that
    weight do not)."""
    consts, made_by = constant_names(graph), producers(graph)
    found: dict[str, _Weight] = {}
    refused: list[str] = []
    conflicts: set[str] = set()
    requested = 0
    for node in graph.node:
        if not _reads_weight_kind(node, embeddings):
            continue
        if keep(node):
            refused.append(f"{_label(node)}: {keep.reason()}")
            requested += 1
            continue
        for slot in _weight_slots(node):
            name, transpose = node.input[slot], None
            if name not in consts:
                transpose = _transposed_constant(made_by.get(name), consts) if node.op_type in ("MatMul", "Gemm") else None
                if transpose is None:
                    reason = _computed_reason(graph, name, made_by.get(name), consts)
                    if reason:
                        refused.append(f"{_label(node)}: {reason}")
                    continue
                name = transpose.input[0]
            value = weight(graph, name)
            reason = _weight_problem(node, name, value, min_elements)
            if reason:
                refused.append(f"{_label(node)}: {reason}")
                continue
            axis = _reduction_axis(node, transpose)
            shape = value.shape if node.op_type in VIEWED_OPS else None
            entry = found.setdefault(name, _Weight(name, _view(node, value) if shape else value, axis, shape=shape))
            if entry.axis != axis or entry.shape != shape:
                conflicts.add(name)
            entry.uses.append(_Use(node, transpose, slot))
    for name in sorted(conflicts):
        refused.append(f"weight {name!r}: its readers need it quantized along different axes ({', '.join(_label(u.node) for u in found.pop(name).uses)})")
    return found, refused, requested


def _transposed_constant(node: onnx.NodeProto | None, consts: set[str]) -> onnx.NodeProto | None:
    """`node` when it is a 2-D Transpose of a constant (a tied weight's transposed copy), else None."""
    if node is None or node.op_type != "Transpose" or node.domain not in STANDARD_DOMAINS or node.input[0] not in consts:
        return None
    perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), [1, 0])
    return node if perm == [1, 0] else None


def _computed_reason(graph: onnx.GraphProto, name: str, producer: onnx.NodeProto | None, consts: set[str]) -> str | None:
    """Why a weight-position input that is no constant is refused; None when it is an activation or a
    weight already quantized (restored by a DequantizeLinear or a Cast of integers)."""
    if name in {t.name for t in graph.initializer}:
        return f"weight {name!r} is also a graph input (it can be fed at run time)"
    if producer is None or not all(i in consts for i in producer.input if i) or restores_weight(producer, integer_weights(graph)):
        return None
    return f"weight {name!r} is computed from constants by {producer.op_type} at run time (run fold-constants first)"


def _weight_problem(node: onnx.NodeProto, name: str, value: np.ndarray | None, min_elements: int) -> str | None:
    if value is None:
        return f"weight {name!r} is not a float tensor"
    if value.dtype != np.float32:
        return f"weight {name!r} is {value.dtype}; only float32 weights are quantized"
    if node.op_type == "Conv" and value.ndim < 3:
        return f"Conv weight {name!r} has rank {value.ndim}; a kernel has rank 3 or more"
    if node.op_type in RECURRENT_OPS and value.ndim != 3:
        return f"{node.op_type} weight {name!r} has rank {value.ndim}; W and R have rank 3"
    if node.op_type not in VIEWED_OPS and value.ndim != 2:
        return f"weight {name!r} has rank {value.ndim}; only 2-D weights are quantized"
    if value.size < min_elements:
        return f"weight {name!r} has {value.size} elements < min_weight_elements={min_elements}"
    if node.op_type == "Gather" and attribute(node, "axis", 0) != 0:
        return f"Gather on axis {attribute(node, 'axis', 0)}; only row lookups (axis 0) are quantized"
    return None


def _view(node: onnx.NodeProto, value: np.ndarray) -> np.ndarray:
    """The 2-D view a kernel is quantized as: a Conv's [M, C/group * k...], a recurrent W's or R's
    [D * gates * H, I or H] (each gate row of each direction is an output channel)."""
    return value.reshape(value.shape[0], -1) if node.op_type == "Conv" else value.reshape(-1, value.shape[-1])


def _reduction_axis(node: onnx.NodeProto, transpose: onnx.NodeProto | None) -> int:
    """The stored weight's axis that the reader sums over (a table's: its rows' elements, axis 1; a Conv
    kernel's or recurrent weight's: axis 1 of its 2-D view)."""
    if node.op_type == "Gather" or node.op_type in VIEWED_OPS:
        return 1
    axis = 1 if node.op_type == "Gemm" and attribute(node, "transB", 0) else 0
    return 1 - axis if transpose is not None else axis


def _label(node: onnx.NodeProto) -> str:
    return f"{node.op_type} {node.name!r}" if node.name else node.op_type


# ---- calibration: X^T X per weight -----------------------------------------------------------------


def _hessians(model: onnx.ModelProto, weights: dict[str, _Weight], ctx: PassContext) -> dict[str, np.ndarray]:
    """H = 2 X^T X of each MatMul/Gemm weight's input over the calibration feeds, streamed one feed at a
    time; weights read by several nodes sum their readers'. Tables (Gather), Conv kernels (whose X would
    be the unfolded image patches) and recurrent weights (whose X is each step's input and state) have
    none: they are rounded to nearest."""
    readers = {name: [(u.node.input[0], bool(attribute(u.node, "transA", 0))) for u in w.uses] for name, w in weights.items() if not w.table and not w.reshaped}
    keys = list(dict.fromkeys(key for pairs in readers.values() for key in pairs))
    if not keys or not ctx.calibration:
        return {}
    sums: dict[tuple[str, bool], Hessian] = {}
    for values in intermediates(model, ctx.calibration, sorted({name for name, _ in keys}), VALIDATION_SETTINGS):
        for name, transposed in keys:
            if name not in values:
                continue
            x = values[name].T if transposed else values[name]
            sums.setdefault((name, transposed), Hessian(x.shape[-1])).add(x)
    return {name: sum(sums[key].matrix for key in dict.fromkeys(pairs)) for name, pairs in readers.items()}


def _sensitivity(w: _Weight, q: QuantizedWeight | None, hessian: np.ndarray | None) -> float:
    """Relative squared error the quantization adds to the layer output (trace(dW^T H dW) / trace(W^T H W)),
    or to the weight itself when there is no H (tables)."""
    if q is None:
        return 0.0
    delta = w.value - q.dequantized()
    if hessian is None:
        return float(np.sum(delta.astype(np.float64) ** 2) / max(np.sum(w.value.astype(np.float64) ** 2), 1e-30))
    dw, ww = w.as_kn(delta).astype(np.float64), w.as_kn(w.value).astype(np.float64)
    return float(np.sum(dw * (hessian @ dw)) / max(np.sum(ww * (hessian @ ww)), 1e-30))


# ---- building the quantized model ------------------------------------------------------------------


def _prepared(model: onnx.ModelProto, weights, quantized, levels, fmt: str) -> tuple[onnx.ModelProto, str | None]:
    """A copy of `model` at the opset the plan's DequantizeLinear nodes need (upgraded once, since the
    version converter is slow on big models), and the sentence saying so."""
    base = copy_model(model)
    need = _dequantize_opset(base, weights, quantized, levels, fmt)
    return base, ensure_opset(base, need) if need else None


def _build(base: onnx.ModelProto, weights, quantized, levels, fmt: str) -> onnx.ModelProto:
    """A copy of `base` with each weight in its planned form (levels: 4, 8 or FLOAT)."""
    out = copy_model(base)
    rewriter = _Rewriter(out)
    for name, w in weights.items():
        if levels[name] != FLOAT and quantized[name] is not None:
            rewriter.quantize(w, quantized[name], fmt)
    rewriter.finish(weights)
    return out


class _Rewriter:
    """Puts quantized weights into one model: standard tensors (int4/int8 values, scales, zero points) and
    contrib tensors are made once per weight and shared by all its readers."""

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        self.graph = model.graph
        self.builder = QdqBuilder(self.graph, NameGenerator(model))
        self.by_output = {n.output[0]: n for n in self.graph.node if n.output}
        self.replaced: dict[str, onnx.NodeProto] = {}

    def quantize(self, w: _Weight, q: QuantizedWeight, fmt: str) -> None:
        standard: tuple[str, str, str | None] | None = None
        dq_out = None
        nbits = None
        for use in w.uses:
            node = self.by_output[use.node.output[0]]
            if fmt == "matmulnbits" and _contrib_possible(self.graph, w, use, q):
                if use.gather:
                    tied = not all(u.gather for u in w.uses)
                    standard = standard or (self._standard(w, q) if tied else None)
                    new = self._gather_block_quantized(w, node, q, standard)
                else:
                    nbits = nbits or self._matmulnbits_tensors(w, q)
                    new = self._matmulnbits(w, node, q, nbits)
                self.replaced[node.output[0]] = new
                continue
            if dq_out is None and fmt == "folded":
                dq_out = self._as_kernel(w, self._folded(w, q))
            elif dq_out is None:
                standard = standard or self._standard(w, q)
                axis = q.axis if np.ndim(q.scale) > 0 else None
                dq_out = self._as_kernel(w, self.builder.dequantize(_hint(w.name), *standard, axis=axis, block_size=q.block_size))
            if use.transpose is not None:
                self.by_output[use.transpose.output[0]].input[0] = dq_out
            else:
                node.input[use.slot] = dq_out

    def finish(self, weights: dict[str, _Weight]) -> None:
        nodes = self.builder.new_nodes + [self.replaced.get(n.output[0] if n.output else "", n) for n in self.graph.node]
        del self.graph.node[:]
        self.graph.node.extend(nodes)
        _drop_unused(self.graph, weights)
        if any(n.domain == MS_DOMAIN for n in self.graph.node):
            ensure_domain(self.model, MS_DOMAIN)

    def _as_kernel(self, w: _Weight, restored: str) -> str:
        """The restored weight in its stored shape: a Conv kernel or recurrent weight is quantized as a 2-D view."""
        if not w.reshaped:
            return restored
        shape = self.builder.initializer(f"{_hint(w.name)}_kernel_shape", np.array(w.shape, np.int64))
        out = self.builder.names(f"{_hint(w.name)}_kernel")
        self.builder.new_nodes.append(helper.make_node("Reshape", [restored, shape], [out]))
        return out

    def _standard(self, w: _Weight, q: QuantizedWeight) -> tuple[str, str, str | None]:
        """ONNX-typed values (INT4/UINT4/INT8/UINT8), scales and zero points, as DequantizeLinear reads them."""
        hint = _hint(w.name)
        values = self.builder.initializer(f"{hint}_quantized", int_tensor("", q.values, q.bits))
        scale = self.builder.initializer(f"{hint}_scale", float_tensor("", q.scale))
        zero = None
        if q.zero_point is not None:
            zero = self.builder.initializer(f"{hint}_zero_point", int_tensor("", q.zero_point, q.bits))
        elif q.bits == 4 or np.ndim(q.scale) > 0:
            zero = self.builder.initializer(f"{hint}_zero_point", int_tensor("", np.zeros(np.shape(q.scale), np.int8), q.bits))
        return values, scale, zero

    def _folded(self, w: _Weight, q: QuantizedWeight) -> str:
        """Cast(values) [- Cast(zero)] * scale, blocks split out by a Reshape (the stored integers padded to
        whole blocks, sliced back after): nodes on constants only, which onnxruntime's constant folding
        evaluates when it loads the model. Returns the float weight's name."""
        hint, b = _hint(w.name), self.builder
        values, scale, zero = q.values, q.scale, q.zero_point
        shape = list(values.shape)
        if q.block_size:
            blocks = scale.shape[q.axis]
            padded = list(shape)
            padded[q.axis] = blocks * q.block_size
            if padded != shape:
                grown = np.zeros(padded, values.dtype)
                grown[tuple(slice(0, d) for d in shape)] = values
                values = grown
            split = padded[: q.axis] + [blocks, q.block_size] + padded[q.axis + 1 :]
            scale = np.expand_dims(scale, q.axis + 1)
            zero = None if zero is None else np.expand_dims(zero, q.axis + 1)
        else:
            channel = [1, 1]
            channel[1 - w.axis] = -1
            scale = scale.reshape(channel)
        nodes = [helper.make_node("Cast", [b.initializer(f"{hint}_quantized", int_tensor("", values, q.bits))], [b.names(f"{hint}_int")], to=onnx.TensorProto.FLOAT)]
        if q.block_size:
            nodes.append(helper.make_node("Reshape", [nodes[-1].output[0], b.initializer(f"{hint}_blocks", np.array(split, np.int64))], [b.names(f"{hint}_blocked")]))
        if zero is not None:
            zero_float = helper.make_node("Cast", [b.initializer(f"{hint}_zero_point", int_tensor("", zero, q.bits))], [b.names(f"{hint}_zero_float")], to=onnx.TensorProto.FLOAT)
            nodes += [zero_float, helper.make_node("Sub", [nodes[-1].output[0], zero_float.output[0]], [b.names(f"{hint}_centred")])]
        nodes.append(helper.make_node("Mul", [nodes[-1].output[0], b.initializer(f"{hint}_scale", float_tensor("", scale))], [b.names(f"{hint}_scaled")]))
        if q.block_size:
            nodes.append(helper.make_node("Reshape", [nodes[-1].output[0], b.initializer(f"{hint}_padded_shape", np.array(padded, np.int64))], [b.names(f"{hint}_float")]))
            if padded != shape:
                ends = b.initializer(f"{hint}_shape", np.array(shape, np.int64))
                starts = b.initializer(f"{hint}_starts", np.zeros(2, np.int64))
                nodes.append(helper.make_node("Slice", [nodes[-1].output[0], starts, ends], [b.names(f"{hint}_float")]))
        b.new_nodes.extend(nodes)
        return nodes[-1].output[0]

    def _matmulnbits(self, w: _Weight, node: onnx.NodeProto, q: QuantizedWeight, tensors: tuple[str, str, str | None]) -> onnx.NodeProto:
        """MatMulNBits in place of a MatMul, or of a Gemm (its C, holding N values, as the bias)."""
        k, n = w.as_kn(w.value).shape
        bias = node.input[2] if node.op_type == "Gemm" and len(node.input) > 2 else ""
        b, scales, zero = tensors
        inputs = [node.input[0], b, scales, zero or ""] + (["", bias] if bias else [])
        return helper.make_node(
            "MatMulNBits", inputs, [node.output[0]], name=node.name or self.builder.names("MatMulNBits"), domain=MS_DOMAIN,
            K=k, N=n, bits=q.bits, block_size=q.block_size,
        )

    def _matmulnbits_tensors(self, w: _Weight, q: QuantizedWeight) -> tuple[str, str, str | None]:
        """B [N, blocks, block*bits/8] (unsigned codes packed along K), scales [N, blocks], and for
        asymmetric weights zero points packed the same way ([N, ceil(blocks*bits/8)]). Without zero
        points MatMulNBits uses 2^(bits-1), so symmetric values are stored offset by it."""
        hint = _hint(w.name)
        nk = w.as_kn(q.values).T
        n, k = nk.shape
        blocks = -(-k // q.block_size)
        codes = np.zeros((n, blocks * q.block_size), np.int16)
        codes[:, :k] = nk.astype(np.int16) + (0 if q.zero_point is not None else 2 ** (q.bits - 1))
        zp = None if q.zero_point is None else w.as_kn(q.zero_point).T.astype(np.int16)
        if zp is not None:  # the padding of a last partial block dequantizes to 0
            codes[:, k:] = zp[:, -1:]
        b = self.builder.initializer(f"{hint}_nbits", _pack(codes, q.bits).reshape(n, blocks, q.block_size * q.bits // 8))
        scales = self.builder.initializer(f"{hint}_scales", np.ascontiguousarray(w.as_kn(q.scale).T, np.float32))
        zero = None
        if zp is not None:
            if q.bits == 4 and zp.shape[1] % 2:
                zp = np.concatenate([zp, np.zeros((n, 1), np.int16)], axis=1)
            zero = self.builder.initializer(f"{hint}_zero_points", _pack(zp, q.bits).reshape(n, -1))
        return b, scales, zero

    def _gather_block_quantized(self, w: _Weight, node, q: QuantizedWeight, standard) -> onnx.NodeProto:
        """GatherBlockQuantized over the table [V, D] in blocks along D. A tied table (also read by a MatMul
        through DequantizeLinear) shares that reader's int4/uint4 tensors; otherwise the data is uint8
        codes packed along D (measured 4x faster than int4 data in onnxruntime 1.32: 0.11 vs 0.47 ms for
        128 rows of a 30522x384 table), offset by 2^(bits-1) when symmetric."""
        if standard is not None:
            data, scales, zero = standard
        else:
            hint = _hint(w.name)
            offset = 0 if q.zero_point is not None else 2 ** (q.bits - 1)
            rows = q.values.shape[0]
            data = self.builder.initializer(f"{hint}_quantized", _pack(q.values.astype(np.int16) + offset, q.bits).reshape(rows, -1))
            scales = self.builder.initializer(f"{hint}_scale", float_tensor("", q.scale))
            zero = None
            if q.zero_point is not None:
                zp = q.zero_point.astype(np.int16)
                if q.bits == 4 and zp.shape[1] % 2:
                    zp = np.concatenate([zp, np.zeros((rows, 1), np.int16)], axis=1)
                zero = self.builder.initializer(f"{hint}_zero_point", _pack(zp, q.bits).reshape(rows, -1))
        inputs = [data, node.input[1], scales] + ([zero] if zero else [])
        return helper.make_node(
            "GatherBlockQuantized", inputs, [node.output[0]], name=node.name or self.builder.names("GatherBlockQuantized"), domain=MS_DOMAIN,
            gather_axis=0, quantize_axis=1, block_size=q.block_size, bits=q.bits,
        )


def _dequantize_opset(base: onnx.ModelProto, weights, quantized, levels, fmt: str) -> int | None:
    """The opset the nodes restoring float weights need (DequantizeLinear, or Cast of int4), None if any."""
    need = None
    for name, w in weights.items():
        q = quantized[name]
        if levels[name] == FLOAT or q is None:
            continue
        if fmt == "matmulnbits" and all(_contrib_possible(base.graph, w, u, q) for u in w.uses):
            continue
        if fmt == "folded":  # Cast reads 4-bit integers from opset 21 on
            version = INT4_CAST_OPSET if q.bits == 4 else None
        else:
            version = BLOCKED_OPSET if q.bits == 4 or q.block_size else PER_AXIS_OPSET
        if version is None:
            continue
        need = max(need or 0, version)
    return need


def _contrib_possible(graph: onnx.GraphProto, w: _Weight, use: _Use, q: QuantizedWeight) -> bool:
    """Whether this reader can take the weight as MatMulNBits / GatherBlockQuantized. A tied table's
    MatMul reads the Gather's int4 tensor through DequantizeLinear (stored once); with 8 bits both go
    through DequantizeLinear. A Gemm needs transA=0, alpha=beta=1 and C absent or a constant [N]."""
    if w.reshaped or not q.block_size or q.block_size < 16 or q.block_size & (q.block_size - 1):
        return False
    if w.table and not all(u.gather for u in w.uses):
        return use.gather and q.bits == 4
    node = use.node
    if node.op_type == "Gemm":
        if attribute(node, "transA", 0) or attribute(node, "alpha", 1.0) != 1.0 or attribute(node, "beta", 1.0) != 1.0:
            return False
        c = weight(graph, node.input[2]) if len(node.input) > 2 and node.input[2] else None
        return len(node.input) < 3 or not node.input[2] or (c is not None and c.shape == (w.as_kn(w.value).shape[1],))
    return True


def _pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned codes as bytes, low bits first (4-bit: two per byte)."""
    return pack_int4(codes) if bits == 4 else codes.astype(np.uint8).reshape(-1)


def _hint(name: str) -> str:
    return name.replace("::", "_").replace("/", "_").replace(".", "_")


def _drop_unused(graph: onnx.GraphProto, weights: dict[str, _Weight]) -> None:
    """Remove Transposes of quantized weights nobody reads any more, then the float weights themselves."""
    readers, outs = consumers(graph), output_names(graph)
    dead = [n for n in graph.node if n.op_type == "Transpose" and n.input[0] in weights and not readers.get(n.output[0]) and n.output[0] not in outs]
    remove_nodes(graph, dead)
    drop_unread(graph, weights)


# ---- report ----------------------------------------------------------------------------------------


def _counts(levels: dict[str, int], saved: int) -> dict[str, int]:
    bits = Counter(levels.values())
    return {"weights_int4": bits[4], "weights_int8": bits[8], "weights_float": bits[FLOAT], "bytes_saved": saved}


def _details(weights: dict[str, _Weight], levels: dict[str, int], fmt: str, fallback: dict[str, str]) -> dict:
    readers = {id(u.node): u.node for name, w in weights.items() if levels[name] != FLOAT for u in w.uses}  # a recurrent node reads two
    quantized = Counter(node.op_type for node in readers.values())
    return {
        "quantized": dict(quantized),
        "bits": {name: levels[name] for name in weights},
        "format": fmt,
        "int8_fallback": [{"weight": n, "reason": fallback[n]} for n in fallback if levels[n] == 8],
        "kept_float": [{"weight": n, "reason": fallback[n]} for n in fallback if levels[n] == FLOAT],
    }
