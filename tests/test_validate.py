"""Fidelity numbers computed by hand, and the lossless tolerance."""

import numpy as np

from graphopt import validate


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
    assert validate.rounding_floors(a, b) == {"y": 0.5}


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
