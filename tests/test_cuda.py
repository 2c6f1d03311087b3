"""lstm_fused on a real CUDA GPU.

lstm_fused.LSTM against nn.LSTM (cuDNN) and a float64 copy of it over odd sizes and every dtype,
each forced kernel path against the float64 reference (lengths, reverse, projections,
PackedSequence), gradcheck, opcheck, poisoned memory, bitwise determinism, a side stream, a second
GPU, non-contiguous inputs, replace_lstm, torch.compile and autocast.

Skipped without a GPU. test_cuda_emulated.py runs the same CUDA code on the CPU through an emulator
and covers the kernels' shapes, tiles and tails without one; this file checks what only the
hardware can: the real compiler and memory model, streams, devices, and half-precision arithmetic.
"""
import contextlib
import copy

import pytest
import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import lstm_fused
from conftest import OP_GRAD_NAMES, assert_close_to, float64_copy, make_pair, op_reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CUDA = torch.device("cuda")
PATHS = lstm_fused.available_paths("cuda")
FORCED_BUT_CANNOT_RUN = "the persistent kernel was forced (LSTM_FUSED_PATH=persistent) but"
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
ARG_NAMES = ("x", "h0", "c0", "w_ih", "w_hh", "b_ih", "b_hh", "w_hr", "lengths")

# Half types: max |ours - float64| <= 2 max |nn.LSTM - float64| + atol * max(1, max |float64|),
# per tensor (per element, nn.LSTM's rounding sometimes lands exactly on the float64 value). The
# atol is (outputs, gradients): float16 keeps 11 significant bits (unit roundoff 2^-11 = 4.9e-4),
# bfloat16 8 (2^-8 = 3.9e-3). Outputs get about two units, the rounding of a result and of the
# half-precision h_t it was computed from; gradients, sums over T * B products of half-rounded
# factors, get eight.
HALF_ATOL = {torch.float16: (1e-3, 4e-3), torch.bfloat16: (8e-3, 3e-2)}


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


def dtype_id(dtype):
    return str(dtype).replace("torch.", "")


@pytest.fixture(autouse=True)
def no_tf32():
    """Full float32 products in cuDNN and cuBLAS, for nn.LSTM and our GEMMs alike."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def poison_allocator():
    """Leaves free blocks of the CUDA caching allocator (current stream, small and large pools)
    full of 0xFF bytes, a NaN in every floating-point dtype: an element an op never writes then
    reads as NaN."""
    blocks = [torch.full((numel,), 255, dtype=torch.uint8, device=CUDA)
              for numel in (1 << 9, 1 << 12, 1 << 16, 1 << 20, 1 << 24) for _ in range(8)]
    del blocks


# ---------------------------------------------------------------------------------------------
# Module-level helpers: lstm_fused.LSTM and nn.LSTM with the same weights.

def cuda_pair(seed=0, dtype=torch.float32, **config):
    reference, fused = make_pair(seed, **config)
    return reference.to(device=CUDA, dtype=dtype), fused.to(device=CUDA, dtype=dtype)


def module_inputs(module, T, B, dtype=torch.float32, seed=0, device=CUDA):
    """x ([B, T, I] with batch_first, else [T, B, I]), h_0 and c_0 for module, drawn in float32 on
    the CPU (every dtype gets the same values, rounded)."""
    generator = torch.Generator().manual_seed(seed)
    states = module.num_layers * (2 if module.bidirectional else 1)
    shape = (B, T, module.input_size) if module.batch_first else (T, B, module.input_size)
    x = torch.randn(shape, generator=generator)
    h0 = torch.randn(states, B, module.proj_size or module.hidden_size, generator=generator)
    c0 = torch.randn(states, B, module.hidden_size, generator=generator)
    return tuple(t.to(device=device, dtype=dtype) for t in (x, h0, c0))


def upstream(t):
    """Weights w of the loss sum(t * w): multiples of 1/4 in [-1, 1], exact in every dtype, made on
    t's device and stream without a host synchronisation."""
    steps = torch.arange(t.numel(), device=t.device, dtype=torch.float64)
    return ((steps * 7) % 9 - 4).div(4).reshape(t.shape)


