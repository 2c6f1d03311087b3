"""The CUDA implementation run on the CPU: csrc/cuda/ built with the CUDA emulator of
tests/emulation (kernels as C++, every block's threads as fibers), on CPU tensors.

This checks everything in the CUDA code but the hardware: the glue (allocation, step order, the
launches and their arguments), each kernel's indexing, tiles, tails, reductions and barriers, in
every dtype, against the float64 reference. It runs on any machine with a C++ compiler; what it
cannot check (timing, the memory model, real half-precision hardware) test_cuda.py checks on a GPU.
"""
import shutil
from pathlib import Path

import pytest
import torch
from torch.utils import cpp_extension

import lstm_fused
from lstm_fused import ops as lstm_ops
from conftest import OP_GRAD_NAMES, op_reference

ROOT = Path(__file__).resolve().parent.parent
TILES = ["step_small", "step_medium", "step_large"]

pytestmark = pytest.mark.skipif(
    shutil.which("c++") is None and shutil.which("g++") is None, reason="needs a C++ compiler")


@pytest.fixture(scope="module")
def emulated(tmp_path_factory):
    """torch.ops.lstm_fused_emulated: the CUDA glue and kernels, built for the emulator."""
    if not cpp_extension.is_ninja_available():
        pytest.skip("needs ninja to build the emulated extension")
    build = tmp_path_factory.mktemp("emulated_cuda")
    # Every .cu file, compiled as C++.
    kernels = []
    for source in sorted((ROOT / "csrc" / "cuda").glob("*.cu")):
        kernels.append(build / f"{source.stem}_emulated.cpp")
        kernels[-1].write_text(f'#include "{source}"\n')
    cpp_extension.load(
        name="lstm_fused_emulated",
        sources=[str(ROOT / "csrc" / "lstm.cpp"), str(ROOT / "csrc" / "cuda" / "lstm_cuda.cpp"),
                 *map(str, kernels)],
        extra_cflags=["-O2", "-DLSTM_FUSED_EMULATE_CUDA",
                      f"-I{ROOT / 'tests' / 'emulation'}", f"-I{ROOT / 'csrc' / 'cuda'}"],
        build_directory=str(build),
        is_python_module=False,
    )
    return torch.ops.lstm_fused_emulated


@pytest.fixture(autouse=True)
def exact_float32():
    """Full float32 step products (TF32 follows torch.backends.cudnn.allow_tf32, as nn.LSTM's
    does); test_tf32_follows_the_cudnn_flag turns it on."""
    saved = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = saved


def make_inputs(T, B, I, H, P=0, bias=True, dtype=torch.float64, lengths=None, seed=0):
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=0.5):
        return ((torch.rand(*shape, generator=generator, dtype=torch.float64) * 2 - 1) * scale
                ).to(dtype)

    out = P or H
    return dict(
        x=rand(T, B, I, scale=1.0), h0=rand(B, out), c0=rand(B, H), w_ih=rand(4 * H, I),
        w_hh=rand(4 * H, out), b_ih=rand(4 * H) if bias else None,
        b_hh=rand(4 * H) if bias else None, w_hr=rand(P, H) if P else None,
        lengths=None if lengths is None else torch.tensor(lengths, dtype=torch.int64))


def padding(inputs):
    T = inputs["x"].shape[0]
    if inputs["lengths"] is None:
        return None
    return (torch.arange(T)[:, None] >= inputs["lengths"][None, :])[:, :, None]


def run_op(namespace, inputs, reverse, grad_seed=1):
    """Forward and backward through `namespace`'s ops, as lstm_fused.lstm uses them: padded
    outputs are zeros and receive no gradient."""
    args = [inputs[k] for k in ("x", "h0", "c0", "w_ih", "w_hh", "b_ih", "b_hh", "w_hr", "lengths")]
    y, h_n, c_n, gates, cells = namespace.forward(*args, reverse, True)
    pad = padding(inputs)
    generator = torch.Generator().manual_seed(grad_seed)
    grad_y = torch.randn(y.shape, generator=generator, dtype=torch.float64).to(y.dtype)
    grad_h = torch.randn(h_n.shape, generator=generator, dtype=torch.float64).to(y.dtype)
    grad_c = torch.randn(c_n.shape, generator=generator, dtype=torch.float64).to(y.dtype)
    if pad is not None:
        grad_y = grad_y.masked_fill(pad, 0.0)
    has_bias = inputs["b_ih"] is not None
    # Backward takes y as forward returned it: with the carried state at padded steps.
    grads = namespace.backward(grad_y, grad_h, grad_c, *args[:5], inputs["w_hr"],
                               inputs["lengths"], y, gates, cells, reverse, has_bias)
    if pad is not None:
        y = y.masked_fill(pad, 0.0)
    return (y, h_n, c_n), grads, (grad_y, grad_h, grad_c), (gates, cells)


