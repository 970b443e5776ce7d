"""8-bit (de)quantization in jax.numpy: the same map, blocks and rounding as ``lionkit.quant``.

Codes equal the PyTorch side's bit for bit for the same fp32 input: absmax is max |x| per block,
the normalised value is the same fp32 division, and the code is found by comparing against the
same fp32 decision thresholds (``interop.code_thresholds``): nearest map value, ties to the
larger code, never the zero code or the other sign for a nonzero value. Block sizes and shapes
are static, so these functions trace once per parameter shape under ``jax.jit``.

Subnormal numbers: XLA on CPU flushes them to zero in arithmetic and comparisons, where numpy,
PyTorch and MLX keep them. So that the codes still agree, ``quantize`` finds each block's
absmax from the bit patterns, and for a tensor holding a subnormal value (or a value whose
quotient by its absmax is subnormal) computes the signs and the normalised values x / absmax
with integer operations, exact for subnormal inputs too; other tensors take the float path.
"""

from __future__ import annotations

from typing import Optional

import jax.numpy as jnp
import numpy as np
from jax import lax

from .. import interop

_QMAP = interop.dynamic_map()
_THRESHOLDS, ZERO_CODE = interop.code_thresholds(_QMAP)


def qmap() -> jnp.ndarray:
    """The 256-value dynamic map as a float32 jax array."""
    return jnp.asarray(_QMAP)


def _layout(numel: int, block_size: Optional[int]) -> tuple[int, int]:
    """(number of blocks, elements per block) of the padded block view."""
    if block_size is None or numel == 0:
        return 1, max(numel, 1)
    return interop.num_blocks(numel, block_size), block_size


def zeros(shape: tuple[int, ...], block_size: Optional[int]) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(codes, absmax) of the all-zero state for a tensor of ``shape``."""
    nb, _ = _layout(int(np.prod(shape, dtype=np.int64)), block_size)
    return jnp.full(shape, ZERO_CODE, dtype=jnp.uint8), jnp.zeros((nb,), dtype=jnp.float32)


def nearest_code(normed: jnp.ndarray) -> jnp.ndarray:
    """uint8 codes of the map values nearest to fp32 ``normed`` (in [-1, 1]), sign kept."""
    return _codes(normed, *_signs(normed))


def _codes(normed: jnp.ndarray, positive: jnp.ndarray, negative: jnp.ndarray) -> jnp.ndarray:
    """``nearest_code`` with the values to keep positive or negative given."""
    t = jnp.asarray(_THRESHOLDS)
    # number of thresholds <= x: the nearest code, ties to the larger one (torch.bucketize(right=True))
    codes = jnp.searchsorted(t, normed, side="right").astype(jnp.int32)
    # Lion reads only the sign of the momentum: a nonzero value keeps a code of its own sign
    codes = jnp.where(positive & (codes <= ZERO_CODE), ZERO_CODE + 1, codes)
    codes = jnp.where(negative & (codes >= ZERO_CODE), ZERO_CODE - 1, codes)
    return codes.astype(jnp.uint8)


_MAGNITUDE = 0x7FFFFFFF  # all bits of a float32 but the sign
_INF = 0x7F800000  # bits of +inf; larger magnitudes are NaNs


def _bits(x: jnp.ndarray) -> jnp.ndarray:
    return lax.bitcast_convert_type(x.astype(jnp.float32), jnp.int32)


def _signs(x: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(x > 0, x < 0) from the bits, true for subnormal x too (XLA's comparisons flush them)."""
    bits = _bits(x)
    return bits > 0, (bits < 0) & ((bits & _MAGNITUDE) != 0)


def _pow2(e: jnp.ndarray) -> jnp.ndarray:
    """float32 2**e for integer e in [-126, 127], built from bits."""
    return lax.bitcast_convert_type((e + 127) << 23, jnp.float32)


