"""Models with random outputs: training-mode Dropouts are compared as onnxruntime deploys them (inference
mode), and nodes that stay random are user errors naming them."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from graphopt import api, cli, randomness
from graphopt import model as model_io
from graphopt.errors import UserError
from tests.helpers import make_model, ort_outputs, seeded_feeds

RNG = np.random.default_rng(7)
W = numpy_helper.from_array(RNG.standard_normal((8, 8)).astype(np.float32), "w")
RATIO = numpy_helper.from_array(np.array(0.5, np.float32), "ratio")
X = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [4, 8])
Y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [4, 8])


def dropout_model(training: bool = True, as_constant_node: bool = False, mask_out: bool = False) -> onnx.ModelProto:
    """x -> MatMul(w) -> Dropout(ratio 0.5, training_mode) -> y (and its mask as an output with mask_out)."""
    flag = helper.make_tensor("training", onnx.TensorProto.BOOL, [], [training])
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="matmul")]
    inits = [W, RATIO]
    if as_constant_node:
        nodes.append(helper.make_node("Constant", [], ["training"], value=flag))
    else:
        inits.append(flag)
    nodes.append(helper.make_node("Dropout", ["h", "ratio", "training"], ["y", "mask"] if mask_out else ["y"], name="drop"))
    outputs = [Y, helper.make_tensor_value_info("mask", onnx.TensorProto.BOOL, [4, 8])] if mask_out else [Y]
    return make_model(nodes, [X], outputs, inits)


def test_the_premise_a_training_mode_dropout_is_random_at_disable_all():
    feeds = seeded_feeds(dropout_model(), n=1) * 2
    first, second = ort_outputs(dropout_model(), feeds)
    assert not np.array_equal(first["y"], second["y"])


@pytest.mark.parametrize("as_constant_node", [False, True])
def test_training_mode_dropouts_are_set_to_inference_mode_and_said(as_constant_node):
    model = dropout_model(as_constant_node=as_constant_node)
    deployed, note = randomness.as_deployed(model)
    drop = next(n for n in deployed.graph.node if n.op_type == "Dropout")
    assert list(drop.input) == ["h", "ratio"]
    assert "has a Dropout in training mode (Dropout 'drop';" in note and "the one onnxruntime deploys" in note
    assert len(next(n for n in model.graph.node if n.op_type == "Dropout").input) == 3  # the input is not modified
    feeds = seeded_feeds(model, n=2)
    for out, feed in zip(ort_outputs(deployed, feeds), feeds):
        np.testing.assert_allclose(out["y"], feed["x"] @ numpy_helper.to_array(W), rtol=1e-5, atol=1e-5)


def test_a_model_with_inference_dropouts_is_returned_as_it_is():
    model = dropout_model(training=False)
    deployed, note = randomness.as_deployed(model)
    assert deployed is model and note is None


def test_optimize_removes_training_dropouts_and_validates_against_the_inference_model():
    """Before, the reference outputs were random: lossless passes were judged against noise (a rounding floor as
    wide as the dropout) and the note was missing."""
    model = dropout_model()
    feeds = seeded_feeds(model, n=4)
    result = api.optimize(model, data=feeds, max_feeds=4)
    assert "Dropout" not in [n.op_type for n in result.model.graph.node]
    assert any("Dropout in training mode" in n for n in result.report.notes)
    assert result.report.final["y"]["max_abs"] == 0.0
    for out, feed in zip(ort_outputs(result.model, feeds), feeds):
        np.testing.assert_allclose(out["y"], feed["x"] @ numpy_helper.to_array(W), rtol=1e-5, atol=1e-5)


def test_a_read_training_mask_is_refused_naming_the_node():
    with pytest.raises(UserError, match="Dropout 'drop' in training mode with its mask output 'mask' read"):
        randomness.as_deployed(dropout_model(mask_out=True))


@pytest.mark.parametrize("op", ["RandomNormalLike", "RandomUniformLike"])
def test_random_number_ops_are_refused_naming_the_node(op):
    model = make_model([helper.make_node(op, ["x"], ["noise"], name="noise"), helper.make_node("Add", ["x", "noise"], ["y"])], [X], [Y])
    with pytest.raises(UserError, match=f"draws random numbers \\({op} 'noise'\\)"):
        randomness.as_deployed(model)


def test_cli_optimize_of_a_random_model_exits_2_and_writes_nothing(tmp_path, capsys):
    model = make_model([helper.make_node("RandomNormalLike", ["x"], ["noise"], name="noise"), helper.make_node("Add", ["x", "noise"], ["y"])], [X], [Y])
    path = str(model_io.save(model, tmp_path / "m.onnx"))
    assert cli.main(["optimize", path, "-o", str(tmp_path / "out.onnx")]) == 2
    assert "draws random numbers (RandomNormalLike 'noise')" in capsys.readouterr().err
    assert not (tmp_path / "out.onnx").exists()


def test_cli_compare_says_it_compared_the_inference_model(tmp_path, capsys):
    path = str(model_io.save(dropout_model(), tmp_path / "m.onnx"))
    clean = str(model_io.save(dropout_model(training=False), tmp_path / "clean.onnx"))
    assert cli.main(["compare", path, clean]) == 0
    out, err = capsys.readouterr()
    assert f"note: {path} has a Dropout in training mode" in err
    assert "1.000000" in out
