#!/usr/bin/env python
"""Benchmarks lstm_fused.LSTM against torch.nn.LSTM and the usual hand-written alternatives.

    python benchmarks/bench_lstm.py --quick                  # small grid, ~2 min on 2 CPU cores
    python benchmarks/bench_lstm.py --quick --out results/   # + results.json, .csv, PNG plots
    python benchmarks/bench_lstm.py --sets streaming         # single steps, the state carried
    python benchmarks/bench_lstm.py --device cuda --dtype float32,bfloat16 --mode training \
        --providers nn.LSTM,lstm_fused --shape 64,128,512,512

Method (details in benchmarks/README.md): for every (shape, mode, dtype) row, every provider is
built from one shared set of nn.LSTM weights, run once and checked against nn.LSTM (outputs and, in
training mode, the input and weight_hh gradients); a provider that disagrees is reported as wrong
and not timed. The others are warmed up, then timed round-robin in one process (each round runs
every provider once, in a rotating order) and the median per provider is reported.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import fnmatch
import gc
import json
import os
import platform
import shutil
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

try:
    import lstm_fused
    _LSTM_FUSED_IMPORT_ERROR: Optional[str] = None
except Exception as error:  # the harness still benchmarks the other providers
    lstm_fused = None
    _LSTM_FUSED_IMPORT_ERROR = f"{type(error).__name__}: {error}"

# streaming: one step (T = 1) per call, the state carried from call to call, under no_grad, as
# in text generation, real-time audio or a policy; only the rows of the streaming set run it.
# A round times STREAM_STEPS consecutive steps (a stream's steps follow one another) and
# reports their mean: one call alone is shorter than the timer's and Python's jitter.
STREAM_STEPS = 32
MODES = ("inference", "training", "streaming")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_ALIASES = {"fp32": "float32", "f32": "float32", "bf16": "bfloat16", "fp16": "float16",
                 "half": "float16"}
SHORT_DTYPE = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
BASELINE = "nn.LSTM"


# --------------------------------------------------------------------------------------------
# Shapes and grids
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Shape:
    B: int  # batch
    T: int  # sequence length
    I: int  # input size  # noqa: E741
    H: int  # hidden size

    def label(self) -> str:
        return f"({self.B},{self.T},{self.I},{self.H})"


@dataclass
class GridEntry:
    shape: Shape
    sets: List[str]                       # "goal", "streaming", "batch", "hidden", "seq", ...
    modes: Optional[Tuple[str, ...]] = None  # None: every requested mode but streaming

    def runs(self, mode: str) -> bool:
        return mode in self.modes if self.modes is not None else mode != "streaming"


# Shapes named in the speed goals of the other issues, as (B, T, I, H) and the modes they name.
CPU_GOALS = [((1, 256, 256, 256), None), ((32, 35, 256, 256), None), ((64, 64, 512, 512), None)]
GPU_GOALS = [((64, 128, 512, 512), ("training",)), ((256, 64, 1024, 1024), ("training",)),
             ((1, 256, 512, 512), ("inference",)), ((8, 256, 512, 512), None)]
# The speed goals of the persistent kernel (GPU only; run them in float32, and float16/bfloat16 for
# the last): batch 1 inference per H, training at batch 1 to 8, and (16, 1024, 768, 768).
PERSISTENT_GOALS = [((1, 256, 256, 256), ("inference",)), ((1, 256, 512, 512), None),
                    ((1, 256, 1024, 1024), ("inference",)), ((4, 256, 512, 512), ("training",)),
                    ((8, 256, 512, 512), ("training",)), ((16, 1024, 768, 768), None)]

# Single steps, B = 1, I = H, one call per step with the state carried.
STREAMING = [(1, 1, h, h) for h in (32, 256, 1024)]

# Sweeps move one axis at a time around a base point; in the hidden sweep the input size follows
# the hidden size (I = H), as in every layer after the first of a stacked LSTM.
SWEEPS = {
    "full": {
        "batch": ("B", [1, 2, 4, 8, 16, 32, 64, 128, 256], dict(T=64, I=256, H=256)),
        "hidden": ("H", [32, 64, 128, 256, 512, 1024, 2048], dict(B=32, T=64)),
        "seq": ("T", [16, 64, 256, 1024], dict(B=32, I=256, H=256)),
    },
    "quick": {
        "batch": ("B", [1, 4, 16, 64], dict(T=16, I=128, H=128)),
        "hidden": ("H", [32, 128, 512], dict(B=16, T=16)),
    },
    "smoke": {
        "batch": ("B", [1, 2], dict(T=3, I=4, H=5)),
        "hidden": ("H", [5, 8], dict(B=2, T=3)),
    },
}
SWEEP_AXES = {"batch": ("B", "batch size B"), "hidden": ("H", "hidden size H (input size I = H)"),
              "seq": ("T", "sequence length T")}


def sweep_shapes(axis: str, values: Sequence[int], base: Dict[str, int]) -> List[Shape]:
    shapes = []
    for value in values:
        dims = dict(base, **{axis: value})
        if axis == "H" and "I" not in base:
            dims["I"] = value
        shapes.append(Shape(dims["B"], dims["T"], dims["I"], dims["H"]))
    return shapes


def build_grid(grid: str, device: torch.device, sets: Optional[Sequence[str]] = None,
               custom: Sequence[Shape] = ()) -> List[GridEntry]:
    """The shapes to run, merged so that a shape in several sets is run once."""
    entries: List[GridEntry] = []

    def add(shape: Shape, tag: str, modes: Optional[Tuple[str, ...]] = None) -> None:
        for entry in entries:
            if entry.shape == shape:
                if tag not in entry.sets:
                    entry.sets.append(tag)
                if entry.modes is not None:
                    entry.modes = None if modes is None else tuple(
                        m for m in MODES if m in entry.modes or m in modes)
                return
        entries.append(GridEntry(shape, [tag], modes))

    if sets is None:
        sets = [] if custom else ["goals", "streaming", *SWEEPS[grid]]
        if grid == "full" and device.type == "cuda" and not custom:
            sets.append("persistent")
    for shape in custom:
        add(shape, "custom")
    if "goals" in sets:
        if grid == "smoke":
            add(Shape(2, 3, 4, 5), "smoke")
        else:
            for dims, modes in (GPU_GOALS if device.type == "cuda" else CPU_GOALS):
                add(Shape(*dims), "goal", modes)
    if "persistent" in sets and device.type == "cuda" and grid != "smoke":
        for dims, modes in PERSISTENT_GOALS:
            add(Shape(*dims), "persistent", modes)
    if "streaming" in sets:
        for dims in ([(1, 1, 5, 5)] if grid == "smoke" else STREAMING):
            add(Shape(*dims), "streaming", ("streaming",))
    for name, (axis, values, base) in SWEEPS[grid].items():
        if name in sets:
            for shape in sweep_shapes(axis, values, base):
                add(shape, name)
    return entries


# --------------------------------------------------------------------------------------------
# Cases and providers
# --------------------------------------------------------------------------------------------

class Skip(Exception):
    """Raised by a provider factory that cannot run this case; the message says why."""


@dataclass
class Case:
    """One benchmark row: the shared nn.LSTM (the weights every provider uses) and the inputs."""
    shape: Shape
    mode: str
    dtype: torch.dtype
    device: torch.device
    layers: int
    bidirectional: bool
    ref: nn.LSTM
    x: Tensor        # [T, B, I]; requires grad in training mode
    h0: Tensor       # [layers * directions, B, H]
    c0: Tensor
    grad_outputs: Optional[Tuple[Tensor, Tensor, Tensor]]  # for (y, h_n, c_n) in training mode
    options: Dict[str, object] = field(default_factory=dict)  # provider settings from the CLI

    @property
    def training(self) -> bool:
        return self.mode == "training"

    @property
    def directions(self) -> int:
        return 2 if self.bidirectional else 1


def make_case(shape: Shape, mode: str, dtype: torch.dtype, device: torch.device, layers: int = 1,
              bidirectional: bool = False, seed: int = 0) -> Case:
    torch.manual_seed(seed)
    ref = nn.LSTM(shape.I, shape.H, num_layers=layers, bidirectional=bidirectional)
    ref = ref.to(device=device, dtype=dtype)
    states = layers * (2 if bidirectional else 1)
    options = dict(device=device, dtype=dtype)
    x = torch.randn(1 if mode == "streaming" else shape.T, shape.B, shape.I, **options)
    h0 = 0.5 * torch.randn(states, shape.B, shape.H, **options)
    c0 = 0.5 * torch.randn(states, shape.B, shape.H, **options)
    grad_outputs = None
    if mode == "training":
        x.requires_grad_(True)
        directions = 2 if bidirectional else 1
        grad_outputs = (torch.randn(shape.T, shape.B, directions * shape.H, **options),
                        torch.randn(states, shape.B, shape.H, **options),
                        torch.randn(states, shape.B, shape.H, **options))
    return Case(shape, mode, dtype, device, layers, bidirectional, ref, x, h0, c0, grad_outputs)


@dataclass
class Built:
    """A provider ready for one case. step() is the timed call: the forward pass in inference mode
    (under no_grad), forward + backward in training mode; it returns (y, h_n, c_n). After it,
    case.x.grad holds the input gradient and grad_w_hh() the gradient of layer 0's (forward
    direction's) weight_hh, laid out as nn.LSTM's weight_hh_l0 [4H, H]."""
    step: Callable[[], Tuple[Tensor, Tensor, Tensor]]
    grad_w_hh: Callable[[], Optional[Tensor]] = lambda: None


Factory = Callable[[Case], Built]


def module_step(case: Case, forward: Callable, params) -> Callable:
    """The timed call around forward(x, h0, c0) -> (y, h_n, c_n), as a training loop runs it; in
    streaming mode one step from the state the previous call left (the first from h0, c0)."""
    x, h0, c0 = case.x, case.h0, case.c0
    if case.mode == "streaming":
        state = [h0, c0]

        def stream():
            with torch.no_grad():
                y, h, c = forward(x, state[0], state[1])
            state[:] = [h, c]
            return y, h, c
        return stream
    if not case.training:
        def infer():
            with torch.no_grad():
                return forward(x, h0, c0)
        return infer
    params = list(params)
    grad_outputs = case.grad_outputs

    def train():
        x.grad = None
        for p in params:  # zero_grad(set_to_none=True)
            p.grad = None
        outputs = forward(x, h0, c0)
        torch.autograd.backward(outputs, grad_outputs)
        return outputs
    return train


def layer_weights(module: nn.LSTM, layer: int, direction: int) -> Tuple[Tensor, ...]:
    suffix = f"_l{layer}" + ("_reverse" if direction else "")
    return tuple(getattr(module, name + suffix)
                 for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"))


def python_lstm(x: Tensor, h0: Tensor, c0: Tensor, cells: Sequence[Callable], directions: int,
                project: Optional[Callable] = None):
    """A multi-layer (bi)directional LSTM as a Python loop over time steps; cells[layer *
    directions + direction](x_t, (h, c)) -> (h, c) computes one step. With project, the cells
    receive project(index, layer_input)[t] instead of x_t (an input projection of all steps)."""
    sequence, h_n, c_n = x, [], []
    for layer in range(len(cells) // directions):
        outputs = []
        for direction in range(directions):
            index = layer * directions + direction
            inputs = sequence if project is None else project(index, sequence)
            h, c = h0[index], c0[index]
            steps = range(sequence.shape[0])
            ys: List[Optional[Tensor]] = [None] * len(steps)
            for t in (reversed(steps) if direction else steps):
                h, c = cells[index](inputs[t], (h, c))
                ys[t] = h
            outputs.append(torch.stack(ys))
            h_n.append(h)
            c_n.append(c)
        sequence = outputs[0] if directions == 1 else torch.cat(outputs, dim=2)
    return sequence, torch.stack(h_n), torch.stack(c_n)


def nn_lstm(case: Case) -> Built:
    """torch.nn.LSTM itself: cuDNN on GPU, ATen's native (oneDNN) kernel on CPU."""
    ref = case.ref

    def forward(x, h0, c0):
        y, (h, c) = ref(x, (h0, c0))
        return y, h, c
    return Built(module_step(case, forward, ref.parameters()), lambda: ref.weight_hh_l0.grad)


