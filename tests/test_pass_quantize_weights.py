"""quantize-weights: int4/int8 weight-only quantization as blocked DequantizeLinear or MatMulNBits /
GatherBlockQuantized, GPTQ rounding, the budget fallback, and the refused cases."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto as TP
from onnx import helper, numpy_helper

from graphopt.activations import ActivationCache
from graphopt.errors import PassError
from graphopt.graph import constant_value, copy_model, default_opset
from graphopt.passes.gptq import Hessian, gptq
from graphopt.passes.qdq import quantize_blockwise, quantize_per_channel
from graphopt.passes.quantize_weights import QuantizeWeights
from graphopt.passes_base import PassContext, make_pass
from graphopt.profiling import optimized_graph
from graphopt.runtime import RuntimeSettings
from graphopt.validate import Budget
from tests.helpers import make_model, op_types, ort_outputs

RNG = np.random.default_rng(0)
NO_BUDGET = Budget(min_cosine=0.0, min_top1=None)


def vi(name, shape, elem=TP.FLOAT):
    return helper.make_tensor_value_info(name, elem, shape)


def init(name, array):
    return numpy_helper.from_array(np.asarray(array), name)


def context(feeds, budget=NO_BUDGET, **kwargs):
    return PassContext(calibration=feeds, validation=feeds, activations=ActivationCache(feeds), budget=budget, **kwargs)


def float_feeds(model, n=3, seed=1):
    rng = np.random.default_rng(seed)
    feeds = []
    for _ in range(n):
        feed = {}
        for i in model.graph.input:
            shape = [d.dim_value for d in i.type.tensor_type.shape.dim]
            if i.type.tensor_type.elem_type == TP.INT64:
                feed[i.name] = rng.integers(0, 50, shape).astype(np.int64)
            else:
                feed[i.name] = rng.standard_normal(shape).astype(np.float32)
        feeds.append(feed)
    return feeds


def quantize(model, feeds=None, budget=NO_BUDGET, **options):
    """Run the pass on a copy; returns (after, result)."""
    after = copy_model(model)
    feeds = float_feeds(model) if feeds is None else feeds
    return after, QuantizeWeights(**options).run(after, context(feeds, budget))


def with_weights(model, replacements):
    """`model` with initializers replaced by float arrays (the float model with dequantized weights)."""
    out = copy_model(model)
    for t in out.graph.initializer:
        if t.name in replacements:
            t.CopyFrom(init(t.name, replacements[t.name].astype(np.float32)))
    return out


def assert_close(expected_model, got_model, feeds, rtol=1e-5):
    for ref, got in zip(ort_outputs(expected_model, feeds), ort_outputs(got_model, feeds)):
        for name in ref:
            scale = max(1.0, float(np.abs(ref[name]).max()))
            np.testing.assert_allclose(got[name], ref[name], atol=rtol * scale, rtol=0, err_msg=name)


def matmul_model(k=64, n=48, weight=None):
    """x [3, K] -> MatMul(W [K, N]) -> y"""
    w = RNG.standard_normal((k, n)).astype(np.float32) if weight is None else weight
    return make_model([helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")], [vi("x", [3, k])], [vi("y", [3, n])], [init("W", w)]), w


def initializer_types(model):
    return {t.name: t.data_type for t in model.graph.initializer}


def test_registered_under_its_name():
    assert isinstance(make_pass("quantize-weights"), QuantizeWeights)


def test_matmul_int4_dequantize_structure_opset_and_numbers():
    """x -> MatMul(W) -> y  =>  DequantizeLinear(W int4, block 32, axis 0) -> MatMul"""
    model, w = matmul_model()
    after, result = quantize(model, format="dequantize")
    assert op_types(after) == ["DequantizeLinear", "MatMul"]
    dq = after.graph.node[0]
    assert {a.name: helper.get_attribute_value(a) for a in dq.attribute} == {"axis": 0, "block_size": 32}
    types = initializer_types(after)
    assert types[dq.input[0]] == TP.INT4 and "W" not in types
    assert default_opset(after) == 21 and "upgraded the opset from 17 to 21" in result.notes
    assert result.details["quantized"] == {"MatMul": 1} and result.details["format"] == "dequantize"
    assert result.counts["weights_int4"] == 1 and result.counts["bytes_saved"] > 0.8 * w.nbytes - 64 * 48 // 2
    assert_close(with_weights(model, {"W": quantize_blockwise(w, 0, 32, 4).dequantized()}), after, float_feeds(model))


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("k, block", [(64, 32), (96, 32), (40, 16)])  # whole blocks, an odd block count, a partial block
def test_matmul_matmulnbits_matches_the_dequantized_weight(symmetric, k, block):
    model, w = matmul_model(k=k)
    after, result = quantize(model, format="matmulnbits", block_size=block, symmetric=symmetric)
    assert op_types(after) == ["MatMulNBits"]
    node = after.graph.node[0]
    assert node.domain == "com.microsoft"
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert attrs == {"K": k, "N": 48, "bits": 4, "block_size": block}
    blocks = -(-k // block)
    assert constant_value(after.graph, node.input[1]).shape == (48, blocks, block // 2)
    assert (len(node.input) > 3 and node.input[3] != "") == (not symmetric)
    assert default_opset(after) == 17 and not result.notes
    expected = quantize_blockwise(w, 0, block, 4, symmetric).dequantized()
    assert_close(with_weights(model, {"W": expected}), after, float_feeds(model))


@pytest.mark.parametrize("fmt, op", [("dequantize", "DequantizeLinear"), ("matmulnbits", "MatMulNBits")])
def test_matmul_int8_blockwise(fmt, op):
    model, w = matmul_model()
    after, _ = quantize(model, format=fmt, bits=8)
    assert op in op_types(after)
    assert_close(with_weights(model, {"W": quantize_blockwise(w, 0, 32, 8).dequantized()}), after, float_feeds(model))


def test_per_channel_int8_uses_per_axis_dequantize_at_opset_13():
    model, w = matmul_model()
    after, result = quantize(model, bits=8, block_size=0, format="dequantize")
    dq = after.graph.node[0]
    assert op_types(after) == ["DequantizeLinear", "MatMul"]
    assert {a.name: helper.get_attribute_value(a) for a in dq.attribute} == {"axis": 1}
    assert initializer_types(after)[dq.input[0]] == TP.INT8
    assert default_opset(after) == 17 and not result.notes
    assert_close(with_weights(model, {"W": quantize_per_channel(w, 1, 8).dequantized()}), after, float_feeds(model))


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("fmt, op", [("dequantize", "Gemm"), ("matmulnbits", "MatMulNBits")])
def test_gemm(trans_b, fmt, op):
    """a [3, 64] -> Gemm(B, C [48], transB) -> y"""
    w = RNG.standard_normal((48, 64) if trans_b else (64, 48)).astype(np.float32)
    c = RNG.standard_normal(48).astype(np.float32)
    gemm = helper.make_node("Gemm", ["a", "B", "C"], ["y"], name="gemm", transB=trans_b)
    model = make_model([gemm], [vi("a", [3, 64])], [vi("y", [3, 48])], [init("B", w), init("C", c)])
    after, result = quantize(model, format=fmt)
    assert op in op_types(after) and result.details["quantized"] == {"Gemm": 1}
    if fmt == "dequantize":
        dq = after.graph.node[0]
        assert {a.name: helper.get_attribute_value(a) for a in dq.attribute} == {"axis": trans_b, "block_size": 32}
    expected = quantize_blockwise(w, trans_b, 32, 4).dequantized()  # blocks run along K, B's axis transB
    assert_close(with_weights(model, {"B": expected}), after, float_feeds(model))


def test_gemm_with_alpha_goes_through_dequantize_even_in_matmulnbits_format():
    w = RNG.standard_normal((64, 48)).astype(np.float32)
    gemm = helper.make_node("Gemm", ["a", "B"], ["y"], name="gemm", alpha=0.5)
    model = make_model([gemm], [vi("a", [3, 64])], [vi("y", [3, 48])], [init("B", w)])
    after, result = quantize(model, format="matmulnbits")
    assert op_types(after) == ["DequantizeLinear", "Gemm"] and "upgraded the opset from 17 to 21" in result.notes
    assert_close(with_weights(model, {"B": quantize_blockwise(w, 0, 32, 4).dequantized()}), after, float_feeds(model))


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("k, block", [(64, 32), (40, 16), (64, 0)])  # whole blocks, a partial block, per channel
def test_matmul_folded_restores_float_at_load(symmetric, k, block):
    """x -> MatMul(W) -> y  =>  Cast(W int4) [-zero] * scale -> MatMul; onnxruntime folds the restore at load"""
    model, w = matmul_model(k=k)
    after, result = quantize(model, format="folded", block_size=block, symmetric=symmetric)
    ops = op_types(after)
    assert ops[0] == "Cast" and ops[-1] == "MatMul" and "Mul" in ops and ("Slice" in ops) == bool(block and k % block)
    assert default_opset(after) == 21 and "upgraded the opset from 17 to 21" in result.notes
    assert TP.INT4 in initializer_types(after).values() or TP.UINT4 in initializer_types(after).values()
    assert op_types(optimized_graph(after, RuntimeSettings(level="all"))) == ["MatMul"]
    block = block or (0 if symmetric else k)
    expected = quantize_blockwise(w, 0, block, 4, symmetric) if block else quantize_per_channel(w, 1, 4)
    assert_close(with_weights(model, {"W": expected.dequantized()}), after, float_feeds(model))


def test_int8_folded_needs_no_opset_upgrade():
    model, w = matmul_model()
    after, result = quantize(model, format="folded", bits=8)
    assert default_opset(after) == 17 and not result.notes
    assert_close(with_weights(model, {"W": quantize_blockwise(w, 0, 32, 8).dequantized()}), after, float_feeds(model))


def embedding_model(vocab=50, dim=64):
    """ids [2, 5] -> Gather(T [V, D]) -> y"""
    table = RNG.standard_normal((vocab, dim)).astype(np.float32)
    gather = helper.make_node("Gather", ["T", "ids"], ["y"], name="embed")
    return make_model([gather], [vi("ids", [2, 5], TP.INT64)], [vi("y", [2, 5, dim])], [init("T", table)]), table


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("fmt, op", [("dequantize", "DequantizeLinear"), ("matmulnbits", "GatherBlockQuantized"), ("folded", "Cast")])
def test_gather_embedding(bits, symmetric, fmt, op):
    model, table = embedding_model(dim=80)  # 80 = two blocks of 32 and a partial one
    after, result = quantize(model, format=fmt, bits=bits, symmetric=symmetric)
    assert op_types(after)[0] == op and result.details["quantized"] == {"Gather": 1}
    expected = quantize_blockwise(table, 1, 32, bits, symmetric).dequantized()  # blocks along each row
    assert_close(with_weights(model, {"T": expected}), after, float_feeds(model))


def test_embeddings_false_leaves_tables_alone():
    model, _ = embedding_model()
    after, result = quantize(model, embeddings=False)
    assert not result.changed and op_types(after) == ["Gather"]


@pytest.mark.parametrize("fmt", ["dequantize", "matmulnbits", "folded"])
def test_shared_weight_is_quantized_once(fmt):
    """x -> MatMul(W) -> a;  z -> MatMul(W) -> b   (one W)"""
    w = RNG.standard_normal((64, 48)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["a"], name="mm1"), helper.make_node("MatMul", ["z", "W"], ["b"], name="mm2")]
    model = make_model(nodes, [vi("x", [3, 64]), vi("z", [2, 64])], [vi("a", [3, 48]), vi("b", [2, 48])], [init("W", w)])
    after, result = quantize(model, format=fmt)
    assert result.details["quantized"] == {"MatMul": 2}
    assert op_types(after).count("DequantizeLinear") == (1 if fmt == "dequantize" else 0)
    assert op_types(after).count("Cast") == (1 if fmt == "folded" else 0)
    weights = [t for t in after.graph.initializer if np.prod(t.dims) >= 64 * 48 // 2]
    assert len(weights) == 1  # one packed tensor read by both
    assert_close(with_weights(model, {"W": quantize_blockwise(w, 0, 32, 4).dequantized()}), after, float_feeds(model))


def test_keep_float_leaves_the_named_reader_float_and_quantizes_the_others():
    """x -> MatMul(W) -> a;  z -> MatMul(W) -> b with keep_float=mm2: mm1 reads the int4 W, mm2 the
    float W (both are stored), and the refusal says why."""
    w = RNG.standard_normal((64, 48)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["a"], name="mm1"), helper.make_node("MatMul", ["z", "W"], ["b"], name="mm2")]
    model = make_model(nodes, [vi("x", [3, 64]), vi("z", [2, 64])], [vi("a", [3, 48]), vi("b", [2, 48])], [init("W", w)])
    after, result = quantize(model, format="dequantize", keep_float="^mm2$")
    assert result.details["quantized"] == {"MatMul": 1}
    assert any("mm2" in r and "keep_float '^mm2$' matches it" in r for r in result.refused)
    readers = {n.name: n.input[1] for n in after.graph.node if n.op_type == "MatMul"}
    assert readers["mm2"] == "W" and readers["mm1"] != "W"
    expected = copy_model(model)
    expected.graph.initializer.append(init("W_int4", quantize_blockwise(w, 0, 32, 4).dequantized()))
    expected.graph.node[0].input[1] = "W_int4"
    assert_close(expected, after, float_feeds(model))


@pytest.mark.parametrize("fmt", ["dequantize", "matmulnbits"])
def test_tied_embedding_is_stored_once(fmt):
    """ids -> Gather(T) -> h -> MatMul(Transpose(T)) -> logits   (the LM head reads the table transposed)"""
    table = RNG.standard_normal((50, 64)).astype(np.float32)
    nodes = [
        helper.make_node("Gather", ["T", "ids"], ["h"], name="embed"),
        helper.make_node("Transpose", ["T"], ["Tt"], name="tied", perm=[1, 0]),
        helper.make_node("MatMul", ["h", "Tt"], ["logits"], name="head"),
    ]
    model = make_model(nodes, [vi("ids", [2, 5], TP.INT64)], [vi("logits", [2, 5, 50])], [init("T", table)])
    after, result = quantize(model, format=fmt)
    assert result.details["quantized"] == {"Gather": 1, "MatMul": 1}
    big = [t for t in after.graph.initializer if np.prod(t.dims) >= 50 * 64 // 2]
    assert len(big) == 1 and big[0].data_type == TP.INT4 and list(big[0].dims) == [50, 64]
    assert op_types(after).count("DequantizeLinear") == 1
    assert ("GatherBlockQuantized" in op_types(after)) == (fmt == "matmulnbits")
    assert_close(with_weights(model, {"T": quantize_blockwise(table, 1, 32, 4).dequantized()}), after, float_feeds(model))


def exact_int4_weight(k, n):
    """Weights that int4 with blocks of 32 stores exactly: multiples of 0.1 in [-0.8, 0.7], each block
    reaching -0.8 (so its scale is 0.1)."""
    w = RNG.integers(-8, 8, (k, n)).astype(np.float32)
    w[::32] = -8
    return w * np.float32(0.1)


def two_layer_model(w1, w2):
    """x -> MatMul(W1) -> h -> MatMul(W2) -> y"""
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"], name="mm1"), helper.make_node("MatMul", ["h", "W2"], ["y"], name="mm2")]
    return make_model(nodes, [vi("x", [8, 64])], [vi("y", [8, w2.shape[1]])], [init("W1", w1), init("W2", w2)])


def test_sensitive_weight_falls_back_to_int8():
    """W1 is stored exactly by int4; W2 (normal) loses ~10% at int4, too much for cosine 0.9999."""
    model = two_layer_model(exact_int4_weight(64, 64), RNG.standard_normal((64, 32)).astype(np.float32))
    after, result = quantize(model, budget=Budget(min_cosine=0.9999, min_top1=None), format="dequantize")
    assert result.changed
    assert result.details["bits"] == {"W1": 4, "W2": 8}
    assert [f["weight"] for f in result.details["int8_fallback"]] == ["W2"]
    assert "cosine" in result.details["int8_fallback"][0]["reason"] and result.details["kept_float"] == []
    assert result.counts["weights_int4"] == 1 and result.counts["weights_int8"] == 1


def test_weight_no_format_can_hold_stays_float():
    """bits 8 and a budget no int8 weight meets: W2 stays float, the exact W1 is quantized. (Folded, W1
    is restored exactly at load; at level all onnxruntime runs a DequantizeLinear weight as MatMulNBits,
    which quantizes the activations too, and the budget is judged there.)"""
    model = two_layer_model(exact_int4_weight(64, 64), RNG.standard_normal((64, 32)).astype(np.float32))
    after, result = quantize(model, budget=Budget(min_cosine=0.99999999, min_top1=None), format="folded", bits=8)
    assert result.details["bits"] == {"W1": 8, "W2": 0}
    assert [f["weight"] for f in result.details["kept_float"]] == ["W2"]
    assert initializer_types(after)["W2"] == TP.FLOAT and op_types(after).count("Cast") == 1


def test_refused_when_even_the_float_model_is_over_budget():
    """A floor no model can meet (cosine 1.5): every weight ends float, the pass refuses and says why."""
    model, _ = matmul_model()
    after, result = quantize(model, budget=Budget(min_cosine=1.5, min_top1=None))
    assert not result.changed and "over budget even with every weight float" in result.refused[-1]
    assert op_types(after) == ["MatMul"]


def test_refused_weights_say_why():
    """Computed weight, a weight that is a graph input, a tiny weight, a Gather on axis 1."""
    w = RNG.standard_normal((64, 48)).astype(np.float32)
    nodes = [
        helper.make_node("Mul", ["W", "two"], ["W2"], name="scale_w"),
        helper.make_node("MatMul", ["x", "W2"], ["a"], name="computed"),
        helper.make_node("MatMul", ["x", "Win"], ["b"], name="overridable"),
        helper.make_node("MatMul", ["a", "Wsmall"], ["c"], name="tiny"),
        helper.make_node("Gather", ["T", "ids"], ["d"], name="columns", axis=1),
    ]
    inits = [init("W", w), init("two", np.float32(2.0)), init("Win", w), init("Wsmall", RNG.standard_normal((48, 4)).astype(np.float32)), init("T", RNG.standard_normal((64, 64)).astype(np.float32))]
    model = make_model(nodes, [vi("x", [3, 64]), vi("Win", [64, 48]), vi("ids", [2], TP.INT64)], [vi("b", [3, 48]), vi("c", [3, 4]), vi("d", [64, 2])], inits)
    after, result = quantize(model)
    assert not result.changed and op_types(after) == op_types(model)
    reasons = "\n".join(result.refused)
    assert "MatMul 'computed': weight 'W2' is computed from constants by Mul at run time (run fold-constants first)" in reasons
    assert "MatMul 'overridable': weight 'Win' is also a graph input" in reasons
    assert "MatMul 'tiny': weight 'Wsmall' has 192 elements < min_weight_elements=1024" in reasons
    assert "Gather 'columns': Gather on axis 1" in reasons
    assert len(result.refused) == 4


def test_activation_matmul_is_not_a_refused_weight():
    """x -> MatMul(x, x^T): both operands are activations; nothing to quantize, nothing refused."""
    nodes = [helper.make_node("Transpose", ["x"], ["xt"]), helper.make_node("MatMul", ["x", "xt"], ["y"])]
    model = make_model(nodes, [vi("x", [40, 40])], [vi("y", [40, 40])])
    _, result = quantize(model)
    assert not result.changed and result.refused == []


def test_table_read_along_two_axes_is_refused():
    """ids -> Gather(T) ; x -> MatMul(x, T): the table would need blocks along D and along V."""
    table = RNG.standard_normal((64, 64)).astype(np.float32)
    nodes = [helper.make_node("Gather", ["T", "ids"], ["h"], name="embed"), helper.make_node("MatMul", ["x", "T"], ["y"], name="mm")]
    model = make_model(nodes, [vi("ids", [3], TP.INT64), vi("x", [2, 64])], [vi("h", [3, 64]), vi("y", [2, 64])], [init("T", table)])
    _, result = quantize(model)
    assert not result.changed and "quantized along different axes" in result.refused[0]


@pytest.mark.parametrize("options", [{"bits": 3}, {"block_size": 24}, {"method": "awq"}, {"format": "int4"}])
def test_bad_options_raise(options):
    model, _ = matmul_model()
    with pytest.raises(PassError, match="quantize-weights"):
        quantize(model, **options)


def test_auto_format_is_measured_once_and_noted():
    model, _ = matmul_model()
    ticks = iter(range(10**6))
    feeds = float_feeds(model)
    ctx = context(feeds, timer=lambda: float(next(ticks)), bench_rounds=3)
    first = copy_model(model)
    result = QuantizeWeights().run(first, ctx)
    (key, (chosen, medians, _)), = ctx.decisions.items()
    assert chosen in ("dequantize", "matmulnbits", "folded") and set(medians) == {"dequantize", "matmulnbits", "folded"}
    assert result.details["format"] == chosen and any(n.startswith(f"format {chosen} chosen by measurement") for n in result.notes)
    used = next(ticks)
    second = copy_model(model)
    QuantizeWeights().run(second, ctx)
    assert next(ticks) == used + 1  # the cached decision: no timing the second time


@pytest.mark.parametrize("matmulnbits, chosen", [(0.98, "folded"), (0.90, "matmulnbits")])
def test_auto_format_prefers_folded_unless_another_is_faster_by_the_speed_margin(matmulnbits, chosen):
    """Stubbed timings as ratios to folded: a format must beat the float kernels folded runs by 3% to be
    chosen over it, since a smaller lead is within one timing's noise and the pipeline may then time it
    slower than the input."""
    from graphopt.bench import Timing

    model, _ = matmul_model()
    ctx = context(float_feeds(model))
    ratios = {"dequantize": 1.5, "matmulnbits": matmulnbits, "folded": 1.0}
    ctx.latency = lambda models: [Timing(label, 0.0, [10.0 * ratios[label]], ratios[label]) for label, _ in models]
    result = QuantizeWeights().run(model, ctx)
    assert result.details["format"] == chosen
    note = next(n for n in result.notes if n.startswith("format "))
    assert ("faster than folded by less than 3%" in note) == (chosen == "folded")
    assert chosen == "folded" or op_types(model).count("MatMulNBits") == 1


# ---- GPTQ --------------------------------------------------------------------------------------------


def correlated_inputs(rows=1024, k=128, seed=3):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((rows, 12)) @ rng.standard_normal((12, k)) + 0.05 * rng.standard_normal((rows, k))).astype(np.float32)


def test_hessian_streams_two_x_transpose_x():
    x = correlated_inputs(rows=60, k=16)
    h = Hessian(16)
    h.add(x[:20].reshape(4, 5, 16))
    h.add(x[20:])
    np.testing.assert_allclose(h.matrix, 2 * x.astype(np.float64).T @ x, rtol=1e-10)


@pytest.mark.parametrize("symmetric, block", [(True, 32), (False, 32), (True, 0)])  # block 0: per channel
def test_gptq_output_error_is_lower_than_round_to_nearest(symmetric, block):
    x = correlated_inputs()
    w = RNG.standard_normal((128, 40)).astype(np.float32)
    h = Hessian(128)
    h.add(x)
    rtn = quantize_blockwise(w, 0, block, 4, symmetric) if block else quantize_per_channel(w, 1, 4)
    q = gptq(w, h.matrix, bits=4, block_size=block, symmetric=symmetric)
    assert q.values.shape == w.shape and q.scale.shape == rtn.scale.shape
    error = lambda quantized: np.linalg.norm(x @ w - x @ quantized.dequantized())  # noqa: E731
    assert error(q) < 0.5 * error(rtn)


def test_gptq_with_uncorrelated_inputs_is_round_to_nearest():
    w = RNG.standard_normal((96, 24)).astype(np.float32)
    q = gptq(w, np.eye(96) * 3.0, bits=4, block_size=32, symmetric=False)
    rtn = quantize_blockwise(w, 0, 32, 4, symmetric=False)
    np.testing.assert_array_equal(q.values, rtn.values)
    np.testing.assert_array_equal(q.zero_point, rtn.zero_point)
    np.testing.assert_allclose(q.scale, rtn.scale)


def test_gptq_dead_input_rows_quantize_to_zero():
    x = correlated_inputs(rows=200, k=64)
    x[:, 5] = 0.0
    h = Hessian(64)
    h.add(x)
    q = gptq(RNG.standard_normal((64, 8)).astype(np.float32), h.matrix, bits=4, block_size=32)
    assert np.all(q.dequantized()[5] == 0.0)


def test_pass_gptq_beats_rtn_on_the_calibration_outputs():
    """x (correlated features) -> MatMul(W) -> y, GPTQ against round-to-nearest through the whole pass."""
    k = 128
    model, w = matmul_model(k=k)
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 64
    model.graph.output[0].type.tensor_type.shape.dim[0].dim_value = 64
    feeds = [{"x": correlated_inputs(rows=64, k=k, seed=s)} for s in range(4)]
    reference = ort_outputs(model, feeds)
    errors = {}
    for method in ("rtn", "gptq"):
        after, result = quantize(model, feeds, method=method, format="matmulnbits")
        got = ort_outputs(after, feeds)
        errors[method] = sum(np.linalg.norm(g["y"] - r["y"]) for g, r in zip(got, reference))
    assert errors["gptq"] < 0.6 * errors["rtn"]


def conv_model(out_channels=16, in_channels=8, group=1):
    """x [1, C, 6, 6] -> Conv(W [M, C/group, 3, 3], b) -> y"""
    w = RNG.standard_normal((out_channels, in_channels // group, 3, 3)).astype(np.float32)
    b = RNG.standard_normal(out_channels).astype(np.float32)
    node = helper.make_node("Conv", ["x", "W", "b"], ["y"], name="conv", pads=[1, 1, 1, 1], group=group)
    return make_model([node], [vi("x", [1, in_channels, 6, 6])], [vi("y", [1, out_channels, 6, 6])], [init("W", w), init("b", b)]), w


@pytest.mark.parametrize("fmt", ["folded", "dequantize"])
@pytest.mark.parametrize("group", [1, 8])  # a plain and a depthwise kernel
def test_conv_int8_per_channel_restored_in_the_kernel_shape(fmt, group):
    """x -> Conv(W) -> y  =>  Reshape(restore(W int8 [M, C/group*9], one scale per output channel)) -> Conv;
    the folded form becomes the float Conv again when onnxruntime loads it"""
    model, w = conv_model(group=group, out_channels=16 if group == 1 else 8)
    after, result = quantize(model, format=fmt, bits=8, block_size=0, min_weight_elements=64)
    ops = op_types(after)
    assert ops[-2:] == ["Reshape", "Conv"] and ("DequantizeLinear" in ops) == (fmt == "dequantize")
    assert result.details["quantized"] == {"Conv": 1} and result.counts["weights_int8"] == 1
    assert "W" not in initializer_types(after) and TP.INT8 in initializer_types(after).values()
    if fmt == "folded":  # the same kernels as the float model (onnxruntime may add NCHWc reorders)
        at_load = op_types(optimized_graph(after, RuntimeSettings(level="all")))
        assert at_load == op_types(optimized_graph(model, RuntimeSettings(level="all"))) and "Cast" not in at_load
    view = w.reshape(w.shape[0], -1)
    expected = quantize_per_channel(view, 0, 8).dequantized().reshape(w.shape)
    assert_close(with_weights(model, {"W": expected}), after, float_feeds(model))


def test_conv_int4_blocks_run_along_the_flattened_kernel():
    """int4, block 32 over each output channel's C*3*3 = 72 values (three blocks, the last partial)."""
    model, w = conv_model()
    after, result = quantize(model, format="folded", block_size=32, symmetric=True)
    assert result.counts["weights_int4"] == 1 and "Slice" in op_types(after)
    expected = quantize_blockwise(w.reshape(16, -1), 1, 32, 4).dequantized().reshape(w.shape)
    assert_close(with_weights(model, {"W": expected}), after, float_feeds(model))


