"""profiling: onnxruntime's per-node kernel times, its optimized graph, and the QDQ fusion check."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto as TP
from onnx import helper, numpy_helper

from graphopt.profiling import NodeTime, UnfusedChain, fused_op_counts, node_times, optimized_graph, same_kernels, unfused_chains
from graphopt.runtime import RuntimeSettings
from tests.helpers import make_model, seeded_feeds

RNG = np.random.default_rng(0)
ALL = RuntimeSettings(level="all", threads=1)


def scalar(name, value, dtype):
    return numpy_helper.from_array(np.array(value, dtype=dtype), name)


def qdq_conv_model(named: bool = True):
    """x -> Q -> DQ -> Conv(DQ(w int8 per channel), DQ(bias int32)) -> Q -> DQ -> y"""
    w = (RNG.standard_normal((8, 4, 3, 3)) * 0.1).astype(np.float32)
    w_scale = (np.abs(w).max(axis=(1, 2, 3)) / 127).astype(np.float32)
    x_scale = np.float32(0.05)
    bias = RNG.standard_normal(8).astype(np.float32)
    inits = [
        numpy_helper.from_array(np.round(w / w_scale[:, None, None, None]).astype(np.int8), "w_q"),
        numpy_helper.from_array(w_scale, "w_scale"),
        numpy_helper.from_array(np.zeros(8, np.int8), "w_zero"),
        numpy_helper.from_array(np.round(bias / (x_scale * w_scale)).astype(np.int32), "b_q"),
        numpy_helper.from_array((x_scale * w_scale).astype(np.float32), "b_scale"),
        scalar("x_scale", x_scale, np.float32),
        scalar("x_zero", 128, np.uint8),
        scalar("y_scale", 0.1, np.float32),
        scalar("y_zero", 128, np.uint8),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zero"], ["x_q"], name="q_x"),
        helper.make_node("DequantizeLinear", ["x_q", "x_scale", "x_zero"], ["x_dq"], name="dq_x"),
        helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zero"], ["w_dq"], name="dq_w", axis=0),
        helper.make_node("DequantizeLinear", ["b_q", "b_scale"], ["b_dq"], name="dq_b", axis=0),
        helper.make_node("Conv", ["x_dq", "w_dq", "b_dq"], ["c"], name="conv0", pads=[1, 1, 1, 1]),
        helper.make_node("QuantizeLinear", ["c", "y_scale", "y_zero"], ["c_q"], name="q_c"),
        helper.make_node("DequantizeLinear", ["c_q", "y_scale", "y_zero"], ["y"], name="dq_c"),
    ]
    if not named:
        for n in nodes:
            n.name = ""
    return make_model(
        nodes,
        [helper.make_tensor_value_info("x", TP.FLOAT, [1, 4, 16, 16])],
        [helper.make_tensor_value_info("y", TP.FLOAT, [1, 8, 16, 16])],
        inits,
    )


def qdq_unary_model(op_type: str):
    """x -> Q -> DQ -> <op_type> -> Q -> DQ -> y"""
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["x_q"], name="q_x"),
        helper.make_node("DequantizeLinear", ["x_q", "s", "z"], ["x_dq"], name="dq_x"),
        helper.make_node(op_type, ["x_dq"], ["f"], name="op"),
        helper.make_node("QuantizeLinear", ["f", "s", "z"], ["f_q"], name="q_f"),
        helper.make_node("DequantizeLinear", ["f_q", "s", "z"], ["y"], name="dq_f"),
    ]
    return make_model(
        nodes,
        [helper.make_tensor_value_info("x", TP.FLOAT, [2, 16])],
        [helper.make_tensor_value_info("y", TP.FLOAT, [2, 16])],
        [scalar("s", 0.02, np.float32), scalar("z", 128, np.uint8)],
    )


def test_qdq_conv_becomes_qlinearconv_named_after_the_conv():
    optimized = optimized_graph(qdq_conv_model(), ALL)
    assert fused_op_counts(optimized) == {"QLinearConv": 1}
    assert unfused_chains(optimized) == []
    (fused,) = [n for n in optimized.graph.node if n.op_type == "QLinearConv"]
    assert fused.name.startswith("conv0")  # "conv0_token_<n>" after the NHWC layout pass
    assert "Conv" not in [n.op_type for n in optimized.graph.node]


def test_unnamed_nodes_get_positional_names_before_onnxruntime_sees_them():
    optimized = optimized_graph(qdq_conv_model(named=False), RuntimeSettings(level="extended"))
    names = {n.op_type: n.name for n in optimized.graph.node}
    assert names["QLinearConv"] == "Conv_4"
    assert names["QuantizeLinear"] == "QuantizeLinear_0"


@pytest.mark.parametrize("op_type", ["Erf", "Sin"])
def test_op_without_integer_kernel_is_an_unfused_chain(op_type):
    optimized = optimized_graph(qdq_unary_model(op_type), ALL)
    assert unfused_chains(optimized) == [UnfusedChain(dq="dq_x", op="op", op_type=op_type, q="q_f")]
    assert fused_op_counts(optimized) == {}


def test_weight_only_dequantize_without_q_after_is_no_chain():
    """x -> MatMul(DQ(w int8)) -> y: a weight-only quantized MatMul (DQ kept as is at level disable_all)."""
    model = make_model(
        [
            helper.make_node("DequantizeLinear", ["w_q", "w_scale"], ["w"], name="dq_w"),
            helper.make_node("MatMul", ["x", "w"], ["y"], name="mm"),
        ],
        [helper.make_tensor_value_info("x", TP.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", TP.FLOAT, [2, 3])],
        [numpy_helper.from_array(RNG.integers(-127, 127, (4, 3)).astype(np.int8), "w_q"), scalar("w_scale", 0.01, np.float32)],
    )
    optimized = optimized_graph(model, RuntimeSettings(level="disable_all"))
    assert [n.op_type for n in optimized.graph.node] == ["DequantizeLinear", "MatMul"]
    assert unfused_chains(optimized) == []


def test_node_times_of_a_two_node_graph():
    """x -> Sin -> Cos -> y"""
    model = make_model(
        [helper.make_node("Sin", ["x"], ["s"], name="sin"), helper.make_node("Cos", ["s"], ["y"], name="cos")],
        [helper.make_tensor_value_info("x", TP.FLOAT, [64, 64])],
        [helper.make_tensor_value_info("y", TP.FLOAT, [64, 64])],
    )
    [times] = node_times([model], seeded_feeds(model, n=2), ALL, rounds=3)
    assert sorted((t.name, t.op_type) for t in times) == [("cos", "Cos"), ("sin", "Sin")]
    assert all(isinstance(t, NodeTime) and t.ms >= 0 for t in times)


def test_node_times_profiles_each_model_in_order():
    """Two models run in turn: each profile holds its own model's nodes, in the order the models came."""
    def unary(op):
        return make_model([helper.make_node(op, ["x"], ["y"], name=op.lower())], [helper.make_tensor_value_info("x", TP.FLOAT, [64, 64])], [helper.make_tensor_value_info("y", TP.FLOAT, [64, 64])])

    sin, tanh = unary("Sin"), unary("Tanh")
    profiles = node_times([sin, tanh, sin], seeded_feeds(sin, n=2), ALL, rounds=2)
    assert [[(t.name, t.op_type) for t in p] for p in profiles] == [[("sin", "Sin")], [("tanh", "Tanh")], [("sin", "Sin")]]


