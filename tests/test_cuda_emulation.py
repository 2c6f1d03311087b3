"""The CPU emulation of CUDA (tests/emulation/cuda_emulation.h): builds and runs its self-test."""
import os
import shutil
import subprocess
from pathlib import Path

import pytest

EMULATION = Path(__file__).resolve().parent / "emulation"
# $CXX picks the compiler (e.g. CXX=clang++), as in a build.
COMPILER = shutil.which(os.environ.get("CXX") or "c++") or shutil.which("g++")

pytestmark = pytest.mark.skipif(COMPILER is None, reason="no C++ compiler (c++ or g++) found")


@pytest.fixture(scope="module")
def selftest(tmp_path_factory) -> Path:
    from torch.utils.cpp_extension import include_paths

    binary = tmp_path_factory.mktemp("cuda_emulation") / "selftest"
    command = [COMPILER, "-std=c++17", "-O2", "-pthread", "-Wall", "-Wextra", "-I", str(EMULATION)]
    # torch's headers as system headers: their warnings are not the emulator's.
    for directory in include_paths():
        command += ["-isystem", directory]
    command += [str(EMULATION / "selftest.cpp"), "-o", str(binary)]
    build = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert build.returncode == 0, f"{' '.join(command)}\n{build.stdout}{build.stderr}"
    assert "warning" not in build.stderr, f"{' '.join(command)}\n{build.stderr}"
    return binary


def test_selftest_passes(selftest):
    result = subprocess.run([str(selftest)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "all checks passed" in result.stdout


# Misuses that are undefined behaviour (or fail) on a GPU: each must abort with a message.
MISUSES = {
    "divergent": ["divergent __syncthreads()"],
    "misaligned": ["nvcuda::wmma::load_matrix_sync", "is not 256-bit (32-byte) aligned"],
    "misaligned-store": ["nvcuda::wmma::store_matrix_sync", "is not 256-bit (32-byte) aligned"],
    "bad-ldm": ["nvcuda::wmma::load_matrix_sync", "ldm 36 is not a multiple of 8"],
    "bad-ldm-float": ["nvcuda::wmma::load_matrix_sync", "ldm 18 is not a multiple of 4"],
    "partial-warp": ["nvcuda::wmma::fill_fragment in thread (32, 0, 0)", "partial warp"],
    # Cooperative launches: a grid barrier that not every block reaches hangs a GPU.
    "grid-barrier-missed": ["deadlock at a grid barrier", "3 of 4 blocks wait at grid barrier 2",
                            "the first: block (1, 0, 0)"],
    "grid-barrier-extra": ["deadlock at a grid barrier", "1 of 4 blocks wait at grid barrier 2"],
    "grid-barrier-mismatched": ["mismatched barriers in block (0, 0, 0)",
                                "16 wait at a grid barrier, 16 at __syncthreads()"],
    "grid-barrier-divergent": ["mismatched barriers in block (0, 0, 0)", "16 have returned"],
    "grid-barrier-outside": ["a grid barrier", "outside a kernel launched with",
                             "launch_cooperative"],
}


@pytest.mark.parametrize("mode", sorted(MISUSES))
def test_misuse_aborts_with_a_message(selftest, mode):
    result = subprocess.run([str(selftest), mode], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0, result.stdout + result.stderr
    for message in MISUSES[mode]:
        assert message in result.stderr, result.stderr
    assert "did not abort" not in result.stdout
