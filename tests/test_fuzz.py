"""Property-based tests (hypothesis, fixed examples): random valid calls of lstm_fused.LSTM match
nn.LSTM's outputs and every gradient; random invalid calls raise an ordinary exception exactly
where nn.LSTM raises; the same for lstm_fused.lstm against the reference, and for the ops."""
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import lstm_fused
from lstm_fused.reference import forward_reference
from lstm_testing import (ARG_NAMES, DTYPES, check_against_nn_lstm, nn_lstm_runs,
                          functional_args, make_inputs, make_pair, module_inputs, op_reference,
                          run_op)

# Examples derived from each test's source (no random seed, no example database): the same
# examples on every run and machine, a bounded number of them.
def fuzz(examples):
    return settings(max_examples=examples, derandomize=True, database=None, deadline=None,
                    suppress_health_check=list(HealthCheck), print_blob=True)


def strided(t: torch.Tensor) -> torch.Tensor:
    """t's values in a non-contiguous view (every other element of a buffer twice as wide)."""
    if t.dim() == 0 or t.shape[-1] == 0:
        return t
    buffer = t.new_zeros(*t.shape[:-1], 2 * t.shape[-1])
    buffer[..., ::2] = t
    return buffer[..., ::2]


def expanded(t: torch.Tensor, dim: int) -> torch.Tensor:
    """t with its first slice along dim repeated by a stride-0 expand (values change)."""
    if t.shape[dim] == 0:
        return t
    return t.narrow(dim, 0, 1).expand(t.shape)


@st.composite
def configurations(draw):
    hidden = draw(st.integers(1, 6))
    return dict(input_size=draw(st.integers(1, 5)), hidden_size=hidden,
                num_layers=draw(st.integers(1, 2)), bias=draw(st.booleans()),
                batch_first=draw(st.booleans()), bidirectional=draw(st.booleans()),
                proj_size=draw(st.integers(0, hidden - 1)))


@st.composite
def module_calls(draw):
    form = draw(st.sampled_from(["batched", "unbatched", "packed"]))
    T = draw(st.integers(1, 5))
    B = 1 if form == "unbatched" else draw(st.integers(0 if form == "batched" else 1, 4))
    lengths = None
    if form == "packed":
        lengths = draw(st.lists(st.integers(1, T), min_size=B, max_size=B))
    return dict(config=draw(configurations()), dtype=draw(st.sampled_from(DTYPES)), T=T, B=B,
                form=form, lengths=lengths, enforce_sorted=draw(st.booleans()),
                layout=draw(st.sampled_from(["contiguous", "strided", "expanded"])),
                hx_given=draw(st.booleans()), seed=draw(st.integers(0, 1000)))


@fuzz(40)
@given(module_calls())
def test_valid_module_calls_match_nn_lstm(call):
    config, dtype, form = call["config"], call["dtype"], call["form"]
    assume(nn_lstm_runs(dtype))  # the oracle itself
    reference, fused = make_pair(call["seed"], dtype=dtype, **config)
    x, h0, c0 = module_inputs(fused, call["T"], call["B"], dtype, seed=call["seed"],
                              batched=form != "unbatched")
    batch_dim = (0 if config["batch_first"] else 1) if x.dim() == 3 else 0
    if call["layout"] == "strided":
        x, h0, c0 = strided(x), strided(h0), strided(c0)
    elif call["layout"] == "expanded":
        x, h0, c0 = expanded(x, batch_dim), expanded(h0, h0.dim() - 2), expanded(c0, 0)
    lengths = None
    if form == "packed":
        lengths = torch.tensor(call["lengths"])
        if call["enforce_sorted"]:
            lengths = lengths.sort(descending=True).values
    check_against_nn_lstm(reference, fused, x, (h0, c0) if call["hx_given"] else None, lengths,
                          call["enforce_sorted"])


