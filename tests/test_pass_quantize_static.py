"""quantize-static: static int8 QDQ placement, weight axes, bias scales, onnxruntime fusion, fallbacks."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto as TP
from onnx import helper, numpy_helper

from graphopt import calibrate, profiling, runtime
from graphopt.bench import Timing
from graphopt.errors import PassError, UserError
from graphopt.activations import ActivationCache
from graphopt.graph import copy_model, producers
from graphopt.passes import qdq, quantize_static
from graphopt.passes.quantize_static import DECISION_KEY, Builder, QuantizeStatic, Unit, calibrated_tensors, float_weighted_input, make_plan, slower_units
from graphopt.passes_base import PassContext, make_pass
from graphopt.profiling import NodeTime
from graphopt.runtime import RuntimeSettings
from graphopt.validate import Budget
from tests.helpers import make_model, op_types, ort_outputs, seeded_feeds

RNG = np.random.default_rng(0)
COSINE_ONLY = Budget(min_cosine=0.99, min_top1=None)


def tensor(name, shape, scale=0.3):
    return numpy_helper.from_array((RNG.standard_normal(shape) * scale).astype(np.float32), name)


def vi(name, shape):
    return helper.make_tensor_value_info(name, TP.FLOAT, shape)


def quantize(model, feeds=None, budget=COSINE_ONLY, **options):
    """Run the pass (uint8 activations, no latency fallback unless given) on a copy: (after, result)."""
    options = {"activations": "uint8", "latency_fallback": False, **options}
    feeds = seeded_feeds(model, 8) if feeds is None else feeds
    after = copy_model(model)
    ctx = PassContext(calibration=feeds, validation=feeds, activations=ActivationCache(feeds), budget=budget)
    return after, QuantizeStatic(**options).run(after, ctx)


def fused(model):
    """op types onnxruntime runs at level all, and the chains it left unfused."""
    optimized = profiling.optimized_graph(model, RuntimeSettings(level="all"))
    return [n.op_type for n in optimized.graph.node], profiling.unfused_chains(optimized)


def cosine(before, after, feeds):
    worst = 1.0
    for ref, got in zip(ort_outputs(before, feeds), ort_outputs(after, feeds)):
        for name in ref:
            a, b = ref[name].ravel().astype(np.float64), got[name].ravel().astype(np.float64)
            norms = np.linalg.norm(a) * np.linalg.norm(b)
            worst = min(worst, float(a @ b / norms) if norms > 0 else 0.0)
    return worst


def node(model, op_type, k=0):
    return [n for n in model.graph.node if n.op_type == op_type][k]


def init(model, name):
    return next(numpy_helper.to_array(t) for t in model.graph.initializer if t.name == name)


def producer(model, name):
    return next(n for n in model.graph.node if name in n.output)


def axis_of(dq):
    return next((a.i for a in dq.attribute if a.name == "axis"), None)


def check_close(before, after, seed=1):
    """Quantized outputs stay close to float on feeds the calibration never saw."""
    onnx.checker.check_model(after, full_check=True)
    assert cosine(before, after, seeded_feeds(before, 4, seed=seed)) > 0.99


def test_registered_under_its_name():
    assert isinstance(make_pass("quantize-static"), QuantizeStatic)
    assert QuantizeStatic.claims == "speed" and not QuantizeStatic.lossless


def conv_relu_model():
    """x -> Conv(W, b) -> Relu -> y"""
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["y"], name="relu")]
    return make_model(nodes, [vi("x", [1, 4, 8, 8])], [vi("y", [1, 8, 8, 8])], [tensor("w", [8, 4, 3, 3]), tensor("b", [8])])


def test_conv_relu_q_after_relu_bias_int32_and_fused():
    """x -> Conv -> Relu -> y: Q/DQ on x, int8 weight per output channel, int32 bias, the Q after the Relu."""
    before = conv_relu_model()
    after, result = quantize(before)
    assert result.changed and result.details["quantized"] == {"Conv": 1}
    assert op_types(after) == ["QuantizeLinear", "DequantizeLinear", "DequantizeLinear", "DequantizeLinear", "Conv", "Relu", "QuantizeLinear", "DequantizeLinear"]
    conv = node(after, "Conv")
    w_dq, b_dq, x_dq = producer(after, conv.input[1]), producer(after, conv.input[2]), producer(after, conv.input[0])
    assert axis_of(w_dq) == 0 and init(after, w_dq.input[0]).dtype == np.int8 and init(after, w_dq.input[1]).shape == (8,)
    bias = init(after, b_dq.input[0])
    assert bias.dtype == np.int32 and axis_of(b_dq) == 0 and not init(after, b_dq.input[2]).any()
    np.testing.assert_allclose(init(after, b_dq.input[1]), init(after, x_dq.input[1]) * init(after, w_dq.input[1]), rtol=1e-6)
    q_out = node(after, "QuantizeLinear", 1)
    assert q_out.input[0] == node(after, "Relu").output[0] and after.graph.node[-1].output[0] == "y"
    assert init(after, q_out.input[2]) == 0  # the range starts at 0: onnxruntime folds the Relu into the Q
    ops, chains = fused(after)
    assert "QLinearConv" in ops and "Relu" not in ops and chains == []
    check_close(before, after)


def test_clip_relu6_is_folded():
    """x -> Conv -> Clip(0, 6) -> y: the Q goes after the Clip, which onnxruntime folds."""
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"), helper.make_node("Clip", ["c", "lo", "hi"], ["y"], name="clip")]
    inits = [tensor("w", [8, 4, 1, 1], 2.0), numpy_helper.from_array(np.float32(0), "lo"), numpy_helper.from_array(np.float32(6), "hi")]
    before = make_model(nodes, [vi("x", [1, 4, 6, 6])], [vi("y", [1, 8, 6, 6])], inits)
    after, result = quantize(before)
    assert node(after, "QuantizeLinear", 1).input[0] == node(after, "Clip").output[0]
    ops, chains = fused(after)
    assert "QLinearConv" in ops and "Clip" not in ops and chains == []
    check_close(before, after)


def test_depthwise_conv():
    """x -> Conv(group = channels) -> y"""
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["y"], name="dw", group=8, pads=[1, 1, 1, 1])]
    before = make_model(nodes, [vi("x", [1, 8, 8, 8])], [vi("y", [1, 8, 8, 8])], [tensor("w", [8, 1, 3, 3]), tensor("b", [8])])
    after, result = quantize(before)
    assert result.details["quantized"] == {"Conv": 1} and axis_of(producer(after, node(after, "Conv").input[1])) == 0
    ops, chains = fused(after)
    assert "QLinearConv" in ops and chains == []
    check_close(before, after)


def test_conv_transpose_is_refused_as_not_fused():
    """x -> ConvTranspose -> y: onnxruntime has no QDQ ConvTranspose kernel on CPU, so nothing to quantize."""
    nodes = [helper.make_node("ConvTranspose", ["x", "w"], ["y"], name="deconv")]
    before = make_model(nodes, [vi("x", [1, 4, 4, 4])], [vi("y", [1, 6, 6, 6])], [tensor("w", [4, 6, 3, 3])])
    after, result = quantize(before)
    assert not result.changed and op_types(after) == ["ConvTranspose"]
    assert result.refused and "no node that onnxruntime fuses" in result.refused[0]
    assert result.details["kept_float"] == [{"node": "deconv", "op_type": "ConvTranspose", "reason": "unsupported", "detail": "onnxruntime 1.32 has no QDQ ConvTranspose kernel on CPU"}]


@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_weight_axis_follows_trans_b(trans_b):
    """x[4,64] -> Gemm(B, C, transB) -> y[4,32]"""
    nodes = [helper.make_node("Gemm", ["x", "w", "c"], ["y"], name="gemm", transB=trans_b)]
    before = make_model(nodes, [vi("x", [4, 64])], [vi("y", [4, 32])], [tensor("w", [32, 64] if trans_b else [64, 32]), tensor("c", [32])])
    after, result = quantize(before)
    gemm = node(after, "Gemm")
    assert axis_of(producer(after, gemm.input[1])) == (0 if trans_b else 1)
    b_dq = producer(after, gemm.input[2])
    assert init(after, b_dq.input[0]).dtype == np.int32 and init(after, b_dq.input[1]).shape == (32,)
    ops, chains = fused(after)
    assert "QGemm" in ops and chains == []
    check_close(before, after)


def test_gemm_with_alpha_stays_float():
    """x -> Gemm(alpha=0.5) -> y: onnxruntime does not fuse it, so it is not quantized."""
    nodes = [helper.make_node("Gemm", ["x", "w"], ["y"], name="gemm", alpha=0.5)]
    before = make_model(nodes, [vi("x", [2, 16])], [vi("y", [2, 8])], [tensor("w", [16, 8])])
    after, result = quantize(before)
    assert not result.changed and result.details["kept_float"][0]["detail"] == "Gemm with alpha or beta != 1 or transA is not fused by onnxruntime"


def test_matmul_weight_per_column():
    """x[2,3,16] -> MatMul(W[16,8]) -> y"""
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")]
    before = make_model(nodes, [vi("x", [2, 3, 16])], [vi("y", [2, 3, 8])], [tensor("w", [16, 8])])
    after, result = quantize(before)
    assert op_types(after) == ["QuantizeLinear", "DequantizeLinear", "DequantizeLinear", "MatMul", "QuantizeLinear", "DequantizeLinear"]
    w_dq = producer(after, node(after, "MatMul").input[1])
    assert axis_of(w_dq) == 1 and init(after, w_dq.input[1]).shape == (8,)
    ops, chains = fused(after)
    assert ("QLinearMatMul" in ops or "MatMulIntegerToFloat" in ops) and chains == []
    check_close(before, after)


def residual_model():
    """x -> Conv -> Relu -> r -> Conv -> Add(r) -> y"""
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r"], name="relu"),
        helper.make_node("Conv", ["r", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c2", "r"], ["y"], name="add"),
    ]
    inits = [tensor("w1", [4, 4, 3, 3]), tensor("b1", [4]), tensor("w2", [4, 4, 3, 3]), tensor("b2", [4])]
    return make_model(nodes, [vi("x", [1, 4, 8, 8])], [vi("y", [1, 4, 8, 8])], inits)


def test_residual_add_shares_one_qdq_per_tensor():
    """The Relu output r feeds conv2 and the Add through one Q -> DQ pair; everything fuses."""
    before = residual_model()
    after, result = quantize(before)
    assert result.details["quantized"] == {"Conv": 2, "Add": 1}
    assert sum(n.op_type == "QuantizeLinear" and n.input[0] == "r" for n in after.graph.node) == 1
    r_dq = next(n.output[0] for n in after.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == "r_q")
    assert node(after, "Conv", 1).input[0] == r_dq and node(after, "Add").input[1] == r_dq
    ops, chains = fused(after)
    assert ops.count("QLinearConv") == 2 and "QLinearAdd" in ops and chains == []
    check_close(before, after)


def _build_without(model, left_float):
    """The model quantized by the pass's Builder (minmax ranges, uint8) with every unit but `left_float`."""
    plan = make_plan(model, quantize_static.ACTIVATION_INPUTS)
    feeds = seeded_feeds(model, 8)
    stats = calibrate.collect(plan.model, feeds, calibrated_tensors(plan, plan.units), bins=2048)
    builder = Builder(plan, {t: s.range("minmax") for t, s in stats.items()}, True, {})
    return builder.build([u for u in plan.units if u.name != left_float], np.uint8)


