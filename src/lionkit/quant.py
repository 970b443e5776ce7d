"""8-bit quantization primitives: bitsandbytes' signed dynamic map, nearest-code rounding,
block-wise and per-tensor (de)quantization.

Everything here is a pure function of tensors; the optimizer state type lives in ``qstate.py``
and the fused update kernels in ``kernels/``. Where 8-bit rounding is decided: ``quantize``.
"""

from __future__ import annotations

import functools

import torch

BLOCK_SIZE = 256
"""Elements per block in block-wise quantization (bitsandbytes' optimizer block size)."""

MAP_SIZE = 256


@functools.lru_cache(maxsize=None)
def _dynamic_map_cpu() -> torch.Tensor:
    # The format is bitsandbytes' `create_dynamic_map(signed=True)` (Dettmers 2015, "8-bit
    # approximations"): for each decade i = 0..6 the 2**i midpoints of an fp32 linspace over
    # [0.1, 1] with 2**i + 1 points, scaled by 10**(i - 6), with both signs, plus 0 and +1.0.
    # The arithmetic (fp32 linspace, fp32 midpoint, fp32 product with a Python float) is kept
    # the same so the 256 values are bit-identical and states can be exchanged with bnb.
    values: list[float] = []
    for i in range(7):
        bounds = torch.linspace(0.1, 1.0, 2**i + 1, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        scaled = (10.0 ** (i - 6)) * means
        values += scaled.tolist()
        values += (-scaled).tolist()
    values += [0.0, 1.0]
    qmap = torch.tensor(values, dtype=torch.float32).sort().values
    assert qmap.numel() == MAP_SIZE
    return qmap


def dynamic_map(device: torch.device | str | None = None) -> torch.Tensor:
    """The 256-entry signed dynamic quantization map, sorted ascending (code 127 is 0, 255 is 1)."""
    qmap = _dynamic_map_cpu()
    return qmap.clone() if device is None else qmap.to(device, copy=True)


def validate_qmap(qmap: torch.Tensor, name: str = "qmap") -> None:
    """Raise ValueError unless ``qmap`` is a usable map: 256 finite fp32 values, strictly
    increasing, within [-1, 1], containing 0."""
    if not isinstance(qmap, torch.Tensor):
        raise ValueError(f"{name} must be a tensor, got {type(qmap).__name__}")
    if qmap.dtype != torch.float32 or qmap.dim() != 1 or qmap.numel() != MAP_SIZE:
        raise ValueError(
            f"{name} must be a 1-D float32 tensor of {MAP_SIZE} values, "
            f"got dtype={qmap.dtype}, shape={tuple(qmap.shape)}"
        )
    q = qmap.detach().cpu()
    if not torch.isfinite(q).all():
        raise ValueError(f"{name} contains non-finite values")
    if not (q[1:] > q[:-1]).all():
        raise ValueError(f"{name} must be strictly increasing")
    if q[0] < -1 or q[-1] > 1:
        raise ValueError(f"{name} must lie within [-1, 1], got [{q[0].item()}, {q[-1].item()}]")
    if not (q == 0).any():
        raise ValueError(f"{name} must contain 0 so that zero momentum stays exactly zero")


@functools.lru_cache(maxsize=16)
def _thresholds_cached(key: tuple[float, ...]) -> tuple[torch.Tensor, int]:
    q = torch.tensor(key, dtype=torch.float64)
    # Exact midpoints: the sum of two fp32 values of these magnitudes is exact in fp64.
    mid = (q[:-1] + q[1:]) / 2
    t = mid.to(torch.float32)
    # Smallest fp32 >= the exact midpoint, so `x >= t` decides `x >= mid` exactly for fp32 x:
    # rounding is to the nearest code, ties to the larger code.
    below = t.to(torch.float64) < mid
    t = torch.where(below, torch.nextafter(t, torch.tensor(float("inf"))), t)
    zero = int((q == 0).nonzero()[0, 0])
    return t, zero


def code_thresholds(qmap: torch.Tensor) -> tuple[torch.Tensor, int]:
    """fp32 decision thresholds between neighbouring codes (255 values) and the index of 0."""
    t, zero = _thresholds_cached(tuple(qmap.detach().cpu().tolist()))
    return t.to(qmap.device), zero


def nearest_code(normed: torch.Tensor, qmap: torch.Tensor) -> torch.Tensor:
    """Codes (uint8) of the map values nearest to ``normed`` (fp32 in [-1, 1]), sign kept.

    Nearest in exact arithmetic, ties to the larger code. A nonzero value never gets a code of
    the other sign or the zero code: it takes the smallest-magnitude code of its own sign
    instead, because Lion's direction depends on the sign of the momentum.
    """
    t, zero = code_thresholds(qmap)
    codes = torch.bucketize(normed, t, right=True)
    codes = torch.where((normed > 0) & (codes <= zero), zero + 1, codes)
    codes = torch.where((normed < 0) & (codes >= zero), zero - 1, codes)
    return codes.to(torch.uint8)


def nearest_code_bruteforce(normed: torch.Tensor, qmap: torch.Tensor) -> torch.Tensor:
    """Ground truth for ``nearest_code``: argmin over all 256 codes in float64, same rules."""
    flat = normed.detach().reshape(-1)
    q = qmap.detach().to(torch.float64).reshape(1, -1)
    idx = torch.arange(q.numel(), device=flat.device).reshape(1, -1)
    parts = []
    for s in range(0, flat.numel(), 1 << 15):  # bounded memory: 32K x 256 distances at a time
        x = flat[s : s + (1 << 15)].to(torch.float64).reshape(-1, 1)
        dist = (x - q).abs()
        best = dist.min(dim=1, keepdim=True).values
        # ties to the larger code: the last index attaining the minimum
        parts.append(torch.where(dist == best, idx, -1).amax(dim=1))
    codes = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long, device=flat.device)
    zero = int((qmap == 0).nonzero()[0, 0])
    codes = torch.where((flat > 0) & (codes <= zero), zero + 1, codes)
    codes = torch.where((flat < 0) & (codes >= zero), zero - 1, codes)
    return codes.to(torch.uint8).reshape(normed.shape)


