"""lstm_fused.LSTM against torch.nn.LSTM: outputs, states and every gradient."""
import itertools

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

import lstm_fused
from lstm_testing import (Tagger, assert_bitwise_equal, check_against_nn_lstm, make_pair,
                          module_inputs, outputs_and_grads)

# num_layers, bias, batch_first, bidirectional, proj_size
CONFIGS = list(itertools.product([1, 2], [True, False], [False, True], [False, True], [0, 3]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batched", [True, False], ids=["batched", "unbatched"])
@pytest.mark.parametrize("hx_given", [True, False], ids=["hx", "no_hx"])
@pytest.mark.parametrize("num_layers,bias,batch_first,bidirectional,proj_size", CONFIGS)
def test_matches_nn_lstm(num_layers, bias, batch_first, bidirectional, proj_size, hx_given,
                         batched, dtype):
    seq_len, batch, input_size, hidden_size = 5, 3, 7, 11
    reference, fused = make_pair(
        input_size=input_size, hidden_size=hidden_size, num_layers=num_layers, bias=bias,
        batch_first=batch_first, bidirectional=bidirectional, proj_size=proj_size, dtype=dtype)
    for (name_r, p_r), (name_f, p_f) in zip(reference.named_parameters(), fused.named_parameters()):
        assert name_r == name_f and torch.equal(p_r, p_f), "initialisation differs from nn.LSTM"
    x, h0, c0 = module_inputs(fused, seq_len, batch, dtype, seed=7, batched=batched)
    check_against_nn_lstm(reference, fused, x, (h0, c0) if hx_given else None)


@pytest.mark.parametrize("seq_len,batch,input_size,hidden_size,bidirectional", [
    (1, 1, 1, 1, False),
    (1, 3, 5, 31, True),
    (3, 129, 5, 31, False),
    (20, 3, 17, 129, True),
    (2, 2, 3, 1000, False),
])
def test_odd_sizes(seq_len, batch, input_size, hidden_size, bidirectional):
    reference, fused = make_pair(input_size=input_size, hidden_size=hidden_size,
                                 bidirectional=bidirectional)
    x, h0, c0 = module_inputs(fused, seq_len, batch, seed=seq_len + batch)
    check_against_nn_lstm(reference, fused, x, (h0, c0))


@pytest.mark.parametrize("bidirectional", [False, True])
def test_dropout_between_layers_matches_nn_lstm(bidirectional):
    reference, fused = make_pair(input_size=4, hidden_size=6, num_layers=3, dropout=0.5,
                                 bidirectional=bidirectional)
    x = torch.randn(5, 3, 4)
    torch.manual_seed(7)
    expected, _ = reference(x)
    torch.manual_seed(7)
    actual, _ = fused(x)
    # Same RNG draws in the same order as nn.LSTM: the same units are dropped.
    torch.testing.assert_close(actual, expected, atol=2e-5, rtol=1e-4)
    fused.eval()
    evaluated, _ = fused(x)
    assert not torch.allclose(evaluated, actual), "dropout had no effect in training mode"
    torch.testing.assert_close(evaluated, reference.eval()(x)[0], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("enforce_sorted", [True, False])
@pytest.mark.parametrize("hx_given", [True, False])
@pytest.mark.parametrize("bidirectional,proj_size", [(False, 0), (True, 2)])
def test_packed_sequence(enforce_sorted, hx_given, bidirectional, proj_size):
    reference, fused = make_pair(input_size=4, hidden_size=6, num_layers=2,
                                 bidirectional=bidirectional, proj_size=proj_size)
    lengths = torch.tensor([7, 5, 3, 1]) if enforce_sorted else torch.tensor([3, 7, 1, 5])
    padded, h0, c0 = module_inputs(fused, 7, 4, seed=5)
    hx = (h0, c0) if hx_given else None
    check_against_nn_lstm(reference, fused, padded, hx, lengths, enforce_sorted)
    packed = pack_padded_sequence(padded, lengths, enforce_sorted=enforce_sorted)
    with torch.no_grad():
        out_r, out_f = reference(packed, hx)[0], fused(packed, hx)[0]
    assert torch.equal(out_f.batch_sizes, out_r.batch_sizes)
    for a, b in ((out_f.sorted_indices, out_r.sorted_indices),
                 (out_f.unsorted_indices, out_r.unsorted_indices)):
        assert (a is None and b is None) or torch.equal(a, b)


def _count_short_path(monkeypatch):
    """The calls that forward's unidirectional short path took (True) or left to the general
    path (False), in order."""
    taken = []
    short_path = lstm_fused.LSTM._unidirectional_call

    def counted(self, input, hx):
        result = short_path(self, input, hx)
        taken.append(result is not None)
        return result

    monkeypatch.setattr(lstm_fused.LSTM, "_unidirectional_call", counted)
    return taken


def _general_path_only(monkeypatch):
    monkeypatch.setattr(lstm_fused.LSTM, "_unidirectional_call", lambda self, input, hx: None)


@pytest.mark.parametrize("num_layers,batch_first,proj_size",
                         [(1, False, 0), (1, True, 0), (1, False, 3), (2, False, 0), (3, True, 3)])
def test_streaming_steps_like_nn_lstm_and_the_general_path(num_layers, batch_first, proj_size,
                                                           monkeypatch):
    """T = 1 calls with the state carried (text generation, real-time audio, an RL policy) take
    forward's unidirectional short path: the same results as nn.LSTM, gradients through the
    whole stream included, and bit for bit those of the general path."""
    steps, batch = 6, 2
    reference, fused = make_pair(input_size=5, hidden_size=7, num_layers=num_layers,
                                 batch_first=batch_first, proj_size=proj_size)
    xs, h0, c0 = module_inputs(fused, steps, batch, seed=3)

    def stream(module):
        x = xs.detach().requires_grad_()
        state = (h0.detach().requires_grad_(), c0.detach().requires_grad_())
        hx, outputs = state, []
        for t in range(steps):
            output, hx = module(x.narrow(1 if batch_first else 0, t, 1), hx)
            outputs.append(output)
        results = [torch.cat(outputs, 1 if batch_first else 0), hx[0], hx[1]]
        loss = sum((r * (i + 1)).sum() for i, r in enumerate(results))
        grads = torch.autograd.grad(loss, [x, *state, *module.parameters()])
        return [r.detach() for r in results] + list(grads)

    taken = _count_short_path(monkeypatch)
    fast = stream(fused)
    whole = outputs_and_grads(fused, xs)  # hx omitted
    assert taken == [True] * (steps + 1)
    for actual, wanted in zip(fast, stream(reference)):
        torch.testing.assert_close(actual, wanted, atol=1e-5, rtol=1e-5)
    _general_path_only(monkeypatch)
    for actual, general in zip(fast, stream(fused)):
        assert torch.equal(actual, general)
    assert_bitwise_equal(whole, outputs_and_grads(fused, xs))


def test_short_path_dropout_and_fallbacks(monkeypatch):
    """Dropout between layers draws the same masks on the short path as on the general one;
    the calls the short path leaves alone (bidirectional, unbatched, a state of another size)
    are the general path's."""
    _, fused = make_pair(input_size=4, hidden_size=6, num_layers=3, dropout=0.4)
    x, h0, c0 = module_inputs(fused, 5, 3, seed=1)
    taken = _count_short_path(monkeypatch)
    torch.manual_seed(5)
    short = outputs_and_grads(fused, x, (h0, c0))
    assert taken == [True]
    _general_path_only(monkeypatch)
    torch.manual_seed(5)
    assert_bitwise_equal(short, outputs_and_grads(fused, x, (h0, c0)))

    monkeypatch.undo()
    taken = _count_short_path(monkeypatch)
    _, bidirectional = make_pair(input_size=4, hidden_size=6, bidirectional=True)
    bidirectional(x)
    fused(x[:, 0])  # unbatched
    with pytest.raises(RuntimeError, match="Expected hidden"):
        fused(x, (h0[:2], c0[:2]))
    assert taken == [False, False, False]


def test_empty_batch_and_empty_sequence_like_nn_lstm():
    reference, fused = make_pair(input_size=4, hidden_size=5)
    output, (h_n, c_n) = fused(torch.randn(2, 0, 4))
    expected, (h_r, c_r) = reference(torch.randn(2, 0, 4))
    assert output.shape == expected.shape and h_n.shape == h_r.shape and c_n.shape == c_r.shape
    for module in (reference, fused):
        with pytest.raises(RuntimeError, match="sequence length to be larger than 0"):
            module(torch.randn(0, 3, 4))


def test_state_dict_round_trip():
    reference, _ = make_pair(input_size=4, hidden_size=6, num_layers=2, bidirectional=True,
                             proj_size=3)
    fused = lstm_fused.LSTM(4, 6, num_layers=2, bidirectional=True, proj_size=3)
    fused.load_state_dict(reference.state_dict(), strict=True)
    back = torch.nn.LSTM(4, 6, num_layers=2, bidirectional=True, proj_size=3)
    back.load_state_dict(fused.state_dict(), strict=True)
    assert list(fused.state_dict()) == list(reference.state_dict())
    for key, value in reference.state_dict().items():
        assert torch.equal(fused.state_dict()[key], value)
        assert torch.equal(back.state_dict()[key], value)
    x = torch.randn(4, 2, 4)
    torch.testing.assert_close(fused(x)[0], reference(x)[0], atol=2e-5, rtol=1e-4)


def test_module_conversions_keep_working():
    _, fused = make_pair(input_size=3, hidden_size=4)
    fused = fused.double()
    assert all(p.dtype == torch.float64 for p in fused.parameters())
    output, _ = fused(torch.randn(2, 1, 3, dtype=torch.float64))
    assert output.dtype == torch.float64
    assert "LSTM(3, 4)" in repr(fused)


def test_replace_lstm_in_place():
    torch.manual_seed(0)
    model = Tagger().double()
    tokens = torch.randint(0, 10, (3, 8))
    expected = model(tokens)
    parameters = list(model.parameters())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    assert lstm_fused.replace_lstm(model) is model
    assert type(model.encoder) is lstm_fused.LSTM and model.again is model.encoder
    assert all(a is b for a, b in zip(model.parameters(), parameters)), "parameters were copied"
    torch.testing.assert_close(model(tokens), expected)
    assert model.encoder.weight_ih_l0.dtype == torch.float64
    # The optimizer built before the swap still trains the swapped model.
    before = model.encoder.weight_hh_l1.detach().clone()
    model(tokens).sum().backward()
    optimizer.step()
    assert not torch.equal(model.encoder.weight_hh_l1, before)


def test_replace_lstm_top_level_and_subclasses():
    class CustomLSTM(torch.nn.LSTM):
        pass

    converted = lstm_fused.replace_lstm(torch.nn.LSTM(3, 4).eval())
    assert type(converted) is lstm_fused.LSTM and not converted.training
    custom = torch.nn.Sequential(CustomLSTM(3, 4))
    assert type(lstm_fused.replace_lstm(custom)[0]) is CustomLSTM
    with pytest.raises(TypeError, match="expects a torch.nn.LSTM"):
        lstm_fused.LSTM.from_torch(torch.nn.GRU(3, 4))


def test_constructor_validation_like_nn_lstm():
    for kwargs in (dict(dropout=1.5), dict(dropout=-0.1), dict(proj_size=-1), dict(proj_size=4),
                   dict(num_layers=0), dict(hidden_size=0)):
        config = {"input_size": 3, "hidden_size": 4, **kwargs}
        with pytest.raises(ValueError) as expected:
            torch.nn.LSTM(**config)
        with pytest.raises(ValueError) as actual:
            lstm_fused.LSTM(**config)
        assert str(actual.value) == str(expected.value)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf"), 1e30])
def test_non_finite_and_huge_inputs_like_nn_lstm(value):
    reference, fused = make_pair(input_size=4, hidden_size=9)
    x = torch.randn(3, 2, 4)
    x[1, 0, 2] = value
    with torch.no_grad():
        expected, (h_r, c_r) = reference(x)
        actual, (h_f, c_f) = fused(x)
    for a, e in ((actual, expected), (h_f, h_r), (c_f, c_r)):
        torch.testing.assert_close(a, e, atol=2e-5, rtol=1e-4, equal_nan=True)
