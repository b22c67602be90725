"""Running a model with intermediate tensors exposed, one feed at a time.

`intermediates` streams the values of chosen tensors feed by feed (nothing accumulates here), and
`ActivationCache` keeps what passes ask for repeatedly, such as the shapes onnxruntime really produces,
so that several passes share one run.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import onnx

from graphopt import runtime
from graphopt.graph import copy_model
from graphopt.runtime import RuntimeSettings


def exposed(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """A copy of `model` whose main graph also outputs `names` (untyped; onnxruntime infers them)."""
    copy = copy_model(model)
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


class ActivationCache:
    """Observed facts about a model's tensors on a fixed set of feeds, shared by the passes of a run.

    Shapes are kept by tensor name: a lossless rewrite leaves every surviving tensor's values, and so its
    shape, as they were, so only names new to the cache cost a run. The pipeline calls `forget` when a
    lossy pass (which may change shapes, e.g. pruning channels) is kept. Passes ask before mutating."""

    def __init__(self, feeds: list[dict[str, np.ndarray]], settings: RuntimeSettings = RuntimeSettings(), max_feeds: int = 4):
        self._feeds = feeds[:max_feeds]
        self._settings = settings
        self._shapes: dict[str, set[tuple[int, ...]]] = {}

    def observed_shapes(self, model: onnx.ModelProto) -> dict[str, set[tuple[int, ...]]]:
        """Tensor name -> the set of shapes it had across the feeds (main graph tensors and outputs).
        Empty when there are no feeds to run."""
        if not self._feeds:
            return {}
        names = list(dict.fromkeys(main_graph_tensors(model) + [o.name for o in model.graph.output]))
        missing = [n for n in names if n not in self._shapes]
        if missing:
            for n in missing:
                self._shapes[n] = set()
            for values in intermediates(model, self._feeds, missing, self._settings):
                for name, value in values.items():
                    self._shapes[name].add(tuple(np.shape(value)))
        return {n: self._shapes[n] for n in names}

    def forget(self) -> None:
        """Drop everything observed (the model changed in a way that may change shapes)."""
        self._shapes.clear()
