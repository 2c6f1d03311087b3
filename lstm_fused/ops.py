"""Fake (meta) kernels and the autograd formula of the torch.ops.lstm_fused ops.

The ops themselves are defined in C++ (csrc/lstm.cpp); their shapes are documented there and in
functional.lstm. The backward is an op of its own, so autograd, torch.compile and opcheck all see
ordinary ops. First derivatives are the fused backward op; second derivatives (create_graph=True,
then a backward through the gradient) differentiate the backward op's formula written in plain
PyTorch operations (reference.backward_reference), a step-by-step pass that only they pay for.
"""
import torch

from . import _extension
from .reference import backward_reference

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


def _backward_formula(grad_y, grad_h_n, grad_c_n, x, h0, c0, w_ih, w_hh, w_hr, lengths, y,
                      gates, cells, reverse, has_bias, grad_gates=None, grad_cells=None):
    """The backward op's math in differentiable PyTorch operations (reference.backward_reference),
    computed as the op computes it: half types in float32, the saved activations' dtype."""
    dtype = gates.dtype

    def cast(t):
        return None if t is None else t.to(dtype)

    results = backward_reference(
        cast(grad_y), cast(grad_h_n), cast(grad_c_n), cast(x), cast(h0), cast(c0), cast(w_ih),
        cast(w_hh), cast(w_hr), lengths, cast(y), gates, cells, reverse, has_bias,
        cast(grad_gates), cast(grad_cells))
    return tuple(r.to(x.dtype) for r in results)


def _direction_gradients(backward_args, grad_gates, grad_cells):
    """The backward op on backward_args (its arguments, in order), or, where gradients reach the
    saved activations, which only the backward op's own derivative sends (second derivatives),
    its formula in differentiable operations, which takes them."""
    if grad_gates is None and grad_cells is None:
        return torch.ops.lstm_fused.backward(*backward_args)
    return _backward_formula(*backward_args, grad_gates, grad_cells)


def _forward_setup_context(ctx, inputs, output):
    x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse, training = inputs
    y, _, _, gates, cells = output
    ctx.save_for_backward(x, h0, c0, w_ih, w_hh, w_hr, lengths, y, gates, cells)
    ctx.reverse = reverse
    ctx.training = training
    ctx.bias_given = (b_ih is not None, b_hh is not None)
    # Unused outputs get None, not zero-filled gradients (gates alone is [T, B, 4H]).
    ctx.set_materialize_grads(False)


def _forward_backward(ctx, grad_y, grad_h_n, grad_c_n, grad_gates, grad_cells):
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
    grad_x, grad_h0, grad_c0, grad_w_ih, grad_w_hh, grad_bias, grad_w_hr = _direction_gradients(
        (grad_y, grad_h_n, grad_c_n, x, h0, c0, w_ih, w_hh, w_hr, lengths, y, gates, cells,
         ctx.reverse, has_bias), grad_gates, grad_cells)
    grad_b_ih = grad_bias if ctx.bias_given[0] else None
    grad_b_hh = grad_bias if ctx.bias_given[1] else None
    grad_w_hr = grad_w_hr if w_hr is not None else None
    return (grad_x, grad_h0, grad_c0, grad_w_ih, grad_w_hh, grad_b_ih, grad_b_hh, grad_w_hr, None,
            None, None)


torch.library.register_autograd(
    "lstm_fused::forward", _forward_backward, setup_context=_forward_setup_context)

# The backward op's arguments: which are tensors that gradients can flow to (not lengths).
_BACKWARD_TENSORS = 13
_LENGTHS_ARGUMENT = 9


def _backward_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:_BACKWARD_TENSORS])
    ctx.reverse, ctx.has_bias = inputs[_BACKWARD_TENSORS:]
    ctx.set_materialize_grads(False)


