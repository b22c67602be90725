"""The record of what each pass did, as JSON (for pipelines) and as text tables (for people)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import onnx

from graphopt.graph import initializer_bytes, node_count


@dataclass
class ModelStats:
    nodes: int
    initializer_bytes: int
    file_bytes: int  # serialized size of the model with all tensor data inline

    @classmethod
    def of(cls, model: onnx.ModelProto, file_bytes: int | None = None) -> "ModelStats":
        """Stats of a model; pass `file_bytes` when the serialized size is already known (serializing a
        large model again costs as much as writing it)."""
        return cls(node_count(model), initializer_bytes(model), model.ByteSize() if file_bytes is None else file_bytes)


@dataclass
class PassRecord:
    name: str
    round: int
    status: str  # applied | no change | rolled back | failed
    reason: str = ""
    before: ModelStats | None = None
    after: ModelStats | None = None
    max_abs: float | None = None
    max_rel: float | None = None
    seconds: float = 0.0
    validate_seconds: float = 0.0
    counts: dict = field(default_factory=dict)
    refused: list[str] = field(default_factory=list)
    options: dict = field(default_factory=dict)
    details: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    latency_ms: tuple[float, float] | None = None  # (before, after) medians, for passes that claim speed or size
    lossless: bool = True


@dataclass
class Report:
    input: ModelStats
    output: ModelStats | None = None
    records: list[PassRecord] = field(default_factory=list)
    final: dict = field(default_factory=dict)  # output name -> OutputDiff as dict, vs the original
    metrics: dict = field(default_factory=dict)  # task metrics, e.g. {"accuracy": {"before": .97, "after": .97}}
    checker_level: str = "full"
    rounding_floors: dict = field(default_factory=dict)  # output -> float rounding's reach on the input (validate), when measured
    feeds: str = ""
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return _finite(asdict(self))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def pass_rows(self) -> list[tuple]:
        """Header plus one row per pass run (later rounds only where something changed)."""
        rows = [("pass", "status", "nodes", "init bytes", "file bytes", "max abs", "max rel", "latency ms", "time s")]
        for r in self.records:
            if r.status == "no change" and r.round > 1:
                continue
            status = r.status + (f": {r.reason}" if r.reason else "")
            rows.append(
                (
                    r.name if r.round == 1 else f"{r.name} (round {r.round})",
                    status,
                    _arrow(r.before.nodes, r.after.nodes) if r.before and r.after else "",
                    _arrow(r.before.initializer_bytes, r.after.initializer_bytes, _size) if r.before and r.after else "",
                    _arrow(r.before.file_bytes, r.after.file_bytes, _size) if r.before and r.after else "",
                    _num(r.max_abs),
                    _num(r.max_rel),
                    f"{r.latency_ms[0]:.2f} -> {r.latency_ms[1]:.2f}" if r.latency_ms else "",
                    f"{r.seconds + r.validate_seconds:.2f}",
                )
            )
        return rows

    def pass_table(self) -> str:
        return table(self.pass_rows())

    def summary(self) -> str:
        out = self.output or self.input
        lines = [
            self.pass_table(),
            "",
            f"nodes {self.input.nodes} -> {out.nodes}, initializers {_size(self.input.initializer_bytes)} -> {_size(out.initializer_bytes)}, "
            f"file {_size(self.input.file_bytes)} -> {_size(out.file_bytes)} ({out.file_bytes / max(self.input.file_bytes, 1):.3f}x), {self.seconds:.1f} s",
        ]
        if self.final:
            worst_abs = max(d["max_abs"] for d in self.final.values())
            worst_rel = max(d["max_rel"] for d in self.final.values())
            lines.append(f"vs original on {self.feeds}: max abs error {_num(worst_abs)}, max rel error {_num(worst_rel)}")
        if self.rounding_floors:
            floors = ", ".join(f"{k} {v:.2e}" for k, v in self.rounding_floors.items())
            lines.append(f"rounding floor (the input under onnxruntime's ORT_ENABLE_ALL or with its weights one ulp off, vs ORT_DISABLE_ALL): {floors}")
        for name, m in self.metrics.items():
            lines.append(f"{name}: {m['before']:.4f} -> {m['after']:.4f}")
        for r in self.records:
            lines.extend(_pass_lines(r))
        lines.extend(self.notes)
        return "\n".join(lines)

    def to_markdown(self) -> str:
        rows = self.pass_rows()
        lines = ["| " + " | ".join(rows[0]) + " |", "|" + " --- |" * len(rows[0])]
        lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows[1:]]
        return "\n".join(lines)


def _pass_lines(r: PassRecord) -> list[str]:
    """What a pass said beyond its counts: notes, ops quantized, nodes kept float and why."""
    lines = [f"{r.name}: {note}" for note in r.notes]
    if not r.lossless and r.status != "applied":  # rolled back too: what its candidate left out, and why
        lines += [f"{r.name}: not done: {why}" for why in r.refused[:5]]
    quantized = r.details.get("quantized")
    if quantized and r.status == "applied":
        lines.append(f"{r.name}: quantized " + ", ".join(f"{op} {n}" for op, n in sorted(quantized.items())))
    kept = r.details.get("kept_float") or []
    if kept and r.status == "applied":
        reasons: dict[str, int] = {}
        for item in kept:
            reasons[item.get("reason", "?")] = reasons.get(item.get("reason", "?"), 0) + 1
        lines.append(f"{r.name}: kept float {len(kept)} (" + ", ".join(f"{n} {why}" for why, n in sorted(reasons.items())) + ")")
    return lines


def table(rows: list[tuple]) -> str:
    """Plain text table, first row the header, columns separated by two spaces."""
    widths = [max(len(str(r[k])) for r in rows) for k in range(len(rows[0]))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _arrow(a, b, fmt=str) -> str:
    return fmt(a) if a == b else f"{fmt(a)} -> {fmt(b)}"


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _num(x) -> str:
    return "" if x is None else f"{x:.2e}"


def _finite(obj):
    """JSON has no inf/nan: write them as strings."""
    if isinstance(obj, float) and (obj != obj or obj in (float("inf"), float("-inf"))):
        return str(obj)
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj
