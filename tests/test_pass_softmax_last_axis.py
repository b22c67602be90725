"""softmax-last-axis: Softmax / LogSoftmax over a non-last axis is written as Transpose, the op over the last
axis, Transpose back; the result is the same bit for bit."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphopt.graph import attribute, copy_model
from graphopt.passes.softmax_last_axis import SoftmaxLastAxis
from tests.helpers import assert_same_outputs, make_model, op_types, run_pass, seeded_feeds

F = TensorProto.FLOAT


def softmax_model(op: str = "Softmax", axis: int = 1, shape=(2, 5, 3, 4), opset: int = 17, ranked: bool = True) -> onnx.ModelProto:
    """x -> Relu -> op(axis) -> y; unranked: x = Reshape(w, s) of graph inputs w, s (onnx cannot infer its rank)"""
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node(op, ["r"], ["y"], name="norm", axis=axis)]
    if ranked:
        inputs = [helper.make_tensor_value_info("x", F, list(shape))]
    else:
        inputs = [helper.make_tensor_value_info("w", F, ["M"]), helper.make_tensor_value_info("s", TensorProto.INT64, ["K"])]
        nodes.insert(0, helper.make_node("Reshape", ["w", "s"], ["x"]))
    return make_model(nodes, inputs, [helper.make_tensor_value_info("y", F, ["d"] * len(shape))], opset=opset)


def perms(model: onnx.ModelProto) -> list[list[int]]:
    return [list(attribute(n, "perm")) for n in model.graph.node if n.op_type == "Transpose"]


def assert_bit_identical(before: onnx.ModelProto, after: onnx.ModelProto, feeds) -> None:
    assert_same_outputs(before, after, feeds, rtol=0, atol=0)


@pytest.mark.parametrize("op", ["Softmax", "LogSoftmax"])
@pytest.mark.parametrize("axis", [1, -3])
def test_the_op_moves_to_the_last_axis_between_two_transposes(op, axis):
    model = softmax_model(op, axis)
    before = copy_model(model)
    feeds = seeded_feeds(model, n=2)
    result = run_pass(SoftmaxLastAxis(), model, feeds)
    assert result.counts == {"ops_rewritten": 1, "transposes_merged": 0}
    assert op_types(model) == ["Relu", "Transpose", op, "Transpose"]
    assert perms(model) == [[0, 2, 3, 1], [0, 3, 1, 2]]
    assert attribute(model.graph.node[2], "axis") == 3
    assert [o.name for o in model.graph.output] == ["y"]
    assert_bit_identical(before, model, feeds)


def dfl_model(extra_reader: bool = False) -> onnx.ModelProto:
    """YOLOv8's DFL head: [B, 64, A] -> Reshape [B, 4, 16, A] -> Transpose [B, 16, 4, A] -> Softmax(axis=1)
    -> Conv 1x1 with weights 0..15 -> [B, 1, 4, A]"""
    nodes = [
        helper.make_node("Reshape", ["x", "shape"], ["bins"]),
        helper.make_node("Transpose", ["bins"], ["t"], perm=[0, 2, 1, 3]),
        helper.make_node("Softmax", ["t"], ["p"], name="dfl", axis=1),
        helper.make_node("Conv", ["p", "w"], ["y"], kernel_shape=[1, 1]),
    ]
    outputs = [helper.make_tensor_value_info("y", F, [1, 1, 4, 21])]
    if extra_reader:
        outputs.append(helper.make_tensor_value_info("t", F, [1, 16, 4, 21]))
    inits = [numpy_helper.from_array(np.array([1, 4, 16, 21], np.int64), "shape"), numpy_helper.from_array(np.arange(16, dtype=np.float32).reshape(1, 16, 1, 1), "w")]
    return make_model(nodes, [helper.make_tensor_value_info("x", F, [1, 64, 21])], outputs, inits)


def test_a_transpose_before_the_op_read_only_by_it_is_merged():
    model = dfl_model()
    before = copy_model(model)
    feeds = seeded_feeds(model, n=2)
    assert run_pass(SoftmaxLastAxis(), model, feeds).counts == {"ops_rewritten": 1, "transposes_merged": 1}
    assert op_types(model) == ["Reshape", "Transpose", "Softmax", "Transpose", "Conv"]
    assert perms(model) == [[0, 1, 3, 2], [0, 3, 1, 2]]  # [B, 4, A, 16], and back to [B, 16, 4, A] for the Conv
    assert_bit_identical(before, model, feeds)


def test_a_transpose_before_the_op_that_others_read_stays():
    model = dfl_model(extra_reader=True)
    before = copy_model(model)
    feeds = seeded_feeds(model, n=2)
    assert run_pass(SoftmaxLastAxis(), model, feeds).counts == {"ops_rewritten": 1, "transposes_merged": 0}
    assert perms(model) == [[0, 2, 1, 3], [0, 2, 3, 1], [0, 3, 1, 2]]
    assert_bit_identical(before, model, feeds)


@pytest.mark.parametrize("axis", [3, -1])
def test_an_op_over_the_last_axis_is_left_alone(axis):
    model = softmax_model(axis=axis)
    before = copy_model(model)
    result = run_pass(SoftmaxLastAxis(), model)
    assert not result.changed and not result.refused and model == before


def test_before_opset_13_the_op_already_normalizes_trailing_dims_and_is_left_alone():
    """Softmax-11 with axis=1 normalizes over dims 1.. flattened into one row: already the last dims in memory."""
    model = softmax_model(axis=1, opset=12)
    before = copy_model(model)
    result = run_pass(SoftmaxLastAxis(), model)
    assert not result.changed and not result.refused and model == before


def test_an_input_of_unknown_rank_is_refused():
    model = softmax_model(ranked=False)
    result = run_pass(SoftmaxLastAxis(), model, feeds=[])
    assert not result.changed and op_types(model) == ["Reshape", "Relu", "Softmax"]
    assert result.refused == ["Softmax 'norm': the rank of its input is not known: onnx shape inference gives no shape for r, and it was not observed (no calibration feeds)"]


def test_an_op_inside_an_if_branch_is_refused():
    """Ranks inside bodies are never confirmed by a run (graphopt.shapes)."""
    branch = lambda name: helper.make_graph(  # noqa: E731
        [helper.make_node("Softmax", ["x"], [f"{name}_y"], name=f"{name}_norm", axis=0)], name, [], [helper.make_tensor_value_info(f"{name}_y", F, ["a", "b"])]
    )
    nodes = [helper.make_node("If", ["c"], ["y"], then_branch=branch("then"), else_branch=branch("else"))]
    inputs = [helper.make_tensor_value_info("c", TensorProto.BOOL, []), helper.make_tensor_value_info("x", F, [3, 4])]
    model = make_model(nodes, inputs, [helper.make_tensor_value_info("y", F, ["a", "b"])])
    result = run_pass(SoftmaxLastAxis(), model)
    assert not result.changed
    assert sorted(result.refused) == [f"Softmax '{b}_norm': the rank of its input is not known: shapes inside If/Loop/Scan bodies are not observed" for b in ("else", "then")]
