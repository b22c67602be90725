"""eliminate-identities: remove nodes whose output always equals one of their inputs.

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
  Add(x, 0) / Add(0, x) / Sub(x, 0) / Mul(x, 1) / Mul(1, x) / Div(x, 1) / Pow(x, 1), the constant an
    initializer of x's element type whose broadcast leaves x's shape as it is => removed (x + 0 turns -0.0
    into +0.0: numerically equal; NaN and inf pass through unchanged)
  Concat of a single input                                   => removed
  Expand to a constant shape whose broadcast leaves the input's shape as it is (e.g. all 1s, or the
    input's own proven shape)                                => removed
  Unsqueeze with empty axes (constant input, or attribute before opset 13) => removed

Shape-dependent cases (Reshape, Slice, Transpose without perm, broadcasts) trust a shape only when it is confirmed:
node outputs need an onnx-inferred shape that matches every shape onnxruntime produced on the calibration
feeds (ctx.activations.observed_shapes); graph inputs are trusted for their declared static dims (onnxruntime
rejects feeds that differ) and initializers for their dims. A symbolic dim is accepted only where the
rewrite holds whatever its size: Reshape target 0 (copy, allowzero=0), the single -1 of a Reshape whose
other dims are all proven, a Slice from 0 to INT64_MAX, or a broadcast against a dim of 1.
Broadcasts (Add/Sub/Mul/Div/Pow with a constant of rank > 0, Expand to a non-empty shape) and Transpose
without perm need only the rank (and the dims the constant does not set to 1): where onnx infers no shape
for a main-graph tensor, the single rank onnxruntime produced on every calibration feed is taken, with
every dim symbolic. A scalar constant or an empty Expand shape needs no shape at all.

Refused (reason recorded): element type unknown (Cast, neutral constants); a needed input not a constant
initializer; shape not inferred, not observed (no feeds), disagreeing with observation, or symbolic where
the size matters (a constant dim > 1 against a symbolic dim may broadcast a size-1 dim); Dropout in
training mode or with a used mask; a neutral constant of another element type than the tensor (only
Pow's exponent may legally differ; it is not reasoned about); Squeeze with empty axes (opset >= 13):
onnxruntime squeezes every size-1 dim, onnx shape inference and the reference implementation squeeze none;
output is a graph output that cannot keep its name (e.g. graph input -> Identity -> graph output, or two
graph outputs that would have to merge).

Subgraphs: recursed into. Cases that need no shape (Identity, Dropout, Cast, Transpose with perm, Pad,
Concat, Unsqueeze, Add/Sub/Mul/Div/Pow with a scalar constant, Expand to an empty shape) work in
If/Loop/Scan bodies; shape-dependent ones are refused there because onnxruntime's shapes are
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

from graphopt.graph import STANDARD_DOMAINS, attribute, constant_value, consumers, iter_graphs, output_names, remove_nodes, replace_tensor
from graphopt.passes_base import Pass, PassContext, PassResult, register
from graphopt.shapes import GraphFacts, all_graph_facts

INT64_MAX = 2**63 - 1


@dataclass(frozen=True)
class Forwards:
    """The node's output always equals its input number `index` (for ops whose data input may be either)."""

    index: int


Verdict = bool | str | Forwards  # True: identity of input 0; False: not an identity; str: cannot tell, here is why


# ---- the cases: each says whether `node` is an identity on node.input[0] ----

def _constant(graph: onnx.GraphProto, node: onnx.NodeProto, index: int, what: str) -> np.ndarray | str | None:
    """The constant value of an optional input (None when absent), or why it is not constant."""
    if len(node.input) <= index or not node.input[index]:
        return None
    value = constant_value(graph, node.input[index])
    return f"{what} input {node.input[index]} is not a constant initializer" if value is None else value


def identity(node, graph, facts) -> Verdict:
    return True


def dropout(node, graph, facts) -> Verdict:
    if facts.opset < 7 and attribute(node, "is_test", 0) != 1:
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
    return source == attribute(node, "to")


def reshape(node, graph, facts) -> Verdict:
    target = _constant(graph, node, 1, "shape")
    if not isinstance(target, np.ndarray):
        return target or "shape input is missing"
    dims = facts.shape(node.input[0])
    if isinstance(dims, str):
        return dims
    if len(dims) != target.size:
        return False
    copies_zero = not attribute(node, "allowzero", 0)
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
    perm = attribute(node, "perm")
    if perm is not None:
        return list(perm) == list(range(len(perm)))
    dims = facts.rank_shape(node.input[0])
    if isinstance(dims, str):
        return f"no perm (reverses dims) and the rank is unknown: {dims}"
    return len(dims) <= 1


def pad(node, graph, facts) -> Verdict:
    pads = attribute(node, "pads") if facts.opset < 11 else _constant(graph, node, 1, "pads")
    if isinstance(pads, str):
        return pads
    return pads is not None and not np.any(np.asarray(pads))


def slice_(node, graph, facts) -> Verdict:
    if facts.opset < 10:
        starts, ends, axes, steps = attribute(node, "starts"), attribute(node, "ends"), attribute(node, "axes"), None
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


