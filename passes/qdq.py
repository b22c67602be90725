"""The vocabulary the quantize-* passes share: weight lookup, integer formats, Q/DQ nodes, opset upgrades.

Not a pass. Conventions:
- Weights are symmetric (zero point 0), int8 per output channel: `WEIGHT_AXIS` says which axis is the
  output channel for each op (Conv 0, ConvTranspose 1, Gemm 0 with transB=1 else 1, MatMul the last axis).
- Activations are asymmetric, uint8 or int8, with a float range that always contains 0 so that zero (padding,
  ReLU's floor) is exact.
- int4 values are packed two per byte, the first value in the low nibble (ONNX's INT4 layout, and
  com.microsoft MatMulNBits' layout within a block).
- Per-axis DequantizeLinear needs opset 13, blocked DequantizeLinear and 4-bit types need opset 21;
  `ensure_opset` upgrades a model with onnx's version converter and says what it did.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper, version_converter

from graphopt import validate
from graphopt.errors import UserError
from graphopt.graph import NameGenerator, STANDARD_DOMAINS, constant_value, default_opset

# Integer types a quantized weight is stored in.
WEIGHT_INTEGER_TYPES = frozenset({TensorProto.INT4, TensorProto.UINT4, TensorProto.INT8, TensorProto.UINT8})


def restores_weight(node: onnx.NodeProto, integer_constants: set[str]) -> bool:
    """Whether `node` turns a quantized weight back into floats: a DequantizeLinear, or a Cast of an integer
    constant (quantize-weights' folded form, which onnxruntime expands when it loads the model)."""
    return node.op_type == "DequantizeLinear" or (node.op_type == "Cast" and node.input[0] in integer_constants)


def integer_weights(graph: onnx.GraphProto) -> set[str]:
    """Initializers of graph `graph` stored in a weight integer type."""
    return {t.name for t in graph.initializer if t.data_type in WEIGHT_INTEGER_TYPES}


# Ops onnxruntime's CPU provider turns into integer kernels when wrapped in DequantizeLinear (inputs) and
# QuantizeLinear (output), and the kernel it makes.
FUSED_OPS = {
    "Conv": "QLinearConv",
    "MatMul": "QLinearMatMul / MatMulIntegerToFloat",
    "Gemm": "QGemm",
    "Add": "QLinearAdd",
    "Mul": "QLinearMul",
    "Concat": "QLinearConcat",
    "Sigmoid": "QLinearSigmoid",
    "LeakyRelu": "QLinearLeakyRelu",
    "AveragePool": "QLinearAveragePool",
    "GlobalAveragePool": "QLinearGlobalAveragePool",
    "Where": "QLinearWhere",
}

# Ops that only move or select values: onnxruntime drops the DequantizeLinear/QuantizeLinear pair around
# them when both use the same scale and zero point, so they pass quantized tensors through.
DATA_MOVEMENT_OPS = frozenset(
    {"Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "MaxPool", "Resize", "Slice", "Gather", "Expand", "Split", "Identity"}
)

PER_AXIS_OPSET = 13
BLOCKED_OPSET = 21


def weight_axis(node: onnx.NodeProto, rank: int) -> int | None:
    """The output-channel axis of the weight input (input 1) of `node`, or None if it has no such weight."""
    if node.op_type == "Conv":
        return 0
    if node.op_type == "ConvTranspose":
        return 1
    if node.op_type == "Gemm":
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return 0 if trans_b else 1
    if node.op_type == "MatMul" and rank >= 2:
        return rank - 1
    return None


def weight(graph: onnx.GraphProto, name: str, made_by: dict[str, onnx.NodeProto] | None = None) -> np.ndarray | None:
    """The value of a float weight: an initializer no graph input overrides, or (given the graph's
    producers `made_by`) a Constant node's `value` tensor. None when `name` is computed or not float."""
    value = constant_value(graph, name)
    node = (made_by or {}).get(name)
    if value is None and node is not None and node.op_type == "Constant" and node.domain in STANDARD_DOMAINS:
        value = next((numpy_helper.to_array(a.t) for a in node.attribute if a.name == "value" and a.type == onnx.AttributeProto.TENSOR), None)
    if value is None or value.dtype.kind != "f":
        return None
    return value


@dataclass(frozen=True)
class KeepFloat:
    """The nodes a user keeps float (the quantize passes' `keep_float` option): a regular expression
    searched in each node's name, or in its first output's name when it has none. Empty: no node."""

    pattern: str = ""

    def __post_init__(self) -> None:
        try:
            re.compile(self.pattern)
        except re.error as exc:
            raise UserError(f"keep_float {self.pattern!r} is not a regular expression ({exc}); it is searched in node names, e.g. keep_float=^/model\\.0/") from None

    def __call__(self, node: onnx.NodeProto) -> bool:
        label = node.name or (node.output[0] if node.output else "")
        return bool(self.pattern) and re.search(self.pattern, label) is not None

    def reason(self) -> str:
        return f"keep_float {self.pattern!r} matches it"

    def unmatched_note(self, matched: int) -> list[str]:
        """A note when the option is set but kept no node (a typo, or nodes this pass does not quantize)."""
        return [f"keep_float {self.pattern!r} matched no node this pass quantizes"] if self.pattern and not matched else []


@dataclass
class QuantizedWeight:
    """Integers and scales of a weight; `zero_point` is None for symmetric formats."""

    values: np.ndarray  # int8 / uint8 / int4-in-int8 values (unpacked), same shape as the float weight
    scale: np.ndarray  # float32, one per channel (or per block, see block_size)
    axis: int | None
    bits: int = 8
    block_size: int = 0
    zero_point: np.ndarray | None = None

    def dequantized(self) -> np.ndarray:
        scale = self.scale
        zero = self.zero_point if self.zero_point is not None else np.zeros_like(scale)
        if self.block_size:
            scale = np.repeat(scale, self.block_size, axis=self.axis).take(range(self.values.shape[self.axis]), axis=self.axis)
            zero = np.repeat(zero, self.block_size, axis=self.axis).take(range(self.values.shape[self.axis]), axis=self.axis)
        elif self.axis is not None:
            shape = [1] * self.values.ndim
            shape[self.axis] = -1
            scale, zero = scale.reshape(shape), zero.reshape(shape)
        return ((self.values.astype(np.float32) - zero.astype(np.float32)) * scale).astype(np.float32)


def quantize_per_channel(w: np.ndarray, axis: int | None, bits: int = 8) -> QuantizedWeight:
    """Symmetric quantization, one scale per slice along `axis` (per tensor when axis is None).
    The integer range is [-(2^(bits-1) - 1), 2^(bits-1) - 1]: dropping -128 keeps it symmetric."""
    qmax = 2 ** (bits - 1) - 1
    if axis is None:
        amax = np.array(np.abs(w).max() if w.size else 0.0, dtype=np.float32)
    else:
        other = tuple(i for i in range(w.ndim) if i != axis)
        amax = np.abs(w).max(axis=other) if w.size else np.zeros(w.shape[axis], np.float32)
    scale = np.where(amax > 0, amax / qmax, 1.0).astype(np.float32)
    shaped = scale if axis is None else scale.reshape([-1 if i == axis else 1 for i in range(w.ndim)])
    values = np.clip(np.rint(w / shaped), -qmax, qmax).astype(np.int8)
    return QuantizedWeight(values, scale, axis, bits)


def quantize_blockwise(w: np.ndarray, axis: int, block_size: int, bits: int = 4, symmetric: bool = True) -> QuantizedWeight:
    """Quantization with one scale (and zero point if asymmetric) per `block_size` run along `axis`
    (the reduction axis, e.g. K of a MatMul weight [K, N] is axis 0). A last partial block is allowed.
    Symmetric values are signed in [-(2^(bits-1)), 2^(bits-1) - 1]; asymmetric ones unsigned in [0, 2^bits - 1]."""
    length = w.shape[axis]
    blocks = -(-length // block_size)
    padded_len = blocks * block_size
    moved = np.moveaxis(w, axis, 0).astype(np.float32)
    padded = np.zeros((padded_len,) + moved.shape[1:], np.float32)
    padded[:length] = moved
    grouped = padded.reshape((blocks, block_size) + moved.shape[1:])
    if symmetric:
        qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        amax = np.abs(grouped).max(axis=1)
        scale = np.where(amax > 0, amax / -qmin, 1.0).astype(np.float32)
        zero = None
        q = np.clip(np.rint(grouped / scale[:, None]), qmin, qmax)
    else:
        qmin, qmax = 0, 2**bits - 1
        lo, hi = np.minimum(grouped.min(axis=1), 0), np.maximum(grouped.max(axis=1), 0)
        scale = np.where(hi > lo, (hi - lo) / qmax, 1.0).astype(np.float32)
        zero = np.clip(np.rint(-lo / scale), qmin, qmax)
        q = np.clip(np.rint(grouped / scale[:, None]) + zero[:, None], qmin, qmax)
        zero = np.moveaxis(zero.astype(np.uint8), 0, axis)
    values = q.reshape((padded_len,) + moved.shape[1:])[:length]
    values = np.moveaxis(values, 0, axis).astype(np.int8 if symmetric else np.uint8)
    return QuantizedWeight(values, np.moveaxis(scale, 0, axis), axis, bits, block_size, zero)


def activation_params(lo: float, hi: float, dtype: type = np.uint8) -> tuple[np.float32, np.integer]:
    """Scale and zero point mapping the float range [lo, hi] (widened to contain 0) onto uint8 or int8."""
    info = np.iinfo(dtype)
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    if hi - lo < 1e-12:
        hi = lo + 1e-6
    scale = (hi - lo) / (info.max - info.min)
    zero = int(np.clip(round(info.min - lo / scale), info.min, info.max))
    return np.float32(scale), dtype(zero)


def pack_int4(values: np.ndarray) -> np.ndarray:
    """Flattened 4-bit values (int8 in [-8, 7] or uint8 in [0, 15]) packed two per byte, first in the low
    nibble; an odd count is padded with 0."""
    flat = (np.asarray(values).reshape(-1).astype(np.int16) & 0x0F).astype(np.uint8)
    if flat.size % 2:
        flat = np.append(flat, np.uint8(0))
    return (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8)


def unpack_int4(packed: np.ndarray, count: int, signed: bool = True) -> np.ndarray:
    """The inverse of `pack_int4`: `count` values, sign-extended when `signed`."""
    packed = np.asarray(packed, dtype=np.uint8).reshape(-1)
    nibbles = np.empty(packed.size * 2, np.uint8)
    nibbles[0::2], nibbles[1::2] = packed & 0x0F, packed >> 4
    nibbles = nibbles[:count]
    if signed:
        return np.where(nibbles >= 8, nibbles.astype(np.int16) - 16, nibbles).astype(np.int8)
    return nibbles


def int_tensor(name: str, values: np.ndarray, bits: int = 8) -> TensorProto:
    """An initializer holding integer values; bits=4 stores INT4/UINT4 (packed by onnx)."""
    values = np.asarray(values)
    if bits == 4:
        kind = TensorProto.INT4 if values.dtype.kind == "i" else TensorProto.UINT4
        return helper.make_tensor(name, kind, list(values.shape), pack_int4(values).tobytes(), raw=True)
    return numpy_helper.from_array(values, name)


def float_tensor(name: str, values: np.ndarray) -> TensorProto:
    return numpy_helper.from_array(np.asarray(values, dtype=np.float32), name)


class QdqBuilder:
    """Adds Q/DQ nodes and their parameter initializers to one graph. `names` is the model's one
    NameGenerator (names must be unique across subgraphs too)."""

    def __init__(self, graph: onnx.GraphProto, names: NameGenerator):
        self.graph = graph
        self.names = names
        self.new_nodes: list[onnx.NodeProto] = []

    def initializer(self, hint: str, tensor_or_array) -> str:
        name = self.names(hint)
        tensor = tensor_or_array if isinstance(tensor_or_array, TensorProto) else numpy_helper.from_array(np.asarray(tensor_or_array), name)
        tensor.name = name
        self.graph.initializer.append(tensor)
        return name

    def dequantize(self, hint: str, quantized: str, scale: str, zero_point: str | None, axis: int | None = None, block_size: int = 0) -> str:
        """A DequantizeLinear node; returns its float output's name."""
        out = self.names(f"{hint}_dq")
        attrs = {}
        if axis is not None:
            attrs["axis"] = axis
        if block_size:
            attrs["block_size"] = block_size
        inputs = [quantized, scale] + ([zero_point] if zero_point else [])
        self.new_nodes.append(helper.make_node("DequantizeLinear", inputs, [out], name=self.names(f"{hint}_DequantizeLinear"), **attrs))
        return out

    def quantize(self, hint: str, tensor: str, scale: str, zero_point: str) -> str:
        """A QuantizeLinear node; returns its integer output's name."""
        out = self.names(f"{hint}_q")
        self.new_nodes.append(helper.make_node("QuantizeLinear", [tensor, scale, zero_point], [out], name=self.names(f"{hint}_QuantizeLinear")))
        return out

    def weight(self, hint: str, q: QuantizedWeight) -> str:
        """Initializers for a quantized weight and the DequantizeLinear that restores it; returns the float name."""
        values = self.initializer(f"{hint}_quantized", int_tensor(f"{hint}_quantized", q.values, q.bits))
        scale = self.initializer(f"{hint}_scale", float_tensor("", q.scale))
        zero = None
        if q.zero_point is not None:
            zero = self.initializer(f"{hint}_zero_point", int_tensor("", q.zero_point, q.bits))
        elif q.axis is not None or q.bits == 4:
            zero = self.initializer(f"{hint}_zero_point", int_tensor("", np.zeros(q.scale.shape, np.int8), q.bits))
        return self.dequantize(hint, values, scale, zero, q.axis if (q.axis is not None and q.scale.ndim > 0) else None, q.block_size)

    def insert_before(self, anchor: onnx.NodeProto | None = None) -> None:
        """Put the new nodes into the graph before `anchor` (at the front when None); the graph stays
        topologically sorted as long as the new nodes read only values defined before `anchor`."""
        nodes = list(self.graph.node)
        at = next(i for i, n in enumerate(nodes) if n is anchor) if anchor is not None else 0
        nodes[at:at] = self.new_nodes
        del self.graph.node[:]
        self.graph.node.extend(nodes)
        self.new_nodes = []


def ensure_opset(model: onnx.ModelProto, version: int) -> str | None:
    """Upgrade the default-domain opset to at least `version` in place (onnx's version converter, which
    rewrites ops whose signature changed). Returns a sentence for the report when it upgraded."""
    current = default_opset(model) or 1
    if current >= version:
        return None
    upgraded = version_converter.convert_version(model, version)
    model.CopyFrom(upgraded)
    for opset in model.opset_import:
        if opset.domain in STANDARD_DOMAINS:
            opset.version = max(opset.version, version)
    if version >= BLOCKED_OPSET and model.ir_version < 10:
        model.ir_version = 10  # opset 21 and 4-bit types belong to IR version 10
    return f"upgraded the opset from {current} to {version}"


def ensure_domain(model: onnx.ModelProto, domain: str, version: int = 1) -> None:
    """Declare `domain` (e.g. com.microsoft) in the model's opset imports if it is not there."""
    if not any(o.domain == domain for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(domain, version))


def output_cosines(reference: list[dict], outputs: list[dict]) -> list[float]:
    """Each output's worst-feed cosine against the reference (outputs without one left out)."""
    return [d.cosine for d in validate.compare(reference, outputs).values() if d.cosine is not None]


def fake_quantize_dynamic(x: np.ndarray, lo: float | None = None, hi: float | None = None) -> np.ndarray:
    """x after DynamicQuantizeLinear and back: uint8 over [min(x, 0), max(x, 0)] (or the given range)."""
    lo = min(float(x.min()) if lo is None else lo, 0.0)
    hi = max(float(x.max()) if hi is None else hi, 0.0)
    if hi == lo:
        return x
    scale = (hi - lo) / 255.0
    zero = np.clip(np.rint(-lo / scale), 0, 255)
    return ((np.clip(np.rint(x / scale) + zero, 0, 255) - zero) * scale).astype(np.float32)
