"""simplify-reshapes: turn run-time Reshape targets into constants and merge Reshape/Unsqueeze/Squeeze chains.

Exports compute Reshape targets from Shape chains (`Concat([0], Cast(Slice(Shape(t))), [3], [8], [15])`);
with dynamic dims fold-constants cannot evaluate them, but each entry is often provably a copy of the
data's own dim (0) or the one entry the element count determines (-1).

Rewrites (the second node of a merged pair is kept, so graph output names never change; replaced shape
chains, and a merged-away node that dead nodes still read, are left for remove-dead-code):
  Reshape(data, Concat(pieces)) with every entry a constant, `dim k of data` at position k (=> 0, copy)
    or the single entry nothing else determines (=> -1) => Reshape(data, int64 initializer)
  Reshape(Reshape(x, s1), s2), intermediate read only there => Reshape(x, s2), when no entry of s2 can be
    a 0 that copies a dim of the intermediate different from x's (or the second has allowzero=1)
  Unsqueeze(Unsqueeze(x, a1), a2), intermediate read only there  => Unsqueeze(x, combined axes)
  Squeeze(Squeeze(x, a1), a2), intermediate read only there      => Squeeze(x, combined axes)
  (no-op Reshape/Flatten of a tensor already of the target shape is eliminate-identities' job)

How a target is read: pieces are initializers, or Shape(x) taken through Gather / Slice (step 1) / Cast
to int32 or int64 (dims are assumed below 2**31) / Unsqueeze / Squeeze / Concat / Identity. Shape(x)
needs the rank of x (onnx inference, confirmed by onnxruntime on the calibration feeds as
eliminate-identities does); a dim of x that is static there becomes a constant, a symbolic one stays
`dim k of x`. Any other piece whose 0-D/1-D static shape is confirmed gives undetermined entries.
onnx inference loses ranks after a Reshape with a computed target, so once some targets are constant
shapes are inferred again and the remaining targets retried (observations are taken once).

Zero-size tensors (option `assume_nonempty`, default true): -1 needs the other entries to multiply to a
non-zero number (onnxruntime raises for `[0, -1]` on a [0, 4] tensor, where the original `[0, 4]` gave
an empty tensor), and a merged Reshape must not meet a computed 0 that copies a dim. Positive constants
and static dims are non-zero; a dynamic dim (copied with 0, or a `dim k of t` entry) is assumed non-zero,
as for any model that is not fed empty tensors. With `assume_nonempty=false` those rewrites are refused.

Refused (reason recorded):
  Reshape target: a piece of unknown length or not read as above; more than one undetermined entry;
    one undetermined entry next to a constant -1; one next to a literal 0 with allowzero=1 (the output is
    empty, -1 cannot be resolved); next to a copied dynamic dim with assume_nonempty=false.
    With allowzero=1 a `dim k of data` entry is not turned into 0 (0 would be literal), so it stays undetermined.
  Reshape -> Reshape: intermediate read by another live node or a graph output; second target unreadable
    or with an undetermined entry (it could be 0 and copy); a constant 0 copying a dim of the intermediate
    not proven equal to that dim of x (the first target copies it with 0, or both are the same confirmed
    static size); a dynamic-dim entry with assume_nonempty=false.
  Unsqueeze/Squeeze chains: intermediate read by another live node or a graph output; axes not constant
    initializers; empty axes (onnxruntime's Squeeze removes every size-1 dim, onnx none); negative axes
    without a confirmed rank of x; a first Squeeze without axes followed by one with axes.

Subgraphs: recursed into. Nothing is observed inside If/Loop/Scan bodies, so there Shape pieces, rank-
and dim-based proofs are refused; constant targets, constant-axes chains and Reshape chains without
copied dims work. Constants must be initializers of the graph that uses them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from graphopt.graph import (
    STANDARD_DOMAINS,
    NameGenerator,
    attribute,
    constant_value,
    consumers,
    is_op,
    iter_graphs,
    live_mask,
    output_names,
    producers,
    remove_nodes,
)
from graphopt.shapes import GraphFacts, all_graph_facts, show_dims
from graphopt.passes_base import Pass, PassContext, PassResult, register

INT32_RANGE = (-(2**31), 2**31 - 1)
MAX_DEPTH = 32  # pieces are short chains; this only stops pathological graphs


@dataclass(frozen=True)
class Dim:
    """A symbolic entry: dim `axis` (non-negative) of tensor `of`."""

    of: str
    axis: int


Entry = int | Dim | None  # a known int, a symbolic dim, or None: a value that cannot be named


@dataclass(frozen=True)
class Vector:
    """The symbolic value of a small int tensor: its entries, and whether it is 0-D (one entry) or 1-D."""

    entries: tuple[Entry, ...]
    scalar: bool = False


class ShapeVectors:
    """Reads the int tensors of one graph that Reshape targets are computed from, as `Vector`s."""

    def __init__(self, graph: onnx.GraphProto, facts: GraphFacts):
        self.graph, self.facts = graph, facts
        self.producers = producers(graph)
        self._memo: dict[str, Vector | str] = {}
        self.readers: dict[str, Callable[[onnx.NodeProto, int], Vector | str]] = {
            "Shape": self._shape,
            "Cast": self._cast,
            "Gather": self._gather,
            "Slice": self._slice,
            "Unsqueeze": self._unsqueeze,
            "Squeeze": self._squeeze,
            "Concat": self._concat,
            "Identity": lambda node, depth: self.value(node.input[0], depth),
        }

    def value(self, name: str, depth: int = 0) -> Vector | str:
        """The symbolic value of tensor `name`, or why it cannot be read."""
        if name not in self._memo:
            self._memo[name] = self._read(name, depth)
        return self._memo[name]

    def _read(self, name: str, depth: int) -> Vector | str:
        constant = constant_value(self.graph, name)
        if constant is not None:
            if constant.ndim > 1 or not np.issubdtype(constant.dtype, np.integer):
                return f"{name} is not a 0-D/1-D int tensor"
            return Vector(tuple(int(v) for v in constant.reshape(-1)), constant.ndim == 0)
        node = self.producers.get(name)
        if node is None or node.domain not in STANDARD_DOMAINS or node.op_type not in self.readers:
            source = "a graph input" if node is None else f"{node.op_type} {node.name or name}, which this pass does not follow"
            return self._opaque(name, f"{name} comes from {source}")
        if depth >= MAX_DEPTH:
            return self._opaque(name, f"{name} is more than {MAX_DEPTH} nodes away from the Reshape")
        read = self.readers[node.op_type](node, depth + 1)
        # A value that cannot be followed may still be one undetermined entry; if not, the first reason is the root.
        return read if isinstance(read, Vector) else self._opaque(name, read, keep_reason=True)

    def _opaque(self, name: str, why: str, keep_reason: bool = False) -> Vector | str:
        """A tensor whose values are unknown: its confirmed shape still says how many entries it has."""
        dims = self.facts.shape(name)
        if not isinstance(dims, str) and len(dims) <= 1 and None not in dims:
            return Vector((None,) * (dims[0] if dims else 1), not dims)
        if keep_reason:
            return why
        if isinstance(dims, str):
            return f"{why} and its length is unproven: {dims}"
        return f"{why} and its shape {show_dims(dims)} is not a known 0-D/1-D length"

    def _shape(self, node: onnx.NodeProto, depth: int) -> Vector | str:
        dims = self.facts.shape(node.input[0])
        if isinstance(dims, str):
            return _at(node, dims)
        entries = [Dim(node.input[0], axis) if size is None else size for axis, size in enumerate(dims)]
        # Shape's start/end (opset 15) clamp like a Python slice with step 1.
        return Vector(tuple(entries[attribute(node, "start", 0) : attribute(node, "end", len(entries))]))

    def _cast(self, node: onnx.NodeProto, depth: int) -> Vector | str:
        if attribute(node, "to") not in (TensorProto.INT32, TensorProto.INT64):
            return _at(node, "casts to a type other than int32/int64, which may change the values")
        source = self.value(node.input[0], depth)
        if isinstance(source, str) or attribute(node, "to") == TensorProto.INT64:
            return source
        narrow = [e if not isinstance(e, int) or INT32_RANGE[0] <= e <= INT32_RANGE[1] else None for e in source.entries]
        return Vector(tuple(narrow), source.scalar)

    def _gather(self, node: onnx.NodeProto, depth: int) -> Vector | str:
        source, indices = self.vector(node, depth), constant_value(self.graph, node.input[1])
        if isinstance(source, str):
            return source
        if indices is None or indices.ndim > 1 or attribute(node, "axis", 0) not in (0, -1):
            return _at(node, "indices are not a 0-D/1-D constant")
        n = len(source.entries)
        picked = [int(k) + n if k < 0 else int(k) for k in indices.reshape(-1)]
        if any(not 0 <= k < n for k in picked):
            return _at(node, f"indices {indices.tolist()} out of range for {n} entries")
        return Vector(tuple(source.entries[k] for k in picked), indices.ndim == 0)

    def _slice(self, node: onnx.NodeProto, depth: int) -> Vector | str:
        source = self.vector(node, depth)
        if isinstance(source, str):
            return source
        if self.facts.opset < 10:
            starts, ends, axes, steps = attribute(node, "starts"), attribute(node, "ends"), attribute(node, "axes"), None
        else:
            starts, ends, axes, steps = (self._optional_constant(node, k) for k in range(1, 5))
        single = starts is not None and ends is not None and np.size(starts) == 1 and np.size(ends) == 1
        one_axis = np.ravel(axes if axes is not None else [0]).tolist() in ([0], [-1])
        unit_step = steps is None or np.ravel(steps).tolist() == [1]
        if not (single and one_axis and unit_step):
            return _at(node, "not one constant start/end on axis 0 with step 1")
        # ONNX clamps start and end into [0, n] after adding n to negatives, as Python slicing does for step 1.
        return Vector(source.entries[int(np.ravel(starts)[0]) : int(np.ravel(ends)[0])])

    def _unsqueeze(self, node: onnx.NodeProto, depth: int) -> Vector | str:
        source = self.value(node.input[0], depth)
        if isinstance(source, str):
            return source
        if not source.scalar or axes_of(node, self.graph, self.facts.opset) not in ([0], [-1]):
            return _at(node, "not a 0-D value made 1-D")
        return Vector(source.entries)

    def _squeeze(self, node: onnx.NodeProto, depth: int) -> Vector | str:
        source = self.vector(node, depth)
        if isinstance(source, str):
            return source
        if len(source.entries) != 1 or axes_of(node, self.graph, self.facts.opset) not in (None, [0], [-1]):
            return _at(node, "not a 1-element vector made 0-D")
        return Vector(source.entries, scalar=True)

    def _concat(self, node: onnx.NodeProto, depth: int) -> Vector | str:
        if attribute(node, "axis") not in (0, -1):
            return _at(node, "not along axis 0")
        entries: list[Entry] = []
        for piece in node.input:
            value = self.value(piece, depth)
            if isinstance(value, str):
                return value
            if value.scalar:
                return _at(node, f"piece {piece} is 0-D")
            entries.extend(value.entries)
        return Vector(tuple(entries))

    def vector(self, node: onnx.NodeProto, depth: int) -> Vector | str:
        """The node's first input as a 1-D vector, or why it is not one."""
        source = self.value(node.input[0], depth)
        if isinstance(source, Vector) and source.scalar:
            return _at(node, f"reads the 0-D {node.input[0]}, not a vector")
        return source

    def _optional_constant(self, node: onnx.NodeProto, index: int) -> np.ndarray | None:
        if len(node.input) <= index or not node.input[index]:
            return None
        return constant_value(self.graph, node.input[index])