def test_conv_in_matmulnbits_format_goes_through_dequantize():
    """MatMulNBits has no Conv form: the kernel is restored by DequantizeLinear instead."""
    model, _ = conv_model()
    after, result = quantize(model, format="matmulnbits", block_size=32)
    assert op_types(after) == ["DequantizeLinear", "Reshape", "Conv"]


def test_weight_already_quantized_is_skipped_without_a_refusal():
    """W_q (int8) -> DequantizeLinear -> MatMul, and a folded Cast(int8) * s -> MatMul: both are already
    quantized, so nothing is done and nothing is reported as refused (a float MatMul weight next to them
    is quantized as usual)."""
    w = RNG.standard_normal((64, 48)).astype(np.float32)
    nodes = [
        helper.make_node("DequantizeLinear", ["Wq", "s"], ["W1"]),
        helper.make_node("MatMul", ["x", "W1"], ["a"], name="dq"),
        helper.make_node("Cast", ["Wq"], ["Wi"], to=TP.FLOAT),
        helper.make_node("Mul", ["Wi", "s"], ["W2"]),
        helper.make_node("MatMul", ["x", "W2"], ["b"], name="folded"),
        helper.make_node("MatMul", ["x", "W"], ["c"], name="float"),
    ]
    inits = [init("Wq", RNG.integers(-127, 128, (64, 48)).astype(np.int8)), init("s", np.float32(0.01)), init("W", w)]
    model = make_model(nodes, [vi("x", [3, 64])], [vi("a", [3, 48]), vi("b", [3, 48]), vi("c", [3, 48])], inits)
    after, result = quantize(model, format="folded", bits=8)
    assert result.refused == [] and result.details["bits"] == {"W": 8}



