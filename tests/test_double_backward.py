"""Second derivatives: gradgradcheck on the op and the module, create_graph=True then backward
against nn.LSTM, a gradient-penalty training step, half types, and first-order cost unchanged."""
import copy
import itertools

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

import lstm_fused
from lstm_fused import lstm
from lstm_fused import ops as lstm_ops
from lstm_testing import ARG_NAMES, functional_args, make_inputs, make_pair, module_inputs

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
CASES = list(itertools.product([False, True], [0, 2], [True, False], [None, [5, 2, 0, 4]]))
CASE_IDS = [f"{'rev' if r else 'fwd'}-{'proj' if p else 'noproj'}-{'bias' if b else 'nobias'}-"
            f"{'lengths' if l else 'full'}" for r, p, b, l in CASES]


def layer_function(inputs, reverse):
    """lstm on the differentiable inputs (x, h0, c0 and the weights given), as a function."""
    names = [k for k in ARG_NAMES[:-1] if inputs[k] is not None]

    def function(*tensors):
        values = dict(inputs, **dict(zip(names, tensors)))
        x, hx, weights = functional_args(values)
        output, (h_n, c_n) = lstm(x, hx, *weights, reverse=reverse, lengths=values["lengths"])
        return output, h_n, c_n

    return function, [inputs[k] for k in names]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reverse,proj,bias,lengths", CASES, ids=CASE_IDS)
def test_gradgradcheck_op(reverse, proj, bias, lengths, device):
    inputs = make_inputs(5, 4, 3, 4, proj, bias, lengths=lengths, seed=2, device=device,
                         requires_grad=True)
    function, leaves = layer_function(inputs, reverse)
    # Every case in fast mode (a random projection); the hardest one in full.
    fast_mode = not (reverse and proj and not bias and lengths)
    assert torch.autograd.gradgradcheck(function, leaves, atol=1e-8, rtol=1e-6,
                                        fast_mode=fast_mode)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reverse,proj,lengths", [(False, 0, None), (True, 3, [4, 1, 0]),
                                                  (False, 3, [4, 1, 0])],
                         ids=["fwd", "rev-proj-lengths", "fwd-proj-lengths"])
def test_backward_op_derivative_is_its_own(reverse, proj, lengths, device):
    """The backward op's autograd formula is the derivative of the op, with respect to every
    input (the saved activations included, each on its own)."""
    inputs = make_inputs(4, 3, 3, 4, proj, lengths=lengths, seed=4, device=device)
    args = [inputs[k] for k in ARG_NAMES]
    y, h_n, c_n, gates, cells = torch.ops.lstm_fused.forward(*args, reverse, True)
    generator = torch.Generator().manual_seed(5)
    grads = [torch.randn(t.shape, generator=generator, dtype=t.dtype).to(device)
             for t in (y, h_n, c_n)]
    tensors = [*grads, *[inputs[k] for k in ("x", "h0", "c0", "w_ih", "w_hh", "w_hr")], y, gates,
               cells]
    leaves = [t.detach().requires_grad_() if t is not None else None for t in tensors]
    differentiable = [t for t in leaves if t is not None]

    def backward(*values):
        it = iter(values)
        full = [next(it) if t is not None else None for t in leaves]
        return torch.ops.lstm_fused.backward(*full[:9], inputs["lengths"], *full[9:], reverse,
                                             True)

    assert torch.autograd.gradcheck(backward, differentiable, atol=1e-8, rtol=1e-6)


def module_penalty(module, x, hx=None, lengths=None):
    """A gradient penalty: the squared norm of d(sum of outputs)/d(input, hx), as a function of
    module's parameters with its graph (create_graph=True)."""
    sequence = x
    if lengths is not None:
        sequence = pack_padded_sequence(x, lengths, batch_first=module.batch_first,
                                        enforce_sorted=False)
    output, (h_n, c_n) = module(sequence, hx)
    data = output.data if lengths is not None else output
    score = (data * data.detach().cos()).sum() + h_n.sum() + (c_n * 0.5).sum()
    inputs = [x] + ([] if hx is None else list(hx))
    grads = torch.autograd.grad(score, inputs, create_graph=True)
    return sum((g * g).sum() for g in grads)


MODULE_CONFIGS = [
    dict(num_layers=2, bidirectional=True),
    dict(num_layers=1, proj_size=2, batch_first=True),
    dict(num_layers=2, bias=False, bidirectional=True, proj_size=2),
    dict(num_layers=2, dropout=0.0, batch_first=True, bidirectional=True),
]