def axes_of(node: onnx.NodeProto, graph: onnx.GraphProto, opset: int) -> list[int] | None | str:
    """Unsqueeze/Squeeze axes: the attribute before opset 13, the constant input after; None when absent."""
    if opset < 13:
        axes = attribute(node, "axes")
        return None if axes is None else list(axes)
    if len(node.input) < 2 or not node.input[1]:
        return None
    value = constant_value(graph, node.input[1])
    return f"axes input {node.input[1]} is not a constant initializer" if value is None else value.reshape(-1).tolist()


def _at(node: onnx.NodeProto, reason: str) -> str:
    """A reason located at the node that gives it."""
    return f"{node.op_type} {node.name or node.output[0]}: {reason}"


def _label(node: onnx.NodeProto) -> str:
    return f"{node.op_type} {node.name or '(unnamed)'} ({node.input[0]} -> {node.output[0]})"


# ---- case 1: a Reshape target computed at run time => constant ----

def resolve_target(node: onnx.NodeProto, target: Vector, facts: GraphFacts, assume_nonempty: bool) -> list[int] | str:
    """The constant target equivalent to `target` for Reshape `node`, or why there is none."""
    data = node.input[0]
    allowzero = bool(attribute(node, "allowzero", 0))
    resolved: list[int | None] = []
    for position, entry in enumerate(target.entries):
        if isinstance(entry, Dim) and entry == Dim(data, position) and not allowzero:
            resolved.append(0)  # copies dim `position` of data, whatever its size
        else:
            resolved.append(entry if isinstance(entry, int) else None)
    open_positions = [k for k, e in enumerate(resolved) if e is None]
    if not open_positions:
        return resolved
    if len(open_positions) > 1:
        return f"entries {open_positions} of the target stay undetermined; -1 can stand for one only"
    if -1 in resolved:
        return f"entry {open_positions[0]} stays undetermined and the target already has a -1"
    zero_reason = _zero_size_risk(node, resolved, facts, allowzero, assume_nonempty)
    if zero_reason:
        return f"entry {open_positions[0]} cannot become -1: {zero_reason}"
    resolved[open_positions[0]] = -1
    return resolved


