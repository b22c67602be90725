"""The pipeline keeps a pass only when onnxruntime proves it, and says why it rolled one back."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphopt
from graphopt.bench import Timing
from graphopt.errors import PassError
from graphopt.activations import ActivationCache
from graphopt.passes_base import Pass, PassContext, PassResult
from graphopt.pipeline import Pipeline

from tests.helpers import make_model, ort_outputs, reshape_to_2x4_model, seeded_feeds, stub_latency


def relu_neg_model() -> onnx.ModelProto:
    """x -> Relu -> Neg -> y"""
    return make_model(
        [helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Neg", ["a"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
    )


@dataclass
class SwapOp(Pass):
    """Test pass: turns node `index` into `op` (lossless or not, as the test says)."""

    name = "swap-op"
    description = "test"
    lossless = True
    index: int = 1
    op: str = "Abs"

    def run(self, model, ctx):
        model.graph.node[self.index].op_type = self.op
        return PassResult(True, {"swapped": 1})


@dataclass
class Raises(Pass):
    name = "raises"
    description = "test"
    lossless = True
    error: type = PassError

    def run(self, model, ctx):
        raise self.error("weights are not constant; run lift-constants first")


@dataclass
class NoOp(Pass):
    name = "no-op"
    description = "test"
    lossless = True

    def run(self, model, ctx):
        return PassResult(False)


@dataclass
class OncePerModel(Pass):
    """Adds a harmless Identity the first time it sees a model without one, to check fixed-point rounds."""

    name = "add-identity-once"
    description = "test"
    lossless = True

    def run(self, model, ctx):
        if any(n.op_type == "Identity" for n in model.graph.node):
            return PassResult(False)
        model.graph.node[1].input[0] = "a_id"
        model.graph.node.insert(1, helper.make_node("Identity", ["a"], ["a_id"]))
        return PassResult(True)


def test_pass_that_changes_outputs_is_rolled_back_with_numbers():
    model = relu_neg_model()
    result = graphopt.optimize(model, passes=[SwapOp()], strict=True)
    (record,) = result.report.records
    assert record.status == "rolled back"
    assert "output 'y'" in record.reason and "max abs error" in record.reason
    assert record.max_abs > 0.1
    assert [n.op_type for n in result.model.graph.node] == ["Relu", "Neg"]


def test_lossy_pass_is_held_to_the_budget_against_the_original():
    model = relu_neg_model()
    swap = SwapOp(op="Abs")
    swap.lossless = False
    result = graphopt.optimize(model, passes=[swap], strict=True)
    record = result.report.records[0]
    assert record.status == "rolled back"
    assert "cosine" in record.reason


def test_pass_error_is_recorded_with_the_passes_before_it():
    result = graphopt.optimize(relu_neg_model(), passes=[NoOp(), Raises()], fixed_point=False)
    assert [r.status for r in result.report.records] == ["no change", "failed"]
    assert "run lift-constants first" in result.report.records[1].reason
    assert "passes before: no-op" in result.report.records[1].reason


def test_unexpected_exception_rolls_back_unless_strict():
    result = graphopt.optimize(relu_neg_model(), passes=[Raises(error=KeyError)], fixed_point=False)
    assert result.report.records[0].status == "failed"
    assert "internal error KeyError" in result.report.records[0].reason
    with pytest.raises(KeyError):
        graphopt.optimize(relu_neg_model(), passes=[Raises(error=KeyError)], strict=True)


def test_invalid_graph_is_rolled_back_with_the_checker_reason():
    result = graphopt.optimize(relu_neg_model(), passes=[SwapOp(op="NoSuchOp")], strict=True)
    record = result.report.records[0]
    assert record.status == "rolled back"
    assert "onnx.checker" in record.reason and "NoSuchOp" in record.reason


def test_accepted_pass_is_kept_and_fixed_point_stops_when_nothing_changes():
    model = relu_neg_model()
    result = graphopt.optimize(model, passes=[OncePerModel()], strict=True)
    statuses = [(r.round, r.status) for r in result.report.records]
    assert statuses == [(1, "applied"), (2, "no change")]
    assert [n.op_type for n in result.model.graph.node] == ["Relu", "Identity", "Neg"]
    assert [n.op_type for n in model.graph.node] == ["Relu", "Neg"], "the input model must not be modified"
    feeds = seeded_feeds(model, n=3, seed=1)
    for a, b in zip(ort_outputs(model, feeds), ort_outputs(result.model, feeds)):
        np.testing.assert_array_equal(a["y"], b["y"])


@dataclass
class ScaleOutput(Pass):
    """Test pass: multiplies the graph output by (1 + eps) through an extra Mul (tensors named after the
    pass, so that two such passes can run on one model)."""

    name = "scale-output"
    description = "test"
    lossless = True
    eps: float = 1e-4

    def run(self, model, ctx):
        before, factor = f"y_before_{self.name}", f"factor_{self.name}"
        model.graph.node[-1].output[0] = before
        model.graph.initializer.append(numpy_helper.from_array(np.array(1 + self.eps, np.float32), factor))
        model.graph.node.append(helper.make_node("Mul", [before, factor], ["y"]))
        return PassResult(True)


def test_rounding_floor_is_measured_only_when_needed_and_can_be_switched_off(monkeypatch):
    from graphopt import validate

    measured = []
    monkeypatch.setattr(validate, "rounding_floors", lambda a, *variants: measured.append(len(variants)) or {"y": 1e-3})
    kept = graphopt.optimize(relu_neg_model(), passes=[ScaleOutput()], fixed_point=False, strict=True)
    assert kept.report.records[0].status == "applied" and measured == [2]  # one measurement: two variants
    assert kept.report.rounding_floors == {"y": 1e-3}
    strict = graphopt.optimize(relu_neg_model(), passes=[ScaleOutput()], fixed_point=False, strict=True, rounding_floor=False)
    assert strict.report.records[0].status == "rolled back" and measured == [2]
    tiny = graphopt.optimize(relu_neg_model(), passes=[ScaleOutput(eps=1e-7)], fixed_point=False, strict=True)
    assert tiny.report.records[0].status == "applied" and measured == [2], "within the fixed tolerance: no floor measured"


@dataclass
class ScaleOutputLossy(ScaleOutput):
    """Test pass: the graph output times 1.5 through an extra Mul, declared lossy (the default cosine and
    top-1 budget holds: scaling changes neither)."""

    name = "scale-output-lossy"
    lossless = False
    eps: float = 0.5


def floors_in_turn(monkeypatch, *floors: float) -> list:
    """Stub validate.rounding_floors: the k-th measurement gives floor k for output y; returns the list of
    the ORT_DISABLE_ALL outputs each measurement was taken on."""
    from graphopt import validate

    measured, given = [], iter(floors)
    monkeypatch.setattr(validate, "rounding_floors", lambda disabled, *variants: measured.append(disabled) or {"y": next(given)})
    return measured


@pytest.mark.parametrize("floor, kept", [(1e-2, True), (1e-9, False)])
def test_after_a_lossy_pass_lossless_passes_are_held_to_the_rounding_of_its_output(monkeypatch, floor, kept):
    """x -> Relu -> Neg -> [Mul 1.5, lossy] -> [Mul 1 + 1e-4, lossless] -> y: the second is judged against
    the floor measured on the first's output (a quantized model rounds far more coarsely than its input),
    and the input's floor is never measured."""
    measured = floors_in_turn(monkeypatch, floor)
    model = relu_neg_model()
    feeds = seeded_feeds(model, n=4, seed=0)  # lossy passes: the first half calibrates, the second validates
    result = graphopt.optimize(model, passes=[ScaleOutputLossy(), ScaleOutput()], data=feeds, fixed_point=False, strict=True)
    lossy, lossless = result.report.records
    assert lossy.status == "applied"
    assert len(measured) == 1 and result.report.rounding_floors == {}
    for on, before in zip(measured[0], ort_outputs(model, feeds[2:])):
        np.testing.assert_allclose(on["y"], 1.5 * before["y"], rtol=1e-6)
    assert any("rounding floor of the model after scale-output-lossy: y 1.00e" in n for n in result.report.notes)
    if kept:
        assert lossless.status == "applied"
        assert "within float rounding of the model after scale-output-lossy" in " ".join(lossless.notes)
    else:
        assert lossless.status == "rolled back" and "max abs error" in lossless.reason and "tolerance" in lossless.reason


