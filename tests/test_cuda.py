"""lstm_fused on a real CUDA GPU.

lstm_fused.LSTM against nn.LSTM (cuDNN) and a float64 copy of it over odd sizes and every dtype,
each forced kernel path (the step tiles and the persistent kernel) against the float64 reference
(lengths, reverse, projections, PackedSequence), gradcheck, opcheck, poisoned memory, bitwise
determinism, a side stream, a second GPU, non-contiguous inputs, replace_lstm, torch.compile and
autocast; the GEMMs' TF32 flag; capture in CUDA graphs (both ops, a module,
torch.compile(mode="reduce-overhead")) with no host synchronisation; the dispatch between the
persistent kernel and the step kernels and its fallbacks; and the every-kernel subset that
benchmarks/gpu_check.sh runs under compute-sanitizer.

Skipped without a GPU. test_cuda_emulated.py runs the same CUDA code on the CPU through an emulator
and covers the kernels' shapes, tiles and tails without one; this file checks what only the
hardware can: the real compiler and memory model, streams, devices, and half-precision arithmetic.
"""
import contextlib
import copy

import pytest
import torch

import lstm_fused
from lstm_testing import (ARG_NAMES, DTYPES, OP_GRAD_NAMES, TOLERANCES, Tagger,
                          assert_bitwise_equal, check_against_nn_lstm, compare_with_reference,
                          dtype_id, functional_args, lengths_for, make_inputs, make_pair,
                          module_inputs, op_reference, outputs_and_grads, poison_memory, run_op)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CUDA = torch.device("cuda")
PATHS = lstm_fused.available_paths("cuda")
PERSISTENT = "persistent"
STEP_TILES = [path for path in PATHS if path != PERSISTENT]
FORCED_BUT_CANNOT_RUN = "the persistent kernel was forced (LSTM_FUSED_PATH=persistent) but"


@contextlib.contextmanager
def forced(path):
    """force_path(path); a forced persistent kernel that cannot run here (W_hh beyond the
    device's on-chip memory) is an error that says why, and skips the test."""
    try:
        with lstm_fused.force_path(path):
            yield
    except RuntimeError as error:
        if FORCED_BUT_CANNOT_RUN not in str(error):
            raise
        pytest.skip(str(error))


