"""quantize-dynamic: MatMul/Gemm with constant weights => DynamicQuantizeLinear -> MatMulInteger -> Cast -> Mul."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto as TP
from onnx import helper, numpy_helper

from graphopt import runtime
from graphopt.activations import ActivationCache
from graphopt.graph import constant_value, copy_model, iter_graphs
from graphopt.passes.qdq import fake_quantize_dynamic
from graphopt.passes.quantize_dynamic import QuantizeDynamic
from graphopt.passes.qdq import quantize_per_channel
from graphopt.passes_base import BUDGET_SETTINGS, PassContext, PassError, make_pass
from graphopt.validate import Budget
from tests.helpers import make_model, op_types, ort_outputs, run_pass, seeded_feeds

RNG = np.random.default_rng(0)
QUANTIZED_OPS = ["DynamicQuantizeLinear", "MatMulInteger", "Cast", "Mul", "Mul"]


def weight(name, shape):
    return numpy_helper.from_array(RNG.standard_normal(shape).astype(np.float32), name)


def vi(name, shape, elem=TP.FLOAT):
    return helper.make_tensor_value_info(name, elem, shape)


def quantize(model, feeds=None, **options):
    """Run the pass on a copy; the accuracy fallback is off unless asked for (the default budget's top-1
    floor would judge random tiny graphs), and so is the latency guard (tiny graphs run faster in float,
    and a real profile would make the test depend on the machine)."""
    after = copy_model(model)
    return after, run_pass(QuantizeDynamic(**{"fallback": False, "latency_fallback": False, **options}), after, feeds)


def assert_close(before, after, feeds, min_cosine=0.99):
    """Quantized outputs follow the float ones (cosine per output and feed), and `after` is valid."""
    onnx.checker.check_model(after, full_check=True)
    for ref, got in zip(ort_outputs(before, feeds), ort_outputs(after, feeds)):
        for name in ref:
            a, b = ref[name].ravel(), got[name].ravel()
            assert ref[name].shape == got[name].shape
            assert np.dot(a, b) / np.linalg.norm(a) / np.linalg.norm(b) > min_cosine, name


def kept(result):
    return {k["node"]: (k["reason"], k["detail"]) for k in result.details["kept_float"]}


def matmul_model(k=64, n=64):
    """x[2,8,K] -> MatMul(W[K,N]) -> y"""
    return make_model([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], [vi("x", [2, 8, k])], [vi("y", [2, 8, n])], [weight("w", [k, n])])


def test_registered_under_its_name():
    assert isinstance(make_pass("quantize-dynamic"), QuantizeDynamic)


def test_matmul_weight_becomes_int8_per_column():
    model = matmul_model()
    feeds = seeded_feeds(model)
    after, result = quantize(model, feeds, weight_bits=8)
    assert result.changed and result.details["quantized"] == {"MatMul": 1}
    assert op_types(after) == QUANTIZED_OPS
    inits = {t.name: numpy_helper.to_array(t) for t in after.graph.initializer}
    assert "w" not in inits  # the float weight is gone
    (q_name,) = [k for k, v in inits.items() if v.dtype == np.int8]
    (s_name,) = [k for k, v in inits.items() if v.dtype == np.float32]
    expected = quantize_per_channel(numpy_helper.to_array(model.graph.initializer[0]), axis=1)
    np.testing.assert_array_equal(inits[q_name], expected.values)
    np.testing.assert_array_equal(inits[s_name], expected.scale)
    assert inits[s_name].shape == (64,)
    assert result.counts["bytes_saved"] == 64 * 64 * 4 - 64 * 64 - 64 * 4
    assert_close(model, after, feeds)


def test_outputs_match_integer_arithmetic():
    """onnxruntime's result is the exact integer product: uint8 activation (per-tensor range), 7-bit
    weight (with 8 bits, AVX2's u8s8 kernel may saturate int16 pair sums, so its result is not exact)."""
    model = matmul_model()
    feeds = seeded_feeds(model)
    after, result = quantize(model, feeds, weight_bits=7)
    assert result.changed
    w = quantize_per_channel(numpy_helper.to_array(model.graph.initializer[0]), axis=1, bits=7).dequantized()
    for feed, got in zip(feeds, ort_outputs(after, feeds)):
        np.testing.assert_allclose(got["y"], fake_quantize_dynamic(feed["x"]) @ w, rtol=1e-4, atol=1e-4)


def test_weight_bits_chosen_by_measurement():
    """Gaussian weights and activations use the whole int8 range, where 8-bit weights may saturate on
    AVX2; whatever this CPU does, the choice is the more accurate of the two and is reported."""
    model = matmul_model()
    feeds = seeded_feeds(model)
    after, result = quantize(model, feeds)
    bits = result.details["weight_bits"]
    assert bits in (7, 8) and f"{bits}-bit weights chosen by measurement" in result.notes[0]
    q = next(numpy_helper.to_array(t) for t in after.graph.initializer if t.data_type == TP.INT8)
    assert np.abs(q).max() == 2 ** (bits - 1) - 1
    chosen, other = (8, 7) if bits == 8 else (7, 8)
    cosine = {}
    for b in (7, 8):
        candidate, _ = quantize(model, feeds, weight_bits=b)
        got, ref = ort_outputs(candidate, feeds), ort_outputs(model, feeds)
        cosine[b] = min(float(np.dot(r["y"].ravel(), g["y"].ravel()) / np.linalg.norm(r["y"]) / np.linalg.norm(g["y"])) for r, g in zip(ref, got))
    assert cosine[chosen] >= cosine[other]


def test_weight_bits_follow_the_budget_metric_where_there_is_one():
    """With a task metric and labelled feeds the bits are chosen by that metric, not by output cosine: a
    metric that rewards distance from the float outputs picks the less faithful width."""
    model = matmul_model()
    feeds = seeded_feeds(model)
    reference = runtime.run_all(model, feeds, BUDGET_SETTINGS)  # as the pass runs its candidates
    cosine = {}
    for b in (7, 8):
        got = runtime.run_all(quantize(model, feeds, weight_bits=b)[0], feeds, BUDGET_SETTINGS)
        cosine[b] = min(float(np.dot(r["y"].ravel(), g["y"].ravel()) / np.linalg.norm(r["y"]) / np.linalg.norm(g["y"])) for r, g in zip(reference, got))
    if cosine[7] == cosine[8]:
        pytest.skip("7- and 8-bit weights give the same outputs on this CPU")
    worse = min(cosine, key=cosine.get)

    def distance(outputs, labels):
        return float(sum(np.abs(o["y"] - label).sum() for o, label in zip(outputs, labels)))

    after = copy_model(model)
    budget = Budget(metric=distance, max_drop=1e9)
    labels = [r["y"] for r in reference]
    ctx = PassContext(feeds, feeds, ActivationCache(feeds), budget=budget, calibration_labels=labels)
    result = QuantizeDynamic(fallback=False, latency_fallback=False).run(after, ctx)
    assert result.details["weight_bits"] == worse
    assert result.notes[0].startswith(f"{worse}-bit weights chosen by measurement: metric distance")


def test_bad_weight_bits_is_an_error():
    with pytest.raises(PassError, match="weight_bits"):
        quantize(matmul_model(), weight_bits=4)


def test_per_tensor_option():
    model = matmul_model()
    feeds = seeded_feeds(model)
    after, _ = quantize(model, feeds, per_channel=False)
    scales = [numpy_helper.to_array(t) for t in after.graph.initializer if t.data_type == TP.FLOAT]
    assert [s.shape for s in scales] == [()]
    assert_close(model, after, feeds)


@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_with_bias_alpha_beta(trans_b):
    """x[4,64] -> Gemm(B, C, transB, alpha=0.5, beta=2) -> y"""
    b_shape = [96, 64] if trans_b else [64, 96]
    node = helper.make_node("Gemm", ["x", "b", "c"], ["y"], name="gemm", transB=trans_b, alpha=0.5, beta=2.0)
    model = make_model([node], [vi("x", [4, 64])], [vi("y", [4, 96])], [weight("b", b_shape), weight("c", [96])])
    feeds = seeded_feeds(model)
    after, result = quantize(model, feeds)
    assert result.details["quantized"] == {"Gemm": 1}
    assert op_types(after) == QUANTIZED_OPS + ["Add"]
    q = next(numpy_helper.to_array(t) for t in after.graph.initializer if t.data_type == TP.INT8)
    assert q.shape == (64, 96)  # stored [K, N] whatever transB was
    bias = next(i for i in after.graph.node[-1].input if constant_value(after.graph, i) is not None)
    np.testing.assert_allclose(constant_value(after.graph, bias), 2.0 * constant_value(model.graph, "c"), rtol=1e-6)
    assert_close(model, after, feeds)


def test_gemm_computed_bias_times_beta():
    """x[4,64] -> Gemm(B, C=input, beta=3) -> y: C stays computed, scaled by a Mul"""
    node = helper.make_node("Gemm", ["x", "b", "c"], ["y"], name="gemm", beta=3.0)
    model = make_model([node], [vi("x", [4, 64]), vi("c", [96])], [vi("y", [4, 96])], [weight("b", [64, 96])])
    feeds = seeded_feeds(model)
    after, _ = quantize(model, feeds)
    assert op_types(after)[-2:] == ["Mul", "Add"]
    assert_close(model, after, feeds)


def test_shared_weight_and_shared_activation_quantized_once():
    """x -> MatMul(W) -> a;  x -> MatMul(V) -> b;  z -> MatMul(W) -> c"""
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["a"], name="xw"),
        helper.make_node("MatMul", ["x", "v"], ["b"], name="xv"),
        helper.make_node("MatMul", ["z", "w"], ["c"], name="zw"),
    ]
    model = make_model(nodes, [vi("x", [8, 64]), vi("z", [8, 64])], [vi(n, [8, 64]) for n in "abc"], [weight("w", [64, 64]), weight("v", [64, 64])])
    feeds = seeded_feeds(model)
    after, result = quantize(model, feeds)
    assert result.details["quantized"] == {"MatMul": 3}
    assert sum(t.data_type == TP.INT8 for t in after.graph.initializer) == 2  # W once, V once
    assert op_types(after).count("DynamicQuantizeLinear") == 2  # x once, z once
    w_readers = [n for n in after.graph.node if n.op_type == "MatMulInteger" and n.input[1].startswith("w")]
    assert len(w_readers) == 2 and w_readers[0].input[1] == w_readers[1].input[1]
    assert_close(model, after, feeds)


