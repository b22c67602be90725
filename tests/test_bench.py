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


def test_the_ratio_pairs_the_runs_of_each_round(monkeypatch):
    """B takes 1.5x A in every round, but the machine slows down for A's run in round 2 and not for B's: the
    ratio of the medians would say 0.5, the median of the rounds' ratios says 1.5."""
    clock = StubClock()
    run_ms = {"A": [1.0, 1.0, 3.0, 3.0, 3.0], "B": [1.5, 1.5, 1.5, 4.5, 4.5]}
    counts = {"A": -2, "B": -2}  # the first run of each (-1) is the warm-up
    real_run, real_session = bench.runtime.run, bench.runtime.session

    def scripted_run(sess, feed, outputs=None):
        k = counts[sess._label] = counts[sess._label] + 1
        clock.step = run_ms[sess._label][max(k, 0)] / 1000.0  # the reading after the run advances by this
        return real_run(sess, feed, outputs)

    def labelled_session(model, settings, what="model"):
        sess = real_session(model, settings, what)
        sess._label = what
        return sess

    monkeypatch.setattr(bench.runtime, "run", scripted_run)
    monkeypatch.setattr(bench.runtime, "session", labelled_session)
    feeds = seeded_feeds(tiny("Relu"), n=2)
    timings = bench.bench([("A", tiny("Relu")), ("B", tiny("Neg"))], feeds, warmup=1, rounds=5, timer=clock)
    assert [round(x, 6) for x in timings[1].runs_ms] == run_ms["B"]
    assert (round(timings[0].median_ms, 6), round(timings[1].median_ms, 6)) == (3.0, 1.5)
    assert abs(timings[1].ratio - 1.5) < 1e-9 and timings[0].ratio == 1.0