def _lstm_fused_paths(device: torch.device) -> List[str]:
    """Kernel paths lstm_fused can be forced onto on device."""
    return [] if lstm_fused is None else lstm_fused.available_paths(device)


def lstm_fused_provider(path: Optional[str] = None) -> Factory:
    """lstm_fused.LSTM sharing nn.LSTM's parameters; path forces one kernel path (forward and
    backward) with lstm_fused.force_path."""
    def factory(case: Case) -> Built:
        if lstm_fused is None:
            raise Skip(f"lstm_fused not importable ({_LSTM_FUSED_IMPORT_ERROR})")
        module = lstm_fused.LSTM.from_torch(case.ref)

        def forward(x, h0, c0):
            y, (h, c) = module(x, (h0, c0))
            return y, h, c

        step = module_step(case, forward, case.ref.parameters())
        if path is not None:
            unforced = step

            def step():
                with lstm_fused.force_path(path):
                    try:
                        return unforced()
                    except RuntimeError as error:  # a forced path that cannot run: why, not a time
                        if "cannot run here" in str(error):
                            raise Skip(" ".join(str(error).split())) from None
                        raise
        return Built(step, lambda: case.ref.weight_hh_l0.grad)
    factory.__doc__ = "lstm_fused.LSTM, " + (f"kernel path {path} forced" if path
                                             else "default dispatch")
    return factory


