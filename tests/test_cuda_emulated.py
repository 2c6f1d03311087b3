"""The CUDA implementation run on the CPU: csrc/cuda/ built with the CUDA emulator of
tests/emulation (kernels as C++, every block's threads as fibers), on CPU tensors.

This checks everything in the CUDA code but the hardware: the glue (the choice of path,
allocation, step order, the launches and their arguments, the GEMMs' precision), each kernel's
indexing, tiles, tails, pipelined asynchronous copies, split-K reductions, block and grid
barriers, in every dtype, against the float64 reference. The step kernels run on an emulated
H200 (132 multiprocessors), so that the tile choice is the one made there; the persistent
kernels' tests (a cooperative launch: every thread of every block a fiber at once) on the same
limits with fewer multiprocessors, so that their grids stay small. It runs on any machine with a
C++ compiler; what it cannot check (timing, the memory model, real half-precision hardware)
test_cuda.py checks on a GPU.

LSTM_FUSED_EMULATION_SANITIZE=1 builds the emulator, the glue and the kernels with
-fsanitize=address,undefined and runs the same tests (conftest.py restarts pytest with the
sanitizer's runtime preloaded): an out-of-bounds access to global or shared memory, or undefined
behaviour, then fails the run.
"""
import os
import shutil
from pathlib import Path

import pytest
import torch
from torch.utils import cpp_extension

import lstm_fused
from lstm_fused import ops as lstm_ops
from lstm_testing import (ARG_NAMES, OP_GRAD_NAMES, PAIR_GRAD_NAMES, compare_with_reference,
                          make_inputs, op_reference, pair_args, pair_inputs, pair_reference,
                          poison_memory, run_op, run_pair)

ROOT = Path(__file__).resolve().parent.parent
TILES = ["step_small", "step_medium", "step_large"]
PERSISTENT = "persistent"
SANITIZE = os.environ.get("LSTM_FUSED_EMULATION_SANITIZE") == "1"
# Sanitizer flags of the emulated build (the emulator's own test uses the same).
SANITIZER_FLAGS = ["-fsanitize=address,undefined", "-fno-sanitize=vptr",
                   "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"]

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
    flags = ["-O2", "-DLSTM_FUSED_EMULATE_CUDA", f"-I{ROOT / 'tests' / 'emulation'}",
             f"-I{ROOT / 'csrc' / 'cuda'}"]
    if SANITIZE:
        flags = ["-O1", "-g1"] + flags[1:] + SANITIZER_FLAGS
    cpp_extension.load(
        name="lstm_fused_emulated_sanitized" if SANITIZE else "lstm_fused_emulated",
        sources=[str(ROOT / "csrc" / "lstm.cpp"), str(ROOT / "csrc" / "cuda" / "lstm_cuda.cpp"),
                 *map(str, kernels)],
        extra_cflags=flags,
        extra_ldflags=SANITIZER_FLAGS if SANITIZE else [],
        build_directory=str(build),
        is_python_module=False,
    )
    lstm_fused.paths._steer("lstm_fused_emulated")  # force_path steers this build too
    return torch.ops.lstm_fused_emulated


@pytest.fixture(autouse=True)
def exact_float32():
    """Full float32 products (TF32 follows torch.backends.cudnn.allow_tf32, as nn.LSTM's does);
    the TF32 tests turn it on."""
    saved = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = saved


# An H200's limits (227 KiB of shared memory per block at most, cooperative launches); graph
# capture off; CUDA 13.
H200 = dict(multiprocessors=132, shared_bytes_per_block=227 * 1024, cooperative_launch=True,
            coresident_block_limit=0, capturing=False, runtime_version=13000)
# The same limits on eight multiprocessors, for the persistent kernel's tests.
SMALL_GPU = dict(H200, multiprocessors=8)


@pytest.fixture(autouse=True)
def h200(emulated):
    """Every test starts on an emulated H200, which decides the step kernels' widths and splits
    and the choice of path."""
    emulated.set_emulated_device(**H200)
    yield
    emulated.set_emulated_device(**H200)


