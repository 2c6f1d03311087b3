"""lstm_fused.LSTM: torch.nn.LSTM's contract, computed by the lstm_fused ops."""
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from ._padding import zero_padded_steps
from .functional import lstm, lstm_bidirectional

# The checks of LSTM._unidirectional_call, looked up once.
_is_compiling = torch.compiler.is_compiling
_is_autocast_enabled = torch._C._is_any_autocast_enabled
_is_tracing = torch._C._is_tracing


class LSTM(nn.RNNBase):
    """A drop-in replacement for torch.nn.LSTM.

    Same constructor, validation, parameter names, shapes, order and initialisation (the base
    class is nn.LSTM's own), so state_dicts load both ways; same inputs (batched [T, B, I] or
    [B, T, I] with batch_first, unbatched [T, I], PackedSequence, hx given or omitted) and outputs
    (output, (h_n, c_n)). Each layer and direction runs as one lstm_fused op. Unlike nn.LSTM it
    compiles under torch.compile(fullgraph=True) without a graph break.
    """

    get_expected_cell_size = nn.LSTM.get_expected_cell_size
    permute_hidden = nn.LSTM.permute_hidden

    def check_forward_args(self, input: Tensor, hidden: Tuple[Tensor, Tensor],
                           batch_sizes: Optional[Tensor]) -> None:
        """nn.LSTM.check_forward_args: nn.LSTM's own checks and messages. Called as functions, not
        methods: torch.compile before PyTorch 2.5 cannot trace a torch.nn method called with
        non-tensor arguments."""
        if torch.jit.is_scripting():  # TorchScript compiles methods, not class attributes
            self.check_input(input, batch_sizes)
            self.check_hidden_size(hidden[0], self.get_expected_hidden_size(input, batch_sizes),
                                   "Expected hidden[0] size {}, got {}")
            self.check_hidden_size(hidden[1], self.get_expected_cell_size(input, batch_sizes),
                                   "Expected hidden[1] size {}, got {}")
        else:
            if self._forward_args_ok(input, hidden, batch_sizes):
                return
            nn.RNNBase.check_input(self, input, batch_sizes)
            nn.RNNBase.check_hidden_size(
                self, hidden[0], nn.RNNBase.get_expected_hidden_size(self, input, batch_sizes),
                "Expected hidden[0] size {}, got {}")
            nn.RNNBase.check_hidden_size(
                self, hidden[1], nn.LSTM.get_expected_cell_size(self, input, batch_sizes),
                "Expected hidden[1] size {}, got {}")

    def _forward_args_ok(self, input: Tensor, hidden: Tuple[Tensor, Tensor],
                         batch_sizes: Optional[Tensor]) -> bool:
        """Whether nn.LSTM's checks pass, in a few comparisons (a single step's Python time is
        mostly such calls); if not, check_forward_args runs them for their messages."""
        if input.dtype != self._flat_weights[0].dtype and not torch._C._is_any_autocast_enabled():
            return False
        if batch_sizes is not None or input.dim() != 3:  # packed input: nn.LSTM's checks
            return False
        batch = input.size(0) if self.batch_first else input.size(1)
        if input.size(-1) != self.input_size:
            return False
        layers = self.num_layers * (2 if self.bidirectional else 1)
        output_size = self.proj_size if self.proj_size > 0 else self.hidden_size
        return (hidden[0].size() == (layers, batch, output_size)
                and hidden[1].size() == (layers, batch, self.hidden_size))

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        proj_size: int = 0,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__("LSTM", input_size, hidden_size, num_layers, bias, batch_first, dropout,
                         bidirectional, proj_size, device, dtype)

    @classmethod
    def from_torch(cls, module: nn.LSTM) -> "LSTM":
        """An lstm_fused.LSTM sharing module's configuration and its very Parameter objects (so an
        optimizer built on module keeps training the new one)."""
        if not isinstance(module, nn.LSTM):
            raise TypeError(f"LSTM.from_torch expects a torch.nn.LSTM, got {type(module).__name__}")
        first = getattr(module, module._flat_weights_names[0])
        converted = cls(module.input_size, module.hidden_size, module.num_layers, module.bias,
                        module.batch_first, float(module.dropout), module.bidirectional,
                        module.proj_size, device="meta", dtype=first.dtype)
        for name in module._flat_weights_names:
            setattr(converted, name, getattr(module, name))
        converted.train(module.training)
        return converted

    def _zero_state(self, input: Tensor, batch: int) -> Tuple[Tensor, Tensor]:
        layers = self.num_layers * (2 if self.bidirectional else 1)
        output_size = self.proj_size if self.proj_size > 0 else self.hidden_size
        dtype, device = input.dtype, input.device
        return (torch.zeros(layers, batch, output_size, dtype=dtype, device=device),
                torch.zeros(layers, batch, self.hidden_size, dtype=dtype, device=device))

    # As nn.LSTM declares it, so that torch.jit.script compiles forward once for each input type.
    @torch._jit_internal._overload_method
    def forward(self, input: Tensor, hx: Optional[Tuple[Tensor, Tensor]] = None
                ) -> Tuple[Tensor, Tuple[Tensor, Tensor]]:
        pass

    @torch._jit_internal._overload_method
    def forward(  # noqa: F811
        self, input: PackedSequence, hx: Optional[Tuple[Tensor, Tensor]] = None
    ) -> Tuple[PackedSequence, Tuple[Tensor, Tensor]]:
        pass

    def forward(self, input, hx=None):  # noqa: F811
        if not torch.jit.is_scripting():
            result = self._unidirectional_call(input, hx)
            if result is not None:
                return result
        if not torch.jit.is_scripting() and hx is not None and not (
            isinstance(hx, (tuple, list)) and len(hx) == 2
            and isinstance(hx[0], Tensor) and isinstance(hx[1], Tensor)
        ):
            raise TypeError(
                f"LSTM: hx must be a tuple (h_0, c_0) of two tensors, got {type(hx).__name__}")
        if isinstance(input, PackedSequence):
            return self._forward_packed(input, hx)
        if input.dim() not in (2, 3):
            raise ValueError(f"LSTM: Expected input to be 2D or 3D, got {input.dim()}D instead")
        is_batched = input.dim() == 3
        batch_dim = 0 if self.batch_first else 1
        if not is_batched:
            input = input.unsqueeze(batch_dim)
        if hx is None:
            hx = self._zero_state(input, input.size(batch_dim))
        elif is_batched:
            if hx[0].dim() != 3 or hx[1].dim() != 3:
                raise RuntimeError(
                    "For batched 3-D input, hx and cx should also be 3-D but got "
                    f"({hx[0].dim()}-D, {hx[1].dim()}-D) tensors")
        else:
            if hx[0].dim() != 2 or hx[1].dim() != 2:
                raise RuntimeError(
                    "For unbatched 2-D input, hx and cx should also be 2-D but got "
                    f"({hx[0].dim()}-D, {hx[1].dim()}-D) tensors")
            hx = (hx[0].unsqueeze(1), hx[1].unsqueeze(1))
        self.check_forward_args(input, hx, None)
        if input.size(1 if self.batch_first else 0) == 0:
            raise RuntimeError("Expected sequence length to be larger than 0 in RNN")

        sequence = input.transpose(0, 1) if self.batch_first else input
        output, h_n, c_n = self._run_layers(sequence, hx, lengths=None)
        if self.batch_first:
            output = output.transpose(0, 1)
        if not is_batched:
            output = output.squeeze(batch_dim)
            h_n, c_n = h_n.squeeze(1), c_n.squeeze(1)
        return output, (h_n, c_n)

    def _unidirectional_call(self, input, hx) -> Optional[Tuple[Tensor, Tuple[Tensor, Tensor]]]:
        """forward in as few Python operations as can check it, for the calls where the Python
        around the ops costs as much as the ops (a single step of a stream, short sequences):
        one direction, a 3-D tensor, hx omitted or (h_0, c_0), in eager mode. None for every
        other call and for any argument the general path must check; forward then takes that
        path. Past the checks, one op (lstm_fused::layers) runs the general path's layer loop in
        C++, where each view and call costs a fraction of what it costs from Python."""
        # Exact types: tensor subclasses (fake, functional), traces and compiles take the
        # general path. Each tensor method or torch function called from Python costs about a
        # microsecond on a slow host, as much as an H = 32 step's arithmetic: the shape is read
        # once, and torch.compile meets _is_compiling before the C functions it cannot trace.
        if self.bidirectional or type(input) is not Tensor:
            return None
        shape = input.shape
        if len(shape) != 3 or _is_compiling() or _is_autocast_enabled() or _is_tracing():
            return None
        layers = self.num_layers
        batch_first = self.batch_first
        batch = shape[0] if batch_first else shape[1]
        weights = [self._weight(name) for name in self._flat_weights_names]
        if (input.dtype != weights[0].dtype or shape[2] != self.input_size
                or shape[1 if batch_first else 0] == 0):
            return None
        hidden_size = self.hidden_size
        output_size = self.proj_size or hidden_size
        if hx is None:
            h0 = input.new_zeros(layers, batch, output_size)
            c0 = input.new_zeros(layers, batch, hidden_size)
        else:
            if type(hx) not in (tuple, list) or len(hx) != 2:
                return None
            h0, c0 = hx
            if (type(h0) is not Tensor or type(c0) is not Tensor
                    or h0.shape != (layers, batch, output_size)
                    or c0.shape != (layers, batch, hidden_size)):
                return None
        output, h_n, c_n = torch.ops.lstm_fused.layers.default(
            input, (h0, c0), weights, self.bias, layers, float(self.dropout), self.training,
            batch_first)
        return output, (h_n, c_n)

    def _forward_packed(self, packed: PackedSequence, hx: Optional[Tuple[Tensor, Tensor]]
                        ) -> Tuple[PackedSequence, Tuple[Tensor, Tensor]]:
        data, batch_sizes, sorted_indices, unsorted_indices = packed
        # Padded, in the caller's batch order, like hx and h_n.
        padded, lengths = pad_packed_sequence(packed)
        if hx is None:
            hx = self._zero_state(padded, padded.size(1))  # a size a traced graph keeps dynamic
        self.check_forward_args(data, hx, batch_sizes)
        output, h_n, c_n = self._run_layers(padded, hx, lengths.to(padded.device))
        if sorted_indices is not None:
            output = output.index_select(1, sorted_indices)
            lengths = lengths.index_select(0, sorted_indices.cpu())
        # Equal to packed's batch sizes; taking this packing's own lets a traced graph pair each
        # packing with its unpacking, as the ONNX exporter needs.
        repacked = pack_padded_sequence(output, lengths, enforce_sorted=True)
        output = PackedSequence(repacked.data, repacked.batch_sizes, sorted_indices,
                                unsorted_indices)
        return output, (h_n, c_n)

    def _run_layers(self, sequence: Tensor, hx: Tuple[Tensor, Tensor],
                    lengths: Optional[Tensor]) -> Tuple[Tensor, Tensor, Tensor]:
        """sequence: [T, B, I]; hx: ([L*D, B, P], [L*D, B, H]) -> ([T, B, D*P], h_n, c_n)."""
        h0, c0 = hx
        num_directions = 2 if self.bidirectional else 1
        if not torch.jit.is_scripting():
            return self._run_layers_by_name(sequence, h0, c0, num_directions, lengths)
        return self._run_layers_scripted(sequence, h0, c0, num_directions, lengths)

    def _run_layers_scripted(self, sequence: Tensor, h0: Tensor, c0: Tensor, num_directions: int,
                             lengths: Optional[Tensor]) -> Tuple[Tensor, Tensor, Tensor]:
        h_n: List[Tensor] = []
        c_n: List[Tensor] = []
        for layer in range(self.num_layers):
            outputs: List[Tensor] = []
            for direction in range(num_directions):
                index = layer * num_directions + direction
                output, h, c = self._scripted_layer(sequence, h0[index], c0[index], index,
                                                    direction == 1, lengths)
                outputs.append(output)
                h_n.append(h)
                c_n.append(c)
            sequence = outputs[0] if num_directions == 1 else torch.cat(outputs, dim=2)
            if self.dropout > 0 and self.training and layer < self.num_layers - 1:
                sequence = F.dropout(sequence, self.dropout, training=True)
        return sequence, torch.stack(h_n), torch.stack(c_n)

    def _run_layers_by_name(self, sequence: Tensor, h0: Tensor, c0: Tensor, num_directions: int,
                            lengths: Optional[Tensor]) -> Tuple[Tensor, Tensor, Tensor]:
        """_run_layers outside TorchScript: the weights by name (torch.func.functional_call
        replaces parameters without updating _flat_weights)."""
        h0_layers, c0_layers = h0.unbind(0), c0.unbind(0)
        h_n: List[Tensor] = []
        c_n: List[Tensor] = []
        for layer in range(self.num_layers):
            if num_directions == 2 and _both_directions_in_one_op():
                states = slice(2 * layer, 2 * layer + 2)
                sequence, (h, c) = lstm_bidirectional(
                    sequence, (h0[states], c0[states]), self._layer_weights(2 * layer),
                    self._layer_weights(2 * layer + 1), lengths=lengths)
                h_n.extend(h.unbind(0))
                c_n.extend(c.unbind(0))
            else:
                outputs: List[Tensor] = []
                for direction in range(num_directions):
                    index = layer * num_directions + direction
                    output, (h, c) = lstm(sequence, (h0_layers[index], c0_layers[index]),
                                          *self._layer_weights(index), reverse=direction == 1,
                                          lengths=lengths)
                    outputs.append(output)
                    h_n.append(h)
                    c_n.append(c)
                sequence = outputs[0] if num_directions == 1 else torch.cat(outputs, dim=2)
            if self.dropout > 0 and self.training and layer < self.num_layers - 1:
                sequence = F.dropout(sequence, self.dropout, training=True)
        if len(h_n) == 1:  # the op's fresh outputs, as views: no copy
            return sequence, h_n[0].unsqueeze(0), c_n[0].unsqueeze(0)
        return sequence, torch.stack(h_n), torch.stack(c_n)

    def _weight(self, name: str) -> Tensor:
        """getattr(self, name), reading _parameters first (nn.Module.__getattr__ is slow next to
        a single step); getattr finds what has left it (parametrizations, weight_norm)."""
        weight = self._parameters.get(name)
        return weight if weight is not None else getattr(self, name)

    def _scripted_layer(self, sequence: Tensor, h0: Tensor, c0: Tensor, index: int, reverse: bool,
                        lengths: Optional[Tensor]) -> Tuple[Tensor, Tensor, Tensor]:
        """What TorchScript runs for one layer and direction: parameters by position (names
        cannot be built there), in nn.LSTM's order w_ih, w_hh[, b_ih, b_hh][, w_hr]."""
        count = 2 + 2 * int(self.bias) + int(self.proj_size > 0)
        weights = self._flat_weights[index * count:(index + 1) * count]
        b_ih: Optional[Tensor] = weights[2] if self.bias else None
        b_hh: Optional[Tensor] = weights[3] if self.bias else None
        w_hr: Optional[Tensor] = weights[-1] if self.proj_size > 0 else None
        output, h_n, c_n = torch.ops.lstm_fused.layer(sequence, h0, c0, weights[0], weights[1],
                                                      b_ih, b_hh, w_hr, lengths, reverse)
        if lengths is not None:
            output = zero_padded_steps(output, lengths)
        return output, h_n, c_n

    def _layer_weights(self, index: int):
        """(weight_ih, weight_hh, bias_ih, bias_hh, weight_hr) of layer-and-direction index."""
        names = self._all_weights[index]  # without the biases or w_hr where the layer has none
        return (self._weight(names[0]), self._weight(names[1]),
                self._weight(names[2]) if self.bias else None,
                self._weight(names[3]) if self.bias else None,
                self._weight(names[-1]) if self.proj_size > 0 else None)


def _both_directions_in_one_op() -> bool:
    """Both directions of a bidirectional layer in one op (one CUDA launch where they fit on chip
    together), except where a trace or an exporter records the ops: they translate the
    one-direction ones."""
    return not (torch.jit.is_tracing() or torch.onnx.is_in_onnx_export())


def replace_lstm(module: nn.Module) -> nn.Module:
    """Swaps every torch.nn.LSTM inside module (module itself included) for lstm_fused.LSTM, in
    place, keeping the same Parameter objects, device and dtype. Returns the module (a new one if
    module itself was an nn.LSTM). Subclasses of nn.LSTM are left alone: their forward may differ.
    """
    converted: Dict[int, nn.Module] = {}

    def convert(child: nn.Module) -> nn.Module:
        if type(child) is nn.LSTM:
            if id(child) not in converted:  # a module used twice stays shared
                converted[id(child)] = LSTM.from_torch(child)
            return converted[id(child)]
        # Not named_children(): it lists a module used under two names only once.
        for name, grandchild in list(child._modules.items()):
            if grandchild is None:
                continue
            replacement = convert(grandchild)
            if replacement is not grandchild:
                setattr(child, name, replacement)
        return child

    return convert(module)
