"""eliminate-identities: remove nodes whose output always equals their first input.

Rewrites (readers of the output read the input instead, via graph.replace_tensor, so a graph output's name
is kept; the node's now-unused constant inputs are left for remove-dead-code):
  Identity                                                   => removed
  Dropout in inference mode (opset >= 7 without training_mode, or training_mode a constant false
    initializer; opset < 7 with is_test=1), mask output unused  => removed (ratio is irrelevant)
  Cast(to=T) of a tensor whose element type is already T     => removed
  Reshape to the input's own shape (constant shape input)    => removed
  Transpose with perm = [0, 1, ..., r-1], or no perm on a rank-0/1 tensor => removed
  Pad with all-zero pads (constant), any mode                => removed
  Slice taking every element (constant starts/ends/axes/steps, steps all 1) => removed

Shape-dependent cases (Reshape, Slice, Transpose without perm) trust a shape only when it is confirmed:
node outputs need an onnx-inferred shape that matches every shape onnxruntime produced on the calibration
feeds (ctx.activations.observed_shapes); graph inputs are trusted for their declared static dims (onnxruntime
rejects feeds that differ) and initializers for their dims. A symbolic dim is accepted only where the
rewrite holds whatever its size: Reshape target 0 (copy, allowzero=0), the single -1 of a Reshape whose
other dims are all proven, or a Slice from 0 to INT64_MAX.

Refused (reason recorded): element type unknown (Cast); a needed input not a constant initializer; shape
not inferred, not observed (no feeds), disagreeing with observation, or symbolic where the size matters;
Dropout in training mode or with a used mask; output is a graph output that cannot keep its name
(e.g. graph input -> Identity -> graph output, or two graph outputs that would have to merge).

Subgraphs: recursed into. Cases that need no shape (Identity, Dropout, Cast, Transpose with perm, Pad)
work in If/Loop/Scan bodies; shape-dependent ones are refused there because onnxruntime's shapes are
only observed for main-graph tensors. A Cast's input type in a body must be declared in the body (its
inputs, initializers, value_info) or come from an enclosing graph.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper

from graphopt.graph import constant_value, consumers, iter_graphs, output_names, remove_nodes, replace_tensor, subgraphs
from graphopt.passes_base import Pass, PassContext, PassError, PassResult, register

INT64_MAX = 2**63 - 1

Dims = list[int | None]  # a shape: static sizes, None for a symbolic dim
Verdict = bool | str  # True: the node is an identity; False: it is not; str: cannot tell, here is why
Observer = Callable[[], dict[str, set[tuple[int, ...]]]]  # runs onnxruntime only when first asked


@dataclass
class GraphFacts:
    """What is known about one graph's tensors: element types and shapes that can be trusted."""

    opset: int
    elem_types: dict[str, int]
    inferred: dict[str, Dims]
    trusted: set[str]  # tensors whose `inferred` shape onnxruntime enforces (graph inputs, initializers)
    observe: Observer | None  # None inside bodies: nothing is observed there

    def shape(self, name: str) -> Dims | str:
        """The confirmed shape of `name`, or why there is none."""
        if self.observe is None:
            return "shapes inside If/Loop/Scan bodies are not observed"
        dims = self.inferred.get(name)
        if dims is None:
            return f"onnx shape inference gives no shape for {name}"
        if name in self.trusted:
            return dims
        seen = self.observe().get(name)
        if not seen:
            return f"{name} was not observed (no calibration feeds)"
        if any(len(s) != len(dims) or any(d is not None and d != o for d, o in zip(dims, s)) for s in seen):
            return f"inferred shape {_show(dims)} of {name} disagrees with the observed {sorted(seen)}"
        return dims


def _show(dims: Dims) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in dims) + "]"


def _value_info_facts(values) -> tuple[dict[str, int], dict[str, Dims]]:
    types: dict[str, int] = {}
    shapes: dict[str, Dims] = {}
    for vi in values:
        if not vi.type.HasField("tensor_type"):
            continue
        tt = vi.type.tensor_type
        if tt.elem_type:
            types[vi.name] = tt.elem_type
        if tt.HasField("shape"):
            shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
    return types, shapes


def graph_facts(graph: onnx.GraphProto, opset: int, outer_types: dict[str, int], observe: Observer | None) -> GraphFacts:
    """Facts of `graph` (taken from its shape-inferred twin) on top of the enclosing graphs' types."""
    types, shapes = _value_info_facts(list(graph.input) + list(graph.output) + list(graph.value_info))
    inputs = {i.name for i in graph.input}
    for t in graph.initializer:
        if t.name not in inputs:
            types[t.name] = t.data_type
            shapes[t.name] = list(t.dims)
    trusted = inputs | {t.name for t in graph.initializer}
    return GraphFacts(opset, {**outer_types, **types}, shapes, trusted, observe)


