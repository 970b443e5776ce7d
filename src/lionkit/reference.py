"""The Lion step written as the paper's equations: the ground truth every fast path is tested
against. Pure functions, any float dtype (the tests run them in float64), no in-place writes.

Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms", Program 1.
"""

from __future__ import annotations

import torch

from . import quant


def lion_reference(
    p: torch.Tensor,
    g: torch.Tensor,
    m: torch.Tensor,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    weight_decay: float = 0.0,
    grad_scale: float = 1.0,
    clip_value: float | None = None,
    skip_zeros: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One Lion step; returns (new p, new m) in the dtype of ``p`` / ``m``."""
    g = g.to(m.dtype) * grad_scale
    if clip_value is not None:
        g = g.clamp(-clip_value, clip_value)
    # interpolation, used only for its sign
    c = beta1 * m + (1 - beta1) * g
    # stepweight decay (decoupled)
    p_new = p * (1 - lr * weight_decay) if weight_decay != 0 else p.clone()
    # weight update; sign(0) = 0
    p_new = p_new - lr * torch.sign(c)
    # decay the momentum
    m_new = beta2 * m + (1 - beta2) * g
    if skip_zeros:
        zero = g == 0
        p_new = torch.where(zero, p, p_new)
        m_new = torch.where(zero, m, m_new)
    return p_new, m_new


def lion_reference_8bit(
    p: torch.Tensor,
    g: torch.Tensor,
    codes: torch.Tensor,
    absmax: torch.Tensor,
    qmap: torch.Tensor,
    block_size: int | None,
    **hyper,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The 8-bit step: dequantize, fp32 reference step, requantize with a brute-force nearest
    code search. Returns (new p in fp32, new codes, new absmax)."""
    m = quant.dequantize(codes, absmax, qmap, block_size)
    p_new, m_new = lion_reference(p.to(torch.float32), g, m, **hyper)
    new_absmax = quant.block_absmax(m_new, block_size)
    scale = quant._expand_scale(new_absmax, m_new.numel(), block_size).reshape(m_new.shape)
    normed = torch.where(scale > 0, m_new / scale, torch.zeros_like(m_new))
    return p_new, quant.nearest_code_bruteforce(normed, qmap), new_absmax


def lion_reference_4bit(
    p: torch.Tensor,
    g: torch.Tensor,
    codes: torch.Tensor,
    absmax: torch.Tensor,
    qmap: torch.Tensor,
    u: torch.Tensor,
    **hyper,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The 4-bit step (``lionkit.quant4``): unpack and dequantize, fp32 reference step, new
    block scales, then stochastic rounding written out: the neighbouring levels ``lo <= v < hi``
    found by comparing with every level, ``up = u < fp32((v - lo) / (hi - lo))``. ``u`` holds
    one uniform per element. Returns (new p in fp32, new packed codes, new absmax)."""
    from . import quant4

    n = p.numel()
    m = quant4.dequantize(codes, absmax, qmap, n)
    p_new, m_new = lion_reference(p.reshape(-1).to(torch.float32), g.reshape(-1), m, **hyper)
    new_absmax = quant.block_absmax(m_new, quant4.BLOCK_SIZE)
    scale = new_absmax.repeat_interleave(quant4.BLOCK_SIZE)[:n]
    v = torch.where(scale > 0, m_new / scale, torch.zeros_like(m_new))
    lo = (qmap.reshape(1, -1) <= v.reshape(-1, 1)).sum(dim=1) - 1  # last level <= v
    lo = lo.clamp(0, quant4.MAP_SIZE - 2)  # v = 1: between the top two levels, p = 1
    lo_v, hi_v = qmap[lo], qmap[lo + 1]
    up = u < (v - lo_v) / (hi_v - lo_v)
    return p_new.reshape(p.shape), quant4.pack(lo + up.long()), new_absmax