def lstmcell_loop(case: Case) -> Built:
    """A Python loop over time of nn.LSTMCell (copies of the same weights)."""
    cells = []
    for layer in range(case.layers):
        for direction in range(case.directions):
            w_ih, w_hh, b_ih, b_hh = layer_weights(case.ref, layer, direction)
            cell = nn.LSTMCell(w_ih.shape[1], case.shape.H, device=case.device, dtype=case.dtype)
            with torch.no_grad():
                for mine, theirs in zip(cell.parameters(), (w_ih, w_hh, b_ih, b_hh)):
                    mine.copy_(theirs)
            cells.append(cell)
    params = [p for cell in cells for p in cell.parameters()]
    step = module_step(case, lambda x, h0, c0: python_lstm(x, h0, c0, cells, case.directions),
                       params)
    return Built(step, lambda: cells[0].weight_hh.grad)


class EightMatmulCell(nn.Module):
    """The textbook LSTM step, one matmul per gate for the input and one per gate for the state:
        i = sigmoid(x W_ii^T + b_ii + h W_hi^T + b_hi)   f = sigmoid(... W_if ... W_hf ...)
        g = tanh(x W_ig^T + b_ig + h W_hg^T + b_hg)      o = sigmoid(... W_io ... W_ho ...)
        c' = f * c + i * g                               h' = o * tanh(c')
    """

    def __init__(self, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor, b_hh: Tensor) -> None:
        super().__init__()
        for gate, wi, wh, bi, bh in zip("ifgo", w_ih.chunk(4), w_hh.chunk(4), b_ih.chunk(4),
                                        b_hh.chunk(4)):
            for name, value in ((f"W_i{gate}", wi), (f"W_h{gate}", wh), (f"b_i{gate}", bi),
                                (f"b_h{gate}", bh)):
                setattr(self, name, nn.Parameter(value.detach().clone()))

    def forward(self, x: Tensor, state: Tuple[Tensor, Tensor]) -> Tuple[Tensor, Tensor]:
        h, c = state
        i = torch.sigmoid(x @ self.W_ii.T + self.b_ii + h @ self.W_hi.T + self.b_hi)
        f = torch.sigmoid(x @ self.W_if.T + self.b_if + h @ self.W_hf.T + self.b_hf)
        g = torch.tanh(x @ self.W_ig.T + self.b_ig + h @ self.W_hg.T + self.b_hg)
        o = torch.sigmoid(x @ self.W_io.T + self.b_io + h @ self.W_ho.T + self.b_ho)
        c = f * c + i * g
        h = o * torch.tanh(c)
        return h, c

    def weight_hh_grad(self) -> Optional[Tensor]:
        grads = [getattr(self, f"W_h{gate}").grad for gate in "ifgo"]
        return None if any(g is None for g in grads) else torch.cat(grads)


def eight_matmul(case: Case) -> Built:
    """The formulation tutorials teach: 8 separate matmuls per step (copies of the weights)."""
    cells = [EightMatmulCell(*layer_weights(case.ref, layer, direction))
             for layer in range(case.layers) for direction in range(case.directions)]
    params = [p for cell in cells for p in cell.parameters()]
    step = module_step(case, lambda x, h0, c0: python_lstm(x, h0, c0, cells, case.directions),
                       params)
    return Built(step, cells[0].weight_hh_grad)


def _needs_cuda(case: Case, what: str) -> None:
    if case.device.type != "cuda":
        raise Skip(f"needs CUDA ({what}); running on {case.device.type}")


class _FlatLSTM(nn.Module):
    """nn.LSTM with flat tensor arguments and outputs, as make_graphed_callables wants."""

    def __init__(self, lstm: nn.LSTM) -> None:
        super().__init__()
        self.lstm = lstm

    def forward(self, x, h0, c0):
        y, (h, c) = self.lstm(x, (h0, c0))
        return y, h, c


def nn_lstm_cuda_graph(case: Case) -> Built:
    """nn.LSTM (cuDNN) captured once and replayed from a CUDA graph."""
    _needs_cuda(case, "replays a CUDA graph")
    ref, flat = case.ref, _FlatLSTM(case.ref)
    static_inputs = (case.x, case.h0, case.c0)  # the harness never rebinds them
    if case.training:
        graphed = torch.cuda.make_graphed_callables(flat, static_inputs)
        return Built(module_step(case, graphed, ref.parameters()), lambda: ref.weight_hh_l0.grad)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.no_grad():
        for _ in range(3):
            flat(*static_inputs)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        static_outputs = flat(*static_inputs)

    def replay():
        graph.replay()
        return static_outputs
    return Built(replay)