def test_keep_float_leaves_the_named_node_float():
    """keep_float=xv: of x -> MatMul(W) -> a and x -> MatMul(V) -> b, only xw is quantized."""
    nodes = [helper.make_node("MatMul", ["x", "w"], ["a"], name="xw"), helper.make_node("MatMul", ["x", "v"], ["b"], name="xv")]
    model = make_model(nodes, [vi("x", [8, 64])], [vi(n, [8, 64]) for n in "ab"], [weight("w", [64, 64]), weight("v", [64, 64])])
    feeds = seeded_feeds(model)
    after, result = quantize(model, feeds, keep_float="xv")
    assert result.details["quantized"] == {"MatMul": 1}
    assert kept(result) == {"xv": ("requested", "keep_float 'xv' matches it")}
    assert [n.input[1] for n in after.graph.node if n.op_type == "MatMul"] == ["v"]  # xv reads its float weight
    assert_close(model, after, feeds)


def test_onnxruntime_fuses_into_integer_kernels(tmp_path):
    """x -> MatMul(W) -> a; x -> MatMul(V) -> b; a -> MatMul(U) -> c: onnxruntime turns the shared
    activation into MatMulIntegerToFloat nodes and the single-reader one into DynamicQuantizeMatMul."""
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["a"], name="xw"),
        helper.make_node("MatMul", ["x", "v"], ["b"], name="xv"),
        helper.make_node("MatMul", ["a", "u"], ["c"], name="au"),
    ]
    model = make_model(nodes, [vi("x", [8, 64])], [vi(n, [8, 64]) for n in "abc"], [weight(n, [64, 64]) for n in "wvu"])
    after, _ = quantize(model)
    path = str(tmp_path / "optimized.onnx")
    runtime.session(after, runtime.RuntimeSettings(level="all", optimized_model_path=path))
    fused = [n.op_type for n in onnx.load(path).graph.node]
    assert fused.count("MatMulIntegerToFloat") == 2
    assert fused.count("DynamicQuantizeMatMul") == 1
    assert "MatMulInteger" not in fused and "MatMul" not in fused


