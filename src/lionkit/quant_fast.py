"""A nearest-code quantizer that costs a few instructions per element: one table lookup keyed
by the top bits of the float, one integer comparison.

``quant.nearest_code`` binary-searches 255 thresholds (8 dependent comparisons per element).
The dynamic map has structure that makes the search unnecessary: its decision thresholds (the
midpoints between neighbouring codes) are never closer than 1.06 % of their magnitude. The
top 15 bits of a positive float32 (8 exponent bits, 7 mantissa bits) cut [0, 1] into buckets
less than 2**-7 = 0.78 % wide, so **each bucket holds at most one threshold**. For ``a = |x|``::

    key  = (bits(a) >> 16) - KEY0          # clamped to [0, NB - 1]; + NB for x < 0
    j    = FIRST[key] + ((bits(a) & 0xFFFF) >= LOW[key])
    code = zero + 1 + j  if x > 0,   zero - 1 - j  if x < 0,   zero  if x == 0

``FIRST[key]`` counts the thresholds below the bucket, ``LOW[key]`` holds the low 16 bits of
the threshold inside it (65536 if none): comparing the low bits of ``a`` decides on which side
of it ``a`` falls, exactly, because both share the top 15 bits. Both live in one uint32 entry,
``FIRST << 17 | LOW``. ``j`` is the distance from the zero code, so a nonzero value never gets
the zero code. The negative half has its own table because its ties go the other way (to the
larger code, i.e. to the smaller magnitude: its thresholds are the next float above the
midpoint when the midpoint is exactly representable). NaN gives 255, as ``torch.bucketize``
orders it last.

Cost: ~10 vector instructions and one gather from a 19 KiB table per 16 elements (0.7 cycles
per element on AVX-512), against ~1.4 cycles for the arithmetic alternative (decade from 7
comparisons, index from a multiply-subtract and a floor, fix-up next to each decision point),
which was built, checked and measured first. The AVX-512 kernel uses ``code_table``, the same
table indexed by the top 16 bits of x (sign included) with the codes and the comparison folded
into each entry: the code is then one addition and one shift after the gather, and zero needs
no test of its own.

The result equals ``quant.nearest_code`` exactly for every float32 in [-1, 1]:
``check_exhaustive`` compares all 2,130,706,434 of them (``python -m lionkit.quant_fast``:
about a minute per implementation on 2 cores); the test suite checks a strided subset plus
every float within 64 ulps of each threshold. Any map whose buckets hold at most one threshold
per sign works (``bucket_table`` returns None otherwise, and callers fall back to
``quant.nearest_code``).

The fused kernels (``kernels/lion_cpu.cpp``, ``kernels/triton_lion.py``) use the same table;
``kernel_constants`` lays it out for them.

Example::

    >>> from lionkit import quant, quant_fast
    >>> qmap = quant.dynamic_map()
    >>> x = torch.rand(1000) * 2 - 1
    >>> torch.equal(quant_fast.nearest_code_fast(x, qmap), quant.nearest_code(x, qmap))
    True
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
import weakref
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch

from . import quant

KEY_SHIFT = 16  # bits(a) >> 16: 8 exponent bits and the top 7 mantissa bits
LOW_BITS = 17  # entry = FIRST << 17 | LOW, LOW in [0, 65536]
NO_THRESHOLD = 1 << 16

# Layout of ``kernel_constants`` (uint32 words; mirrored in lion_cpu.cpp and triton_lion.py).
HDR_KEY0, HDR_NB, HDR_ZERO, HDR_SYM = 1, 2, 3, 4
QMAP_AT = 16  # 256 float32 bit patterns
LUT_AT = QMAP_AT + 256  # 2 * NB entries: positive half, then negative half
# then (at LUT_AT + 2 * NB) code_table's 65536 code-valued entries, for the AVX-512 kernel
MAGIC = 0x4C4B5131  # "LKQ1"


@dataclass(frozen=True)
class BucketTable:
    """The quantizer's table for one map (see the module docstring)."""

    key0: int  # keys <= key0 share bucket 0, which holds no threshold
    nb: int  # buckets per sign
    zero: int  # index of the zero code
    lut: np.ndarray  # uint32[2 * nb]: FIRST << 17 | LOW; positive half, then negative half


