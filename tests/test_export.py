"""Every route that ships nn.LSTM models, with lstm_fused.LSTM inside: ONNX by both exporters (run
in onnxruntime, in a process that cannot import torch or lstm_fused), TorchScript trace and script
(saved, loaded, replayed for inference and training), torch.export and AOTInductor with dynamic
batch and sequence length. Results are checked against nn.LSTM by the float32 tolerance rule, at
the shape of export and at other batch sizes and sequence lengths."""
import copy
import importlib.util
import inspect
import io
import json
import os
import shutil
import subprocess
import sys
import textwrap
import warnings
from typing import Tuple

import pytest
import torch
from torch import Tensor
from torch.export import Dim
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import lstm_fused
from lstm_fused._padding import zero_padded_steps
from lstm_testing import assert_close_to, float64_copy, module_inputs, upstream

pytestmark = [
    pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore:Exporting a model while it is in training mode"),
]

INPUT, HIDDEN, PROJ = 5, 7, 3
# name: (constructor options, batched input, hx given); together they cover every option.
CASES = {
    "default": (dict(), True, False),
    "layers2_bidirectional": (dict(num_layers=2, bidirectional=True), True, True),
    "layers2_bidirectional_proj_batch_first": (
        dict(num_layers=2, bidirectional=True, proj_size=PROJ, batch_first=True), True, True),
    "no_bias_layers2": (dict(bias=False, num_layers=2), True, True),
    "unbatched_bidirectional_proj": (dict(bidirectional=True, proj_size=PROJ), False, True),
}
# PackedSequence input (padded sequences packed inside the model).
PACKED_CONFIG = dict(num_layers=2, bidirectional=True, proj_size=PROJ, batch_first=True)
EXPORT_SHAPE = (4, 3)  # (T, B) of the example inputs
RUN_SHAPES = [EXPORT_SHAPE, (7, 2), (1, 1)]