def test_a_float_conv_between_quantized_tensors_stays_float_in_onnxruntime():
    """conv2 left float between the quantized r and the quantized Add. From the shared per-tensor DQ of r,
    onnxruntime's WeightBiasQuantization would make it a QLinearConv with per-tensor weights on its own;
    it reads a per-axis DQ of the same integers with the same scale instead, and stays a float Conv."""
    before = residual_model()
    after = _build_without(before, "conv2")
    conv2 = next(n for n in after.graph.node if n.name == "conv2")
    per_axis, shared = producer(after, conv2.input[0]), producer(after, node(after, "Add").input[1])
    assert per_axis.op_type == shared.op_type == "DequantizeLinear" and per_axis is not shared
    assert per_axis.input[0] == shared.input[0] and axis_of(per_axis) == 1 and axis_of(shared) is None
    for k in (1, 2):
        np.testing.assert_array_equal(init(after, per_axis.input[k]), np.full(4, init(after, shared.input[k])))
    ops, chains = fused(after)
    assert ops.count("QLinearConv") == 1 and ops.count("Conv") == 1 and chains == []
    check_close(before, after)
    conv2.input[0] = shared.output[0]  # what the pass did before: onnxruntime quantizes conv2 itself
    assert fused(after)[0].count("QLinearConv") == 2


