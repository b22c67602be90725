"""Walking and editing ONNX graphs: the one place that knows producers, consumers and subgraphs.

Passes work on `onnx.ModelProto` in place. Names used inside If/Loop/Scan bodies but defined in an
enclosing graph (outer-scope references) count as uses by the node that owns the body, so a tensor
read only from a subgraph is never considered dead, and renaming a tensor renames it inside bodies too.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Iterator

import numpy as np
import onnx
from onnx import helper, numpy_helper


def subgraphs(node: onnx.NodeProto) -> Iterator[onnx.GraphProto]:
    """The graphs held in a node's attributes (If branches, Loop/Scan bodies)."""
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield attr.g
        elif attr.type == onnx.AttributeProto.GRAPHS:
            yield from attr.graphs


STANDARD_DOMAINS = ("", "ai.onnx")
MS_DOMAIN = "com.microsoft"  # onnxruntime's contrib operators


def default_opset(model: onnx.ModelProto) -> int | None:
    """The version of the default ONNX domain the model imports (None when it imports none)."""
    versions = [o.version for o in model.opset_import if o.domain in STANDARD_DOMAINS]
    return max(versions) if versions else None


def copy_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """A deep copy (protobuf CopyFrom: much faster than copy.deepcopy on big models)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


def iter_graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """`graph` and every graph nested in it, outermost first."""
    yield graph
    for node in graph.node:
        for sub in subgraphs(node):
            yield from iter_graphs(sub)


def iter_graphs_with_path(graph: onnx.GraphProto, path: str = "main") -> Iterator[tuple[str, onnx.GraphProto]]:
    """Like `iter_graphs`, with a readable place for each graph (`main`, `main/If_3.then_branch`) for messages."""
    yield path, graph
    for k, node in enumerate(graph.node):
        owner = node.name or f"{node.op_type}#{k}"
        for attr in node.attribute:
            bodies = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
            for j, sub in enumerate(bodies):
                suffix = f"[{j}]" if attr.type == onnx.AttributeProto.GRAPHS else ""
                yield from iter_graphs_with_path(sub, f"{path}/{owner}.{attr.name}{suffix}")


def defined_names(graph: onnx.GraphProto) -> set[str]:
    """Names a graph defines itself: its inputs, initializers and node outputs."""
    names = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    names |= {t.values.name for t in graph.sparse_initializer}
    for node in graph.node:
        names.update(o for o in node.output if o)
    return names


def outer_references(graph: onnx.GraphProto) -> set[str]:
    """Names read inside `graph` (or deeper) that `graph` does not define: they come from outside."""
    local = defined_names(graph)
    used: set[str] = set()
    for node in graph.node:
        used.update(i for i in node.input if i)
        for sub in subgraphs(node):
            used |= outer_references(sub)
    used.update(o.name for o in graph.output)
    return used - local


def node_reads(node: onnx.NodeProto) -> list[str]:
    """Every tensor name a node reads: its inputs plus outer-scope names its subgraphs use."""
    names = [i for i in node.input if i]
    for sub in subgraphs(node):
        names.extend(sorted(outer_references(sub)))
    return names


def producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    """Tensor name -> the node of this graph that outputs it."""
    return {o: node for node in graph.node for o in node.output if o}


def consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    """Tensor name -> nodes of this graph that read it (directly or from their subgraphs)."""
    uses: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in graph.node:
        for name in dict.fromkeys(node_reads(node)):
            uses[name].append(node)
    return uses


def output_names(graph: onnx.GraphProto) -> set[str]:
    return {o.name for o in graph.output}


def initializers(graph: onnx.GraphProto) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in graph.initializer}


def constant_value(graph: onnx.GraphProto, name: str) -> np.ndarray | None:
    """The value of an initializer of this graph that is not overridable by a graph input, else None."""
    if name in {i.name for i in graph.input}:
        return None
    for t in graph.initializer:
        if t.name == name:
            return numpy_helper.to_array(t)
    return None


def scalar_constant(graph: onnx.GraphProto, name: str) -> float | None:
    """A floating initializer of shape [] or [1] as a float, else None. Pattern rewrites accept no higher
    rank: a [1, 1, 1] constant would broadcast the other operand to more dims."""
    value = constant_value(graph, name) if name else None
    if value is None or value.size != 1 or value.ndim > 1 or not np.issubdtype(value.dtype, np.floating):
        return None
    return float(value.reshape(()))


def scalar_operand(graph: onnx.GraphProto, node: onnx.NodeProto) -> int | None:
    """Which input of a two-input node (Mul, Add, ...) is a scalar constant (see scalar_constant), the
    second checked first; None when neither is."""
    return next((i for i in (1, 0) if i < len(node.input) and scalar_constant(graph, node.input[i]) is not None), None)


def is_op(node: onnx.NodeProto | None, op_type: str) -> bool:
    """`node` exists and is the standard ONNX operator `op_type` (not a same-named op of another domain)."""
    return node is not None and node.op_type == op_type and node.domain in STANDARD_DOMAINS


def only_reader(read_by: dict[str, list[onnx.NodeProto]], name: str) -> onnx.NodeProto | None:
    """The one node reading `name` (from a `consumers` map), or None when there are none or several."""
    readers = read_by.get(name, [])
    return readers[0] if len(readers) == 1 else None


def rename_uses(graph: onnx.GraphProto, old: str, new: str) -> None:
    """Make every reader of `old` (in this graph and nested bodies) read `new` instead.

    Graph outputs are not touched: callers that remove the producer of a graph output must keep the
    output's name (see `replace_tensor`). A body that defines `old` itself shadows it and is left alone.
    """
    rename_uses_all(graph, {old: new})


def rename_uses_all(graph: onnx.GraphProto, renames: dict[str, str]) -> None:
    """`rename_uses` for many names in one walk of the graph (old name -> new name; no chains followed)."""
    for node in graph.node:
        rename_node_reads(node, renames)


def rename_node_reads(node: onnx.NodeProto, renames: dict[str, str]) -> None:
    """`rename_uses_all` for one node: its inputs and the outer-scope names its bodies read."""
    for k, name in enumerate(node.input):
        if name in renames:
            node.input[k] = renames[name]
    for sub in subgraphs(node):
        shadowed = defined_names(sub)
        visible = {old: new for old, new in renames.items() if old not in shadowed}
        if visible:
            rename_uses_all(sub, visible)
            for out in sub.output:
                if out.name in visible:
                    out.name = visible[out.name]


def replace_tensor(graph: onnx.GraphProto, old: str, new: str) -> bool:
    """Route readers of `old` to `new` so the node producing `old` can go.

    When `old` is a graph output its name must survive, so instead the producer of `new` is renamed to
    output `old` and readers of `new` follow; that is only possible when `new` is produced by a node of
    this graph and is not itself a graph input, initializer or graph output. Returns False (and changes
    nothing) when neither way is possible.
    """
    outs = output_names(graph)
    if old not in outs:
        rename_uses(graph, old, new)
        return True
    prod = producers(graph).get(new)
    if prod is None or new in outs:
        return False
    for k, name in enumerate(prod.output):
        if name == new:
            prod.output[k] = old
    rename_uses(graph, new, old)
    return True


def remove_nodes(graph: onnx.GraphProto, doomed: Iterable[onnx.NodeProto]) -> int:
    """Remove the given nodes (by identity) from the graph; returns how many went.

    Identity of protobuf wrappers is only stable while they are referenced, so the nodes are held in a
    list for the whole walk."""
    doomed = list(doomed)
    ids = {id(n) for n in doomed}
    positions = [k for k, n in enumerate(graph.node) if id(n) in ids]
    for k in reversed(positions):
        del graph.node[k]
    return len(positions)


def splice(graph: onnx.GraphProto, rewrites: list[tuple[list[onnx.NodeProto], list[onnx.NodeProto]]]) -> None:
    """Replace each (pattern nodes, new nodes) pair: the pattern's nodes go, the new nodes take the place of
    its last one. That keeps the graph sorted when the new nodes read only what the pattern's last node
    could (tensors defined before it). Rebuilding the node list copies the nodes, so bodies held by nodes
    of `graph` must be finished first."""
    doomed = {id(n) for old, _ in rewrites for n in old}
    at_last = {id(old[-1]): new for old, new in rewrites}
    rebuilt: list[onnx.NodeProto] = []
    for node in graph.node:
        if id(node) in at_last:
            rebuilt.extend(at_last[id(node)])
        elif id(node) not in doomed:
            rebuilt.append(node)
    del graph.node[:]
    graph.node.extend(rebuilt)


def attribute(node: onnx.NodeProto, name: str, default=None):
    """The value of attribute `name` of `node`, or `default` when the node does not set it."""
    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


def drop_unread(graph: onnx.GraphProto, names: Iterable[str]) -> None:
    """Remove those of `names` that are initializers or Constant-node outputs and that no node (subgraphs
    included) and no graph output reads any more: the leftovers of a rewrite that replaced them. An
    initializer that is a graph input's default stays: it is part of the model's interface."""
    readers, kept_names = consumers(graph), output_names(graph) | {i.name for i in graph.input}
    unread = {n for n in names if not readers.get(n) and n not in kept_names}
    kept = [t for t in graph.initializer if t.name not in unread]
    if len(kept) != len(graph.initializer):
        del graph.initializer[:]
        graph.initializer.extend(kept)
    remove_nodes(graph, [n for n in graph.node if n.op_type == "Constant" and n.output[0] in unread])


class NameGenerator:
    """Fresh tensor/node names that collide with nothing in the model (subgraphs included)."""

    def __init__(self, model: onnx.ModelProto):
        self._taken: set[str] = set()
        for g in iter_graphs(model.graph):
            self._taken |= defined_names(g)
            self._taken.update(n.name for n in g.node if n.name)
            self._taken.update(o.name for o in g.output)

    def __call__(self, base: str) -> str:
        candidate, k = base, 0
        while candidate in self._taken:
            k += 1
            candidate = f"{base}_{k}"
        self._taken.add(candidate)
        return candidate


def topological_order_ok(graph: onnx.GraphProto, outer: set[str] | None = None) -> bool:
    """True when every node's inputs are defined before it (outer names count as defined)."""
    known = set(outer or ()) | {i.name for i in graph.input} | {t.name for t in graph.initializer}
    for node in graph.node:
        for name in node_reads(node):
            if name not in known:
                return False
        known.update(o for o in node.output if o)
    return True