def test_node_times_sessions_do_not_spin(monkeypatch):
    """Sessions that take turns run without thread spinning (a spinning idle session steals the cores the
    running one is measured on), whatever the settings asked for."""
    from graphopt import runtime

    made = []
    real_session = runtime.session

    def session(model, settings=runtime.RuntimeSettings(), what="model"):
        made.append(settings)
        return real_session(model, settings, what)

    monkeypatch.setattr(runtime, "session", session)
    model = qdq_unary_model("Sin")
    node_times([model, model], seeded_feeds(model, n=1), ALL, rounds=1)
    assert len(made) == 2 and ALL.spinning and not any(s.spinning for s in made)


def test_node_times_needs_feeds():
    with pytest.raises(ValueError, match="at least one feed"):
        node_times([qdq_unary_model("Sin")], [], ALL)


def test_kernel_times_skip_the_warm_up_run_and_average_per_run():
    """Profiler events of three runs: the first (warm-up) is left out, the other two are averaged."""
    from graphopt.profiling import _mean_kernel_times

    def run(ts, sin_us, cos_us):
        return [
            {"cat": "Session", "name": "model_run", "ts": ts, "dur": 100},
            {"cat": "Node", "name": "sin_kernel_time", "ts": ts + 10, "dur": sin_us, "args": {"op_name": "Sin"}},
            {"cat": "Node", "name": "sin_fence_before", "ts": ts + 5, "dur": 1000, "args": {"op_name": "Sin"}},
            {"cat": "Node", "name": "cos_kernel_time", "ts": ts + 50, "dur": cos_us, "args": {"op_name": "Cos"}},
        ]

    events = run(0, 5000, 5000) + run(1000, 10, 30) + run(2000, 20, 50)
    assert _mean_kernel_times(events, runs=2) == [NodeTime("cos", "Cos", 0.04), NodeTime("sin", "Sin", 0.015)]


def conv_then(weight, op="Identity", folded=False):
    """x -> Conv(w) -> op -> y; `folded`: w stored as int8 times a scale (Cast, Mul), which onnxruntime
    folds back into a float weight at load."""
    inits, w_name, nodes = [], "w", []
    if folded:
        scale = np.abs(weight).max() / 127
        inits += [numpy_helper.from_array(np.round(weight / scale).astype(np.int8), "w_q"), scalar("w_scale", scale, np.float32)]
        nodes += [helper.make_node("Cast", ["w_q"], ["w_f"], to=TP.FLOAT), helper.make_node("Mul", ["w_f", "w_scale"], ["w"])]
    else:
        inits.append(numpy_helper.from_array(weight, w_name))
    nodes += [helper.make_node("Conv", ["x", "w"], ["c"]), helper.make_node(op, ["c"], ["y"])]
    return make_model(nodes, [helper.make_tensor_value_info("x", TP.FLOAT, [1, 2, 4, 4])], [helper.make_tensor_value_info("y", TP.FLOAT, [1, weight.shape[0], 4, 4])], inits)


def test_same_kernels_ignores_weight_values_storage_and_removed_nodes():
    w = RNG.standard_normal((3, 2, 1, 1)).astype(np.float32)
    assert same_kernels(conv_then(w), conv_then(w * 0.5), ALL)
    assert same_kernels(conv_then(w), conv_then(w, folded=True), ALL)
    assert same_kernels(conv_then(w, "Neg"), conv_then(w, "Neg", folded=True), ALL)


def test_same_kernels_tells_another_kernel_or_weight_shape():
    w = RNG.standard_normal((3, 2, 1, 1)).astype(np.float32)
    assert not same_kernels(conv_then(w), conv_then(w, "Neg"), ALL)
    assert not same_kernels(conv_then(w), conv_then(RNG.standard_normal((4, 2, 1, 1)).astype(np.float32)), ALL)
    assert not same_kernels(conv_then(w), conv_then(w, folded=True), RuntimeSettings(level="disable_all"))  # nothing folded
