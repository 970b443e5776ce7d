"""Update kernels, one module per backend, all with the signature of ``base.Backend``.

``resolve(name, device)`` picks the implementation: ``"auto"`` takes the fastest available
for the device, a named backend is used as asked (or refused with the reason).
"""

from __future__ import annotations

import torch

from .base import Backend, Momentum, StepHyper
from .torch_eager import TorchBackend

BACKEND_NAMES = ("auto", "torch")


def resolve(name: str, device: torch.device) -> Backend:
    """The backend object for ``name`` on ``device``."""
    if name not in BACKEND_NAMES:
        raise ValueError(f"Invalid backend: {name!r} (must be one of {', '.join(BACKEND_NAMES)})")
    return TorchBackend()


__all__ = ["Backend", "Momentum", "StepHyper", "resolve", "BACKEND_NAMES"]
