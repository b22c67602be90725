"""quantize-int8: static, dynamic or both, whichever onnxruntime measures faster within the budget.

Rewrites:
  a float model => the result of quantize-dynamic, of quantize-static, or of quantize-static run on
    quantize-dynamic's result (see those passes), chosen by running each on a copy of the model, dropping
    any that breaks the budget on the calibration feeds, and timing each against the input (interleaved,
    at the target settings): the fastest is kept
A candidate "a+b" runs b on what candidate a produced (a's model is reused, not rebuilt). It is tried only
when a was kept and quantized an op type b cannot (b's `op_types`): otherwise it is b alone with fewer
nodes to choose from, and costs b's whole search again (PP-OCRv4: 30 s, MiniLM: 20 s, for nothing). The
captcha recognizer (Conv + LSTM) is the case it is for: its LSTM has only a dynamic kernel, its Convs only
static ones (0.69x the input dynamic, 0.92x static, 0.60x both).
Candidates run in the order given, dynamic first because it is cheap; the best latency ratio reached so
far is handed to each later candidate that has a `max_latency_ratio` option (quantize-static), relative
to the model it starts from, and it then refuses as soon as it knows it cannot beat it, before its
accuracy search (MiniLM: static's search took 27 s of the 108 s int8 preset for a model slower than the
dynamic one).

`keep_float` (a regular expression of node names) is handed to every candidate that takes it.

Refused (changed=False, reasons in `refused`):
  a model that already holds QuantizeLinear/DequantizeLinear or integer kernels: it is quantized already
    (this also makes the pass a no-op in the pipeline's later fixed-point rounds)
  no candidate changed the model, or every one broke the budget, or none was faster than the input
Subgraphs: whatever the chosen pass does with them.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx

from graphopt import profiling
from graphopt.graph import copy_model, iter_graphs
from graphopt.passes import qdq
from graphopt.passes_base import Pass, PassContext, PassResult, make_pass, register, registry, takes_option

QUANTIZING_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"})


def already_quantized(model: onnx.ModelProto) -> bool:
    """Whether some node quantizes or dequantizes, or is an integer kernel."""
    return any(n.op_type in QUANTIZING_OPS or profiling.is_integer_kernel(n.op_type) for g in iter_graphs(model.graph) for n in g.node)


@register
@dataclass
class QuantizeInt8(Pass):
    name = "quantize-int8"
    description = "int8: quantize-static or quantize-dynamic, whichever is fastest within the budget"
    lossless = False
    claims = "speed"
    fits_budget = True
    candidates: str = "quantize-dynamic,quantize-static,quantize-dynamic+quantize-static"
    keep_float: str = ""  # a regular expression of node names every candidate leaves float

    def __post_init__(self) -> None:
        qdq.KeepFloat(self.keep_float)  # a bad expression is the user's error, now, not a candidate's refusal

    def run(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        if already_quantized(model):
            return PassResult(False, refused=["the model is already quantized"])
        reference = ctx.outputs(model)
        ratios: dict[str, float] = {}
        tried: dict[str, tuple[onnx.ModelProto, PassResult]] = {}
        refused: list[str] = []
        for name in filter(None, (c.strip() for c in self.candidates.split(","))):
            prefix, _, step = name.rpartition("+")
            if prefix and prefix not in tried:
                refused.append(f"{name}: not tried, {prefix} was not kept")
                continue
            if prefix and not _beyond(tried[prefix][1], step):
                refused.append(f"{name}: not tried, {prefix} quantized nothing {step} cannot (it would be {step} alone)")
                continue
            start, start_ratio = (tried[prefix][0], ratios[prefix]) if prefix else (model, 1.0)
            candidate = copy_model(start)
            result = make_pass(step, _options(step, ratios, start_ratio, self.keep_float)).run(candidate, ctx)
            if not result.changed:
                refused.append(f"{name}: changed nothing" + (f" ({'; '.join(result.refused[:3])})" if result.refused else ""))
                continue
            problem = ctx.budget_problem(reference, candidate)
            if problem:
                refused.append(f"{name}: over budget on the calibration feeds: {problem}")
                continue
            ratios[name] = ctx.latency([("input", model), (name, candidate)])[1].ratio
            tried[name] = (candidate, _chained(tried[prefix][1], prefix, result, step) if prefix else result)
        if not tried:
            return PassResult(False, refused=refused)
        name = min(ratios, key=ratios.__getitem__)
        if ratios[name] >= 1.0:
            return PassResult(False, refused=refused + [f"no candidate was faster than the input: latency ratios {_show(ratios)}"])
        best, result = tried[name]
        model.CopyFrom(best)
        result.notes.append(f"chose {name} by measurement: latency ratios vs the input {_show(ratios)}")
        result.refused = refused + result.refused
        result.details["chosen"] = name
        result.details["latency_ratios"] = ratios
        return result


def _options(name: str, ratios: dict[str, float], start_ratio: float, keep_float: str) -> dict[str, str]:
    """The options pass `name` gets, where it takes them: `keep_float`, and as `max_latency_ratio` the
    best ratio to the input so far divided by the ratio of the model the pass starts from, never above 1
    (a candidate slower than its start is no bar)."""
    cls = registry().get(name)
    options = {"keep_float": keep_float} if keep_float and takes_option(cls, "keep_float") else {}
    if ratios and takes_option(cls, "max_latency_ratio"):
        options["max_latency_ratio"] = repr(min(1.0, min(ratios.values()) / start_ratio))
    return options


def _beyond(result: PassResult, name: str) -> set[str]:
    """Op types `result` quantized that pass `name` cannot (all of them when it does not say)."""
    done = set(result.details.get("quantized", {}))
    return done - set(getattr(registry().get(name), "op_types", ()))


def _chained(first: PassResult, first_name: str, second: PassResult, second_name: str) -> PassResult:
    """One result for two passes run in turn: notes and refusals of both (each named), ops quantized
    summed, nodes kept float listed with the pass that kept them."""
    kept = [dict(k, detail=f"{name}: {k['detail']}") for name, r in ((first_name, first), (second_name, second)) for k in r.details.get("kept_float", [])]
    return PassResult(
        changed=True,
        counts=_summed(first.counts, second.counts),
        details={**second.details, "quantized": _summed(first.details.get("quantized", {}), second.details.get("quantized", {})), "kept_float": kept},
        notes=[f"{first_name}: {n}" for n in first.notes] + [f"{second_name}: {n}" for n in second.notes],
        refused=[f"{first_name}: {r}" for r in first.refused] + [f"{second_name}: {r}" for r in second.refused],
    )


def _summed(a: dict, b: dict) -> dict:
    return {k: a.get(k, 0) + b.get(k, 0) for k in {**a, **b}}


def _show(ratios: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.3f}" for k, v in ratios.items())