def num_blocks(numel: int, block_size: int | None) -> int:
    """Number of scales: ceil(numel / block_size), or 1 for per-tensor (``block_size=None``)."""
    if block_size is None:
        return 1
    return max(1, -(-numel // block_size))


def block_absmax(x: torch.Tensor, block_size: int | None) -> torch.Tensor:
    """max |x| over each block of the flattened tensor (fp32, one value per block).

    A block holding NaN or +-inf gets NaN: 8 bits cannot store it, and a NaN scale makes the whole
    block decode to NaN rather than to made-up finite values or a flipped sign."""
    flat = x.reshape(-1)
    if block_size is None or flat.numel() == 0:
        out = flat.abs().amax().reshape(1) if flat.numel() else flat.new_zeros(1)
        return _inf_to_nan(out.to(torch.float32))
    n_full = flat.numel() // block_size
    parts = []
    if n_full:
        parts.append(flat[: n_full * block_size].view(n_full, block_size).abs().amax(dim=1))
    if flat.numel() > n_full * block_size:
        parts.append(flat[n_full * block_size :].abs().amax().reshape(1))
    return _inf_to_nan(torch.cat(parts).to(torch.float32))


def _inf_to_nan(absmax: torch.Tensor) -> torch.Tensor:
    return absmax.masked_fill(absmax.isinf(), float("nan"))


def _expand_scale(scale: torch.Tensor, numel: int, block_size: int | None) -> torch.Tensor:
    if block_size is None:
        return scale.reshape(1).expand(numel)
    return scale.repeat_interleave(block_size)[:numel]


def quantize(
    x: torch.Tensor, qmap: torch.Tensor, block_size: int | None = BLOCK_SIZE
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize fp32 ``x`` to (codes uint8 shaped like x, absmax fp32 per block).

    absmax is max |x| over the block (``block_size=None``: over the whole tensor); a block of
    zeros gets absmax 0 and the zero code.
    """
    x = x.to(torch.float32)
    absmax = block_absmax(x, block_size)
    scale = _expand_scale(absmax, x.numel(), block_size)
    flat = x.reshape(-1)
    normed = torch.where(scale > 0, flat / scale, torch.zeros_like(flat))
    return nearest_code(normed, qmap).reshape(x.shape), absmax


def dequantize(
    codes: torch.Tensor, absmax: torch.Tensor, qmap: torch.Tensor, block_size: int | None = BLOCK_SIZE
) -> torch.Tensor:
    """fp32 values ``qmap[codes] * absmax[block]``, shaped like ``codes``."""
    flat = qmap[codes.reshape(-1).long()]
    return (flat * _expand_scale(absmax, flat.numel(), block_size)).reshape(codes.shape)
