"""Stochastic rounding for backends that do not implement it: run the backend on fp32 copies
of the parameters, a bounded number of elements at a time, then round the fp32 results into the
parameters with ``lionkit.rounding``.

The backend computes a bf16/fp16 parameter's step in fp32 anyway and rounds only at the store,
so updating an fp32 copy gives exactly the fp32 result it would have rounded; the random numbers
are those of (key of hp.seed, element index) as in ``torch_eager``, so the parameters come out
bit-identical to the eager backend's stochastic rounding whenever the backend's fp32 arithmetic
is bit-identical to the eager one (the compiled CPU kernel's is). Pieces of several tensors go to
the backend in one call (its per-call cost is paid once per ~CHUNK elements, not per tensor);
temporaries: fp32 copies of at most ~2 x CHUNK parameter and gradient elements.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Sequence

import torch

from .. import quant, rounding
from ..qstate import QuantizedState
from .base import Backend, Momentum, StepHyper
from .torch_eager import CHUNK, TorchBackend


def _momentum_slice(m: Momentum, start: int, stop: int) -> Momentum:
    """Elements [start, stop) of a flat fp32 or block-wise 8-bit momentum (views, no copies)."""
    if isinstance(m, QuantizedState):
        bs = m.block_size
        b0 = start // bs
        nb = quant.num_blocks(stop - start, bs)
        return QuantizedState(m.codes.view(-1)[start:stop], m.absmax[b0 : b0 + nb], m.qmap, bs)
    return m.view(-1)[start:stop]


def step_many(
    backend: Backend,
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    moms: Sequence[Momentum],
    hypers: Sequence[StepHyper],
) -> None:
    """Update every (p, g, m) whose ``hp.stochastic_rounding`` is set, with ``backend`` doing the
    fp32 math; one-scale-per-tensor 8-bit momentum (not separable into chunks) and 4-bit momentum
    (whose random numbers depend on the element's place in the whole tensor) go to the eager
    backend, which rounds stochastically itself."""
    assert CHUNK % quant.BLOCK_SIZE == 0  # chunks start on block boundaries
    eager = []
    batch: list[tuple] = []  # (destination view, fp32 copy, fp32 grad, momentum slice, hp, (key, offset))
    size = 0

    def flush() -> None:
        nonlocal batch, size
        if not batch:
            return
        _, works, gs, ms, hps, _ = zip(*batch)
        backend.step_many(list(works), list(gs), list(ms), list(hps))
        for dst, work, _, _, _, (key, start) in batch:
            dst.copy_(rounding.stochastic_round_keyed(work, dst.dtype, key, start))
        batch, size = [], 0

    for p, g, m, hp in zip(params, grads, moms, hypers):
        if isinstance(m, QuantizedState) and (m.block_size is None or m.bits == 4):
            eager.append((p, g, m, hp))
            continue
        plain = replace(hp, stochastic_rounding=False)
        pf, gf = p.view(-1), g.view(-1)
        for s in range(0, pf.numel(), CHUNK):
            e = min(s + CHUNK, pf.numel())
            # fp32 copies (exact) that the backend updates in place; backends pair fp32 weights
            # with fp32 gradients
            batch.append((pf[s:e], pf[s:e].to(torch.float32), gf[s:e].to(torch.float32),
                          _momentum_slice(m, s, e), plain, (rounding.key32(hp.seed), s)))
            size += e - s
            if size >= CHUNK:
                flush()
    flush()
    if eager:
        TorchBackend().step_many(*zip(*eager))