def config_id(config):
    return "-".join(f"{k}={v}" for k, v in config.items())


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("config", MODULE_CONFIGS, ids=config_id)
def test_create_graph_then_backward_matches_nn_lstm(config, packed):
    """Gradients of a gradient penalty with respect to every parameter and the input, against
    nn.LSTM's (which has second derivatives on the CPU), in float64."""
    reference, fused = make_pair(input_size=3, hidden_size=4, dtype=torch.float64, **config)
    x, h0, c0 = module_inputs(fused, 5, 4, torch.float64, seed=3)
    lengths = torch.tensor([5, 2, 1, 4]) if packed else None
    results = []
    for module in (reference, fused):
        leaves = [t.detach().requires_grad_() for t in (x, h0, c0)]
        penalty = module_penalty(module, leaves[0], tuple(leaves[1:]), lengths)
        results.append([penalty, *torch.autograd.grad(penalty, [*leaves, *module.parameters()])])
    for expected, actual in zip(*results):
        torch.testing.assert_close(actual, expected, atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("config", MODULE_CONFIGS[:3], ids=config_id)
def test_gradgradcheck_module(config, packed, device):
    _, fused = make_pair(input_size=3, hidden_size=3, dtype=torch.float64, device=device,
                         **config)
    x, h0, c0 = module_inputs(fused, 4, 3, torch.float64, seed=6, device=device)
    lengths = torch.tensor([4, 1, 3]) if packed else None
    names = [name for name, _ in fused.named_parameters()]

    def function(x, h0, c0, *weights):
        sequence = x
        if lengths is not None:
            sequence = pack_padded_sequence(x, lengths, batch_first=fused.batch_first,
                                            enforce_sorted=False)
        output, (h_n, c_n) = torch.func.functional_call(fused, dict(zip(names, weights)),
                                                        (sequence, (h0, c0)))
        data = output.data if lengths is not None else output
        return data, h_n, c_n

    leaves = [t.detach().requires_grad_() for t in (x, h0, c0, *fused.parameters())]
    assert torch.autograd.gradgradcheck(function, leaves, atol=1e-8, rtol=1e-6, fast_mode=True)


class Critic(torch.nn.Module):
    """A sequence critic: an LSTM, then a linear score of its last output."""

    def __init__(self, lstm_class):
        super().__init__()
        self.lstm = lstm_class(3, 8, num_layers=2, batch_first=True, bidirectional=True)
        self.score = torch.nn.Linear(16, 1)

    def forward(self, x):
        output, _ = self.lstm(x)
        return self.score(output[:, -1]).squeeze(1)


def gradient_penalty_step(critic, optimizer, real, fake, alpha):
    """One WGAN-GP critic step: Wasserstein loss plus 10 (|| d critic / d x || - 1)^2 on points
    between real and fake sequences."""
    mixed = (alpha * real + (1 - alpha) * fake).requires_grad_()
    (grad_mixed,) = torch.autograd.grad(critic(mixed).sum(), mixed, create_graph=True)
    penalty = ((grad_mixed.flatten(1).norm(dim=1) - 1) ** 2).mean()
    loss = critic(fake).mean() - critic(real).mean() + 10 * penalty
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.detach()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gradient_penalty_training_matches_nn_lstm(dtype):
    torch.manual_seed(0)
    reference = Critic(torch.nn.LSTM).to(dtype)
    fused = copy.deepcopy(reference)
    fused.lstm = lstm_fused.LSTM.from_torch(fused.lstm)
    generator = torch.Generator().manual_seed(1)
    batches = [[torch.randn(6, 7, 3, generator=generator, dtype=dtype) for _ in range(2)]
               + [torch.rand(6, 1, 1, generator=generator, dtype=dtype)]
               for _ in range(3 if dtype == torch.float64 else 1)]  # nn.LSTM's float32 is slow
    losses = []
    for critic in (reference, fused):
        optimizer = torch.optim.Adam(critic.parameters(), lr=1e-2)
        losses.append([gradient_penalty_step(critic, optimizer, *batch) for batch in batches])
    atol, rtol = (1e-10, 1e-8) if dtype == torch.float64 else (1e-4, 1e-4)
    for actual, expected in zip(losses[1], losses[0]):
        torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)
    for (name, actual), expected in zip(fused.named_parameters(), reference.parameters()):
        torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol, msg=name)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_types_second_derivatives(dtype, device):
    """Computed as the forward computes them, in float32 from the half-type values: close to the
    float32 result on the same rounded values."""
    _, fused = make_pair(input_size=3, hidden_size=6, num_layers=2, proj_size=4, device=device)
    x, h0, c0 = module_inputs(fused, 5, 3, dtype, seed=8, device=device)
    results = []
    for module, as_dtype in ((copy.deepcopy(fused).to(dtype), dtype),
                             (copy.deepcopy(fused).to(dtype).float(), torch.float32)):
        leaves = [t.to(as_dtype).requires_grad_() for t in (x, h0, c0)]
        penalty = module_penalty(module, leaves[0], tuple(leaves[1:]))
        grads = torch.autograd.grad(penalty, [*leaves, *module.parameters()])
        assert all(g.dtype == as_dtype for g in grads)
        results.append([penalty, *grads])
    tolerance = 2e-2 if dtype == torch.float16 else 1e-1
    for actual, expected in zip(*results):
        scale = max(1.0, expected.abs().max().item())
        assert (actual.float() - expected).abs().max().item() <= tolerance * scale


def test_first_derivatives_never_take_the_slow_formula(monkeypatch):
    """Training (and create_graph=True's first derivatives) run the fused backward op; the
    step-by-step formula runs only for the backward through a gradient."""
    calls = []
    formula = lstm_ops._backward_formula
    monkeypatch.setattr(lstm_ops, "_backward_formula",
                        lambda *args: calls.append(1) or formula(*args))
    inputs = make_inputs(5, 3, 3, 4, 2, lengths=[5, 1, 3], requires_grad=True)
    function, leaves = layer_function(inputs, False)
    output, h_n, c_n = function(*leaves)
    torch.autograd.grad(output.sum() + h_n.sum(), leaves, retain_graph=True)
    grads = torch.autograd.grad(output.sum() + h_n.sum(), leaves, create_graph=True)
    assert not calls
    sum((g * g).sum() for g in grads).backward()
    assert calls
