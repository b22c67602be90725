"""fold-batchnorm: fold per-channel affine maps into the weights and bias of the linear node before them.

Rewrites (a chain is followed as long as each step folds; in every graph, If/Loop/Scan bodies included):
  Conv -> BatchNormalization => Conv with folded weights and bias (bias input created if absent)
  ConvTranspose -> BatchNormalization => ConvTranspose with folded weights and bias (group-aware)
  Gemm -> BatchNormalization => Gemm with folded B (transB respected) and C (created if absent; beta set to 1)
  MatMul(x, W 2-D constant) -> BatchNormalization, rank-2 output => MatMul(x, W') -> Add(bias)
  Conv/ConvTranspose/Gemm/MatMul -> Mul(per-channel constant) => same node with the constant folded in W (and bias)
  Conv/ConvTranspose/Gemm -> Add(per-channel constant) => same node with the constant folded in the bias
  MatMul -> Add(per-channel constant) is the MatMul's bias: later BN/Mul/Add steps fold into W and that constant
A constant is per-channel when, right-aligned to the output's rank, every axis but the channel axis (1; the
last for MatMul) is 1 and it adds no axes; scalars qualify. Folding is computed in float64 and cast back.

Refused (named in `refused`, chain left as it is from there):
  the producer's output has other readers or is a graph output (the unfolded value is still needed)
  weight or bias is not an initializer of the graph (e.g. a graph input or Constant node output: run
    lift-constants first), or is shared with another node (refused rather than copied: a copy would
    duplicate the weight; fold-shared-weights may have merged it on purpose)
  the Mul/Add constant does not broadcast per output channel, or its rank cannot be checked against the
    MatMul output's (unknown rank)
  BatchNormalization in training mode (more than one output, training_mode=1, or spatial=0)
  BatchNormalization after MatMul whose output rank is not 2 (its channel axis 1 is not the feature axis)
  non-float weights or constants (integer or quantized arithmetic would not be exact)
BN parameters and Mul/Add constants left unused are removed here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from graphopt.graph import (
    STANDARD_DOMAINS,
    NameGenerator,
    constant_names,
    consumers,
    iter_graphs,
    output_names,
    remove_nodes,
    replace_tensor,
)
from graphopt.shapes import inferred_shapes
from graphopt.passes_base import Pass, PassContext, PassResult, register

ANCHORS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
FLOAT_TYPES = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16)


class _Refused(Exception):
    """A matched step that cannot fold; the message says why."""


@dataclass
class _Affine:
    """y = x * scale + shift along the output channels (None: identity part)."""

    scale: np.ndarray | None
    shift: np.ndarray | None


@dataclass
class _Unit:
    """A linear node (and, for MatMul, the Add holding its bias) whose output channels can absorb an affine map."""

    main: onnx.NodeProto
    bias_add: onnx.NodeProto | None = None

    @property
    def output(self) -> str:
        return (self.bias_add or self.main).output[0]


class _Ranks:
    """Tensor ranks from onnx shape inference, inferred once per run and only if a MatMul needs them.

    The rewrites keep every tensor's shape, so ranks inferred before some of them stay true."""

    def __init__(self, model: onnx.ModelProto):
        self._model = model
        self._shapes: dict[str, list[int | None]] | None = None

    def __call__(self, name: str) -> int | None:
        if self._shapes is None:
            self._shapes = inferred_shapes(self._model)
        shape = self._shapes.get(name)
        return None if shape is None else len(shape)


@dataclass
class _GraphState:
    """One graph being rewritten: its readers map, kept current across renames, and its constants."""

    graph: onnx.GraphProto
    rank: _Ranks
    readers: dict[str, list[onnx.NodeProto]]
    constants: set[str]
    orphan_candidates: set[str] = field(default_factory=set)

    def value(self, name: str) -> np.ndarray | None:
        return numpy_helper.to_array(_initializer(self.graph, name)) if name in self.constants else None

    def exclusive(self, name: str, node: onnx.NodeProto) -> bool:
        readers = self.readers.get(name, [])
        return len(readers) == 1 and readers[0] is node and name not in output_names(self.graph)