# One mistake each, in an otherwise valid call.
MISTAKES = [
    "input_rank_1", "input_rank_4", "input_features", "input_not_a_tensor", "input_int",
    "input_float64", "input_float16", "input_complex", "input_bool", "input_meta",
    "zero_length", "hx_tensor", "hx_one", "hx_three", "hx_none_inside", "hx_string_inside",
    "hx_list", "hx_dict", "h0_shape", "c0_shape", "hx_rank_more", "hx_rank_less", "h0_float64",
    "c0_float16", "h0_meta", "c0_meta", "everything_meta",
]


@st.composite
def invalid_module_calls(draw):
    return dict(config=draw(configurations()), T=draw(st.integers(1, 4)),
                B=draw(st.integers(1, 3)), batched=draw(st.booleans()),
                mistake=draw(st.sampled_from(MISTAKES)),
                which_dim=draw(st.integers(0, 2)), seed=draw(st.integers(0, 1000)))


def make_mistake(call, module, x, h0, c0):
    """The (module, input, hx) of the call with its mistake."""
    mistake, dim = call["mistake"], call["which_dim"]
    hx = (h0, c0)

    def grown(t, d):
        d = min(d, t.dim() - 1)
        shape = list(t.shape)
        shape[d] += 1
        return torch.zeros(shape, dtype=t.dtype, device=t.device)

    if mistake == "input_rank_1":
        x = x.flatten()
    elif mistake == "input_rank_4":
        x = x.unsqueeze(-1)
    elif mistake == "input_features":
        x = grown(x, x.dim() - 1)
    elif mistake == "input_not_a_tensor":
        x = x.tolist()
    elif mistake.startswith("input_") and mistake != "input_meta":
        x = x.to({"input_int": torch.int64, "input_float64": torch.float64,
                  "input_float16": torch.float16, "input_complex": torch.complex64,
                  "input_bool": torch.bool}[mistake])
    elif mistake == "input_meta":
        x = x.to("meta")
    elif mistake == "zero_length":
        x = x.narrow(1 if (module.batch_first and x.dim() == 3) else 0, 0, 0)
    elif mistake == "hx_tensor":
        hx = h0
    elif mistake == "hx_one":
        hx = (h0,)
    elif mistake == "hx_three":
        hx = (h0, c0, c0)
    elif mistake == "hx_none_inside":
        hx = (h0, None)
    elif mistake == "hx_string_inside":
        hx = ("h0", c0)
    elif mistake == "hx_list":
        hx = [h0, c0]  # accepted by both
    elif mistake == "hx_dict":
        hx = {"h": h0, "c": c0}
    elif mistake == "h0_shape":
        hx = (grown(h0, dim), c0)
    elif mistake == "c0_shape":
        hx = (h0, grown(c0, dim))
    elif mistake == "hx_rank_more":
        hx = (h0.unsqueeze(0), c0) if dim % 2 else (h0, c0.unsqueeze(0))
    elif mistake == "hx_rank_less":
        hx = (h0[0], c0) if dim % 2 else (h0, c0[0])
    elif mistake == "h0_float64":
        hx = (h0.double(), c0)
    elif mistake == "c0_float16":
        hx = (h0, c0.half())
    elif mistake == "h0_meta":
        hx = (h0.to("meta"), c0)
    elif mistake == "c0_meta":
        hx = (h0, c0.to("meta"))
    elif mistake == "everything_meta":
        module, x, hx = module.to("meta"), x.to("meta"), (h0.to("meta"), c0.to("meta"))
    return module, x, hx


def outcome(module, x, hx):
    try:
        with torch.no_grad():
            return module(x, hx), None
    except Exception as error:  # anything else (a crash, SystemExit) fails the test
        return None, error


# Mistakes in the structure of hx, which lstm_fused rejects with a TypeError where nn.LSTM fails
# by accident (AttributeError, IndexError, or a RuntimeError from inside the computation).
HX_STRUCTURE = {"hx_tensor", "hx_one", "hx_three", "hx_none_inside", "hx_string_inside",
                "hx_dict"}


