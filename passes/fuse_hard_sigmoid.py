"""fuse-hard-sigmoid: the hard sigmoid and hard swish that exporters spell out in arithmetic, as HardSigmoid.

Rewrites (every graph; x is any tensor of rank >= 1, the constants are initializers of shape [] or [1]):
  Div(Clip(Add(x, 3), 0, 6), 6)             => HardSigmoid(x, alpha=1/6, beta=0.5)            (hard sigmoid)
  Div(Mul(x, Clip(Add(x, 3), 0, 6)), 6)     => Mul(x, HardSigmoid(x, alpha=1/6, beta=0.5))   (hard swish)
  with Mul(., 1/6) for Div(., 6), operands of Add and Mul in either order, Clip's bounds as inputs
  (opset >= 11) or attributes (older). The last node's output keeps its name.

Why: onnxruntime runs each elementwise node as its own kernel, one pass over the tensor each; the hard swish
of MobileNetV3-style blocks (PP-OCRv4 rec has 28, Paddle's export writes Add, Clip, Mul, Div) takes four
passes where HardSigmoid + Mul take two. More, when the hard swish follows a Conv directly (after
fold-batchnorm), onnxruntime's NCHWc layout pass fuses Conv + HardSigmoid + Mul into one Conv with a
HardSwish activation, which it never does for the arithmetic form: PP-OCRv4 rec's optimized graph then has
28 Convs with activation HardSwish, and the lossless preset went from 0.91 to 0.79 of the original's latency.
HardSwish itself (opset 14) was no faster than HardSigmoid + Mul in an A/B, and would need an opset upgrade,
so it is not written.

Numerics: x/6 + 0.5 instead of (x + 3)/6 differs by float rounding only (PP-OCRv4 rec: 6.3e-6 at most on
its softmax output); the pipeline checks that against onnxruntime's own rounding as for every clean-up.

Refused (reason recorded; the nodes stay): a tensor inside the pattern is read by another node or is a graph
output (rewriting would remove a value something else needs). Not a refusal, just not this pattern: other
constants (Clip(x + 3, 0, 5)), a Clip bound given at run time.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from graphopt.graph import NameGenerator, attribute, consumers, is_op, iter_graphs, output_names, producers, scalar_constant, splice
from graphopt.passes_base import Pass, PassContext, PassResult, register

ALPHA, BETA = 1.0 / 6.0, 0.5


@dataclass
class _Match:
    nodes: list[onnx.NodeProto]  # Add, Clip, [Mul by x,] Div by 6 or Mul by 1/6: removed
    x: str
    output: str  # the last node's output, which the replacement writes
    swish: bool


@register
@dataclass
class FuseHardSigmoid(Pass):
    name = "fuse-hard-sigmoid"
    description = "Clip(x + 3, 0, 6) / 6 (times x) written out in arithmetic => HardSigmoid (+ Mul)"
    lossless = True

    def run(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        names = NameGenerator(model)
        fused = {"hard_sigmoid": 0, "hard_swish": 0}
        refused: list[str] = []
        # Innermost first: rebuilding a graph's node list copies its nodes (and the bodies they hold), so
        # bodies are finished before their owners are rebuilt.
        for graph in reversed(list(iter_graphs(model.graph))):
            matches = _matches(graph, refused)
            if matches:
                splice(graph, [(m.nodes, _replacement(m, names)) for m in matches])
            for m in matches:
                fused["hard_swish" if m.swish else "hard_sigmoid"] += 1
        changed = any(fused.values())
        counts = {**fused, "nodes_removed": 2 * sum(fused.values())} if changed else {}  # 4 -> 2 and 3 -> 1
        return PassResult(changed, counts=counts, refused=refused)


def _matches(graph: onnx.GraphProto, refused: list[str]) -> list[_Match]:
    made_by, read_by, outputs = producers(graph), consumers(graph), output_names(graph)
    found = []
    for clip in graph.node:
        if not is_op(clip, "Clip") or not _clips_to(graph, clip, 0.0, 6.0):
            continue
        add = made_by.get(clip.input[0])
        x = _other_operand(graph, add, 3.0) if add is not None and is_op(add, "Add") else None
        if x is None:
            continue
        gate = clip.output[0]
        swish = next((r for r in read_by.get(gate, []) if is_op(r, "Mul") and sorted(r.input) == sorted([x, gate])), None)
        tail = (swish or clip).output[0]
        scale = next((r for r in read_by.get(tail, []) if _divides_by_six(graph, r, tail)), None)
        if scale is None:
            continue
        chain = [add, clip] + ([swish] if swish else []) + [scale]
        shared = [n.output[0] for n in chain[:-1] if n.output[0] in outputs or len(read_by.get(n.output[0], [])) != 1]
        if shared:
            what = "swish" if swish else "sigmoid"
            refused.append(f"hard {what} ending in {scale.name or scale.output[0]!r}: {shared[0]} is also read elsewhere or is a graph output")
            continue
        found.append(_Match(chain, x, scale.output[0], swish is not None))
    return found


def _replacement(m: _Match, names: NameGenerator) -> list[onnx.NodeProto]:
    stem = m.nodes[-1].name or m.output
    if not m.swish:
        return [helper.make_node("HardSigmoid", [m.x], [m.output], name=names(f"{stem}_hard_sigmoid"), alpha=ALPHA, beta=BETA)]
    gate = names(f"{stem}_hard_sigmoid_out")
    return [
        helper.make_node("HardSigmoid", [m.x], [gate], name=names(f"{stem}_hard_sigmoid"), alpha=ALPHA, beta=BETA),
        helper.make_node("Mul", [m.x, gate], [m.output], name=names(f"{stem}_hard_swish")),
    ]


def _clips_to(graph: onnx.GraphProto, clip: onnx.NodeProto, low: float, high: float) -> bool:
    """Clip's bounds are exactly `low` and `high`: attributes before opset 11, constant inputs after."""
    if any(a.name in ("min", "max") for a in clip.attribute):
        return attribute(clip, "min") == low and attribute(clip, "max") == high
    bounds = list(clip.input[1:3]) + [""] * (3 - len(clip.input))
    return scalar_constant(graph, bounds[0]) == low and scalar_constant(graph, bounds[1]) == high


def _other_operand(graph: onnx.GraphProto, node: onnx.NodeProto, value: float) -> str | None:
    """Of a two-input node, the operand that is not the constant `value` (None when neither is)."""
    a, b = node.input
    if scalar_constant(graph, b) == value:
        return a
    if scalar_constant(graph, a) == value:
        return b
    return None


def _divides_by_six(graph: onnx.GraphProto, node: onnx.NodeProto, operand: str) -> bool:
    if is_op(node, "Div"):
        return node.input[0] == operand and scalar_constant(graph, node.input[1]) == 6.0
    if is_op(node, "Mul"):
        factor = scalar_constant(graph, node.input[1] if node.input[0] == operand else node.input[0])
        return operand in node.input and factor is not None and np.float32(factor) == np.float32(1.0 / 6.0)
    return False

