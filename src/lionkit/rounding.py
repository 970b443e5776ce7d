"""Stochastic rounding from fp32 to bf16/fp16, and the seeds that make it reproducible.

Rounding to nearest loses every update smaller than half the spacing of the target format: a
bf16 weight of 0.05 has neighbours 2**-12 (2.4e-4) apart, so a Lion step of ``lr = 1e-4`` is
rounded away and the weight never moves. Stochastic rounding keeps such updates *on average*:
``x`` lying a fraction ``f`` of the way from its lower neighbour ``lo`` to its upper neighbour
``hi`` becomes ``hi`` with probability ``f`` and ``lo`` otherwise, so

    E[round(x)] = lo + f * (hi - lo) = x        (unbiased)

and pure-bf16 training (no fp32 master copy of the weights) follows fp32 training. See Gupta et
al. 2015, "Deep learning with limited numerical precision", and Zamirai et al. 2020, "Revisiting
BFloat16 training", for the evidence that this is what makes 16-bit-only weights train.

Where the randomness comes from: ``stochastic_round`` takes a ``torch.Generator``. The
optimizers use ``stochastic_round_keyed`` instead, whose random numbers are a counter-based hash
of (key, element index) (``sr_hash``): the key is derived from (optimizer seed, step,
parameter) with ``derive_seed``, so a run is reproducible from its seed alone, a resumed run
draws the same numbers as an uninterrupted one, and every backend (eager, the fused CPU kernel,
any chunking or thread count) draws the same number for the same element (``sr_hash``).

Example::

    g = torch.Generator().manual_seed(0)
    w16 = stochastic_round(w32, torch.bfloat16, generator=g)
"""

from __future__ import annotations

import numbers
from typing import Optional

import numpy as np
import torch

LOW_PRECISION = (torch.bfloat16, torch.float16)
"""Parameter dtypes that stochastic rounding applies to (fp32 results are stored exactly)."""

_MASK64 = (1 << 64) - 1
SEED_LIMIT = 1 << 63
"""Seeds are ints in ``[0, SEED_LIMIT)`` (what ``torch.Generator.manual_seed`` accepts signed-free)."""


def stochastic_round(
    x: torch.Tensor, dtype: torch.dtype, generator: Optional[torch.Generator] = None
) -> torch.Tensor:
    """``x`` (fp32) rounded to ``dtype`` stochastically and without bias; a new tensor.

    Each element becomes one of its two neighbours in ``dtype``, the farther one with
    probability (distance to the nearer) / (gap between them); values ``dtype`` holds exactly,
    NaN and +-inf are returned as rounding to nearest would, and values beyond the largest
    finite ``dtype`` number may become +-inf. ``dtype`` float32 (or x already in ``dtype``) is
    a plain conversion. Random numbers come from ``generator`` (torch's default generator when
    None): one 16-bit integer per element for bf16, one fp32 uniform for fp16.

    Args:
        x: floating-point tensor (fp32 or fp64; computed in fp32).
        dtype: ``torch.bfloat16`` or ``torch.float16`` (``torch.float32`` returns ``x`` as fp32).
        generator: a ``torch.Generator`` on ``x``'s device.
    """
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"stochastic_round: x must be a floating-point tensor, got {_describe(x)}")
    if dtype == torch.float32 or x.dtype == dtype:
        return x.to(dtype)
    if dtype not in LOW_PRECISION:
        raise ValueError(f"stochastic_round: unsupported dtype {dtype} (must be torch.bfloat16 or torch.float16)")
    x = x.to(torch.float32)
    if dtype == torch.bfloat16:
        noise = torch.randint(0, 1 << 16, x.shape, generator=generator, device=x.device, dtype=torch.int32)
        return _round_bf16(x, noise)
    u = torch.rand(x.shape, generator=generator, device=x.device, dtype=torch.float32)
    return _round_f16(x, u)


