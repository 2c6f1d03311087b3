"""What the tests share, on every device: input factories, running the ops, the float64 op
reference, the comparison with nn.LSTM (one tolerance rule) and the test models.

Import it normally (`from lstm_testing import ...`); pytest puts tests/ on sys.path.
"""
import copy
from typing import Callable, Dict, Optional, Tuple

import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import lstm_fused
from lstm_fused._padding import padded_steps


def nn_lstm_runs(dtype: torch.dtype) -> bool:
    """Whether nn.LSTM, the oracle, runs in dtype on this CPU: with older PyTorch, oneDNN has no
    bfloat16 LSTM without AVX-512 ("could not create a primitive descriptor")."""
    try:
        torch.nn.LSTM(2, 3).to(dtype)(torch.zeros(1, 1, 2, dtype=dtype))
    except RuntimeError:
        return False
    return True


# The forward op's tensor arguments, in order.
ARG_NAMES = ("x", "h0", "c0", "w_ih", "w_hh", "b_ih", "b_hh", "w_hr", "lengths")
# The gradients the backward op returns, by the name of the forward op's argument.
OP_GRAD_NAMES = ("x", "h0", "c0", "w_ih", "w_hh", "b_ih", "w_hr")
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)

# The one tolerance rule against nn.LSTM in the same dtype: a result passes if it is within
# (atol, rtol) of nn.LSTM's, or no further from the float64 result than twice nn.LSTM's own error
# plus atol. float32/float64 compare element by element; the half types compare the largest
# errors of each tensor (nn.LSTM's rounding sometimes lands exactly on the float64 value) with
# atol scaled by max(1, max |float64|). Half-type atol, (outputs, gradients): float16 keeps 11
# significant bits (unit roundoff 4.9e-4), bfloat16 8 (3.9e-3); outputs get about two units (the
# rounding of a result and of the h_t it came from), gradients, sums over T * B products of
# half-rounded factors, eight.
TOLERANCES = {
    torch.float64: ((1e-10, 1e-8), (1e-10, 1e-8)),
    torch.float32: ((2e-5, 1e-4), (2e-5, 1e-4)),
    torch.float16: ((1e-3, 0.0), (4e-3, 0.0)),
    torch.bfloat16: ((8e-3, 0.0), (3e-2, 0.0)),
}
HALF_TYPES = (torch.float16, torch.bfloat16)


def dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# ---------------------------------------------------------------------------------------------
# Modules.

def make_pair(seed=0, **config):
    """An nn.LSTM and an lstm_fused.LSTM built from the same seed (they must initialise alike);
    config is the constructor's, device and dtype included."""
    torch.manual_seed(seed)
    reference = torch.nn.LSTM(**config)
    torch.manual_seed(seed)
    fused = lstm_fused.LSTM(**config)
    return reference, fused


def float64_copy(module: torch.nn.Module) -> torch.nn.Module:
    return copy.deepcopy(module).double()


def module_inputs(module, T, B, dtype=torch.float32, seed=0, device="cpu", batched=True):
    """x ([B, T, I] with batch_first, else [T, B, I]; [T, I] unbatched), h_0 and c_0 for module,
    drawn in float32 on the CPU (every dtype and device gets the same values, rounded)."""
    generator = torch.Generator().manual_seed(seed)
    states = module.num_layers * (2 if module.bidirectional else 1)
    shape = (B, T, module.input_size) if module.batch_first else (T, B, module.input_size)
    x = torch.randn(shape, generator=generator)
    h0 = torch.randn(states, B, module.proj_size or module.hidden_size, generator=generator)
    c0 = torch.randn(states, B, module.hidden_size, generator=generator)
    if not batched:
        x, h0, c0 = x.select(0 if module.batch_first else 1, 0), h0[:, 0], c0[:, 0]
    return tuple(t.to(device=device, dtype=dtype) for t in (x, h0, c0))


def upstream(t: torch.Tensor) -> torch.Tensor:
    """Weights w of the loss sum(t * w): multiples of 1/4 in [-1, 1], exact in every dtype, made
    on t's device (and stream) without a host synchronisation; float64."""
    steps = torch.arange(t.numel(), device=t.device, dtype=torch.float64)
    return ((steps * 7) % 9 - 4).div(4).reshape(t.shape)