def test_computed_weight_is_refused():
    """q, k -> MatMul -> s (attention scores: no constant weight)"""
    model = make_model([helper.make_node("MatMul", ["q", "k"], ["s"], name="scores")], [vi("q", [8, 64]), vi("k", [64, 8])], [vi("s", [8, 8])])
    after, result = quantize(model)
    assert not result.changed and op_types(after) == ["MatMul"]
    reason, detail = kept(result)["scores"]
    assert reason == "unsupported" and "computed at run time" in detail


def test_too_small_weight_is_refused():
    model = matmul_model(k=8, n=8)
    after, result = quantize(model)
    assert not result.changed and op_types(after) == ["MatMul"]
    reason, detail = kept(result)["mm"]
    assert reason == "too small" and "64 elements < min_weight_elements=4096" in detail
    _, result = quantize(model, min_weight_elements=16)
    assert result.changed


def test_unsupported_weights_are_refused():
    """Gemm with transA=1, a 3-D MatMul weight, a float64 weight: all left float with the reason."""
    nodes = [
        helper.make_node("Gemm", ["x", "b"], ["g"], name="gemm_ta", transA=1),
        helper.make_node("MatMul", ["x3", "w3"], ["m3"], name="mm3d"),
        helper.make_node("MatMul", ["xd", "wd"], ["md"], name="mm64"),
    ]
    inits = [weight("b", [64, 64]), weight("w3", [2, 64, 64]), numpy_helper.from_array(RNG.standard_normal([64, 64]), "wd")]
    model = make_model(nodes, [vi("x", [64, 8]), vi("x3", [2, 8, 64]), vi("xd", [8, 64], TP.DOUBLE)], [vi("g", [8, 64]), vi("m3", [2, 8, 64]), vi("md", [8, 64], TP.DOUBLE)], inits)
    _, result = quantize(model)
    reasons = kept(result)
    assert not result.changed
    assert "transA=1" in reasons["gemm_ta"][1]
    assert "rank 3" in reasons["mm3d"][1]
    assert "float32 only" in reasons["mm64"][1]


def test_ops_option_limits_the_op_types():
    node = helper.make_node("Gemm", ["x", "b"], ["y"], name="gemm")
    model = make_model([node], [vi("x", [4, 64])], [vi("y", [4, 64])], [weight("b", [64, 64])])
    _, result = quantize(model, ops="MatMul")
    assert not result.changed and result.details["kept_float"] == []


def test_sensitive_node_returns_to_float():
    """x -> MatMul(W) -> y (quantizes well);  o -> MatMul(V) -> z, o with one huge channel that V nearly
    ignores (it sets the run-time range, so the other channels lose all precision): with a tight budget
    the second goes back to float, the first stays quantized."""
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"], name="calm"), helper.make_node("MatMul", ["o", "v"], ["z"], name="outlier")]
    v = RNG.standard_normal([64, 64]).astype(np.float32)
    v[0] *= 1e-5
    inits = [weight("w", [64, 64]), numpy_helper.from_array(v, "v")]
    model = make_model(nodes, [vi("x", [16, 64]), vi("o", [16, 64])], [vi("y", [16, 64]), vi("z", [16, 64])], inits)
    feeds = seeded_feeds(model, n=4)
    for f in feeds:
        f["o"][:, 0] *= 1000.0
    ctx = PassContext(calibration=feeds, validation=feeds, activations=ActivationCache(feeds), budget=Budget(min_cosine=0.99, min_top1=None))
    after = copy_model(model)
    result = QuantizeDynamic(latency_fallback=False).run(after, ctx)
    assert result.details["quantized"] == {"MatMul": 1}
    assert kept(result)["outlier"][0] == "sensitive"
    assert [n.op_type for n in after.graph.node].count("MatMul") == 1
    assert Budget(min_cosine=0.99, min_top1=None).violation(ort_outputs(model, feeds), ort_outputs(after, feeds)) is None
    # without the fallback the pass keeps everything quantized and says it is over budget
    after = copy_model(model)
    result = QuantizeDynamic(fallback=False, latency_fallback=False).run(after, ctx)
    assert result.details["quantized"] == {"MatMul": 2} and "over budget" in result.notes[-1]


@pytest.mark.parametrize("sensitivity", ["layer", "model"])
def test_model_sensitivity_ranks_by_what_reaches_the_output(sensitivity):
    """y = calm(x) + 1e-6 * outlier(o): the outlier MatMul has by far the larger layer error, but its
    output is diluted to nothing, while the calm one's 1% error reaches y. Under a tight budget, ranking by
    layer error returns the outlier first, which does not help, and ends with both float; ranking by the
    model's output returns the calm one and keeps the outlier quantized."""
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["a"], name="calm"),
        helper.make_node("MatMul", ["o", "v"], ["b"], name="outlier"),
        helper.make_node("Mul", ["b", "tiny"], ["b_small"]),
        helper.make_node("Add", ["a", "b_small"], ["y"]),
    ]
    v = RNG.standard_normal([64, 64]).astype(np.float32)
    v[0] *= 1e-5
    inits = [weight("w", [64, 64]), numpy_helper.from_array(v, "v"), numpy_helper.from_array(np.array(1e-6, np.float32), "tiny")]
    model = make_model(nodes, [vi("x", [16, 64]), vi("o", [16, 64])], [vi("y", [16, 64])], inits)
    feeds = seeded_feeds(model, n=4)
    for f in feeds:
        f["o"][:, 0] *= 1000.0
    budget = Budget(min_cosine=0.99999, min_top1=None)
    ctx = PassContext(calibration=feeds, validation=feeds, activations=ActivationCache(feeds), budget=budget)
    after = copy_model(model)
    result = QuantizeDynamic(latency_fallback=False, sensitivity=sensitivity).run(after, ctx)
    if sensitivity == "layer":
        assert not result.changed and kept(result)["outlier"][0] == kept(result)["calm"][0] == "sensitive"
        assert kept(result)["outlier"][1].startswith("layer error")
    else:
        assert result.details["quantized"] == {"MatMul": 1} and list(kept(result)) == ["calm"]
        assert kept(result)["calm"][1].startswith("model output cosine lost")
        assert budget.violation(ort_outputs(model, feeds), ort_outputs(after, feeds)) is None


