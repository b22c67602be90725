"""Facts about tensor shapes and element types that a rewrite may rely on.

onnx shape inference says what a model declares; real exports can declare wrong shapes, so a shape is
trusted only where onnxruntime enforces it (graph inputs, initializers) or where the shapes onnxruntime
actually produced on the calibration feeds (ActivationCache.observed_shapes) agree with it. Inference
runs on a copy without the large weights (graph.without_large_initializers), which is what keeps it
cheap on big models.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import onnx

from graphopt.errors import PassError
from graphopt.graph import default_opset, fits_in_protobuf, iter_graphs, subgraphs, without_large_initializers

Dims = list[int | None]  # a shape: static sizes, None for a symbolic dim


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
            return f"inferred shape {show_dims(dims)} of {name} disagrees with the observed {sorted(seen)}"
        return dims

    def rank_shape(self, name: str) -> Dims | str:
        """Like `shape`, but where onnx infers no shape for a main-graph tensor, the one rank onnxruntime
        produced on every feed is taken, every dim symbolic: enough for rewrites that need only the rank
        and dims of 1. (A rank seen on every calibration feed is trusted as a fact of the graph.)"""
        dims = self.shape(name)
        if not isinstance(dims, str) or self.observe is None or name in self.inferred:
            return dims
        seen = self.observe().get(name)
        if not seen:
            return f"{dims}, and it was not observed (no calibration feeds)"
        if len({len(s) for s in seen}) > 1:
            return f"{dims}, and its observed rank varies: {sorted(seen)}"
        return [None] * len(next(iter(seen)))


def show_dims(dims: Dims) -> str:
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
        inferred = onnx.shape_inference.infer_shapes(without_large_initializers(model), strict_mode=False, data_prop=True)
    except (onnx.shape_inference.InferenceError, ValueError) as exc:
        raise PassError(f"onnx shape inference failed on this model ({exc}); run the checker on it") from exc
    opset = default_opset(model) or 0
    facts: list[GraphFacts] = []

    def walk(graph: onnx.GraphProto, outer_types: dict[str, int], observe_here: Observer | None) -> None:
        here = graph_facts(graph, opset, outer_types, observe_here)
        facts.append(here)
        for node in graph.node:
            for body in subgraphs(node):
                walk(body, here.elem_types, None)

    walk(inferred.graph, {}, observe)
    return facts


def inferred_shapes(model: onnx.ModelProto) -> dict[str, list[int | None]]:
    """Tensor name -> its shape per onnx shape inference (with data propagation), across all graphs.

    A dim is an int when static and None when symbolic or unknown; tensors of unknown rank are absent.
    Declared shapes are trusted as onnx trusts them (real exports can be wrong: confirm with
    ActivationCache.observed_shapes where it matters). Models past protobuf's 2 GB limit cannot go
    through in-memory inference: for them this returns only what the model already declares.
    """
    light = without_large_initializers(model)
    if fits_in_protobuf(light):
        model = onnx.shape_inference.infer_shapes(light, check_type=False, strict_mode=False, data_prop=True)
    shapes: dict[str, list[int | None]] = {}
    for g in iter_graphs(model.graph):
        for vi in list(g.input) + list(g.value_info) + list(g.output):
            tt = vi.type.tensor_type
            if vi.type.HasField("tensor_type") and tt.HasField("shape"):
                shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
        for t in g.initializer:
            shapes.setdefault(t.name, list(t.dims))
    return shapes