def all_graph_facts(model: onnx.ModelProto, observe: Observer) -> list[GraphFacts]:
    """One GraphFacts per graph, in iter_graphs order, from one onnx shape inference run."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    except (onnx.shape_inference.InferenceError, ValueError) as exc:
        raise PassError(f"onnx shape inference failed on this model ({exc}); run the checker on it") from exc
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    facts: list[GraphFacts] = []

    def walk(graph: onnx.GraphProto, outer_types: dict[str, int], observe_here: Observer | None) -> None:
        here = graph_facts(graph, opset, outer_types, observe_here)
        facts.append(here)
        for node in graph.node:
            for body in subgraphs(node):
                walk(body, here.elem_types, None)

    walk(inferred.graph, {}, observe)
    return facts


# ---- the cases: each says whether `node` is an identity on node.input[0] ----

def _constant(graph: onnx.GraphProto, node: onnx.NodeProto, index: int, what: str) -> np.ndarray | str | None:
    """The constant value of an optional input (None when absent), or why it is not constant."""
    if len(node.input) <= index or not node.input[index]:
        return None
    value = constant_value(graph, node.input[index])
    return f"{what} input {node.input[index]} is not a constant initializer" if value is None else value


def _attr(node: onnx.NodeProto, name: str, default=None):
    found = [a for a in node.attribute if a.name == name]
    return helper.get_attribute_value(found[0]) if found else default


def identity(node, graph, facts) -> Verdict:
    return True


def dropout(node, graph, facts) -> Verdict:
    if facts.opset < 7 and _attr(node, "is_test", 0) != 1:
        return "opset < 7 Dropout without is_test=1 runs in training mode"
    training = _constant(graph, node, 2, "training_mode")
    if isinstance(training, str):
        return training
    if training is not None and bool(training):
        return "training_mode is true"
    mask = node.output[1] if len(node.output) > 1 else ""
    if mask and (mask in consumers(graph) or mask in output_names(graph)):
        return f"mask output {mask} is used"
    return True


def cast(node, graph, facts) -> Verdict:
    source = facts.elem_types.get(node.input[0])
    if source is None:
        return f"element type of {node.input[0]} is unknown"
    return source == _attr(node, "to")


def reshape(node, graph, facts) -> Verdict:
    target = _constant(graph, node, 1, "shape")
    if not isinstance(target, np.ndarray):
        return target or "shape input is missing"
    dims = facts.shape(node.input[0])
    if isinstance(dims, str):
        return dims
    if len(dims) != target.size:
        return False
    copies_zero = not _attr(node, "allowzero", 0)
    for axis, (size, want) in enumerate(zip(dims, target.tolist())):
        if (want == 0 and copies_zero) or want == -1:
            continue
        if size is None:
            return f"dim {axis} of {node.input[0]} is symbolic, target {want} may differ"
        if size != want:
            return False
    # Every other dim is proven equal, so a single -1 resolves to the input's size there.
    return True


def transpose(node, graph, facts) -> Verdict:
    perm = _attr(node, "perm")
    if perm is not None:
        return list(perm) == list(range(len(perm)))
    dims = facts.shape(node.input[0])
    if isinstance(dims, str):
        return f"no perm (reverses dims) and the rank is unknown: {dims}"
    return len(dims) <= 1


def pad(node, graph, facts) -> Verdict:
    pads = _attr(node, "pads") if facts.opset < 11 else _constant(graph, node, 1, "pads")
    if isinstance(pads, str):
        return pads
    return pads is not None and not np.any(np.asarray(pads))


def slice_(node, graph, facts) -> Verdict:
    if facts.opset < 10:
        starts, ends, axes, steps = _attr(node, "starts"), _attr(node, "ends"), _attr(node, "axes"), None
    else:
        names = ("starts", "ends", "axes", "steps")
        starts, ends, axes, steps = (_constant(graph, node, k, what) for k, what in enumerate(names, 1))
    for value in (starts, ends, axes, steps):
        if isinstance(value, str):
            return value
    starts, ends = np.asarray(starts).tolist(), np.asarray(ends).tolist()
    steps = [1] * len(starts) if steps is None else np.asarray(steps).tolist()
    if any(step != 1 for step in steps):
        return False
    dims = facts.shape(node.input[0])
    if isinstance(dims, str):
        return dims
    axes = list(range(len(starts))) if axes is None else np.asarray(axes).tolist()
    for axis, start, end in zip(axes, starts, ends):
        verdict = _takes_whole_axis(dims[axis], start, end)
        if verdict is not True:
            return verdict if isinstance(verdict, bool) else f"axis {axis} of {node.input[0]}: {verdict}"
    return True


def _takes_whole_axis(size: int | None, start: int, end: int) -> Verdict:
    """Whether [start:end] with step 1 keeps every element of an axis of `size` (None: symbolic).

    On a symbolic axis only 0 (or <= -INT64_MAX) to INT64_MAX provably covers it; a slice that could
    cover it for some sizes is refused, one that covers only an empty axis (start > 0, end <= 0) is not
    an identity worth keeping.
    """
    if size is None:
        starts_at_zero = start == 0 or start <= -INT64_MAX
        if starts_at_zero and end >= INT64_MAX:
            return True
        if start <= 0 and end > 0:
            return f"symbolic size, slice [{start}:{end}] may not cover it"
        return False
    start = min(max(start + size if start < 0 else start, 0), size)
    end = min(max(end + size if end < 0 else end, 0), size)
    return start == 0 and end == size


CASES: dict[str, Callable[[onnx.NodeProto, onnx.GraphProto, GraphFacts], Verdict]] = {
    "Identity": identity,
    "Dropout": dropout,
    "Cast": cast,
    "Reshape": reshape,
    "Transpose": transpose,
    "Pad": pad,
    "Slice": slice_,
}


def _label(node: onnx.NodeProto) -> str:
    return f"{node.op_type} {node.name or '(unnamed)'} ({node.input[0]} -> {node.output[0]})"


@dataclass
class _Outcome:
    removed: dict[str, int] = field(default_factory=dict)
    refused: list[str] = field(default_factory=list)


@register
@dataclass
class EliminateIdentities(Pass):
    name = "eliminate-identities"
    description = "Remove Identity, inference Dropout, same-type Cast and no-op Reshape/Transpose/Pad/Slice"
    lossless = True

    def run(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        graphs = list(iter_graphs(model.graph))
        if not any(_candidate(n) for g in graphs for n in g.node):
            return PassResult(changed=False, counts={"nodes_removed": 0})
        # Every decision is taken before the first edit, so observing `model` lazily sees it unchanged.
        facts = all_graph_facts(model, functools.cache(lambda: ctx.activations.observed_shapes(model)))
        outcome = _Outcome()
        decided = [(graph, self._identities(graph, here, outcome)) for graph, here in zip(graphs, facts)]
        for graph, nodes in decided:
            self._remove(graph, nodes, outcome)
        counts: dict[str, int] = {"nodes_removed": sum(outcome.removed.values())}
        counts.update({f"{op}_removed": k for op, k in sorted(outcome.removed.items())})
        return PassResult(changed=counts["nodes_removed"] > 0, counts=counts, refused=outcome.refused)

    @staticmethod
    def _identities(graph: onnx.GraphProto, facts: GraphFacts, outcome: _Outcome) -> list[onnx.NodeProto]:
        """The nodes of `graph` that are identities; refusals go to `outcome`. Nothing is changed yet."""
        found = []
        for node in filter(_candidate, graph.node):
            verdict = CASES[node.op_type](node, graph, facts)
            if verdict is True:
                found.append(node)
            elif isinstance(verdict, str):
                outcome.refused.append(f"{_label(node)}: {verdict}")
        return found

    @staticmethod
    def _remove(graph: onnx.GraphProto, nodes: list[onnx.NodeProto], outcome: _Outcome) -> None:
        doomed = []
        for node in nodes:
            # Names are read now: an earlier removal may have renamed this node's input or output.
            source, result = node.input[0], node.output[0]
            if replace_tensor(graph, result, source):
                doomed.append(node)
                outcome.removed[node.op_type] = outcome.removed.get(node.op_type, 0) + 1
            else:
                outcome.refused.append(
                    f"{_label(node)}: {result} is a graph output and {source} cannot take its name "
                    "(it is a graph input, initializer or output, or comes from an enclosing graph)"
                )
        remove_nodes(graph, doomed)


def _candidate(node: onnx.NodeProto) -> bool:
    """A node of a handled op type with a data input and an output to reroute."""
    has_ends = bool(node.input) and bool(node.input[0]) and bool(node.output) and bool(node.output[0])
    return node.op_type in CASES and node.domain in ("", "ai.onnx") and has_ends
