"""Loading and saving models: external data, the 2 GB protobuf limit, atomic writes, the checker.

`load` returns a ModelProto with all tensor data in memory; `save` writes through a temporary file in
the target folder and renames it into place, so a failed save leaves nothing half-written, and it
refuses to overwrite the model it was loaded from unless told to.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from graphopt.errors import UserError
from graphopt.graph import copy_model, fits_in_protobuf, iter_graphs


@dataclass(frozen=True)
class ModelFile:
    """Facts about the file a model came from."""

    path: Path
    size: int
    external_data: tuple[str, ...]

    @property
    def total_size(self) -> int:
        folder = self.path.parent
        return self.size + sum((folder / name).stat().st_size for name in self.external_data if (folder / name).exists())


def load(path: str | os.PathLike) -> onnx.ModelProto:
    """Read an ONNX file and its external data (resolved against the model's folder)."""
    return load_with_info(path)[0]


def load_with_info(path: str | os.PathLike) -> tuple[onnx.ModelProto, ModelFile]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file; give the path of an .onnx model")
    try:
        model = onnx.load_model(str(path), load_external_data=False)
    except (DecodeError, RuntimeWarning, ValueError) as exc:
        raise UserError(f"{path}: not a readable ONNX model ({exc.__class__.__name__}: {exc}); is the file truncated or of another format?") from exc
    except Exception as exc:  # protobuf's C++ parser raises generic errors on garbage
        raise UserError(f"{path}: not a readable ONNX model ({exc}); is the file truncated or of another format?") from exc
    if not model.graph.node and not model.graph.output:
        raise UserError(f"{path}: parsed as protobuf but holds no graph; is it really an ONNX model?")
    external = _external_files(model)
    for name in external:
        if not (path.parent / name).is_file():
            raise UserError(f"{path}: external data file {name!r} is missing (expected next to the model in {path.parent}); copy it there")
    if external:
        try:
            onnx.load_external_data_for_model(model, str(path.parent))
        except Exception as exc:
            raise UserError(f"{path}: cannot read external data ({exc}); is the data file complete?") from exc
    return model, ModelFile(path=path, size=path.stat().st_size, external_data=tuple(external))


def _external_files(model: onnx.ModelProto) -> list[str]:
    files: dict[str, None] = {}
    for g in iter_graphs(model.graph):
        for t in g.initializer:
            if t.data_location == onnx.TensorProto.EXTERNAL:
                for entry in t.external_data:
                    if entry.key == "location":
                        files[entry.value] = None
    return list(files)


def save(model: onnx.ModelProto, path: str | os.PathLike, *, external_data: bool | None = None, source: str | os.PathLike | None = None, force: bool = False) -> Path:
    """Write `model` to `path` atomically. External data (one file `<name>.data` beside it) is used when
    asked, or when `external_data` is None and the model is past 2 GB. Refuses to overwrite `source`
    (the input model) unless `force`."""
    path = Path(path)
    if source is not None and path.exists() and _same_file(path, Path(source)) and not force:
        raise UserError(f"{path} is the input model; choose another output path (or pass --force to overwrite it)")
    if not path.parent.is_dir():
        raise UserError(f"{path}: folder {path.parent} does not exist")
    use_external = not fits_in_protobuf(model) if external_data is None else external_data
    data_name = path.name + ".data"
    with tempfile.TemporaryDirectory(prefix=".graphopt-", dir=path.parent) as tmp:
        tmp_model = Path(tmp) / path.name
        if use_external:
            copy = copy_model(model)  # saving as external data rewrites the tensors it is given
            onnx.save_model(copy, str(tmp_model), save_as_external_data=True, all_tensors_to_one_file=True, location=data_name, size_threshold=1024)
            if (Path(tmp) / data_name).exists():
                os.replace(Path(tmp) / data_name, path.parent / data_name)
        else:
            onnx.save_model(model, str(tmp_model))
        os.replace(tmp_model, path)
    return path


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write a text file (a report) atomically: a temporary file beside it, then a rename."""
    path = Path(path)
    if not path.parent.is_dir():
        raise UserError(f"{path}: folder {path.parent} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=".graphopt-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (b.exists() and os.path.samefile(a, b))
    except OSError:
        return False


def checker_level(model: onnx.ModelProto) -> str:
    """The strictest onnx.checker level the model passes: 'full', 'basic' or 'none'."""
    for level in ("full", "basic"):
        if check(model, level) is None:
            return level
    return "none"


def check(model: onnx.ModelProto | bytes, level: str = "full") -> str | None:
    """Run onnx.checker at `level` ('full' includes strict shape inference) on a model or its serialized
    bytes (saves a copy when the caller has them); None if it passes, else the reason."""
    if level == "none":
        return None
    try:
        if isinstance(model, onnx.ModelProto) and not fits_in_protobuf(model):
            with tempfile.TemporaryDirectory(prefix="graphopt-") as tmp:
                p = os.path.join(tmp, "m.onnx")
                save(model, p, external_data=True)
                onnx.checker.check_model(p, full_check=level == "full")
        else:
            onnx.checker.check_model(model, full_check=level == "full")
    except Exception as exc:  # checker raises ValidationError, InferenceError and others
        text = str(exc).strip().splitlines()
        return f"onnx.checker ({level}): {text[0] if text else type(exc).__name__}"
    return None
