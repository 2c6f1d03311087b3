"""The lstm_fused ops against the float64 reference: values, gradients, opcheck, torch.compile."""
import copy
import itertools

import pytest
import torch

import lstm_fused
from lstm_fused import lstm, lstm_reference
from lstm_fused import ops as lstm_ops
from lstm_testing import (ARG_NAMES, functional_args, make_inputs, nn_lstm_runs, poison_memory,
                          run_op)

SEQ_LEN, BATCH, INPUT, HIDDEN, PROJ = 6, 4, 5, 7, 3


def make_args(dtype=torch.float64, proj=False, bias=True, requires_grad=True,
              sizes=(SEQ_LEN, BATCH, INPUT, HIDDEN, PROJ), seed=0):
    """lstm's (input, hx, weights) of lstm_testing.make_inputs, as leaves."""
    seq_len, batch, input_size, hidden_size, proj_size = sizes
    inputs = make_inputs(seq_len, batch, input_size, hidden_size, proj_size if proj else 0, bias,
                         dtype, seed=seed, requires_grad=requires_grad)
    return functional_args(inputs)


LENGTHS = torch.tensor([6, 2, 0, 5])  # a full, a short, an empty and an unsorted sequence
# The CPU kernels work on tiles of 3 rows: batches 4, 5 and 9 leave 1, 2 and no rows over.
BATCHES = {4: LENGTHS, 5: torch.tensor([6, 2, 0, 5, 1]), 9: torch.tensor([6, 2, 0, 5, 6, 1, 3, 4, 6])}
CASES = list(itertools.product([False, True], [False, True], [True, False], [None, LENGTHS]))
CASE_IDS = [f"{'rev' if r else 'fwd'}-{'proj' if p else 'noproj'}-{'bias' if b else 'nobias'}-"
            f"{'lengths' if l is not None else 'full'}" for r, p, b, l in CASES]


@pytest.mark.parametrize("path", ["auto"] + lstm_fused.available_paths("cpu"))
@pytest.mark.parametrize("batch", sorted(BATCHES))
@pytest.mark.parametrize("reverse,proj,bias,lengths", CASES, ids=CASE_IDS)
def test_matches_float64_reference(reverse, proj, bias, lengths, batch, path):
    x, hx, weights = make_args(proj=proj, bias=bias, sizes=(SEQ_LEN, batch, INPUT, HIDDEN, PROJ))
    lengths = None if lengths is None else BATCHES[batch]
    leaves = [x, *hx] + [w for w in weights if w is not None]
    results = []
    for function in (lstm, lstm_reference):
        with lstm_fused.force_path(path):
            output, (h_n, c_n) = function(x, hx, *weights, reverse=reverse, lengths=lengths)
        loss = (output * torch.linspace(-1, 1, output.numel(), dtype=output.dtype).view_as(output)).sum()
        loss = loss + (h_n * 2).sum() - c_n.sum()
        with lstm_fused.force_path(path):
            results.append([output, h_n, c_n, *torch.autograd.grad(loss, leaves)])
    for actual, expected in zip(*results):
        torch.testing.assert_close(actual, expected, atol=1e-12, rtol=1e-10)
    if lengths is not None:
        assert results[0][0][:, 2].abs().max() == 0, "outputs past a sequence's end must be zero"


@pytest.mark.parametrize("path", lstm_fused.available_paths("cpu"))
@pytest.mark.parametrize("reverse,proj,lengths", [(False, False, None), (True, False, LENGTHS[:3]),
                                                  (False, True, LENGTHS[:3])],
                         ids=["fwd", "rev-lengths", "proj-lengths"])
def test_steps_split_across_threads(path, reverse, proj, lengths):
    # Enough work per step (4 H P B multiply-adds) for each step to be split across threads.
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        x, hx, weights = make_args(proj=proj, sizes=(6, 3, 16, 136, 40))
        leaves = [x, *hx] + [w for w in weights if w is not None]
        results = []
        for function in (lstm, lstm_reference):
            with lstm_fused.force_path(path):
                output, (h_n, c_n) = function(x, hx, *weights, reverse=reverse, lengths=lengths)
                loss = (output * output.detach().sin()).sum() + h_n.sum() - (c_n * 2).sum()
                results.append([output, h_n, c_n, *torch.autograd.grad(loss, leaves)])
        for actual, expected in zip(*results):  # float64 sums over longer rows than above
            torch.testing.assert_close(actual, expected, atol=1e-10, rtol=1e-9)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("batch", sorted(BATCHES))
