"""Loading and saving: external data, atomic writes, the input is never overwritten, bad files."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphopt import model as model_io
from graphopt.errors import UserError

from tests.helpers import make_model


def weighted_model() -> onnx.ModelProto:
    """x -> MatMul(w[64,64]) -> y, with metadata and a custom-domain opset import"""
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32), "w")
    m = make_model(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])],
        [w],
    )
    m.opset_import.append(helper.make_opsetid("com.example", 1))
    helper.set_model_props(m, {"character": "abc"})
    m.doc_string = "doc"
    return m


def test_round_trip_keeps_metadata(tmp_path):
    m = weighted_model()
    path = model_io.save(m, tmp_path / "m.onnx")
    back = model_io.load(path)
    assert back == m
    assert [p.key for p in back.metadata_props] == ["character"]


def test_external_data_round_trip_and_relative_paths(tmp_path):
    m = weighted_model()
    model_io.save(m, tmp_path / "m.onnx", external_data=True)
    assert (tmp_path / "m.onnx.data").is_file()
    back, info = model_io.load_with_info(tmp_path / "m.onnx")
    assert info.external_data == ("m.onnx.data",)
    np.testing.assert_array_equal(numpy_helper.to_array(back.graph.initializer[0]), numpy_helper.to_array(m.graph.initializer[0]))


def test_missing_external_data_is_a_clear_error(tmp_path):
    model_io.save(weighted_model(), tmp_path / "m.onnx", external_data=True)
    (tmp_path / "m.onnx.data").unlink()
    with pytest.raises(UserError, match="external data file 'm.onnx.data' is missing"):
        model_io.load(tmp_path / "m.onnx")


def test_not_onnx_and_truncated_files(tmp_path):
    (tmp_path / "text.onnx").write_text("hello, I am not a model")
    with pytest.raises(UserError, match="not a readable ONNX model|holds no graph"):
        model_io.load(tmp_path / "text.onnx")
    data = weighted_model().SerializeToString()
    (tmp_path / "cut.onnx").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="not a readable ONNX model"):
        model_io.load(tmp_path / "cut.onnx")
    with pytest.raises(UserError, match="no such file"):
        model_io.load(tmp_path / "absent.onnx")


def test_refuses_to_overwrite_the_input(tmp_path):
    path = model_io.save(weighted_model(), tmp_path / "m.onnx")
    before = path.read_bytes()
    with pytest.raises(UserError, match="is the input model"):
        model_io.save(weighted_model(), path, source=path)
    assert path.read_bytes() == before
    model_io.save(weighted_model(), path, source=path, force=True)


def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(onnx, "save_model", broken)
    with pytest.raises(OSError):
        model_io.save(weighted_model(), tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


def test_checker_levels():
    m = weighted_model()
    assert model_io.checker_level(m) == "full"
    m.graph.node[0].input[1] = "missing"
    assert model_io.check(m, "basic") is not None


def test_models_past_the_protobuf_limit_go_through_files(tmp_path, monkeypatch):
    """With the 2 GB limit lowered to a few KB, a 16 KB model takes the >2 GB paths end to end: the
    checker and onnxruntime read it from a temporary file with external data, and save writes external data."""
    import graphopt
    from graphopt import graph

    monkeypatch.setattr(graph, "PROTOBUF_LIMIT", 4096)
    m = weighted_model()
    assert not graph.fits_in_protobuf(m) and graph.serialized(m) is None
    result = graphopt.optimize(m, strict=True)
    assert result.report.checker_level == "full"
    assert result.report.final["y"]["max_abs"] == 0.0
    path = model_io.save(result.model, tmp_path / "big.onnx")
    assert (tmp_path / "big.onnx.data").is_file()
    np.testing.assert_array_equal(numpy_helper.to_array(model_io.load(path).graph.initializer[0]), numpy_helper.to_array(m.graph.initializer[0]))


def test_onnxruntime_reads_models_from_a_temporary_file(monkeypatch):
    """runtime.session hands onnxruntime a path for a ModelProto, not its bytes (onnxruntime's Python
    session would keep bytes alive as long as the session), with the weight in a data file beside it
    (onnxruntime maps it instead of copying); the files are gone afterwards, and the session computes what
    the model says."""
    import os

    import onnxruntime as ort

    from graphopt import runtime

    real = ort.InferenceSession
    given = []

    def recording(model, *args, **kwargs):
        stored = onnx.load(model, load_external_data=False).graph.initializer
        given.append((model, [t.data_location == onnx.TensorProto.EXTERNAL for t in stored]))
        return real(model, *args, **kwargs)

    monkeypatch.setattr(runtime.ort, "InferenceSession", recording)
    m = weighted_model()
    x = np.random.default_rng(0).standard_normal((1, 64)).astype(np.float32)
    expected = x @ numpy_helper.to_array(m.graph.initializer[0])
    before = m.SerializeToString()
    sess = runtime.session(m, runtime.RuntimeSettings())
    [(path, stored_external)] = given
    assert isinstance(path, str) and path.endswith(".onnx") and stored_external == [True]
    assert not os.path.exists(path)
    np.testing.assert_allclose(runtime.run(sess, {"x": x})["y"], expected, rtol=1e-5, atol=1e-5)
    assert m.SerializeToString() == before  # the caller's model untouched