def test_keep_float_leaves_the_named_node_float_in_onnxruntime_too():
    """keep_float=conv2: conv2 is listed as requested and, between the quantized r and the quantized Add,
    onnxruntime still runs it as a float Conv (it reads its own per-axis DequantizeLinear)."""
    before = residual_model()
    after, result = quantize(before, keep_float="^conv2$")
    assert result.details["quantized"] == {"Conv": 1, "Add": 1}
    assert [(k["node"], k["reason"]) for k in result.details["kept_float"]] == [("conv2", "requested")]
    assert result.counts["kept_float_requested"] == 1 and "keep_float" in result.details["kept_float"][0]["detail"]
    ops, chains = fused(after)
    assert ops.count("QLinearConv") == 1 and ops.count("Conv") == 1 and chains == []
    check_close(before, after)


def test_keep_float_matching_no_node_says_so():
    after, result = quantize(residual_model(), keep_float="^nothing_by_that_name$")
    assert result.details["quantized"] == {"Conv": 2, "Add": 1}
    assert "keep_float '^nothing_by_that_name$' matched no node this pass quantizes" in result.notes


def test_bad_keep_float_is_a_user_error_at_once():
    with pytest.raises(UserError, match=r"keep_float '\[conv' is not a regular expression"):
        make_pass("quantize-static", {"keep_float": "[conv"})


def _reader(op_type, w_shape, inputs=("x", "w"), **attrs):
    nodes = [helper.make_node(op_type, list(inputs), ["y"], name="n", **attrs)]
    dims = ["d0", "d1"] if op_type in ("Gemm", "MatMul") else ["d0", "d1", "d2", "d3"]
    return make_model(nodes, [vi("x", dims)], [vi("y", ["e" + d for d in dims])], [tensor("w", w_shape)]), nodes[0]


@pytest.mark.parametrize(
    "op_type, w_shape, attrs, expected",
    [
        ("Conv", [8, 2, 3, 3], {"group": 2}, (1, 4)),
        ("ConvTranspose", [4, 6, 3, 3], {}, (1, 4)),
        ("Gemm", [64, 32], {}, (1, 64)),
        ("Gemm", [32, 64], {"transB": 1}, (1, 64)),
        ("Gemm", [64, 32], {"transA": 1}, (0, 64)),
    ],
)
def test_float_weighted_input_is_the_channel_axis_of_input_0(op_type, w_shape, attrs, expected):
    model, reader = _reader(op_type, w_shape, **attrs)
    assert float_weighted_input(reader, "x", model.graph, producers(model.graph)) == expected


@pytest.mark.parametrize(
    "why, op_type, inputs, fed_weight",
    [
        ("onnxruntime does not quantize a float MatMul on its own", "MatMul", ("x", "w"), False),
        ("the tensor is not input 0", "Conv", ("w", "x"), False),
        ("a weight fed at run time is not an initializer", "Conv", ("x", "w"), True),
    ],
)
def test_float_weighted_input_refuses(why, op_type, inputs, fed_weight):
    model, reader = _reader(op_type, [4, 4] if op_type == "MatMul" else [4, 4, 1, 1], inputs)
    if fed_weight:
        model.graph.initializer.pop()
        model.graph.input.append(vi("w", [4, 4, 1, 1]))
    assert float_weighted_input(reader, "x", model.graph, producers(model.graph)) is None, why


def test_concat():
    """x -> Conv a, Conv b -> Concat -> y"""
    nodes = [
        helper.make_node("Conv", ["x", "wa"], ["a"], name="conv_a"),
        helper.make_node("Conv", ["x", "wb"], ["b"], name="conv_b"),
        helper.make_node("Concat", ["a", "b"], ["y"], name="concat", axis=1),
    ]
    before = make_model(nodes, [vi("x", [1, 4, 6, 6])], [vi("y", [1, 10, 6, 6])], [tensor("wa", [4, 4, 1, 1]), tensor("wb", [6, 4, 1, 1])])
    after, result = quantize(before)
    assert result.details["quantized"] == {"Conv": 2, "Concat": 1}
    ops, chains = fused(after)
    assert ops.count("QLinearConv") == 2 and "QLinearConcat" in ops and chains == []
    check_close(before, after)


def test_lopsided_concat_stays_float():
    """x -> Conv a (outputs ~100x larger), Conv b -> Concat -> y: one output scale would leave b's values a
    few levels, so the Concat keeps float (reason "sensitive") while both Convs are quantized."""
    nodes = [
        helper.make_node("Conv", ["x", "wa"], ["a"], name="conv_a"),
        helper.make_node("Conv", ["x", "wb"], ["b"], name="conv_b"),
        helper.make_node("Concat", ["a", "b"], ["y"], name="concat", axis=1),
    ]
    inits = [tensor("wa", [4, 4, 1, 1], 30.0), tensor("wb", [6, 4, 1, 1], 0.3)]
    before = make_model(nodes, [vi("x", [1, 4, 6, 6])], [vi("y", [1, 10, 6, 6])], inits)
    after, result = quantize(before)
    assert result.details["quantized"] == {"Conv": 2} and node(after, "Concat").output[0] == "y"
    [entry] = result.details["kept_float"]
    assert entry["node"] == "concat" and entry["reason"] == "sensitive" and "input 'b' spans" in entry["detail"]
    ops, chains = fused(after)
    assert ops.count("QLinearConv") == 2 and chains == []


def test_shared_weight_has_one_dequantize():
    """x -> Conv(w) -> Relu -> Conv(w) -> y: w is quantized once, one DequantizeLinear feeds both Convs."""
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r"], name="relu"),
        helper.make_node("Conv", ["r", "w"], ["y"], name="conv2", pads=[1, 1, 1, 1]),
    ]
    before = make_model(nodes, [vi("x", [1, 4, 6, 6])], [vi("y", [1, 4, 6, 6])], [tensor("w", [4, 4, 3, 3])])
    after, result = quantize(before)
    first, second = node(after, "Conv", 0), node(after, "Conv", 1)
    assert first.input[1] == second.input[1]
    assert sum(n.op_type == "DequantizeLinear" and n.output[0] == first.input[1] for n in after.graph.node) == 1
    assert "w" not in {t.name for t in after.graph.initializer}  # the float weight is gone
    ops, chains = fused(after)
    assert ops.count("QLinearConv") == 2 and chains == []
    check_close(before, after)