def _half_table(thr: np.ndarray, key0: int, nb: int) -> Optional[np.ndarray]:
    """uint32 entries for increasing magnitude thresholds ``thr``; None if a bucket has two."""
    bits = thr.view(np.uint32)
    keys = (bits >> KEY_SHIFT).astype(np.int64) - key0
    if np.any(np.diff(keys) == 0):
        return None
    first = np.searchsorted(keys, np.arange(nb), side="left").astype(np.uint32)
    low = np.full(nb, NO_THRESHOLD, dtype=np.uint32)
    low[keys] = bits & 0xFFFF
    return (first << LOW_BITS) | low


@functools.lru_cache(maxsize=8)
def _table_for(key: bytes) -> Optional[BucketTable]:
    qmap = torch.frombuffer(bytearray(key), dtype=torch.float32)
    t, zero = quant.code_thresholds(qmap)
    if not 1 <= zero <= quant.MAP_SIZE - 2:
        return None  # a map needs codes of both signs for the sign rule
    t = t.numpy().astype(np.float32)
    # magnitude thresholds: j -> j + 1 when |x| >= thr[j]
    pos = t[zero + 1 :]  # between codes zero+1+j and zero+2+j
    # between codes zero-1-j and zero-2-j: ties go to the larger code = smaller magnitude,
    # so |x| must exceed the midpoint strictly: the next float above -t
    neg = np.nextafter(-t[zero - 2 :: -1] if zero >= 2 else np.zeros(0, np.float32), np.float32(np.inf))
    neg = neg.astype(np.float32)
    both = np.concatenate([pos, neg])
    if both.size == 0 or not np.all(np.isfinite(both)) or np.any(both <= 0) or np.any(both > 1):
        return None
    key0 = int((both.view(np.uint32) >> KEY_SHIFT).min()) - 1
    nb = (0x3F800000 >> KEY_SHIFT) - key0 + 1  # up to |x| = 1.0
    halves = [_half_table(h, key0, nb) for h in (pos, neg)]
    if any(h is None for h in halves) or np.any(np.diff(pos) <= 0) or np.any(np.diff(neg) <= 0):
        return None
    lut = np.concatenate(halves)
    lut.setflags(write=False)
    return BucketTable(key0=key0, nb=nb, zero=zero, lut=lut)


def _map_key(qmap: torch.Tensor) -> Optional[bytes]:
    if not isinstance(qmap, torch.Tensor) or qmap.dtype != torch.float32 or qmap.numel() != quant.MAP_SIZE:
        return None
    try:
        quant.validate_qmap(qmap)
    except ValueError:
        return None
    return qmap.detach().cpu().contiguous().numpy().tobytes()


def bucket_table(qmap: torch.Tensor) -> Optional[BucketTable]:
    """The bucket table of ``qmap``, or None when the map does not allow one (two thresholds
    closer than 2**-7 relative, or no codes of one sign): use ``quant.nearest_code`` then."""
    key = _map_key(qmap)
    return None if key is None else _table_for(key)


CODE_TABLE_SIZE = 1 << 16  # code_table: one entry per top 16 bits of x (sign included)


