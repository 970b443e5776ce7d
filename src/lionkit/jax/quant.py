"""8-bit (de)quantization in jax.numpy: the same map, blocks and rounding as ``lionkit.quant``.

Codes equal the PyTorch side's bit for bit for the same fp32 input: absmax is max |x| per block,
the normalised value is the same fp32 division, and the code is found by comparing against the
same fp32 decision thresholds (``interop.code_thresholds``): nearest map value, ties to the
larger code, never the zero code or the other sign for a nonzero value. Block sizes and shapes
are static, so these functions trace once per parameter shape under ``jax.jit``.
"""

from __future__ import annotations

from typing import Optional

import jax.numpy as jnp
import numpy as np

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
    t = jnp.asarray(_THRESHOLDS)
    # number of thresholds <= x: the nearest code, ties to the larger one (torch.bucketize(right=True))
    codes = jnp.searchsorted(t, normed, side="right").astype(jnp.int32)
    # Lion reads only the sign of the momentum: a nonzero value keeps a code of its own sign
    codes = jnp.where((normed > 0) & (codes <= ZERO_CODE), ZERO_CODE + 1, codes)
    codes = jnp.where((normed < 0) & (codes >= ZERO_CODE), ZERO_CODE - 1, codes)
    return codes.astype(jnp.uint8)


def quantize(x: jnp.ndarray, block_size: Optional[int]) -> tuple[jnp.ndarray, jnp.ndarray]:
    """fp32 ``x`` -> (uint8 codes shaped like x, fp32 absmax per block)."""
    shape, n = x.shape, x.size
    nb, bs = _layout(n, block_size)
    if n == 0:
        return jnp.zeros(shape, jnp.uint8), jnp.zeros((1,), jnp.float32)
    flat = x.astype(jnp.float32).reshape(-1)
    # zero padding changes no block maximum and is cut off again below
    blocks = jnp.pad(flat, (0, nb * bs - n)).reshape(nb, bs)
    absmax = jnp.max(jnp.abs(blocks), axis=1)
    scale = absmax[:, None]
    positive = scale > 0
    normed = jnp.where(positive, blocks / jnp.where(positive, scale, 1.0), 0.0)
    codes = nearest_code(normed).reshape(-1)[:n].reshape(shape)
    return codes, absmax


def dequantize(codes: jnp.ndarray, absmax: jnp.ndarray, block_size: Optional[int]) -> jnp.ndarray:
    """fp32 ``qmap[codes] * absmax[block]``, shaped like ``codes``."""
    shape, n = codes.shape, codes.size
    if n == 0:
        return jnp.zeros(shape, jnp.float32)
    nb, bs = _layout(n, block_size)
    values = jnp.take(qmap(), codes.reshape(-1).astype(jnp.int32))
    blocks = jnp.pad(values, (0, nb * bs - n)).reshape(nb, bs) * absmax[:, None]
    return blocks.reshape(-1)[:n].reshape(shape)