@pytest.fixture
def multiprocessors(emulated, h200):
    """Sets the emulated H200's multiprocessor count."""
    def set_count(count):
        emulated.set_emulated_device(**dict(H200, multiprocessors=count))
    return set_count


@pytest.fixture
def device(emulated, h200):
    """The persistent kernel's emulated device: SMALL_GPU, changed by keyword."""
    def configure(**changes):
        emulated.set_emulated_device(**dict(SMALL_GPU, **changes))
    configure()
    return configure


def compare(emulated, inputs, reverse, atol, rtol):
    outputs, grads, upstream, _ = run_op(inputs, reverse, ops=emulated)
    expected_outputs, expected_grads = op_reference(inputs, reverse, upstream)
    compare_with_reference(outputs, grads, expected_outputs, expected_grads, atol, rtol)


def plans(emulated, B, H, P=0, dtype=torch.float32, tf32=False):
    """The step plans at these sizes, per launch kind: dicts of rows, columns, tensor, split,
    blocks."""
    flat = emulated.step_plans(B, H, P, dtype, tf32)
    keys = ("rows", "columns", "tensor", "split", "blocks")
    return [dict(zip(keys, flat[i:i + 5])) for i in range(0, len(flat), 5)]


def results(run):
    outputs, grads = run[:2]
    return list(outputs) + [g for g in grads]


def op_args(inputs):
    return [inputs[k] for k in ARG_NAMES]


def launches(emulated, function):
    """(function's result, the kernel launches it made)."""
    before = emulated.launch_count()
    result = function()
    return result, emulated.launch_count() - before


def count_forward_backward(emulated, inputs, reverse):
    """Kernel launches of the forward op and of the backward op."""
    args = op_args(inputs)
    (y, h_n, c_n, gates, cells), forward = launches(
        emulated, lambda: emulated.forward(*args, reverse, True))
    _, backward = launches(emulated, lambda: emulated.backward(
        torch.ones_like(y), torch.ones_like(h_n), torch.ones_like(c_n), *args[:5],
        inputs["w_hr"], inputs["lengths"], y, gates, cells, reverse, inputs["b_ih"] is not None))
    return forward, backward


# (T, B, I, H, P): batch 1, 3, 8 (small tile), 9, 33 (medium/large, with row tails), hidden sizes
# with unit tails (1, 31, 129) and K beyond one shared-memory tile and pipeline stage (H = 129:
# K = 516 backward), K odd (element copies) and a multiple of 4 (16-byte copies), projections,
# T = 1.
SHAPES = [
    (3, 1, 5, 7, 0),
    (2, 3, 4, 31, 0),
    (4, 9, 6, 33, 0),
    (1, 5, 3, 1, 0),
    (3, 33, 7, 17, 0),
    (2, 3, 9, 70, 5),
    (3, 9, 4, 20, 13),
    (2, 8, 3, 129, 0),
]