def outputs_and_grads(module, x, hx=None, lengths=None, enforce_sorted=False):
    """module's outputs, and the gradients of a fixed weighted sum of them with respect to x, h_0
    and c_0 (when given) and every parameter, by name. With lengths (CPU int64), x is packed
    first and "output" is the packed data."""
    x = x.detach().requires_grad_()
    hx = None if hx is None else tuple(t.detach().requires_grad_() for t in hx)
    sequence = x
    if lengths is not None:
        sequence = pack_padded_sequence(x, lengths, batch_first=module.batch_first,
                                        enforce_sorted=enforce_sorted)
    output, (h_n, c_n) = module(sequence, hx)
    data = output.data if isinstance(output, PackedSequence) else output
    outputs = {"output": data, "h_n": h_n, "c_n": c_n}
    loss = sum((t.double() * upstream(t)).sum() for t in outputs.values())
    names = ["input"] + ([] if hx is None else ["h_0", "c_0"])
    names += [name for name, _ in module.named_parameters()]
    leaves = [x] + ([] if hx is None else list(hx)) + list(module.parameters())
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    grads = [torch.zeros_like(leaf) if g is None else g for g, leaf in zip(grads, leaves)]
    return outputs, dict(zip(names, grads))


def assert_close_to(actual, expected, reference64, dtype, name, gradient=False):
    """The tolerance rule above: actual (ours) against expected (nn.LSTM in dtype) and
    reference64 (nn.LSTM in float64 on the same values)."""
    (atol, rtol) = TOLERANCES[dtype][1 if gradient else 0]
    reference64 = reference64.double()
    error = (actual.double() - reference64).abs()
    own_error = (expected.double() - reference64).abs()
    if dtype in HALF_TYPES:
        scale = max(1.0, reference64.abs().max().item()) if reference64.numel() else 1.0
        worst = error.max().item() if error.numel() else 0.0
        own_worst = own_error.max().item() if own_error.numel() else 0.0
        assert worst <= 2 * own_worst + atol * scale, (
            f"{name}: max |fused - float64| = {worst:.3g}, max |nn.LSTM - float64| = "
            f"{own_worst:.3g}, max |float64| = {scale:.3g}")
        return
    close_to_torch = torch.allclose(actual, expected, atol=atol, rtol=rtol, equal_nan=True)
    as_good_as_torch = bool((error <= 2 * own_error + atol).all())
    assert close_to_torch or as_good_as_torch, (
        f"{name}: max |fused - nn.LSTM| = {(actual - expected).abs().max().item():.3g}, "
        f"max |fused - float64| = {error.max().item():.3g}, "
        f"max |nn.LSTM - float64| = {own_error.max().item():.3g}")


def check_against_nn_lstm(reference, fused, x, hx=None, lengths=None, enforce_sorted=False):
    """Outputs and every gradient of fused against nn.LSTM in the same dtype and a float64 copy
    of it (fed the same, possibly half-rounded, values), by the tolerance rule."""
    dtype = x.dtype
    expected = outputs_and_grads(reference, x, hx, lengths, enforce_sorted)
    actual = outputs_and_grads(fused, x, hx, lengths, enforce_sorted)
    hx64 = None if hx is None else tuple(t.double() for t in hx)
    exact = outputs_and_grads(float64_copy(reference), x.double(), hx64, lengths, enforce_sorted)
    for index, prefix in enumerate(("", "grad ")):
        assert actual[index].keys() == expected[index].keys()
        for name, expected_value in expected[index].items():
            value = actual[index][name]
            assert value.shape == expected_value.shape, f"{prefix}{name}: {value.shape}"
            assert value.dtype == dtype and value.device == expected_value.device, prefix + name
            assert_close_to(value, expected_value, exact[index][name], dtype, prefix + name,
                            gradient=index == 1)


def assert_bitwise_equal(actual, expected):
    """Two results of outputs_and_grads (outputs, then gradients) are identical."""
    for a, e in zip(actual, expected):
        assert a.keys() == e.keys()
        for name in e:
            assert torch.equal(a[name], e[name]), f"{name} differs"


class Tagger(torch.nn.Module):
    """A small model with an nn.LSTM inside (used under two names), as replace_lstm meets them."""

    def __init__(self, device=None, dtype=None):
        super().__init__()
        options = dict(device=device, dtype=dtype)
        self.embed = torch.nn.Embedding(10, 4, **options)
        self.encoder = torch.nn.LSTM(4, 6, num_layers=2, batch_first=True, bidirectional=True,
                                     **options)
        self.head = torch.nn.Sequential(torch.nn.Linear(12, 5, **options))
        self.again = self.encoder  # one module under two names stays one module

    def forward(self, tokens):
        output, _ = self.encoder(self.embed(tokens))
        return self.head(output)


# ---------------------------------------------------------------------------------------------
# The ops.

