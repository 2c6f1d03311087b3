"""ONNX export of lstm_fused layers, by either of torch.onnx.export's exporters.

Each layer and direction becomes one standard ONNX LSTM node, so the exported file runs in any
ONNX runtime without lstm_fused:
  - W [1, 4H, I] and R [1, 4H, H] with the gates reordered from nn.LSTM's i, f, g, o to ONNX's
    i, o, f, c; B [1, 8H], b_ih then b_hh (a missing one is zeros; no B without either);
  - initial_h and initial_c from h0 and c0; sequence_lens from lengths (PackedSequence input);
  - direction "forward" or "reverse": a bidirectional layer is two nodes on the same input.
ONNX's LSTM has no projection. With one (h_t = W_hr m_t, m_t = o_t * tanh(c_t)) the node runs on
m_t: h_{t-1} W_hh^T = m_{t-1} (W_hh W_hr)^T, so R = W_hh W_hr, and the output is m_t W_hr^T, one
MatMul over all steps. Only a sequence's first step starts from h0, which no m_0 need stand for:
there h0 enters through the input instead (x extended by h0 at that step, zeros elsewhere, and W by
W_hh), and initial_h is zero.

torch.onnx.export(dynamo=False) traces lstm_fused::layer, which _layer_symbolic translates.
torch.onnx.export(dynamo=True) captures what lstm_node computes, ATen ops around an ONNX LSTM node
(torch.onnx.ops, PyTorch >= 2.8), which functional.lstm calls in place of the op during export.
"""
import torch

_ONNX_GATE_ORDER = (0, 3, 1, 2)  # nn.LSTM's gate chunks i, f, g, o in ONNX's order i, o, f, c
_LEGACY_OPSET = 11  # the oldest opset with every operator used here (Range came in 11)


# ---------------------------------------------------------------- torch.onnx.export(dynamo=True)

def _onnx_gates(weight):
    size = weight.shape[0] // 4
    # Slices, not chunk(): the exporter folds slices of initializers into new initializers.
    return torch.cat([weight[k * size:(k + 1) * size] for k in _ONNX_GATE_ORDER], dim=0)


def _first_steps(seq_len, reverse, lengths, device):
    """[T, 1 or B, 1]: whether step t is the first that a sequence processes."""
    steps = torch.arange(seq_len, device=device)[:, None]
    if not reverse:
        first = steps == 0
    elif lengths is None:
        first = steps == seq_len - 1
    else:
        first = steps == (lengths - 1)[None, :]
    return first[:, :, None]


def lstm_node(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse):
    """lstm_fused::layer's (y, h_n, c_n) from one ONNX LSTM node, for the dynamo exporter."""
    symbolic_multi_out = getattr(getattr(torch.onnx, "ops", None), "symbolic_multi_out", None)
    if symbolic_multi_out is None:
        raise RuntimeError(
            "lstm_fused: torch.onnx.export(..., dynamo=True) of an lstm_fused layer needs "
            f"torch.onnx.ops (PyTorch >= 2.8); this is PyTorch {torch.__version__}. Export with "
            "torch.onnx.export(..., dynamo=False), which gives the same ONNX LSTM nodes")
    seq_len, batch = x.shape[0], x.shape[1]
    hidden_size = w_hh.shape[0] // 4
    w, r, initial_h = _onnx_gates(w_ih), _onnx_gates(w_hh), h0
    if w_hr is not None:
        first_h0 = torch.where(_first_steps(seq_len, reverse, lengths, x.device), h0,
                               h0.new_zeros(()))
        x = torch.cat([x, first_h0], dim=2)
        w = torch.cat([w, r], dim=1)
        r = r @ w_hr
        initial_h = c0.new_zeros(c0.shape)
    bias = None
    if b_ih is not None or b_hh is not None:
        zeros = w_ih.new_zeros(4 * hidden_size)
        bias = torch.cat([_onnx_gates(b) if b is not None else zeros for b in (b_ih, b_hh)])[None]
    y, h_n, c_n = symbolic_multi_out(
        "LSTM",
        [x, w[None], r[None], bias, lengths.to(torch.int32) if lengths is not None else None,
         initial_h[None], c0[None]],
        {"hidden_size": hidden_size, "direction": "reverse" if reverse else "forward"},
        dtypes=[x.dtype] * 3,
        shapes=[[seq_len, 1, batch, hidden_size], [1, batch, hidden_size],
                [1, batch, hidden_size]],
    )
    y, h_n, c_n = y.squeeze(1), h_n.squeeze(0), c_n.squeeze(0)
    if w_hr is not None:
        y, h_n = y @ w_hr.t(), h_n @ w_hr.t()
    if lengths is not None:
        # ONNX runtimes zero the state of an empty sequence; the op keeps the initial one.
        empty = (lengths == 0)[:, None]
        h_n, c_n = torch.where(empty, h0, h_n), torch.where(empty, c0, c_n)
    return y, h_n, c_n


