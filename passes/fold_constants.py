"""fold-constants: replace every computation that depends on initializers alone by its result.

Rewrites (in the main graph and in If/Loop/Scan bodies, each graph before its bodies):
  nodes whose inputs are all constant (transitively) => initializers holding the outputs other nodes read;
    in a body, the initializers of the graphs around it count as constants too, and the result becomes an
    initializer of the body
  Shape(x) / Size(x) in the main graph, x fully static per onnx shape inference and confirmed by onnxruntime
    => int64 initializer
    (so Shape -> Gather -> Unsqueeze -> Concat -> Reshape chains of PyTorch/Paddle exports collapse)
  Constant -> Add(initializer) => one initializer; a Constant node read by a node that stays is left as it is
    (turning Constant nodes into initializers is lift-constants' job)

All constant nodes are evaluated together in one onnxruntime session (ORT_DISABLE_ALL, one run); a
second run happens only when the first produced a result that has to be refused (too big, not a tensor).
Only initializers that no graph input overrides count as constants. Each folded tensor becomes an
initializer with the tensor's own name, so graph outputs keep their names (an initializer may be a graph
output). Initializers that only the folded nodes read are removed here, not left to remove-dead-code.

Refused (named in `refused`, node left in place):
  RandomNormal/RandomUniform/...Like, Multinomial, Bernoulli: non-deterministic, a fixed draw would change the model
  nodes of a non-standard domain without an onnxruntime CPU kernel (custom ops, model-local functions)
  a folded output that would grow the model by more than `max_growth_bytes` (its bytes minus the bytes of
    the initializers only its computation reads), e.g. ConstantOfShape/Tile/Expand making big tensors:
    the producing node stays and its (small) constant inputs are folded instead
  a folded output that is a sequence/map/optional, not a tensor
  Transpose/Reshape/Flatten/Squeeze/Unsqueeze/Identity of an initializer that other nodes still read, when
    the result holds at least `min_view_bytes`: the file would store the weight twice. Such view nodes are
    what fold-shared-weights writes on purpose, and onnxruntime folds them when it loads the model.
  in a body, a result of at least `min_view_bytes` computed from an initializer of a graph around it: that
    initializer stays (other bodies may read it), so the body would store a second copy (silero-vad's LSTM
    weights, sliced inside two branches from the graph around them: 2.1 MB more on a 2.2 MB model)
  Shape/Size of a tensor whose static shape onnxruntime contradicts, or that no feed was available to confirm
  (graph inputs need no confirmation: onnxruntime rejects feeds that differ from declared static dims)

Not folded, not reported: nodes holding If/Loop/Scan bodies, Shape/Size inside bodies (their shapes are
not observed) and of dynamically shaped tensors,
DequantizeLinear (and so what it feeds) of constant integers, and Cast of constant 4- or 8-bit integers: a
quantized weight would turn back into the float weight a quantization pass (or the exporter) removed.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from graphopt import runtime
from graphopt.errors import PassError, UserError
from graphopt.graph import (
    STANDARD_DOMAINS,
    NON_DETERMINISTIC,
    constant_names,
    consumers,
    defined_names,
    output_names,
    producers,
    remove_nodes,
    subgraphs,
    tensor_bytes,
)
from graphopt.shapes import inferred_shapes
from graphopt.passes import qdq
from graphopt.passes_base import Pass, PassContext, PassResult, register

SHAPE_OPS = ("Shape", "Size")
VIEW_OPS = frozenset({"Transpose", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity"})


@dataclass
class _Plan:
    """Which nodes go, which run in onnxruntime, and which tensors become initializers."""

    removed: list[onnx.NodeProto]  # graph order; includes shape-folded nodes
    evaluated: list[onnx.NodeProto]  # graph order; what the onnxruntime model runs (Constant nodes kept too)
    needed: list[str]  # tensors read by nodes that stay (or graph outputs), to become initializers
    refused: list[str] = field(default_factory=list)


@register
@dataclass
class FoldConstants(Pass):
    name = "fold-constants"
    description = "evaluate initializer-only subgraphs and static Shape/Size once with onnxruntime; store the results"
    lossless = True

    max_growth_bytes: int = 1 << 20
    min_view_bytes: int = 64

    def run(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        shape_values, refused = _static_shape_values(model, ctx)
        counts = {"nodes_folded": 0, "shape_nodes_folded": 0, "bytes_added": 0}
        # Walked lazily, parents first: a body sees what its parent folded (as initializers around it), and
        # folding removes nodes in place, so the bodies reached afterwards are the model's own.
        for scope in _scopes(model.graph):
            plan, values = self._settled_plan(model, scope, shape_values if not scope.outer else {}, refused)
            refused += plan.refused
            if plan.removed:
                counts["bytes_added"] += _apply(scope.graph, plan, values)
                counts["nodes_folded"] += len(plan.removed)
                counts["shape_nodes_folded"] += sum(1 for n in plan.removed if n.output[0] in shape_values)
        if not counts["nodes_folded"]:
            return PassResult(changed=False, refused=refused)
        return PassResult(changed=True, counts=counts, refused=refused)

    def _settled_plan(self, model: onnx.ModelProto, scope: "_Scope", shape_values: dict[str, np.ndarray], refused: list[str]) -> tuple[_Plan, dict[str, object]]:
        """The plan for one graph and its values, after refusing the results that may not become initializers."""
        excluded: set[str] = set()  # outputs of nodes whose result was refused after evaluation
        while True:
            plan = _plan(scope, shape_values, excluded)
            values = _evaluate(model, scope, plan, shape_values)
            rejected = self._reject(scope, plan, values)
            if not rejected:
                return plan, values
            refused += rejected.values()
            excluded |= set(rejected)

    def _reject(self, scope: "_Scope", plan: _Plan, values: dict[str, object]) -> dict[str, str]:
        """Results that must not become initializers (their producers stay), with the reason for each."""
        graph = scope.graph
        prod = producers(graph)
        rejected: dict[str, str] = {}
        for name in plan.needed:
            node, value = prod[name], values[name]
            if not isinstance(value, np.ndarray):
                rejected[name] = f"{_describe(node)}: output '{name}' is a {type(value).__name__}, not a tensor"
        rejected.update(self._weight_views(graph, plan, values, rejected))
        rejected.update(self._outer_copies(scope, plan, values, rejected))
        big = [n for n in plan.needed if n not in rejected and _array_bytes(values[n]) > self.max_growth_bytes]
        freed = _freed_bytes(graph, plan) if big else {}
        for name in big:
            node, value = prod[name], values[name]
            growth = _array_bytes(value) - freed.get(name, 0)
            if growth > self.max_growth_bytes:
                rejected[name] = (
                    f"{_describe(node)}: folding output '{name}' ({_array_bytes(value)} bytes, shape {list(value.shape)}) "
                    f"would grow the model by {growth} bytes, over max_growth_bytes={self.max_growth_bytes}"
                )
        return rejected


    def _outer_copies(self, scope: "_Scope", plan: _Plan, values: dict[str, object], rejected: dict[str, str]) -> dict[str, str]:
        """Needed outputs of a body computed from initializers of the graphs around it (see the module
        docstring), with the reason for each."""
        if not scope.outer:
            return {}
        prod, own, removed_ids = producers(scope.graph), constant_names(scope.graph), {id(n) for n in plan.removed}
        around = scope.constants() - own
        by_id = {id(n): n for n in plan.removed}
        copies: dict[str, str] = {}
        for name in plan.needed:
            if name in rejected or _array_bytes(values[name]) < self.min_view_bytes:
                continue
            read = {i for k in _ancestors(prod, [name], removed_ids) for i in by_id[k].input} & around
            if read:
                copies[name] = (
                    f"{_describe(prod[name])}: '{name}' is computed from {', '.join(repr(r) for r in sorted(read))} of the graph "
                    f"around this body, which stays; folding would store {_array_bytes(values[name])} bytes more"
                )
        return copies

    def _weight_views(self, graph: onnx.GraphProto, plan: _Plan, values: dict[str, object], rejected: dict[str, str]) -> dict[str, str]:
        """Needed outputs that are a second layout of an initializer that stays in use."""
        prod, readers, outputs = producers(graph), consumers(graph), output_names(graph)
        removed_ids = {id(n) for n in plan.removed}
        constants = constant_names(graph)
        views: dict[str, str] = {}
        for name in plan.needed:
            node, value = prod[name], values[name]
            if name in rejected or node.op_type not in VIEW_OPS or node.domain not in STANDARD_DOMAINS:
                continue
            source = node.input[0]
            stays = source in outputs or any(id(r) not in removed_ids for r in readers.get(source, []))
            if source in constants and stays and _array_bytes(value) >= self.min_view_bytes:
                views[name] = (
                    f"{_describe(node)}: '{name}' is a {node.op_type} of initializer '{source}', which other nodes still read; "
                    f"folding would store its {_array_bytes(value)} bytes twice (onnxruntime folds it at load instead)"
                )
        return views


@dataclass
class _Scope:
    """A graph and the graphs around it, innermost first: a body may read their initializers."""

    graph: onnx.GraphProto
    outer: tuple[onnx.GraphProto, ...] = ()

    def constants(self) -> set[str]:
        """Names that are initializers here or around here, and not defined again closer in."""
        names, hidden = set(constant_names(self.graph)), defined_names(self.graph)
        for g in self.outer:
            names |= constant_names(g) - hidden
            hidden |= defined_names(g)
        return names

    def initializers(self, names: set[str]) -> list[onnx.TensorProto]:
        """The initializer each of `names` (constants of this scope) refers to: the innermost one."""
        found: dict[str, onnx.TensorProto] = {}
        for g in (self.graph, *self.outer):
            own = constant_names(g)
            found.update((t.name, t) for t in g.initializer if t.name in names and t.name in own and t.name not in found)
        return list(found.values())


def _scopes(graph: onnx.GraphProto, outer: tuple[onnx.GraphProto, ...] = ()):
    """Every graph with the graphs around it, parents before their bodies."""
    yield _Scope(graph, outer)
    for node in graph.node:
        for body in subgraphs(node):
            yield from _scopes(body, (graph, *outer))


def _describe(node: onnx.NodeProto) -> str:
    return f"{node.op_type} node '{node.name or node.output[0]}'"


def _static_shape_values(model: onnx.ModelProto, ctx: PassContext) -> tuple[dict[str, np.ndarray], list[str]]:
    """Shape/Size output -> its value, for inputs whose static shape is certain; and refusals."""
    graph = model.graph
    candidates = [n for n in graph.node if n.op_type in SHAPE_OPS and n.domain in STANDARD_DOMAINS]
    if not candidates:
        return {}, []
    declared = inferred_shapes(model)
    static = [n for n in candidates if _is_static(declared.get(n.input[0]))]
    enforced = {i.name for i in graph.input} | constant_names(graph)
    observed = ctx.activations.observed_shapes(model) if any(n.input[0] not in enforced for n in static) else {}
    values: dict[str, np.ndarray] = {}
    refused: list[str] = []
    for node in static:
        name, shape = node.input[0], tuple(declared[node.input[0]])
        seen = observed.get(name, set()) if name not in enforced else {shape}
        if not seen:
            refused.append(f"{_describe(node)}: no feeds to confirm the static shape {list(shape)} of '{name}'")
        elif seen != {shape}:
            refused.append(
                f"{_describe(node)}: '{name}' is declared {list(shape)} but onnxruntime produced "
                f"{sorted(list(s) for s in seen)}"
            )
        else:
            values[node.output[0]] = _shape_op_value(node, shape)
    return values, refused


def _is_static(shape: list[int | None] | None) -> bool:
    return shape is not None and all(d is not None for d in shape)


def _shape_op_value(node: onnx.NodeProto, shape: tuple[int, ...]) -> np.ndarray:
    if node.op_type == "Size":
        return np.array(int(np.prod(shape)), dtype=np.int64)
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    return np.array(shape[attrs.get("start", 0) : attrs.get("end", len(shape))], dtype=np.int64)


def _plan(scope: "_Scope", shape_values: dict[str, np.ndarray], excluded: set[str]) -> _Plan:
    """Constant nodes (in graph order, so a node's inputs are decided before it) and what to do with them.

    Node identities (`id`) are only compared while this function's lists keep the nodes alive."""
    graph = scope.graph
    runnable = _cpu_kernels()
    known = scope.constants()
    constant: list[onnx.NodeProto] = []
    refused: list[str] = []
    # what restores them was quantized on purpose: not folded
    integer_weights = set().union(*(qdq.integer_weights(g) for g in (graph, *scope.outer)))
    for node in graph.node:
        if node.output and node.output[0] in shape_values:
            constant.append(node)
            known.update(o for o in node.output if o)
            continue
        if excluded.intersection(node.output) or next(subgraphs(node), None) is not None or qdq.restores_weight(node, integer_weights):
            continue
        if not all(i in known for i in node.input if i):
            continue
        reason = _unfoldable_reason(node, runnable)
        if reason:
            refused.append(f"{_describe(node)}: {reason}")
            continue
        constant.append(node)
        known.update(o for o in node.output if o)

    constant_ids = {id(n) for n in constant}
    readers = consumers(graph)
    outputs = output_names(graph)
    kept: list[onnx.NodeProto] = []
    needed: list[str] = []
    for node in constant:
        outs = [o for o in node.output if o]
        read_outside = [o for o in outs if o in outputs or any(id(r) not in constant_ids for r in readers.get(o, []))]
        if node.op_type == "Constant" and read_outside:
            kept.append(node)
        else:
            needed += read_outside
    cone = _ancestors(producers(graph), needed, constant_ids)
    kept_ids = {id(n) for n in kept}
    # constant nodes outside the cone feed nothing that stays: they go too (a dead reader left behind
    # would read a tensor whose producer was folded away)
    removed = [n for n in constant if id(n) not in kept_ids]
    evaluated = [n for n in constant if id(n) in cone and n.output[0] not in shape_values]
    return _Plan(removed=removed, evaluated=evaluated, needed=needed, refused=refused)


def _unfoldable_reason(node: onnx.NodeProto, runnable: set[tuple[str, str]] | None) -> str | None:
    if node.op_type in NON_DETERMINISTIC and node.domain in STANDARD_DOMAINS:
        return "non-deterministic; folding would freeze one random draw"
    if node.domain in STANDARD_DOMAINS:
        return None
    if runnable is None or (node.domain, node.op_type) not in runnable:
        return f"domain '{node.domain}' op has no onnxruntime CPU kernel (custom op or model-local function)"
    return None


def _cpu_kernels() -> set[tuple[str, str]] | None:
    """(domain, op) pairs onnxruntime's CPU provider implements; None when this onnxruntime cannot say."""
    from onnxruntime.capi import _pybind_state

    kernel_defs = getattr(_pybind_state, "get_all_opkernel_def", None)
    if kernel_defs is None:
        return None
    return {(k.domain, k.op_name) for k in kernel_defs() if k.provider == "CPUExecutionProvider"}


def _ancestors(prod: dict[str, onnx.NodeProto], names: Iterable[str], within: set[int]) -> set[int]:
    """ids of the nodes in `within` that the tensors `names` are computed from (their producers included)."""
    seen: set[int] = set()
    stack = list(names)
    while stack:
        node = prod.get(stack.pop())
        if node is None or id(node) not in within or id(node) in seen:
            continue
        seen.add(id(node))
        stack.extend(i for i in node.input if i)
    return seen


def _evaluate(model: onnx.ModelProto, scope: "_Scope", plan: _Plan, shape_values: dict[str, np.ndarray]) -> dict[str, object]:
    """Values of plan.needed: shape-folded ones from `shape_values`, the rest from one onnxruntime run."""
    values: dict[str, object] = {n.output[0]: shape_values[n.output[0]] for n in plan.removed if n.output[0] in shape_values}
    wanted = [n for n in plan.needed if n not in values]
    if wanted:
        values.update(_run_constant_model(model, scope, plan.evaluated, wanted, values))
    return {n: values[n] for n in plan.needed}


def _run_constant_model(
    model: onnx.ModelProto, scope: "_Scope", nodes: list[onnx.NodeProto], wanted: list[str], known: dict[str, object]
) -> dict[str, object]:
    """One onnxruntime run of `nodes` over the constants they read (and the `known` shape values)."""
    read = {i for n in nodes for i in n.input if i}
    inits = scope.initializers(read)
    inits += [numpy_helper.from_array(v, name) for name, v in known.items() if name in read]
    sub = helper.make_graph(nodes, "fold_constants", [], [onnx.ValueInfoProto(name=n) for n in wanted], initializer=inits)
    folding = helper.make_model(sub, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    try:
        sess = runtime.session(folding, runtime.RuntimeSettings(level="disable_all"), what="the constant subgraph")
        return runtime.run(sess, {}, wanted)
    except UserError as exc:
        raise PassError(f"fold-constants: {exc}") from exc
    except Exception as exc:  # onnxruntime raises several unrelated types while running
        raise PassError(f"fold-constants: onnxruntime failed to evaluate the constant subgraph: {exc}") from exc


def _freed_bytes(graph: onnx.GraphProto, plan: _Plan) -> dict[str, int]:
    """Needed tensor -> bytes of initializers that only its own computation reads (and that folding frees)."""
    removed_by_id = {id(n): n for n in plan.removed}
    removed_ids = set(removed_by_id)
    prod, readers, outputs = producers(graph), consumers(graph), output_names(graph)
    owners: dict[str, set[str]] = {}
    for name in plan.needed:
        for node_id in _ancestors(prod, [name], removed_ids):
            for i in removed_by_id[node_id].input:
                owners.setdefault(i, set()).add(name)
    freed: dict[str, int] = {}
    for t in graph.initializer:
        owned_by = owners.get(t.name, set())
        if len(owned_by) == 1 and t.name not in outputs and all(id(r) in removed_ids for r in readers[t.name]):
            (owner,) = owned_by
            freed[owner] = freed.get(owner, 0) + tensor_bytes(t)
    return freed


def _array_bytes(value: np.ndarray) -> int:
    if value.dtype == object:
        return sum(len(s if isinstance(s, bytes) else str(s).encode()) for s in value.flat)
    return int(value.nbytes)


def _apply(graph: onnx.GraphProto, plan: _Plan, values: dict[str, object]) -> int:
    """Swap the removed nodes for initializers; drop initializers nothing reads any more. Returns bytes added."""
    added = sum(_array_bytes(v) for v in values.values())
    graph.initializer.extend(numpy_helper.from_array(values[n], n) for n in plan.needed)
    read_by_removed = {i for n in plan.removed for i in n.input if i}
    remove_nodes(graph, plan.removed)
    still_read = set(consumers(graph)) | output_names(graph) | {i.name for i in graph.input}
    orphans = [t for t in graph.initializer if t.name in read_by_removed and t.name not in still_read]
    dropped = sum(tensor_bytes(t) for t in orphans)
    for t in orphans:
        graph.initializer.remove(t)
    return added - dropped
