"""softmax-last-axis: Softmax / LogSoftmax over an axis that is not the last => Transpose, the op over the
last axis, Transpose back.

Rewrites (opset >= 13, where the op normalizes over its one `axis`; every graph whose ranks are known):
  Softmax(x, axis=k)  =>  Transpose(Softmax(Transpose(x, perm=p), axis=r-1), perm=inverse(p))
with r the rank of x and p moving dim k to the end, keeping the others in order ([0, 2, 3, 1] for k=1 of 4).
The same values are computed in the same order, one row at a time, so the result is the same bit for bit.
A Transpose before the op that only it reads is merged into the new one (YOLOv8's DFL head reshapes to
[B, 4, 16, A], transposes to [B, 16, 4, A] and normalizes over axis 1: it becomes one Transpose to
[B, 4, A, 16], the Softmax over the last axis, and the Transpose back).

Why: onnxruntime's CPU Softmax over a non-last axis transposes the input, normalizes and transposes back
inside the kernel, where nothing can merge those transposes with the graph's own. Written out, they can:
YOLOv8n's DFL Softmax took 2.1 ms (7% of the model's kernel time); as one merged Transpose, the Softmax
over the last axis and the Transpose back, 0.46 ms, and the model measured 0.89-0.92 of its former
latency. A lone Softmax gains little (0.96-1.00 on [1, 21, 128, 128] axis 1, [1, 16, 4, 2100] axis 1 and
[8, 12, 64, 64] axis 2), so the pass claims speed: the pipeline keeps it only where the model measures
faster.

Not a match: the op already over the last axis; opset < 13, where the op normalizes over all dims from
`axis` on as one flattened row (already the last dims in memory). Refused (reason recorded): the rank of x
is not known (onnx shape inference gives none and, in the main graph, onnxruntime's observed rank on the
calibration feeds does not settle it; never inside If/Loop/Scan bodies, whose shapes are not observed).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import onnx
from onnx import helper

from graphopt.graph import NameGenerator, attribute, consumers, default_opset, is_op, iter_graphs, output_names, producers, remove_nodes
from graphopt.passes_base import Pass, PassContext, PassResult, register
from graphopt.shapes import all_graph_facts

OPS = ("Softmax", "LogSoftmax")


@register
@dataclass
class SoftmaxLastAxis(Pass):
    name = "softmax-last-axis"
    description = "Softmax/LogSoftmax over a non-last axis => Transpose, the op over the last axis, Transpose back"
    lossless = True
    claims = "speed"

    def run(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        if (default_opset(model) or 0) < 13:
            return PassResult(False)
        names = NameGenerator(model)
        # every rank is taken before any rewrite: the facts describe the model as it comes
        facts = functools.cache(lambda: all_graph_facts(model, functools.cache(lambda: ctx.activations.observed_shapes(model))))
        found, refused = [], []
        for index, graph in enumerate(iter_graphs(model.graph)):
            for node in graph.node:
                if not any(is_op(node, op) for op in OPS):
                    continue
                dims = facts()[index].rank_shape(node.input[0])
                if isinstance(dims, str):
                    refused.append(f"{node.op_type} {node.name or node.output[0]!r}: the rank of its input is not known: {dims}")
                    continue
                rank = len(dims)
                axis = attribute(node, "axis", -1) % max(rank, 1)
                if axis != rank - 1:
                    found.append((graph, node, rank, axis))
        merged = 0
        for graph, node, rank, axis in found:
            merged += _rewrite(graph, node, rank, axis, names)
        counts = {"ops_rewritten": len(found), "transposes_merged": merged} if found else {}
        return PassResult(bool(found), counts=counts, refused=refused)


def _rewrite(graph: onnx.GraphProto, node: onnx.NodeProto, rank: int, axis: int, names: NameGenerator) -> int:
    """Puts the Transposes around `node` and sets its axis to the last; returns 1 if a Transpose before it
    was merged into the new one."""
    perm = [d for d in range(rank) if d != axis] + [axis]
    back = [perm.index(d) for d in range(rank)]
    source, merged = node.input[0], 0
    before = producers(graph).get(source)
    if is_op(before, "Transpose") and len(consumers(graph).get(source, [])) == 1 and source not in output_names(graph):
        earlier = list(attribute(before, "perm", []))
        if len(earlier) == rank:
            perm, source, merged = [earlier[p] for p in perm], before.input[0], 1
            remove_nodes(graph, [before])
    label = node.name or node.output[0]
    moved, normalized = names(f"{node.input[0]}_last_axis"), names(f"{node.output[0]}_last_axis")
    position = list(graph.node).index(node)
    graph.node.insert(position, helper.make_node("Transpose", [source], [moved], name=names(f"{label}_to_last_axis"), perm=perm))
    graph.node.insert(position + 2, helper.make_node("Transpose", [normalized], [node.output[0]], name=names(f"{label}_from_last_axis"), perm=back))
    node.input[0], node.output[0] = moved, normalized
    kept = [a for a in node.attribute if a.name != "axis"]
    del node.attribute[:]
    node.attribute.extend(kept + [helper.make_attribute("axis", rank - 1)])
    return merged
