"""fold-constants: initializer-only subgraphs and static Shape/Size become initializers."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto as TP
from onnx import helper, numpy_helper

from graphopt.graph import constant_value, copy_model
from graphopt.passes.fold_constants import FoldConstants
from graphopt.passes_base import make_pass
from tests.helpers import assert_same_outputs, make_model, op_types, run_pass, seeded_feeds

RNG = np.random.default_rng(0)


def tensor(name, shape, dtype=np.float32):
    return numpy_helper.from_array(RNG.standard_normal(shape).astype(dtype), name)


def int64s(name, values):
    return numpy_helper.from_array(np.array(values, dtype=np.int64), name)


def vi(name, shape, elem=TP.FLOAT):
    return helper.make_tensor_value_info(name, elem, shape)


def fold(model, feeds=None, **options):
    """Run the pass on a copy; returns (before, after, result)."""
    after = copy_model(model)
    return model, after, run_pass(FoldConstants(**options), after, feeds)


@pytest.fixture
def initializer_arithmetic():
    """x -> Add(Mul(a, b)) -> y   (a, b initializers)"""
    nodes = [helper.make_node("Mul", ["a", "b"], ["ab"]), helper.make_node("Add", ["x", "ab"], ["y"])]
    return make_model(nodes, [vi("x", [2, 3])], [vi("y", [2, 3])], [tensor("a", [2, 3]), tensor("b", [3])])


def test_folds_initializer_arithmetic_and_drops_its_inputs(initializer_arithmetic):
    before, after, result = fold(initializer_arithmetic)
    assert result.changed and result.counts["nodes_folded"] == 1
    assert op_types(after) == ["Add"]
    assert [t.name for t in after.graph.initializer] == ["ab"]
    assert result.counts["bytes_added"] == 6 * 4 - (6 * 4 + 3 * 4)
    assert_same_outputs(before, after, seeded_feeds(before))


def test_registered_under_its_name():
    assert isinstance(make_pass("fold-constants"), FoldConstants)


def test_weight_preprocessing_chain_folds_and_old_weight_goes():
    """w -> Transpose -> Reshape(shape) -> MatMul(x, .) -> y"""
    nodes = [
        helper.make_node("Transpose", ["w"], ["wt"], perm=[1, 0]),
        helper.make_node("Reshape", ["wt", "shape"], ["w2"]),
        helper.make_node("MatMul", ["x", "w2"], ["y"]),
    ]
    model = make_model(nodes, [vi("x", [2, 6])], [vi("y", [2, 4])], [tensor("w", [4, 6]), int64s("shape", [6, 4])])
    before, after, result = fold(model)
    assert op_types(after) == ["MatMul"]
    assert result.counts["nodes_folded"] == 2
    assert [t.name for t in after.graph.initializer] == ["w2"]
    assert result.counts["bytes_added"] == -16  # the shape tensor; the weight moved, it did not grow
    assert_same_outputs(before, after, seeded_feeds(before))


def test_constant_graph_output_keeps_its_name():
    """a -> Neg -> c (graph output);  x -> Relu -> y"""
    nodes = [helper.make_node("Neg", ["a"], ["c"]), helper.make_node("Relu", ["x"], ["y"])]
    model = make_model(nodes, [vi("x", [2])], [vi("c", [3]), vi("y", [2])], [tensor("a", [3])])
    before, after, result = fold(model)
    assert op_types(after) == ["Relu"]
    assert [o.name for o in after.graph.output] == ["c", "y"]
    np.testing.assert_array_equal(constant_value(after.graph, "c"), -constant_value(before.graph, "a"))
    assert_same_outputs(before, after, seeded_feeds(before))


def test_constant_nodes_are_folded_with_their_readers_but_kept_when_read_by_live_nodes():
    """k1 (Constant) -> Mul(a) -> Add(x, .) -> Sub(., k2 (Constant)) -> y"""
    nodes = [
        helper.make_node("Constant", [], ["k1"], value=numpy_helper.from_array(np.float32(2.0))),
        helper.make_node("Constant", [], ["k2"], value=numpy_helper.from_array(np.float32(3.0))),
        helper.make_node("Mul", ["k1", "a"], ["m"]),
        helper.make_node("Add", ["x", "m"], ["s"]),
        helper.make_node("Sub", ["s", "k2"], ["y"]),
    ]
    model = make_model(nodes, [vi("x", [3])], [vi("y", [3])], [tensor("a", [3])])
    before, after, result = fold(model)
    assert op_types(after) == ["Constant", "Add", "Sub"]
    assert after.graph.node[0].output[0] == "k2"
    assert result.counts["nodes_folded"] == 2
    assert_same_outputs(before, after, seeded_feeds(before))


def test_initializer_overridable_by_graph_input_is_not_a_constant():
    """a (graph input with an initializer default) -> Neg -> Add(x, .) -> y"""
    nodes = [helper.make_node("Neg", ["a"], ["n"]), helper.make_node("Add", ["x", "n"], ["y"])]
    model = make_model(nodes, [vi("x", [3]), vi("a", [3])], [vi("y", [3])], [tensor("a", [3])])
    _, after, result = fold(model)
    assert not result.changed and op_types(after) == ["Neg", "Add"]


@pytest.mark.parametrize(
    "node",
    [
        helper.make_node("RandomNormal", [], ["r"], shape=[3]),
        helper.make_node("RandomUniformLike", ["a"], ["r"]),
        helper.make_node("Bernoulli", ["p"], ["r"]),
    ],
)
def test_non_deterministic_nodes_are_refused(node):
    """[a|p] -> Random* / Bernoulli -> Add(x, .) -> y"""
    inits = [tensor("a", [3]), numpy_helper.from_array(np.full(3, 0.5, np.float32), "p")]
    model = make_model([node, helper.make_node("Add", ["x", "r"], ["y"])], [vi("x", [3])], [vi("y", [3])], inits)
    _, after, result = fold(model)
    assert not result.changed and op_types(after) == [node.op_type, "Add"]
    assert result.refused == [f"{node.op_type} node 'r': non-deterministic; folding would freeze one random draw"]


def test_nodes_downstream_of_a_refused_node_are_not_folded():
    """RandomNormal -> Mul(a) -> Add(x, .) -> y"""
    nodes = [
        helper.make_node("RandomNormal", [], ["r"], shape=[3]),
        helper.make_node("Mul", ["r", "a"], ["m"]),
        helper.make_node("Add", ["x", "m"], ["y"]),
    ]
    model = make_model(nodes, [vi("x", [3])], [vi("y", [3])], [tensor("a", [3])])
    _, after, result = fold(model)
    assert not result.changed and op_types(after) == ["RandomNormal", "Mul", "Add"]


@pytest.fixture
def pytorch_style_reshape():
    """x[2,3,4] -> Relu -> r;  r -> Shape -> Gather(0) -> Unsqueeze -> Concat(., [-1]) -> Reshape(r, .) -> y"""
    nodes = [
        helper.make_node("Relu", ["x"], ["r"]),
        helper.make_node("Shape", ["r"], ["s"]),
        helper.make_node("Gather", ["s", "zero"], ["batch"], axis=0),
        helper.make_node("Unsqueeze", ["batch", "axes"], ["batch1"]),
        helper.make_node("Concat", ["batch1", "minus_one"], ["target"], axis=0),
        helper.make_node("Reshape", ["r", "target"], ["y"]),
    ]
    inits = [int64s("zero", 0), int64s("axes", [0]), int64s("minus_one", [-1])]
    return make_model(nodes, [vi("x", [2, 3, 4])], [vi("y", [2, 12])], inits)


def test_static_shape_chain_collapses(pytorch_style_reshape):
    before, after, result = fold(pytorch_style_reshape)
    assert op_types(after) == ["Relu", "Reshape"]
    assert result.counts["shape_nodes_folded"] == 1 and result.counts["nodes_folded"] == 4
    np.testing.assert_array_equal(constant_value(after.graph, "target"), [2, -1])
    assert {t.name for t in after.graph.initializer} == {"target"}
    assert_same_outputs(before, after, seeded_feeds(before))


def test_shape_of_intermediate_needs_feeds_to_confirm(pytorch_style_reshape):
    _, after, result = fold(pytorch_style_reshape, feeds=[])
    assert not result.changed and "Shape" in op_types(after)
    assert result.refused == ["Shape node 's': no feeds to confirm the static shape [2, 3, 4] of 'r'"]


def test_shape_and_size_of_static_graph_input_need_no_feeds():
    """x[2,3] -> Shape(start=1) -> Concat(Size(x)) -> Add(n, .) -> y"""
    nodes = [
        helper.make_node("Shape", ["x"], ["s"], start=1),
        helper.make_node("Size", ["x"], ["n"]),
        helper.make_node("Unsqueeze", ["n", "axes"], ["n1"]),
        helper.make_node("Concat", ["s", "n1"], ["sn"], axis=0),
        helper.make_node("Add", ["k", "sn"], ["y"]),
    ]
    model = make_model(nodes, [vi("x", [2, 3]), vi("k", [2], TP.INT64)], [vi("y", [2], TP.INT64)], [int64s("axes", [0])])
    before, after, result = fold(model, feeds=[])
    assert op_types(after) == ["Add"] and result.counts["shape_nodes_folded"] == 2
    np.testing.assert_array_equal(constant_value(after.graph, "sn"), [3, 6])
    assert_same_outputs(before, after, seeded_feeds(before))


def test_dynamic_shape_is_left_alone_without_refusal():
    """x[N,3] -> Shape -> Add(k, .) -> y"""
    nodes = [helper.make_node("Shape", ["x"], ["s"]), helper.make_node("Add", ["k", "s"], ["y"])]
    model = make_model(nodes, [vi("x", ["N", 3]), vi("k", [2], TP.INT64)], [vi("y", [2], TP.INT64)])
    _, _, result = fold(model)
    assert not result.changed and result.refused == []


def test_wrong_declared_shape_is_refused():
    """x[N,3] -> Relu -> r (declared [5,3], really [2,3]) -> Shape -> Add(k, .) -> y"""
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Shape", ["r"], ["s"]), helper.make_node("Add", ["k", "s"], ["y"])]
    model = make_model(
        nodes, [vi("x", ["N", 3]), vi("k", [2], TP.INT64)], [vi("y", [2], TP.INT64)], value_info=[vi("r", [5, 3])]
    )
    _, after, result = fold(model)
    assert not result.changed and "Shape" in op_types(after)
    assert result.refused == ["Shape node 's': 'r' is declared [5, 3] but onnxruntime produced [[2, 3]]"]


def test_big_output_is_refused_and_only_its_small_inputs_fold():
    """rows, cols -> Concat -> ConstantOfShape [512,1024] -> Add(x, .) -> y"""
    nodes = [
        helper.make_node("Concat", ["rows", "cols"], ["shape"], axis=0),
        helper.make_node("ConstantOfShape", ["shape"], ["big"], value=numpy_helper.from_array(np.array([1.0], np.float32))),
        helper.make_node("Add", ["x", "big"], ["y"]),
    ]
    model = make_model(nodes, [vi("x", [1024])], [vi("y", [512, 1024])], [int64s("rows", [512]), int64s("cols", [1024])])
    before, after, result = fold(model)
    assert op_types(after) == ["ConstantOfShape", "Add"]
    assert result.counts["nodes_folded"] == 1
    assert result.refused == [
        "ConstantOfShape node 'big': folding output 'big' (2097152 bytes, shape [512, 1024]) "
        "would grow the model by 2097136 bytes, over max_growth_bytes=1048576"  # rows and cols are freed
    ]
    assert_same_outputs(before, after, seeded_feeds(before, n=1))


def test_growth_counts_the_initializers_that_become_unused():
    """w[512,512] -> Transpose -> MatMul(x, .) -> y   (1 MiB moved, nothing grows)"""
    nodes = [helper.make_node("Transpose", ["w"], ["wt"]), helper.make_node("MatMul", ["x", "wt"], ["y"])]
    model = make_model(nodes, [vi("x", [1, 512])], [vi("y", [1, 512])], [tensor("w", [512, 512])])
    before, after, result = fold(model, max_growth_bytes=1000)
    assert op_types(after) == ["MatMul"] and result.refused == []
    assert result.counts["bytes_added"] == 0
    assert_same_outputs(before, after, seeded_feeds(before), rtol=1e-4, atol=1e-5)


def custom_domain_model(domain, op):
    """a -> <domain>.<op> -> Add(x, .) -> y"""
    nodes = [helper.make_node(op, ["a"], ["c"], domain=domain), helper.make_node("Add", ["x", "c"], ["y"])]
    graph = helper.make_graph(nodes, "test", [vi("x", [3])], [vi("y", [3])], [tensor("a", [3])])
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid(domain, 1)]
    model = helper.make_model(graph, opset_imports=opsets, ir_version=9)
    onnx.checker.check_model(model, full_check=True)
    return model


def test_custom_op_without_onnxruntime_kernel_is_refused():
    _, after, result = fold(custom_domain_model("custom.ops", "Foo"))
    assert not result.changed and op_types(after) == ["Foo", "Add"]
    assert result.refused == [
        "Foo node 'c': domain 'custom.ops' op has no onnxruntime CPU kernel (custom op or model-local function)"
    ]


def test_onnxruntime_contrib_op_is_folded():
    before, after, result = fold(custom_domain_model("com.microsoft", "Gelu"))
    assert op_types(after) == ["Add"] and result.counts["nodes_folded"] == 1
    assert_same_outputs(before, after, seeded_feeds(before))


def test_sequence_result_is_refused_as_not_a_tensor():
    """a -> SequenceConstruct -> SequenceAt(., i) -> y"""
    nodes = [helper.make_node("SequenceConstruct", ["a", "a"], ["seq"]), helper.make_node("SequenceAt", ["seq", "i"], ["y"])]
    model = make_model(nodes, [vi("i", [], TP.INT64)], [vi("y", [3])], [tensor("a", [3])])
    _, after, result = fold(model)
    assert not result.changed and op_types(after) == ["SequenceConstruct", "SequenceAt"]
    assert result.refused == ["SequenceConstruct node 'seq': output 'seq' is a list, not a tensor"]


def test_constants_fold_inside_if_bodies_after_the_graph_around_them():
    """a -> Neg -> n;  If(cond){ then: Add(n, Neg(b)) | else: Identity(n) } -> y: the main graph folds n
    first, so each branch then computes from constants alone and becomes an initializer."""
    then_branch = helper.make_graph(
        [helper.make_node("Neg", ["b"], ["nb"]), helper.make_node("Add", ["n", "nb"], ["t"])],
        "then", [], [vi("t", [3])], [tensor("b", [3])],
    )
    else_branch = helper.make_graph([helper.make_node("Identity", ["n"], ["e"])], "else", [], [vi("e", [3])])
    nodes = [
        helper.make_node("Neg", ["a"], ["n"]),
        helper.make_node("If", ["cond"], ["y"], then_branch=then_branch, else_branch=else_branch),
    ]
    model = make_model(nodes, [vi("cond", [], TP.BOOL)], [vi("y", [3])], [tensor("a", [3])])
    before, after, result = fold(model)
    assert op_types(after) == ["If"] and result.counts["nodes_folded"] == 4
    bodies = {a.name: a.g for a in after.graph.node[0].attribute}
    assert [(len(g.node), [t.name for t in g.initializer]) for g in (bodies["then_branch"], bodies["else_branch"])] == [(0, ["t"]), (0, ["e"])]
    feeds = [{"cond": np.array(True)}, {"cond": np.array(False)}]
    assert_same_outputs(before, after, feeds)


def test_a_body_folds_its_own_weight_views_and_refuses_copies_of_weights_around_it():
    """x -> If(cond){ MatMul(x, Unsqueeze(w_own)[0]) + MatMul(x, Transpose(w_out)) } -> y, as silero-vad's
    LSTM weights are written: the view of the body's own weight (read by nothing else) folds, and its
    source goes; the view of the main graph's weight would store it twice (other bodies may read it)."""
    body = helper.make_graph(
        [
            helper.make_node("Unsqueeze", ["w_own", "zero"], ["w3"]),
            helper.make_node("Squeeze", ["w3", "zero"], ["w_view"]),
            helper.make_node("MatMul", ["x", "w_view"], ["p"]),
            helper.make_node("Transpose", ["w_out"], ["w_t"], perm=[1, 0]),
            helper.make_node("MatMul", ["x", "w_t"], ["q"]),
            helper.make_node("Add", ["p", "q"], ["out"]),
        ],
        "body", [], [vi("out", [2, 8])], [tensor("w_own", [8, 8]), int64s("zero", [0])],
    )
    nodes = [helper.make_node("If", ["cond"], ["y"], then_branch=body, else_branch=body)]
    model = make_model(nodes, [vi("cond", [], TP.BOOL), vi("x", [2, 8])], [vi("y", [2, 8])], [tensor("w_out", [8, 8])])
    before, after, result = fold(model)
    assert result.counts["nodes_folded"] == 4, "Unsqueeze and Squeeze in each branch"
    then_after = next(a.g for a in after.graph.node[0].attribute if a.name == "then_branch")
    assert [n.op_type for n in then_after.node] == ["MatMul", "Transpose", "MatMul", "Add"]
    assert [t.name for t in then_after.initializer] == ["w_view"], "w_own and zero are read by nothing else"
    assert result.refused == [
        "Transpose node 'w_t': 'w_t' is computed from 'w_out' of the graph around this body, which stays; folding would store 256 bytes more"
    ] * 2
    feeds = [{"cond": np.array(c), "x": RNG.standard_normal((2, 8)).astype(np.float32)} for c in (True, False)]
    assert_same_outputs(before, after, feeds)


