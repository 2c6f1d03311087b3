"""Forward and backward from several Python threads at once give the single-threaded results,
on one shared module and on separate ones."""
import copy
import threading

import pytest
import torch

import lstm_fused
from lstm_testing import make_pair, module_inputs, outputs_and_grads

THREADS = 4
ROUNDS = 5


def run_in_threads(work):
    """Runs work(i) for each of THREADS threads, started together; returns their results."""
    results, errors = [None] * THREADS, []
    barrier = threading.Barrier(THREADS)

    def target(i):
        try:
            barrier.wait()
            results[i] = [work(i) for _ in range(ROUNDS)]
        except BaseException as error:  # reported in the main thread
            errors.append(error)

    threads = [threading.Thread(target=target, args=(i,)) for i in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not any(thread.is_alive() for thread in threads), "a thread hangs"
    assert not errors, errors
    return results


def assert_equal_results(actual, expected):
    for a, e in zip(actual, expected):  # outputs, then gradients
        assert a.keys() == e.keys()
        for name in e:
            torch.testing.assert_close(a[name], e[name], atol=0, rtol=0, msg=name)


CONFIGS = [dict(input_size=5, hidden_size=24, num_layers=2, bidirectional=True, proj_size=7),
           dict(input_size=3, hidden_size=40, batch_first=True)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shared", [True, False], ids=["shared_module", "separate_modules"])
def test_threads_give_single_threaded_results(shared, dtype):
    modules = [make_pair(i, dtype=dtype, **CONFIGS[i % 2])[1] for i in range(THREADS)]
    if shared:
        modules = [modules[0]] * THREADS
    # Each thread its own inputs (and lengths for a PackedSequence every other thread).
    inputs = [module_inputs(modules[i], 9, 3 + i, dtype, seed=i) for i in range(THREADS)]
    lengths = [torch.tensor([9, 4, 1, 7, 2, 5, 8][:3 + i]) if i % 2 else None
               for i in range(THREADS)]

    def work(i):
        x, h0, c0 = inputs[i]
        return outputs_and_grads(modules[i], x, (h0, c0), lengths[i])

    expected = [work(i) for i in range(THREADS)]
    for i, results in enumerate(run_in_threads(work)):
        for result in results:
            assert_equal_results(result, expected[i])


def test_threads_with_second_derivatives_and_the_functional_ops():
    _, model = make_pair(0, input_size=4, hidden_size=6, num_layers=2, dtype=torch.float64)
    x = torch.randn(6, 3, 4, dtype=torch.float64)

    def work(i):
        leaf = (x * (i + 1)).requires_grad_()
        output, _ = model(leaf)
        (grad,) = torch.autograd.grad(output.sum(), leaf, create_graph=True)
        return torch.autograd.grad(grad.square().sum(), list(model.parameters()))

    expected = [work(i) for i in range(THREADS)]
    for i, results in enumerate(run_in_threads(work)):
        for result in results:
            for a, e in zip(result, expected[i]):
                torch.testing.assert_close(a, e, atol=0, rtol=0)


def test_threads_under_each_kernel_path():
    """force_path forces the path for the whole process: set once, it holds on every thread."""
    _, model = make_pair(0, input_size=4, hidden_size=33, bidirectional=True)
    inputs = [module_inputs(model, 7, 2 + 40 * i, seed=i) for i in range(THREADS)]
    for path in lstm_fused.available_paths("cpu"):
        with lstm_fused.force_path(path):
            expected = [outputs_and_grads(model, x, (h0, c0)) for x, h0, c0 in inputs]
            results = run_in_threads(
                lambda i: outputs_and_grads(copy.deepcopy(model), inputs[i][0], inputs[i][1:]))
        for i, per_thread in enumerate(results):
            for result in per_thread:
                assert_equal_results(result, expected[i])
