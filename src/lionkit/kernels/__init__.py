"""Update kernels, one module per backend, all with the signature of ``base.Backend``.

``resolve(name, device)`` picks the implementation: ``"auto"`` takes the fastest available
for the device, a named backend is used as asked (or refused with the reason).
"""

from __future__ import annotations

import torch

from .base import Backend, Momentum, StepHyper
from .torch_eager import TorchBackend

BACKEND_NAMES = ("auto", "torch", "compiled", "triton")
"""``torch``: eager reference, any device. ``compiled``: fused C++ kernel for CPU tensors,
built on first use (needs a C++ compiler). ``triton``: fused Triton kernels for CUDA tensors
(needs ``pip install 'lionkit[triton]'``). ``auto``: the fastest that works on the device."""

_cache: dict[tuple[str, str], Backend] = {}
_unavailable: dict[str, str] = {}  # backend name -> why "auto" could not use it


def _make(name: str, auto: bool = False) -> Backend:
    if name == "compiled":
        from .compiled import CompiledBackend

        return CompiledBackend()
    if name == "triton":
        from .triton_lion import TritonBackend

        return TritonBackend(fallback_on_error=auto)
    return TorchBackend()


def resolve(name: str, device: torch.device) -> Backend:
    """The backend object for ``name`` on ``device``.

    A named backend that cannot run there raises (ValueError for the wrong device, ImportError
    or RuntimeError with the reason otherwise); ``"auto"`` falls back to ``torch`` and records
    why in ``unavailable()``.
    """
    if name not in BACKEND_NAMES:
        raise ValueError(f"Invalid backend: {name!r} (must be one of {', '.join(BACKEND_NAMES)})")
    kind = torch.device(device).type
    key = (name, kind)
    backend = _cache.get(key)
    if backend is not None:
        return backend
    if name == "auto":
        fast = {"cpu": "compiled", "cuda": "triton"}.get(kind)
        backend = None
        if fast is not None and fast not in _unavailable:
            try:
                backend = _make(fast, auto=True)
            except (ImportError, RuntimeError, OSError) as e:
                _unavailable[fast] = f"{type(e).__name__}: {e}"
        backend = backend or resolve("torch", device)
    else:
        wanted = {"compiled": "cpu", "triton": "cuda"}.get(name)
        if wanted is not None and kind != wanted:
            raise ValueError(f"backend {name!r} runs on {wanted} tensors, not on device {kind!r}")
        backend = _make(name)
    _cache[key] = backend
    return backend


def unavailable() -> dict[str, str]:
    """Fast backends that ``"auto"`` tried and could not use in this process, with the reason."""
    return dict(_unavailable)


__all__ = ["Backend", "Momentum", "StepHyper", "resolve", "unavailable", "BACKEND_NAMES"]