def make_inputs(T, B, I, H, P=0, bias=True, dtype=torch.float64, lengths=None, seed=0,
                device="cpu", requires_grad=False):
    """The forward op's tensor arguments by name (ARG_NAMES): uniform values drawn in float64 on
    the CPU and rounded to dtype on device; x in [-1, 1], the rest in [-0.5, 0.5], weights
    narrower beyond 64 inputs (so that products over H = 1000 stay of order 1, as with nn.LSTM's
    initialisation). lengths: a list, or None."""
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=0.5):
        values = (torch.rand(*shape, generator=generator, dtype=torch.float64) * 2 - 1) * scale
        return values.to(device=device, dtype=dtype).requires_grad_(requires_grad)

    def weight(rows, fan_in):
        return rand(rows, fan_in, scale=0.5 * min(1.0, (64 / max(fan_in, 1)) ** 0.5))

    out = P or H
    return dict(
        x=rand(T, B, I, scale=1.0), h0=rand(B, out), c0=rand(B, H), w_ih=weight(4 * H, I),
        w_hh=weight(4 * H, out), b_ih=rand(4 * H) if bias else None,
        b_hh=rand(4 * H) if bias else None, w_hr=weight(P, H) if P else None,
        lengths=None if lengths is None else torch.tensor(lengths, dtype=torch.int64,
                                                          device=device))


def functional_args(inputs):
    """(input, hx, weights) for lstm_fused.lstm / lstm_reference(input, hx, *weights,
    lengths=inputs["lengths"])."""
    return (inputs["x"], (inputs["h0"], inputs["c0"]),
            [inputs[k] for k in ("w_ih", "w_hh", "b_ih", "b_hh", "w_hr")])


