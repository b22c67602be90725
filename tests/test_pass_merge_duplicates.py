"""merge-duplicate-nodes: equal computations merge once, chains collapse in one walk, graph outputs keep names."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from graphopt.passes.merge_duplicates import MergeDuplicateNodes
from graphopt.graph import copy_model
from tests.helpers import assert_same_outputs, make_model, op_types, run_pass, seeded_feeds

F = TensorProto.FLOAT


def _vi(name: str, shape=(2, 3, 4), elem=F) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, list(shape))



def _merge(model: onnx.ModelProto, feeds=None, compare: bool = True):
    """Run the pass in place; when `compare`, check the full checker and onnxruntime outputs against before."""
    before = copy_model(model)
    feeds = seeded_feeds(before) if feeds is None else feeds
    result = run_pass(MergeDuplicateNodes(), model, feeds)
    if compare:
        assert_same_outputs(before, model, feeds)
    return before, result


def _unchanged(model: onnx.ModelProto, before: onnx.ModelProto, result) -> None:
    assert not result.changed and result.counts["nodes_merged"] == 0 and model == before


def _twins(make_op, initializers=()) -> onnx.ModelProto:
    """x -> Relu -> r -> (make_op(r, 'a'), make_op(r, 'b')) -> Add -> y"""
    return make_model(
        [helper.make_node("Relu", ["x"], ["r"]), make_op("a"), make_op("b"), helper.make_node("Add", ["a", "b"], ["y"])],
        [_vi("x")],
        [_vi("y")],
        initializers,
    )


# ---- merging ----

def test_duplicate_chain_collapses_in_one_run():
    """x -> (Relu -> Exp, Relu -> Exp) -> Add -> y : the Exps become duplicates once the Relus merge"""
    model = make_model(
        [
            helper.make_node("Relu", ["x"], ["r1"], name="relu1"),
            helper.make_node("Relu", ["x"], ["r2"], name="relu2"),
            helper.make_node("Exp", ["r1"], ["e1"]),
            helper.make_node("Exp", ["r2"], ["e2"]),
            helper.make_node("Add", ["e1", "e2"], ["y"]),
        ],
        [_vi("x")],
        [_vi("y")],
    )
    _, result = _merge(model)
    assert op_types(model) == ["Relu", "Exp", "Add"]
    assert list(model.graph.node[2].input) == ["e1", "e1"]
    assert result.counts == {"nodes_merged": 2, "Exp_merged": 1, "Relu_merged": 1} and not result.refused


def test_shape_gather_unsqueeze_concat_chain_merges():
    """x[N,3,4] -> (Shape -> Gather(0) -> Unsqueeze) twice -> Concat -> y, the MiniLM pattern"""
    def branch(k: int):
        return [
            helper.make_node("Shape", ["x"], [f"s{k}"]),
            helper.make_node("Gather", [f"s{k}", "zero"], [f"g{k}"], axis=0),
            helper.make_node("Unsqueeze", [f"g{k}", "axes"], [f"u{k}"]),
        ]

    model = make_model(
        branch(1) + branch(2) + [helper.make_node("Concat", ["u1", "u2"], ["y"], axis=0)],
        [_vi("x", ("N", 3, 4))],
        [_vi("y", (2,), TensorProto.INT64)],
        [numpy_helper.from_array(np.array(0, np.int64), "zero"), numpy_helper.from_array(np.array([0], np.int64), "axes")],
    )
    _, result = _merge(model)
    assert op_types(model) == ["Shape", "Gather", "Unsqueeze", "Concat"]
    assert list(model.graph.node[3].input) == ["u1", "u1"]
    assert result.counts["nodes_merged"] == 3


def test_attribute_order_does_not_matter():
    """x -> Relu -> r -> (Gemm(alpha, beta), Gemm(beta, alpha)) -> Add -> y"""
    model = make_model(
        [
            helper.make_node("Relu", ["x"], ["r"]),
            helper.make_node("Gemm", ["r", "w"], ["a"], alpha=2.0, beta=0.5),
            helper.make_node("Gemm", ["r", "w"], ["b"], beta=0.5, alpha=2.0),
            helper.make_node("Add", ["a", "b"], ["y"]),
        ],
        [_vi("x", (2, 3))],
        [_vi("y", (2, 3))],
        [numpy_helper.from_array(np.eye(3, dtype=np.float32), "w")],
    )
    _, result = _merge(model)
    assert op_types(model) == ["Relu", "Gemm", "Add"] and result.counts["nodes_merged"] == 1


def test_constants_with_equal_values_merge_despite_tensor_names():
    """(Constant c1 = 2.0, Constant c2 = 2.0) -> x * c1 + c2 -> y"""
    def constant(name: str, value: float) -> onnx.NodeProto:
        return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.array(value, np.float32), f"{name}_value"))

    model = make_model(
        [constant("c1", 2.0), constant("c2", 2.0), constant("c3", 3.0), helper.make_node("Mul", ["x", "c1"], ["m"]),
         helper.make_node("Add", ["m", "c2"], ["a"]), helper.make_node("Sub", ["a", "c3"], ["y"])],
        [_vi("x")],
        [_vi("y")],
    )
    _, result = _merge(model)
    assert op_types(model) == ["Constant", "Constant", "Mul", "Add", "Sub"]
    assert list(model.graph.node[3].input) == ["m", "c1"] and result.counts == {"nodes_merged": 1, "Constant_merged": 1}


def test_duplicate_output_that_is_a_graph_output_keeps_its_name():
    """x -> Relu -> r1 -> Exp -> y ; x -> Relu -> r2 (graph output)"""
    model = make_model(
        [helper.make_node("Relu", ["x"], ["r1"]), helper.make_node("Exp", ["r1"], ["y"]), helper.make_node("Relu", ["x"], ["r2"])],
        [_vi("x")],
        [_vi("y"), _vi("r2")],
    )
    _, result = _merge(model)
    assert op_types(model) == ["Relu", "Exp"]
    assert list(model.graph.node[0].output) == ["r2"] and list(model.graph.node[1].input) == ["r2"]
    assert result.counts["nodes_merged"] == 1 and not result.refused


def test_first_output_that_is_a_graph_output_stays_put():
    """x -> Relu -> r1 (graph output) ; x -> Relu -> r2 -> Exp -> y"""
    model = make_model(
        [helper.make_node("Relu", ["x"], ["r1"]), helper.make_node("Relu", ["x"], ["r2"]), helper.make_node("Exp", ["r2"], ["y"])],
        [_vi("x")],
        [_vi("r1"), _vi("y")],
    )
    _, result = _merge(model)
    assert op_types(model) == ["Relu", "Exp"] and list(model.graph.node[1].input) == ["r1"]


def test_inference_dropout_merges():
    model = _twins(lambda out: helper.make_node("Dropout", ["r"], [out]))
    _, result = _merge(model)
    assert op_types(model) == ["Relu", "Dropout", "Add"] and result.counts["Dropout_merged"] == 1


# ---- not the same computation ----

def test_different_attributes_or_input_order_do_not_merge():
    """x -> Relu -> r -> LeakyRelu(0.1), LeakyRelu(0.2), Sub(r, x), Sub(x, r) -> Sum -> y"""
    model = make_model(
        [
            helper.make_node("Relu", ["x"], ["r"]),
            helper.make_node("LeakyRelu", ["r"], ["a"], alpha=0.1),
            helper.make_node("LeakyRelu", ["r"], ["b"], alpha=0.2),
            helper.make_node("Sub", ["r", "x"], ["c"]),
            helper.make_node("Sub", ["x", "r"], ["d"]),
            helper.make_node("Sum", ["a", "b", "c", "d"], ["y"]),
        ],
        [_vi("x")],
        [_vi("y")],
    )
    before, result = _merge(model)
    _unchanged(model, before, result)


def test_empty_optional_input_is_part_of_the_key():
    """x -> Relu -> r -> Clip(r, min=c), Clip(r, max=c) -> Add -> y : same names, different slots"""
    model = make_model(
        [
            helper.make_node("Relu", ["x"], ["r"]),
            helper.make_node("Clip", ["r", "c"], ["a"]),
            helper.make_node("Clip", ["r", "", "c"], ["b"]),
            helper.make_node("Add", ["a", "b"], ["y"]),
        ],
        [_vi("x")],
        [_vi("y")],
        [numpy_helper.from_array(np.array(0.5, np.float32), "c")],
    )
    before, result = _merge(model)
    _unchanged(model, before, result)


def test_split_into_different_output_counts_does_not_merge():
    """x -> Split into 2 (a, b) and Split into 4 (c, d, e, f) -> Concat each -> y1, y2"""
    model = make_model(
        [
            helper.make_node("Split", ["x"], ["a", "b"], axis=2),
            helper.make_node("Split", ["x"], ["c", "d", "e", "f"], axis=2),
            helper.make_node("Concat", ["b", "a"], ["y1"], axis=2),
            helper.make_node("Concat", ["f", "e", "d", "c"], ["y2"], axis=2),
        ],
        [_vi("x")],
        [_vi("y1"), _vi("y2")],
        opset=13,
    )
    before, result = _merge(model)
    _unchanged(model, before, result)


def test_random_ops_are_never_merged_and_not_reported():
    """x -> (RandomNormalLike, RandomNormalLike) -> Sub -> y : two draws, not one"""
    model = make_model(
        [
            helper.make_node("RandomNormalLike", ["x"], ["a"], seed=1.0),
            helper.make_node("RandomNormalLike", ["x"], ["b"], seed=1.0),
            helper.make_node("Sub", ["a", "b"], ["y"]),
        ],
        [_vi("x")],
        [_vi("y")],
    )
    before, result = _merge(model, compare=False)
    _unchanged(model, before, result)
    assert not result.refused


def test_training_dropout_is_never_merged():
    """x -> Relu -> r -> (Dropout(training), Dropout(training)) -> Add -> y"""
    flags = [numpy_helper.from_array(np.array(0.5, np.float32), "ratio"), numpy_helper.from_array(np.array(True), "training")]
    model = _twins(lambda out: helper.make_node("Dropout", ["r", "ratio", "training"], [out]), flags)
    before, result = _merge(model, compare=False)
    _unchanged(model, before, result)
    assert not result.refused


# ---- refused ----

def test_duplicates_that_are_both_graph_outputs_are_refused():
    """x -> Relu -> r1 (graph output) ; x -> Relu -> r2 (graph output)"""
    model = make_model(
        [helper.make_node("Relu", ["x"], ["r1"], name="first"), helper.make_node("Relu", ["x"], ["r2"], name="second")],
        [_vi("x")],
        [_vi("r1"), _vi("r2")],
    )
    before, result = _merge(model)
    _unchanged(model, before, result)
    assert result.refused == [
        "Relu second (-> r2) duplicates Relu first (-> r1), but both are graph outputs (r1 and r2) and each needs a producer"
    ]


def test_third_duplicate_into_a_taken_over_graph_output_is_refused():
    """x -> Relu -> r1 -> Exp -> y ; Relu -> r2 (graph output) ; Relu -> r3 (graph output)"""
    model = make_model(
        [
            helper.make_node("Relu", ["x"], ["r1"], name="first"),
            helper.make_node("Exp", ["r1"], ["y"]),
            helper.make_node("Relu", ["x"], ["r2"], name="second"),
            helper.make_node("Relu", ["x"], ["r3"], name="third"),
        ],
        [_vi("x")],
        [_vi("y"), _vi("r2"), _vi("r3")],
    )
    _, result = _merge(model)
    assert op_types(model) == ["Relu", "Exp", "Relu"]
    assert list(model.graph.node[0].output) == ["r2"] and list(model.graph.node[2].output) == ["r3"]
    assert result.refused == [
        "Relu third (-> r3) duplicates Relu first (-> r1), but both are graph outputs (r2 and r3) and each needs a producer"
    ]


def test_custom_domain_duplicates_are_refused():
    """x -> (custom.Noise, custom.Noise) -> Add -> y : a custom op may be random"""
    graph = helper.make_graph(
        [
            helper.make_node("Noise", ["x"], ["a"], name="n1", domain="custom"),
            helper.make_node("Noise", ["x"], ["b"], name="n2", domain="custom"),
            helper.make_node("Add", ["a", "b"], ["y"]),
        ],
        "custom",
        [_vi("x")],
        [_vi("y")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("custom", 1)], ir_version=9)
    before, result = _merge(model, feeds=[], compare=False)  # onnxruntime has no kernel for it
    _unchanged(model, before, result)
    assert result.refused == ["Noise n2 (-> b) duplicates Noise n1 (-> a), but op Noise of domain 'custom' may be stateful or random"]


# ---- subgraphs ----

def _if(name: str, out: str, then_nodes, else_nodes, then_out="t", else_out="e") -> onnx.NodeProto:
    then_branch = helper.make_graph(then_nodes, f"{name}_then", [], [_vi(then_out)])
    else_branch = helper.make_graph(else_nodes, f"{name}_else", [], [_vi(else_out)])
    return helper.make_node("If", ["cond"], [out], name=name, then_branch=then_branch, else_branch=else_branch)


def _if_feeds():
    x = np.linspace(-1, 1, 24, dtype=np.float32).reshape(2, 3, 4)
    return [{"cond": np.array(True), "x": x}, {"cond": np.array(False), "x": x}]


def test_duplicates_inside_a_body_merge_and_outer_reads_follow():
    """x -> Relu -> r1, Relu -> r2 ; If(then: Exp(r1) + Exp(r2) -> t ; else: Neg(r2) -> e) -> y"""
    then_nodes = [helper.make_node("Exp", ["r1"], ["p"]), helper.make_node("Exp", ["r2"], ["q"]), helper.make_node("Add", ["p", "q"], ["t"])]
    model = make_model(
        [helper.make_node("Relu", ["x"], ["r1"]), helper.make_node("Relu", ["x"], ["r2"]),
         _if("branch", "y", then_nodes, [helper.make_node("Neg", ["r2"], ["e"])])],
        [_vi("cond", (), TensorProto.BOOL), _vi("x")],
        [_vi("y")],
    )
    _, result = _merge(model, feeds=_if_feeds())
    bodies = {a.name: a.g for a in model.graph.node[1].attribute}
    then_branch, else_branch = bodies["then_branch"], bodies["else_branch"]
    assert op_types(model) == ["Relu", "If"]
    assert [list(n.input) for n in then_branch.node] == [["r1"], ["p", "p"]]
    assert list(else_branch.node[0].input) == ["r1"]
    assert result.counts == {"nodes_merged": 2, "Exp_merged": 1, "Relu_merged": 1}


def test_identical_if_nodes_merge_but_a_body_never_merges_with_outer_nodes():
    """x -> Exp -> o ; If(then: Exp(x) -> t ; else: Neg(x) -> e) twice -> Add(o, both) -> y"""
    def branch(name: str, out: str) -> onnx.NodeProto:
        return _if(name, out, [helper.make_node("Exp", ["x"], ["t"])], [helper.make_node("Neg", ["x"], ["e"])])

    branch_b = branch("b", "i2")
    for attr in branch_b.attribute:  # same bodies, byte for byte (graph names included)
        attr.g.name = attr.g.name.replace("b_", "a_")
    model = make_model(
        [helper.make_node("Exp", ["x"], ["o"]), branch("a", "i1"), branch_b,
         helper.make_node("Sum", ["o", "i1", "i2"], ["y"])],
        [_vi("cond", (), TensorProto.BOOL), _vi("x")],
        [_vi("y")],
    )
    _, result = _merge(model, feeds=_if_feeds())
    assert op_types(model) == ["Exp", "If", "Sum"] and list(model.graph.node[2].input) == ["o", "i1", "i1"]
    then_branch = next(a.g for a in model.graph.node[1].attribute if a.name == "then_branch")
    assert [(n.op_type, list(n.input)) for n in then_branch.node] == [("Exp", ["x"])]
    assert result.counts == {"nodes_merged": 1, "If_merged": 1}


def test_if_nodes_with_random_bodies_are_never_merged():
    """If(then: RandomUniformLike(x) -> t ; else: Neg(x) -> e) twice -> Add -> y"""
    def branch(name: str, out: str) -> onnx.NodeProto:
        return _if("same", out, [helper.make_node("RandomUniformLike", ["x"], ["t"])], [helper.make_node("Neg", ["x"], ["e"])])

    model = make_model(
        [branch("a", "i1"), branch("b", "i2"), helper.make_node("Add", ["i1", "i2"], ["y"])],
        [_vi("cond", (), TensorProto.BOOL), _vi("x")],
        [_vi("y")],
    )
    before, result = _merge(model, feeds=_if_feeds(), compare=False)
    _unchanged(model, before, result)


def test_model_without_duplicates_is_unchanged():
    model = make_model([helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Exp", ["r"], ["y"])], [_vi("x")], [_vi("y")])
    before, result = _merge(model, feeds=[], compare=False)
    _unchanged(model, before, result)
    assert not result.refused