@pytest.fixture(autouse=True)
def no_tf32():
    """Full float32 products in cuDNN and cuBLAS, for nn.LSTM and our GEMMs alike."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def poison():
    poison_memory(CUDA)


def cuda_pair(seed=0, dtype=torch.float32, **config):
    return make_pair(seed, device=CUDA, dtype=dtype, **config)


def cuda_inputs(*shape, **options):
    return make_inputs(*shape, device=CUDA, **options)


# T, B, I, H, num_layers, bidirectional, proj_size, batch_first: each B in (1, 3, 129), each H in
# (1, 31, 129, 1000), T = 1 and 37.
MODULE_GRID = [
    (1, 1, 3, 1, 1, False, 0, False),
    (37, 1, 5, 129, 2, False, 0, False),
    (37, 3, 7, 31, 2, True, 0, True),
    (37, 129, 6, 31, 1, True, 0, False),
    (1, 129, 9, 129, 2, True, 17, True),
    (37, 3, 8, 129, 1, True, 5, False),
    (9, 3, 11, 1000, 1, False, 0, True),
    (6, 129, 4, 1000, 2, True, 250, False),
]
DTYPE_GRID = [(37, 3, 7, 31, 2, True, 0, True), (9, 129, 6, 129, 1, False, 17, False)]


def config_id(config):
    T, B, _, H, num_layers, bidirectional, proj_size, batch_first = config
    return (f"T{T}-B{B}-H{H}-L{num_layers}" + ("-bi" if bidirectional else "")
            + (f"-proj{proj_size}" if proj_size else "") + ("-batch_first" if batch_first else ""))


def build(config, dtype):
    T, B, I, H, num_layers, bidirectional, proj_size, batch_first = config
    reference, fused = cuda_pair(dtype=dtype, input_size=I, hidden_size=H, num_layers=num_layers,
                                 bidirectional=bidirectional, proj_size=proj_size,
                                 batch_first=batch_first)
    x, h0, c0 = module_inputs(fused, T, B, dtype, seed=B + H, device=CUDA)
    return reference, fused, x, (h0, c0)


@pytest.mark.parametrize("config", MODULE_GRID, ids=config_id)
def test_matches_nn_lstm_float32(config):
    check_against_nn_lstm(*build(config, torch.float32))


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("config", DTYPE_GRID, ids=config_id)
def test_matches_nn_lstm_every_dtype(config, dtype):
    check_against_nn_lstm(*build(config, dtype))


# ---------------------------------------------------------------------------------------------
# Each kernel path against the float64 reference of the ops.

# (T, B, I, H, P): T = 1 and 37, batch 1, 3, 5, 33, 129, hidden sizes with tails and H = 1000,
# projections.
PATH_SHAPES = [
    (1, 1, 3, 1, 0),
    (37, 3, 7, 31, 0),
    (9, 129, 5, 129, 0),
    (4, 5, 9, 1000, 0),
    (11, 33, 6, 70, 13),
    (5, 3, 4, 1000, 129),
]


@pytest.mark.parametrize("with_lengths", [False, True], ids=["full", "lengths"])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("shape", PATH_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("path", PATHS)
def test_each_path_matches_float64_reference(path, shape, reverse, with_lengths):
    T, B, I, H, P = shape
    inputs = cuda_inputs(T, B, I, H, P, lengths=lengths_for(T, B) if with_lengths else None,
                         seed=sum(shape))
    with forced(path):
        outputs, grads, upstream_grads, _ = run_op(inputs, reverse, before_each=poison)
    compare_with_reference(outputs, grads, *op_reference(inputs, reverse, upstream_grads),
                           atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("path", PATHS)
def test_each_path_packed_sequence_matches_float64_nn_lstm(path):
    reference, fused = cuda_pair(dtype=torch.float64, input_size=5, hidden_size=33, num_layers=2,
                                 bidirectional=True, proj_size=7)
    x, h0, c0 = module_inputs(fused, 9, 6, torch.float64, seed=5, device=CUDA)
    lengths = torch.tensor([9, 4, 1, 9, 6, 2])  # unsorted
    expected = outputs_and_grads(reference, x, (h0, c0), lengths)
    with forced(path):
        actual = outputs_and_grads(fused, x, (h0, c0), lengths)
    for a, e in zip(actual, expected):  # outputs, then gradients
        assert a.keys() == e.keys()
        for name in e:
            torch.testing.assert_close(a[name], e[name], atol=1e-12, rtol=1e-10,
                                       msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("reverse,proj,lengths", [
    (False, False, None), (True, False, [6, 2, 0, 5]), (False, True, [6, 2, 0, 5]),
    (True, True, None),
], ids=["fwd", "rev-lengths", "proj-lengths", "rev-proj"])
def test_gradcheck(reverse, proj, lengths):
    inputs = cuda_inputs(6, 4, 3, 4, 2 if proj else 0, lengths=lengths, seed=3)
    leaves = tuple(inputs[k].requires_grad_() if inputs[k] is not None else None
                   for k in ARG_NAMES[:-1])

    def function(x, h0, c0, *weights):
        output, (h_n, c_n) = lstm_fused.lstm(x, (h0, c0), *weights, reverse=reverse,
                                             lengths=inputs["lengths"])
        return output, h_n, c_n

    assert torch.autograd.gradcheck(function, leaves, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("training", [True, False], ids=["training", "inference"])
@pytest.mark.parametrize("dtype,proj,with_lengths", [
    (torch.float32, False, False), (torch.float32, True, True), (torch.bfloat16, True, True),
], ids=["float32", "float32-proj-lengths", "bfloat16-proj-lengths"])
def test_opcheck(dtype, proj, with_lengths, training):
    inputs = cuda_inputs(5, 4, 3, 6, 2 if proj else 0, dtype=dtype,
                         lengths=[5, 2, 0, 4] if with_lengths else None)
    args = [t.requires_grad_(training) if t is not None and t.is_floating_point() else t
            for t in (inputs[k] for k in ARG_NAMES)]
    torch.library.opcheck(torch.ops.lstm_fused.forward.default, (*args, False, training))
    if training:
        y, h_n, c_n, gates, cells = torch.ops.lstm_fused.forward(*args, False, True)
        grads = (torch.randn_like(y), torch.randn_like(h_n), torch.randn_like(c_n))
        detached = [t.detach() if t is not None else None
                    for t in (inputs[k] for k in ("x", "h0", "c0", "w_ih", "w_hh", "w_hr"))]
        torch.library.opcheck(torch.ops.lstm_fused.backward.default,
                              (*grads, *detached, inputs["lengths"], y.detach(), gates, cells,
                               False, True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("path", PATHS)
def test_every_element_is_written(path, dtype):
    inputs = cuda_inputs(5, 33, 4, 19, 7, dtype=dtype, lengths=lengths_for(5, 33), seed=9)
    with forced(path):
        for reverse in (False, True):
            outputs, grads, _, saved = run_op(inputs, reverse, before_each=poison)
            poison()
            inference = torch.ops.lstm_fused.forward(*[inputs[k] for k in ARG_NAMES], reverse,
                                                     False)
            tensors = {**dict(zip(("y", "h_n", "c_n"), outputs)),
                       **dict(zip(("grad " + n for n in OP_GRAD_NAMES), grads)),
                       **dict(zip(("raw y", "gates", "cells"), saved)),
                       **dict(zip(("inference y", "inference h_n", "inference c_n"),
                                  inference[:3]))}
            assert saved[1].dtype == saved[2].dtype == torch.float32
            for name, t in tensors.items():
                assert not t.isnan().any(), f"{name} (reverse={reverse}) has unwritten elements"


# ---------------------------------------------------------------------------------------------
# Determinism, streams, devices.

@pytest.mark.parametrize("path", ["auto"] + PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_repeat_runs_are_bitwise_identical(dtype, path):
    _, fused = cuda_pair(dtype=dtype, input_size=16, hidden_size=129, num_layers=2,
                         bidirectional=True, proj_size=31)
    x, h0, c0 = module_inputs(fused, 37, 129, dtype, seed=7, device=CUDA)
    with forced(path):
        first = outputs_and_grads(fused, x, (h0, c0))
        poison()
        second = outputs_and_grads(fused, x, (h0, c0))
    assert_bitwise_equal(second, first)


def test_side_stream_matches_default_stream():
    _, fused = cuda_pair(input_size=8, hidden_size=65, num_layers=2, bidirectional=True,
                         proj_size=9)
    cpu_inputs = module_inputs(fused, 37, 5, seed=8, device="cpu")
    x, h0, c0 = (t.to(CUDA) for t in cpu_inputs)
    expected = outputs_and_grads(fused, x, (h0, c0))
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    assert stream != torch.cuda.current_stream()
    with torch.cuda.stream(stream):
        poison()
        x, h0, c0 = (t.to(CUDA) for t in cpu_inputs)
        # Hold the stream back (about 10 ms): work sent to another stream by mistake would run
        # before the work it depends on, and read poison.
        torch.cuda._sleep(20_000_000)
        actual = outputs_and_grads(fused, x, (h0, c0))
    torch.cuda.synchronize()
    assert_bitwise_equal(actual, expected)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs a second CUDA GPU")
def test_tensors_on_the_second_gpu():
    _, fused = cuda_pair(input_size=6, hidden_size=33, num_layers=2, bidirectional=True,
                         proj_size=5)
    x, h0, c0 = module_inputs(fused, 11, 7, seed=6, device=CUDA)
    expected = outputs_and_grads(fused, x, (h0, c0))
    second = torch.device("cuda", 1)
    assert torch.cuda.current_device() == 0
    actual = outputs_and_grads(copy.deepcopy(fused).to(second), x.to(second),
                               (h0.to(second), c0.to(second)))
    torch.cuda.synchronize(second)
    assert torch.cuda.current_device() == 0, "the op changed the current device"
    for a, e in zip(actual, expected):  # outputs, then gradients
        assert a.keys() == e.keys()
        for name in e:
            assert a[name].device == second, name
            torch.testing.assert_close(a[name].cpu(), e[name].cpu(), atol=2e-5, rtol=1e-4,
                                       msg=lambda m, n=name: f"{n}: {m}")


# ---------------------------------------------------------------------------------------------
# Layouts and integration: non-contiguous tensors, replace_lstm, torch.compile, autocast.

def test_batch_first_and_transposed_input():
    reference, fused = cuda_pair(input_size=6, hidden_size=31, num_layers=2, batch_first=True,
                                 bidirectional=True)
    # [B, T, I]: the op gets a transposed view.
    x, h0, c0 = module_inputs(fused, 7, 5, seed=10, device=CUDA)
    check_against_nn_lstm(reference, fused, x, (h0, c0))
    time_major = copy.deepcopy(fused)
    time_major.batch_first = False
    x_view = x.transpose(0, 1)  # [T, B, I], not contiguous
    assert not x_view.is_contiguous()
    strided = outputs_and_grads(time_major, x_view, (h0, c0))
    contiguous = outputs_and_grads(time_major, x_view.contiguous(), (h0, c0))
    for a, e in zip(strided, contiguous):  # outputs, then gradients
        for name in e:
            torch.testing.assert_close(a[name], e[name], msg=lambda m, n=name: f"{n}: {m}")


def test_non_contiguous_op_arguments():
    inputs = cuda_inputs(6, 4, 5, 31, 0, lengths=[6, 2, 0, 5], seed=4)
    h0 = inputs["h0"][:1].expand(4, -1)  # stride 0 along the batch
    contiguous = dict(inputs, h0=h0.contiguous())
    strided = dict(inputs, h0=h0, x=inputs["x"].transpose(0, 1).contiguous().transpose(0, 1),
                   w_ih=inputs["w_ih"].t().contiguous().t(),
                   w_hh=inputs["w_hh"].t().contiguous().t(),
                   c0=inputs["c0"].t().contiguous().t())
    assert not any(strided[k].is_contiguous() for k in ("x", "h0", "c0", "w_ih", "w_hh"))
    expected = run_op(contiguous, False, before_each=poison)
    actual = run_op(strided, False, before_each=poison)
    for a, e in zip((*actual[0], *actual[1]), (*expected[0], *expected[1])):
        torch.testing.assert_close(a, e, atol=1e-12, rtol=1e-12)


def test_replace_lstm_on_cuda():
    torch.manual_seed(0)
    model = Tagger().to(CUDA)
    tokens = torch.randint(0, 10, (3, 8), device=CUDA)
    parameters = list(model.parameters())
    expected = model(tokens)
    expected_grads = torch.autograd.grad(expected.sum(), parameters)
    assert lstm_fused.replace_lstm(model) is model
    assert type(model.encoder) is lstm_fused.LSTM
    assert all(a is b for a, b in zip(model.parameters(), parameters)), "parameters were copied"
    actual = model(tokens)
    assert actual.device == expected.device
    torch.testing.assert_close(actual, expected, atol=2e-5, rtol=1e-4)
    actual_grads = torch.autograd.grad(actual.sum(), parameters)
    for a, e in zip(actual_grads, expected_grads):
        torch.testing.assert_close(a, e, atol=2e-5, rtol=1e-4)


def test_torch_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    _, model = cuda_pair(input_size=5, hidden_size=33, num_layers=2, bidirectional=True,
                         batch_first=True, proj_size=7)
    compiled = torch.compile(model, fullgraph=True)
    x, h0, c0 = module_inputs(model, 6, 3, seed=2, device=CUDA)
    expected = outputs_and_grads(model, x, (h0, c0))
    actual = outputs_and_grads(compiled, x, (h0, c0))
    for a, e in zip(actual, expected):  # outputs, then gradients (the compiled names differ)
        assert len(a) == len(e)
        for value, expected_value in zip(a.values(), e.values()):
            torch.testing.assert_close(value, expected_value, atol=1e-5, rtol=1e-4)


def test_autocast_bfloat16():
    reference, fused = cuda_pair(input_size=8, hidden_size=33, num_layers=2)
    x = torch.randn(10, 3, 8, device=CUDA)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        output, (h_n, c_n) = fused(x)
        autocast_reference, _ = reference(x)
    assert output.dtype == h_n.dtype == c_n.dtype == torch.bfloat16
    # nn.LSTM runs in reduced precision too; its cuDNN autocast wrapper casts to float16 whatever
    # the autocast dtype (aten/src/ATen/cudnn/AutocastRNN.cpp), where lstm_fused, like autocast's
    # other ops, takes the autocast dtype.
    assert autocast_reference.dtype in (torch.bfloat16, torch.float16)
    # As nn.LSTM computes in bfloat16 from the same rounded weights and input.
    expected, _ = copy.deepcopy(reference).to(torch.bfloat16)(x.to(torch.bfloat16))
    torch.testing.assert_close(output.float(), expected.float(), atol=5e-2, rtol=5e-2)
    output.float().sum().backward()
    assert fused.weight_ih_l0.grad.dtype == torch.float32  # back to the float32 master weights
    assert torch.isfinite(fused.weight_ih_l0.grad).all()


def test_tf32_follows_the_cudnn_flag_like_nn_lstm():
    """With torch.backends.cudnn.allow_tf32 on (PyTorch's default), nn.LSTM and lstm_fused's step
    kernels both multiply in TF32: they agree to TF32's precision (10-bit mantissas), and
    lstm_fused's result differs from its exact float32 one."""
    reference, fused = cuda_pair(0, input_size=64, hidden_size=256)
    x, h0, c0 = module_inputs(reference, 16, 64, device=CUDA)
    exact, _ = outputs_and_grads(fused, x, (h0, c0))
    torch.backends.cudnn.allow_tf32 = True  # the no_tf32 fixture restores it
    ours, our_grads = outputs_and_grads(fused, x, (h0, c0))
    theirs, their_grads = outputs_and_grads(reference, x, (h0, c0))
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], atol=1e-2, rtol=1e-2)
    for name in our_grads:
        torch.testing.assert_close(our_grads[name], their_grads[name], atol=5e-2, rtol=5e-2)
    assert not torch.equal(ours["output"], exact["output"])