def lengths_for(T, B):
    """T, 0, T // 3, 2T // 3, T, 0, ...: full, empty and short rows, unsorted."""
    return [T * ((b + 3) % 4) // 3 for b in range(B)]


def padding(inputs):
    """[T, B, 1] True at the padded steps of inputs (None without lengths)."""
    if inputs["lengths"] is None:
        return None
    return padded_steps(inputs["lengths"], inputs["x"].shape[0])


def poison_memory(device="cpu"):
    """Leaves freed memory full of NaN (0xFF bytes on CUDA: NaN in every floating-point dtype)
    where the next allocations come from, so that an element an op never writes reads as NaN."""
    if torch.device(device).type == "cuda":
        blocks = [torch.full((numel,), 255, dtype=torch.uint8, device=device)
                  for numel in (1 << 9, 1 << 12, 1 << 16, 1 << 20, 1 << 24) for _ in range(8)]
    else:
        blocks = [torch.full((1 << 20,), float("nan"), device=device)]
    del blocks


def run_op(inputs, reverse, ops=None, grad_seed=1, before_each: Optional[Callable] = None):
    """Forward (training) and backward through the ops (torch.ops.lstm_fused by default, or
    another namespace with the same schemas), as lstm_fused.lstm uses them: padded outputs are
    zeros and receive no gradient. before_each() (e.g. poison_memory) runs before each op.
    Returns (y, h_n, c_n), the backward's results (OP_GRAD_NAMES), the upstream gradients
    (grad_y, grad_h_n, grad_c_n), and (y as forward returned it, gates, cells)."""
    ops = torch.ops.lstm_fused if ops is None else ops
    args = [inputs[k] for k in ARG_NAMES]
    if before_each:
        before_each()
    y, h_n, c_n, gates, cells = ops.forward(*args, reverse, True)
    pad = padding(inputs)
    generator = torch.Generator().manual_seed(grad_seed)
    grad_y, grad_h, grad_c = (
        torch.randn(t.shape, generator=generator, dtype=torch.float64).to(t.device, t.dtype)
        for t in (y, h_n, c_n))
    if pad is not None:
        grad_y = grad_y.masked_fill(pad, 0.0)
    if before_each:
        before_each()
    # Backward takes y as forward returned it: with the carried state at padded steps.
    grads = ops.backward(grad_y, grad_h, grad_c, *args[:5], inputs["w_hr"], inputs["lengths"], y,
                         gates, cells, reverse, inputs["b_ih"] is not None)
    masked_y = y if pad is None else y.masked_fill(pad, 0.0)
    return (masked_y, h_n, c_n), grads, (grad_y, grad_h, grad_c), (y, gates, cells)


def op_reference(inputs, reverse, upstream_grads) -> Tuple[tuple, Dict[str, torch.Tensor]]:
    """lstm_reference in float64 on the forward op's arguments (a dict by name): its outputs
    (y, h_n, c_n) and the gradients, by name, of sum(output * upstream_grads)."""
    leaves = {k: (v.detach().double().requires_grad_()
                  if v is not None and v.is_floating_point() else v)
              for k, v in inputs.items()}
    y, (h_n, c_n) = lstm_fused.lstm_reference(
        leaves["x"], (leaves["h0"], leaves["c0"]), leaves["w_ih"], leaves["w_hh"], leaves["b_ih"],
        leaves["b_hh"], leaves["w_hr"], reverse=reverse, lengths=leaves["lengths"])
    names = [n for n in OP_GRAD_NAMES if leaves[n] is not None]
    pairs = [(t, g.double()) for t, g in zip((y, h_n, c_n), upstream_grads) if t.requires_grad]
    grads = torch.autograd.grad([t for t, _ in pairs], [leaves[n] for n in names],
                                [g for _, g in pairs], allow_unused=True)
    grads = [torch.zeros_like(leaves[n]) if g is None else g for n, g in zip(names, grads)]
    return (y.detach(), h_n.detach(), c_n.detach()), dict(zip(names, grads))


def compare_with_reference(outputs, grads, expected_outputs, expected_grads, atol, rtol):
    """run_op's outputs and gradients against op_reference's, in float64."""
    for name, actual, expected in zip(("y", "h_n", "c_n"), outputs, expected_outputs):
        torch.testing.assert_close(actual.double(), expected, atol=atol, rtol=rtol,
                                   msg=lambda m, n=name: f"{n}: {m}")
    for name, actual in zip(OP_GRAD_NAMES, grads):
        if name in expected_grads:
            torch.testing.assert_close(actual.double(), expected_grads[name], atol=atol,
                                       rtol=rtol, msg=lambda m, n=name: f"grad {n}: {m}")


# ---- The two-direction ops (bidirectional_forward / bidirectional_backward) ----------------

def pair_inputs(T, B, I, H, P=0, dtype=torch.float64, lengths=None, seed=0, bias=True):
    """make_inputs for both directions of a layer: the forward and the reverse direction's
    arguments, sharing x and lengths."""
    forward = make_inputs(T, B, I, H, P, dtype=dtype, lengths=lengths, seed=seed, bias=bias)
    reverse = make_inputs(T, B, I, H, P, dtype=dtype, lengths=lengths, seed=seed + 100, bias=bias)
    reverse["x"], reverse["lengths"] = forward["x"], forward["lengths"]
    return forward, reverse


def pair_args(f, r):
    """The two-direction forward op's tensor arguments, in order."""
    return [f["x"], torch.stack([f["h0"], r["h0"]]), torch.stack([f["c0"], r["c0"]]),
            f["w_ih"], f["w_hh"], f["b_ih"], f["b_hh"], f["w_hr"],
            r["w_ih"], r["w_hh"], r["b_ih"], r["b_hh"], r["w_hr"], f["lengths"]]


# The gradients the two-direction backward op returns, by name.
PAIR_GRAD_NAMES = ("x", "h0", "c0", "w_ih", "w_hh", "b_ih", "w_hr", "w_ih_reverse",
                   "w_hh_reverse", "b_ih_reverse", "w_hr_reverse")


def run_pair(namespace, f, r):
    """Forward and backward through the two-direction ops, as lstm_fused.LSTM uses them."""
    x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, w_ih_r, w_hh_r, b_ih_r, b_hh_r, w_hr_r, lengths = (
        pair_args(f, r))
    y, h_n, c_n, gates, cells, gates_r, cells_r = namespace.bidirectional_forward(
        *pair_args(f, r), True)
    generator = torch.Generator().manual_seed(1)
    grad_y, grad_h, grad_c = (torch.randn(t.shape, generator=generator,
                                          dtype=torch.float64).to(t.dtype)
                              for t in (y, h_n, c_n))
    pad = padding(f)
    if pad is not None:
        grad_y = grad_y.masked_fill(pad, 0.0)
    grads = namespace.bidirectional_backward(
        grad_y, grad_h, grad_c, x, h0, c0, w_ih, w_hh, w_hr, w_ih_r, w_hh_r, w_hr_r, lengths, y,
        gates, cells, gates_r, cells_r, b_ih is not None)
    if pad is not None:
        y = y.masked_fill(pad, 0.0)
    return (y, h_n, c_n), grads, (grad_y, grad_h, grad_c)


def pair_reference(f, r, upstream):
    """The float64 op reference of each direction, put together as the two-direction ops
    return them."""
    grad_y, grad_h, grad_c = upstream
    P = grad_y.shape[2] // 2
    (y, h_n, c_n), grads = op_reference(f, False, (grad_y[..., :P], grad_h[0], grad_c[0]))
    (y_r, h_n_r, c_n_r), grads_r = op_reference(r, True,
                                                (grad_y[..., P:], grad_h[1], grad_c[1]))
    expected = {"x": grads["x"] + grads_r["x"], "h0": torch.stack([grads["h0"], grads_r["h0"]]),
                "c0": torch.stack([grads["c0"], grads_r["c0"]])}
    for name in ("w_ih", "w_hh", "b_ih", "w_hr"):
        if name in grads:
            expected[name], expected[name + "_reverse"] = grads[name], grads_r[name]
    return (torch.cat([y, y_r], 2), torch.stack([h_n, h_n_r]), torch.stack([c_n, c_n_r])), expected
