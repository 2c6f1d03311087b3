"""Smoke tests of examples/sine.py and examples/char_lm.py: each runs as a user would run it, as a
subprocess, for a few steps on the CPU with tiny sizes."""
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None

# One thread per process: the tests' models are tiny, and several OpenMP threads per process
# on a busy machine only stall each other.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

SINE_TINY = ["--length", "300", "--holdout", "40", "--window", "16", "--hidden", "8",
             "--batch-size", "8", "--device", "cpu"]
CHAR_TINY = ["--embed", "8", "--hidden", "16", "--batch-size", "4", "--seq-len", "16",
             "--eval-chars", "2000", "--sample", "40", "--prime", "Ham.\\n", "--device", "cpu"]


def run(args, timeout=120):
    """Runs a command; returns the JSON metrics, the only line it prints on stdout."""
    result = subprocess.run(args, capture_output=True, text=True, env=ENV, timeout=timeout)
    assert result.returncode == 0, f"{args} failed:\n{result.stderr[-3000:]}"
    lines = result.stdout.splitlines()
    assert len(lines) == 1, f"expected one JSON line on stdout, got {result.stdout!r}"
    return json.loads(lines[0])


def example(name, *args):
    return [sys.executable, str(EXAMPLES / name), *args]


def close(a, b, rel):
    return math.isclose(a, b, rel_tol=rel)


def test_sine_trains_evaluates_plots_and_backends_agree(tmp_path):
    """A few steps on each backend: --backend torch swaps in nn.LSTM with the same initial
    weights, so the losses agree."""
    plot = [] if HAS_MATPLOTLIB else ["--no-plot"]
    fused = run(example("sine.py", *SINE_TINY, "--steps", "5", "--out", str(tmp_path / "fused"),
                        *plot))
    reference = run(example("sine.py", *SINE_TINY, "--steps", "5", "--no-plot",
                            "--backend", "torch", "--out", str(tmp_path / "torch")))
    assert fused["example"] == "sine" and fused["steps"] == 5 and fused["device"] == "cpu"
    assert (fused["backend"], reference["backend"]) == ("fused", "torch")
    for key in ("train_loss", "test_mse", "forecast_mse"):
        assert math.isfinite(fused[key]) and fused[key] >= 0
        assert close(fused[key], reference[key], 1e-4), (key, fused[key], reference[key])
    assert fused["initial_param_checksum"] == reference["initial_param_checksum"]
    assert json.loads((tmp_path / "fused" / "metrics.json").read_text()) == fused
    if HAS_MATPLOTLIB:
        png = Path(fused["plot"])
        assert png.parent == tmp_path / "fused"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_char_lm_trains_saves_resumes_and_samples(tmp_path):
    first = run(example("char_lm.py", *CHAR_TINY, "--steps", "3", "--out", str(tmp_path)))
    assert first["example"] == "char_lm" and first["world_size"] == 1
    assert first["steps"] == 3 and first["config"]["layers"] == 2
    # An untrained model is close to uniform over the 76 characters.
    assert abs(first["val_loss"] - math.log(76)) < 0.5
    assert close(first["val_bits_per_char"], first["val_loss"] / math.log(2), 1e-9)
    assert first["sample"].startswith("Ham.\n") and len(first["sample"]) == 5 + 40
    assert (tmp_path / "sample.txt").read_text() == first["sample"] + "\n"
    checkpoint = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert checkpoint["step"] == 3 and len(checkpoint["vocab"]) == 76
    assert {"model", "optimizer", "config"} <= set(checkpoint)
    assert "lstm.weight_hh_l1" in checkpoint["model"]

    # Resume (on nn.LSTM: the state_dicts are the same) and train two more steps.
    resumed = run(example("char_lm.py", *CHAR_TINY, "--steps", "5", "--resume",
                          "--backend", "torch", "--out", str(tmp_path)))
    assert resumed["steps"] == 5 and resumed["steps_this_run"] == 2
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"] == 5
    assert math.isfinite(resumed["val_loss"])


def _gloo_available():
    return torch.distributed.is_available() and torch.distributed.is_gloo_available()


@pytest.mark.skipif(not _gloo_available(),
                    reason="torch.distributed with the gloo backend is not available in this build")
def test_char_lm_ddp_two_processes(tmp_path):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                "--standalone"]
    metrics = run(launcher + [str(EXAMPLES / "char_lm.py"), *CHAR_TINY, "--steps", "3",
                              "--out", str(tmp_path)], timeout=180)
    assert metrics["world_size"] == 2 and metrics["steps"] == 3  # printed by rank 0 only
    assert math.isfinite(metrics["val_loss"])
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"] == 3