@pytest.mark.parametrize("tile", TILES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_float64_matches_reference(emulated, tile, shape):
    T, B, I, H, P = shape
    inputs = make_inputs(T, B, I, H, P, seed=sum(shape))
    with lstm_fused.force_path(tile):
        compare(emulated, inputs, False, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("tile", ["auto"] + TILES)
@pytest.mark.parametrize("proj", [0, 4])
@pytest.mark.parametrize("reverse", [False, True])
def test_lengths_and_direction(emulated, tile, proj, reverse):
    # Lengths 0 and T, and rows that stop at different steps.
    inputs = make_inputs(5, 6, 4, 9, proj, lengths=[5, 3, 0, 1, 5, 4], seed=3)
    with lstm_fused.force_path(tile):
        compare(emulated, inputs, reverse, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("proj", [0, 3])
def test_padded_steps_carry_the_state_in_y(emulated, proj):
    """The op's contract at padded steps, as the CPU op keeps it: y holds the carried h."""
    inputs = make_inputs(5, 4, 3, 6, proj, lengths=[5, 2, 0, 3], seed=13)
    args = [inputs[k] for k in ARG_NAMES]
    for reverse in (False, True):
        ours = emulated.forward(*args, reverse, False)[0]
        cpu = torch.ops.lstm_fused.forward(*args, reverse, False)[0]
        torch.testing.assert_close(ours, cpu, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("tile", TILES)
def test_without_bias(emulated, tile):
    inputs = make_inputs(3, 5, 4, 12, 0, bias=False, seed=5)
    with lstm_fused.force_path(tile):
        compare(emulated, inputs, True, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("tile", TILES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_split_k_matches_one_block_per_tile(emulated, multiprocessors, tile, dtype):
    """With many multiprocessors the product is split along K over blocks (partial sums added
    by the last block); with one it is not: both agree with the reference, and the split runs are
    bitwise repeatable."""
    T, B, I, H, P = 3, 9, 5, 72, 24  # K = 288 backward (beyond a half-type small tile's 256)
    if tile == "step_small":
        B = 4
    inputs = make_inputs(T, B, I, H, P, dtype=dtype, lengths=[3, 1, 0, 2] * (B // 4) + [3] *
                         (B % 4), seed=17)
    tolerance = {torch.float64: 1e-12, torch.float32: 2e-5, torch.bfloat16: 3e-2}[dtype]
    with lstm_fused.force_path(tile):
        multiprocessors(1)
        assert all(plan["split"] == 1 for plan in plans(emulated, B, H, P, dtype))
        unsplit = results(run_op(inputs, False, ops=emulated))
        multiprocessors(100_000)
        split = plans(emulated, B, H, P, dtype)
        assert max(plan["split"] for plan in split) > 1, split
        first = run_op(inputs, False, ops=emulated)
        again = results(run_op(inputs, False, ops=emulated))
    for a, b, c in zip(results(first), unsplit, again):
        torch.testing.assert_close(a.double(), b.double(), atol=tolerance, rtol=tolerance)
        assert torch.equal(a, c)
    if dtype == torch.float64:
        outputs, grads, upstream, _ = first
        compare_with_reference(outputs, grads, *op_reference(inputs, False, upstream), 1e-12,
                               1e-10)


# Goal shapes (B, T, I, H): every step launch gives each of an H100's or H200's 132
# multiprocessors at least one block.
GOAL_SHAPES = [(1, 256, 512, 512), (8, 256, 512, 512), (64, 128, 512, 512),
               (256, 64, 1024, 1024)]


@pytest.mark.parametrize("dtype,tf32", [(torch.float32, True), (torch.float32, False),
                                        (torch.bfloat16, False), (torch.float64, False)],
                         ids=["float32-tf32", "float32", "bfloat16", "float64"])
@pytest.mark.parametrize("shape", GOAL_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_goal_shapes_give_every_multiprocessor_a_block(emulated, shape, dtype, tf32):
    B, _, _, H = shape
    kinds = plans(emulated, B, H, 0, dtype, tf32)
    assert len(kinds) == 3  # forward, backward step, the last dL/dh
    for kind, plan in zip(("forward", "backward", "dL/dh_0"), kinds):
        assert plan["blocks"] >= 132, (kind, plan)
    # Tensor cores where the dtype allows them, beyond the small tile's batches.
    assert all(plan["tensor"] == (B > 8 and (dtype == torch.bfloat16 or tf32)) for plan in kinds)


@pytest.mark.parametrize("path", TILES + [PERSISTENT])
def test_unaligned_rows_take_element_copies(emulated, device, path):
    """h0 starting 4 bytes past a 16-byte boundary (a view into a larger buffer): the step
    launcher falls back from 16-byte copies, the persistent kernel reads h0 by element; the same
    results."""
    inputs = make_inputs(3, 5, 4, 8, 0, dtype=torch.float32, seed=19)
    storage = torch.empty(5 * 8 + 1, dtype=torch.float32)
    shifted = storage[1:].view(5, 8)
    shifted.copy_(inputs["h0"])
    assert shifted.data_ptr() % 16 != 0
    with lstm_fused.force_path(path):
        expected = results(run_op(inputs, False, ops=emulated))
        actual = results(run_op(dict(inputs, h0=shifted), False, ops=emulated))
    for a, e in zip(actual, expected):
        assert torch.equal(a, e)


def test_float32_matches_cpu_op(emulated):
    inputs = make_inputs(6, 7, 10, 37, 0, dtype=torch.float32, seed=7)
    compare(emulated, inputs, False, atol=2e-5, rtol=1e-4)
    ours = results(run_op(inputs, False, ops=emulated))
    cpu = results(run_op(inputs, False))
    for a, b in zip(ours, cpu):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


# Half types: float32 arithmetic and state; the error is dominated by rounding the inputs, the
# input projection, h_t and dL/dz (the backward product's operand, stored in the half type as a
# cuDNN half RNN does) to the half type. Bounds: absolute and relative, on values of order 1.
HALF_TYPES = [(torch.float16, 4e-3), (torch.bfloat16, 3e-2)]
# Under the sanitizers float16 repeats bfloat16's memory accesses exactly (the same 2-byte
# elements, indexing and fragments): the longest half-type tests run bfloat16 alone there.
SANITIZED_HALF_TYPES = HALF_TYPES[1:] if SANITIZE else HALF_TYPES


def check_half_type(emulated, inputs, reverse, dtype, atol):
    outputs, grads, upstream, saved = run_op(inputs, reverse, ops=emulated)
    # The saved activations are float32, as the fake kernel declares.
    assert all(t.dtype == torch.float32 for t in saved[1:])
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
# tails of their 16/32-row, 64-column and 32-deep tiles; K = 4H = 132 backward (odd halves:
# element copies), 40 forward (16-byte copies).
@pytest.mark.parametrize("tile", TILES)
@pytest.mark.parametrize("dtype,atol", SANITIZED_HALF_TYPES)
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
    """With torch.backends.cudnn.allow_tf32 (nn.LSTM's flag, on by default) float32 multiplies in
    TF32 (10-bit mantissas): the medium and large step tiles on tensor cores, and on every tile
    the GEMMs over all steps (input projection, dx, the weight gradients); without it, in
    float32. torch.backends.cuda.matmul.allow_tf32 changes nothing."""
    inputs = make_inputs(4, 21, 9, 19, 0, dtype=torch.float32, lengths=[4, 2, 3] * 7, seed=21)
    matmul_saved = torch.backends.cuda.matmul.allow_tf32
    try:
        with lstm_fused.force_path(tile):
            exact = results(run_op(inputs, True, ops=emulated))
            torch.backends.cuda.matmul.allow_tf32 = True
            assert all(torch.equal(a, b)
                       for a, b in zip(exact, results(run_op(inputs, True, ops=emulated))))
            torch.backends.cudnn.allow_tf32 = True
            torch.backends.cuda.matmul.allow_tf32 = False
            tf32 = results(run_op(inputs, True, ops=emulated))
            compare(emulated, inputs, True, atol=4e-3, rtol=4e-3)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul_saved
    names = ["y", "h_n", "c_n"] + list(OP_GRAD_NAMES)
    differs = {name for name, a, b in zip(names, exact, tf32) if not torch.equal(a, b)}
    # The GEMMs' own results: dx and dW_ih come from them alone.
    assert {"x", "w_ih", "w_hh", "y"} <= differs, differs


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
            exact = results(run_op(inputs, False, ops=emulated))
            cudnn.rnn.fp32_precision, cudnn.conv.fp32_precision = "tf32", "ieee"
            tf32 = results(run_op(inputs, False, ops=emulated))
    finally:
        cudnn.rnn.fp32_precision, cudnn.conv.fp32_precision = saved
    same = all(torch.equal(a, b) for a, b in zip(exact, tf32))
    assert same == (dtype != torch.float32)


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_outputs_as_the_fake_kernel_declares(emulated, training, dtype):
    inputs = make_inputs(3, 2, 4, 5, 3, dtype=dtype)
    args = [inputs[k] for k in ARG_NAMES]
    real = emulated.forward(*args, False, training)
    meta = [a.to("meta") if isinstance(a, torch.Tensor) else a for a in args]
    fake = lstm_ops._forward_fake(*meta, False, training)
    for r, f in zip(real, fake):
        assert r.shape == f.shape and r.dtype == f.dtype and r.is_contiguous()


@pytest.mark.parametrize("path", TILES + [PERSISTENT])
def test_one_launch_per_step(emulated, device, path):
    """The step kernels: forward one launch per step (with a projection and lengths, one more
    that carries the padded rows after the projection GEMM); backward one per step (two with a
    projection) and one for dL/dh_0; splitting K adds none. The persistent kernel: one launch
    forward, one backward."""
    T = 7
    plain = make_inputs(T, 4, 3, 10, 0)
    projected = make_inputs(T, 4, 3, 10, 6)
    padded = make_inputs(T, 4, 3, 10, 6, lengths=[7, 3, 0, 5])
    with lstm_fused.force_path(path):
        for inputs, counts in [(plain, (T, T + 1)), (projected, (T, 2 * T + 1)),
                               (padded, (2 * T, 2 * T + 1))]:
            if path == PERSISTENT:
                counts = (1, 1)
            assert count_forward_backward(emulated, inputs, False) == counts


def test_deterministic(emulated):
    inputs = make_inputs(4, 9, 6, 33, 0, dtype=torch.float32, seed=2)
    first = results(run_op(inputs, False, ops=emulated))
    second = results(run_op(inputs, False, ops=emulated))
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("tile", TILES)
def test_every_output_element_is_written(emulated, tile):
    # Freed NaN-filled memory is what the op's allocations get back, so a missed element shows.
    inputs = make_inputs(3, 5, 4, 19, 3, dtype=torch.float32, lengths=[3, 1, 2, 0, 3], seed=9)
    with lstm_fused.force_path(tile):
        for _ in range(3):
            outputs, grads, _, saved = run_op(inputs, True, ops=emulated,
                                              before_each=poison_memory)
            for t in outputs + tuple(grads) + saved:
                assert not t.isnan().any()


def test_non_contiguous_inputs(emulated):
    inputs = make_inputs(4, 3, 5, 8, 0, seed=4)
    strided = dict(inputs)
    strided["x"] = inputs["x"].transpose(0, 1).contiguous().transpose(0, 1)
    strided["w_ih"] = inputs["w_ih"].t().contiguous().t()
    strided["w_hh"] = inputs["w_hh"].t().contiguous().t()
    strided["h0"] = inputs["h0"].t().contiguous().t()
    expected = results(run_op(inputs, False, ops=emulated))
    actual = results(run_op(strided, False, ops=emulated))
    for a, b in zip(actual, expected):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


def test_empty_sequence_and_empty_batch(emulated):
    for T, B in [(0, 3), (3, 0)]:
        inputs = make_inputs(T, B, 4, 5, 0)
        outputs, grads, upstream, _ = run_op(inputs, False, ops=emulated)
        assert outputs[0].shape == (T, B, 5)
        if T == 0:
            torch.testing.assert_close(outputs[1], inputs["h0"])
            torch.testing.assert_close(grads[1], upstream[1])
            torch.testing.assert_close(grads[2], upstream[2])
            assert not grads[4].any()


def test_bad_path_name_is_a_clear_error(emulated):
    inputs = make_inputs(2, 2, 3, 4, 0)
    with lstm_fused.force_path("gemm"):  # a CPU path
        with pytest.raises(RuntimeError, match="must be auto, step_small, step_medium, "
                           "step_large or persistent on CUDA, got 'gemm'"):
            run_op(inputs, False, ops=emulated)


# =============================================================================================
# The persistent kernels (csrc/cuda/lstm_persistent.cu): a whole sequence per cooperative launch.
# The emulator runs every block's threads as fibers at once and switches through all of them at
# a grid barrier; its device (SMALL_GPU by default: multiprocessors, shared memory, cooperative
# launch support, graph capture) is set per test. Tolerances are the step kernels' above.
# =============================================================================================

FORCED_BUT_CANNOT_RUN = r"the persistent kernel was forced \(LSTM_FUSED_PATH=persistent\) but "


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_persistent_float64_matches_reference(emulated, device, shape):
    T, B, I, H, P = shape
    inputs = make_inputs(T, B, I, H, P, seed=sum(shape))
    with lstm_fused.force_path(PERSISTENT):
        compare(emulated, inputs, False, atol=1e-12, rtol=1e-10)
        assert count_forward_backward(emulated, inputs, False) == (1, 1)


@pytest.mark.parametrize("B", [1, 3, 129])
@pytest.mark.parametrize("H", [1, 31, 129])
def test_persistent_batch_and_hidden_tails(emulated, device, B, H):
    # 16 multiprocessors: 129 rows x 129 units is more state than 8 blocks' registers hold.
    device(multiprocessors=16)
    inputs = make_inputs(3, B, 5, H, 0, lengths=[3, 1, 0, 2][:B] + [3] * max(0, B - 4),
                         seed=B + H)
    with lstm_fused.force_path(PERSISTENT):
        compare(emulated, inputs, True, atol=1e-12, rtol=1e-10)
        assert count_forward_backward(emulated, inputs, True) == (1, 1)


@pytest.mark.parametrize("proj", [0, 4])
@pytest.mark.parametrize("reverse", [False, True])
def test_persistent_lengths_and_direction(emulated, device, proj, reverse):
    # Lengths 0 and T, and rows that stop at different steps.
    inputs = make_inputs(5, 6, 4, 9, proj, lengths=[5, 3, 0, 1, 5, 4], seed=3)
    with lstm_fused.force_path(PERSISTENT):
        compare(emulated, inputs, reverse, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("T", [1, 2, 17])
def test_persistent_sequence_lengths(emulated, device, T):
    inputs = make_inputs(T, 4, 3, 10, 0, lengths=[T, T // 2, 0, 1], seed=T)
    with lstm_fused.force_path(PERSISTENT):
        compare(emulated, inputs, False, atol=1e-12, rtol=1e-10)


def test_persistent_without_bias(emulated, device):
    inputs = make_inputs(3, 5, 4, 12, 0, bias=False, seed=5)
    with lstm_fused.force_path(PERSISTENT):
        compare(emulated, inputs, True, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("multiprocessors", [1, 2, 3, 16])
def test_persistent_any_grid_size(emulated, device, multiprocessors):
    """One block or many: the same results, to rounding (the sums' order follows the grid)."""
    device(multiprocessors=multiprocessors)
    inputs = make_inputs(4, 7, 5, 23, 6, lengths=[4, 2, 0, 3, 4, 1, 4], seed=multiprocessors)
    with lstm_fused.force_path(PERSISTENT):
        compare(emulated, inputs, False, atol=1e-12, rtol=1e-10)


# Half types: the tensor-core path (wmma) above batch 8, the scalar one up to it, exactly where
# the step kernels' tile choice takes tensor cores. Rows, units and K with tails of the 16-row
# fragments; H = 300 gives more 16-row fragments than warps forward (each warp several), and
# backward more fragments per warp than registers hold (the rest in shared memory).
@pytest.mark.parametrize("dtype,atol", SANITIZED_HALF_TYPES)
@pytest.mark.parametrize("shape,reverse,lengths", [
    ((3, 21, 5, 19, 0), False, None),
    ((2, 37, 40, 33, 0), True, [2, 1, 0] + [2] * 34),
    ((3, 18, 7, 20, 9), False, [3, 2] * 9),
    ((3, 3, 5, 19, 0), True, [3, 0, 2]),
    ((3, 8, 5, 19, 0), False, [3, 0, 2, 3, 1, 3, 3, 2]),
    ((2, 129, 5, 31, 0), False, None),
    ((2, 9, 5, 300, 0), False, [2, 1, 2, 0, 2, 2, 1, 2, 2]),
], ids=["plain", "reverse-lengths", "projection-lengths", "scalar-batch-3", "scalar-batch-8",
        "batch-129", "hidden-300"])
def test_persistent_half_types(emulated, device, dtype, atol, shape, reverse, lengths):
    T, B, I, H, P = shape
    inputs = make_inputs(T, B, I, H, P, dtype=dtype, lengths=lengths, seed=B + H)
    with lstm_fused.force_path(PERSISTENT):
        check_half_type(emulated, inputs, reverse, dtype, atol)
        assert count_forward_backward(emulated, inputs, reverse) == (1, 1)


@pytest.mark.parametrize("batch", [3, 8, 9, 21])
def test_persistent_tf32_follows_the_cudnn_flag(emulated, device, batch):
    """With torch.backends.cudnn.allow_tf32 the persistent path's GEMMs (input projection, dx,
    the weight gradients) multiply in TF32 at every batch, as the step kernels' path does; the
    kernel itself on tensor cores (TF32) exactly where the step kernels use them, above batch 8.
    With x = 0 the input projection is exact in both, so the forward's outputs show the kernel's
    precision alone."""
    inputs = make_inputs(4, batch, 9, 19, 5, dtype=torch.float32,
                         lengths=([4, 2, 3] * 7)[:batch], seed=21)
    silent = dict(inputs, x=torch.zeros_like(inputs["x"]))
    matmul_saved = torch.backends.cuda.matmul.allow_tf32
    try:
        with lstm_fused.force_path(PERSISTENT):
            compare(emulated, inputs, True, atol=2e-5, rtol=1e-4)
            exact, exact_silent = (results(run_op(i, True, ops=emulated)) for i in (inputs, silent))
            torch.backends.cuda.matmul.allow_tf32 = True  # changes nothing
            assert all(torch.equal(a, b)
                       for a, b in zip(exact, results(run_op(inputs, True, ops=emulated))))
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = True
            tf32, tf32_silent = (results(run_op(i, True, ops=emulated)) for i in (inputs, silent))
            compare(emulated, inputs, True, atol=4e-3, rtol=4e-3)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul_saved
    names = ["y", "h_n", "c_n"] + list(OP_GRAD_NAMES)
    differs = {name for name, a, b in zip(names, exact, tf32) if not torch.equal(a, b)}
    assert {"x", "w_ih", "w_hh", "y"} <= differs, differs
    kernel_differs = any(not torch.equal(a, b) for a, b in zip(exact_silent[:3], tf32_silent[:3]))
    assert kernel_differs == (batch > 8)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_persistent_matches_every_step_tile(emulated, device, dtype):
    """Every CUDA path on the same inputs."""
    inputs = make_inputs(5, 9, 6, 21, 0, dtype=dtype, lengths=[5, 4, 0, 1, 5, 2, 3, 5, 5], seed=8)
    with lstm_fused.force_path(PERSISTENT):
        ours = results(run_op(inputs, False, ops=emulated))
    tolerance = {torch.float64: 1e-12, torch.float32: 2e-5, torch.bfloat16: 3e-2}[dtype]
    for tile in TILES:
        with lstm_fused.force_path(tile):
            theirs = results(run_op(inputs, False, ops=emulated))
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a.double(), b.double(), atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_persistent_every_output_element_is_written(emulated, device, dtype):
    # Freed NaN-filled memory is what the op's allocations get back, so a missed element shows;
    # the emulator fills each block's shared memory with NaNs too.
    inputs = make_inputs(3, 7, 4, 19, 5, dtype=dtype, lengths=[3, 1, 2, 0, 3, 3, 2], seed=9)
    with lstm_fused.force_path(PERSISTENT):
        for reverse in (False, True):
            outputs, grads, _, saved = run_op(inputs, reverse, ops=emulated,
                                              before_each=poison_memory)
            poison_memory()
            inference = emulated.forward(*op_args(inputs), reverse, False)
            for t in outputs + tuple(grads) + saved + inference[:3]:
                assert not t.isnan().any()


def test_persistent_deterministic(emulated, device):
    inputs = make_inputs(4, 9, 6, 33, 7, dtype=torch.float32, lengths=[4, 3, 0, 2] * 2 + [4],
                         seed=2)
    with lstm_fused.force_path(PERSISTENT):
        first = results(run_op(inputs, True, ops=emulated))
        second = results(run_op(inputs, True, ops=emulated))
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_persistent_inference_matches_training(emulated, device):
    """Without training the forward keeps no activations; y, h_n and c_n are the same."""
    inputs = make_inputs(5, 3, 4, 11, 0, lengths=[5, 2, 4], seed=12)
    with lstm_fused.force_path(PERSISTENT):
        trained = emulated.forward(*op_args(inputs), False, True)
        inferred = emulated.forward(*op_args(inputs), False, False)
    for a, b in zip(trained[:3], inferred[:3]):
        assert torch.equal(a, b)
    assert inferred[3].numel() == 0 and inferred[4].numel() == 0


# ---- Both directions of a layer in one launch --------------------------------------------------

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
    inputs = make_inputs(6, 2, 5, 16, 0, seed=13)
    assert count_forward_backward(emulated, inputs, False) == (1, 1)
    single = make_inputs(1, 2, 5, 16, 0, seed=13)
    assert count_forward_backward(emulated, single, False) == (1, 2)  # a step, and dL/dh_0


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_persistent_beyond_capacity(emulated, device, dtype):
    """W_hh beyond the on-chip memory (an emulated 8 KiB of shared memory per block): forced, an
    error names the reason; auto runs the step kernels, with the same results."""
    device(shared_bytes_per_block=8 * 1024)
    inputs = make_inputs(3, 2, 4, 64, 0, dtype=dtype, seed=14)
    with lstm_fused.force_path(PERSISTENT):
        with pytest.raises(RuntimeError, match=FORCED_BUT_CANNOT_RUN +
                           r"cannot run here: the weights need \d+ KiB of shared memory per "
                           r"block at \d+ blocks per direction .* above the device's 8 KiB"):
            run_op(inputs, False, ops=emulated)
    tolerance = 1e-12 if dtype == torch.float64 else 2e-5
    compare(emulated, inputs, False, atol=tolerance, rtol=tolerance)
    assert count_forward_backward(emulated, inputs, False) == (3, 4)


def test_persistent_too_many_pairs_per_block(emulated, device):
    """More (row, unit) pairs than a block's threads keep in registers."""
    inputs = make_inputs(2, 129, 3, 129, 0, seed=15)
    with lstm_fused.force_path(PERSISTENT):
        with pytest.raises(RuntimeError, match=FORCED_BUT_CANNOT_RUN +
                           r".*batch 129 x 17 columns per block .* \(row, column\) pairs"):
            run_op(inputs, False, ops=emulated)
    compare(emulated, inputs, False, 1e-12, 1e-10)


def test_persistent_without_cooperative_launches(emulated, device):
    device(cooperative_launch=False)
    inputs = make_inputs(3, 4, 5, 8, 0, seed=16)
    with lstm_fused.force_path(PERSISTENT):
        with pytest.raises(RuntimeError, match=FORCED_BUT_CANNOT_RUN +
                           "cannot run here: the device does not support cooperative launches"):
            run_op(inputs, True, ops=emulated)
    compare(emulated, inputs, True, 1e-12, 1e-10)
    assert count_forward_backward(emulated, inputs, True) == (3, 4)  # auto: the step kernels


def test_persistent_refused_launch(emulated, device):
    """A device that refuses the cooperative launch although occupancy promised it room (as under
    an MPS limit on multiprocessors): forced, an error; auto runs the step kernels instead (and
    warns once)."""
    device(coresident_block_limit=1)
    inputs = make_inputs(3, 4, 5, 24, 0, seed=17)
    with lstm_fused.force_path(PERSISTENT):
        with pytest.raises(RuntimeError, match=FORCED_BUT_CANNOT_RUN +
                           "the device refused the cooperative launch"):
            run_op(inputs, False, ops=emulated)
    compare(emulated, inputs, False, 1e-12, 1e-10)
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
    inputs = make_inputs(3, 4, 5, 8, 0, seed=18)
    if runtime < 12000:
        with lstm_fused.force_path(PERSISTENT):
            with pytest.raises(RuntimeError, match=FORCED_BUT_CANNOT_RUN +
                               r"cannot run here: the stream is being captured into a CUDA "
                               r"graph, which takes cooperative launches from CUDA 12.0 on "
                               r"\(runtime 11.8, driver 13.0\)"):
                run_op(inputs, False, ops=emulated)
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
