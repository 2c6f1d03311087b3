"""benchmarks/gpu_check.sh without a GPU: it stops at once and says why; and the summary it writes
(benchmarks/gpu_summary.py) from sample test, benchmark and compute-sanitizer outputs."""
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def gpu_summary():
    spec = importlib.util.spec_from_file_location("gpu_summary",
                                                  ROOT / "benchmarks" / "gpu_summary.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible: the script would run")
def test_without_a_gpu_it_stops_at_once(tmp_path):
    out = tmp_path / "out"
    began = time.monotonic()
    result = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(out)],
                            capture_output=True, text=True, timeout=120,
                            env=dict(os.environ, PYTHON=sys.executable))
    assert result.returncode == 2, result.stdout + result.stderr
    assert "no CUDA GPU is visible" in result.stderr
    assert time.monotonic() - began < 60
    assert not out.exists()  # nothing built, nothing written


def test_usage_error(tmp_path):
    result = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "usage" in result.stderr


JUNIT = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest" errors="1" failures="1" skipped="1" tests="5">
<testcase classname="tests.test_cuda" name="test_a" time="0.1"/>
<testcase classname="tests.test_cuda" name="test_b[float32]" time="0.1"/>
<testcase classname="tests.test_cuda" name="test_c"><failure message="boom">trace</failure>
</testcase>
<testcase classname="tests.test_cuda" name="test_d"><skipped message="no second GPU"/></testcase>
<testcase classname="tests.test_cuda" name="test_e"><error message="fixture">trace</error>
</testcase>
</testsuite></testsuites>
"""


def provider(median_ms, status="ok"):
    return {"status": status, "reason": None, "times_ms": [median_ms], "median_ms": median_ms}


def write_samples(out: Path, sanitizer_absent=False):
    (out / "benchmark").mkdir(parents=True)
    (out / "steps.tsv").write_text(
        "build\t0\t95\ntests\t1\t80\nbenchmark\t0\t40\n"
        + ("memcheck\tabsent\t0\nracecheck\tabsent\t0\n" if sanitizer_absent
           else "memcheck\t0\t30\nracecheck\t3\t31\n"))
    (out / "test_cuda.xml").write_text(JUNIT)
    doc = {"machine": {"gpu": "NVIDIA H200", "torch": "2.11.0", "cuda": "13.0"},
           "results": [
               {"B": 1, "T": 256, "I": 512, "H": 512, "mode": "inference", "dtype": "float32",
                "providers": {"nn.LSTM": provider(4.0), "nn.LSTM+graph": provider(2.0),
                              "lstm_fused": provider(1.6)}},
               {"B": 64, "T": 128, "I": 512, "H": 512, "mode": "training", "dtype": "bfloat16",
                "providers": {"nn.LSTM": provider(6.0),
                              "nn.LSTM+graph": {"status": "error", "reason": "capture failed",
                                                "times_ms": [], "median_ms": None},
                              "lstm_fused": provider(3.0)}},
           ]}
    (out / "benchmark" / "results.json").write_text(json.dumps(doc))
    if sanitizer_absent:
        for name in ("memcheck", "racecheck"):
            (out / f"{name}.log").write_text("compute-sanitizer is not installed\n")
    else:
        (out / "memcheck.log").write_text("...\n========= ERROR SUMMARY: 0 errors\n")
        (out / "racecheck.log").write_text(
            "========= RACECHECK SUMMARY: 2 hazards displayed (1 error, 1 warning)\n")


def test_summary_from_sample_outputs(gpu_summary, tmp_path):
    write_samples(tmp_path)
    assert gpu_summary.main([str(tmp_path)]) == 1  # a test failed, racecheck found a hazard
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["tests"] == {
        "passed": 2, "failed": 1, "skipped": 1, "errors": 1,
        "failing": ["tests.test_cuda::test_c", "tests.test_cuda::test_e"]}
    assert summary["steps"]["build"] == {"status": 0, "seconds": 95}
    assert summary["failed_steps"] == ["tests", "racecheck"]
    assert summary["ok"] is False
    first, second = summary["benchmark"]
    assert first["shape"] == [1, 256, 512, 512] and first["mode"] == "inference"
    assert first["lstm_fused_ms"] == 1.6
    assert first["speedup_vs_nn_lstm"] == pytest.approx(2.5)
    assert first["speedup_vs_nn_lstm_graph"] == pytest.approx(1.25)
    assert first["lstm_fused_us_per_step"] == pytest.approx(6.25)
    assert second["speedup_vs_nn_lstm"] == pytest.approx(2.0)
    assert second["nn_lstm_graph_ms"] is None and second["speedup_vs_nn_lstm_graph"] is None
    assert summary["memcheck"] == {"ran": True, "exit_status": 0, "errors": 0, "hazards": None,
                                   "clean": True}
    assert summary["racecheck"]["errors"] == 1 and summary["racecheck"]["hazards"] == 2
    assert summary["racecheck"]["clean"] is False
    assert summary["machine"]["gpu"] == "NVIDIA H200"


def test_summary_says_what_did_not_run(gpu_summary, tmp_path):
    write_samples(tmp_path, sanitizer_absent=True)
    (tmp_path / "benchmark" / "results.json").unlink()
    gpu_summary.main([str(tmp_path)])
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["benchmark"] is None
    assert summary["memcheck"] == {"ran": False, "reason": "compute-sanitizer is not installed"}
    assert summary["failed_steps"] == ["tests"]


def test_summary_reads_the_benchmarks_own_output(gpu_summary, tmp_path):
    """The benchmark's real results.json (a CPU smoke run here) has the fields the summary reads."""
    out = tmp_path / "benchmark"
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_lstm.py"), "--device", "cpu", "--smoke",
         "--sets", "goals", "--providers", "nn.LSTM,lstm_fused", "--no-progress", "--out",
         str(out)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = gpu_summary.read_benchmark(out / "results.json")
    assert rows and all(row["lstm_fused_ms"] and row["speedup_vs_nn_lstm"] for row in rows)
    assert all(row["nn_lstm_graph_ms"] is None for row in rows)  # not a provider of that run
