import pytest
import torch

# The shared test code lives in lstm_testing.py; these names are re-exported for test files that
# still import them from here.
from lstm_testing import (  # noqa: F401
    OP_GRAD_NAMES, TOLERANCES, assert_close_to, float64_copy, make_pair, op_reference)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
