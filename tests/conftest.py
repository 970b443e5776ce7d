"""Shared test tables: optimizers x dtypes, and tolerances (one place per dtype)."""

from __future__ import annotations

import pytest
import torch

import lionkit
from lionkit import config

DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# Relative tolerance of a parameter after one step, against the float64 reference: the
# parameter is rounded once to its dtype, so half an ulp of that dtype, plus fp32 arithmetic.
PARAM_RTOL = {torch.float32: 2.5e-7, torch.float16: 2**-11 + 1e-6, torch.bfloat16: 2**-8 + 1e-6}
# ...and half the spacing of the dtype's subnormals, for results that round into that range.
PARAM_ATOL = {d: torch.finfo(d).smallest_normal * torch.finfo(d).eps / 2 for d in PARAM_RTOL}


# a torch without Tensor.grad_dtype (2.4 has none) refuses a gradient of another dtype than its parameter's
NEEDS_GRAD_DTYPE = pytest.mark.skipif(
    not hasattr(torch.Tensor, "grad_dtype"),
    reason=f"torch {torch.__version__} has no Tensor.grad_dtype: a gradient must have its parameter's dtype",
)


@pytest.fixture(autouse=True)
def _fresh_manager():
    """Overrides are process-global: every test starts and ends with none."""
    config.GlobalOptimManager.get_instance().initialize()
    yield
    config.GlobalOptimManager.get_instance().initialize()


def bnb_or_skip():
    """The bitsandbytes module, or skip the test with the reason."""
    bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes not installed (pip install 'lionkit[peers]')")
    try:
        p = torch.nn.Parameter(torch.zeros(8))
        p.grad = torch.ones(8)
        bnb.optim.Lion([p], lr=1e-3).step()
    except Exception as e:  # e.g. a bnb build without a working CPU backend
        pytest.skip(f"bitsandbytes is installed but its Lion does not run on this CPU: {e}")
    return bnb
