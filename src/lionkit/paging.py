"""Paged optimizer state: large state tensors in CUDA unified (managed) memory.

Why: under GPU memory pressure the driver migrates managed pages to host RAM instead of
failing with out-of-memory, and brings them back on access. Each paged tensor is prefetched to
its GPU before its update, so a step does not fault page by page. It helps when the state does
not quite fit; when it fits, it costs a little (prefetch calls) and gains nothing.

How: ``cudaMallocManaged`` through NVIDIA's maintained ``cuda-python`` binding (extra
``lionkit[paged]``), wrapped as a torch tensor through ``__cuda_array_interface__``; the memory
is freed when the tensor is. On machines without CUDA, state stays in ordinary memory and the
optimizer warns once.
"""

from __future__ import annotations

import warnings

import torch

from . import guards

PAGED_MIN_NUMEL = 100_000  # smaller tensors (and absmax, the map) stay in ordinary device memory


def _cudart():
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cudart  # older cuda-python
        except ImportError:
            raise ImportError(
                "Paged optimizer state on CUDA needs NVIDIA's cuda-python binding: "
                "pip install 'lionkit[paged]'  (or: pip install cuda-python)"
            ) from None
    return cudart


def _check(result, what: str):
    err, *rest = result
    if int(err) != 0:
        raise RuntimeError(f"{what} failed with CUDA error {err}")
    return rest[0] if len(rest) == 1 else rest


class _ManagedBuffer:
    """Owns one managed allocation; torch keeps it alive as long as the tensor lives."""

    def __init__(self, nbytes: int, shape: tuple[int, ...], typestr: str) -> None:
        self._cudart = _cudart()
        self.ptr = int(_check(self._cudart.cudaMallocManaged(max(nbytes, 1), self._cudart.cudaMemAttachGlobal.value), "cudaMallocManaged"))
        self.nbytes = nbytes
        self.__cuda_array_interface__ = {"shape": shape, "typestr": typestr, "data": (self.ptr, False), "version": 3}

    def __del__(self) -> None:
        if getattr(self, "ptr", 0):
            self._cudart.cudaFree(self.ptr)
            self.ptr = 0


_TYPESTR = {torch.float32: "<f4", torch.uint8: "|u1"}


def zeros(shape: torch.Size, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zero tensor in managed memory on ``device`` (a CUDA device)."""
    numel = 1
    for s in shape:
        numel *= s
    buf = _ManagedBuffer(numel * torch.empty((), dtype=dtype).element_size(), tuple(shape), _TYPESTR[dtype])
    with torch.cuda.device(device):
        t = torch.as_tensor(buf, device=device)
    t.zero_()
    return t


def is_managed(t: torch.Tensor) -> bool:
    """True if ``t``'s memory is CUDA managed memory."""
    if t.device.type != "cuda":
        return False
    cudart = _cudart()
    attrs = _check(cudart.cudaPointerGetAttributes(t.data_ptr()), "cudaPointerGetAttributes")
    return int(attrs.type) == int(cudart.cudaMemoryType.cudaMemoryTypeManaged)


def prefetch(t: torch.Tensor) -> None:
    """Ask the driver to migrate ``t`` to its GPU on the current stream, ahead of the update."""
    cudart = _cudart()
    stream = torch.cuda.current_stream(t.device).cuda_stream
    nbytes = t.numel() * t.element_size()
    try:  # CUDA 13 takes a location struct and flags
        loc = cudart.cudaMemLocation()
        loc.type = cudart.cudaMemLocationType.cudaMemLocationTypeDevice
        loc.id = t.device.index or 0
        _check(cudart.cudaMemPrefetchAsync(t.data_ptr(), nbytes, loc, 0, stream), "cudaMemPrefetchAsync")
    except (TypeError, AttributeError):  # CUDA 12: device ordinal
        _check(cudart.cudaMemPrefetchAsync(t.data_ptr(), nbytes, t.device.index or 0, stream), "cudaMemPrefetchAsync")


def state_zeros(
    like: torch.Tensor, dtype: torch.dtype, paged: bool, shape: tuple[int, ...] | None = None
) -> torch.Tensor:
    """Zero state for ``like`` (shaped like it, or ``shape``): managed memory when paged on CUDA
    and ``like`` is large enough."""
    shape = like.shape if shape is None else shape
    if paged and like.device.type == "cuda" and like.numel() >= PAGED_MIN_NUMEL:
        return zeros(shape, dtype, like.device)
    return torch.zeros(shape, dtype=dtype, device=like.device)


def warn_if_unpageable(params) -> None:
    """One warning when paging was asked for but some state cannot be paged (no CUDA)."""
    if any(p.device.type != "cuda" for p in params):
        warnings.warn(
            "is_paged=True: paged state needs CUDA unified memory; parameters that are not on a "
            "CUDA device keep their optimizer state in ordinary memory.",
            UserWarning,
            stacklevel=guards.user_stacklevel(),
        )
