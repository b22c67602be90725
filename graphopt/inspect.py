"""What a model holds: opsets, inputs/outputs, node counts, parameters, shared weights and MACs.

`inspect_model` returns a JSON-serializable dict; `format_inspect` turns it into text for people.
Loading is the caller's job: it passes the ModelProto, the file size and the external data file names.

MACs (multiply-accumulates) are counted for Conv, ConvTranspose, Gemm and MatMul of the default domain in
the main graph, wherever onnx shape inference knows the shapes they need; nodes inside If/Loop/Scan
bodies are not counted (a body may run any number of times) but are reported.
Shapes are pinned with `shapes`, where each key is either
- a graph input name, with its full shape: {"images": [1, 3, 224, 224]}, or
- a symbolic dimension name used by the graph inputs, with a one-element list: {"batch": [1], "seq": [128]};
  every input dimension carrying that name takes the value.
A key naming both, a name that is neither, a rank mismatch or a pin contradicting a fixed dimension is a
UserError. With batch 1, broadcasting against a dimension inference could not resolve stays unknown (1
broadcasts to anything); the count of nodes with unknown shapes says when that happened.
Shape inference runs on a light copy of the model in which large floating-point initializers are
declared as inputs of the same type and shape (shape inference only needs the values of small tensors
such as Reshape targets), so it takes milliseconds on a 90 MB model and works without external data.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from math import prod
from typing import Any

import numpy as np
import onnx
from onnx import helper, shape_inference

from graphopt.errors import UserError
from graphopt.graph import STANDARD_DOMAINS, iter_graphs, tensor_bytes, without_large_initializers
from graphopt.weights import Copy, WeightSharing, find_weight_sharing

MAC_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")

Dim = int | str | None


def inspect_model(
    model: onnx.ModelProto,
    *,
    file_size: int | None = None,
    external_data: list[str] | None = None,
    shapes: dict[str, list[int]] | None = None,
) -> dict[str, Any]:
    """A JSON-serializable description of `model` (see the module docstring for `shapes`)."""
    initializer_names = {t.name for t in model.graph.initializer}
    return {
        "ir_version": int(model.ir_version),
        "producer": {"name": model.producer_name, "version": model.producer_version},
        "opsets": {(o.domain or "ai.onnx"): int(o.version) for o in model.opset_import},
        "inputs": [_describe_value(v) for v in model.graph.input if v.name not in initializer_names],
        "overridable_initializers": [v.name for v in model.graph.input if v.name in initializer_names],
        "outputs": [_describe_value(v) for v in model.graph.output],
        "nodes": _node_counts(model),
        "parameters": _parameters(model),
        "file": {"size": file_size, "external_data": list(external_data or [])},
        "shared_weights": _shared_weights(find_weight_sharing(model)),
        "macs": _macs(model, shapes or {}),
    }


def _describe_value(value: onnx.ValueInfoProto) -> dict[str, Any]:
    kind = value.type.WhichOneof("value")
    if kind != "tensor_type":
        return {"name": value.name, "type": helper.printable_type(value.type)}
    tensor = value.type.tensor_type
    shape = [_dim(d) for d in tensor.shape.dim] if tensor.HasField("shape") else None
    return {"name": value.name, "dtype": _dtype_name(tensor.elem_type), "shape": shape}


def _dim(d: onnx.TensorShapeProto.Dimension) -> Dim:
    if d.HasField("dim_value"):
        return int(d.dim_value)
    return d.dim_param or None


def _dtype_name(elem_type: int) -> str:
    if elem_type == onnx.TensorProto.STRING:
        return "string"
    if elem_type == onnx.TensorProto.UNDEFINED:
        return "undefined"
    return np.dtype(helper.tensor_dtype_to_np_dtype(elem_type)).name


def _node_counts(model: onnx.ModelProto) -> dict[str, Any]:
    """Nodes per op type over all graphs; non-default domains are written `domain::OpType`."""
    graphs = list(iter_graphs(model.graph))
    ops = Counter(
        n.op_type if n.domain in STANDARD_DOMAINS else f"{n.domain}::{n.op_type}" for g in graphs for n in g.node
    )
    return {"total": sum(ops.values()), "subgraphs": len(graphs) - 1, "by_op": dict(ops.most_common())}


def _parameters(model: onnx.ModelProto) -> dict[str, Any]:
    """Element count and bytes per dtype of initializers (dense and sparse) and Constant-node values."""
    by_dtype: dict[str, dict[str, int]] = {}
    stored = list(_stored_values(model))
    for elem_type, count, nbytes in stored:
        entry = by_dtype.setdefault(_dtype_name(elem_type), {"count": 0, "bytes": 0})
        entry["count"] += count
        entry["bytes"] += nbytes
    by_dtype = dict(sorted(by_dtype.items(), key=lambda kv: -kv[1]["bytes"]))
    return {
        "tensors": len(stored),
        "count": sum(e["count"] for e in by_dtype.values()),
        "bytes": sum(e["bytes"] for e in by_dtype.values()),
        "by_dtype": by_dtype,
    }


def _stored_values(model: onnx.ModelProto) -> Iterator[tuple[int, int, int]]:
    """(elem type, element count, bytes) of every tensor the file stores: initializers, sparse
    initializers (values and indices) and Constant-node values, in all graphs."""
    for g in iter_graphs(model.graph):
        tensors = list(g.initializer) + [t for s in g.sparse_initializer for t in (s.values, s.indices)]
        for node in g.node:
            if node.op_type == "Constant" and node.domain in STANDARD_DOMAINS:
                for attr in node.attribute:
                    if attr.type == onnx.AttributeProto.TENSOR:
                        tensors.append(attr.t)
                    elif attr.type == onnx.AttributeProto.SPARSE_TENSOR:
                        tensors += [attr.sparse_tensor.values, attr.sparse_tensor.indices]
                    else:
                        yield _attribute_value(attr)
        for t in tensors:
            yield t.data_type, prod(t.dims), tensor_bytes(t)


def _attribute_value(attr: onnx.AttributeProto) -> tuple[int, int, int]:
    """A Constant's value_float(s) / value_int(s) / value_string(s) as (elem type, count, bytes)."""
    value = helper.get_attribute_value(attr)
    values = value if isinstance(value, list) else [value]
    if attr.name.startswith("value_float"):
        return onnx.TensorProto.FLOAT, len(values), 4 * len(values)
    if attr.name.startswith("value_int"):
        return onnx.TensorProto.INT64, len(values), 8 * len(values)
    return onnx.TensorProto.STRING, len(values), sum(len(v) for v in values)


