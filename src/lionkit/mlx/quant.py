"""8-bit (de)quantization in MLX: the same map, blocks and rounding as ``lionkit.quant``.

Codes equal the PyTorch and JAX sides' bit for bit for the same fp32 input. The nearest code
is found by binary search over the same 255 fp32 decision thresholds
(``interop.code_thresholds``): eight gather-and-compare rounds, exact, and available in every
MLX version (no ``searchsorted`` needed).
"""

from __future__ import annotations

from typing import Optional

import mlx.core as mx
import numpy as np

from .. import interop

_QMAP = interop.dynamic_map()
_THRESHOLDS, ZERO_CODE = interop.code_thresholds(_QMAP)


def qmap() -> mx.array:
    """The 256-value dynamic map as a float32 MLX array."""
    return mx.array(_QMAP)


def _layout(numel: int, block_size: Optional[int]) -> tuple[int, int]:
    """(number of blocks, elements per block) of the padded block view."""
    if block_size is None or numel == 0:
        return 1, max(numel, 1)
    return interop.num_blocks(numel, block_size), block_size


def zeros(shape: tuple[int, ...], block_size: Optional[int]) -> tuple[mx.array, mx.array]:
    """(codes, absmax) of the all-zero state for a tensor of ``shape``."""
    nb, _ = _layout(int(np.prod(shape, dtype=np.int64)), block_size)
    return mx.full(shape, ZERO_CODE, dtype=mx.uint8), mx.zeros((nb,), dtype=mx.float32)


def nearest_code(normed: mx.array) -> mx.array:
    """uint8 codes of the map values nearest to fp32 ``normed`` (in [-1, 1]), sign kept."""
    t = mx.array(_THRESHOLDS)
    # count of thresholds <= x by binary lifting: after the round for `bit`, `count` is the
    # largest multiple-of-bit prefix whose last threshold is <= x (255 = 128+64+...+1)
    count = mx.zeros(normed.shape, dtype=mx.int32)
    bit = 128
    while bit:
        cand = count + bit
        count = mx.where(mx.take(t, cand - 1) <= normed, cand, count)
        bit //= 2
    # Lion reads only the sign of the momentum: a nonzero value keeps a code of its own sign
    count = mx.where((normed > 0) & (count <= ZERO_CODE), ZERO_CODE + 1, count)
    count = mx.where((normed < 0) & (count >= ZERO_CODE), ZERO_CODE - 1, count)
    return count.astype(mx.uint8)


def quantize(x: mx.array, block_size: Optional[int]) -> tuple[mx.array, mx.array]:
    """fp32 ``x`` -> (uint8 codes shaped like x, fp32 absmax per block)."""
    shape, n = tuple(x.shape), x.size
    if n == 0:
        return mx.zeros(shape, dtype=mx.uint8), mx.zeros((1,), dtype=mx.float32)
    nb, bs = _layout(n, block_size)
    flat = x.astype(mx.float32).reshape(-1)
    if nb * bs > n:  # zero padding changes no block maximum and is cut off again below
        flat = mx.concatenate([flat, mx.zeros((nb * bs - n,), dtype=mx.float32)])
    blocks = flat.reshape(nb, bs)
    absmax = mx.max(mx.abs(blocks), axis=1)
    scale = absmax[:, None]
    positive = scale > 0
    normed = mx.where(positive, blocks / mx.where(positive, scale, 1.0), 0.0)
    codes = nearest_code(normed).reshape(-1)[:n].reshape(shape)
    return codes, absmax


def dequantize(codes: mx.array, absmax: mx.array, block_size: Optional[int]) -> mx.array:
    """fp32 ``qmap[codes] * absmax[block]``, shaped like ``codes``."""
    shape, n = tuple(codes.shape), codes.size
    if n == 0:
        return mx.zeros(shape, dtype=mx.float32)
    nb, bs = _layout(n, block_size)
    values = mx.take(qmap(), codes.reshape(-1).astype(mx.int32))
    if nb * bs > n:
        values = mx.concatenate([values, mx.zeros((nb * bs - n,), dtype=mx.float32)])
    blocks = values.reshape(nb, bs) * absmax[:, None]
    return blocks.reshape(-1)[:n].reshape(shape)
