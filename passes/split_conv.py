"""split-conv: a Conv whose output (after elementwise ops) is only cut into channel groups by a Split =>
one Conv per group, each followed by its own copy of the elementwise ops.

Rewrites (every graph):
  Split(f(Conv(x, W, B)), axis=1, sizes s1..sn)  =>  f(Conv(x, W[0:s1], B[0:s1])), ..., f(Conv(x, W[..:], B[..:]))
where f is any graph of elementwise nodes between the Conv and the Split whose other operands are scalar
constants (YOLOv8's SiLU, x * Sigmoid(x); Relu, Clip, HardSwish, ...). Each output channel of a Conv is
computed from x alone, and an elementwise op acts channel by channel, so every piece is computed as
before; the result is the same up to float rounding (bit for bit on YOLOv8n).

Why: onnxruntime's NCHWc layout on x86 takes Conv, Concat and elementwise ops but not Split, so a Split
after a Conv costs a reorder out of the layout, the Split's copy and a reorder back in for every piece's
reader. YOLOv8's C2f blocks all start that way (cv1, SiLU, Split in two, ... Concat): on YOLOv8n the 8
Splits brought 30 of the optimized graph's 44 reorders, and as separate Convs the model measured about
0.96 of its former latency. Two Convs read x twice, so the pass claims speed and the pipeline keeps it
only where the model measures faster.

Not a match: a Split on another axis, or whose input does not lead back to a Conv through elementwise
ops alone. Refused (reason recorded): a value between the Conv and the Split is read by anything else or
is a graph output; the Conv is grouped; its weight or bias is not an initializer of this graph; the
Split's sizes are not constant or do not add up to the Conv's output channels (without sizes, the
channels are shared out as onnx does: equal pieces, the last one smaller where they do not divide evenly).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from graphopt.graph import NameGenerator, attribute, constant_value, consumers, drop_unread, is_op, iter_graphs, output_names, producers, scalar_constant, splice
from graphopt.passes_base import Pass, PassContext, PassResult, register

UNARY = frozenset(
    {"Relu", "Sigmoid", "Tanh", "HardSigmoid", "HardSwish", "LeakyRelu", "Elu", "Selu", "Celu", "Softplus", "Softsign", "Mish", "Gelu", "Erf", "Neg", "Abs", "Exp", "Sqrt", "Reciprocal"}
)
BINARY = frozenset({"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum"})


@dataclass
class ConvRegion:
    """The Conv and the elementwise nodes between it and the Split, in graph order (the Conv first)."""

    conv: onnx.NodeProto
    nodes: list[onnx.NodeProto]


@register
@dataclass
class SplitConv(Pass):
    name = "split-conv"
    description = "a Conv whose output (after elementwise ops) is only split along channels => one Conv per piece"
    lossless = True
    claims = "speed"

    def run(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        names = NameGenerator(model)
        split, pieces, refused = 0, 0, []
        # innermost first: rebuilding a graph's node list (splice) copies its nodes and the bodies they hold
        for graph in reversed(list(iter_graphs(model.graph))):
            made_by, read_by, outputs = producers(graph), consumers(graph), output_names(graph)
            rewrites = []
            for node in graph.node:
                if not is_op(node, "Split"):
                    continue
                region = _conv_region(graph, node.input[0], made_by)
                if region is None or not _on_channels(graph, node, region.conv):
                    continue
                plan = _plan(graph, node, region, read_by, outputs)
                if isinstance(plan, str):
                    refused.append(f"Split {node.name or node.output[0]!r}: {plan}")
                    continue
                rewrites.append((region.nodes + [node], _pieces(graph, node, region, plan, names)))
                split, pieces = split + 1, pieces + len(plan)
            if rewrites:
                splice(graph, rewrites)
                drop_unread(graph, [name for old, _ in rewrites for name in old[0].input[1:] + old[-1].input[1:]])  # the Conv's, the Split's
        counts = {"convs_split": split, "pieces": pieces} if split else {}
        return PassResult(bool(split), counts=counts, refused=refused)


def _elementwise_inputs(graph: onnx.GraphProto, node: onnx.NodeProto) -> list[str] | None:
    """The inputs of `node` that carry the Conv's data, if it is an elementwise op whose other operands are
    scalar constants (Clip's bounds included); None otherwise."""
    if any(is_op(node, op) for op in UNARY):
        return [node.input[0]]
    if is_op(node, "Clip"):
        bounds_constant = all(scalar_constant(graph, b) is not None for b in node.input[1:] if b)
        return [node.input[0]] if bounds_constant else None
    if any(is_op(node, op) for op in BINARY):
        data = [name for name in node.input if scalar_constant(graph, name) is None]
        return data or None
    return None


def _conv_region(graph: onnx.GraphProto, value: str, made_by: dict) -> ConvRegion | None:
    """The Conv that `value` is computed from through elementwise nodes only, with those nodes; None when
    `value` does not lead back to exactly one Conv that way."""
    found: dict[int, onnx.NodeProto] = {}
    convs: list[onnx.NodeProto] = []
    pending = [value]
    while pending:
        node = made_by.get(pending.pop())
        if node is None:
            return None
        if id(node) in found:
            continue
        found[id(node)] = node
        if is_op(node, "Conv"):
            convs.append(node)
            continue
        data = _elementwise_inputs(graph, node)
        if data is None:
            return None
        pending.extend(data)
    if len(convs) != 1:
        return None
    order = {id(n): k for k, n in enumerate(graph.node)}
    return ConvRegion(convs[0], sorted(found.values(), key=lambda n: order[id(n)]))


def _on_channels(graph: onnx.GraphProto, split: onnx.NodeProto, conv: onnx.NodeProto) -> bool:
    """The Split cuts the Conv's channel axis (1; a negative axis needs the rank, from the weight)."""
    axis, dims = attribute(split, "axis", 0), _weight_dims(graph, conv)
    return axis == 1 or (dims is not None and axis == 1 - len(dims))


def _weight_dims(graph: onnx.GraphProto, conv: onnx.NodeProto) -> list[int] | None:
    weight = constant_value(graph, conv.input[1])
    return None if weight is None else list(weight.shape)


def _plan(graph: onnx.GraphProto, split: onnx.NodeProto, region: ConvRegion, read_by: dict, outputs: set[str]) -> list[tuple[int, int]] | str:
    """The channel range of each Split output, or why the region cannot be split."""
    inside = {id(n) for n in region.nodes}
    for node in region.nodes:
        for value in node.output:
            readers = read_by.get(value, [])
            only_expected = all(r is split for r in readers) if value == split.input[0] else all(id(r) in inside for r in readers)
            if value in outputs or not only_expected:
                return f"{value} (between the Conv and the Split) is also read elsewhere or is a graph output"
    conv = region.conv
    if attribute(conv, "group", 1) != 1:
        return f"Conv {conv.name or conv.output[0]!r} is grouped"
    dims = _weight_dims(graph, conv)
    if dims is None or (len(conv.input) > 2 and conv.input[2] and constant_value(graph, conv.input[2]) is None):
        return f"the weight or bias of Conv {conv.name or conv.output[0]!r} is not an initializer of this graph"
    channels = dims[0]
    sizes = _split_sizes(graph, split)
    if isinstance(sizes, str):
        return sizes
    if sizes is None:  # one piece per output, the last smaller when they do not divide evenly (Split-18)
        chunk = -(-channels // len(split.output))
        sizes = [chunk] * (len(split.output) - 1) + [channels - chunk * (len(split.output) - 1)]
    if sum(sizes) != channels:
        return f"the split sizes {sizes} do not add up to the Conv's {channels} output channels"
    starts = np.cumsum([0] + sizes).tolist()
    return list(zip(starts[:-1], starts[1:]))


def _split_sizes(graph: onnx.GraphProto, split: onnx.NodeProto) -> list[int] | None | str:
    """The Split's sizes (input from opset 13, attribute before), None when it has none, or why unknown."""
    if len(split.input) > 1 and split.input[1]:
        value = constant_value(graph, split.input[1])
        return f"its sizes {split.input[1]} are not a constant" if value is None else [int(v) for v in value.reshape(-1)]
    sizes = attribute(split, "split")
    return None if sizes is None else [int(v) for v in sizes]


def _pieces(graph: onnx.GraphProto, split: onnx.NodeProto, region: ConvRegion, plan: list[tuple[int, int]], names: NameGenerator) -> list[onnx.NodeProto]:
    """One copy of the region per channel range, its Conv cut to those channels, the last node writing the
    Split's output; the cut weights and biases are added to the graph."""
    conv = region.conv
    weight = constant_value(graph, conv.input[1])
    bias = constant_value(graph, conv.input[2]) if len(conv.input) > 2 and conv.input[2] else None
    made: list[onnx.NodeProto] = []
    for k, ((start, end), result) in enumerate(zip(plan, split.output)):
        renames = {value: names(f"{value}_part{k}") for node in region.nodes for value in node.output}
        renames[split.input[0]] = result
        cut = [names(f"{conv.input[1]}_part{k}")] + ([names(f"{conv.input[2]}_part{k}")] if bias is not None else [])
        graph.initializer.append(numpy_helper.from_array(weight[start:end], cut[0]))
        if bias is not None:
            graph.initializer.append(numpy_helper.from_array(bias[start:end], cut[1]))
        for node in region.nodes:
            piece = onnx.NodeProto()
            piece.CopyFrom(node)
            if node is conv:
                del piece.input[1:]
                piece.input.extend(cut)
            else:
                for i, name in enumerate(piece.input):
                    piece.input[i] = renames.get(name, name)
            for i, name in enumerate(piece.output):
                piece.output[i] = renames[name]
            piece.name = names(f"{node.name or node.output[0]}_part{k}")
            made.append(piece)
    return made
