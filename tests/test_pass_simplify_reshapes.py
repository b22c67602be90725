"""simplify-reshapes: run-time Reshape targets become constants, Reshape/Unsqueeze/Squeeze chains merge.

Every rewrite is checked with onnxruntime on inputs of several batch sizes / sequence lengths, including
sizes the calibration feeds never had, so a rewrite that only holds for one size fails here.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphopt.graph import copy_model, constant_value
from graphopt.passes.dead_code import RemoveDeadCode
from graphopt.passes.simplify_reshapes import SimplifyReshapes, merged_squeeze_axes, merged_unsqueeze_axes
from tests.helpers import assert_same_outputs, make_model, op_types, ort_outputs, run_pass, seeded_feeds

F = TensorProto.FLOAT
CALIBRATION_SIZES = [{"N": 1, "T": 3}, {"N": 2, "T": 5}]
CHECK_SIZES = CALIBRATION_SIZES + [{"N": 3, "T": 1}, {"N": 5, "T": 8}]


def _vi(name: str, shape, elem=F) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, list(shape))


def _ranked(name: str, rank: int, elem=F) -> onnx.ValueInfoProto:
    """A value of known rank and unknown dims (the full checker wants a shape on graph inputs and outputs)."""
    return _vi(name, [None] * rank, elem)


def _ints(name: str, values) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(values, dtype=np.int64), name)



def _feeds(model: onnx.ModelProto, sizes) -> list[dict[str, np.ndarray]]:
    return [seeded_feeds(model, n=1, seed=k, dims=dims)[0] for k, dims in enumerate(sizes)]


def _simplify(model: onnx.ModelProto, calibrate: bool = True, **options):
    """Run the pass in place (calibrated on two sizes, or on no feeds); outputs must agree on four sizes."""
    before = copy_model(model)
    result = run_pass(SimplifyReshapes(**options), model, _feeds(before, CALIBRATION_SIZES) if calibrate else [])
    assert_same_outputs(before, model, _feeds(before, CHECK_SIZES))
    return before, result


def _node(model: onnx.ModelProto, name: str) -> onnx.NodeProto:
    return next(n for n in model.graph.node if n.name == name)


def _target(model: onnx.ModelProto, name: str = "reshape") -> list[int] | None:
    value = constant_value(model.graph, _node(model, name).input[1])
    return None if value is None else value.tolist()


def _dim(source: str, index: int, out: str) -> list[onnx.NodeProto]:
    """source -> Shape -> Gather(index) -> Unsqueeze -> out: a 1-element piece holding dim `index` of source (opset >= 13)."""
    return [
        helper.make_node("Shape", [source], [f"{out}_shape"]),
        helper.make_node("Gather", [f"{out}_shape", f"{out}_index"], [f"{out}_scalar"], axis=0),
        helper.make_node("Unsqueeze", [f"{out}_scalar", "zero_axis"], [out]),
    ]


def _dim_inits(*pieces: tuple[str, int]) -> list[onnx.TensorProto]:
    return [_ints(f"{out}_index", index) for out, index in pieces] + [_ints("zero_axis", [0])]


def _remove_dead(model: onnx.ModelProto) -> None:
    run_pass(RemoveDeadCode(), model, [])


# ---- case 1: Reshape targets computed from Shape chains ----

@pytest.fixture
def pytorch_flatten() -> onnx.ModelProto:
    """x[N,4,T] -> Reshape(x, Concat(Unsqueeze(Gather(Shape(x), 0)), [-1])) -> y[N,4T]"""
    return make_model(
        _dim("x", 0, "batch") + [
            helper.make_node("Concat", ["batch", "minus_one"], ["target"], axis=0),
            helper.make_node("Reshape", ["x", "target"], ["y"], name="reshape"),
        ],
        [_vi("x", ["N", 4, "T"])],
        [_vi("y", ["N", None])],
        _dim_inits(("batch", 0)) + [_ints("minus_one", [-1])],
    )


def test_pytorch_flatten_target_becomes_copy_and_minus_one(pytorch_flatten):
    _, result = _simplify(pytorch_flatten, calibrate=False)  # Shape of a graph input needs no observation
    assert _target(pytorch_flatten) == [0, -1]
    assert result.changed and result.counts["reshape_targets_constant"] == 1 and not result.refused
    _remove_dead(pytorch_flatten)
    assert op_types(pytorch_flatten) == ["Reshape"]


@pytest.fixture
def ppocr_heads() -> onnx.ModelProto:
    """x[N,T,360] -> Neg -> s ; x -> Relu -> r -> Reshape(r, Concat([0], Cast(Slice(Cast(Shape(s)), 1, 2)), [3],[8],[15])) -> y
    ; x -> Sigmoid -> g -> Reshape(g, same Concat) -> z  (PP-OCRv4 rec's attention heads, opset 12)"""
    return make_model(
        [
            helper.make_node("Neg", ["x"], ["s"]),
            helper.make_node("Shape", ["s"], ["s_shape"]),
            helper.make_node("Cast", ["s_shape"], ["s_shape32"], to=TensorProto.INT32),
            helper.make_node("Slice", ["s_shape32", "one", "two", "zero"], ["length32"]),
            helper.make_node("Cast", ["length32"], ["length"], to=TensorProto.INT64),
            helper.make_node("Concat", ["zero", "length", "three", "eight", "fifteen"], ["heads"], axis=0),
            helper.make_node("Relu", ["x"], ["r"]),
            helper.make_node("Reshape", ["r", "heads"], ["y"], name="reshape"),
            helper.make_node("Sigmoid", ["x"], ["g"]),
            helper.make_node("Reshape", ["g", "heads"], ["z"], name="reshape_2"),
        ],
        [_vi("x", ["N", "T", 360])],
        [_vi("y", ["N", "T", 3, 8, 15]), _vi("z", ["N", "T", 3, 8, 15])],
        [_ints(n, [v]) for n, v in (("zero", 0), ("one", 1), ("two", 2), ("three", 3), ("eight", 8), ("fifteen", 15))],
        opset=12,
    )


def test_ppocr_heads_target_becomes_constant_and_is_shared(ppocr_heads):
    _, result = _simplify(ppocr_heads)
    assert _target(ppocr_heads) == _target(ppocr_heads, "reshape_2") == [0, -1, 3, 8, 15]
    assert _node(ppocr_heads, "reshape").input[1] == _node(ppocr_heads, "reshape_2").input[1]  # one initializer
    assert result.counts["reshape_targets_constant"] == 2 and not result.refused
    _remove_dead(ppocr_heads)
    assert op_types(ppocr_heads) == ["Relu", "Reshape", "Sigmoid", "Reshape"]


def test_ppocr_heads_without_feeds_is_refused(ppocr_heads):
    """s is an intermediate tensor: its rank must be confirmed by onnxruntime, and there are no feeds."""
    before, result = _simplify(ppocr_heads, calibrate=False)
    assert ppocr_heads == before and not result.changed
    assert result.refused == [
        f"Reshape {name} ({data} -> {out}): target heads: Shape s_shape: s was not observed (no calibration feeds)"
        for name, data, out in (("reshape", "r", "y"), ("reshape_2", "g", "z"))
    ]


def test_zero_size_batch_is_the_documented_caveat_of_minus_one(ppocr_heads):
    """The default assumes non-empty tensors: with N=0 the original gives an empty tensor, the -1 cannot resolve."""
    before, _ = _simplify(ppocr_heads)
    empty = _feeds(before, [{"N": 0, "T": 4}])
    assert ort_outputs(before, empty)[0]["y"].shape == (0, 4, 3, 8, 15)
    with pytest.raises(Exception, match="cannot be reshaped"):
        ort_outputs(ppocr_heads, empty)


def test_assume_nonempty_false_refuses_minus_one_next_to_a_copied_dynamic_dim(ppocr_heads):
    before, result = _simplify(ppocr_heads, assume_nonempty=False)
    assert ppocr_heads == before and not result.changed
    assert result.refused == [
        f"Reshape {name} ({data} -> {out}): target heads: entry 1 cannot become -1: entry 0 copies dim 0 of {data}, "
        "which may be 0 at run time (assume_nonempty=false)"
        for name, data, out in (("reshape", "r", "y"), ("reshape_2", "g", "z"))
    ]


def test_assume_nonempty_false_accepts_a_copied_static_dim():
    """x[2,T,6] -> Reshape(x, Concat([0], Unsqueeze(Mul(Gather(Shape(x), 1), 2)), [3])) -> y[2,2T,3]"""
    model = make_model(
        [
            helper.make_node("Shape", ["x"], ["x_shape"]),
            helper.make_node("Gather", ["x_shape", "one"], ["length"], axis=0),
            helper.make_node("Mul", ["length", "two"], ["doubled"]),
            helper.make_node("Unsqueeze", ["doubled", "zero_axis"], ["piece"]),
            helper.make_node("Concat", ["zero", "piece", "three"], ["target"], axis=0),
            helper.make_node("Reshape", ["x", "target"], ["y"], name="reshape"),
        ],
        [_vi("x", [2, "T", 6])],
        [_vi("y", [2, None, 3])],
        [_ints("one", 1), _ints("two", 2), _ints("zero_axis", [0]), _ints("zero", [0]), _ints("three", [3])],
    )
    _, result = _simplify(model, assume_nonempty=False)
    assert _target(model) == [0, -1, 3] and not result.refused


def test_shape_start_end_and_static_dims_of_another_tensor():
    """x[N,4,T] -> Reshape(x, Concat([-1], Shape(x, start=-2))) -> a ; a -> Reshape(a, Concat([-1], Shape(w, start=1))) -> y
    with w[N,2,2] a graph input: the first target is [-1, 4, 0] (dim 2 copied), the second [-1, 2, 2] (static dims)."""
    model = make_model(
        [
            helper.make_node("Shape", ["x"], ["tail"], start=-2),
            helper.make_node("Concat", ["minus_one", "tail"], ["first_target"], axis=0),
            helper.make_node("Reshape", ["x", "first_target"], ["a"], name="reshape"),
            helper.make_node("Relu", ["a"], ["b"]),
            helper.make_node("Shape", ["w"], ["w_tail"], start=1),
            helper.make_node("Concat", ["minus_one", "w_tail"], ["second_target"], axis=0),
            helper.make_node("Reshape", ["b", "second_target"], ["y"], name="reshape_2"),
        ],
        [_vi("x", ["N", 4, "T"]), _vi("w", ["N", 2, 2])],
        [_vi("y", [None, 2, 2]), _vi("a", ["N", 4, "T"])],
        [_ints("minus_one", [-1])],
        opset=15,
    )
    _, result = _simplify(model)
    assert _target(model) == [-1, 4, 0] and _target(model, "reshape_2") == [-1, 2, 2] and not result.refused


def test_negative_gather_indices_copy_their_own_dims():
    """x[N,T,2,3] -> Reshape(x, Concat(Unsqueeze(Gather(Shape(x), -4)), Unsqueeze(Gather(Shape(x), -3)), [6])) -> y[N,T,6]"""
    model = make_model(
        _dim("x", -4, "batch") + _dim("x", -3, "length") + [
            helper.make_node("Concat", ["batch", "length", "six"], ["target"], axis=0),
            helper.make_node("Reshape", ["x", "target"], ["y"], name="reshape"),
        ],
        [_vi("x", ["N", "T", 2, 3])],
        [_vi("y", ["N", "T", 6])],
        _dim_inits(("batch", -4), ("length", -3)) + [_ints("six", [6])],
    )
    _, result = _simplify(model)
    assert _target(model) == [0, 0, 6] and not result.refused


def test_squeeze_and_attribute_axes_in_the_chain():
    """opset 11: x[N,T,6] -> Reshape(x, Concat([0], Unsqueeze(Squeeze(Slice(Shape(x), 1, 2))), [2], [3])) -> y[N,T,2,3]"""
    model = make_model(
        [
            helper.make_node("Shape", ["x"], ["x_shape"]),
            helper.make_node("Slice", ["x_shape", "one", "two"], ["length_vector"]),
            helper.make_node("Squeeze", ["length_vector"], ["length"], axes=[0]),
            helper.make_node("Unsqueeze", ["length"], ["length_piece"], axes=[-1]),
            helper.make_node("Concat", ["zero", "length_piece", "two", "three"], ["target"], axis=0),
            helper.make_node("Reshape", ["x", "target"], ["y"], name="reshape"),
        ],
        [_vi("x", ["N", "T", 6])],
        [_vi("y", ["N", "T", 2, 3])],
        [_ints(n, [v]) for n, v in (("zero", 0), ("one", 1), ("two", 2), ("three", 3))],
        opset=11,
    )
    _, result = _simplify(model)
    assert _target(model) == [0, 0, 2, 3] and not result.refused


def test_a_constant_target_lets_onnx_infer_the_rank_the_next_target_needs():
    """opset 12 (no data propagation): x[N,4,T,2] -> Reshape(x, Concat(Slice(Shape(x), 0, 2), [-1])) -> a -> Relu -> r
    -> Reshape(r, Concat([0], Cast(Slice(Cast(Shape(r)), 1, 2)), [2], [-1])) -> y: the rank of r is known only once
    the first target is constant, so the pass infers shapes again before giving up."""
    model = make_model(
        [
            helper.make_node("Shape", ["x"], ["x_shape"]),
            helper.make_node("Slice", ["x_shape", "zero", "two"], ["head"]),
            helper.make_node("Concat", ["head", "minus_one"], ["first_target"], axis=0),
            helper.make_node("Reshape", ["x", "first_target"], ["a"], name="reshape"),
            helper.make_node("Relu", ["a"], ["r"]),
            helper.make_node("Shape", ["r"], ["r_shape"]),
            helper.make_node("Cast", ["r_shape"], ["r_shape32"], to=TensorProto.INT32),
            helper.make_node("Slice", ["r_shape32", "one", "two"], ["length32"]),
            helper.make_node("Cast", ["length32"], ["length"], to=TensorProto.INT64),
            helper.make_node("Concat", ["zero", "length", "two", "minus_one"], ["second_target"], axis=0),
            helper.make_node("Reshape", ["r", "second_target"], ["y"], name="reshape_2"),
        ],
        [_vi("x", ["N", 4, "T", 2])],
        [_vi("y", ["N", 4, 2, "T"])],
        [_ints(n, [v]) for n, v in (("zero", 0), ("one", 1), ("two", 2), ("minus_one", -1))],
        opset=12,
    )
    _, result = _simplify(model)
    assert _target(model) == [0, 4, -1] and _target(model, "reshape_2") == [0, 4, 2, -1]
    assert result.counts["reshape_targets_constant"] == 2 and not result.refused


def test_dim_of_data_at_another_position_is_undetermined_and_minus_one_is_taken():
    """x[N,3,T] -> Reshape(x, Concat([-1], Unsqueeze(Gather(Shape(x), -1)))) -> y[3N,T]: T sits at position 1, not 2."""
    model = make_model(
        _dim("x", -1, "length") + [
            helper.make_node("Concat", ["minus_one", "length"], ["target"], axis=0),
            helper.make_node("Reshape", ["x", "target"], ["y"], name="reshape"),
        ],
        [_vi("x", ["N", 3, "T"])],
        [_vi("y", [None, "T"])],
        _dim_inits(("length", -1)) + [_ints("minus_one", [-1])],
    )
    before, result = _simplify(model)
    assert model == before and not result.changed
    assert result.refused == ["Reshape reshape (x -> y): target target: entry 1 stays undetermined and the target already has a -1"]


def _computed_pieces(allowzero: int | None = None, pieces=("zero", "doubled_piece", "three")) -> onnx.ModelProto:
    """x[N,T,6] -> Reshape(x, Concat(pieces)) -> y, where doubled_piece = Unsqueeze(Mul(Gather(Shape(x), 1), 2))
    and batch_piece = Unsqueeze(Gather(Shape(x), 0)) (opset 14, for allowzero)"""
    attrs = {} if allowzero is None else {"allowzero": allowzero}
    return make_model(
        _dim("x", 0, "batch_piece") + [
            helper.make_node("Shape", ["x"], ["x_shape"]),
            helper.make_node("Gather", ["x_shape", "one"], ["length"], axis=0),
            helper.make_node("Mul", ["length", "two"], ["doubled"]),
            helper.make_node("Unsqueeze", ["doubled", "zero_axis"], ["doubled_piece"]),
            helper.make_node("Concat", list(pieces), ["target"], axis=0),
            helper.make_node("Reshape", ["x", "target"], ["y"], name="reshape", **attrs),
        ],
        [_vi("x", ["N", "T", 6])],
        [_ranked("y", len(pieces))],
        _dim_inits(("batch_piece", 0)) + [_ints(n, v) for n, v in (("one", 1), ("two", 2), ("zero", [0]), ("three", [3]), ("minus_one", [-1]))],
        opset=14,
    )


def test_one_computed_piece_becomes_minus_one():
    model = _computed_pieces()
    _, result = _simplify(model)
    assert _target(model) == [0, -1, 3] and not result.refused


def test_two_undetermined_pieces_are_refused():
    """[N, 2T, 3] written as Concat(batch, doubled, [3]) with allowzero=1: the batch piece cannot become 0."""
    model = _computed_pieces(allowzero=1, pieces=("batch_piece", "doubled_piece", "three"))
    before, result = _simplify(model)
    assert model == before
    assert result.refused == [
        "Reshape reshape (x -> y): target target: entries [0, 1] of the target stay undetermined; -1 can stand for one only"
    ]


def test_literal_zero_with_allowzero_refuses_minus_one():
    """allowzero=1, target Concat([0], doubled, [3]): the output is empty whatever the doubled entry is."""
    model = _computed_pieces(allowzero=1)
    before = copy_model(model)
    result = run_pass(SimplifyReshapes(), model, _feeds(model, [{"N": 0, "T": 2}]))  # only an empty x fits
    assert model == before
    assert result.refused == [
        "Reshape reshape (x -> y): target target: entry 1 cannot become -1: entry 0 is a literal 0 (allowzero=1), the output is empty"
    ]


def test_allowzero_does_not_turn_own_dims_into_copies():
    """allowzero=1, target Concat(batch, [-1]): with allowzero=0 this is [0, -1]; here 0 would be literal."""
    model = _computed_pieces(allowzero=1, pieces=("batch_piece", "minus_one"))
    before, result = _simplify(model)
    assert model == before
    assert result.refused == ["Reshape reshape (x -> y): target target: entry 0 stays undetermined and the target already has a -1"]


def test_allowzero_single_open_entry_becomes_minus_one():
    """allowzero=1: x[N,4,3] -> Reshape(x, Concat(Unsqueeze(Gather(Shape(x), 0)), [12])) -> y[N,12]"""
    model = make_model(
        _dim("x", 0, "batch") + [
            helper.make_node("Concat", ["batch", "twelve"], ["target"], axis=0),
            helper.make_node("Reshape", ["x", "target"], ["y"], name="reshape", allowzero=1),
        ],
        [_vi("x", ["N", 4, 3])],
        [_vi("y", ["N", 12])],
        _dim_inits(("batch", 0)) + [_ints("twelve", [12])],
        opset=14,
    )
    _, result = _simplify(model)
    assert _target(model) == [-1, 12] and not result.refused


def test_piece_of_unknown_length_is_refused():
    """w, s -> Reshape -> v (rank unknown) ; x[N,T] -> Reshape(x, Concat([-1], Shape(v))) -> y: Shape(v) has ? entries."""
    model = make_model(
        [
            helper.make_node("Reshape", ["w", "s"], ["v"]),
            helper.make_node("Shape", ["v"], ["v_shape"]),
            helper.make_node("Concat", ["minus_one", "v_shape"], ["target"], axis=0),
            helper.make_node("Reshape", ["x", "target"], ["y"], name="reshape"),
        ],
        [_vi("x", ["N", "T"]), _vi("w", ["M"]), _vi("s", ["K"], TensorProto.INT64)],
        [_ranked("y", 2)],
        [_ints("minus_one", [-1])],
    )
    before = copy_model(model)
    feeds = [{"x": np.ones((2, 3), np.float32), "w": np.ones(3, np.float32), "s": np.array([3])}]
    result = run_pass(SimplifyReshapes(), model, feeds)
    assert model == before
    assert result.refused == [
        "Reshape reshape (x -> y): target target: Shape v_shape: onnx shape inference gives no shape for v"
    ]


# ---- case 2: Reshape -> Reshape ----

def _reshape_chain(first_target, second_target, shape=("N", 4, 6), middle_readers: int = 1, outputs=()) -> onnx.ModelProto:
    """x -> Reshape(first) -> m -> Reshape(second) -> y   (and m -> Neg -> n per extra reader)"""
    extra = [helper.make_node("Neg", ["m"], [f"n{k}"]) for k in range(1, middle_readers)]
    return make_model(
        [
            helper.make_node("Reshape", ["x", "first"], ["m"], name="first"),
            helper.make_node("Reshape", ["m", "second"], ["y"], name="reshape"),
            *extra,
        ],
        [_vi("x", shape)],
        [_ranked("y", len(second_target))] + [_ranked(f"n{k}", len(first_target)) for k in range(1, middle_readers)] + list(outputs),
        [_ints("first", first_target), _ints("second", second_target)],
    )


def test_reshape_chain_with_copy_proven_by_the_first_target():
    """x[N,4,6] -> Reshape [0,24] -> Reshape [0,2,12] -> y: entry 0 of both copies N"""
    model = _reshape_chain([0, 24], [0, 2, 12])
    _, result = _simplify(model)
    assert op_types(model) == ["Reshape"] and list(model.graph.node[0].input) == ["x", "second"]
    assert result.counts["reshapes_merged"] == 1 and result.counts["nodes_removed"] == 1 and not result.refused


def test_reshape_chain_without_copies_merges_and_keeps_output_name():
    """x[N,4,6] -> Reshape [-1,6] -> Reshape [-1,4,3] -> y"""
    model = _reshape_chain([-1, 6], [-1, 4, 3])
    _simplify(model)
    assert op_types(model) == ["Reshape"] and list(model.graph.node[0].output) == ["y"]


def test_three_reshapes_merge_into_one():
    """x[N,4,6] -> Reshape [0,-1] -> Reshape [0,6,4] -> Reshape [0,2,12] -> y"""
    model = make_model(
        [
            helper.make_node("Reshape", ["x", "a"], ["m1"]),
            helper.make_node("Reshape", ["m1", "b"], ["m2"]),
            helper.make_node("Reshape", ["m2", "c"], ["y"]),
        ],
        [_vi("x", ["N", 4, 6])],
        [_vi("y", ["N", 2, 12])],
        [_ints("a", [0, -1]), _ints("b", [0, 6, 4]), _ints("c", [0, 2, 12])],
    )
    _, result = _simplify(model)
    assert op_types(model) == ["Reshape"] and list(model.graph.node[0].input) == ["x", "c"]
    assert result.counts["reshapes_merged"] == 2


def test_copy_proven_by_equal_static_dims():
    """x[4,6,T] -> Reshape [4,-1] -> Reshape [0,2,-1] -> y: the copied dim is 4 in both"""
    model = _reshape_chain([4, -1], [0, 2, -1], shape=(4, 6, "T"))
    _, result = _simplify(model)
    assert op_types(model) == ["Reshape"] and not result.refused


def test_copy_of_a_changed_dim_is_refused():
    """x[N,6] -> Reshape [2,-1] -> m[2,3N] -> Reshape [0,-1] -> y: entry 0 copies m's 2, not x's N"""
    model = _reshape_chain([2, -1], [0, -1], shape=("N", 6))
    before, result = _simplify(model)
    assert model == before
    assert result.refused == [
        "Reshape reshape (m -> y): Reshape -> Reshape: entry 0 of the second target copies dim 0 of m, not proven equal to dim 0 of x"
    ]


def test_reshape_chain_refusals_intermediate_read_elsewhere_or_graph_output():
    shared = _reshape_chain([0, 24], [0, 2, 12], middle_readers=2)
    before, result = _simplify(shared)
    assert shared == before
    assert result.refused == ["Reshape reshape (m -> y): Reshape -> Reshape: the intermediate m has other readers"]
    exposed = _reshape_chain([0, 24], [0, 2, 12], outputs=[_ranked("m", 2)])
    before, result = _simplify(exposed)
    assert exposed == before
    assert result.refused == ["Reshape reshape (m -> y): Reshape -> Reshape: the intermediate m is a graph output"]


def _runtime_second_target(allowzero: int) -> onnx.ModelProto:
    """x[N,4,6] -> Reshape [0,24] -> m -> Reshape(m, s, allowzero) -> y with s a graph input (opset 14)"""
    return make_model(
        [
            helper.make_node("Reshape", ["x", "first"], ["m"]),
            helper.make_node("Reshape", ["m", "s"], ["y"], name="reshape", allowzero=allowzero),
        ],
        [_vi("x", ["N", 4, 6]), _vi("s", [3], TensorProto.INT64)],
        [_ranked("y", 3)],
        [_ints("first", [0, 24])],
        opset=14,
    )


RUNTIME_TARGET_FEEDS = [{"x": np.ones((2, 4, 6), np.float32), "s": np.array([2, 2, 12])},
                        {"x": np.arange(72, dtype=np.float32).reshape(3, 4, 6), "s": np.array([3, 24, 1])}]


def test_reshape_chain_with_a_runtime_second_target_is_refused():
    model = _runtime_second_target(allowzero=0)
    before = copy_model(model)
    result = run_pass(SimplifyReshapes(), model, RUNTIME_TARGET_FEEDS)
    assert model == before
    assert result.refused == [
        "Reshape reshape (m -> y): Reshape -> Reshape: entry 0 of the second target is computed, and a 0 there would copy dim 0 of m"
    ]


def test_reshape_chain_with_a_runtime_second_target_and_allowzero_merges():
    """allowzero=1: no entry copies a dim, only the element count matters"""
    model = _runtime_second_target(allowzero=1)
    before = copy_model(model)
    run_pass(SimplifyReshapes(), model, RUNTIME_TARGET_FEEDS)
    assert op_types(model) == ["Reshape"] and list(model.graph.node[0].input) == ["x", "s"]
    assert_same_outputs(before, model, RUNTIME_TARGET_FEEDS)


@pytest.fixture
def reshape_back() -> onnx.ModelProto:
    """x[N,4,6] -> Reshape [-1] -> m -> Reshape(m, Shape(w)) -> y with x -> Relu -> w (HF attention-mask pattern)"""
    return make_model(
        [
            helper.make_node("Relu", ["x"], ["w"]),
            helper.make_node("Reshape", ["x", "minus_one"], ["m"]),
            helper.make_node("Shape", ["w"], ["w_shape"]),
            helper.make_node("Reshape", ["m", "w_shape"], ["y"], name="reshape"),
        ],
        [_vi("x", ["N", 4, 6])],
        [_vi("y", ["N", 4, 6])],
        [_ints("minus_one", [-1])],
    )


def test_second_target_of_nonzero_dims_merges(reshape_back):
    _, result = _simplify(reshape_back)
    assert op_types(reshape_back) == ["Relu", "Shape", "Reshape"] and _node(reshape_back, "reshape").input[0] == "x"
    assert result.counts["reshapes_merged"] == 1 and not result.refused


def test_second_target_of_dynamic_dims_needs_assume_nonempty(reshape_back):
    before, result = _simplify(reshape_back, assume_nonempty=False)
    assert reshape_back == before
    assert result.refused == [
        "Reshape reshape (m -> y): Reshape -> Reshape: entry 0 of the second target is a dynamic dim, 0 when empty (assume_nonempty=false)"
    ]


def test_constant_targets_enable_the_reshape_merge():
    """x[N,4,6] -> Reshape(x, Concat(batch(x), [-1])) -> m -> Reshape(m, Concat(batch(m), [2], [12])) -> y"""
    model = make_model(
        _dim("x", 0, "x_batch") + [
            helper.make_node("Concat", ["x_batch", "minus_one"], ["first"], axis=0),
            helper.make_node("Reshape", ["x", "first"], ["m"]),
        ] + _dim("m", 0, "m_batch") + [
            helper.make_node("Concat", ["m_batch", "two", "twelve"], ["second"], axis=0),
            helper.make_node("Reshape", ["m", "second"], ["y"], name="reshape"),
        ],
        [_vi("x", ["N", 4, 6])],
        [_vi("y", ["N", 2, 12])],
        _dim_inits(("x_batch", 0), ("m_batch", 0)) + [_ints("minus_one", [-1]), _ints("two", [2]), _ints("twelve", [12])],
    )
    _, result = _simplify(model)
    _remove_dead(model)
    assert op_types(model) == ["Reshape"] and model.graph.node[0].input[0] == "x" and _target(model) == [0, 2, 12]
    assert result.counts["reshape_targets_constant"] == 2 and result.counts["reshapes_merged"] == 1


# ---- case 3: Unsqueeze -> Unsqueeze, Squeeze -> Squeeze ----

UNRANKED_FEED = {"w": np.ones(6, np.float32), "s": np.array([6])}


def _axes_chain(op: str, first, second, shape, opset: int = 17, middle_readers: int = 1, axes_input: str | None = None) -> onnx.ModelProto:
    """x -> op(first) -> m -> op(second) -> y (axes as attributes before opset 13, initializers after);
    with shape None, x = Reshape(w, s) for graph inputs w[M], s[K] (onnx cannot infer the rank of x)."""
    def node(inp, out, axes, name, axes_name):
        if axes is None:
            return helper.make_node(op, [inp], [out], name=name)
        if opset < 13:
            return helper.make_node(op, [inp], [out], name=name, axes=axes)
        return helper.make_node(op, [inp, axes_name], [out], name=name)

    inits = [] if opset < 13 else [_ints(n, a) for n, a in (("first_axes", first), ("second_axes", second)) if a is not None]
    extra = [helper.make_node("Neg", ["m"], ["n"])] if middle_readers > 1 else []
    unranked = shape is None
    rank = 1 if unranked else len(shape)
    sign = 1 if op == "Unsqueeze" else -1
    middle_rank, out_rank = rank + sign * len(first or []), rank + sign * (len(first or []) + len(second or []))
    inputs = [_vi("w", ["M"]), _vi("s", ["K"], TensorProto.INT64)] if unranked else [_vi("x", shape)]
    inputs += [_vi(axes_input, [len(second)], TensorProto.INT64)] if axes_input else []
    return make_model(
        [helper.make_node("Reshape", ["w", "s"], ["x"])] * unranked
        + [node("x", "m", first, "first", "first_axes"), node("m", "y", second, "second", axes_input or "second_axes"), *extra],
        inputs,
        [_ranked("y", out_rank)] + ([_ranked("n", middle_rank)] if extra else []),
        inits,
        opset=opset,
    )


def _axes(model: onnx.ModelProto, node: onnx.NodeProto) -> list[int] | None:
    for attr in node.attribute:
        if attr.name == "axes":
            return list(attr.ints)
    return constant_value(model.graph, node.input[1]).tolist() if len(node.input) > 1 else None


@pytest.mark.parametrize(
    ("op", "first", "second", "shape", "merged"),
    [
        ("Unsqueeze", [0], [2], ["N", "T"], [0, 2]),  # [N,T] -> [1,N,T] -> [1,N,1,T]
        ("Unsqueeze", [-1], [0], ["N", "T"], [0, 3]),  # [N,T] -> [N,T,1] -> [1,N,T,1]
        ("Unsqueeze", [1, 3], [0, 5], ["N", "T"], [0, 2, 4, 5]),  # [N,1,T,1] -> [1,N,1,T,1,1]
        ("Squeeze", [1], [2], ["N", 1, "T", 1], [1, 3]),  # [N,1,T,1] -> [N,T,1] -> [N,T]
        ("Squeeze", [-1], [-2], ["N", 1, "T", 1], [1, 3]),
        ("Squeeze", [1], None, ["N", 1, "T", 1], None),  # the second squeezes every size-1 dim left
    ],
)
@pytest.mark.parametrize("opset", [11, 17])
def test_axes_chains_merge(op, first, second, shape, merged, opset):
    model = _axes_chain(op, first, second, shape, opset=opset)
    _, result = _simplify(model)
    assert op_types(model) == [op] and list(model.graph.node[0].input[:1]) == ["x"] and list(model.graph.node[0].output) == ["y"]
    assert _axes(model, model.graph.node[0]) == merged
    assert result.counts[f"{op.lower()}s_merged"] == 1 and result.counts["nodes_removed"] == 1 and not result.refused


def test_three_unsqueezes_merge_into_one():
    """x[N,T] -> Unsqueeze [0] -> Unsqueeze [-1] -> Unsqueeze [2] -> y[1,N,1,T,1]"""
    model = make_model(
        [
            helper.make_node("Unsqueeze", ["x", "zero_axis"], ["a"]),
            helper.make_node("Unsqueeze", ["a", "last_axis"], ["b"]),
            helper.make_node("Unsqueeze", ["b", "two_axis"], ["y"]),
        ],
        [_vi("x", ["N", "T"])],
        [_vi("y", [1, "N", 1, "T", 1])],
        [_ints("zero_axis", [0]), _ints("last_axis", [-1]), _ints("two_axis", [2])],
    )
    _, result = _simplify(model)
    assert op_types(model) == ["Unsqueeze"] and _axes(model, model.graph.node[0]) == [0, 2, 4]
    assert result.counts["unsqueezes_merged"] == 2


def test_squeeze_chain_that_squeezes_a_dynamic_one():
    """x[N,1,T,1] -> Squeeze [1] -> Squeeze (no axes) -> y: with N=1 both versions drop N too"""
    model = _axes_chain("Squeeze", [1], None, ["N", 1, "T", 1])
    before = copy_model(model)
    run_pass(SimplifyReshapes(), model, _feeds(before, CALIBRATION_SIZES))
    assert op_types(model) == ["Squeeze"]
    assert ort_outputs(model, _feeds(before, [{"N": 1, "T": 3}]))[0]["y"].shape == (3,)
    assert_same_outputs(before, model, _feeds(before, [{"N": 1, "T": 3}, {"N": 2, "T": 1}]))


def test_negative_axes_without_a_rank_are_refused():
    """w, s -> Reshape -> x (rank unknown) -> Unsqueeze [-1] -> Unsqueeze [0] -> y"""
    model = _axes_chain("Unsqueeze", [-1], [0], None)
    before = copy_model(model)
    result = run_pass(SimplifyReshapes(), model, [UNRANKED_FEED])
    assert model == before
    assert result.refused == ["Unsqueeze second (m -> y): Unsqueeze -> Unsqueeze: negative axes need the rank of the input"]


def test_non_negative_axes_need_no_rank():
    """w, s -> Reshape -> x (rank unknown) -> Unsqueeze [0] -> Unsqueeze [0] -> y, calibrated on nothing"""
    model = _axes_chain("Unsqueeze", [0], [0], None)
    before = copy_model(model)
    run_pass(SimplifyReshapes(), model, [])
    assert op_types(model) == ["Reshape", "Unsqueeze"] and _axes(model, model.graph.node[1]) == [0, 1]
    assert model.graph.node[1].input[0] == "x"
    assert_same_outputs(before, model, [UNRANKED_FEED, {"w": np.ones(6, np.float32), "s": np.array([2, 3])}])


def test_axes_chain_refusals():
    shared = _axes_chain("Unsqueeze", [0], [0], ["N", "T"], middle_readers=2)
    before, result = _simplify(shared)
    assert shared == before
    assert result.refused == ["Unsqueeze second (m -> y): Unsqueeze -> Unsqueeze: the intermediate m has other readers"]

    squeeze_all_first = _axes_chain("Squeeze", None, [0], ["N", 1, "T"])
    before = copy_model(squeeze_all_first)
    result = run_pass(SimplifyReshapes(), squeeze_all_first, [])
    assert squeeze_all_first == before
    assert result.refused == [
        "Squeeze second (m -> y): Squeeze -> Squeeze: the first Squeeze has no axes (removes every size-1 dim), "
        "so which dims the second removes is unknown"
    ]

    empty_axes = _axes_chain("Squeeze", [], [0], [1, "N", 1])
    before = copy_model(empty_axes)
    result = run_pass(SimplifyReshapes(), empty_axes, [])
    assert empty_axes == before
    assert result.refused == ["Squeeze second (m -> y): Squeeze -> Squeeze: empty axes, which onnx and onnxruntime read differently"]

    runtime_axes = _axes_chain("Unsqueeze", [0], [0], ["N", "T"], axes_input="axes")
    before = copy_model(runtime_axes)
    result = run_pass(SimplifyReshapes(), runtime_axes, [])
    assert runtime_axes == before
    assert result.refused == ["Unsqueeze second (m -> y): Unsqueeze -> Unsqueeze: axes input axes is not a constant initializer"]


def test_axes_arithmetic():
    assert merged_unsqueeze_axes([0, 1], [1], None) == [0, 1, 2]
    assert merged_unsqueeze_axes([-1], [-1], 2) == [2, 3]
    assert merged_squeeze_axes([0, 2], [0], None) == [0, 1, 2]
    assert merged_squeeze_axes([0, 2], [1], None) == [0, 2, 3]
    assert merged_squeeze_axes([-1], [-1], None) == "negative axes need the rank of the input"


# ---- subgraphs ----

def test_if_body_merges_axes_and_refuses_unobserved_shapes():
    """(axes initializers live in each body) cond, x[N,T] -> If(then: Unsqueeze [0] -> Unsqueeze [0] of x -> t ;
    else: Reshape(x, Concat(batch(x), [-1])) -> Unsqueeze [0] -> Unsqueeze [0] -> e) -> y"""
    then_branch = helper.make_graph(
        [
            helper.make_node("Unsqueeze", ["x", "zero_axis"], ["t1"], name="then_first"),
            helper.make_node("Unsqueeze", ["t1", "zero_axis"], ["t"], name="then_second"),
        ],
        "then", [], [_ranked("t", 4)], [_ints("zero_axis", [0])],
    )
    else_branch = helper.make_graph(
        _dim("x", 0, "batch") + [
            helper.make_node("Concat", ["batch", "minus_one"], ["target"], axis=0),
            helper.make_node("Reshape", ["x", "target"], ["r"], name="inner"),
            helper.make_node("Unsqueeze", ["r", "zero_axis"], ["e1"]),
            helper.make_node("Unsqueeze", ["e1", "zero_axis"], ["e"]),
        ],
        "else", [], [_ranked("e", 4)], [_ints("batch_index", 0), _ints("minus_one", [-1]), _ints("zero_axis", [0])],
    )
    model = make_model(
        [helper.make_node("If", ["cond"], ["y"], then_branch=then_branch, else_branch=else_branch)],
        [_vi("cond", [], TensorProto.BOOL), _vi("x", ["N", "T"])],
        [_ranked("y", 4)],
    )
    before = copy_model(model)
    feeds = [{"cond": np.array(c), "x": x} for c in (True, False) for x in (np.ones((2, 3), np.float32), np.ones((4, 1), np.float32))]
    result = run_pass(SimplifyReshapes(), model, feeds)
    assert_same_outputs(before, model, feeds)
    branches = {a.name: a.g for a in model.graph.node[0].attribute}
    then_after, else_after = branches["then_branch"], branches["else_branch"]
    assert [n.op_type for n in then_after.node] == ["Unsqueeze"]
    assert [n.op_type for n in else_after.node][-2:] == ["Reshape", "Unsqueeze"]
    assert result.counts["unsqueezes_merged"] == 2
    assert result.refused == [
        "Reshape inner (x -> r): target target: Shape batch_shape: shapes inside If/Loop/Scan bodies are not observed"
    ]


def test_nothing_to_do_reports_unchanged():
    """x -> Relu -> y"""
    model = make_model([helper.make_node("Relu", ["x"], ["y"])], [_vi("x", ["N"])], [_vi("y", ["N"])])
    before, result = _simplify(model)
    assert model == before and not result.changed and not result.refused
