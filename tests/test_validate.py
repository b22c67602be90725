"""Fidelity numbers computed by hand, and the lossless tolerance."""

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphopt import validate
from graphopt.errors import UserError
from tests.helpers import make_model


def test_compare_metrics_by_hand():
    ref = [{"y": np.array([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]], np.float32)}]
    cand = [{"y": np.array([[1.0, 2.0, 3.5], [0.0, 4.0, 0.0]], np.float32)}]
    d = validate.compare(ref, cand)["y"]
    assert d.max_abs == 4.0
    assert d.max_rel == 1.0  # 4 / max|ref| = 4
    assert d.top1 == 0.5  # row 0 argmax 2 == 2, row 1 argmax 0 != 1
    a, b = ref[0]["y"].ravel().astype(np.float64), cand[0]["y"].ravel().astype(np.float64)
    assert abs(d.cosine - a @ b / (np.linalg.norm(a) * np.linalg.norm(b))) < 1e-12


def test_lossless_tolerance_scales_with_the_output():
    ref = [{"y": np.array([1000.0, 1.0], np.float32)}]
    close = [{"y": np.array([1000.001, 1.0], np.float32)}]
    far = [{"y": np.array([1000.1, 1.0], np.float32)}]
    assert validate.lossless_violation(validate.compare(ref, close), ref) is None
    assert "max abs error" in validate.lossless_violation(validate.compare(ref, far), ref)


def test_integer_outputs_must_be_equal_and_shapes_must_match():
    ref = [{"i": np.array([1, 2], np.int64)}]
    assert "integer/bool" in validate.lossless_violation(validate.compare(ref, [{"i": np.array([1, 3], np.int64)}]), ref)
    assert "shape [2] became [1, 2]" in validate.lossless_violation(validate.compare(ref, [{"i": np.array([[1, 2]], np.int64)}]), ref)


def test_nan_positions_must_agree():
    ref = [{"y": np.array([np.nan, 1.0], np.float32)}]
    assert validate.lossless_violation(validate.compare(ref, [{"y": np.array([np.nan, 1.0], np.float32)}]), ref) is None
    assert "NaNs" in validate.lossless_violation(validate.compare(ref, [{"y": np.array([0.0, 1.0], np.float32)}]), ref)


def test_rounding_floor_widens_the_tolerance_to_twice_onnxruntimes_own_difference():
    ref = [{"y": np.array([1.0, 0.5], np.float32)}]
    cand = [{"y": np.array([1.0 + 3e-5, 0.5], np.float32)}]
    diffs = validate.compare(ref, cand)
    assert "max abs error" in validate.lossless_violation(diffs, ref)
    assert validate.lossless_violation(diffs, ref, floors={"y": 2e-5}) is None
    assert "max abs error" in validate.lossless_violation(diffs, ref, floors={"y": 1e-5})


def test_rounding_floors_measure_per_output_difference():
    a = [{"y": np.array([1.0, 2.0], np.float32), "i": np.array([1])}]
    b = [{"y": np.array([1.0, 2.5], np.float32), "i": np.array([1])}]
    c = [{"y": np.array([1.25, 2.0], np.float32), "i": np.array([1])}]
    assert validate.rounding_floors(a, b) == {"y": 0.5}
    assert validate.rounding_floors(a, c, b) == {"y": 0.5}  # the larger of the variants


