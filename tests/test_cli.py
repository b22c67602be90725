"""The command line: exit codes, nothing written on failure, and each subcommand end to end."""

from __future__ import annotations

import json
import re

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphopt import cli
from graphopt import model as model_io

from tests.helpers import make_model, reshape_to_2x4_model


def conv_bn_model() -> onnx.ModelProto:
    """x -> Conv -> BatchNormalization -> Identity -> y, weights in Constant nodes"""
    rng = np.random.default_rng(0)
    consts = {
        "w": rng.standard_normal((16, 3, 3, 3)).astype(np.float32),
        "scale": rng.uniform(0.5, 1.5, 16).astype(np.float32),
        "bias": rng.standard_normal(16).astype(np.float32),
        "mean": rng.standard_normal(16).astype(np.float32),
        "var": rng.uniform(0.5, 1.5, 16).astype(np.float32),
    }
    nodes = [helper.make_node("Constant", [], [k], value=numpy_helper.from_array(v, k)) for k, v in consts.items()]
    nodes += [
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "scale", "bias", "mean", "var"], ["b"]),
        helper.make_node("Identity", ["b"], ["y"]),
    ]
    return make_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 16, 8, 8])],
    )


@pytest.fixture
def model_path(tmp_path):
    return model_io.save(conv_bn_model(), tmp_path / "in.onnx")


def test_optimize_writes_model_and_report(tmp_path, model_path, capsys):
    out, report = tmp_path / "out.onnx", tmp_path / "r.json"
    assert cli.main(["optimize", str(model_path), "-o", str(out), "--report", str(report)]) == 0
    optimized = model_io.load(out)
    assert [n.op_type for n in optimized.graph.node] == ["Conv"]
    records = json.loads(report.read_text())["records"]
    assert {r["name"] for r in records if r["status"] == "applied"} >= {"lift-constants", "fold-batchnorm", "eliminate-identities"}
    printed = capsys.readouterr().out
    assert "fold-batchnorm" in printed and "applied" in printed and f"wrote {out}" in printed


def test_optimize_with_npz_data_and_chosen_passes(tmp_path, model_path):
    feeds = tmp_path / "feeds.npz"
    np.savez(feeds, x=np.random.default_rng(1).standard_normal((3, 3, 8, 8)).astype(np.float32))
    out = tmp_path / "out.onnx"
    assert cli.main(["optimize", str(model_path), "-o", str(out), "--data", str(feeds), "--passes", "lift-constants"]) == 0
    assert "Constant" not in {n.op_type for n in model_io.load(out).graph.node}


@pytest.mark.parametrize(
    "make_input, message",
    [
        (lambda p: p.write_text("not onnx"), "not a readable ONNX model|holds no graph"),
        (lambda p: p.write_bytes(conv_bn_model().SerializeToString()[:700]), "not a readable ONNX model"),
    ],
)
def test_bad_model_files_exit_2_and_write_nothing(tmp_path, capsys, make_input, message):
    bad = tmp_path / "bad.onnx"
    make_input(bad)
    out = tmp_path / "out.onnx"
    assert cli.main(["optimize", str(bad), "-o", str(out)]) == 2
    assert not out.exists()
    assert re.search(message, capsys.readouterr().err)


def test_missing_external_data_exits_2(tmp_path, capsys):
    m = conv_bn_model()
    lifted = numpy_helper.to_array(m.graph.node[0].attribute[0].t)
    m.graph.initializer.append(numpy_helper.from_array(lifted, "w"))
    del m.graph.node[0]
    path = model_io.save(m, tmp_path / "m.onnx", external_data=True)
    (tmp_path / "m.onnx.data").unlink()
    out = tmp_path / "out.onnx"
    assert cli.main(["optimize", str(path), "-o", str(out)]) == 2
    assert "external data file 'm.onnx.data' is missing" in capsys.readouterr().err
    assert not out.exists()


def test_model_onnxruntime_cannot_load_exits_2(tmp_path, capsys):
    m = conv_bn_model()
    m.graph.node[-1].domain = "com.unknown"
    m.opset_import.append(helper.make_opsetid("com.unknown", 1))
    path = model_io.save(m, tmp_path / "m.onnx")
    out = tmp_path / "out.onnx"
    assert cli.main(["optimize", str(path), "-o", str(out)]) == 2
    assert "onnxruntime cannot load the input model" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("command", ["optimize", "bench", "compare"])
