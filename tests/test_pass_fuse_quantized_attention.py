"""fuse-quantized-attention: dynamically quantized Q/K/V projections and their MultiHeadAttention become QAttention.

The models are the float attention of test_pass_fuse_attention run through quantize-dynamic and
fuse-attention, the passes whose output this one rewrites."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from graphopt.graph import copy_model
from graphopt.passes.fuse_attention import FuseAttention
from graphopt.passes.fuse_quantized_attention import FuseQuantizedAttention
from graphopt.passes.quantize_dynamic import QuantizeDynamic
from tests.helpers import assert_same_outputs, op_types, ort_outputs, run_pass
from tests.test_pass_fuse_attention import BATCH, HEAD, HEADS, HIDDEN, QUERIES, const, sdpa_model, unmasked_sdpa_model

NEG_INF = -np.inf


def where_mask_model(keep_shape=("batch", 1, "seq", "seq"), fill: float = NEG_INF, regroup: bool = True) -> onnx.ModelProto:
    """The torch SDPA export with its additive mask made from a bool input: Where(keep, 0, fill)."""
    model = sdpa_model(mask_shape=keep_shape, regroup=regroup)
    model.graph.input[1].CopyFrom(helper.make_tensor_value_info("keep", TensorProto.BOOL, list(keep_shape)))
    model.graph.node.insert(0, helper.make_node("Where", ["keep", "zero", "fill"], ["mask"], name="mask_where"))
    model.graph.initializer.append(const("fill", fill))
    return model


def eager_mask_model(fill: float = float(np.finfo(np.float32).min)) -> onnx.ModelProto:
    """The same attention with eager BERT's extended mask: (1 - float(attention_mask[:, None, None, :])) * fill."""
    model = sdpa_model(mask_shape=("batch", 1, 1, "seq"))
    model.graph.input[1].CopyFrom(helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"]))
    nodes = [
        helper.make_node("Unsqueeze", ["attention_mask", "axes12"], ["mask4"]),
        helper.make_node("Cast", ["mask4"], ["mask_float"], to=TensorProto.FLOAT),
        helper.make_node("Sub", ["one", "mask_float"], ["inverted"]),
        helper.make_node("Mul", ["inverted", "fill"], ["mask"]),
    ]
    for k, n in enumerate(nodes):
        model.graph.node.insert(k, n)
    model.graph.initializer.extend([const("axes12", [1, 2], np.int64), const("one", 1.0), const("fill", fill)])
    return model


def mask_feeds(n: int = 2) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(8)
    feeds = []
    for _ in range(n):
        mask = (rng.random((BATCH, QUERIES)) < 0.6).astype(np.int64)
        mask[:, 0] = 1
        feeds.append({"x": rng.standard_normal((BATCH, QUERIES, HIDDEN)).astype(np.float32), "attention_mask": mask})
    return feeds


def keep_feeds(keep_shape=(BATCH, 1, QUERIES, QUERIES), n: int = 2) -> list[dict[str, np.ndarray]]:
    """Keys kept at random; batch item 1 keeps none (its rows are NaN through the attention, zeros after
    the guard)."""
    rng = np.random.default_rng(4)
    feeds = []
    for _ in range(n):
        keep = rng.random(keep_shape) < 0.7
        keep[..., 0] = True
        if keep_shape[0] > 1:
            keep[1] = False
        feeds.append({"x": rng.standard_normal((BATCH, QUERIES, HIDDEN)).astype(np.float32), "keep": keep})
    return feeds


def quantized_attention(model: onnx.ModelProto, feeds) -> onnx.ModelProto:
    """quantize-dynamic on every MatMul with a constant weight, then fuse-attention, in place."""
    assert run_pass(QuantizeDynamic(fallback=False, latency_fallback=False, min_weight_elements=0), model, feeds).changed
    assert run_pass(FuseAttention(), model, feeds).changed
    assert op_types(model).count("MatMulInteger") == 3 and "MultiHeadAttention" in op_types(model)
    return model


def fuse(model: onnx.ModelProto, feeds):
    before = copy_model(model)
    result = run_pass(FuseQuantizedAttention(), model, feeds)
    assert_same_outputs(before, model, feeds, rtol=1e-5, atol=1e-5)
    return result


def node(model: onnx.ModelProto, op_type: str) -> onnx.NodeProto:
    (found,) = [n for n in model.graph.node if n.op_type == op_type]
    return found


def attrs(n: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in n.attribute}


def init(model: onnx.ModelProto, name: str) -> np.ndarray:
    return numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == name))


