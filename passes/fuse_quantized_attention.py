"""fuse-quantized-attention: self-attention whose Q, K and V projections are dynamically quantized => com.microsoft QAttention.

Rewrites, in the main graph, what quantize-dynamic and then fuse-attention leave for self-attention:

  x_q, x_scale, x_zp = DynamicQuantizeLinear(x)                             x: [B, S, K] float32
  for r in q, k, v:
    y_r = Mul(Cast(MatMulInteger(x_q, W_r, x_zp)), Mul(x_scale, s_r)) [+ b_r]     W_r: [K, D] int8 constant
    m_r = y_r through Reshapes that keep its first two dims (to [B, S, N, H] and back to [B, S, D])
  o = MultiHeadAttention(m_q, m_k, m_v, attention_bias=bias [then Expand], num_heads=N, scale)
      bias = Where(keep, 0, c) (torch's SDPA export) or (1 - keep) * c (eager BERT's extended mask)
=>
  o = QAttention(x_q, [W_q W_k W_v], [b_q b_k b_v], x_scale, [s_q s_k s_v], mask_index, x_zp,
                 num_heads=N, scale, mask_filter_value=c)

with mask_index = Cast(keep, int32), squeezed to [B, S, T] (keep is [B, 1, S, T]) or [B, T] (keep is
[B, 1, 1, T], the key mask that fuse-attention expanded over the query positions). QAttention adds c where
the mask is 0 and nothing where it is 1, which is the Where's bias exactly; c = -inf stays -inf, so a query
whose keys are all masked gives NaN as before (measured), and the NaN guard after the attention still
turns it into zeros. (1 - keep) * c is the same bias where keep is 0 or 1, which it is for an attention
mask and which its values on calibration feeds must confirm. Without a mask the QAttention has none.

Where the attention is still spelled out in MatMul and Softmax (fuse-attention ran and was rolled back as
not faster on its own: eager exports, whose attention onnxruntime already runs lean), this pass runs
fuse-attention's rewrite first on its copy, so that the pipeline times the two together (MiniLM exported
with eager attention: fuse-attention alone 0.99-1.04 of its input, rolled back three times).

Why: onnxruntime runs the three projections as three MatMulIntegerToFloat kernels and three bias Adds
around its MultiHeadAttention; QAttention does one integer product over the concatenated [K, 3D] weight,
the bias and the attention in one kernel. Measured on MiniLM-L6's int8 model (seq 128, 2 threads,
interleaved runs, 2-core Xeon with AVX-512 VNNI, onnxruntime 1.32): 0.486 and 0.476 of fp32 against 0.556
and 0.526 before it, with the same outputs (pooled cosine to fp32 0.99802 both).

Numerics: the same integer products (uint8 x int8, int32 sums) scaled by the same factors; the float
arithmetic after them is rounded differently, as for fuse-attention.

Refused (reason recorded; nodes stay): x is not of rank 3 on the calibration feeds (QAttention takes
[B, S, K]); the projections' hidden sizes differ or are not a multiple of the head count; an intermediate
tensor is read elsewhere or is a graph output; the weights differ in element type; a Reshape on the way
is not shown to keep the batch and sequence dims; the attention bias is neither form above (an additive
bias that is not a 0/1 mask has no QAttention form); keep took values other than 0 and 1 in the (1 - keep)
* c form; keep's observed shapes are not [B, 1, S or 1, T] with the queries' batch and lengths. Not a
match, silently: a MultiHeadAttention with a key_padding_mask, bias, past or present, projections that are
not this form (weights with a zero point among them), Q, K and V read from different quantized inputs
(cross-attention). Subgraphs are not searched.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from graphopt.activations import intermediates
from graphopt.graph import MS_DOMAIN, NameGenerator, attribute, constant_value, consumers, copy_model, default_opset, drop_unread, is_op, output_names, producers, scalar_constant, scalar_operand, splice
from graphopt.passes.fuse_attention import FuseAttention, symbolic_vector
from graphopt.passes_base import Pass, PassContext, PassResult, register

MHA_ATTRIBUTES = {"num_heads", "scale"}  # any other (unidirectional, mask_filter_value, ...) is not a match
VALUE_FEEDS = 8  # calibration feeds on which a (1 - m) * c mask's m is checked to be 0 or 1


@dataclass
class _Projection:
    """One of Q, K, V: the quantized product and what follows it up to the attention's input."""

    x_q: str
    x_zero: str
    x_scale: str
    weight: np.ndarray  # [K, D] int8 or uint8
    scale: np.ndarray  # [D] float32
    bias: np.ndarray  # [D] float32
    reshapes: list[onnx.NodeProto]
    nodes: list[onnx.NodeProto]  # MatMulInteger .. the last Reshape