def _significand_exponent(magnitude: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(s, e) with |x| = s * 2**e exactly, s an integer < 2**24 held (exactly) in float32, from
    the magnitude bits of a finite float32 x: no float arithmetic touches a subnormal."""
    biased = magnitude >> 23
    fraction = magnitude & 0x7FFFFF
    s = jnp.where(biased > 0, fraction | 0x800000, fraction)
    return s.astype(jnp.float32), jnp.maximum(biased, 1) - 150


def _normalise(magnitude: jnp.ndarray, absmax_magnitude: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(|x| / absmax as numpy computes it in float32, whether numpy's quotient is nonzero),
    from magnitude bits of finite |x| <= absmax, absmax > 0.

    With |x| = sx * 2**ex and absmax = sa * 2**ea the quotient is (sx / sa) * 2**k, k = ex - ea:
    one correctly rounded division of exact integers, then an exact power-of-two scaling. For
    k < -126 the quotient is below 2**-126, far under the smallest code's threshold (~2.8e-7),
    so 0 gives the same code once the sign is restored, and numpy's quotient is nonzero exactly
    when the true one exceeds 2**-150 (half the smallest subnormal: smaller rounds to 0)."""
    sx, ex = _significand_exponent(magnitude)
    sa, ea = _significand_exponent(absmax_magnitude)
    k = ex - ea  # <= 24, since |x| <= absmax
    normal = k >= -126
    q = jnp.where(normal, (sx / sa) * _pow2(jnp.maximum(k, -126)), 0.0)
    # k >= -126: sx / sa > 2**-24, so the quotient > 2**-150. Else sx / sa > 2**(-150 - k),
    # with -150 - k in (-24, 104) and sa * 2**(-150 - k) exact in float32
    nonzero = (sx > 0) & (normal | (sx > sa * _pow2(jnp.clip(-150 - k, -126, 127))))
    return q, nonzero


def quantize(x: jnp.ndarray, block_size: Optional[int]) -> tuple[jnp.ndarray, jnp.ndarray]:
    """fp32 ``x`` -> (uint8 codes shaped like x, fp32 absmax per block)."""
    shape, n = x.shape, x.size
    nb, bs = _layout(n, block_size)
    if n == 0:
        return jnp.zeros(shape, jnp.uint8), jnp.zeros((1,), jnp.float32)
    flat = x.astype(jnp.float32).reshape(-1)
    # zero padding changes no block maximum and is cut off again below
    blocks = jnp.pad(flat, (0, nb * bs - n)).reshape(nb, bs)
    # on bit patterns (see the module docstring): for non-negative floats the integer order is
    # the float order, so the largest magnitude pattern is absmax, subnormal or not (or NaN)
    bits = _bits(blocks)
    magnitude = bits & _MAGNITUDE
    absmax_bits = jnp.max(magnitude, axis=1)
    absmax = lax.bitcast_convert_type(absmax_bits, jnp.float32)
    # float arithmetic gives numpy's quotient unless a value or a quotient is subnormal: with
    # exponents ex >= ea - 125 the quotient exceeds 2**-126. Such momenta are rare, so the
    # exact (slower) path runs only for a tensor that has one
    exponent = magnitude >> 23
    plain = jnp.all((magnitude == 0) | ((exponent > 0) & (exponent >= (absmax_bits >> 23)[:, None] - 125)))
    codes = lax.cond(plain, _codes_float, _codes_exact, blocks, bits, absmax_bits)
    return codes.reshape(-1)[:n].reshape(shape), absmax


def _codes_float(blocks: jnp.ndarray, bits: jnp.ndarray, absmax_bits: jnp.ndarray) -> jnp.ndarray:
    """Codes with float arithmetic: exact when nothing in the tensor is subnormal."""
    del bits
    scale = lax.bitcast_convert_type(absmax_bits, jnp.float32)[:, None]
    positive = scale > 0
    normed = jnp.where(positive, blocks / jnp.where(positive, scale, 1.0), 0.0)
    return nearest_code(normed)


def _codes_exact(blocks: jnp.ndarray, bits: jnp.ndarray, absmax_bits: jnp.ndarray) -> jnp.ndarray:
    """Codes from bit patterns: numpy's for subnormal values and quotients too."""
    scale = absmax_bits[:, None]
    usable = (scale > 0) & (scale < _INF)
    q, nonzero = _normalise(bits & _MAGNITUDE, jnp.where(usable, scale, 1 << 23))
    # as numpy: a NaN or zero scale gives 0; an infinite one x / inf (0, or NaN for +-inf)
    inf_quotient = blocks / lax.bitcast_convert_type(scale, jnp.float32)
    normed = jnp.where(usable, jnp.where(bits < 0, -q, q), jnp.where(scale == _INF, inf_quotient, 0.0))
    return _codes(normed, usable & nonzero & (bits > 0), usable & nonzero & (bits < 0))


def dequantize(codes: jnp.ndarray, absmax: jnp.ndarray, block_size: Optional[int]) -> jnp.ndarray:
    """fp32 ``qmap[codes] * absmax[block]``, shaped like ``codes``."""
    shape, n = codes.shape, codes.size
    if n == 0:
        return jnp.zeros(shape, jnp.float32)
    nb, bs = _layout(n, block_size)
    values = jnp.take(qmap(), codes.reshape(-1).astype(jnp.int32))
    blocks = jnp.pad(values, (0, nb * bs - n)).reshape(nb, bs) * absmax[:, None]
    return blocks.reshape(-1)[:n].reshape(shape)
