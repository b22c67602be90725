"""Models whose outputs are random, which no pass can be validated on by comparing outputs.

A Dropout in training mode (training_mode a constant true, opset >= 12) drops different elements on every
run at ORT_DISABLE_ALL, the level graphopt validates at. onnxruntime removes every Dropout whose mask
nothing reads at any level above that (its EliminateDropout rule ignores training_mode), so deployed, such
a model is the inference model. PyTorch's dynamo exporter writes one for each dropout of a module left in
train() mode (the legacy exporter puts the module in eval mode itself). `as_deployed` turns those Dropouts
to inference mode, which is the model onnxruntime deploys, and says so; what stays random (a random-number
op, or a training-mode Dropout whose mask is read, which onnxruntime keeps) is a user error naming the node.
"""

from __future__ import annotations

import onnx
from onnx import numpy_helper

from graphopt.errors import UserError
from graphopt.graph import STANDARD_DOMAINS, consumers, copy_model, iter_graphs, output_names, producers

RANDOM_OPS = ("RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli")


def as_deployed(model: onnx.ModelProto, what: str = "the input model") -> tuple[onnx.ModelProto, str | None]:
    """`model` itself when nothing in it is random, else a copy with its training-mode Dropouts in inference
    mode (the model onnxruntime deploys) and a note naming them. Raises UserError for a node that stays
    random whatever the optimization level."""
    _refuse_random(model, what)
    training = [_label(n) for g in iter_graphs(model.graph) for n in _training_dropouts(g)]
    if not training:
        return model, None
    deployed = copy_model(model)
    for graph in iter_graphs(deployed.graph):
        for node in _training_dropouts(graph):
            del node.input[2:]  # training_mode defaults to false
    shown = ", ".join(training[:3]) + (f" and {len(training) - 3} more" if len(training) > 3 else "")
    count = "a Dropout" if len(training) == 1 else f"{len(training)} Dropouts"
    note = (
        f"{what} has {count} in training mode ({shown}; exported from a module left in train() mode?): "
        "its outputs are random at ORT_DISABLE_ALL, and onnxruntime removes such Dropouts at every other level, so they were "
        "set to inference mode, and every result was compared with that model, the one onnxruntime deploys"
    )
    return deployed, note


def _training_dropouts(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """Dropouts of this graph whose training_mode (input 2, opset >= 12) is a constant true (an initializer or a
    Constant node)."""
    found = []
    made_by = producers(graph)
    inits = {t.name: t for t in graph.initializer}
    inputs = {i.name for i in graph.input}
    for node in graph.node:
        if node.op_type != "Dropout" or node.domain not in STANDARD_DOMAINS or len(node.input) < 3 or not node.input[2]:
            continue
        name = node.input[2]
        if name in inits and name not in inputs:
            tensor = inits[name]
        elif (maker := made_by.get(name)) is not None and maker.op_type == "Constant" and maker.attribute and maker.attribute[0].name == "value":
            tensor = maker.attribute[0].t
        else:
            continue
        if bool(numpy_helper.to_array(tensor).reshape(-1)[:1].any()):
            found.append(node)
    return found


def _refuse_random(model: onnx.ModelProto, what: str) -> None:
    for graph in iter_graphs(model.graph):
        read = consumers(graph)
        outputs = output_names(graph)
        for node in graph.node:
            if node.domain not in STANDARD_DOMAINS:
                continue
            if node.op_type in RANDOM_OPS:
                raise UserError(
                    f"{what} draws random numbers ({_label(node)}), so its outputs differ from run to run and no "
                    "rewrite can be checked against them; make the randomness a graph input (export the noise as an argument)"
                )
        for node in _training_dropouts(graph):
            mask = node.output[1] if len(node.output) > 1 else ""
            if mask and (mask in read or mask in outputs):
                raise UserError(
                    f"{what} has {_label(node)} in training mode with its mask output {mask!r} read, which onnxruntime "
                    "keeps at every optimization level, so its outputs are random; export the model in inference mode "
                    "(PyTorch: model.eval() before torch.onnx.export)"
                )


def _label(node: onnx.NodeProto) -> str:
    return f"{node.op_type} {node.name!r}" if node.name else f"{node.op_type} -> {node.output[0]!r}"
