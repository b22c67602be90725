"""scalar-affine-to-conv: x * a + b (scalar constants) before a Conv it cannot fold into => a 1x1 depthwise Conv.

Rewrites (every graph; the chain as in fold-scalar-affine: any mix of Mul and Add by float scalar
constants, either operand order, read by a Conv):
  Conv(Add(Mul(x, a), b), W, ...)  =>  Conv(Conv(x, full([C, 1, 1.., 1], a), full([C], b), group=C), W, ...)
with C the Conv's input channels (W's second dim times its group) and as many 1s as W has spatial dims.
The depthwise Conv computes x * a + b for every element, so the result is the same up to float rounding
(onnxruntime may use a fused multiply-add where the chain rounded twice).

Why: fold-scalar-affine folds such a chain into the Conv it feeds, except where that Conv pads its input
(the padding zeros would not get the offset). onnxruntime's NCHWc layout on x86 takes Convs, pooling and
BatchNormalization but not a Mul or Add by a scalar, so between two Convs the chain costs two elementwise
kernels plus a reorder out of NCHWc and one back in. A 1x1 depthwise Conv stays in the layout (onnxruntime
rewrites BatchNormalization the same way). PP-OCRv4 rec (PPLCNetV3) has 13 such chains, a learnable scale
and bias after a hard swish, each in front of a padded depthwise Conv: its 39 reorders drop to 13.
Where the layout does not take the Conv (channel counts it does not block, or other runtimes) the Conv can
be slower than the two elementwise kernels, so the pass claims speed and the pipeline keeps it only if the
model measures faster.

Refused (reason recorded; the nodes stay): a tensor inside the chain (not its result) is read elsewhere or
is a graph output; the reading Conv's weight is not a float32 initializer of this graph (its shape gives
C). Not a match: a Conv whose input is not such a chain.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from graphopt.graph import NameGenerator, attribute, consumers, drop_unread, initializers, is_op, iter_graphs, output_names, producers, remove_nodes
from graphopt.passes.fold_scalar_affine import ScalarAffineChain, read_elsewhere, scalar_affine_chain
from graphopt.passes_base import Pass, PassContext, PassResult, register


@register
@dataclass
class ScalarAffineToConv(Pass):
    name = "scalar-affine-to-conv"
    description = "x * a + b (scalar constants) before a Conv it cannot fold into => one 1x1 depthwise Conv"
    lossless = True
    claims = "speed"

    def run(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        names = NameGenerator(model)
        rewritten, refused = 0, []
        for graph in iter_graphs(model.graph):
            made_by, read_by, outputs, inits = producers(graph), consumers(graph), output_names(graph), initializers(graph)
            done: set[str] = set()
            doomed, replaced = [], []
            for conv in list(graph.node):
                if not is_op(conv, "Conv") or conv.input[0] in done:
                    continue
                chain = scalar_affine_chain(graph, conv.input[0], made_by)
                if not chain.nodes:
                    continue
                done.add(conv.input[0])
                problem = _problem(conv, chain, read_by, outputs, inits)
                if problem:
                    refused.append(f"Conv {conv.name or conv.output[0]!r}: {problem}")
                    continue
                graph.node.insert(list(graph.node).index(chain.nodes[0]), _depthwise(graph, conv, chain, inits, names))
                replaced += [c for n in chain.nodes for c in n.input]
                doomed += chain.nodes
                rewritten += 1
            remove_nodes(graph, doomed)
            drop_unread(graph, replaced)
        counts = {"chains_rewritten": rewritten} if rewritten else {}
        return PassResult(bool(rewritten), counts=counts, refused=refused)


def _problem(conv: onnx.NodeProto, chain: ScalarAffineChain, read_by, outputs: set[str], inits: dict) -> str | None:
    shared = read_elsewhere(chain.nodes[1:], read_by, outputs)
    if shared:
        return f"{shared} is also read elsewhere or is a graph output"
    weight = inits.get(conv.input[1])
    if weight is None or weight.data_type != TensorProto.FLOAT or len(weight.dims) < 3:
        return f"its weight {conv.input[1]} is not a float32 initializer of this graph, so its input channels are not known"
    return None


def _depthwise(graph: onnx.GraphProto, conv: onnx.NodeProto, chain: ScalarAffineChain, inits: dict, names: NameGenerator) -> onnx.NodeProto:
    """The 1x1 depthwise Conv that writes the chain's result from its source; its weight and bias are added."""
    weight = inits[conv.input[1]]
    channels = weight.dims[1] * attribute(conv, "group", 1)
    spatial = len(weight.dims) - 2
    last = chain.nodes[0]
    w_name, b_name = names(f"{last.output[0]}_scale"), names(f"{last.output[0]}_offset")
    graph.initializer.extend(
        [
            numpy_helper.from_array(np.full((channels, 1) + (1,) * spatial, chain.scale, np.float32), w_name),
            numpy_helper.from_array(np.full(channels, chain.offset, np.float32), b_name),
        ]
    )
    return helper.make_node("Conv", [chain.source, w_name, b_name], [last.output[0]], name=names(f"{last.name or last.output[0]}_as_conv"), group=channels, kernel_shape=[1] * spatial)
