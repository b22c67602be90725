"""fuse-attention: multi-head attention spelled out in MatMul and Softmax => com.microsoft MultiHeadAttention.

Rewrites, in the main graph (q, k, v are [B, S, N, H] tensors the heads were split from, M an optional
additive mask, c constants of shape [] or [1]):

  Qh = q transposed to [B, N, S, H]         (Transposes composing to perm [0, 2, 1, 3], times or over c)
  Kt = k transposed to [B, N, H, T]         (composing to [0, 2, 3, 1], e.g. [0, 2, 1, 3] then [0, 1, 3, 2];
                                             torch's dynamo export swaps the last two axes as Reshape to
                                             [B*N, T, H], Transpose [0, 2, 1], Reshape to [B, N, H, T],
                                             accepted when the observed shapes and constant targets say so)
  Vh = v transposed to [B, N, T, H]         (composing to [0, 2, 1, 3])
  P  = Softmax(MatMul(Qh, Kt) [times or over c] [+ M], axis=-1)   [then Where(IsNaN(P), 0, P)]
  out = Transpose(MatMul(P, Vh), perm=[0, 2, 1, 3])
=>
  o   = MultiHeadAttention(Reshape(q, [0, 0, -1]), Reshape(k, ...), Reshape(v, ...), attention_bias=M,
                           num_heads=N, scale=product of the c)   [then Where(IsNaN(o), 0, o)]
  out = Reshape(o, [0, 0, N, H])

`out` keeps its name, so whatever merged the heads back (a Reshape to [B, S, N*H]) reads it unchanged. The
forms covered are those of torch's scaled_dot_product_attention export, legacy and dynamo (scale split as
sqrt on Q and K, mask from Where(mask, 0, -inf) or a constant bias, NaN guard), and of the eager BERT/HF
form (K transposed twice, scores divided by sqrt(H), mask [B, 1, S, T] or the extended key mask
[B, 1, 1, T]; the kernel wants the query axis in full, so the latter is expanded to [B, 1, S, T] by an
Expand in front of it).

Why: onnxruntime runs the spelled-out form as a dozen kernels per layer, two of them over the [B, N, S, T]
score tensor besides Softmax (mask Add, NaN guard); its MultiHeadAttention kernel does the two batched
products, scale, mask and softmax in one pass per head. Measured on MiniLM-L6 (seq 128, 2 threads,
interleaved runs): 0.90 of the cleaned fp32 model's latency on a 2-core AVX2 EPYC, 0.96-0.97 on a 2-core
AVX-512 EPYC, and 0.89 of the int8 model's there. The int8 preset runs it after quantizing, where it pays
most; the int4 preset before, since onnx infers no shapes through MatMulNBits and the head count is needed.

Numerics: the same arithmetic, rounded differently (MiniLM: 1.6e-5 at most on last_hidden_state); the
pipeline checks it against onnxruntime's own rounding on the model it rewrites, as for every clean-up (on
the int8 model that rounding reaches 0.36-0.46, a flipped activation rounding, so the budget must hold
too). The NaN guard stays exact: a fully masked row gives NaN through Softmax and a zero row after the
guard, and MultiHeadAttention gives that head's slice of the output as NaN, which the same guard on its
output turns to zeros (Softmax makes whole rows NaN, never single entries, for finite V).

The result needs onnxruntime (com.microsoft domain, float32, CPU and CUDA kernels), which is why the pass
is in the int8 and int4 presets and not in `lossless`, whose output stays standard ONNX.

Refused (reason recorded; the nodes stay): the head count or head size is not static and confirmed on the
calibration feeds; q, k or v is not float32; a tensor inside the pattern is read elsewhere or is a graph
output; the mask does not broadcast to what MultiHeadAttention takes, [B or 1, N or 1, S or 1, T] (e.g.
[B, 1, S, 1], broadcast over keys). Not a match, silently:
Softmax over another axis, transposes composing to other perms, scaling after the mask is added, a scale
or Transpose on V. Subgraphs are not searched: their shapes are never observed.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from graphopt.graph import MS_DOMAIN, NameGenerator, attribute, constant_value, consumers, default_opset, is_op, only_reader, output_names, producers, scalar_constant, scalar_operand, splice
from graphopt.passes.qdq import ensure_domain
from graphopt.passes_base import Pass, PassContext, PassResult, register
from graphopt.shapes import GraphFacts, all_graph_facts, show_dims

Q_PERM = [0, 2, 1, 3]  # [B, S, N, H] -> [B, N, S, H], also V's, and the context's way back
K_PERM = [0, 2, 3, 1]  # [B, T, N, H] -> [B, N, H, T]
SWAP_PERM = [0, 1, 3, 2]  # what a batched swap (_batched_swap) does to its 4-D input


@dataclass
class _Heads:
    """A tensor followed back through Transposes and constant scalings to the tensor the heads came from."""

    source: str
    perm: list[int]  # axis i of the end tensor is axis perm[i] of `source`
    scale: float
    nodes: list[onnx.NodeProto]  # the Transposes and scalings, removed with the pattern
    perms: dict[str, list[int]]  # every tensor on the way (source included) -> its perm of `source`
    swaps: list[tuple[onnx.NodeProto, onnx.NodeProto]] = field(default_factory=list)  # see _batched_swap


@dataclass
class _Attention:
    name: str  # the Softmax's, for messages and new names
    q: str
    k: str
    v: str
    mask: str  # "" without one
    scale: float
    nan_guard: str  # the guard's zero constant, "" without a guard
    output: str
    nodes: list[onnx.NodeProto]  # removed; the last is the Transpose back, where the replacement goes
    dims: dict[str, list[str]]  # pattern tensors -> their dims as symbols B, S, T, N, H, Hv
    regroup: onnx.NodeProto | None  # a Reshape between the context and the Transpose back, if any
    heads: int = 0
    v_head_size: int = 0
    expand_mask: bool = False  # the mask is [.., 1, T]: expanded over query positions for the kernel
    swaps: list[tuple[onnx.NodeProto, onnx.NodeProto]] = field(default_factory=list)  # checked in _problem


@register
@dataclass
class FuseAttention(Pass):
    name = "fuse-attention"
    description = "multi-head attention spelled out in MatMul/Softmax => com.microsoft MultiHeadAttention (onnxruntime)"
    lossless = True
    claims = "speed"

    def run(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        graph = model.graph
        found = _matches(graph, default_opset(model) or 0)
        if not found:
            return PassResult(False)
        facts = all_graph_facts(model, functools.cache(lambda: ctx.activations.observed_shapes(model)))[0]
        refused: list[str] = []
        accepted = []
        maps = producers(graph), consumers(graph), output_names(graph)
        for a in found:
            problem = _problem(a, graph, facts, *maps)
            if problem:
                refused.append(f"attention at {a.name!r}: {problem}")
            else:
                accepted.append(a)
        if not accepted:
            return PassResult(False, refused=refused)
        added = _replace(graph, accepted, NameGenerator(model))
        ensure_domain(model, MS_DOMAIN)
        counts = {"attention_fused": len(accepted), "nodes_removed": sum(len(a.nodes) for a in accepted) - added}
        return PassResult(True, counts=counts, refused=refused)


def _matches(graph: onnx.GraphProto, opset: int) -> list[_Attention]:
    made_by, read_by = producers(graph), consumers(graph)
    found = []
    for softmax in graph.node:
        if is_op(softmax, "Softmax") and attribute(softmax, "axis", -1 if opset >= 13 else 1) in (-1, 3):
            a = _match(graph, softmax, made_by, read_by)
            if a is not None:
                found.append(a)
    return found


def _match(graph: onnx.GraphProto, softmax: onnx.NodeProto, made_by, read_by) -> _Attention | None:
    probs = softmax.output[0]
    context_in, guard, guard_nodes = probs, "", []
    readers = read_by.get(probs, [])
    if len(readers) == 2:  # Where(IsNaN(P), 0, P)
        is_nan = next((r for r in readers if is_op(r, "IsNaN")), None)
        where = next((r for r in readers if is_op(r, "Where")), None)
        if is_nan is None or where is None or list(where.input) != [is_nan.output[0], where.input[1], probs]:
            return None
        if scalar_constant(graph, where.input[1]) != 0.0:
            return None
        context_in, guard, guard_nodes = where.output[0], where.input[1], [is_nan, where]
    context = only_reader(read_by, context_in)
    if context is None or not is_op(context, "MatMul") or context.input[0] != context_in:
        return None
    after = [r for r in read_by.get(context.output[0], []) if not is_op(r, "Shape")]  # Shapes: see _problem
    regroup = after[0] if len(after) == 1 and is_op(after[0], "Reshape") else None
    back = only_reader(read_by, regroup.output[0]) if regroup is not None else (after[0] if len(after) == 1 else None)
    if back is None or not is_op(back, "Transpose") or list(attribute(back, "perm", [])) != Q_PERM:
        return None
    v = _heads(graph, context.input[1], made_by)
    if v.perm != Q_PERM or v.scale != 1.0:
        return None

    scores, mask, mask_nodes = softmax.input[0], "", []
    add = made_by.get(scores)
    if is_op(add, "Add"):
        for i in (0, 1):
            below = _heads(graph, add.input[i], made_by)
            if below.perm == [0, 1, 2, 3] and is_op(made_by.get(below.source), "MatMul"):
                scores, mask, mask_nodes = add.input[i], add.input[1 - i], [add]
                break
    s = _heads(graph, scores, made_by)
    product = made_by.get(s.source)
    if s.perm != [0, 1, 2, 3] or not is_op(product, "MatMul"):
        return None
    q = _heads(graph, product.input[0], made_by)
    k = _heads(graph, product.input[1], made_by)
    if q.perm != Q_PERM or k.perm != K_PERM:
        return None
    dims = {}
    for heads, source_dims in ((q, ["B", "S", "N", "H"]), (k, ["B", "T", "N", "H"]), (v, ["B", "T", "N", "Hv"])):
        dims.update({name: [source_dims[p] for p in perm] for name, perm in heads.perms.items()})
    dims.update({name: ["B", "N", "S", "T"] for name in [*s.perms, *(o for n in mask_nodes + [softmax] + guard_nodes[1:] for o in n.output)]})
    dims[context.output[0]] = ["B", "N", "S", "Hv"]
    nodes = q.nodes + k.nodes + v.nodes + [product] + s.nodes + mask_nodes + [softmax] + guard_nodes + [context] + ([regroup] if regroup else []) + [back]
    swaps = q.swaps + k.swaps + v.swaps + s.swaps
    return _Attention(softmax.name or probs, q.source, k.source, v.source, mask, q.scale * k.scale * s.scale, guard, back.output[0], nodes, dims, regroup, swaps=swaps)


def _heads(graph: onnx.GraphProto, name: str, made_by) -> _Heads:
    perm, scale, nodes, perms, swaps = [0, 1, 2, 3], 1.0, [], {}, []
    while True:
        perms[name] = perm
        node = made_by.get(name)
        if is_op(node, "Transpose") and len(attribute(node, "perm", [])) == 4:
            inner = list(attribute(node, "perm"))
            perm = [inner[p] for p in perm]
            name = node.input[0]
        elif (swap := _batched_swap(graph, node, made_by)) is not None:
            first, middle = swap
            perm = [SWAP_PERM[p] for p in perm]
            name = first.input[0]
            nodes += [first, middle]
            swaps.append((first, node))
        elif is_op(node, "Mul") and (side := scalar_operand(graph, node)) is not None:
            scale *= scalar_constant(graph, node.input[side])
            name = node.input[1 - side]
        elif is_op(node, "Div") and scalar_constant(graph, node.input[1]) not in (None, 0.0):
            scale /= scalar_constant(graph, node.input[1])
            name = node.input[0]
        else:
            break
        nodes.append(node)
    # `perms` was filled from the end tensor back: each entry is its perm of the source once reversed
    return _Heads(name, perm, scale, nodes, _relative_to_source(perms, perm), swaps)


def _batched_swap(graph: onnx.GraphProto, node: onnx.NodeProto | None, made_by) -> tuple[onnx.NodeProto, onnx.NodeProto] | None:
    """(first Reshape, Transpose) when `node` ends Reshape(Transpose(Reshape(x, [B*N, T, H]), [0, 2, 1]),
    [B, N, H, T]) with constant targets: torch's dynamo export transposes K this way (the last two axes, with
    the batch and head axes merged). That is Transpose(x, [0, 1, 3, 2]) when x is [B, N, T, H], which
    _problem checks on the observed shapes (_swap_problem)."""
    if not is_op(node, "Reshape") or len(node.input) < 2:
        return None
    middle = made_by.get(node.input[0])
    if not is_op(middle, "Transpose") or list(attribute(middle, "perm", [])) != [0, 2, 1]:
        return None
    first = made_by.get(middle.input[0])
    if not is_op(first, "Reshape") or len(first.input) < 2:
        return None
    targets = [constant_value(graph, n.input[1]) for n in (first, node)]
    if any(t is None for t in targets) or [t.size for t in targets] != [3, 4]:
        return None
    return first, middle


def _swap_problem(first: onnx.NodeProto, last: onnx.NodeProto, graph: onnx.GraphProto, facts: GraphFacts) -> str | None:
    """Why Reshape(Transpose(Reshape(x, a), [0, 2, 1]), b) is not shown to be x with its last two axes
    swapped: x must be [B, N, T, H] with N, T and H static, a = [B*N or -1, T, H], b = [B or -1, N, H, T]."""
    why = f"the Reshape/Transpose/Reshape at {last.name or last.output[0]!r} is not shown to swap the last two axes"
    dims = facts.shape(first.input[0])
    if isinstance(dims, str) or len(dims) != 4 or not all(isinstance(d, int) for d in dims[1:]):
        return f"{why}: {first.input[0]} has shape {dims if isinstance(dims, str) else show_dims(dims)}"
    b, n, t, h = dims
    a = [int(v) for v in constant_value(graph, first.input[1]).reshape(-1)]
    c = [int(v) for v in constant_value(graph, last.input[1]).reshape(-1)]
    merged = b * n if isinstance(b, int) else None
    if a[0] not in (-1, merged) or a[1:] != [t, h] or c[0] not in (-1, b) or c[1:] != [n, h, t]:
        return f"{why}: targets {a} and {c} on {show_dims(dims)}"
    return None


def _relative_to_source(walked: dict[str, list[int]], total: list[int]) -> dict[str, list[int]]:
    """`walked` maps each tensor to the end tensor's perm of it; turn that into its own perm of the source."""
    inverse = {}
    for name, end_of_it in walked.items():
        # end[i] = it[end_of_it[i]] and end[i] = source[total[i]]  =>  it[end_of_it[i]] = source[total[i]]
        own = [0, 1, 2, 3]
        for i, j in enumerate(end_of_it):
            own[j] = total[i]
        inverse[name] = own
    return inverse


