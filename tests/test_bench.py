"""The interleaved timer, with a stubbed clock (no timing assertions on the real one)."""

import onnx
from onnx import TensorProto, helper

from graphopt import bench

from tests.helpers import make_model, seeded_feeds


def tiny(op: str) -> onnx.ModelProto:
    """x -> op -> y"""
    return make_model(
        [helper.make_node(op, ["x"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 2])],
    )


class StubClock:
    """Each reading advances time by `step`; the test sets the step so a run of B lasts 3x a run of A."""

    def __init__(self):
        self.now = 0.0
        self.step = 0.001

    def __call__(self):
        self.now += self.step
        return self.now


def test_interleaved_order_alternates_and_ratio_is_relative_to_the_first(monkeypatch):
    calls = []
    clock = StubClock()
    real_run = bench.runtime.run

    def traced_run(sess, feed, outputs=None):
        label = sess._label
        calls.append(label)
        clock.step = 0.003 if label == "B" else 0.001
        return real_run(sess, feed, outputs)

    real_session = bench.runtime.session

    def labelled_session(model, settings, what="model"):
        sess = real_session(model, settings, what)
        sess._label = what
        assert settings.spinning is False, "interleaved sessions must not spin"
        return sess

    monkeypatch.setattr(bench.runtime, "run", traced_run)
    monkeypatch.setattr(bench.runtime, "session", labelled_session)
    feeds = seeded_feeds(tiny("Relu"), n=2)
    timings = bench.bench([("A", tiny("Relu")), ("B", tiny("Neg"))], feeds, warmup=1, rounds=4, timer=clock)
    assert calls[:2] == ["A", "B"]  # warm-up
    assert calls[2:] == ["A", "B", "B", "A", "A", "B", "B", "A"]
    assert [len(t.runs_ms) for t in timings] == [4, 4]
    assert abs(timings[0].median_ms - 1.0) < 1e-9 and abs(timings[1].median_ms - 3.0) < 1e-9
    assert abs(timings[1].ratio - 3.0) < 1e-9
