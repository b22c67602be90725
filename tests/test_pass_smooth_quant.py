"""smooth-quant: per-channel scales moved from activations with outlier channels into MatMul/Gemm weights."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto as TP
from onnx import helper, numpy_helper

from graphopt.activations import intermediates
from graphopt.graph import constant_value, copy_model
from graphopt.passes.smooth_quant import SmoothQuant
from graphopt.passes_base import make_pass
from tests.helpers import assert_same_outputs, make_model, op_types, run_pass, seeded_feeds

RNG = np.random.default_rng(0)
C = 32


def floats(name, shape, scale=1.0):
    return numpy_helper.from_array((RNG.standard_normal(shape) * scale).astype(np.float32), name)


def vi(name, shape):
    return helper.make_tensor_value_info(name, TP.FLOAT, shape)


def layernorm_model(extra_reader=None):
    """x -> LayerNormalization(gamma with a 40x channel) -> a -> MatMul(W) -> y   [a -> extra_reader -> r]"""
    gamma = np.ones(C, np.float32)
    gamma[3] = 40.0
    nodes = [
        helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["a"], name="ln", axis=-1),
        helper.make_node("MatMul", ["a", "w"], ["y"], name="mm"),
    ]
    outputs = [vi("y", [16, 24])]
    if extra_reader:
        nodes.append(helper.make_node(extra_reader, ["a"], ["r"], name="other"))
        outputs.append(vi("r", [16, C]))
    inits = [numpy_helper.from_array(gamma, "gamma"), floats("beta", [C], 0.1), floats("w", [C, 24])]
    return make_model(nodes, [vi("x", [16, C])], outputs, inits)


def smooth(model, feeds, **options):
    after = copy_model(model)
    return after, run_pass(SmoothQuant(**options), after, feeds)


def channel_max(model, feeds, name):
    return np.max([np.abs(v[name]).max(axis=0) for v in intermediates(model, feeds, [name])], axis=0)


def outlier_ratio(m):
    return m.max() / np.median(m)


def test_registered_under_its_name():
    assert isinstance(make_pass("smooth-quant"), SmoothQuant)


def test_layernorm_to_matmul_is_smoothed_exactly():
    model = layernorm_model()
    feeds = seeded_feeds(model, n=4)
    after, result = smooth(model, feeds)
    assert result.changed and result.counts == {"activations_smoothed": 1}
    (done,) = result.details["smoothed"]
    assert done["activation"] == "a" and done["estimated_error"][1] < done["estimated_error"][0]
    assert op_types(after) == ["LayerNormalization", "MatMul"]
    assert_same_outputs(model, after, feeds, rtol=1e-4, atol=1e-5)
    # the activation's channels are flatter ...
    before_max, after_max = channel_max(model, feeds, "a"), channel_max(after, feeds, "a")
    assert outlier_ratio(before_max) > 20 and outlier_ratio(after_max) < outlier_ratio(before_max) / 3
    # ... because gamma and beta were divided by s and W's rows multiplied by the same s
    ln, mm = after.graph.node
    s = constant_value(model.graph, "gamma") / constant_value(after.graph, ln.input[1])
    np.testing.assert_allclose(constant_value(after.graph, ln.input[2]), constant_value(model.graph, "beta") / s, rtol=1e-5)
    np.testing.assert_allclose(constant_value(after.graph, mm.input[1]), constant_value(model.graph, "w") * s[:, None], rtol=1e-5)
    assert s[3] == s.max()
    assert {t.name for t in after.graph.initializer}.isdisjoint({"gamma", "beta", "w"})  # replaced, not left behind


def test_fixed_alpha_gives_the_formula():
    """search=false: s_j = max|a_j|^alpha / max|W_j|^(1 - alpha) exactly."""
    model = layernorm_model()
    feeds = seeded_feeds(model, n=4)
    after, result = smooth(model, feeds, search=False, alpha=0.5)
    assert result.details["smoothed"][0]["alpha"] == 0.5
    s = constant_value(model.graph, "gamma") / constant_value(after.graph, after.graph.node[0].input[1])
    expected = np.sqrt(channel_max(model, feeds, "a")) / np.sqrt(np.abs(constant_value(model.graph, "w")).max(axis=1))
    np.testing.assert_allclose(s, expected, rtol=1e-4)


def test_other_reader_refused_without_restore():
    model = layernorm_model(extra_reader="Relu")
    feeds = seeded_feeds(model, n=4)
    after, result = smooth(model, feeds, restore_others=False)
    assert not result.changed
    assert result.refused == ["a: it is also read by Relu, not only by MatMul/Gemm with a constant weight (restore_others=false)"]
    assert after == model


def test_other_reader_gets_the_unscaled_value():
    """a -> Relu as well: Relu reads Mul(a', s), the MatMul reads a' = a / s."""
    model = layernorm_model(extra_reader="Relu")
    feeds = seeded_feeds(model, n=4)
    after, result = smooth(model, feeds)
    assert result.changed and result.details["smoothed"][0]["restored_for"] == ["other"]
    assert op_types(after) == ["LayerNormalization", "Mul", "MatMul", "Relu"]
    assert after.graph.node[3].input[0] == after.graph.node[1].output[0]
    assert_same_outputs(model, after, feeds, rtol=1e-4, atol=1e-5)


def test_no_outliers_refused():
    """x -> LayerNormalization(gamma = 1) -> MatMul: nothing to flatten"""
    model = layernorm_model()
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(np.ones(C, np.float32), "gamma"))
    _, result = smooth(model, seeded_feeds(model, n=4))
    assert not result.changed
    assert result.refused[0].startswith("a: no outlier channels: max/median of per-channel max |x| is")


def test_producer_that_cannot_absorb_is_refused():
    """x -> Relu -> a -> MatMul -> y"""
    nodes = [helper.make_node("Relu", ["x"], ["a"]), helper.make_node("MatMul", ["a", "w"], ["y"])]
    model = make_model(nodes, [vi("x", [16, C])], [vi("y", [16, 24])], [floats("w", [C, 24])])
    _, result = smooth(model, seeded_feeds(model))
    assert result.refused == ["a: its producer Relu cannot absorb a per-channel scale"]


def test_graph_input_refused():
    model = make_model([helper.make_node("MatMul", ["x", "w"], ["y"])], [vi("x", [16, C])], [vi("y", [16, 24])], [floats("w", [C, 24])])
    _, result = smooth(model, seeded_feeds(model))
    assert result.refused == ["x: it is a graph input or initializer; no producer to fold the division into"]


def test_matmul_bias_add_producer_into_gemm_reader():
    """x -> MatMul(W1) -> Add(b) -> a -> Gemm(B transB=1, C) -> y, with an outlier column in W1"""
    w1 = RNG.standard_normal([C, C]).astype(np.float32)
    w1[:, 5] *= 50.0
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"]),
        helper.make_node("Add", ["h", "b1"], ["a"]),
        helper.make_node("Gemm", ["a", "b2", "c2"], ["y"], transB=1),
    ]
    inits = [numpy_helper.from_array(w1, "w1"), floats("b1", [C]), floats("b2", [24, C]), floats("c2", [24])]
    model = make_model(nodes, [vi("x", [16, C])], [vi("y", [16, 24])], inits)
    feeds = seeded_feeds(model, n=4)
    after, result = smooth(model, feeds)
    assert result.changed
    assert_same_outputs(model, after, feeds, rtol=1e-4, atol=1e-4)
    assert outlier_ratio(channel_max(after, feeds, "a")) < outlier_ratio(channel_max(model, feeds, "a")) / 3


def test_mul_producer_with_scalar_constant():
    """x -> Mul(0.5) -> a -> MatMul -> y, where x has an outlier channel: the scalar becomes per-channel"""
    nodes = [helper.make_node("Mul", ["x", "half"], ["a"]), helper.make_node("MatMul", ["a", "w"], ["y"])]
    inits = [numpy_helper.from_array(np.array(0.5, np.float32), "half"), floats("w", [C, 24])]
    model = make_model(nodes, [vi("x", [16, C])], [vi("y", [16, 24])], inits)
    feeds = seeded_feeds(model, n=4)
    for f in feeds:
        f["x"][:, 7] *= 60.0
    after, result = smooth(model, feeds)
    assert result.changed
    assert constant_value(after.graph, after.graph.node[0].input[1]).shape == (C,)
    assert_same_outputs(model, after, feeds, rtol=1e-4, atol=1e-4)


def gelu_model():
    """x -> MatMul(w0) -> h -> GELU spelled out with Erf (as torch exports it) -> a -> MatMul(w) -> y, and h's
    GELU also read by a residual Add; w0 has an outlier column, so a has an outlier channel"""
    w0 = RNG.standard_normal([C, C]).astype(np.float32)
    w0[:, 9] *= 40.0
    nodes = [
        helper.make_node("MatMul", ["x", "w0"], ["h"]),
        helper.make_node("Div", ["h", "sqrt2"], ["d"]),
        helper.make_node("Erf", ["d"], ["e"]),
        helper.make_node("Add", ["e", "one"], ["p"]),
        helper.make_node("Mul", ["h", "p"], ["hp"]),
        helper.make_node("Mul", ["hp", "half"], ["a"]),
        helper.make_node("MatMul", ["a", "w"], ["y"], name="mm"),
        helper.make_node("Add", ["a", "x"], ["r"], name="residual"),
    ]
    scalar = lambda name, v: numpy_helper.from_array(np.array(v, np.float32), name)  # noqa: E731
    inits = [numpy_helper.from_array(w0, "w0"), scalar("sqrt2", 1.4142135), scalar("one", 1.0), scalar("half", 0.5), floats("w", [C, C])]
    return make_model(nodes, [vi("x", [16, C])], [vi("y", [16, C]), vi("r", [16, C])], inits)


def test_a_gelu_producer_is_divided_by_an_explicit_mul_so_onnxruntime_still_fuses_the_gelu():
    from graphopt import profiling
    from graphopt.runtime import RuntimeSettings

    model = gelu_model()
    feeds = seeded_feeds(model, n=4)
    after, result = smooth(model, feeds)
    assert result.changed and result.details["smoothed"][0]["divided_by"] == "an explicit Mul (the producer ends a GELU)"
    assert_same_outputs(model, after, feeds, rtol=1e-4, atol=1e-4)
    assert constant_value(after.graph, "half").shape == ()  # the GELU's constants stay scalars
    divide = next(n for n in after.graph.node if n.op_type == "Mul" and n.input[0] == "a")
    assert next(n for n in after.graph.node if n.name == "mm").input[0] == divide.output[0]
    assert next(n for n in after.graph.node if n.name == "residual").input[0] == "a"  # reads the GELU itself
    assert outlier_ratio(channel_max(after, feeds, divide.output[0])) < outlier_ratio(channel_max(model, feeds, "a")) / 3
    fused = profiling.optimized_graph(after, RuntimeSettings(level="all", threads=1))
    assert any(n.op_type in ("Gelu", "BiasGelu") for n in fused.graph.node), [n.op_type for n in fused.graph.node]
