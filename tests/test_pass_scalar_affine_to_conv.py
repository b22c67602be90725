"""scalar-affine-to-conv: x * a + b by scalar constants before a Conv it cannot fold into becomes a 1x1
depthwise Conv."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphopt import profiling
from graphopt.graph import copy_model
from graphopt.passes.scalar_affine_to_conv import ScalarAffineToConv
from graphopt.runtime import RuntimeSettings
from tests.helpers import assert_same_outputs, make_model, op_types, run_pass, seeded_feeds

F = TensorProto.FLOAT


def const(name: str, value) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value, np.float32), name)


def conv_affine_conv_model(extra_output: str = "", weight_as_input: bool = False) -> onnx.ModelProto:
    """x -> Conv 1x1 -> Relu -> Mul(., 1.7) -> Add(-0.4, .) -> depthwise Conv 3x3 padded -> y"""
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c"], kernel_shape=[1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("Mul", ["r", "scale"], ["m"]),
        helper.make_node("Add", ["offset", "m"], ["a"]),
        helper.make_node("Conv", ["a", "w2", "b2"], ["y"], name="dw", kernel_shape=[3, 3], pads=[1, 1, 1, 1], group=16),
    ]
    inits = [const("w1", rng.standard_normal((16, 8, 1, 1))), const("scale", 1.7), const("offset", [-0.4]), const("b2", rng.standard_normal(16))]
    inputs = [helper.make_tensor_value_info("x", F, [2, 8, 10, 10])]
    if weight_as_input:
        inputs.append(helper.make_tensor_value_info("w2", F, [16, 1, 3, 3]))
    else:
        inits.append(const("w2", rng.standard_normal((16, 1, 3, 3))))
    outputs = [helper.make_tensor_value_info("y", F, [2, 16, 10, 10])] + ([helper.make_tensor_value_info(extra_output, F, [2, 16, 10, 10])] if extra_output else [])
    return make_model(nodes, inputs, outputs, inits)


def test_the_chain_becomes_a_depthwise_conv_with_its_scale_and_offset():
    model = conv_affine_conv_model()
    before = copy_model(model)
    feeds = seeded_feeds(model, n=2)
    result = run_pass(ScalarAffineToConv(), model, feeds)
    assert_same_outputs(before, model, feeds, rtol=1e-5, atol=1e-5)
    assert result.counts == {"chains_rewritten": 1}
    assert op_types(model) == ["Conv", "Relu", "Conv", "Conv"]
    affine = model.graph.node[2]
    assert list(affine.input[:1]) == ["r"] and list(affine.output) == ["a"]
    attrs = {a.name: helper.get_attribute_value(a) for a in affine.attribute}
    assert attrs == {"group": 16, "kernel_shape": [1, 1]}
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    assert inits[affine.input[1]].shape == (16, 1, 1, 1) and np.all(inits[affine.input[1]] == np.float32(1.7))
    assert inits[affine.input[2]].shape == (16,) and np.all(inits[affine.input[2]] == np.float32(-0.4))
    assert not {"scale", "offset"} & set(inits)  # left unread, dropped


def test_onnxruntime_keeps_the_chain_in_its_nchwc_layout():
    """The reason for the pass: no reorder out of and back into NCHWc around the chain any more."""
    model = conv_affine_conv_model()
    settings = RuntimeSettings(level="all", threads=1)
    kernels_before = [n.op_type for n in profiling.optimized_graph(model, settings).graph.node]
    if "ReorderInput" not in kernels_before:
        pytest.skip("onnxruntime does not use its NCHWc layout on this CPU")
    # the first Conv reads NCHW directly on AVX-512 CPUs and through a ReorderInput on AVX2 ones
    assert kernels_before[-7:] == ["Conv", "ReorderOutput", "Mul", "Add", "ReorderInput", "Conv", "ReorderOutput"]
    run_pass(ScalarAffineToConv(), model)
    kernels_after = [n.op_type for n in profiling.optimized_graph(model, settings).graph.node]
    assert kernels_after[-4:] == ["Conv", "Conv", "Conv", "ReorderOutput"] and kernels_after.count("ReorderOutput") == 1


def test_a_chain_value_read_elsewhere_is_refused():
    model = conv_affine_conv_model(extra_output="m")
    result = run_pass(ScalarAffineToConv(), model, seeded_feeds(model))
    assert not result.changed and op_types(model) == ["Conv", "Relu", "Mul", "Add", "Conv"]
    assert result.refused == ["Conv 'dw': m is also read elsewhere or is a graph output"]


def test_the_chain_result_may_have_other_readers():
    model = conv_affine_conv_model(extra_output="a")
    before = copy_model(model)
    feeds = seeded_feeds(model, n=2)
    assert run_pass(ScalarAffineToConv(), model, feeds).changed
    assert_same_outputs(before, model, feeds, rtol=1e-5, atol=1e-5)
    assert [o.name for o in model.graph.output] == ["y", "a"]


def test_a_weight_of_unknown_shape_is_refused():
    model = conv_affine_conv_model(weight_as_input=True)
    result = run_pass(ScalarAffineToConv(), model, seeded_feeds(model))
    assert not result.changed
    assert result.refused == ["Conv 'dw': its weight w2 is not a float32 initializer of this graph, so its input channels are not known"]


def affine_pool_model(pool: str, channels: int | str = 16) -> onnx.ModelProto:
    """x -> Relu -> Mul(., 0.5) -> Add(., 2.0) -> pool -> y"""
    attrs = {"kernel_shape": [2, 2]} if pool in ("AveragePool", "MaxPool") else {}
    nodes = [
        helper.make_node("Relu", ["x"], ["r"]),
        helper.make_node("Mul", ["r", "scale"], ["m"]),
        helper.make_node("Add", ["m", "offset"], ["a"]),
        helper.make_node(pool, ["a"], ["y"], name="pool", **attrs),
    ]
    inputs = [helper.make_tensor_value_info("x", F, [2, channels, 10, 10])]
    return make_model(nodes, inputs, [helper.make_tensor_value_info("y", F, [2, channels, None, None])], [const("scale", 0.5), const("offset", 2.0)])


@pytest.mark.parametrize("pool", ["GlobalAveragePool", "AveragePool", "MaxPool"])
def test_a_chain_before_pooling_becomes_a_depthwise_conv_with_the_channels_of_its_shape(pool):
    model = affine_pool_model(pool)
    before = copy_model(model)
    feeds = seeded_feeds(model, n=2)
    assert run_pass(ScalarAffineToConv(), model, feeds).counts == {"chains_rewritten": 1}
    assert_same_outputs(before, model, feeds, rtol=1e-6, atol=1e-6)
    assert op_types(model) == ["Relu", "Conv", pool]
    assert numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == model.graph.node[1].input[1])).shape == (16, 1, 1, 1)


def test_a_chain_before_pooling_without_a_static_channel_count_is_refused():
    model = affine_pool_model("GlobalAveragePool", channels="C")
    result = run_pass(ScalarAffineToConv(), model, seeded_feeds(model))
    assert not result.changed and op_types(model) == ["Relu", "Mul", "Add", "GlobalAveragePool"]
    assert result.refused == ["GlobalAveragePool 'pool': r is not [N, C, H, W] with a static C: [2, None, 10, 10]"]


def test_chains_before_a_conv_and_before_pooling_in_one_graph():
    """The pooling chain's channels come from a run of the model, which must see it before any rewrite."""
    model = conv_affine_conv_model()
    model.graph.node.extend(
        [
            helper.make_node("Relu", ["y"], ["r2"]),
            helper.make_node("Mul", ["r2", "scale"], ["m2"]),
            helper.make_node("Add", ["m2", "offset"], ["a2"]),
            helper.make_node("GlobalAveragePool", ["a2"], ["pooled"], name="pool"),
        ]
    )
    model.graph.output[0].CopyFrom(helper.make_tensor_value_info("pooled", F, [2, 16, 1, 1]))
    before = copy_model(model)
    feeds = seeded_feeds(model, n=2)
    assert run_pass(ScalarAffineToConv(), model, feeds).counts == {"chains_rewritten": 2}
    assert_same_outputs(before, model, feeds, rtol=1e-5, atol=1e-5)
    assert op_types(model) == ["Conv", "Relu", "Conv", "Conv", "Relu", "Conv", "GlobalAveragePool"]


def test_a_float16_chain_before_pooling_is_refused():
    """The depthwise Conv's weight would be float32 beside a float16 input: not written."""
    half = lambda name, v: numpy_helper.from_array(np.asarray(v, np.float16), name)  # noqa: E731
    nodes = [
        helper.make_node("Relu", ["x"], ["r"]),
        helper.make_node("Mul", ["r", "scale"], ["m"]),
        helper.make_node("Add", ["m", "offset"], ["a"]),
        helper.make_node("GlobalAveragePool", ["a"], ["y"], name="pool"),
    ]
    model = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [2, 16, 10, 10])], [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [2, 16, 1, 1])], [half("scale", 0.5), half("offset", 2.0)])
    result = run_pass(ScalarAffineToConv(), model, seeded_feeds(model))
    assert not result.changed and result.refused == ["GlobalAveragePool 'pool': r is not known to be float32"]