def stochastic_round_keyed(x: torch.Tensor, dtype: torch.dtype, key: int, start: int = 0) -> torch.Tensor:
    """``stochastic_round`` with the random numbers of ``sr_hash(key, start, x.numel())``:
    element ``i`` of the flattened ``x`` is element ``start + i`` of its tensor. For bf16 the
    noise is the hash's top 16 bits, for fp16 the uniform its top 24 bits. Same rounding rule,
    NaN/inf handling and arguments otherwise."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"stochastic_round_keyed: x must be a floating-point tensor, got {_describe(x)}")
    if isinstance(key, bool) or not isinstance(key, numbers.Integral):
        raise TypeError(f"stochastic_round_keyed: key must be an int, got {key!r}")
    if dtype == torch.float32 or x.dtype == dtype:
        return x.to(dtype)
    if dtype not in LOW_PRECISION:
        raise ValueError(f"stochastic_round_keyed: unsupported dtype {dtype} (must be torch.bfloat16 or torch.float16)")
    x = x.to(torch.float32)
    h = sr_hash(key, start, x.numel(), x.device).view(x.shape)
    if dtype == torch.bfloat16:
        return _round_bf16(x, (h >> 16).to(torch.int32))
    return _round_f16(x, (h >> 8).to(torch.float32) * (2.0**-24))


def _round_f16(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """fp32 -> fp16 with uniforms ``u`` in [0, 1) (multiples of 2**-24)."""
    dtype = torch.float16
    near = x.to(dtype)  # rounding to nearest picks one neighbour ...
    near32 = near.to(torch.float32)
    # ... the other lies on the far side of x (a NaN goes "down" and stays NaN).
    toward = torch.where(near32 < x, float("inf"), float("-inf")).to(dtype)
    other = torch.nextafter(near, toward)
    gap = (other.to(torch.float32) - near32).abs()
    # fp16. Both subtractions are exact in fp32 (Sterbenz: the operands are within a factor of
    # 2), so `frac` is the exact probability, a multiple of 2**-13 away from fp16 subnormals,
    # which fp32 uniforms (multiples of 2**-24) resolve exactly.
    frac = (x - near32).abs() / gap  # in [0, 0.5]; NaN for NaN/inf input -> keep `near`
    return torch.where(u < frac, other, near)


def _round_bf16(x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """fp32 -> bf16 with uniform 16-bit integers ``noise`` (int32): a bf16 is an fp32 with the
    low 16 bits zero, and those bits of ``x`` are the fraction of the gap to the next bf16 (in
    magnitude) in units of 2**-16. Adding the noise carries into the kept bits with exactly that
    probability; then truncate."""
    bits = (x.view(torch.int32) + noise) & -65536  # int32 two's complement: -65536 == 0xFFFF0000
    out = bits.view(torch.float32).to(torch.bfloat16)  # exact: the low bits are zero
    # a NaN could carry into the infinity pattern; NaN and +-inf stay what they are
    return torch.where(torch.isfinite(x), out, x.to(torch.bfloat16))


def stochastic_round_into(
    out: torch.Tensor, x: torch.Tensor, generator: Optional[torch.Generator] = None
) -> torch.Tensor:
    """Write ``x`` into ``out`` rounded stochastically to ``out``'s dtype (plain copy when
    ``out`` is not bf16/fp16); returns ``out``."""
    if out.dtype in LOW_PRECISION:
        out.copy_(stochastic_round(x, out.dtype, generator))
    else:
        out.copy_(x)
    return out


_M32 = 0xFFFFFFFF


# xorshift-multiply hashes of 32-bit integers: (shift, odd multiplier) rounds, then x ^= x >> 16
_MIX32 = ((16, 0x7FEB352D), (15, 0x2C1B3C6D), (13, 0x297A2D39))  # three rounds (counter_hash)
_LOWBIAS32 = ((16, 0x7FEB352D), (15, 0x846CA68B))  # two rounds, Wellons' "lowbias32" (sr_hash)


def _xmx(x: torch.Tensor, rounds: tuple[tuple[int, int], ...]) -> torch.Tensor:
    """The hash with ``rounds`` on int64 tensors holding values in [0, 2**32) (the multipliers
    are below 2**32, so every product fits in int64 before it is cut to 32 bits)."""
    for shift, mult in rounds:
        x = x ^ (x >> shift)
        x = (x * mult) & _M32
    return x ^ (x >> 16)


def _mix32(x: torch.Tensor) -> torch.Tensor:
    return _xmx(x, _MIX32)


def _lowbias32(x: torch.Tensor) -> torch.Tensor:
    return _xmx(x, _LOWBIAS32)


def counter_hash(key: int, start: int, count: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """32-bit random integers (int64 tensor) for elements ``start .. start + count - 1`` of a
    tensor, under ``key`` (an int in [0, 2**32)): ``mix(mix(i) ^ key)``, ``i`` the element's index
    (its bits above 32 folded in through a third ``mix``). A function of (key, index) only, so any
    split of a tensor into chunks, threads or kernels draws the same numbers; the CPU kernel
    computes the same hash (kernels/lion_cpu.cpp)."""
    idx = torch.arange(start, start + count, dtype=torch.int64, device=device)
    x = _mix32(idx & _M32)
    if start + count > (1 << 32):  # mix(0) == 0: indices below 2**32 need no fold
        x = x ^ _mix32((idx >> 32) & _M32)
    return _mix32(x ^ (key & _M32))


def sr_hash(key: int, start: int, count: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The random numbers of stochastic rounding: 32-bit integers (int64 tensor) for elements
    ``start .. start + count - 1`` of a tensor, ``h(i ^ key)`` with the two-round hash (the bits
    of ``i`` above 32 folded in through a second ``h``). Within one key, the elements below
    2**32 get distinct numbers (the hash is a bijection of 32 bits); past 2**32 elements a
    32-bit number must repeat, and element ``2**32 + j`` gets that of element
    ``j ^ h(1)``. Every backend computes the same numbers."""
    idx = torch.arange(start, start + count, dtype=torch.int64, device=device)
    x = (idx & _M32) ^ (key & _M32)
    if start + count > (1 << 32):  # h(0) == 0: indices below 2**32 need no fold
        x = x ^ _lowbias32((idx >> 32) & _M32)
    return _lowbias32(x)