# Where nn.LSTM accepts a mistake by accident, lstm_fused rejects it: for unbatched input
# nn.LSTM ignores tensors of hx beyond the first two; its CPU path for projections promotes a
# state of another dtype than the input's (its oneDNN path, like lstm_fused, rejects it).
REJECTED_ALWAYS = {"hx_three": TypeError, "h0_float64": RuntimeError, "c0_float16": RuntimeError}


def assert_same_outcome(mistake, expected, expected_error, actual, actual_error):
    """Ours raises exactly where nn.LSTM raises, an exception of the same type, or a TypeError
    for a malformed hx; otherwise both return the same results (but for REJECTED_ALWAYS)."""
    if mistake in REJECTED_ALWAYS and expected_error is None:
        assert isinstance(actual_error, REJECTED_ALWAYS[mistake]), actual_error
        return
    if expected_error is not None:
        assert actual_error is not None, f"nn.LSTM raised {expected_error!r}, lstm_fused did not"
        if mistake in HX_STRUCTURE:
            assert isinstance(actual_error, (TypeError, type(expected_error))), (
                actual_error, expected_error)
        else:
            assert type(actual_error) is type(expected_error), (actual_error, expected_error)
        return
    assert actual_error is None, f"lstm_fused raised {actual_error!r}, nn.LSTM did not"
    (output, (h_n, c_n)), (output_e, (h_e, c_e)) = actual, expected
    for a, e in ((output, output_e), (h_n, h_e), (c_n, c_e)):
        assert a.shape == e.shape and a.dtype == e.dtype and a.device == e.device
        if a.device.type != "meta":
            torch.testing.assert_close(a, e, atol=2e-5, rtol=1e-4)


@fuzz(120)
@given(invalid_module_calls())
def test_invalid_module_calls_raise_where_nn_lstm_raises(call):
    reference, fused = make_pair(call["seed"], **call["config"])
    x, h0, c0 = module_inputs(fused, call["T"], call["B"], seed=call["seed"],
                              batched=call["batched"])
    expected = outcome(*make_mistake(call, reference, x, h0, c0))
    actual = outcome(*make_mistake(call, fused, x, h0, c0))
    assert_same_outcome(call["mistake"], *expected, *actual)


@st.composite
def functional_calls(draw):
    T, B = draw(st.integers(0, 5)), draw(st.integers(0, 4))
    H = draw(st.integers(1, 6))
    with_lengths = draw(st.booleans())
    return dict(T=T, B=B, I=draw(st.integers(1, 5)), H=H, P=draw(st.integers(0, H - 1)),
                bias=draw(st.booleans()), reverse=draw(st.booleans()),
                lengths=draw(st.lists(st.integers(0, T), min_size=B, max_size=B))
                if with_lengths else None,
                layout=draw(st.sampled_from(["contiguous", "strided", "expanded"])),
                hx_given=draw(st.booleans()), seed=draw(st.integers(0, 1000)))


def functional_inputs(call, dtype=torch.float64):
    inputs = make_inputs(call["T"], call["B"], call["I"], call["H"], call["P"], call["bias"],
                         dtype, call["lengths"], call["seed"])
    for name in ("x", "h0", "c0", "w_ih", "w_hh"):
        if call["layout"] == "strided":
            inputs[name] = strided(inputs[name])
        elif call["layout"] == "expanded" and name in ("x", "h0", "c0"):
            inputs[name] = expanded(inputs[name], 1 if name == "x" else 0)
    return inputs