def _shared_weights(found: WeightSharing) -> dict[str, Any]:
    return {
        "savable_bytes": found.savable_bytes,
        "groups": [
            {
                "graph": g.graph,
                "dtype": g.dtype,
                "bytes_each": g.nbytes,
                "savable_bytes": g.savable_bytes,
                "members": list(g.members),
                "copies": [_describe_copy(c) for c in g.copies],
            }
            for g in found.groups
        ],
        "blocked_by_graph_inputs": [
            {"graph": b.graph, "graph_inputs": list(b.graph_inputs), **_describe_copy(b.copy)} for b in found.blocked
        ],
        "not_examined": list(found.skipped),
    }


def _describe_copy(c: Copy) -> dict[str, Any]:
    described = {"name": c.name, "source": c.source, "kind": c.kind}
    if c.kind == "transpose":
        described["perm"] = list(c.perm)
    return described


def _macs(model: onnx.ModelProto, pins: dict[str, list[int]]) -> dict[str, Any]:
    input_pins, dim_pins = _split_pins(model, pins)
    known, error = _inferred_shapes(model, input_pins, dim_pins)
    by_op: Counter[str] = Counter()
    unknown: list[str] = []
    counted = 0
    for k, node in enumerate(model.graph.node):
        if node.op_type not in MAC_OPS or node.domain not in STANDARD_DOMAINS:
            continue
        macs = _node_macs(node, known)
        if macs is None:
            unknown.append(node.name or f"{node.op_type}#{k}")
        else:
            by_op[node.op_type] += macs
            counted += 1
    in_bodies = sum(
        1 for g in list(iter_graphs(model.graph))[1:] for n in g.node if n.op_type in MAC_OPS and n.domain in STANDARD_DOMAINS
    )
    return {
        "total": sum(by_op.values()),
        "by_op": dict(by_op),
        "nodes_counted": counted,
        "nodes_unknown_shapes": len(unknown),
        "unknown_nodes": unknown,
        "nodes_in_subgraphs_not_counted": in_bodies,
        "pinned": {**{k: list(v) for k, v in input_pins.items()}, **{k: [v] for k, v in dim_pins.items()}},
        "shape_inference_error": error,
    }