def key32(seed: int) -> int:
    """A ``counter_hash`` key from a ``derive_seed`` seed (its two 32-bit halves xor-ed)."""
    seed = int(seed)
    return (seed ^ (seed >> 32)) & _M32


def _splitmix64(z: int) -> int:
    """One step of splitmix64 (Steele et al. 2014): a cheap 64-bit mixer."""
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def derive_seed(seed: int, *parts: int) -> int:
    """A seed in ``[0, SEED_LIMIT)`` determined by ``seed`` and the ints ``parts`` (e.g. step,
    parameter index, chunk offset); nearby inputs give unrelated seeds."""
    z = _splitmix64(int(seed) & _MASK64)
    for part in parts:
        z = _splitmix64(z ^ (int(part) & _MASK64))
    return z % SEED_LIMIT


def _splitmix64_np(z: np.ndarray) -> np.ndarray:
    """``_splitmix64`` on a uint64 array (numpy's uint64 arithmetic wraps modulo 2**64)."""
    z = z + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def derive_seeds(seed: int, *parts: np.ndarray | int) -> np.ndarray:
    """``derive_seed(seed, *parts)`` for arrays of parts (uint64 array; int parts broadcast):
    the seeds of many parameters at once."""
    arrays = [np.asarray(part, dtype=np.uint64) for part in parts]
    z = np.full(np.broadcast_shapes(*(a.shape for a in arrays)), _splitmix64(int(seed) & _MASK64), dtype=np.uint64)
    for a in arrays:
        z = _splitmix64_np(z ^ a)
    return z % np.uint64(SEED_LIMIT)


def derive_keys32(seed: int, steps: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """``key32(derive_seed(seed, step, index))`` for arrays of steps and indices (uint32 array):
    the stochastic-rounding keys of many parameters at once."""
    z = derive_seeds(seed, steps, indices)
    return ((z ^ (z >> np.uint64(32))) & np.uint64(_M32)).astype(np.uint32)


def generator_for(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A fresh ``torch.Generator`` on ``device`` seeded with ``seed``."""
    gen = torch.Generator(device=device)
    gen.manual_seed(int(seed))
    return gen


def check_seed(name: str, seed: object) -> None:
    """Raise ValueError unless ``seed`` is None or an int in ``[0, SEED_LIMIT)``."""
    if seed is None:
        return
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < SEED_LIMIT:
        raise ValueError(f"Invalid {name}: {seed!r} (must be an int in [0, 2**63), or None)")


def _describe(x: object) -> str:
    return f"tensor of dtype {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__