def test_what_a_lossy_models_floor_admits_must_still_keep_the_budget(monkeypatch):
    """x -> Relu -> Neg -> [Mul 1.5, lossy] -> y, then Neg => Abs declared lossless: the (stubbed, wide)
    floor of the scaled model admits the sign flip, the cosine budget against the original does not."""
    floors_in_turn(monkeypatch, 100.0)
    result = graphopt.optimize(relu_neg_model(), passes=[ScaleOutputLossy(), SwapOp(index=1, op="Abs")], fixed_point=False, strict=True)
    lossy, swap = result.report.records
    assert lossy.status == "applied"
    assert swap.status == "rolled back" and "cosine" in swap.reason
    assert "within float rounding of the model after scale-output-lossy" in " ".join(swap.notes)
    assert [n.op_type for n in result.model.graph.node] == ["Relu", "Neg", "Mul"]


@dataclass
class FitsCosine(Pass):
    """Test pass standing in for a quantizer that backs off against ctx.budget: below `careful_at` (the
    cosine floor it is asked for) it overreaches, from there on it is careful (y times 1.5, which keeps
    cosine and top-1). Overreaching is y => Abs(y) (cosine -1 on this model, whose y is <= 0), or with
    `last_scaled` the last column of y scaled by it (on NEAR_FEEDS, 1.4 gives cosine 0.9878 and leaves the
    argmax: over the 0.99 floor, within twice its loss). Records each floor it saw."""

    name = "fits-cosine"
    description = "test"
    lossless = False
    fits_budget = True
    careful_at: float = 0.995
    last_scaled: float | None = None
    seen: list = field(default_factory=list)

    def run(self, model, ctx):
        self.seen.append(ctx.budget.min_cosine)
        model.graph.node[-1].output[0] = "y_before"
        if ctx.budget.min_cosine >= self.careful_at:
            model.graph.initializer.append(numpy_helper.from_array(np.array(1.5, np.float32), "factor"))
            model.graph.node.append(helper.make_node("Mul", ["y_before", "factor"], ["y"]))
        elif self.last_scaled is not None:
            model.graph.initializer.append(numpy_helper.from_array(np.array([1, 1, 1, self.last_scaled], np.float32), "factor"))
            model.graph.node.append(helper.make_node("Mul", ["y_before", "factor"], ["y"]))
        else:
            model.graph.node.append(helper.make_node("Abs", ["y_before"], ["y"]))
        return PassResult(True)


