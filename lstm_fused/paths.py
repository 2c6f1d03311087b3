"""Which kernel path computes the recurrence, for tests and benchmarks that compare them."""
import contextlib
import os
from typing import Iterator, List, Union

import torch

_VARIABLE = "LSTM_FUSED_PATH"
_PATHS = {
    # fused: our register-blocked step, each thread owns blocks of hidden units (default up to
    #        batch 128)
    # gemm: one BLAS GEMM per step, then the fused elementwise pass (default above batch 128)
    "cpu": ["fused", "gemm"],
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


def available_paths(device: Union[str, torch.device]) -> List[str]:
    """The kernel paths lstm_fused has on this kind of device, each of which force_path accepts."""
    return list(_PATHS.get(torch.device(device).type, []))


@contextlib.contextmanager
def force_path(name: str) -> Iterator[None]:
    """Within the block, every lstm_fused op uses the path `name` (or "auto": the default choice).

    Sets the environment variable LSTM_FUSED_PATH, which the C++ dispatch reads on every call.
    """
    known = {"auto"}.union(*_PATHS.values())
    if name not in known:
        raise ValueError(f"lstm_fused.force_path: unknown path {name!r}; known: {sorted(known)}")
    previous = os.environ.get(_VARIABLE)
    os.environ[_VARIABLE] = name
    try:
        yield
    finally:
        if previous is None:
            del os.environ[_VARIABLE]
        else:
            os.environ[_VARIABLE] = previous
