"""lionkit's Lion inside braintools: ``Lion`` / ``Lion8bit`` as ``braintools.optim.OptaxOptimizer``
subclasses, so they take braintools' ``LRScheduler`` objects, ``register_trainable_weights``,
``step(grads)``, ``brainstate.transform.jit`` and ``state_dict`` like ``braintools.optim.Lion``.

Needs braintools >= 0.4 and brainstate >= 0.6, which need Python >= 3.12:
``pip install 'lionkit[braintools]'``.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

try:
    import optax
    from braintools.optim import OptaxOptimizer
except ImportError as _e:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        f"lionkit.jax.braintools needs braintools and brainstate ({_e}; Python >= 3.12): "
        "pip install 'lionkit[braintools]'"
    ) from _e

from .. import interop
from .alias import _check_scalar, add_decayed_weights, check_clips, input_stages
from .transform import _check_beta, check_quant_args, scale_by_lion


class Lion(OptaxOptimizer):
    r"""braintools' ``Lion`` with lionkit's transform: 32- or 8-bit momentum.

    The chain is braintools' own, ``clip_by_global_norm -> clip -> scale_by_lion ->
    add_decayed_weights -> scale_by_schedule(lr)``, with lionkit's ``scale_by_lion`` (and
    fp32 math for bf16 parameters). With ``state_bits=32`` and fp32 parameters it equals
    ``braintools.optim.Lion`` bit for bit; with ``state_bits=8`` the momentum takes 1.016
    bytes per element instead of 4, stored in the format of lionkit's PyTorch ``Lion8bit``.

    Update, per parameter (see ``lionkit.jax.lion``)::

        c = b1*m + (1-b1)*g;  p <- p - lr*(sign(c) + wd*p);  m <- b2*m + (1-b2)*g

    Use a learning rate 3-10x smaller than AdamW's and a weight decay 3-10x larger.

    Args:
      lr: float or a braintools ``LRScheduler`` (stepped by you with ``sched.step()``) (1e-4).
      betas: ``(b1, b2)``, each in [0, 1) (``(0.9, 0.99)``).
      weight_decay: decoupled weight decay >= 0 (0.0).
      grad_clip_norm: clip the global gradient norm to this value, or None.
      grad_clip_value: clip each gradient element to [-v, v], or None.
      state_bits: 32 or 8.
      block_size: elements per 8-bit scale (256), None for one per tensor.
      min_8bit_size: parameters smaller than this keep fp32 momentum (4096).

    Example::

        import brainstate, braintools
        from lionkit.jax.braintools import Lion8bit

        model = brainstate.nn.Linear(784, 10)
        sched = braintools.optim.StepLR(base_lr=3e-4, step_size=10, gamma=0.5)
        opt = Lion8bit(lr=sched, weight_decay=0.1)
        opt.register_trainable_weights(model.states(brainstate.ParamState))
        # per batch: opt.step(grads); per epoch: sched.step()
    """

    def __init__(
        self,
        lr: Any = 1e-4,
        betas: Sequence[float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        grad_clip_norm: Optional[float] = None,
        grad_clip_value: Optional[float] = None,
        state_bits: int = 32,
        block_size: Optional[int] = interop.BLOCK_SIZE,
        min_8bit_size: int = 4096,
    ) -> None:
        # braintools compares these with < 0 only: NaN and inf would pass and spoil the weights
        if not callable(lr) and not hasattr(lr, "step"):  # a number, not a scheduler
            _check_scalar("lr", lr, positive=False, allow_schedule=False)
        _check_scalar("weight_decay", weight_decay, positive=False, allow_schedule=False)
        check_clips(grad_clip_norm, grad_clip_value)
        betas = tuple(betas)
        if len(betas) != 2:
            raise ValueError(f"Invalid betas: {betas!r} (must be two values)")
        _check_beta("betas[0]", betas[0])
        _check_beta("betas[1]", betas[1])
        state_bits, block_size, min_8bit_size = check_quant_args(state_bits, block_size, min_8bit_size)
        # read by default_tx(), which the base constructor calls
        self.betas = betas
        self.state_bits = state_bits
        self.block_size = block_size
        self.min_8bit_size = min_8bit_size
        super().__init__(
            tx=None, lr=lr, weight_decay=weight_decay, grad_clip_norm=grad_clip_norm, grad_clip_value=grad_clip_value
        )

    def default_tx(self) -> optax.GradientTransformation:
        """braintools' Lion chain around lionkit's ``scale_by_lion``."""
        parts = input_stages(self.grad_clip_norm, self.grad_clip_value)
        parts.append(
            scale_by_lion(self.betas[0], self.betas[1], self.state_bits, self.block_size, min_8bit_size=self.min_8bit_size)
        )
        if self.weight_decay > 0:
            parts.append(add_decayed_weights(self.weight_decay))
        # braintools' schedulers return -lr when called
        parts.append(optax.scale_by_schedule(self._lr_scheduler))
        return optax.chain(*parts)


class Lion8bit(Lion):
    """``Lion`` with ``state_bits=8`` (see ``Lion``)."""

    def __init__(
        self,
        lr: Any = 1e-4,
        betas: Sequence[float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        grad_clip_norm: Optional[float] = None,
        grad_clip_value: Optional[float] = None,
        block_size: Optional[int] = interop.BLOCK_SIZE,
        min_8bit_size: int = 4096,
    ) -> None:
        super().__init__(lr, betas, weight_decay, grad_clip_norm, grad_clip_value, 8, block_size, min_8bit_size)