@pytest.mark.parametrize("path", PATHS)
def test_all_step_gemms_follow_the_cudnn_flag_not_the_matmul_flag(path):
    """TF32 for float32 is cuDNN's RNN setting alone, in the kernels (step or persistent) and in
    every GEMM: torch.backends.cuda.matmul.allow_tf32 changes nothing."""
    inputs = cuda_inputs(9, 64, 96, 128, 0, dtype=torch.float32, seed=31)
    with forced(path):
        exact = run_op(inputs, False)
        torch.backends.cuda.matmul.allow_tf32 = True  # the no_tf32 fixture restores both
        with_matmul_flag = run_op(inputs, False)
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cuda.matmul.allow_tf32 = False
        tf32 = run_op(inputs, False)
    for a, b in zip((*exact[0], *exact[1]), (*with_matmul_flag[0], *with_matmul_flag[1])):
        assert torch.equal(a, b)
    names = ("y", "h_n", "c_n") + OP_GRAD_NAMES
    differs = {n for n, a, b in zip(names, (*exact[0], *exact[1]), (*tf32[0], *tf32[1]))
               if not torch.equal(a, b)}
    assert {"y", "x", "w_ih", "w_hh"} <= differs, differs


# ---------------------------------------------------------------------------------------------
# Capture-safe: no host synchronisation, no allocation outside the caching allocator.

