"""Smoke test of benchmarks/bench_lstm.py: the harness end to end on its tiny grid (timings are
not looked at), its correctness gate and its writers."""
import contextlib
import csv
import importlib.util
import io
import json
import sys
from pathlib import Path

import pytest
import torch

import lstm_fused

BENCH_PATH = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_lstm.py"
CPU = torch.device("cpu")
GPU_ONLY = ("nn.LSTM+graph", "compiled-loop")
GOOD = ("nn.LSTM", "lstm_fused",
        *(f"lstm_fused[{path}]" for path in lstm_fused.available_paths("cpu")),
        "LSTMCell-loop", "8-matmul")


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_lstm", BENCH_PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_lstm"] = module  # dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop("bench_lstm", None)


def run_quietly(bench, argv, providers=None):
    """main(argv) with its output captured; one thread (tiny ops on a busy machine are slow with
    more), the caller's thread count restored."""
    stdout, threads = io.StringIO(), torch.get_num_threads()
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(io.StringIO()):
            doc = bench.main([*argv, "--threads", "1"], providers=providers)
    finally:
        torch.set_num_threads(threads)
    return doc, stdout.getvalue()


@pytest.fixture(scope="module")
def smoke(bench, tmp_path_factory):
    def perturbed(case):  # nn.LSTM with its output nudged: the gate must catch it
        built = bench.nn_lstm(case)
        inner = built.step

        def step():
            y, h, c = inner()
            return y + 1e-2, h, c
        return bench.Built(step, built.grad_w_hh)

    def broken(case):
        raise RuntimeError("deliberately broken")

    providers = dict(bench.default_providers(CPU), perturbed=perturbed, broken=broken)
    out = tmp_path_factory.mktemp("bench")
    doc, printed = run_quietly(
        bench, ["--smoke", "--device", "cpu", "--out", str(out), "--no-progress"], providers)
    return doc, printed, out


def test_rows_and_providers(bench, smoke):
    doc, _, _ = smoke
    expected_rows = {(shape.B, shape.T, shape.I, shape.H, mode)
                     for entry in bench.build_grid("smoke", CPU)
                     for shape in [entry.shape] for mode in bench.MODES if entry.runs(mode)}
    assert len(expected_rows) == 9
    assert (1, 1, 5, 5, "streaming") in expected_rows
    assert {(r["B"], r["T"], r["I"], r["H"], r["mode"]) for r in doc["results"]} == expected_rows
    assert len(doc["results"]) == len(expected_rows)
    assert all(r["dtype"] == "float32" for r in doc["results"])
    assert doc["providers"] == [*GOOD, "onnxruntime", *GPU_ONLY, "perturbed", "broken"]
    for row in doc["results"]:
        assert list(row["providers"]) == doc["providers"]
        for name in GOOD:
            result = row["providers"][name]
            assert result["status"] == "ok", (name, result)
            assert len(result["times_ms"]) == 1 and result["median_ms"] > 0
            assert result["speedup"] is not None
            assert result["max_err"] <= 1e-3
            assert result["peak_mem_mib"] is None  # n/a on CPU
    sets = {s for r in doc["results"] for s in r["sets"]}
    assert sets == {"smoke", "batch", "hidden", "streaming"}


def test_onnxruntime_runs_inference_or_says_why(smoke):
    doc, _, _ = smoke
    installed = importlib.util.find_spec("onnxruntime") is not None
    for row in doc["results"]:
        result = row["providers"]["onnxruntime"]
        if row["mode"] == "training":
            assert result["status"] == "skip" and "inference only" in result["reason"]
        elif installed:
            assert result["status"] == "ok", result
            assert result["max_err"] <= 1e-4
        else:
            assert result["status"] == "skip" and "not installed" in result["reason"]


def test_streaming_carries_the_state(bench):
    """Successive streaming calls continue the sequence: after n calls the state is nn.LSTM's
    after n steps."""
    case = bench.make_case(bench.Shape(1, 1, 4, 6), "streaming", torch.float32, CPU)
    providers = bench.default_providers(CPU)
    names = ["lstm_fused", "LSTMCell-loop"]
    if importlib.util.find_spec("onnxruntime") is not None:
        names.append("onnxruntime")
    expected = bench.nn_lstm(case).step
    for _ in range(3):
        expected_y, expected_h, expected_c = expected()
    for name in names:
        step = providers[name](case).step
        for _ in range(3):
            y, h, c = step()
        for actual, wanted in zip((y, h, c), (expected_y, expected_h, expected_c)):
            torch.testing.assert_close(actual, wanted, atol=1e-5, rtol=1e-4, msg=name)


