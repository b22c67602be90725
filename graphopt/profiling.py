"""What onnxruntime really runs: per-node kernel times from its profiler, and the graph after its fusions.

`node_times` turns on onnxruntime's profiler (RuntimeSettings.profile_prefix) for models run in turn and
averages the kernel time of each node over the measured runs; `output_bytes` reads the output shapes it records. `optimized_graph` saves the graph onnxruntime executes
(RuntimeSettings.optimized_model_path) and loads it back; `unfused_chains` and `fused_op_counts` read it to
tell which quantized (DequantizeLinear -> op -> QuantizeLinear) groups became integer kernels.

Names in the optimized graph and the profile: onnxruntime names a fused QDQ kernel after the float node it
replaces (DQ + Conv "conv0" + Q => QLinearConv "conv0"); at level "all" the NHWC layout pass then renames it
"conv0_token_<n>" and adds Transpose nodes named "Transpose", "Transpose_token_<n>". Nodes without a name
are named `<op_type>_<position in the main graph>` here before profiling, so that fused kernels still carry
a usable name (onnxruntime would call them "_token_<n>").
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from collections import Counter, defaultdict
from dataclasses import dataclass

import numpy as np
import onnx

from graphopt import runtime
from graphopt.graph import NameGenerator, consumers, copy_model, producers
from graphopt.runtime import RuntimeSettings

# Integer kernels onnxruntime runs for quantized groups (besides every op named QLinear*): see is_integer_kernel.
INTEGER_OPS = frozenset(
    {
        "QGemm",
        "QAttention",
        "QEmbedLayerNormalization",
        "MatMulIntegerToFloat",
        "DynamicQuantizeMatMul",
        "DynamicQuantizeLSTM",
        "MatMulNBits",
        "MatMulBnb4",
        "GatherBlockQuantized",
        "ConvInteger",
        "MatMulInteger",
        "QOrderedMatMul",
    }
)


@dataclass
class NodeTime:
    name: str
    op_type: str
    ms: float  # mean kernel time per run


@dataclass
class UnfusedChain:
    dq: str
    op: str
    op_type: str
    q: str


def node_times(models: list[onnx.ModelProto], feeds: list[dict[str, np.ndarray]], settings: RuntimeSettings, rounds: int = 10) -> list[list[NodeTime]]:
    """For each of `models`, the mean kernel time per run of every node onnxruntime executes at `settings`
    (names and op types of the optimized graph), slowest first. One warm-up run each (not counted), then
    `rounds` passes over `feeds` with the models taking turns run by run, as `bench` times them: on a
    shared machine whose speed drifts by a third within a minute, profiles taken one after the other
    compare the machine's moments, not the kernels. Thread spinning is off, as in `bench`: a session that
    has just run would otherwise keep its threads spinning through the next one's run."""
    if not feeds:
        raise ValueError("node_times needs at least one feed")
    taking_turns = dataclasses.replace(settings, spinning=False)
    return [_mean_kernel_times(events, runs=rounds * len(feeds)) for events in _profile_events([_named(m) for m in models], feeds, taking_turns, rounds)]


def output_bytes(model: onnx.ModelProto, feed: dict[str, np.ndarray], threads: int = 0) -> dict[str, int]:
    """Bytes of each main-graph node output on `feed`, from the shapes onnxruntime's profiler records in
    one run at level disable_all (the model's own nodes). Outputs of nodes that do not run as kernels
    (Constant nodes become initializers at load) are absent."""
    named = _named(model)
    outputs = {node.name: [o for o in node.output if o] for node in named.graph.node}
    sizes: dict[str, int] = {}
    [events] = _profile_events([named], [feed], RuntimeSettings(threads=threads), rounds=0)
    for e in events:
        name = e.get("name", "")
        if e.get("cat") != "Node" or not name.endswith(_KERNEL):
            continue
        shapes = e.get("args", {}).get("output_type_shape", [])
        names = outputs.get(name[: -len(_KERNEL)], [])
        if len(names) != len(shapes):
            continue
        for out, typed in zip(names, shapes):
            for dtype, dims in typed.items():
                sizes[out] = int(np.prod(dims)) * _ITEMSIZE.get(dtype, 4)
    return sizes


_KERNEL = "_kernel_time"
_ITEMSIZE = {"double": 8, "int64": 8, "uint64": 8, "int32": 4, "uint32": 4, "float16": 2, "bfloat16": 2, "int16": 2, "uint16": 2, "int8": 1, "uint8": 1, "bool": 1}  # profiler dtype names; others 4


def _profile_events(named: list[onnx.ModelProto], feeds: list[dict[str, np.ndarray]], settings: RuntimeSettings, rounds: int) -> list[list[dict]]:
    """onnxruntime's profiler events of each model: one warm-up run on the first feed, then `rounds`
    passes over `feeds`, the models taking turns run by run."""
    with tempfile.TemporaryDirectory(prefix="graphopt-profile-") as tmp:
        sessions = [runtime.session(m, dataclasses.replace(settings, profile_prefix=os.path.join(tmp, f"profile{k}"))) for k, m in enumerate(named)]
        for sess in sessions:
            runtime.run(sess, feeds[0])
        for _ in range(rounds):
            for feed in feeds:
                for sess in sessions:
                    runtime.run(sess, feed)
        events = []
        for sess in sessions:
            with open(sess.end_profiling()) as f:
                events.append(json.load(f))
        return events


