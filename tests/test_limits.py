"""Size limits on the CPU: hidden 4096, T = 10,000 and batch 1,024 work; all of them at once is
an ordinary allocation error; sizes past 32-bit row and column indexing are rejected with a
message. Cheap: one-step or tiny-hidden runs, stride-0 inputs, meta tensors."""
import subprocess
import sys
import textwrap

import pytest
import torch

import lstm_fused
from lstm_testing import check_against_nn_lstm, make_pair, module_inputs

LIMIT = (1 << 31) // 4 - 1  # kMaxIndexedSize in csrc/lstm.h


@pytest.mark.parametrize("T,B,I,H", [(1, 1, 1, 4096), (10_000, 2, 2, 3), (2, 1024, 3, 5)],
                         ids=["hidden4096", "steps10000", "batch1024"])
def test_large_sizes_match_nn_lstm(T, B, I, H):
    reference, fused = make_pair(input_size=I, hidden_size=H)
    x, h0, c0 = module_inputs(fused, T, B)
    check_against_nn_lstm(reference, fused, x, (h0, c0))


def test_all_large_sizes_at_once_have_the_right_shapes_on_meta():
    """T = 10,000, B = 1,024, H = 4,096 (700 GB of activations) through the module and the ops'
    shape functions, on meta tensors (nn.LSTM's meta path runs step by step: minutes)."""
    module = lstm_fused.LSTM(64, 4096, num_layers=2, bidirectional=True, proj_size=512,
                             device="meta")
    output, (h_n, c_n) = module(torch.empty(10_000, 1024, 64, device="meta"))
    assert (output.shape, h_n.shape, c_n.shape) == ((10_000, 1024, 1024), (4, 1024, 512),
                                                    (4, 1024, 4096))


# In a child process whose address space is capped: the allocation fails the same way whatever
# the machine's memory and overcommit settings.
TOO_LARGE_FOR_MEMORY = textwrap.dedent("""
    import resource, torch, lstm_fused
    resource.setrlimit(resource.RLIMIT_AS, (16 << 30, 16 << 30))
    T, B, H = 10_000, 1024, 4096
    x = torch.zeros(1, 1, 1).expand(T, B, 1)  # stride 0: no memory
    state = torch.zeros(B, H)
    weights = torch.zeros(4 * H, 1), torch.zeros(4 * H, H)
    for training in (True, False):
        try:
            torch.ops.lstm_fused.forward(x, state, state, *weights, None, None, None, None,
                                         False, training)
        except RuntimeError as error:
            print(type(error).__name__, str(error).splitlines()[0])
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses RLIMIT_AS")
def test_all_large_sizes_at_once_are_an_allocation_error():
    result = subprocess.run([sys.executable, "-c", TOO_LARGE_FOR_MEMORY], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert len(lines) == 2 and all("can't allocate memory" in line for line in lines), lines


def expanded(*shape):
    """A tensor of the shape without memory (stride 0 everywhere)."""
    return torch.zeros([1] * len(shape)).expand(*shape)


@pytest.mark.parametrize("name,T,B,I,H,P", [
    ("batch", 1, LIMIT + 1, 1, 1, 0),
    ("hidden", 1, 1, 1, LIMIT // 4 + 1, 0),
    ("projection", 1, 1, 1, 1, LIMIT + 1),
    ("input", 1, 1, LIMIT + 1, 1, 0),
])
def test_sizes_beyond_32_bit_indexing_are_rejected(name, T, B, I, H, P):
    out = P or H
    args = [expanded(T, B, I), expanded(B, out), expanded(B, H), expanded(4 * H, I),
            expanded(4 * H, out), None, None, expanded(P, H) if P else None, None]
    with pytest.raises(RuntimeError, match=f"must each be at most {LIMIT}: the kernels index"):
        torch.ops.lstm_fused.forward(*args, False, False)
    with pytest.raises(RuntimeError, match="32-bit integers"):
        lstm_fused.lstm(args[0], (args[1], args[2]), *args[3:8])


def test_sizes_at_the_limit_pass_the_checks():
    """B at the limit passes the shared checks (then fails only to allocate, as it must)."""
    x = expanded(1, LIMIT, 1)
    with pytest.raises(RuntimeError, match="can't allocate memory|out of memory") as error:
        torch.ops.lstm_fused.forward(x, expanded(LIMIT, 1 << 12), expanded(LIMIT, 1 << 12),
                                     expanded(1 << 14, 1), expanded(1 << 14, 1 << 12), None, None,
                                     None, None, False, False)
    assert "32-bit" not in str(error.value)