def code_table(table: BucketTable) -> np.ndarray:
    """The bucket table as code-valued entries, one per top 16 bits of x (index = bits(x) >> 16,
    positive half first; entries past |x| = 1 repeat the top code), so that a code costs a
    shift, a lookup, an addition and a shift::

        code = (entry + low) >> 17,
        low = bits(x) & 0xFFFF  for x >= +0,  ~(bits(x) & 0xFFFF)  for x <= -0

    Positive entry: ``A << 17 | (2**17 - LOW)`` with A the code below the bucket's threshold:
    adding ``low`` carries into the code exactly when ``low >= LOW``. Negative entry: ``A << 17
    | LOW``: adding ``~low = -low - 1`` borrows from the code exactly when ``low >= LOW``
    (LOW = 65536, no threshold in the bucket: never). The first bucket of each sign has its
    threshold at pattern 1: +-0 get the zero code, every other x (denormals included) a code of
    its own sign, so zero needs no test of its own."""
    first = (table.lut >> LOW_BITS).astype(np.int64)
    low = (table.lut & ((1 << LOW_BITS) - 1)).astype(np.int64)
    nb = table.nb
    t = np.arange(CODE_TABLE_SIZE // 2)  # raw buckets: the top 15 bits of |x|
    j = np.clip(t - table.key0, 0, nb - 1)  # their bucket in the table
    beyond = t >= table.key0 + nb  # |x| past the bucket of 1.0: the top code
    halves = []
    for h, sign in ((slice(0, nb), 1), (slice(nb, 2 * nb), -1)):
        # per raw bucket: the code below the threshold, and LOW
        code = table.zero + sign * (1 + first[h][j])
        lo = low[h][j]
        code[beyond] += sign * int(low[h][nb - 1] != NO_THRESHOLD)
        lo[beyond] = NO_THRESHOLD
        code[0], lo[0] = table.zero, 1  # +-0 | the rest
        halves.append((code << LOW_BITS) + ((1 << LOW_BITS) - lo if sign > 0 else lo))
    out = np.concatenate(halves)
    assert out.min() >= 0 and out.max() < 2**32
    return out.astype(np.uint32)


def _symmetric(bits: np.ndarray, zero: int) -> bool:
    """The map is -m[zero - j] == m[zero + j] (j = 1..zero), m[zero] = +0, positive above zero,
    with one more positive code at the top (the dynamic map): the AVX-512 kernel then decodes
    magnitudes from a 128-entry table (flag HDR_SYM)."""
    if zero != 127 or bits[127] != 0:
        return False
    up, down = bits[128:255], bits[126::-1]
    return bool(np.all(up >> 31 == 0) and np.all(down == up | 0x80000000) and bits[255] >> 31 == 0)


@functools.lru_cache(maxsize=8)
def _kernel_constants_for(key: bytes) -> Optional[np.ndarray]:
    table = _table_for(key)
    if table is None:
        return None
    out = np.zeros(LUT_AT + 2 * table.nb + CODE_TABLE_SIZE, dtype=np.uint32)
    bits = np.frombuffer(key, dtype=np.uint32)
    out[0], out[HDR_KEY0], out[HDR_NB], out[HDR_ZERO] = MAGIC, table.key0, table.nb, table.zero
    out[HDR_SYM] = int(_symmetric(bits, table.zero))
    out[QMAP_AT : QMAP_AT + 256] = bits
    out[LUT_AT : LUT_AT + 2 * table.nb] = table.lut
    out[LUT_AT + 2 * table.nb :] = code_table(table)
    out.setflags(write=False)
    return out


def kernel_constants(qmap: torch.Tensor) -> Optional[np.ndarray]:
    """One read-only uint32 array for the kernels: header (magic, key0, nb, zero code, symmetric
    map), the map (float32 bits, at ``QMAP_AT``), the table (at ``LUT_AT``) and its code-valued
    form (``code_table``, after it); None if the map has no table."""
    key = _map_key(qmap)
    return None if key is None else _kernel_constants_for(key)


_per_tensor: dict[int, tuple] = {}


def kernel_constants_of(qmap: torch.Tensor) -> Optional[np.ndarray]:
    """``kernel_constants(qmap)`` cached per map tensor (by identity and version counter), so
    that kernels can ask every step at no cost (no copy, no device sync for a GPU map)."""
    hit = _per_tensor.get(id(qmap))
    if hit is not None and hit[0]() is qmap and hit[1] == qmap._version:
        return hit[2]
    qc = kernel_constants(qmap)
    if len(_per_tensor) > 4096:
        _per_tensor.clear()
    _per_tensor[id(qmap)] = (weakref.ref(qmap), qmap._version, qc)
    return qc


def nearest_code_fast(normed: torch.Tensor, qmap: torch.Tensor) -> torch.Tensor:
    """``quant.nearest_code(normed, qmap)`` through the bucket table: fp32 in [-1, 1], NaN
    gives 255. Raises ValueError for a map without a table."""
    table = bucket_table(qmap)
    if table is None:
        raise ValueError("qmap has no bucket table (thresholds too close); use quant.nearest_code")
    lut = torch.from_numpy(table.lut.astype(np.int64)).to(normed.device)
    x = normed.reshape(-1).to(torch.float32)
    bits = x.abs().view(torch.int32).to(torch.int64)
    neg = x < 0
    key = ((bits >> KEY_SHIFT) - table.key0).clamp(0, table.nb - 1) + neg.to(torch.int64) * table.nb
    entry = lut[key]
    j = (entry >> LOW_BITS) + ((bits & 0xFFFF) >= (entry & ((1 << LOW_BITS) - 1))).to(torch.int64)
    z = table.zero
    code = torch.where(x > 0, z + 1 + j, torch.where(neg, z - 1 - j, torch.full_like(j, z)))
    code = torch.where(torch.isnan(x), quant.MAP_SIZE - 1, code)
    return code.to(torch.uint8).reshape(normed.shape)


# ---------------------------------------------------------------------- verification
ONE_BITS = 0x3F800000  # bit pattern of 1.0: [0, 1] is patterns 0..ONE_BITS


def near_thresholds(qmap: torch.Tensor, ulps: int = 64) -> torch.Tensor:
    """Every float32 within ``ulps`` of each code threshold, both signs, clipped to [-1, 1]:
    where a quantizer can be wrong."""
    t, _ = quant.code_thresholds(qmap)
    mags = t.abs().view(torch.int32).to(torch.int64)
    offs = torch.arange(-ulps, ulps + 1, dtype=torch.int64)
    bits = (mags[:, None] + offs[None, :]).reshape(-1)
    bits = bits[(bits >= 0) & (bits <= ONE_BITS)].unique()
    pos = bits.to(torch.int32).view(torch.float32)
    return torch.cat([pos, -pos])


def check_exhaustive(
    fast: Callable[[torch.Tensor], torch.Tensor],
    qmap: torch.Tensor,
    chunk: int = 1 << 24,
    stride: int = 1,
    progress: bool = False,
) -> int:
    """Compare ``fast(x)`` with ``quant.nearest_code(x, qmap)`` for every ``stride``-th float32
    in [-1, 1] (both signs; all of them when stride is 1); returns how many were compared.
    Raises AssertionError naming the first value that differs."""
    count = 0
    t0 = time.perf_counter()
    for negative in (False, True):
        for lo in range(0, ONE_BITS + 1, chunk * stride):
            hi = min(ONE_BITS + 1, lo + chunk * stride)
            bits = torch.arange(lo, hi, stride, dtype=torch.int64)
            if negative:
                bits = bits - (1 << 31)  # as int32 this is the pattern 0x80000000 | bits: x = -|x|
            x = bits.to(torch.int32).view(torch.float32)
            want = quant.nearest_code(x, qmap)
            got = fast(x)
            bad = (got != want).nonzero()
            if bad.numel():
                i = int(bad[0, 0])
                raise AssertionError(
                    f"code mismatch at x={x[i].item()!r} (bits {int(bits[i]) & 0xFFFFFFFF:#010x}): "
                    f"fast {int(got[i])}, nearest_code {int(want[i])}"
                )
            count += x.numel()
            if progress:
                done = (hi + (ONE_BITS + 1 if negative else 0)) / (2 * (ONE_BITS + 1))
                print(f"\r  {count:,} values, {100 * done:5.1f}%, {time.perf_counter() - t0:6.1f} s", end="", flush=True)
    if progress:
        print()
    return count


def main(argv: Optional[list[str]] = None) -> int:
    """``python -m lionkit.quant_fast``: the exhaustive check of every quantizer implementation."""
    ap = argparse.ArgumentParser(prog="python -m lionkit.quant_fast", description=main.__doc__)
    ap.add_argument("--stride", type=int, default=1, help="check every STRIDE-th float (1: all)")
    ap.add_argument(
        "--impl",
        choices=["torch", "cpu", "cpu-scalar", "triton", "all"],
        default="all",
        help="which implementation to check (triton: the interpreter on CPU, slow: use --stride)",
    )
    args = ap.parse_args(argv)
    qmap = quant.dynamic_map()
    impls: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}
    if args.impl in ("torch", "all"):
        impls["torch (nearest_code_fast)"] = lambda x: nearest_code_fast(x, qmap)
    if args.impl in ("cpu", "all"):
        from .kernels import compiled

        impls[f"cpu kernel ({compiled.isa_name(False)})"] = lambda x: compiled.quantize(x, qmap, scalar=False)
    if args.impl in ("cpu-scalar", "all"):
        from .kernels import compiled

        impls["cpu kernel (portable scalar build)"] = lambda x: compiled.quantize(x, qmap, scalar=True)
    if args.impl == "triton":
        from .kernels import triton_lion

        impls["triton kernel (interpreter)"] = lambda x: triton_lion.quantize(x, qmap)
    for name, fn in impls.items():
        print(f"{name}: every {args.stride}-th float32 in [-1, 1] against quant.nearest_code")
        t0 = time.perf_counter()
        n = check_exhaustive(fn, qmap, stride=args.stride, progress=True)
        print(f"  OK: {n:,} values identical ({time.perf_counter() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