def outputs_and_grads(module, x, hx, lengths=None):
    """module's outputs, and the gradients of a fixed weighted sum of them with respect to x, h_0,
    c_0 and every parameter, by name. With lengths (CPU int64), x is packed first."""
    x = x.detach().requires_grad_()
    hx = tuple(t.detach().requires_grad_() for t in hx)
    sequence = x
    if lengths is not None:
        sequence = pack_padded_sequence(x, lengths, batch_first=module.batch_first,
                                        enforce_sorted=False)
    output, (h_n, c_n) = module(sequence, hx)
    data = output.data if isinstance(output, PackedSequence) else output
    outputs = {"output": data, "h_n": h_n, "c_n": c_n}
    loss = sum((t.double() * upstream(t)).sum() for t in outputs.values())
    names = ["input", "h_0", "c_0"] + [name for name, _ in module.named_parameters()]
    grads = torch.autograd.grad(loss, [x, *hx, *module.parameters()])
    return outputs, dict(zip(names, grads))


def assert_as_accurate_as_nn_lstm(actual, expected, reference64, atol, name):
    scale = max(1.0, reference64.abs().max().item())
    error = (actual.double() - reference64).abs().max().item()
    own_error = (expected.double() - reference64).abs().max().item()
    assert error <= 2 * own_error + atol * scale, (
        f"{name}: max |fused - float64| = {error:.3g}, max |nn.LSTM - float64| = "
        f"{own_error:.3g}, max |float64| = {scale:.3g}")


def check_against_nn_lstm(reference, fused, x, hx):
    """Outputs and every gradient of fused against nn.LSTM in the same dtype and a float64 copy of
    it (fed the same, possibly half-rounded, values)."""
    dtype = x.dtype
    expected = outputs_and_grads(reference, x, hx)
    actual = outputs_and_grads(fused, x, hx)
    exact = outputs_and_grads(float64_copy(reference), x.double(), tuple(t.double() for t in hx))
    for prefix, index in (("", 0), ("grad ", 1)):
        assert actual[index].keys() == expected[index].keys()
        for name, expected_value in expected[index].items():
            value, value64 = actual[index][name], exact[index][name]
            assert value.shape == expected_value.shape and value.dtype == dtype, prefix + name
            if dtype in HALF_ATOL:
                atol = HALF_ATOL[dtype][index]
                assert_as_accurate_as_nn_lstm(value, expected_value, value64, atol, prefix + name)
            else:
                assert_close_to(value, expected_value, value64, dtype, prefix + name)


def assert_bitwise_equal(actual, expected):
    for a, e in zip(actual, expected):  # outputs, then gradients
        assert a.keys() == e.keys()
        for name in e:
            assert torch.equal(a[name], e[name]), f"{name} differs"


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
    x, h0, c0 = module_inputs(fused, T, B, dtype, seed=B + H)
    return reference, fused, x, (h0, c0)


@pytest.mark.parametrize("config", MODULE_GRID, ids=config_id)
def test_matches_nn_lstm_float32(config):
    check_against_nn_lstm(*build(config, torch.float32))


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("config", DTYPE_GRID, ids=config_id)
def test_matches_nn_lstm_every_dtype(config, dtype):
    check_against_nn_lstm(*build(config, dtype))


# ---------------------------------------------------------------------------------------------
# Op-level helpers (as in test_cuda_emulated.py): torch.ops.lstm_fused against lstm_reference.

def make_inputs(T, B, I, H, P=0, bias=True, dtype=torch.float64, lengths=None, seed=0):
    """The op's arguments on the GPU: uniform values drawn in float64 on the CPU and rounded to
    dtype; x in [-1, 1], the rest in [-0.5, 0.5], weights narrower beyond 64 inputs (so that
    products over H = 1000 stay of order 1, as with nn.LSTM's initialisation)."""
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=0.5):
        values = (torch.rand(*shape, generator=generator, dtype=torch.float64) * 2 - 1) * scale
        return values.to(device=CUDA, dtype=dtype)

    def weight(rows, fan_in):
        return rand(rows, fan_in, scale=0.5 * min(1.0, (64 / fan_in) ** 0.5))

    out = P or H
    return dict(
        x=rand(T, B, I, scale=1.0), h0=rand(B, out), c0=rand(B, H), w_ih=weight(4 * H, I),
        w_hh=weight(4 * H, out), b_ih=rand(4 * H) if bias else None,
        b_hh=rand(4 * H) if bias else None, w_hr=weight(P, H) if P else None,
        lengths=None if lengths is None else torch.tensor(lengths, dtype=torch.int64,
                                                          device=CUDA))


