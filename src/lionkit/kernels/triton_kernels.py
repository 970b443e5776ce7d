"""The Triton kernels of ``triton_lion`` (imported by it on first use: Triton decides at
definition time whether kernels run on the GPU or in its CPU interpreter, ``TRITON_INTERPRET``).

Step-header comments match ``reference.py`` so kernel and reference read side by side.
"""

import triton
import triton.language as tl

from .. import quant_fast

INTERPRETED = bool(triton.knobs.runtime.interpret) if hasattr(triton, "knobs") else False

# uint32 word offsets of quant_fast.kernel_constants
KEY0 = tl.constexpr(quant_fast.HDR_KEY0)
NB = tl.constexpr(quant_fast.HDR_NB)
ZERO = tl.constexpr(quant_fast.HDR_ZERO)
QMAP_AT = tl.constexpr(quant_fast.QMAP_AT)
LUT_AT = tl.constexpr(quant_fast.LUT_AT)

@triton.jit
def _max2(a, b):
    return tl.maximum(a, b)


@triton.jit
def _reduce_max(x, axis):
    return tl.reduce(x, axis, _max2)


# tl.max, unless the interpreter cannot run it: when triton.language was imported before
# TRITON_INTERPRET was set, its library functions stay compiled-mode functions. The fallback
# is the same reduction with our own combiner (slow in the interpreter, identical on a GPU).
_rmax = _reduce_max if INTERPRETED and not type(tl.max).__name__.startswith("Interpreted") else tl.max


@triton.jit
def _grad_in(g, gs, clip):
    # scale (1 without one: exact), then clamp to [-clip, clip] (inf without one); NaN passes
    g = g * gs
    g = tl.where(g < -clip, -clip, g)
    return tl.where(g > clip, clip, g)

@triton.jit
def _lion(p, g, m, lr, b1, omb1, b2, omb2, decay, skip):
    # interpolation, used only for its sign
    c = b1 * m + omb1 * g
    s = tl.where(c > 0, 1.0, tl.where(c < 0, -1.0, 0.0))
    # stepweight decay (1 without weight decay: exact), weight update
    pn = p * decay - lr * s
    # decay the momentum
    mn = b2 * m + omb2 * g
    keep = skip & (g == 0)
    return tl.where(keep, p, pn), tl.where(keep, m, mn)