def _problem(a: _Attention, graph: onnx.GraphProto, facts: GraphFacts, made_by, read_by, outputs: set[str]) -> str | None:
    """Why `a` cannot be fused, or None (and then its head count and V's head size are set)."""
    for first, last in a.swaps:
        if problem := _swap_problem(first, last, graph, facts):
            return problem
    shapes = {}
    for name in (a.q, a.k, a.v):
        if facts.elem_types.get(name) != TensorProto.FLOAT:
            return f"{name} is not float32 (onnxruntime's MultiHeadAttention CPU kernel is float32 only)"
        dims = _split_dims(name, facts, made_by)
        if isinstance(dims, str):
            return dims
        shapes[name] = dims
    heads = shapes[a.q][2]
    if shapes[a.k][2] != heads or shapes[a.v][2] != heads or shapes[a.k][3] != shapes[a.q][3]:
        return f"q, k, v shapes {show_dims(shapes[a.q])}, {show_dims(shapes[a.k])}, {show_dims(shapes[a.v])} do not agree on heads and head size"
    a.heads, a.v_head_size = heads, shapes[a.v][3]
    if a.regroup is not None:
        target = _regroup_target(graph, a, made_by, {"N": heads, "H": shapes[a.q][3], "Hv": a.v_head_size})
        if isinstance(target, str):
            return target
        a.nodes = target + a.nodes
    removed = {id(n) for n in a.nodes}
    for node in a.nodes[:-1]:
        for name in node.output:
            if name in outputs or any(id(r) not in removed for r in read_by.get(name, [])):
                return f"{name} is also read elsewhere or is a graph output"
    if a.mask:
        return _mask_problem(a, graph, facts)
    return None