def lengths_for(T, B):
    """T, 0, T // 3, 2T // 3, T, 0, ...: full, empty and short rows, unsorted."""
    return [T * ((b + 3) % 4) // 3 for b in range(B)]


def padding(inputs):
    if inputs["lengths"] is None:
        return None
    steps = torch.arange(inputs["x"].shape[0], device=CUDA)
    return (steps[:, None] >= inputs["lengths"][None, :])[:, :, None]


def run_op(inputs, reverse):
    """Forward (training) and backward through torch.ops.lstm_fused, as lstm_fused.lstm uses them:
    padded outputs are zeros and receive no gradient. The allocator is poisoned before each op.
    Returns (y, h_n, c_n), the backward's results, the upstream gradients, and (y as forward
    returned it, gates, cells)."""
    args = [inputs[k] for k in ARG_NAMES]
    poison_allocator()
    y, h_n, c_n, gates, cells = torch.ops.lstm_fused.forward(*args, reverse, True)
    pad = padding(inputs)
    generator = torch.Generator().manual_seed(1)
    grad_y, grad_h, grad_c = (
        torch.randn(t.shape, generator=generator, dtype=torch.float64).to(CUDA, t.dtype)
        for t in (y, h_n, c_n))
    if pad is not None:
        grad_y = grad_y.masked_fill(pad, 0.0)
    poison_allocator()
    # Backward takes y as forward returned it: with the carried state at padded steps.
    grads = torch.ops.lstm_fused.backward(grad_y, grad_h, grad_c, *args[:5], inputs["w_hr"],
                                          inputs["lengths"], y, gates, cells, reverse,
                                          inputs["b_ih"] is not None)
    masked_y = y if pad is None else y.masked_fill(pad, 0.0)
    return (masked_y, h_n, c_n), grads, (grad_y, grad_h, grad_c), (y, gates, cells)


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
    inputs = make_inputs(T, B, I, H, P, lengths=lengths_for(T, B) if with_lengths else None,
                         seed=sum(shape))
    with forced(path):
        outputs, grads, upstream_grads, _ = run_op(inputs, reverse)
    expected_outputs, expected_grads = op_reference(inputs, reverse, upstream_grads)
    for name, actual, expected in zip(("y", "h_n", "c_n"), outputs, expected_outputs):
        torch.testing.assert_close(actual, expected, atol=1e-12, rtol=1e-10,
                                   msg=lambda m, n=name: f"{n}: {m}")
    for name, actual in zip(OP_GRAD_NAMES, grads):
        if name in expected_grads:
            torch.testing.assert_close(actual, expected_grads[name], atol=1e-12, rtol=1e-10,
                                       msg=lambda m, n=name: f"grad {n}: {m}")


@pytest.mark.parametrize("path", PATHS)
def test_each_path_packed_sequence_matches_float64_nn_lstm(path):
    reference, fused = cuda_pair(dtype=torch.float64, input_size=5, hidden_size=33, num_layers=2,
                                 bidirectional=True, proj_size=7)
    x, h0, c0 = module_inputs(fused, 9, 6, torch.float64, seed=5)
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
    inputs = make_inputs(6, 4, 3, 4, 2 if proj else 0, lengths=lengths, seed=3)
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
    inputs = make_inputs(5, 4, 3, 6, 2 if proj else 0, dtype=dtype,
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
    inputs = make_inputs(5, 33, 4, 19, 7, dtype=dtype, lengths=lengths_for(5, 33), seed=9)
    with forced(path):
        for reverse in (False, True):
            outputs, grads, _, saved = run_op(inputs, reverse)  # poisons before each op
            poison_allocator()
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
    x, h0, c0 = module_inputs(fused, 37, 129, dtype, seed=7)
    with forced(path):
        first = outputs_and_grads(fused, x, (h0, c0))
        poison_allocator()
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
        poison_allocator()
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
    x, h0, c0 = module_inputs(fused, 11, 7, seed=6)
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
    x, h0, c0 = module_inputs(fused, 7, 5, seed=10)  # [B, T, I]: the op gets a transposed view
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
    inputs = make_inputs(6, 4, 5, 31, 0, lengths=[6, 2, 0, 5], seed=4)
    h0 = inputs["h0"][:1].expand(4, -1)  # stride 0 along the batch
    contiguous = dict(inputs, h0=h0.contiguous())
    strided = dict(inputs, h0=h0, x=inputs["x"].transpose(0, 1).contiguous().transpose(0, 1),
                   w_ih=inputs["w_ih"].t().contiguous().t(),
                   w_hh=inputs["w_hh"].t().contiguous().t(),
                   c0=inputs["c0"].t().contiguous().t())
    assert not any(strided[k].is_contiguous() for k in ("x", "h0", "c0", "w_ih", "w_hh"))
    expected = run_op(contiguous, False)
    actual = run_op(strided, False)
    for a, e in zip((*actual[0], *actual[1]), (*expected[0], *expected[1])):
        torch.testing.assert_close(a, e, atol=1e-12, rtol=1e-12)


class Tagger(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(10, 4)
        self.encoder = torch.nn.LSTM(4, 6, num_layers=2, batch_first=True, bidirectional=True)
        self.head = torch.nn.Linear(12, 5)

    def forward(self, tokens):
        output, _ = self.encoder(self.embed(tokens))
        return self.head(output)


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
    x, h0, c0 = module_inputs(model, 6, 3, seed=2)
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
    x, h0, c0 = module_inputs(reference, 16, 64)
    exact, _ = outputs_and_grads(fused, x, (h0, c0))
    torch.backends.cudnn.allow_tf32 = True  # the no_tf32 fixture restores it
    ours, our_grads = outputs_and_grads(fused, x, (h0, c0))
    theirs, their_grads = outputs_and_grads(reference, x, (h0, c0))
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], atol=1e-2, rtol=1e-2)
    for name in our_grads:
        torch.testing.assert_close(our_grads[name], their_grads[name], atol=5e-2, rtol=5e-2)
    assert not torch.equal(ours["output"], exact["output"])


# =============================================================================================
# The persistent kernels (one cooperative launch per sequence) on the GPU: the dispatch picks them
# at small batches; each result against nn.LSTM, the float64 reference and the other paths;
# gradcheck, determinism, streams, a second GPU, CUDA graph capture and the fallbacks.
# =============================================================================================

import lstm_testing as testing  # noqa: E402

PERSISTENT = "persistent"


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
    x, h0, c0 = module_inputs(fused, 64, 1)
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
    x, h0, c0 = module_inputs(fused, 8, 256)
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
        testing.check_against_nn_lstm(reference, fused, x, hx)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("shape", [(7, 3, 5, 33, 0), (5, 21, 9, 70, 13), (4, 129, 6, 129, 0)],
                         ids=lambda s: "x".join(map(str, s)))
def test_persistent_and_every_other_path_on_the_same_inputs(shape, dtype):
    T, B, I, H, P = shape
    inputs = testing.make_inputs(T, B, I, H, P, dtype=dtype, lengths=lengths_for(T, B),
                                 seed=sum(shape), device=CUDA)
    results = {}
    for path in PATHS:
        with forced(path):
            results[path] = testing.run_op(inputs, False,
                                           before_each=lambda: testing.poison_memory(CUDA))
    outputs, grads, upstream_grads, _ = results[PERSISTENT]
    expected_outputs, expected_grads = testing.op_reference(inputs, False, upstream_grads)
    (atol, _), (grad_atol, _) = testing.TOLERANCES[dtype]
    scale = 4.0 if dtype == torch.bfloat16 else 1.0  # the reference is float64, not nn.LSTM
    testing.compare_with_reference(outputs, grads, expected_outputs, expected_grads,
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
    inputs = testing.make_inputs(6, 4, 3, 4, 2 if proj else 0, lengths=lengths, seed=3,
                                 device=CUDA, requires_grad=True)
    x, hx, weights = testing.functional_args(inputs)
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
    x, h0, c0 = module_inputs(fused, 37, 9, dtype, seed=7)
    with forced(PERSISTENT):
        first = testing.outputs_and_grads(fused, x, (h0, c0))
        poison_allocator()
        second = testing.outputs_and_grads(fused, x, (h0, c0))
    testing.assert_bitwise_equal(second, first)


def test_persistent_side_stream_matches_default_stream():
    _, fused = cuda_pair(input_size=8, hidden_size=65, num_layers=2, bidirectional=True,
                         proj_size=9)
    cpu_inputs = module_inputs(fused, 37, 5, seed=8, device="cpu")
    with forced(PERSISTENT):
        x, h0, c0 = (t.to(CUDA) for t in cpu_inputs)
        expected = testing.outputs_and_grads(fused, x, (h0, c0))
        torch.cuda.synchronize()
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream):
            poison_allocator()
            x, h0, c0 = (t.to(CUDA) for t in cpu_inputs)
            torch.cuda._sleep(20_000_000)  # work sent to another stream by mistake reads poison
            actual = testing.outputs_and_grads(fused, x, (h0, c0))
        torch.cuda.synchronize()
    testing.assert_bitwise_equal(actual, expected)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs a second CUDA GPU")
def test_persistent_on_the_second_gpu():
    _, fused = cuda_pair(input_size=6, hidden_size=33, num_layers=2, bidirectional=True,
                         proj_size=5)
    x, h0, c0 = module_inputs(fused, 11, 7, seed=6)
    second = torch.device("cuda", 1)
    with forced(PERSISTENT):
        expected = testing.outputs_and_grads(fused, x, (h0, c0))
        actual = testing.outputs_and_grads(copy.deepcopy(fused).to(second), x.to(second),
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
    x, h0, c0 = module_inputs(fused, 32, 2, seed=9)
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
        poison_allocator()
        graph.replay()
        torch.cuda.synchronize()
    for a, e in zip(captured, expected):
        torch.testing.assert_close(a, e, atol=1e-6, rtol=1e-5)


def test_persistent_forced_where_it_cannot_run_is_a_clear_error():
    """float64 W_hh of H = 1000 is beyond an H100's or H200's on-chip memory (the largest there:
    924 forward): forced, an error says why; auto runs the step kernels."""
    inputs = testing.make_inputs(3, 2, 5, 1000, dtype=torch.float64, seed=10, device=CUDA)
    with lstm_fused.force_path(PERSISTENT):
        with pytest.raises(RuntimeError, match=r"cannot run here: the weights need \d+ KiB of "
                                               r"shared memory per block"):
            testing.run_op(inputs, False)
    outputs, grads, upstream_grads, _ = testing.run_op(inputs, False)
    testing.compare_with_reference(outputs, grads, *testing.op_reference(inputs, False,
                                                                         upstream_grads),
                                   atol=1e-12, rtol=1e-10)
    # More (row, unit) pairs per block than its threads keep in registers.
    wide = testing.make_inputs(2, 4096, 3, 64, dtype=torch.float32, seed=11, device=CUDA)
    with lstm_fused.force_path(PERSISTENT):
        with pytest.raises(RuntimeError, match=r"\(row, column\) pairs"):
            testing.run_op(wide, False)


def test_persistent_tf32_follows_the_cudnn_flag_like_nn_lstm():
    """At batch 16 the persistent kernel multiplies on tensor cores: in TF32 exactly when
    nn.LSTM does (torch.backends.cudnn.allow_tf32)."""
    reference, fused = cuda_pair(0, input_size=64, hidden_size=256)
    x, h0, c0 = module_inputs(reference, 16, 16)
    with forced(PERSISTENT):
        exact, _ = testing.outputs_and_grads(fused, x, (h0, c0))
        torch.backends.cudnn.allow_tf32 = True  # the no_tf32 fixture restores it
        ours, our_grads = testing.outputs_and_grads(fused, x, (h0, c0))
    theirs, their_grads = testing.outputs_and_grads(reference, x, (h0, c0))
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], atol=1e-2, rtol=1e-2)
    for name in our_grads:
        torch.testing.assert_close(our_grads[name], their_grads[name], atol=5e-2, rtol=5e-2)
    assert not torch.equal(ours["output"], exact["output"])