def fused_gate_lstm(x: Tensor, h0: Tensor, c0: Tensor, weights: Sequence[Tuple[Tensor, ...]],
                    directions: int) -> Tuple[Tensor, Tensor, Tensor]:
    """The Python LSTM loop compiled-loop compiles: per layer and direction, the input projection
    of all steps at once, then one fused-gate matmul per step. weights[layer * directions +
    direction] = (weight_ih, weight_hh, bias_ih, bias_hh) as in nn.LSTM."""

    def project(index: int, sequence: Tensor) -> Tensor:
        w_ih, _, b_ih, b_hh = weights[index]
        return sequence @ w_ih.T + (b_ih + b_hh)

    def fused_gate_cell(w_hh: Tensor) -> Callable:
        def step(projected: Tensor, state: Tuple[Tensor, Tensor]) -> Tuple[Tensor, Tensor]:
            h, c = state
            i, f, g, o = (projected + h @ w_hh.T).chunk(4, 1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            return torch.sigmoid(o) * torch.tanh(c), c
        return step

    cells = [fused_gate_cell(w_hh) for _, w_hh, _, _ in weights]
    return python_lstm(x, h0, c0, cells, directions, project)


def compiled_loop(case: Case, backend_options: Optional[dict] = None) -> Built:
    """torch.compile(mode="reduce-overhead") of a Python LSTM loop, on nn.LSTM's parameters.

    The loop is fused_gate_lstm; it is compiled afresh for each case (one shape, one grad mode)."""
    if backend_options is None:
        _needs_cuda(case, 'mode="reduce-overhead" replays CUDA graphs')
        backend_options = dict(mode="reduce-overhead")
    limit = int(case.options.get("compile_max_steps", 256))
    if case.shape.T > limit:
        raise Skip(f"T={case.shape.T} > --compile-max-steps {limit}: the loop is unrolled, "
                   "compiling it would take too long")
    torch._dynamo.reset()  # a fresh compile per case, so the recompile limit never kicks in
    weights = [layer_weights(case.ref, layer, direction)
               for layer in range(case.layers) for direction in range(case.directions)]
    compiled = torch.compile(fused_gate_lstm, dynamic=False, fullgraph=True, **backend_options)

    def forward(x, h0, c0):
        torch.compiler.cudagraph_mark_step_begin()  # outputs of the last call may be overwritten
        return compiled(x, h0, c0, weights, case.directions)
    ref = case.ref
    return Built(module_step(case, forward, ref.parameters()), lambda: ref.weight_hh_l0.grad)


def onnxruntime_provider(case: Case) -> Built:
    """nn.LSTM exported with torch.onnx.export (ONNX's LSTM operator) and run by onnxruntime's
    CPUExecutionProvider with torch's thread count; inference and streaming only."""
    if case.device.type != "cpu":
        raise Skip("runs on the CPU only (CPUExecutionProvider)")
    if case.training:
        raise Skip("inference only (onnxruntime does not train)")
    if case.dtype != torch.float32:
        raise Skip(f"float32 only (onnxruntime's CPU LSTM has no {case.dtype})")
    try:
        import onnxruntime
    except ImportError:
        raise Skip("onnxruntime is not installed (pip install onnx onnxruntime)")
    import io
    import warnings

    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(_FlatLSTM(case.ref), (case.x, case.h0, case.c0), buffer,
                          input_names=["x", "h0", "c0"], output_names=["y", "h_n", "c_n"],
                          dynamic_axes={"x": {0: "T", 1: "B"}, "h0": {1: "B"}, "c0": {1: "B"}},
                          opset_version=17, dynamo=False)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    # Its own thread pool would otherwise spin after each run, taking the cores from the
    # providers timed next (and theirs from it): on 2 cores that doubled everyone's times.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = onnxruntime.InferenceSession(buffer.getvalue(), options,
                                           providers=["CPUExecutionProvider"])

    def forward(x, h0, c0):
        feeds = {"x": x.numpy(), "h0": h0.numpy(), "c0": c0.numpy()}
        return tuple(torch.from_numpy(a) for a in session.run(None, feeds))
    return Built(module_step(case, forward, ()))


# The registry: name -> factory(case) -> Built, or raises Skip("reason").
PROVIDERS: Dict[str, Factory] = {
    "nn.LSTM": nn_lstm,
    "lstm_fused": lstm_fused_provider(),
    "LSTMCell-loop": lstmcell_loop,
    "8-matmul": eight_matmul,
    "onnxruntime": onnxruntime_provider,
    "nn.LSTM+graph": nn_lstm_cuda_graph,
    "compiled-loop": compiled_loop,
}


def default_providers(device: torch.device) -> Dict[str, Factory]:
    """PROVIDERS with one 'lstm_fused[path]' entry per kernel path lstm_fused offers on device."""
    providers: Dict[str, Factory] = {}
    for name, factory in PROVIDERS.items():
        providers[name] = factory
        if name == "lstm_fused" and lstm_fused is not None:
            for path in _lstm_fused_paths(device):
                providers[f"lstm_fused[{path}]"] = lstm_fused_provider(path)
    return providers


# --------------------------------------------------------------------------------------------
# Correctness gate
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Tolerance:
    atol: float  # outputs y, h_n, c_n: allclose(atol, rtol)
    rtol: float
    grad: float  # gradients: max |error| / max |nn.LSTM's gradient|


def tolerance(case: Case) -> Tolerance:
    if case.dtype in (torch.bfloat16, torch.float16):
        return Tolerance(5e-2, 5e-2, 1e-1)
    if case.device.type == "cuda":  # cuDNN's RNNs use TF32 by default
        return Tolerance(1e-2, 1e-2, 2e-2)
    return Tolerance(1e-4, 1e-3, 1e-3)


