"""remove-dead-code: drop what no graph output depends on.

Rewrites (every graph; bodies are cleaned first, innermost out, since a body's liveness is set by its own
outputs and a cleaner body reads fewer outer tensors):
  node whose outputs reach no graph output (found iteratively, subgraph reads included) => removed
  initializer (or sparse initializer) read by no remaining node, body or graph output   => removed
  value_info entry for a name no longer defined in its graph or an enclosing one         => removed

Never removed: graph inputs (they are the model's interface), and an initializer that shares its name with
a graph input (it is that input's default value; dropping it would make the input required).
An outer-scope tensor read only from inside an If/Loop/Scan body stays alive (graph.consumers counts it).
Model-local functions (model.functions) are left alone. Nothing is refused: dead is dead.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx

from graphopt.graph import (
    live_mask,
    defined_names,
    initializer_bytes,
    iter_graphs,
    node_count,
    node_reads,
    output_names,
    subgraphs,
    tensor_bytes,
)
from graphopt.passes_base import Pass, PassContext, PassResult, register


def read_names(graph: onnx.GraphProto) -> set[str]:
    """Names this graph's nodes read (their bodies' outer reads included) plus the graph outputs."""
    return {name for node in graph.node for name in node_reads(node)} | output_names(graph)


@dataclass
class _Removed:
    initializers: int = 0
    value_info: int = 0


def clean_graph(graph: onnx.GraphProto, enclosing: set[str], removed: _Removed) -> None:
    """Remove dead nodes, unused initializers and stale value_info from `graph` and its bodies.

    `enclosing` holds the names visible from enclosing graphs, so a body's value_info about an
    outer-scope tensor is kept while that tensor exists.
    """
    visible = enclosing | defined_names(graph)
    for node in graph.node:
        for body in subgraphs(node):
            clean_graph(body, visible, removed)

    _keep(graph.node, live_mask(graph))

    reads = read_names(graph) | {i.name for i in graph.input}
    removed.initializers += _keep(graph.initializer, [t.name in reads for t in graph.initializer])
    removed.initializers += _keep(graph.sparse_initializer, [t.values.name in reads for t in graph.sparse_initializer])

    visible = enclosing | defined_names(graph)
    removed.value_info += _keep(graph.value_info, [vi.name in visible for vi in graph.value_info])


def _keep(field, mask: list[bool]) -> int:
    """Delete, in place, the items of a repeated protobuf field whose `mask` entry is False; returns how
    many went. Deleting by index (not rebuilding the field) leaves kept messages, large tensors included,
    uncopied."""
    doomed = [k for k, keep in enumerate(mask) if not keep]
    for k in reversed(doomed):
        del field[k]
    return len(doomed)


def _stored_bytes(model: onnx.ModelProto) -> int:
    """Initializer and Constant bytes, sparse initializers (values and indices) included."""
    sparse = sum(tensor_bytes(t.values) + tensor_bytes(t.indices) for g in iter_graphs(model.graph) for t in g.sparse_initializer)
    return initializer_bytes(model) + sparse


@register
@dataclass
class RemoveDeadCode(Pass):
    name = "remove-dead-code"
    description = "Remove nodes, initializers and value_info that no graph output depends on (subgraphs included)"
    lossless = True

    def run(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        nodes_before, bytes_before = node_count(model), _stored_bytes(model)
        removed = _Removed()
        clean_graph(model.graph, set(), removed)
        counts = {
            "nodes_removed": nodes_before - node_count(model),
            "initializers_removed": removed.initializers,
            "value_info_removed": removed.value_info,
            "bytes_removed": bytes_before - _stored_bytes(model),
        }
        changed = counts["nodes_removed"] > 0 or removed.initializers > 0 or removed.value_info > 0
        return PassResult(changed=changed, counts=counts)