def test_constant_node_weight():
    """x -> Conv(W from a Constant node) -> y: quantized; the Constant node goes."""
    w = tensor("w", [8, 4, 3, 3])
    nodes = [helper.make_node("Constant", [], ["w"], name="const", value=w), helper.make_node("Conv", ["x", "w"], ["y"], name="conv")]
    before = make_model(nodes, [vi("x", [1, 4, 6, 6])], [vi("y", [1, 8, 4, 4])])
    after, result = quantize(before)
    assert result.details["quantized"] == {"Conv": 1} and "Constant" not in op_types(after)
    assert axis_of(producer(after, node(after, "Conv").input[1])) == 0
    ops, chains = fused(after)
    assert "QLinearConv" in ops and chains == []
    check_close(before, after)


def test_opset_12_is_upgraded_and_said():
    """x -> Conv -> Relu -> y at opset 12: per-axis DequantizeLinear needs 13."""
    model = conv_relu_model()
    model.opset_import[0].version = 12
    after, result = quantize(model)
    assert result.changed and after.opset_import[0].version == 13
    assert any("upgraded the opset from 12 to 13" in note for note in result.notes)
    check_close(model, after)


def test_data_movement_shares_its_input_scale():
    """x -> Conv -> Relu -> MaxPool -> Reshape -> MatMul(W) -> y: MaxPool and Reshape pass integers through."""
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("MaxPool", ["r"], ["p"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Reshape", ["p", "shape"], ["f"], name="flat"),
        helper.make_node("MatMul", ["f", "m"], ["y"], name="mm"),
    ]
    inits = [tensor("w", [4, 4, 1, 1]), numpy_helper.from_array(np.array([1, 16], np.int64), "shape"), tensor("m", [16, 5])]
    before = make_model(nodes, [vi("x", [1, 4, 4, 4])], [vi("y", [1, 5])], inits)
    after, result = quantize(before)
    scales = {n.input[0]: n.input[1] for n in after.graph.node if n.op_type == "QuantizeLinear"}
    assert scales["p"] == scales["r"] and scales["f"] == scales["r"]
    ops, chains = fused(after)
    assert "QLinearConv" in ops and "QLinearMatMul" in ops and chains == []
    assert ops.count("QuantizeLinear") == 1 and ops.count("DequantizeLinear") == 1  # only at the model's edges
    check_close(before, after)


def test_split_gets_a_pair_on_every_output():
    """x -> Conv -> Split -> (s0 -> Conv -> y0, s1 -> y1): s1 is quantized too, so onnxruntime moves
    integers through the Split."""
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c"], name="conv1"),
        helper.make_node("Split", ["c"], ["s0", "s1"], name="split", axis=1, num_outputs=2),
        helper.make_node("Conv", ["s0", "w2"], ["y0"], name="conv2"),
    ]
    inits = [tensor("w1", [8, 4, 1, 1]), tensor("w2", [4, 4, 1, 1])]
    before = make_model(nodes, [vi("x", [1, 4, 5, 5])], [vi("y0", [1, 4, 5, 5]), vi("s1", [1, 4, 5, 5])], inits, opset=18)
    after, result = quantize(before)
    scales = {n.name: n.input[1] for n in after.graph.node if n.op_type == "QuantizeLinear"}
    assert scales["s0_QuantizeLinear"] == scales["c_QuantizeLinear"] == scales["s1_QuantizeLinear"]
    assert producer(after, "s1").op_type == "DequantizeLinear"  # the graph output keeps its name
    ops, chains = fused(after)
    assert ops.count("QLinearConv") == 2 and "Split" in ops and chains == []
    check_close(before, after)


def test_float_node_between_quantized_nodes_is_not_left_in_a_chain():
    """x -> Conv -> Tanh -> Conv -> y: onnxruntime runs Tanh in float, so quantizing the second Conv would
    leave DQ -> Tanh -> Q; that Conv goes back to float (reason "not fused") and no chain is left."""
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c"], name="conv1"),
        helper.make_node("Tanh", ["c"], ["t"], name="tanh"),
        helper.make_node("Conv", ["t", "w2"], ["y"], name="conv2"),
    ]
    before = make_model(nodes, [vi("x", [1, 4, 5, 5])], [vi("y", [1, 4, 5, 5])], [tensor("w1", [4, 4, 1, 1]), tensor("w2", [4, 4, 1, 1])])
    after, result = quantize(before)
    assert result.details["quantized"] == {"Conv": 1}
    [entry] = result.details["kept_float"]
    assert entry["node"] == "conv2" and entry["reason"] == "not fused" and "float Tanh 'tanh'" in entry["detail"]
    ops, chains = fused(after)
    assert "QLinearConv" in ops and chains == [] and result.details["unfused_chains"] == []
    check_close(before, after)


def outlier_model():
    """x[1,8,16] -> MatMul(Wm) -> ym ; z[1,4,6,6] -> Conv(Wc) -> yc (two outputs)"""
    nodes = [helper.make_node("MatMul", ["x", "wm"], ["ym"], name="mm"), helper.make_node("Conv", ["z", "wc"], ["yc"], name="conv")]
    wm = RNG.standard_normal((16, 8)).astype(np.float32)
    wm[0] = 1e-4  # the outlier channel barely matters to the output
    inits = [numpy_helper.from_array(wm, "wm"), tensor("wc", [4, 4, 1, 1])]
    return make_model(nodes, [vi("x", [1, 8, 16]), vi("z", [1, 4, 6, 6])], [vi("ym", [1, 8, 8]), vi("yc", [1, 4, 6, 6])], inits)


def outlier_feeds(model, n, seed):
    feeds = seeded_feeds(model, n, seed=seed)
    for f in feeds:
        f["x"][..., 0] *= 5000.0  # one huge input channel: a per-tensor uint8 scale wipes out the others
    return feeds


