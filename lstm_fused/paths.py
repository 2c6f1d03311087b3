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
    # One fused kernel launch per step, with a block tile of (batch rows x hidden units):
    # step_small: 4 x 4, the product split along K too (the default up to batch 4)
    # step_medium: 16 x 16 (the default when the large tile leaves multiprocessors idle)
    # step_large: 64 x 32, or 32 x 16 for float16/bfloat16 (the default when it gives every
    #             multiprocessor a block)
    # float16/bfloat16 run step_medium and step_large on tensor cores (sm_80+).
    # persistent: one cooperative launch for the whole sequence, each block keeping its slice of
    #             W_hh on chip (the default where it fits and its cost model expects it faster;
    #             forced where it cannot run, an error says why)
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
