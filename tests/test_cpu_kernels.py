"""The CPU kernels: every instruction set this CPU supports and every path, forced in turn, against
the float64 reference (float32, float64) and against nn.LSTM in the half types; the cache of packed
weights (staleness, threads, memory); forcing by option and by environment variable."""
import gc
import os
import subprocess
import sys
import threading

import pytest
import torch

import lstm_fused
from lstm_testing import (nn_lstm_runs, TOLERANCES, check_against_nn_lstm, compare_with_reference, dtype_id,
                          float64_copy, lengths_for, make_inputs, make_pair, module_inputs,
                          OP_GRAD_NAMES, op_reference, padding, poison_memory, run_op)

ISAS = ["avx512_bf16", "avx512", "avx2", "baseline"]
PATHS = lstm_fused.available_paths("cpu")
SUPPORTED = lstm_fused.available_isas()


def isa_param(isa):
    return pytest.param(isa, id=isa, marks=pytest.mark.skipif(
        isa not in SUPPORTED, reason=f"this CPU (or build) does not support {isa}"))


ISA_PARAMS = [isa_param(isa) for isa in ISAS]
# float32 against the float64 reference: products over at most ~40 terms of order 1.
OP_TOLERANCES = {torch.float64: (1e-12, 1e-10), torch.float32: (2e-5, 1e-4)}

# (T, B, I, H, P): tails of every register tile (AVX-512: 16 units x 6 rows; AVX2: 8 x 3;
# baseline 4 x 3; brgemm 16 units), one unit, one row, odd inner sizes, and a single step.
SIZES = [(5, 7, 19, 17, 0), (4, 1, 3, 1, 0), (3, 13, 8, 33, 5), (1, 5, 9, 20, 0),
         (1, 1, 16, 16, 0), (6, 2, 5, 7, 3)]