def test_header_names_the_cpu_features(smoke):
    doc, printed, _ = smoke
    machine = doc["machine"]
    assert "cpu_features" in machine and machine["cpu_count"] >= 1
    assert machine["lstm_fused_isa"] == lstm_fused.available_isas()[0]
    assert f"{machine['cpu_count']} cores" in printed.splitlines()[0]


def test_correctness_gate_flags_a_wrong_provider(smoke):
    doc, printed, _ = smoke
    for row in doc["results"]:
        result = row["providers"]["perturbed"]
        assert result["status"] == "wrong"
        assert result["reason"].startswith("y err")
        assert result["max_err"] == pytest.approx(1e-2, rel=1e-2)
        assert result["times_ms"] == [] and result["median_ms"] is None
        assert row["providers"]["broken"]["status"] == "error"
        assert "deliberately broken" in row["providers"]["broken"]["reason"]
    assert printed.count("wrong (y err 1.0e-02)") == len(doc["results"])
    assert "broken: RuntimeError: deliberately broken" in printed


def test_gpu_only_providers_say_why_on_cpu(smoke):
    doc, printed, _ = smoke
    for row in doc["results"]:
        for name in GPU_ONLY:
            result = row["providers"][name]
            assert result["status"] == "skip"
            assert "needs CUDA" in result["reason"]
            assert result["times_ms"] == []
    for name in GPU_ONLY:
        assert f"not run: {name}: needs CUDA" in printed


def test_table_and_files(smoke):
    doc, printed, out = smoke
    table = (out / "table.txt").read_text()
    assert table.strip() in printed
    header = next(line for line in table.splitlines() if line.startswith("shape (B,T,I,H)"))
    for name in (*GOOD, "perturbed", "broken"):
        assert name in header
    body = [line for line in table.splitlines() if line.startswith("(")]
    assert len(body) == len(doc["results"])
    assert all("x)" in line for line in body)  # speed-up ratios vs nn.LSTM

    saved = json.loads((out / "results.json").read_text())
    assert saved["results"] == json.loads(json.dumps(doc["results"]))
    machine = saved["machine"]
    for key in ("date", "torch", "cpu", "threads", "cudnn", "device"):
        assert key in machine
    assert machine["torch"] == torch.__version__

    with open(out / "results.csv", newline="") as handle:
        records = list(csv.DictReader(handle))
    assert len(records) == len(doc["results"]) * len(doc["providers"])
    assert {r["provider"] for r in records} == set(doc["providers"])
    statuses = {(r["provider"], r["status"]) for r in records}
    assert ("perturbed", "wrong") in statuses and ("8-matmul", "ok") in statuses
    assert ("compiled-loop", "skip") in statuses


def test_plots(smoke):
    pytest.importorskip("matplotlib")
    _, _, out = smoke
    for name in ("time_vs_batch", "time_vs_hidden", "speedup_vs_batch", "speedup_vs_hidden"):
        data = (out / f"{name}.png").read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 1000


def test_grids_name_the_goal_shapes(bench):
    quick = bench.build_grid("quick", CPU)
    shapes = {(e.shape.B, e.shape.T, e.shape.I, e.shape.H): e for e in quick}
    for goal in [(1, 256, 256, 256), (32, 35, 256, 256), (64, 64, 512, 512)]:
        assert "goal" in shapes[goal].sets and shapes[goal].modes is None  # both modes
    full = bench.build_grid("full", CPU)
    batches = sorted(e.shape.B for e in full if "batch" in e.sets)
    hiddens = sorted(e.shape.H for e in full if "hidden" in e.sets)
    assert batches[0] == 1 and batches[-1] == 256
    assert hiddens[0] == 32 and hiddens[-1] == 2048
    gpu = {(e.shape.B, e.shape.T, e.shape.I, e.shape.H): e.modes
           for e in bench.build_grid("quick", torch.device("cuda")) if "goal" in e.sets}
    assert gpu == {(64, 128, 512, 512): ("training",), (256, 64, 1024, 1024): ("training",),
                   (1, 256, 512, 512): ("inference",), (8, 256, 512, 512): None}


def test_forced_lstm_fused_paths_become_providers(bench, monkeypatch):
    lstm_fused = pytest.importorskip("lstm_fused")
    monkeypatch.setattr(lstm_fused, "available_paths", lambda device: ["a", "b"], raising=False)
    names = list(bench.default_providers(CPU))
    assert names[:4] == ["nn.LSTM", "lstm_fused", "lstm_fused[a]", "lstm_fused[b]"]
    case = bench.make_case(bench.Shape(2, 3, 4, 5), "inference", torch.float32, CPU)
    if not hasattr(lstm_fused, "force_path"):
        with pytest.raises(bench.Skip, match="force_path"):
            bench.default_providers(CPU)["lstm_fused[a]"](case)