# x all ones: y = -1 everywhere, so a scaled last column gives the same cosine on every feed
NEAR_FEEDS = [{"x": np.ones((2, 4), np.float32)} for _ in range(4)]


@dataclass
class OverreachesOnce(FitsCosine):
    """The same, but it does not claim to fit the budget: the pipeline must not run it twice."""

    name = "overreaches-once"
    fits_budget = False


def test_a_pass_fitting_the_budget_that_breaks_it_on_validation_runs_again_with_half_the_loss():
    model = relu_neg_model()
    fits = FitsCosine(last_scaled=1.4)
    result = graphopt.optimize(model, passes=[fits], data=NEAR_FEEDS, fixed_point=False, strict=True)
    (record,) = result.report.records
    assert fits.seen == [0.99, pytest.approx(0.995)], "run at the budget, then at half its allowed loss"
    assert record.status == "applied"
    assert "over budget on the validation feeds at first (output 'y': cosine 0.9878 < 0.99)" in record.notes[0]
    assert [n.op_type for n in result.model.graph.node] == ["Relu", "Neg", "Mul"]
    for before, after in zip(ort_outputs(model, NEAR_FEEDS), ort_outputs(result.model, NEAR_FEEDS)):
        np.testing.assert_allclose(after["y"], 1.5 * before["y"], rtol=1e-6)


def test_a_result_over_twice_the_allowed_loss_is_not_refitted():
    """Cosine -1 after a fit that kept the budget on the calibration feeds: a gap between the feed sets
    wider than the budget, which a second run aiming at half of it would not close."""
    model = relu_neg_model()
    fits = FitsCosine()
    result = graphopt.optimize(model, passes=[fits], data=seeded_feeds(model, n=4, seed=3), fixed_point=False, strict=True)
    (record,) = result.report.records
    assert fits.seen == [0.99]
    assert record.status == "rolled back" and "cosine -1.0000 < 0.99" in record.reason
    assert record.notes == ["not run again aiming at half the allowed loss: more than 2x the allowed loss on the validation feeds"]
    assert [n.op_type for n in result.model.graph.node] == ["Relu", "Neg"]


