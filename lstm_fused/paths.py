"""Which kernel path and CPU instruction set compute the recurrence, for tests and benchmarks
that compare them.

The environment variables LSTM_FUSED_PATH and LSTM_FUSED_ISA force them for a whole process
(read once, at the first call); force_path and force_isa force them within a block, for every
thread. The C++ code holds what is forced, for the CPU and CUDA code alike (csrc/lstm.h).
"""
import contextlib
from typing import Iterator, List, Optional, Union

import torch

from . import _extension

_extension.load()

_PATHS = {
    # fused: our register-blocked step, each thread owns blocks of hidden units (the default up
    #        to batch 128; float16/bfloat16 products in hardware with AVX512-BF16)
    # brgemm: oneDNN's brgemm micro-kernel per block of 16 units, the update straight from its
    #         tiles, and dh_{t-1} by brgemm in the backward (the default from batch 4 for
    #         bfloat16 where oneDNN packs it for AMX and for float32 on AVX-512, and from batch
    #         16 for float32 inference on AVX2, all without a projection; float64 runs fused)
    # gemm: one BLAS GEMM per step, then the fused elementwise pass (default above batch 128)
    "cpu": list(torch.ops.lstm_fused._cpu_paths()),
    # One fused kernel launch per step, with a block tile of batch rows x hidden units; the path
    # names the tile's height, the launcher picks its width and any split of K over blocks so
    # that every multiprocessor gets a block:
    # step_small: 8 rows, 4 or 2 units, CUDA cores (the default up to batch 8)
    # step_medium: 16 rows
    # step_large: 32 rows (64 on CUDA cores)
    # float16/bfloat16, and float32 as TF32 where cuDNN's RNN setting allows it, run step_medium
    # and step_large on tensor cores (sm_80+); auto picks between them above batch 8.
    # persistent: one cooperative launch for the whole sequence, each block keeping its slice of
    #             W_hh on chip (the default where it fits and the cost model expects it faster
    #             than the step kernels' plan; forced where it cannot run, an error says why)
    "cuda": ["step_small", "step_medium", "step_large", "persistent"],
}
# The CPU instruction sets the kernels are built for, the most capable first.
_ISAS = ["avx512_bf16", "avx512", "avx2", "baseline"]

# The op namespaces that force_path and force_isa steer: ours, and any other build of the same
# C++ sources that registers itself with _steer (the tests' emulated CUDA build).
_steered = ["lstm_fused"]


def _steer(namespace: str) -> None:
    if namespace not in _steered:
        _steered.append(namespace)
        getattr(torch.ops, namespace)._force(*torch.ops.lstm_fused._forced())  # as ours is now


def available_paths(device: Union[str, torch.device]) -> List[str]:
    """The kernel paths lstm_fused has on this kind of device, each of which force_path accepts."""
    return list(_PATHS.get(torch.device(device).type, []))


def available_isas() -> List[str]:
    """The CPU instruction sets whose kernels this machine can run, the most capable first (the
    default); force_isa accepts each."""
    return list(torch.ops.lstm_fused._cpu_isas())


@contextlib.contextmanager
def _forcing(path: Optional[str], isa: Optional[str]) -> Iterator[None]:
    """Forces path and/or isa (None: as it is; "" = the default choice) within the block."""
    previous = list(torch.ops.lstm_fused._forced())
    wanted = [previous[0] if path is None else path, previous[1] if isa is None else isa]
    _tell(wanted)
    try:
        yield
    finally:
        _tell(previous)


def _tell(names: List[str]) -> None:
    for namespace in _steered:
        getattr(torch.ops, namespace)._force(*names)


@contextlib.contextmanager
def force_path(name: str) -> Iterator[None]:
    """Within the block, every lstm_fused op uses the path `name` (or "auto": the default choice),
    on every thread."""
    known = {"auto"}.union(*_PATHS.values())
    if name not in known:
        raise ValueError(f"lstm_fused.force_path: unknown path {name!r}; known: {sorted(known)}")
    with _forcing("" if name == "auto" else name, None):
        yield


@contextlib.contextmanager
def force_isa(name: str) -> Iterator[None]:
    """Within the block, the CPU kernels are those built for the instruction set `name` (one of
    available_isas(), or "auto": the most capable this CPU supports)."""
    if name != "auto" and name not in _ISAS:
        raise ValueError(f"lstm_fused.force_isa: unknown instruction set {name!r}; known: "
                         f"{['auto', *_ISAS]}")
    if name != "auto" and name not in available_isas():
        raise RuntimeError(f"lstm_fused.force_isa: this CPU does not support {name!r}; it "
                           f"supports {available_isas()}")
    with _forcing(None, "" if name == "auto" else name):
        yield
