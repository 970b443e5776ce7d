"""``lion``: the ready-made optax optimizer (clipping -> Lion direction -> decoupled weight
decay -> learning rate), in braintools' order, plus the small stages it needs."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import optax

from .. import interop
from .transform import (
    _check_beta,
    _increment,
    _math_dtype,
    check_quant_args,
    check_real,
    scale_by_lion,
)

ScalarOrSchedule = Union[float, Callable[[Any], Any]]


class WeightDecayScheduleState(NamedTuple):
    """Step count of a scheduled weight decay."""

    count: jax.Array


def promote_to_float32() -> optax.GradientTransformation:
    """Cast updates to at least fp32 (bf16/fp16 gradients), so everything after it, clipping
    included, computes in fp32. Leaves fp32 (and float64) updates untouched."""

    def init_fn(params):
        del params
        return optax.EmptyState()

    def update_fn(updates, state, params=None):
        del params
        return jax.tree.map(lambda g: g.astype(_math_dtype(g.dtype)), updates), state

    return optax.GradientTransformation(init_fn, update_fn)


def add_decayed_weights(weight_decay: ScalarOrSchedule = 0.0, mask: Any = None) -> optax.GradientTransformation:
    """Add ``weight_decay * params`` to the updates (decoupled weight decay once multiplied by
    the learning rate), with params read in fp32: the same arithmetic as
    ``optax.add_decayed_weights`` for fp32 params, and no bf16 rounding of ``wd * p`` for bf16
    params. ``weight_decay`` may be a schedule (called with the step count, from 0); ``mask``
    (a tree of bools or a callable) selects the leaves that decay."""

    _check_scalar("weight_decay", weight_decay, positive=False, allow_schedule=True)
    scheduled = callable(weight_decay)

    def init_fn(params):
        del params
        return WeightDecayScheduleState(count=jnp.zeros([], jnp.int32)) if scheduled else optax.EmptyState()

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("add_decayed_weights needs params: call tx.update(grads, state, params)")
        wd = weight_decay(state.count) if scheduled else weight_decay
        new_state = WeightDecayScheduleState(count=_increment(state.count)) if scheduled else state
        updates = jax.tree.map(lambda u, p: u + wd * p.astype(u.dtype), updates, params)
        return updates, new_state

    tx = optax.GradientTransformation(init_fn, update_fn)
    return optax.masked(tx, mask) if mask is not None else tx


def _check_scalar(name: str, value: Any, *, positive: bool, allow_schedule: bool) -> None:
    """Any real number (Python, numpy, a 0-d JAX array; traced values pass unchecked), or a
    schedule where allowed."""
    if allow_schedule and callable(value):
        return
    try:
        # the positive ones are clipping thresholds, where +inf means no clipping
        check_real(name, value, low_open=positive, allow_inf=positive)
    except TypeError:
        raise TypeError(f"Invalid {name}: {value!r} (must be a number{' or a schedule' if allow_schedule else ''})") from None


def clip_by_global_norm(max_norm: Any) -> optax.GradientTransformation:
    """``optax.clip_by_global_norm``, with ``max_norm = inf`` meaning no clipping (as in
    ``lionkit.Lion``): optax's own turns a norm that overflowed to inf into NaN updates
    (g / inf * inf). The same stage for every value, so the optimizer state's structure does
    not depend on it (and ``optax.inject_hyperparams`` can pass it as an array)."""
    inner = optax.clip_by_global_norm(max_norm)

    def update_fn(updates, state, params=None):
        clipped, state = inner.update(updates, state, params)
        off = jnp.isinf(jnp.asarray(max_norm))
        return jax.tree.map(lambda c, u: jnp.where(off, u, c), clipped, updates), state

    return optax.GradientTransformation(inner.init, update_fn)


def check_clips(grad_clip_norm: Any, grad_clip_value: Any) -> None:
    """The clipping thresholds: each None (off) or a number > 0 (+inf: no clipping)."""
    for name, value in (("grad_clip_norm", grad_clip_norm), ("grad_clip_value", grad_clip_value)):
        if value is not None:
            _check_scalar(name, value, positive=True, allow_schedule=False)


def input_stages(grad_clip_norm: Any, grad_clip_value: Any) -> list[optax.GradientTransformation]:
    """The chain's first stages, in braintools' order: fp32 gradients, then the global-norm and
    the elementwise clip where asked for (``optax.clip(inf)`` is the identity)."""
    parts = [promote_to_float32()]
    if grad_clip_norm is not None:
        parts.append(clip_by_global_norm(grad_clip_norm))
    if grad_clip_value is not None:
        parts.append(optax.clip(grad_clip_value))
    return parts


def _is_constant_zero(value: Any) -> bool:
    # only a Python/numpy zero: a JAX array may be traced (optax.inject_hyperparams passes
    # arrays to init and tracers to update), and the chain must have the same stages in both
    return not callable(value) and not isinstance(value, jax.Array) and float(value) == 0.0


def lion(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.99,
    weight_decay: ScalarOrSchedule = 0.0,
    mask: Any = None,
    state_bits: int = 32,
    grad_clip_norm: Optional[float] = None,
    grad_clip_value: Optional[float] = None,
    *,
    block_size: Optional[int] = interop.BLOCK_SIZE,
    min_8bit_size: int = 4096,
    mu_dtype: Any = None,
) -> optax.GradientTransformation:
    r"""The Lion optimizer (Chen et al. 2023) for optax, with 32- or 8-bit momentum.

    For each parameter :math:`p`, gradient :math:`g`, momentum :math:`m` (zeros at start),
    learning rate :math:`\eta_t` and weight decay :math:`\lambda_t` (schedules are called
    with the step count, starting at 0)::

        g  <- g * min(1, grad_clip_norm / ||g||)   # global norm over all leaves (optional)
        g  <- clip(g, -grad_clip_value, grad_clip_value)                    (optional)
        c   = b1 * m + (1 - b1) * g
        p  <- p - eta_t * (sign(c) + lambda_t * p)
        m  <- b2 * m + (1 - b2) * g

    This is braintools' ``Lion`` chain (``clip_by_global_norm -> clip -> scale_by_lion ->
    add_decayed_weights -> learning rate``); with ``state_bits=32``, fp32 parameters and no
    clipping it equals ``optax.lion`` bit for bit (note optax's default ``weight_decay`` is
    1e-3, lionkit's 0). bf16/fp16 gradients and parameters are computed in fp32 and written
    back once in the parameter's dtype by ``optax.apply_updates``.

    Advice: use a learning rate 3-10x smaller than AdamW's and a weight decay 3-10x larger,
    so that ``lr * weight_decay`` stays similar. ``state_bits=8`` cuts optimizer memory from
    4 to 1.016 bytes per parameter (see ``scale_by_lion``) at a small cost in accuracy.

    Numbers may be Python or numpy numbers or 0-d JAX arrays. The real hyperparameters
    (``learning_rate``, ``b1``, ``b2``, ``weight_decay``, the clipping thresholds) may also be
    traced, so ``optax.inject_hyperparams(lion)`` works under ``jax.jit``; ``state_bits``,
    ``block_size`` and ``min_8bit_size`` fix the state's layout and must then be listed in its
    ``static_args`` (a ValueError names the one that arrived traced when it is needed; the
    32-bit ``update`` needs none of them).

    Args:
      learning_rate: a number >= 0 or an optax schedule ``count -> lr``.
      b1: interpolation rate for the update direction (0.9).
      b2: momentum decay rate (0.99).
      weight_decay: decoupled weight decay, a number >= 0 or a schedule (0.0); a Python or
        numpy zero leaves the decay stage out of the chain.
      mask: tree of bools (or callable params -> tree) selecting the leaves that decay.
      state_bits: 32 or 8 (see ``scale_by_lion``).
      grad_clip_norm: clip the global gradient norm to this value (> 0), or None.
      grad_clip_value: clip every gradient element to [-v, v] (v > 0), or None.
      block_size: elements per 8-bit scale (256), None for one per tensor.
      min_8bit_size: leaves smaller than this keep unquantized momentum (4096).
      mu_dtype: dtype of unquantized momentum (None: fp32).

    Example::

        import jax, jax.numpy as jnp, optax
        from lionkit.jax import lion

        params = {"w": jnp.zeros((512, 512)), "b": jnp.zeros(512)}
        tx = lion(optax.cosine_decay_schedule(3e-4, 1000), weight_decay=0.1, state_bits=8)
        state = tx.init(params)

        @jax.jit
        def step(params, state, x, y):
            grads = jax.grad(lambda p: jnp.mean((x @ p["w"] + p["b"] - y) ** 2))(params)
            updates, state = tx.update(grads, state, params)
            return optax.apply_updates(params, updates), state
    """
    _check_scalar("learning_rate", learning_rate, positive=False, allow_schedule=True)
    _check_scalar("weight_decay", weight_decay, positive=False, allow_schedule=True)
    _check_beta("b1", b1)
    _check_beta("b2", b2)
    check_quant_args(state_bits, block_size, min_8bit_size)  # early errors; scale_by_lion converts
    check_clips(grad_clip_norm, grad_clip_value)

    parts = input_stages(grad_clip_norm, grad_clip_value)
    parts.append(
        scale_by_lion(b1, b2, state_bits, block_size, mu_dtype, min_8bit_size=min_8bit_size)
    )
    # a constant zero decay is skipped (as braintools does); u + 0*p would equal u anyway
    if not _is_constant_zero(weight_decay):
        parts.append(add_decayed_weights(weight_decay, mask))
    parts.append(optax.scale_by_learning_rate(learning_rate))
    return optax.chain(*parts)
