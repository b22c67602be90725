"""Feeds: what the model is run on for validation and calibration.

A feed is one `{input name: array}` dict. `load_feeds` reads an .npz (or a folder of them) whose arrays
are named after the model inputs; two layouts, told apart by rank:

- rank = input rank + 1: one feed per index of axis 0 (fixed-batch or scalar inputs, e.g. a scalar
  input stored as shape [N]);
- rank = input rank: samples stacked along the batch axis, split into feeds of `batch` samples.

An optional `labels` array rides along for task metrics. `synthesize` makes seeded feeds from the input
spec when there is no data: symbolic dims come from `shapes` (by input name or by dim name), else axis 0
is 1 and any other symbolic dim is 32.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from graphopt.errors import UserError
from graphopt.graph import consumers, constant_value

Feed = dict[str, np.ndarray]

SYNTHESIZED = "synthesized"  # the source of feeds made by `synthesize`
DEFAULT_BATCH_DIM = 1
DEFAULT_OTHER_DIM = 32
LABELS = "labels"


@dataclass(frozen=True)
class InputSpec:
    name: str
    dtype: np.dtype
    dims: tuple[int | str | None, ...] | None  # None: rank unknown; str: symbolic; None entry: unnamed unknown


@dataclass
class FeedSet:
    feeds: list[Feed]
    labels: list[np.ndarray] | None = None
    source: str = "given"
    notes: list[str] = field(default_factory=list)

    def split(self, first: int) -> tuple["FeedSet", "FeedSet"]:
        """The first `first` feeds and the rest (labels split alike)."""
        head = FeedSet(self.feeds[:first], self.labels[:first] if self.labels else None, self.source)
        tail = FeedSet(self.feeds[first:], self.labels[first:] if self.labels else None, self.source)
        return head, tail


def input_specs(model: onnx.ModelProto) -> list[InputSpec]:
    """Graph inputs the caller must feed (inputs that are also initializers are optional and skipped)."""
    inits = {t.name for t in model.graph.initializer}
    specs = []
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        if not vi.type.HasField("tensor_type"):
            raise UserError(f"input {vi.name!r} is not a tensor (sequence/optional/map inputs cannot be fed by graphopt)")
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tt.elem_type))
        dims = None
        if tt.HasField("shape"):
            dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim)
        specs.append(InputSpec(vi.name, dtype, dims))
    return specs


def parse_shapes(items: list[str] | None) -> dict[str, list[int]]:
    """`["images=1x3x224x224", "seq=128"]` -> {"images": [1,3,224,224], "seq": [128]}."""
    shapes: dict[str, list[int]] = {}
    for item in items or []:
        name, sep, dims = item.partition("=")
        try:
            if not sep or not name:
                raise ValueError
            shapes[name] = [int(d) for d in dims.lower().split("x")]
        except ValueError:
            raise UserError(f"--shape {item!r}: expected NAME=DIMS such as images=1x3x224x224 (input name) or seq=128 (symbolic dim name)") from None
    return shapes


def concrete_shape(spec: InputSpec, shapes: dict[str, list[int]]) -> list[int]:
    """The shape to synthesize for an input: a pin by input name, else dims with symbolic ones resolved."""
    if spec.name in shapes:
        pinned = shapes[spec.name]
        if spec.dims is not None and len(pinned) != len(spec.dims):
            raise UserError(f"--shape {spec.name}: {len(pinned)} dims given, the input has rank {len(spec.dims)} {_dims_text(spec.dims)}")
        return pinned
    if spec.dims is None:
        raise UserError(f"input {spec.name!r} declares no shape; give one with --shape {spec.name}=DIMS")
    out = []
    for axis, d in enumerate(spec.dims):
        if isinstance(d, int) and d > 0:
            out.append(d)
        elif isinstance(d, str) and d in shapes:
            out.append(shapes[d][0])
        else:
            out.append(DEFAULT_BATCH_DIM if axis == 0 else DEFAULT_OTHER_DIM)
    return out


def synthesize(model: onnx.ModelProto, count: int = 4, seed: int = 0, shapes: dict[str, list[int]] | None = None) -> FeedSet:
    """Seeded random feeds from the input spec: floats standard normal, integers in a plausible range
    (below the row count of the table a Gather reads with them, else [0, 100); masks are ones), bools
    random."""
    rng = np.random.default_rng(seed)
    specs = input_specs(model)
    bounds = _index_bounds(model)
    feeds = []
    for _ in range(count):
        feed: Feed = {}
        for spec in specs:
            shape = concrete_shape(spec, shapes or {})
            feed[spec.name] = _random_array(rng, spec, shape, bounds.get(spec.name))
        feeds.append(feed)
    return FeedSet(feeds, None, SYNTHESIZED, [f"{count} synthesized feeds (seed {seed})"])


def _random_array(rng: np.random.Generator, spec: InputSpec, shape: list[int], bound: int | None) -> np.ndarray:
    if np.issubdtype(spec.dtype, np.floating):
        return rng.standard_normal(shape).astype(spec.dtype)
    if spec.dtype == np.bool_:
        return rng.integers(0, 2, shape).astype(bool)
    if np.issubdtype(spec.dtype, np.integer):
        if "mask" in spec.name.lower():
            return np.ones(shape, spec.dtype)
        if "type" in spec.name.lower() or "segment" in spec.name.lower():
            return np.zeros(shape, spec.dtype)
        high = bound if bound else 100
        return rng.integers(0, max(high, 1), shape).astype(spec.dtype)
    raise UserError(f"input {spec.name!r} has dtype {spec.dtype}, which graphopt cannot synthesize; give real data with --data")


def _index_bounds(model: onnx.ModelProto) -> dict[str, int]:
    """Input name -> row count of a constant table a Gather indexes with that input."""
    bounds: dict[str, int] = {}
    uses = consumers(model.graph)
    for spec_name in {i.name for i in model.graph.input}:
        for node in uses.get(spec_name, []):
            if node.op_type == "Gather" and len(node.input) > 1 and node.input[1] == spec_name:
                table = constant_value(model.graph, node.input[0])
                if table is not None:
                    axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
                    rows = table.shape[axis]
                    bounds[spec_name] = min(bounds.get(spec_name, rows), rows)
    return bounds


def load_feeds(path: str | Path, model: onnx.ModelProto, batch: int = 1, ignore: tuple[str, ...] = ()) -> FeedSet:
    """Feeds from an .npz or a folder of .npz files (sorted by name); see the module docstring."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.npz"))
        if not files:
            raise UserError(f"--data {path}: folder holds no .npz files")
    elif path.is_file():
        files = [path]
    else:
        raise UserError(f"--data {path}: no such file or folder")
    result = FeedSet([], None, str(path))
    for file in files:
        part = _load_npz(file, model, batch, ignore)
        result.feeds.extend(part.feeds)
        if part.labels is not None:
            result.labels = (result.labels or []) + part.labels
    if result.labels is not None and len(result.labels) != len(result.feeds):
        raise UserError(f"--data {path}: some files carry `labels` and some do not; give labels in every file or none")
    return result


