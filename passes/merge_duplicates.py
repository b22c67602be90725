"""merge-duplicate-nodes: common-subexpression elimination.

Rewrite (every graph, each body on its own):
  two nodes with the same domain, op_type, inputs (names and order, empty optional inputs included), output
    slots (how many, which are empty) and attributes => the later one goes, its readers read the earlier one's outputs

Attributes are compared serialized, sorted by name, with the internal name of a tensor attribute ignored
(so two `Constant` nodes holding the same value merge; zero-input nodes merge like any other). Subgraph
attributes are compared too: two If/Loop/Scan nodes merge only when their bodies are byte-identical after
their own duplicates were merged. One walk in graph order reaches the fixed point: readers are renamed as
the walk reaches them (onnx requires topological order), so merging two Shape nodes makes the Gathers
that read them duplicates by the time the walk gets there.

A graph output keeps its name: when the later node's output is a graph output, the earlier node is renamed
to produce it.

Not merged, not reported: non-deterministic nodes (RandomNormal/RandomUniform/...Like, Multinomial,
Bernoulli, Dropout before opset 7 without is_test=1 or with a training_mode that is not a constant false), and nodes whose
bodies hold one: two draws are two different tensors.
Refused (named in `refused`, the later node stays):
  duplicates of an op outside the onnx domains ('', ai.onnx, ai.onnx.ml), directly or inside a body:
    a custom op may be stateful or random
  duplicates whose outputs in the same slot are both graph outputs: each name needs its own producer
Duplicates across scopes (a body node repeating an outer node) are not merged.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import onnx

from graphopt.graph import STANDARD_DOMAINS, default_opset, NON_DETERMINISTIC, constant_value, output_names, remove_nodes, rename_node_reads, rename_uses_all, subgraphs
from graphopt.passes_base import Pass, PassContext, PassResult, register

ONNX_DOMAINS = ("", "ai.onnx", "ai.onnx.ml")

Key = tuple  # (domain, op_type, overload, inputs, output slots, serialized attributes)


@dataclass
class _Outcome:
    merged: dict[str, int] = field(default_factory=dict)
    refused: list[str] = field(default_factory=list)


@register
@dataclass
class MergeDuplicateNodes(Pass):
    name = "merge-duplicate-nodes"
    description = "Merge nodes computing the same op on the same inputs with the same attributes (CSE)"
    lossless = True

    def run(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        opset = default_opset(model) or 0
        outcome = _Outcome()
        _merge_graph(model.graph, opset, outcome)
        counts: dict[str, int] = {"nodes_merged": sum(outcome.merged.values())}
        counts.update({f"{op}_merged": k for op, k in sorted(outcome.merged.items())})
        return PassResult(changed=counts["nodes_merged"] > 0, counts=counts, refused=outcome.refused)


def _merge_graph(graph: onnx.GraphProto, opset: int, outcome: _Outcome) -> None:
    """Merge the duplicates of `graph` and, as the walk reaches them, of the bodies its nodes hold."""
    first_of: dict[Key, onnx.NodeProto] = {}
    redirect: dict[str, str] = {}  # output of a duplicate -> the same output of the first node
    pairs: list[tuple[onnx.NodeProto, onnx.NodeProto]] = []  # (first, duplicate)
    for node in graph.node:
        if redirect:
            rename_node_reads(node, redirect)
        for body in subgraphs(node):
            _merge_graph(body, opset, outcome)  # bodies first: the node's key compares their final form
        if _is_random(node, graph, opset):
            continue
        first = first_of.setdefault(_key(node), node)
        if first is node:
            continue
        foreign = _foreign_op(node)
        if foreign is not None:
            outcome.refused.append(
                f"{_label(node)} duplicates {_label(first)}, but op {foreign.op_type} of domain "
                f"'{foreign.domain}' may be stateful or random"
            )
            continue
        redirect.update((dup, kept) for kept, dup in zip(first.output, node.output) if dup)
        pairs.append((first, node))
    _settle(graph, pairs, outcome)


def _settle(graph: onnx.GraphProto, pairs: list[tuple[onnx.NodeProto, onnx.NodeProto]], outcome: _Outcome) -> None:
    """Remove the duplicates, keeping graph output names.

    Readers already read the first node's outputs. A duplicate's graph output is taken over by the first
    node (renamed to produce it) unless that output slot already carries a graph output name.
    """
    outputs = output_names(graph)
    carrier: dict[str, str] = {}  # first node's output -> the graph output name it takes over
    producer: dict[str, onnx.NodeProto] = {}
    doomed = []
    for first, dup in pairs:
        slots = [(kept, gone) for kept, gone in zip(first.output, dup.output) if gone in outputs]
        clashes = [(carrier.get(kept, kept), gone) for kept, gone in slots if carrier.get(kept, kept) in outputs]
        if clashes:
            named = "; ".join(f"{held} and {gone}" for held, gone in clashes)
            outcome.refused.append(
                f"{_label(dup)} duplicates {_label(first)}, but both are graph outputs ({named}) and each needs a producer"
            )
            continue
        for kept, gone in slots:
            carrier[kept] = gone
            producer[kept] = first
        doomed.append(dup)
        outcome.merged[dup.op_type] = outcome.merged.get(dup.op_type, 0) + 1
    for kept, name in carrier.items():
        node = producer[kept]
        node.output[list(node.output).index(kept)] = name
    if carrier:
        rename_uses_all(graph, carrier)
    remove_nodes(graph, doomed)


def _key(node: onnx.NodeProto) -> Key:
    """What makes two nodes compute the same outputs (node name, doc string and metadata do not)."""
    domain = "" if node.domain == "ai.onnx" else node.domain
    slots = tuple(bool(o) for o in node.output)
    attributes = tuple(_attribute_bytes(a) for a in sorted(node.attribute, key=lambda a: a.name))
    return (domain, node.op_type, node.overload, tuple(node.input), slots, attributes)


def _attribute_bytes(attr: onnx.AttributeProto) -> bytes:
    """The attribute serialized, without its doc string or a tensor value's own name (neither changes the value)."""
    if attr.doc_string or (attr.type == onnx.AttributeProto.TENSOR and attr.t.name):
        attr = _copy(attr)
        attr.doc_string = ""
        attr.t.name = ""
    return attr.SerializeToString(deterministic=True)


