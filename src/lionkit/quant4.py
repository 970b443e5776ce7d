"""4-bit momentum: a normal-quantile map, blocks of 32, two codes per byte, and stochastic
rounding driven by a counter-based hash.

Why this format (``docs/fourbit.md`` has the study): Lion's momentum moves by
``(1 - beta2) * (g - m)`` per step, 1-5% of its size. With 15 levels, rounding to nearest sends
most of those moves back to the code they came from and the momentum stalls; every map and
block size we tried lost 4-97% of final loss that way. Rounding *stochastically* (up with
probability equal to the distance from the lower level, in units of the gap) keeps the moves on
average, and blocks of 32 keep the scale close to the values. Of the maps tried with it, the
fixed normal-quantile map (the shape of QLoRA's NF4) was the best, within 1.5% of 32-bit Lion on
both ``lionkit compare`` tasks, at 0.625 bytes per element (0.5 for codes, 0.125 for scales).

Where the random numbers come from: element ``i`` of a tensor draws ``uniform(key, i)``, a hash
of its index and a 32-bit key that the optimizer derives from (``sr_seed``, step, parameter).
It depends on nothing else (not on chunking, threads or backend), so any implementation of the
step can reproduce it bit for bit, and a resumed run draws what an uninterrupted one would.

Layout: ``codes`` is a flat uint8 tensor of ``ceil(n / 2)`` bytes, element ``2j`` in the low
nibble of byte ``j`` and ``2j + 1`` in the high one (an odd tail is padded with the zero code);
``absmax`` holds one fp32 scale per block of 32; ``qmap`` the 15 levels (code 15 is unused).
"""

from __future__ import annotations

import functools

import torch

from . import rounding
from .quant import block_absmax, num_blocks

BITS = 4
BLOCK_SIZE = 32
"""Elements per block of 4-bit momentum (one fp32 scale each: 0.125 bytes per element)."""

MAP_SIZE = 15
"""Levels in the 4-bit map: 0 and 7 magnitudes of each sign; code 15 is never written."""

ZERO_CODE = 7



@functools.lru_cache(maxsize=None)
def _normal_map_cpu() -> torch.Tensor:
    # Levels at the quantiles 0.5 + k * 0.495 / 7 (k = 1..7) of a standard normal, divided by the
    # largest, with both signs and 0: the symmetric 15-level form of NF4 (Dettmers et al. 2023).
    # Computed in float64 and rounded once to fp32; tests pin the 7 values.
    probs = torch.linspace(0.5, 0.995, 8, dtype=torch.float64)[1:]
    q = torch.special.ndtri(probs)
    mags = (q / q.max()).to(torch.float32)
    return torch.cat([-mags.flip(0), torch.zeros(1), mags])


def normal_map(device: torch.device | str | None = None) -> torch.Tensor:
    """The 15-level 4-bit map, ascending, in [-1, 1]; code 7 is 0, code 14 is 1."""
    qmap = _normal_map_cpu()
    return qmap.clone() if device is None else qmap.to(device, copy=True)


def is_map4(qmap: object) -> bool:
    """True if ``qmap`` has the size of a 4-bit map (how a state dict tells 4-bit from 8-bit)."""
    return isinstance(qmap, torch.Tensor) and qmap.numel() == MAP_SIZE


def validate_map4(qmap: torch.Tensor, name: str = "qmap") -> None:
    """Raise ValueError unless ``qmap`` is 15 finite, strictly increasing fp32 values in [-1, 1]
    with 0 at code 7."""
    if not isinstance(qmap, torch.Tensor) or qmap.dtype != torch.float32 or qmap.dim() != 1 or qmap.numel() != MAP_SIZE:
        got = f"dtype={qmap.dtype}, shape={tuple(qmap.shape)}" if isinstance(qmap, torch.Tensor) else type(qmap).__name__
        raise ValueError(f"{name} must be a 1-D float32 tensor of {MAP_SIZE} values, got {got}")
    q = qmap.detach().cpu()
    if not torch.isfinite(q).all() or not (q[1:] > q[:-1]).all() or q[0] < -1 or q[-1] > 1:
        raise ValueError(f"{name} must be finite, strictly increasing and within [-1, 1]")
    if q[ZERO_CODE] != 0:
        raise ValueError(f"{name} must have 0 at code {ZERO_CODE}, got {q[ZERO_CODE].item()}")


