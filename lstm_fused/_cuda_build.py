"""What building the CUDA kernels takes, shared by setup.py and the JIT build.

Imports nothing of lstm_fused (setup.py loads this file on its own, before the package exists).
"""
import os
import re
import subprocess
from typing import Optional

# Turing (the scalar tiles only), Ampere, Hopper, and PTX for newer GPUs to JIT-compile.
DEFAULT_ARCHS = "7.5;8.0;9.0+PTX"


def nvcc_version(cuda_home: str) -> Optional[str]:
    """The CUDA release of cuda_home's nvcc, e.g. "13.0"; None if it cannot be run."""
    try:
        text = subprocess.run([os.path.join(cuda_home, "bin", "nvcc"), "--version"],
                              capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    found = re.search(r"release (\d+)\.(\d+)", text)
    return f"{found.group(1)}.{found.group(2)}" if found else None


def cuda_mismatch(torch_cuda: Optional[str], cuda_home: Optional[str]) -> Optional[str]:
    """Why the CUDA kernels cannot be built against this torch with this toolkit (torch's own
    rule: the major versions must agree), or None."""
    if torch_cuda is None or cuda_home is None:
        return None
    toolkit = nvcc_version(cuda_home)
    if toolkit is None or toolkit.split(".")[0] == torch_cuda.split(".")[0]:
        return None
    return (f"this PyTorch was built with CUDA {torch_cuda}, but the CUDA toolkit at {cuda_home} "
            f"is CUDA {toolkit}, and their major versions must match to build the CUDA kernels. "
            f"Either install a CUDA {torch_cuda.split('.')[0]}.x toolkit (and point CUDA_HOME at "
            "it), or build without the CUDA kernels: set LSTM_FUSED_CUDA=0")


def arch_list(requested: Optional[str], gpu_visible: bool) -> Optional[str]:
    """TORCH_CUDA_ARCH_LIST for a build: LSTM_FUSED_CUDA_ARCHS ("80;90" or "8.0;9.0") if given,
    else None (torch's own choice: TORCH_CUDA_ARCH_LIST, or the visible GPUs) where a GPU is
    visible or TORCH_CUDA_ARCH_LIST is set, else DEFAULT_ARCHS (torch finds no GPU to ask)."""
    if requested:
        return ";".join(a if "." in a else f"{a[:-1]}.{a[-1]}"
                        for a in requested.replace(",", ";").split(";") if a)
    if gpu_visible or os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return None
    return DEFAULT_ARCHS
