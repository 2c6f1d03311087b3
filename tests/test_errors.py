"""Bad input gets a clear error that names the problem."""
import pytest
import torch

import lstm_fused
from lstm_fused import lstm
from lstm_testing import make_inputs


@pytest.fixture
def model():
    return lstm_fused.LSTM(4, 5, num_layers=2)


def state(*shape, dtype=torch.float32):
    return torch.zeros(*shape, dtype=dtype)


@pytest.mark.parametrize("make_input,make_hx,error,match", [
    (lambda: torch.randn(2, 3, 4, 1), None, ValueError, "Expected input to be 2D or 3D, got 4D"),
    (lambda: torch.randn(4), None, ValueError, "Expected input to be 2D or 3D, got 1D"),
    (lambda: torch.randn(2, 3, 6), None, RuntimeError, "input.size\\(-1\\) must be equal to input_size"),
    (lambda: torch.randn(2, 3, 4), lambda: (state(2, 2, 5), state(2, 3, 5)), RuntimeError,
     "Expected hidden\\[0\\] size \\(2, 3, 5\\), got \\[2, 2, 5\\]"),
    (lambda: torch.randn(2, 3, 4), lambda: (state(2, 3, 5), state(1, 3, 5)), RuntimeError,
     "Expected hidden\\[1\\] size \\(2, 3, 5\\), got \\[1, 3, 5\\]"),
    (lambda: torch.randn(2, 3, 4), lambda: (state(2, 3, 5), state(2, 3, 5), state(2, 3, 5)),
     TypeError, "hx must be a tuple \\(h_0, c_0\\)"),
    (lambda: torch.randn(2, 3, 4), lambda: state(2, 3, 5), TypeError, "hx must be a tuple"),
    (lambda: torch.randn(2, 3, 4), lambda: (state(3, 5), state(3, 5)), RuntimeError,
     "For batched 3-D input, hx and cx should also be 3-D"),
    (lambda: torch.randn(2, 4), lambda: (state(2, 1, 5), state(2, 1, 5)), RuntimeError,
     "For unbatched 2-D input, hx and cx should also be 2-D"),
    # nn.LSTM's own messages (their wording differs between PyTorch versions).
    (lambda: torch.randn(2, 3, 4, dtype=torch.float64), None, ValueError, None),
    (lambda: torch.ones(2, 3, 4, dtype=torch.long), None, ValueError, None),
    (lambda: torch.randn(2, 3, 4), lambda: (state(2, 3, 5, dtype=torch.float64), state(2, 3, 5)),
     RuntimeError, "h0 has dtype Double but x has dtype Float"),
    (lambda: torch.randn(2, 3, 4), lambda: (state(2, 3, 5), state(2, 3, 5).to("meta")),
     RuntimeError, "is on meta but x is on cpu"),
    (lambda: torch.randn(0, 3, 4), None, RuntimeError, "sequence length to be larger than 0"),
], ids=["rank4", "rank1", "features", "h0_batch", "c0_layers", "hx_triple", "hx_tensor",
        "hx_rank", "hx_rank_unbatched", "input_dtype", "int_input", "state_dtype", "state_device",
        "zero_length"])
def test_module_rejects(model, make_input, make_hx, error, match):
    """The error names the problem; match None: it is nn.LSTM's, word for word."""
    with pytest.raises(error, match=match) as raised:
        model(make_input(), None if make_hx is None else make_hx())
    if match is None:
        torch.manual_seed(0)
        reference = torch.nn.LSTM(4, 5, num_layers=2)
        with pytest.raises(error) as expected:
            reference(make_input(), None if make_hx is None else make_hx())
        assert str(raised.value) == str(expected.value)


def op_args(**changes):
    """The forward op's arguments for T=3, B=2, I=4, H=5 (lstm_testing.make_inputs), changed."""
    args = make_inputs(3, 2, 4, 5, dtype=torch.float32)
    args.update(changes)
    return args


@pytest.mark.parametrize("changes,match", [
    (dict(x=torch.randn(3, 4)), "x must be 3-D \\[T, B, input_size\\], got 2-D"),
    (dict(x=torch.randn(3, 2, 6)), "w_ih has 4 input columns but x has input_size 6"),
    (dict(w_ih=torch.randn(19, 4)), "w_ih must be 2-D \\[4 \\* hidden_size, input_size\\]"),
    (dict(w_hh=torch.randn(20, 4)), "w_hh must have shape \\[20, 5\\], got \\[20, 4\\]"),
    (dict(h0=state(3, 5)), "h0 must have shape \\[2, 5\\], got \\[3, 5\\]"),
    (dict(c0=state(2, 4)), "c0 must have shape \\[2, 5\\], got \\[2, 4\\]"),
    (dict(b_ih=torch.randn(21)), "b_ih must have shape \\[20\\]"),
    (dict(w_hr=torch.randn(3, 4)), "w_hr must be 2-D \\[proj_size > 0, hidden_size=5\\]"),
    (dict(w_hr=torch.randn(0, 5), w_hh=torch.randn(20, 0), h0=state(2, 0)),
     "w_hr must be 2-D \\[proj_size > 0, hidden_size=5\\], got shape \\[0, 5\\]"),
    (dict(w_hh=torch.randn(20, 5, dtype=torch.float64)), "w_hh has dtype Double but x has dtype Float"),
    (dict(lengths=torch.tensor([1, 2, 3])), "lengths must have shape \\[2\\]"),
    (dict(lengths=torch.tensor([1.0, 2.0])), "lengths must be int64"),
    (dict(lengths=torch.tensor([1, 4])), "lengths must lie in \\[0, T=3\\], got values in \\[1, 4\\]"),
    (dict(lengths=torch.tensor([-1, 2])), "lengths must lie in \\[0, T=3\\]"),
    (dict(x=torch.ones(3, 2, 4, dtype=torch.long), w_ih=torch.ones(20, 4, dtype=torch.long)),
     "x must have a floating-point dtype, got Long"),
], ids=["x_rank", "x_features", "w_ih_rows", "w_hh_shape", "h0_batch", "c0_size", "bias_size",
        "w_hr_shape", "w_hr_empty", "weight_dtype", "lengths_shape", "lengths_dtype", "lengths_high",
        "lengths_negative", "integer_dtype"])
def test_op_rejects(changes, match):
    args = op_args(**changes)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.lstm_fused.forward(*args.values(), False, False)


def test_functional_rejects_hx_that_is_not_a_pair():
    args = op_args()
    with pytest.raises(TypeError, match="hx must be a pair"):
        lstm(args["x"], args["h0"], args["w_ih"], args["w_hh"])