# The neutral constant of each op and which inputs it may be: (value, input positions).
NEUTRAL: dict[str, tuple[int, tuple[int, ...]]] = {
    "Add": (0, (1, 0)),
    "Mul": (1, (1, 0)),
    "Sub": (0, (1,)),
    "Div": (1, (1,)),
    "Pow": (1, (1,)),
}


def neutral_operand(node, graph, facts) -> Verdict:
    """x op c == x when c is the op's neutral constant and broadcasting it changes neither shape nor type."""
    neutral, positions = NEUTRAL[node.op_type]
    if len(node.input) != 2:
        return False
    for position in positions:
        constant = constant_value(graph, node.input[position])
        if constant is None or not np.all(constant == neutral):
            continue
        data = node.input[1 - position]
        verdict = _same_type(constant, node.input[position], data, facts)
        if verdict is True and constant.ndim > 0:
            verdict = _broadcast_keeps_shape(facts, data, constant.shape)
        return Forwards(1 - position) if verdict is True else verdict
    return False


def _same_type(constant: np.ndarray, constant_name: str, data: str, facts: GraphFacts) -> Verdict:
    elem = facts.elem_types.get(data)
    if elem is None:
        return f"element type of {data} is unknown"
    wanted = helper.tensor_dtype_to_np_dtype(elem)
    if constant.dtype != wanted:
        return f"constant {constant_name} is {constant.dtype} but {data} is {wanted}"
    return True


def _broadcast_keeps_shape(facts: GraphFacts, name: str, other: tuple[int, ...] | list[int]) -> Verdict:
    """Whether broadcasting `name` with a shape `other` leaves `name`'s shape unchanged."""
    dims = facts.rank_shape(name)
    if isinstance(dims, str):
        return dims
    if len(other) > len(dims):
        return False
    for axis, want in zip(range(len(dims) - len(other), len(dims)), other):
        if want == 1:
            continue
        if dims[axis] is None:
            return f"dim {axis} of {name} is symbolic, broadcasting it with {want} may change it"
        if dims[axis] != want:
            return False
    return True


def concat(node, graph, facts) -> Verdict:
    return len(node.input) == 1


def expand(node, graph, facts) -> Verdict:
    target = _constant(graph, node, 1, "shape")
    if not isinstance(target, np.ndarray):
        return target or "shape input is missing"
    return target.size == 0 or _broadcast_keeps_shape(facts, node.input[0], target.tolist())


def _axes(node, graph, facts) -> np.ndarray | str | None:
    axes = attribute(node, "axes") if facts.opset < 13 else _constant(graph, node, 1, "axes")
    return axes if axes is None or isinstance(axes, str) else np.asarray(axes)


def unsqueeze(node, graph, facts) -> Verdict:
    axes = _axes(node, graph, facts)
    return axes if isinstance(axes, str) else axes is not None and axes.size == 0


def squeeze(node, graph, facts) -> Verdict:
    """Never removed: an empty axes input (opset >= 13) means "squeeze nothing" to onnx's shape inference and
    reference implementation but "squeeze every size-1 dim" to onnxruntime. Before opset 13 an empty axes
    attribute squeezes every size-1 dim in both, so it is no identity."""
    axes = _axes(node, graph, facts) if facts.opset >= 13 else None
    if isinstance(axes, np.ndarray) and axes.size == 0:
        return "empty axes: onnxruntime squeezes every size-1 dim, onnx shape inference and reference squeeze none"
    return False


CASES: dict[str, Callable[[onnx.NodeProto, onnx.GraphProto, GraphFacts], Verdict]] = {
    "Identity": identity,
    "Dropout": dropout,
    "Cast": cast,
    "Reshape": reshape,
    "Transpose": transpose,
    "Pad": pad,
    "Slice": slice_,
    **dict.fromkeys(NEUTRAL, neutral_operand),
    "Concat": concat,
    "Expand": expand,
    "Unsqueeze": unsqueeze,
    "Squeeze": squeeze,
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
    description = (
        "Remove Identity, inference Dropout, same-type Cast, no-op Reshape/Transpose/Pad/Slice/Expand/Unsqueeze, "
        "single-input Concat and x+0, x-0, x*1, x/1, x^1"
    )
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
    def _identities(graph: onnx.GraphProto, facts: GraphFacts, outcome: _Outcome) -> list[tuple[onnx.NodeProto, int]]:
        """The nodes of `graph` that are identities, each with the input it forwards; refusals go to
        `outcome`. Nothing is changed yet."""
        found = []
        for node in filter(_candidate, graph.node):
            verdict = CASES[node.op_type](node, graph, facts)
            if verdict is True:
                found.append((node, 0))
            elif isinstance(verdict, Forwards):
                found.append((node, verdict.index))
            elif isinstance(verdict, str):
                outcome.refused.append(f"{_label(node)}: {verdict}")
        return found

    @staticmethod
    def _remove(graph: onnx.GraphProto, nodes: list[tuple[onnx.NodeProto, int]], outcome: _Outcome) -> None:
        doomed = []
        for node, forwarded in nodes:
            # Names are read now: an earlier removal may have renamed this node's input or output.
            source, result = node.input[forwarded], node.output[0]
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
    return node.op_type in CASES and node.domain in STANDARD_DOMAINS and has_ends
