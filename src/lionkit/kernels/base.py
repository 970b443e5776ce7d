"""What every update kernel takes: one signature for all backends."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence, Union

import torch

from .. import quant, quant4, quant_fast
from ..qstate import QuantizedState

Momentum = Union[torch.Tensor, QuantizedState]
"""fp32 momentum tensor (32-bit state) or its 8- or 4-bit form."""


def fused_momentum_ok(p: torch.Tensor, m: Momentum, four_bit: bool = False) -> bool:
    """True if a fused kernel can update ``m`` as the momentum of ``p`` in place: fp32 momentum,
    or 8-bit codes with block size 256 or one scale per tensor, the dynamic map's bucket table,
    and one scale per block (the kernels write that many), or (``four_bit``: for kernels that
    have it) 4-bit codes in quant4's layout; all contiguous, on ``p``'s device, with ``p``'s
    element count."""
    if isinstance(m, QuantizedState):
        n = p.numel()
        if m.bits == 4:
            layout = (
                four_bit
                and m.block_size == quant4.BLOCK_SIZE
                and m.size() == n
                and m.codes.numel() == quant4.packed_numel(n)
                # the kernels read the 15 levels from the map tensor itself
                and m.qmap.dtype == torch.float32
                and m.qmap.device == p.device
                and m.qmap.is_contiguous()
                and m.qmap.numel() == quant4.MAP_SIZE
            )
        else:
            layout = (
                m.bits == 8
                and m.block_size in (None, quant.BLOCK_SIZE)
                and m.codes.numel() == n
                and quant_fast.kernel_constants_of(m.qmap) is not None
            )
        return (
            layout
            and m.codes.dtype == torch.uint8
            and m.codes.is_contiguous()
            and m.codes.device == p.device
            and m.absmax.dtype == torch.float32
            and m.absmax.device == p.device
            and m.absmax.is_contiguous()
            and m.absmax.numel() == quant.num_blocks(n, m.block_size)
        )
    return m.dtype == torch.float32 and m.is_contiguous() and m.device == p.device and m.numel() == p.numel()


@dataclass(frozen=True)
class StepHyper:
    """Per-tensor scalars of one Lion step (already resolved: schedules, clipping scales)."""

    lr: float
    beta1: float
    beta2: float
    weight_decay: float = 0.0
    grad_scale: float = 1.0  # product of the percentile-clipping and global-norm scales
    clip_value: float | None = None  # elementwise clamp of the scaled gradient
    skip_zeros: bool = False  # leave elements whose gradient is exactly 0 untouched
    # Round the fp32 result to a bf16/fp16 parameter stochastically (lionkit.rounding) instead
    # of to nearest; the random numbers come from `seed` alone (one per tensor and step, drawn
    # by the optimizer), so a step is reproducible. Backends without it must refuse the tensor.
    stochastic_rounding: bool = False
    seed: int = 0
    # Key of the 4-bit momentum's stochastic rounding (lionkit.quant4.uniform), one per tensor
    # and step; unused for 32- and 8-bit momentum.
    mseed: int = 0


FP32_MAX = torch.finfo(torch.float32).max


def hyper_row(hp: StepHyper) -> tuple[float, ...]:
    """The scalars a fused kernel takes, as the reference rounds them: Python (double)
    arithmetic, then fp32 (by the caller). A clip bound beyond fp32's range is inf there (no
    clipping), as the eager backend's fp32 math treats it."""
    decay = 1.0 - hp.lr * hp.weight_decay if hp.weight_decay != 0 else 1.0
    clip = float("inf") if hp.clip_value is None or hp.clip_value > FP32_MAX else hp.clip_value
    return (hp.lr, hp.beta1, 1.0 - hp.beta1, hp.beta2, 1.0 - hp.beta2, decay, hp.grad_scale, clip)


class Backend(Protocol):
    """A Lion update implementation. ``step_many`` updates every (p, g, m) in place.

    ``stochastic_rounding`` (class attribute, default False when absent) says whether the
    backend honours ``StepHyper.stochastic_rounding``; the optimizer sends tensors that need it
    to a backend that does."""

    name: str

    def supports(self, p: torch.Tensor, m: Momentum) -> bool: ...

    def step_many(
        self,
        params: Sequence[torch.Tensor],
        grads: Sequence[torch.Tensor],
        moms: Sequence[Momentum],
        hypers: Sequence[StepHyper],
    ) -> None: ...
