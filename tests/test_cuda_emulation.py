"""The CPU emulation of CUDA (tests/emulation/cuda_emulation.h): builds and runs its self-test,
plainly and with -fsanitize=address,undefined."""
import os
import shutil
import subprocess
from pathlib import Path

import pytest

EMULATION = Path(__file__).resolve().parent / "emulation"
# $CXX picks the compiler (e.g. CXX=clang++), as in a build.
COMPILER = shutil.which(os.environ.get("CXX") or "c++") or shutil.which("g++")
SANITIZERS = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all",
              "-fno-omit-frame-pointer"]

pytestmark = pytest.mark.skipif(COMPILER is None, reason="no C++ compiler (c++ or g++) found")


def build(directory: Path, flags) -> Path:
    from torch.utils.cpp_extension import include_paths

    binary = directory / "selftest"
    command = [COMPILER, "-std=c++17", "-pthread", "-Wall", "-Wextra", *flags, "-I",
               str(EMULATION)]
    # torch's headers as system headers: their warnings are not the emulator's.
    for include in include_paths():
        command += ["-isystem", include]
    command += [str(EMULATION / "selftest.cpp"), "-o", str(binary)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{' '.join(command)}\n{result.stdout}{result.stderr}"
    assert "warning" not in result.stderr, f"{' '.join(command)}\n{result.stderr}"
    return binary


@pytest.fixture(scope="module")
def selftest(tmp_path_factory) -> Path:
    return build(tmp_path_factory.mktemp("cuda_emulation"), ["-O2"])


@pytest.fixture(scope="module")
def sanitized_selftest(tmp_path_factory) -> Path:
    probe = subprocess.run([COMPILER, "-print-file-name=libasan.so"], capture_output=True,
                           text=True)
    if not os.path.isabs(probe.stdout.strip()):
        pytest.skip(f"{COMPILER} has no AddressSanitizer runtime")
    return build(tmp_path_factory.mktemp("cuda_emulation_sanitized"), ["-O1", "-g1", *SANITIZERS])


def run(binary: Path, *args):
    env = dict(os.environ, ASAN_OPTIONS="detect_leaks=0")
    return subprocess.run([str(binary), *args], capture_output=True, text=True, timeout=120,
                          env=env)


def test_selftest_passes(selftest):
    result = run(selftest)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "all checks passed" in result.stdout


def test_sanitized_selftest_passes(sanitized_selftest):
    """The fiber switches are announced to AddressSanitizer: the emulator itself runs clean."""
    result = run(sanitized_selftest)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "all checks passed" in result.stdout
    assert "AddressSanitizer" not in result.stderr, result.stderr


# Misuses that are undefined behaviour (or fail) on a GPU: each must abort with a message.
MISUSES = {
    "divergent": ["divergent __syncthreads()"],
    "misaligned": ["nvcuda::wmma::load_matrix_sync", "is not 256-bit (32-byte) aligned"],
    "misaligned-store": ["nvcuda::wmma::store_matrix_sync", "is not 256-bit (32-byte) aligned"],
    "bad-ldm": ["nvcuda::wmma::load_matrix_sync", "ldm 36 is not a multiple of 8"],
    "bad-ldm-float": ["nvcuda::wmma::load_matrix_sync", "ldm 18 is not a multiple of 4"],
    "partial-warp": ["nvcuda::wmma::fill_fragment in thread (32, 0, 0)", "partial warp"],
    "copy-misaligned": ["__pipeline_memcpy_async", "is not aligned to the copy size 16"],
    "copy-bad-size": ["__pipeline_memcpy_async", "size 12 is not 4, 8 or 16 bytes"],
    "copy-zfill": ["__pipeline_memcpy_async", "zfill 12 exceeds the size 8"],
    "copy-overlap": ["a second asynchronous copy"],
    "copy-destination-written": ["__pipeline_wait_prior", "was written while the copy was in"],
    "copy-source-changed": ["__pipeline_wait_prior", "changed while the copy was in flight"],
    "copy-never-waited": ["returned with 1 asynchronous copies", "never waited for"],
    # Cooperative launches: a grid barrier that not every block reaches hangs a GPU.
    "grid-barrier-missed": ["deadlock at a grid barrier", "3 of 4 blocks wait at grid barrier 2",
                            "the first: block (1, 0, 0)"],
    "grid-barrier-extra": ["deadlock at a grid barrier", "1 of 4 blocks wait at grid barrier 2"],
    "grid-barrier-mismatched": ["mismatched barriers in block (0, 0, 0)",
                                "16 wait at a grid barrier, 16 at __syncthreads()"],
    "grid-barrier-divergent": ["mismatched barriers in block (0, 0, 0)", "16 have returned"],
    "grid-barrier-outside": ["a grid barrier", "outside a kernel launched with",
                             "launch_cooperative"],
    # A static __shared__ variable would be one for all blocks of a cooperative launch.
    "grid-static-shared": ["a static __shared__ variable in block", "cooperative launch of 4",
                           "use dynamic shared memory"],
}


@pytest.mark.parametrize("mode", sorted(MISUSES))
def test_misuse_aborts_with_a_message(selftest, mode):
    result = run(selftest, mode)
    assert result.returncode != 0, result.stdout + result.stderr
    for message in MISUSES[mode]:
        assert message in result.stderr, result.stderr
    assert "did not abort" not in result.stdout


# What only the sanitizers catch: a kernel reading past a __shared__ array, a global buffer or
# its block's dynamic shared memory in a cooperative launch, and a 16-byte vector load from a
# 4-byte aligned address. Unsanitized, each runs on silently.
SANITIZER_MISUSES = {
    "shared-out-of-bounds": ["out of bounds|insufficient space|global-buffer-overflow"],
    "global-out-of-bounds": ["heap-buffer-overflow"],
    "misaligned-vector": ["misaligned address", "requires 16 byte alignment"],
    "dynamic-shared-out-of-bounds": ["heap-buffer-overflow"],
}


@pytest.mark.parametrize("mode", sorted(SANITIZER_MISUSES))
def test_sanitizers_catch_what_the_emulator_cannot(selftest, sanitized_selftest, mode):
    import re

    plain = run(selftest, mode)
    assert plain.returncode == 0 and "did not abort" in plain.stdout, plain.stderr
    result = run(sanitized_selftest, mode)
    assert result.returncode != 0, result.stdout + result.stderr
    for pattern in SANITIZER_MISUSES[mode]:
        assert re.search(pattern, result.stderr), result.stderr
    assert "did not abort" not in result.stdout
