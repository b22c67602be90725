"""The shared graph helpers that rewrites lean on."""

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from graphopt.graph import attribute, drop_unread

from tests.helpers import make_model


def test_attribute_value_or_default():
    node = helper.make_node("Gemm", ["a", "b"], ["y"], transB=1, alpha=0.5)
    assert attribute(node, "transB") == 1 and attribute(node, "alpha") == 0.5
    assert attribute(node, "transA", 0) == 0 and attribute(node, "beta") is None


def test_drop_unread_removes_only_unread_initializers_and_constants():
    """x -> Add(w_used) -> y ; w_unread, c_unread (Constant) and the output initializer w_out read by nothing"""
    inits = [numpy_helper.from_array(np.ones(2, np.float32), n) for n in ("w_used", "w_unread", "w_out")]
    nodes = [helper.make_node("Constant", [], ["c_unread"], value=numpy_helper.from_array(np.ones(2, np.float32))), helper.make_node("Add", ["x", "w_used"], ["y"])]
    vi = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2]) for n in ("x", "y", "w_out")]
    model = make_model(nodes, [vi[0]], vi[1:], inits)
    drop_unread(model.graph, ["w_used", "w_unread", "c_unread", "w_out"])
    assert [t.name for t in model.graph.initializer] == ["w_used", "w_out"]
    assert [n.op_type for n in model.graph.node] == ["Add"]


def test_drop_unread_keeps_a_graph_input_default():
    """w is a graph input with an initializer as its default: read by nothing, it still stays."""
    nodes = [helper.make_node("Relu", ["x"], ["y"])]
    vi = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2]) for n in ("x", "w", "y")]
    model = make_model(nodes, vi[:2], vi[2:], [numpy_helper.from_array(np.ones(2, np.float32), "w")])
    drop_unread(model.graph, ["w"])
    assert [t.name for t in model.graph.initializer] == ["w"]