def test_nodes_inside_bodies_stay_float_and_the_notes_say_so():
    """x -> MatMul(W) -> h ; If(cond) { h -> MatMul(W2) -> inner } -> y: the main graph's weight is
    quantized; the body's MatMul (in both branches) stays float, and a note counts it."""
    body = helper.make_graph(
        [helper.make_node("MatMul", ["h", "w2"], ["inner"])], "body", [], [vi("inner", [3, 48])], initializer=[init("w2", RNG.standard_normal((48, 48)).astype(np.float32))]
    )
    model, _ = matmul_model()
    model.graph.node[0].output[0] = "h"
    model.graph.node.append(helper.make_node("If", ["cond"], ["y"], then_branch=body, else_branch=body))
    model.graph.initializer.append(init("cond", np.array(True)))
    after, result = quantize(model, bits=8, format="dequantize")
    assert result.changed and result.details["quantized"] == {"MatMul": 1}
    assert result.notes[0] == "nodes inside If/Loop/Scan bodies left float: MatMul 2 (quantize-weights quantizes the main graph only)"
    then_branch = next(a.g for a in after.graph.node[-1].attribute if a.name == "then_branch")
    assert [n.op_type for n in then_branch.node] == ["MatMul"] and then_branch.initializer[0].data_type == TP.FLOAT
    assert_close(model, after, float_feeds(model), rtol=0.02)