SIZE_IDS = [f"T{t}B{b}I{i}H{h}P{p}" for t, b, i, h, p in SIZES]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("isa", ISA_PARAMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
@pytest.mark.parametrize("sizes", SIZES, ids=SIZE_IDS)
@pytest.mark.parametrize("reverse,lengths,bias", [(False, False, True), (True, True, False)],
                         ids=["fwd", "rev-lengths-nobias"])
def test_every_isa_and_path_matches_float64_reference(sizes, dtype, isa, path, reverse, lengths,
                                                      bias):
    T, B, I, H, P = sizes
    inputs = make_inputs(T, B, I, H, P, bias=bias, dtype=dtype,
                         lengths=lengths_for(T, B) if lengths else None)
    with lstm_fused.force_isa(isa), lstm_fused.force_path(path):
        outputs, grads, upstream, _ = run_op(inputs, reverse, before_each=poison_memory)
        with torch.no_grad():  # the inference call (cached weights, a single-step kernel)
            inference = torch.ops.lstm_fused.forward(
                *[inputs[k] for k in ("x", "h0", "c0", "w_ih", "w_hh", "b_ih", "b_hh", "w_hr",
                                      "lengths")], reverse, False)
    expected_outputs, expected_grads = op_reference(inputs, reverse, upstream)
    atol, rtol = OP_TOLERANCES[dtype]
    compare_with_reference(outputs, grads, expected_outputs, expected_grads, atol, rtol)
    for t in grads:
        assert torch.isfinite(t).all()
    # The inference call (other buffers, the cache, a single-step kernel) gives h_n and c_n too.
    torch.testing.assert_close(inference[1].double(), expected_outputs[1], atol=atol, rtol=rtol)
    torch.testing.assert_close(inference[2].double(), expected_outputs[2], atol=atol, rtol=rtol)


def masked_reference(inputs, reverse):
    """The float64 reference's y (zeros at padded steps, where the op carries h), h_n and c_n
    of make_inputs' inputs without a projection."""
    double = {k: v.double() if v is not None and v.is_floating_point() else v
              for k, v in inputs.items()}
    out, (h_ref, c_ref) = lstm_fused.lstm_reference(
        double["x"], (double["h0"], double["c0"]), double["w_ih"], double["w_hh"],
        double["b_ih"], double["b_hh"], None, reverse=reverse, lengths=double["lengths"])
    return out.masked_fill(padding(inputs), 0.0), h_ref, c_ref


@pytest.mark.skipif("brgemm" not in PATHS, reason="this PyTorch has no brgemm")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("T,B,I,H", [(3, 70, 19, 17), (40, 9, 19, 200)],
                         ids=["rows70", "chunks35+5"])
def test_brgemm_forward_updates_from_its_tiles(T, B, I, H, dtype, reverse):
    """The brgemm forward projects the input part of a chunk of steps into tiles, adds each
    step's recurrent product into them and updates from them, in inference and in training
    (which also writes the activated gates): more rows than one product takes (70 > 64),
    several chunks with a short last one (35 + 5 steps at B = 9, H = 200), odd inner sizes (VNNI
    pads I and H), a partial block of units, empty and short rows. Every output element against
    the float64 reference (float32) or against the fused path (bfloat16: other kernels, the same
    bfloat16 products with float32 sums)."""
    inputs = make_inputs(T, B, I, H, dtype=dtype, lengths=lengths_for(T, B))
    args = [inputs[k] for k in ("x", "h0", "c0", "w_ih", "w_hh", "b_ih", "b_hh", "w_hr",
                                "lengths")]
    outputs = []
    with lstm_fused.force_path("brgemm"), torch.no_grad():
        for training in (False, True):
            poison_memory()
            outputs.append(torch.ops.lstm_fused.forward(*args, reverse, training)[:3])
    if dtype == torch.float32:
        expected = masked_reference(inputs, reverse)
        outputs = [(y.masked_fill(padding(inputs), 0.0), h_n, c_n)  # carried at padded steps
                   for y, h_n, c_n in outputs]
        atol, rtol = OP_TOLERANCES[dtype]
    else:
        with lstm_fused.force_path("fused"), torch.no_grad():
            expected = torch.ops.lstm_fused.forward(*args, reverse, False)[:3]
        atol, rtol = 1e-2, 1e-2
    for output in outputs:
        for actual, wanted in zip(output, expected):
            assert torch.isfinite(actual).all()
            torch.testing.assert_close(actual.double(), wanted.double(), atol=atol, rtol=rtol)


@pytest.mark.parametrize("isa", ISA_PARAMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=dtype_id)
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("chunks", [2, 1], ids=["two-chunks", "one-chunk"])
@pytest.mark.parametrize("B", [9, 3])
def test_fused_inference_projects_inputs_chunk_by_chunk(chunks, B, dtype, isa, reverse):
    """Inference on the fused path projects the input part of as many steps as its kept buffer
    holds (2^18 floats: 36 steps at B = 9, 109 at B = 3, with H = 200), each thread its own
    units, then adds each step's recurrent product: with bfloat16 pair products (AVX512-BF16's,
    or AVX2's emulation of them at B <= 4) and with float32 on AVX2 in chunks (two chunks: 36 + 4
    or 109 + 6 steps), with the other operands only where one chunk holds every step (T = 5; two
    chunks' steps are projected by one BLAS product), with empty and short rows and a partial
    block of units.
    Every output element against the float64 reference (float32), and against the training
    call, which projects all steps at once (the half types: where both calls use the pair
    products, the same products and sums, so equal to the last bit; else within float32
    rounding)."""
    I, H = 19, 200
    T = {(9, 2): 40, (3, 2): 115}.get((B, chunks), 5)
    inputs = make_inputs(T, B, I, H, dtype=dtype, lengths=lengths_for(T, B))
    args = [inputs[k] for k in ("x", "h0", "c0", "w_ih", "w_hh", "b_ih", "b_hh", "w_hr",
                                "lengths")]
    with lstm_fused.force_isa(isa), lstm_fused.force_path("fused"), torch.no_grad():
        poison_memory()
        chunked = torch.ops.lstm_fused.forward(*args, reverse, False)[:3]
        poison_memory()
        whole = torch.ops.lstm_fused.forward(*args, reverse, True)[:3]
    if dtype == torch.float32:
        expected = masked_reference(inputs, reverse)
        atol, rtol = OP_TOLERANCES[dtype]
        for actual, wanted in zip((chunked[0].masked_fill(padding(inputs), 0.0), *chunked[1:]),
                                  expected):
            torch.testing.assert_close(actual.double(), wanted, atol=atol, rtol=rtol)
        return
    # Where oneDNN packs bfloat16 (AMX), the training call projects all steps with its brgemm.
    exact = (dtype == torch.bfloat16 and not torch.ops.lstm_fused._cpu_brgemm_packs(dtype)
             and (isa == "avx512_bf16" or (isa == "avx2" and B <= 4)))
    for actual, wanted in zip(chunked, whole):
        assert torch.isfinite(actual).all()
        if exact:
            assert torch.equal(actual, wanted)
        else:  # float32 sums in another order, then rounded to the half type
            torch.testing.assert_close(actual.float(), wanted.float(), atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("isa", ISA_PARAMS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=dtype_id)
@pytest.mark.parametrize("config,T,B", [
    (dict(input_size=19, hidden_size=33), 6, 7),
    (dict(input_size=8, hidden_size=17, num_layers=2, bidirectional=True, bias=False), 5, 4),
    (dict(input_size=5, hidden_size=20, proj_size=7), 4, 3),
    (dict(input_size=16, hidden_size=48), 1, 1),
], ids=["odd", "stacked-bidirectional-nobias", "proj", "single-step"])
def test_half_types_as_accurate_as_nn_lstm(config, T, B, dtype, isa, path):
    """Products of half-type values with float32 sums and a float32 cell state, as nn.LSTM's
    oneDNN kernels: outputs and every gradient no further from the float64 result than twice
    nn.LSTM's own error in that dtype (plus lstm_testing's half-type atol)."""
    if not nn_lstm_runs(dtype):
        pytest.skip(f"nn.LSTM does not run in {dtype} on this CPU with this PyTorch")
    reference, fused = make_pair(**config, dtype=dtype)
    x, h0, c0 = module_inputs(reference, T, B, dtype=dtype)
    with lstm_fused.force_isa(isa), lstm_fused.force_path(path):
        check_against_nn_lstm(reference, fused, x, (h0, c0))
        with torch.no_grad():  # the inference call: cached weights, a single-step kernel
            output, (h_n, c_n) = fused(x, (h0, c0))
            expected, _ = reference(x, (h0, c0))
    assert output.dtype == h_n.dtype == c_n.dtype == dtype
    exact, _ = float64_copy(reference)(x.double(), (h0.double(), c0.double()))
    own_error = (expected.double() - exact).abs().max().item()
    atol = TOLERANCES[dtype][0][0] * max(1.0, exact.abs().max().item())
    assert (output.double() - exact).abs().max().item() <= 2 * own_error + atol


@pytest.mark.parametrize("isa", ISA_PARAMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_deterministic(isa, dtype):
    inputs = make_inputs(7, 9, 12, 40, dtype=dtype, lengths=lengths_for(7, 9))
    results = []
    for _ in range(2):
        with lstm_fused.force_isa(isa):
            outputs, grads, _, _ = run_op(inputs, False)
        results.append([*outputs, *grads])
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_steps_split_across_threads_use_the_same_blocks():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        inputs = make_inputs(6, 3, 16, 136, dtype=torch.float64)
        for isa in SUPPORTED:
            with lstm_fused.force_isa(isa):
                outputs, grads, upstream, _ = run_op(inputs, True)
            expected_outputs, expected_grads = op_reference(inputs, True, upstream)
            compare_with_reference(outputs, grads, expected_outputs, expected_grads, 1e-10, 1e-9)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("isa", ISA_PARAMS)
@pytest.mark.parametrize("path,dtype", [("fused", torch.float64), ("fused", torch.float32),
                                        pytest.param("brgemm", torch.float32, marks=pytest.mark.skipif(
                                            "brgemm" not in PATHS, reason="this PyTorch has no brgemm"))],
                         ids=["fused-fp64", "fused-fp32", "brgemm-fp32"])
@pytest.mark.parametrize("T,B,I,H", [(5, 11, 8, 40), (4, 3, 6, 80), (3, 3, 8, 600)],
                         ids=["rows", "two-rows-and-one", "units"])
def test_backward_split_across_threads_gives_the_serial_results(T, B, I, H, path, dtype, isa):
    """On two threads the backward's pass back in time splits the batch (each thread every step
    of its rows) while W_hh fits in half a core's L2 (H = 40, 80: under 250 KB packed, for any L2
    from 512 KB), else each step's units, then columns (H = 600: over 5 MB): with each
    instruction set's kernels, the float64 reference at the op tolerances, and the very
    bits of the single-threaded pass (the gradients of h0 and c0, which it alone computes; BLAS
    computes the others) from the same saved forward."""
    inputs = make_inputs(T, B, I, H, dtype=dtype, lengths=lengths_for(T, B))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        with lstm_fused.force_isa(isa), lstm_fused.force_path(path):
            outputs, grads, upstream, saved = run_op(inputs, False, before_each=poison_memory)
            torch.set_num_threads(1)
            serial = torch.ops.lstm_fused.backward(
                *upstream, *[inputs[k] for k in ("x", "h0", "c0", "w_ih", "w_hh", "w_hr",
                                                 "lengths")], *saved, False, True)
    finally:
        torch.set_num_threads(threads)
    expected_outputs, expected_grads = op_reference(inputs, False, upstream)
    atol, rtol = OP_TOLERANCES[dtype]
    compare_with_reference(outputs, grads, expected_outputs, expected_grads, atol, rtol)
    for name in ("h0", "c0"):
        index = OP_GRAD_NAMES.index(name)
        assert torch.equal(grads[index], serial[index]), name


# ---- Forcing --------------------------------------------------------------------------------

def test_available_isas_and_force_isa():
    assert SUPPORTED and SUPPORTED[-1] == "baseline"
    assert SUPPORTED == [isa for isa in ISAS if isa in SUPPORTED]  # most capable first
    with pytest.raises(ValueError, match="unknown instruction set 'sse9'"):
        with lstm_fused.force_isa("sse9"):
            pass
    for isa in ISAS:
        if isa not in SUPPORTED:
            with pytest.raises(RuntimeError, match=f"does not support '{isa}'"):
                with lstm_fused.force_isa(isa):
                    pass
    with lstm_fused.force_isa("baseline"), lstm_fused.force_isa("auto"):
        pass


def run_python(code, **environment):
    env = dict(os.environ, **environment)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=300)


CHECK_AGAINST_REFERENCE = """
import torch, lstm_fused
torch.manual_seed(0)
x, h, c = torch.randn(3, 2, 5), torch.randn(2, 7), torch.randn(2, 7)
w = [torch.randn(28, 5), torch.randn(28, 7), torch.randn(28), torch.randn(28)]
out, _ = lstm_fused.lstm(x, (h, c), *w)
ref, _ = lstm_fused.lstm_reference(x, (h, c), *w)
torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
print("ok")
"""


def test_environment_variables_are_read_once_and_checked():
    isa = SUPPORTED[-1]
    result = run_python(CHECK_AGAINST_REFERENCE, LSTM_FUSED_ISA=isa, LSTM_FUSED_PATH="gemm")
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr
    result = run_python(CHECK_AGAINST_REFERENCE, LSTM_FUSED_ISA="sse9")
    assert result.returncode != 0
    assert ("must be auto, avx512_bf16, avx512, avx2 or baseline, got 'sse9'"
            in result.stderr), result.stderr
    result = run_python(CHECK_AGAINST_REFERENCE, LSTM_FUSED_PATH="bogus")
    assert result.returncode != 0
    assert "must be auto, fused, brgemm or gemm on the CPU, got 'bogus'" in result.stderr
    # Read once: a change after the first call has no effect, and force_path overrides.
    result = run_python(READ_ONCE, LSTM_FUSED_PATH="gemm", LSTM_FUSED_ISA=isa)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [f"gemm,{isa}", f"gemm,{isa}", f"fused,{isa}", f"gemm,{isa}"]


READ_ONCE = """
import os, torch, lstm_fused
print(",".join(torch.ops.lstm_fused._forced()))
os.environ["LSTM_FUSED_PATH"] = "bogus"
x, h, c = torch.randn(3, 2, 5), torch.randn(2, 7), torch.randn(2, 7)
w = [torch.randn(28, 5), torch.randn(28, 7), torch.randn(28), torch.randn(28)]
lstm_fused.lstm(x, (h, c), *w)
print(",".join(torch.ops.lstm_fused._forced()))
with lstm_fused.force_path("fused"):
    lstm_fused.lstm(x, (h, c), *w)
    print(",".join(torch.ops.lstm_fused._forced()))
print(",".join(torch.ops.lstm_fused._forced()))
"""


# ---- The cache of packed weights ------------------------------------------------------------

def cache_entries():
    return torch.ops.lstm_fused._cpu_weight_cache(False)[0]


def streaming_model(H=24, dtype=torch.float32):
    reference, fused = make_pair(input_size=H, hidden_size=H, dtype=dtype)
    return reference, fused


def assert_same_inference(reference, fused, x, hx):
    with torch.no_grad():
        expected = reference(x, hx)
        actual = fused(x, hx)
    torch.testing.assert_close(actual[0], expected[0], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(actual[1][1], expected[1][1], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("path", PATHS)
def test_cache_sees_every_change_of_the_weights(path):
    reference, fused = streaming_model()
    fused.load_state_dict(reference.state_dict())
    x, h0, c0 = module_inputs(reference, 1, 1)
    with lstm_fused.force_path(path):
        assert_same_inference(reference, fused, x, (h0, c0))
        # in place, under no_grad
        with torch.no_grad():
            for module in (reference, fused):
                module.weight_hh_l0.mul_(0.5)
                module.weight_ih_l0[3, 2] += 1.0
        assert_same_inference(reference, fused, x, (h0, c0))
        # an optimizer step
        for module in (reference, fused):
            optimizer = torch.optim.SGD(module.parameters(), lr=0.5)
            output, _ = module(x, (h0, c0))
            output.sum().backward()
            optimizer.step()
        assert_same_inference(reference, fused, x, (h0, c0))
        # load_state_dict
        other, _ = streaming_model()
        with torch.no_grad():
            for p in other.parameters():
                p.uniform_(-0.3, 0.3)
        reference.load_state_dict(other.state_dict())
        fused.load_state_dict(other.state_dict())
        assert_same_inference(reference, fused, x, (h0, c0))
        # through .data, which PyTorch's version counter does not see
        for module in (reference, fused):
            for p in module.parameters():
                p.data -= 0.1 * torch.ones_like(p)
        assert_same_inference(reference, fused, x, (h0, c0))
        # .to() another dtype and back
        reference64, fused64 = float64_copy(reference), fused.to(torch.float64)
        assert_same_inference(reference64, fused64, x.double(), (h0.double(), c0.double()))
        fused = fused64.float()
        assert_same_inference(reference, fused, x, (h0, c0))


def test_cache_is_freed_with_the_weights_and_does_not_grow():
    gc.collect()
    before = cache_entries()
    reference, fused = streaming_model(H=40)
    x, h0, c0 = module_inputs(reference, 1, 1)
    hx = (h0, c0)
    with torch.no_grad():
        for _ in range(3):
            _, hx = fused(x, hx)
        during = cache_entries()
        assert during > before
        for _ in range(200):
            _, hx = fused(torch.randn_like(x), hx)
        assert cache_entries() == during  # a hit: no new entries per call
        for _ in range(5):  # changed weights replace their entries
            fused.weight_hh_l0.add_(0.01)
            fused(x, hx)
        assert cache_entries() == during
    del fused, reference
    gc.collect()
    assert cache_entries() == before


def test_training_calls_do_not_cache():
    gc.collect()
    before = cache_entries()
    reference, fused = streaming_model(H=12)
    x, h0, c0 = module_inputs(reference, 3, 2)
    output, _ = fused(x, (h0, c0))
    output.sum().backward()
    assert cache_entries() == before


def test_two_threads_share_the_cache():
    reference, fused = streaming_model(H=64)
    inputs = [module_inputs(reference, 1, 2, seed=s) for s in range(8)]
    with torch.no_grad():
        expected = [reference(x, (h, c))[0] for x, h, c in inputs]
    errors = []

    def work(offset):
        try:
            with torch.no_grad():
                for round_ in range(50):
                    index = (round_ + offset) % len(inputs)
                    x, h, c = inputs[index]
                    output, _ = fused(x, (h, c))
                    torch.testing.assert_close(output, expected[index], atol=2e-5, rtol=1e-4)
        except Exception as error:  # reported below
            errors.append(error)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