def packed_numel(numel: int) -> int:
    """Bytes of codes for ``numel`` elements."""
    return (numel + 1) // 2


# ------------------------------------------------------------------------------ packing
def pack(codes: torch.Tensor) -> torch.Tensor:
    """Flat codes (integers in [0, 15]) -> bytes, two per byte (low nibble first)."""
    c = codes.reshape(-1).to(torch.uint8)
    if c.numel() % 2:
        c = torch.cat([c, c.new_full((1,), ZERO_CODE)])
    pairs = c.view(-1, 2)
    return pairs[:, 0] | (pairs[:, 1] << 4)


def unpack(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Bytes -> the first ``numel`` codes (uint8)."""
    b = packed.reshape(-1)
    return torch.stack((b & 15, b >> 4), dim=1).reshape(-1)[:numel]


# ------------------------------------------------------------------------------ randomness
def uniform(key: int, start: int, count: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """fp32 uniforms in [0, 1) (multiples of 2**-24) for elements ``start .. start + count - 1``
    of a tensor stepped with ``key`` (an int in [0, 2**32)): the top 24 bits of
    ``rounding.counter_hash``."""
    return (rounding.counter_hash(key, start, count, device) >> 8).to(torch.float32) * (2.0**-24)


# ------------------------------------------------------------------------------ (de)quantize
def round_to_codes(normed: torch.Tensor, qmap: torch.Tensor, u: torch.Tensor | None) -> torch.Tensor:
    """Codes (uint8) for fp32 values in [-1, 1]: stochastically between the two neighbouring
    levels (the upper with probability ``(v - lo) / (hi - lo)``, decided by ``u < p``), or, with
    ``u=None``, to the nearest level (ties up; used when converting a state, not in steps).
    Values on a level (0, +-1 included) keep it whatever ``u`` is. NaN gets some code; its
    block's scale is NaN then, so it decodes to NaN anyway."""
    hi = torch.bucketize(normed, qmap).clamp_(1, MAP_SIZE - 1)  # first level >= v
    lo_v, hi_v = qmap[hi - 1], qmap[hi]
    if u is None:
        up = (normed - lo_v) >= (hi_v - normed)
    else:
        up = u < (normed - lo_v) / (hi_v - lo_v)
    return torch.where(up, hi, hi - 1).to(torch.uint8)


def quantize(
    x: torch.Tensor, qmap: torch.Tensor, u: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 ``x`` -> (packed codes, absmax per block of 32). ``u``: one uniform per element for
    stochastic rounding (see ``uniform``), or None for nearest."""
    flat = x.reshape(-1).to(torch.float32)
    absmax = block_absmax(flat, BLOCK_SIZE)
    scale = absmax.repeat_interleave(BLOCK_SIZE)[: flat.numel()]
    normed = torch.where(scale > 0, flat / scale, torch.zeros_like(flat))
    return pack(round_to_codes(normed, qmap, u)), absmax


def dequantize(packed: torch.Tensor, absmax: torch.Tensor, qmap: torch.Tensor, numel: int) -> torch.Tensor:
    """fp32 values (flat, ``numel`` long) ``qmap[code] * absmax[block]``."""
    codes = unpack(packed, numel).long()
    return qmap[codes] * absmax.repeat_interleave(BLOCK_SIZE)[:numel]


def zero_state(numel: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(packed codes, absmax) of an all-zero tensor of ``numel`` elements."""
    codes = torch.full((packed_numel(numel),), ZERO_CODE | (ZERO_CODE << 4), dtype=torch.uint8, device=device)
    return codes, torch.zeros(num_blocks(numel, BLOCK_SIZE), dtype=torch.float32, device=device)
