"""One LSTM layer, one direction or both, through the torch.ops.lstm_fused ops."""
from typing import Optional, Tuple

import torch
from torch import Tensor

from . import _onnx, ops  # noqa: F401  (ops registers the ops)
from ._padding import zero_padded_steps


def _autocast(*tensors):
    """Under autocast for the input's device, the op runs in the autocast dtype, as nn.LSTM does."""
    device_type = tensors[0].device.type
    # Meta tensors have no autocast to ask about (the question raises).
    if device_type == "meta" or not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) if t is not None and t.is_floating_point() else t for t in tensors)


def _needs_grad(*tensors) -> bool:
    """Whether autograd will need the op's activations (torch.compile guards on what it reads)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def lstm(
    input: Tensor,
    hx: Optional[Tuple[Tensor, Tensor]],
    weight_ih: Tensor,
    weight_hh: Tensor,
    bias_ih: Optional[Tensor] = None,
    bias_hh: Optional[Tensor] = None,
    weight_hr: Optional[Tensor] = None,
    *,
    reverse: bool = False,
    lengths: Optional[Tensor] = None,
) -> Tuple[Tensor, Tuple[Tensor, Tensor]]:
    """Runs one LSTM layer in one direction over a time-major sequence.

    Shapes (T steps, B sequences, I inputs, H hidden units, P = proj_size or H):
      input: [T, B, I]
      hx: (h_0 [B, P], c_0 [B, H]), or None for zeros
      weight_ih: [4H, I]   weight_hh: [4H, P]   bias_ih, bias_hh: [4H]   weight_hr: [P, H]
      reverse: run from step T-1 down to 0 (the backward direction of a bidirectional LSTM)
      lengths: [B] int64 on input's device; sequence b runs steps t < lengths[b] (with reverse,
        from lengths[b]-1 down to 0), its output is zero beyond, and h_n, c_n are its last state
    Returns (output [T, B, P], (h_n [B, P], c_n [B, H])), as torch.nn.LSTM computes them with
    gate order i, f, g, o.
    """
    hidden_size = weight_hh.shape[0] // 4
    output_size = weight_hh.shape[1]
    if hx is None:
        batch = input.shape[1] if input.dim() == 3 else 0
        h0 = input.new_zeros(batch, output_size)
        c0 = input.new_zeros(batch, hidden_size)
    else:
        if not (isinstance(hx, (tuple, list)) and len(hx) == 2):
            raise TypeError("lstm_fused.lstm: hx must be a pair (h_0, c_0) of tensors or None")
        h0, c0 = hx
    input, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr = _autocast(
        input, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr)
    args = (input, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr, lengths, reverse)
    # torch.compiler.is_compiling() holds under torch.export, which the ONNX exporter runs; the
    # order spares eager calls the cost of is_in_onnx_export.
    if (not torch.jit.is_tracing() and torch.compiler.is_compiling()
            and torch.onnx.is_in_onnx_export()):
        # torch.onnx.export(dynamo=True) captures an ONNX LSTM node; a trace (dynamo=False) keeps
        # the op, which has an ONNX symbolic.
        output, h_n, c_n = _onnx.lstm_node(*args)
    else:
        # The op keeps activations for backward exactly when autograd needs them.
        output, h_n, c_n = torch.ops.lstm_fused.layer.default(*args)
    if lengths is not None:
        # The op's y holds the carried state at padded steps; the padded outputs are zeros.
        output = zero_padded_steps(output, lengths)
    return output, (h_n, c_n)


def lstm_bidirectional(
    input: Tensor,
    hx: Optional[Tuple[Tensor, Tensor]],
    weights: Tuple[Tensor, Tensor, Optional[Tensor], Optional[Tensor], Optional[Tensor]],
    weights_reverse: Tuple[Tensor, Tensor, Optional[Tensor], Optional[Tensor], Optional[Tensor]],
    *,
    lengths: Optional[Tensor] = None,
) -> Tuple[Tensor, Tuple[Tensor, Tensor]]:
    """Both directions of one bidirectional LSTM layer in one op: on CUDA one persistent launch
    where the two directions' weights fit on chip together.

    The same as lstm(...) for the forward direction and lstm(..., reverse=True) for the reverse
    one, with the states and outputs of both stacked:
      hx: (h_0 [2, B, P], c_0 [2, B, H]), the forward direction's first, or None for zeros
      weights, weights_reverse: (weight_ih, weight_hh, bias_ih, bias_hh, weight_hr) of each
    Returns (output [T, B, 2P] (the forward direction's P columns first), (h_n [2, B, P],
    c_n [2, B, H])).
    """
    w_ih, w_hh, b_ih, b_hh, w_hr = weights
    w_ih_r, w_hh_r, b_ih_r, b_hh_r, w_hr_r = weights_reverse
    hidden_size = w_hh.shape[0] // 4
    output_size = w_hh.shape[1]
    if hx is None:
        batch = input.shape[1] if input.dim() == 3 else 0
        h0 = input.new_zeros(2, batch, output_size)
        c0 = input.new_zeros(2, batch, hidden_size)
    else:
        if not (isinstance(hx, (tuple, list)) and len(hx) == 2):
            raise TypeError("lstm_fused.lstm_bidirectional: hx must be a pair (h_0, c_0) of "
                            "tensors or None")
        h0, c0 = hx
    tensors = _autocast(input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, w_ih_r, w_hh_r, b_ih_r,
                        b_hh_r, w_hr_r)
    training = _needs_grad(*tensors)
    output, h_n, c_n, _, _, _, _ = torch.ops.lstm_fused.bidirectional_forward(
        *tensors, lengths, training)
    if lengths is not None:
        # The op's y holds the carried state at padded steps; the padded outputs are zeros.
        output = zero_padded_steps(output, lengths)
    return output, (h_n, c_n)
