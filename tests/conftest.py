import copy

import pytest
import torch

import lstm_fused

# (dtype, atol, rtol) for lstm_fused against torch.nn.LSTM in the same dtype.
TOLERANCES = {
    torch.float64: (1e-10, 1e-8),
    torch.float32: (2e-5, 1e-4),
}


def make_pair(seed=0, **config):
    """An nn.LSTM and an lstm_fused.LSTM built from the same seed (they must initialise alike)."""
    torch.manual_seed(seed)
    reference = torch.nn.LSTM(**config)
    torch.manual_seed(seed)
    fused = lstm_fused.LSTM(**config)
    return reference, fused


def float64_copy(module: torch.nn.LSTM) -> torch.nn.LSTM:
    return copy.deepcopy(module).double()


def assert_close_to(actual, expected, reference64, dtype, name):
    """Within the dtype's tolerance of nn.LSTM, or no further from the float64 result than
    nn.LSTM itself (times two) where nn.LSTM's own error is the larger."""
    atol, rtol = TOLERANCES[dtype]
    own_error = (expected.double() - reference64).abs()
    error = (actual.double() - reference64).abs()
    close_to_torch = torch.allclose(actual, expected, atol=atol, rtol=rtol)
    as_good_as_torch = bool((error <= 2 * own_error + atol).all())
    assert close_to_torch or as_good_as_torch, (
        f"{name}: max |fused - nn.LSTM| = {(actual - expected).abs().max().item():.3g}, "
        f"max |fused - float64| = {error.max().item():.3g}, "
        f"max |nn.LSTM - float64| = {own_error.max().item():.3g}")


# The gradients the backward op returns, by the name of the forward op's argument.
OP_GRAD_NAMES = ("x", "h0", "c0", "w_ih", "w_hh", "b_ih", "w_hr")


def op_reference(inputs, reverse, upstream):
    """lstm_reference in float64 on the forward op's arguments (a dict by argument name): its
    outputs (y, h_n, c_n) and the gradients, by name, of sum(output * upstream)."""
    leaves = {k: (v.double().requires_grad_() if v is not None and v.is_floating_point() else v)
              for k, v in inputs.items()}
    y, (h_n, c_n) = lstm_fused.lstm_reference(
        leaves["x"], (leaves["h0"], leaves["c0"]), leaves["w_ih"], leaves["w_hh"], leaves["b_ih"],
        leaves["b_hh"], leaves["w_hr"], reverse=reverse, lengths=leaves["lengths"])
    names = [n for n in OP_GRAD_NAMES if leaves[n] is not None]
    grads = torch.autograd.grad((y, h_n, c_n), [leaves[n] for n in names],
                                [g.double() for g in upstream])
    return (y.detach(), h_n.detach(), c_n.detach()), dict(zip(names, grads))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