def test_sensitive_node_stays_float():
    """The MatMul whose input has a huge outlier channel goes back to float; the Conv stays quantized."""
    before = outlier_model()
    after, result = quantize(before, outlier_feeds(before, 8, 0))
    assert result.changed and result.details["quantized"] == {"Conv": 1}
    kept = result.details["kept_float"]
    assert [(k["node"], k["reason"]) for k in kept] == [("mm", "sensitive")] and result.counts["kept_float_sensitive"] == 1
    assert "cosine" in kept[0]["detail"]
    assert cosine(before, after, outlier_feeds(before, 4, 1)) > 0.99


def test_without_fallback_everything_is_quantized():
    """fallback=False: the same model keeps the MatMul quantized (and loses accuracy)."""
    before = outlier_model()
    after, result = quantize(before, outlier_feeds(before, 8, 0), fallback=False)
    assert result.details["quantized"] == {"Conv": 1, "MatMul": 1}
    assert cosine(before, after, outlier_feeds(before, 4, 1)) < 0.99


def test_elementwise_island_without_a_weighted_node_stays_float():
    """x -> Conv -> c -> Sigmoid -> Mul(c) -> y ; z -> Sigmoid -> Mul(z) -> u: the SiLU after the Conv shares
    its quantized tensor and stays quantized; the SiLU on z reaches no quantized Conv, so it only adds
    Q/DQ work and returns to float (reason "island")."""
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
        helper.make_node("Sigmoid", ["c"], ["s"], name="sig_c"),
        helper.make_node("Mul", ["c", "s"], ["y"], name="mul_c"),
        helper.make_node("Sigmoid", ["z"], ["t"], name="sig_z"),
        helper.make_node("Mul", ["z", "t"], ["u"], name="mul_z"),
    ]
    before = make_model(nodes, [vi("x", [1, 4, 6, 6]), vi("z", [1, 4, 6, 6])], [vi("y", [1, 4, 6, 6]), vi("u", [1, 4, 6, 6])], [tensor("w", [4, 4, 1, 1])])
    after, result = quantize(before)
    assert result.details["quantized"] == {"Conv": 1, "Sigmoid": 1, "Mul": 1}
    islands = [(k["node"], k["reason"]) for k in result.details["kept_float"]]
    assert islands == [("sig_z", "island"), ("mul_z", "island")] and result.counts["kept_float_island"] == 2
    assert producer(after, "u").op_type == "Mul" and producer(after, "t").input == ["z"]
    ops, chains = fused(after)
    assert "QLinearConv" in ops and "QLinearSigmoid" in ops and chains == []
    check_close(before, after)


def test_refused_when_no_node_stays_within_budget():
    """x -> MatMul (outlier input) -> y alone: no quantized node keeps the budget, so the pass refuses."""
    model = outlier_model()
    model.graph.node.pop()  # drop the Conv
    model.graph.output.pop()
    model.graph.input.pop()
    after, result = quantize(model, outlier_feeds(model, 8, 0))
    assert not result.changed and op_types(after) == ["MatMul"]
    assert result.refused[0].startswith("no set of quantized nodes stays within the budget on the calibration feeds")


def test_refused_when_nothing_is_fusable():
    """x -> Relu -> Softmax -> y: no op onnxruntime fuses into an integer kernel."""
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Softmax", ["r"], ["y"])]
    model = make_model(nodes, [vi("x", [2, 8])], [vi("y", [2, 8])])
    after, result = quantize(model)
    assert not result.changed and op_types(after) == ["Relu", "Softmax"]
    assert result.refused == ["no node that onnxruntime fuses into an integer kernel can be quantized here (no Conv, Gemm, MatMul, Add, Mul, Concat, Where, Sigmoid, LeakyRelu or pooling node)"]


def test_ops_option_restricts_op_types():
    """ops=Conv on the residual model: the Add stays float."""
    after, result = quantize(residual_model(), ops="Conv")
    assert result.details["quantized"] == {"Conv": 2}
    assert node(after, "Add").output[0] == "y"


def test_subgraph_nodes_stay_float_and_said():
    """x -> Conv -> c ; If(cond) { c -> Conv -> out } -> y: the Conv in the body is left float."""
    body_conv = helper.make_node("Conv", ["c", "w2"], ["inner"], name="inner_conv")
    branch = helper.make_graph([body_conv], "branch", [], [vi("inner", [1, 4, 6, 6])], initializer=[tensor("w2", [4, 4, 1, 1])])
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
        helper.make_node("If", ["cond"], ["y"], name="if", then_branch=branch, else_branch=branch),
    ]
    cond = numpy_helper.from_array(np.array(True), "cond")
    before = make_model(nodes, [vi("x", [1, 4, 6, 6])], [vi("y", [1, 4, 6, 6])], [tensor("w", [4, 4, 1, 1]), cond])
    after, result = quantize(before)
    assert result.details["quantized"] == {"Conv": 1} and result.details["subgraphs"] == "2 nodes inside If/Loop/Scan bodies left float"
    assert "2 nodes inside If/Loop/Scan bodies left float (quantize-static quantizes the main graph only)" in result.notes
    then_branch = next(a.g for a in node(after, "If").attribute if a.name == "then_branch")
    assert [n.op_type for n in then_branch.node] == ["Conv"]
    check_close(before, after)


def test_refusal_says_the_convs_inside_bodies_stay_float():
    """If(cond) { x -> Conv -> out } -> y alone (silero-vad's layout): nothing in the main graph to
    quantize, and the refusal says the body's nodes stay float instead of claiming there is no Conv."""
    body_conv = helper.make_node("Conv", ["x", "w2"], ["inner"], name="inner_conv")
    branch = helper.make_graph([body_conv], "branch", [], [vi("inner", [1, 4, 6, 6])], initializer=[tensor("w2", [4, 4, 1, 1])])
    cond = numpy_helper.from_array(np.array(True), "cond")
    nodes = [helper.make_node("If", ["cond"], ["y"], name="if", then_branch=branch, else_branch=branch)]
    before = make_model(nodes, [vi("x", [1, 4, 6, 6])], [vi("y", [1, 4, 6, 6])], [cond])
    after, result = quantize(before)
    assert not result.changed and op_types(after) == ["If"]
    assert result.refused == [
        "no node that onnxruntime fuses into an integer kernel can be quantized here (no Conv, Gemm, MatMul, Add, Mul,"
        " Concat, Where, Sigmoid, LeakyRelu or pooling node outside If/Loop/Scan bodies; the 2 nodes inside them stay float)"
    ]


