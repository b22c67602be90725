"""inspect_model / format_inspect on tiny graphs: counts, parameters, shared weights, MACs worked out by hand."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphopt.errors import UserError
from graphopt.inspect import format_inspect, inspect_model
from tests.helpers import make_model


def _info(name: str, shape, elem: int = TensorProto.FLOAT) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, shape)


def _init(shape, name: str, dtype=np.float32) -> onnx.TensorProto:
    return numpy_helper.from_array(np.random.default_rng(len(name)).standard_normal(shape).astype(dtype), name)


@pytest.fixture
def conv_gemm_model() -> onnx.ModelProto:
    """x[1,3,8,8] -> Conv(w[4,3,3,3], pad 1) -> Relu -> Flatten -> Gemm(g[256,10], bias) -> y[1,10]"""
    return make_model(
        [
            helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], name="conv"),
            helper.make_node("Relu", ["c"], ["r"]),
            helper.make_node("Flatten", ["r"], ["f"]),
            helper.make_node("Gemm", ["f", "g", "bias"], ["y"], name="fc"),
        ],
        [_info("x", [1, 3, 8, 8])],
        [_info("y", [1, 10])],
        [_init([4, 3, 3, 3], "w"), _init([256, 10], "g"), _init([10], "bias")],
    )


def test_header_inputs_outputs_and_file(conv_gemm_model):
    conv_gemm_model.producer_name, conv_gemm_model.producer_version = "unit", "1.0"
    info = inspect_model(conv_gemm_model, file_size=1234, external_data=["weights.bin"], shapes=None)
    json.dumps(info)
    assert info["ir_version"] == conv_gemm_model.ir_version
    assert info["producer"] == {"name": "unit", "version": "1.0"}
    assert info["opsets"] == {"ai.onnx": 17}
    assert info["inputs"] == [{"name": "x", "dtype": "float32", "shape": [1, 3, 8, 8]}]
    assert info["outputs"] == [{"name": "y", "dtype": "float32", "shape": [1, 10]}]
    assert info["file"] == {"size": 1234, "external_data": ["weights.bin"]}


def test_conv_and_gemm_macs_by_hand(conv_gemm_model):
    macs = inspect_model(conv_gemm_model)["macs"]
    conv = (1 * 4 * 8 * 8) * (3 * 3 * 3)  # output elements x (in channels x kernel)
    gemm = 1 * 10 * 256  # M x N x K
    assert macs["by_op"] == {"Conv": conv, "Gemm": gemm}
    assert macs["total"] == conv + gemm == 9472
    assert (macs["nodes_counted"], macs["nodes_unknown_shapes"]) == (2, 0)


def test_grouped_conv_conv_transpose_transposed_gemm_and_batched_matmul():
    """x[1,4,8,8] -> Conv(group 2, w[4,2,3,3]) -> ConvTranspose(wt[4,3,3,3]) -> y1;  a[5,2] -> Gemm(transA, b[5,3]) -> y2;  m[2,4,5] -> MatMul(k[5,6]) -> y3"""
    model = make_model(
        [
            helper.make_node("Conv", ["x", "w"], ["c"], group=2),
            helper.make_node("ConvTranspose", ["c", "wt"], ["y1"]),
            helper.make_node("Gemm", ["a", "b"], ["y2"], transA=1),
            helper.make_node("MatMul", ["m", "k"], ["y3"]),
        ],
        [_info("x", [1, 4, 8, 8]), _info("a", [5, 2]), _info("m", [2, 4, 5])],
        [_info("y1", [1, 3, 8, 8]), _info("y2", [2, 3]), _info("y3", [2, 4, 6])],
        [_init([4, 2, 3, 3], "w"), _init([4, 3, 3, 3], "wt"), _init([5, 3], "b"), _init([5, 6], "k")],
    )
    assert inspect_model(model)["macs"]["by_op"] == {
        "Conv": (1 * 4 * 6 * 6) * (2 * 3 * 3),  # 2592: each output sees in_channels / group
        "ConvTranspose": (1 * 4 * 6 * 6) * (3 * 3 * 3),  # 3888: each input element spreads over out_channels x kernel
        "Gemm": 2 * 3 * 5,  # A is [K, M] with transA
        "MatMul": (2 * 4 * 6) * 5,
    }


@pytest.fixture
def symbolic_matmul_model() -> onnx.ModelProto:
    """x[batch, 5] -> MatMul(k[5,6]) -> y[batch, 6]"""
    return make_model(
        [helper.make_node("MatMul", ["x", "k"], ["y"], name="mm")],
        [_info("x", ["batch", 5])],
        [_info("y", ["batch", 6])],
        [_init([5, 6], "k")],
    )


def test_symbolic_dims_leave_macs_unknown_until_pinned(symbolic_matmul_model):
    info = inspect_model(symbolic_matmul_model)
    assert info["inputs"][0]["shape"] == ["batch", 5]
    assert info["macs"]["total"] == 0
    assert (info["macs"]["nodes_unknown_shapes"], info["macs"]["unknown_nodes"]) == (1, ["mm"])
    assert "pin input shapes" in format_inspect(info)


@pytest.mark.parametrize("pins", [{"batch": [3]}, {"x": [3, 5]}])
def test_pins_by_symbolic_dim_name_or_by_input_name(symbolic_matmul_model, pins):
    macs = inspect_model(symbolic_matmul_model, shapes=pins)["macs"]
    assert macs["total"] == 3 * 6 * 5
    assert macs["nodes_unknown_shapes"] == 0
    assert macs["pinned"] == pins


@pytest.mark.parametrize(
    ("pins", "message"),
    [
        ({"images": [1, 5]}, "neither a graph input"),
        ({"x": [3]}, "rank 2"),
        ({"x": [3, 4]}, "contradicts its fixed shape"),
        ({"batch": [1, 2]}, "give one value"),
        ({"batch": [0]}, "must be positive"),
    ],
)
def test_bad_pins_are_user_errors(symbolic_matmul_model, pins, message):
    with pytest.raises(UserError, match=message):
        inspect_model(symbolic_matmul_model, shapes=pins)


def test_node_counts_include_subgraphs_and_qualify_custom_domains():
    """cond -> If(then: x -> MatMul(k) -> Relu, else: x -> Neg) -> y;  x -> com.example::Custom -> z"""
    then_branch = helper.make_graph(
        [helper.make_node("MatMul", ["x", "k"], ["t"]), helper.make_node("Relu", ["t"], ["then_y"])], "then", [], [_info("then_y", [2, 2])]
    )
    else_branch = helper.make_graph([helper.make_node("Neg", ["x"], ["else_y"])], "else", [], [_info("else_y", [2, 2])])
    graph = helper.make_graph(
        [
            helper.make_node("If", ["cond"], ["y"], then_branch=then_branch, else_branch=else_branch),
            helper.make_node("Custom", ["x"], ["z"], domain="com.example"),
        ],
        "test",
        [_info("cond", [], TensorProto.BOOL), _info("x", [2, 2])],
        [_info("y", [2, 2]), _info("z", [2, 2])],
        initializer=[_init([2, 2], "k")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)])
    info = inspect_model(model)
    assert info["opsets"] == {"ai.onnx": 17, "com.example": 1}
    assert info["nodes"]["total"] == 5
    assert info["nodes"]["subgraphs"] == 2
    assert info["nodes"]["by_op"] == {"If": 1, "com.example::Custom": 1, "MatMul": 1, "Relu": 1, "Neg": 1}
    assert info["macs"]["nodes_in_subgraphs_not_counted"] == 1
    assert "1 nodes inside If/Loop/Scan bodies not counted" in format_inspect(info)


def test_parameters_per_dtype_count_initializers_and_constant_nodes():
    """x -> Add(w float32[2,3]) -> Cast(f16) -> Mul(Constant float16[3]) -> y;  Constant(value_ints [3]) -> shape (graph output)"""
    model = make_model(
        [
            helper.make_node("Add", ["x", "w"], ["a"]),
            helper.make_node("Cast", ["a"], ["h"], to=TensorProto.FLOAT16),
            helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(np.ones(3, np.float16), "c")),
            helper.make_node("Mul", ["h", "c"], ["y"]),
            helper.make_node("Constant", [], ["shape"], value_ints=[1, 2, 3]),
        ],
        [_info("x", [2, 3])],
        [_info("y", [2, 3], TensorProto.FLOAT16), _info("shape", [3], TensorProto.INT64)],
        [_init([2, 3], "w")],
    )
    params = inspect_model(model)["parameters"]
    assert params["by_dtype"] == {
        "float32": {"count": 6, "bytes": 24},
        "int64": {"count": 3, "bytes": 24},
        "float16": {"count": 3, "bytes": 6},
    }
    assert (params["tensors"], params["count"], params["bytes"]) == (3, 12, 54)


def test_duplicates_and_transposed_copies_are_reported_with_savings():
    """x -> Add(a) -> Mul(b == a) -> MatMul(w[3,5]) -> MatMul(w_t == w.T) -> y;  p (also a graph input) == a"""
    a = np.arange(3, dtype=np.float32)
    w = np.random.default_rng(0).standard_normal((3, 5)).astype(np.float32)
    model = make_model(
        [
            helper.make_node("Add", ["x", "a"], ["t1"]),
            helper.make_node("Mul", ["t1", "b"], ["t2"]),
            helper.make_node("Sub", ["t2", "p"], ["t3"]),
            helper.make_node("MatMul", ["t3", "w"], ["h"]),
            helper.make_node("MatMul", ["h", "w_t"], ["y"]),
        ],
        [_info("x", [2, 3]), _info("p", [3])],
        [_info("y", [2, 3])],
        [
            numpy_helper.from_array(a, "a"),
            numpy_helper.from_array(a.copy(), "b"),
            numpy_helper.from_array(a.copy(), "p"),
            numpy_helper.from_array(w, "w"),
            numpy_helper.from_array(np.ascontiguousarray(w.T), "w_t"),
        ],
    )
    info = inspect_model(model)
    shared = info["shared_weights"]
    assert shared["savable_bytes"] == 12 + 60
    assert [(g["members"], g["copies"]) for g in shared["groups"]] == [
        (["a", "b"], [{"name": "b", "source": "a", "kind": "duplicate"}]),
        (["w", "w_t"], [{"name": "w_t", "source": "w", "kind": "transpose", "perm": [1, 0]}]),
    ]
    assert shared["blocked_by_graph_inputs"] == [
        {"graph": "main", "graph_inputs": ["p"], "name": "p", "source": "a", "kind": "duplicate"}
    ]
    assert info["overridable_initializers"] == ["p"]
    assert [i["name"] for i in info["inputs"]] == ["x"]
    text = format_inspect(info)
    assert "folding would save 72 B" in text
    assert "w_t = Transpose(w, perm=[1, 0])" in text
    assert "not foldable: p is a graph input" in text


def test_inspect_does_not_change_the_model(conv_gemm_model):
    before = conv_gemm_model.SerializeToString()
    inspect_model(conv_gemm_model, shapes={"x": [1, 3, 8, 8]})
    assert conv_gemm_model.SerializeToString() == before


def test_input_pin_gives_an_unknown_rank_input_its_shape():
    """x (rank unknown) -> MatMul(k[5,6]) -> y   (built without the checker, which wants input shapes)"""
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "k"], ["y"])],
        "test",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
        [_info("y", None)],
        initializer=[_init([5, 6], "k")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert inspect_model(model)["inputs"][0]["shape"] is None
    assert inspect_model(model, shapes={"x": [2, 5]})["macs"]["total"] == 2 * 6 * 5
