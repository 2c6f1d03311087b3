"""The math of the lstm_fused ops in plain PyTorch: the test oracle (run it in float64), and the
differentiable formulas behind second derivatives."""
from typing import Optional, Tuple

import torch
from torch import Tensor

from ._padding import zero_padded_steps


def _previous_step(t: int, seq_len: int, reverse: bool) -> int:
    """The step whose state step t starts from; -1 for the first step processed."""
    t_prev = t + 1 if reverse else t - 1
    return -1 if t_prev < 0 or t_prev >= seq_len else t_prev


def forward_reference(x: Tensor, h0: Tensor, c0: Tensor, w_ih: Tensor, w_hh: Tensor,
                      b_ih: Optional[Tensor], b_hh: Optional[Tensor], w_hr: Optional[Tensor],
                      lengths: Optional[Tensor], reverse: bool
                      ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """torch.ops.lstm_fused.forward with training=True, one step at a time (csrc/lstm.h):
    (y [T, B, P] with the carried h at padded steps, h_n, c_n, gates [T, B, 4H] activated
    i, f, g, o, cells [T, B, H] with the carried c at padded steps)."""
    h, c = h0, c0
    seq_len = x.shape[0]
    ys, all_gates, all_cells = [x] * seq_len, [x] * seq_len, [x] * seq_len
    steps = range(seq_len - 1, -1, -1) if reverse else range(seq_len)
    for t in steps:
        z = x[t] @ w_ih.t() + h @ w_hh.t()
        if b_ih is not None:
            z = z + b_ih
        if b_hh is not None:
            z = z + b_hh
        i, f, g, o = z.chunk(4, dim=1)
        i, f, g, o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
        c_next = f * c + i * g
        h_next = o * torch.tanh(c_next)
        if w_hr is not None:
            h_next = h_next @ w_hr.t()
        if lengths is not None:  # past its end, a sequence carries its state
            running = (t < lengths)[:, None]
            h_next = torch.where(running, h_next, h)
            c_next = torch.where(running, c_next, c)
        ys[t], all_gates[t], all_cells[t] = h_next, torch.cat([i, f, g, o], dim=1), c_next
        h, c = h_next, c_next
    if seq_len == 0:
        batch, hidden = x.shape[1], c0.shape[-1]
        return (x.new_zeros(0, batch, h0.shape[-1]), h, c, x.new_zeros(0, batch, 4 * hidden),
                x.new_zeros(0, batch, hidden))
    return torch.stack(ys), h, c, torch.stack(all_gates), torch.stack(all_cells)


def backward_reference(grad_y: Tensor, grad_h_n: Tensor, grad_c_n: Tensor, x: Tensor, h0: Tensor,
                       c0: Tensor, w_ih: Tensor, w_hh: Tensor, w_hr: Optional[Tensor],
                       lengths: Optional[Tensor], y: Tensor, gates: Tensor, cells: Tensor,
                       reverse: bool, has_bias: bool, grad_gates: Optional[Tensor] = None,
                       grad_cells: Optional[Tensor] = None
                       ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """torch.ops.lstm_fused.backward, one step at a time, from the activations forward saved:
    (grad_x, grad_h0, grad_c0, grad_w_ih, grad_w_hh, grad_bias, grad_w_hr), the bias and w_hr
    gradients empty where there is none. grad_gates and grad_cells, when given, are gradients with
    respect to forward's gates and cells outputs too (the gates of padded steps are not read and
    get none)."""
    seq_len, batch = x.shape[0], x.shape[1]
    hidden = cells.shape[-1]
    dh, dc = grad_h_n, grad_c_n
    grad_z = [x] * seq_len
    # dL/dh_t in total and o * tanh(c_t), for dW_hr.
    grad_h_total, hidden_out = [x] * seq_len, [x] * seq_len
    h_prev_all = [x] * seq_len
    steps = range(seq_len) if reverse else range(seq_len - 1, -1, -1)  # forward's order, reversed
    for t in steps:
        t_prev = _previous_step(t, seq_len, reverse)
        c_prev = c0 if t_prev < 0 else cells[t_prev]
        h_prev_all[t] = h0 if t_prev < 0 else y[t_prev]
        running = None if lengths is None else (t < lengths)[:, None]
        gates_t = gates[t] if running is None else gates[t].masked_fill(~running, 0.0)
        i, f, g, o = gates_t.chunk(4, dim=1)
        tc = torch.tanh(cells[t])
        dh_t = grad_y[t] + dh
        if grad_cells is not None:
            dc = dc + grad_cells[t]
        if w_hr is not None:
            grad_h_total[t] = dh_t
            hidden_out[t] = o * tc
            d_hidden = dh_t @ w_hr
        else:
            d_hidden = dh_t
        dc_t = dc + d_hidden * o * (1 - tc * tc)
        d_i, d_f, d_g, d_o = dc_t * g, dc_t * c_prev, dc_t * i, d_hidden * tc
        if grad_gates is not None:
            extra_i, extra_f, extra_g, extra_o = grad_gates[t].chunk(4, dim=1)
            d_i, d_f, d_g, d_o = d_i + extra_i, d_f + extra_f, d_g + extra_g, d_o + extra_o
        dz = torch.cat([d_i * i * (1 - i), d_f * f * (1 - f), d_g * (1 - g * g),
                        d_o * o * (1 - o)], dim=1)
        dc_prev = dc_t * f
        if running is not None:
            dz = dz.masked_fill(~running, 0.0)
            dc_prev = torch.where(running, dc_prev, dc)
            if w_hr is not None:
                hidden_out[t] = hidden_out[t].masked_fill(~running, 0.0)
        dh_prev = dz @ w_hh
        if running is not None:
            dh_prev = torch.where(running, dh_prev, dh_t)
        grad_z[t] = dz
        dh, dc = dh_prev, dc_prev
    empty = x.new_zeros(0)
    if seq_len == 0:
        return (torch.zeros_like(x), dh, dc, torch.zeros_like(w_ih), torch.zeros_like(w_hh),
                x.new_zeros(4 * hidden) if has_bias else empty,
                torch.zeros_like(w_hr) if w_hr is not None else empty)
    dz_all = torch.stack(grad_z)
    flat = dz_all.reshape(-1, 4 * hidden)
    grad_x = dz_all @ w_ih
    grad_w_ih = flat.t() @ x.reshape(-1, x.shape[-1])
    grad_w_hh = flat.t() @ torch.stack(h_prev_all).reshape(-1, w_hh.shape[1])
    grad_bias = flat.sum(0) if has_bias else empty
    grad_w_hr = empty
    if w_hr is not None:
        grad_w_hr = (torch.stack(grad_h_total).reshape(-1, w_hr.shape[0]).t()
                     @ torch.stack(hidden_out).reshape(-1, hidden))
    return grad_x, dh, dc, grad_w_ih, grad_w_hh, grad_bias, grad_w_hr


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
    output, h_n, c_n, _, _ = forward_reference(input, hx[0], hx[1], weight_ih, weight_hh, bias_ih,
                                               bias_hh, weight_hr, lengths, reverse)
    if lengths is not None:
        output = zero_padded_steps(output, lengths)
    return output, (h_n, c_n)