@dataclass
class Reference:
    outputs: Tuple[Tensor, Tensor, Tensor]
    grad_x: Optional[Tensor] = None
    grad_w_hh: Optional[Tensor] = None


def run_reference(case: Case) -> Reference:
    built = nn_lstm(case)
    outputs = tuple(t.detach().clone() for t in built.step())
    if not case.training:
        return Reference(outputs)
    return Reference(outputs, case.x.grad.detach().clone(), built.grad_w_hh().detach().clone())


def check(case: Case, outputs, built: Built, ref: Reference) -> Tuple[Optional[str], float]:
    """(None, max error) if the provider agrees with nn.LSTM, else (what disagrees, its error)."""
    tol = tolerance(case)
    worst = 0.0
    for name, actual, expected in zip(("y", "h_n", "c_n"), outputs, ref.outputs):
        if actual.shape != expected.shape:
            return f"{name} shape {tuple(actual.shape)}", float("nan")
        actual, expected = actual.detach().float(), expected.float()
        error = (actual - expected).abs().max().item() if actual.numel() else 0.0
        close = torch.allclose(actual, expected, atol=tol.atol, rtol=tol.rtol)
        if not close:  # a NaN error lands here too
            return f"{name} err {error:.1e}", error
        worst = max(worst, error)
    if case.training:
        for name, actual, expected in (("dx", case.x.grad, ref.grad_x),
                                       ("dW_hh", built.grad_w_hh(), ref.grad_w_hh)):
            if actual is None:
                return f"no {name}", float("nan")
            if actual.shape != expected.shape:
                return f"{name} shape {tuple(actual.shape)}", float("nan")
            scale = expected.abs().max().item() or 1.0
            error = (actual.detach().float() - expected.float()).abs().max().item() / scale
            if not error <= tol.grad:
                return f"{name} rel err {error:.1e}", error
            worst = max(worst, error)
    return None, worst


# --------------------------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------------------------

def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(step: Callable, device: torch.device, calls: int = 1) -> float:
    """Milliseconds per step() over calls consecutive ones: CUDA events on GPU, perf_counter on
    CPU."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            step()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / calls
    begin = time.perf_counter()
    for _ in range(calls):
        step()
    return (time.perf_counter() - begin) * 1e3 / calls


def peak_memory_mib(step: Callable, device: torch.device) -> Optional[float]:
    """Memory one step() allocates at its peak beyond what was allocated before it (CUDA only)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def _short(error: BaseException, limit: int = 200) -> str:
    text = " ".join(f"{type(error).__name__}: {error}".split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def bench_case(entry: GridEntry, mode: str, dtype_name: str, device: torch.device, args,
               providers: Dict[str, Factory], report: Callable[[str, float], None]) -> dict:
    """One row: build and check every provider, then time the good ones round-robin."""
    shape = entry.shape
    case = make_case(shape, mode, DTYPES[dtype_name], device, args.layers, args.bidirectional,
                     args.seed)
    case.options["compile_max_steps"] = args.compile_max_steps
    results: Dict[str, dict] = {name: {"status": None, "reason": None, "times_ms": []}
                                for name in providers}
    report("reference", 0.0)
    try:
        reference = run_reference(case)
    except Exception as error:  # nothing to check against: no provider is timed on this row
        reference, failure = None, "no reference, nn.LSTM failed: " + _short(error)

    ready: Dict[str, Built] = {}
    for k, (name, factory) in enumerate(providers.items()):
        if reference is None:
            results[name]["status"], results[name]["reason"] = "error", failure
            continue
        report(f"check {name}", 0.1 * k / len(providers))
        result = results[name]
        begin = time.perf_counter()
        try:
            built = factory(case)
            outputs = built.step()
            synchronize(device)
            problem, error = check(case, outputs, built, reference)
            del outputs
            result["max_err"] = error
            if problem is None:
                result["status"] = "ok"
                ready[name] = built
            else:
                result["status"], result["reason"] = "wrong", problem
        except Skip as skip:
            result["status"], result["reason"] = "skip", str(skip)
        except NotImplementedError as error:
            result["status"], result["reason"] = "skip", "not implemented: " + _short(error)
        except Exception as error:  # reported in the table; the run goes on
            result["status"], result["reason"] = "error", _short(error)
        result["setup_s"] = round(time.perf_counter() - begin, 4)

    names = list(ready)
    try:
        for w in range(args.warmup):
            report(f"warm-up {w + 1}/{args.warmup}", 0.1 + 0.1 * w / max(args.warmup, 1))
            for name in names:
                ready[name].step()
            synchronize(device)
        gc.collect()
        min_rounds = min(3, args.repeats)
        calls = STREAM_STEPS if mode == "streaming" else 1
        began = time.perf_counter()
        for r in range(args.repeats if names else 0):
            report(f"round {r + 1}/{args.repeats}", 0.2 + 0.8 * r / args.repeats)
            shift = r % len(names)  # rotate the order so no provider always runs first
            for name in names[shift:] + names[:shift]:
                results[name]["times_ms"].append(time_call(ready[name].step, device, calls))
            if r + 1 >= min_rounds and time.perf_counter() - began > args.row_budget:
                break
        for name in names:
            results[name]["peak_mem_mib"] = peak_memory_mib(ready[name].step, device)
    except Exception as error:  # a provider failing after its check: report it, keep the row
        for name in names:
            if len(results[name]["times_ms"]) == 0:
                results[name]["status"], results[name]["reason"] = "error", _short(error)

    baseline = results.get(BASELINE, {})
    base_ms = statistics.median(baseline["times_ms"]) if baseline.get("times_ms") else None
    for name, result in results.items():
        times = result["times_ms"]
        result["median_ms"] = statistics.median(times) if times else None
        result["min_ms"] = min(times) if times else None
        result["speedup"] = (base_ms / result["median_ms"]
                             if base_ms and result["median_ms"] else None)
        result.setdefault("peak_mem_mib", None)
        result.setdefault("max_err", None)
    return {"B": shape.B, "T": shape.T, "I": shape.I, "H": shape.H, "sets": list(entry.sets),
            "mode": mode, "dtype": dtype_name, "layers": args.layers,
            "bidirectional": args.bidirectional, "providers": results}


# --------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------

class Progress:
    """A one-line progress bar on stderr, redrawn in place with \\r."""

    def __init__(self, total: int, enabled: bool, stream=None) -> None:
        self.total, self.enabled = total, enabled
        self.stream = stream or sys.stderr
        self.began = time.perf_counter()
        self.last_draw = 0.0

    def update(self, done: float, text: str) -> None:
        now = time.perf_counter()
        if not self.enabled or now - self.last_draw < 0.1:
            return
        self.last_draw = now
        fraction = min(max(done / max(self.total, 1), 0.0), 1.0)
        elapsed = now - self.began
        eta = f" ~{_clock(elapsed * (1 - fraction) / fraction)} left" if fraction > 0.02 else ""
        width = 24
        filled = int(round(width * fraction))
        line = (f"[{'#' * filled}{'.' * (width - filled)}] {100 * fraction:3.0f}% "
                f"{int(done)}/{self.total} rows {_clock(elapsed)}{eta} | {text}")
        columns = shutil.get_terminal_size((120, 20)).columns - 1
        self.stream.write("\r" + line[:columns].ljust(columns))
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            columns = shutil.get_terminal_size((120, 20)).columns - 1
            self.stream.write("\r" + " " * columns + "\r")
            self.stream.flush()


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 60}:{seconds % 60:02d}"