def test_auto_activation_type_reuses_the_cached_decision():
    """activations=auto with a decision already in ctx.decisions uses it without measuring."""
    model = residual_model()
    feeds = seeded_feeds(model, 8)
    ctx = PassContext(calibration=feeds, validation=feeds, activations=ActivationCache(feeds), budget=COSINE_ONLY, decisions={DECISION_KEY: "uint8"})
    ctx.latency = None  # would fail if called
    result = QuantizeStatic(activations="auto", latency_fallback=False).run(model, ctx)
    assert result.details["activation_type"] == "uint8" and any("measured earlier" in note for note in result.notes)


def test_auto_activation_type_is_measured_and_cached():
    """activations=auto: the type is decided (fusion first, then timing) and stored in ctx.decisions."""
    model = residual_model()
    feeds = seeded_feeds(model, 8)
    ctx = PassContext(calibration=feeds, validation=feeds, activations=ActivationCache(feeds), budget=COSINE_ONLY, bench_rounds=2)
    result = QuantizeStatic(activations="auto", latency_fallback=False).run(model, ctx)
    assert ctx.decisions[DECISION_KEY] == result.details["activation_type"] in ("uint8", "int8")
    assert any(note.startswith(f"{result.details['activation_type']} activations (") for note in result.notes)


def test_bias_correction_changes_the_bias():
    """The corrected bias differs from the plainly quantized one by the measured mean shift."""
    model = conv_relu_model()
    plain, _ = quantize(model, bias_correction=False)
    corrected, _ = quantize(model, bias_correction=True)
    b_plain = init(plain, producer(plain, node(plain, "Conv").input[2]).input[0])
    b_corrected = init(corrected, producer(corrected, node(corrected, "Conv").input[2]).input[0])
    assert not np.array_equal(b_plain, b_corrected)
    check_close(model, corrected)


@pytest.mark.parametrize("opset", [17, 18])  # ReduceMean's axes: an attribute, then an input
def test_bias_correction_shift_is_the_mean_change_per_channel(opset):
    """weight_shifts: per output channel, the mean over batch and pixels of conv(x, dequantized W) -
    conv(x, W), reduced inside the graph (only a vector per Conv leaves onnxruntime)."""
    from graphopt.passes.quantize_static import weight_shifts

    model = conv_relu_model()
    model.opset_import[0].version = opset
    feeds = seeded_feeds(model, 3)
    plan = make_plan(model, ["Conv"])
    shifts = weight_shifts(plan, plan.units, feeds, per_channel=True)
    rounded = copy_model(model)
    w = next(t for t in rounded.graph.initializer if t.name == "w")
    w.CopyFrom(numpy_helper.from_array(qdq.quantize_per_channel(numpy_helper.to_array(w), 0).dequantized(), "w"))
    conv_only = [(m, copy_model(m)) for m in (model, rounded)]
    for _, m in conv_only:
        del m.graph.node[1:]
        m.graph.output[0].name = "c"
    exact, approx = (ort_outputs(m, feeds) for _, m in conv_only)
    expected = np.mean([(a["c"] - e["c"]).mean(axis=(0, 2, 3)) for a, e in zip(approx, exact)], axis=0)
    assert shifts["conv"].shape == (8,) and np.abs(expected).max() > 0
    np.testing.assert_allclose(shifts["conv"], expected, rtol=1e-3, atol=1e-6)


LOOSE = Budget(min_cosine=0.5, min_top1=None)  # every node stays quantized, whatever its error


def worst_cosine(reference, got, output="y"):
    """The lowest cosine over feeds of one output against the reference."""
    return min(float(np.dot(r[output].ravel(), g[output].ravel()) / np.linalg.norm(r[output]) / np.linalg.norm(g[output])) for r, g in zip(reference, got))


def _matmul_model():
    """x[2,3,16] -> MatMul(W[16,8]) -> y"""
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")]
    return make_model(nodes, [vi("x", [2, 3, 16])], [vi("y", [2, 3, 8])], [tensor("w", [16, 8])])


@pytest.mark.parametrize("bits, qmax", [(8, 127), (7, 63)])
def test_weight_bits_bound_the_integer_weights(bits, qmax):
    after, result = quantize(_matmul_model(), budget=LOOSE, weight_bits=bits)
    weight = init(after, producer(after, node(after, "MatMul").input[1]).input[0])
    assert result.details["weight_bits"] == bits and np.abs(weight.astype(int)).max() == qmax


def test_weight_bits_auto_keeps_the_more_faithful_as_onnxruntime_runs_it():
    """weight_bits=0 quantizes everything with 8 and with 7 bits and keeps the one whose outputs at level
    all (integer kernels) are closer to the float model's; the note gives both cosines."""
    model = _matmul_model()
    feeds = seeded_feeds(model, 8)
    at_level_all = {}
    for bits in (8, 7):
        after, _ = quantize(model, feeds, budget=LOOSE, weight_bits=bits, method="minmax")
        reference, got = (runtime.run_all(m, feeds, RuntimeSettings(level="all")) for m in (model, after))
        at_level_all[bits] = worst_cosine(reference, got)
    after, result = quantize(model, feeds, budget=LOOSE, weight_bits=0, method="minmax")
    best = max(at_level_all, key=lambda b: (at_level_all[b], b))
    assert result.details["weight_bits"] == best
    assert any(n.startswith(f"minmax ranges and {best}-bit weights chosen by measurement: output cosine") for n in result.notes)


def _silu_model(mul_inputs=("c", "s")):
    """x[1,4,8,8] -> Conv -> c; SiLU(c) = Mul(c, Sigmoid(c)) -> Conv -> y; the first Conv's bias pushes most
    of c far below zero, where SiLU is flat."""
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Sigmoid", ["c"], ["s"], name="sig"),
        helper.make_node("Mul", list(mul_inputs), ["a"], name="mul"),
        helper.make_node("Conv", ["a", "w2"], ["y"], name="conv2"),
    ]
    bias = numpy_helper.from_array(np.array([-8.0, -6.0, 1.0, -10.0], np.float32), "b1")
    return make_model(nodes, [vi("x", [1, 4, 8, 8])], [vi("y", [1, 4, 8, 8])], [tensor("w1", [4, 4, 3, 3], 1.0), bias, tensor("w2", [4, 4, 1, 1])])