def test_weights_one_ulp_off_moves_only_linear_weights_and_biases_by_one_ulp():
    """Conv weight and bias (initializers), a MatMul weight held in a Constant node: each element one ulp
    up or down. The Reshape target and the scalar of a Mul stay as they are; so does the input model."""
    rng = np.random.default_rng(0)
    f = lambda name, shape: numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)  # noqa: E731
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], kernel_shape=[1, 1]),
        helper.make_node("Reshape", ["c", "shape"], ["r"]),
        helper.make_node("Constant", [], ["m"], value=f("m_value", [4, 3])),
        helper.make_node("MatMul", ["r", "m"], ["p"]),
        helper.make_node("Mul", ["p", "half"], ["y"]),
    ]
    inits = [f("w", [4, 2, 1, 1]), f("b", [4]), numpy_helper.from_array(np.array([2, 4], np.int64), "shape"), numpy_helper.from_array(np.array(0.5, np.float32), "half")]
    model = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 1, 2])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])], inits)
    moved = validate.weights_one_ulp_off(model)

    def values(m):
        found = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
        found["m"] = numpy_helper.to_array(m.graph.node[2].attribute[0].t)
        return found

    before, after = values(model), values(moved)
    for name in ("w", "b", "m"):
        steps = np.abs(after[name] - before[name]) / np.spacing(np.abs(before[name]))
        assert np.all((steps >= 0.5) & (steps <= 1.0)), name  # one ulp (half of it when it crosses a power of two)
        assert np.any(after[name] > before[name]) and np.any(after[name] < before[name]), name
    for name in ("shape", "half"):
        np.testing.assert_array_equal(after[name], before[name])
    assert values(model)["w"].tobytes() == before["w"].tobytes()


def test_sequence_and_optional_outputs_compare_element_by_element():
    ref = [{"s": [np.array([1.0, 2.0], np.float32), np.array([3.0], np.float32)], "o": None}]
    same = [{"s": [np.array([1.0, 2.0], np.float32), np.array([3.0], np.float32)], "o": None}]
    shorter = [{"s": [np.array([1.0, 2.0], np.float32)], "o": None}]
    off = [{"s": [np.array([1.0, 2.0], np.float32), np.array([3.5], np.float32)], "o": None}]
    assert validate.lossless_violation(validate.compare(ref, same), ref) is None
    assert "2 tensors became 1" in validate.lossless_violation(validate.compare(ref, shorter), ref)
    assert validate.compare(ref, off)["s"].max_abs == 0.5
    assert validate.output_scale(ref, "s") == 3.0
    assert "output missing" in validate.lossless_violation(validate.compare(ref, [{"o": None}]), ref)


def _zipmap(rows: list[list[float]], labels=(0, 1, 2)) -> list[dict]:
    """What onnxruntime returns for a ZipMap output (scikit-learn classifiers): one {label: probability}
    map per sample."""
    return [{label: float(p) for label, p in zip(labels, row)} for row in rows]


def test_map_outputs_compare_their_values_as_class_scores_and_their_keys_exactly():
    ref = [{"probs": _zipmap([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]])}]
    close = [{"probs": _zipmap([[0.69, 0.21, 0.1], [0.1, 0.31, 0.59]])}]
    flipped = [{"probs": _zipmap([[0.3, 0.6, 0.1], [0.1, 0.3, 0.6]])}]
    relabelled = [{"probs": _zipmap([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]], labels=(0, 1, 5))}]
    d = validate.compare(ref, close)["probs"]
    assert not d.exact_kind and d.top1 == 1.0 and d.cosine > 0.999 and abs(d.max_abs - 0.01) < 1e-9
    assert validate.Budget().violation(ref, close) is None
    assert validate.compare(ref, flipped)["probs"].top1 == 0.5
    assert "top-1 agreement 0.5000" in validate.Budget(min_cosine=0.0).violation(ref, flipped)
    assert validate.Budget().violation(ref, relabelled) == "output 'probs': the keys of its maps changed"
    assert validate.lossless_violation(validate.compare(ref, ref), ref) is None


def _outputs(values: list[np.ndarray], name: str = "y") -> list[dict[str, np.ndarray]]:
    return [{name: v} for v in values]


def test_budget_floors_per_output_and_overrides():
    rng = np.random.default_rng(0)
    ref = _outputs([rng.normal(size=(2, 10)).astype(np.float32) for _ in range(3)])
    noisy = [{"y": r["y"] + rng.normal(scale=0.3, size=r["y"].shape).astype(np.float32)} for r in ref]
    budget = validate.Budget()
    assert "cosine" in budget.violation(ref, noisy)
    assert validate.Budget(min_cosine=0.5, min_top1=0.0).violation(ref, noisy) is None
    per_output = validate.Budget(min_cosine=0.5, min_top1=0.0, per_output={"y": {"rel": 1e-3}})
    assert "relative error" in per_output.violation(ref, noisy)
    assert budget.violation(ref, ref) is None


