"""remove-dead-code: dead nodes, unused initializers and stale value_info go, in every graph; inputs stay."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from graphopt.graph import copy_model, initializers
from graphopt.passes.dead_code import RemoveDeadCode
from tests.helpers import assert_same_outputs, make_model, op_types, run_pass, seeded_feeds

F = TensorProto.FLOAT


def _vi(name: str, shape=(2, 3), elem=F) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, list(shape))


def _clean(model: onnx.ModelProto, feeds=None):
    before = copy_model(model)
    result = run_pass(RemoveDeadCode(), model)
    assert_same_outputs(before, model, seeded_feeds(before) if feeds is None else feeds)
    return before, result


def _branches(node: onnx.NodeProto) -> dict[str, onnx.GraphProto]:
    return {a.name: a.g for a in node.attribute}


def test_dead_chain_unused_initializer_and_stale_value_info_go():
    """x -> Relu -> y ; x -> Mul(w) -> a -> Neg -> b (unused) ; unused initializer u"""
    w = numpy_helper.from_array(np.ones((2, 3), np.float32), "w")
    u = numpy_helper.from_array(np.ones(5, np.float32), "u")
    model = make_model(
        [
            helper.make_node("Mul", ["x", "w"], ["a"]),
            helper.make_node("Relu", ["x"], ["y"]),
            helper.make_node("Neg", ["a"], ["b"]),
        ],
        [_vi("x")],
        [_vi("y")],
        [w, u],
        value_info=[_vi("a"), _vi("b"), _vi("x_kept_for_relu_is_not_here")],
    )
    _, result = _clean(model)
    assert op_types(model) == ["Relu"]
    assert not model.graph.initializer and not model.graph.value_info
    assert result.changed
    assert result.counts == {"nodes_removed": 2, "initializers_removed": 2, "value_info_removed": 3, "bytes_removed": 24 + 20}


def test_live_node_with_unused_second_output_stays():
    """x -> TopK(k) -> values -> y, indices unused"""
    k = numpy_helper.from_array(np.array([2], np.int64), "k")
    model = make_model(
        [helper.make_node("TopK", ["x", "k"], ["values", "indices"])],
        [_vi("x")],
        [_vi("values", (2, 2))],
        [k],
    )
    _, result = _clean(model)
    assert op_types(model) == ["TopK"] and list(initializers(model.graph)) == ["k"]
    assert not result.changed


def test_unused_graph_input_and_its_default_initializer_stay():
    """x -> Relu -> y ; z (input with default initializer) unused ; q (input) unused"""
    z = numpy_helper.from_array(np.zeros((2, 3), np.float32), "z")
    model = make_model([helper.make_node("Relu", ["x"], ["y"])], [_vi("x"), _vi("z"), _vi("q")], [_vi("y")], [z])
    _, result = _clean(model, feeds=[{"x": np.ones((2, 3), np.float32), "q": np.ones((2, 3), np.float32)}])
    assert [i.name for i in model.graph.input] == ["x", "z", "q"]
    assert list(initializers(model.graph)) == ["z"]
    assert not result.changed


def test_outer_tensor_read_only_in_body_stays_and_dead_body_node_goes():
    """x -> Neg -> n ; w ; cond -> If(then: Add(n, w) -> t, dead Exp(n) ; else: Identity(x) -> e) -> y"""
    w = numpy_helper.from_array(np.full((2, 3), 3.0, np.float32), "w")
    then_branch = helper.make_graph(
        [helper.make_node("Exp", ["n"], ["dead"]), helper.make_node("Add", ["n", "w"], ["t"])],
        "then", [], [_vi("t")], value_info=[_vi("dead")],
    )
    else_branch = helper.make_graph([helper.make_node("Identity", ["x"], ["e"])], "else", [], [_vi("e")])
    model = make_model(
        [helper.make_node("Neg", ["x"], ["n"]), helper.make_node("If", ["cond"], ["y"], then_branch=then_branch, else_branch=else_branch)],
        [_vi("cond", (), TensorProto.BOOL), _vi("x")],
        [_vi("y")],
        [w],
    )
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    _, result = _clean(model, feeds=[{"cond": np.array(True), "x": x}, {"cond": np.array(False), "x": x}])
    assert op_types(model) == ["Neg", "If"] and list(initializers(model.graph)) == ["w"]
    then_after = _branches(model.graph.node[1])["then_branch"]
    assert [n.op_type for n in then_after.node] == ["Add"] and not then_after.value_info
    assert result.counts == {"nodes_removed": 1, "initializers_removed": 0, "value_info_removed": 1, "bytes_removed": 0}


def test_dead_if_frees_the_outer_initializer_its_body_read():
    """x -> Relu -> y ; cond -> If(then: Add(x, w) ; else: Sub(x, w)) -> unused"""
    w = numpy_helper.from_array(np.ones((2, 3), np.float32), "w")
    then_branch = helper.make_graph([helper.make_node("Add", ["x", "w"], ["t"])], "then", [], [_vi("t")])
    else_branch = helper.make_graph([helper.make_node("Sub", ["x", "w"], ["e"])], "else", [], [_vi("e")])
    model = make_model(
        [
            helper.make_node("If", ["cond"], ["unused"], then_branch=then_branch, else_branch=else_branch),
            helper.make_node("Relu", ["x"], ["y"]),
        ],
        [_vi("cond", (), TensorProto.BOOL), _vi("x")],
        [_vi("y")],
        [w],
    )
    _, result = _clean(model, feeds=[{"cond": np.array(True), "x": np.ones((2, 3), np.float32)}])
    assert op_types(model) == ["Relu"] and not model.graph.initializer
    assert result.counts["nodes_removed"] == 3  # If and the two body nodes
    assert result.counts["initializers_removed"] == 1 and result.counts["bytes_removed"] == 24
    assert [i.name for i in model.graph.input] == ["cond", "x"]


def test_loop_body_outputs_keep_their_producers_and_unused_body_initializer_goes():
    """trip, cond, acc -> Loop(body: Identity(cond) ; Add(acc, s) -> acc_out ; dead Mul(acc, s) ; unused init u) -> total"""
    s = numpy_helper.from_array(np.array([1.5], np.float32), "s")
    u = numpy_helper.from_array(np.zeros(4, np.float32), "u")
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node("Mul", ["acc", "s"], ["dead"]),
            helper.make_node("Add", ["acc", "s"], ["acc_out"]),
        ],
        "body",
        [_vi("i", (), TensorProto.INT64), _vi("cond_in", (), TensorProto.BOOL), _vi("acc", (1,))],
        [_vi("cond_out", (), TensorProto.BOOL), _vi("acc_out", (1,))],
        [s, u],
    )
    model = make_model(
        [helper.make_node("Loop", ["trip", "cond", "start"], ["total"], body=body)],
        [_vi("trip", (), TensorProto.INT64), _vi("cond", (), TensorProto.BOOL), _vi("start", (1,))],
        [_vi("total", (1,))],
    )
    feeds = [{"trip": np.array(3, np.int64), "cond": np.array(True), "start": np.zeros(1, np.float32)}]
    _, result = _clean(model, feeds)
    body_after = model.graph.node[0].attribute[0].g
    assert [n.op_type for n in body_after.node] == ["Identity", "Add"]
    assert list(initializers(body_after)) == ["s"]
    assert result.counts == {"nodes_removed": 1, "initializers_removed": 1, "value_info_removed": 0, "bytes_removed": 16}


def test_initializer_that_is_a_graph_output_stays():
    """c (initializer) -> graph output ; x -> Relu -> y"""
    c = numpy_helper.from_array(np.ones(2, np.float32), "c")
    model = make_model([helper.make_node("Relu", ["x"], ["y"])], [_vi("x")], [_vi("y"), _vi("c", (2,))], [c])
    _, result = _clean(model)
    assert list(initializers(model.graph)) == ["c"] and not result.changed
