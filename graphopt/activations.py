"""Running a model with intermediate tensors exposed, one feed at a time.

`intermediates` streams the values of chosen tensors feed by feed, a bounded group of tensors per run
(nothing accumulates here), and
`ActivationCache` keeps what passes ask for repeatedly, such as the shapes onnxruntime really produces,
so that several passes share one run.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import onnx

from graphopt import runtime
from graphopt.graph import copy_model, drop_unread, initializer_bytes, live_mask, remove_nodes
from graphopt.runtime import RuntimeSettings
from graphopt.profiling import output_bytes


MIN_EXPOSED_BYTES = 16 << 20


def intermediates(model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]], names: list[str], settings: RuntimeSettings = RuntimeSettings(), max_bytes: int | None = None) -> Iterator[dict[str, np.ndarray]]:
    """Yield the values of `names` (main-graph tensors, graph inputs or outputs) on each feed, in groups:
    one dict per group of names and feed. Every (name, feed) pair comes exactly once, group by group;
    callers fold values by name.

    onnxruntime keeps every output of a run alive until the run returns, so exposing all activations at
    once costs their total size per run (212 MB for PP-OCRv4 rec, a 10 MB model). The names are therefore
    split, in graph order, into groups whose values on the largest feed take at most `max_bytes`
    (default: `exposure_limit`).
    Each group runs in its own session on a copy of the model cut down to the nodes it needs.

    Each dict is emptied when the next one is asked for: a `for` loop still holds the previous dict while
    the generator runs the next feed, which would keep two runs' values alive at once (PP-OCRv4 rec:
    22 MB more at the calibration peak). Keep the arrays you need, not the dict."""
    limit = max_bytes if max_bytes is not None else exposure_limit(model, feeds)
    for group in exposure_groups(model, feeds, names, limit, settings.threads):
        sess = runtime.session(cut_to(model, group), settings)
        for feed in feeds:
            values = runtime.run(sess, feed, group)
            yield values
            values.clear()
        del sess


def exposure_limit(model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]]) -> int:
    """The default bound on the bytes one run exposes: as much as the model's weights and the feeds take
    (so calibration stays within a small multiple of model + data), at least MIN_EXPOSED_BYTES."""
    return max(MIN_EXPOSED_BYTES, initializer_bytes(model) + sum(_feed_bytes(f) for f in feeds))


def exposure_groups(model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]], names: list[str], limit: int, threads: int = 0) -> list[list[str]]:
    """`names` in graph order, split into runs whose sizes on the largest feed (as onnxruntime's profiler
    reports them from one run) total at most `limit` (a larger tensor alone). A name of unknown size (a
    Constant output, say) counts as the largest known one; with no size known, everything goes in one
    group."""
    position = {o: k for k, node in enumerate(model.graph.node) for o in node.output}
    ordered = sorted(dict.fromkeys(names), key=lambda n: position.get(n, -1))
    largest = max(feeds, key=_feed_bytes, default=None)
    sizes = {k: np.asarray(v).nbytes for k, v in (largest or {}).items()}
    if largest is not None and any(n in position for n in ordered):
        sizes.update(output_bytes(model, largest, threads))
    known = [sizes[n] for n in ordered if n in sizes]
    if not known:
        return [ordered] if ordered else []
    groups: list[list[str]] = []
    total = 0
    for name in ordered:
        size = sizes.get(name, max(known))
        if not groups or total + size > limit:
            groups.append([])
            total = 0
        groups[-1].append(name)
        total += size
    return groups


def _feed_bytes(feed: dict[str, np.ndarray]) -> int:
    return sum(np.asarray(v).nbytes for v in feed.values())


def cut_to(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """A copy of `model` whose main graph outputs exactly `names` (those not outputs already untyped:
    onnxruntime infers them) and keeps only the nodes and weights they need. Graph inputs all stay, so
    that every feed still fits."""
    copy = copy_model(model)
    graph = copy.graph
    declared = {o.name: o for o in graph.output}
    outputs = [declared.get(name) or onnx.ValueInfoProto(name=name) for name in names]
    del graph.output[:]
    graph.output.extend(outputs)
    remove_nodes(graph, [node for node, live in zip(graph.node, live_mask(graph)) if not live])
    drop_unread(graph, [t.name for t in graph.initializer])
    return copy


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
        """Tensor name -> the set of shapes it had across the feeds (main graph inputs fed, node outputs and
        graph outputs). Empty when there are no feeds to run."""
        if not self._feeds:
            return {}
        fed = [i.name for i in model.graph.input if all(i.name in feed for feed in self._feeds)]
        for name in fed:
            self._shapes[name] = {tuple(np.shape(feed[name])) for feed in self._feeds}
        names = list(dict.fromkeys(fed + main_graph_tensors(model) + [o.name for o in model.graph.output]))
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
