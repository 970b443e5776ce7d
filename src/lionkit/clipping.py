"""Gradient clipping that Lion applies before its update: bitsandbytes' percentile clipping
(per parameter, from a ring of past gradient norms), and braintools/optax's global-norm and
elementwise clipping. Functions return scales; the kernels apply them, so ``p.grad`` is never
modified."""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch

GNORM_HISTORY = 100


def grad_sq_norm(g: torch.Tensor) -> torch.Tensor:
    """sum(g^2) as a 0-dim tensor: the norm accumulated in fp32 (bf16/fp16 gradients included;
    fp64 stays fp64), squared in fp64 (fp32 on MPS), so that a norm up to fp32's largest has a
    finite square. A norm above ~1.8e19 overflows the fp32 accumulation itself (inf):
    ``global_norm_scale`` recomputes those exactly. The fp32 percentile ring stores the square
    rounded to fp32, as bitsandbytes' fp32 norms."""
    norm = torch.linalg.vector_norm(g, 2, dtype=torch.promote_types(g.dtype, torch.float32))
    return norm.square() if g.device.type == "mps" else norm.to(torch.float64).square()


def percentile_scale(
    gnorm_vec: torch.Tensor, sq_norm: torch.Tensor, step: int, percentile: int, fresh: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """bitsandbytes' percentile clipping (SPEC 2), without touching ``gnorm_vec``.

    Returns (the ring as it is after this step, the gradient scale as a 0-dim tensor):
    the slot ``step % 100`` holds this step's squared norm (every slot at step 1, and in a
    ``fresh`` ring: one created at a later step, when clipping is switched on mid-training or
    a checkpoint without a ring is loaded; a ring of zeros would clip every gradient to 0);
    clip = sqrt(sorted(ring)[percentile]); scale = clip/current if current > clip else 1.

    At step 2, a ring that holds only zeros (step 1 had an all-zero gradient: the step with
    zero gradients and lr 0 that ``torch.distributed.checkpoint``'s ``get_state_dict`` takes
    to create the state, before any real one) is filled as at step 1: bitsandbytes would clip
    every gradient to 0 until 100 - percentile real norms had come in. Later rings of zeros
    (a long run of zero gradients) are kept, as bitsandbytes keeps them.
    """
    ring = gnorm_vec.clone()
    if step == 1 or fresh:
        ring.fill_(sq_norm)
    else:
        ring[step % GNORM_HISTORY] = sq_norm
        if step == 2:  # no host sync: the "all zeros" test stays on the ring's device
            ring = torch.where((gnorm_vec == 0).all(), sq_norm.to(ring.dtype).expand_as(ring), ring)
    current = ring[step % GNORM_HISTORY].sqrt()
    # percentile == 100 would index past the ring; it means "off" and never reaches here
    clip = ring.sort().values[percentile].sqrt()
    scale = torch.where(current > clip, clip / current, torch.ones_like(current))
    return ring, scale


def global_norm_scale(
    sq_norms: Sequence[torch.Tensor],
    scales: Sequence[float],
    max_norm: float,
    exact: Optional[Callable[[int], float]] = None,
) -> float:
    """max_norm / ||g|| if the global L2 norm of the (already scaled) gradients exceeds
    ``max_norm``, else 1 (braintools' ``clip_by_global_norm``, computed once over every
    parameter of the optimizer). ``exact(i)``: gradient i's squared norm in fp64, asked for only
    where the fp32 one overflowed (a huge but finite gradient, what clipping is for: without it
    every gradient would be scaled to 0)."""
    total = 0.0
    for i, (s, n) in enumerate(zip(scales, sq_norms)):
        sq = float(n)
        if sq == math.inf and exact is not None:
            sq = exact(i)
        total += float(s) ** 2 * sq
    norm = math.sqrt(total)
    return max_norm / norm if norm > max_norm else 1.0