def _backward_backward(ctx, *grad_grads):
    """Second derivatives: the derivative of the backward op's formula, differentiable itself
    when a graph of it is requested."""
    saved = list(ctx.saved_tensors)
    create_graph = torch.is_grad_enabled()
    differentiable = [k for k, t in enumerate(saved)
                      if t is not None and k != _LENGTHS_ARGUMENT and t.is_floating_point()]
    with torch.enable_grad():
        leaves = list(saved)
        for k in differentiable:
            if not (create_graph and saved[k].requires_grad):
                leaves[k] = saved[k].detach().requires_grad_()
        results = _backward_formula(*leaves, ctx.reverse, ctx.has_bias)
        pairs = [(r, g) for r, g in zip(results, grad_grads)
                 if g is not None and r.numel() > 0 and r.requires_grad]
        grads = [None] * len(differentiable)
        if pairs:
            grads = torch.autograd.grad([r for r, _ in pairs], [leaves[k] for k in differentiable],
                                        [g for _, g in pairs], allow_unused=True,
                                        create_graph=create_graph)
    result = [None] * (_BACKWARD_TENSORS + 2)
    for k, grad in zip(differentiable, grads):
        result[k] = grad
    return tuple(result)


torch.library.register_autograd(
    "lstm_fused::backward", _backward_backward, setup_context=_backward_setup_context)


# Both directions of a bidirectional layer in one op (one CUDA launch where the persistent kernel
# holds both): the forward direction's arguments, then the reverse one's (*_reverse); h0 [2, B, P]
# and c0 [2, B, H] stack the two states, y [T, B, 2P] holds both outputs side by side.
@torch.library.register_fake("lstm_fused::bidirectional_forward")
def _bidirectional_forward_fake(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, w_ih_reverse,
                                w_hh_reverse, b_ih_reverse, b_hh_reverse, w_hr_reverse, lengths,
                                training):
    _check_devices(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, w_ih_reverse, w_hh_reverse,
                   b_ih_reverse, b_hh_reverse, w_hr_reverse, lengths)
    seq_len, batch, hidden_size, output_size = _sizes(x, w_hh)
    y = x.new_empty(seq_len, batch, 2 * output_size)
    h_n = x.new_empty(2, batch, output_size)
    c_n = x.new_empty(2, batch, hidden_size)
    saved = []
    for _ in range(2):
        if training:
            options = dict(dtype=_saved_dtype(x.dtype))
            saved += [x.new_empty(seq_len, batch, 4 * hidden_size, **options),
                      x.new_empty(seq_len, batch, hidden_size, **options)]
        else:
            saved += [x.new_empty(0), x.new_empty(0)]
    return (y, h_n, c_n, *saved)


@torch.library.register_fake("lstm_fused::bidirectional_backward")
def _bidirectional_backward_fake(grad_y, grad_h_n, grad_c_n, x, h0, c0, w_ih, w_hh, w_hr,
                                 w_ih_reverse, w_hh_reverse, w_hr_reverse, lengths, y, gates,
                                 cells, gates_reverse, cells_reverse, has_bias):
    _check_devices(x, grad_y, grad_h_n, grad_c_n, h0, c0, w_ih, w_hh, w_hr, w_ih_reverse,
                   w_hh_reverse, w_hr_reverse, lengths, y, gates, cells, gates_reverse,
                   cells_reverse)
    _, _, hidden_size, output_size = _sizes(x, w_hh)

    def weights(w_ih, w_hh, w_hr):
        grad_bias = x.new_empty(4 * hidden_size) if has_bias else x.new_empty(0)
        grad_w_hr = x.new_empty(output_size, hidden_size) if w_hr is not None else x.new_empty(0)
        return (torch.empty_like(w_ih, memory_format=torch.contiguous_format),
                torch.empty_like(w_hh, memory_format=torch.contiguous_format),
                grad_bias, grad_w_hr)

    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            torch.empty_like(h0, memory_format=torch.contiguous_format),
            torch.empty_like(c0, memory_format=torch.contiguous_format),
            *weights(w_ih, w_hh, w_hr), *weights(w_ih_reverse, w_hh_reverse, w_hr_reverse))


def _bidirectional_setup_context(ctx, inputs, output):
    (x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, w_ih_reverse, w_hh_reverse, b_ih_reverse,
     b_hh_reverse, w_hr_reverse, lengths, training) = inputs
    y, _, _, gates, cells, gates_reverse, cells_reverse = output
    ctx.save_for_backward(x, h0, c0, w_ih, w_hh, w_hr, w_ih_reverse, w_hh_reverse, w_hr_reverse,
                          lengths, y, gates, cells, gates_reverse, cells_reverse)
    ctx.training = training
    ctx.bias_given = (b_ih is not None, b_hh is not None, b_ih_reverse is not None,
                      b_hh_reverse is not None)
    # Gates and cells stay differentiable, as in the one-direction op: second derivatives send
    # gradients to them.
    ctx.set_materialize_grads(False)


