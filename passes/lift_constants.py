"""lift-constants: Constant nodes become initializers, so other passes can see the weights.

Rewrites (every graph, If/Loop/Scan bodies included: a body's Constant becomes an initializer of that body):
  Constant(value=T)                      => initializer T named after the Constant's output
  Constant(value_float / value_floats)   => float32 scalar / 1-D initializer
  Constant(value_int / value_ints)       => int64 scalar / 1-D initializer
  Constant(value_string / value_strings) => string scalar / 1-D initializer
  A Constant whose output is a graph (or body) output is lifted too: onnxruntime accepts an initializer
  as a graph output, in the main graph and in If/Loop bodies alike.

Refused (the Constant is left as is and the reason recorded):
  Constant(sparse_value)  - densifying can grow the model by orders of magnitude, and sparse initializers
                            are invisible to the passes this one exists for; nothing would be gained.
  any Constant when the model's IR version is below 4 - IR 3 requires every initializer to be listed as a
                            graph input, which would turn each lifted weight into an input the caller can
                            override and change the model's input list; re-export with IR version >= 4.

Model-local functions (model.functions) are left alone: their Constants may refer to function attributes.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx
from onnx import helper

from graphopt.graph import STANDARD_DOMAINS, iter_graphs, remove_nodes, tensor_bytes
from graphopt.passes_base import Pass, PassContext, PassResult, register

_LIST_ATTRIBUTES = {
    "value_floats": onnx.TensorProto.FLOAT,
    "value_ints": onnx.TensorProto.INT64,
    "value_strings": onnx.TensorProto.STRING,
}
_SCALAR_ATTRIBUTES = {
    "value_float": onnx.TensorProto.FLOAT,
    "value_int": onnx.TensorProto.INT64,
    "value_string": onnx.TensorProto.STRING,
}


def is_constant_node(node: onnx.NodeProto) -> bool:
    return node.op_type == "Constant" and node.domain in STANDARD_DOMAINS


def constant_tensor(node: onnx.NodeProto, name: str) -> onnx.TensorProto | str:
    """The tensor a Constant node produces, named `name`, or the reason it cannot be lifted."""
    if len(node.attribute) != 1:
        return f"has {len(node.attribute)} attributes, a valid Constant has exactly one"
    attr = node.attribute[0]
    if attr.name == "value":
        tensor = onnx.TensorProto()
        tensor.CopyFrom(attr.t)
        tensor.name = name
        return tensor
    if attr.name == "sparse_value":
        return "holds a sparse_value; densifying could grow the model and sparse initializers help no other pass"
    if attr.name in _SCALAR_ATTRIBUTES:
        return helper.make_tensor(name, _SCALAR_ATTRIBUTES[attr.name], [], [helper.get_attribute_value(attr)])
    if attr.name in _LIST_ATTRIBUTES:
        values = list(helper.get_attribute_value(attr))
        return helper.make_tensor(name, _LIST_ATTRIBUTES[attr.name], [len(values)], values)
    return f"has an unknown attribute {attr.name!r}"


def _liftable(node: onnx.NodeProto) -> bool:
    """A Constant whose output has a name (an unnamed one is dead code, for remove-dead-code)."""
    return is_constant_node(node) and bool(node.output) and bool(node.output[0])


def _node_label(node: onnx.NodeProto) -> str:
    return f"Constant {node.name or '(unnamed)'} -> {node.output[0]}"


@register
@dataclass
class LiftConstants(Pass):
    name = "lift-constants"
    description = "Turn Constant nodes into initializers (all graphs, subgraph bodies included)"
    lossless = True

    def run(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        graphs = list(iter_graphs(model.graph))
        constants = [n for g in graphs for n in g.node if _liftable(n)]
        if constants and model.ir_version < 4:
            reason = (
                f"model IR version {model.ir_version} requires initializers to be graph inputs, which would make "
                f"{len(constants)} lifted constant(s) overridable inputs; re-export with IR version >= 4"
            )
            return PassResult(changed=False, refused=[reason])

        refused: list[str] = []
        lifted = lifted_bytes = 0
        for graph in graphs:
            doomed = []
            for node in filter(_liftable, graph.node):
                tensor = constant_tensor(node, node.output[0])
                if isinstance(tensor, str):
                    refused.append(f"{_node_label(node)}: {tensor}")
                    continue
                graph.initializer.append(tensor)
                doomed.append(node)
                lifted_bytes += tensor_bytes(tensor)
            lifted += remove_nodes(graph, doomed)
        return PassResult(changed=lifted > 0, counts={"constants_lifted": lifted, "bytes_lifted": lifted_bytes}, refused=refused)
