"""Feeds from .npz files (both layouts), synthesized feeds, and the errors bad data gets."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphopt import data, runtime
from graphopt.errors import UserError

from tests.helpers import make_model


def image_model():
    """image[batch,3,4,4] -> ReduceMean -> y"""
    return make_model(
        [helper.make_node("ReduceMean", ["image"], ["y"], keepdims=0, axes=[2, 3])],
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
        opset=17,
    )


def token_model():
    """ids[batch,seq] -> Gather(table[50,8]) -> y ; scale (scalar) -> Mul"""
    table = numpy_helper.from_array(np.zeros((50, 8), np.float32), "table")
    return make_model(
        [helper.make_node("Gather", ["table", "ids"], ["e"]), helper.make_node("Mul", ["e", "scale"], ["y"])],
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "seq"]), helper.make_tensor_value_info("scale", TensorProto.FLOAT, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", 8])],
        [table],
    )


def write_npz(tmp_path, **arrays):
    path = tmp_path / "feeds.npz"
    np.savez(path, **arrays)
    return path


def test_stacked_samples_split_along_batch(tmp_path):
    images = np.arange(5 * 3 * 16, dtype=np.float32).reshape(5, 3, 4, 4)
    path = write_npz(tmp_path, image=images, labels=np.arange(5))
    fs = data.load_feeds(path, image_model(), batch=2)
    assert [f["image"].shape for f in fs.feeds] == [(2, 3, 4, 4), (2, 3, 4, 4), (1, 3, 4, 4)]
    np.testing.assert_array_equal(fs.feeds[2]["image"][0], images[4])
    assert [list(l) for l in fs.labels] == [[0, 1], [2, 3], [4]]


def test_one_more_axis_gives_one_feed_per_index(tmp_path):
    ids = np.ones((3, 2, 7), np.int64)
    path = write_npz(tmp_path, ids=ids, scale=np.array([1.0, 2.0, 3.0], np.float32))
    fs = data.load_feeds(path, token_model())
    assert len(fs.feeds) == 3
    assert fs.feeds[1]["ids"].shape == (2, 7) and fs.feeds[1]["scale"].shape == () and fs.feeds[1]["scale"] == 2.0
    assert all(isinstance(f["scale"], np.ndarray) for f in fs.feeds), "a numpy scalar is not an onnxruntime input"
    outputs = runtime.run_all(token_model(), fs.feeds)
    assert [o["y"].shape for o in outputs] == [(2, 7, 8)] * 3


def test_folder_of_npz_files_is_read_in_name_order(tmp_path):
    for k in (2, 1):
        np.savez(tmp_path / f"part{k}.npz", image=np.full((1, 3, 4, 4), k, np.float32))
    fs = data.load_feeds(tmp_path, image_model())
    assert [float(f["image"][0, 0, 0, 0]) for f in fs.feeds] == [1.0, 2.0]


@pytest.mark.parametrize(
    "arrays, message",
    [
        ({}, "no array for model input 'image'"),
        ({"image": np.zeros((2, 3, 4, 4), np.float64)}, "'image' is float64, the model input wants float32"),
        ({"image": np.zeros((3, 4, 4), np.float32)}, "has rank 3"),
        ({"image": np.zeros((2, 3, 5, 4), np.float32)}, "axis 2 must be 4"),
        ({"image": np.zeros((2, 3, 4, 4), np.float32), "extra": np.zeros(2)}, "array 'extra' is not a model input"),
        ({"image": np.zeros((2, 3, 4, 4), np.float32), "labels": np.zeros(3)}, "`labels` has 3 entries for 2 feeds"),
    ],
)
def test_bad_npz_names_the_input_and_the_fix(tmp_path, arrays, message):
    path = write_npz(tmp_path, **arrays)
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        data.load_feeds(path, image_model())


def test_mismatched_sample_counts_are_refused(tmp_path):
    path = write_npz(tmp_path, ids=np.zeros((3, 7), np.int64), scale=np.zeros(2, np.float32))
    with pytest.raises(UserError, match="different numbers of samples"):
        data.load_feeds(path, token_model())


def test_ignored_arrays_are_allowed(tmp_path):
    path = write_npz(tmp_path, image=np.zeros((2, 3, 4, 4), np.float32), text=np.array(["a", "b"]))
    assert len(data.load_feeds(path, image_model(), ignore=("text",)).feeds) == 2


def test_not_an_npz_is_a_clear_error(tmp_path):
    path = tmp_path / "feeds.npz"
    path.write_bytes(b"not a zip")
    with pytest.raises(UserError, match="not a readable .npz"):
        data.load_feeds(path, image_model())


def test_synthesized_feeds_are_seeded_and_respect_pins_and_gather_bounds():
    model = token_model()
    a = data.synthesize(model, count=2, seed=3, shapes={"seq": [5]})
    b = data.synthesize(model, count=2, seed=3, shapes={"seq": [5]})
    np.testing.assert_array_equal(a.feeds[1]["ids"], b.feeds[1]["ids"])
    assert a.feeds[0]["ids"].shape == (1, 5)
    assert a.feeds[0]["ids"].max() < 50, "indices stay below the Gather table's row count"
    assert a.feeds[0]["scale"].shape == ()
    pinned = data.synthesize(image_model(), count=1, shapes={"image": [2, 3, 4, 4]})
    assert pinned.feeds[0]["image"].shape == (2, 3, 4, 4)


def test_default_symbolic_dims():
    fs = data.synthesize(image_model(), count=1)
    assert fs.feeds[0]["image"].shape == (1, 3, 4, 4)


def test_bad_shape_pins():
    with pytest.raises(UserError, match="expected NAME=DIMS"):
        data.parse_shapes(["image:1x3"])
    with pytest.raises(UserError, match="2 dims given, the input has rank 4"):
        data.synthesize(image_model(), shapes={"image": [1, 3]})