def test_self_attention_with_a_where_mask_becomes_one_qattention_over_the_concatenated_weights():
    feeds = keep_feeds()
    model = quantized_attention(where_mask_model(), feeds)
    products = [n for n in model.graph.node if n.op_type == "MatMulInteger"]
    old_weights = np.concatenate([init(model, n.input[1]) for n in products], axis=1)
    quantizer = node(model, "DynamicQuantizeLinear")
    result = fuse(model, feeds)
    assert result.changed and result.counts == {"attention_fused": 1, "projections_merged": 3, "mask_nodes_removed": 1}
    ops = op_types(model)
    assert "MatMulInteger" not in ops and "MultiHeadAttention" not in ops and ops.count("Where") == 1  # the NaN guard's
    qa = node(model, "QAttention")
    assert qa.domain == "com.microsoft"
    assert qa.input[0] == quantizer.output[0] and qa.input[3] == quantizer.output[1] and qa.input[6] == quantizer.output[2]
    weight = init(model, qa.input[1])
    assert weight.dtype == np.int8 and weight.shape == (HIDDEN, 3 * HIDDEN)
    np.testing.assert_array_equal(weight, old_weights)
    assert init(model, qa.input[2]).shape == init(model, qa.input[4]).shape == (3 * HIDDEN,)
    a = attrs(qa)
    assert a["num_heads"] == HEADS and np.isclose(a["scale"], HEAD**-0.5) and a["mask_filter_value"] == NEG_INF
    cast, squeeze = node(model, "Cast"), node(model, "Squeeze")
    assert cast.input[0] == "keep" and attrs(cast)["to"] == TensorProto.INT32
    assert squeeze.output[0] == qa.input[5] and list(init(model, squeeze.input[1])) == [1]
    # the batch item with every key masked: NaN out of QAttention as out of MultiHeadAttention, zeros after the guard
    y = ort_outputs(model, feeds)[0]["y"]
    assert np.all(y[1] == 0.0) and np.isfinite(y).all()


def test_before_opset_13_the_squeeze_takes_its_axes_as_an_attribute():
    feeds = keep_feeds()
    model = where_mask_model(regroup=False)
    model.opset_import[0].version = 12
    quantized_attention(model, feeds)
    assert fuse(model, feeds).changed
    squeeze = node(model, "Squeeze")
    assert len(squeeze.input) == 1 and attrs(squeeze)["axes"] == [1]


def test_attention_still_spelled_out_is_fused_here_first():
    """fuse-attention rolled back (not faster alone): this pass runs its rewrite first, then its own."""
    feeds = keep_feeds()
    model = where_mask_model()
    assert run_pass(QuantizeDynamic(fallback=False, latency_fallback=False, min_weight_elements=0), model, feeds).changed
    assert "MultiHeadAttention" not in op_types(model)
    result = fuse(model, feeds)
    assert result.changed and result.counts["attention_fused"] == 1
    assert result.notes == ["the attention was still spelled out: fuse-attention's rewrite ran first, and this pass is timed with it"]
    ops = op_types(model)
    assert "QAttention" in ops and not {"MultiHeadAttention", "Softmax", "MatMulInteger"} & set(ops)


def test_without_quantized_projections_the_spelled_out_attention_is_left_alone():
    """fuse-attention's rewrite alone is fuse-attention's to judge: with nothing to quantize after it, the
    model comes back unchanged."""
    feeds = keep_feeds()
    model = where_mask_model()
    before = copy_model(model)
    result = run_pass(FuseQuantizedAttention(), model, feeds)
    assert not result.changed and model == before


def test_a_finite_fill_becomes_the_mask_filter_value():
    feeds = keep_feeds()
    model = quantized_attention(where_mask_model(fill=-1e4), feeds)
    assert fuse(model, feeds).changed
    assert attrs(node(model, "QAttention"))["mask_filter_value"] == np.float32(-1e4)


def test_a_key_mask_expanded_by_fuse_attention_becomes_a_two_dimensional_mask_index():
    """keep [B, 1, 1, T]: fuse-attention expanded the bias over the query positions, with a target read from
    q's shape; QAttention takes the key mask as [B, T], and the Expand, its Shape/Gather/Concat and the Where
    all go."""
    shape = (BATCH, 1, 1, QUERIES)
    feeds = keep_feeds(shape)
    model = quantized_attention(where_mask_model(keep_shape=("batch", 1, 1, "seq")), feeds)
    assert "Expand" in op_types(model)
    result = fuse(model, feeds)
    assert result.counts["mask_nodes_removed"] == 5
    assert not {"Expand", "Shape", "Gather", "Concat"} & set(op_types(model))
    squeeze = node(model, "Squeeze")
    assert list(init(model, squeeze.input[1])) == [1, 2] and node(model, "QAttention").input[5] == squeeze.output[0]