@dataclass
class _Match:
    attention: onnx.NodeProto
    projections: list[_Projection]
    x: str  # the float input of the DynamicQuantizeLinear
    bias: str = ""  # the attention bias, "" without one
    keep: str = ""  # the bool mask of Where(keep, 0, c) when the bias is one
    fill: float = 0.0  # c
    zero_one: bool = False  # the bias is (1 - keep) * c: the same only where keep is 0 or 1
    mask_nodes: tuple[onnx.NodeProto, ...] = ()  # what makes the bias, readers first: [Expand, its shape's nodes], Where
    key_mask: bool = False  # keep is [B, 1, 1, T]: squeezed to [B, T]


@register
@dataclass
class FuseQuantizedAttention(Pass):
    name = "fuse-quantized-attention"
    description = "dynamically quantized Q/K/V projections and their MultiHeadAttention => com.microsoft QAttention (onnxruntime)"
    lossless = True
    claims = "speed"

    def run(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        if found := _matches(model.graph):
            return self._fuse(model, found, ctx, [])
        # attention still spelled out (fuse-attention alone was not faster: eager exports): fuse it here
        # first, so that the latency guard judges the two rewrites together
        spelled = copy_model(model)
        if not FuseAttention().run(spelled, ctx).changed or not (found := _matches(spelled.graph)):
            return PassResult(False)
        result = self._fuse(spelled, found, ctx, ["the attention was still spelled out: fuse-attention's rewrite ran first, and this pass is timed with it"])
        if result.changed:
            model.CopyFrom(spelled)
        return result

    def _fuse(self, model: onnx.ModelProto, found: list[_Match], ctx: PassContext, notes: list[str]) -> PassResult:
        graph = model.graph
        made_by, read_by = producers(graph), consumers(graph)
        observed = ctx.activations.observed_shapes(model)

        seen_values: dict[str, list[np.ndarray]] = {}  # the layers of one model share one mask

        def values(name: str) -> list[np.ndarray]:
            if name not in seen_values:
                seen_values[name] = [np.array(v[name]) for v in intermediates(model, ctx.calibration[:VALUE_FEEDS], [name])]
            return seen_values[name]

        outputs = output_names(graph)
        refused, accepted = [], []
        for m in found:
            problem = _problem(m, graph, observed, values, made_by, read_by, outputs)
            if problem:
                refused.append(f"attention {m.attention.name or m.attention.output[0]!r}: {problem}")
            else:
                accepted.append(m)
        if not accepted:
            return PassResult(False, refused=refused)
        replaced = [n for m in accepted for p in m.projections for n in p.nodes]
        masks = _masks_left_unread(accepted, read_by, outputs)
        _replace(model, accepted, masks)
        drop_unread(graph, {name for n in replaced + masks for name in n.input})
        counts = {"attention_fused": len(accepted), "projections_merged": 3 * len(accepted), "mask_nodes_removed": len(masks)}
        return PassResult(True, counts=counts, refused=refused, notes=notes)


def _matches(graph: onnx.GraphProto) -> list[_Match]:
    made_by = producers(graph)
    return [m for node in graph.node if (m := _match(graph, node, made_by)) is not None]


def _match(graph: onnx.GraphProto, node: onnx.NodeProto, made_by) -> _Match | None:
    if node.op_type != "MultiHeadAttention" or node.domain != MS_DOMAIN:
        return None
    inputs = list(node.input) + [""] * 6
    if any(inputs[3:5]) or any(inputs[6:]) or len([o for o in node.output if o]) != 1 or not node.output[0]:
        return None
    if {a.name for a in node.attribute} - MHA_ATTRIBUTES:
        return None
    projections = [_projection(graph, name, made_by) for name in inputs[:3]]
    if any(p is None for p in projections):
        return None
    first = projections[0]
    if any((p.x_q, p.x_zero, p.x_scale) != (first.x_q, first.x_zero, first.x_scale) for p in projections):
        return None  # cross-attention, or separately quantized inputs
    quantizer = made_by.get(first.x_q)
    if not is_op(quantizer, "DynamicQuantizeLinear") or list(quantizer.output) != [first.x_q, first.x_scale, first.x_zero]:
        return None
    match = _Match(node, projections, quantizer.input[0], bias=inputs[5])
    if match.bias:
        where, mask_nodes = made_by.get(match.bias), ()
        if is_op(where, "Expand"):  # fuse-attention's, over the query positions (its shape is read from q)
            mask_nodes = (where, *_shape_nodes(where.input[1], made_by))
            where = made_by.get(where.input[0])
        if is_op(where, "Where") and scalar_constant(graph, where.input[1]) == 0.0 and scalar_constant(graph, where.input[2]) is not None:
            match.keep, match.fill, match.mask_nodes = where.input[0], scalar_constant(graph, where.input[2]), (*mask_nodes, where)
        elif (scaled := _one_minus_times(graph, where, made_by)) is not None:
            (match.keep, match.fill, nodes), match.zero_one = scaled, True
            match.mask_nodes = (*mask_nodes, *nodes)
    return match


def _one_minus_times(graph: onnx.GraphProto, mul: onnx.NodeProto | None, made_by) -> tuple[str, float, list[onnx.NodeProto]] | None:
    """(m, c, [the Mul, the Sub]) when `mul` is Mul(Sub(1, m), c) with c a scalar constant (either
    operand order of the Mul): the extended attention mask of eager BERT exports, m its float 0/1 mask."""
    side = scalar_operand(graph, mul) if is_op(mul, "Mul") else None
    sub = made_by.get(mul.input[1 - side]) if side is not None else None
    if not is_op(sub, "Sub") or scalar_constant(graph, sub.input[0]) != 1.0:
        return None
    return sub.input[1], scalar_constant(graph, mul.input[side]), [mul, sub]


def _shape_nodes(name: str, made_by) -> list[onnx.NodeProto]:
    """The Shape, Gather, Unsqueeze and Concat nodes computing a shape vector, readers first."""
    found, todo = [], [name]
    while todo:
        node = made_by.get(todo.pop(0))
        if node is not None and node.op_type in ("Shape", "Gather", "Unsqueeze", "Concat") and node not in found:
            found.append(node)
            todo += [i for i in node.input[:1 if node.op_type != "Concat" else None] if i]
    return found


def _projection(graph: onnx.GraphProto, name: str, made_by) -> _Projection | None:
    """Follow an attention input back through Reshapes, a bias Add and the scaling Mul to its MatMulInteger."""
    reshapes = []
    node = made_by.get(name)
    while is_op(node, "Reshape") and len(reshapes) < 3:
        reshapes.append(node)
        node = made_by.get(node.input[0])
    bias = None
    if is_op(node, "Add"):
        side = next((i for i in (0, 1) if (v := constant_value(graph, node.input[i])) is not None and v.ndim == 1), None)
        if side is None:
            return None
        bias, add, node = constant_value(graph, node.input[side]), node, made_by.get(node.input[1 - side])
    else:
        add = None
    if not is_op(node, "Mul"):
        return None
    mul = node
    casts = [made_by.get(i) for i in mul.input]
    side = next((i for i in (0, 1) if is_op(casts[i], "Cast") and attribute(casts[i], "to") == TensorProto.FLOAT), None)
    if side is None:
        return None
    cast, scaling = casts[side], made_by.get(mul.input[1 - side])
    product = made_by.get(cast.input[0])
    if not is_op(product, "MatMulInteger") or len([i for i in product.input if i]) != 3 or len(product.input) > 3 or not is_op(scaling, "Mul"):
        return None
    weight = constant_value(graph, product.input[1])
    scale_side = next((i for i in (0, 1) if constant_value(graph, scaling.input[i]) is not None), None)
    if weight is None or weight.ndim != 2 or scale_side is None:
        return None
    columns = weight.shape[1]
    scale = constant_value(graph, scaling.input[scale_side]).astype(np.float32).reshape(-1)
    if scale.size not in (1, columns) or (bias is not None and bias.shape != (columns,)):
        return None
    nodes = [product, cast, scaling, mul] + ([add] if add is not None else []) + reshapes[::-1]
    return _Projection(
        product.input[0],
        product.input[2],
        scaling.input[1 - scale_side],
        weight,
        np.broadcast_to(scale, (columns,)).astype(np.float32),
        np.zeros(columns, np.float32) if bias is None else bias.astype(np.float32),
        reshapes[::-1],
        nodes,
    )


def _problem(m: _Match, graph: onnx.GraphProto, observed: dict[str, set[tuple[int, ...]]], values, made_by, read_by, outputs: set[str]) -> str | None:
    """Why `m` cannot be rewritten, or None. `values(name)` gives a tensor's values on calibration feeds."""
    x_shapes = observed.get(m.x, set())
    if not x_shapes or any(len(s) != 3 for s in x_shapes):
        return f"{m.x} has shapes {sorted(x_shapes)} on the calibration feeds: QAttention takes [batch, sequence, hidden]"
    weights = [p.weight for p in m.projections]
    hidden = {w.shape[1] for w in weights}
    heads = attribute(m.attention, "num_heads", 0)
    if len(hidden) != 1 or len({w.shape[0] for w in weights}) != 1 or len({w.dtype for w in weights}) != 1 or heads <= 0 or next(iter(hidden)) % heads:
        shapes = ", ".join(f"{list(w.shape)} {w.dtype}" for w in weights)
        return f"the Q, K and V weights ({shapes}) do not share one shape and element type with a hidden size divisible by {heads} heads"
    removed = {id(n) for p in m.projections for n in p.nodes} | {id(n) for n in _masks_left_unread([m], read_by, outputs)}
    leading = _leading_dims(observed, x_shapes)
    for p in m.projections:
        for node in p.nodes:
            for name in node.output:
                if name in outputs or any(id(r) not in removed and r is not m.attention for r in read_by.get(name, [])):
                    return f"{name} is also read elsewhere or is a graph output"
        for reshape in p.reshapes:
            target, _ = symbolic_vector(graph, reshape.input[1], made_by, leading)
            if attribute(reshape, "allowzero", 0) or target is None or target[0] not in (0, "B") or target[1] not in (0, "S"):
                return f"the Reshape {reshape.name or reshape.output[0]!r} is not shown to keep the batch and sequence dims"
    if m.bias and not m.keep:
        return f"the attention bias {m.bias} is not Where(mask, 0, c) or (1 - mask) * c: QAttention takes a 0/1 mask, not an additive bias"
    if m.zero_one and not all(np.isin(v, (0.0, 1.0)).all() for v in values(m.keep)):
        return f"the attention bias is (1 - {m.keep}) * c and {m.keep} took values other than 0 and 1 on the calibration feeds: QAttention's mask only keeps or masks"
    if m.keep:
        return _mask_problem(m, observed.get(m.keep, set()), x_shapes)
    return None


def _leading_dims(observed: dict[str, set[tuple[int, ...]]], x_shapes: set[tuple[int, ...]]) -> dict[str, list[str]]:
    """For fuse-attention's symbolic_vector: the tensors whose first two dims were the queries' batch and
    length on the calibration feeds (as a set, the standard fuse-attention holds head counts to), with
    their dims as symbols B, S, ..., so that Shape(t)[0] and Shape(t)[1] stand for B and S in a Reshape
    target."""
    leading = {s[:2] for s in x_shapes}
    dims = {}
    for name, seen in observed.items():
        ranks = {len(s) for s in seen}
        if len(ranks) == 1 and min(ranks) >= 2 and {s[:2] for s in seen} == leading:
            dims[name] = ["B", "S"] + [f"d{i}" for i in range(2, min(ranks))]
    return dims


def _mask_problem(m: _Match, seen: set[tuple[int, ...]], x_shapes: set[tuple[int, ...]]) -> str | None:
    """keep must be [B, 1, S, T] (then squeezed to QAttention's [B, S, T]) or [B, 1, 1, T] (to [B, T]),
    with the batch and the lengths the queries had, on every calibration feed."""
    batches, lengths = {s[0] for s in x_shapes}, {s[1] for s in x_shapes}
    fits = bool(seen) and all(len(s) == 4 and s[1] == 1 for s in seen)
    positions = {s[2] for s in seen}
    if fits and {s[0] for s in seen} == batches and {s[3] for s in seen} == lengths and positions in (lengths, {1}):
        m.key_mask = positions == {1} and lengths != {1}
        return None
    return f"the mask {m.keep} has shapes {sorted(seen)}: QAttention takes [batch, 1, queries or 1, keys] with the queries' batch and length"


def _masks_left_unread(accepted: list[_Match], read_by, outputs: set[str]) -> list[onnx.NodeProto]:
    """The nodes making attention biases (mask_nodes) that only the replaced attentions and each other read."""
    going = {id(m.attention) for m in accepted}
    doomed: dict[int, onnx.NodeProto] = {}
    for node in [n for m in accepted for n in m.mask_nodes]:  # readers first
        readers = [r for o in node.output for r in read_by.get(o, [])]
        if not set(node.output) & outputs and all(id(r) in going or id(r) in doomed for r in readers):
            doomed[id(node)] = node
    return list(doomed.values())


def _replace(model: onnx.ModelProto, accepted: list[_Match], masks: list[onnx.NodeProto]) -> None:
    graph, names = model.graph, NameGenerator(model)
    indices: dict[str, str] = {}  # keep -> its int32 form, made once for all the attentions reading it
    rewrites = []
    for m in accepted:
        stem = m.attention.name or m.attention.output[0]
        new = []
        mask = ""
        if m.keep:
            if m.keep not in indices:
                indices[m.keep] = names(f"{m.keep}_mask_index")
                new += _mask_index(graph, names, m, indices[m.keep], default_opset(model) or 0)
            mask = indices[m.keep]
        concat = {
            "weight": np.concatenate([p.weight for p in m.projections], axis=1),
            "bias": np.concatenate([p.bias for p in m.projections]),
            "weight_scale": np.concatenate([p.scale for p in m.projections]),
        }
        tensors = {}
        for role, value in concat.items():
            tensors[role] = names(f"{stem}_qkv_{role}")
            graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(value), tensors[role]))
        first = m.projections[0]
        inputs = [first.x_q, tensors["weight"], tensors["bias"], first.x_scale, tensors["weight_scale"], mask, first.x_zero]
        attributes = {a.name: helper.get_attribute_value(a) for a in m.attention.attribute}
        if m.keep:
            attributes["mask_filter_value"] = m.fill
        new.append(helper.make_node("QAttention", inputs, [m.attention.output[0]], name=names(f"{stem}_quantized"), domain=MS_DOMAIN, **attributes))
        rewrites.append(([n for p in m.projections for n in p.nodes] + [m.attention], new))
    if masks:
        rewrites.append((masks, []))  # removed, with nothing in their place
    splice(graph, rewrites)


def _mask_index(graph: onnx.GraphProto, names: NameGenerator, m: _Match, out: str, opset: int) -> list[onnx.NodeProto]:
    """Cast(keep, int32) squeezed to [B, S, T], or to [B, T] when keep is a key mask [B, 1, 1, T]."""
    axes = [1, 2] if m.key_mask else [1]
    as_int = names(f"{m.keep}_int32")
    nodes = [helper.make_node("Cast", [m.keep], [as_int], name=names(f"{m.keep}_Cast"), to=TensorProto.INT32)]
    if opset >= 13:
        axes_name = names(f"{m.keep}_squeeze_axes")
        graph.initializer.append(numpy_helper.from_array(np.array(axes, np.int64), axes_name))
        nodes.append(helper.make_node("Squeeze", [as_int, axes_name], [out], name=names(f"{m.keep}_Squeeze")))
    else:
        nodes.append(helper.make_node("Squeeze", [as_int], [out], name=names(f"{m.keep}_Squeeze"), axes=axes))
    return nodes