@pytest.mark.parametrize("reverse,proj,bias,lengths", CASES, ids=CASE_IDS)
def test_gradcheck(reverse, proj, bias, lengths, batch):
    x, hx, weights = make_args(proj=proj, bias=bias, sizes=(6, batch, 3, 4, 2))
    lengths = None if lengths is None else BATCHES[batch]
    # Every case in fast mode (a random projection of the Jacobian); the hardest one in full.
    fast_mode = not (reverse and proj and bias and lengths is not None and batch == 4)

    def function(x, h0, c0, *weights):
        output, (h_n, c_n) = lstm(x, (h0, c0), *weights, reverse=reverse, lengths=lengths)
        return output, h_n, c_n

    assert torch.autograd.gradcheck(function, (x, *hx, *weights), atol=1e-8, rtol=1e-6,
                                    fast_mode=fast_mode)


def test_force_path_validates_and_restores():
    before = torch.ops.lstm_fused._forced()
    with pytest.raises(ValueError, match="unknown path 'fastest'"):
        with lstm_fused.force_path("fastest"):
            pass
    assert torch.ops.lstm_fused._forced() == before
    with lstm_fused.force_path("gemm"):
        assert torch.ops.lstm_fused._forced()[0] == "gemm"
        with lstm_fused.force_isa("baseline"), lstm_fused.force_path("auto"):
            assert torch.ops.lstm_fused._forced() == ["", "baseline"]
        assert torch.ops.lstm_fused._forced()[0] == "gemm"
    assert torch.ops.lstm_fused._forced() == before
    x, hx, weights = make_args(requires_grad=False)
    with lstm_fused.force_path("step_small"):  # a CUDA path
        with pytest.raises(RuntimeError, match="must be auto, fused, brgemm or gemm on the CPU"):
            lstm(x, hx, *weights)
    lstm(x, hx, *weights)


def test_backward_of_inference_call_raises():
    x, hx, weights = make_args()
    outputs = torch.ops.lstm_fused.forward(x, *hx, *weights, None, False, False)
    with pytest.raises(RuntimeError, match="training=False"):
        outputs[0].sum().backward()


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("proj,lengths", [(False, None), (True, [6, 2, 0, 5])])
def test_opcheck(training, proj, lengths):
    inputs = make_inputs(SEQ_LEN, BATCH, INPUT, HIDDEN, PROJ if proj else 0, dtype=torch.float32,
                         lengths=lengths, requires_grad=training)
    args = (*[inputs[k] for k in ARG_NAMES], False, training)
    torch.library.opcheck(torch.ops.lstm_fused.forward.default, args)
    if training:
        y, h_n, c_n, gates, cells = torch.ops.lstm_fused.forward(*args)
        grads = (torch.randn_like(y), torch.randn_like(h_n), torch.randn_like(c_n))
        detached = [inputs[k].detach() if inputs[k] is not None else None
                    for k in ("x", "h0", "c0", "w_ih", "w_hh", "w_hr")]
        backward_args = (*grads, *detached, inputs["lengths"], y.detach(), gates, cells, True,
                         True)
        torch.library.opcheck(torch.ops.lstm_fused.backward.default, backward_args)


def test_reduced_precision_on_cpu():
    torch.manual_seed(0)
    reference = torch.nn.LSTM(8, 16, num_layers=2)
    x = torch.randn(10, 3, 8)
    expected64, _ = copy.deepcopy(reference).double()(x.double())
    dtypes = [dtype for dtype in (torch.bfloat16, torch.float16) if nn_lstm_runs(dtype)]
    if not dtypes:
        pytest.skip("nn.LSTM runs in no half type on this CPU with this PyTorch")
    for dtype in dtypes:
        fused = lstm_fused.LSTM.from_torch(copy.deepcopy(reference)).to(dtype)
        own_error = (copy.deepcopy(reference).to(dtype)(x.to(dtype))[0].double() - expected64)
        own_error = own_error.abs().max()
        output, (h_n, c_n) = fused(x.to(dtype))
        assert output.dtype == h_n.dtype == c_n.dtype == dtype
        error = (output.double() - expected64).abs().max()
        # Computed in float32, so at least as accurate as nn.LSTM in the half type.
        assert error <= own_error * 2 + 1e-3, (dtype, error.item(), own_error.item())
        output.float().sum().backward()
        assert fused.weight_hh_l0.grad.dtype == dtype
        assert torch.isfinite(fused.weight_hh_l0.grad).all()


