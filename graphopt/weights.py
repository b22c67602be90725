"""Weight sharing among initializers: exact duplicates, transposed copies and reshaped copies.

Exporters often store one tensor more than once: the TorchScript exporter writes a tied embedding as the
[V, D] table read by Gather plus a transposed [D, V] copy for the LM-head MatMul; constant folding leaves
equal scalars and shape tensors behind. This module only finds them; `fold-shared-weights` folds them and
`graphopt.inspect` reports them.

Equality is bitwise (so a fold is exact; NaN payloads and -0.0 vs 0.0 count as different):
- bytes are hashed (blake2b) and equal digests confirmed by comparing the bytes; there is no size cap;
  equal bytes with the same shape are duplicates, with another shape a reshape;
- transposes are looked for among tensors of the same dtype whose shapes are permutations of each other
  (rank 2 to 6): a fingerprint that no permutation of the elements changes (the wrapping sum of the bit
  patterns) filters candidates before the real comparison with each permutation mapping one shape onto
  the other.

Each graph (main, and every If/Loop/Scan body) is searched on its own: a body's initializers are compared
only with that body's, since folding across scopes would need shadowing rules for little gain.
An initializer that is also a graph input can be fed another value at run time, so relations touching one
are reported apart (`blocked`) and never part of a `SharingGroup`.
Not examined: string tensors and external data that was not loaded (listed in `skipped`), empty tensors
and sparse initializers (nothing worth saving).
"""

from __future__ import annotations

import hashlib
import itertools
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper
from onnx.external_data_helper import uses_external_data

from graphopt.graph import iter_graphs_with_path, tensor_bytes

MAX_TRANSPOSE_RANK = 6


@dataclass(frozen=True)
class Copy:
    """`name` holds exactly the values of `source` after `kind`: `duplicate` (as is), `transpose`
    (`source.transpose(perm)`, ONNX Transpose semantics) or `reshape` (the same bytes in `shape`)."""

    name: str
    source: str
    kind: str
    shape: tuple[int, ...]
    source_shape: tuple[int, ...]
    perm: tuple[int, ...] = ()

    def reversed(self) -> Copy:
        """The same relation read the other way: `source` in terms of `name`."""
        inverse = tuple(int(k) for k in np.argsort(self.perm)) if self.kind == "transpose" else ()
        return Copy(self.source, self.name, self.kind, self.source_shape, self.shape, inverse)


@dataclass(frozen=True)
class SharingGroup:
    """Initializers of one graph that all hold the same values up to duplication, transposition or
    reshape; storing one of them is enough. `copies` connect every member to the others."""

    graph: str
    dtype: str
    nbytes: int
    members: tuple[str, ...]
    copies: tuple[Copy, ...]

    @property
    def savable_bytes(self) -> int:
        return self.nbytes * (len(self.members) - 1)


@dataclass(frozen=True)
class BlockedCopy:
    """A relation that must not be folded because `graph_inputs` (one or both sides) are graph inputs."""

    graph: str
    copy: Copy
    graph_inputs: tuple[str, ...]


@dataclass
class WeightSharing:
    groups: list[SharingGroup] = field(default_factory=list)
    blocked: list[BlockedCopy] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    @property
    def savable_bytes(self) -> int:
        return sum(g.savable_bytes for g in self.groups)

    def extend(self, other: WeightSharing) -> None:
        self.groups += other.groups
        self.blocked += other.blocked
        self.skipped += other.skipped


@dataclass
class _Weight:
    name: str
    tensor: onnx.TensorProto
    array: np.ndarray
    position: int
    digest: bytes

    @property
    def dtype(self) -> str:
        return str(self.array.dtype)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.array.shape)

    def raw(self) -> np.ndarray:
        """The bytes, as a flat uint8 array."""
        return self.array.reshape(-1).view(np.uint8)

    def bits(self) -> np.ndarray | None:
        """Elements as unsigned integers of the same width (so comparisons are bitwise), or None when
        the element width has no integer type (complex128)."""
        size = self.array.dtype.itemsize
        return self.array.view(f"u{size}") if size in (1, 2, 4, 8) else None


def find_weight_sharing(model: onnx.ModelProto) -> WeightSharing:
    """Weight sharing in the main graph and, each on its own, in every subgraph."""
    found = WeightSharing()
    for path, graph in iter_graphs_with_path(model.graph):
        found.extend(find_in_graph(graph, path))
    return found


def find_in_graph(graph: onnx.GraphProto, path: str = "main") -> WeightSharing:
    """Weight sharing among the initializers of this graph alone (no nested bodies)."""
    found = WeightSharing()
    weights = _load_weights(graph, path, found.skipped)
    graph_inputs = {i.name for i in graph.input}
    copies: list[Copy] = []
    for same_bytes in _same_bytes_classes(weights):
        copies += _duplicates_and_reshapes(same_bytes, graph_inputs)
    copies += _transposes(_representatives(weights, graph_inputs))
    usable = []
    for c in copies:
        touched = tuple(n for n in (c.name, c.source) if n in graph_inputs)
        if touched:
            found.blocked.append(BlockedCopy(path, c, touched))
        else:
            usable.append(c)
    by_name = {w.name: w for w in weights}
    found.groups = [_group(path, members, usable, by_name) for members in _connected(usable, by_name)]
    return found