def _zero_size_risk(node, resolved: list, facts: GraphFacts, allowzero: bool, assume_nonempty: bool) -> str | None:
    """Why another entry may be 0 at run time (then -1 cannot be resolved), or None."""
    zeros = [k for k, e in enumerate(resolved) if e == 0]
    if zeros and allowzero:
        return f"entry {zeros[0]} is a literal 0 (allowzero=1), the output is empty"
    if not zeros or assume_nonempty:
        return None
    dims = facts.shape(node.input[0])
    for k in zeros:
        if isinstance(dims, str) or k >= len(dims) or not dims[k]:
            return f"entry {k} copies dim {k} of {node.input[0]}, which may be 0 at run time (assume_nonempty=false)"
    return None


# ---- case 2: Reshape -> Reshape ----

def copied_dims_preserved(first: onnx.NodeProto, second_target: Vector, graph: onnx.GraphProto, facts: GraphFacts,
                          assume_nonempty: bool) -> str | None:
    """Why an entry of the second Reshape's target may be 0 (allowzero=0: copy a dim) and copy a different
    size once the second reads the first's input, or None."""
    source, middle = first.input[0], first.output[0]
    first_target = constant_value(graph, first.input[1])
    first_copies = first_target is not None and not attribute(first, "allowzero", 0)
    for k, entry in enumerate(second_target.entries):
        if isinstance(entry, int) and entry != 0:
            continue
        if isinstance(entry, Dim):
            if assume_nonempty:
                continue
            return f"entry {k} of the second target is a dynamic dim, 0 when empty (assume_nonempty=false)"
        if entry is None:
            return f"entry {k} of the second target is computed, and a 0 there would copy dim {k} of {middle}"
        if first_copies and k < first_target.size and first_target.reshape(-1)[k] == 0:
            continue
        before, after = facts.shape(source), facts.shape(middle)
        static_equal = not isinstance(before, str) and not isinstance(after, str) and k < min(len(before), len(after))
        if static_equal and before[k] is not None and before[k] == after[k]:
            continue
        return f"entry {k} of the second target copies dim {k} of {middle}, not proven equal to dim {k} of {source}"
    return None


