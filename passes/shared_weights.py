"""fold-shared-weights: store each weight once (lossless; values must be bitwise equal).

Rewrites, per group of initializers found by `graphopt.weights` (one is kept, the others rebuilt from it):
- initializers B, C exact copies of A               => A alone; readers of B and C read A
- initializer B == Transpose(A, perm)               => B = Transpose(A, perm), a node at the start of the graph
- initializer B == A in another shape (same bytes)  => B = Reshape(A, shape), a node at the start of the graph
Chains (a reshaped copy of a transposed copy) are rebuilt step by step from the kept initializer.
onnxruntime constant-folds these nodes when it loads the model, so the file stores the weight once and
the session computes the same thing. The kept initializer is the one most nodes read (file order breaks
ties); transposed and reshaped copies keep their names as node outputs. A duplicate that is a graph output,
or whose readers sit in a body that defines the kept name itself, keeps its name through an Identity node.

Refused:
- any copy where one side is also a graph input: the caller may feed another value at run time, so the
  two are not the same weight (the input is never removed: graph inputs keep their names and order);
- transposed/reshaped copies under `min_rebuild_bytes` (default 64): the node would cost more than it saves;
- copies that need a Reshape node when the model imports no ONNX opset >= 5 (or a Transpose/Identity
  node when it imports no default ONNX opset at all): the opset imports are kept as they are.
A refused edge does not stop the rest: what is left of the group is folded around its own kept member.

Subgraphs: each If/Loop/Scan body's initializers are folded among themselves (no folding across scopes).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from graphopt.graph import (
    default_opset,
    NameGenerator,
    consumers,
    defined_names,
    iter_graphs,
    iter_graphs_with_path,
    output_names,
    rename_uses_all,
    tensor_bytes,
)
from graphopt.passes_base import Pass, PassContext, PassResult, register
from graphopt.weights import Copy, SharingGroup, find_in_graph

_MIN_OPSET = {"duplicate": 1, "transpose": 1, "reshape": 5}
_COUNT_NAMES = {"duplicate": "duplicates_folded", "transpose": "transposed_folded", "reshape": "reshaped_folded"}


@register
@dataclass
class FoldSharedWeights(Pass):
    """`min_rebuild_bytes`: a transposed or reshaped copy smaller than this stays stored (a node and
    possibly a shape tensor cost more than a few bytes save); exact duplicates always fold."""

    name = "fold-shared-weights"
    description = "store duplicated, transposed and reshaped copies of an initializer once"
    lossless = True

    min_rebuild_bytes: int = 64

    def run(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        names = NameGenerator(model)
        counts = {"duplicates_folded": 0, "transposed_folded": 0, "reshaped_folded": 0, "bytes_saved": 0, "nodes_added": 0}
        refused: list[str] = []
        # Bodies first: folding a graph rebuilds its node list, which copies the nodes holding its bodies.
        for path, graph in reversed(list(iter_graphs_with_path(model.graph))):
            found = find_in_graph(graph, path)
            refused += [_blocked_reason(b.graph, b.copy, b.graph_inputs) for b in found.blocked]
            if found.groups:
                folder = _GraphFolder(graph, path, default_opset(model), self.min_rebuild_bytes, names, counts)
                refused += folder.fold(found.groups)
        changed = any(counts[k] for k in _COUNT_NAMES.values())
        return PassResult(changed=changed, counts=counts, refused=refused)


class _GraphFolder:
    """Folds the sharing groups of one graph; new nodes go to the start of the graph, parents first."""

    def __init__(self, graph: onnx.GraphProto, path: str, opset: int | None, min_rebuild_bytes: int, names: NameGenerator, counts: dict):
        self.graph, self.path, self.opset, self.min_rebuild_bytes = graph, path, opset, min_rebuild_bytes
        self.names, self.counts = names, counts
        self.uses = {name: len(nodes) for name, nodes in consumers(graph).items()}
        self.outputs = output_names(graph)
        self.nested_names = set().union(*(defined_names(g) for g in list(iter_graphs(graph))[1:]))
        self.new_nodes: list[onnx.NodeProto] = []
        self.removed: set[str] = set()
        self.renames: dict[str, str] = {}
        self.shape_inputs: dict[tuple[int, ...], str] = {}

    def fold(self, groups: list[SharingGroup]) -> list[str]:
        """Fold every group; returns the refusals."""
        refused = [reason for group in groups for reason in self._fold_group(group)]
        rename_uses_all(self.graph, self.renames)
        for k in reversed(range(len(self.graph.initializer))):  # deleting in place: no copy of the weights
            if self.graph.initializer[k].name in self.removed:
                del self.graph.initializer[k]
        for k in reversed(range(len(self.graph.value_info))):
            if self.graph.value_info[k].name in self.renames:
                del self.graph.value_info[k]
        nodes = self.new_nodes + list(self.graph.node)
        del self.graph.node[:]
        self.graph.node.extend(nodes)
        return refused

    def _fold_group(self, group: SharingGroup) -> list[str]:
        """Walk out from the kept initializer along the copies this pass may rebuild; each member
        reached is rebuilt from the tensor that now holds its parent's values. Members left over (an
        edge was refused) start another walk from the most-read of them."""
        links: dict[str, list[Copy]] = {m: [] for m in group.members}
        for c in group.copies:
            links[c.source].append(c)
            links[c.name].append(c.reversed())
        holder: dict[str, str] = {}
        refusals: dict[str, str] = {}
        while len(holder) < len(group.members):
            keeper = max((m for m in group.members if m not in holder), key=lambda n: self.uses.get(n, 0))
            holder[keeper] = keeper
            queue = deque([keeper])
            while queue:
                for c in links[queue.popleft()]:
                    if c.name in holder:
                        continue
                    reason = self._refusal(c, group.nbytes)
                    if reason:
                        refusals.setdefault(c.name, f"{self.path}: initializer {c.name!r} is a {c.kind} of {c.source!r} but {reason}; kept")
                        continue
                    holder[c.name] = self._rebuild(c, holder[c.source])
                    self.counts[_COUNT_NAMES[c.kind]] += 1
                    self.counts["bytes_saved"] += group.nbytes
                    queue.append(c.name)
        return [reason for name, reason in refusals.items() if name not in self.removed]

    def _refusal(self, c: Copy, nbytes: int) -> str | None:
        """Why `c` may not be rebuilt with a node, or None."""
        if c.kind == "duplicate" and not self._needs_identity(c.name, c.source):
            return None
        if self.opset is None or self.opset < _MIN_OPSET[c.kind]:
            op = {"duplicate": "Identity", "transpose": "Transpose", "reshape": "Reshape"}[c.kind]
            return f"a {op} node needs ONNX opset >= {_MIN_OPSET[c.kind]} and the model imports {self.opset}"
        if c.kind != "duplicate" and nbytes < self.min_rebuild_bytes:
            return f"its {nbytes} bytes are below min_rebuild_bytes={self.min_rebuild_bytes}"
        return None

    def _needs_identity(self, name: str, source: str) -> bool:
        """A graph output keeps its name; a body defining `source` itself would shadow a renamed read."""
        return name in self.outputs or source in self.nested_names

    def _rebuild(self, c: Copy, source: str) -> str:
        """Remove initializer `c.name` and make its values come from tensor `source`; returns the name
        that holds them now."""
        self.removed.add(c.name)
        if c.kind == "transpose":
            self._add_node("Transpose", [source], c.name, perm=list(c.perm))
        elif c.kind == "reshape":
            self._add_node("Reshape", [source, self._shape_input(c.shape)], c.name)
        elif self._needs_identity(c.name, source):
            self._add_node("Identity", [source], c.name)
        else:
            self.renames[c.name] = source
            return source
        return c.name

    def _add_node(self, op_type: str, inputs: list[str], output: str, **attrs) -> None:
        node = helper.make_node(op_type, inputs, [output], name=self.names(f"shared_weight_{op_type.lower()}"), **attrs)
        self.new_nodes.append(node)
        self.counts["nodes_added"] += 1

    def _shape_input(self, shape: tuple[int, ...]) -> str:
        """An int64 initializer holding `shape` (one per distinct shape in this graph)."""
        if shape not in self.shape_inputs:
            name = self.names("shared_weight_shape")
            tensor = numpy_helper.from_array(np.array(shape, dtype=np.int64), name)
            self.graph.initializer.append(tensor)
            self.counts["bytes_saved"] -= tensor_bytes(tensor)
            self.shape_inputs[shape] = name
        return self.shape_inputs[shape]


def _blocked_reason(path: str, c: Copy, graph_inputs: tuple[str, ...]) -> str:
    relation = {"duplicate": "is an exact copy of", "transpose": f"is Transpose(perm={list(c.perm)}) of", "reshape": "is a reshape of"}[c.kind]
    inputs = " and ".join(repr(n) for n in graph_inputs)
    verb = "are graph inputs" if len(graph_inputs) > 1 else "is also a graph input"
    return (
        f"{path}: initializer {c.name!r} {relation} {c.source!r}, but {inputs} {verb} "
        "(the caller may feed another value at run time); not folded"
    )