def _load_npz(file: Path, model: onnx.ModelProto, batch: int, ignore: tuple[str, ...]) -> FeedSet:
    try:
        with np.load(file, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except Exception as exc:
        raise UserError(f"--data {file}: not a readable .npz ({exc})") from exc
    specs = input_specs(model)
    names = {s.name for s in specs}
    for name in arrays:
        if name not in names and name != LABELS and name not in ignore:
            raise UserError(f"--data {file}: array {name!r} is not a model input (inputs: {', '.join(sorted(names))}); remove it or pass --ignore-array {name}")
    feeds_per_input: dict[str, list[np.ndarray]] = {}
    for spec in specs:
        if spec.name not in arrays:
            raise UserError(f"--data {file}: no array for model input {spec.name!r} ({spec.dtype}, dims {_dims_text(spec.dims)})")
        feeds_per_input[spec.name] = _split_input(file, spec, arrays[spec.name], batch)
    counts = {name: len(v) for name, v in feeds_per_input.items()}
    if len(set(counts.values())) > 1:
        raise UserError(f"--data {file}: inputs give different numbers of samples: {counts}; they must match")
    n = next(iter(counts.values()), 0)
    if n == 0:
        raise UserError(f"--data {file}: holds no samples")
    feeds = [{name: parts[i] for name, parts in feeds_per_input.items()} for i in range(n)]
    labels = None
    if LABELS in arrays:
        labels = _split_labels(file, arrays[LABELS], n, batch)
    return FeedSet(feeds, labels, str(file))


def _split_input(file: Path, spec: InputSpec, array: np.ndarray, batch: int) -> list[np.ndarray]:
    if array.dtype != spec.dtype:
        raise UserError(f"--data {file}: array {spec.name!r} is {array.dtype}, the model input wants {spec.dtype}; convert it (e.g. arr.astype(np.{spec.dtype}))")
    rank = len(spec.dims) if spec.dims is not None else array.ndim
    if array.ndim == rank + 1:
        # `array[i, ...]` keeps a 0-d ndarray for scalar inputs; `array[i]` would be a numpy scalar,
        # which onnxruntime refuses to take as an input.
        parts = [array[i, ...] for i in range(array.shape[0])]
    elif array.ndim == rank:
        if rank == 0:
            parts = [array]
        else:
            parts = [array[i : i + batch] for i in range(0, array.shape[0], batch)]
    else:
        raise UserError(f"--data {file}: array {spec.name!r} has rank {array.ndim} (shape {list(array.shape)}); input {spec.name!r} has rank {rank} {_dims_text(spec.dims)}: give rank {rank} (samples stacked on axis 0) or {rank + 1} (one feed per index of axis 0)")
    for part in parts:
        _check_dims(file, spec, part)
    return parts


def _check_dims(file: Path, spec: InputSpec, part: np.ndarray) -> None:
    if spec.dims is None:
        return
    for axis, (want, got) in enumerate(zip(spec.dims, part.shape)):
        if isinstance(want, int) and want > 0 and want != got:
            raise UserError(f"--data {file}: input {spec.name!r} axis {axis} must be {want}, a feed has shape {list(part.shape)}; the input is {_dims_text(spec.dims)}")


def _split_labels(file: Path, labels: np.ndarray, n: int, batch: int) -> list[np.ndarray]:
    if labels.ndim >= 1 and labels.shape[0] == n:
        return [labels[i] for i in range(n)]
    if labels.ndim >= 1 and -(-labels.shape[0] // batch) == n:
        return [labels[i : i + batch] for i in range(0, labels.shape[0], batch)]
    raise UserError(f"--data {file}: `labels` has {labels.shape[0] if labels.ndim else 0} entries for {n} feeds; they must match")


def _dims_text(dims) -> str:
    if dims is None:
        return "[?]"
    return "[" + ", ".join(str(d) if d is not None else "?" for d in dims) + "]"


@contextmanager
def explaining(feeds: FeedSet):
    """Runs of a model on `feeds` inside this block that fail (a UserError) say which shapes were made up
    when the feeds were synthesized: the usual cause is a model that needs other shapes or values."""
    try:
        yield
    except UserError as error:
        if feeds.source != SYNTHESIZED or not feeds.feeds:
            raise
        shapes = ", ".join(f"{name} {list(value.shape)}" for name, value in feeds.feeds[0].items())
        raise UserError(f"{error}\nthe feeds were synthesized ({shapes}): give real inputs with --data, or other dims with --shape NAME=DIMS") from error


def feed_set(data, model: onnx.ModelProto, *, count: int = 4, seed: int = 0, shapes: dict[str, list[int]] | None = None, batch: int = 1, ignore: tuple[str, ...] = ()) -> FeedSet:
    """Whatever the caller gave as data (None, a path, a FeedSet, a list of feeds) as a FeedSet."""
    if data is None:
        return synthesize(model, count, seed, shapes)
    if isinstance(data, FeedSet):
        return data
    if isinstance(data, (str, Path)):
        return load_feeds(data, model, batch, ignore)
    if isinstance(data, list):
        return FeedSet(list(data))
    raise UserError(f"data must be a path to .npz, a folder of them, a FeedSet or a list of feed dicts, not {type(data).__name__}")