def _split_pins(model: onnx.ModelProto, pins: dict[str, list[int]]) -> tuple[dict[str, list[int]], dict[str, int]]:
    """Pins by graph input name (full shape) and by symbolic dimension name (one value); checked."""
    inputs = {v.name: v for v in model.graph.input if v.type.WhichOneof("value") == "tensor_type"}
    symbols = {d.dim_param for v in inputs.values() for d in v.type.tensor_type.shape.dim if d.dim_param}
    input_pins: dict[str, list[int]] = {}
    dim_pins: dict[str, int] = {}
    for key, value in pins.items():
        dims = [int(x) for x in value]
        if any(x < 1 for x in dims):
            raise UserError(f"shape pin {key}={dims}: dimensions must be positive")
        if key in inputs and key in symbols:
            raise UserError(f"shape pin {key!r} is both a graph input and a symbolic dimension name; rename one of them")
        if key in inputs:
            input_pins[key] = _checked_input_pin(inputs[key], dims)
        elif key in symbols:
            if len(dims) != 1:
                raise UserError(f"shape pin {key!r} names a symbolic dimension: give one value, e.g. {{{key!r}: [1]}}")
            dim_pins[key] = dims[0]
        else:
            raise UserError(
                f"shape pin {key!r} is neither a graph input ({', '.join(sorted(inputs)) or 'none'}) "
                f"nor a symbolic dimension name ({', '.join(sorted(symbols)) or 'none'})"
            )
    return input_pins, dim_pins


def _checked_input_pin(value: onnx.ValueInfoProto, dims: list[int]) -> list[int]:
    declared = value.type.tensor_type.shape.dim
    if value.type.tensor_type.HasField("shape") and len(declared) != len(dims):
        raise UserError(f"shape pin {value.name}={dims}: the input has rank {len(declared)}")
    for d, pinned in zip(declared, dims):
        if d.HasField("dim_value") and d.dim_value != pinned:
            raise UserError(f"shape pin {value.name}={dims} contradicts its fixed shape {[_dim(x) for x in declared]}")
    return dims


def _inferred_shapes(
    model: onnx.ModelProto, input_pins: dict[str, list[int]], dim_pins: dict[str, int]
) -> tuple[dict[str, list[Dim]], str | None]:
    """Tensor name -> shape (ints where known) in the main graph after onnx shape inference."""
    light = without_large_initializers(model)
    for value in [*light.graph.input, *light.graph.output, *light.graph.value_info]:
        _pin(value, input_pins.get(value.name), dim_pins)
    error = None
    try:
        inferred = shape_inference.infer_shapes(light, strict_mode=False, data_prop=True)
    except (shape_inference.InferenceError, onnx.checker.ValidationError) as exc:
        inferred, error = light, str(exc).strip().splitlines()[0]
    shapes: dict[str, list[Dim]] = {t.name: [int(d) for d in t.dims] for t in model.graph.initializer}
    g = inferred.graph
    for value in [*g.input, *g.value_info, *g.output]:
        described = _describe_value(value)
        if described.get("shape") is not None:
            shapes[value.name] = described["shape"]
    return shapes, error


def _pin(value: onnx.ValueInfoProto, full: list[int] | None, dim_pins: dict[str, int]) -> None:
    if value.type.WhichOneof("value") != "tensor_type":
        return
    shape = value.type.tensor_type.shape
    if full is not None:
        del shape.dim[:]
        for size in full:
            shape.dim.add().dim_value = size
        return
    for d in shape.dim:
        if d.dim_param in dim_pins:
            d.dim_value = dim_pins[d.dim_param]


def _node_macs(node: onnx.NodeProto, shapes: dict[str, list[Dim]]) -> int | None:
    """Multiply-accumulates of one node, or None when a shape it needs is not fully known."""

    def known(i: int, outputs: bool = False) -> list[int] | None:
        names = node.output if outputs else node.input
        shape = shapes.get(names[i]) if i < len(names) and names[i] else None
        return shape if shape is not None and all(isinstance(d, int) for d in shape) else None

    out, first, weight = known(0, outputs=True), known(0), known(1)
    if node.op_type == "Conv" and out and weight:
        return prod(out) * prod(weight[1:])
    if node.op_type == "ConvTranspose" and first and weight:
        return prod(first) * prod(weight[1:])
    if node.op_type == "Gemm" and out is not None and first:
        trans_a = next((a.i for a in node.attribute if a.name == "transA"), 0)
        return prod(out) * (first[0] if trans_a else first[1])
    if node.op_type == "MatMul" and out is not None and first:
        return prod(out) * first[-1]
    return None


