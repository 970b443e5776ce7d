"""What every update kernel takes: one signature for all backends."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence, Union

import torch

from ..qstate import QuantizedState

Momentum = Union[torch.Tensor, QuantizedState]
"""fp32 momentum tensor (32-bit state) or its 8-bit form."""


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
