"""Plain PyTorch update, fp32 math (fp64 for float64 parameters), processed in chunks of whole
blocks so a step allocates O(chunk) temporaries rather than O(parameter). Works on any device;
the fallback path, and the only one for float64 parameters."""

from __future__ import annotations

import math
from typing import Sequence

import torch

from .. import quant, quant4, rounding
from ..qstate import QuantizedState
from .base import FP32_MAX, Momentum, StepHyper

CHUNK = 1 << 18  # elements per chunk (a multiple of the block size): ~1 MiB per fp32 temporary


def _math_dtype(p: torch.Tensor) -> torch.dtype:
    """fp32 for fp32/fp16/bf16 parameters; fp64 for float64 ones, whose update would otherwise
    be rounded to fp32 (lr * sign(c) below an fp32 ulp of p lost). The momentum is stored in
    fp32 either way (the checkpoint format)."""
    return torch.float64 if p.dtype == torch.float64 else torch.float32


def _direction(m: torch.Tensor, g: torch.Tensor, hp: StepHyper) -> tuple[torch.Tensor, torch.Tensor]:
    """(new gradient after scaling/clamping, sign of the interpolation), in m's dtype."""
    if hp.grad_scale != 1.0:
        g = g * hp.grad_scale
    if hp.clip_value is not None:
        # a bound beyond fp32's range is inf in fp32 math (as the fused kernels round it); torch
        # would refuse to convert it for an fp32 tensor
        clip = hp.clip_value if g.dtype == torch.float64 or hp.clip_value <= FP32_MAX else math.inf
        g = g.clamp(-clip, clip)
    # interpolation, used only for its sign
    c = hp.beta1 * m + (1 - hp.beta1) * g
    return g, torch.sign(c)


