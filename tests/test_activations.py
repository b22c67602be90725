"""graphopt.activations: intermediate tensors exposed in bounded groups, each (name, feed) exactly once."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper

from graphopt.activations import cut_to, exposure_groups, intermediates
from tests.helpers import make_model, seeded_feeds

WIDTH = 64  # floats per tensor on the batch-1 feeds below: 256 bytes


def _chain(length: int = 6):
    """x [N, 64] -> Relu -> Neg -> Relu -> ... -> y: `length` nodes, tensors t0 .. t{length-2}, then y."""
    ops = ["Relu", "Neg"]
    names = [f"t{k}" for k in range(length - 1)] + ["y"]
    nodes = [helper.make_node(ops[k % 2], ["x" if k == 0 else names[k - 1]], [names[k]], name=f"n{k}") for k in range(length)]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", WIDTH])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", WIDTH])
    return make_model(nodes, [x], [y]), names


def _expected(feed: dict[str, np.ndarray], names: list[str]) -> dict[str, np.ndarray]:
    values, v = {}, feed["x"]
    for k, name in enumerate(names):
        v = np.maximum(v, 0) if k % 2 == 0 else -v
        values[name] = v
    return values


def test_groups_follow_graph_order_and_the_byte_limit():
    model, names = _chain()
    feeds = seeded_feeds(model, dims={"N": 1})
    # 256 bytes each: a 600-byte limit holds two per group; the order given does not matter
    groups = exposure_groups(model, feeds, list(reversed(names)), limit=600)
    assert groups == [names[0:2], names[2:4], names[4:6]]


def test_the_largest_feed_sets_the_estimate():
    model, names = _chain()
    feeds = seeded_feeds(model, dims={"N": 1}) + seeded_feeds(model, n=1, dims={"N": 3})
    # on the 3-row feed each tensor takes 768 bytes: one per group under a 1000-byte limit
    assert exposure_groups(model, feeds, names, limit=1000) == [[n] for n in names]


def test_every_name_and_feed_comes_once_with_its_value():
    model, names = _chain()
    feeds = seeded_feeds(model, n=3, dims={"N": 1})
    seen: dict[tuple[str, int], np.ndarray] = {}
    runs = 0
    for run, values in enumerate(intermediates(model, feeds, ["x", *names], max_bytes=600)):
        runs += 1
        feed_index = run % len(feeds)  # group by group, the feeds in order within each group
        for name, value in values.items():
            assert (name, feed_index) not in seen
            seen[name, feed_index] = value
    assert runs == 4 * len(feeds)  # x and t0 .. y: 7 tensors of 256 bytes, two per group
    assert len(seen) == (1 + len(names)) * len(feeds)
    for k, feed in enumerate(feeds):
        np.testing.assert_array_equal(seen["x", k], feed["x"])
        for name, value in _expected(feed, names).items():
            np.testing.assert_allclose(seen[name, k], value, rtol=1e-6)


def test_a_group_runs_only_the_nodes_it_needs():
    model, names = _chain()
    cut = cut_to(model, names[:2])
    assert [n.name for n in cut.graph.node] == ["n0", "n1"]
    assert [o.name for o in cut.graph.output] == names[:2]
    assert [i.name for i in cut.graph.input] == ["x"]  # the feeds still fit
    assert len(model.graph.node) == 6  # the original is untouched


def test_a_group_keeps_only_the_weights_it_needs():
    w1 = helper.make_tensor("w1", TensorProto.FLOAT, [WIDTH], np.ones(WIDTH, np.float32))
    w2 = helper.make_tensor("w2", TensorProto.FLOAT, [WIDTH], np.ones(WIDTH, np.float32))
    nodes = [helper.make_node("Add", ["x", "w1"], ["a"]), helper.make_node("Mul", ["a", "w2"], ["y"])]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, WIDTH])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, WIDTH])
    model = make_model(nodes, [x], [y], [w1, w2])
    cut = cut_to(model, ["a"])
    assert [t.name for t in cut.graph.initializer] == ["w1"]


def test_data_dependent_sizes_are_measured():
    # NonZero's output size depends on the values: onnx cannot infer it, onnxruntime's profiler reports it
    nodes = [helper.make_node("NonZero", ["x"], ["nz"]), helper.make_node("Cast", ["nz"], ["y"], to=TensorProto.FLOAT)]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, "hits"])
    model = make_model(nodes, [x], [y])
    feeds = [{"x": np.ones((2, 3), np.float32)}]  # 6 hits: nz is int64 [2, 6] (96 bytes), y float [2, 6] (48)
    assert exposure_groups(model, feeds, ["nz", "y"], limit=144) == [["nz", "y"]]
    assert exposure_groups(model, feeds, ["nz", "y"], limit=143) == [["nz"], ["y"]]


def _with_constant():
    nodes = [
        helper.make_node("Constant", [], ["c"], value=helper.make_tensor("v", TensorProto.FLOAT, [WIDTH], np.ones(WIDTH, np.float32))),
        helper.make_node("Add", ["x", "c"], ["a"]),
        helper.make_node("Relu", ["a"], ["y"]),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, WIDTH])  # a and y: 512 bytes each
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, WIDTH])
    return make_model(nodes, [x], [y])


def test_unknown_sizes_count_as_the_largest_known():
    model = _with_constant()
    feeds = seeded_feeds(model)
    # onnxruntime runs no kernel for a Constant: c has no reported size and counts as 512 bytes
    assert exposure_groups(model, feeds, ["c", "a", "y"], limit=1024) == [["c", "a"], ["y"]]


def test_no_known_size_means_one_group():
    model = _with_constant()
    assert exposure_groups(model, [], ["a", "y"], limit=1) == [["a", "y"]]  # no feed to measure on


@pytest.mark.parametrize("max_bytes", [None, 1])
def test_default_limit_and_a_tiny_one_give_the_same_values(max_bytes):
    model, names = _chain()
    feeds = seeded_feeds(model, n=2, dims={"N": 2})
    by_name: dict[str, list[np.ndarray]] = {}
    runs = [dict(values) for values in intermediates(model, feeds, names, max_bytes=max_bytes)]
    for values in runs:
        for name, value in values.items():
            by_name.setdefault(name, []).append(value)
    # default: model weights + feeds, at least 16 MiB -> one group; 1 byte -> one tensor per group
    assert len(runs) == (1 if max_bytes is None else len(names)) * len(feeds)
    for k, feed in enumerate(feeds):
        for name, value in _expected(feed, names).items():
            np.testing.assert_allclose(by_name[name][k], value, rtol=1e-6)


def test_each_dict_is_emptied_when_the_next_is_asked_for():
    """So that a caller's loop variable does not keep one run's values alive through the next run; the
    arrays themselves stay valid for whoever kept them."""
    model, names = _chain()
    feeds = seeded_feeds(model, n=2, dims={"N": 2})
    runs = intermediates(model, feeds, names)
    first = next(runs)
    kept = dict(first)
    second = next(runs)
    assert first == {} and set(kept) == set(second) == set(names)
    assert all(isinstance(v, np.ndarray) and v.size for v in kept.values())
