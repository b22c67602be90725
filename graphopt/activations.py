"""Running a model with intermediate tensors exposed, one feed at a time.

`intermediates` streams the values of chosen tensors feed by feed (nothing accumulates here), and
`ActivationCache` keeps what passes ask for repeatedly, such as the shapes onnxruntime really produces,
keyed by the graph's structure so that several passes share one run.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import numpy as np
import onnx

from graphopt import runtime
from graphopt.graph import iter_graphs
from graphopt.runtime import RuntimeSettings


def exposed(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """A copy of `model` whose main graph also outputs `names` (untyped; onnxruntime infers them)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    present = {o.name for o in copy.graph.output}
    for name in names:
        if name not in present:
            copy.graph.output.append(onnx.ValueInfoProto(name=name))
    return copy


def intermediates(model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]], names: list[str], settings: RuntimeSettings = RuntimeSettings()) -> Iterator[dict[str, np.ndarray]]:
    """Yield, for each feed, the values of `names` (main-graph tensors, graph inputs or outputs)."""
    sess = runtime.session(exposed(model, names), settings)
    for feed in feeds:
        yield runtime.run(sess, feed, names)


def main_graph_tensors(model: onnx.ModelProto) -> list[str]:
    """Every node output of the main graph, in node order."""
    return [o for node in model.graph.node for o in node.output if o]


def structure_key(model: onnx.ModelProto) -> str:
    """A digest of nodes and graph inputs/outputs (not weights): equal keys produce equal shapes."""
    h = hashlib.sha1()
    for g in iter_graphs(model.graph):
        for node in g.node:
            h.update(node.SerializeToString())
        for vi in list(g.input) + list(g.output):
            h.update(vi.SerializeToString())
    return h.hexdigest()


class ActivationCache:
    """Observed facts about a model's tensors on a fixed set of feeds, computed once per structure."""

    def __init__(self, feeds: list[dict[str, np.ndarray]], settings: RuntimeSettings = RuntimeSettings(), max_feeds: int = 4):
        self._feeds = feeds[:max_feeds]
        self._settings = settings
        self._shapes: dict[str, dict[str, set[tuple[int, ...]]]] = {}

    def observed_shapes(self, model: onnx.ModelProto) -> dict[str, set[tuple[int, ...]]]:
        """Tensor name -> the set of shapes it had across the feeds (main graph tensors and outputs).
        Empty when there are no feeds to run."""
        key = structure_key(model)
        if key not in self._shapes:
            names = list(dict.fromkeys(main_graph_tensors(model) + [o.name for o in model.graph.output]))
            shapes: dict[str, set[tuple[int, ...]]] = {n: set() for n in names}
            for values in intermediates(model, self._feeds, names, self._settings):
                for name, value in values.items():
                    shapes[name].add(tuple(np.shape(value)))
            self._shapes[key] = shapes if self._feeds else {}
        return self._shapes[key]