def compare(inputs, reverse, namespace, atol, rtol):
    outputs, grads, upstream, _ = run_op(namespace, inputs, reverse)
    expected_outputs, expected_grads = op_reference(inputs, reverse, upstream)
    for name, actual, expected in zip(["y", "h_n", "c_n"], outputs, expected_outputs):
        torch.testing.assert_close(actual.double(), expected.detach(), atol=atol, rtol=rtol,
                                   msg=lambda m, n=name: f"{n}: {m}")
    for name, actual in zip(OP_GRAD_NAMES, grads):
        if name not in expected_grads:
            continue
        torch.testing.assert_close(actual.double(), expected_grads[name], atol=atol, rtol=rtol,
                                   msg=lambda m, n=name: f"grad {n}: {m}")


# (T, B, I, H, P): batch 1, 3 (small tile), 9, 33 (medium/large, with row tails), hidden sizes
# with unit tails (1, 31, 129) and K beyond one shared-memory tile, projections, T = 1.
SHAPES = [
    (3, 1, 5, 7, 0),
    (2, 3, 4, 31, 0),
    (4, 9, 6, 33, 0),
    (1, 5, 3, 1, 0),
    (3, 33, 7, 17, 0),
    (2, 3, 9, 70, 5),
    (3, 9, 4, 20, 13),
    (2, 2, 3, 129, 0),
]


