"""The public PyTorch optimizers: bitsandbytes' Lion family, same names, parameters, defaults
and positional order. Each class only fixes ``optim_bits`` and/or ``is_paged``."""

from __future__ import annotations

from typing import Any

from .optimizer import LRType, ParamsT, _LionBase

_ARGS_DOC = """
    Args:
        params: iterable of parameters or of param-group dicts.
        lr (float or callable, default 1e-4): learning rate. A callable ``step -> lr`` is a
            schedule (MLX style): a parameter's k-th update uses ``lr(k - 1)``. Any
            ``torch.optim.lr_scheduler`` also works (it sets ``group["lr"]``).
            Advice: 3-10x smaller than the AdamW lr you would use.
        betas (tuple, default (0.9, 0.99)): ``beta1`` interpolates momentum and gradient for the
            update's sign, ``beta2`` decays the momentum. Each in [0, 1).
        weight_decay (float, default 0): decoupled weight decay, ``p *= 1 - lr * weight_decay``.
            Advice: 3-10x larger than AdamW's, so that ``lr * weight_decay`` stays similar.
        optim_bits (int, default 32): 32 keeps fp32 momentum; 8 keeps bitsandbytes' block-wise
            8-bit format (1.016 bytes per parameter instead of 4); 4 keeps lionkit's 4-bit format
            (0.625 bytes; see ``Lion4bit``). Fixed by the 4/8/32bit classes.
        args (object, default None): bitsandbytes-style override object; its attributes
            ``optim_bits``, ``min_8bit_size``, ``percentile_clipping``, ``block_wise``,
            ``skip_zeros`` (and ``max_unorm``, which must be 0) replace the arguments above.
        min_8bit_size (int, default 4096): parameters with fewer elements keep fp32 momentum
            (also with 4 bits).
        percentile_clipping (int, default 100): clip each parameter's gradient at this
            percentile of its last 100 gradient norms (100 = off).
        block_wise (bool, default True): one 8-bit scale per 256 elements (True) or one per
            tensor (False).
        is_paged (bool, default False): keep large state tensors in CUDA unified memory, paged
            to host RAM under memory pressure (see ``lionkit.paging``). On machines without
            CUDA the state stays in ordinary memory, with one warning.
        grad_clip_norm (float, keyword-only, default None): clip the global L2 norm of all
            gradients of this optimizer to this value (braintools/optax semantics).
        grad_clip_value (float, keyword-only, default None): clamp every gradient element to
            ``[-grad_clip_value, grad_clip_value]``.
        backend (str, keyword-only, default "auto"): update implementation; see
            ``lionkit.kernels``. The one used per device is in ``opt.backends_used``.
        nonfinite (str, keyword-only, default "raise"): what a step does when a gradient holds
            NaN or +-inf, checked over all gradients before anything is written. "raise":
            ``lionkit.NonFiniteGradientError`` naming the parameter, nothing updated (the
            default: one NaN would otherwise poison the momentum for good, silently).
            "skip": nothing updated, ``opt.skipped_steps`` counts it. "propagate": no check,
            as torch.optim and bitsandbytes do (saves one read of the gradients and one host
            sync per step). ``torch.amp.GradScaler`` skips such steps itself, under any policy.
        stochastic_rounding (bool, keyword-only, default False): for bf16/fp16 parameters, round
            the fp32 result of each step to the parameter's dtype stochastically (unbiased: the
            upper neighbour with probability equal to the distance from the lower one, in units
            of their gap) instead of to nearest, so updates smaller than half a bf16 spacing are
            kept on average. This is what lets pure-bf16 weights (no fp32 master copy) train
            like fp32: with ``optim_bits=8``, 3 bytes per parameter for weights and state
            together. No effect on fp32 parameters. See ``lionkit.rounding`` and
            ``docs/convergence.md``.
        sr_seed (int, keyword-only, default None): seed of the stochastic rounding. Every draw
            is fixed by (sr_seed, step, the parameter's place in the optimizer), so a run is
            reproducible and a resumed run continues exactly as an uninterrupted one would when
            given the same sr_seed. None draws it from torch's default generator when the
            optimizer is built (so ``torch.manual_seed`` fixes it); read it from ``opt.sr_seed``.
"""


class Lion(_LionBase):
    __doc__ = (
        """Lion (Chen et al. 2023): sign of an interpolated momentum, one state per parameter.

    For parameter ``p``, gradient ``g``, momentum ``m`` (zero at start), every step::

        c = beta1 * m + (1 - beta1) * g        # only its sign is used; sign(0) = 0
        p = p * (1 - lr * weight_decay) - lr * sign(c)
        m = beta2 * m + (1 - beta2) * g

    The math is fp32 for fp32, fp16 and bf16 parameters; ``p`` is written once per step.
    Gradients are optionally clipped first: percentile clipping, then the global norm, then
    elementwise.

    When to use it: as a drop-in for AdamW with half its state memory (or an eighth, with
    ``optim_bits=8``); Lion's update has the same magnitude everywhere, so it wants a smaller
    lr and a larger weight decay than AdamW.
"""
        + _ARGS_DOC
        + """
    Example::

        opt = lionkit.Lion(model.parameters(), lr=3e-5, weight_decay=0.1)
        loss.backward(); opt.step(); opt.zero_grad()
    """
    )

    def __init__(
        self,
        params: ParamsT,
        lr: LRType = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0,
        optim_bits: int = 32,
        args: Any = None,
        min_8bit_size: int = 4096,
        percentile_clipping: int = 100,
        block_wise: bool = True,
        is_paged: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            params, lr, betas, weight_decay, optim_bits, args, min_8bit_size, percentile_clipping, block_wise, is_paged,
            **kwargs,
        )