def test_a_body_leaves_the_restore_of_an_integer_weight_around_it_alone():
    """If(cond){ DequantizeLinear(w_int8 of the main graph) -> Add(x) } -> y: a quantized weight stays
    quantized, as in the main graph."""
    body = helper.make_graph(
        [helper.make_node("DequantizeLinear", ["w_q", "scale"], ["w"]), helper.make_node("Add", ["x", "w"], ["out"])],
        "body", [], [vi("out", [4])],
    )
    inits = [numpy_helper.from_array(np.arange(4, dtype=np.int8), "w_q"), numpy_helper.from_array(np.array(0.5, np.float32), "scale")]
    model = make_model([helper.make_node("If", ["cond"], ["y"], then_branch=body, else_branch=body)], [vi("cond", [], TP.BOOL), vi("x", [4])], [vi("y", [4])], inits)
    _, after, result = fold(model)
    assert not result.changed
    assert [n.op_type for n in next(a.g for a in after.graph.node[0].attribute if a.name == "then_branch").node] == ["DequantizeLinear", "Add"]


def test_nothing_constant_means_no_change():
    """x -> Relu -> y"""
    model = make_model([helper.make_node("Relu", ["x"], ["y"])], [vi("x", [3])], [vi("y", [3])])
    _, after, result = fold(model)
    assert not result.changed and result.counts == {} and op_types(after) == ["Relu"]
    assert after == model


