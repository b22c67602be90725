"""split-conv: a Conv whose output (after elementwise ops) is only cut along channels by a Split becomes one
Conv per piece, each with its own copy of the elementwise ops."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphopt import profiling
from graphopt.graph import attribute, copy_model
from graphopt.passes.split_conv import SplitConv
from graphopt.runtime import RuntimeSettings
from tests.helpers import assert_same_outputs, make_model, op_types, run_pass, seeded_feeds

F = TensorProto.FLOAT


def const(name: str, value, dtype=np.float32) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value, dtype), name)


def c2f_model(sizes=(8, 8), channels: int = 16, *, axis: int = 1, group: int = 1, opset: int = 17, sizes_as_input: bool = False, weight_as_input: bool = False, extra_output: str = "") -> onnx.ModelProto:
    """YOLOv8's C2f start: x -> Conv 1x1 (+bias) -> SiLU (Sigmoid, Mul) -> Split(axis) -> pieces -> Concat -> y.
    sizes None: a Split without sizes (equal pieces, one per output: 2)."""
    rng = np.random.default_rng(0)
    outputs = [f"p{k}" for k in range(len(sizes) if sizes else 2)]
    split_inputs, split_attrs = ["s"], {"axis": axis}
    inits = [const("b", rng.standard_normal(channels))]
    if sizes is None and opset >= 18:
        split_attrs["num_outputs"] = len(outputs)
    elif sizes is not None and opset < 13:
        split_attrs["split"] = list(sizes)
    elif sizes is not None:
        split_inputs.append("sizes")
        if not sizes_as_input:
            inits.append(const("sizes", sizes, np.int64))
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], name="cv1", kernel_shape=[1, 1], group=group),
        helper.make_node("Sigmoid", ["c"], ["sig"]),
        helper.make_node("Mul", ["c", "sig"], ["s"]),
        helper.make_node("Split", split_inputs, outputs, name="chunk", **split_attrs),
        helper.make_node("Concat", outputs[::-1], ["y"], axis=axis),
    ]
    inputs = [helper.make_tensor_value_info("x", F, [2, 8, 5, 6])]
    w = rng.standard_normal((channels, 8 // group, 1, 1))
    if weight_as_input:
        inputs.append(helper.make_tensor_value_info("w", F, list(w.shape)))
    else:
        inits.append(const("w", w))
    if sizes_as_input:
        inputs.append(helper.make_tensor_value_info("sizes", TensorProto.INT64, [len(sizes)]))
    graph_outputs = [helper.make_tensor_value_info("y", F, [2, channels, 5, 6])] + ([helper.make_tensor_value_info(extra_output, F, [2, channels, 5, 6])] if extra_output else [])
    return make_model(nodes, inputs, graph_outputs, inits, opset=opset)


def weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


@pytest.mark.parametrize("sizes, opset", [((8, 8), 17), ((4, 12), 17), ((4, 12), 11), (None, 17)])
def test_each_piece_gets_its_own_conv_and_silu(sizes, opset):
    model = c2f_model(sizes, opset=opset)
    before = copy_model(model)
    feeds = seeded_feeds(model, n=2)
    result = run_pass(SplitConv(), model, feeds)
    assert result.counts == {"convs_split": 1, "pieces": 2}
    assert op_types(model) == ["Conv", "Sigmoid", "Mul", "Conv", "Sigmoid", "Mul", "Concat"]
    first, second = model.graph.node[0], model.graph.node[3]
    cut = sizes or (8, 8)
    original = weights(before)
    for conv, (start, end) in ((first, (0, cut[0])), (second, (cut[0], 16))):
        np.testing.assert_array_equal(weights(model)[conv.input[1]], original["w"][start:end])
        np.testing.assert_array_equal(weights(model)[conv.input[2]], original["b"][start:end])
    assert [model.graph.node[2].output[0], model.graph.node[5].output[0]] == ["p0", "p1"]
    assert not {"w", "b", "sizes"} & set(weights(model))  # left unread, dropped
    assert_same_outputs(before, model, feeds, rtol=0, atol=0)


def test_elementwise_ops_with_scalar_constants_are_copied_into_each_piece():
    """Conv -> Mul(., 0.5) -> Clip(., 0, 6) -> Split: both ops go with each piece."""
    rng = np.random.default_rng(1)
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Mul", ["half", "c"], ["m"]),
        helper.make_node("Clip", ["m", "lo", "hi"], ["r"]),
        helper.make_node("Split", ["r", "sizes"], ["a", "b"], axis=-3),
    ]
    inits = [const("w", rng.standard_normal((6, 4, 3, 3))), const("half", 0.5), const("lo", 0.0), const("hi", 6.0), const("sizes", [2, 4], np.int64)]
    outputs = [helper.make_tensor_value_info("a", F, [1, 2, 5, 5]), helper.make_tensor_value_info("b", F, [1, 4, 5, 5])]
    model = make_model(nodes, [helper.make_tensor_value_info("x", F, [1, 4, 5, 5])], outputs, inits)
    before = copy_model(model)
    feeds = seeded_feeds(model, n=2)
    assert run_pass(SplitConv(), model, feeds).counts == {"convs_split": 1, "pieces": 2}
    assert op_types(model) == ["Conv", "Mul", "Clip", "Conv", "Mul", "Clip"]
    assert {"half", "lo", "hi"} <= set(weights(model))  # still read by the copies
    assert_same_outputs(before, model, feeds, rtol=0, atol=0)


def test_onnxruntime_keeps_the_pieces_in_its_nchwc_layout():
    """The reason for the pass: no reorder out of NCHWc before the Split and back in after it."""
    model = c2f_model()
    model.graph.node.append(helper.make_node("Conv", ["y", "w2"], ["z"], kernel_shape=[1, 1]))
    model.graph.initializer.append(const("w2", np.random.default_rng(2).standard_normal((16, 16, 1, 1))))
    model.graph.output[0].CopyFrom(helper.make_tensor_value_info("z", F, [2, 16, 5, 6]))
    settings = RuntimeSettings(level="all", threads=1)
    reorders = lambda m: sum(n.op_type.startswith("Reorder") for n in profiling.optimized_graph(m, settings).graph.node)  # noqa: E731
    before = reorders(model)
    if before == 0:
        pytest.skip("onnxruntime does not use its NCHWc layout on this CPU")
    if before != 4:
        # an AVX-512 CPU laid this tiny graph out with 3 reorders, and with 4 after the pass (the first Conv
        # reads NCHW directly there); the pipeline's latency guard judges the pass on such CPUs (YOLOv8n on
        # one: 14.39 -> 12.74 ms, kept)
        pytest.skip(f"onnxruntime lays this graph out differently on this CPU ({before} reorders, the AVX2 layout has 4)")
    run_pass(SplitConv(), model)
    assert (before, reorders(model)) == (4, 2)  # the ones at the model's input and output are left


def test_a_value_between_the_conv_and_the_split_read_elsewhere_is_refused():
    model = c2f_model(extra_output="sig")
    result = run_pass(SplitConv(), model)
    assert not result.changed and "Split" in op_types(model)
    assert result.refused == ["Split 'chunk': sig (between the Conv and the Split) is also read elsewhere or is a graph output"]


def test_a_grouped_conv_is_refused():
    model = c2f_model(group=2)
    result = run_pass(SplitConv(), model)
    assert not result.changed and result.refused == ["Split 'chunk': Conv 'cv1' is grouped"]


def test_a_weight_that_is_not_an_initializer_is_refused():
    model = c2f_model(weight_as_input=True)
    result = run_pass(SplitConv(), model)
    assert not result.changed and result.refused == ["Split 'chunk': the weight or bias of Conv 'cv1' is not an initializer of this graph"]


def test_sizes_that_are_not_constant_are_refused():
    model = c2f_model(sizes_as_input=True)
    result = run_pass(SplitConv(), model, feeds=[])
    assert not result.changed and result.refused == ["Split 'chunk': its sizes sizes are not a constant"]


def test_without_sizes_the_last_piece_is_the_smaller_one_as_in_onnx():
    """Split-18 with num_outputs=2 on 15 channels: 8 and 7."""
    model = c2f_model(None, channels=15, opset=18)
    before = copy_model(model)
    feeds = seeded_feeds(model, n=2)
    assert run_pass(SplitConv(), model, feeds).counts == {"convs_split": 1, "pieces": 2}
    assert [weights(model)[model.graph.node[k].input[1]].shape[0] for k in (0, 3)] == [8, 7]
    assert_same_outputs(before, model, feeds, rtol=0, atol=0)


def test_a_split_on_another_axis_is_not_a_match():
    model = c2f_model((2, 4), axis=3)
    before = copy_model(model)
    result = run_pass(SplitConv(), model)
    assert not result.changed and not result.refused and model == before


def test_a_split_after_a_non_elementwise_op_is_not_a_match():
    """Conv -> MaxPool -> Split: the pooling mixes positions, it does not go with each piece."""
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], kernel_shape=[1, 1]),
        helper.make_node("MaxPool", ["c"], ["p"], kernel_shape=[2, 2]),
        helper.make_node("Split", ["p"], ["a", "b"], axis=1),
    ]
    outputs = [helper.make_tensor_value_info(n, F, [1, 2, 3, 3]) for n in ("a", "b")]
    model = make_model(nodes, [helper.make_tensor_value_info("x", F, [1, 4, 4, 4])], outputs, [const("w", np.ones((4, 4, 1, 1)))])
    result = run_pass(SplitConv(), model)
    assert not result.changed and not result.refused


def test_pieces_inside_an_if_branch_and_in_the_main_graph():
    """Bodies are searched too (their Conv weights are their own initializers), and the main graph's rewrite,
    which rebuilds its node list and so copies the If node, keeps the body's."""
    rng = np.random.default_rng(3)
    body_nodes = [
        helper.make_node("Conv", ["c2", "bw"], ["bc"], kernel_shape=[1, 1]),
        helper.make_node("Relu", ["bc"], ["br"]),
        helper.make_node("Split", ["br"], ["b0", "b1"], axis=1),
        helper.make_node("Concat", ["b1", "b0"], ["then_y"], axis=1),
    ]
    then_branch = helper.make_graph(body_nodes, "then", [], [helper.make_tensor_value_info("then_y", F, [2, 16, 5, 6])], initializer=[const("bw", rng.standard_normal((16, 16, 1, 1)))])
    else_branch = helper.make_graph([helper.make_node("Identity", ["c2"], ["else_y"])], "else", [], [helper.make_tensor_value_info("else_y", F, [2, 16, 5, 6])])
    model = c2f_model()
    model.graph.node.extend([helper.make_node("Conv", ["y", "w2"], ["c2"], kernel_shape=[1, 1]), helper.make_node("If", ["flag"], ["z"], then_branch=then_branch, else_branch=else_branch)])
    model.graph.initializer.append(const("w2", rng.standard_normal((16, 16, 1, 1))))
    model.graph.input.append(helper.make_tensor_value_info("flag", TensorProto.BOOL, []))
    model.graph.output[0].CopyFrom(helper.make_tensor_value_info("z", F, [2, 16, 5, 6]))
    feeds = [{**f, "flag": np.array(True)} for f in seeded_feeds(c2f_model(), n=2)]
    before = copy_model(model)
    assert run_pass(SplitConv(), model, feeds).counts == {"convs_split": 2, "pieces": 4}
    assert op_types(model)[:6] == ["Conv", "Sigmoid", "Mul", "Conv", "Sigmoid", "Mul"]
    assert [n.op_type for n in attribute(model.graph.node[-1], "then_branch").node] == ["Conv", "Relu", "Conv", "Relu", "Concat"]
    assert_same_outputs(before, model, feeds, rtol=0, atol=0)