# ---- case 3: Unsqueeze -> Unsqueeze, Squeeze -> Squeeze ----

def merged_unsqueeze_axes(first: list[int], second: list[int], rank: int | None) -> list[int] | str:
    """Axes of one Unsqueeze doing `first` then `second` on a tensor of `rank` (None: unknown)."""
    middle_rank = None if rank is None else rank + len(first)
    first = _normalized(first, middle_rank)
    second = _normalized(second, None if middle_rank is None else middle_rank + len(second))
    if isinstance(first, str) or isinstance(second, str):
        return "negative axes need the rank of the input"
    inserted = set(second)
    return sorted(inserted | {_kth_free_position(p, inserted) for p in first})


def merged_squeeze_axes(first: list[int] | None, second: list[int] | None, rank: int | None) -> list[int] | None | str:
    """Axes of one Squeeze doing `first` then `second` (None: every size-1 dim) on a tensor of `rank`."""
    if second is None:
        return None  # the second removes every size-1 dim left, the first removed size-1 dims too
    if first is None:
        return "the first Squeeze has no axes (removes every size-1 dim), so which dims the second removes is unknown"
    first = _normalized(first, rank)
    second = _normalized(second, None if rank is None else rank - len(first))
    if isinstance(first, str) or isinstance(second, str):
        return "negative axes need the rank of the input"
    removed = set(first)
    return sorted(removed | {_kth_free_position(p, removed) for p in second})


def _normalized(axes: list[int], rank: int | None) -> list[int] | str:
    if any(a < 0 for a in axes) and rank is None:
        return "negative axis"
    return [a + rank if a < 0 else a for a in axes]


