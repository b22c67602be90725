"""passes/qdq.py: int4 packing, blockwise and per-channel weight quantization, activation parameters, keep_float."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from graphopt.errors import UserError
from graphopt.passes.qdq import KeepFloat, activation_params, int_tensor, pack_int4, quantize_blockwise, quantize_per_channel, unpack_int4

RNG = np.random.default_rng(0)


@pytest.mark.parametrize("count", [1, 2, 7, 8, 33])
@pytest.mark.parametrize("signed", [True, False])
def test_int4_pack_round_trip(count, signed):
    values = RNG.integers(-8, 8, count).astype(np.int8) if signed else RNG.integers(0, 16, count).astype(np.uint8)
    packed = pack_int4(values)
    assert packed.dtype == np.uint8 and packed.size == (count + 1) // 2
    np.testing.assert_array_equal(unpack_int4(packed, count, signed=signed), values)


def test_int4_pack_puts_the_first_value_in_the_low_nibble():
    np.testing.assert_array_equal(pack_int4(np.array([1, 2, -1], np.int8)), np.array([0x21, 0x0F], np.uint8))


@pytest.mark.parametrize("signed", [True, False])
def test_int4_tensor_reads_back_through_onnx(signed):
    values = (RNG.integers(-8, 8, (3, 5)) if signed else RNG.integers(0, 16, (3, 5))).astype(np.int8 if signed else np.uint8)
    tensor = int_tensor("w", values, bits=4)
    assert tensor.data_type == (onnx.TensorProto.INT4 if signed else onnx.TensorProto.UINT4)
    np.testing.assert_array_equal(numpy_helper.to_array(tensor).astype(np.int16), values.astype(np.int16))


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("axis", [0, 1])
def test_blockwise_asymmetric_error_is_at_most_half_a_step(bits, axis):
    w = RNG.standard_normal((70, 48)).astype(np.float32)  # 70 rows: a partial last block along axis 0
    q = quantize_blockwise(w, axis, 32, bits, symmetric=False)
    assert q.values.dtype == np.uint8 and q.values.min() >= 0 and q.values.max() <= 2**bits - 1
    step = np.repeat(q.scale, 32, axis=axis).take(range(w.shape[axis]), axis=axis)
    assert np.all(np.abs(q.dequantized() - w) <= step / 2 + 1e-6)


@pytest.mark.parametrize("bits", [4, 8])
def test_blockwise_symmetric_values_and_error(bits):
    w = RNG.standard_normal((64, 16)).astype(np.float32)
    q = quantize_blockwise(w, 0, 32, bits)
    assert q.zero_point is None and q.values.dtype == np.int8
    assert q.values.min() >= -(2 ** (bits - 1)) and q.values.max() <= 2 ** (bits - 1) - 1
    assert q.scale.shape == (2, 16)
    step = np.repeat(q.scale, 32, axis=0)
    # a block's negative extreme is exact; its positive extreme may clip by one step (the scale is max|w| / 2^(bits-1))
    assert np.all(np.abs(q.dequantized() - w) <= step + 1e-6)
    inside = np.abs(w) <= step * (2 ** (bits - 1) - 1)
    assert np.all(np.abs(q.dequantized() - w)[inside] <= step[inside] / 2 + 1e-6)


@pytest.mark.parametrize("axis", [0, 1, None])
def test_per_channel_error_is_at_most_half_a_step(axis):
    w = RNG.standard_normal((12, 9)).astype(np.float32) * np.arange(1, 10, dtype=np.float32)
    q = quantize_per_channel(w, axis, bits=8)
    assert q.values.dtype == np.int8 and np.abs(q.values).max() == 127
    scale = q.scale if axis is None else q.scale.reshape([-1 if i == axis else 1 for i in range(2)])
    assert np.all(np.abs(q.dequantized() - w) <= scale / 2 + 1e-6)


def test_per_channel_zero_channel_gets_scale_one():
    w = np.zeros((4, 3), np.float32)
    w[:, 1] = 2.0
    q = quantize_per_channel(w, 1)
    np.testing.assert_allclose(q.scale, [1.0, 2.0 / 127, 1.0])
    np.testing.assert_array_equal(q.dequantized(), w)


@pytest.mark.parametrize("dtype", [np.uint8, np.int8])
@pytest.mark.parametrize("lo, hi", [(-1.0, 3.0), (0.5, 2.0), (-4.0, -1.0), (0.0, 0.0)])
def test_activation_params_make_zero_exact_and_cover_the_range(dtype, lo, hi):
    scale, zero = activation_params(lo, hi, dtype)
    info = np.iinfo(dtype)
    assert scale > 0 and info.min <= int(zero) <= info.max
    assert type(zero) is dtype
    # the range widened to contain 0 lands inside the integer range, each end within half a step
    for end in (min(lo, 0.0), max(hi, 0.0)):
        q = round(end / float(scale)) + int(zero)
        assert info.min <= q <= info.max
        assert abs((q - int(zero)) * float(scale) - end) <= float(scale) / 2 + 1e-6


def test_keep_float_searches_the_name_or_else_the_first_output():
    keep = KeepFloat(r"^/model\.0/")
    assert keep(helper.make_node("Conv", ["x", "w"], ["c"], name="/model.0/conv/Conv"))
    assert not keep(helper.make_node("Conv", ["x", "w"], ["c"], name="/model.10/conv/Conv"))
    assert keep(helper.make_node("Conv", ["x", "w"], ["/model.0/out"]))  # unnamed: its output
    assert not KeepFloat("")(helper.make_node("Conv", ["x", "w"], ["c"], name="anything"))


def test_keep_float_refuses_a_bad_expression_naming_it():
    with pytest.raises(UserError, match=r"keep_float '\(conv' is not a regular expression"):
        KeepFloat("(conv")


def test_keep_float_notes_only_an_expression_that_kept_nothing():
    assert KeepFloat("x").unmatched_note(0) == ["keep_float 'x' matched no node this pass quantizes"]
    assert KeepFloat("x").unmatched_note(2) == [] and KeepFloat("").unmatched_note(0) == []