def test_a_pass_not_fitting_the_budget_is_rolled_back_without_a_second_run():
    model = relu_neg_model()
    once = OverreachesOnce()
    result = graphopt.optimize(model, passes=[once], data=seeded_feeds(model, n=4, seed=3), fixed_point=False, strict=True)
    (record,) = result.report.records
    assert once.seen == [0.99]
    assert record.status == "rolled back" and "cosine -1.0000 < 0.99" in record.reason
    assert not any("run again" in n for n in record.notes)
    assert [n.op_type for n in result.model.graph.node] == ["Relu", "Neg"]


def test_a_second_run_that_breaks_the_budget_too_is_rolled_back_with_both_reasons():
    model = relu_neg_model()
    reckless = FitsCosine(careful_at=2.0, last_scaled=1.4)  # never careful
    result = graphopt.optimize(model, passes=[reckless], data=NEAR_FEEDS, fixed_point=False, strict=True)
    (record,) = result.report.records
    assert reckless.seen == [0.99, pytest.approx(0.995)], "one retry, not more"
    assert record.status == "rolled back" and "cosine 0.9878 < 0.99" in record.reason
    assert "over budget on the validation feeds at first" in record.notes[0]
    assert [n.op_type for n in result.model.graph.node] == ["Relu", "Neg"]


def test_a_fitting_pass_whose_model_fails_to_run_as_deployed_is_not_run_again(monkeypatch):
    """Stub: the candidate (it holds the careful pass's Mul) fails at the budget's settings, onnxruntime's
    level all. That is no budget a refit could meet: rolled back after one run, with onnxruntime's reason."""
    from graphopt import pipeline
    from graphopt.errors import UserError

    real_run_all = pipeline.runtime.run_all

    def run_all(model, feeds, settings=None, what="model"):
        if settings is pipeline.BUDGET_SETTINGS and any(n.op_type == "Mul" for n in model.graph.node):
            raise UserError(f"{what} fails at level all (stub)")
        return real_run_all(model, feeds, settings, what=what) if settings is not None else real_run_all(model, feeds, what=what)

    monkeypatch.setattr(pipeline.runtime, "run_all", run_all)
    model = relu_neg_model()
    fits = FitsCosine(careful_at=0.0)  # careful from the start
    result = graphopt.optimize(model, passes=[fits], data=seeded_feeds(model, n=4, seed=3), fixed_point=False, strict=True)
    (record,) = result.report.records
    assert fits.seen == [0.99], "not run again"
    assert record.status == "rolled back" and record.reason == "the model after fits-cosine fails at level all (stub)"
    assert not any("run again" in n for n in record.notes)


def test_pass_that_breaks_the_optimized_load_is_found_and_rolled_back(monkeypatch):
    """Stub: onnxruntime 'cannot load' a model holding an Identity at ORT_ENABLE_ALL; the first run ends
    with such a model, so the pipeline reruns with that load checked per pass and rolls the pass back."""
    from graphopt import runtime as rt

    real_session = rt.session

    def session(model, settings=rt.RuntimeSettings(), what="model"):
        proto = model if isinstance(model, onnx.ModelProto) else onnx.load_from_string(model)
        if settings.level == "all" and any(n.op_type == "Identity" for n in proto.graph.node):
            raise graphopt.UserError("onnxruntime cannot load it: stubbed failure")
        return real_session(model, settings, what)

    monkeypatch.setattr(rt, "session", session)
    result = graphopt.optimize(relu_neg_model(), passes=[OncePerModel()], strict=True)
    assert [(r.round, r.status) for r in result.report.records] == [(1, "rolled back")]
    assert "stubbed failure" in result.report.records[0].reason
    assert any("run again" in note for note in result.report.notes)
    assert [n.op_type for n in result.model.graph.node] == ["Relu", "Neg"]


@dataclass
class AlwaysAdds(Pass):
    """Test pass: appends one more Identity before the output every time it runs."""

    name = "always-adds"
    description = "test"
    lossless = True

    def run(self, model, ctx):
        last = model.graph.node[-1]
        last.output[0] = f"y_{len(model.graph.node)}"
        model.graph.node.append(helper.make_node("Identity", [last.output[0]], ["y"]))
        return PassResult(True)


def test_rounds_are_capped_and_the_report_says_so():
    result = graphopt.optimize(relu_neg_model(), passes=[AlwaysAdds()], strict=True)
    assert [r.round for r in result.report.records] == [1, 2, 3, 4]
    assert any("no fixed point" in note for note in result.report.notes)


