"""Loads the compiled ops: the installed lstm_fused._C, else a JIT build of csrc/ with ninja."""
import contextlib
import importlib.util
import os
import sys
from pathlib import Path
from typing import Optional

import torch

from . import _cuda_build

_SOURCE_ROOT = Path(__file__).resolve().parent.parent / "csrc"
_loaded = False


def _jit_build() -> None:
    from torch.utils import cpp_extension

    if not (_SOURCE_ROOT / "lstm.cpp").is_file():
        raise ImportError(
            "lstm_fused: the compiled extension lstm_fused._C is missing and the C++ sources are not "
            "beside the package to build it; reinstall with `pip install --no-build-isolation .`"
        )
    if not cpp_extension.is_ninja_available():
        raise ImportError(
            "lstm_fused: the compiled extension lstm_fused._C is missing; building it on the fly "
            "needs ninja (`pip install ninja`), or install the package with "
            "`pip install --no-build-isolation .`"
        )
    sources = [str(_SOURCE_ROOT / "lstm.cpp")] + sorted(str(p) for p in _SOURCE_ROOT.glob("cpu/*.cpp"))
    cuda_sources = sorted(str(p) for pattern in ("cuda/*.cpp", "cuda/*.cu")
                          for p in _SOURCE_ROOT.glob(pattern))
    with_cuda = (
        torch.version.cuda is not None
        and cpp_extension.CUDA_HOME is not None
        and bool(cuda_sources)
        and os.environ.get("LSTM_FUSED_CUDA") != "0"
    )
    archs = None
    if with_cuda:
        mismatch = _cuda_build.cuda_mismatch(torch.version.cuda, cpp_extension.CUDA_HOME)
        if mismatch:
            raise ImportError(f"lstm_fused: building the extension on the fly failed: {mismatch} "
                              "in the environment, or install a build of lstm_fused")
        # As setup.py does: without a visible GPU torch has no architecture to build for.
        archs = _cuda_build.arch_list(os.environ.get("LSTM_FUSED_CUDA_ARCHS"),
                                      torch.cuda.is_available())
    # As in setup.py: at::parallel_for is inlined OpenMP, serial without -fopenmp.
    openmp = ["-fopenmp"] if sys.platform.startswith("linux") else []
    with _environment("TORCH_CUDA_ARCH_LIST", archs):
        cpp_extension.load(
            name="lstm_fused_jit_cuda" if with_cuda else "lstm_fused_jit",
            sources=sources + (cuda_sources if with_cuda else []),
            extra_cflags=["-O3", "-fno-trapping-math", "-fno-math-errno"] + openmp
            + (["-DLSTM_FUSED_WITH_CUDA"] if with_cuda else []),
            extra_ldflags=openmp,
            extra_cuda_cflags=["-O3"],
            with_cuda=with_cuda,
            is_python_module=False,
        )


@contextlib.contextmanager
def _environment(name: str, value: Optional[str]):
    """Sets the environment variable name to value (unless None) within the block."""
    previous = os.environ.get(name)
    if value is not None:
        os.environ[name] = value
    try:
        yield
    finally:
        if value is not None and previous is None:
            del os.environ[name]
        elif value is not None:
            os.environ[name] = previous


def load() -> None:
    """Registers the torch.ops.lstm_fused ops, building them first if no build is installed."""
    global _loaded
    if _loaded:
        return
    built = importlib.util.find_spec("lstm_fused._C")
    if built is not None:
        try:
            # A plain library (no Python module in it), so that LibTorch programs can load it too.
            torch.ops.load_library(built.origin)
        except OSError as error:
            raise ImportError(
                f"lstm_fused: the compiled extension failed to load ({error}); it was probably built "
                f"against another PyTorch than this one ({torch.__version__}). Rebuild it with "
                "`pip install --no-build-isolation --force-reinstall --no-deps .`"
            ) from error
    else:
        _jit_build()
    _loaded = True