def _kth_free_position(k: int, taken: set[int]) -> int:
    """The position of the k-th (0-based) index not in `taken`, counting 0, 1, 2, ..."""
    position = -1
    for _ in range(k + 1):
        position += 1
        while position in taken:
            position += 1
    return position


# ---- the pass ----

@dataclass
class _Outcome:
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(
        ("reshape_targets_constant", "reshapes_merged", "unsqueezes_merged", "squeezes_merged", "nodes_removed"), 0))
    refused: list[str] = field(default_factory=list)


class _GraphRewriter:
    """Applies the three cases to one graph, in order (a constant target can enable a Reshape merge)."""

    def __init__(self, graph: onnx.GraphProto, names: NameGenerator, assume_nonempty: bool, outcome: _Outcome):
        self.graph, self.names, self.outcome = graph, names, outcome
        self.assume_nonempty = assume_nonempty
        self.producers = producers(graph)  # no edit changes a producer: targets become initializers, nodes go
        self.outputs = output_names(graph)
        self.new_constants: dict[tuple[int, ...], str] = {}
        self.doomed: list[onnx.NodeProto] = []
        # Set by each step (facts get better as targets become constant):
        self.facts: GraphFacts
        self.vectors: ShapeVectors
        self.readers: dict[str, list[onnx.NodeProto]]
        self.live: set[int]  # ids of the nodes some graph output depends on

    def constant_targets(self, facts: GraphFacts) -> list[str]:
        """Make each Reshape target computed by a Concat constant where provable; returns the refusals."""
        self.facts = facts
        vectors = ShapeVectors(self.graph, facts)
        refused: list[str] = []
        for node in [n for n in self.graph.node if is_op(n, "Reshape") and len(n.input) > 1]:
            if is_op(self.producers.get(node.input[1]), "Concat"):
                refused += self.constant_target(node, vectors)
        return refused

    def merge_chains(self, facts: GraphFacts) -> None:
        """Merge Reshape -> Reshape, Unsqueeze -> Unsqueeze and Squeeze -> Squeeze pairs; remove what they free."""
        self.facts = facts
        self.vectors = ShapeVectors(self.graph, facts)
        self.readers = consumers(self.graph)
        # Shape chains a constant target replaced still read their tensors; dead readers do not block a merge.
        nodes = list(self.graph.node)
        self.live = {id(node) for node, alive in zip(nodes, live_mask(self.graph)) if alive}
        for node in nodes:
            first = self.producers.get(node.input[0]) if node.input else None
            if is_op(node, "Reshape") and is_op(first, "Reshape"):
                self.merge_reshapes(first, node)
            elif node.op_type in ("Unsqueeze", "Squeeze") and is_op(node, node.op_type) and is_op(first, node.op_type):
                self.merge_axes(first, node)
        self.outcome.counts["nodes_removed"] += remove_nodes(self.graph, self.doomed)

    def constant_target(self, node: onnx.NodeProto, vectors: ShapeVectors) -> list[str]:
        target = vectors.value(node.input[1])
        resolved = target if isinstance(target, str) else resolve_target(node, target, self.facts, self.assume_nonempty)
        if isinstance(resolved, str):
            return [f"{_label(node)}: target {node.input[1]}: {resolved}"]
        node.input[1] = self.constant(resolved, f"{node.output[0]}_shape")
        self.outcome.counts["reshape_targets_constant"] += 1
        return []

    def merge_reshapes(self, first: onnx.NodeProto, second: onnx.NodeProto) -> None:
        reason = self.private_intermediate(first, second)
        if not reason and not attribute(second, "allowzero", 0):  # with allowzero=1 only the element count matters
            target = self.vectors.value(second.input[1])
            if isinstance(target, str):
                reason = f"the second target {second.input[1]} cannot be read: {target}"
            else:
                reason = copied_dims_preserved(first, target, self.graph, self.facts, self.assume_nonempty)
        if self.refused(second, "Reshape -> Reshape", reason):
            return
        self.bypass(first, second)
        self.outcome.counts["reshapes_merged"] += 1

    def merge_axes(self, first: onnx.NodeProto, second: onnx.NodeProto) -> None:
        op = second.op_type
        reason = self.private_intermediate(first, second)
        merged = reason if reason else self.merged_axes(first, second)
        if self.refused(second, f"{op} -> {op}", merged if isinstance(merged, str) else None):
            return
        self.set_axes(second, merged)
        self.bypass(first, second)
        self.outcome.counts[f"{op.lower()}s_merged"] += 1

    def merged_axes(self, first: onnx.NodeProto, second: onnx.NodeProto) -> list[int] | None | str:
        """The axes of one node doing first's then second's work (None: Squeeze of every size-1 dim), or why not."""
        axes = [axes_of(n, self.graph, self.facts.opset) for n in (first, second)]
        reason = next((a for a in axes if isinstance(a, str)), None)
        if reason:
            return reason
        if [] in axes:  # onnxruntime's Squeeze reads empty axes as "every size-1 dim", onnx as "none"
            return "empty axes, which onnx and onnxruntime read differently"
        shape = self.facts.shape(first.input[0])
        rank = None if isinstance(shape, str) else len(shape)
        if second.op_type == "Squeeze":
            return merged_squeeze_axes(axes[0], axes[1], rank)
        return "Unsqueeze without axes" if None in axes else merged_unsqueeze_axes(axes[0], axes[1], rank)

    def private_intermediate(self, first: onnx.NodeProto, second: onnx.NodeProto) -> str | None:
        """Why the first node's output must stay (a graph output, read by another live node), or None."""
        middle = first.output[0]
        if middle in self.outputs:
            return f"the intermediate {middle} is a graph output"
        if any(r is not second and id(r) in self.live for r in self.readers.get(middle, [])):
            return f"the intermediate {middle} has other readers"
        return None

    def refused(self, node: onnx.NodeProto, what: str, reason: str | None) -> bool:
        if reason:
            self.outcome.refused.append(f"{_label(node)}: {what}: {reason}")
        return bool(reason)

    def bypass(self, first: onnx.NodeProto, second: onnx.NodeProto) -> None:
        """`second` reads the first's input; the first goes, or is left to remove-dead-code when dead nodes still read it."""
        second.input[0] = first.input[0]
        if all(r is second for r in self.readers.get(first.output[0], [])):
            self.doomed.append(first)

    def set_axes(self, node: onnx.NodeProto, axes: list[int] | None) -> None:
        if self.facts.opset < 13:
            kept = [a for a in node.attribute if a.name != "axes"]
            del node.attribute[:]
            node.attribute.extend(kept)
            if axes is not None:
                node.attribute.append(helper.make_attribute("axes", axes))
        elif axes is None:
            del node.input[1:]
        else:
            node.input[1] = self.constant(axes, f"{node.output[0]}_axes")

    def constant(self, values: list[int], base: str) -> str:
        """Name of an int64 1-D initializer of this graph holding `values` (one per distinct value and use)."""
        key = tuple(values)
        if key not in self.new_constants:
            name = self.names(base)
            self.graph.initializer.append(numpy_helper.from_array(np.array(values, dtype=np.int64), name))
            self.new_constants[key] = name
        return self.new_constants[key]