def initializer_bytes(model: onnx.ModelProto) -> int:
    """Bytes held by initializers and Constant-node tensors across all graphs."""
    total = 0
    for g in iter_graphs(model.graph):
        total += sum(tensor_bytes(t) for t in g.initializer)
        for node in g.node:
            if node.op_type == "Constant" and node.domain in STANDARD_DOMAINS:
                for attr in node.attribute:
                    if attr.type == onnx.AttributeProto.TENSOR:
                        total += tensor_bytes(attr.t)
    return total


def tensor_bytes(t: onnx.TensorProto) -> int:
    """Bytes one tensor's values take (string tensors: the sum of their lengths)."""
    n = int(np.prod(t.dims)) if len(t.dims) else 1
    if t.data_type == onnx.TensorProto.STRING:
        return sum(len(s) for s in t.string_data)
    return n * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize if t.data_type else 0


def node_count(model: onnx.ModelProto) -> int:
    """Nodes in the main graph and all subgraphs."""
    return sum(len(g.node) for g in iter_graphs(model.graph))


def constant_names(graph: onnx.GraphProto) -> set[str]:
    """Names of this graph's initializers that no graph input can override (those `constant_value` returns)."""
    return {t.name for t in graph.initializer} - {i.name for i in graph.input}


PROTOBUF_LIMIT = 2_000_000_000


