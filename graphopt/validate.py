"""Fidelity: how far one model's outputs are from another's, and the lossless tolerance.

Definitions (per output, over all validation feeds):
- max_abs: the largest |candidate - reference| over all elements.
- max_rel: max_abs divided by the largest |reference| (error relative to the output's scale; an
  element-wise ratio explodes on near-zero elements and says nothing).
- cosine: the lowest per-feed cosine similarity of the flattened outputs.
- top1: share of positions whose argmax over the last axis agrees, for outputs that look like class
  scores: float with a last axis of 2..100000 entries, and either rank 2 ([batch, classes] logits or
  probabilities) or probabilities along the last axis (non-negative, rows summing to 1, e.g. a CTC
  recognizer's [batch, time, classes] softmax). None otherwise: the argmax over a transformer's hidden
  units or a detector's anchors ([1, 4 + classes, anchors]) means nothing, and would fail any budget.

A lossless rewrite must match within float rounding: integer and bool outputs exactly, NaNs in the same
places, shapes equal, and max_abs <= rtol * max(1, max|reference|) + atol, or, when a rounding floor is
given, at most ROUNDING_FLOOR_FACTOR times that floor. The floor of an output is the larger of two moves of
it on the same model and feeds that change nothing but float rounding: onnxruntime's own graph
optimizations (ORT_ENABLE_ALL vs ORT_DISABLE_ALL), and every weight of a Conv/ConvTranspose/Gemm/MatMul
moved by one ulp in a random direction (what folding another node into a weight does to it). Reassociating
float sums in a deep network differs by that much whoever does it (measured: 4.2e-5 on PP-OCRv4 rec's
softmax, 3.2e-5 on MiniLM's hidden state, for onnxruntime's optimizations), and a real bug differs by orders
of magnitude more. The weights' share is needed where graphopt folds more than onnxruntime does: on 16
PP-OCRv4 text lines onnxruntime's optimizations (which fold its 6 BatchNormalizations) moved the softmax by
1.3e-5, fold-batchnorm (the 6 and 28 per-channel Mul/Add pairs) by 5.65e-5, and weights one ulp off by
3.1e-5, 5.1e-5 and 2.2e-5 (seeds 0, 1, 2; the floor uses seed 0).

The floor is measured on the model the lossless pass rewrites: the input, or, once a lossy pass was kept
(graphopt.pipeline), that pass's output. A quantized model's floor is far wider, since a rounding that
flips an activation's quantization moves it by a whole step (MiniLM after quantize-dynamic: 0.36-0.46 on
the hidden state under onnxruntime's own optimizations), so what such a floor admits must also keep the
budget against the original.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import onnx
from onnx import numpy_helper

from graphopt.errors import UserError
from graphopt.graph import STANDARD_DOMAINS, copy_model, iter_graphs

LOSSLESS_RTOL = 1e-5
LOSSLESS_ATOL = 1e-6
ROUNDING_FLOOR_FACTOR = 2.0


@dataclass
class OutputDiff:
    name: str
    max_abs: float
    max_rel: float
    cosine: float | None
    top1: float | None
    shape_mismatch: str | None = None
    nan_mismatch: bool = False
    exact_kind: bool = False  # integer/bool/string output: must be equal

    def as_dict(self) -> dict:
        return asdict(self)


def compare(reference: list[dict[str, np.ndarray]], candidate: list[dict[str, np.ndarray]]) -> dict[str, OutputDiff]:
    """Per-output differences between two lists of run results on the same feeds."""
    if not reference:
        return {}
    diffs: dict[str, OutputDiff] = {}
    for name in reference[0]:
        diffs[name] = _compare_output(name, [r[name] for r in reference], [c.get(name, _MISSING) for c in candidate])
    return diffs


_MISSING = object()


def _parts(value) -> list[np.ndarray]:
    """An output as a flat list of arrays: a tensor is one part, a sequence its elements, an empty
    optional none, a map one row [1, n] of its values in key order (a ZipMap's class probabilities,
    which top-1 agreement then applies to; the keys are compared apart, see `_map_keys`)."""
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [part for item in value for part in _parts(item)]
    if isinstance(value, dict):
        return [np.asarray([value[k] for k in sorted(value)])[None]]
    return [np.asarray(value)]


def _map_keys(value) -> list[tuple]:
    """The keys of every map in an output, in `_parts` order (none for tensors)."""
    if isinstance(value, (list, tuple)):
        return [keys for item in value for keys in _map_keys(item)]
    return [tuple(sorted(value))] if isinstance(value, dict) else []


def _compare_output(name: str, refs: list, cands: list) -> OutputDiff:
    max_abs = 0.0
    scale = 0.0
    cosines: list[float] = []
    agree = total = 0
    exact_kind = False
    nan_mismatch = False
    for ref_value, cand_value in zip(refs, cands):
        if cand_value is _MISSING:
            return OutputDiff(name, float("inf"), float("inf"), None, None, shape_mismatch="output missing")
        ref_parts, cand_parts = _parts(ref_value), _parts(cand_value)
        if _map_keys(ref_value) != _map_keys(cand_value):
            return OutputDiff(name, float("inf"), float("inf"), None, None, shape_mismatch="the keys of its maps changed")
        if len(ref_parts) != len(cand_parts):
            return OutputDiff(name, float("inf"), float("inf"), None, None, shape_mismatch=f"{len(ref_parts)} tensors became {len(cand_parts)}")
        for ref, cand in zip(ref_parts, cand_parts):
            if ref.shape != cand.shape:
                return OutputDiff(name, float("inf"), float("inf"), None, None, shape_mismatch=f"shape {list(ref.shape)} became {list(cand.shape)}")
            if ref.dtype.kind not in "fc":
                exact_kind = True
                if not np.array_equal(ref, cand):
                    max_abs = max(max_abs, _exact_difference(ref, cand))
                continue
            ref64, cand64 = ref.astype(np.float64), cand.astype(np.float64)
            ref_nan, cand_nan = np.isnan(ref64), np.isnan(cand64)
            if not np.array_equal(ref_nan, cand_nan):
                nan_mismatch = True
            finite = ~(ref_nan | cand_nan)
            if ref64.size:
                with np.errstate(invalid="ignore", over="ignore"):
                    delta = np.abs(np.where(finite, ref64 - cand64, 0.0))
                    delta = np.where(np.isinf(ref64) & (ref64 == cand64), 0.0, delta)
                    max_abs = max(max_abs, float(np.nan_to_num(delta, nan=np.inf).max()))
                    scale = max(scale, float(np.abs(np.where(finite & np.isfinite(ref64), ref64, 0.0)).max()))
                    cosines.append(_cosine(np.where(finite, ref64, 0.0).ravel(), np.where(finite, cand64, 0.0).ravel()))
                if _looks_like_scores(ref):
                    agree += int(np.sum(np.argmax(ref, axis=-1) == np.argmax(cand, axis=-1)))
                    total += int(np.prod(ref.shape[:-1]))
    max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else float("inf"))
    return OutputDiff(
        name,
        max_abs,
        max_rel,
        min(cosines) if cosines else None,
        agree / total if total else None,
        nan_mismatch=nan_mismatch,
        exact_kind=exact_kind,
    )


def _exact_difference(ref: np.ndarray, cand: np.ndarray) -> float:
    """Largest difference of two unequal non-float arrays (inf for strings and objects)."""
    if ref.dtype.kind in "OUS" or cand.dtype.kind in "OUS":
        return float("inf")
    return float(np.max(np.abs(ref.astype(np.float64) - cand.astype(np.float64))))


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity; NaN when the values overflow float64 (infinite outputs)."""
    with np.errstate(invalid="ignore", over="ignore"):
        na, nb = np.linalg.norm(a), np.linalg.norm(b)
        if na == 0 and nb == 0:
            return 1.0
        if na == 0 or nb == 0:
            return 0.0
        return float(np.dot(a, b) / (na * nb))


