"""lstm_fused: a drop-in torch.nn.LSTM backed by fused C++/CUDA kernels.

    from lstm_fused import LSTM            # same signature, parameters and outputs as nn.LSTM
    model = lstm_fused.replace_lstm(model)  # or swap every nn.LSTM inside an existing model
"""
from . import ops  # noqa: F401  (registers fake kernels and autograd for torch.ops.lstm_fused)
from .functional import lstm
from .modules import LSTM, replace_lstm
from .paths import available_isas, available_paths, force_isa, force_path
from .reference import lstm_reference

__all__ = ["LSTM", "available_isas", "available_paths", "force_isa", "force_path", "lstm",
           "lstm_reference", "replace_lstm"]
__version__ = "0.1.0"