def test_budget_integer_outputs_must_mostly_agree():
    ref = _outputs([np.arange(100, dtype=np.int64)])
    changed = _outputs([np.where(np.arange(100) < 5, -1, np.arange(100)).astype(np.int64)])
    assert validate.Budget(min_top1=0.9).violation(ref, changed) is None
    assert "0.9500 of elements agree" in validate.Budget(min_top1=0.99).violation(ref, changed)


def test_budget_with_a_metric_bounds_the_drop_instead_of_the_floors():
    ref = _outputs([np.array([[0.1, 0.9], [0.8, 0.2]], np.float32)])
    flipped = _outputs([np.array([[0.9, 0.1], [0.8, 0.2]], np.float32)])
    labels = [np.array([1, 0])]

    def accuracy(outputs, labels):
        return float(np.mean([np.mean(np.argmax(o["y"], -1) == l) for o, l in zip(outputs, labels)]))

    assert "dropped from 1.0000 to 0.5000" in validate.Budget(metric=accuracy, max_drop=0.1).violation(ref, flipped, labels)
    assert validate.Budget(metric=accuracy, max_drop=0.6).violation(ref, flipped, labels) is None


def test_tightened_budget_allows_the_given_share_of_each_loss():
    def metric(outputs, labels):
        return 0.0

    budget = validate.Budget(min_cosine=0.99, min_top1=0.98, max_rel=0.2, per_output={"y": {"cosine": 0.9, "rel": 0.1, "top1": None}, "z": {"rel": None}}, metric=metric, max_drop=0.04)
    half = budget.tightened()
    assert (half.min_cosine, half.min_top1, half.max_rel, half.max_drop) == pytest.approx((0.995, 0.99, 0.1, 0.02))
    assert half.per_output["y"]["cosine"] == pytest.approx(0.95) and half.per_output["y"]["rel"] == pytest.approx(0.05)
    assert half.per_output["y"]["top1"] is None and half.per_output["z"]["rel"] is None, "a floor switched off stays off"
    assert half.metric is metric
    quarter = budget.tightened(0.25)
    assert (quarter.min_cosine, quarter.max_drop) == pytest.approx((0.9975, 0.01))
    double = budget.tightened(2.0)  # a share above 1 loosens: how the pipeline asks "within twice the loss?"
    assert (double.min_cosine, double.min_top1, double.max_rel, double.max_drop) == pytest.approx((0.98, 0.96, 0.4, 0.08))
    unset = validate.Budget(max_rel=None, min_top1=None).tightened()
    assert unset.max_rel is None and unset.min_top1 is None
    assert budget.min_cosine == 0.99 and budget.per_output["y"]["cosine"] == 0.9, "the budget itself is unchanged"


def test_parse_fidelity_global_and_per_output():
    overall, per_output = validate.parse_fidelity("cosine=0.995, top1=0.98,logits:rel=0.05")
    assert overall == {"cosine": 0.995, "top1": 0.98}
    assert per_output == {"logits": {"rel": 0.05}}
    with pytest.raises(UserError, match="KEY one of cosine, top1, rel"):
        validate.parse_fidelity("cosin=0.9")
    with pytest.raises(UserError, match="not a number"):
        validate.parse_fidelity("cosine=high")


def test_top1_only_for_outputs_that_look_like_class_scores():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(4, 10)).astype(np.float32)
    probs = np.exp(rng.normal(size=(1, 5, 7))).astype(np.float32)
    probs /= probs.sum(-1, keepdims=True)
    detections = rng.uniform(0, 300, size=(1, 22, 50)).astype(np.float32)  # [1, 4 + classes, anchors]
    hidden = rng.normal(size=(1, 8, 16)).astype(np.float32)  # a transformer's hidden state
    diffs = validate.compare([{"l": logits, "p": probs, "d": detections, "h": hidden}], [{"l": logits, "p": probs, "d": detections, "h": hidden}])
    assert diffs["l"].top1 == 1.0 and diffs["p"].top1 == 1.0
    assert diffs["d"].top1 is None and diffs["h"].top1 is None