def tied_weight_model():
    """ids -> Gather(emb[32,8]) -> MatMul(Transpose(emb)) -> y   (the head reads a transposed view of the table)"""
    nodes = [
        helper.make_node("Transpose", ["emb"], ["emb_t"], perm=[1, 0]),
        helper.make_node("Gather", ["emb", "ids"], ["h"]),
        helper.make_node("MatMul", ["h", "emb_t"], ["y"]),
    ]
    return make_model(nodes, [vi("ids", [3], TP.INT64)], [vi("y", [3, 32])], [tensor("emb", [32, 8])])


def test_view_of_a_weight_still_in_use_is_refused():
    before, after, result = fold(tied_weight_model())
    assert not result.changed
    assert op_types(after) == ["Transpose", "Gather", "MatMul"]
    assert any("Transpose of initializer 'emb'" in r and "twice" in r for r in result.refused)


def test_small_views_of_a_weight_in_use_still_fold():
    before, after, result = fold(tied_weight_model(), min_view_bytes=10**6)
    assert op_types(after) == ["Gather", "MatMul"]
    assert_same_outputs(before, after, seeded_feeds(before))


def test_lossless_preset_reaches_a_fixed_point_on_tied_weights():
    """fold-shared-weights writes Transpose views; fold-constants must not fold them back (no oscillation)."""
    import graphopt

    model = tied_weight_model()
    model.graph.initializer.append(numpy_helper.from_array(numpy_helper.to_array(model.graph.initializer[0]).T.copy(), "emb_t_copy"))
    model.graph.node[2].input[1] = "emb_t_copy"
    del model.graph.node[0]
    result = graphopt.optimize(model, strict=True)
    rounds = max(r.round for r in result.report.records)
    assert rounds == 2, [(r.name, r.round, r.status) for r in result.report.records]
    assert [t.name for t in result.model.graph.initializer] == ["emb"]
    assert op_types(result.model) == ["Transpose", "Gather", "MatMul"]