@fuzz(60)
@given(functional_calls())
def test_valid_functional_calls_match_the_reference(call):
    inputs = functional_inputs(call)
    if not call["hx_given"]:
        inputs["h0"], inputs["c0"] = (torch.zeros_like(inputs["h0"]),
                                      torch.zeros_like(inputs["c0"]))
    results = []
    for function in (lstm_fused.lstm, lstm_fused.lstm_reference):
        leaves = {k: v.detach().requires_grad_() if v is not None and v.is_floating_point()
                  else v for k, v in inputs.items()}
        x, hx, weights = functional_args(leaves)
        # The reference takes the zeros that lstm makes for hx=None.
        given = call["hx_given"] or function is lstm_fused.lstm_reference
        output, (h_n, c_n) = function(x, hx if given else None, *weights,
                                      reverse=call["reverse"], lengths=leaves["lengths"])
        names = [k for k in ARG_NAMES[:-1] if leaves[k] is not None
                 and (call["hx_given"] or k not in ("h0", "c0"))]
        differentiable = [leaves[k] for k in names]
        loss = sum((t * torch.linspace(-1, 1, t.numel(), dtype=t.dtype).view_as(t)).sum()
                   for t in (output, h_n, c_n))
        grads = torch.autograd.grad(loss, differentiable, allow_unused=True)
        results.append([output, h_n, c_n] + [torch.zeros_like(leaf) if g is None else g
                                             for g, leaf in zip(grads, differentiable)])
    for actual, expected in zip(*results):
        assert actual.shape == expected.shape
        torch.testing.assert_close(actual, expected, atol=1e-12, rtol=1e-10)


# One mistake each in a valid call of the functional lstm (and so of the forward op).
OP_MISTAKES = [
    "x_rank", "x_features", "x_int", "w_ih_rows", "w_hh_shape", "h0_shape", "c0_shape",
    "b_ih_shape", "b_hh_shape", "w_hr_shape", "w_hr_hidden", "weight_dtype", "state_dtype",
    "weight_meta", "state_meta", "lengths_shape", "lengths_float", "lengths_int32",
    "lengths_high", "lengths_negative", "lengths_meta", "hx_not_a_pair",
]


@st.composite
def invalid_functional_calls(draw):
    call = draw(functional_calls())
    call["T"], call["B"] = max(call["T"], 1), max(call["B"], 1)
    call["P"] = max(call["P"], 1)
    call["lengths"] = None
    call["mistake"] = draw(st.sampled_from(OP_MISTAKES))
    return call


def make_op_mistake(inputs, mistake):
    T, B = inputs["x"].shape[:2]

    def zeros(*shape, like):
        return torch.zeros(*shape, dtype=like.dtype, device=like.device)

    changes = {
        "x_rank": lambda: dict(x=inputs["x"][0]),
        "x_features": lambda: dict(x=zeros(T, B, inputs["x"].shape[2] + 1, like=inputs["x"])),
        "x_int": lambda: dict(x=inputs["x"].long(), w_ih=inputs["w_ih"].long()),
        "w_ih_rows": lambda: dict(w_ih=inputs["w_ih"][1:]),
        "w_hh_shape": lambda: dict(w_hh=inputs["w_hh"][:, 1:]),
        "h0_shape": lambda: dict(h0=inputs["h0"][1:]),
        "c0_shape": lambda: dict(c0=inputs["c0"][:, 1:]),
        "b_ih_shape": lambda: dict(b_ih=zeros(inputs["w_ih"].shape[0] + 1, like=inputs["x"])),
        "b_hh_shape": lambda: dict(b_hh=zeros(3, like=inputs["x"])),
        "w_hr_shape": lambda: dict(w_hr=inputs["w_hr"][1:]),
        "w_hr_hidden": lambda: dict(w_hr=inputs["w_hr"][:, 1:]),
        "weight_dtype": lambda: dict(w_hh=inputs["w_hh"].double()),
        "state_dtype": lambda: dict(c0=inputs["c0"].half()),
        "weight_meta": lambda: dict(w_ih=inputs["w_ih"].to("meta")),
        "state_meta": lambda: dict(h0=inputs["h0"].to("meta")),
        "lengths_shape": lambda: dict(lengths=torch.full((B + 1,), T)),
        "lengths_float": lambda: dict(lengths=torch.full((B,), float(T))),
        "lengths_int32": lambda: dict(lengths=torch.full((B,), T, dtype=torch.int32)),
        "lengths_high": lambda: dict(lengths=torch.full((B,), T + 1)),
        "lengths_negative": lambda: dict(lengths=torch.full((B,), -1)),
        "lengths_meta": lambda: dict(lengths=torch.full((B,), T, device="meta")),
    }
    return dict(inputs, **changes[mistake]()) if mistake in changes else inputs