def test_report_counts_and_final_comparison():
    result = graphopt.optimize(relu_neg_model(), passes=[OncePerModel()], strict=True)
    report = result.report.to_dict()
    assert report["input"]["nodes"] == 2 and report["output"]["nodes"] == 3
    assert report["final"]["y"]["max_abs"] == 0.0
    assert report["records"][0]["after"]["nodes"] == 3
    assert "add-identity-once" in result.report.summary()


@dataclass
class SwapWithRefusals(SwapOp):
    """A lossy SwapOp that also says what it left out."""

    lossless = False

    def run(self, model, ctx):
        result = super().run(model, ctx)
        result.refused = ["Conv 'c1': unsupported"]
        return result


@pytest.mark.parametrize("op, status", [("Neg", "applied"), ("Abs", "rolled back")])
def test_the_summary_says_what_a_lossy_pass_left_out_unless_it_was_kept(op, status):
    """Relu -> Neg stays Relu -> Neg (within the budget: kept) or becomes Relu -> Abs (the sign flips:
    rolled back). A rolled-back pass's refusals explain its candidate, so the summary shows them as for a pass
    that changed nothing; a kept pass's are in the JSON only."""
    result = graphopt.optimize(relu_neg_model(), passes=[SwapWithRefusals(op=op)], data=seeded_feeds(relu_neg_model(), n=4), strict=True)
    assert result.report.records[0].status == status
    said = "swap-op: not done: Conv 'c1': unsupported" in result.report.summary().splitlines()
    assert said == (status == "rolled back")


def test_unloadable_input_model_is_a_user_error():
    model = relu_neg_model()
    model.graph.node[0].op_type = "Relu"
    model.graph.node[0].domain = "no.such.domain"
    model.opset_import.append(helper.make_opsetid("no.such.domain", 1))
    with pytest.raises(graphopt.UserError, match="onnxruntime cannot load the input model"):
        graphopt.optimize(model, passes=[NoOp()])


def test_pass_options_from_specs():
    from graphopt.api import parse_pass_spec

    with pytest.raises(graphopt.UserError, match="unknown pass 'nope'"):
        parse_pass_spec("nope")


def test_keep_float_fills_only_the_passes_that_take_it_and_were_given_none():
    from graphopt.api import parse_pass_spec, with_keep_float

    passes = [parse_pass_spec(s) for s in ("fold-constants", "quantize-static:keep_float=^own$", "quantize-dynamic")]
    kept = with_keep_float(passes, "^stem/")
    assert [getattr(p, "keep_float", None) for p in kept] == [None, "^own$", "^stem/"]
    assert kept[0] is passes[0] and with_keep_float(passes, "") is passes