def test_dead_readers_of_a_folded_shape_go_with_it():
    """x -> Shape(start=1) -> s ; Concat([-1], s) -> t ; Reshape(x, t) -> y ; s -> Cast -> Sqrt -> (nothing)"""
    nodes = [
        helper.make_node("Shape", ["x"], ["s"], start=1),
        helper.make_node("Concat", ["m1", "s"], ["t"], axis=0),
        helper.make_node("Reshape", ["x", "t"], ["y"]),
        helper.make_node("Cast", ["s"], ["c"], to=TP.FLOAT),
        helper.make_node("Sqrt", ["c"], ["d"]),
    ]
    model = make_model(nodes, [vi("x", [2, 3])], [vi("y", [2, 3])], [int64s("m1", [-1])])
    before, after, result = fold(model)
    assert op_types(after) == ["Reshape"]
    np.testing.assert_array_equal(constant_value(after.graph, "t"), [-1, 3])
    assert_same_outputs(before, after, seeded_feeds(before))


def test_dequantized_weight_is_not_folded_back_to_float():
    """w_q(int8) -> DequantizeLinear -> Transpose -> MatMul(x, .) -> y"""
    nodes = [
        helper.make_node("DequantizeLinear", ["w_q", "s"], ["w"]),
        helper.make_node("Transpose", ["w"], ["wt"], perm=[1, 0]),
        helper.make_node("MatMul", ["x", "wt"], ["y"]),
    ]
    inits = [numpy_helper.from_array(RNG.integers(-127, 128, (4, 3)).astype(np.int8), "w_q"), numpy_helper.from_array(np.float32(0.02), "s")]
    model = make_model(nodes, [vi("x", [2, 3])], [vi("y", [2, 4])], inits)
    _, after, result = fold(model)
    assert not result.changed
    assert op_types(after) == ["DequantizeLinear", "Transpose", "MatMul"]


@pytest.mark.parametrize("dtype", [np.int8, np.uint8])
def test_cast_of_an_8_bit_weight_is_not_folded_back_to_float(dtype):
    """w_q(int8/uint8) -> Cast -> Mul(scale) -> MatMul(x, .) -> y: quantize-weights' folded format, which
    onnxruntime expands at load; folding it here would store the float weight again."""
    nodes = [
        helper.make_node("Cast", ["w_q"], ["w_int"], to=TP.FLOAT),
        helper.make_node("Mul", ["w_int", "s"], ["w"]),
        helper.make_node("MatMul", ["x", "w"], ["y"]),
    ]
    inits = [numpy_helper.from_array(RNG.integers(0, 100, (3, 4)).astype(dtype), "w_q"), numpy_helper.from_array(np.float32(0.02), "s")]
    model = make_model(nodes, [vi("x", [2, 3])], [vi("y", [2, 4])], inits)
    before, after, result = fold(model)
    assert not result.changed and op_types(after) == ["Cast", "Mul", "MatMul"]
    assert_same_outputs(before, after, seeded_feeds(before))