@triton.jit
def _load_f32(ptr, offs, mask, T: tl.constexpr):
    # a parameter or gradient as fp32. bf16 by hand (its bits to the high half): exact for
    # subnormals too, which the interpreter's own conversion gets wrong; the GPU's is the same
    if T == tl.bfloat16:
        h = tl.load(ptr.to(tl.pointer_type(tl.uint16), bitcast=True) + offs, mask=mask, other=0)
        return (h.to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        return tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _round_to(x, PT: tl.constexpr):
    # fp32 -> parameter dtype, round to nearest even. bf16 by hand: the interpreter's own
    # conversion truncates, and this is what the GPU's cvt.rn does.
    if PT == tl.bfloat16:
        u = x.to(tl.uint32, bitcast=True)
        u = u + 0x7FFF + ((u >> 16) & 1)
        h = tl.where(x != x, 0x7FC0, (u >> 16)).to(tl.uint16)
        return h.to(tl.bfloat16, bitcast=True)
    else:
        return x.to(PT)


@triton.jit
def _lowbias32(x):
    # rounding._lowbias32 on uint32 (products wrap modulo 2**32)
    # (the multipliers as uint32 scalars: a literal above 2**31 must not widen the product)
    x = x ^ (x >> 16)
    x = x * tl.full((), 0x7FEB352D, tl.uint32)
    x = x ^ (x >> 15)
    x = x * tl.full((), 0x846CA68B, tl.uint32)
    return x ^ (x >> 16)


@triton.jit
def _store_p(ptr, offs, x, mask, sr, key, PT: tl.constexpr):
    # the parameter's store: to nearest, or for bf16 with `sr` stochastically with
    # rounding.sr_hash(key, index) (rounding.stochastic_round_keyed): the hash's top 16 bits
    # added to the pattern, then truncated; NaN and inf to nearest
    near = _round_to(x, PT)
    if PT == tl.bfloat16:
        idx = offs.to(tl.int64)
        hi = (idx >> 32).to(tl.uint32)
        salt = tl.where(hi != 0, _lowbias32(hi), 0).to(tl.uint32)
        h = _lowbias32(idx.to(tl.uint32) ^ key ^ salt)
        u = x.to(tl.uint32, bitcast=True)
        up = ((u + (h >> 16)) >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        finite = (u & 0x7F800000) != 0x7F800000
        near = tl.where(sr & finite, up, near)
    tl.store(ptr + offs, near, mask=mask)


@triton.jit
def _quantize(x, LUT, key0, nb, zero):
    # quant_fast's bucket table: top 15 bits of |x| pick the bucket, one compare finishes
    b = x.to(tl.int32, bitcast=True) & 0x7FFFFFFF
    neg = x < 0
    key = tl.minimum(tl.maximum((b >> 16) - key0, 0), nb - 1) + tl.where(neg, nb, 0)
    e = tl.load(LUT + key)
    j = (e >> 17) + ((b & 0xFFFF) >= (e & 0x1FFFF)).to(tl.int32)
    code = tl.where(x > 0, zero + 1 + j, tl.where(neg, zero - 1 - j, zero))
    return tl.where(x != x, 255, code)  # NaN: where torch.bucketize puts it

@triton.jit
def _sr_args(FLAGS, KEYS, t):
    # flag 4: the parameter is rounded stochastically with key KEYS[t] (uint32 bits)
    return (tl.load(FLAGS + t) & 4) != 0, tl.load(KEYS + t).to(tl.uint32, bitcast=True)


@triton.jit
def _tensor_args(ITEM_T, ITEM_S, P, G, M, NUMEL, HYP, FLAGS, PT: tl.constexpr, GT: tl.constexpr, MT: tl.constexpr):
    pid = tl.program_id(0)
    t = tl.load(ITEM_T + pid)
    start = tl.load(ITEM_S + pid)
    n = tl.load(NUMEL + t)
    p_ptr = tl.load(P + t).to(tl.pointer_type(PT))
    g_ptr = tl.load(G + t).to(tl.pointer_type(GT))
    m_ptr = tl.load(M + t).to(tl.pointer_type(MT))
    h = HYP + t * 8
    skip = (tl.load(FLAGS + t) & 1) != 0
    return (t, start, n, p_ptr, g_ptr, m_ptr, tl.load(h), tl.load(h + 1), tl.load(h + 2), tl.load(h + 3),
            tl.load(h + 4), tl.load(h + 5), tl.load(h + 6), tl.load(h + 7), skip)

@triton.jit
def lion32(ITEM_T, ITEM_S, P, G, M, NUMEL, HYP, FLAGS, KEYS, PT: tl.constexpr, GT: tl.constexpr,
           BLOCK: tl.constexpr, ITERS: tl.constexpr):
    t, start, n, p_ptr, g_ptr, m_ptr, lr, b1, omb1, b2, omb2, decay, gs, clip, skip = _tensor_args(
        ITEM_T, ITEM_S, P, G, M, NUMEL, HYP, FLAGS, PT, GT, tl.float32)
    sr, key = _sr_args(FLAGS, KEYS, t)
    for i in tl.static_range(ITERS):
        offs = start + i * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        p = _load_f32(p_ptr, offs, mask, PT)
        g = _grad_in(_load_f32(g_ptr, offs, mask, GT), gs, clip)
        m = tl.load(m_ptr + offs, mask=mask, other=0.0)
        pn, mn = _lion(p, g, m, lr, b1, omb1, b2, omb2, decay, skip)
        _store_p(p_ptr, offs, pn, mask, sr, key, PT)
        tl.store(m_ptr + offs, mn, mask=mask)

@triton.jit
def lion8(ITEM_T, ITEM_S, P, G, M, A, NUMEL, HYP, FLAGS, KEYS, QC, PART, SCALE,
          PT: tl.constexpr, GT: tl.constexpr, ROWS: tl.constexpr, ITERS: tl.constexpr, PASS: tl.constexpr):
    # PASS 0: block-wise step (new absmax per row of 256). PASS 1: per-tensor, update p and
    # write this program's max |m_new| to PART. PASS 2: per-tensor, recompute m_new from
    # the old codes and quantize with SCALE[t].
    t, start, n, p_ptr, g_ptr, c_ptr, lr, b1, omb1, b2, omb2, decay, gs, clip, skip = _tensor_args(
        ITEM_T, ITEM_S, P, G, M, NUMEL, HYP, FLAGS, PT, GT, tl.uint8)
    a_ptr = tl.load(A + t).to(tl.pointer_type(tl.float32))
    sr, key = _sr_args(FLAGS, KEYS, t)
    key0 = tl.load(QC + KEY0)
    nb = tl.load(QC + NB)
    zero = tl.load(QC + ZERO)
    qmap = (QC + QMAP_AT).to(tl.pointer_type(tl.float32), bitcast=True)
    lut = QC + LUT_AT
    part = 0.0
    part_nan = 0
    for i in tl.static_range(ITERS):
        rows = start // 256 + i * ROWS + tl.arange(0, ROWS)
        offs = rows[:, None] * 256 + tl.arange(0, 256)[None, :]
        mask = offs < n
        if PASS == 0:
            sold = tl.load(a_ptr + rows, mask=rows * 256 < n, other=0.0)[:, None]
        else:
            sold = tl.load(a_ptr)
        code = tl.load(c_ptr + offs, mask=mask, other=0).to(tl.int32)
        # dequantize: map value of the code times the old scale
        m = tl.load(qmap + code) * sold
        p = _load_f32(p_ptr, offs, mask, PT)
        g = _grad_in(_load_f32(g_ptr, offs, mask, GT), gs, clip)
        pn, mn = _lion(p, g, m, lr, b1, omb1, b2, omb2, decay, skip)
        if PASS != 2:
            _store_p(p_ptr, offs, pn, mask, sr, key, PT)
        mn = tl.where(mask, mn, 0.0)
        if PASS == 0:
            # new absmax of each block; max |.| propagates NaN as torch's amax does
            amax = _rmax(tl.abs(mn), 1)
            # (and, as quant.block_absmax, inf -> NaN: 8 bits cannot hold inf)
            amax = tl.where(_rmax((mn != mn).to(tl.int32), 1) > 0, float("nan"), amax)
            amax = tl.where(amax == float("inf"), float("nan"), amax)
            scale = amax[:, None]
            normed = tl.where(scale > 0, tl.math.div_rn(mn, tl.where(scale > 0, scale, 1.0)), 0.0)
            tl.store(c_ptr + offs, _quantize(normed, lut, key0, nb, zero).to(tl.uint8), mask=mask)
            tl.store(a_ptr + rows, amax, mask=rows * 256 < n)
        elif PASS == 1:
            part = tl.maximum(part, _rmax(tl.reshape(tl.abs(mn), (ROWS * 256,)), 0))
            part_nan = tl.maximum(part_nan, _rmax(tl.reshape((mn != mn).to(tl.int32), (ROWS * 256,)), 0))
        else:
            scale = tl.load(SCALE + t)
            normed = tl.where(scale > 0, tl.math.div_rn(mn, tl.where(scale > 0, scale, 1.0)), 0.0)
            tl.store(c_ptr + offs, _quantize(normed, lut, key0, nb, zero).to(tl.uint8), mask=mask)
    if PASS == 1:
        tl.store(PART + tl.program_id(0), tl.where(part_nan > 0, float("nan"), part))

@triton.jit
def reduce_parts(PART, FIRST, SCALE, BLOCK: tl.constexpr):
    # SCALE[t] = max of PART[FIRST[t]:FIRST[t+1]], NaN if any is NaN
    t = tl.program_id(0)
    lo = tl.load(FIRST + t)
    hi = tl.load(FIRST + t + 1)
    acc = tl.full((BLOCK,), 0.0, tl.float32)
    bad = tl.full((BLOCK,), 0, tl.int32)
    for s in range(lo, hi, BLOCK):
        offs = s + tl.arange(0, BLOCK)
        v = tl.load(PART + offs, mask=offs < hi, other=0.0)
        acc = tl.maximum(acc, v)
        bad = tl.maximum(bad, (v != v).to(tl.int32))
    tl.store(SCALE + t, tl.where(_rmax(bad, 0) > 0, float("nan"), _rmax(acc, 0)))

@triton.jit
def store_scales(A, SCALE):
    t = tl.program_id(0)
    tl.store(tl.load(A + t).to(tl.pointer_type(tl.float32)), tl.load(SCALE + t))

@triton.jit
def quantize(X, OUT, n, QC, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(X + offs, mask=mask, other=0.0)
    code = _quantize(x, QC + LUT_AT, tl.load(QC + KEY0), tl.load(QC + NB), tl.load(QC + ZERO))
    tl.store(OUT + offs, code.to(tl.uint8), mask=mask)
