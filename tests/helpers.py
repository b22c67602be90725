"""Shared test utilities: tiny models, seeded feeds, running a pass, comparing onnxruntime outputs.

Outputs are always computed with ORT_DISABLE_ALL so onnxruntime's own fusions cannot hide a broken rewrite.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
from onnx import helper

from graphopt import runtime
from graphopt.activations import ActivationCache
from graphopt.passes_base import Pass, PassContext, PassResult

OPSET = 17


def make_model(nodes, inputs, outputs, initializers=(), opset: int = OPSET, **graph_kwargs) -> onnx.ModelProto:
    """A model from onnx.helper pieces, checked with the full checker."""
    graph = helper.make_graph(list(nodes), "test", list(inputs), list(outputs), initializer=list(initializers), **graph_kwargs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = min(model.ir_version, 9)
    onnx.checker.check_model(model, full_check=True)
    return model


def reshape_to_2x4_model() -> onnx.ModelProto:
    """x[n] (n unknown) -> Reshape to [2, 4] -> y: runs only on feeds of 8 values, so synthesized feeds
    (one value: an unknown axis 0 is 1) make it fail."""
    shape = helper.make_tensor("shape", onnx.TensorProto.INT64, [2], [2, 4])
    return make_model(
        [helper.make_node("Reshape", ["x", "shape"], ["y"])],
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [None])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 4])],
        [shape],
    )


def seeded_feeds(model: onnx.ModelProto, n: int = 2, seed: int = 0, dims: dict[str, int] | None = None) -> list[dict[str, np.ndarray]]:
    """Random float feeds for every graph input that is not an initializer; symbolic dims from `dims` (default 2)."""
    rng = np.random.default_rng(seed)
    inits = {t.name for t in model.graph.initializer}
    feeds = []
    for _ in range(n):
        feed = {}
        for vi in model.graph.input:
            if vi.name in inits:
                continue
            tt = vi.type.tensor_type
            shape = [d.dim_value if d.HasField("dim_value") else (dims or {}).get(d.dim_param, 2) for d in tt.shape.dim]
            dtype = helper.tensor_dtype_to_np_dtype(tt.elem_type)
            if np.issubdtype(dtype, np.floating):
                feed[vi.name] = rng.standard_normal(shape).astype(dtype)
            elif dtype == np.bool_:
                feed[vi.name] = rng.integers(0, 2, shape).astype(bool)
            else:
                feed[vi.name] = rng.integers(0, 4, shape).astype(dtype)
        feeds.append(feed)
    return feeds


def ort_outputs(model: onnx.ModelProto, feeds) -> list[dict[str, np.ndarray]]:
    return runtime.run_all(model, feeds, runtime.RuntimeSettings(level="disable_all"))


def run_pass(p: Pass, model: onnx.ModelProto, feeds=None) -> PassResult:
    """Run one pass in place on `model` with a context built from `feeds` (default: two seeded feeds)."""
    feeds = seeded_feeds(model) if feeds is None else feeds
    ctx = PassContext(calibration=feeds, validation=feeds, activations=ActivationCache(feeds))
    return p.run(model, ctx)


def assert_same_outputs(before: onnx.ModelProto, after: onnx.ModelProto, feeds, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    """Both models run in onnxruntime (ORT_DISABLE_ALL) and agree on every output; `after` passes the full checker."""
    onnx.checker.check_model(after, full_check=True)
    for ref, got in zip(ort_outputs(before, feeds), ort_outputs(after, feeds)):
        assert list(ref) == list(got), f"output names changed: {list(ref)} -> {list(got)}"
        for name in ref:
            assert ref[name].shape == got[name].shape, f"{name}: shape {ref[name].shape} -> {got[name].shape}"
            np.testing.assert_allclose(got[name], ref[name], rtol=rtol, atol=atol, err_msg=name)


def op_types(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


def stub_latency(monkeypatch, factor: float, is_scaled: Callable[[str], bool]):
    """A stub clock, returned, for graphopt.bench: a run of a session whose label (the name bench gives
    it) satisfies `is_scaled` takes `factor` times as long as a run of any other session."""
    from graphopt import bench

    clock = {"now": 0.0, "step": 0.001}
    real_run, real_session = bench.runtime.run, bench.runtime.session

    def labelled_session(model, settings, what="model"):
        sess = real_session(model, settings, what)
        sess._label = what
        return sess

    def timed_run(sess, feed, outputs=None):
        clock["step"] = 0.001 * (factor if is_scaled(getattr(sess, "_label", "")) else 1.0)
        return real_run(sess, feed, outputs)

    def timer():
        clock["now"] += clock["step"]
        return clock["now"]

    monkeypatch.setattr(bench.runtime, "session", labelled_session)
    monkeypatch.setattr(bench.runtime, "run", timed_run)
    return timer
