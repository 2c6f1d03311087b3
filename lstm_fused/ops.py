"""Fake (meta) kernels and the autograd formula of the torch.ops.lstm_fused ops.

The ops themselves are defined in C++ (csrc/lstm.cpp); their shapes are documented there and in
functional.lstm. The backward is an op of its own, so autograd, torch.compile and opcheck all see
ordinary ops.
"""
import torch

from . import _extension

_extension.load()


# Half types are computed with float32 state, and saved for backward in float32.
_REDUCED_PRECISION = (torch.float16, torch.bfloat16)


def _saved_dtype(dtype):
    return torch.float32 if dtype in _REDUCED_PRECISION else dtype


def _check_devices(x, *tensors):
    # The C++ checks do not run under the Meta key, which serves mixed meta/real inputs too.
    for t in tensors:
        if t is not None and t.device != x.device:
            raise RuntimeError(
                f"lstm_fused: a tensor is on {t.device} but x is on {x.device}; input, state and "
                "weights must be on one device")


def _sizes(x, w_hh):
    seq_len, batch = x.shape[0], x.shape[1]
    hidden_size = w_hh.shape[0] // 4
    output_size = w_hh.shape[1]
    return seq_len, batch, hidden_size, output_size


@torch.library.register_fake("lstm_fused::forward")
def _forward_fake(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse, training):
    _check_devices(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths)
    seq_len, batch, hidden_size, output_size = _sizes(x, w_hh)
    y = x.new_empty(seq_len, batch, output_size)
    h_n = x.new_empty(batch, output_size)
    c_n = x.new_empty(batch, hidden_size)
    if training:
        saved = dict(dtype=_saved_dtype(x.dtype))
        gates = x.new_empty(seq_len, batch, 4 * hidden_size, **saved)
        cells = x.new_empty(seq_len, batch, hidden_size, **saved)
    else:
        gates = x.new_empty(0)
        cells = x.new_empty(0)
    return y, h_n, c_n, gates, cells


@torch.library.register_fake("lstm_fused::backward")
def _backward_fake(grad_y, grad_h_n, grad_c_n, x, h0, c0, w_ih, w_hh, w_hr, lengths, y, gates,
                   cells, reverse, has_bias):
    _check_devices(x, grad_y, grad_h_n, grad_c_n, h0, c0, w_ih, w_hh, w_hr, lengths, y, gates,
                   cells)
    _, _, hidden_size, output_size = _sizes(x, w_hh)
    grad_bias = x.new_empty(4 * hidden_size) if has_bias else x.new_empty(0)
    grad_w_hr = x.new_empty(output_size, hidden_size) if w_hr is not None else x.new_empty(0)
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            torch.empty_like(h0, memory_format=torch.contiguous_format),
            torch.empty_like(c0, memory_format=torch.contiguous_format),
            torch.empty_like(w_ih, memory_format=torch.contiguous_format),
            torch.empty_like(w_hh, memory_format=torch.contiguous_format),
            grad_bias, grad_w_hr)


def _forward_setup_context(ctx, inputs, output):
    x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse, training = inputs
    y, _, _, gates, cells = output
    ctx.save_for_backward(x, h0, c0, w_ih, w_hh, w_hr, lengths, y, gates, cells)
    ctx.reverse = reverse
    ctx.training = training
    ctx.bias_given = (b_ih is not None, b_hh is not None)
    ctx.mark_non_differentiable(gates, cells)
    # Unused outputs get None, not zero-filled gradients (gates alone is [T, B, 4H]).
    ctx.set_materialize_grads(False)


def _forward_backward(ctx, grad_y, grad_h_n, grad_c_n, _grad_gates, _grad_cells):
    if not ctx.training:
        raise RuntimeError(
            "lstm_fused: backward through lstm_fused::forward called with training=False, which "
            "keeps no activations; call it with training=True when gradients are needed"
        )
    x, h0, c0, w_ih, w_hh, w_hr, lengths, y, gates, cells = ctx.saved_tensors
    grad_y = torch.zeros_like(y) if grad_y is None else grad_y
    grad_h_n = torch.zeros_like(h0) if grad_h_n is None else grad_h_n
    grad_c_n = torch.zeros_like(c0) if grad_c_n is None else grad_c_n
    has_bias = any(ctx.bias_given)
    grad_x, grad_h0, grad_c0, grad_w_ih, grad_w_hh, grad_bias, grad_w_hr = (
        torch.ops.lstm_fused.backward(grad_y, grad_h_n, grad_c_n, x, h0, c0, w_ih, w_hh, w_hr,
                                      lengths, y, gates, cells, ctx.reverse, has_bias))
    grad_b_ih = grad_bias if ctx.bias_given[0] else None
    grad_b_hh = grad_bias if ctx.bias_given[1] else None
    grad_w_hr = grad_w_hr if w_hr is not None else None
    return (grad_x, grad_h0, grad_c0, grad_w_ih, grad_w_hh, grad_b_ih, grad_b_hh, grad_w_hr, None,
            None, None)


torch.library.register_autograd(
    "lstm_fused::forward", _forward_backward, setup_context=_forward_setup_context)


def _backward_setup_context(ctx, inputs, output):
    pass


def _double_backward(ctx, *grads):
    raise RuntimeError(
        "lstm_fused: double backward (gradients of gradients) is not supported; use torch.nn.LSTM "
        "or lstm_fused.lstm_reference where second derivatives are needed")


# Differentiating the backward op raises a clear error instead of silently giving zeros.
torch.library.register_autograd(
    "lstm_fused::backward", _double_backward, setup_context=_backward_setup_context)
