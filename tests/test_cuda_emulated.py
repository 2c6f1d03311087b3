"""The CUDA implementation run on the CPU: csrc/cuda/ built with the CUDA emulator of
tests/emulation (kernels as C++, every block's threads as fibers), on CPU tensors.

This checks everything in the CUDA code but the hardware: the glue (allocation, step order, the
launches and their arguments, the GEMMs' precision), each kernel's indexing, tiles, tails,
pipelined asynchronous copies, split-K reductions and barriers, in every dtype, against the
float64 reference. It runs on any machine with a C++ compiler; what it cannot check (timing, the
memory model, real half-precision hardware) test_cuda.py checks on a GPU.

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
from lstm_testing import (ARG_NAMES, OP_GRAD_NAMES, compare_with_reference, make_inputs,
                          op_reference, poison_memory, run_op)

ROOT = Path(__file__).resolve().parent.parent
TILES = ["step_small", "step_medium", "step_large"]
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
    # The .cu file, compiled as C++.
    kernels = build / "lstm_kernels_emulated.cpp"
    kernels.write_text(f'#include "{ROOT / "csrc" / "cuda" / "lstm_kernels.cu"}"\n')
    flags = ["-O2", "-DLSTM_FUSED_EMULATE_CUDA", f"-I{ROOT / 'tests' / 'emulation'}",
             f"-I{ROOT / 'csrc' / 'cuda'}"]
    if SANITIZE:
        flags = ["-O1", "-g1"] + flags[1:] + SANITIZER_FLAGS
    cpp_extension.load(
        name="lstm_fused_emulated_sanitized" if SANITIZE else "lstm_fused_emulated",
        sources=[str(ROOT / "csrc" / "lstm.cpp"), str(ROOT / "csrc" / "cuda" / "lstm_cuda.cpp"),
                 str(kernels)],
        extra_cflags=flags,
        extra_ldflags=SANITIZER_FLAGS if SANITIZE else [],
        build_directory=str(build),
        is_python_module=False,
    )
    return torch.ops.lstm_fused_emulated


@pytest.fixture(autouse=True)
def exact_float32():
    """Full float32 products (TF32 follows torch.backends.cudnn.allow_tf32, as nn.LSTM's does);
    the TF32 tests turn it on."""
    saved = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = saved


@pytest.fixture
def multiprocessors(monkeypatch):
    """Sets the emulated device's multiprocessor count, which decides widths and splits."""
    def set_count(count):
        monkeypatch.setenv("LSTM_FUSED_EMULATED_MULTIPROCESSORS", str(count))
    return set_count


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
    outputs, grads, _, _ = run
    return list(outputs) + [g for g in grads]


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


def test_unaligned_rows_take_element_copies(emulated):
    """h0 starting 4 bytes past a 16-byte boundary (a view into a larger buffer): the launcher
    falls back from 16-byte copies, with the same results."""
    inputs = make_inputs(3, 5, 4, 8, 0, dtype=torch.float32, seed=19)
    storage = torch.empty(5 * 8 + 1, dtype=torch.float32)
    shifted = storage[1:].view(5, 8)
    shifted.copy_(inputs["h0"])
    assert shifted.data_ptr() % 16 != 0
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


def test_one_launch_per_step(emulated):
    """Forward: one launch per step (with a projection and lengths, one more that carries the
    padded rows after the projection GEMM); backward: one per step (two with a projection) and
    one for dL/dh_0. Splitting K adds none."""
    T = 7
    plain = make_inputs(T, 4, 3, 10, 0)
    projected = make_inputs(T, 4, 3, 10, 6)
    padded = make_inputs(T, 4, 3, 10, 6, lengths=[7, 3, 0, 5])
    for inputs, forward_launches, backward_launches in [(plain, T, T + 1),
                                                        (projected, T, 2 * T + 1),
                                                        (padded, 2 * T, 2 * T + 1)]:
        args = [inputs[k] for k in ARG_NAMES]
        before = emulated.launch_count()
        y, h_n, c_n, gates, cells = emulated.forward(*args, False, True)
        assert emulated.launch_count() - before == forward_launches
        before = emulated.launch_count()
        emulated.backward(torch.ones_like(y), torch.ones_like(h_n), torch.ones_like(c_n),
                          *args[:5], inputs["w_hr"], inputs["lengths"], y, gates, cells, False,
                          True)
        assert emulated.launch_count() - before == backward_launches


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


def test_bad_path_name_is_a_clear_error(emulated, monkeypatch):
    monkeypatch.setenv("LSTM_FUSED_PATH", "gemm")
    inputs = make_inputs(2, 2, 3, 4, 0)
    with pytest.raises(RuntimeError, match="must be auto, step_small, step_medium or step_large"):
        run_op(inputs, False, ops=emulated)