def _looks_like_scores(array: np.ndarray) -> bool:
    if array.dtype.kind != "f" or array.ndim < 2 or not 2 <= array.shape[-1] <= 100_000:
        return False
    if array.ndim == 2:
        return True
    with np.errstate(invalid="ignore", over="ignore"):
        return bool(np.all(array >= 0) and np.allclose(array.sum(axis=-1, dtype=np.float64), 1.0, atol=1e-3))


def output_scale(reference: list[dict[str, np.ndarray]], name: str) -> float:
    """The largest finite |value| of a float output over all feeds (0 when there is none)."""
    scale = 0.0
    for r in reference:
        for part in _parts(r[name]):
            finite = part[np.isfinite(part)] if part.dtype.kind == "f" else part[:0]
            if finite.size:
                scale = max(scale, float(np.abs(finite).max()))
    return scale


def lossless_violation(
    diffs: dict[str, OutputDiff],
    reference: list[dict[str, np.ndarray]],
    rtol: float = LOSSLESS_RTOL,
    atol: float = LOSSLESS_ATOL,
    floors: dict[str, float] | None = None,
) -> str | None:
    """None when every output matches within float rounding, else a sentence naming the output and numbers.
    `floors`: output name -> onnxruntime's own optimization difference on that output (see the module doc)."""
    for name, d in diffs.items():
        if d.shape_mismatch:
            return f"output {name!r}: {d.shape_mismatch}"
        if d.nan_mismatch:
            return f"output {name!r}: NaNs appear in different places"
        if d.exact_kind:
            if d.max_abs != 0:
                return f"output {name!r} (integer/bool) changed: max abs difference {d.max_abs:g}"
            continue
        limit = rtol * max(1.0, output_scale(reference, name)) + atol
        if floors and floors.get(name, 0.0) * ROUNDING_FLOOR_FACTOR > limit:
            limit = floors[name] * ROUNDING_FLOOR_FACTOR
        if not d.max_abs <= limit:
            return f"output {name!r}: max abs error {d.max_abs:.3g} > tolerance {limit:.3g} (max rel {d.max_rel:.3g})"
    return None