def _momentum_chunk(
    p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, hp: StepHyper
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(gradient as used, sign of the interpolation, new m in fp32) for one chunk of parameter
    ``p`` (its dtype picks the math: ``_math_dtype``); inputs are not modified."""
    dt = _math_dtype(p)
    m = m.to(dt)
    g, direction = _direction(m, g.to(dt), hp)
    # decay the momentum
    m_new = hp.beta2 * m + (1 - hp.beta2) * g
    if hp.skip_zeros:
        m_new = torch.where(g == 0, m, m_new)
    return g, direction, m_new.to(torch.float32)


def _update_chunk(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, hp: StepHyper) -> tuple[torch.Tensor, torch.Tensor]:
    """(new p, new m) for one chunk, new m in fp32; inputs are not modified."""
    g, direction, m_new = _momentum_chunk(p, g, m, hp)
    p0 = p.to(g.dtype)
    # stepweight decay
    pf = p0 * (1 - hp.lr * hp.weight_decay) if hp.weight_decay != 0 else p0
    # weight update
    p_new = pf - hp.lr * direction
    if hp.skip_zeros:
        p_new = torch.where(g == 0, p0, p_new)
    return p_new, m_new


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.view(-1)


def _write_p(dst: torch.Tensor, p_new: torch.Tensor, hp: StepHyper, offset: int) -> None:
    """The one write-back of p (elements ``offset ..`` of its tensor): to nearest, or
    stochastically (bf16/fp16 with ``hp.stochastic_rounding``) with the random numbers of
    (key of hp.seed, element index)."""
    if hp.stochastic_rounding and dst.dtype in rounding.LOW_PRECISION:
        dst.copy_(rounding.stochastic_round_keyed(p_new, dst.dtype, rounding.key32(hp.seed), offset))
    else:
        dst.copy_(p_new)


def step_32bit(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, hp: StepHyper) -> None:
    pf, gf, mf = _flat(p), _flat(g), _flat(m)
    for s in range(0, pf.numel(), CHUNK):
        sl = slice(s, s + CHUNK)
        p_new, m_new = _update_chunk(pf[sl], gf[sl], mf[sl], hp)
        _write_p(pf[sl], p_new, hp, s)  # the one write-back of p (rounded to p's dtype)
        mf[sl].copy_(m_new)


def _quantize_into(m_new: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, qmap: torch.Tensor) -> None:
    normed = torch.where(scale > 0, m_new / scale, torch.zeros_like(m_new))
    codes.copy_(quant.nearest_code(normed, qmap))


def step_8bit(p: torch.Tensor, g: torch.Tensor, q: QuantizedState, hp: StepHyper) -> None:
    pf, gf, codes = _flat(p), _flat(g), _flat(q.codes)
    n = pf.numel()
    if q.block_size is None:
        # One scale for the tensor, taken from the *updated* momentum: pass 1 updates p and
        # finds max |m_new|; pass 2 recomputes m_new (deterministically) and quantizes it.
        scale_old = q.absmax.reshape(1)
        amax = torch.zeros((), dtype=torch.float32, device=pf.device)
        for s in range(0, n, CHUNK):
            sl = slice(s, s + CHUNK)
            m = q.qmap[codes[sl].long()] * scale_old
            p_new, m_new = _update_chunk(pf[sl], gf[sl], m, hp)
            _write_p(pf[sl], p_new, hp, s)
            amax = torch.maximum(amax, m_new.abs().amax())
        for s in range(0, n, CHUNK):
            sl = slice(s, s + CHUNK)
            m = q.qmap[codes[sl].long()] * scale_old
            _, _, m_new = _momentum_chunk(pf[sl], gf[sl], m, hp)  # as pass 1 computed it
            _quantize_into(m_new, codes[sl], amax, q.qmap)
        q.absmax.copy_(amax.reshape(q.absmax.shape))
        return
    bs = q.block_size
    assert CHUNK % bs == 0
    for s in range(0, n, CHUNK):
        sl = slice(s, s + CHUNK)
        b0 = s // bs
        nb = quant.num_blocks(min(CHUNK, n - s), bs)
        absmax = q.absmax[b0 : b0 + nb]
        m = quant.dequantize(codes[sl], absmax, q.qmap, bs)
        p_new, m_new = _update_chunk(pf[sl], gf[sl], m, hp)
        _write_p(pf[sl], p_new, hp, s)
        new_absmax = quant.block_absmax(m_new, bs)
        _quantize_into(m_new, codes[sl], quant._expand_scale(new_absmax, m_new.numel(), bs), q.qmap)
        absmax.copy_(new_absmax)


def step_4bit(p: torch.Tensor, g: torch.Tensor, q: QuantizedState, hp: StepHyper) -> None:
    """4-bit momentum (``lionkit.quant4``): decode a chunk, update in fp32, re-encode with new
    block scales, rounding stochastically with the uniforms of key ``hp.mseed``."""
    pf, gf = _flat(p), _flat(g)
    n, bs = pf.numel(), quant4.BLOCK_SIZE
    assert CHUNK % bs == 0 and CHUNK % 2 == 0
    for s in range(0, n, CHUNK):
        e = min(s + CHUNK, n)
        absmax = q.absmax[s // bs : s // bs + quant.num_blocks(e - s, bs)]
        codes = q.codes[s // 2 : (e + 1) // 2]
        m = quant4.dequantize(codes, absmax, q.qmap, e - s)
        p_new, m_new = _update_chunk(pf[s:e], gf[s:e], m, hp)
        _write_p(pf[s:e], p_new, hp, s)
        new_codes, new_absmax = quant4.quantize(m_new, q.qmap, quant4.uniform(hp.mseed, s, e - s, pf.device))
        codes.copy_(new_codes)
        absmax.copy_(new_absmax)


class TorchBackend:
    """Eager PyTorch, any device."""

    name = "torch"
    stochastic_rounding = True  # honours StepHyper.stochastic_rounding

    def supports(self, p: torch.Tensor, m: Momentum) -> bool:
        return True

    def step_many(
        self,
        params: Sequence[torch.Tensor],
        grads: Sequence[torch.Tensor],
        moms: Sequence[Momentum],
        hypers: Sequence[StepHyper],
    ) -> None:
        for p, g, m, hp in zip(params, grads, moms, hypers):
            if isinstance(m, QuantizedState):
                (step_4bit if m.bits == 4 else step_8bit)(p, g, m, hp)
            else:
                step_32bit(p, g, m, hp)