def test_a_model_that_fails_on_synthesized_feeds_exits_2_and_says_what_was_synthesized(tmp_path, capsys, command):
    """Each command that runs the model says the synthesized feeds do not fit it, and how to give ones that do."""
    path = str(model_io.save(reshape_to_2x4_model(), tmp_path / "m.onnx"))
    args = {"optimize": ["optimize", path, "-o", str(tmp_path / "out.onnx")], "bench": ["bench", path, path], "compare": ["compare", path, path]}[command]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert f"graphopt {command}: error: onnxruntime failed to run" in err
    assert "the feeds were synthesized (x [1]): give real inputs with --data, or other dims with --shape NAME=DIMS" in err
    assert not (tmp_path / "out.onnx").exists()


def test_mismatched_feeds_exit_2(tmp_path, model_path, capsys):
    feeds = tmp_path / "feeds.npz"
    np.savez(feeds, x=np.zeros((2, 3, 8, 8), np.float64))
    out = tmp_path / "out.onnx"
    assert cli.main(["optimize", str(model_path), "-o", str(out), "--data", str(feeds)]) == 2
    assert "'x' is float64" in capsys.readouterr().err
    assert not out.exists()


def test_refuses_to_overwrite_input(model_path, capsys):
    before = model_path.read_bytes()
    assert cli.main(["optimize", str(model_path), "-o", str(model_path)]) == 2
    assert "is the input model" in capsys.readouterr().err
    assert model_path.read_bytes() == before


def test_unknown_pass_exits_2(tmp_path, model_path, capsys):
    assert cli.main(["optimize", str(model_path), "-o", str(tmp_path / "o.onnx"), "--passes", "no-such-pass"]) == 2
    assert "unknown pass 'no-such-pass'" in capsys.readouterr().err


def test_passes_lists_every_registered_pass(capsys):
    assert cli.main(["passes"]) == 0
    out = capsys.readouterr().out
    for name in ("lift-constants", "remove-dead-code", "eliminate-identities", "fold-constants", "fold-batchnorm", "fold-shared-weights"):
        assert name in out
    assert "lossless" in out


def test_compare_and_bench(tmp_path, model_path, capsys):
    out = tmp_path / "out.onnx"
    assert cli.main(["optimize", str(model_path), "-o", str(out)]) == 0
    capsys.readouterr()
    assert cli.main(["compare", str(model_path), str(out), "--json"]) == 0
    diffs = json.loads(capsys.readouterr().out)
    assert diffs["y"]["max_abs"] < 1e-4 and diffs["y"]["cosine"] > 0.9999
    assert cli.main(["bench", str(model_path), str(out), "--rounds", "3", "--warmup", "1", "--json"]) == 0
    timings = json.loads(capsys.readouterr().out)
    assert [t["label"] for t in timings] == [str(model_path), str(out)] and timings[0]["ratio"] == 1.0


def test_inspect_json(model_path, capsys):
    assert cli.main(["inspect", str(model_path), "--json", "--shape", "batch=2"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert json.dumps(info)  # serializable
    assert "Conv" in json.dumps(info)


def test_demo_reports_accuracy_before_and_after(capsys):
    assert cli.main(["demo"]) == 0
    out = capsys.readouterr().out
    assert "accuracy" in out
    line = next(l for l in out.splitlines() if l.startswith("accuracy"))
    before, after = (float(x) for x in line.split(":")[1].split("->"))
    assert before > 0.95 and after == before


def test_external_data_in_gives_external_data_out(tmp_path):
    m = conv_bn_model()
    lifted = numpy_helper.to_array(m.graph.node[0].attribute[0].t)
    m.graph.initializer.append(numpy_helper.from_array(lifted, "w"))
    del m.graph.node[0]
    source = model_io.save(m, tmp_path / "in.onnx", external_data=True)
    out = tmp_path / "out.onnx"
    assert cli.main(["optimize", str(source), "-o", str(out)]) == 0
    assert (tmp_path / "out.onnx.data").is_file()
    optimized, info = model_io.load_with_info(out)
    assert info.external_data == ("out.onnx.data",)
    assert [n.op_type for n in optimized.graph.node] == ["Conv"]


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--max-drop", "0.01"], "--max-drop needs --metric"),
        (["--min-fidelity", "cosine=0.9,bogus=1"], "--min-fidelity item 'bogus=1'"),
    ],
)
def test_bad_budget_options_exit_2(tmp_path, model_path, capsys, flags, message):
    out = tmp_path / "out.onnx"
    assert cli.main(["optimize", str(model_path), "-o", str(out), *flags]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def mlp_model() -> onnx.ModelProto:
    """x -> MatMul(w1) -> Relu -> MatMul(w2) -> y, 64x64 weights"""
    rng = np.random.default_rng(4)
    inits = [numpy_helper.from_array((rng.standard_normal((64, 64)) / 8).astype(np.float32), n) for n in ("w1", "w2")]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]), helper.make_node("MatMul", ["r", "w2"], ["y"])]
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 64])], inits)