def _bidirectional_backward(ctx, grad_y, grad_h_n, grad_c_n, *grad_saved):
    if not ctx.training:
        raise RuntimeError(
            "lstm_fused: backward through lstm_fused::bidirectional_forward called with "
            "training=False, which keeps no activations; call it with training=True when "
            "gradients are needed")
    (x, h0, c0, w_ih, w_hh, w_hr, w_ih_reverse, w_hh_reverse, w_hr_reverse, lengths, y, gates,
     cells, gates_reverse, cells_reverse) = ctx.saved_tensors
    grad_y = torch.zeros_like(y) if grad_y is None else grad_y
    grad_h_n = torch.zeros_like(h0) if grad_h_n is None else grad_h_n
    grad_c_n = torch.zeros_like(c0) if grad_c_n is None else grad_c_n
    has_bias = any(ctx.bias_given)
    if torch.is_grad_enabled() or any(g is not None for g in grad_saved):
        # A graph of the gradient is wanted (create_graph), or this is part of one: each
        # direction as the one-direction op's formula computes it, differentiable likewise.
        size = w_hh.shape[1]
        directions = [
            _direction_gradients(
                (grad_y[..., d * size:(d + 1) * size], grad_h_n[d], grad_c_n[d], x, h0[d], c0[d],
                 weights[0], weights[1], weights[2], lengths, y[..., d * size:(d + 1) * size],
                 saved[0], saved[1], d == 1, has_bias), grad_saved[2 * d], grad_saved[2 * d + 1])
            for d, weights, saved in ((0, (w_ih, w_hh, w_hr), (gates, cells)),
                                      (1, (w_ih_reverse, w_hh_reverse, w_hr_reverse),
                                       (gates_reverse, cells_reverse)))]
        (grad_x, grad_h0, grad_c0, grad_w_ih, grad_w_hh, grad_bias, grad_w_hr), reverse = directions
        grad_x = grad_x + reverse[0]
        grad_h0 = torch.stack([grad_h0, reverse[1]])
        grad_c0 = torch.stack([grad_c0, reverse[2]])
        grad_w_ih_reverse, grad_w_hh_reverse, grad_bias_reverse, grad_w_hr_reverse = reverse[3:]
    else:
        (grad_x, grad_h0, grad_c0, grad_w_ih, grad_w_hh, grad_bias, grad_w_hr, grad_w_ih_reverse,
         grad_w_hh_reverse, grad_bias_reverse, grad_w_hr_reverse) = (
            torch.ops.lstm_fused.bidirectional_backward(
                grad_y, grad_h_n, grad_c_n, x, h0, c0, w_ih, w_hh, w_hr, w_ih_reverse,
                w_hh_reverse, w_hr_reverse, lengths, y, gates, cells, gates_reverse,
                cells_reverse, has_bias))
    given = ctx.bias_given
    return (grad_x, grad_h0, grad_c0, grad_w_ih, grad_w_hh,
            grad_bias if given[0] else None, grad_bias if given[1] else None,
            grad_w_hr if w_hr is not None else None,
            grad_w_ih_reverse, grad_w_hh_reverse,
            grad_bias_reverse if given[2] else None, grad_bias_reverse if given[3] else None,
            grad_w_hr_reverse if w_hr_reverse is not None else None, None, None)


torch.library.register_autograd(
    "lstm_fused::bidirectional_forward", _bidirectional_backward,
    setup_context=_bidirectional_setup_context)
def _bidirectional_backward_backward(ctx, *grad_grads):
    raise RuntimeError(
        "lstm_fused: lstm_fused::bidirectional_backward has no derivative of its own; the "
        "two-direction forward's autograd formula runs the one-direction backward ops when a "
        "graph of the gradient is requested (create_graph=True), and those have one")


def _bidirectional_backward_setup_context(ctx, inputs, output):
    pass


torch.library.register_autograd(
    "lstm_fused::bidirectional_backward", _bidirectional_backward_backward,
    setup_context=_bidirectional_backward_setup_context)
