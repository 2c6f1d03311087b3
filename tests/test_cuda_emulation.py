"""The CPU emulation of CUDA (tests/emulation/cuda_emulation.h): builds and runs its self-test."""
import shutil
import subprocess
from pathlib import Path

import pytest

EMULATION = Path(__file__).resolve().parent / "emulation"
COMPILER = shutil.which("c++") or shutil.which("g++")

pytestmark = pytest.mark.skipif(COMPILER is None, reason="no C++ compiler (c++ or g++) found")


@pytest.fixture(scope="module")
def selftest(tmp_path_factory) -> Path:
    from torch.utils.cpp_extension import include_paths

    binary = tmp_path_factory.mktemp("cuda_emulation") / "selftest"
    command = [COMPILER, "-std=c++17", "-O2", "-pthread", "-I", str(EMULATION)]
    for directory in include_paths():
        command += ["-I", directory]
    command += [str(EMULATION / "selftest.cpp"), "-o", str(binary)]
    build = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert build.returncode == 0, f"{' '.join(command)}\n{build.stdout}{build.stderr}"
    return binary


def test_selftest_passes(selftest):
    result = subprocess.run([str(selftest)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "all checks passed" in result.stdout


def test_divergent_barrier_aborts_with_a_message(selftest):
    result = subprocess.run([str(selftest), "divergent"], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0, result.stdout + result.stderr
    assert "divergent __syncthreads()" in result.stderr
    assert "did not abort" not in result.stdout