def _copy(attr: onnx.AttributeProto) -> onnx.AttributeProto:
    copy = onnx.AttributeProto()
    copy.CopyFrom(attr)
    return copy


def _is_random(node: onnx.NodeProto, graph: onnx.GraphProto, opset: int) -> bool:
    """Whether `node` (or a node in its bodies) draws random numbers, so that two copies differ."""
    if node.domain in STANDARD_DOMAINS:
        if node.op_type in NON_DETERMINISTIC or (node.op_type == "Dropout" and _dropout_trains(node, graph, opset)):
            return True
    return any(_is_random(inner, body, opset) for body in subgraphs(node) for inner in body.node)


def _dropout_trains(node: onnx.NodeProto, graph: onnx.GraphProto, opset: int) -> bool:
    """Dropout trains (draws a mask) before opset 7 without is_test=1, and from opset 12 unless its
    training_mode is absent or a constant false initializer of this graph."""
    if opset < 7:
        return not any(a.name == "is_test" and a.i == 1 for a in node.attribute)
    if len(node.input) < 3 or not node.input[2]:
        return False
    training = constant_value(graph, node.input[2])
    return training is None or bool(training)


def _foreign_op(node: onnx.NodeProto) -> onnx.NodeProto | None:
    """`node`, or a node in its bodies, whose domain is not an onnx one; None when there is none."""
    if node.domain not in ONNX_DOMAINS:
        return node
    inner = (_foreign_op(n) for body in subgraphs(node) for n in body.node)
    return next((found for found in inner if found is not None), None)


def _label(node: onnx.NodeProto) -> str:
    return f"{node.op_type} {node.name or '(unnamed)'} (-> {', '.join(o for o in node.output if o)})"
