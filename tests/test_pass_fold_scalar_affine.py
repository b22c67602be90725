"""fold-scalar-affine: x * a + b by scalar constants in front of an unpadded Conv is folded into the Conv."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from graphopt.graph import copy_model
from graphopt.passes.fold_scalar_affine import FoldScalarAffine
from tests.helpers import assert_same_outputs, make_model, op_types, run_pass, seeded_feeds

F = TensorProto.FLOAT


def const(name: str, value) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value, np.float32), name)


def affine_conv_model(kernel: int = 1, pads: int = 0, group: int = 1, bias: bool = True, extra_output: str = "", offset: bool = True) -> onnx.ModelProto:
    """x -> Mul(x, 1.7) -> Add(-0.4, .) -> Conv(k x k, group, pads) -> y (without the Add when not `offset`)"""
    rng = np.random.default_rng(0)
    inputs = ["a", "w", "b"] if bias else ["a", "w"]
    nodes = [
        helper.make_node("Mul", ["x", "scale"], ["m" if offset else "a"]),
        *([helper.make_node("Add", ["offset", "m"], ["a"])] if offset else []),
        helper.make_node("Conv", inputs, ["y"], name="conv", kernel_shape=[kernel, kernel], pads=[pads] * 4, group=group),
    ]
    inits = [const("scale", 1.7)] + ([const("offset", [-0.4])] if offset else []) + [const("w", rng.standard_normal((8, 8 // group, kernel, kernel)))]
    inits += [const("b", rng.standard_normal(8))] if bias else []
    outputs = [helper.make_tensor_value_info("y", F, [2, 8, None, None])] + ([helper.make_tensor_value_info(extra_output, F, [2, 8, 6, 6])] if extra_output else [])
    return make_model(nodes, [helper.make_tensor_value_info("x", F, [2, 8, 6, 6])], outputs, inits)


def fold(model: onnx.ModelProto):
    before = copy_model(model)
    feeds = seeded_feeds(model, n=2)
    result = run_pass(FoldScalarAffine(), model, feeds)
    assert_same_outputs(before, model, feeds, rtol=1e-5, atol=1e-5)
    return result


def test_scale_and_offset_fold_into_a_pointwise_conv():
    model = affine_conv_model()
    result = fold(model)
    assert op_types(model) == ["Conv"] and model.graph.node[0].input[0] == "x"
    assert result.counts == {"convs_folded_into": 1, "nodes_removed": 2}
    assert not {"w", "b", "scale", "offset"} & {t.name for t in model.graph.initializer}  # left unread, dropped
    w = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == model.graph.node[0].input[1]))
    original = numpy_helper.to_array(next(t for t in affine_conv_model().graph.initializer if t.name == "w"))
    np.testing.assert_allclose(w, original * 1.7, rtol=1e-6)


def test_grouped_3x3_conv_without_padding_and_without_bias():
    model = affine_conv_model(kernel=3, group=4, bias=False)
    result = fold(model)
    assert op_types(model) == ["Conv"] and len(model.graph.node[0].input) == 3  # a bias input was created
    assert result.counts["convs_folded_into"] == 1


def test_a_padded_conv_is_refused():
    """The padding zeros would not be offset: the borders would differ."""
    model = affine_conv_model(kernel=3, pads=1)
    result = run_pass(FoldScalarAffine(), model, seeded_feeds(model))
    assert not result.changed and op_types(model) == ["Mul", "Add", "Conv"]
    assert result.refused == ["Conv 'conv': it pads its input, so a folded offset would be wrong at the borders"]


def test_a_scale_alone_folds_into_a_padded_conv():
    """Without an offset the padding zeros stay zeros: exact at the borders too."""
    model = affine_conv_model(kernel=3, pads=1, group=8, offset=False)
    result = fold(model)
    assert op_types(model) == ["Conv"] and model.graph.node[0].input[0] == "x"
    assert result.counts == {"convs_folded_into": 1, "nodes_removed": 1}


def test_a_chain_value_read_elsewhere_is_refused():
    model = affine_conv_model(extra_output="m")
    result = run_pass(FoldScalarAffine(), model, seeded_feeds(model))
    assert not result.changed
    assert result.refused == ["Conv 'conv': m is also read elsewhere or is a graph output"]


def test_a_shared_weight_is_refused():
    model = affine_conv_model()
    model.graph.node.append(helper.make_node("Conv", ["x", "w"], ["z"], kernel_shape=[1, 1]))
    model.graph.output.append(helper.make_tensor_value_info("z", F, [2, 8, 6, 6]))
    result = run_pass(FoldScalarAffine(), model, seeded_feeds(model))
    assert not result.changed
    assert result.refused == ["Conv 'conv': w is not a float32 initializer used by this Conv alone"]