@pytest.fixture
def mlp_job(tmp_path):
    """(the optimize arguments for mlp_model with 16 seeded feeds, the model path, output, report)."""
    source = model_io.save(mlp_model(), tmp_path / "mlp.onnx")
    data = tmp_path / "feeds.npz"
    np.savez(data, x=np.random.default_rng(5).standard_normal((16, 64)).astype(np.float32))
    out, report = tmp_path / "mlp.int4.onnx", tmp_path / "report.json"
    args = ["optimize", str(source), "-o", str(out), "--data", str(data), "--report", str(report), "--no-latency-guard"]
    return args, source, out, report


def test_int4_preset_end_to_end(mlp_job, capsys):
    args, source, out, report = mlp_job
    assert cli.main(args + ["--preset", "int4", "--min-fidelity", "cosine=0.98"]) == 0
    records = {r["name"]: r for r in json.loads(report.read_text())["records"]}
    record = records["quantize-weights"]
    assert record["status"] == "applied", record["reason"]
    assert record["details"]["quantized"] == {"MatMul": 2}
    assert record["latency_ms"] is None  # the guard was off
    quantized = model_io.load(out)
    assert any(t.data_type in (TensorProto.INT4, TensorProto.UINT4, TensorProto.UINT8) for t in quantized.graph.initializer)
    assert out.stat().st_size < source.stat().st_size / 3
    assert "quantize-weights: quantized MatMul 2" in capsys.readouterr().out


def test_keep_float_reaches_the_preset_passes(mlp_job):
    """--keep-float '^y$' names the second MatMul (unnamed: by its output): the int4 preset leaves it float."""
    args, _, out, report = mlp_job
    assert cli.main(args + ["--preset", "int4", "--min-fidelity", "cosine=0.98", "--keep-float", "^y$"]) == 0
    record = {r["name"]: r for r in json.loads(report.read_text())["records"]}["quantize-weights"]
    assert record["status"] == "applied" and record["details"]["quantized"] == {"MatMul": 1}
    assert any("keep_float '^y$' matches it" in r for r in record["refused"])
    assert [n.input[1] for n in model_io.load(out).graph.node if n.op_type == "MatMul"][1] == "w2"


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--preset", "int8", "--keep-float", "[y"], "keep_float '[y' is not a regular expression"),
        (["--keep-float", "^y$"], "none of the passes"),
    ],
)
def test_bad_keep_float_exits_2(mlp_job, capsys, flags, message):
    args, _, out, _ = mlp_job
    assert cli.main(args + flags) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_quantization_over_budget_keeps_the_float_model_and_says_why(mlp_job):
    args, _, out, report = mlp_job
    assert cli.main(args + ["--passes", "quantize-weights:bits=4", "--min-fidelity", "cosine=0.9999999"]) == 0
    (record,) = json.loads(report.read_text())["records"]
    assert record["status"] in ("no change", "rolled back")
    assert "cosine" in (record["reason"] + " ".join(record["refused"]))
    assert [n.op_type for n in model_io.load(out).graph.node] == ["MatMul", "Relu", "MatMul"]


def test_int8_preset_leaves_no_large_float_weight(mlp_job):
    """Whichever way quantize-int8 goes (a faster integer model, or rolled back as not faster), the
    preset's last step stores the weights still float as int8: the file shrinks either way."""
    args, source, out, report = mlp_job
    assert cli.main(args + ["--preset", "int8", "--min-fidelity", "cosine=0.98"]) == 0
    records = {r["name"]: r for r in json.loads(report.read_text())["records"]}
    assert {"quantize-int8", "quantize-weights"} <= set(records)
    quantized = model_io.load(out)
    float_weights = [t.name for t in quantized.graph.initializer if t.data_type == TensorProto.FLOAT and np.prod(t.dims) >= 1024]
    assert float_weights == []
    assert out.stat().st_size < source.stat().st_size / 3