def format_ms(ms: float) -> str:
    if ms >= 100:
        return f"{ms:.0f}"
    if ms >= 10:
        return f"{ms:.1f}"
    if ms >= 0.1:
        return f"{ms:.2f}"
    return f"{ms:.3f}"


def _shape_label(row: dict) -> str:
    return Shape(row["B"], row["T"], row["I"], row["H"]).label()


def _render(header: List[str], body: List[List[str]], left: int) -> List[str]:
    """Aligned columns: the first `left` ones flush left, the others flush right."""
    widths = [max(len(line[i]) for line in [header] + body) for i in range(len(header))]

    def join(cells, align=True):
        return "  ".join((c.ljust(w) if i < left or not align else c.rjust(w))
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    return [join(header, align=False), "  ".join("-" * w for w in widths)] + [join(b) for b in body]


def format_table(doc: dict) -> str:
    """The results as a text table: one row per (shape, mode, dtype), one column per provider."""
    rows, providers, machine = doc["results"], doc["providers"], doc["machine"]
    lines = [f"lstm_fused benchmark, {machine['date'][:10]}, {machine['device_name']}, "
             f"torch {machine['torch']}; {doc['config']['layers']} layer"
             f"{'s' if doc['config']['layers'] != 1 else ''}, "
             f"{'bidirectional' if doc['config']['bidirectional'] else 'unidirectional'}",
             f"median ms per call (speed-up vs {BASELINE}: >1x is faster); inference = forward "
             f"under no_grad, training = forward + backward, streaming = one step, the state "
             f"carried (the mean of {STREAM_STEPS} consecutive steps)"]
    # Providers skipped on every row for one reason get a line, not a column.
    dropped: Dict[str, str] = {}
    for name in providers:
        reasons = {(r["providers"][name]["status"], r["providers"][name]["reason"]) for r in rows}
        if len(reasons) == 1 and next(iter(reasons))[0] == "skip":
            dropped[name] = next(iter(reasons))[1]
    columns = [name for name in providers if name not in dropped]
    notes: List[str] = []

    def cell(result: dict, name: str) -> str:
        status = result["status"]
        if status == "ok":
            if not result["times_ms"]:
                return "checked"
            text = f"{format_ms(result['median_ms'])} ms"
            if name != BASELINE and result["speedup"] is not None:
                text += f" ({result['speedup']:.2f}x)"
            return text
        if status == "wrong":
            return f"wrong ({result['reason']})"
        note = f"{name}: {result['reason']}"
        if note not in notes:
            notes.append(note)
        return f"{status} [{notes.index(note) + 1}]"

    header = ["shape (B,T,I,H)", "set", "mode", "dtype"] + columns
    body = [[_shape_label(r), ",".join(r["sets"]), r["mode"], SHORT_DTYPE[r["dtype"]]]
            + [cell(r["providers"][name], name) for name in columns] for r in rows]
    lines += ["", *_render(header, body, left=4)]
    if not rows:
        lines.append("(no rows)")
    lines += [f"[{i + 1}] {note}" for i, note in enumerate(notes)]
    lines += [f"not run: {name}: {reason}" for name, reason in dropped.items()]
    if machine.get("cuda"):
        lines += ["", "peak memory of one call beyond what was allocated before it, MiB "
                  "(CUDA caching allocator; a CUDA graph's pool is allocated at capture)"]
        body = [[_shape_label(r), r["mode"], SHORT_DTYPE[r["dtype"]]]
                + ["-" if r["providers"][n]["peak_mem_mib"] is None
                   else f"{r['providers'][n]['peak_mem_mib']:.1f}" for n in columns] for r in rows]
        lines += _render(["shape (B,T,I,H)", "mode", "dtype"] + columns, body, left=3)
    else:
        lines.append("peak memory: n/a on CPU (measured on CUDA only)")
    load, cores = machine.get("load_average"), machine.get("cpu_count")
    if load is not None and cores and load > 0.75 * cores and not machine.get("cuda"):
        lines.append(f"warning: the machine was busy (1-min load average {load:.1f} on {cores} "
                     "CPUs before the run); CPU timings are unreliable")
    if doc.get("interrupted"):
        lines.append("(interrupted: partial results)")
    return "\n".join(lines)


CSV_FIELDS = ["B", "T", "I", "H", "sets", "mode", "dtype", "layers", "bidirectional", "provider",
              "status", "reason", "median_ms", "min_ms", "speedup", "repeats", "peak_mem_mib",
              "max_err", "setup_s"]


def write_csv(doc: dict, path: Path) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, CSV_FIELDS)
        writer.writeheader()
        for r in doc["results"]:
            for name, result in r["providers"].items():
                writer.writerow({
                    **{k: r[k] for k in ("B", "T", "I", "H", "mode", "dtype", "layers",
                                         "bidirectional")},
                    "sets": "+".join(r["sets"]), "provider": name,
                    "repeats": len(result["times_ms"]),
                    **{k: result.get(k) for k in ("status", "reason", "median_ms", "min_ms",
                                                  "speedup", "peak_mem_mib", "max_err",
                                                  "setup_s")},
                })


