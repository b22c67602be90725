"""lift-constants: Constant nodes become initializers (main graph and bodies); refusals carry reasons."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphopt.graph import copy_model, initializers
from graphopt.passes.lift_constants import LiftConstants
from tests.helpers import assert_same_outputs, make_model, op_types, ort_outputs, run_pass, seeded_feeds



def _lift(model: onnx.ModelProto):
    before = copy_model(model)
    result = run_pass(LiftConstants(), model)
    return before, result


@pytest.fixture
def weight_model() -> onnx.ModelProto:
    """x -> Add(Constant W) -> y"""
    w = numpy_helper.from_array(np.arange(3, dtype=np.float32), "w_value")
    return make_model(
        [helper.make_node("Constant", [], ["w"], value=w, name="const_w"), helper.make_node("Add", ["x", "w"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
    )


def test_value_tensor_becomes_initializer_named_after_output(weight_model):
    before, result = _lift(weight_model)
    assert result.changed
    assert result.counts == {"constants_lifted": 1, "bytes_lifted": 12}
    assert op_types(weight_model) == ["Add"]
    lifted = initializers(weight_model.graph)["w"]
    np.testing.assert_array_equal(numpy_helper.to_array(lifted), np.arange(3, dtype=np.float32))
    assert_same_outputs(before, weight_model, seeded_feeds(before))


@pytest.mark.parametrize(
    ("attribute", "value", "dtype", "shape"),
    [
        ("value_float", 2.5, np.float32, ()),
        ("value_floats", [1.0, -2.0], np.float32, (2,)),
        ("value_int", 7, np.int64, ()),
        ("value_ints", [3, 4, 5], np.int64, (3,)),
    ],
)
def test_scalar_and_list_attributes_become_typed_initializers(attribute, value, dtype, shape):
    """Constant(attribute) -> c (graph output) -> Identity -> y"""
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    model = make_model(
        [helper.make_node("Constant", [], ["c"], **{attribute: value}), helper.make_node("Identity", ["c"], ["y"])],
        [],
        [helper.make_tensor_value_info("c", elem, list(shape)), helper.make_tensor_value_info("y", elem, list(shape))],
    )
    before, result = _lift(model)
    assert result.changed and result.counts["constants_lifted"] == 1
    lifted = numpy_helper.to_array(initializers(model.graph)["c"])
    assert lifted.dtype == dtype and lifted.shape == shape
    np.testing.assert_array_equal(lifted, np.asarray(value, dtype=dtype))
    assert_same_outputs(before, model, [{}])


def test_string_constants_lift_and_run():
    """Constant(value_string) -> s (graph output); Constant(value_strings) -> Identity -> t"""
    model = make_model(
        [
            helper.make_node("Constant", [], ["s"], value_string="hello"),
            helper.make_node("Constant", [], ["ss"], value_strings=["a", "bc"]),
            helper.make_node("Identity", ["ss"], ["t"]),
        ],
        [],
        [helper.make_tensor_value_info("s", TensorProto.STRING, []), helper.make_tensor_value_info("t", TensorProto.STRING, [2])],
    )
    before, result = _lift(model)
    assert result.counts == {"constants_lifted": 2, "bytes_lifted": len("hello") + len("abc")}
    onnx.checker.check_model(model, full_check=True)
    [ref], [got] = ort_outputs(before, [{}]), ort_outputs(model, [{}])
    assert list(got) == ["s", "t"]
    for name in ref:
        np.testing.assert_array_equal(got[name], ref[name])


@pytest.fixture
def if_model() -> onnx.ModelProto:
    """cond, x -> If(then: Constant k -> Add(x, k) -> t ; else: Constant e -> e) -> y"""
    k = numpy_helper.from_array(np.full(3, 10.0, np.float32), "k")
    e = numpy_helper.from_array(np.full(3, -1.0, np.float32), "e")
    then_branch = helper.make_graph(
        [helper.make_node("Constant", [], ["k"], value=k), helper.make_node("Add", ["x", "k"], ["t"])],
        "then", [], [helper.make_tensor_value_info("t", TensorProto.FLOAT, [3])],
    )
    else_branch = helper.make_graph(
        [helper.make_node("Constant", [], ["e"], value=e)], "else", [], [helper.make_tensor_value_info("e", TensorProto.FLOAT, [3])]
    )
    return make_model(
        [helper.make_node("If", ["cond"], ["y"], then_branch=then_branch, else_branch=else_branch)],
        [helper.make_tensor_value_info("cond", TensorProto.BOOL, []), helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])],
    )


def test_constants_in_if_bodies_become_body_initializers(if_model):
    before, result = _lift(if_model)
    assert result.counts["constants_lifted"] == 2
    branches = {a.name: a.g for a in if_model.graph.node[0].attribute}
    then_branch, else_branch = branches["then_branch"], branches["else_branch"]
    assert [n.op_type for n in then_branch.node] == ["Add"] and list(initializers(then_branch)) == ["k"]
    assert len(else_branch.node) == 0 and list(initializers(else_branch)) == ["e"]
    assert not if_model.graph.initializer
    x = np.arange(3, dtype=np.float32)
    assert_same_outputs(before, if_model, [{"cond": np.array(True), "x": x}, {"cond": np.array(False), "x": x}])


def test_outer_constant_read_only_inside_a_body_becomes_outer_initializer():
    """Constant k ; cond, x -> If(then: Add(x, k) -> t ; else: Sub(x, k) -> e) -> y"""
    k = numpy_helper.from_array(np.full(3, 2.0, np.float32), "k")
    then_branch = helper.make_graph([helper.make_node("Add", ["x", "k"], ["t"])], "then", [], [helper.make_tensor_value_info("t", TensorProto.FLOAT, [3])])
    else_branch = helper.make_graph([helper.make_node("Sub", ["x", "k"], ["e"])], "else", [], [helper.make_tensor_value_info("e", TensorProto.FLOAT, [3])])
    model = make_model(
        [helper.make_node("Constant", [], ["k"], value=k), helper.make_node("If", ["cond"], ["y"], then_branch=then_branch, else_branch=else_branch)],
        [helper.make_tensor_value_info("cond", TensorProto.BOOL, []), helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])],
    )
    before, result = _lift(model)
    assert result.counts["constants_lifted"] == 1
    assert op_types(model) == ["If"] and list(initializers(model.graph)) == ["k"]
    x = np.arange(3, dtype=np.float32)
    assert_same_outputs(before, model, [{"cond": np.array(True), "x": x}, {"cond": np.array(False), "x": x}])


def test_constant_in_loop_body_becomes_body_initializer():
    """trip, cond -> Loop(body: Constant s -> Add(acc, s) -> acc_out) -> total"""
    step = numpy_helper.from_array(np.array([1.5], np.float32), "s")
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node("Constant", [], ["s"], value=step),
            helper.make_node("Add", ["acc", "s"], ["acc_out"]),
        ],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("acc", TensorProto.FLOAT, [1]),
        ],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []), helper.make_tensor_value_info("acc_out", TensorProto.FLOAT, [1])],
    )
    model = make_model(
        [helper.make_node("Loop", ["trip", "cond", "start"], ["total"], body=body)],
        [
            helper.make_tensor_value_info("trip", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
            helper.make_tensor_value_info("start", TensorProto.FLOAT, [1]),
        ],
        [helper.make_tensor_value_info("total", TensorProto.FLOAT, [1])],
    )
    before, result = _lift(model)
    assert result.counts["constants_lifted"] == 1
    assert list(initializers(model.graph.node[0].attribute[0].g)) == ["s"]
    feeds = [{"trip": np.array(4, np.int64), "cond": np.array(True), "start": np.zeros(1, np.float32)}]
    assert_same_outputs(before, model, feeds)


def test_sparse_constant_is_refused_and_kept():
    """Constant(sparse_value) -> Add(x) -> y"""
    values = numpy_helper.from_array(np.array([5.0], np.float32), "sp")
    indices = numpy_helper.from_array(np.array([1], np.int64), "sp_idx")
    sparse = helper.make_sparse_tensor(values, indices, [3])
    model = make_model(
        [helper.make_node("Constant", [], ["sp"], sparse_value=sparse, name="sparse_c"), helper.make_node("Add", ["x", "sp"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])],
    )
    before, result = _lift(model)
    assert not result.changed
    assert len(result.refused) == 1 and "sparse_c" in result.refused[0] and "sparse_value" in result.refused[0]
    assert model == before


def test_ir_version_3_is_refused_because_initializers_must_be_inputs():
    """x -> Add(Constant w) -> y, IR version 3 / opset 8"""
    w = numpy_helper.from_array(np.ones(3, np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Constant", [], ["w"], value=w), helper.make_node("Add", ["x", "w"], ["y"])],
        "ir3",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 8)], ir_version=3)
    onnx.checker.check_model(model, full_check=True)
    before, result = _lift(model)
    assert not result.changed
    assert result.refused == [
        "model IR version 3 requires initializers to be graph inputs, which would make 1 lifted constant(s) "
        "overridable inputs; re-export with IR version >= 4"
    ]
    assert model == before


def test_model_without_constants_is_unchanged():
    """x -> Relu -> y"""
    model = make_model(
        [helper.make_node("Relu", ["x"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])],
    )
    before, result = _lift(model)
    assert not result.changed and result.counts == {"constants_lifted": 0, "bytes_lifted": 0}
    assert model == before
