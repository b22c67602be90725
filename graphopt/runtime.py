"""The one way graphopt runs onnxruntime: sessions from a ModelProto, runs over lists of feeds.

A ModelProto reaches onnxruntime as a temporary file, its weights in a data file beside it (see
`_written`).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort

from graphopt.errors import UserError

LEVELS = {
    "disable_all": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}

DATA_FILE = "model.data"
EXTERNAL_MIN_BYTES = 1024  # weights from this size on go to the data file
PAGE = 4096  # data file offsets are aligned to it, so that onnxruntime can map each weight


@dataclass(frozen=True)
class RuntimeSettings:
    """How sessions are made. `threads` 0 means onnxruntime's default; `spinning` False turns off
    intra-op thread spinning (needed when sessions take turns, see bench.py). `memory_arena` is
    onnxruntime's CPU arena, which keeps the most it ever grew to: on where latency is measured (as users
    run), off elsewhere, so that a calibration run exposing every activation gives its memory back
    (PP-OCRv4 rec int8 preset: peak RSS 821 MB with it, 638 MB without)."""

    level: str = "disable_all"
    threads: int = 0
    spinning: bool = True
    memory_arena: bool = False
    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    optimized_model_path: str | None = None
    profile_prefix: str | None = None  # turns on onnxruntime's profiler; its JSON goes to this prefix


def session(model: onnx.ModelProto | str, settings: RuntimeSettings = RuntimeSettings(), what: str = "model") -> ort.InferenceSession:
    """An InferenceSession for a ModelProto or a path. Load failures become a
    UserError naming `what` and onnxruntime's reason."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = LEVELS[settings.level]
    opts.log_severity_level = 4  # fatal only: every failure reaches the caller as an exception with the same text
    opts.enable_cpu_mem_arena = settings.memory_arena
    if settings.threads:
        opts.intra_op_num_threads = settings.threads
        opts.inter_op_num_threads = 1
    if not settings.spinning:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if settings.optimized_model_path:
        opts.optimized_model_filepath = settings.optimized_model_path
        # weights go beside it, so an optimized model past protobuf's 2 GB limit can be saved too
        opts.add_session_config_entry("session.optimized_model_external_initializers_file_name", os.path.basename(settings.optimized_model_path) + ".data")
        opts.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1048576")
    if settings.profile_prefix:
        opts.enable_profiling = True
        opts.profile_file_prefix = settings.profile_prefix
    try:
        if isinstance(model, str):
            return ort.InferenceSession(model, sess_options=opts, providers=list(settings.providers))
        with tempfile.TemporaryDirectory(prefix="graphopt-") as tmp:
            return ort.InferenceSession(_written(model, tmp), sess_options=opts, providers=list(settings.providers))
    except Exception as exc:  # onnxruntime raises several unrelated types
        raise UserError(f"onnxruntime cannot load {what}: {_first_line(exc)}") from exc


def _written(model: onnx.ModelProto, folder: str) -> str:
    """`model` saved in `folder` for onnxruntime to read; its path.

    onnxruntime is handed a file, never bytes: its Python session keeps the bytes it was given for as long
    as the session lives, and copies them once more on the way in. The main graph's weights go to a data
    file beside the model (external data, page-aligned), which onnxruntime maps into memory instead of
    parsing and copying them, so a weight only a few rows of which are read (an embedding table) costs
    what is read. Measured by the resident memory a session adds: PP-OCRv4 rec (10 MB) 60 MB from bytes,
    25 MB from a file; MiniLM (86 MB) 127 MB from a file with the weights inline, 52 MB with them beside
    it. A model past protobuf's 2 GB limit loads this way too, as long as what stays inline (weights inside
    If/Loop bodies, Constant nodes) is under it."""
    path = os.path.join(folder, "model.onnx")
    light = onnx.ModelProto()
    _copy_fields(model, light, skip="graph")
    _copy_fields(model.graph, light.graph, skip="initializer")
    with open(os.path.join(folder, DATA_FILE), "wb") as data:
        for tensor in model.graph.initializer:
            raw = tensor.raw_data if tensor.HasField("raw_data") else b""  # each read of raw_data is a copy
            if len(raw) < EXTERNAL_MIN_BYTES:
                light.graph.initializer.append(tensor)
                continue
            data.write(b"\0" * (-data.tell() % PAGE))
            offset = data.tell()
            data.write(raw)
            stored = light.graph.initializer.add(name=tensor.name, dims=tensor.dims, data_type=tensor.data_type, data_location=onnx.TensorProto.EXTERNAL)
            for key, value in (("location", DATA_FILE), ("offset", str(offset)), ("length", str(len(raw)))):
                stored.external_data.add(key=key, value=value)
    with open(path, "wb") as f:
        f.write(light.SerializeToString())
    return path


def _copy_fields(source, target, skip: str) -> None:
    """Copy every set field of protobuf message `source` into `target`, except `skip`."""
    for field, value in source.ListFields():
        if field.name == skip:
            continue
        if field.is_repeated:
            getattr(target, field.name).extend(value)
        elif field.message_type is not None:
            getattr(target, field.name).CopyFrom(value)
        else:
            setattr(target, field.name, value)


def run(sess: ort.InferenceSession, feed: dict[str, np.ndarray], outputs: list[str] | None = None) -> dict[str, np.ndarray]:
    """One run; returns outputs by name (all graph outputs unless `outputs` names some)."""
    names = outputs or [o.name for o in sess.get_outputs()]
    known = {i.name for i in sess.get_inputs()}
    values = sess.run(names, {k: v for k, v in feed.items() if k in known})
    return dict(zip(names, values))


def run_all(model: onnx.ModelProto | str, feeds: list[dict[str, np.ndarray]], settings: RuntimeSettings = RuntimeSettings(), what: str = "model") -> list[dict[str, np.ndarray]]:
    """Outputs of `model` for every feed, one session."""
    sess = session(model, settings, what)
    try:
        return [run(sess, f) for f in feeds]
    except Exception as exc:
        raise run_failure(what, exc) from exc


def run_failure(what: str, exc: Exception) -> UserError:
    """The error for a model that onnxruntime loaded but could not run on a feed."""
    return UserError(f"onnxruntime failed to run {what}: {_first_line(exc)}")


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