def write_plots(doc: dict, out: Path) -> List[Path]:
    """Time and speed-up against each sweep axis present, one panel per (mode, dtype)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed, so no plots were written "
              "(pip install matplotlib)", file=sys.stderr)
        return []
    written = []
    for sweep, (axis, label) in SWEEP_AXES.items():
        rows = [r for r in doc["results"] if sweep in r["sets"]]
        if not rows:
            continue
        panels = sorted({(r["mode"], r["dtype"]) for r in rows},
                        key=lambda p: (MODES.index(p[0]), list(DTYPES).index(p[1])))
        fixed = []
        for other in "BTIH":
            values = {r[other] for r in rows}
            if other == "I" and axis == "H" and all(r["I"] == r["H"] for r in rows):
                fixed.append("I=H")
            elif other != axis and len(values) == 1:
                fixed.append(f"{other}={values.pop()}")
        for kind in ("time", "speedup"):
            figure, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2),
                                        squeeze=False)
            for ax, (mode, dtype) in zip(axes[0], panels):
                selected = sorted((r for r in rows if r["mode"] == mode and r["dtype"] == dtype),
                                  key=lambda r: r[axis])
                for name in doc["providers"]:
                    if kind == "speedup" and name == BASELINE:
                        continue
                    key = "median_ms" if kind == "time" else "speedup"
                    points = [(r[axis], r["providers"][name][key]) for r in selected
                              if r["providers"][name].get(key) is not None]
                    if points:
                        ax.plot(*zip(*points), marker="o", label=name)
                if kind == "speedup":
                    ax.axhline(1.0, color="grey", linestyle="--", linewidth=1, label=BASELINE)
                    ax.set_ylabel(f"speed-up vs {BASELINE} (>1 is faster)")
                else:
                    ax.set_yscale("log")
                    ax.set_ylabel("median ms per call")
                ax.set_xscale("log", base=2)
                ticks = sorted({r[axis] for r in selected})
                ax.set_xticks(ticks, [str(t) for t in ticks])
                ax.minorticks_off() if kind == "speedup" else None
                ax.set_xlabel(label)
                ax.set_title(f"{mode}, {dtype}")
                ax.grid(True, which="both", alpha=0.3)
                ax.legend(fontsize=8)
            figure.suptitle(f"{'time' if kind == 'time' else 'speed-up'} vs {label.split(' (')[0]}"
                            f" ({', '.join(fixed)}) on {doc['machine']['device_name']}",
                            fontsize=10)
            figure.tight_layout()
            path = out / f"{kind}_vs_{sweep}.png"
            figure.savefig(path, dpi=110)
            plt.close(figure)
            written.append(path)
    return written


# The CPU features that decide which kernels run, as /proc/cpuinfo names them.
CPU_FEATURES = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16")


def cpu_model_and_features() -> Tuple[str, List[str]]:
    cpu, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name") and cpu == (platform.processor() or
                                                             platform.machine()):
                    cpu = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    return cpu, [f for f in CPU_FEATURES if f in flags]


def machine_info(device: torch.device) -> dict:
    cpu, features = cpu_model_and_features()
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": str(device),
        "cpu": cpu,
        "cpu_features": features,
        "cpu_count": os.cpu_count(),
        # The CPU kernels lstm_fused picks by default (its most capable instruction set).
        "lstm_fused_isa": (lstm_fused.available_isas()[0]
                           if lstm_fused is not None and hasattr(lstm_fused, "available_isas")
                           else None),
        "threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lstm_fused": getattr(lstm_fused, "__version__", None),
        "cuda": None, "cudnn": None, "gpu": None,
    }
    threads, cores = info["threads"], info["cpu_count"]
    isa = f", lstm_fused kernels {info['lstm_fused_isa']}" if info["lstm_fused_isa"] else ""
    info["device_name"] = (f"CPU {cpu} ({cores} cores, {' '.join(features) or 'no AVX2'}{isa}; "
                           f"{threads} thread{'s' if threads != 1 else ''})")
    if device.type == "cuda":
        info.update(cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                    gpu=torch.cuda.get_device_name(device),
                    cudnn_allow_tf32=torch.backends.cudnn.allow_tf32,
                    matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32)
        info["device_name"] = f"GPU {info['gpu']}"
    return info


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------

def _csv_list(text: str) -> List[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _shape(text: str) -> Shape:
    try:
        values = [int(v) for v in text.replace("x", ",").split(",")]
        if len(values) != 4 or min(values) < 1:
            raise ValueError
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected B,T,I,H (four positive integers), got {text!r}")
    return Shape(*values)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Benchmark lstm_fused.LSTM against torch.nn.LSTM and friends.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu, cuda or cuda:N")
    parser.add_argument("--dtype", default=None,
                        help="comma list of float32, bfloat16, float16 (default: float32 on CPU, "
                             "float32,bfloat16 on CUDA)")
    parser.add_argument("--mode", default="inference,training,streaming",
                        help="comma list of inference (no_grad forward), training "
                             "(forward+backward), streaming (one step per call, the state "
                             "carried; the streaming set's rows only)")
    parser.add_argument("--providers", default="*",
                        help="comma list of provider names or globs (see --list-providers)")
    parser.add_argument("--list-providers", action="store_true",
                        help="print the providers and exit")
    grid = parser.add_mutually_exclusive_group()
    grid.add_argument("--quick", action="store_true",
                      help="the small default grid: goal shapes + short sweeps, ~2 min on 2 cores")
    grid.add_argument("--smoke", action="store_true",
                      help="a tiny grid with 1 repeat, to check the harness end to end")
    parser.add_argument("--shape", type=_shape, action="append", default=[], metavar="B,T,I,H",
                        help="run this shape (repeatable); replaces the grid's shapes unless "
                             "--sets is given too")
    parser.add_argument("--sets", default=None,
                        help="comma list of goals, streaming, persistent (GPU), batch, hidden, "
                             "seq: which parts of the grid to run (default: all of the chosen "
                             "grid)")
    parser.add_argument("--layers", type=int, default=1, help="num_layers of the LSTM")
    parser.add_argument("--bidirectional", action="store_true", help="bidirectional LSTM")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed rounds per row (default 20; --quick 15; --smoke 1)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed rounds after the correctness check (default 2; --quick 1; "
                             "--smoke 0)")
    parser.add_argument("--row-budget", type=float, default=None,
                        help="seconds; stop adding rounds to a row after this long once it has 3 "
                             "(default 20; --quick 2.5)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--compile-max-steps", type=int, default=256,
                        help="compiled-loop skips longer sequences (it unrolls the loop)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None,
                        help="directory for results.json, results.csv, table.txt and PNG plots")
    progress = parser.add_mutually_exclusive_group()
    progress.add_argument("--progress", dest="progress", action="store_true", default=None,
                          help="draw the progress bar even if stderr is not a terminal")
    progress.add_argument("--no-progress", dest="progress", action="store_false")
    args = parser.parse_args(argv)

    args.grid = "smoke" if args.smoke else "quick" if args.quick else "full"
    defaults = {"full": (20, 2, 20.0), "quick": (15, 1, 2.5), "smoke": (1, 0, 0.0)}[args.grid]
    for name, default in zip(("repeats", "warmup", "row_budget"), defaults):
        if getattr(args, name) is None:
            setattr(args, name, default)
    if args.repeats < 1 or args.warmup < 0 or args.layers < 1:
        parser.error("--repeats and --layers must be >= 1, --warmup >= 0")
    args.device = torch.device(args.device)
    if args.device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available on this machine")
    dtypes = args.dtype or ("float32,bfloat16" if args.device.type == "cuda" else "float32")
    args.dtypes = [DTYPE_ALIASES.get(d, d) for d in _csv_list(dtypes)]
    args.modes = _csv_list(args.mode)
    args.sets = None if args.sets is None else _csv_list(args.sets)
    for value, allowed, what in ((args.dtypes, DTYPES, "--dtype"), (args.modes, MODES, "--mode"),
                                 (args.sets or [], ["goals", "streaming", "persistent", "batch",
                                                    "hidden", "seq"], "--sets")):
        unknown = [v for v in value if v not in allowed]
        if unknown:
            parser.error(f"{what}: unknown {unknown}; choose from {list(allowed)}")
    args.parser = parser
    return args


def select_providers(patterns: str, registry: Dict[str, Factory], parser) -> Dict[str, Factory]:
    chosen: Dict[str, Factory] = {}
    for pattern in _csv_list(patterns):
        matches = [name for name in registry if fnmatch.fnmatchcase(name, pattern)]
        if not matches:
            parser.error(f"--providers: no provider matches {pattern!r}; "
                         f"available: {', '.join(registry)}")
        for name in matches:
            chosen[name] = registry[name]
    return chosen


def main(argv: Optional[Sequence[str]] = None,
         providers: Optional[Dict[str, Factory]] = None) -> dict:
    """Runs the benchmark, prints the table, writes --out; returns the results document.
    providers replaces the registry (the tests inject a deliberately wrong provider this way)."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    registry = providers if providers is not None else default_providers(args.device)
    if args.list_providers:
        for name, factory in registry.items():
            doc = (factory.__doc__ or "").strip().splitlines()
            print(f"{name:18s} {doc[0] if doc else ''}")
        return {}
    chosen = select_providers(args.providers, registry, args.parser)

    grid = build_grid(args.grid, args.device, args.sets, args.shape)
    rows = [(entry, mode, dtype) for entry in grid for mode in args.modes if entry.runs(mode)
            for dtype in args.dtypes]
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    progress = Progress(len(rows), sys.stderr.isatty() if args.progress is None else args.progress)
    began = time.perf_counter()
    results, interrupted = [], False
    try:
        for k, (entry, mode, dtype) in enumerate(rows):
            label = f"{entry.shape.label()} {mode} {SHORT_DTYPE[dtype]}"

            def report(what: str, fraction: float, k=k, label=label) -> None:
                progress.update(k + fraction, f"{label}: {what}")
            results.append(bench_case(entry, mode, dtype, args.device, args, chosen, report))
            progress.update(k + 1, f"{label}: done")
    except KeyboardInterrupt:
        interrupted = True
    progress.close()

    doc = {
        "machine": dict(machine_info(args.device), load_average=load_before),
        "config": {"grid": args.grid, "device": str(args.device), "dtypes": args.dtypes,
                   "modes": args.modes, "layers": args.layers,
                   "bidirectional": args.bidirectional, "repeats": args.repeats,
                   "warmup": args.warmup, "row_budget_s": args.row_budget, "seed": args.seed,
                   "argv": list(sys.argv[1:] if argv is None else argv)},
        "providers": list(chosen),
        "results": results,
        "wall_s": round(time.perf_counter() - began, 2),
        "interrupted": interrupted,
    }
    table = format_table(doc)
    print(table)
    print(f"({len(results)} rows in {_clock(doc['wall_s'])})")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps(doc, indent=1) + "\n")
        write_csv(doc, args.out / "results.csv")
        (args.out / "table.txt").write_text(table + "\n")
        plots = write_plots(doc, args.out)
        print(f"wrote results.json, results.csv, table.txt"
              f"{' and ' + str(len(plots)) + ' plots' if plots else ''} to {args.out}")
    return doc


if __name__ == "__main__":
    main()