def _named(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy whose unnamed main-graph nodes are named `<op_type>_<position>` (the model is left alone
    when every node has a name)."""
    if all(node.name for node in model.graph.node):
        return model
    copy = copy_model(model)
    fresh = NameGenerator(copy)
    for k, node in enumerate(copy.graph.node):
        if not node.name:
            node.name = fresh(f"{node.op_type}_{k}")
    return copy


def _mean_kernel_times(events: list[dict], runs: int) -> list[NodeTime]:
    """Sum each node's "<name>_kernel_time" events after the first model run (the warm-up), per run."""
    model_runs = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("cat") == "Session" and e.get("name") == "model_run")
    warm_end = model_runs[0][1] if model_runs else float("-inf")
    total_us: dict[str, float] = defaultdict(float)
    op_type: dict[str, str] = {}
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith(_KERNEL) or e["ts"] <= warm_end:
            continue
        name = e["name"][: -len(_KERNEL)]
        total_us[name] += e["dur"]
        op_type[name] = e.get("args", {}).get("op_name", "")
    times = [NodeTime(name, op_type[name], us / 1000.0 / runs) for name, us in total_us.items()]
    return sorted(times, key=lambda t: -t.ms)


def optimized_graph(model: onnx.ModelProto, settings: RuntimeSettings) -> onnx.ModelProto:
    """The graph onnxruntime runs at `settings` (its fusions and layout changes applied), loaded back with
    all tensor data in memory."""
    with tempfile.TemporaryDirectory(prefix="graphopt-optimized-") as tmp:
        path = os.path.join(tmp, "optimized.onnx")
        runtime.session(_named(model), dataclasses.replace(settings, optimized_model_path=path))
        return onnx.load_model(path, load_external_data=True)


def same_kernels(a: onnx.ModelProto, b: onnx.ModelProto, settings: RuntimeSettings) -> bool:
    """Whether onnxruntime runs the same graph for `a` and `b` at `settings`: their optimized graphs have
    the same nodes in the same order (op type, domain, attributes, number of inputs and outputs) and
    initializers of the same types and shapes; names and weight values may differ. Then their latency
    cannot differ beyond noise (e.g. weights stored int8 and restored to float when the model loads)."""
    return _kernel_signature(optimized_graph(a, settings)) == _kernel_signature(optimized_graph(b, settings))


def _kernel_signature(optimized: onnx.ModelProto) -> tuple:
    graph = optimized.graph
    nodes = tuple(
        (n.op_type, n.domain, len(n.input), len(n.output), tuple(sorted(a.SerializeToString() for a in n.attribute if a.type != onnx.AttributeProto.GRAPH)))
        for n in graph.node
    )
    weights = sorted((t.data_type, tuple(t.dims)) for t in graph.initializer)
    return nodes, tuple(weights)


def unfused_chains(optimized: onnx.ModelProto) -> list[UnfusedChain]:
    """DequantizeLinear -> float op -> QuantizeLinear groups onnxruntime left in float (main graph).

    A float node counts when one of its inputs comes straight from a DequantizeLinear and one of its
    outputs goes straight into a QuantizeLinear; the DQ reported is the first of an activation (not of a
    constant) when there is one. A DQ of weights feeding an op with no Q after it (weight-only MatMul) is
    no chain."""
    graph = optimized.graph
    made_by, read_by = producers(graph), consumers(graph)
    constants = {t.name for t in graph.initializer}
    chains = []
    for node in graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        dqs = [made_by[i] for i in node.input if i in made_by and made_by[i].op_type == "DequantizeLinear"]
        qs = [c for o in node.output if o for c in read_by.get(o, []) if c.op_type == "QuantizeLinear"]
        if not dqs or not qs:
            continue
        dq = next((d for d in dqs if d.input[0] not in constants), dqs[0])
        chains.append(UnfusedChain(dq=dq.name, op=node.name, op_type=node.op_type, q=qs[0].name))
    return chains


def is_integer_kernel(op_type: str) -> bool:
    """Whether `op_type` is one of onnxruntime's integer kernels (QLinear*, QGemm, MatMulIntegerToFloat,
    DynamicQuantizeLSTM, MatMulNBits, ...)."""
    return op_type.startswith("QLinear") or op_type in INTEGER_OPS


def fused_op_counts(optimized: onnx.ModelProto) -> dict[str, int]:
    """op_type -> count of the integer kernels in onnxruntime's optimized graph; only those present."""
    return dict(Counter(n.op_type for n in optimized.graph.node if is_integer_kernel(n.op_type)))