def test_autocast_runs_in_the_autocast_dtype():
    torch.manual_seed(0)
    model = lstm_fused.LSTM(8, 16, num_layers=2)
    x = torch.randn(10, 3, 8)
    expected, _ = model(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output, (h_n, c_n) = model(x)
    assert output.dtype == h_n.dtype == c_n.dtype == torch.bfloat16
    torch.testing.assert_close(output.float(), expected, atol=5e-2, rtol=5e-2)
    output.float().sum().backward()
    assert model.weight_ih_l0.grad.dtype == torch.float32  # gradients flow back to the fp32 master


def test_deterministic():
    results = []
    for _ in range(2):
        x, hx, weights = make_args(dtype=torch.float32, proj=True, seed=3)
        output, (h_n, c_n) = lstm(x, hx, *weights, lengths=LENGTHS)
        grads = torch.autograd.grad(output.sum() + h_n.sum() + c_n.sum(), [x, *hx, weights[0]])
        results.append([output, h_n, c_n, *grads])
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_every_output_element_is_written():
    # Freed memory full of NaN: an element the op forgets to write would show it.
    inputs = make_inputs(SEQ_LEN, BATCH, INPUT, HIDDEN, PROJ, dtype=torch.float32,
                         lengths=LENGTHS.tolist())
    for reverse in (False, True, False):
        outputs, grads, _, saved = run_op(inputs, reverse, before_each=poison_memory)
        for t in (*outputs, *grads, *saved):
            assert torch.isfinite(t).all()


def test_non_contiguous_and_expanded_inputs():
    x, hx, weights = make_args(dtype=torch.float32, requires_grad=False)
    expected = lstm(x, hx, *weights)
    x_strided = x.transpose(0, 1).contiguous().transpose(0, 1)
    h0_expanded = hx[0][:1].expand(BATCH, -1)
    w_ih_strided = weights[0].t().contiguous().t()
    strided = lstm(x_strided, (h0_expanded, hx[1]), w_ih_strided, *weights[1:])
    contiguous = lstm(x, (h0_expanded.contiguous(), hx[1]), *weights)
    torch.testing.assert_close(strided[0], contiguous[0])
    torch.testing.assert_close(lstm(x_strided, hx, w_ih_strided, *weights[1:])[0], expected[0])


def test_empty_sequence_returns_initial_state_copies():
    x, hx, weights = make_args(requires_grad=False)
    output, (h_n, c_n) = lstm(x[:0], hx, *weights)
    assert output.shape == (0, BATCH, HIDDEN)
    assert torch.equal(h_n, hx[0]) and torch.equal(c_n, hx[1])
    assert h_n.data_ptr() != hx[0].data_ptr(), "outputs must not alias inputs"


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(backend):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = lstm_fused.LSTM(5, 7, num_layers=2, bidirectional=True, batch_first=True)
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    x = torch.randn(3, 6, 5, requires_grad=True)
    expected, (h_e, c_e) = model(x)
    grads_e = torch.autograd.grad(expected.sum() + h_e.sum() + c_e.sum(), [x, *model.parameters()])
    actual, (h_a, c_a) = compiled(x)
    grads_a = torch.autograd.grad(actual.sum() + h_a.sum() + c_a.sum(), [x, *model.parameters()])
    for a, e in zip([actual, h_a, c_a, *grads_a], [expected, h_e, c_e, *grads_e]):
        torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x)[0], expected)


