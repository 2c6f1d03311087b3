"""Builds lstm_fused._C against the PyTorch already installed.

Install with `pip install --no-build-isolation .` (or `-e .`): an isolated build environment would
download a different, several-GB build of torch to compile against.

Environment variables:
  LSTM_FUSED_CUDA=1|0       force or skip the CUDA kernels (default: build them when torch has CUDA
                            and nvcc is found)
  LSTM_FUSED_CUDA_ARCHS     CUDA architectures, e.g. "80;90" (default: TORCH_CUDA_ARCH_LIST, else
                            the visible GPUs, else "7.5;8.0;9.0+PTX")
"""
import glob
import importlib.util
import os
import sys

from setuptools import setup

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError as error:  # pragma: no cover - only without torch
    raise SystemExit(
        "lstm_fused compiles against the installed PyTorch, which was not found "
        f"({error}). Install torch first (e.g. `pip install torch==2.13.0`), then "
        "`pip install --no-build-isolation .`"
    )

ROOT = os.path.dirname(os.path.abspath(__file__))


def load_cuda_build():
    """lstm_fused/_cuda_build.py on its own (importing the package would load the extension)."""
    spec = importlib.util.spec_from_file_location(
        "lstm_fused_cuda_build", os.path.join(ROOT, "lstm_fused", "_cuda_build.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


cuda_build = load_cuda_build()


def use_cuda() -> bool:
    forced = os.environ.get("LSTM_FUSED_CUDA")
    available = torch.version.cuda is not None and CUDA_HOME is not None
    if forced == "1":
        if not available:
            raise SystemExit("LSTM_FUSED_CUDA=1 but torch has no CUDA or nvcc was not found")
    elif forced == "0" or not available:
        return False
    # Fail here, with both versions named, rather than deep inside torch's build helper.
    mismatch = cuda_build.cuda_mismatch(torch.version.cuda, CUDA_HOME)
    if mismatch:
        raise SystemExit(f"lstm_fused: {mismatch}, e.g. "
                         "`LSTM_FUSED_CUDA=0 pip install --no-build-isolation .`")
    return True


def sources(*patterns):
    found = []
    for pattern in patterns:
        found += sorted(glob.glob(os.path.join("csrc", pattern)))
    return found



# torch's own flags for its kernels: no value changes, but comparisons may be if-converted, so
# that the CPU row loops vectorise. The C++ standard is left to torch's build helper.
cxx_flags = ["-O3", "-fno-trapping-math", "-fno-math-errno"]
link_flags = []
if sys.platform.startswith("linux"):
    # at::parallel_for is OpenMP inlined into our code: without -fopenmp it runs serially. The
    # loader reuses the libgomp.so.1 that torch has already loaded, so torch.set_num_threads
    # governs our threads too.
    cxx_flags.append("-fopenmp")
    link_flags.append("-fopenmp")
cuda = use_cuda() and bool(sources("cuda/*.cu"))
if cuda:
    archs = cuda_build.arch_list(os.environ.get("LSTM_FUSED_CUDA_ARCHS"), torch.cuda.is_available())
    if archs:
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    extension = CUDAExtension(
        "lstm_fused._C",
        sources("*.cpp", "cpu/*.cpp", "cuda/*.cpp", "cuda/*.cu"),
        define_macros=[("LSTM_FUSED_WITH_CUDA", None)],
        extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3"]},
        extra_link_args=link_flags,
    )
else:
    extension = CppExtension(
        "lstm_fused._C",
        sources("*.cpp", "cpu/*.cpp"),
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=link_flags,
    )

setup(
    ext_modules=[extension],
    cmdclass={"build_ext": BuildExtension},
)
