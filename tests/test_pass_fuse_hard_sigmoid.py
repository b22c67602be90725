"""fuse-hard-sigmoid: hard sigmoid / hard swish spelled out in Add, Clip, Mul, Div become HardSigmoid (+ Mul)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from graphopt.graph import copy_model
from graphopt.passes.fuse_hard_sigmoid import FuseHardSigmoid
from tests.helpers import assert_same_outputs, make_model, op_types, run_pass

F = TensorProto.FLOAT
SHAPE = [2, 4, 5, 5]


def vi(name: str) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, F, SHAPE)


def scalar(name: str, value: float) -> onnx.TensorProto:
    return numpy_helper.from_array(np.array(value, np.float32), name)


def wide_feeds(n: int = 2) -> list[dict[str, np.ndarray]]:
    """x in [-8, 8]: below -3, inside and above 3, so both ends of the clip are exercised."""
    rng = np.random.default_rng(0)
    return [{"x": rng.uniform(-8, 8, SHAPE).astype(np.float32)} for _ in range(n)]


def fuse(model: onnx.ModelProto, compare: bool = True):
    before = copy_model(model)
    result = run_pass(FuseHardSigmoid(), model, wide_feeds())
    if compare:
        assert_same_outputs(before, model, wide_feeds())
    return result


def hard_swish_model() -> onnx.ModelProto:
    """Paddle's export: x -> Add(x, 3) -> Clip(0, 6) -> Mul(x, .) -> Div(., 6) -> y"""
    nodes = [
        helper.make_node("Add", ["x", "three"], ["a"], name="add"),
        helper.make_node("Clip", ["a", "zero", "six"], ["c"], name="clip"),
        helper.make_node("Mul", ["x", "c"], ["m"], name="mul"),
        helper.make_node("Div", ["m", "six"], ["y"], name="div"),
    ]
    return make_model(nodes, [vi("x")], [vi("y")], [scalar("three", 3), scalar("zero", 0), scalar("six", 6)])


def test_hard_swish_becomes_hard_sigmoid_times_x():
    model = hard_swish_model()
    result = fuse(model)
    assert op_types(model) == ["HardSigmoid", "Mul"]
    hs, mul = model.graph.node
    assert list(hs.input) == ["x"] and list(mul.input) == ["x", hs.output[0]] and list(mul.output) == ["y"]
    attrs = {a.name: a.f for a in hs.attribute}
    assert np.isclose(attrs["alpha"], 1 / 6) and attrs["beta"] == 0.5
    assert result.counts == {"hard_sigmoid": 0, "hard_swish": 1, "nodes_removed": 2}


def test_hard_sigmoid_with_a_multiply_by_a_sixth_and_clip_attributes_at_opset_10():
    """y = Mul(1/6, Clip(Add(3, x), min=0, max=6)): operands swapped, Clip's bounds as attributes."""
    nodes = [
        helper.make_node("Add", ["three", "x"], ["a"]),
        helper.make_node("Clip", ["a"], ["c"], min=0.0, max=6.0),
        helper.make_node("Mul", ["sixth", "c"], ["y"]),
    ]
    model = make_model(nodes, [vi("x")], [vi("y")], [scalar("three", 3), scalar("sixth", 1 / 6)], opset=10)
    result = fuse(model)
    assert op_types(model) == ["HardSigmoid"] and list(model.graph.node[0].output) == ["y"]
    assert result.counts["hard_sigmoid"] == 1


def test_a_shared_intermediate_is_refused():
    """The Clip's output is also a graph output: it must keep existing, so nothing is rewritten."""
    model = hard_swish_model()
    model.graph.output.append(vi("c"))
    result = fuse(model)
    assert not result.changed and op_types(model) == ["Add", "Clip", "Mul", "Div"]
    assert result.refused == ["hard swish ending in 'div': c is also read elsewhere or is a graph output"]


def test_other_constants_are_not_the_pattern():
    """Clip(x + 3, 0, 5) / 6 is some other function: left alone, and no refusal is recorded."""
    model = hard_swish_model()
    model.graph.initializer.append(scalar("five", 5))
    model.graph.node[1].input[2] = "five"
    result = fuse(model, compare=False)
    assert not result.changed and result.refused == [] and op_types(model) == ["Add", "Clip", "Mul", "Div"]


def test_a_constant_that_could_broadcast_to_more_dims_is_not_the_pattern():
    """Add(x, 3 of shape [1, 1, 1, 1, 1]) would make the result rank 5: HardSigmoid(x) would not."""
    model = hard_swish_model()
    model.graph.initializer.append(numpy_helper.from_array(np.full([1] * 5, 3, np.float32), "three_5d"))
    model.graph.node[0].input[1] = "three_5d"
    result = fuse(model, compare=False)
    assert not result.changed and op_types(model) == ["Add", "Clip", "Mul", "Div"]


def test_a_hard_swish_inside_an_if_body_is_fused():
    """The then-branch computes the hard swish of the outer x; the else-branch returns x."""
    body_nodes = [
        helper.make_node("Add", ["x", "three"], ["a"]),
        helper.make_node("Clip", ["a", "zero", "six"], ["c"]),
        helper.make_node("Mul", ["c", "x"], ["m"]),
        helper.make_node("Div", ["m", "six"], ["t"]),
    ]
    then_branch = helper.make_graph(body_nodes, "then", [], [vi("t")], [scalar("three", 3), scalar("zero", 0), scalar("six", 6)])
    else_branch = helper.make_graph([helper.make_node("Identity", ["x"], ["e"])], "else", [], [vi("e")])
    nodes = [helper.make_node("If", ["flag"], ["y"], then_branch=then_branch, else_branch=else_branch)]
    model = make_model(nodes, [vi("x"), helper.make_tensor_value_info("flag", TensorProto.BOOL, [])], [vi("y")])
    before = copy_model(model)
    feeds = [{**f, "flag": np.array(True)} for f in wide_feeds()]
    result = run_pass(FuseHardSigmoid(), model, feeds)
    assert result.counts["hard_swish"] == 1
    then_body = next(a.g for a in model.graph.node[0].attribute if a.name == "then_branch")
    assert [n.op_type for n in then_body.node] == ["HardSigmoid", "Mul"]
    assert_same_outputs(before, model, feeds)