def fits_in_protobuf(model: onnx.ModelProto) -> bool:
    """Whether the model can be serialized in memory (protobuf's 2 GB limit), judged from its tensor
    bytes, which is cheap; serializing to find out would cost a full copy."""
    return initializer_bytes(model) < PROTOBUF_LIMIT * 0.95


def serialized(model: onnx.ModelProto) -> bytes | None:
    """The model's bytes, or None when it is past the 2 GB limit (callers go through a file then)."""
    return model.SerializeToString() if fits_in_protobuf(model) else None


def without_large_initializers(model: onnx.ModelProto, keep_elements: int = 1024) -> onnx.ModelProto:
    """A copy for shape inference: main-graph float initializers of more than `keep_elements` values
    become typed graph inputs instead.

    Shapes and types come out the same (data propagation only needs integer and small constants, which
    are kept), while onnx no longer copies the weights back and forth (2 s -> 0.04 s on MiniLM), and
    weights whose external data was never loaded do not matter."""
    light = onnx.ModelProto(ir_version=max(model.ir_version, 4), producer_name=model.producer_name)
    light.opset_import.extend(model.opset_import)
    light.functions.extend(model.functions)
    graph, g = model.graph, light.graph
    g.name = graph.name
    g.node.extend(graph.node)
    g.input.extend(graph.input)
    g.output.extend(graph.output)
    g.value_info.extend(graph.value_info)
    g.sparse_initializer.extend(graph.sparse_initializer)
    inputs = {i.name for i in graph.input}
    for t in graph.initializer:
        if t.data_type not in _FLOAT_TYPES or (int(np.prod(t.dims)) if len(t.dims) else 1) <= keep_elements:
            g.initializer.append(t)
        elif t.name not in inputs:
            g.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    return light


_FLOAT_TYPES = frozenset(
    {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}
)


# Ops whose outputs differ from run to run: never folded, merged or frozen.
NON_DETERMINISTIC = frozenset(
    {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli"}
)


def live_mask(graph: onnx.GraphProto) -> list[bool]:
    """For each node of `graph` (by position), whether some graph output depends on it.

    One backward sweep suffices for a topologically sorted graph; the loop repeats until nothing changes
    so that an unsorted graph is handled too.
    """
    needed = output_names(graph)
    live = [False] * len(graph.node)
    grew = True
    while grew:
        grew = False
        for k in reversed(range(len(graph.node))):
            node = graph.node[k]
            if not live[k] and any(o in needed for o in node.output if o):
                live[k] = grew = True
                needed.update(node_reads(node))
    return live
