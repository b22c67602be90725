"""fuse-attention: attention spelled out in MatMul/Softmax becomes com.microsoft MultiHeadAttention."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from graphopt.graph import copy_model
from graphopt.passes.fuse_attention import FuseAttention
from tests.helpers import assert_same_outputs, make_model, op_types, ort_outputs, run_pass

F = TensorProto.FLOAT
HIDDEN, HEADS, HEAD = 8, 2, 4
BATCH, QUERIES, KEYS = 2, 3, 5


def const(name: str, value, dtype=np.float32) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value, dtype), name)


def weights(rng: np.random.Generator) -> list[onnx.TensorProto]:
    return [const(f"w{r}", rng.standard_normal((HIDDEN, HIDDEN))) for r in "qkv"] + [const(f"b{r}", rng.standard_normal(HIDDEN)) for r in "qkv"]


def projections(k_from: str, split: list[int]) -> list[onnx.NodeProto]:
    """q/k/v = x W + b, each split to [B, S, N, H] by a Reshape (k and v read `k_from`)."""
    nodes = []
    for r in "qkv":
        source = "x" if r == "q" else k_from
        nodes += [
            helper.make_node("MatMul", [source, f"w{r}"], [f"{r}_mm"]),
            helper.make_node("Add", [f"{r}_mm", f"b{r}"], [f"{r}3"]),
            helper.make_node("Reshape", [f"{r}3", "split"], [f"{r}4"], name=f"split_{r}"),
        ]
    return nodes, [const("split", split, np.int64)]


def sdpa_model(mask_shape=("batch", 1, "seq", "seq"), regroup: bool = True, guard: bool = True) -> onnx.ModelProto:
    """torch's scaled_dot_product_attention export: sqrt of the scale on Q and on K^T, an additive mask,
    the NaN guard after Softmax, and a no-op Reshape of the context built from Shape/Gather before the
    Transpose back."""
    rng = np.random.default_rng(0)
    nodes, inits = projections("x", [0, 0, HEADS, HEAD])
    root = HEAD**-0.25
    nodes += [
        helper.make_node("Transpose", ["q4"], ["qh"], perm=[0, 2, 1, 3]),
        helper.make_node("Mul", ["qh", "root"], ["qs"]),
        helper.make_node("Transpose", ["k4"], ["kt"], perm=[0, 2, 3, 1]),
        helper.make_node("Mul", ["kt", "root"], ["ks"]),
        helper.make_node("Transpose", ["v4"], ["vh"], perm=[0, 2, 1, 3]),
        helper.make_node("MatMul", ["qs", "ks"], ["scores"]),
        helper.make_node("Add", ["scores", "mask"], ["masked"]),
        helper.make_node("Softmax", ["masked"], ["probs"], name="softmax", axis=-1),
    ]
    probs = "probs"
    if guard:
        nodes += [helper.make_node("IsNaN", ["probs"], ["nan"]), helper.make_node("Where", ["nan", "zero", "probs"], ["guarded"])]
        probs = "guarded"
    nodes.append(helper.make_node("MatMul", [probs, "vh"], ["context"]))
    grouped = "context"
    if regroup:
        def dim(tensor: str, axis: int, out: str) -> list[onnx.NodeProto]:
            return [
                helper.make_node("Shape", [tensor], [f"{out}_shape"]),
                helper.make_node("Gather", [f"{out}_shape", f"axis{axis}"], [f"{out}_dim"], axis=0),
                helper.make_node("Unsqueeze", [f"{out}_dim", "axes0"], [out]),
            ]
        nodes += dim("context", 0, "d0") + dim("qh", 2, "d2") + dim("vh", 3, "d3")
        nodes += [
            helper.make_node("Concat", ["d0", "heads", "d2", "d3"], ["regroup_shape"], axis=0),
            helper.make_node("Reshape", ["context", "regroup_shape"], ["regrouped"], name="regroup"),
        ]
        grouped = "regrouped"
        inits += [const(f"axis{a}", a, np.int64) for a in (0, 2, 3)] + [const("axes0", [0], np.int64), const("heads", [HEADS], np.int64)]
    nodes += [
        helper.make_node("Transpose", [grouped], ["back"], perm=[0, 2, 1, 3], name="back"),
        helper.make_node("Reshape", ["back", "merge"], ["y"]),
    ]
    inits += weights(rng) + [const("root", root), const("zero", 0.0), const("merge", [0, 0, HIDDEN], np.int64)]
    inputs = [helper.make_tensor_value_info("x", F, ["batch", "seq", HIDDEN]), helper.make_tensor_value_info("mask", F, list(mask_shape))]
    return make_model(nodes, inputs, [helper.make_tensor_value_info("y", F, ["batch", "seq", HIDDEN])], inits)


def masks(shape: tuple[int, ...]) -> np.ndarray:
    """Additive masks: keys masked at random with -inf; batch item 1 has every key masked."""
    rng = np.random.default_rng(1)
    mask = np.where(rng.random(shape) < 0.3, -np.inf, 0.0).astype(np.float32)
    mask[1] = -np.inf
    return mask


def self_feeds(mask_shape=(BATCH, 1, QUERIES, QUERIES), n: int = 2) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(2)
    return [{"x": rng.standard_normal((BATCH, QUERIES, HIDDEN)).astype(np.float32), "mask": masks(mask_shape)} for _ in range(n)]


def fuse(model: onnx.ModelProto, feeds):
    before = copy_model(model)
    result = run_pass(FuseAttention(), model, feeds)
    assert_same_outputs(before, model, feeds, rtol=1e-5, atol=1e-5)
    return result


def attention_node(model: onnx.ModelProto) -> onnx.NodeProto:
    (node,) = [n for n in model.graph.node if n.op_type == "MultiHeadAttention"]
    return node


def attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def test_torch_sdpa_form_becomes_multi_head_attention_with_the_nan_guard_on_its_output():
    model = sdpa_model()
    feeds = self_feeds()
    result = fuse(model, feeds)
    assert result.changed and result.counts["attention_fused"] == 1
    node = attention_node(model)
    assert node.domain == "com.microsoft" and any(o.domain == "com.microsoft" for o in model.opset_import)
    assert attrs(node)["num_heads"] == HEADS and np.isclose(attrs(node)["scale"], HEAD**-0.5)
    assert node.input[5] == "mask" and node.input[3] == node.input[4] == ""
    ops = op_types(model)
    assert "Softmax" not in ops and "Transpose" not in ops and "Shape" not in ops
    assert ops.count("IsNaN") == 1 and ops.count("Where") == 1
    # the batch item whose keys are all masked: NaN through Softmax, zeros after the guard, in both models
    y = ort_outputs(model, feeds)[0]["y"]
    assert np.all(y[1] == 0.0) and np.isfinite(y).all()


def test_eager_bert_form_cross_attention_heads_split_with_minus_one():
    """K transposed twice ([0, 2, 1, 3] then [0, 1, 3, 2]), scores divided by sqrt(H), the mask added on
    the left, no guard; keys from a second input of another length; heads split with [0, 0, -1, H], so the
    head count comes from the hidden size and the observed shapes."""
    rng = np.random.default_rng(3)
    nodes, inits = projections("memory", [0, 0, -1, HEAD])
    nodes += [
        helper.make_node("Transpose", ["q4"], ["qh"], perm=[0, 2, 1, 3]),
        helper.make_node("Transpose", ["k4"], ["kh"], perm=[0, 2, 1, 3]),
        helper.make_node("Transpose", ["kh"], ["kt"], perm=[0, 1, 3, 2]),
        helper.make_node("Transpose", ["v4"], ["vh"], perm=[0, 2, 1, 3]),
        helper.make_node("MatMul", ["qh", "kt"], ["scores"]),
        helper.make_node("Div", ["scores", "root_h"], ["scaled"]),
        helper.make_node("Add", ["mask", "scaled"], ["masked"]),
        helper.make_node("Softmax", ["masked"], ["probs"], name="softmax", axis=3),
        helper.make_node("MatMul", ["probs", "vh"], ["context"]),
        helper.make_node("Transpose", ["context"], ["back"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["back", "merge"], ["y"]),
    ]
    inits += weights(rng) + [const("root_h", [np.sqrt(HEAD)]), const("merge", [0, 0, HIDDEN], np.int64)]
    inputs = [
        helper.make_tensor_value_info("x", F, ["batch", "seq", HIDDEN]),
        helper.make_tensor_value_info("memory", F, ["batch", "keys", HIDDEN]),
        helper.make_tensor_value_info("mask", F, ["batch", 1, "seq", "keys"]),
    ]
    model = make_model(nodes, inputs, [helper.make_tensor_value_info("y", F, ["batch", "seq", HIDDEN])], inits)
    feeds = [
        {"x": rng.standard_normal((BATCH, QUERIES, HIDDEN)).astype(np.float32), "memory": rng.standard_normal((BATCH, KEYS, HIDDEN)).astype(np.float32), "mask": np.where(rng.random((BATCH, 1, QUERIES, KEYS)) < 0.3, -1e4, 0).astype(np.float32)}
        for _ in range(2)
    ]
    result = fuse(model, feeds)
    assert result.counts["attention_fused"] == 1
    node = attention_node(model)
    assert attrs(node)["num_heads"] == HEADS and np.isclose(attrs(node)["scale"], HEAD**-0.5)
    assert "IsNaN" not in op_types(model) and "Softmax" not in op_types(model)


def unmasked_sdpa_model() -> onnx.ModelProto:
    """sdpa_model without regroup, guard and mask: the scores go straight to Softmax; input x only."""
    model = sdpa_model(regroup=False, guard=False)
    model.graph.node.remove(next(n for n in model.graph.node if n.op_type == "Add" and "mask" in n.input))
    next(n for n in model.graph.node if n.op_type == "Softmax").input[0] = "scores"
    model.graph.input.pop()
    return model


def test_without_a_mask_the_attention_has_three_inputs():
    model = unmasked_sdpa_model()
    feeds = [{"x": f["x"]} for f in self_feeds()]
    result = fuse(model, feeds)
    assert result.counts == {"attention_fused": 1, "nodes_removed": 9 - 5}
    assert len(attention_node(model).input) == 3


def test_a_key_mask_broadcast_over_query_positions_is_expanded():
    """[B, 1, 1, T] (the eager BERT extended mask): MultiHeadAttention's kernel wants [.., S, T], so the
    mask is expanded over the query positions in front of it."""
    model = sdpa_model(mask_shape=("batch", 1, 1, "seq"))
    feeds = self_feeds(mask_shape=(BATCH, 1, 1, QUERIES))
    result = fuse(model, feeds)
    assert result.counts["attention_fused"] == 1
    expand = next(n for n in model.graph.node if n.op_type == "Expand")
    assert expand.input[0] == "mask" and attention_node(model).input[5] == expand.output[0]


def test_a_mask_broadcast_over_keys_is_refused():
    model = sdpa_model(mask_shape=("batch", 1, "seq", 1))
    result = run_pass(FuseAttention(), model, self_feeds(mask_shape=(BATCH, 1, QUERIES, 1)))
    assert not result.changed and "MultiHeadAttention" not in op_types(model)
    assert result.refused == [
        "attention at 'softmax': the mask mask has shapes [(2, 1, 3, 1)]: MultiHeadAttention takes [batch or 1, heads or 1, queries or 1, keys]"
    ]


def test_probabilities_read_elsewhere_are_refused():
    model = sdpa_model()
    model.graph.output.append(helper.make_tensor_value_info("probs", F, ["batch", HEADS, "seq", "seq"]))
    result = run_pass(FuseAttention(), model, self_feeds())
    assert not result.changed
    assert result.refused == ["attention at 'softmax': probs is also read elsewhere or is a graph output"]


def test_a_regroup_reshape_that_changes_the_shape_is_refused():
    """Reshape(context, [0, 2, -1, 2]) halves the head size: not a no-op, so it cannot be dropped."""
    model = sdpa_model(guard=False)
    for node in model.graph.node:
        if node.name == "regroup":
            node.input[1] = "other_shape"
        if node.output[0] == "y":
            node.input[1] = "flat"
    model.graph.initializer.extend([const("other_shape", [0, HEADS, -1, 2], np.int64), const("flat", [0, -1], np.int64)])
    model.graph.output[0].CopyFrom(helper.make_tensor_value_info("y", F, ["batch", "flat"]))
    result = run_pass(FuseAttention(), model, self_feeds())
    assert not result.changed
    assert result.refused == ["attention at 'softmax': the Reshape 'regroup' after the attention is not shown to keep the shape"]


def test_a_head_size_known_only_at_run_time_is_refused():
    """The split shape is a graph input: nothing says how many heads there are before the model runs."""
    model = sdpa_model(regroup=False)
    model.graph.initializer.remove(next(t for t in model.graph.initializer if t.name == "split"))
    model.graph.input.append(helper.make_tensor_value_info("split", TensorProto.INT64, [4]))
    feeds = [{**f, "split": np.array([0, 0, HEADS, HEAD], np.int64)} for f in self_feeds()]
    result = run_pass(FuseAttention(), model, feeds)
    assert not result.changed
    assert result.refused == ["attention at 'softmax': q4 has shape [?, ?, ?, ?]: the head size must be static"]


def test_other_forms_are_not_matched():
    """Softmax over the query axis, and a scale applied after the mask (it would scale the mask too)."""
    model = sdpa_model(regroup=False, guard=False)
    next(n for n in model.graph.node if n.op_type == "Softmax").attribute[0].i = 2
    result = run_pass(FuseAttention(), model, self_feeds())
    assert not result.changed and not result.refused

    model = sdpa_model(regroup=False, guard=False)
    softmax = next(n for n in model.graph.node if n.op_type == "Softmax")
    softmax.input[0] = "rescaled"
    model.graph.node.insert(list(model.graph.node).index(softmax), helper.make_node("Mul", ["masked", "root"], ["rescaled"]))
    result = run_pass(FuseAttention(), model, self_feeds())
    assert not result.changed and not result.refused


def dynamo_sdpa_model(merged: list[int], split: list[int], constant_mask: bool = False) -> onnx.ModelProto:
    """sdpa_model as torch's dynamo exporter writes K^T: Transpose to [B, N, T, H], then Reshape to
    `merged` ([B*N, T, H]), Transpose [0, 2, 1] and Reshape to `split` ([B, N, H, T]); static shapes. With
    `constant_mask`, the mask is a causal [1, 1, S, S] initializer (a model without a mask input)."""
    model = sdpa_model(mask_shape=(BATCH, 1, QUERIES, QUERIES), regroup=False)
    nodes = list(model.graph.node)
    at = next(i for i, n in enumerate(nodes) if n.output[0] == "kt")
    nodes[at : at + 1] = [
        helper.make_node("Transpose", ["k4"], ["kh"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["kh", "merged"], ["k_merged"]),
        helper.make_node("Transpose", ["k_merged"], ["k_merged_t"], perm=[0, 2, 1]),
        helper.make_node("Reshape", ["k_merged_t", "split_back"], ["kt"], name="split_back"),
    ]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    model.graph.initializer.extend([const("merged", merged, np.int64), const("split_back", split, np.int64)])
    model.graph.input[0].CopyFrom(helper.make_tensor_value_info("x", F, [BATCH, QUERIES, HIDDEN]))
    if constant_mask:
        model.graph.input.pop()
        causal = np.triu(np.full((QUERIES, QUERIES), -np.inf, np.float32), 1)[None, None]
        model.graph.initializer.append(const("mask", causal))
    return model


def test_torch_dynamo_form_with_k_transposed_through_merged_heads_is_fused():
    """Before, the Reshape/Transpose/Reshape on K (heads merged into the batch axis) was not seen through."""
    model = dynamo_sdpa_model([BATCH * HEADS, QUERIES, HEAD], [BATCH, HEADS, HEAD, QUERIES])
    result = fuse(model, self_feeds())
    assert result.counts["attention_fused"] == 1
    assert "Softmax" not in op_types(model) and "Transpose" not in op_types(model)
    assert attention_node(model).input[5] == "mask"


def test_a_constant_mask_is_taken_with_its_own_shape():
    """Before: "the mask mask was not observed" (initializers are not among the observed activations)."""
    model = dynamo_sdpa_model([-1, QUERIES, HEAD], [-1, HEADS, HEAD, QUERIES], constant_mask=True)
    feeds = [{"x": f["x"]} for f in self_feeds()]
    result = fuse(model, feeds)
    assert result.counts["attention_fused"] == 1 and attention_node(model).input[5] == "mask"


def test_a_merged_transpose_that_does_not_swap_the_last_two_axes_is_refused():
    """K [B, N, T, H] reshaped to [B*N, H, T] (a reinterpretation, not a transpose), then transposed and
    reshaped to [B, N, H, T]: the model runs, but its scores are not Q K^T."""
    model = dynamo_sdpa_model([BATCH * HEADS, HEAD, QUERIES], [BATCH, HEADS, HEAD, QUERIES])
    result = run_pass(FuseAttention(), model, self_feeds())
    assert not result.changed and "MultiHeadAttention" not in op_types(model)
    assert result.refused == [
        "attention at 'softmax': the Reshape/Transpose/Reshape at 'split_back' is not shown to swap the last two axes: "
        f"targets {[BATCH * HEADS, HEAD, QUERIES]} and {[BATCH, HEADS, HEAD, QUERIES]} on [{BATCH}, {HEADS}, {QUERIES}, {HEAD}]"
    ]