@fuzz(100)
@given(invalid_functional_calls())
def test_invalid_functional_and_op_calls_raise(call):
    inputs = make_op_mistake(functional_inputs(call, torch.float32), call["mistake"])
    x, hx, weights = functional_args(inputs)
    if call["mistake"] == "hx_not_a_pair":
        hx = hx[0]
    with pytest.raises((RuntimeError, TypeError, ValueError)):
        lstm_fused.lstm(x, hx, *weights, reverse=call["reverse"], lengths=inputs["lengths"])
    if call["mistake"] != "hx_not_a_pair":
        with pytest.raises((RuntimeError, TypeError, ValueError)):
            torch.ops.lstm_fused.forward(*[inputs[k] for k in ARG_NAMES], call["reverse"], True)


@st.composite
def op_calls(draw):
    call = draw(functional_calls())
    call["dtype"] = draw(st.sampled_from(DTYPES))
    call["training"] = draw(st.booleans())
    return call


@fuzz(4)
@given(op_calls())
def test_opcheck_on_random_calls(call):
    """torch.library.opcheck (schema, fake kernel, autograd registration, AOT dispatch) on both
    ops, on random valid calls of every dtype."""
    inputs = functional_inputs(call, call["dtype"])
    args = [t.requires_grad_(call["training"]) if t is not None and t.is_floating_point() else t
            for t in (inputs[k].detach() if inputs[k] is not None else None for k in ARG_NAMES)]
    torch.library.opcheck(torch.ops.lstm_fused.forward.default,
                          (*args, call["reverse"], call["training"]))
    if call["training"]:
        y, h_n, c_n, gates, cells = torch.ops.lstm_fused.forward(*args, call["reverse"], True)
        generator = torch.Generator().manual_seed(call["seed"])
        grads = [torch.randn(t.shape, generator=generator).to(t.dtype) for t in (y, h_n, c_n)]
        saved = [inputs[k] for k in ("x", "h0", "c0", "w_ih", "w_hh", "w_hr")]
        torch.library.opcheck(torch.ops.lstm_fused.backward.default,
                              (*grads, *saved, inputs["lengths"], y.detach(), gates.detach(),
                               cells.detach(), call["reverse"], call["bias"]))


@fuzz(40)
@given(op_calls())
def test_random_op_calls_match_the_reference(call):
    """The ops themselves (forward then backward, y with the carried state at padded steps) on
    random valid calls, float64, against the float64 reference."""
    inputs = functional_inputs(call)
    outputs, grads, upstream_grads, (y, gates, cells) = run_op(inputs, call["reverse"])
    expected_outputs, expected_grads = op_reference(inputs, call["reverse"], upstream_grads)
    for name, actual, expected in zip(("y", "h_n", "c_n"), outputs, expected_outputs):
        torch.testing.assert_close(actual, expected, atol=1e-12, rtol=1e-10, msg=name)
    for name, actual in zip(("x", "h0", "c0", "w_ih", "w_hh", "b_ih", "w_hr"), grads):
        if name in expected_grads:
            torch.testing.assert_close(actual, expected_grads[name], atol=1e-12, rtol=1e-10,
                                       msg=f"grad {name}")
    # The padded-steps contract: the raw y carries h (lstm_fused/_padding.py masks it).
    raw, _, _, _, expected_cells = forward_reference(
        *[inputs[k] for k in ARG_NAMES], call["reverse"])
    torch.testing.assert_close(y, raw, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(cells, expected_cells, atol=1e-12, rtol=1e-10)
