"""quantize-int8 keeps the fastest candidate that stays within budget (stub candidates, stub clock)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from onnx import TensorProto, helper

from graphopt.activations import ActivationCache
from graphopt.errors import UserError
from graphopt.passes.quantize_int8 import QuantizeInt8
from graphopt.passes_base import Pass, PassContext, PassResult, make_pass, register

from tests.helpers import make_model, op_types, seeded_feeds, stub_latency


def relu_model():
    """x -> Relu -> y"""
    return make_model(
        [helper.make_node("Relu", ["x"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
    )


@register
@dataclass
class AppendIdentity(Pass):
    """Stub candidate: routes y through an Identity (same outputs)."""

    name = "test-append-identity"
    description = "test"
    lossless = False

    def run(self, model, ctx):
        model.graph.node[0].output[0] = "r"
        model.graph.node.append(helper.make_node("Identity", ["r"], ["y"]))
        return PassResult(True, details={"quantized": {"Relu": 1}})


@register
@dataclass
class StackIdentity(Pass):
    """Stub candidate: one more Identity at the end, on any model (so it can follow another candidate)."""

    name = "test-stack-identity"
    description = "test"
    lossless = False

    def run(self, model, ctx):
        inner = f"t{len(model.graph.node)}"
        model.graph.node[-1].output[0] = inner
        model.graph.node.append(helper.make_node("Identity", [inner], ["y"]))
        return PassResult(True, counts={"nodes_added": 1}, details={"quantized": {"Identity": 1}}, notes=["stacked"])


@register
@dataclass
class StackIdentityOnRelu(StackIdentity):
    """Stub: test-stack-identity that declares it can quantize Relu."""

    name = "test-stack-identity-relu"
    op_types = frozenset({"Relu"})


@register
@dataclass
class BreakOutput(Pass):
    """Stub candidate: negates the output (over any budget)."""

    name = "test-break-output"
    description = "test"
    lossless = False

    def run(self, model, ctx):
        model.graph.node[0].output[0] = "r"
        model.graph.node.append(helper.make_node("Neg", ["r"], ["y"]))
        return PassResult(True)


@register
@dataclass
class RecordBar(Pass):
    """Stub candidate with a `max_latency_ratio` option: records what it was given, changes nothing."""

    name = "test-record-bar"
    description = "test"
    lossless = False
    max_latency_ratio: float = 1.0
    seen = []  # class-level: the test reads it back

    def run(self, model, ctx):
        RecordBar.seen.append(self.max_latency_ratio)
        return PassResult(False, refused=["recorded"])


@register
@dataclass
class RecordKeepFloat(Pass):
    """Stub candidate with a `keep_float` option: records what it was given, changes nothing."""

    name = "test-record-keep-float"
    description = "test"
    lossless = False
    keep_float: str = ""
    seen = []  # class-level: the test reads it back

    def run(self, model, ctx):
        RecordKeepFloat.seen.append(self.keep_float)
        return PassResult(False, refused=["recorded"])


def context(timer):
    feeds = seeded_feeds(relu_model(), n=4, seed=5)
    return PassContext(feeds[:2], feeds[2:], ActivationCache(feeds[:2]), bench_rounds=4, timer=timer)


def test_over_budget_candidate_is_dropped_and_faster_one_kept(monkeypatch):
    timer = stub_latency(monkeypatch, 1.0, lambda label: False)
    model = relu_model()
    result = QuantizeInt8(candidates="test-break-output,test-append-identity").run(model, context(timer))
    assert any("test-break-output: over budget" in r for r in result.refused)
    # equal time is not faster: refused with the ratios
    assert not result.changed and "no candidate was faster" in result.refused[-1]
    assert op_types(model) == ["Relu"]


def test_chosen_candidate_is_applied_and_noted(monkeypatch):
    timer = stub_latency(monkeypatch, 0.5, lambda label: label == "test-append-identity")
    model = relu_model()
    result = QuantizeInt8(candidates="test-append-identity").run(model, context(timer))
    assert result.changed, result.refused
    assert op_types(model) == ["Relu", "Identity"]
    assert result.details["chosen"] == "test-append-identity"
    assert result.details["latency_ratios"] == {"test-append-identity": pytest.approx(0.5)}
    assert "chose test-append-identity by measurement" in result.notes[0]


def test_already_quantized_model_is_refused():
    model = make_model(
        [helper.make_node("QuantizeLinear", ["x", "s"], ["q"]), helper.make_node("DequantizeLinear", ["q", "s"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor("s", TensorProto.FLOAT, [], [0.1])],
    )
    result = QuantizeInt8().run(model, context(lambda: 0.0))
    assert not result.changed and result.refused == ["the model is already quantized"]


def test_model_with_a_dynamic_quantize_lstm_is_already_quantized():
    """quantize-dynamic's LSTM output (no QuantizeLinear, no MatMulInteger) is recognised as quantized."""
    from graphopt.passes.quantize_dynamic import QuantizeDynamic
    from tests.helpers import run_pass
    from tests.test_pass_quantize_dynamic import lstm_model

    model = lstm_model()
    assert run_pass(QuantizeDynamic(fallback=False, latency_fallback=False), model).changed
    assert op_types(model) == ["DynamicQuantizeLSTM"]
    result = QuantizeInt8().run(model, context(lambda: 0.0))
    assert not result.changed and result.refused == ["the model is already quantized"]