def rounding_floors(disabled: list[dict[str, np.ndarray]], *variants: list[dict[str, np.ndarray]]) -> dict[str, float]:
    """Per output: the largest max abs difference between a model's outputs (run with ORT_DISABLE_ALL) and
    those of any of its rounding variants (the model with ORT_ENABLE_ALL, its weights one ulp off)."""
    floors: dict[str, float] = {}
    for outputs in variants:
        for name, d in compare(disabled, outputs).items():
            if not d.exact_kind and not d.shape_mismatch:
                floors[name] = max(floors.get(name, 0.0), d.max_abs)
    return floors


WEIGHT_INPUTS = {"Conv": (1, 2), "ConvTranspose": (1, 2), "Gemm": (1, 2), "MatMul": (1,)}


def weights_one_ulp_off(model: onnx.ModelProto, seed: int = 0) -> onnx.ModelProto:
    """A copy of `model` whose float32 constant weights and biases of Conv/ConvTranspose/Gemm/MatMul
    (initializers or Constant nodes, in every graph) are each moved by one ulp, up or down at random."""
    rng = np.random.default_rng(seed)
    moved = copy_model(model)
    for graph in iter_graphs(moved.graph):
        names = set()
        for node in graph.node:
            if node.op_type in WEIGHT_INPUTS and node.domain in STANDARD_DOMAINS:
                names.update(node.input[k] for k in WEIGHT_INPUTS[node.op_type] if k < len(node.input) and node.input[k])
        tensors = [t for t in graph.initializer if t.name in names]
        tensors += [a.t for n in graph.node if n.op_type == "Constant" and n.output[0] in names for a in n.attribute if a.name == "value"]
        for t in tensors:
            if t.data_type == onnx.TensorProto.FLOAT:
                value = numpy_helper.to_array(t)
                toward = np.where(rng.random(value.shape) < 0.5, np.inf, -np.inf).astype(np.float32)  # float32: a float64 target steps in float64
                t.CopyFrom(numpy_helper.from_array(np.nextafter(value, toward), t.name))
    return moved


def worst(diffs: dict[str, OutputDiff]) -> tuple[float, float]:
    """(max abs, max rel) over all outputs."""
    if not diffs:
        return 0.0, 0.0
    return max(d.max_abs for d in diffs.values()), max(d.max_rel for d in diffs.values())


FIDELITY_KEYS = ("cosine", "top1", "rel")


