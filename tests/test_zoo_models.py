"""The structure-only zoo models shipped in the onnx package, given weights, through the lossless pipeline.

onnx/backend/test/data/light/light_*.onnx are AlexNet, DenseNet-121, Inception v1/v2, ResNet-50,
ShuffleNet, SqueezeNet, VGG-19 and ZFNet-512 with their big tensors stripped: each weight is a
`ConstantOfShape(<name>__SHAPE)` node filling 0.02, and the few small tensors left as initializers are
also listed as graph inputs (IR version 3), which makes every one of them an input a caller may override
(graphopt's passes rightly fold none of those).

`materialize` turns such a model into what a modern exporter writes: seeded random weights of sensible
scale as plain initializers (He-normal for Conv/Gemm weights, BatchNormalization scale near 1 and
variance positive, small biases/means), IR version 4 so initializers are not graph inputs, and the
logits before the final Softmax exposed as a second output (a near-uniform softmax over 1,000 classes
would hide errors below the tolerance). Then the lossless preset runs (strict=True) on one feed and the
result must match the original on a feed the pipeline never saw, with the expected rewrites done.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import graphopt
from graphopt import runtime, validate
from graphopt.graph import consumers, producers

LIGHT = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"
SLOW = pytest.mark.skipif(
    not os.environ.get("GRAPHOPT_SLOW_TESTS"),
    reason="VGG-19's 143M weights make the pipeline take over a minute; set GRAPHOPT_SLOW_TESTS=1 to run it",
)
MODELS = ["bvlc_alexnet", "densenet121", "inception_v1", "inception_v2", "resnet50", "shufflenet", "squeezenet", pytest.param("vgg19", marks=SLOW), "zfnet512"]
SHAPE_OPS = ("Unsqueeze", "Reshape")  # a weight may pass through these before the node that uses it
MIN_IR_WITHOUT_INITIALIZER_INPUTS = 4


def _role(name: str, uses: dict) -> tuple[onnx.NodeProto, int] | None:
    """The node (and input index) that uses tensor `name` as a parameter, looking through Unsqueeze/Reshape."""
    readers = uses.get(name, [])
    if len(readers) != 1:
        return None
    node = readers[0]
    if node.op_type in SHAPE_OPS and node.input[0] == name:
        return _role(node.output[0], uses)
    return node, list(node.input).index(name)


def _attribute(node: onnx.NodeProto, name: str, default):
    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


def _ends_residual_branch(node: onnx.NodeProto, uses: dict) -> bool:
    """True for a node whose output is summed with another branch (ResNet/ShuffleNet blocks)."""
    return any(reader.op_type in ("Sum", "Add") and len(reader.input) > 1 for reader in uses.get(node.output[0], []))


def _weight(rng: np.random.Generator, shape: tuple[int, ...], role: tuple[onnx.NodeProto, int] | None, uses: dict) -> np.ndarray:
    """float32 values that keep activations near unit scale through a ReLU network."""
    node, index = role or (None, -1)
    op = node.op_type if node is not None else ""
    size = int(np.prod(shape))
    if (op, index) == ("Conv", 1):
        return _normal(rng, np.sqrt(2 / (size // shape[0])), shape)
    if (op, index) == ("Gemm", 1):
        fan_in = size // shape[0] if _attribute(node, "transB", 0) else shape[0]
        return _normal(rng, np.sqrt(2 / fan_in), shape)
    if (op, index) == ("BatchNormalization", 1) and _ends_residual_branch(node, uses):
        return _uniform(rng, 0.1, 0.2, shape)  # small gamma, as in zero-gamma init: the identity path keeps the scale
    if (op, index) in (("BatchNormalization", 1), ("Mul", 1)):
        return _uniform(rng, 0.8, 1.2, shape)
    if (op, index) == ("BatchNormalization", 4):
        return _uniform(rng, 0.5, 1.5, shape)
    return _normal(rng, 0.1, shape)  # biases, BN means, Add constants


def _normal(rng: np.random.Generator, std: float, shape: tuple[int, ...]) -> np.ndarray:
    return rng.standard_normal(shape, dtype=np.float32) * np.float32(std)


def _uniform(rng: np.random.Generator, low: float, high: float, shape: tuple[int, ...]) -> np.ndarray:
    return rng.random(shape, dtype=np.float32) * np.float32(high - low) + np.float32(low)


def materialize(model: onnx.ModelProto, seed: int = 0) -> onnx.ModelProto:
    """A copy with every ConstantOfShape-made weight and every float initializer replaced by seeded
    values (see `_weight`), initializers dropped from the graph inputs, and the Softmax input exposed."""
    rng = np.random.default_rng(seed)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    uses = consumers(graph)
    inits = {t.name: t for t in graph.initializer}
    stripped = [n for n in graph.node if n.op_type == "ConstantOfShape" and n.input[0] in inits]
    for node in stripped:
        shape = tuple(int(d) for d in numpy_helper.to_array(inits[node.input[0]]))
        graph.initializer.append(numpy_helper.from_array(np.zeros(shape, np.float32), node.output[0]))
        graph.node.remove(node)
    shape_tensors = {n.input[0] for n in stripped}
    kept = [_seeded(rng, t, _role(t.name, uses), uses) for t in graph.initializer if t.name not in shape_tensors]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    names = {t.name for t in kept} | shape_tensors
    interface = [vi for vi in graph.input if vi.name not in names]
    del graph.input[:]
    graph.input.extend(interface)
    out.ir_version = max(out.ir_version, MIN_IR_WITHOUT_INITIALIZER_INPUTS)
    _expose_logits(graph)
    onnx.checker.check_model(out, full_check=True)
    return out


def _seeded(rng: np.random.Generator, tensor: onnx.TensorProto, role, uses: dict) -> onnx.TensorProto:
    """A detached copy of `tensor`, with seeded values if it is float."""
    if tensor.data_type != onnx.TensorProto.FLOAT:
        copy = onnx.TensorProto()
        copy.CopyFrom(tensor)
        return copy
    return numpy_helper.from_array(_weight(rng, tuple(tensor.dims), role, uses), tensor.name)


def _expose_logits(graph: onnx.GraphProto) -> None:
    made_by = producers(graph)
    softmax = made_by.get(graph.output[0].name)
    if softmax is not None and softmax.op_type == "Softmax":
        logits = graph.output.add()
        logits.CopyFrom(graph.output[0])  # Softmax keeps type and shape
        logits.name = softmax.input[0]


def _count(model: onnx.ModelProto, op_type: str) -> int:
    return sum(n.op_type == op_type for n in model.graph.node)


def _conv_bn_pairs(model: onnx.ModelProto) -> int:
    """BatchNormalization nodes reading a Conv output that nothing else reads (fold-batchnorm's case)."""
    made_by, uses = producers(model.graph), consumers(model.graph)
    return sum(
        1
        for n in model.graph.node
        if n.op_type == "BatchNormalization" and (p := made_by.get(n.input[0])) is not None and p.op_type == "Conv" and len(uses[n.input[0]]) == 1
    )


def _constant_unsqueezes(model: onnx.ModelProto) -> int:
    inits = {t.name for t in model.graph.initializer}
    return sum(1 for n in model.graph.node if n.op_type == "Unsqueeze" and all(i in inits for i in n.input if i))


def _feed(model: onnx.ModelProto, seed: int) -> dict[str, np.ndarray]:
    (spec,) = model.graph.input
    shape = [d.dim_value for d in spec.type.tensor_type.shape.dim]
    return {spec.name: np.random.default_rng(seed).standard_normal(shape).astype(np.float32)}


def _records(report) -> str:
    return "\n".join(f"  {r.name} (round {r.round}): {r.status}{': ' + r.reason if r.reason else ''} {r.counts or ''}" for r in report.records)


@pytest.fixture(scope="module", params=MODELS)
def zoo_model(request) -> tuple[str, onnx.ModelProto]:
    """light_<name>.onnx with seeded weights: data_0 -> ...Conv/BN/Relu/Pool... -> Gemm -> Softmax -> prob (+ logits)."""
    return request.param, materialize(onnx.load(str(LIGHT / f"light_{request.param}.onnx")))


def test_materialize_gives_weights_of_unit_scale_activations(zoo_model):
    name, model = zoo_model
    assert _count(model, "ConstantOfShape") == 0
    original = onnx.load(str(LIGHT / f"light_{name}.onnx")).graph
    assert [i.name for i in model.graph.input] == [i.name for i in original.input if i.name not in {t.name for t in original.initializer}]
    (outputs,) = runtime.run_all(model, [_feed(model, 0)])
    logits = outputs[model.graph.output[-1].name]
    assert np.isfinite(logits).all(), name
    assert 0.1 < np.std(logits) < 100, f"{name}: logits std {np.std(logits):.3g}; weight scales do not keep activations near unit scale"


def test_lossless_pipeline_on_zoo_model(zoo_model):
    name, model = zoo_model
    result = graphopt.optimize(model, data=[_feed(model, 0)], strict=True)
    optimized, report = result.model, result.report
    records = _records(report)

    problems = [r for r in report.records if r.status in ("rolled back", "failed")]
    assert not problems, f"{name}: a lossless pass was rolled back or failed on a standard CNN:\n{records}"
    assert len(optimized.graph.node) <= len(model.graph.node), f"{name}: nodes {len(model.graph.node)} -> {len(optimized.graph.node)}\n{records}"
    assert _count(optimized, "BatchNormalization") <= _count(model, "BatchNormalization") - _conv_bn_pairs(model), f"{name}: Conv -> BatchNormalization left unfolded\n{records}"
    assert _count(optimized, "Dropout") == 0, f"{name}: inference-mode Dropout left in place\n{records}"
    assert _constant_unsqueezes(optimized) == 0, f"{name}: Unsqueeze of an initializer left unfolded\n{records}"

    unseen = [_feed(model, 1)]
    reference = runtime.run_all(model, unseen)
    diffs = validate.compare(reference, runtime.run_all(optimized, unseen))
    max_abs, max_rel = validate.worst(diffs)
    problem = validate.lossless_violation(diffs, reference)
    assert problem is None, f"{name}: on a feed the pipeline never saw, {problem} (max abs {max_abs:.3g}, max rel {max_rel:.3g})\n{records}"
    print(f"{name}: nodes {len(model.graph.node)} -> {len(optimized.graph.node)}, unseen feed max abs {max_abs:.3g}, max rel {max_rel:.3g}")
