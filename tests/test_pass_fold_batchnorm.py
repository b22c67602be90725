"""fold-batchnorm: BatchNormalization and per-channel Mul/Add folded into Conv/ConvTranspose/Gemm/MatMul."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto as TP
from onnx import helper, numpy_helper

from graphopt.graph import constant_value, copy_model
from graphopt.passes.fold_batchnorm import FoldBatchNorm
from graphopt.passes_base import make_pass
from tests.helpers import assert_same_outputs, make_model, op_types, run_pass, seeded_feeds

RNG = np.random.default_rng(0)


def tensor(name, shape, dtype=np.float32, positive=False):
    values = RNG.standard_normal(shape)
    return numpy_helper.from_array((np.abs(values) + 0.5 if positive else values).astype(dtype), name)


def vi(name, shape, elem=TP.FLOAT):
    return helper.make_tensor_value_info(name, elem, shape)


def bn_params(prefix, channels, dtype=np.float32):
    """scale, bias, mean, var initializers (var > 0)."""
    return [
        tensor(f"{prefix}_scale", [channels], dtype),
        tensor(f"{prefix}_bias", [channels], dtype),
        tensor(f"{prefix}_mean", [channels], dtype),
        tensor(f"{prefix}_var", [channels], dtype, positive=True),
    ]


def bn(data, out, prefix="bn", **attrs):
    names = [f"{prefix}_{p}" for p in ("scale", "bias", "mean", "var")]
    return helper.make_node("BatchNormalization", [data, *names], [out], name=prefix, epsilon=1e-3, **attrs)


def fold(model, feeds=None):
    """Run the pass on a copy; returns (before, after, result)."""
    after = copy_model(model)
    return model, after, run_pass(FoldBatchNorm(), after, feeds)


def counts(batchnorms=0, muls=0, adds=0):
    return {"batchnorms_folded": batchnorms, "muls_folded": muls, "adds_folded": adds}


def test_registered_under_its_name():
    assert isinstance(make_pass("fold-batchnorm"), FoldBatchNorm)


@pytest.mark.parametrize("with_bias", [True, False])
def test_conv_batchnorm(with_bias):
    """x -> Conv -> BN -> Relu -> y"""
    conv_inputs = ["x", "w", "b"] if with_bias else ["x", "w"]
    nodes = [helper.make_node("Conv", conv_inputs, ["c"], name="conv", pads=[1, 1, 1, 1]), bn("c", "n"), helper.make_node("Relu", ["n"], ["y"])]
    inits = [tensor("w", [4, 3, 3, 3])] + ([tensor("b", [4])] if with_bias else []) + bn_params("bn", 4)
    before, after, result = fold(make_model(nodes, [vi("x", [1, 3, 5, 5])], [vi("y", [1, 4, 5, 5])], inits))
    assert op_types(after) == ["Conv", "Relu"]
    assert result.counts == counts(batchnorms=1) and result.refused == []
    assert len(after.graph.node[0].input) == 3
    assert {t.name for t in after.graph.initializer} == {"w", "b" if with_bias else "conv_bias"}
    assert_same_outputs(before, after, seeded_feeds(before), rtol=1e-4, atol=1e-5)


def test_batchnorm_graph_output_keeps_its_name():
    """x -> Conv -> BN -> y (graph output)"""
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"]), bn("c", "y")]
    model = make_model(nodes, [vi("x", [2, 2, 4, 4])], [vi("y", [2, 3, 4, 4])], [tensor("w", [3, 2, 1, 1])] + bn_params("bn", 3))
    before, after, result = fold(model)
    assert op_types(after) == ["Conv"] and after.graph.node[0].output[0] == "y"
    assert_same_outputs(before, after, seeded_feeds(before), rtol=1e-4, atol=1e-5)


def test_grouped_conv_transpose_batchnorm():
    """x[1,4,3,3] -> ConvTranspose(group=2, 6 output channels) -> BN -> y"""
    nodes = [helper.make_node("ConvTranspose", ["x", "w", "b"], ["c"], group=2, strides=[2, 2]), bn("c", "y")]
    inits = [tensor("w", [4, 3, 2, 2]), tensor("b", [6])] + bn_params("bn", 6)
    before, after, result = fold(make_model(nodes, [vi("x", [1, 4, 3, 3])], [vi("y", [1, 6, 6, 6])], inits))
    assert op_types(after) == ["ConvTranspose"] and result.counts == counts(batchnorms=1)
    assert_same_outputs(before, after, seeded_feeds(before), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("bias_shape", [None, [5], [1, 5], [3, 1]])
def test_gemm_batchnorm(trans_b, bias_shape):
    """x[3,4] -> Gemm(alpha, beta, transB) -> BN -> y[3,5]"""
    inputs = ["x", "w"] + (["c"] if bias_shape else [])
    nodes = [helper.make_node("Gemm", inputs, ["g"], transB=trans_b, alpha=0.5, beta=2.0), bn("g", "y")]
    inits = [tensor("w", [5, 4] if trans_b else [4, 5])] + ([tensor("c", bias_shape)] if bias_shape else []) + bn_params("bn", 5)
    before, after, result = fold(make_model(nodes, [vi("x", [3, 4])], [vi("y", [3, 5])], inits))
    assert op_types(after) == ["Gemm"] and result.counts == counts(batchnorms=1)
    attrs = {a.name: helper.get_attribute_value(a) for a in after.graph.node[0].attribute}
    assert attrs["beta"] == 1.0 and attrs["alpha"] == 0.5 and attrs["transB"] == trans_b
    assert_same_outputs(before, after, seeded_feeds(before), rtol=1e-4, atol=1e-5)


def test_matmul_batchnorm_becomes_matmul_add():
    """x[3,4] -> MatMul(W[4,5]) -> BN -> y"""
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"], name="mm"), bn("m", "y")]
    model = make_model(nodes, [vi("x", [3, 4])], [vi("y", [3, 5])], [tensor("w", [4, 5])] + bn_params("bn", 5))
    before, after, result = fold(model)
    assert op_types(after) == ["MatMul", "Add"] and result.counts == counts(batchnorms=1)
    assert after.graph.node[1].input[:] == ["m", "mm_bias"] and after.graph.node[1].output[0] == "y"
    assert {t.name for t in after.graph.initializer} == {"w", "mm_bias"}
    assert_same_outputs(before, after, seeded_feeds(before), rtol=1e-4, atol=1e-5)


def test_matmul_rank3_batchnorm_is_refused():
    """x[2,3,4] -> MatMul(W[4,5]) -> BN (channel axis 1 = the 3 rows, not the 5 features) -> y"""
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"], name="mm"), bn("m", "y")]
    model = make_model(nodes, [vi("x", [2, 3, 4])], [vi("y", [2, 3, 5])], [tensor("w", [4, 5])] + bn_params("bn", 3))
    _, after, result = fold(model)
    assert not result.changed and op_types(after) == ["MatMul", "BatchNormalization"]
    assert result.refused == [
        "MatMul 'mm' -> BatchNormalization 'bn': MatMul output has rank 3: BatchNormalization's channel axis 1 "
        "is not the MatMul's feature axis (the last) unless the rank is 2"
    ]


def test_conv_mul_add_chain_folds_into_weight_and_new_bias():
    """x -> Conv -> Mul([C,1,1]) -> Add([1,C,1,1]) -> Mul(scalar) -> y"""
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
        helper.make_node("Mul", ["s", "c"], ["m"]),
        helper.make_node("Add", ["m", "t"], ["a"]),
        helper.make_node("Mul", ["a", "k"], ["y"]),
    ]
    inits = [tensor("w", [4, 3, 3, 3]), tensor("s", [4, 1, 1]), tensor("t", [1, 4, 1, 1]), tensor("k", [])]
    before, after, result = fold(make_model(nodes, [vi("x", [2, 3, 5, 5])], [vi("y", [2, 4, 3, 3])], inits))
    assert op_types(after) == ["Conv"] and after.graph.node[0].output[0] == "y"
    assert result.counts == counts(muls=2, adds=1)
    assert {t.name for t in after.graph.initializer} == {"w", "conv_bias"}
    assert_same_outputs(before, after, seeded_feeds(before), rtol=1e-4, atol=1e-5)


def test_gemm_mul_add_chain():
    """x -> Gemm(C) -> Mul([N]) -> Add([1,N]) -> y"""
    nodes = [
        helper.make_node("Gemm", ["x", "w", "c"], ["g"], transB=1),
        helper.make_node("Mul", ["g", "s"], ["m"]),
        helper.make_node("Add", ["m", "t"], ["y"]),
    ]
    inits = [tensor("w", [5, 4]), tensor("c", [5]), tensor("s", [5]), tensor("t", [1, 5])]
    before, after, result = fold(make_model(nodes, [vi("x", [3, 4])], [vi("y", [3, 5])], inits))
    assert op_types(after) == ["Gemm"] and result.counts == counts(muls=1, adds=1)
    assert_same_outputs(before, after, seeded_feeds(before), rtol=1e-4, atol=1e-5)


def test_matmul_bias_add_absorbs_following_mul_and_add():
    """x[2,3,4] -> MatMul(W) -> Add(b[N]) -> Mul(s[1,1,N]) -> Add(t[N]) -> y"""
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["m"]),
        helper.make_node("Add", ["m", "b"], ["mb"]),
        helper.make_node("Mul", ["mb", "s"], ["ms"]),
        helper.make_node("Add", ["t", "ms"], ["y"]),
    ]
    inits = [tensor("w", [4, 5]), tensor("b", [5]), tensor("s", [1, 1, 5]), tensor("t", [5])]
    before, after, result = fold(make_model(nodes, [vi("x", [2, 3, 4])], [vi("y", [2, 3, 5])], inits))
    assert op_types(after) == ["MatMul", "Add"] and after.graph.node[1].output[0] == "y"
    assert result.counts == counts(muls=1, adds=1)
    assert {t.name for t in after.graph.initializer} == {"w", "b"}
    assert_same_outputs(before, after, seeded_feeds(before), rtol=1e-4, atol=1e-5)


def test_matmul_without_bias_keeps_its_add_as_the_bias():
    """x -> MatMul(W) -> Mul(scalar) -> Add(t[N]) -> y"""
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["m"]),
        helper.make_node("Mul", ["m", "k"], ["mk"]),
        helper.make_node("Add", ["mk", "t"], ["y"]),
    ]
    inits = [tensor("w", [4, 5]), tensor("k", []), tensor("t", [5])]
    before, after, result = fold(make_model(nodes, [vi("x", ["N", 4])], [vi("y", ["N", 5])], inits))
    assert op_types(after) == ["MatMul", "Add"] and result.counts == counts(muls=1)
    assert_same_outputs(before, after, seeded_feeds(before), rtol=1e-4, atol=1e-5)


def test_matmul_of_two_computed_tensors_is_not_a_match():
    """q, k -> MatMul -> Mul(scalar) -> y   (attention scores: no weight to fold into)"""
    nodes = [helper.make_node("MatMul", ["q", "k"], ["m"]), helper.make_node("Mul", ["m", "s"], ["y"])]
    model = make_model(nodes, [vi("q", [2, 3]), vi("k", [3, 2])], [vi("y", [2, 2])], [tensor("s", [])])
    _, after, result = fold(model)
    assert not result.changed and result.refused == [] and op_types(after) == ["MatMul", "Mul"]


def test_fp16_conv_batchnorm_folds_in_float64_and_casts_back():
    """x(fp16) -> Conv -> BN -> y"""
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"]), bn("c", "y")]
    inits = [tensor("w", [4, 3, 1, 1], np.float16)] + bn_params("bn", 4, np.float16)
    model = make_model(nodes, [vi("x", [1, 3, 2, 2], TP.FLOAT16)], [vi("y", [1, 4, 2, 2], TP.FLOAT16)], inits)
    before, after, result = fold(model)
    assert op_types(after) == ["Conv"]
    assert {t.data_type for t in after.graph.initializer} == {TP.FLOAT16}
    assert_same_outputs(before, after, seeded_feeds(before), rtol=1e-2, atol=1e-2)


def conv_then(follower_nodes, follower_inits, out_shape=(1, 4, 3, 3), extra_outputs=(), extra_inputs=(), weight=True):
    """x -> Conv('conv') -> <follower> -> y"""
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"), *follower_nodes]
    inits = ([tensor("w", [4, 3, 3, 3])] if weight else []) + follower_inits
    outputs = [vi("y", list(out_shape)), *extra_outputs]
    return make_model(nodes, [vi("x", [1, 3, 5, 5]), *extra_inputs], outputs, inits)


def assert_refused(model, reason):
    _, after, result = fold(model)
    assert not result.changed and after == model
    assert result.refused == [reason]


def test_refused_when_conv_output_has_other_readers():
    """x -> Conv -> BN -> y;  Conv -> Relu -> z"""
    model = conv_then([bn("c", "y"), helper.make_node("Relu", ["c"], ["z"])], bn_params("bn", 4), extra_outputs=[vi("z", [1, 4, 3, 3])])
    assert_refused(model, "Conv 'conv' -> BatchNormalization 'bn': 'c' has 2 readers, so its unfolded value is still needed")


def test_refused_when_conv_output_is_a_graph_output():
    """x -> Conv -> c (graph output) -> BN -> y"""
    model = conv_then([bn("c", "y")], bn_params("bn", 4), extra_outputs=[vi("c", [1, 4, 3, 3])])
    assert_refused(model, "Conv 'conv' -> BatchNormalization 'bn': 'c' is also a graph output, so its unfolded value is still needed")


def test_refused_when_weight_is_shared():
    """x -> Conv(w) -> BN -> y;  x -> Conv(w) -> z"""
    model = conv_then(
        [bn("c", "y"), helper.make_node("Conv", ["x", "w"], ["z"], name="twin")], bn_params("bn", 4), extra_outputs=[vi("z", [1, 4, 3, 3])]
    )
    _, after, result = fold(model)
    assert not result.changed and after == model
    assert "Conv 'conv' -> BatchNormalization 'bn': weight 'w' is shared with other nodes (refused rather than copied)" in result.refused


def test_refused_when_weight_is_not_constant():
    """x, w (graph input) -> Conv -> BN -> y"""
    model = conv_then([bn("c", "y")], bn_params("bn", 4), extra_inputs=[vi("w", [4, 3, 3, 3])], weight=False)
    assert_refused(
        model,
        "Conv 'conv' -> BatchNormalization 'bn': weight 'w' is not an initializer of this graph "
        "(lift-constants turns Constant nodes into initializers)",
    )


def test_refused_when_constant_is_not_per_channel():
    """x -> Conv -> Mul([1,1,3,3]) -> y"""
    model = conv_then([helper.make_node("Mul", ["c", "s"], ["y"], name="mul")], [tensor("s", [1, 1, 3, 3])])
    assert_refused(
        model,
        "Conv 'conv' -> Mul 'mul': constant 's' of shape [1, 1, 3, 3] is not per-channel (4 channels on axis 1 of the rank-4 output)",
    )


def test_refused_when_constant_would_add_axes():
    """x -> Conv -> Add([2,1,4,1,1]) -> y[2,1,4,3,3]"""
    model = conv_then([helper.make_node("Add", ["c", "t"], ["y"], name="add")], [tensor("t", [2, 1, 4, 1, 1])], out_shape=(2, 1, 4, 3, 3))
    assert_refused(model, "Conv 'conv' -> Add 'add': constant 't' of shape [2, 1, 4, 1, 1] would broadcast the rank-4 output")


def test_refused_when_batchnorm_is_in_training_mode():
    """x -> Conv -> BN(training_mode=1, 3 outputs) -> y"""
    names = [f"bn_{p}" for p in ("scale", "bias", "mean", "var")]
    train = helper.make_node("BatchNormalization", ["c", *names], ["y", "rm", "rv"], name="bn", training_mode=1)
    model = conv_then([train], bn_params("bn", 4), extra_outputs=[vi("rm", [4]), vi("rv", [4])])
    assert_refused(model, "Conv 'conv' -> BatchNormalization 'bn': BatchNormalization is in training mode (extra outputs, training_mode=1 or spatial=0)")


def test_refused_when_weights_are_not_float():
    """x(int32) -> MatMul(W int32) -> Mul(s int32) -> y"""
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"], name="mm"), helper.make_node("Mul", ["m", "s"], ["y"], name="mul")]
    inits = [numpy_helper.from_array(np.ones((4, 5), np.int32), "w"), numpy_helper.from_array(np.full(5, 2, np.int32), "s")]
    model = make_model(nodes, [vi("x", [3, 4], TP.INT32)], [vi("y", [3, 5], TP.INT32)], inits)
    assert_refused(model, "MatMul 'mm' -> Mul 'mul': 's' is INT32, not a float type")


def test_folds_inside_if_branches():
    """If(cond){ then: x -> Conv -> BN -> t | else: x -> Identity -> e } -> y"""
    then_branch = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"]), bn("c", "t")], "then", [], [vi("t", [1, 4, 3, 3])],
        [tensor("w", [4, 4, 1, 1])] + bn_params("bn", 4),
    )
    else_branch = helper.make_graph([helper.make_node("Identity", ["x"], ["e"])], "else", [], [vi("e", [1, 4, 3, 3])])
    nodes = [helper.make_node("If", ["cond"], ["y"], then_branch=then_branch, else_branch=else_branch)]
    model = make_model(nodes, [vi("cond", [], TP.BOOL), vi("x", [1, 4, 3, 3])], [vi("y", [1, 4, 3, 3])])
    before, after, result = fold(model)
    assert result.counts == counts(batchnorms=1)
    then_after = helper.get_attribute_value(next(a for a in after.graph.node[0].attribute if a.name == "then_branch"))
    assert [n.op_type for n in then_after.node] == ["Conv"] and then_after.node[0].output[0] == "t"
    x = RNG.standard_normal((1, 4, 3, 3)).astype(np.float32)
    assert_same_outputs(before, after, [{"cond": np.array(True), "x": x}, {"cond": np.array(False), "x": x}], rtol=1e-4, atol=1e-5)


def test_folded_weights_match_the_formula():
    """x -> Conv(w, b) -> BN -> y: w' = w * s, b' = (b - mean) * s + beta, s = scale / sqrt(var + eps)"""
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"]), bn("c", "y")]
    inits = [tensor("w", [2, 1, 1, 1]), tensor("b", [2])] + bn_params("bn", 2)
    before, after, _ = fold(make_model(nodes, [vi("x", [1, 1, 2, 2])], [vi("y", [1, 2, 2, 2])], inits))
    value = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in before.graph.initializer}
    s = value["bn_scale"] / np.sqrt(value["bn_var"] + 1e-3)
    np.testing.assert_allclose(constant_value(after.graph, "w"), value["w"] * s[:, None, None, None], rtol=1e-6)
    np.testing.assert_allclose(constant_value(after.graph, "b"), (value["b"] - value["bn_mean"]) * s + value["bn_bias"], rtol=1e-6)