def test_torch_compile_dynamic_shapes_one_graph():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    torch.manual_seed(0)
    model = lstm_fused.LSTM(5, 7, num_layers=2, batch_first=True, proj_size=3)
    compiled = torch.compile(model, fullgraph=True, dynamic=True, backend="aot_eager")
    for batch, seq_len in [(2, 4), (3, 6), (5, 9)]:
        x = torch.randn(batch, seq_len, 5, requires_grad=True)
        actual, _ = compiled(x)
        expected, _ = model(x)
        torch.testing.assert_close(actual, expected)
        (grad,) = torch.autograd.grad(actual.sum(), x)
        (grad_expected,) = torch.autograd.grad(expected.sum(), x)
        torch.testing.assert_close(grad, grad_expected)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_outputs_as_the_fake_kernel_declares(training, dtype):
    """Every output of the CPU op has the shape, dtype and layout the fake kernel declares."""
    inputs = make_inputs(3, 2, 4, 5, 3, dtype=dtype, lengths=[3, 1])
    args = [inputs[k] for k in ARG_NAMES]
    real = torch.ops.lstm_fused.forward(*args, False, training)
    fake = lstm_ops._forward_fake(*[a.to("meta") for a in args], False, training)
    for r, f in zip(real, fake):
        assert (r.shape, r.dtype, r.is_contiguous()) == (f.shape, f.dtype, True)


# ---------------------------------------------------------------------------------------------
# Both directions of a layer in one op (lstm_fused::bidirectional_forward/backward): on the CPU
# the same as the one-direction op run for each direction.

def bidirectional_args(proj=False, lengths=None, dtype=torch.float64, requires_grad=True,
                       sizes=(SEQ_LEN, BATCH, INPUT, HIDDEN, PROJ), seed=0):
    """(input, hx [2, ...], weights, weights_reverse) for lstm_bidirectional."""
    seq_len, batch, input_size, hidden_size, proj_size = sizes
    f, r = (make_inputs(seq_len, batch, input_size, hidden_size, proj_size if proj else 0,
                        dtype=dtype, lengths=lengths, seed=seed + k) for k in (0, 1))
    x = f["x"].requires_grad_(requires_grad)
    hx = tuple(torch.stack([f[k], r[k]]).requires_grad_(requires_grad) for k in ("h0", "c0"))
    names = ("w_ih", "w_hh", "b_ih", "b_hh", "w_hr")
    weights = [tuple(d[k].requires_grad_(requires_grad) if d[k] is not None else None
                     for k in names) for d in (f, r)]
    return x, hx, weights[0], weights[1], f["lengths"]


@pytest.mark.parametrize("proj,lengths",
                         [(False, None), (True, [6, 2, 0, 5]), (False, [6, 2, 0, 5])],
                         ids=["plain", "proj-lengths", "lengths"])
def test_bidirectional_matches_one_direction_at_a_time(proj, lengths):
    x, hx, weights, weights_reverse, lengths = bidirectional_args(proj, lengths)
    output, (h_n, c_n) = lstm_fused.functional.lstm_bidirectional(x, hx, weights, weights_reverse,
                                                                  lengths=lengths)
    forward, (h_f, c_f) = lstm(x, (hx[0][0], hx[1][0]), *weights, lengths=lengths)
    backward, (h_b, c_b) = lstm(x, (hx[0][1], hx[1][1]), *weights_reverse, reverse=True,
                                lengths=lengths)
    expected = [torch.cat([forward, backward], 2), torch.stack([h_f, h_b]),
                torch.stack([c_f, c_b])]
    actual = [output, h_n, c_n]
    leaves = [x, *hx] + [w for w in (*weights, *weights_reverse) if w is not None]
    weights_out = [torch.linspace(-1, 1, t.numel(), dtype=t.dtype).view_as(t) for t in actual]
    for values in (actual, expected):
        loss = sum((t * w).sum() for t, w in zip(values, weights_out))
        values.extend(torch.autograd.grad(loss, leaves))
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, atol=1e-12, rtol=1e-10)


def test_bidirectional_gradcheck():
    x, hx, weights, weights_reverse, lengths = bidirectional_args(
        True, [5, 2, 0, 4], sizes=(5, 4, 3, 4, 2))

    def function(x, h0, c0, *flat):
        output, (h_n, c_n) = lstm_fused.functional.lstm_bidirectional(
            x, (h0, c0), flat[:5], flat[5:], lengths=lengths)
        return output, h_n, c_n

    assert torch.autograd.gradcheck(function, (x, *hx, *weights, *weights_reverse), atol=1e-8,
                                    rtol=1e-6)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("proj,lengths", [(False, None), (True, [6, 2, 0, 5])])