def _split_dims(name: str, facts: GraphFacts, made_by) -> list | str:
    """The [B, S, N, H] dims of a tensor the heads come from, N and H static, or why they are not known.

    Exporters often split heads with Reshape(x, [B, S, -1, H]), which leaves N symbolic to onnx shape
    inference. N is then taken as x's static hidden size over H, and only if onnxruntime produced that N
    on every calibration feed."""
    dims = facts.shape(name)
    if isinstance(dims, str):
        return f"the head count is not known: {dims}"
    if len(dims) != 4 or not isinstance(dims[3], int):
        return f"{name} has shape {show_dims(dims)}: the head size must be static"
    if isinstance(dims[2], int):
        return dims
    split = made_by.get(name)
    hidden = facts.shape(split.input[0]) if is_op(split, "Reshape") else "it is not made by a Reshape"
    seen = {s[2] for s in facts.observe().get(name, ()) if len(s) == 4} if facts.observe else set()
    if isinstance(hidden, str) or not hidden or not isinstance(hidden[-1], int) or seen != {hidden[-1] // dims[3]} or hidden[-1] % dims[3]:
        why = hidden if isinstance(hidden, str) else f"its input has shape {show_dims(hidden)}, observed head counts {sorted(seen)}"
        return f"{name} has shape {show_dims(dims)} and its head count is not known: {why}"
    return [dims[0], dims[1], hidden[-1] // dims[3], dims[3]]


def _regroup_target(graph: onnx.GraphProto, a: _Attention, made_by, static: dict[str, int]) -> list[onnx.NodeProto] | str:
    """A Reshape between the context and the Transpose back (torch's export has one) may be dropped only if
    it keeps the shape: its target, assembled from Shape/Gather/Unsqueeze/Concat, must name the context's
    own dims [B, N, S, Hv] (or their static values, 0 for "copy", one -1). Returns the nodes that compute
    the target (removed with the pattern when nothing else reads them), or why it cannot be dropped."""
    why = f"the Reshape {a.regroup.name or a.regroup.output[0]!r} after the attention is not shown to keep the shape"
    target, nodes = symbolic_vector(graph, a.regroup.input[1], made_by, a.dims)
    if target is None or len(target) != 4:
        return why
    wanted = a.dims[a.regroup.input[0]]
    for entry, symbol in zip(target, wanted):
        if entry != symbol and entry != 0 and entry != -1 and entry != static.get(symbol):
            return why
    if target.count(-1) > 1:
        return why
    return nodes


def symbolic_vector(graph: onnx.GraphProto, name: str, made_by, dims: dict[str, list[str]]) -> tuple[list | None, list[onnx.NodeProto]]:
    """A 1-D int64 tensor as ints and dim symbols: a constant, or a Concat of constants and
    [Unsqueeze(]Gather(Shape(x), i)[)] with x a pattern tensor. (None, []) when it is anything else."""
    value = constant_value(graph, name)
    if value is not None:
        return [int(v) for v in value.reshape(-1)], []
    concat = made_by.get(name)
    if not is_op(concat, "Concat"):
        return None, []
    entries, nodes = [], [concat]
    for piece in concat.input:
        value = constant_value(graph, piece)
        if value is not None:
            entries += [int(v) for v in value.reshape(-1)]
            continue
        gather = made_by.get(piece)
        lifted = gather if is_op(gather, "Unsqueeze") else None
        gather = made_by.get(gather.input[0]) if lifted is not None else gather
        shape = made_by.get(gather.input[0]) if is_op(gather, "Gather") else None
        index = constant_value(graph, gather.input[1]) if shape is not None else None
        if not is_op(shape, "Shape") or shape.attribute or index is None or index.size != 1 or attribute(gather, "axis", 0) != 0:
            return None, []
        source = dims.get(shape.input[0])
        if source is None:
            return None, []
        entries.append(source[int(index.reshape(()))])
        nodes += [n for n in (lifted, gather, shape) if n is not None]
    return entries, nodes


def _mask_problem(a: _Attention, graph: onnx.GraphProto, facts: GraphFacts) -> str | None:
    """MultiHeadAttention's attention_bias must be float32 of shape [B or 1, N or 1, S, T] on every feed. A
    mask [.., 1, T] (the eager BERT extended mask) is accepted and expanded over the S query positions
    first (Expand broadcasts, so that stays right on feeds where it would already be [.., S, T]). A constant
    mask (torch's dynamo export of a model without one folds to a [1, 1, S, T] bias) has its own shape."""
    if facts.elem_types.get(a.mask) != TensorProto.FLOAT:
        return f"the mask {a.mask} is not float32"
    constant = constant_value(graph, a.mask)
    seen = {constant.shape} if constant is not None else facts.observe().get(a.mask) if facts.observe else None
    if not seen:
        return f"the mask {a.mask} was not observed (no calibration feeds)"
    observed = facts.observe()
    batches = {s[0] for s in observed.get(a.q, ())}
    queries = {s[1] for s in observed.get(a.q, ())}
    keys = {s[1] for s in observed.get(a.k, ())}
    fits = all(len(m) == 4 and m[0] in batches | {1} and m[1] in (1, a.heads) for m in seen) and {m[3] for m in seen} == keys
    positions = {m[2] for m in seen} if fits else set()
    if positions == {1} and queries != {1}:
        a.expand_mask = True
    elif not fits or positions != queries:
        return f"the mask {a.mask} has shapes {sorted(seen)}: MultiHeadAttention takes [batch or 1, heads or 1, queries or 1, keys]"
    return None


def _replace(graph: onnx.GraphProto, found: list[_Attention], names: NameGenerator) -> int:
    """Each replacement goes where its pattern's last node (the Transpose back) was: everything it reads is
    defined before that (graph.splice). Returns how many nodes were added."""
    shapes = _Shapes(graph, names)
    rewrites = [(a.nodes, _replacement(a, shapes, names)) for a in found]
    splice(graph, rewrites)
    return sum(len(new) for _, new in rewrites)


class _Shapes:
    """The int64 constants the replacements read, each added to the graph once, when first asked for."""

    def __init__(self, graph: onnx.GraphProto, names: NameGenerator):
        self.graph, self.names, self.made = graph, names, {}

    def __call__(self, hint: str, values: list[int]) -> str:
        key = tuple(values)
        if key not in self.made:
            self.made[key] = self.names(f"attention_{hint}")
            self.graph.initializer.append(numpy_helper.from_array(np.array(values, np.int64), self.made[key]))
        return self.made[key]


def _replacement(a: _Attention, shapes: _Shapes, names: NameGenerator) -> list[onnx.NodeProto]:
    stem = a.name
    nodes, merged = [], []
    for role, source in (("query", a.q), ("key", a.k), ("value", a.v)):
        merged.append(names(f"{stem}_{role}"))
        nodes.append(helper.make_node("Reshape", [source, shapes("merge_heads_shape", [0, 0, -1])], [merged[-1]], name=names(f"{stem}/merge_{role}_heads")))
    mask = a.mask
    if a.expand_mask:  # Expand(mask, [1, 1, S, 1]) with S = dim 1 of q
        q_shape, queries, target, mask = (names(f"{stem}_{x}") for x in ("query_shape", "queries", "mask_expansion", "mask_expanded"))
        nodes += [
            helper.make_node("Shape", [a.q], [q_shape], name=names(f"{stem}/query_shape")),
            helper.make_node("Gather", [q_shape, shapes("index_1", [1])], [queries], name=names(f"{stem}/queries"), axis=0),
            helper.make_node("Concat", [shapes("ones_2", [1, 1]), queries, shapes("one", [1])], [target], name=names(f"{stem}/mask_expansion"), axis=0),
            helper.make_node("Expand", [a.mask, target], [mask], name=names(f"{stem}/expand_mask")),
        ]
    attended = names(f"{stem}_attention")
    inputs = merged + ["", "", mask] if mask else merged
    nodes.append(helper.make_node("MultiHeadAttention", inputs, [attended], name=names(f"{stem}/attention"), domain=MS_DOMAIN, num_heads=a.heads, scale=a.scale))
    if a.nan_guard:
        is_nan, guarded = names(f"{stem}_attention_is_nan"), names(f"{stem}_attention_guarded")
        nodes.append(helper.make_node("IsNaN", [attended], [is_nan], name=names(f"{stem}/attention_is_nan")))
        nodes.append(helper.make_node("Where", [is_nan, a.nan_guard, attended], [guarded], name=names(f"{stem}/attention_nan_guard")))
        attended = guarded
    split = shapes(f"split_{a.heads}_heads_shape", [0, 0, a.heads, a.v_head_size])
    nodes.append(helper.make_node("Reshape", [attended, split], [a.output], name=names(f"{stem}/split_heads")))
    return nodes