def test_bad_sensitivity_is_an_error():
    with pytest.raises(PassError, match="sensitivity must be 'layer' or 'model'"):
        quantize(matmul_model(), sensitivity="output")


def test_old_opset_is_upgraded():
    model = make_model([helper.make_node("MatMul", ["x", "w"], ["y"])], [vi("x", [8, 64])], [vi("y", [8, 64])], [weight("w", [64, 64])], opset=10)
    feeds = seeded_feeds(model)
    after, result = quantize(model, feeds)
    assert result.changed and "from 10 to 11" in result.notes[0]
    assert_close(model, after, feeds)


def if_model():
    """c -> If(then: x -> MatMul 'body_mm' (W_then) -> t, else: x -> Identity -> t) -> y"""
    then_graph = helper.make_graph([helper.make_node("MatMul", ["x", "w_then"], ["t"], name="body_mm")], "then", [], [vi("t", [8, 64])], [weight("w_then", [64, 64])])
    else_graph = helper.make_graph([helper.make_node("Identity", ["x"], ["e"])], "else", [], [vi("e", [8, 64])])
    node = helper.make_node("If", ["c"], ["y"], then_branch=then_graph, else_branch=else_graph)
    model = make_model([node], [vi("c", [], TP.BOOL), vi("x", [8, 64])], [vi("y", [8, 64])])
    return model, [dict(f, c=np.array(True)) for f in seeded_feeds(model)]


def test_matmul_inside_if_branch():
    model, feeds = if_model()
    after, result = quantize(model, feeds)
    assert result.details["quantized"] == {"MatMul": 1}
    body = next(a.g for a in after.graph.node[0].attribute if a.name == "then_branch")
    assert [n.op_type for n in body.node] == QUANTIZED_OPS
    assert_close(model, after, feeds)


def lstm_model(hidden=32, inputs=24, directions=1, steps=6, **attributes):
    """x[T, 2, I] (with initial_h) -> LSTM(W, R, B) -> y [T, D, 2, H], y_h [D, 2, H]; weights ~ N(0, 0.3).
    With layout=1 the batch comes first in x, h0, y and y_h."""
    direction = "bidirectional" if directions == 2 else "forward"
    shapes = {"w": [directions, 4 * hidden, inputs], "r": [directions, 4 * hidden, hidden], "b": [directions, 8 * hidden]}
    inits = [numpy_helper.from_array((0.3 * RNG.standard_normal(s)).astype(np.float32), n) for n, s in shapes.items()]
    node = helper.make_node("LSTM", ["x", "w", "r", "b", "", "h0"], ["y", "y_h"], name="lstm", hidden_size=hidden, direction=direction, **attributes)
    if attributes.get("layout"):
        ins = [vi("x", [2, steps, inputs]), vi("h0", [2, directions, hidden])]
        outs = [vi("y", [2, steps, directions, hidden]), vi("y_h", [2, directions, hidden])]
    else:
        ins = [vi("x", [steps, 2, inputs]), vi("h0", [directions, 2, hidden])]
        outs = [vi("y", [steps, directions, 2, hidden]), vi("y_h", [directions, 2, hidden])]
    return make_model([node], ins, outs, inits)


@pytest.mark.parametrize("directions", [1, 2])
def test_lstm_becomes_dynamic_quantize_lstm(directions):
    model = lstm_model(directions=directions, clip=5.0)
    feeds = seeded_feeds(model)
    # 7-bit weights: 8-bit ones can saturate the u8s8 kernels of CPUs without VNNI (see the module docstring)
    after, result = quantize(model, feeds, weight_bits=7, latency_fallback=False)
    assert result.details["quantized"] == {"LSTM": 1}
    (node,) = after.graph.node
    assert (node.op_type, node.domain, node.name) == ("DynamicQuantizeLSTM", "com.microsoft", "lstm")
    assert list(node.output) == ["y", "y_h"]
    assert node.input[0] == "x" and list(node.input[3:8]) == ["b", "", "h0", "", ""]
    attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert attributes == {"hidden_size": 32, "direction": (b"bidirectional" if directions == 2 else b"forward"), "clip": 5.0}
    inits = {t.name: numpy_helper.to_array(t) for t in after.graph.initializer}
    assert "w" not in inits and "r" not in inits
    for float_name, q_name, s_name, z_name in (("w", node.input[1], node.input[8], node.input[9]), ("r", node.input[2], node.input[10], node.input[11])):
        w = constant_value(model.graph, float_name)
        assert inits[q_name].dtype == np.int8 and inits[q_name].shape == (directions, w.shape[2], 128)
        for d in range(directions):
            expected = quantize_per_channel(w[d].T, axis=1, bits=7)
            np.testing.assert_array_equal(inits[q_name][d], expected.values)
            np.testing.assert_array_equal(inits[s_name][d], expected.scale)
        assert inits[z_name].shape == (directions, 128) and not inits[z_name].any()
    assert_close(model, after, feeds)


def test_lstm_without_name_or_y_output():
    """Only Y_h is read and the node has no name: the site is keyed by its first named output."""
    model = lstm_model()
    node = model.graph.node[0]
    node.name, node.output[0] = "", ""
    del model.graph.output[0]
    feeds = seeded_feeds(model)
    after, result = quantize(model, feeds, latency_fallback=False)
    assert result.details["quantized"] == {"LSTM": 1}
    assert [(n.op_type, n.name, list(n.output)) for n in after.graph.node] == [("DynamicQuantizeLSTM", "y_h", ["", "y_h"])]
    assert_close(model, after, feeds)