def test_later_candidate_with_max_latency_ratio_gets_the_best_ratio_so_far(monkeypatch):
    """test-append-identity times at 0.5x the input; the next candidate, which takes max_latency_ratio,
    is made with 0.5 (a candidate without that option, the first one, gets none)."""
    timer = stub_latency(monkeypatch, 0.5, lambda label: label == "test-append-identity")
    RecordBar.seen.clear()
    result = QuantizeInt8(candidates="test-record-bar,test-append-identity,test-record-bar").run(relu_model(), context(timer))
    assert RecordBar.seen == [1.0, pytest.approx(0.5)]
    assert result.changed and result.details["chosen"] == "test-append-identity"
    assert result.refused == ["test-record-bar: changed nothing (recorded)"] * 2


def test_a_candidate_slower_than_the_input_sets_no_bar_above_one(monkeypatch):
    """test-append-identity times at 1.5x the input: the next candidate is asked to beat 1.0, not 1.5."""
    timer = stub_latency(monkeypatch, 1.5, lambda label: label == "test-append-identity")
    RecordBar.seen.clear()
    result = QuantizeInt8(candidates="test-append-identity,test-record-bar").run(relu_model(), context(timer))
    assert RecordBar.seen == [1.0]
    assert not result.changed and "no candidate was faster" in result.refused[-1]


def test_chained_candidate_starts_from_the_first_ones_model(monkeypatch):
    """"a+b" runs b on a's model (not rebuilt: a ran once), is timed against the input and can win; its
    result sums the quantized ops and counts and names each pass in the notes."""
    chain = "test-append-identity+test-stack-identity"
    timer = stub_latency(monkeypatch, 0.5, lambda label: label == chain)
    model = relu_model()
    result = QuantizeInt8(candidates=f"test-append-identity,{chain}").run(model, context(timer))
    assert result.changed and result.details["chosen"] == chain
    assert result.details["latency_ratios"] == {"test-append-identity": pytest.approx(1.0), chain: pytest.approx(0.5)}
    assert op_types(model) == ["Relu", "Identity", "Identity"]
    assert result.details["quantized"] == {"Relu": 1, "Identity": 1} and result.counts == {"nodes_added": 1}
    assert result.notes[0] == "test-stack-identity: stacked" and result.notes[-1].startswith(f"chose {chain} by measurement")


def test_chained_candidate_is_skipped_when_its_first_pass_was_not_kept(monkeypatch):
    timer = stub_latency(monkeypatch, 1.0, lambda label: False)
    result = QuantizeInt8(candidates="test-break-output,test-break-output+test-append-identity").run(relu_model(), context(timer))
    assert result.refused[1] == "test-break-output+test-append-identity: not tried, test-break-output was not kept"
    assert not result.changed


def test_chained_candidate_gets_the_bar_relative_to_its_start(monkeypatch):
    """Best so far 0.5 (test-append-identity); after a start at 0.5 the bar is 1.0, after one at 1.0 it is 0.5."""
    timer = stub_latency(monkeypatch, 0.5, lambda label: label == "test-append-identity")
    RecordBar.seen.clear()
    candidates = "test-append-identity,test-stack-identity,test-append-identity+test-record-bar,test-stack-identity+test-record-bar"
    QuantizeInt8(candidates=candidates).run(relu_model(), context(timer))
    assert RecordBar.seen == [pytest.approx(1.0), pytest.approx(0.5)]


def test_chained_candidate_is_skipped_when_the_second_pass_could_do_it_all(monkeypatch):
    """test-append-identity quantized a Relu, which test-stack-identity-relu can quantize itself: the
    chain would be that pass alone, so it is not run."""
    timer = stub_latency(monkeypatch, 0.5, lambda label: label == "test-append-identity")
    chain = "test-append-identity+test-stack-identity-relu"
    result = QuantizeInt8(candidates=f"test-append-identity,{chain}").run(relu_model(), context(timer))
    assert result.refused == [f"{chain}: not tried, test-append-identity quantized nothing test-stack-identity-relu cannot (it would be test-stack-identity-relu alone)"]
    assert result.details["chosen"] == "test-append-identity"


def test_keep_float_is_handed_to_the_candidates_that_take_it(monkeypatch):
    """test-record-keep-float gets the expression; test-record-bar, which has no such option, runs without it."""
    timer = stub_latency(monkeypatch, 1.0, lambda label: False)
    RecordKeepFloat.seen.clear()
    RecordBar.seen.clear()
    QuantizeInt8(candidates="test-record-keep-float,test-record-bar", keep_float="^/model\\.0/").run(relu_model(), context(timer))
    assert RecordKeepFloat.seen == ["^/model\\.0/"] and RecordBar.seen == [1.0]


def test_bad_keep_float_is_a_user_error_before_any_candidate_runs():
    with pytest.raises(UserError, match="not a regular expression"):
        make_pass("quantize-int8", {"keep_float": "("})