def test_provider_selection_and_custom_shapes(bench):
    doc, printed = run_quietly(bench, ["--device", "cpu", "--shape", "2,2,3,4", "--mode",
                                       "inference", "--providers", "nn.LSTM,lstm_fused*",
                                       "--repeats", "1", "--warmup", "0", "--no-progress"])
    assert doc["providers"][:2] == ["nn.LSTM", "lstm_fused"]
    assert all(name.startswith(("nn.LSTM", "lstm_fused")) for name in doc["providers"])
    assert [(r["B"], r["T"], r["I"], r["H"], r["mode"], r["sets"]) for r in doc["results"]] == [
        (2, 2, 3, 4, "inference", ["custom"])]
    assert doc["results"][0]["providers"]["lstm_fused"]["status"] == "ok"


def test_a_failing_reference_fails_the_row_not_the_run(bench, monkeypatch):
    def failing(case):
        raise RuntimeError("no cuDNN for you")
    monkeypatch.setattr(bench, "run_reference", failing)
    doc, printed = run_quietly(
        bench, ["--smoke", "--device", "cpu", "--sets", "goals", "--no-progress"])
    assert len(doc["results"]) == 2
    for row in doc["results"]:
        for result in row["providers"].values():
            assert result["status"] == "error" and "no cuDNN for you" in result["reason"]
            assert result["times_ms"] == []
    assert "no reference, nn.LSTM failed" in printed


def test_cuda_table_shows_peak_memory(bench, smoke):
    doc, _, _ = smoke
    fake = json.loads(json.dumps(doc))  # as a CUDA run would have it
    fake["machine"].update(cuda="12.4", gpu="Some GPU", device_name="GPU Some GPU")
    for row in fake["results"]:
        for result in row["providers"].values():
            if result["status"] == "ok":
                result["peak_mem_mib"] = 12.5
    table = bench.format_table(fake)
    assert "peak memory of one call" in table and "12.5" in table
    assert "n/a on CPU" not in table


def test_stacked_bidirectional_providers_agree(bench):
    doc, _ = run_quietly(bench, ["--smoke", "--device", "cpu", "--sets", "goals", "--layers", "2",
                                 "--bidirectional", "--no-progress"])
    for row in doc["results"]:
        for name in GOOD:
            assert row["providers"][name]["status"] == "ok", (name, row["providers"][name])
    # The loop compiled-loop compiles on GPU, run eagerly here.
    case = bench.make_case(bench.Shape(2, 3, 4, 5), "inference", torch.float32, CPU, layers=2,
                           bidirectional=True)
    reference = bench.run_reference(case)
    weights = [bench.layer_weights(case.ref, layer, direction)
               for layer in range(2) for direction in range(2)]
    with torch.no_grad():
        outputs = bench.fused_gate_lstm(case.x, case.h0, case.c0, weights, 2)
    for actual, expected in zip(outputs, reference.outputs):
        torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-4)


def test_the_persistent_goal_shapes_are_a_gpu_set(bench):
    def shapes(grid, device, sets=None):
        return {(e.shape.B, e.shape.T, e.shape.I, e.shape.H): e.modes
                for e in bench.build_grid(grid, torch.device(device), sets)
                if "persistent" in e.sets}
    expected = {(1, 256, 256, 256): ("inference",), (1, 256, 512, 512): None,
                (1, 256, 1024, 1024): ("inference",), (4, 256, 512, 512): ("training",),
                (8, 256, 512, 512): ("training",), (16, 1024, 768, 768): None}
    # In the full GPU grid by default; (8, 256, 512, 512) is a GPU goal in both modes too.
    assert shapes("full", "cuda") == {**expected, (8, 256, 512, 512): None}
    assert shapes("quick", "cuda", ["persistent"]) == expected
    assert shapes("full", "cpu") == {} and shapes("quick", "cuda") == {}


def test_a_forced_path_that_cannot_run_is_skipped_with_the_reason(bench, monkeypatch):
    lstm_fused = pytest.importorskip("lstm_fused")
    case = bench.make_case(bench.Shape(2, 3, 4, 5), "inference", torch.float32, CPU)

    def cannot_run(*args, **kwargs):
        raise RuntimeError("lstm_fused: the persistent kernel was forced but cannot run here: "
                           "the weights need 300 KiB")
    monkeypatch.setattr(lstm_fused.LSTM, "forward", cannot_run)
    monkeypatch.setattr(lstm_fused, "available_paths", lambda device: ["fused", "gemm"])
    built = bench.lstm_fused_provider("gemm")(case)
    with pytest.raises(bench.Skip, match="cannot run here: the weights need 300 KiB"):
        built.step()
