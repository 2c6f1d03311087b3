import os
import shutil
import subprocess
import sys

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)


def _sanitizer_runtime_loaded() -> bool:
    try:
        with open("/proc/self/maps") as maps:
            return "libasan" in maps.read()
    except OSError:
        return False


def pytest_configure(config):
    """With LSTM_FUSED_EMULATION_SANITIZE=1 the emulated CUDA build (test_cuda_emulated.py) is
    instrumented with AddressSanitizer, whose runtime must be loaded before anything else: pytest
    restarts itself once with the runtime preloaded (the compilers it starts do not inherit it)."""
    if os.environ.get("LSTM_FUSED_EMULATION_SANITIZE") != "1":
        return
    if _sanitizer_runtime_loaded():
        os.environ.pop("LD_PRELOAD", None)
        return
    compiler = shutil.which(os.environ.get("CXX") or "c++") or shutil.which("g++")
    if compiler is None:
        raise pytest.UsageError("LSTM_FUSED_EMULATION_SANITIZE=1 needs a C++ compiler")
    # libstdc++ too, so that the sanitizer finds the real __cxa_throw it intercepts.
    runtimes = [subprocess.run([compiler, f"-print-file-name={name}"], capture_output=True,
                               text=True).stdout.strip() for name in ("libasan.so", "libstdc++.so")]
    if not all(os.path.isabs(runtime) for runtime in runtimes):
        raise pytest.UsageError(f"LSTM_FUSED_EMULATION_SANITIZE=1: {compiler} has no libasan")
    env = dict(os.environ, LD_PRELOAD=" ".join(os.path.realpath(r) for r in runtimes))
    # Python and torch keep memory until exit: leaks are not what this run looks for.
    env.setdefault("ASAN_OPTIONS", "detect_leaks=0")
    env.setdefault("UBSAN_OPTIONS", "print_stacktrace=1")
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
