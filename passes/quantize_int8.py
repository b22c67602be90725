"""quantize-int8: static or dynamic int8, whichever onnxruntime measures faster within the budget.

Rewrites:
  a float model => the result of quantize-static or of quantize-dynamic (see those passes), chosen by
    running both on copies of the model, dropping any that breaks the budget on the calibration feeds,
    and timing the rest against the input, interleaved, at the target settings: the fastest is kept

Refused (changed=False, reasons in `refused`):
  a model that already holds QuantizeLinear/DequantizeLinear or integer kernels: it is quantized already
    (this also makes the pass a no-op in the pipeline's later fixed-point rounds)
  no candidate changed the model, or every one broke the budget, or none was faster than the input
Subgraphs: whatever the chosen pass does with them.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx

from graphopt.graph import copy_model, iter_graphs
from graphopt.passes_base import Pass, PassContext, PassResult, make_pass, register

QUANTIZED_OPS = frozenset(
    {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulInteger", "ConvInteger", "QLinearConv", "QLinearMatMul", "DynamicQuantizeMatMul", "MatMulNBits", "MatMulIntegerToFloat"}
)


def already_quantized(model: onnx.ModelProto) -> bool:
    return any(n.op_type in QUANTIZED_OPS for g in iter_graphs(model.graph) for n in g.node)


@register
@dataclass
class QuantizeInt8(Pass):
    name = "quantize-int8"
    description = "int8: quantize-static or quantize-dynamic, whichever is fastest within the budget"
    lossless = False
    claims = "speed"
    candidates: str = "quantize-static,quantize-dynamic"

    def run(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        if already_quantized(model):
            return PassResult(False, refused=["the model is already quantized"])
        reference = ctx.outputs(model)
        tried: list[tuple[str, onnx.ModelProto, PassResult]] = []
        refused: list[str] = []
        for name in filter(None, (c.strip() for c in self.candidates.split(","))):
            candidate = copy_model(model)
            result = make_pass(name).run(candidate, ctx)
            if not result.changed:
                refused.append(f"{name}: changed nothing" + (f" ({'; '.join(result.refused[:3])})" if result.refused else ""))
                continue
            problem = ctx.budget_problem(reference, candidate)
            if problem:
                refused.append(f"{name}: over budget on the calibration feeds: {problem}")
                continue
            tried.append((name, candidate, result))
        if not tried:
            return PassResult(False, refused=refused)
        timings = ctx.latency([("input", model)] + [(name, m) for name, m, _ in tried])
        ratios = {t.label: t.ratio for t in timings[1:]}
        name, best, result = min(tried, key=lambda item: ratios[item[0]])
        if ratios[name] >= 1.0:
            return PassResult(False, refused=refused + [f"no candidate was faster than the input: latency ratios {_show(ratios)}"])
        model.CopyFrom(best)
        result.notes.append(f"chose {name} by measurement: latency ratios vs the input {_show(ratios)}")
        result.refused = refused + result.refused
        result.details["chosen"] = name
        result.details["latency_ratios"] = ratios
        return result


def _show(ratios: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.3f}" for k, v in ratios.items())