def test_no_host_synchronisation():
    _, fused = cuda_pair(input_size=8, hidden_size=40, proj_size=12, num_layers=2,
                         bidirectional=True)
    x, h0, c0 = module_inputs(fused, 6, 5, seed=12, device=CUDA)
    lengths = torch.tensor([6, 2, 0, 5, 1], device=CUDA)
    outputs_and_grads(fused, x, (h0, c0))  # first call: kernel loading, handles
    torch.cuda.set_sync_debug_mode("error")
    try:
        for path in ["auto"] + PATHS:
            with lstm_fused.force_path(path):
                y, (h_n, c_n) = lstm_fused.lstm(x, (h0[0], c0[0]), fused.weight_ih_l0,
                                                fused.weight_hh_l0, fused.bias_ih_l0,
                                                fused.bias_hh_l0, fused.weight_hr_l0,
                                                lengths=lengths)
                torch.autograd.backward((y, h_n, c_n), (torch.ones_like(y),
                                                        torch.ones_like(h_n),
                                                        torch.ones_like(c_n)))
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("path", ["auto"] + PATHS)
@pytest.mark.parametrize("dtype,proj,lengths", [
    (torch.float32, 0, None), (torch.float32, 5, [7, 3, 0, 6, 7, 1]),
    (torch.bfloat16, 5, [7, 3, 0, 6, 7, 1]),
], ids=["float32", "float32-proj-lengths", "bfloat16-proj-lengths"])
def test_forward_and_backward_replay_from_a_cuda_graph(path, dtype, proj, lengths):
    """Both ops captured in one CUDA graph; replays on new inputs copied into the captured ones
    match eager runs on the same inputs."""
    static = cuda_inputs(7, 6, 9, 40, proj, dtype=dtype, lengths=lengths, seed=1)
    args = [static[k] for k in ARG_NAMES]
    upstream = [torch.randn(shape, device=CUDA).to(dtype)
                for shape in ((7, 6, proj or 40), (6, proj or 40), (6, 40))]

    def ops():
        y, h_n, c_n, gates, cells = torch.ops.lstm_fused.forward(*args, False, True)
        grads = torch.ops.lstm_fused.backward(*upstream, *args[:5], static["w_hr"],
                                              static["lengths"], y, gates, cells, False, True)
        return (y, h_n, c_n) + tuple(grads)

    with forced(path):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):  # warm-up outside the capture, as CUDA graphs require
                ops()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = ops()
        for seed in (2, 3):
            fresh = cuda_inputs(7, 6, 9, 40, proj, dtype=dtype, lengths=lengths, seed=seed)
            for name in ARG_NAMES:
                if static[name] is not None:
                    static[name].copy_(fresh[name])
            graph.replay()
            replayed = [t.clone() for t in captured]
            eager = ops()
            # The same kernels on the same inputs; cuBLAS may pick another algorithm in a
            # graph, so float32 to rounding and bfloat16 to a unit in its last place.
            tolerance = 1e-5 if dtype == torch.float32 else 1e-2
            for name, a, e in zip(("y", "h_n", "c_n") + OP_GRAD_NAMES, replayed, eager):
                torch.testing.assert_close(a, e, atol=tolerance, rtol=tolerance,
                                           msg=lambda m, n=name: f"{n}: {m}")


