"""fold-shared-weights: duplicates, transposed and reshaped copies stored once; graph inputs and
near-equal tensors left alone."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphopt import runtime
from graphopt.graph import copy_model, initializers
from graphopt.passes.shared_weights import FoldSharedWeights
from graphopt.weights import find_weight_sharing
from tests.helpers import assert_same_outputs, make_model, op_types, run_pass, seeded_feeds

RNG = np.random.default_rng(7)


def _weights(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


def _init(array: np.ndarray, name: str) -> onnx.TensorProto:
    return numpy_helper.from_array(array, name)


def _info(name: str, shape, elem: int = TensorProto.FLOAT) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, shape)



def _fold(model: onnx.ModelProto, **options):
    before = copy_model(model)
    result = run_pass(FoldSharedWeights(**options), model)
    return before, result


@pytest.fixture
def duplicates_model() -> onnx.ModelProto:
    """x -> Add(a) -> Mul(b) -> Sub(b) -> Div(c) -> y   with a == b == c bitwise"""
    w = _weights(4)
    return make_model(
        [
            helper.make_node("Add", ["x", "a"], ["t1"]),
            helper.make_node("Mul", ["t1", "b"], ["t2"]),
            helper.make_node("Sub", ["t2", "b"], ["t3"]),
            helper.make_node("Div", ["t3", "c"], ["y"]),
        ],
        [_info("x", [2, 4])],
        [_info("y", [2, 4])],
        [_init(w, "a"), _init(w.copy(), "b"), _init(w.copy(), "c")],
    )


def test_exact_duplicates_become_one_initializer_read_by_all(duplicates_model):
    before, result = _fold(duplicates_model)
    assert result.changed
    assert result.counts["duplicates_folded"] == 2
    assert result.counts["bytes_saved"] == 2 * 16
    assert list(initializers(duplicates_model.graph)) == ["b"], "the most-read copy is kept"
    assert [list(n.input) for n in duplicates_model.graph.node] == [["x", "b"], ["t1", "b"], ["t2", "b"], ["t3", "b"]]
    assert_same_outputs(before, duplicates_model, seeded_feeds(before), rtol=0, atol=0)


@pytest.fixture
def transposed_model() -> onnx.ModelProto:
    """x -> MatMul(w[3,5]) -> MatMul(w_t[5,3]) -> y   with w_t == w.T"""
    w = _weights(3, 5)
    return make_model(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("MatMul", ["h", "w_t"], ["y"])],
        [_info("x", [2, 3])],
        [_info("y", [2, 3])],
        [_init(w, "w"), _init(np.ascontiguousarray(w.T), "w_t")],
    )


def test_transposed_copy_becomes_transpose_node_at_graph_start(transposed_model):
    before, result = _fold(transposed_model, min_rebuild_bytes=0)
    assert result.counts["transposed_folded"] == 1
    assert result.counts["bytes_saved"] == 60
    assert list(initializers(transposed_model.graph)) == ["w"]
    first = transposed_model.graph.node[0]
    assert (first.op_type, list(first.input), list(first.output)) == ("Transpose", ["w"], ["w_t"])
    assert list(helper.get_attribute_value(first.attribute[0])) == [1, 0]
    assert op_types(transposed_model) == ["Transpose", "MatMul", "MatMul"]
    assert_same_outputs(before, transposed_model, seeded_feeds(before), rtol=0, atol=0)


def test_rank3_transposed_copy_uses_the_right_permutation():
    """x[4,2,3] -> Add(w[4,2,3]) -> h; z[3,4,2] -> Add(w_p[3,4,2]) -> y2   with w_p == w.transpose(2, 0, 1)"""
    w = _weights(4, 2, 3)
    model = make_model(
        [helper.make_node("Add", ["x", "w"], ["y1"]), helper.make_node("Add", ["z", "w_p"], ["y2"])],
        [_info("x", [4, 2, 3]), _info("z", [3, 4, 2])],
        [_info("y1", [4, 2, 3]), _info("y2", [3, 4, 2])],
        [_init(w, "w"), _init(np.ascontiguousarray(w.transpose(2, 0, 1)), "w_p")],
    )
    before, result = _fold(model)
    assert result.counts["transposed_folded"] == 1
    node = model.graph.node[0]
    assert node.op_type == "Transpose" and list(node.attribute[0].ints) == [2, 0, 1]
    assert_same_outputs(before, model, seeded_feeds(before), rtol=0, atol=0)


@pytest.fixture
def reshaped_model() -> onnx.ModelProto:
    """x[6] -> Add(b[6]) -> y1;  z[2,3] -> Mul(b2[2,3]) -> y2   with b2 == b.reshape(2, 3)"""
    b = _weights(6)
    return make_model(
        [helper.make_node("Add", ["x", "b"], ["y1"]), helper.make_node("Mul", ["z", "b2"], ["y2"])],
        [_info("x", [6]), _info("z", [2, 3])],
        [_info("y1", [6]), _info("y2", [2, 3])],
        [_init(b, "b"), _init(b.reshape(2, 3), "b2")],
    )


def test_reshaped_copy_becomes_reshape_node_with_constant_shape(reshaped_model):
    before, result = _fold(reshaped_model, min_rebuild_bytes=0)
    assert result.counts["reshaped_folded"] == 1
    assert result.counts["bytes_saved"] == 24 - 16, "the int64 shape initializer is paid for"
    first = reshaped_model.graph.node[0]
    assert (first.op_type, list(first.output)) == ("Reshape", ["b2"])
    assert first.input[0] == "b"
    shape = numpy_helper.to_array(initializers(reshaped_model.graph)[first.input[1]])
    assert shape.tolist() == [2, 3]
    assert_same_outputs(before, reshaped_model, seeded_feeds(before), rtol=0, atol=0)


def test_reshape_of_a_transposed_copy_is_rebuilt_step_by_step():
    """x -> MatMul(w[3,4]) -> h[2,4] -> MatMul(w_t[4,3]) -> y;  z[12] -> Add(w_flat[12] == w.T.ravel()) -> y2"""
    w = _weights(3, 4)
    model = make_model(
        [
            helper.make_node("MatMul", ["x", "w"], ["h"]),
            helper.make_node("MatMul", ["h", "w_t"], ["y"]),
            helper.make_node("Add", ["z", "w_flat"], ["y2"]),
        ],
        [_info("x", [2, 3]), _info("z", [12])],
        [_info("y", [2, 3]), _info("y2", [12])],
        [_init(w, "w"), _init(np.ascontiguousarray(w.T), "w_t"), _init(w.T.reshape(-1).copy(), "w_flat")],
    )
    before, result = _fold(model, min_rebuild_bytes=0)
    assert (result.counts["transposed_folded"], result.counts["reshaped_folded"]) == (1, 1)
    assert [n for n in initializers(model.graph) if n.startswith("w")] == ["w"]
    assert op_types(model)[:2] == ["Transpose", "Reshape"]
    assert model.graph.node[1].input[0] == "w_t", "the reshape reads the rebuilt transpose"
    assert_same_outputs(before, model, seeded_feeds(before), rtol=0, atol=0)


@pytest.fixture
def tied_embedding_model() -> onnx.ModelProto:
    """ids -> Gather(embedding[V,D]) -> h -> MatMul(head[D,V] == embedding.T) -> logits   (TorchScript tied weights)"""
    embedding = _weights(1000, 16)
    return make_model(
        [
            helper.make_node("Gather", ["embedding", "ids"], ["h"], name="embed"),
            helper.make_node("MatMul", ["h", "head"], ["logits"], name="lm_head"),
        ],
        [_info("ids", [2, 3], TensorProto.INT64)],
        [_info("logits", [2, 3, 1000])],
        [_init(embedding, "embedding"), _init(np.ascontiguousarray(embedding.T), "head")],
    )


def test_tied_embedding_is_stored_once_and_answers_identically(tied_embedding_model):
    before, result = _fold(tied_embedding_model)
    copy_bytes = 1000 * 16 * 4
    assert result.counts["transposed_folded"] == 1
    assert result.counts["bytes_saved"] == copy_bytes
    assert list(initializers(tied_embedding_model.graph)) == ["embedding"], "ties keep the first in file order"
    shrink = before.ByteSize() - tied_embedding_model.ByteSize()
    assert copy_bytes - 100 <= shrink <= copy_bytes, shrink
    feeds = seeded_feeds(before)
    assert_same_outputs(before, tied_embedding_model, feeds, rtol=0, atol=0)
    optimized = runtime.run_all(tied_embedding_model, feeds, runtime.RuntimeSettings(level="all"))
    reference = runtime.run_all(before, feeds, runtime.RuntimeSettings(level="all"))
    for ref, got in zip(reference, optimized):
        np.testing.assert_array_equal(got["logits"], ref["logits"])


def test_initializer_that_is_a_graph_input_is_refused(duplicates_model):
    """x -> Add(a) -> ... with a == b == c, and b also declared as a graph input (overridable)"""
    duplicates_model.graph.input.append(_info("b", [4]))
    before, result = _fold(duplicates_model)
    assert result.counts["duplicates_folded"] == 1, "a and c still fold together"
    assert set(initializers(duplicates_model.graph)) == {"a", "b"}
    assert any("'b'" in reason and "graph input" in reason for reason in result.refused), result.refused
    assert [i.name for i in duplicates_model.graph.input] == ["x", "b"]
    assert_same_outputs(before, duplicates_model, seeded_feeds(before), rtol=0, atol=0)


def test_transposed_copy_of_a_graph_input_is_refused(transposed_model):
    transposed_model.graph.input.append(_info("w", [3, 5]))
    before, result = _fold(transposed_model)
    assert not result.changed
    assert result.refused == [
        "main: initializer 'w_t' is Transpose(perm=[1, 0]) of 'w', but 'w' is also a graph input "
        "(the caller may feed another value at run time); not folded"
    ]
    assert before.SerializeToString() == transposed_model.SerializeToString()


def test_near_equal_copies_are_not_folded():
    """x -> Add(a) -> Mul(b) -> MatMul(w) -> MatMul(w_t) -> y   with b == a but one element, w_t == w.T but two elements swapped"""
    a = _weights(3)
    b = a.copy()
    b[1] = np.nextafter(b[1], np.float32(np.inf))
    w = _weights(3, 5)
    w_t = np.ascontiguousarray(w.T)
    w_t[0, 0], w_t[1, 0] = w_t[1, 0], w_t[0, 0]  # same multiset of values: passes the fingerprint, fails the comparison
    model = make_model(
        [
            helper.make_node("Add", ["x", "a"], ["t1"]),
            helper.make_node("Mul", ["t1", "b"], ["t2"]),
            helper.make_node("MatMul", ["t2", "w"], ["h"]),
            helper.make_node("MatMul", ["h", "w_t"], ["y"]),
        ],
        [_info("x", [2, 3])],
        [_info("y", [2, 3])],
        [_init(a, "a"), _init(b, "b"), _init(w, "w"), _init(w_t, "w_t")],
    )
    before, result = _fold(model)
    assert not result.changed and result.refused == []
    assert before.SerializeToString() == model.SerializeToString()


def test_duplicate_that_is_a_graph_output_keeps_its_name_through_identity():
    """x -> Add(a) -> y;  b (== a) is also the graph output `b`"""
    w = _weights(3)
    model = make_model(
        [helper.make_node("Add", ["x", "a"], ["y"]), helper.make_node("Mul", ["x", "a"], ["y2"])],
        [_info("x", [3])],
        [_info("y", [3]), _info("y2", [3]), _info("b", [3])],
        [_init(w, "a"), _init(w.copy(), "b")],
    )
    before, result = _fold(model)
    assert result.counts["duplicates_folded"] == 1
    assert list(initializers(model.graph)) == ["a"]
    identity = model.graph.node[0]
    assert (identity.op_type, list(identity.input), list(identity.output)) == ("Identity", ["a"], ["b"])
    assert [o.name for o in model.graph.output] == ["y", "y2", "b"]
    assert_same_outputs(before, model, seeded_feeds(before), rtol=0, atol=0)


def test_duplicates_inside_an_if_branch_fold_within_that_branch():
    """cond -> If(then: x + p + q, else: x - p2) -> y   with p == q inside the then-branch"""
    w = _weights(3)
    then_branch = helper.make_graph(
        [helper.make_node("Add", ["x", "p"], ["t"]), helper.make_node("Add", ["t", "q"], ["then_y"])],
        "then",
        [],
        [_info("then_y", [3])],
        initializer=[_init(w, "p"), _init(w.copy(), "q")],
    )
    else_branch = helper.make_graph(
        [helper.make_node("Sub", ["x", "p2"], ["else_y"])], "else", [], [_info("else_y", [3])], initializer=[_init(w.copy(), "p2")]
    )
    model = make_model(
        [helper.make_node("If", ["cond"], ["y"], then_branch=then_branch, else_branch=else_branch)],
        [_info("cond", [], TensorProto.BOOL), _info("x", [3])],
        [_info("y", [3])],
    )
    before, result = _fold(model)
    assert result.counts["duplicates_folded"] == 1, "p2 lives in another scope and stays"
    then_graph = next(a.g for a in model.graph.node[0].attribute if a.name == "then_branch")
    assert [t.name for t in then_graph.initializer] == ["p"]
    assert list(then_graph.node[1].input) == ["t", "p"]
    feeds = [{"cond": np.array(c), "x": _weights(3)} for c in (True, False)]
    assert_same_outputs(before, model, feeds, rtol=0, atol=0)


def test_duplicates_fold_in_a_body_when_the_graph_holding_it_folds_too():
    """x + a -> If(then: t + p + q, else: t - a2) -> y   with a == a2 in the main graph and p == q in the
    then-branch: folding the main graph rebuilds its node list (copying the If), so the body must be
    folded first or its folding is lost"""
    w, v = _weights(3), _weights(3)
    then_branch = helper.make_graph(
        [helper.make_node("Add", ["t", "p"], ["u"]), helper.make_node("Add", ["u", "q"], ["then_y"])],
        "then",
        [],
        [_info("then_y", [3])],
        initializer=[_init(v, "p"), _init(v.copy(), "q")],
    )
    else_branch = helper.make_graph([helper.make_node("Sub", ["t", "a2"], ["else_y"])], "else", [], [_info("else_y", [3])])
    model = make_model(
        [
            helper.make_node("Add", ["x", "a"], ["t"]),
            helper.make_node("If", ["cond"], ["y"], then_branch=then_branch, else_branch=else_branch),
        ],
        [_info("cond", [], TensorProto.BOOL), _info("x", [3])],
        [_info("y", [3])],
        [_init(w, "a"), _init(w.copy(), "a2")],
    )
    before, result = _fold(model)
    assert result.counts["duplicates_folded"] == 2
    assert [t.name for t in model.graph.initializer] == ["a"]
    bodies = {a.name: a.g for a in model.graph.node[1].attribute}
    assert [t.name for t in bodies["then_branch"].initializer] == ["p"]
    assert list(bodies["then_branch"].node[1].input) == ["u", "p"]
    assert list(bodies["else_branch"].node[0].input) == ["t", "a"]
    assert not run_pass(FoldSharedWeights(), model).changed, "one run reaches the fixed point"
    feeds = [{"cond": np.array(c), "x": _weights(3)} for c in (True, False)]
    assert_same_outputs(before, model, feeds, rtol=0, atol=0)


def test_finder_reports_groups_and_savings_without_changing_the_model(tied_embedding_model):
    before = tied_embedding_model.SerializeToString()
    found = find_weight_sharing(tied_embedding_model)
    assert len(found.groups) == 1
    group = found.groups[0]
    assert group.members == ("embedding", "head")
    assert [(c.name, c.source, c.kind, c.perm) for c in group.copies] == [("head", "embedding", "transpose", (1, 0))]
    assert found.savable_bytes == 64000
    assert tied_embedding_model.SerializeToString() == before


@pytest.fixture
def index_model() -> onnx.ModelProto:
    """data[5] -> Gather(index scalar) -> y1;  data -> Gather(index_vec [1]) -> y2;  data -> Gather(index_vec2 [1]) -> y3   all holding 3"""
    return make_model(
        [
            helper.make_node("Gather", ["data", "index"], ["y1"]),
            helper.make_node("Gather", ["data", "index_vec"], ["y2"]),
            helper.make_node("Gather", ["data", "index_vec2"], ["y3"]),
        ],
        [_info("data", [5])],
        [_info("y1", []), _info("y2", [1]), _info("y3", [1])],
        [_init(np.array(3, dtype=np.int64), n) if n == "index" else _init(np.array([3], dtype=np.int64), n) for n in ("index", "index_vec", "index_vec2")],
    )


def test_scalar_and_one_element_vector_are_reshapes_not_duplicates(index_model):
    before, result = _fold(index_model, min_rebuild_bytes=0)
    assert (result.counts["duplicates_folded"], result.counts["reshaped_folded"]) == (1, 1)
    assert op_types(index_model) == ["Reshape", "Gather", "Gather", "Gather"]
    assert list(initializers(index_model.graph))[:1] == ["index"]
    assert_same_outputs(before, index_model, seeded_feeds(before), rtol=0, atol=0)


def test_small_reshaped_copy_is_refused_but_its_duplicates_still_fold(index_model):
    before, result = _fold(index_model)
    assert (result.counts["duplicates_folded"], result.counts["reshaped_folded"]) == (1, 0)
    assert result.refused == [
        "main: initializer 'index_vec' is a reshape of 'index' but its 8 bytes are below min_rebuild_bytes=64; kept"
    ]
    assert list(initializers(index_model.graph)) == ["index", "index_vec"]
    assert [n.input[1] for n in index_model.graph.node] == ["index", "index_vec", "index_vec"]
    assert_same_outputs(before, index_model, seeded_feeds(before), rtol=0, atol=0)
