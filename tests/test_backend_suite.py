"""The ONNX backend node suite through the lossless pipeline.

The installed onnx package generates ~1,900 single-op test models with their inputs and expected outputs
(`onnx.backend.test.case.node.collect_testcases`). For each case whose expected outputs onnxruntime
reproduces (ORT_DISABLE_ALL, the case's own rtol/atol), `graphopt.optimize` with the lossless preset,
strict=True (a pass that raises fails the test) and the case's inputs as the feeds must return a model
that onnxruntime still runs to the expected outputs, keeping graph input and output names. Cases
onnxruntime cannot load, run or get right before any pass are skipped with onnxruntime's reason (e.g.
float8/bfloat16/int4 tensors its Python API cannot take, unimplemented ops, layouts it refuses).

Sequence inputs are fed as Python lists of arrays and optional ones as the value or None; onnxruntime
and graphopt.runtime.run pass them through unchanged.

Cost: generating the cases takes ~10 s at collection, the cases ~60 s of one core.
"""

from __future__ import annotations

import traceback
import warnings

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import graphopt
from graphopt import runtime

DISABLE_ALL = runtime.RuntimeSettings(level="disable_all")


def _collect_cases() -> list:
    """The node test cases; generating them runs numpy references that warn about overflow on purpose."""
    from onnx.backend.test.case.node import collect_testcases

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return list(collect_testcases(None))


CASES = _collect_cases()


def _value(item):
    """A test-data item as onnxruntime takes and returns it: arrays (0-d for numpy scalars), lists for
    sequences, None for an empty optional."""
    if item is None:
        return None
    if isinstance(item, onnx.TensorProto):
        return numpy_helper.to_array(item)
    if isinstance(item, (list, tuple)):
        return [_value(x) for x in item]
    return np.asarray(item)


def _feeds_and_expected(case) -> tuple[list[dict], list[list]]:
    names = [vi.name for vi in case.model.graph.input]
    feeds = [{name: _value(x) for name, x in zip(names, inputs)} for inputs, _ in case.data_sets]
    expected = [[_value(x) for x in outputs] for _, outputs in case.data_sets]
    return feeds, expected


def _ort_outputs(model: onnx.ModelProto, feeds: list[dict]) -> list[list]:
    """Outputs in graph-output order for every feed (raw onnxruntime: lists and None pass through)."""
    sess = runtime.session(model, DISABLE_ALL)
    return [sess.run(None, feed) for feed in feeds]


def _mismatch(expected, got, rtol: float, atol: float, where: str) -> str | None:
    """None if `got` matches `expected` (the onnx backend runner's rules), else what differs, with numbers."""
    if isinstance(expected, list):
        if not isinstance(got, list) or len(got) != len(expected):
            return f"{where}: expected a sequence of {len(expected)}, got {type(got).__name__} {_length(got)}"
        return next((m for i, (e, g) in enumerate(zip(expected, got)) if (m := _mismatch(e, g, rtol, atol, f"{where}[{i}]"))), None)
    if expected is None or got is None:
        return None if expected is got else f"{where}: expected {type(expected).__name__}, got {type(got).__name__}"
    got = np.asarray(got)
    if got.shape != expected.shape:
        return f"{where}: shape {list(got.shape)}, expected {list(expected.shape)}"
    if expected.dtype == object:
        return None if np.array_equal(got, expected) else f"{where}: strings differ: {got!r} vs expected {expected!r}"
    if got.dtype != expected.dtype:
        return f"{where}: dtype {got.dtype}, expected {expected.dtype}"
    if got.dtype.name == "bfloat16":
        rtol, got, expected = max(rtol, 2**-6), got.astype(np.float32), expected.astype(np.float32)
    try:
        np.testing.assert_allclose(got, expected, rtol=rtol, atol=atol)
    except AssertionError as exc:
        numbers = [line.strip() for line in str(exc).splitlines() if line.strip().startswith(("Mismatched", "Max abs", "Max rel"))]
        return f"{where}: " + "; ".join(numbers)
    return None


def _length(value) -> str:
    return f"of {len(value)}" if isinstance(value, list) else ""


def _first_mismatch(case, expected: list[list], got: list[list]) -> str | None:
    names = [o.name for o in case.model.graph.output]
    for feed_no, (exp, out) in enumerate(zip(expected, got)):
        if len(out) != len(exp):
            return f"feed {feed_no}: {len(out)} outputs, expected {len(exp)}"
        for name, e, g in zip(names, exp, out):
            if problem := _mismatch(e, g, case.rtol, case.atol, f"feed {feed_no} output {name!r}"):
                return problem
    return None


def _records_text(report) -> str:
    """One line per pass run (later rounds only where something happened), as in Report.pass_rows."""
    lines = []
    for r in report.records:
        if r.status == "no change" and r.round > 1:
            continue
        line = f"  {r.name} (round {r.round}): {r.status}"
        if r.reason:
            line += f": {r.reason}"
        if r.status == "applied":
            line += f" [nodes {r.before.nodes}->{r.after.nodes}, max abs {r.max_abs:.3g}, {r.counts}]"
        if r.refused:
            line += f" ({len(r.refused)} refused)"
        lines.append(line)
    final = {name: d["max_abs"] for name, d in report.final.items()}
    return "\n".join(lines + [f"  pipeline's own max abs vs the original: {final}"])


def _interface(model: onnx.ModelProto) -> tuple[list[str], list[str]]:
    return [i.name for i in model.graph.input], [o.name for o in model.graph.output]


def _crash_site(exc: BaseException) -> str:
    """The innermost traceback frame inside graphopt or its passes, to name the culprit in the message."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if "/graphopt/" in f.filename or "/passes/" in f.filename]
    return f"{frames[-1].filename}:{frames[-1].lineno} in {frames[-1].name}" if frames else "?"


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_lossless_pipeline_keeps_backend_case_correct(case):
    feeds, expected = _feeds_and_expected(case)
    try:
        before = _ort_outputs(case.model, feeds)
    except Exception as exc:  # onnxruntime raises several unrelated types
        pytest.skip(f"onnxruntime cannot run the original: {str(exc).strip().splitlines()[0][:300]}")
    if problem := _first_mismatch(case, expected, before):
        pytest.skip(f"onnxruntime misses the expected outputs before any pass: {problem[:300]}")

    try:
        result = graphopt.optimize(case.model, data=feeds, strict=True)
    except Exception as exc:
        pytest.fail(f"{case.name}: the lossless pipeline crashed at {_crash_site(exc)}: {type(exc).__name__}: {exc}")

    report = _records_text(result.report)
    assert _interface(result.model) == _interface(case.model), f"{case.name}: graph inputs/outputs changed {_interface(case.model)} -> {_interface(result.model)}\n{report}"
    try:
        after = _ort_outputs(result.model, feeds)
    except Exception as exc:
        pytest.fail(f"{case.name}: onnxruntime cannot run the optimized model: {exc}\n{report}")
    problem = _first_mismatch(case, expected, after)
    assert problem is None, f"{case.name}: optimized model misses the expected outputs (rtol {case.rtol}, atol {case.atol}): {problem}\npasses:\n{report}"