@dataclass
class Budget:
    """What a lossy pass may cost, judged against the original model's outputs on the same feeds.

    Fidelity floors apply per output: `min_cosine` (lowest per-feed cosine), `min_top1` (argmax agreement,
    for outputs that look like class scores) and `max_rel` (max abs error / output scale; off by default),
    with `per_output` overriding them by output name ({"logits": {"top1": 0.995}}). Integer and bool
    outputs must agree exactly on at least `min_top1` of their elements. With a `metric(outputs, labels)`
    (higher is better) and labelled feeds, the floors are replaced by: the metric may drop by at most
    `max_drop` from the original's value."""

    min_cosine: float = 0.99
    min_top1: float = 0.99
    max_rel: float | None = None
    per_output: dict[str, dict[str, float]] = field(default_factory=dict)
    metric: Callable[[list[dict[str, np.ndarray]], list[np.ndarray]], float] | None = None
    max_drop: float = 0.01

    def tightened(self, share: float = 0.5) -> "Budget":
        """This budget with `share` of its allowed loss (1 - floor, the relative error, the metric drop):
        what a choice fitted on the calibration feeds aims at, so that it still holds on feeds it never saw
        (PP-OCRv4 rec: cosine 0.99 on the calibration text lines was 0.974 on the validation ones). A share
        above 1 loosens it: the pipeline asks whether a result over budget is within twice its loss."""

        def tighter(key: str, value: float | None) -> float | None:
            if value is None:
                return None
            return value * share if key == "rel" else 1.0 - (1.0 - value) * share

        return replace(
            self,
            min_cosine=tighter("cosine", self.min_cosine),
            min_top1=tighter("top1", self.min_top1),
            max_rel=tighter("rel", self.max_rel),
            per_output={name: {k: tighter(k, v) for k, v in floors.items()} for name, floors in self.per_output.items()},
            max_drop=self.max_drop * share,
        )

    def floors(self, name: str) -> dict[str, float | None]:
        base = {"cosine": self.min_cosine, "top1": self.min_top1, "rel": self.max_rel}
        base.update(self.per_output.get(name, {}))
        return base

    def violation(self, reference: list[dict[str, np.ndarray]], candidate: list[dict[str, np.ndarray]], labels: list[np.ndarray] | None = None) -> str | None:
        """None when `candidate` is within budget of `reference`, else a sentence naming output and numbers."""
        diffs = compare(reference, candidate)
        for name, d in diffs.items():
            if d.shape_mismatch:
                return f"output {name!r}: {d.shape_mismatch}"
        if self.metric is not None and labels is not None:
            before, after = self.metric(reference, labels), self.metric(candidate, labels)
            if after < before - self.max_drop:
                return f"metric {getattr(self.metric, '__name__', 'metric')} dropped from {before:.4f} to {after:.4f} (allowed drop {self.max_drop})"
            return None
        for name, d in diffs.items():
            floors = self.floors(name)
            if d.exact_kind:
                agreement = _exact_agreement(reference, candidate, name)
                if floors["top1"] is not None and agreement < floors["top1"]:
                    return f"output {name!r} (integer/bool): {agreement:.4f} of elements agree < {floors['top1']}"
                continue
            if floors["cosine"] is not None and d.cosine is not None and not d.cosine >= floors["cosine"]:
                return f"output {name!r}: cosine {d.cosine:.4f} < {floors['cosine']}"
            if floors["top1"] is not None and d.top1 is not None and not d.top1 >= floors["top1"]:
                return f"output {name!r}: top-1 agreement {d.top1:.4f} < {floors['top1']}"
            if floors["rel"] is not None and not d.max_rel <= floors["rel"]:
                return f"output {name!r}: relative error {d.max_rel:.4g} > {floors['rel']}"
        return None


def parse_fidelity(text: str) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """`"cosine=0.995,top1=0.98,logits:rel=0.05"` -> (global floors, per-output floors)."""
    overall: dict[str, float] = {}
    per_output: dict[str, dict[str, float]] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        output, _, key = key.rpartition(":")
        if not sep or key not in FIDELITY_KEYS:
            raise UserError(f"--min-fidelity item {item!r}: expected [OUTPUT:]KEY=VALUE with KEY one of {', '.join(FIDELITY_KEYS)}")
        try:
            number = float(value)
        except ValueError:
            raise UserError(f"--min-fidelity item {item!r}: {value!r} is not a number") from None
        (per_output.setdefault(output, {}) if output else overall)[key] = number
    return overall, per_output


def _exact_agreement(reference: list[dict], candidate: list[dict], name: str) -> float:
    agree = total = 0
    for r, c in zip(reference, candidate):
        for a, b in zip(_parts(r[name]), _parts(c[name])):
            agree += int(np.sum(a == b))
            total += a.size
    return agree / total if total else 1.0