def test_lstm_batch_first_and_computed_weights_are_refused():
    model = lstm_model(layout=1)
    _, result = quantize(model, latency_fallback=False)
    assert not result.changed and "layout=1" in kept(result)["lstm"][1]
    model = lstm_model()
    model.graph.initializer.remove(next(t for t in model.graph.initializer if t.name == "r"))
    model.graph.input.append(vi("r", [1, 128, 32]))
    _, result = quantize(model, latency_fallback=False)
    reason, detail = kept(result)["lstm"]
    assert not result.changed and reason == "unsupported" and "computed at run time" in detail


@pytest.mark.parametrize("quantized_ms, kept_quantized", [(0.5, True), (2.0, False)])
def test_lstm_latency_guard_uses_the_node_profile(monkeypatch, quantized_ms, kept_quantized):
    """Stubbed profile: the LSTM kernel takes 1 ms, DynamicQuantizeLSTM `quantized_ms`."""
    from graphopt import profiling

    def node_times(models, feeds, settings, rounds=10):
        return [[profiling.NodeTime(n.name, n.op_type, quantized_ms if n.op_type == "DynamicQuantizeLSTM" else 1.0) for n in m.graph.node] for m in models]

    monkeypatch.setattr(profiling, "node_times", node_times)
    model = lstm_model()
    after, result = quantize(model, latency_fallback=True)
    assert result.changed is kept_quantized
    assert op_types(after) == (["DynamicQuantizeLSTM"] if kept_quantized else ["LSTM"])
    if not kept_quantized:
        assert kept(result)["lstm"] == ("slower", "DynamicQuantizeLSTM 2.000 ms vs LSTM 1.000 ms per run (onnxruntime profile)")


def test_sensitive_lstm_returns_to_float():
    """A budget tighter than int8 weights can meet: the LSTM is ranked by the model's output cosine and
    goes back to float, the model is unchanged and the reason given."""
    model = lstm_model()
    feeds = seeded_feeds(model, n=4)
    ctx = PassContext(calibration=feeds, validation=feeds, activations=ActivationCache(feeds), budget=Budget(min_cosine=0.999999, min_top1=None))
    after = copy_model(model)
    result = QuantizeDynamic(latency_fallback=False).run(after, ctx)
    assert not result.changed and op_types(after) == ["LSTM"]
    reason, detail = kept(result)["lstm"]
    assert reason == "sensitive" and "cosine" in detail


def test_lstms_sharing_weights_quantize_them_once():
    """x -> LSTM(W, R) -> y and x -> LSTM(W, R) -> z (the same W and R): one int8 W and one int8 R."""
    model = lstm_model()
    first = model.graph.node[0]
    second = helper.make_node("LSTM", list(first.input), ["z", ""], name="lstm2", hidden_size=32)
    model.graph.node.append(second)
    model.graph.output.append(vi("z", [6, 1, 2, 32]))
    feeds = seeded_feeds(model)
    after, result = quantize(model, feeds, weight_bits=7, latency_fallback=False)
    assert result.details["quantized"] == {"LSTM": 2}
    a, b = after.graph.node
    assert list(a.input[1:3]) == list(b.input[1:3]) and list(a.input[8:]) == list(b.input[8:])
    assert sum(t.data_type == TP.INT8 and len(t.dims) == 3 for t in after.graph.initializer) == 2
    assert_close(model, after, feeds)


def two_readers_model():
    """x -> MatMul 'q' (Wq) -> yq and x -> MatMul 'k' (Wk) -> yk: one DynamicQuantizeLinear serves both."""
    nodes = [helper.make_node("MatMul", ["x", "wq"], ["yq"], name="q"), helper.make_node("MatMul", ["x", "wk"], ["yk"], name="k")]
    return make_model(nodes, [vi("x", [2, 8, 64])], [vi("yq", [2, 8, 64]), vi("yk", [2, 8, 64])], [weight("wq", [64, 64]), weight("wk", [64, 64])])


def stub_profile(monkeypatch, float_ms: dict[str, float], quantized_ms: dict[str, float]):
    """onnxruntime's per-node profile replaced: ms per node name, from `quantized_ms` for a model holding a
    MatMulInteger, else from `float_ms`. A node absent from the dict does not run (as if fused away); a
    name no node has is a Conv kernel onnxruntime named itself (its NCHWc layout's "<tensor>_nchwc")."""
    from graphopt import profiling

    def profile(model):
        nodes = [n for g in iter_graphs(model.graph) for n in g.node]
        times = quantized_ms if any(n.op_type == "MatMulInteger" for n in nodes) else float_ms
        own = [profiling.NodeTime(n.name, n.op_type, times[n.name]) for n in nodes if n.name in times]
        return own + [profiling.NodeTime(name, "Conv", ms) for name, ms in times.items() if name not in {n.name for n in nodes}]

    def node_times(models, feeds, settings, rounds=10):
        return [profile(m) for m in models]

    monkeypatch.setattr(profiling, "node_times", node_times)


@pytest.mark.parametrize("integer_ms, kept_quantized", [(0.7, True), (0.85, False)])
def test_matmul_latency_guard_splits_a_shared_activation_quantizer(monkeypatch, integer_ms, kept_quantized):
    """Float MatMul 1 ms each; quantized: MatMulInteger `integer_ms` each plus half of the shared 0.4 ms
    DynamicQuantizeLinear: 0.9 ms is kept, 1.05 ms goes back to float with the kernels named."""
    quantized = {"q_MatMulInteger": integer_ms, "k_MatMulInteger": integer_ms, "x_DynamicQuantizeLinear": 0.4}
    stub_profile(monkeypatch, {"q": 1.0, "k": 1.0}, quantized)
    after, result = quantize(two_readers_model(), latency_fallback=True)
    assert result.changed is kept_quantized
    if kept_quantized:
        assert op_types(after).count("DynamicQuantizeLinear") == 1 and op_types(after).count("MatMulInteger") == 2
    else:
        assert op_types(after) == ["MatMul", "MatMul"]
        detail = "DynamicQuantizeLinear + MatMulInteger 1.050 ms vs MatMul 1.000 ms per run (onnxruntime profile)"
        assert kept(result) == {"q": ("slower", detail), "k": ("slower", detail)}


