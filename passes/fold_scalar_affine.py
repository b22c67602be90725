"""fold-scalar-affine: x * a + b (scalar constants) in front of a Conv, folded into that Conv.

Rewrites (every graph; a and b are float initializers of shape [] or [1], the chain any mix of Mul and Add
by such constants, either operand order):
  Conv(Add(Mul(x, a), b), W, B)  =>  Conv(x, W * a, B + b * sum of W over its input channels and kernel)
which is exact in real arithmetic when the Conv reads no padding: every output sums the same W over the
window, so the offset b contributes b * sum(W) to each output channel. A chain without offset (b = 0) folds
into a padded Conv too: the padding zeros times a are still zeros.

Why: fold-batchnorm folds affine maps into the linear node *before* them; this is the other direction, for
the affine maps exporters put *after* an activation. PP-OCRv4 rec (PPLCNetV3) has a learnable scale and
bias after each hard swish (Mul, Add by scalars); onnxruntime runs them as two elementwise kernels and, as
its NCHWc layout pass does not take scalar operands, reorders the tensor out of and back into NCHWc around
them. Where a 1x1 Conv follows (12 places), both go away.

Numerics: float64 arithmetic cast back to float32; the sums round differently from the original, which the
pipeline checks against onnxruntime's own rounding as for every clean-up.

Refused (reason recorded; the nodes stay): the chain has an offset and the Conv pads its input (pads or
auto_pad SAME_*: the padding zeros would not get the offset, so the borders would differ; the
scalar-affine-to-conv pass takes these chains), a tensor inside the chain is read elsewhere or
is a graph output, or the Conv's weight or bias is not an initializer of this graph used by it alone. Not a
match: constants of other shapes (per-channel maps are fold-batchnorm's, in the other direction).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from graphopt.graph import NameGenerator, attribute, consumers, drop_unread, initializers, is_op, iter_graphs, only_reader, output_names, producers, remove_nodes, scalar_constant, scalar_operand
from graphopt.passes_base import Pass, PassContext, PassResult, register


@dataclass
class ScalarAffineChain:
    """Mul/Add nodes by scalar constants that map `source` to scale * source + offset."""

    source: str  # what the Conv reads once the chain is gone
    scale: float
    offset: float
    nodes: list[onnx.NodeProto]  # the node nearest the Conv first


@register
@dataclass
class FoldScalarAffine(Pass):
    name = "fold-scalar-affine"
    description = "x * a + b (scalar constants) before an unpadded Conv (x * a: any Conv) => folded into the Conv's weights and bias"
    lossless = True

    def run(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        names = NameGenerator(model)
        folded, removed, refused = 0, 0, []
        for graph in iter_graphs(model.graph):
            made_by, read_by, outputs, inits = producers(graph), consumers(graph), output_names(graph), initializers(graph)
            doomed, replaced = [], []
            for conv in list(graph.node):
                if not is_op(conv, "Conv"):
                    continue
                chain = scalar_affine_chain(graph, conv.input[0], made_by)
                if not chain.nodes:
                    continue
                problem = _problem(conv, chain, read_by, outputs, inits)
                if problem:
                    refused.append(f"Conv {conv.name or conv.output[0]!r}: {problem}")
                    continue
                replaced += _fold(graph, conv, chain, inits, names)
                doomed += chain.nodes
                folded += 1
            removed += remove_nodes(graph, doomed)
            drop_unread(graph, replaced)
        counts = {"convs_folded_into": folded, "nodes_removed": removed} if folded else {}
        return PassResult(bool(folded), counts=counts, refused=refused)


def scalar_affine_chain(graph: onnx.GraphProto, name: str, made_by) -> ScalarAffineChain:
    """Follow Mul/Add by scalar constants back from `name` (a Conv's input); no nodes when it is not one."""
    scale, offset, nodes = 1.0, 0.0, []
    while (node := made_by.get(name)) is not None and (is_op(node, "Mul") or is_op(node, "Add")):
        side = scalar_operand(graph, node)
        if side is None:
            break
        c = scalar_constant(graph, node.input[side])
        # the chain seen so far maps its input y to scale * y + offset; y = node's result
        if node.op_type == "Mul":
            scale, offset = scale * c, offset  # scale * (z * c) + offset
        else:
            offset = offset + scale * c  # scale * (z + c) + offset
        nodes.append(node)
        name = node.input[1 - side]
    return ScalarAffineChain(name, scale, offset, nodes)


def _pads_input(conv: onnx.NodeProto) -> bool:
    """Whether the Conv reads padding (explicit pads or auto_pad SAME_*)."""
    auto_pad = attribute(conv, "auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    return any(attribute(conv, "pads", [])) or auto_pad not in ("NOTSET", "VALID")


def read_elsewhere(nodes: list[onnx.NodeProto], read_by, outputs: set[str]) -> str | None:
    """The first of the nodes' outputs that is a graph output or has another reader than the next node."""
    return next((n.output[0] for n in nodes if n.output[0] in outputs or only_reader(read_by, n.output[0]) is None), None)


def _problem(conv: onnx.NodeProto, chain: ScalarAffineChain, read_by, outputs: set[str], inits: dict) -> str | None:
    if chain.offset != 0.0 and _pads_input(conv):
        return "it pads its input, so a folded offset would be wrong at the borders"
    shared = read_elsewhere(chain.nodes, read_by, outputs)
    if shared:
        return f"{shared} is also read elsewhere or is a graph output"
    for name in conv.input[1:3]:
        if name and (name not in inits or inits[name].data_type != TensorProto.FLOAT or only_reader(read_by, name) is None):
            return f"{name} is not a float32 initializer used by this Conv alone"
    return None


def _fold(graph: onnx.GraphProto, conv: onnx.NodeProto, chain: ScalarAffineChain, inits: dict, names: NameGenerator) -> list[str]:
    """Rewire `conv` to read the chain's source with the folded weight and bias; returns the names it no
    longer reads (the old weight and bias, the chain's constants and tensors)."""
    w = numpy_helper.to_array(inits[conv.input[1]]).astype(np.float64)
    bias = numpy_helper.to_array(inits[conv.input[2]]).astype(np.float64) if len(conv.input) > 2 and conv.input[2] else np.zeros(w.shape[0])
    new_w = (w * chain.scale).astype(np.float32)
    new_bias = (bias + chain.offset * w.sum(axis=tuple(range(1, w.ndim)))).astype(np.float32)
    w_name, b_name = names(f"{conv.input[1]}_affine_folded"), names(f"{conv.name or conv.output[0]}_bias_affine_folded")
    graph.initializer.extend([numpy_helper.from_array(new_w, w_name), numpy_helper.from_array(new_bias, b_name)])
    replaced = list(conv.input[1:]) + [c for n in chain.nodes for c in n.input]
    del conv.input[:]
    conv.input.extend([chain.source, w_name, b_name])
    return replaced
