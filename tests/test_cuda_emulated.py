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


@pytest.mark.parametrize("tile", TILES)
def test_one_launch_per_step(emulated, tile):
    T = 7
    plain = make_inputs(T, 4, 3, 10, 0)
    projected = make_inputs(T, 4, 3, 10, 6)
    for inputs, forward_launches, backward_launches in [(plain, T, T + 1),
                                                        (projected, T, 2 * T + 1)]:
        args = [inputs[k] for k in ("x", "h0", "c0", "w_ih", "w_hh", "b_ih", "b_hh", "w_hr",
                                    "lengths")]
        with lstm_fused.force_path(tile):
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
    with pytest.raises(RuntimeError,
                       match="must be auto, step_small, step_medium, step_large or persistent"):
        run_op(emulated, inputs, False)



# =============================================================================================
# The persistent kernels (csrc/cuda/lstm_persistent.cu): a whole sequence per cooperative launch.
# The emulator runs every block's threads as fibers at once and switches through all of them at
# a grid barrier; its device (multiprocessors, shared memory, cooperative launch support, graph
# capture) is set per test. Tolerances are the step kernels' above.
# =============================================================================================

import lstm_testing as testing  # noqa: E402

PERSISTENT = "persistent"
# An H100's or H200's limits per block and multiprocessor, on a small emulated GPU.
EMULATED_DEVICE = dict(multiprocessors=8, shared_bytes_per_block=227 * 1024,
                       cooperative_launch=True, coresident_block_limit=0, capturing=False,
                       runtime_version=13000)


@pytest.fixture
def device(emulated):
    """Sets the emulated device for the test (by keyword, over EMULATED_DEVICE); restored after."""
    def configure(**changes):
        settings = dict(EMULATED_DEVICE, **changes)
        emulated.set_emulated_device(*settings.values())
    configure()
    yield configure
    configure()


def compare_persistent(emulated, inputs, reverse, atol, rtol):
    outputs, grads, upstream, _ = testing.run_op(inputs, reverse, ops=emulated)
    expected_outputs, expected_grads = testing.op_reference(inputs, reverse, upstream)
    testing.compare_with_reference(outputs, grads, expected_outputs, expected_grads, atol, rtol)


def check_half_type_persistent(emulated, inputs, reverse, dtype, atol):
    """As check_half_type above: float32 saved state, dtype outputs, atol on outputs and four
    times it on gradients."""
    outputs, grads, upstream, saved = testing.run_op(inputs, reverse, ops=emulated)
    assert all(t.dtype == torch.float32 for t in saved[1:])
    assert all(t.dtype == dtype for t in outputs + tuple(g for g in grads if g.numel()))
    expected_outputs, expected_grads = testing.op_reference(inputs, reverse, upstream)
    testing.compare_with_reference(outputs, (), expected_outputs, {}, atol, atol)
    testing.compare_with_reference((), grads, (), expected_grads, 4 * atol, 4 * atol)


def launches(emulated, function):
    """(function's result, the kernel launches it made)."""
    before = emulated.launch_count()
    result = function()
    return result, emulated.launch_count() - before


FORCED_BUT_CANNOT_RUN = r"the persistent kernel was forced \(LSTM_FUSED_PATH=persistent\) but "


def op_args(inputs):
    return [inputs[k] for k in testing.ARG_NAMES]


def count_forward_backward(emulated, inputs, reverse):
    """Kernel launches of the forward op and of the backward op."""
    args = op_args(inputs)
    (y, h_n, c_n, gates, cells), forward = launches(
        emulated, lambda: emulated.forward(*args, reverse, True))
    _, backward = launches(emulated, lambda: emulated.backward(
        torch.ones_like(y), torch.ones_like(h_n), torch.ones_like(c_n), *args[:5],
        inputs["w_hr"], inputs["lengths"], y, gates, cells, reverse, inputs["b_ih"] is not None))
    return forward, backward


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_persistent_float64_matches_reference(emulated, device, shape):
    T, B, I, H, P = shape
    inputs = testing.make_inputs(T, B, I, H, P, seed=sum(shape))
    with lstm_fused.force_path(PERSISTENT):
        compare_persistent(emulated, inputs, False, atol=1e-12, rtol=1e-10)
        assert count_forward_backward(emulated, inputs, False) == (1, 1)


