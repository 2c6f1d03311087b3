"""The math of lstm_fused.lstm in plain PyTorch: the test oracle (run it in float64)."""
from typing import Optional, Tuple

import torch
from torch import Tensor

from ._padding import zero_padded_steps


def lstm_reference(
    input: Tensor,
    hx: Tuple[Tensor, Tensor],
    weight_ih: Tensor,
    weight_hh: Tensor,
    bias_ih: Optional[Tensor] = None,
    bias_hh: Optional[Tensor] = None,
    weight_hr: Optional[Tensor] = None,
    *,
    reverse: bool = False,
    lengths: Optional[Tensor] = None,
) -> Tuple[Tensor, Tuple[Tensor, Tensor]]:
    """Same arguments, shapes and results as lstm_fused.lstm, one step at a time.

    input: [T, B, I]; hx: (h_0 [B, P], c_0 [B, H]); returns (output [T, B, P], (h_n, c_n)).
    """
    h, c = hx
    seq_len = input.shape[0]
    outputs = [None] * seq_len
    steps = range(seq_len - 1, -1, -1) if reverse else range(seq_len)
    for t in steps:
        gates = input[t] @ weight_ih.t() + h @ weight_hh.t()
        if bias_ih is not None:
            gates = gates + bias_ih
        if bias_hh is not None:
            gates = gates + bias_hh
        i, f, g, o = gates.chunk(4, dim=1)
        i, f, g, o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
        c_next = f * c + i * g
        h_next = o * torch.tanh(c_next)
        if weight_hr is not None:
            h_next = h_next @ weight_hr.t()
        if lengths is not None:  # past its end, a sequence carries its state
            running = (t < lengths)[:, None]
            h_next = torch.where(running, h_next, h)
            c_next = torch.where(running, c_next, c)
        outputs[t] = h_next
        h, c = h_next, c_next
    if seq_len == 0:
        output = input.new_zeros(0, input.shape[1], h.shape[-1])
    else:
        output = torch.stack(outputs)
    if lengths is not None:
        output = zero_padded_steps(output, lengths)
    return output, (h, c)