def test_eager_berts_extended_mask_becomes_the_mask_index():
    """(1 - m) * c with m the float [B, 1, 1, T] mask: QAttention gets m as [B, T] and c as its fill; the
    Sub, the Mul and fuse-attention's Expand with its shape go."""
    feeds = mask_feeds()
    model = quantized_attention(eager_mask_model(), feeds)
    result = fuse(model, feeds)
    assert result.changed and result.counts["mask_nodes_removed"] == 6  # Expand, Concat, Gather, Shape, Mul, Sub
    assert not {"Sub", "Expand", "MultiHeadAttention"} & set(op_types(model))
    qa, squeeze = node(model, "QAttention"), node(model, "Squeeze")
    assert attrs(qa)["mask_filter_value"] == np.finfo(np.float32).min
    assert qa.input[5] == squeeze.output[0] and list(init(model, squeeze.input[1])) == [1, 2]
    cast = next(n for n in model.graph.node if n.op_type == "Cast" and n.output[0] == squeeze.input[0])
    assert cast.input[0] == "mask_float" and attrs(cast)["to"] == TensorProto.INT32


def test_an_extended_mask_of_values_other_than_zero_and_one_is_refused():
    """(1 - m) * c is a 0/1 mask only where m is 0 or 1: with m = 0.5 it adds c / 2, which QAttention cannot."""
    feeds = mask_feeds()
    model = eager_mask_model()
    next(n for n in model.graph.node if n.op_type == "Cast").output[0] = "mask_raw"
    model.graph.node.insert(2, helper.make_node("Mul", ["mask_raw", "half"], ["mask_float"]))
    model.graph.initializer.append(const("half", 0.5))
    quantized_attention(model, feeds)
    result = run_pass(FuseQuantizedAttention(), model, feeds)
    assert not result.changed
    (reason,) = result.refused
    assert reason.endswith("the attention bias is (1 - mask_float) * c and mask_float took values other than 0 and 1 on the calibration feeds: QAttention's mask only keeps or masks")


def test_without_a_mask_the_qattention_has_none():
    model = unmasked_sdpa_model()
    feeds = [{"x": f["x"]} for f in keep_feeds()]
    quantized_attention(model, feeds)
    assert fuse(model, feeds).changed
    qa = node(model, "QAttention")
    assert qa.input[5] == "" and "mask_filter_value" not in attrs(qa) and "Cast" not in op_types(model)


def test_an_additive_bias_that_is_not_a_where_mask_is_refused():
    """QAttention adds its fill where a 0/1 mask is 0; a float bias (here a graph input) has no such form."""
    rng = np.random.default_rng(5)
    feeds = [{"x": f["x"], "mask": rng.standard_normal((BATCH, 1, QUERIES, QUERIES)).astype(np.float32)} for f in keep_feeds()]
    model = quantized_attention(sdpa_model(), feeds)
    result = run_pass(FuseQuantizedAttention(), model, feeds)
    assert not result.changed and "QAttention" not in op_types(model)
    (reason,) = result.refused
    assert reason.endswith("the attention bias mask is not Where(mask, 0, c) or (1 - mask) * c: QAttention takes a 0/1 mask, not an additive bias")


def test_a_mask_broadcast_over_the_batch_is_refused():
    """MultiHeadAttention broadcasts a [1, 1, S, T] bias over the batch; QAttention's mask must have it."""
    feeds = keep_feeds((1, 1, QUERIES, QUERIES))
    model = quantized_attention(where_mask_model(keep_shape=(1, 1, "seq", "seq")), feeds)
    result = run_pass(FuseQuantizedAttention(), model, feeds)
    assert not result.changed
    (reason,) = result.refused
    assert reason.endswith("the mask keep has shapes [(1, 1, 3, 3)]: QAttention takes [batch, 1, queries or 1, keys] with the queries' batch and length")


def test_a_projection_read_elsewhere_is_refused():
    feeds = keep_feeds()
    model = quantized_attention(where_mask_model(), feeds)
    model.graph.output.append(helper.make_tensor_value_info("k3", TensorProto.FLOAT, None))
    result = run_pass(FuseQuantizedAttention(), model, feeds)
    assert not result.changed
    (reason,) = result.refused
    assert reason.endswith("k3 is also read elsewhere or is a graph output")