@pytest.mark.parametrize("add_fused, kept_quantized", [(True, True), (False, False)])
def test_matmul_latency_guard_counts_a_bias_add_fused_into_the_integer_kernel(monkeypatch, add_fused, kept_quantized):
    """x -> MatMul 'mm' (0.8 ms) -> Add 'bias' (0.3 ms); quantized, MatMulInteger takes 1.0 ms. When the
    Add no longer runs (fused into the integer kernel) the comparison is 1.0 against 1.1 ms: kept. When it
    still runs it is 1.0 against 0.8 ms: float."""
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"), helper.make_node("Add", ["h", "b"], ["y"], name="bias")]
    model = make_model(nodes, [vi("x", [2, 8, 64])], [vi("y", [2, 8, 64])], [weight("w", [64, 64]), weight("b", [64])])
    stub_profile(monkeypatch, {"mm": 0.8, "bias": 0.3}, {"mm_MatMulInteger": 1.0, **({} if add_fused else {"bias": 0.3})})
    after, result = quantize(model, latency_fallback=True)
    assert result.changed is kept_quantized
    assert ("MatMulInteger" in op_types(after)) is kept_quantized
    if not kept_quantized:
        assert kept(result)["mm"] == ("slower", "MatMulInteger 1.000 ms vs MatMul 0.800 ms per run (onnxruntime profile)")


def test_matmul_latency_guard_does_not_count_a_rewritten_reader_as_fused(monkeypatch):
    """x -> MatMul 'a' -> MatMul 'b' -> y, both 1.0 ms in float. Quantized, 'b' no longer runs under its
    own name because it was rewritten, not because 'a' absorbed it: 'a' at 1.2 ms is slower than 1.0 ms."""
    nodes = [helper.make_node("MatMul", ["x", "wa"], ["h"], name="a"), helper.make_node("MatMul", ["h", "wb"], ["y"], name="b")]
    model = make_model(nodes, [vi("x", [2, 8, 64])], [vi("y", [2, 8, 64])], [weight("wa", [64, 64]), weight("wb", [64, 64])])
    stub_profile(monkeypatch, {"a": 1.0, "b": 1.0}, {"a_MatMulInteger": 1.2, "b_MatMulInteger": 0.5})
    after, result = quantize(model, latency_fallback=True)
    assert list(kept(result)) == ["a"] and result.details["quantized"] == {"MatMul": 1}
    assert [n.name for n in after.graph.node if n.op_type == "MatMul"] == ["a"]


def test_matmul_latency_guard_leaves_a_node_the_float_profile_does_not_show(monkeypatch):
    """The float MatMul ran fused into a kernel named otherwise: there is nothing to compare, so the
    quantized node stays even though its kernel is slow."""
    stub_profile(monkeypatch, {"other": 1.0}, {"mm_MatMulInteger": 5.0})
    after, result = quantize(matmul_model(), latency_fallback=True)
    assert result.changed and kept(result) == {}


@pytest.mark.parametrize("integer_ms, kept_quantized", [(0.7, True), (1.3, False)])
def test_matmul_latency_guard_judges_nodes_inside_bodies(monkeypatch, integer_ms, kept_quantized):
    """The If branch's MatMul takes 1 ms in float (over the iterations of a run), its integer kernels
    `integer_ms` with the 0.1 ms DynamicQuantizeLinear: judged like a main-graph node."""
    stub_profile(monkeypatch, {"body_mm": 1.0}, {"body_mm_MatMulInteger": integer_ms, "x_DynamicQuantizeLinear": 0.1})
    model, feeds = if_model()
    after, result = quantize(model, feeds, latency_fallback=True)
    assert result.changed is kept_quantized
    body = next(a.g for a in after.graph.node[0].attribute if a.name == "then_branch")
    assert [n.op_type for n in body.node] == (QUANTIZED_OPS if kept_quantized else ["MatMul"])
    if not kept_quantized:
        assert kept(result)["body_mm"] == ("slower", "DynamicQuantizeLinear + MatMulInteger 1.400 ms vs MatMul 1.000 ms per run (onnxruntime profile)")


def test_fused_dynamic_matmul_is_named_after_its_matmulinteger_node():
    """What the latency guard relies on: onnxruntime's real profile names the fused integer kernel after
    the MatMulInteger node this pass writes (`<node>_MatMulInteger`)."""
    from graphopt import profiling
    from graphopt.runtime import RuntimeSettings

    model = matmul_model()
    feeds = seeded_feeds(model)
    after, _ = quantize(model, feeds)
    [times] = profiling.node_times([after], feeds, RuntimeSettings(level="all"), rounds=1)
    assert ("mm_MatMulInteger", "DynamicQuantizeMatMul") in {(t.name, t.op_type) for t in times}


def test_onnxruntime_profiles_a_body_node_under_the_name_the_latency_guard_looks_for():
    from graphopt import profiling
    from graphopt.runtime import RuntimeSettings

    model, feeds = if_model()
    after, _ = quantize(model, feeds)
    [times] = profiling.node_times([after], feeds, RuntimeSettings(level="all"), rounds=1)
    assert ("body_mm_MatMulInteger", "DynamicQuantizeMatMul") in {(t.name, t.op_type) for t in times}