@pytest.mark.parametrize("tile", TILES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_float64_matches_reference(emulated, tile, shape):
    T, B, I, H, P = shape
    inputs = make_inputs(T, B, I, H, P, seed=sum(shape))
    with lstm_fused.force_path(tile):
        compare(inputs, False, emulated, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("tile", ["auto"] + TILES)
@pytest.mark.parametrize("proj", [0, 4])
@pytest.mark.parametrize("reverse", [False, True])
def test_lengths_and_direction(emulated, tile, proj, reverse):
    # Lengths 0 and T, and rows that stop at different steps.
    inputs = make_inputs(5, 6, 4, 9, proj, lengths=[5, 3, 0, 1, 5, 4], seed=3)
    with lstm_fused.force_path(tile):
        compare(inputs, reverse, emulated, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("tile", TILES)
def test_without_bias(emulated, tile):
    inputs = make_inputs(3, 5, 4, 12, 0, bias=False, seed=5)
    with lstm_fused.force_path(tile):
        compare(inputs, True, emulated, atol=1e-12, rtol=1e-10)


def test_float32_matches_cpu_op(emulated):
    inputs = make_inputs(6, 7, 10, 37, 0, dtype=torch.float32, seed=7)
    compare(inputs, False, emulated, atol=2e-5, rtol=1e-4)
    ours = run_op(emulated, inputs, False)
    cpu = run_op(torch.ops.lstm_fused, inputs, False)
    for a, b in zip(ours[0] + tuple(ours[1]), cpu[0] + tuple(cpu[1])):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


# Half types: float32 arithmetic and state; the error is dominated by rounding the inputs, the
# input projection and h_t to the half type, as in cuDNN (and, on the tensor-core tiles, dL/dz
# before the backward product). Bounds: absolute and relative, on values of order 1.
HALF_TYPES = [(torch.float16, 4e-3), (torch.bfloat16, 3e-2)]


def check_half_type(emulated, inputs, reverse, dtype, atol):
    outputs, grads, upstream, saved = run_op(emulated, inputs, reverse)
    # The saved activations are float32, as the fake kernel declares.
    assert all(t.dtype == torch.float32 for t in saved)
    assert all(t.dtype == dtype for t in outputs + tuple(g for g in grads if g.numel()))
    expected_outputs, expected_grads = op_reference(inputs, reverse, upstream)
    for name, actual, expected in zip(["y", "h_n", "c_n"], outputs, expected_outputs):
        torch.testing.assert_close(actual.double(), expected, atol=atol, rtol=atol,
                                   msg=lambda m, n=name: f"{n}: {m}")
    for name, actual in zip(OP_GRAD_NAMES, grads):
        if name in expected_grads:
            torch.testing.assert_close(actual.double(), expected_grads[name], atol=4 * atol,
                                       rtol=4 * atol, msg=lambda m, n=name: f"grad {n}: {m}")


@pytest.mark.parametrize("dtype,atol", HALF_TYPES)
@pytest.mark.parametrize("proj", [0, 6])
def test_half_types(emulated, dtype, atol, proj):
    inputs = make_inputs(5, 3, 8, 24, proj, dtype=dtype, lengths=[5, 2, 4], seed=11)
    check_half_type(emulated, inputs, False, dtype, atol)


# The medium and large tiles of the half types run on tensor cores (wmma): rows, units and K with
# tails of their 16/32-row, 16- and 64-column and 32-deep tiles.
@pytest.mark.parametrize("tile", TILES)
@pytest.mark.parametrize("dtype,atol", HALF_TYPES)
@pytest.mark.parametrize("shape,reverse,lengths", [
    ((3, 21, 5, 19, 0), False, None),
    ((2, 37, 40, 33, 0), True, [2, 1, 0] + [2] * 34),
    ((3, 18, 7, 20, 9), False, [3, 2] * 9),
], ids=["plain", "reverse-lengths", "projection-lengths"])
def test_half_types_each_tile(emulated, tile, dtype, atol, shape, reverse, lengths):
    T, B, I, H, P = shape
    inputs = make_inputs(T, B, I, H, P, dtype=dtype, lengths=lengths, seed=B)
    with lstm_fused.force_path(tile):
        check_half_type(emulated, inputs, reverse, dtype, atol)


@pytest.mark.parametrize("tile", TILES)
def test_tf32_follows_the_cudnn_flag(emulated, tile):
    """With torch.backends.cudnn.allow_tf32 (nn.LSTM's flag, on by default) the float32 medium and
    large tiles multiply on tensor cores in TF32 (10-bit mantissas); without it, in float32."""
    inputs = make_inputs(4, 21, 9, 19, 0, dtype=torch.float32, lengths=[4, 2, 3] * 7, seed=21)
    with lstm_fused.force_path(tile):
        exact = run_op(emulated, inputs, True)
        torch.backends.cudnn.allow_tf32 = True
        tf32 = run_op(emulated, inputs, True)
        compare(inputs, True, emulated, atol=4e-3, rtol=4e-3)
    exact_values = exact[0] + tuple(exact[1])
    tf32_values = tf32[0] + tuple(tf32[1])
    differs = any(not torch.equal(a, b) for a, b in zip(exact_values, tf32_values))
    assert differs == (tile != "step_small")  # the small tile has no tensor-core version


@pytest.mark.skipif(not hasattr(getattr(torch.backends.cudnn, "rnn", None), "fp32_precision"),
                    reason="needs torch.backends.cudnn.rnn.fp32_precision (newer PyTorch)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_tf32_follows_the_per_operator_precision_api(emulated, dtype):
    """torch.backends.cudnn.rnn.fp32_precision, apart from conv's, decides like the legacy flag;
    no dtype's call fails over the two disagreeing."""
    cudnn = torch.backends.cudnn
    saved = cudnn.rnn.fp32_precision, cudnn.conv.fp32_precision
    inputs = make_inputs(3, 21, 9, 19, 0, dtype=dtype, seed=22)
    try:
        with lstm_fused.force_path("step_medium"):
            cudnn.rnn.fp32_precision, cudnn.conv.fp32_precision = "ieee", "tf32"
            exact = run_op(emulated, inputs, False)
            cudnn.rnn.fp32_precision, cudnn.conv.fp32_precision = "tf32", "ieee"
            tf32 = run_op(emulated, inputs, False)
    finally:
        cudnn.rnn.fp32_precision, cudnn.conv.fp32_precision = saved
    same = all(torch.equal(a, b) for a, b in zip(exact[0] + tuple(exact[1]),
                                                 tf32[0] + tuple(tf32[1])))
    assert same == (dtype != torch.float32)


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_outputs_as_the_fake_kernel_declares(emulated, training, dtype):
    inputs = make_inputs(3, 2, 4, 5, 3, dtype=dtype)
    args = [inputs[k] for k in ("x", "h0", "c0", "w_ih", "w_hh", "b_ih", "b_hh", "w_hr",
                                "lengths")]
    real = emulated.forward(*args, False, training)
    meta = [a.to("meta") if isinstance(a, torch.Tensor) else a for a in args]
    fake = lstm_ops._forward_fake(*meta, False, training)
    for r, f in zip(real, fake):
        assert r.shape == f.shape and r.dtype == f.dtype and r.is_contiguous()


def test_one_launch_per_step(emulated):
    T = 7
    plain = make_inputs(T, 4, 3, 10, 0)
    projected = make_inputs(T, 4, 3, 10, 6)
    for inputs, forward_launches, backward_launches in [(plain, T, T + 1),
                                                        (projected, T, 2 * T + 1)]:
        args = [inputs[k] for k in ("x", "h0", "c0", "w_ih", "w_hh", "b_ih", "b_hh", "w_hr",
                                    "lengths")]
        before = emulated.launch_count()
        y, h_n, c_n, gates, cells = emulated.forward(*args, False, True)
        assert emulated.launch_count() - before == forward_launches
        before = emulated.launch_count()
        emulated.backward(torch.ones_like(y), torch.ones_like(h_n), torch.ones_like(c_n),
                          *args[:5], inputs["w_hr"], None, y, gates, cells, False, True)
        assert emulated.launch_count() - before == backward_launches


def test_deterministic(emulated):
    inputs = make_inputs(4, 9, 6, 33, 0, dtype=torch.float32, seed=2)
    first = run_op(emulated, inputs, False)
    second = run_op(emulated, inputs, False)
    for a, b in zip(first[0] + tuple(first[1]), second[0] + tuple(second[1])):
        assert torch.equal(a, b)


@pytest.mark.parametrize("tile", TILES)
def test_every_output_element_is_written(emulated, tile):
    # Freed NaN-filled memory is what the op's allocations get back, so a missed element shows.
    inputs = make_inputs(3, 5, 4, 19, 0, dtype=torch.float32, lengths=[3, 1, 2, 0, 3], seed=9)
    with lstm_fused.force_path(tile):
        for _ in range(3):
            poison = torch.full((1 << 20,), float("nan"))
            del poison
            outputs, grads, _, saved = run_op(emulated, inputs, True)
            for t in outputs + tuple(grads) + saved:
                assert not t.isnan().any()


def test_non_contiguous_inputs(emulated):
    inputs = make_inputs(4, 3, 5, 8, 0, seed=4)
    strided = dict(inputs)
    strided["x"] = inputs["x"].transpose(0, 1).contiguous().transpose(0, 1)
    strided["w_ih"] = inputs["w_ih"].t().contiguous().t()
    strided["w_hh"] = inputs["w_hh"].t().contiguous().t()
    strided["h0"] = inputs["h0"].t().contiguous().t()
    expected = run_op(emulated, inputs, False)
    actual = run_op(emulated, strided, False)
    for a, b in zip(actual[0] + tuple(actual[1]), expected[0] + tuple(expected[1])):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


def test_empty_sequence_and_empty_batch(emulated):
    for T, B in [(0, 3), (3, 0)]:
        inputs = make_inputs(T, B, 4, 5, 0)
        outputs, grads, upstream, _ = run_op(emulated, inputs, False)
        assert outputs[0].shape == (T, B, 5)
        if T == 0:
            torch.testing.assert_close(outputs[1], inputs["h0"])
            torch.testing.assert_close(grads[1], upstream[1])
            torch.testing.assert_close(grads[2], upstream[2])
            assert not grads[4].any()


def test_bad_path_name_is_a_clear_error(emulated, monkeypatch):
    monkeypatch.setenv("LSTM_FUSED_PATH", "gemm")
    inputs = make_inputs(2, 2, 3, 4, 0)
    with pytest.raises(RuntimeError, match="must be auto, step_small, step_medium or step_large"):
        run_op(emulated, inputs, False)