def _load_weights(graph: onnx.GraphProto, path: str, skipped: list[str]) -> list[_Weight]:
    """Decoded initializers that could have a partner: equal values need the same dtype and element
    count, so a tensor alone with its (dtype, size) is never decoded or hashed."""
    by_kind: dict[tuple[int, int], list[tuple[int, onnx.TensorProto]]] = defaultdict(list)
    for k, t in enumerate(graph.initializer):
        if t.data_type == onnx.TensorProto.STRING:
            skipped.append(f"{path}: {t.name} (string tensor)")
        elif uses_external_data(t):
            skipped.append(f"{path}: {t.name} (external data not loaded)")
        elif all(d > 0 for d in t.dims):
            by_kind[(t.data_type, int(np.prod(t.dims)))].append((k, t))
    weights = []
    for entries in by_kind.values():
        if len(entries) > 1:
            for k, t in entries:
                array = numpy_helper.to_array(t)
                if not array.flags.c_contiguous:  # (np.ascontiguousarray would turn a scalar into shape [1])
                    array = array.copy(order="C")
                digest = hashlib.blake2b(array.reshape(-1).view(np.uint8), digest_size=16).digest()
                weights.append(_Weight(t.name, t, array, k, digest))
    return sorted(weights, key=lambda w: w.position)


def _same_bytes_classes(weights: list[_Weight]) -> list[list[_Weight]]:
    """Weights grouped by dtype and identical bytes (any shape); only classes of two or more."""
    buckets: dict[tuple[str, bytes], list[list[_Weight]]] = defaultdict(list)
    for w in weights:
        classes = buckets[(w.dtype, w.digest)]
        for cls in classes:
            if np.array_equal(cls[0].raw(), w.raw()):
                cls.append(w)
                break
        else:
            classes.append([w])
    return [cls for classes in buckets.values() for cls in classes if len(cls) > 1]


def _duplicates_and_reshapes(same_bytes: list[_Weight], graph_inputs: set[str]) -> list[Copy]:
    """Members of one same-bytes class: each shape's members duplicate its representative, and every
    shape's representative is a reshape of the hub (the first representative that is no graph input)."""
    by_shape: dict[tuple[int, ...], list[_Weight]] = defaultdict(list)
    for w in same_bytes:
        by_shape[w.shape].append(w)
    reps = [_pick_representative(members, graph_inputs) for members in by_shape.values()]
    copies = [
        Copy(w.name, rep.name, "duplicate", w.shape, rep.shape)
        for rep, members in zip(reps, by_shape.values())
        for w in members
        if w is not rep
    ]
    hub = _pick_representative(reps, graph_inputs)
    copies += [Copy(rep.name, hub.name, "reshape", rep.shape, hub.shape) for rep in reps if rep is not hub]
    return copies


def _pick_representative(weights: list[_Weight], graph_inputs: set[str]) -> _Weight:
    """The first weight that is not a graph input (the first one when all are)."""
    return next((w for w in weights if w.name not in graph_inputs), weights[0])


def _representatives(weights: list[_Weight], graph_inputs: set[str]) -> list[_Weight]:
    """One weight per set of equal-shape duplicates; transposes are only looked for between these."""
    classes: dict[tuple[str, tuple[int, ...], bytes], list[_Weight]] = defaultdict(list)
    for w in weights:
        classes[(w.dtype, w.shape, w.digest)].append(w)
    return [_pick_representative(members, graph_inputs) for members in classes.values()]


def _transposes(weights: list[_Weight]) -> list[Copy]:
    """Pairs where one weight is a transpose of the other (and not just a reshape of it)."""
    candidates: dict[tuple[str, tuple[int, ...]], list[_Weight]] = defaultdict(list)
    for w in weights:
        if 2 <= len(w.shape) <= MAX_TRANSPOSE_RANK and w.bits() is not None:
            candidates[(w.dtype, tuple(sorted(w.shape)))].append(w)
    copies = []
    for bucket in candidates.values():
        if len(bucket) < 2:
            continue
        by_fingerprint: dict[int, list[_Weight]] = defaultdict(list)
        for w in bucket:
            by_fingerprint[_fingerprint(w.bits())].append(w)
        for same in by_fingerprint.values():
            for a, b in itertools.combinations(same, 2):
                perm = _transpose_between(a, b)
                if perm is not None:
                    copies.append(Copy(b.name, a.name, "transpose", b.shape, a.shape, perm))
    return copies


def _fingerprint(bits: np.ndarray) -> int:
    """Unchanged by any permutation of the elements: the wrapping sum of their bit patterns."""
    return int(bits.sum(dtype=np.uint64))


def _transpose_between(a: _Weight, b: _Weight) -> tuple[int, ...] | None:
    """A permutation p with b == a.transpose(p) that really moves data (equal bytes make it a reshape)."""
    if np.array_equal(a.raw(), b.raw()):
        return None
    a_bits, b_bits = a.bits(), b.bits()
    identity = tuple(range(len(a.shape)))
    for perm in itertools.permutations(identity):
        if perm != identity and tuple(a.shape[p] for p in perm) == b.shape:
            if np.array_equal(a_bits.transpose(perm), b_bits):
                return perm
    return None


def _connected(copies: list[Copy], by_name: dict[str, _Weight]) -> list[list[str]]:
    """Names linked by the copies, one list per connected set, in initializer order."""
    parent: dict[str, str] = {}

    def root(name: str) -> str:
        while parent.setdefault(name, name) != name:
            parent[name] = parent[parent[name]]
            name = parent[name]
        return name

    for c in copies:
        parent[root(c.name)] = root(c.source)
    sets: dict[str, list[str]] = defaultdict(list)
    for name in sorted(parent, key=lambda n: by_name[n].position):
        sets[root(name)].append(name)
    return list(sets.values())


def _group(path: str, members: list[str], copies: list[Copy], by_name: dict[str, _Weight]) -> SharingGroup:
    inside = set(members)
    first = by_name[members[0]]
    return SharingGroup(
        graph=path,
        dtype=first.dtype,
        nbytes=tensor_bytes(first.tensor),
        members=tuple(members),
        copies=tuple(c for c in copies if c.name in inside),
    )