class WithState(torch.nn.Module):
    """lstm(x, (h_0, c_0)) with flat results, as exporters and runtimes see them."""

    def __init__(self, lstm):
        super().__init__()
        self.lstm = lstm

    def forward(self, x: Tensor, h0: Tensor, c0: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        output, (h_n, c_n) = self.lstm(x, (h0, c0))
        return output, h_n, c_n


class WithoutState(torch.nn.Module):
    def __init__(self, lstm):
        super().__init__()
        self.lstm = lstm

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        output, (h_n, c_n) = self.lstm(x)
        return output, h_n, c_n


class Packed(torch.nn.Module):
    """Padded sequences of different lengths through the LSTM as a PackedSequence."""

    def __init__(self, lstm):
        super().__init__()
        self.lstm = lstm

    def forward(self, x: Tensor, lengths: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        packed = pack_padded_sequence(x, lengths, batch_first=self.lstm.batch_first,
                                      enforce_sorted=False)
        output, (h_n, c_n) = self.lstm(packed)
        output, _ = pad_packed_sequence(output, batch_first=self.lstm.batch_first)
        return output, h_n, c_n


def packed_lengths(T, B):
    """Unsorted lengths in [1, T], the longest T (so the padded output has T steps)."""
    return torch.tensor([T] + [1 + (T - 1) * ((b * 5) % 4) // 3 for b in range(1, B)])


def make_models(case, seed=0):
    """(reference, fused): the case's wrapper around an nn.LSTM and around lstm_fused.LSTM with
    the same weights, in eval mode."""
    config = PACKED_CONFIG if case == "packed" else CASES[case][0]
    torch.manual_seed(seed)
    reference = torch.nn.LSTM(INPUT, HIDDEN, **config)
    wrapper = Packed if case == "packed" else (WithState if CASES[case][2] else WithoutState)
    reference = wrapper(reference).eval()
    fused = lstm_fused.replace_lstm(copy.deepcopy(reference))
    assert isinstance(fused.lstm, lstm_fused.LSTM)
    return reference, fused


def make_inputs(case, T, B, seed=0):
    """The case's inputs at sequence length T and batch B."""
    lstm = torch.nn.LSTM(INPUT, HIDDEN, **(PACKED_CONFIG if case == "packed" else CASES[case][0]))
    if case == "packed":
        x, _, _ = module_inputs(lstm, T, B, seed=seed)
        return (x, packed_lengths(T, B))
    _, batched, hx_given = CASES[case]
    x, h0, c0 = module_inputs(lstm, T, B, seed=seed, batched=batched)
    return (x, h0, c0) if hx_given else (x,)


def dynamic_shapes(case):
    """torch.export's dynamic_shapes for the case's inputs: batch and sequence length free."""
    T, B = Dim("T", min=1), Dim("B", min=1)
    if case == "packed":
        return ({0: B, 1: T}, {0: B})
    config, batched, hx_given = CASES[case]
    if not batched:
        x = {0: T}
        state = None
    else:
        x = {0: B, 1: T} if config.get("batch_first") else {0: T, 1: B}
        state = {1: B}
    return (x, state, state) if hx_given else (x,)


def assert_matches_nn_lstm(actual, reference, inputs, what):
    """actual (output, h_n, c_n) against reference (the same model with nn.LSTM) on inputs."""
    with torch.no_grad():
        expected = reference(*inputs)
        exact = float64_copy(reference)(*[t.double() if t.is_floating_point() else t
                                          for t in inputs])
    for name, value, expected_value, exact_value in zip(("output", "h_n", "c_n"), actual,
                                                         expected, exact):
        value = torch.as_tensor(value)
        assert value.shape == expected_value.shape, f"{what}: {name} {tuple(value.shape)}"
        assert_close_to(value, expected_value, exact_value, torch.float32, f"{what}: {name}")


def outputs_and_grads(model, inputs):
    """model's outputs and the gradients of a fixed weighted sum of them with respect to the
    floating-point inputs and every parameter, by name."""
    leaves = [t.detach().requires_grad_() if t.is_floating_point() else t for t in inputs]
    outputs = model(*leaves)
    loss = sum((t.double() * upstream(t)).sum() for t in outputs)
    named = list(model.named_parameters())
    wrt = [t for t in leaves if t.requires_grad] + [p for _, p in named]
    names = [f"input {i}" for i, t in enumerate(leaves) if t.requires_grad]
    grads = torch.autograd.grad(loss, wrt)
    return outputs, dict(zip(names + [name for name, _ in named], grads))


def assert_training_matches_nn_lstm(model, reference, inputs, what):
    """Outputs and every gradient of model (lstm_fused inside, exported and reloaded) against
    reference (nn.LSTM) and its float64 copy."""
    actual, actual_grads = outputs_and_grads(model, inputs)
    expected, expected_grads = outputs_and_grads(reference, inputs)
    exact, exact_grads = outputs_and_grads(
        float64_copy(reference), [t.double() if t.is_floating_point() else t for t in inputs])
    for name, value, e, x in zip(("output", "h_n", "c_n"), actual, expected, exact):
        assert_close_to(value.detach(), e.detach(), x.detach(), torch.float32, f"{what}: {name}")
    assert actual_grads.keys() == expected_grads.keys()
    for name in expected_grads:
        assert_close_to(actual_grads[name], expected_grads[name], exact_grads[name],
                        torch.float32, f"{what}: grad {name}", gradient=True)


def export_onnx_kwargs(dynamo):
    """The dynamo flag where this PyTorch's torch.onnx.export has it (older ones have only the
    TorchScript-based exporter)."""
    if "dynamo" in inspect.signature(torch.onnx.export).parameters:
        return {"dynamo": dynamo}
    if dynamo:
        pytest.skip(f"torch.onnx.export of PyTorch {torch.__version__} has no dynamo exporter")
    return {}


def skip_unless_exporter(dynamo):
    for module in ("onnx", "onnxruntime") + (("onnxscript",) if dynamo else ()):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed (pip install -e .[test])")
    if dynamo and not hasattr(getattr(torch.onnx, "ops", None), "symbolic_multi_out"):
        pytest.skip(f"the dynamo ONNX exporter of an lstm_fused layer needs torch.onnx.ops "
                    f"(PyTorch >= 2.8), this is {torch.__version__}")
    if not dynamo and not hasattr(torch.onnx, "register_custom_op_symbolic"):
        pytest.skip(f"PyTorch {torch.__version__} has no TorchScript-based ONNX exporter")
    export_onnx_kwargs(dynamo)


# ----------------------------------------------------------------------------------- the layer op

def layer_args(requires_grad, lengths=None):
    generator = torch.Generator().manual_seed(0)
    x, h0, c0 = (torch.randn(*shape, generator=generator, dtype=torch.float64)
                 for shape in ((5, 3, INPUT), (3, HIDDEN), (3, HIDDEN)))
    w_ih, w_hh, b_ih = (torch.randn(*shape, generator=generator, dtype=torch.float64)
                        .requires_grad_(requires_grad)
                        for shape in ((4 * HIDDEN, INPUT), (4 * HIDDEN, HIDDEN), (4 * HIDDEN,)))
    return (x, h0, c0, w_ih, w_hh, b_ih, None, None, lengths, True)


def test_layer_op_keeps_activations_only_for_autograd():
    """lstm_fused::layer (what TorchScript records) gives forward's results, with a graph for
    backward exactly when autograd is on and an input needs a gradient."""
    args = layer_args(requires_grad=True, lengths=torch.tensor([5, 2, 0]))
    torch.library.opcheck(torch.ops.lstm_fused.layer.default, args)
    expected = torch.ops.lstm_fused.forward(*[a.detach() if isinstance(a, Tensor) else a
                                              for a in args], False)[:3]
    with torch.no_grad():
        results = torch.ops.lstm_fused.layer(*args)
    assert all(r.grad_fn is None for r in results)
    for result, expected_result in zip(results, expected):
        torch.testing.assert_close(result, expected_result, atol=0, rtol=0)
    assert all(r.grad_fn is None for r in torch.ops.lstm_fused.layer(*layer_args(False)))
    y, h_n, c_n = torch.ops.lstm_fused.layer(*args)
    y = zero_padded_steps(y, args[8])  # as lstm_fused.lstm returns it
    grads = torch.autograd.grad((y.sum() + h_n.sum() + c_n.sum()), args[3:6])
    x, h0, c0, w_ih, w_hh, b_ih = (a.detach().requires_grad_() for a in args[:6])
    y, (h_n, c_n) = lstm_fused.lstm_reference(x, (h0, c0), w_ih, w_hh, b_ih, reverse=True,
                                              lengths=args[8])
    expected_grads = torch.autograd.grad((y.sum() + h_n.sum() + c_n.sum()), (w_ih, w_hh, b_ih))
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad, atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("bias,proj,batch_first", [(True, False, False), (False, True, True)])
def test_layers_op_is_its_layers_in_turn(bias, proj, batch_first):
    """lstm_fused::layers (the module's eager short path) gives what its layers give one after
    another through lstm_fused::layer, gradients included, and rejects what it cannot read."""
    generator = torch.Generator().manual_seed(1)
    layers, batch, steps, output_size = 2, 3, 4, PROJ if proj else HIDDEN

    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64).requires_grad_()

    params = []
    for layer in range(layers):
        params += [randn(4 * HIDDEN, INPUT if layer == 0 else output_size),
                   randn(4 * HIDDEN, output_size)]
        params += [randn(4 * HIDDEN), randn(4 * HIDDEN)] if bias else []
        params += [randn(output_size, HIDDEN)] if proj else []
    x = randn(*((batch, steps) if batch_first else (steps, batch)), INPUT)
    hx = (randn(layers, batch, output_size), randn(layers, batch, HIDDEN))
    args = (x, hx, params, bias, layers, 0.0, True, batch_first)
    torch.library.opcheck(torch.ops.lstm_fused.layers.default, args)
    results = torch.ops.lstm_fused.layers(*args)

    per_layer = len(params) // layers
    sequence, h_n, c_n = x.transpose(0, 1) if batch_first else x, [], []
    for layer in range(layers):
        w = params[layer * per_layer:(layer + 1) * per_layer]
        sequence, h, c = torch.ops.lstm_fused.layer(
            sequence, hx[0][layer], hx[1][layer], w[0], w[1], w[2] if bias else None,
            w[3] if bias else None, w[-1] if proj else None, None, False)
        h_n.append(h)
        c_n.append(c)
    expected = (sequence.transpose(0, 1) if batch_first else sequence, torch.stack(h_n),
                torch.stack(c_n))
    inputs = [x, *hx, *params]
    grads = torch.autograd.grad(sum((r * (i + 1)).sum() for i, r in enumerate(results)), inputs)
    expected_grads = torch.autograd.grad(
        sum((r * (i + 1)).sum() for i, r in enumerate(expected)), inputs)
    for actual, wanted in zip([*results, *grads], [*expected, *expected_grads]):
        assert torch.equal(actual, wanted)

    with pytest.raises(RuntimeError, match="params must hold"):
        torch.ops.lstm_fused.layers(x, hx, params[:-1], bias, layers, 0.0, False, batch_first)
    with pytest.raises(RuntimeError, match="hx must be"):
        torch.ops.lstm_fused.layers(x, hx[:1], params, bias, layers, 0.0, False, batch_first)
    with pytest.raises(RuntimeError, match=r"h0 and c0 must be \[2, 3, size\]"):
        torch.ops.lstm_fused.layers(x, (hx[0][:1], hx[1]), params, bias, layers, 0.0, False,
                                    batch_first)
    with pytest.raises(RuntimeError, match="input must be 3-D"):
        torch.ops.lstm_fused.layers(x[0], hx, params, bias, layers, 0.0, False, batch_first)


# ------------------------------------------------------------------------------------------- ONNX

class FunctionalLengths(torch.nn.Module):
    """lstm_fused.lstm with lengths, empty sequences included, in both directions, with and
    without a projection, from a given state."""

    def __init__(self, lstm=lstm_fused.lstm):
        super().__init__()
        self.lstm = lstm
        generator = torch.Generator().manual_seed(0)

        def weight(*shape):
            return torch.nn.Parameter(torch.rand(*shape, generator=generator) - 0.5)

        self.w_ih = weight(4 * HIDDEN, INPUT)
        self.w_hh = weight(4 * HIDDEN, HIDDEN)
        self.b_ih, self.b_hh = weight(4 * HIDDEN), weight(4 * HIDDEN)
        self.w_hh_proj = weight(4 * HIDDEN, PROJ)
        self.w_hr = weight(PROJ, HIDDEN)

    def forward(self, x, h0, h0_proj, c0, lengths):
        lstm, results = self.lstm, []
        for reverse in (False, True):
            output, (h_n, c_n) = lstm(x, (h0, c0), self.w_ih, self.w_hh, self.b_ih, None,
                                      reverse=reverse, lengths=lengths)
            results += [output, h_n, c_n]
            output, (h_n, c_n) = lstm(x, (h0_proj, c0), self.w_ih, self.w_hh_proj, None,
                                      self.b_hh, self.w_hr, reverse=reverse, lengths=lengths)
            results += [output, h_n, c_n]
        return tuple(results)


def functional_inputs(T, B):
    generator = torch.Generator().manual_seed(T * 100 + B)
    lengths = torch.tensor([T * ((b + 3) % 4) // 3 for b in range(B)])  # T, 0, T // 3, ...
    return (torch.randn(T, B, INPUT, generator=generator),
            torch.randn(B, HIDDEN, generator=generator), torch.randn(B, PROJ, generator=generator),
            torch.randn(B, HIDDEN, generator=generator), lengths)


def onnx_inputs(case, T, B):
    return functional_inputs(T, B) if case == "functional_lengths" else make_inputs(case, T, B)


ONNX_CASES = [("legacy", case) for case in [*CASES, "packed", "functional_lengths"]] + [
    ("legacy_opset11", "layers2_bidirectional_proj_batch_first"), ("legacy_opset11", "packed")] + [
    ("dynamo", case) for case in [*CASES, "functional_lengths"]]


def export_onnx(exporter, case, path):
    """Exports the case's lstm_fused model to path; returns the number of LSTM layer-directions
    in it."""
    dynamo = exporter == "dynamo"
    if case == "functional_lengths":
        model, layers = FunctionalLengths(), 4
        names = ["x", "h0", "h0_proj", "c0", "lengths"]
        T, B = Dim("T", min=1), Dim("B", min=1)
        shapes = ({0: T, 1: B}, {0: B}, {0: B}, {0: B}, {0: B})
        axes = {"x": {0: "T", 1: "B"}, "h0": {0: "B"}, "h0_proj": {0: "B"}, "c0": {0: "B"},
                "lengths": {0: "B"}}
    else:
        model = make_models(case)[1]
        lstm = model.lstm
        layers = lstm.num_layers * (2 if lstm.bidirectional else 1)
        names = ["x", "lengths"] if case == "packed" else ["x", "h0", "c0"][:len(
            make_inputs(case, *EXPORT_SHAPE))]
        shapes = dynamic_shapes(case)
        axes = {name: {dim: str(d) for dim, d in spec.items()}
                for name, spec in zip(names, shapes) if spec is not None}
    inputs = onnx_inputs(case, *EXPORT_SHAPE)
    options = dict(input_names=names, **export_onnx_kwargs(dynamo))
    if exporter == "legacy_opset11":  # the oldest opset the translation supports
        options.update(opset_version=11)
    if dynamo:
        options.update(dynamic_shapes=shapes, verbose=False)
    else:
        options.update(dynamic_axes=axes)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, inputs, str(path), **options)
    return layers


# Runs each exported model on its inputs with onnxruntime alone: torch and lstm_fused cannot be
# imported in this process.
ONNXRUNTIME_RUNNER = textwrap.dedent("""
    import json, sys
    sys.modules["torch"] = None
    sys.modules["lstm_fused"] = None
    import numpy as np
    import onnxruntime
    for job in json.loads(open(sys.argv[1]).read()):
        session = onnxruntime.InferenceSession(job["model"], providers=["CPUExecutionProvider"])
        names = [i.name for i in session.get_inputs()]
        for run in job["runs"]:
            inputs = np.load(run + ".inputs.npz")
            assert len(names) == len(inputs.files), (names, inputs.files)
            outputs = session.run(None, {n: inputs[f] for n, f in zip(names, inputs.files)})
            np.savez(run + ".outputs.npz", *outputs)
    print("ran", "torch" not in sys.modules or sys.modules["torch"] is None)
""")


@pytest.fixture(scope="module")
def onnx_runs(tmp_path_factory):
    """Every ONNX case exported (or the error it raised), then all run in one onnxruntime
    process: {(exporter, case): (layers, [(inputs, outputs) for each of RUN_SHAPES])}."""
    numpy = pytest.importorskip("numpy")
    directory = tmp_path_factory.mktemp("onnx")
    results, jobs = {}, []
    for exporter, case in ONNX_CASES:
        try:
            skip_unless_exporter(exporter == "dynamo")
        except pytest.skip.Exception:
            continue
        path = directory / f"{exporter}-{case}.onnx"
        try:
            layers = export_onnx(exporter, case, path)
        except Exception as error:  # raised again by the test of this case
            results[(exporter, case)] = error
            continue
        runs = []
        for T, B in RUN_SHAPES:
            inputs = onnx_inputs(case, T, B)
            run = str(directory / f"{exporter}-{case}-{T}x{B}")
            numpy.savez(run + ".inputs.npz", *[t.numpy() for t in inputs])
            runs.append((inputs, run))
        results[(exporter, case)] = (path, layers, runs)
        jobs.append({"model": str(path), "runs": [run for _, run in runs]})
    if not jobs:
        return results
    manifest = directory / "jobs.json"
    manifest.write_text(json.dumps(jobs))
    done = subprocess.run([sys.executable, "-c", ONNXRUNTIME_RUNNER, str(manifest)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and done.stdout.strip() == "ran True", done.stderr[-3000:]
    for key, result in results.items():
        if not isinstance(result, Exception):
            path, layers, runs = result
            outputs = [numpy.load(run + ".outputs.npz") for _, run in runs]
            results[key] = (path, layers, [
                (inputs, [torch.from_numpy(o[f]) for f in o.files])
                for (inputs, _), o in zip(runs, outputs)])
    return results


@pytest.mark.parametrize("exporter,case", ONNX_CASES, ids=[f"{e}-{c}" for e, c in ONNX_CASES])
def test_onnx_in_onnxruntime(exporter, case, onnx_runs):
    skip_unless_exporter(exporter == "dynamo")
    result = onnx_runs[(exporter, case)]
    if isinstance(result, Exception):
        raise result
    path, layers, runs = result
    import onnx

    graph = onnx.load(str(path)).graph
    assert {node.domain for node in graph.node} <= {"", "ai.onnx"}, "non-standard operators"
    assert sum(node.op_type == "LSTM" for node in graph.node) == layers
    if case == "functional_lengths":
        model = FunctionalLengths()
        for inputs, outputs in runs:
            with torch.no_grad():
                expected = model(*inputs)
                exact = FunctionalLengths(lstm_fused.lstm_reference).double()(
                    *[t.double() if t.is_floating_point() else t for t in inputs])
            for index, (value, e, x) in enumerate(zip(outputs, expected, exact)):
                assert_close_to(value, e, x, torch.float32, f"{tuple(inputs[0].shape)}: {index}")
        return
    reference, _ = make_models(case)
    for inputs, outputs in runs:
        assert_matches_nn_lstm(outputs, reference, inputs, f"onnxruntime {tuple(inputs[0].shape)}")


# ------------------------------------------------------------------------------------ TorchScript

def save_and_load(script_module):
    buffer = io.BytesIO()
    torch.jit.save(script_module, buffer)
    buffer.seek(0)
    return torch.jit.load(buffer)


TORCHSCRIPT_CASES = [*CASES, "packed"]


@pytest.mark.parametrize("case", TORCHSCRIPT_CASES)
def test_trace_as_users_call_it(case):
    """Traced in training mode with autograd on (its sanity check included), saved and loaded,
    it replays at other shapes for inference and for training."""
    reference, fused = make_models(case)
    fused.train()
    traced = save_and_load(torch.jit.trace(fused, make_inputs(case, *EXPORT_SHAPE)))
    assert "lstm_fused::layer" in str(traced.inlined_graph)
    for T, B in RUN_SHAPES:
        inputs = make_inputs(case, T, B, seed=1)
        with torch.no_grad():
            assert_matches_nn_lstm(traced(*inputs), reference, inputs, f"traced {(T, B)}")
    assert_training_matches_nn_lstm(traced, reference, make_inputs(case, 6, 2, seed=2),
                                    "traced, training")


def test_trace_in_inference_replays_training():
    """Traced in eval mode without autograd, the module still computes gradients when replayed
    with autograd on: the op decides whether to keep activations when it runs."""
    case = "layers2_bidirectional_proj_batch_first"
    reference, fused = make_models(case)
    with torch.no_grad():
        traced = save_and_load(torch.jit.trace(fused, make_inputs(case, *EXPORT_SHAPE)))
    assert_training_matches_nn_lstm(traced, reference, make_inputs(case, 5, 2, seed=2),
                                    "traced without grad, training")
    inputs = make_inputs(case, 3, 4, seed=3)
    with torch.inference_mode():
        assert_matches_nn_lstm(traced(*inputs), reference, inputs, "traced, inference mode")


@pytest.mark.parametrize("case", TORCHSCRIPT_CASES)
def test_script(case):
    """torch.jit.script of a model with lstm_fused.LSTM inside, saved and loaded, for inference
    and training; its graph calls the op."""
    reference, fused = make_models(case)
    scripted = save_and_load(torch.jit.script(fused))
    assert "lstm_fused::layer" in str(scripted.inlined_graph)
    for T, B in RUN_SHAPES:
        inputs = make_inputs(case, T, B, seed=1)
        with torch.no_grad():
            assert_matches_nn_lstm(scripted(*inputs), reference, inputs, f"scripted {(T, B)}")
    scripted.train()
    assert_training_matches_nn_lstm(scripted, reference, make_inputs(case, 6, 2, seed=2),
                                    "scripted, training")


def test_script_dropout_and_mode():
    """A scripted module follows train() and eval(): dropout between layers only in training."""
    torch.manual_seed(0)
    fused = WithoutState(lstm_fused.LSTM(INPUT, HIDDEN, num_layers=2, dropout=0.5))
    scripted = torch.jit.script(fused)
    x = torch.randn(6, 3, INPUT)
    with torch.no_grad():
        eval_output = scripted.eval()(x)[0]
        torch.testing.assert_close(eval_output, fused.eval()(x)[0], atol=0, rtol=0)
        torch.manual_seed(1)
        train_output = scripted.train()(x)[0]
        torch.manual_seed(1)
        torch.testing.assert_close(train_output, fused.train()(x)[0], atol=0, rtol=0)
    assert not torch.equal(train_output, eval_output)


# ----------------------------------------------------------------------- torch.export, AOTInductor

@pytest.mark.parametrize("case", list(CASES))
def test_torch_export_dynamic_shapes(case):
    """Exported with free batch and sequence length, saved and loaded, at other shapes."""
    reference, fused = make_models(case)
    exported = torch.export.export(fused, make_inputs(case, *EXPORT_SHAPE),
                                   dynamic_shapes=dynamic_shapes(case))
    buffer = io.BytesIO()
    torch.export.save(exported, buffer)
    buffer.seek(0)
    module = torch.export.load(buffer).module()
    for T, B in RUN_SHAPES:
        inputs = make_inputs(case, T, B, seed=1)
        with torch.no_grad():
            assert_matches_nn_lstm(module(*inputs), reference, inputs, f"exported {(T, B)}")


class Several(torch.nn.Module):
    """One model with LSTMs of several kinds, so that one AOTInductor build covers them all:
    2 layers, bidirectional, projection, batch_first; no bias, time-major, given state; unbatched
    input with a projection."""

    def __init__(self):
        super().__init__()
        self.deep = torch.nn.LSTM(INPUT, HIDDEN, num_layers=2, bidirectional=True,
                                  proj_size=PROJ, batch_first=True)
        self.plain = torch.nn.LSTM(INPUT, HIDDEN, bias=False)
        self.single = torch.nn.LSTM(INPUT, HIDDEN, proj_size=PROJ)

    def forward(self, x, h0, c0):
        """x: [B, T, I]; h0, c0: [1, B, H], the state of plain."""
        output, (h_n, c_n) = self.deep(x)
        plain, (plain_h, plain_c) = self.plain(x.transpose(0, 1), (h0, c0))
        single, (single_h, single_c) = self.single(x[0])
        return output, h_n, c_n, plain, plain_h, plain_c, single, single_h, single_c


def several_inputs(T, B, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(B, T, INPUT, generator=generator),
            torch.randn(1, B, HIDDEN, generator=generator),
            torch.randn(1, B, HIDDEN, generator=generator))


def test_aot_inductor_dynamic_shapes(tmp_path):
    compile_and_package = getattr(torch._inductor, "aoti_compile_and_package", None)
    if compile_and_package is None:
        pytest.skip(f"PyTorch {torch.__version__} has no torch._inductor.aoti_compile_and_package")
    torch.manual_seed(0)
    reference = Several().eval()
    fused = lstm_fused.replace_lstm(copy.deepcopy(reference))
    T, B = Dim("T", min=1), Dim("B", min=1)
    with torch.no_grad():
        exported = torch.export.export(fused, several_inputs(*EXPORT_SHAPE),
                                       dynamic_shapes=({0: B, 1: T}, {1: B}, {1: B}))
    package = compile_and_package(exported, package_path=str(tmp_path / "several.pt2"))
    compiled = torch._inductor.aoti_load_package(package)
    for T, B in RUN_SHAPES:
        inputs = several_inputs(T, B, seed=1)
        with torch.no_grad():
            actual = compiled(*inputs)
        assert_several_match(actual, reference, inputs, f"AOTInductor {(T, B)}")
    if importlib.util.find_spec("lstm_fused._C") is not None:  # the package needs only the ops
        inputs = several_inputs(6, 2, seed=2)
        (actual,), _ = run_with_library_only("aoti", package, inputs, tmp_path)
        assert_several_match(actual, reference, inputs, "AOTInductor, library only")


def assert_several_match(actual, reference, inputs, what):
    with torch.no_grad():
        expected = reference(*inputs)
        exact = float64_copy(reference)(*[t.double() for t in inputs])
    for index, (value, e, x) in enumerate(zip(actual, expected, exact)):
        assert value.shape == e.shape, (what, index, value.shape)
        assert_close_to(value, e, x, torch.float32, f"{what}: output {index}")


# --------------------------------------------------------------------- without lstm_fused's Python

def built_library():
    spec = importlib.util.find_spec("lstm_fused._C")
    if spec is None:
        pytest.skip("lstm_fused runs from a JIT build here, not an installed library")
    return spec.origin


# Loads only the ops library, as a LibTorch program would, and runs a saved TorchScript module
# (without and with autograd on) or an AOTInductor package on saved inputs.
LIBRARY_ONLY_RUNNER = textwrap.dedent("""
    import sys
    sys.modules["lstm_fused"] = None
    import torch
    library, kind, artefact, inputs, results = sys.argv[1:]
    torch.ops.load_library(library)
    inputs = torch.load(inputs)
    if kind == "torchscript":
        module = torch.jit.load(artefact)
        with torch.no_grad():
            outputs = [module(*inputs)]
        outputs.append([t.detach() for t in module(*inputs)])
    else:
        with torch.no_grad():
            outputs = [torch._inductor.aoti_load_package(artefact)(*inputs)]
    torch.save(outputs, results)
""")


def run_with_library_only(kind, artefact, inputs, directory):
    """The results of LIBRARY_ONLY_RUNNER in a fresh process, and what it wrote to stderr."""
    torch.save(inputs, directory / "inputs.pt")
    done = subprocess.run(
        [sys.executable, "-c", LIBRARY_ONLY_RUNNER, built_library(), kind, str(artefact),
         str(directory / "inputs.pt"), str(directory / "results.pt")],
        capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(directory / "results.pt"), done.stderr


def test_torchscript_needs_only_the_ops_library(tmp_path):
    """A traced module runs where only the compiled ops library is loaded, not lstm_fused: for
    inference, with autograd off or on (then it warns that no gradient passes)."""
    built_library()
    case = "layers2_bidirectional_proj_batch_first"
    reference, fused = make_models(case)
    torch.jit.save(torch.jit.trace(fused, make_inputs(case, *EXPORT_SHAPE)), tmp_path / "m.pt")
    inputs = make_inputs(case, 5, 2, seed=1)
    (without_grad, with_grad), stderr = run_with_library_only("torchscript", tmp_path / "m.pt",
                                                              inputs, tmp_path)
    assert "pass no gradient" in stderr
    assert_matches_nn_lstm(without_grad, reference, inputs, "library only, autograd off")
    assert_matches_nn_lstm(with_grad, reference, inputs, "library only, autograd on")


# A LibTorch program: dlopens the ops library with every symbol bound at once (so nothing from
# Python may be left in it), then runs a TorchScript module with autograd off and on.
LIBTORCH_PROGRAM = r"""
#include <dlfcn.h>
#include <torch/csrc/jit/serialization/pickle.h>
#include <torch/script.h>

#include <fstream>
#include <iostream>

int main(int argc, char** argv) {  // library, model, inputs, results
  if (!dlopen(argv[1], RTLD_NOW | RTLD_GLOBAL)) {
    std::cerr << dlerror() << std::endl;
    return 1;
  }
  torch::jit::Module model = torch::jit::load(argv[2]);
  std::vector<torch::jit::IValue> inputs;
  for (const at::Tensor& input : torch::jit::load(argv[3]).attr("inputs").toTensorList()) {
    inputs.emplace_back(input);
  }
  c10::List<at::Tensor> results;
  for (const bool grad : {false, true}) {
    torch::AutoGradMode mode(grad);
    const torch::jit::IValue outputs = model.forward(inputs);
    for (const auto& output : outputs.toTupleRef().elements()) {
      results.push_back(output.toTensor().detach());
    }
  }
  const std::vector<char> bytes = torch::jit::pickle_save(results);
  std::ofstream(argv[4], std::ios::binary).write(bytes.data(), bytes.size());
  return 0;
}
"""


class SavedInputs(torch.nn.Module):
    """Tensors a C++ program reads with torch::jit::load."""

    def __init__(self, tensors):
        super().__init__()
        self.inputs = list(tensors)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="builds a Linux program")
def test_libtorch_program(tmp_path):
    """A C++ program on LibTorch loads the ops library (which needs nothing from Python) and
    runs a traced model, as the README shows."""
    library = built_library()
    compiler = shutil.which("c++") or shutil.which("g++")
    from torch.utils import cpp_extension

    if compiler is None or not all(os.path.isdir(p) for p in cpp_extension.include_paths()):
        pytest.skip("no C++ compiler or no LibTorch headers")
    (tmp_path / "program.cpp").write_text(LIBTORCH_PROGRAM)
    command = [compiler, "-std=c++17", "-O0", str(tmp_path / "program.cpp"), "-o",
               str(tmp_path / "program"),
               f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"]
    command += [f"-I{p}" for p in cpp_extension.include_paths()]
    command += [f"-L{p}" for p in cpp_extension.library_paths()]
    command += [f"-Wl,-rpath,{p}" for p in cpp_extension.library_paths()]
    command += ["-ltorch", "-ltorch_cpu", "-lc10", "-ldl"]
    built = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr[-3000:]
    case = "layers2_bidirectional_proj_batch_first"
    reference, fused = make_models(case)
    torch.jit.save(torch.jit.trace(fused, make_inputs(case, *EXPORT_SHAPE)), tmp_path / "m.pt")
    inputs = make_inputs(case, 5, 2, seed=1)
    torch.jit.save(torch.jit.script(SavedInputs(inputs)), tmp_path / "inputs.pt")
    done = subprocess.run([str(tmp_path / "program"), library, str(tmp_path / "m.pt"),
                           str(tmp_path / "inputs.pt"), str(tmp_path / "results.pt")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "pass no gradient" in done.stderr
    results = torch.load(tmp_path / "results.pt", weights_only=False)  # torch::pickle_save
    assert_matches_nn_lstm(results[:3], reference, inputs, "LibTorch, autograd off")
    assert_matches_nn_lstm(results[3:], reference, inputs, "LibTorch, autograd on")