@pytest.mark.parametrize("transpose_runs_alone, kept_quantized", [(True, False), (False, True)])
def test_matmul_latency_guard_charges_a_transpose_the_float_kernel_had_absorbed(monkeypatch, transpose_runs_alone, kept_quantized):
    """x -> Transpose 'tr' -> MatMul 'mm'. In float onnxruntime runs both as one kernel named after 'mm'
    (FusedMatMul with transA), 1.0 ms; quantized, the integer kernels take 0.8 ms and, when the profile
    shows 'tr' on its own (0.3 ms), that goes on the quantized side: 1.1 ms, slower."""
    nodes = [helper.make_node("Transpose", ["x"], ["t"], name="tr", perm=[0, 2, 1]), helper.make_node("MatMul", ["t", "w"], ["y"], name="mm")]
    model = make_model(nodes, [vi("x", [2, 64, 8])], [vi("y", [2, 8, 64])], [weight("w", [64, 64])])
    quantized = {"mm_MatMulInteger": 0.7, "t_DynamicQuantizeLinear": 0.1, **({"tr": 0.3} if transpose_runs_alone else {})}
    stub_profile(monkeypatch, {"mm": 1.0}, quantized)
    after, result = quantize(model, latency_fallback=True)
    assert result.changed is kept_quantized
    if not kept_quantized:
        assert kept(result)["mm"] == ("slower", "DynamicQuantizeLinear + MatMulInteger + Transpose 1.100 ms vs MatMul 1.000 ms per run (onnxruntime profile)")


# ------------------------------------------------------------------------------- pointwise Conv


def conv_model(c=64, m=64, spatial=(4, 5), bias=True, **attributes):
    """x[1,C,*spatial] -> Conv 'pw' (W[M,C,1,..]) -> y"""
    inputs = ["x", "w", "b"] if bias else ["x", "w"]
    inits = [weight("w", [m, c, *[1] * len(spatial)])] + ([weight("b", [m])] if bias else [])
    node = helper.make_node("Conv", inputs, ["y"], name="pw", **attributes)
    return make_model([node], [vi("x", [1, c, *spatial])], [vi("y", [1, m, *spatial])], inits)


POINTWISE_OPS = ["Transpose", *QUANTIZED_OPS, "Add", "Transpose"]


@pytest.mark.parametrize("spatial", [(4, 5), (7,)])
def test_pointwise_conv_becomes_an_integer_matmul_over_channels(spatial):
    """A 1x1 Conv is a product over the channel axis: Transpose channels last, the MatMul form with W as
    [C, M] (int8 per output channel), the bias added, Transpose back; onnxruntime's result is exactly that
    integer arithmetic (7-bit weights: exact on any CPU)."""
    model = conv_model(spatial=spatial)
    feeds = seeded_feeds(model)
    after, result = quantize(model, feeds, weight_bits=7)
    assert result.changed and result.details["quantized"] == {"Conv": 1}
    assert op_types(after) == POINTWISE_OPS
    perms = [list(attribute_of(n, "perm")) for n in after.graph.node if n.op_type == "Transpose"]
    rank = 2 + len(spatial)
    assert perms == [[0, *range(2, rank), 1], [0, rank - 1, *range(1, rank - 1)]]
    w = numpy_helper.to_array(model.graph.initializer[0])
    expected = quantize_per_channel(w.reshape(64, 64).T, axis=1, bits=7)
    inits = {t.name: numpy_helper.to_array(t) for t in after.graph.initializer}
    (q_name,) = [k for k, v in inits.items() if v.dtype == np.int8]
    np.testing.assert_array_equal(inits[q_name], expected.values)
    b = numpy_helper.to_array(model.graph.initializer[1])
    for feed, got in zip(feeds, ort_outputs(after, feeds)):
        rows = np.moveaxis(feed["x"], 1, -1)
        np.testing.assert_allclose(got["y"], np.moveaxis(fake_quantize_dynamic(rows) @ expected.dequantized() + b, -1, 1), rtol=1e-4, atol=1e-4)
    assert_close(model, after, feeds)


def attribute_of(node, name):
    return next(helper.get_attribute_value(a) for a in node.attribute if a.name == name)


def test_pointwise_convs_reading_one_tensor_share_its_transpose_and_quantizer():
    """x -> Conv 'a' (no bias) and x -> Conv 'b': one Transpose, one DynamicQuantizeLinear."""
    nodes = [helper.make_node("Conv", ["x", "wa"], ["ya"], name="a"), helper.make_node("Conv", ["x", "wb"], ["yb"], name="b")]
    model = make_model(nodes, [vi("x", [1, 64, 3, 3])], [vi("ya", [1, 32, 3, 3]), vi("yb", [1, 16, 3, 3])], [weight("wa", [32, 64, 1, 1]), weight("wb", [16, 64, 1, 1])])
    feeds = seeded_feeds(model)
    after, result = quantize(model, feeds, min_weight_elements=16)
    assert result.details["quantized"] == {"Conv": 2}
    ops = op_types(after)
    assert ops.count("Transpose") == 3 and ops.count("DynamicQuantizeLinear") == 1 and ops.count("MatMulInteger") == 2 and "Add" not in ops
    assert_close(model, after, feeds)


def test_conv_that_is_not_pointwise_is_refused_with_the_reason():
    """3x3 kernel, groups, strides and padding all stay float, each with what stops it."""
    nodes = [
        helper.make_node("Conv", ["x", "w3"], ["y3"], name="k3"),
        helper.make_node("Conv", ["x", "wg"], ["yg"], name="grouped", group=2),
        helper.make_node("Conv", ["x", "w1"], ["ys"], name="strided", strides=[2, 2]),
        helper.make_node("Conv", ["x", "w1"], ["yp"], name="padded", pads=[1, 1, 1, 1]),
    ]
    inits = [weight("w3", [64, 64, 3, 3]), weight("wg", [64, 32, 1, 1]), weight("w1", [64, 64, 1, 1])]
    outs = [vi("y3", [1, 64, 2, 2]), vi("yg", [1, 64, 4, 4]), vi("ys", [1, 64, 2, 2]), vi("yp", [1, 64, 6, 6])]
    model = make_model(nodes, [vi("x", [1, 64, 4, 4])], outs, inits)
    after, result = quantize(model)
    assert not result.changed and op_types(after) == ["Conv"] * 4
    reasons = kept(result)
    assert {r for r, _ in reasons.values()} == {"unsupported"}
    assert "kernel [3, 3] is not 1x1" in reasons["k3"][1]
    assert "group=2" in reasons["grouped"][1]
    assert "strides [2, 2]" in reasons["strided"][1]
    assert "pads [1, 1, 1, 1]" in reasons["padded"][1]