# --------------------------------------------------------------- torch.onnx.export(dynamo=False)

def _constant(g, value):
    return g.op("Constant", value_t=torch.tensor(value))


def _omitted(g):
    """An optional input left out."""
    value = g.op("prim::Constant")
    value.setType(torch._C.OptionalType.ofTensor())
    return value


def _unsqueeze(g, value, axis):
    if g.opset >= 13:  # axes became an input
        return g.op("Unsqueeze", value, _constant(g, [axis]))
    return g.op("Unsqueeze", value, axes_i=[axis])


def _squeeze(g, value, axis):
    if g.opset >= 13:
        return g.op("Squeeze", value, _constant(g, [axis]))
    return g.op("Squeeze", value, axes_i=[axis])


def _onnx_gates_symbolic(g, weight, hidden_size):
    rows = torch.arange(4 * hidden_size).view(4, hidden_size)[list(_ONNX_GATE_ORDER)].flatten()
    return g.op("Gather", weight, g.op("Constant", value_t=rows), axis_i=0)


def _layer_symbolic(g, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse):
    """lstm_fused::layer in ONNX nodes, as lstm_node builds them."""
    from torch.onnx import symbolic_helper

    def given(value):
        return not symbolic_helper._is_none(value)

    reverse = symbolic_helper._maybe_get_const(reverse, "b")
    hidden_size = symbolic_helper._get_tensor_sizes(w_hh)[0] // 4
    dtype = x.type().dtype()
    zero = g.op("Constant", value_t=torch.zeros((), dtype=dtype))
    w = _onnx_gates_symbolic(g, w_ih, hidden_size)
    r = _onnx_gates_symbolic(g, w_hh, hidden_size)
    initial_h = h0
    if given(lengths):
        lengths = g.op("Cast", lengths, to_i=7)  # int64 (packing may have made it int32)
    if given(w_hr):
        seq_len = g.op("Gather", g.op("Shape", x), _constant(g, 0))
        steps = _unsqueeze(g, g.op("Range", _constant(g, 0), seq_len, _constant(g, 1)), 1)
        if not reverse:
            first = _constant(g, 0)
        elif not given(lengths):
            first = g.op("Sub", seq_len, _constant(g, 1))
        else:
            first = _unsqueeze(g, g.op("Sub", lengths, _constant(g, 1)), 0)
        first_steps = _unsqueeze(g, g.op("Equal", steps, first), 2)
        x = g.op("Concat", x, g.op("Where", first_steps, _unsqueeze(g, h0, 0), zero), axis_i=2)
        w = g.op("Concat", w, r, axis_i=1)
        r = g.op("MatMul", r, w_hr)
        initial_h = g.op("ConstantOfShape", g.op("Shape", c0),
                         value_t=torch.zeros(1, dtype=dtype))
    if given(b_ih) or given(b_hh):
        zeros = g.op("Constant", value_t=torch.zeros(4 * hidden_size, dtype=dtype))
        bias = _unsqueeze(g, g.op("Concat", *[
            _onnx_gates_symbolic(g, b, hidden_size) if given(b) else zeros for b in (b_ih, b_hh)
        ], axis_i=0), 0)
    else:
        bias = _omitted(g)
    sequence_lens = g.op("Cast", lengths, to_i=6) if given(lengths) else _omitted(g)  # int32
    y, h_n, c_n = g.op(
        "LSTM", x, _unsqueeze(g, w, 0), _unsqueeze(g, r, 0), bias, sequence_lens,
        _unsqueeze(g, initial_h, 0), _unsqueeze(g, c0, 0),
        hidden_size_i=hidden_size, direction_s="reverse" if reverse else "forward", outputs=3)
    y, h_n, c_n = _squeeze(g, y, 1), _squeeze(g, h_n, 0), _squeeze(g, c_n, 0)
    if given(w_hr):
        w_hr_t = g.op("Transpose", w_hr, perm_i=[1, 0])
        y, h_n = g.op("MatMul", y, w_hr_t), g.op("MatMul", h_n, w_hr_t)
    if given(lengths):
        empty = _unsqueeze(g, g.op("Equal", lengths, _constant(g, 0)), 1)
        h_n, c_n = g.op("Where", empty, h0, h_n), g.op("Where", empty, c0, c_n)
    return y, h_n, c_n


def register_legacy_symbolic() -> None:
    """Lets torch.onnx.export(..., dynamo=False) translate lstm_fused::layer (a PyTorch without
    that exporter has nothing to register)."""
    register = getattr(torch.onnx, "register_custom_op_symbolic", None)
    if register is not None:
        register("lstm_fused::layer", _layer_symbolic, _LEGACY_OPSET)


register_legacy_symbolic()