def test_module_in_make_graphed_callables():
    reference, fused = cuda_pair(input_size=8, hidden_size=48, num_layers=2)

    class Flat(torch.nn.Module):
        def __init__(self, lstm):
            super().__init__()
            self.lstm = lstm

        def forward(self, x, h0, c0):
            y, (h, c) = self.lstm(x, (h0, c0))
            return y, h, c

    x, h0, c0 = (t.requires_grad_() for t in module_inputs(fused, 10, 4, seed=3, device=CUDA))
    graphed = torch.cuda.make_graphed_callables(Flat(fused), (x, h0, c0))
    for seed in (4, 5):
        fresh = module_inputs(fused, 10, 4, seed=seed, device=CUDA)
        leaves = [t.detach().clone().requires_grad_() for t in fresh]
        outputs = graphed(*leaves)
        loss = sum((t * t).sum() for t in outputs)
        grads = torch.autograd.grad(loss, leaves + list(fused.parameters()))
        eager_leaves = [t.detach().clone().requires_grad_() for t in fresh]
        eager = Flat(fused)(*eager_leaves)
        eager_grads = torch.autograd.grad(sum((t * t).sum() for t in eager),
                                          eager_leaves + list(fused.parameters()))
        for a, e in zip(tuple(outputs) + grads, tuple(eager) + eager_grads):
            torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-4)