def test_onnxruntime_fuses_the_pointwise_conv_into_dynamic_quantize_matmul(tmp_path):
    """The quantized Conv runs as DynamicQuantizeMatMul with its bias absorbed, named after the
    MatMulInteger node (what the latency guard charges)."""
    from graphopt import profiling
    from graphopt.runtime import RuntimeSettings

    model = conv_model()
    feeds = seeded_feeds(model)
    after, _ = quantize(model, feeds)
    path = str(tmp_path / "optimized.onnx")
    runtime.session(after, runtime.RuntimeSettings(level="all", optimized_model_path=path))
    fused = [n.op_type for n in onnx.load(path).graph.node]
    assert fused.count("DynamicQuantizeMatMul") == 1 and "MatMulInteger" not in fused and "Add" not in fused
    [times] = profiling.node_times([after], feeds, RuntimeSettings(level="all"), rounds=1)
    assert ("pw_MatMulInteger", "DynamicQuantizeMatMul") in {(t.name, t.op_type) for t in times}


def hardswish_conv_model():
    """x -> Conv 'pw' -> y0; HardSigmoid 'gate'(y0) -> g; Mul 'swish'(y0, g) -> y  (PP-OCRv4's blocks)"""
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["y0"], name="pw"),
        helper.make_node("HardSigmoid", ["y0"], ["g"], name="gate"),
        helper.make_node("Mul", ["y0", "g"], ["y"], name="swish"),
    ]
    return make_model(nodes, [vi("x", [1, 64, 4, 5])], [vi("y", [1, 64, 4, 5])], [weight("w", [64, 64, 1, 1]), weight("b", [64])])


def test_onnxruntime_names_the_float_conv_as_the_latency_guard_looks_for_it():
    """What the guard relies on: fp32 onnxruntime runs the Conv under its own name, or (NCHWc layout on
    x86) as '<tensor>_nchwc' named after the Conv's or its absorbed activation's output."""
    from graphopt import profiling
    from graphopt.runtime import RuntimeSettings

    model = hardswish_conv_model()
    [times] = profiling.node_times([model], seeded_feeds(model), RuntimeSettings(level="all"), rounds=1)
    conv_kernels = {t.name for t in times if t.op_type in ("Conv", "FusedConv")}
    assert conv_kernels and conv_kernels <= {"pw", "y0_nchwc", "g_nchwc", "y_nchwc"}


def quantize_with_latency(model, ratio=0.5, calls=None, **options):
    """The pass with the latency guard on and ctx.latency stubbed: the second model timed at `ratio`."""
    from graphopt.bench import Timing

    def latency(models):
        (calls if calls is not None else []).append([label for label, _ in models])
        return [Timing(models[0][0], 0.0, [10.0]), Timing(models[1][0], 0.0, [10.0 * ratio], ratio)]

    feeds = seeded_feeds(model)
    ctx = PassContext(calibration=feeds, validation=feeds, activations=ActivationCache(feeds))
    ctx.latency = latency
    after = copy_model(model)
    return after, QuantizeDynamic(fallback=False, latency_fallback=True, **options).run(after, ctx)


@pytest.mark.parametrize("gate_ms, kept_quantized", [(0.1, True), (0.3, False)])
def test_conv_latency_guard_finds_the_nchwc_kernel_and_charges_the_activation_it_absorbed(monkeypatch, gate_ms, kept_quantized):
    """Float: one NCHWc kernel 'y0_nchwc', 1.0 ms, HardSigmoid and Mul absorbed. Quantized: integer
    kernel 0.5, the two Transposes 0.1 each, and the activation now running alone (HardSigmoid
    `gate_ms`, Mul 0.1): 0.9 ms is kept, 1.1 ms goes back to float with the kernels named."""
    quantized = {"pw_MatMulInteger": 0.5, "x_Transpose": 0.1, "pw_channels_first": 0.1, "gate": gate_ms, "swish": 0.1}
    stub_profile(monkeypatch, {"y0_nchwc": 1.0}, quantized)
    after, result = quantize_with_latency(hardswish_conv_model())
    assert result.changed is kept_quantized
    if not kept_quantized:
        assert op_types(after) == ["Conv", "HardSigmoid", "Mul"]
        assert kept(result)["pw"] == ("slower", "Transpose + MatMulInteger + HardSigmoid + Mul 1.100 ms vs Conv 1.000 ms per run (onnxruntime profile)")


@pytest.mark.parametrize("ratio, kept_quantized", [(0.9, True), (1.02, False)])
def test_pointwise_convs_are_timed_as_a_group_against_the_model_without_them(monkeypatch, ratio, kept_quantized):
    """A MatMul and a pointwise Conv both profile faster; the model with the Conv is then timed against
    the model without it (the MatMul quantized in both): at 1.02 the Conv goes back to float, the MatMul
    stays quantized."""
    nodes = [helper.make_node("Conv", ["x", "w"], ["h"], name="pw"), helper.make_node("MatMul", ["h", "v"], ["y"], name="mm")]
    model = make_model(nodes, [vi("x", [1, 64, 2, 64])], [vi("y", [1, 64, 2, 64])], [weight("w", [64, 64, 1, 1]), weight("v", [64, 64])])
    stub_profile(monkeypatch, {"h_nchwc": 1.0, "mm": 1.0}, {"pw_MatMulInteger": 0.2, "mm_MatMulInteger": 0.2})
    calls: list = []
    after, result = quantize_with_latency(model, ratio, calls)
    assert calls == [["without the pointwise Convs", "with them"]]
    assert result.details["quantized"] == ({"Conv": 1, "MatMul": 1} if kept_quantized else {"MatMul": 1})
    assert ("Conv" in op_types(after)) is not kept_quantized
    if not kept_quantized:
        assert kept(result)["pw"] == ("slower", "the 1 pointwise Convs the profile found faster, timed together: latency ratio 1.020 with them to without them")
