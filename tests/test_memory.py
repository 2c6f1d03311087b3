"""No memory growth over many training iterations (the CPU's resident memory; CUDA's allocated
bytes where a GPU is present), calls that raise included."""
import gc
import sys

import pytest
import torch

import lstm_fused
from lstm_testing import make_inputs

ITERATIONS = 1000


def resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096


def live_tensors() -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))


def run_iterations(device, measure):
    """measure() before and after ITERATIONS training steps, each with calls that raise (in the
    module's checks, in the op's C++ checks) and a second derivative every 50th step."""
    torch.manual_seed(0)
    # Small products, many activations: about 0.5 MB of tensors per step for little arithmetic.
    model = lstm_fused.LSTM(8, 8, bidirectional=True, device=device)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    x = torch.randn(16, 64, 8, device=device)
    inputs = make_inputs(5, 3, 4, 8, device=device, dtype=torch.float32)
    args = [inputs[k] for k in ("x", "h0", "c0", "w_ih", "w_hh", "b_ih", "b_hh", "w_hr")]
    bad_calls = [
        lambda: model(torch.randn(16, 64, 7, device=device)),
        lambda: model(x, (torch.zeros(4, 64, 8, device=device),) * 3),
        lambda: torch.ops.lstm_fused.forward(*args[:4], args[4][:, 1:], *args[5:], None, False,
                                             True),
    ]
    if device == "cpu":  # lengths values are checked where they can be read without a sync
        lengths = torch.tensor([1, 9, 2])
        bad_calls.append(lambda: torch.ops.lstm_fused.forward(*args, lengths, False, True))

    def step(index):
        leaf = x.requires_grad_(index % 50 == 0)
        output, (h_n, c_n) = model(leaf)
        loss = output.square().mean() + h_n.sum() + c_n.sum()
        if leaf.requires_grad:
            (grad,) = torch.autograd.grad(loss, leaf, create_graph=True)
            loss = loss + grad.square().sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        for bad in bad_calls:
            with pytest.raises((RuntimeError, ValueError, TypeError)):
                bad()

    for index in range(100):  # allocator pools, caches and lazy initialisation settle first
        step(index)
    before = measure()
    for index in range(ITERATIONS):
        step(index)
    x.requires_grad_(False)
    return before, measure()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
def test_no_growth_of_resident_memory_on_the_cpu():
    tensors_before = live_tensors()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny products: threads would only add synchronisation
    try:
        before, after = run_iterations("cpu", resident_bytes)
    finally:
        torch.set_num_threads(threads)
    # A leak of any tensor of an iteration (activations, gradients, saved state: tens of KB and
    # more each) grows resident memory by tens of MB or more; the allocator's noise is a few MB.
    assert after - before < 32 * 2**20, f"resident memory grew by {(after - before) / 2**20:.1f} MB"
    assert live_tensors() <= tensors_before + 16, "tensors outlive the iterations"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_no_growth_of_allocated_cuda_memory():
    def allocated():
        torch.cuda.synchronize()
        return torch.cuda.memory_allocated()

    before, after = run_iterations("cuda", allocated)
    assert after == before, f"allocated CUDA memory grew by {after - before} bytes"
