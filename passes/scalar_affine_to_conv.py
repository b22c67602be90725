"""scalar-affine-to-conv: x * a + b (scalar constants) before a Conv it cannot fold into, or before pooling,
=> a 1x1 depthwise Conv.

Rewrites (every graph; the chain as in fold-scalar-affine: any mix of Mul and Add by float scalar
constants, either operand order, read by a Conv, AveragePool, MaxPool, GlobalAveragePool or GlobalMaxPool):
  Conv(Add(Mul(x, a), b), W, ...)  =>  Conv(Conv(x, full([C, 1, 1.., 1], a), full([C], b), group=C), W, ...)
with C the Conv's input channels (W's second dim times its group) and as many 1s as W has spatial dims;
before pooling, C is x's second dim where its shape is known ([N, C, H, W] with C static, checked against
the shapes onnxruntime produced on the calibration feeds, see graphopt.shapes).
The depthwise Conv computes x * a + b for every element, so the result is the same up to float rounding
(onnxruntime may use a fused multiply-add where the chain rounded twice).

Why: fold-scalar-affine folds such a chain into the Conv it feeds, except where that Conv pads its input
(the padding zeros would not get the offset). onnxruntime's NCHWc layout on x86 takes Convs, pooling and
BatchNormalization but not a Mul or Add by a scalar, so between two Convs the chain costs two elementwise
kernels plus a reorder out of NCHWc and one back in. A 1x1 depthwise Conv stays in the layout (onnxruntime
rewrites BatchNormalization the same way), and so does the pooling (NCHWc too). PP-OCRv4 rec (PPLCNetV3)
has 16 such chains, a learnable scale and bias after a hard swish: 13 in front of a padded depthwise Conv,
3 in front of pooling.
Where the layout does not take the Conv (channel counts it does not block, or other runtimes) the Conv can
be slower than the two elementwise kernels, so the pass claims speed and the pipeline keeps it only if the
model measures faster.

Refused (reason recorded; the nodes stay): a tensor inside the chain (not its result) is read elsewhere or
is a graph output; C is not known (the reading Conv's weight is not a float32 initializer of this graph;
before pooling, x is not known to be float32 or its shape is not a confirmed [N, C, H, W] with C static).
Not a match: a reader whose input is not such a chain.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from graphopt.graph import NameGenerator, attribute, consumers, drop_unread, initializers, is_op, iter_graphs, output_names, producers, remove_nodes
from graphopt.passes.fold_scalar_affine import ScalarAffineChain, read_elsewhere, scalar_affine_chain
from graphopt.passes_base import Pass, PassContext, PassResult, register
from graphopt.shapes import all_graph_facts

POOLING = ("AveragePool", "MaxPool", "GlobalAveragePool", "GlobalMaxPool")  # onnxruntime's NCHWc takes these


@register
@dataclass
class ScalarAffineToConv(Pass):
    name = "scalar-affine-to-conv"
    description = "x * a + b (scalar constants) before a Conv it cannot fold into, or before pooling => one 1x1 depthwise Conv"
    lossless = True
    claims = "speed"

    def run(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        names = NameGenerator(model)
        # the facts (shape inference and, for a model with pooling, a run of it) describe the model as it
        # comes, so every chain is judged before any is rewritten
        facts = functools.cache(lambda: all_graph_facts(model, functools.cache(lambda: ctx.activations.observed_shapes(model))))
        found, refused = [], []
        for index, graph in enumerate(iter_graphs(model.graph)):
            made_by, read_by, outputs, inits = producers(graph), consumers(graph), output_names(graph), initializers(graph)
            seen: set[str] = set()
            for reader in graph.node:
                if not any(is_op(reader, op) for op in ("Conv", *POOLING)) or reader.input[0] in seen:
                    continue
                chain = scalar_affine_chain(graph, reader.input[0], made_by)
                if not chain.nodes:
                    continue
                seen.add(reader.input[0])
                shared = read_elsewhere(chain.nodes[1:], read_by, outputs)
                channels = f"{shared} is also read elsewhere or is a graph output" if shared else _channels(reader, chain, inits, lambda: facts()[index])
                if isinstance(channels, str):
                    refused.append(f"{reader.op_type} {reader.name or reader.output[0]!r}: {channels}")
                else:
                    found.append((graph, chain, channels))
        for graph, chain, channels in found:
            graph.node.insert(list(graph.node).index(chain.nodes[0]), _depthwise(graph, chain, channels, names))
            remove_nodes(graph, chain.nodes)
            drop_unread(graph, [c for n in chain.nodes for c in n.input])
        counts = {"chains_rewritten": len(found)} if found else {}
        return PassResult(bool(found), counts=counts, refused=refused)


def _channels(reader: onnx.NodeProto, chain: ScalarAffineChain, inits: dict, facts) -> tuple[int, int] | str:
    """(channels, spatial dims) of the chain's result, or why they are not known; `facts` gives the
    graph's GraphFacts (only asked for before pooling: it runs shape inference)."""
    if is_op(reader, "Conv"):
        weight = inits.get(reader.input[1])
        if weight is None or weight.data_type != TensorProto.FLOAT or len(weight.dims) < 3:
            return f"its weight {reader.input[1]} is not a float32 initializer of this graph, so its input channels are not known"
        return weight.dims[1] * attribute(reader, "group", 1), len(weight.dims) - 2
    if facts().elem_types.get(chain.source) != TensorProto.FLOAT:
        return f"{chain.source} is not known to be float32"
    dims = facts().shape(chain.source)
    if isinstance(dims, str):
        return f"the channels of {chain.source} are not known: {dims}"
    if len(dims) != 4 or not isinstance(dims[1], int):
        return f"{chain.source} is not [N, C, H, W] with a static C: {dims}"
    return dims[1], 2


def _depthwise(graph: onnx.GraphProto, chain: ScalarAffineChain, channels: tuple[int, int], names: NameGenerator) -> onnx.NodeProto:
    """The 1x1 depthwise Conv that writes the chain's result from its source; its weight and bias are added."""
    count, spatial = channels
    last = chain.nodes[0]
    w_name, b_name = names(f"{last.output[0]}_scale"), names(f"{last.output[0]}_offset")
    graph.initializer.extend(
        [
            numpy_helper.from_array(np.full((count, 1) + (1,) * spatial, chain.scale, np.float32), w_name),
            numpy_helper.from_array(np.full(count, chain.offset, np.float32), b_name),
        ]
    )
    return helper.make_node("Conv", [chain.source, w_name, b_name], [last.output[0]], name=names(f"{last.name or last.output[0]}_as_conv"), group=count, kernel_shape=[1] * spatial)