def test_a_head_split_that_does_not_keep_the_batch_dim_is_refused():
    """Reshape(y, [-1, S, N, H]) gives the same shapes on these feeds but would fold a batch into the
    sequence for other ones: not shown to keep the dims QAttention's input has."""
    feeds = keep_feeds()
    model = where_mask_model()
    split = next(t for t in model.graph.initializer if t.name == "split")
    split.CopyFrom(const("split", [-1, QUERIES, HEADS, HEAD], np.int64))
    quantized_attention(model, feeds)
    result = run_pass(FuseQuantizedAttention(), model, feeds)
    assert not result.changed
    (reason,) = result.refused
    assert "is not shown to keep the batch and sequence dims" in reason


def test_cross_attention_is_not_matched():
    """Keys and values from another input: their projections read another DynamicQuantizeLinear."""
    feeds = [{**f, "memory": f["x"][:, ::-1].copy()} for f in keep_feeds()]
    model = where_mask_model()
    for n in model.graph.node:
        if n.op_type == "MatMul" and n.input[1] in ("wk", "wv"):
            n.input[0] = "memory"
    model.graph.input.append(helper.make_tensor_value_info("memory", TensorProto.FLOAT, ["batch", "seq", HIDDEN]))
    quantized_attention(model, feeds)
    result = run_pass(FuseQuantizedAttention(), model, feeds)
    assert not result.changed and not result.refused


def test_values_of_another_hidden_size_are_refused():
    """MultiHeadAttention takes a V head size of its own; QAttention's one weight has three equal parts."""
    rng = np.random.default_rng(6)
    model = where_mask_model()
    wide = 3 * HEAD // 2 * HEADS
    for t in model.graph.initializer:
        if t.name in ("wv", "bv", "merge"):
            t.CopyFrom({"wv": const("wv", rng.standard_normal((HIDDEN, wide))), "bv": const("bv", rng.standard_normal(wide)), "merge": const("merge", [0, 0, wide], np.int64)}[t.name])
    model.graph.initializer.append(const("split_wide", [0, 0, HEADS, wide // HEADS], np.int64))
    next(n for n in model.graph.node if n.name == "split_v").input[1] = "split_wide"
    model.graph.output[0].CopyFrom(helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", wide]))
    feeds = keep_feeds()
    quantized_attention(model, feeds)
    result = run_pass(FuseQuantizedAttention(), model, feeds)
    assert not result.changed
    (reason,) = result.refused
    assert reason.endswith(f"the Q, K and V weights ([8, 8] int8, [8, 8] int8, [8, {wide}] int8) do not share one shape and element type with a hidden size divisible by {HEADS} heads")


def test_an_input_that_is_not_batch_sequence_hidden_is_refused():
    """x [B, S, 2, K]: each projection, flattened to [B, S, 2D], is one MultiHeadAttention input, but
    QAttention's input is [B, S, K] with one product per token."""
    rng = np.random.default_rng(7)
    nodes = []
    for r in "qkv":
        nodes += [
            helper.make_node("MatMul", ["x", f"w{r}"], [f"{r}_mm"]),
            helper.make_node("Add", [f"{r}_mm", f"b{r}"], [f"{r}3"]),
            helper.make_node("Reshape", [f"{r}3", "flat"], [f"{r}_flat"], name=f"flatten_{r}"),
        ]
    nodes.append(helper.make_node("MultiHeadAttention", ["q_flat", "k_flat", "v_flat"], ["y"], domain="com.microsoft", num_heads=HEADS))
    inits = [const(f"w{r}", rng.standard_normal((HIDDEN, HIDDEN))) for r in "qkv"] + [const(f"b{r}", rng.standard_normal(HIDDEN)) for r in "qkv"]
    graph = helper.make_graph(
        nodes, "test", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", 2, HIDDEN])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits + [const("flat", [0, 0, -1], np.int64)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    feeds = [{"x": rng.standard_normal((BATCH, QUERIES, 2, HIDDEN)).astype(np.float32)} for _ in range(2)]
    assert run_pass(QuantizeDynamic(fallback=False, latency_fallback=False, min_weight_elements=0), model, feeds).changed
    result = run_pass(FuseQuantizedAttention(), model, feeds)
    assert not result.changed
    (reason,) = result.refused
    assert reason.endswith(f"x has shapes [({BATCH}, {QUERIES}, 2, {HIDDEN})] on the calibration feeds: QAttention takes [batch, sequence, hidden]")