@register
@dataclass
class FoldBatchNorm(Pass):
    name = "fold-batchnorm"
    description = "fold BatchNormalization and per-channel Mul/Add constants into the Conv/Gemm/MatMul before them"
    lossless = True

    def run(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        counts = {"batchnorms_folded": 0, "muls_folded": 0, "adds_folded": 0}
        refused: list[str] = []
        names, ranks = NameGenerator(model), _Ranks(model)
        for graph in list(iter_graphs(model.graph)):
            state = _GraphState(graph, ranks, consumers(graph), constant_names(graph))
            for node in list(graph.node):
                if node.op_type in ANCHORS and node.domain in STANDARD_DOMAINS:
                    _fold_chain(state, _Unit(node), names, counts, refused)
            _remove_orphans(state)
        return PassResult(changed=any(counts.values()), counts=counts, refused=refused)


def _describe(node: onnx.NodeProto) -> str:
    return f"{node.op_type} '{node.name or node.output[0]}'"


def _fold_chain(state: _GraphState, unit: _Unit, names: NameGenerator, counts: dict, refused: list[str]) -> None:
    """Fold the BN/Mul/Add steps that follow `unit`, one at a time, until one does not match or is refused.

    A MatMul of two computed tensors (attention scores) has no weight to fold into: not a match."""
    if unit.main.op_type == "MatMul" and unit.main.input[1] not in state.constants:
        return
    while True:
        follower = _follower(state, unit)
        if follower is None:
            return
        try:
            _check_readers(state, unit)
            kind = _fold_step(state, unit, follower, names)
        except _Refused as why:
            refused.append(f"{_describe(unit.main)} -> {_describe(follower)}: {why}")
            return
        if kind:
            counts[kind] += 1


def _follower(state: _GraphState, unit: _Unit) -> onnx.NodeProto | None:
    """The first reader of the unit's output that is a BN or a Mul/Add with a constant, if any."""
    for node in state.readers.get(unit.output, []):
        if node.domain not in STANDARD_DOMAINS:
            continue
        if node.op_type == "BatchNormalization" and node.input[0] == unit.output:
            return node
        if node.op_type in ("Mul", "Add") and _constant_operand(state, node, unit.output) is not None:
            return node
    return None


def _constant_operand(state: _GraphState, node: onnx.NodeProto, data: str) -> str | None:
    """The constant input of a binary Mul/Add whose other input is `data`."""
    if len(node.input) != 2:
        return None
    a, b = node.input
    if a == data and b in state.constants:
        return b
    if b == data and a in state.constants:
        return a
    return None


def _check_readers(state: _GraphState, unit: _Unit) -> None:
    """Folding changes the unit's output, so nothing but the follower may read it."""
    out = unit.output
    readers = state.readers.get(out, [])
    if out in output_names(state.graph):
        raise _Refused(f"'{out}' is also a graph output, so its unfolded value is still needed")
    if len(readers) > 1:
        raise _Refused(f"'{out}' has {len(readers)} readers, so its unfolded value is still needed")


def _fold_step(state: _GraphState, unit: _Unit, follower: onnx.NodeProto, names: NameGenerator) -> str | None:
    """Fold `follower` into `unit`; returns the count it adds to (None: absorbed as the MatMul's bias)."""
    layout = _Layout.of(state, unit.main)
    if follower.op_type == "BatchNormalization":
        affine = _batchnorm_affine(state, follower, layout)
        kind = "batchnorms_folded"
    else:
        vector = _per_channel(state, layout, _constant_operand(state, follower, unit.output))
        kind = "muls_folded" if follower.op_type == "Mul" else "adds_folded"
        affine = _Affine(vector, None) if follower.op_type == "Mul" else _Affine(None, vector)
        if unit.main.op_type == "MatMul" and unit.bias_add is None and affine.scale is None:
            unit.bias_add = follower
            return None
    _check_weight(state, unit.main, layout)
    if unit.main.op_type == "MatMul" and unit.bias_add is None and affine.shift is not None:
        _batchnorm_to_bias_add(state, unit, follower, affine, layout, names)
        return kind
    _fold_into_weights(state, unit, affine, layout, names)
    _drop_follower(state, unit, follower)
    return kind


@dataclass
class _Layout:
    """Where the output channels of an anchor live: weight, count, output rank and channel axis."""

    weight: np.ndarray
    weight_type: int
    channels: int
    rank: int | None
    axis: int  # channel axis of the output (negative counts from the end)

    @staticmethod
    def of(state: _GraphState, main: onnx.NodeProto) -> _Layout:
        name = main.input[1]
        weight = state.value(name)
        if weight is None:
            raise _Refused(f"weight '{name}' is not an initializer of this graph (lift-constants turns Constant nodes into initializers)")
        weight_type = _initializer(state.graph, name).data_type
        attrs = _attributes(main)
        op = main.op_type
        if op == "Conv":
            return _Layout(weight, weight_type, weight.shape[0], weight.ndim, 1)
        if op == "ConvTranspose":
            return _Layout(weight, weight_type, weight.shape[1] * attrs.get("group", 1), weight.ndim, 1)
        if op == "Gemm":
            return _Layout(weight, weight_type, weight.shape[0 if attrs.get("transB", 0) else 1], 2, 1)
        if weight.ndim != 2:
            raise _Refused(f"MatMul weight '{name}' has rank {weight.ndim}, not 2")
        return _Layout(weight, weight_type, weight.shape[1], state.rank(main.input[0]), -1)


def _check_weight(state: _GraphState, main: onnx.NodeProto, layout: _Layout) -> None:
    name = main.input[1]
    if layout.weight_type not in FLOAT_TYPES:
        raise _Refused(f"weight '{name}' is {TensorProto.DataType.Name(layout.weight_type)}, not a float type")
    if not state.exclusive(name, main):
        raise _Refused(f"weight '{name}' is shared with other nodes (refused rather than copied)")


def _batchnorm_affine(state: _GraphState, bn: onnx.NodeProto, layout: _Layout) -> _Affine:
    attrs = _attributes(bn)
    if len([o for o in bn.output if o]) != 1 or attrs.get("training_mode", 0) or not attrs.get("spatial", 1):
        raise _Refused("BatchNormalization is in training mode (extra outputs, training_mode=1 or spatial=0)")
    if layout.axis == -1 and layout.rank != 2:
        raise _Refused(
            f"MatMul output has rank {layout.rank or 'unknown'}: BatchNormalization's channel axis 1 "
            "is not the MatMul's feature axis (the last) unless the rank is 2"
        )
    params = []
    for name in bn.input[1:5]:
        value = state.value(name)
        if value is None:
            raise _Refused(f"BatchNormalization parameter '{name}' is not an initializer of this graph")
        if value.shape != (layout.channels,):
            raise _Refused(f"BatchNormalization parameter '{name}' has shape {list(value.shape)}, expected [{layout.channels}]")
        _require_float(state, name)
        params.append(value.astype(np.float64))
    scale, bias, mean, var = params
    factor = scale / np.sqrt(var + attrs.get("epsilon", 1e-5))
    state.orphan_candidates.update(bn.input[1:5])
    return _Affine(factor, bias - mean * factor)


def _per_channel(state: _GraphState, layout: _Layout, name: str) -> np.ndarray:
    """The constant `name` as a float64 vector over the output channels, or refuse."""
    _require_float(state, name)
    value = state.value(name)
    rank = layout.rank
    if rank is None:
        if value.ndim > 1:
            raise _Refused(f"constant '{name}' has rank {value.ndim} and the MatMul output's rank is unknown")
        rank = 1
    if value.ndim > rank:
        raise _Refused(f"constant '{name}' of shape {list(value.shape)} would broadcast the rank-{rank} output")
    padded = value.reshape((1,) * (rank - value.ndim) + value.shape)
    axis = layout.axis % rank
    across = [d for k, d in enumerate(padded.shape) if k != axis]
    if any(d != 1 for d in across) or padded.shape[axis] not in (1, layout.channels):
        raise _Refused(
            f"constant '{name}' of shape {list(value.shape)} is not per-channel "
            f"({layout.channels} channels on axis {axis} of the rank-{rank} output)"
        )
    state.orphan_candidates.add(name)
    return np.broadcast_to(padded.reshape(-1).astype(np.float64), (layout.channels,))


def _require_float(state: _GraphState, name: str) -> None:
    data_type = _initializer(state.graph, name).data_type
    if data_type not in FLOAT_TYPES:
        raise _Refused(f"'{name}' is {TensorProto.DataType.Name(data_type)}, not a float type")


def _fold_into_weights(state: _GraphState, unit: _Unit, affine: _Affine, layout: _Layout, names: NameGenerator) -> None:
    """Scale the weight's output channels and rewrite the bias (checked before anything is written)."""
    main = unit.main
    bias_name, bias_owner = _bias_slot(unit)
    bias = None
    if bias_name:
        bias = state.value(bias_name)
        if bias is None:
            raise _Refused(f"bias '{bias_name}' is not an initializer of this graph")
        _require_float(state, bias_name)
        if not state.exclusive(bias_name, bias_owner):
            raise _Refused(f"bias '{bias_name}' is shared with other nodes (refused rather than copied)")
    weight = layout.weight.astype(np.float64)
    if affine.scale is not None:
        weight = _scale_weight(main, weight, affine.scale)
        _set_initializer(state.graph, main.input[1], weight, layout.weight_type)
    if bias is None and affine.shift is None:
        return
    new_bias = _new_bias(main, unit, bias, affine, layout)
    if bias_name:
        _set_initializer(state.graph, bias_name, new_bias, layout.weight_type)
    else:
        _add_bias_input(state, main, new_bias, layout.weight_type, names)
    if main.op_type == "Gemm":
        _set_attribute(main, "beta", 1.0)


def _bias_slot(unit: _Unit) -> tuple[str | None, onnx.NodeProto]:
    """The name of the tensor holding the unit's bias (None when there is none yet) and the node reading it."""
    if unit.bias_add is not None:
        add = unit.bias_add
        data = unit.main.output[0]
        return (add.input[1] if add.input[0] == data else add.input[0]), add
    slot = 2
    name = unit.main.input[slot] if len(unit.main.input) > slot and unit.main.input[slot] else None
    return name, unit.main


def _scale_weight(main: onnx.NodeProto, weight: np.ndarray, scale: np.ndarray) -> np.ndarray:
    op = main.op_type
    if op == "Conv":
        return weight * scale.reshape((-1,) + (1,) * (weight.ndim - 1))
    if op == "ConvTranspose":
        group = _attributes(main).get("group", 1)
        grouped = weight.reshape((group, weight.shape[0] // group) + weight.shape[1:])
        per_group = scale.reshape((group, 1, weight.shape[1]) + (1,) * (weight.ndim - 2))
        return (grouped * per_group).reshape(weight.shape)
    if op == "Gemm" and _attributes(main).get("transB", 0):
        return weight * scale[:, None]
    return weight * scale[None, :]


def _new_bias(main: onnx.NodeProto, unit: _Unit, bias: np.ndarray | None, affine: _Affine, layout: _Layout) -> np.ndarray:
    """The bias after the affine map; Gemm's beta is folded in (it is set to 1 afterwards).

    Every bias broadcasts along the output's channel axis, which is its last axis (Conv bias is 1-D,
    Gemm C and MatMul's Add constant are right-aligned to the output), so per-channel vectors broadcast
    against it directly."""
    scale = np.ones(layout.channels) if affine.scale is None else affine.scale
    shift = np.zeros(layout.channels) if affine.shift is None else affine.shift
    if bias is None:
        return shift.copy()
    current = bias.astype(np.float64)
    if main.op_type == "Gemm":
        current = current * _attributes(main).get("beta", 1.0)
    return current * scale + shift


def _batchnorm_to_bias_add(
    state: _GraphState, unit: _Unit, follower: onnx.NodeProto, affine: _Affine, layout: _Layout, names: NameGenerator
) -> None:
    """MatMul without a bias -> BN: scale W, and turn the BN node into the Add of the shift."""
    if affine.scale is not None:
        weight = _scale_weight(unit.main, layout.weight.astype(np.float64), affine.scale)
        _set_initializer(state.graph, unit.main.input[1], weight, layout.weight_type)
    bias_name = names(f"{unit.main.name or unit.main.output[0]}_bias")
    state.graph.initializer.append(numpy_helper.from_array(_cast(affine.shift, layout.weight_type), bias_name))
    for name in follower.input:
        state.readers[name] = [r for r in state.readers.get(name, []) if r is not follower]
    follower.op_type = "Add"
    del follower.attribute[:]
    follower.input[:] = [unit.output, bias_name]
    state.readers[bias_name] = [follower]
    state.constants.add(bias_name)
    unit.bias_add = follower


def _drop_follower(state: _GraphState, unit: _Unit, follower: onnx.NodeProto) -> None:
    """Remove the folded node and route its readers to the unit's output (which takes its name if it is a graph output)."""
    old, new = follower.output[0], unit.output
    for name in follower.input:
        state.readers[name] = [r for r in state.readers.get(name, []) if r is not follower]
    remove_nodes(state.graph, [follower])
    replace_tensor(state.graph, old, new)
    moved = state.readers.pop(old, [])
    if old in output_names(state.graph):
        state.readers.pop(new, None)
        state.readers[old] = moved
    else:
        state.readers[new] = moved


def _add_bias_input(state: _GraphState, main: onnx.NodeProto, bias: np.ndarray, data_type: int, names: NameGenerator) -> None:
    name = names(f"{main.name or main.output[0]}_bias")
    state.graph.initializer.append(numpy_helper.from_array(_cast(bias, data_type), name))
    if len(main.input) == 2:
        main.input.append(name)
    else:
        main.input[2] = name
    state.readers[name] = [main]
    state.constants.add(name)


def _remove_orphans(state: _GraphState) -> None:
    """Drop the BN parameters and Mul/Add constants this pass stopped reading, if nothing else reads them."""
    if not state.orphan_candidates:
        return
    still_read = set(consumers(state.graph)) | output_names(state.graph) | {i.name for i in state.graph.input}
    doomed = [t for t in state.graph.initializer if t.name in state.orphan_candidates and t.name not in still_read]
    for t in doomed:
        state.graph.initializer.remove(t)


def _initializer(graph: onnx.GraphProto, name: str) -> onnx.TensorProto:
    return next(t for t in graph.initializer if t.name == name)


def _set_initializer(graph: onnx.GraphProto, name: str, value: np.ndarray, data_type: int) -> None:
    _initializer(graph, name).CopyFrom(numpy_helper.from_array(_cast(value, data_type), name))


def _cast(value: np.ndarray, data_type: int) -> np.ndarray:
    return np.ascontiguousarray(value).astype(helper.tensor_dtype_to_np_dtype(data_type))


def _attributes(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _set_attribute(node: onnx.NodeProto, name: str, value: float) -> None:
    for k, attr in enumerate(node.attribute):
        if attr.name == name:
            del node.attribute[k]
            break
    node.attribute.append(helper.make_attribute(name, value))
