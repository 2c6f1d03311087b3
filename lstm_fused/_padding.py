"""The padded steps of sequences of different lengths (the ops' `lengths` argument).

The contract (csrc/lstm.h): at a padded step t >= lengths[b] the op carries the state of
sequence b unchanged and its y holds that carried h; lstm_fused.lstm, like nn.LSTM, returns
zeros there. This is the one mask for it, shared by functional.lstm, the reference and the tests.
"""
import torch
from torch import Tensor


def padded_steps(lengths: Tensor, seq_len: int) -> Tensor:
    """[T, B, 1] bool on lengths' device: True where step t is past the end of sequence b
    (t >= lengths[b])."""
    steps = torch.arange(seq_len, device=lengths.device)
    return (steps[:, None] >= lengths[None, :])[:, :, None]


def zero_padded_steps(output: Tensor, lengths: Tensor) -> Tensor:
    """output [T, B, P] with zeros at the padded steps."""
    return output.masked_fill(padded_steps(lengths, output.shape[0]), 0.0)