def format_inspect(info: dict[str, Any]) -> str:
    """The `inspect_model` dict as text for people."""
    lines = [
        f"model: IR {info['ir_version']}, producer {info['producer']['name'] or '?'} {info['producer']['version']}".rstrip(),
        "opsets: " + ", ".join(f"{d} {v}" for d, v in info["opsets"].items()),
        _file_line(info["file"]),
        "inputs:",
        *_value_lines(info["inputs"]),
    ]
    if info["overridable_initializers"]:
        lines.append(f"  + {len(info['overridable_initializers'])} initializers that are also inputs (overridable)")
    lines += ["outputs:", *_value_lines(info["outputs"])]
    nodes = info["nodes"]
    lines.append(f"nodes: {nodes['total']}" + (f" (in {nodes['subgraphs']} subgraphs too)" if nodes["subgraphs"] else ""))
    lines += _wrapped([f"{op} {n}" for op, n in nodes["by_op"].items()])
    params = info["parameters"]
    lines.append(f"parameters: {_count(params['count'])} in {params['tensors']} tensors, {_size(params['bytes'])}")
    lines += [f"  {dtype:<10} {_count(e['count']):>8}  {_size(e['bytes'])}" for dtype, e in params["by_dtype"].items()]
    lines += _shared_lines(info["shared_weights"])
    lines += _mac_lines(info["macs"])
    return "\n".join(lines)


def _file_line(file: dict[str, Any]) -> str:
    size = "size unknown" if file["size"] is None else _size(file["size"])
    external = ", external data: " + ", ".join(file["external_data"]) if file["external_data"] else ", no external data"
    return f"file: {size}{external}"


def _value_lines(values: list[dict[str, Any]]) -> list[str]:
    width = max((len(v["name"]) for v in values), default=0)
    lines = []
    for v in values:
        if "type" in v:
            lines.append(f"  {v['name']:<{width}}  {v['type']}")
        else:
            shape = "unknown rank" if v["shape"] is None else "[" + ", ".join("?" if d is None else str(d) for d in v["shape"]) + "]"
            lines.append(f"  {v['name']:<{width}}  {v['dtype']} {shape}")
    return lines


def _wrapped(items: list[str], width: int = 100) -> list[str]:
    lines, line = [], ""
    for item in items:
        if line and len(line) + len(item) + 2 > width:
            lines.append("  " + line.rstrip(", "))
            line = ""
        line += item + ", "
    if line:
        lines.append("  " + line.rstrip(", "))
    return lines


def _shared_lines(shared: dict[str, Any]) -> list[str]:
    if not shared["groups"] and not shared["blocked_by_graph_inputs"]:
        return ["shared weights: none found"]
    lines = [f"shared weights: {len(shared['groups'])} groups, folding would save {_size(shared['savable_bytes'])}"]
    for g in shared["groups"]:
        relations = ", ".join(_copy_text(c) for c in g["copies"])
        lines.append(f"  {g['graph']}: {_size(g['bytes_each'])} each: {relations}")
    for b in shared["blocked_by_graph_inputs"]:
        lines.append(f"  {b['graph']}: {_copy_text(b)} (not foldable: {', '.join(b['graph_inputs'])} is a graph input)")
    return lines


def _copy_text(c: dict[str, Any]) -> str:
    if c["kind"] == "transpose":
        return f"{c['name']} = Transpose({c['source']}, perm={c['perm']})"
    if c["kind"] == "reshape":
        return f"{c['name']} = Reshape({c['source']})"
    return f"{c['name']} = {c['source']}"


def _mac_lines(macs: dict[str, Any]) -> list[str]:
    pins = ", ".join(f"{k}={v if len(v) > 1 else v[0]}" for k, v in macs["pinned"].items())
    lines = [f"MACs: {_count(macs['total'])} over {macs['nodes_counted']} Conv/ConvTranspose/Gemm/MatMul nodes" + (f" (pinned {pins})" if pins else "")]
    if macs["by_op"]:
        lines.append("  " + ", ".join(f"{op} {_count(n)}" for op, n in macs["by_op"].items()))
    if macs["nodes_unknown_shapes"]:
        hint = "" if pins else "; pin input shapes or symbolic dims (e.g. batch=1)"
        lines.append(f"  {macs['nodes_unknown_shapes']} nodes with unknown shapes not counted{hint}")
    if macs["nodes_in_subgraphs_not_counted"]:
        lines.append(f"  {macs['nodes_in_subgraphs_not_counted']} nodes inside If/Loop/Scan bodies not counted")
    if macs["shape_inference_error"]:
        lines.append(f"  shape inference failed: {macs['shape_inference_error']}")
    return lines


def _count(n: int) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"