def _fixed_bits(bits: int, paged_default: bool, paged_positional: bool):
    """Build ``__init__`` for a class with ``optim_bits`` fixed; ``is_paged`` is either a
    trailing positional parameter (Lion8bit/Lion32bit) or fixed (the Paged* classes)."""

    def __init__(
        self,
        params: ParamsT,
        lr: LRType = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0,
        args: Any = None,
        min_8bit_size: int = 4096,
        percentile_clipping: int = 100,
        block_wise: bool = True,
        *rest: Any,
        **kwargs: Any,
    ) -> None:
        if len(rest) > (1 if paged_positional else 0):
            raise TypeError(f"{type(self).__name__}() got too many positional arguments")
        if "optim_bits" in kwargs:
            raise TypeError(
                f"{type(self).__name__}() fixes optim_bits={bits}; use lionkit.Lion(..., optim_bits=...) to choose it"
            )
        if paged_positional:
            is_paged = rest[0] if rest else kwargs.pop("is_paged", paged_default)
        else:
            if "is_paged" in kwargs:
                raise TypeError(f"{type(self).__name__}() fixes is_paged=True")
            is_paged = paged_default
        _LionBase.__init__(
            self, params, lr, betas, weight_decay, bits, args, min_8bit_size, percentile_clipping, block_wise,
            is_paged, **kwargs,
        )

    return __init__


class Lion8bit(_LionBase):
    """``Lion`` with 8-bit block-wise momentum (``optim_bits=8``): 1.016 bytes of state per
    parameter. Positional order: params, lr, betas, weight_decay, args, min_8bit_size,
    percentile_clipping, block_wise, is_paged. See ``lionkit.Lion`` for the math and arguments."""

    __init__ = _fixed_bits(8, False, True)


class Lion4bit(_LionBase):
    """``Lion`` with 4-bit momentum (``optim_bits=4``): 0.625 bytes of state per parameter,
    0.61x of ``Lion8bit``'s and 0.16x of 32-bit Lion's.

    The format (``lionkit.quant4``): 15 levels at quantiles of a normal distribution (the
    symmetric form of QLoRA's NF4), one fp32 scale per block of 32 elements, two codes per byte.
    Every step decodes the momentum, updates it in fp32 and re-encodes it with **stochastic
    rounding**: a value between two levels goes to the upper one with probability equal to its
    distance from the lower one (in units of the gap). That is what makes 4 bits work for Lion:
    the momentum moves by only ``(1 - beta2) * (g - m)`` per step, and rounding to nearest would
    send most of those moves back where they came from (measured in ``docs/fourbit.md``: with
    rounding to nearest every 4-bit variant ends 4-97% above 32-bit Lion on at least one task,
    this map +23% on one; with this format and stochastic rounding, within 1.5% on both).

    The random numbers are fixed by (``sr_seed``, step, the parameter's place in the optimizer;
    ``sr_seed`` 0 when it is None and ``stochastic_rounding`` is off), so a run is reproducible
    and a resumed run continues exactly as an uninterrupted one. Tensors under
    ``min_8bit_size`` elements keep fp32 momentum; ``block_wise=False`` is refused. The state
    converts to and from 8- and 32-bit when loaded into another optimizer (rounding to nearest),
    but bitsandbytes and the JAX/MLX front ends cannot read it. On the CPU the fused kernel runs
    it (bit-identical to the eager path); on CUDA it runs on the eager PyTorch backend (no
    Triton kernel for it yet).

    Positional order as ``Lion8bit``. See ``lionkit.Lion`` for the math and arguments.

    Example::

        opt = lionkit.Lion4bit(model.parameters(), lr=3e-5, weight_decay=0.1, betas=(0.9, 0.95))
    """

    __init__ = _fixed_bits(4, False, True)


class Lion32bit(_LionBase):
    """``Lion`` with fp32 momentum (``optim_bits=32``). Positional order as ``Lion8bit``."""

    __init__ = _fixed_bits(32, False, True)


class PagedLion(Lion):
    """``Lion`` with paged state (``is_paged=True``). Positional order: params, lr, betas,
    weight_decay, optim_bits, args, min_8bit_size, percentile_clipping, block_wise."""

    def __init__(
        self,
        params: ParamsT,
        lr: LRType = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0,
        optim_bits: int = 32,
        args: Any = None,
        min_8bit_size: int = 4096,
        percentile_clipping: int = 100,
        block_wise: bool = True,
        **kwargs: Any,
    ) -> None:
        if "is_paged" in kwargs:
            raise TypeError("PagedLion() fixes is_paged=True")
        super().__init__(
            params, lr, betas, weight_decay, optim_bits, args, min_8bit_size, percentile_clipping, block_wise, True,
            **kwargs,
        )


class PagedLion8bit(_LionBase):
    """``Lion8bit`` with paged state. Positional order: params, lr, betas, weight_decay, args,
    min_8bit_size, percentile_clipping, block_wise."""

    __init__ = _fixed_bits(8, True, False)


class PagedLion32bit(_LionBase):
    """``Lion32bit`` with paged state. Positional order as ``PagedLion8bit``."""

    __init__ = _fixed_bits(32, True, False)