def test_bidirectional_opcheck(training, proj, lengths):
    x, hx, weights, weights_reverse, lengths = bidirectional_args(
        proj, lengths, dtype=torch.float32, requires_grad=training)
    args = (x, *hx, *weights, *weights_reverse, lengths, training)
    torch.library.opcheck(torch.ops.lstm_fused.bidirectional_forward.default, args)
    if training:
        y, h_n, c_n, gates, cells, gates_r, cells_r = (
            torch.ops.lstm_fused.bidirectional_forward(*args))
        grads = (torch.randn_like(y), torch.randn_like(h_n), torch.randn_like(c_n))
        detached = [t.detach() if t is not None else None
                    for t in (x, *hx, weights[0], weights[1], weights[4], weights_reverse[0],
                              weights_reverse[1], weights_reverse[4])]
        # The saved activations detached: the two-direction backward op has no derivative of its
        # own (second derivatives go through the one-direction ops; test_double_backward.py).
        saved = [t.detach() for t in (gates, cells, gates_r, cells_r)]
        backward_args = (*grads, *detached, lengths, y.detach(), *saved, True)
        torch.library.opcheck(torch.ops.lstm_fused.bidirectional_backward.default, backward_args)


def test_bidirectional_backward_op_has_no_derivative_of_its_own():
    """Differentiating the two-direction backward op itself is a clear error (the module's second
    derivatives go through the one-direction ops instead)."""
    x, hx, weights, weights_reverse, lengths = bidirectional_args()
    args = (x, *hx, *weights, *weights_reverse, lengths, True)
    y, h_n, c_n, gates, cells, gates_r, cells_r = torch.ops.lstm_fused.bidirectional_forward(*args)
    assert gates.requires_grad
    grads = torch.ops.lstm_fused.bidirectional_backward(
        torch.ones_like(y), torch.ones_like(h_n), torch.ones_like(c_n), x, *hx, weights[0],
        weights[1], weights[4], weights_reverse[0], weights_reverse[1], weights_reverse[4],
        lengths, y, gates, cells, gates_r, cells_r, True)
    with pytest.raises(RuntimeError, match="bidirectional_backward has no derivative of its own"):
        grads[0].sum().backward()


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_bidirectional_outputs_as_the_fake_kernel_declares(training, dtype):
    x, hx, weights, weights_reverse, lengths = bidirectional_args(
        True, [6, 2, 0, 5], dtype=dtype, requires_grad=False)
    args = [x, *hx, *weights, *weights_reverse, lengths]
    real = torch.ops.lstm_fused.bidirectional_forward(*args, training)
    fake = lstm_ops._bidirectional_forward_fake(
        *[a.to("meta") if a is not None else None for a in args], training)
    for r, f in zip(real, fake):
        assert (r.shape, r.dtype, r.is_contiguous()) == (f.shape, f.dtype, True)


def test_bidirectional_bad_arguments_are_clear_errors():
    x, hx, weights, weights_reverse, lengths = bidirectional_args(requires_grad=False)
    op = torch.ops.lstm_fused.bidirectional_forward
    with pytest.raises(RuntimeError, match=r"take h0 \[2, B, P\] and c0 \[2, B, H\]"):
        op(x, hx[0][0], hx[1], *weights, *weights_reverse, lengths, False)
    with pytest.raises(RuntimeError, match="both directions must have a projection"):
        _, _, proj_weights, _, _ = bidirectional_args(proj=True, requires_grad=False)
        op(x, *hx, *weights[:4], proj_weights[4], *weights_reverse, lengths, False)
    narrow = tuple(w[:, :3] if w is not None and w.dim() == 2 else w for w in weights_reverse)
    with pytest.raises(RuntimeError, match="w_ih has 3 input columns"):
        op(x, *hx, *weights, *narrow, lengths, False)


def test_bidirectional_gradient_graph_takes_the_one_direction_ops():
    """With create_graph the two-direction op's backward runs the one-direction backward ops (so
    that a second derivative is what theirs is), with the same first derivatives; without, the
    two-direction backward op."""
    x, hx, weights, weights_reverse, lengths = bidirectional_args(True, [6, 2, 0, 5])
    leaves = [x, *hx] + [w for w in (*weights, *weights_reverse) if w is not None]
    results = []
    for create_graph in (False, True):
        output, (h_n, c_n) = lstm_fused.functional.lstm_bidirectional(
            x, hx, weights, weights_reverse, lengths=lengths)
        loss = (output * output.detach().cos()).sum() + h_n.sum() - c_n.sum()
        results.append(torch.autograd.grad(loss, leaves, create_graph=create_graph))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)
    assert all(g.requires_grad for g in results[1])