def recurrent_model(op="LSTM", hidden=16, inputs=32, gates=4):
    """x [T=5, 1, inputs] -> bidirectional op(W [2, gates*hidden, inputs], R [2, gates*hidden, hidden], B) -> y"""
    w = RNG.standard_normal((2, gates * hidden, inputs)).astype(np.float32) * 0.3
    r = RNG.standard_normal((2, gates * hidden, hidden)).astype(np.float32) * 0.3
    b = RNG.standard_normal((2, 2 * gates * hidden)).astype(np.float32) * 0.1
    node = helper.make_node(op, ["x", "W", "R", "B"], ["y"], name="rnn", hidden_size=hidden, direction="bidirectional")
    return make_model([node], [vi("x", [5, 1, inputs])], [vi("y", [5, 2, 1, hidden])], [init("W", w), init("R", r), init("B", b)])


@pytest.mark.parametrize("op, gates", [("LSTM", 4), ("GRU", 3)])
@pytest.mark.parametrize("fmt", ["dequantize", "folded"])
def test_recurrent_weights_are_quantized_as_rows_of_gates_and_reshaped_back(op, gates, fmt):
    """op(x, W, R) => op(x, Reshape(restored W), Reshape(restored R)): each is quantized as its
    [2 * gates * hidden, inputs or hidden] view, blocks along the last axis, and the bias stays float."""
    model = recurrent_model(op, gates=gates)
    after, result = quantize(model, format=fmt, block_size=16)
    assert result.changed and result.details["quantized"] == {op: 1}, "one node, two weights"
    rnn = next(n for n in after.graph.node if n.op_type == op)
    restored = {n.output[0]: n for n in after.graph.node}
    for slot, name, last in ((1, "W", 32), (2, "R", 16)):
        reshape = restored[rnn.input[slot]]
        assert reshape.op_type == "Reshape"
        assert list(constant_value(after.graph, reshape.input[1])) == [2, gates * 16, last]
        assert result.details["bits"][name] == 4
    assert rnn.input[3] == "B" and "W" not in initializer_types(after) and "R" not in initializer_types(after)
    expected = {}
    for name in ("W", "R"):
        value = constant_value(model.graph, name)
        expected[name] = quantize_blockwise(value.reshape(-1, value.shape[-1]), 1, 16).dequantized().reshape(value.shape)
    assert_close(with_weights(model, expected), after, float_feeds(model), rtol=1e-5)


def test_recurrent_weights_per_channel_int8_have_one_scale_per_gate_row():
    model = recurrent_model("LSTM")
    after, result = quantize(model, bits=8, block_size=0, format="dequantize")
    assert result.details["quantized"] == {"LSTM": 1}
    dq = [n for n in after.graph.node if n.op_type == "DequantizeLinear"]
    scales = sorted(constant_value(after.graph, n.input[1]).shape for n in dq)
    assert scales == [(2 * 4 * 16,), (2 * 4 * 16,)], "one scale per output row of each direction and gate"
    assert_close(model, after, float_feeds(model), rtol=0.05)