def test_torch_compile_reduce_overhead_model():
    """A model with lstm_fused.LSTM inside under torch.compile(mode="reduce-overhead"), which
    replays CUDA graphs: outputs and gradients match eager over several steps."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = Tagger(device=CUDA)
    lstm_fused.replace_lstm(model)
    compiled = torch.compile(model, mode="reduce-overhead")
    parameters = list(model.parameters())
    for step in range(4):
        tokens = torch.randint(0, 10, (3, 8), device=CUDA, generator=None)
        torch.compiler.cudagraph_mark_step_begin()
        actual = compiled(tokens)
        actual_grads = torch.autograd.grad(actual.square().sum(), parameters)
        expected = model(tokens)
        expected_grads = torch.autograd.grad(expected.square().sum(), parameters)
        torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-4)
        for a, e in zip(actual_grads, expected_grads):
            torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# The subset gpu_check.sh runs under compute-sanitizer: every kernel (forward; backward fused,
# hidden-gradient and gate kernels; the padded-row kernel) on every tile, with and without a
# split of K, in the three arithmetic forms (float64 scalar, float32 as TF32 and bfloat16 on
# tensor cores), at small sizes; and the persistent kernels, forward and backward, with and
# without a projection, on CUDA cores (batch 5) and tensor cores (batch 9), one direction and both
# in one launch.

EVERY_KERNEL = [(tile, 5) for tile in STEP_TILES] + [(PERSISTENT, 5), (PERSISTENT, 9)]


@pytest.mark.parametrize("path,batch", EVERY_KERNEL, ids=lambda v: str(v))
@pytest.mark.parametrize("dtype,tf32", [(torch.float64, False), (torch.float32, True),
                                        (torch.bfloat16, False)],
                         ids=["float64", "float32-tf32", "bfloat16"])
@pytest.mark.parametrize("proj", [0, 6], ids=["plain", "proj"])
def test_every_kernel_once(path, batch, dtype, tf32, proj):
    torch.backends.cudnn.allow_tf32 = tf32  # the no_tf32 fixture restores it
    # K = 4H = 288 backward: split over blocks on a GPU of many multiprocessors.
    inputs = cuda_inputs(3, batch, 7, 72, proj, dtype=dtype,
                         lengths=[3, 1, 0, 2, 3, 3, 2, 1, 3][:batch], seed=7)
    with lstm_fused.force_path(path):
        outputs, grads, upstream_grads, _ = run_op(inputs, True, before_each=poison)
        if path == PERSISTENT:  # both directions of a layer in one launch
            reference, fused = cuda_pair(dtype=dtype, input_size=7, hidden_size=72,
                                         proj_size=proj, bidirectional=True)
            x, h0, c0 = module_inputs(fused, 3, batch, dtype, seed=7, device=CUDA)
            check_against_nn_lstm(reference, fused, x, (h0, c0))
    tolerance = {torch.float64: 1e-10, torch.float32: 1e-2, torch.bfloat16: 1e-1}[dtype]
    compare_with_reference(outputs, grads, *op_reference(inputs, True, upstream_grads),
                           atol=tolerance, rtol=tolerance)


# =============================================================================================
# The persistent kernels (one cooperative launch per sequence) on the GPU: the dispatch picks them
# at small batches; each result against nn.LSTM, the float64 reference and the other paths;
# gradcheck, determinism, streams, a second GPU, CUDA graph capture and the fallbacks.
# =============================================================================================


def cuda_kernels(function):
    """The names of the CUDA kernels that function() launches."""
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as profiler:
        function()
        torch.cuda.synchronize()
    return [event.name for event in profiler.events()
            if event.device_type == torch.autograd.DeviceType.CUDA]


def count(names, kernel):
    return sum(kernel in name for name in names)


@pytest.mark.parametrize("bidirectional", [False, True], ids=["one-direction", "bidirectional"])
def test_persistent_is_one_launch_per_sequence(bidirectional):
    """Auto at batch 1: one persistent launch for the whole sequence forward (both directions of a
    layer in the same launch) and one backward; no step kernels."""
    _, fused = cuda_pair(input_size=64, hidden_size=256, bidirectional=bidirectional)
    x, h0, c0 = module_inputs(fused, 64, 1, device=CUDA)
    with torch.no_grad():
        names = cuda_kernels(lambda: fused(x, (h0, c0)))
    assert count(names, "persistent_forward_kernel") == 1, names
    assert count(names, "step_kernel") == 0, names
    x.requires_grad_()
    names = cuda_kernels(lambda: fused(x, (h0, c0))[0].sum().backward())
    assert count(names, "persistent_forward_kernel") == 1, names
    assert count(names, "persistent_backward_kernel") == 1, names
    assert count(names, "step_kernel") == 0, names


def test_persistent_is_not_chosen_for_large_batches():
    """Auto at (256, 64, 1024, 1024): a block's share of the arithmetic outweighs the launches
    saved (the cost model), so the step kernels run."""
    _, fused = cuda_pair(input_size=1024, hidden_size=1024)
    x, h0, c0 = module_inputs(fused, 8, 256, device=CUDA)
    x.requires_grad_()
    names = cuda_kernels(lambda: fused(x, (h0, c0))[0].sum().backward())
    assert count(names, "persistent") == 0, names


PERSISTENT_MODULES = [
    (37, 1, 5, 129, 2, True, 0, False),
    (37, 3, 7, 31, 2, True, 0, True),
    (9, 129, 6, 129, 1, False, 17, False),
    (16, 16, 32, 768, 1, False, 0, True),
    (6, 5, 4, 1000, 1, True, 250, False),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("config", PERSISTENT_MODULES, ids=config_id)
def test_persistent_matches_nn_lstm(config, dtype):
    reference, fused, x, hx = build(config, dtype)
    with forced(PERSISTENT):
        check_against_nn_lstm(reference, fused, x, hx)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("shape", [(7, 3, 5, 33, 0), (5, 21, 9, 70, 13), (4, 129, 6, 129, 0)],
                         ids=lambda s: "x".join(map(str, s)))
def test_persistent_and_every_other_path_on_the_same_inputs(shape, dtype):
    T, B, I, H, P = shape
    inputs = cuda_inputs(T, B, I, H, P, dtype=dtype, lengths=lengths_for(T, B),
                                 seed=sum(shape))
    results = {}
    for path in PATHS:
        with forced(path):
            results[path] = run_op(inputs, False, before_each=poison)
    outputs, grads, upstream_grads, _ = results[PERSISTENT]
    expected_outputs, expected_grads = op_reference(inputs, False, upstream_grads)
    (atol, _), (grad_atol, _) = TOLERANCES[dtype]
    scale = 4.0 if dtype == torch.bfloat16 else 1.0  # the reference is float64, not nn.LSTM
    compare_with_reference(outputs, grads, expected_outputs, expected_grads,
                                   atol=scale * max(atol, grad_atol), rtol=1e-4)
    for path, (other_outputs, other_grads, _, _) in results.items():
        for a, b in zip((*outputs, *grads), (*other_outputs, *other_grads)):
            torch.testing.assert_close(a.double(), b.double(), atol=2 * scale * grad_atol,
                                       rtol=1e-4, msg=lambda m, p=path: f"{p}: {m}")


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("reverse,proj,lengths", [
    (False, False, None), (True, True, [6, 2, 0, 5]), (False, True, [6, 2, 0, 5])],
    ids=["fwd", "rev-proj-lengths", "proj-lengths"])
def test_persistent_gradcheck(reverse, proj, lengths, bidirectional):
    inputs = cuda_inputs(6, 4, 3, 4, 2 if proj else 0, lengths=lengths, seed=3,
                         requires_grad=True)
    x, hx, weights = functional_args(inputs)
    weights = [w for w in weights]

    def function(x, h0, c0, *flat):
        if bidirectional:  # the reverse direction's weights: the same ones, scaled
            weights_reverse = [None if w is None else w * 0.75 for w in flat]
            output, (h_n, c_n) = lstm_fused.functional.lstm_bidirectional(
                x, (torch.stack([h0, h0 * 0.5]), torch.stack([c0, c0 * 0.5])), flat,
                weights_reverse, lengths=inputs["lengths"])
        else:
            output, (h_n, c_n) = lstm_fused.lstm(x, (h0, c0), *flat, reverse=reverse,
                                                 lengths=inputs["lengths"])
        return output, h_n, c_n

    with forced(PERSISTENT):
        assert torch.autograd.gradcheck(function, (x, *hx, *weights), atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_persistent_repeat_runs_are_bitwise_identical(dtype):
    _, fused = cuda_pair(dtype=dtype, input_size=16, hidden_size=129, num_layers=2,
                         bidirectional=True, proj_size=31)
    x, h0, c0 = module_inputs(fused, 37, 9, dtype, seed=7, device=CUDA)
    with forced(PERSISTENT):
        first = outputs_and_grads(fused, x, (h0, c0))
        poison()
        second = outputs_and_grads(fused, x, (h0, c0))
    assert_bitwise_equal(second, first)


def test_persistent_side_stream_matches_default_stream():
    _, fused = cuda_pair(input_size=8, hidden_size=65, num_layers=2, bidirectional=True,
                         proj_size=9)
    cpu_inputs = module_inputs(fused, 37, 5, seed=8, device="cpu")
    with forced(PERSISTENT):
        x, h0, c0 = (t.to(CUDA) for t in cpu_inputs)
        expected = outputs_and_grads(fused, x, (h0, c0))
        torch.cuda.synchronize()
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream):
            poison()
            x, h0, c0 = (t.to(CUDA) for t in cpu_inputs)
            torch.cuda._sleep(20_000_000)  # work sent to another stream by mistake reads poison
            actual = outputs_and_grads(fused, x, (h0, c0))
        torch.cuda.synchronize()
    assert_bitwise_equal(actual, expected)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs a second CUDA GPU")
def test_persistent_on_the_second_gpu():
    _, fused = cuda_pair(input_size=6, hidden_size=33, num_layers=2, bidirectional=True,
                         proj_size=5)
    x, h0, c0 = module_inputs(fused, 11, 7, seed=6, device=CUDA)
    second = torch.device("cuda", 1)
    with forced(PERSISTENT):
        expected = outputs_and_grads(fused, x, (h0, c0))
        actual = outputs_and_grads(copy.deepcopy(fused).to(second), x.to(second),
                                           (h0.to(second), c0.to(second)))
    torch.cuda.synchronize(second)
    assert torch.cuda.current_device() == 0, "the op changed the current device"
    for a, e in zip(actual, expected):
        for name in e:
            assert a[name].device == second, name
            torch.testing.assert_close(a[name].cpu(), e[name].cpu(), atol=2e-5, rtol=1e-4,
                                       msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("training", [False, True], ids=["inference", "training"])
def test_persistent_in_a_cuda_graph(training):
    """Cooperative launches are captured (CUDA 12+): replays match eager runs."""
    _, fused = cuda_pair(input_size=16, hidden_size=64, bidirectional=True)
    x, h0, c0 = module_inputs(fused, 32, 2, seed=9, device=CUDA)
    x.requires_grad_(training)
    parameters = list(fused.parameters())

    def step():
        output, (h_n, c_n) = fused(x, (h0, c0))
        if not training:
            return (output, h_n, c_n)
        loss = output.sum() + h_n.sum() - c_n.sum()
        return (output, *torch.autograd.grad(loss, [x, *parameters]))

    with forced(PERSISTENT), torch.set_grad_enabled(training):
        expected = [t.clone() for t in step()]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):  # warm-up outside the capture
                step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = step()
        poison()
        graph.replay()
        torch.cuda.synchronize()
    for a, e in zip(captured, expected):
        torch.testing.assert_close(a, e, atol=1e-6, rtol=1e-5)


def test_persistent_forced_where_it_cannot_run_is_a_clear_error():
    """float64 W_hh of H = 1000 is beyond an H100's or H200's on-chip memory (the largest there:
    924 forward): forced, an error says why; auto runs the step kernels."""
    inputs = cuda_inputs(3, 2, 5, 1000, dtype=torch.float64, seed=10)
    with lstm_fused.force_path(PERSISTENT):
        with pytest.raises(RuntimeError, match=r"cannot run here: the weights need \d+ KiB of "
                                               r"shared memory per block"):
            run_op(inputs, False)
    outputs, grads, upstream_grads, _ = run_op(inputs, False)
    compare_with_reference(outputs, grads, *op_reference(inputs, False,
                                                                         upstream_grads),
                                   atol=1e-12, rtol=1e-10)
    # More (row, unit) pairs per block than its threads keep in registers.
    wide = cuda_inputs(2, 4096, 3, 64, dtype=torch.float32, seed=11)
    with lstm_fused.force_path(PERSISTENT):
        with pytest.raises(RuntimeError, match=r"\(row, column\) pairs"):
            run_op(wide, False)


def test_persistent_tf32_follows_the_cudnn_flag_like_nn_lstm():
    """At batch 16 the persistent kernel multiplies on tensor cores: in TF32 exactly when
    nn.LSTM does (torch.backends.cudnn.allow_tf32)."""
    reference, fused = cuda_pair(0, input_size=64, hidden_size=256)
    x, h0, c0 = module_inputs(reference, 16, 16, device=CUDA)
    with forced(PERSISTENT):
        exact, _ = outputs_and_grads(fused, x, (h0, c0))
        torch.backends.cudnn.allow_tf32 = True  # the no_tf32 fixture restores it
        ours, our_grads = outputs_and_grads(fused, x, (h0, c0))
    theirs, their_grads = outputs_and_grads(reference, x, (h0, c0))
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], atol=1e-2, rtol=1e-2)
    for name in our_grads:
        torch.testing.assert_close(our_grads[name], their_grads[name], atol=5e-2, rtol=5e-2)
    assert not torch.equal(ours["output"], exact["output"])