@pytest.mark.parametrize("mul_inputs", [("c", "s"), ("s", "c")])
def test_reader_transfers_finds_silu_and_sigmoid_inputs(mul_inputs):
    model = _silu_model(mul_inputs)
    assert quantize_static.reader_transfers(model.graph) == {"c": "silu"}
    sigmoid_only = make_model([helper.make_node("Sigmoid", ["x"], ["y"])], [vi("x", [4])], [vi("y", [4])])
    assert quantize_static.reader_transfers(sigmoid_only.graph) == {"x": "sigmoid"}


@pytest.mark.parametrize(
    "change, why",
    [
        (lambda m: m.graph.node.append(helper.make_node("Add", ["c", "c"], ["extra"])), "c has a reader that is neither the Sigmoid nor the Mul"),
        (lambda m: m.graph.output.append(vi("c", [1, 4, 8, 8])), "c is a graph output, read as it is"),
        (lambda m: m.graph.output.append(vi("s", [1, 4, 8, 8])), "the Sigmoid's output is read elsewhere (a graph output)"),
        (lambda m: m.graph.node.append(helper.make_node("Mul", ["c", "c"], ["sq"])), "a second Mul"),
    ],
)
def test_reader_transfers_refuses_tensors_read_as_they_are(change, why):
    model = _silu_model()
    change(model)
    assert "c" not in quantize_static.reader_transfers(model.graph), why


def test_mse_ranges_a_silu_input_by_the_error_after_silu():
    """With method=mse the SiLU input's QuantizeLinear scale is that of calibrate's transfer window (its
    flat negative tail clipped), not the plain mse one; the details say which tensors were so ranged."""
    model = _silu_model()
    feeds = seeded_feeds(model, 8)
    after, result = quantize(model, feeds, budget=LOOSE, method="mse", weight_bits=8)
    assert result.details["calibration"]["after_function"] == {"c": "silu"}
    stats = calibrate.collect(model, feeds, ["c"])["c"]
    lo, hi = stats.range("mse", transfer="silu")
    assert lo > stats.minimum + 1.0 and stats.range("mse") != (lo, hi)
    q = next(n for n in after.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "c")
    assert init(after, q.input[1]) == pytest.approx((hi - lo) / 255, rel=1e-5)
    assert result.details["calibration"]["ranges"]["c"] == pytest.approx([lo, hi], rel=1e-6)


def test_method_auto_keeps_the_more_faithful_range_method():
    """method=auto quantizes with minmax and with mse ranges and keeps the one whose outputs at level all
    are closer to the float model's; the note gives every cosine."""
    model = _silu_model()
    feeds = seeded_feeds(model, 8)
    at_level_all = {}
    for method in ("minmax", "mse"):
        after, _ = quantize(model, feeds, budget=LOOSE, method=method, weight_bits=8)
        reference, got = (runtime.run_all(m, feeds, RuntimeSettings(level="all")) for m in (model, after))
        at_level_all[method] = worst_cosine(reference, got)
    after, result = quantize(model, feeds, budget=LOOSE, weight_bits=8)
    best = max(at_level_all, key=lambda m: (at_level_all[m], m == "minmax"))
    assert result.details["calibration"]["method"] == best
    note = next(n for n in result.notes if "chosen by measurement" in n)
    assert note.startswith(f"{best} ranges and 8-bit weights") and "with minmax ranges" in note and "with mse ranges" in note


def test_bad_weight_bits_is_a_pass_error():

    with pytest.raises(PassError, match="weight_bits must be 7, 8 or 0"):
        quantize(_matmul_model(), weight_bits=4)


def test_bad_option_is_a_pass_error():

    with pytest.raises(PassError, match="method 'kl'"):
        quantize(conv_relu_model(), method="kl")


# ------------------------------------------------------------------------------- latency decision (pure)


def unit(name, act_name=""):
    return Unit(0, name, "Conv", {0: f"{name}_in"}, output=f"{name}_out", act_name=act_name)


def test_slower_units_charges_qdq_and_maps_fused_names():
    """conv_a: QLinearConv (renamed by the NHWC pass) + its input Q is slower than float Conv + Relu;
    conv_b: faster even with its share of a DQ."""
    units = [unit("conv_a", act_name="relu_a"), unit("conv_b")]
    float_times = [NodeTime("conv_a", "FusedConv", 1.0), NodeTime("relu_a", "Relu", 0.2), NodeTime("conv_b", "Conv", 3.0)]
    quant_times = [
        NodeTime("conv_a_token_7", "QLinearConv", 1.1),
        NodeTime("conv_a_in_QuantizeLinear", "QuantizeLinear", 0.3),
        NodeTime("conv_b", "QLinearConv", 1.5),
        NodeTime("conv_b_out_DequantizeLinear", "DequantizeLinear", 0.4),
    ]
    charged = {"conv_a_in_QuantizeLinear": ["conv_a"], "conv_b_out_DequantizeLinear": ["conv_b"]}
    slower = slower_units(units, float_times, quant_times, charged)
    assert slower == {"conv_a": pytest.approx((1.4, 1.2))}


def test_slower_units_splits_a_shared_charge():
    """A Q read by two units costs each half; a unit missing from the float profile is never judged."""
    units = [unit("a"), unit("b"), unit("ghost")]
    float_times = [NodeTime("a", "Conv", 1.0), NodeTime("b", "Conv", 1.0)]
    quant_times = [NodeTime("a", "QLinearConv", 0.5), NodeTime("b", "QLinearConv", 0.7), NodeTime("q", "QuantizeLinear", 0.8), NodeTime("ghost", "QLinearConv", 9.0)]
    slower = slower_units(units, float_times, quant_times, {"q": ["a", "b"]})
    assert slower == {"b": pytest.approx((1.1, 1.0))}


def test_latency_fallback_runs_on_a_real_profile():
    """latency_fallback=True profiles both models and times what it kept; whatever it decides, kept-float
    entries say 'slower', and a refusal says why."""
    before = residual_model()
    after, result = quantize(before, latency_fallback=True)
    kept = result.details["kept_float"]
    assert all(k["reason"] == "slower" and "ms quantized vs" in k["detail"] for k in kept)
    if result.changed:
        assert result.counts.get("kept_float_slower", 0) == len(kept) and result.counts["nodes_quantized"] + len(kept) == 3
    elif len(kept) == 3:
        assert result.refused == ["every quantizable node was returned to float"]
    else:
        [reason] = result.refused
        assert reason.startswith(f"not faster than its input even with every node the latency guard kept quantized ({3 - len(kept)} nodes): latency ratio ")