@pytest.mark.parametrize("B", [1, 3, 129])
@pytest.mark.parametrize("H", [1, 31, 129])
def test_persistent_batch_and_hidden_tails(emulated, device, B, H):
    # 16 multiprocessors: 129 rows x 129 units is more state than 8 blocks' registers hold.
    device(multiprocessors=16)
    inputs = testing.make_inputs(3, B, 5, H, 0, lengths=[3, 1, 0, 2][:B] + [3] * max(0, B - 4),
                         seed=B + H)
    with lstm_fused.force_path(PERSISTENT):
        compare_persistent(emulated, inputs, True, atol=1e-12, rtol=1e-10)
        assert count_forward_backward(emulated, inputs, True) == (1, 1)


@pytest.mark.parametrize("proj", [0, 4])
@pytest.mark.parametrize("reverse", [False, True])
def test_persistent_lengths_and_direction(emulated, device, proj, reverse):
    # Lengths 0 and T, and rows that stop at different steps.
    inputs = testing.make_inputs(5, 6, 4, 9, proj, lengths=[5, 3, 0, 1, 5, 4], seed=3)
    with lstm_fused.force_path(PERSISTENT):
        compare_persistent(emulated, inputs, reverse, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("T", [1, 2, 17])
def test_persistent_sequence_lengths(emulated, device, T):
    inputs = testing.make_inputs(T, 4, 3, 10, 0, lengths=[T, T // 2, 0, 1], seed=T)
    with lstm_fused.force_path(PERSISTENT):
        compare_persistent(emulated, inputs, False, atol=1e-12, rtol=1e-10)


def test_persistent_without_bias(emulated, device):
    inputs = testing.make_inputs(3, 5, 4, 12, 0, bias=False, seed=5)
    with lstm_fused.force_path(PERSISTENT):
        compare_persistent(emulated, inputs, True, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("multiprocessors", [1, 2, 3, 16])
def test_persistent_any_grid_size(emulated, device, multiprocessors):
    """One block or many: the same results, to rounding (the sums' order follows the grid)."""
    device(multiprocessors=multiprocessors)
    inputs = testing.make_inputs(4, 7, 5, 23, 6, lengths=[4, 2, 0, 3, 4, 1, 4],
                                 seed=multiprocessors)
    with lstm_fused.force_path(PERSISTENT):
        compare_persistent(emulated, inputs, False, atol=1e-12, rtol=1e-10)


# Half types: the tensor-core path (wmma) from batch 5 on, the scalar one below, as the step
# kernels choose. Rows, units and K with tails of the 16-row fragments; H = 300 gives more
# 16-row fragments than warps forward (each warp several), and backward more fragments per warp
# than registers hold (the rest in shared memory).
@pytest.mark.parametrize("dtype,atol", HALF_TYPES)
@pytest.mark.parametrize("shape,reverse,lengths", [
    ((3, 21, 5, 19, 0), False, None),
    ((2, 37, 40, 33, 0), True, [2, 1, 0] + [2] * 34),
    ((3, 18, 7, 20, 9), False, [3, 2] * 9),
    ((3, 3, 5, 19, 0), True, [3, 0, 2]),
    ((2, 129, 5, 31, 0), False, None),
    ((2, 6, 5, 300, 0), False, [2, 1, 2, 0, 2, 2]),
], ids=["plain", "reverse-lengths", "projection-lengths", "scalar-batch-3", "batch-129",
        "hidden-300"])
def test_persistent_half_types(emulated, device, dtype, atol, shape, reverse, lengths):
    T, B, I, H, P = shape
    inputs = testing.make_inputs(T, B, I, H, P, dtype=dtype, lengths=lengths, seed=B + H)
    with lstm_fused.force_path(PERSISTENT):
        check_half_type_persistent(emulated, inputs, reverse, dtype, atol)
        assert count_forward_backward(emulated, inputs, reverse) == (1, 1)


@pytest.mark.parametrize("batch", [3, 21])
def test_persistent_tf32_follows_the_cudnn_flag(emulated, device, batch):
    """float32 on tensor cores (TF32) exactly where the step kernels use them: with
    torch.backends.cudnn.allow_tf32, from batch 5 on."""
    inputs = testing.make_inputs(4, batch, 9, 19, 5, dtype=torch.float32,
                         lengths=([4, 2, 3] * 7)[:batch], seed=21)
    with lstm_fused.force_path(PERSISTENT):
        compare_persistent(emulated, inputs, True, atol=2e-5, rtol=1e-4)
        exact = testing.run_op(inputs, True, ops=emulated)
        torch.backends.cudnn.allow_tf32 = True
        tf32 = testing.run_op(inputs, True, ops=emulated)
        compare_persistent(emulated, inputs, True, atol=4e-3, rtol=4e-3)
    differs = any(not torch.equal(a, b) for a, b in zip(exact[0] + tuple(exact[1]),
                                                        tf32[0] + tuple(tf32[1])))
    assert differs == (batch >= 5)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_persistent_matches_every_step_tile(emulated, device, dtype):
    """Every CUDA path on the same inputs."""
    inputs = testing.make_inputs(5, 9, 6, 21, 0, dtype=dtype,
                                 lengths=[5, 4, 0, 1, 5, 2, 3, 5, 5], seed=8)
    with lstm_fused.force_path(PERSISTENT):
        ours = testing.run_op(inputs, False, ops=emulated)
    tolerance = {torch.float64: 1e-12, torch.float32: 2e-5, torch.bfloat16: 3e-2}[dtype]
    for tile in TILES:
        with lstm_fused.force_path(tile):
            theirs = testing.run_op(inputs, False, ops=emulated)
        for a, b in zip(ours[0] + tuple(ours[1]), theirs[0] + tuple(theirs[1])):
            torch.testing.assert_close(a.double(), b.double(), atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_persistent_every_output_element_is_written(emulated, device, dtype):
    # Freed NaN-filled memory is what the op's allocations get back, so a missed element shows;
    # the emulator fills each block's shared memory with NaNs too.
    inputs = testing.make_inputs(3, 7, 4, 19, 5, dtype=dtype, lengths=[3, 1, 2, 0, 3, 3, 2], seed=9)
    with lstm_fused.force_path(PERSISTENT):
        for reverse in (False, True):
            outputs, grads, _, saved = testing.run_op(inputs, reverse, ops=emulated,
                                                      before_each=testing.poison_memory)
            testing.poison_memory()
            inference = emulated.forward(*op_args(inputs), reverse, False)
            for t in outputs + tuple(grads) + saved + inference[:3]:
                assert not t.isnan().any()


def test_persistent_deterministic(emulated, device):
    inputs = testing.make_inputs(4, 9, 6, 33, 7, dtype=torch.float32,
                                 lengths=[4, 3, 0, 2] * 2 + [4], seed=2)
    with lstm_fused.force_path(PERSISTENT):
        first = testing.run_op(inputs, True, ops=emulated)
        second = testing.run_op(inputs, True, ops=emulated)
    for a, b in zip(first[0] + tuple(first[1]), second[0] + tuple(second[1])):
        assert torch.equal(a, b)


def test_persistent_inference_matches_training(emulated, device):
    """Without training the forward keeps no activations; y, h_n and c_n are the same."""
    inputs = testing.make_inputs(5, 3, 4, 11, 0, lengths=[5, 2, 4], seed=12)
    with lstm_fused.force_path(PERSISTENT):
        trained = emulated.forward(*op_args(inputs), False, True)
        inferred = emulated.forward(*op_args(inputs), False, False)
    for a, b in zip(trained[:3], inferred[:3]):
        assert torch.equal(a, b)
    assert inferred[3].numel() == 0 and inferred[4].numel() == 0


# ---- Both directions of a layer in one launch --------------------------------------------------

def pair_inputs(T, B, I, H, P=0, dtype=torch.float64, lengths=None, seed=0, bias=True):
    forward = testing.make_inputs(T, B, I, H, P, dtype=dtype, lengths=lengths, seed=seed, bias=bias)
    reverse = testing.make_inputs(T, B, I, H, P, dtype=dtype, lengths=lengths, seed=seed + 100,
                          bias=bias)
    reverse["x"], reverse["lengths"] = forward["x"], forward["lengths"]
    return forward, reverse


def pair_args(f, r):
    return [f["x"], torch.stack([f["h0"], r["h0"]]), torch.stack([f["c0"], r["c0"]]),
            f["w_ih"], f["w_hh"], f["b_ih"], f["b_hh"], f["w_hr"],
            r["w_ih"], r["w_hh"], r["b_ih"], r["b_hh"], r["w_hr"], f["lengths"]]


PAIR_GRAD_NAMES = ("x", "h0", "c0", "w_ih", "w_hh", "b_ih", "w_hr", "w_ih_reverse",
                   "w_hh_reverse", "b_ih_reverse", "w_hr_reverse")


def run_pair(namespace, f, r):
    """Forward and backward through the two-direction ops, as lstm_fused.LSTM uses them."""
    x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, w_ih_r, w_hh_r, b_ih_r, b_hh_r, w_hr_r, lengths = (
        pair_args(f, r))
    y, h_n, c_n, gates, cells, gates_r, cells_r = namespace.bidirectional_forward(
        *pair_args(f, r), True)
    generator = torch.Generator().manual_seed(1)
    grad_y, grad_h, grad_c = (torch.randn(t.shape, generator=generator,
                                          dtype=torch.float64).to(t.dtype)
                              for t in (y, h_n, c_n))
    pad = testing.padding(f)
    if pad is not None:
        grad_y = grad_y.masked_fill(pad, 0.0)
    grads = namespace.bidirectional_backward(
        grad_y, grad_h, grad_c, x, h0, c0, w_ih, w_hh, w_hr, w_ih_r, w_hh_r, w_hr_r, lengths, y,
        gates, cells, gates_r, cells_r, b_ih is not None)
    if pad is not None:
        y = y.masked_fill(pad, 0.0)
    return (y, h_n, c_n), grads, (grad_y, grad_h, grad_c)


def pair_reference(f, r, upstream):
    grad_y, grad_h, grad_c = upstream
    P = grad_y.shape[2] // 2
    (y, h_n, c_n), grads = testing.op_reference(f, False,
                                                (grad_y[..., :P], grad_h[0], grad_c[0]))
    (y_r, h_n_r, c_n_r), grads_r = testing.op_reference(r, True,
                                                        (grad_y[..., P:], grad_h[1], grad_c[1]))
    expected = {"x": grads["x"] + grads_r["x"], "h0": torch.stack([grads["h0"], grads_r["h0"]]),
                "c0": torch.stack([grads["c0"], grads_r["c0"]])}
    for name in ("w_ih", "w_hh", "b_ih", "w_hr"):
        if name in grads:
            expected[name], expected[name + "_reverse"] = grads[name], grads_r[name]
    return (torch.cat([y, y_r], 2), torch.stack([h_n, h_n_r]), torch.stack([c_n, c_n_r])), expected


def compare_pair(emulated, f, r, atol, rtol):
    outputs, grads, upstream = run_pair(emulated, f, r)
    expected_outputs, expected_grads = pair_reference(f, r, upstream)
    for name, actual, expected in zip(["y", "h_n", "c_n"], outputs, expected_outputs):
        torch.testing.assert_close(actual.double(), expected, atol=atol, rtol=rtol,
                                   msg=lambda m, n=name: f"{n}: {m}")
    for name, actual in zip(PAIR_GRAD_NAMES, grads):
        if name in expected_grads:
            torch.testing.assert_close(actual.double(), expected_grads[name], atol=atol,
                                       rtol=rtol, msg=lambda m, n=name: f"grad {n}: {m}")


def count_pair(emulated, f, r):
    """Kernel launches of the two-direction forward op and of its backward."""
    args = pair_args(f, r)
    out, forward = launches(emulated, lambda: emulated.bidirectional_forward(*args, True))
    y, h_n, c_n, gates, cells, gates_r, cells_r = out
    _, backward = launches(emulated, lambda: emulated.bidirectional_backward(
        torch.ones_like(y), torch.ones_like(h_n), torch.ones_like(c_n), *args[:5], args[7],
        *args[8:10], args[12], args[13], y, gates, cells, gates_r, cells_r, True))
    return forward, backward


@pytest.mark.parametrize("proj", [0, 5])
@pytest.mark.parametrize("with_lengths", [False, True])
def test_persistent_both_directions_in_one_launch(emulated, device, proj, with_lengths):
    f, r = pair_inputs(4, 6, 5, 13, proj, lengths=[4, 1, 0, 3, 4, 2] if with_lengths else None,
                       seed=proj + with_lengths)
    with lstm_fused.force_path(PERSISTENT):
        compare_pair(emulated, f, r, atol=1e-12, rtol=1e-10)
        assert count_pair(emulated, f, r) == (1, 1)


@pytest.mark.parametrize("dtype,atol", HALF_TYPES + [(torch.float32, 2e-5)])
def test_persistent_both_directions_every_dtype(emulated, device, dtype, atol):
    f, r = pair_inputs(3, 7, 5, 17, 0, dtype=dtype, lengths=[3, 2, 0, 3, 1, 3, 3], seed=4)
    with lstm_fused.force_path(PERSISTENT):
        compare_pair(emulated, f, r, atol=4 * atol, rtol=4 * atol)
        assert count_pair(emulated, f, r) == (1, 1)


def test_persistent_both_directions_by_direction_where_they_do_not_fit_together(emulated,
                                                                                  device):
    # One multiprocessor: room for one direction's grid, not for both; each direction then runs
    # its own persistent launch.
    device(multiprocessors=1)
    f, r = pair_inputs(3, 4, 5, 9, 3, lengths=[3, 1, 2, 0], seed=6)
    with lstm_fused.force_path(PERSISTENT):
        compare_pair(emulated, f, r, 1e-12, 1e-10)
        assert count_pair(emulated, f, r) == (2, 2)


@pytest.mark.parametrize("path", ["auto", "step_medium"])
def test_persistent_both_directions_match_the_step_kernels(emulated, device, path):
    f, r = pair_inputs(5, 6, 4, 9, 0, lengths=[5, 3, 0, 1, 5, 4], seed=7)
    with lstm_fused.force_path(path):
        compare_pair(emulated, f, r, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_persistent_both_directions_outputs_as_the_fake_kernel_declares(emulated, device,
                                                                          training, dtype):
    f, r = pair_inputs(3, 6, 4, 5, 3, dtype=dtype)
    args = pair_args(f, r)
    meta = [a.to("meta") if isinstance(a, torch.Tensor) else a for a in args]
    fake = lstm_ops._bidirectional_forward_fake(*meta, training)
    for path in (PERSISTENT, "auto"):
        with lstm_fused.force_path(path):
            real = emulated.bidirectional_forward(*args, training)
        for a, b in zip(real, fake):
            assert a.shape == b.shape and a.dtype == b.dtype and a.is_contiguous()


def test_persistent_both_directions_empty_sequence_and_batch(emulated, device):
    for T, B in [(0, 3), (3, 0)]:
        f, r = pair_inputs(T, B, 4, 5)
        with lstm_fused.force_path(PERSISTENT):
            outputs, grads, upstream = run_pair(emulated, f, r)
        assert outputs[0].shape == (T, B, 10)
        if T == 0:
            torch.testing.assert_close(outputs[1], torch.stack([f["h0"], r["h0"]]))
            torch.testing.assert_close(grads[1], upstream[1])


# ---- The dispatch: where it runs, where it falls back ------------------------------------------

def test_persistent_is_the_automatic_choice_for_small_batches(emulated, device):
    """Auto: the persistent kernel from two steps on where the cost model expects it faster
    (small batches: the step kernels pay a launch per step); one step stays a step launch."""
    inputs = testing.make_inputs(6, 2, 5, 16, 0, seed=13)
    assert count_forward_backward(emulated, inputs, False) == (1, 1)
    single = testing.make_inputs(1, 2, 5, 16, 0, seed=13)
    assert count_forward_backward(emulated, single, False) == (1, 2)  # a step, and dL/dh_0


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_persistent_beyond_capacity(emulated, device, dtype):
    """W_hh beyond the on-chip memory (an emulated 8 KiB of shared memory per block): forced, an
    error names the reason; auto runs the step kernels, with the same results."""
    device(shared_bytes_per_block=8 * 1024)
    inputs = testing.make_inputs(3, 2, 4, 64, 0, dtype=dtype, seed=14)
    with lstm_fused.force_path(PERSISTENT):
        with pytest.raises(RuntimeError, match=FORCED_BUT_CANNOT_RUN +
                           r"cannot run here: the weights need \d+ KiB of shared memory per "
                           r"block at \d+ blocks per direction .* above the device's 8 KiB"):
            testing.run_op(inputs, False, ops=emulated)
    tolerance = 1e-12 if dtype == torch.float64 else 2e-5
    compare_persistent(emulated, inputs, False, atol=tolerance, rtol=tolerance)
    assert count_forward_backward(emulated, inputs, False) == (3, 4)


def test_persistent_too_many_pairs_per_block(emulated, device):
    """More (row, unit) pairs than a block's threads keep in registers."""
    inputs = testing.make_inputs(2, 129, 3, 129, 0, seed=15)
    with lstm_fused.force_path(PERSISTENT):
        with pytest.raises(RuntimeError, match=FORCED_BUT_CANNOT_RUN +
                           r".*batch 129 x 17 columns per block .* \(row, column\) pairs"):
            testing.run_op(inputs, False, ops=emulated)
    compare_persistent(emulated, inputs, False, 1e-12, 1e-10)


def test_persistent_without_cooperative_launches(emulated, device):
    device(cooperative_launch=False)
    inputs = testing.make_inputs(3, 4, 5, 8, 0, seed=16)
    with lstm_fused.force_path(PERSISTENT):
        with pytest.raises(RuntimeError, match=FORCED_BUT_CANNOT_RUN +
                           "cannot run here: the device does not support cooperative launches"):
            testing.run_op(inputs, True, ops=emulated)
    compare_persistent(emulated, inputs, True, 1e-12, 1e-10)
    assert count_forward_backward(emulated, inputs, True) == (3, 4)  # auto: the step kernels


def test_persistent_refused_launch(emulated, device):
    """A device that refuses the cooperative launch although occupancy promised it room (as under
    an MPS limit on multiprocessors): forced, an error; auto runs the step kernels instead (and
    warns once)."""
    device(coresident_block_limit=1)
    inputs = testing.make_inputs(3, 4, 5, 24, 0, seed=17)
    with lstm_fused.force_path(PERSISTENT):
        with pytest.raises(RuntimeError, match=FORCED_BUT_CANNOT_RUN +
                           "the device refused the cooperative launch"):
            testing.run_op(inputs, False, ops=emulated)
    compare_persistent(emulated, inputs, False, 1e-12, 1e-10)
    assert count_forward_backward(emulated, inputs, False) == (3, 4)
    # Both directions at once: refused, then one direction at a time, each refused, each falling
    # back to the step kernels.
    f, r = pair_inputs(3, 4, 5, 24, 0, seed=17)
    compare_pair(emulated, f, r, 1e-12, 1e-10)
    assert count_pair(emulated, f, r) == (6, 8)


@pytest.mark.parametrize("runtime", [11080, 12000])
def test_persistent_under_graph_capture(emulated, device, runtime):
    """Cooperative launches can be captured into CUDA graphs from CUDA 12.0 on; before, the step
    kernels run under capture (and forcing the persistent kernel is an error)."""
    device(capturing=True, runtime_version=runtime)
    inputs = testing.make_inputs(3, 4, 5, 8, 0, seed=18)
    if runtime < 12000:
        with lstm_fused.force_path(PERSISTENT):
            with pytest.raises(RuntimeError, match=FORCED_BUT_CANNOT_RUN +
                               r"cannot run here: the stream is being captured into a CUDA "
                               r"graph, which takes cooperative launches from CUDA 12.0 on "
                               r"\(runtime 11.8, driver 13.0\)"):
                testing.run_op(inputs, False, ops=emulated)
        assert count_forward_backward(emulated, inputs, False) == (3, 4)
    else:
        assert count_forward_backward(emulated, inputs, False) == (1, 1)


def test_persistent_capacity_model(emulated, device):
    """The plan on an H200's numbers (132 multiprocessors, 227 KiB of shared memory per block):
    W_hh on chip up to the sizes the README gives, no further."""
    device(multiprocessors=132)
    plan = emulated.persistent_plan
    for dtype, batch, tensor_cores, forward, backward in [
            (torch.float32, 1, False, 1320, 1316), (torch.float16, 16, True, 2112, 2112),
            (torch.bfloat16, 16, True, 2112, 2112), (torch.float32, 16, True, 1424, 1300),
            (torch.float64, 1, False, 924, 900)]:
        for is_backward, largest in [(False, forward), (True, backward)]:
            assert plan(dtype, batch, largest, largest, 1, False, is_backward, tensor_cores)[0]
            feasible, reason = plan(dtype, batch, largest + 16, largest + 16, 1, False,
                                    is_backward, tensor_cores)[:2]
            assert not feasible and "KiB of shared memory per block" in reason, reason


def test_persistent_dispatch_prefers_the_step_kernels_for_large_batches(emulated, device):
    """The cost model: at batch 256, H = 1024 a block's share of the arithmetic outweighs the
    launches saved."""
    device(multiprocessors=132)
    feasible, _, _, _, _, persistent_us, step_us = emulated.persistent_plan(
        torch.float32, 256, 1024, 1024, 1, False, True, True)
    assert not feasible or persistent_us > step_us
    feasible, _, _, _, _, persistent_us, step_us = emulated.persistent_plan(
        torch.float32, 1, 1024, 1024, 1, False, False, False)
    assert feasible and persistent_us < step_us