def test_metric_is_reported_before_and_after():
    """x -> MatMul(W) -> y, labels = argmax of the original: accuracy 1.0 before and after."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((4, 3)).astype(np.float32), "w")
    model = make_model(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])],
        [w],
    )
    feeds = seeded_feeds(model, n=6, seed=2)
    labels = [np.argmax(o["y"], axis=-1) for o in ort_outputs(model, feeds)]
    data = graphopt.data.FeedSet(feeds, labels, "test")
    result = graphopt.optimize(model, passes=[NoOp()], data=data, metric=graphopt.accuracy)
    assert result.report.metrics["accuracy"] == {"before": 1.0, "after": 1.0}


@dataclass
class FasterClaim(Pass):
    """Test pass: adds an Identity (outputs unchanged) and claims it made the model faster or smaller."""

    name = "claims-speed"
    description = "test"
    lossless = False
    claims = "speed"

    def run(self, model, ctx):
        model.graph.node[1].input[0] = "a_id"
        model.graph.node.insert(1, helper.make_node("Identity", ["a"], ["a_id"]))
        return PassResult(True)


@dataclass
class DoubleNegation(FasterClaim):
    """Claims size; routes a through Neg -> Neg, which onnxruntime keeps (unlike an Identity)."""

    name = "claims-size"
    claims = "size"

    def run(self, model, ctx):
        model.graph.node[1].input[0] = "a_neg_neg"
        model.graph.node.insert(1, helper.make_node("Neg", ["a_neg"], ["a_neg_neg"]))
        model.graph.node.insert(1, helper.make_node("Neg", ["a"], ["a_neg"]))
        return PassResult(True)


def claiming(claims):
    """A pass claiming speed (adds an Identity) or size (adds two Negs, kernels onnxruntime keeps)."""
    if claims == "size":
        return DoubleNegation()
    p = FasterClaim()
    p.claims = claims
    return p


@pytest.mark.parametrize("ratio, claims, kept", [(0.5, "speed", True), (1.0, "speed", False), (1.2, "size", False), (1.0, "size", True)])
def test_latency_guard_keeps_a_claiming_pass_only_when_the_claim_holds(monkeypatch, ratio, claims, kept):
    timer = stub_latency(monkeypatch, ratio, lambda label: label.startswith("after"))
    p = claiming(claims)
    model = relu_neg_model()
    feeds = seeded_feeds(model, n=4, seed=3)
    ctx = PassContext(feeds[:2], feeds[2:], ActivationCache(feeds[:2]), bench_rounds=4, timer=timer)
    optimized, report = Pipeline([p], fixed_point=False, strict=True).run(model, ctx)
    record = report.records[0]
    assert record.latency_ms is not None
    assert record.latency_ms[1] / record.latency_ms[0] == pytest.approx(ratio)
    if kept:
        assert record.status == "applied"
        assert len(optimized.graph.node) > len(model.graph.node)
    else:
        assert record.status == "rolled back"
        assert ("not faster" if claims == "speed" else "slower") in record.reason
        assert [n.op_type for n in optimized.graph.node] == ["Relu", "Neg"]


@pytest.mark.parametrize(
    "claims, ratios, kept, timings",
    [
        ("size", [1.2, 1.0], True, 2),
        ("size", [1.2, 1.1], False, 2),
        ("speed", [1.2, 0.5], False, 1),  # slower: one timing is enough
        ("speed", [0.98, 0.94], True, 2),  # faster but under the margin: the mean of two (0.96) decides
        ("speed", [0.98, 0.97], False, 2),
    ],
)
def test_an_inconclusive_timing_is_repeated_before_it_decides(claims, ratios, kept, timings):
    """claims=size: one slower timing is confirmed by a second. claims=speed: a timing that is faster but by
    less than the 3% margin is repeated and the mean of the two is judged; a slower one is final."""
    p = claiming(claims)
    model = relu_neg_model()
    feeds = seeded_feeds(model, n=4, seed=3)
    ctx = PassContext(feeds[:2], feeds[2:], ActivationCache(feeds[:2]))
    calls = []

    def latency(models):
        calls.append([label for label, _ in models])
        ratio = ratios[len(calls) - 1]
        return [Timing("before", 0.0, [1.0]), Timing(models[1][0], 0.0, [ratio], ratio)]

    ctx.latency = latency
    _, report = Pipeline([p], fixed_point=False, strict=True).run(model, ctx)
    record = report.records[0]
    assert len(calls) == timings
    assert record.status == ("applied" if kept else "rolled back")
    if claims == "size" and not kept:
        assert "latency ratio 1.200 and 1.100" in record.reason
    if claims == "speed" and not kept and timings == 2:
        assert "not faster: latency ratio 0.980 and 0.970 (mean 0.975)" in record.reason


def test_a_size_change_onnxruntime_loads_into_the_same_graph_is_not_timed():
    """An Identity claiming size: onnxruntime removes it at load, so the optimized graphs match and the
    change is kept without timing (ctx.latency is never called), said in a note."""
    p = FasterClaim()
    p.claims = "size"
    model = relu_neg_model()
    feeds = seeded_feeds(model, n=4, seed=3)
    ctx = PassContext(feeds[:2], feeds[2:], ActivationCache(feeds[:2]))
    ctx.latency = None  # would fail if called
    optimized, report = Pipeline([p], fixed_point=False, strict=True).run(model, ctx)
    record = report.records[0]
    assert record.status == "applied" and "Identity" in [n.op_type for n in optimized.graph.node]
    assert record.latency_ms is None and any(n.startswith("not timed: onnxruntime runs the same graph") for n in record.notes)


def test_held_out_validation_feeds_are_used_when_given():
    model = relu_neg_model()
    calibration = seeded_feeds(model, n=3, seed=1)
    held_out = seeded_feeds(model, n=5, seed=2)
    swap = SwapOp(op="Abs")
    swap.lossless = False
    result = graphopt.optimize(model, passes=[swap], data=calibration, val=held_out, strict=True)
    assert result.report.feeds.startswith("5 validation feeds")


def test_the_report_says_when_max_feeds_left_given_feeds_unused():
    model = relu_neg_model()
    swap = SwapOp(op="Abs")
    swap.lossless = False
    data, held_out = seeded_feeds(model, n=6, seed=1), seeded_feeds(model, n=5, seed=2)
    capped = graphopt.optimize(model, passes=[swap], data=data, val=held_out, max_feeds=4, strict=True)
    unused = [n for n in capped.report.notes if n.startswith("only the first")]
    assert unused == [
        "only the first 4 of the 6 feeds of data (given) were used; raise max_feeds (--max-feeds) to use them all",
        "only the first 4 of the 5 feeds of val (given) were used; raise max_feeds (--max-feeds) to use them all",
    ]
    assert capped.report.feeds.startswith("4 validation feeds")
    everything = graphopt.optimize(model, passes=[swap], data=data, val=held_out, max_feeds=6, strict=True)
    assert not [n for n in everything.report.notes if n.startswith("only the first")]
    assert everything.report.feeds.startswith("5 validation feeds")


SYNTHESIZED_NOTE = "lossy passes were calibrated and validated on synthesized random feeds; give real data (--data) for a meaningful result"


@pytest.mark.parametrize("data", [None, "synthesized FeedSet"])
def test_the_report_says_when_lossy_passes_saw_only_synthesized_feeds(data):
    """Whether the caller gave no data or the feeds `synthesize` made (as the command line passes them)."""
    model = relu_neg_model()
    swap = SwapOp(op="Abs")
    swap.lossless = False
    given = graphopt.data.synthesize(model, count=4) if data else None
    result = graphopt.optimize(model, passes=[swap], data=given, strict=True)
    assert SYNTHESIZED_NOTE in result.report.notes
    real = graphopt.optimize(model, passes=[swap], data=seeded_feeds(model, n=4), strict=True)
    assert SYNTHESIZED_NOTE not in real.report.notes


def test_a_model_that_fails_on_synthesized_feeds_is_told_to_give_data():
    model = reshape_to_2x4_model()
    with pytest.raises(graphopt.UserError) as caught:
        graphopt.optimize(model)
    assert str(caught.value).startswith("onnxruntime failed to run the input model: ")
    assert str(caught.value).endswith("\nthe feeds were synthesized (x [1]): give real inputs with --data, or other dims with --shape NAME=DIMS")
    assert graphopt.optimize(model, data=[{"x": np.arange(8, dtype=np.float32)}]).model is not None, "with data that fits it runs"


def test_lossy_passes_run_in_the_first_round_only():
    lossy = FasterClaim()
    lossy.claims = ""
    result = graphopt.optimize(relu_neg_model(), passes=[lossy, OncePerModel()], strict=True)
    names = [(r.name, r.round) for r in result.report.records]
    assert names == [("claims-speed", 1), ("add-identity-once", 1), ("add-identity-once", 2)]


def test_fidelity_is_the_budget_metric_where_there_is_one_else_the_mean_worst_feed_cosine():
    """PassContext.fidelity ranks a pass's variants: the user's metric on labelled feeds, else the mean over
    outputs of each output's lowest cosine over the feeds."""
    feeds = [{"x": np.ones(2, np.float32)}] * 2
    reference = [{"a": np.array([1.0, 0.0]), "b": np.array([1.0, 1.0])}, {"a": np.array([0.0, 1.0]), "b": np.array([1.0, 1.0])}]
    outputs = [{"a": np.array([1.0, 1.0]), "b": np.array([1.0, 1.0])}, {"a": np.array([0.0, 1.0]), "b": np.array([1.0, -1.0])}]
    ctx = PassContext(feeds, feeds, ActivationCache(feeds))
    assert ctx.fidelity(reference, outputs) == pytest.approx((np.sqrt(0.5) + 0.0) / 2)
    assert ctx.fidelity_label.startswith("output cosine")

    def agreement(outs, labels):
        return float(np.mean([np.argmax(o["a"]) == label for o, label in zip(outs, labels)]))

    ctx = PassContext(feeds, feeds, ActivationCache(feeds), budget=graphopt.validate.Budget(metric=agreement), calibration_labels=[0, 1])
    assert ctx.fidelity(reference, outputs) == 1.0 and ctx.fidelity_label == "metric agreement"