def stubbed_latency(ratio, calls):
    """A ctx.latency that records the labels it was asked to time and reports `ratio` for the second model."""

    def latency(models):
        calls.append([label for label, _ in models])
        return [Timing(models[0][0], 0.0, [10.0]), Timing(models[1][0], 0.0, [10.0 * ratio], ratio)]

    return latency


def quantize_timed(model, feeds, ratio, monkeypatch, **options):
    """quantize-static with the latency guard on, its per-node verdict 'nothing slower' and ctx.latency
    stubbed to `ratio`: (result, the labels each latency call timed)."""
    monkeypatch.setattr(quantize_static, "slower_units", lambda *args: {})
    ctx = PassContext(calibration=feeds, validation=feeds, activations=ActivationCache(feeds), budget=COSINE_ONLY)
    calls: list = []
    ctx.latency = stubbed_latency(ratio, calls)
    return QuantizeStatic(activations="uint8", latency_fallback=True, **options).run(copy_model(model), ctx), calls


def test_not_faster_even_fully_quantized_is_refused_before_the_accuracy_bisection(monkeypatch):
    """The outlier model breaks the budget fully quantized, but it times at 1.2x the float model: the pass
    refuses with that ratio and never ranks nodes for accuracy (no "sensitive" entry)."""
    before = outlier_model()
    result, calls = quantize_timed(before, outlier_feeds(before, 8, 0), 1.2, monkeypatch)
    assert not result.changed and calls == [["float", "quantized"]]
    assert len(result.refused) == 1 and "not faster than its input" in result.refused[0] and "latency ratio 1.200" in result.refused[0]
    assert not [k for k in result.details["kept_float"] if k["reason"] == "sensitive"]


def test_max_latency_ratio_is_the_bar_to_beat(monkeypatch):
    """Timed at 0.5x the float model, but asked to beat 0.4x (what another candidate reached): refused."""
    before = outlier_model()
    result, _ = quantize_timed(before, outlier_feeds(before, 8, 0), 0.5, monkeypatch, max_latency_ratio=0.4)
    assert not result.changed and "not faster than 0.400x its input (max_latency_ratio)" in result.refused[0]
    with pytest.raises(PassError, match="max_latency_ratio must be positive"):
        quantize(before, max_latency_ratio=0.0)


def test_faster_fully_quantized_goes_on_to_the_accuracy_guard(monkeypatch):
    """The same model timed at 0.5x: the accuracy guard returns the outlier MatMul to float as before."""
    before = outlier_model()
    result, calls = quantize_timed(before, outlier_feeds(before, 8, 0), 0.5, monkeypatch)
    assert result.changed and result.details["quantized"] == {"Conv": 1} and calls == [["float", "quantized"]]
    assert [(k["node"], k["reason"]) for k in result.details["kept_float"]] == [("mm", "sensitive")]


def test_what_the_latency_trim_returns_is_judged_by_the_budget_again(monkeypatch):
    """Error is not monotone in the nodes quantized. Four Convs read x; the stubbed budget fails with 4 or 2
    of them quantized and holds with 3 or 1. The guard returns one Conv (4 -> 3), the latency trim
    another (-> 2, over budget again), so the guard runs again and returns a third: one Conv is left
    quantized and the result is within budget (without the second round it would keep 2, over budget)."""
    nodes = [helper.make_node("Conv", ["x", f"w{i}"], [f"y{i}"], name=f"conv{i}") for i in range(4)]
    before = make_model(nodes, [vi("x", [1, 4, 6, 6])], [vi(f"y{i}", [1, 4, 6, 6]) for i in range(4)], [tensor(f"w{i}", [4, 4, 1, 1]) for i in range(4)])
    trims: list[int] = []

    def slower_on_the_second_trim(judged, *args):
        trims.append(len(judged))
        return {judged[0].name: (2.0, 1.0)} if len(trims) == 2 else {}

    def quantized_convs(model):
        made_by = producers(model.graph)
        return sum(n.op_type == "Conv" and made_by.get(n.input[1]) is not None and made_by[n.input[1]].op_type == "DequantizeLinear" for n in model.graph.node)

    def even_count_fails(reference, model):
        count = quantized_convs(model)
        return f"{count} Convs quantized" if count in (2, 4) else None

    monkeypatch.setattr(quantize_static, "slower_units", slower_on_the_second_trim)
    feeds = seeded_feeds(before, 4, 0)
    ctx = PassContext(calibration=feeds, validation=feeds, activations=ActivationCache(feeds), budget=COSINE_ONLY)
    ctx.latency = stubbed_latency(0.5, [])
    ctx.budget_problem = even_count_fails
    after = copy_model(before)
    result = QuantizeStatic(activations="uint8", latency_fallback=True).run(after, ctx)
    assert trims == [4, 3, 1]  # before the guard, after its first round, after its second
    assert result.changed and result.details["quantized"] == {"Conv": 1} and quantized_convs(after) == 1
    reasons = [k["reason"] for k in result.details["kept_float"]]
    assert sorted(reasons) == ["sensitive", "sensitive", "slower"] and reasons[1] == "slower"
    check_close(before, after)


def test_add_of_a_mask_fill_constant_stays_float():
    """x -> Conv -> Add(-inf/huge mask constant) -> y: the Add stays float (8 bits cannot hold -inf), the Conv is quantized."""
    mask = np.zeros((1, 4, 6, 6), np.float32)
    mask[..., 0] = np.finfo(np.float32).min
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"), helper.make_node("Add", ["c", "mask"], ["y"], name="masked")]
    model = make_model(nodes, [vi("x", [1, 4, 6, 6])], [vi("y", [1, 4, 6, 6])], [tensor("w", [4, 4, 1, 1]), numpy_helper.from_array(mask, "mask")])
    after, result = quantize(model)
    assert result.changed and result.details["quantized"] == {"Conv": 1}
    (entry,) = [k for k in result.details["kept_float"] if k["node"] == "masked"]
    assert entry["reason"] == "unsupported" and "infinite or huge values" in entry["detail"]