@register
@dataclass
class SimplifyReshapes(Pass):
    name = "simplify-reshapes"
    description = "make run-time Reshape targets constant (0 copies, one -1) and merge Reshape/Unsqueeze/Squeeze chains"
    lossless = True

    assume_nonempty: bool = True

    def run(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        graphs = list(iter_graphs(model.graph))
        outcome = _Outcome()
        if not any(_candidate(node) for graph in graphs for node in graph.node):
            return PassResult(changed=False, counts=outcome.counts)
        # Observed once, lazily, maybe after some edits: no edit changes a remaining tensor's values or shape.
        observe = functools.cache(lambda: ctx.activations.observed_shapes(model))
        names = NameGenerator(model)
        rewriters = [_GraphRewriter(graph, names, self.assume_nonempty, outcome) for graph in graphs]
        while True:
            # onnx inference loses ranks after a Reshape with a computed target; once constant, it sees further.
            made_before = outcome.counts["reshape_targets_constant"]
            facts = all_graph_facts(model, observe)
            refused = [why for rewriter, here in zip(rewriters, facts) for why in rewriter.constant_targets(here)]
            if not refused or outcome.counts["reshape_targets_constant"] == made_before:
                break
        outcome.refused += refused
        for rewriter, here in zip(rewriters, facts):
            rewriter.merge_chains(here)
        changed = any(outcome.counts[k] for k in ("reshape_targets_constant", "reshapes_merged", "unsqueezes_merged", "squeezes_merged"))
        return PassResult(changed=changed, counts=outcome.counts, refused=outcome.refused)


def _candidate(node: onnx.NodeProto) -> bool:
    return node.op_type in ("Reshape", "Unsqueeze", "Squeeze") and node.domain in STANDARD_DOMAINS
