"""``Lion`` and ``Lion8bit`` for MLX, as ``mlx.optimizers.Optimizer`` subclasses, and the state
export/import ``lionkit.interop`` uses."""

from __future__ import annotations

import math
from typing import Any, Callable, Optional, Sequence, Union

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np

from .. import interop
from . import quant

LearningRate = Union[float, Callable[[mx.array], mx.array]]
_LOW_PRECISION = (mx.float16, mx.bfloat16)


def _math_dtype(dtype: Any) -> Any:
    # fp32 math for half-precision parameters; fp32 (and CPU float64) stay as they are
    return mx.float32 if dtype in _LOW_PRECISION else dtype


def _real(name: str, value: Any, want: str, below: Optional[float] = None) -> float:
    """A hyperparameter given as any real number (Python, numpy, a 0-d MLX array) as a finite
    Python float >= 0 (and < ``below``); ValueError naming it and its value otherwise."""
    try:
        v = interop.real_number(name, value)
    except TypeError:
        raise ValueError(f"Invalid {name}: {value!r} (must be {want})") from None
    if not v >= 0 or v == math.inf or (below is not None and not v < below):
        raise ValueError(f"Invalid {name}: {value!r} (must be {want})")
    return v


class Lion(optim.Optimizer):
    r"""Lion (Chen et al. 2023) for MLX: a drop-in ``mlx.optimizers.Lion`` that computes in fp32
    for every parameter dtype.

    For each parameter :math:`w` with gradient :math:`g` and momentum :math:`m` (zeros at
    start), update :math:`k = 1, 2, \dots` uses learning rate :math:`\eta = ` ``schedule(k-1)``::

        c = b1 * m + (1 - b1) * g          # interpolation, used only for its sign
        m = b2 * m + (1 - b2) * g          # decay the momentum
        w = (1 - eta * wd) * w             # decoupled weight decay (only when wd > 0)
        w = w - eta * sign(c)              # sign(0) = 0

    With fp32 parameters this is ``mlx.optimizers.Lion`` bit for bit. bf16/fp16 parameters
    keep fp32 momentum and are written back once in their dtype (MLX's own Lion computes, and
    rounds, in bf16). Use a learning rate 3-10x smaller than AdamW's and a weight decay 3-10x
    larger, so that ``lr * wd`` stays similar.

    Args:
      learning_rate: a number >= 0 or a schedule ``step -> lr`` (e.g. ``optim.cosine_decay``).
      betas: ``(b1, b2)``, each in [0, 1) (default ``(0.9, 0.99)``).
      weight_decay: decoupled weight decay >= 0 (default 0).

    Numbers may be Python or numpy numbers or 0-d ``mx.array`` s, as for ``mlx.optimizers.Lion``.

    The state (``opt.state``: ``step``, ``learning_rate`` and per parameter ``{"m": ...}``)
    saves with ``mx.save_safetensors(path, dict(tree_flatten(opt.state)))``.

    Example::

        import mlx.core as mx, mlx.nn as nn
        from lionkit.mlx import Lion

        model = nn.Linear(8, 1)
        opt = Lion(learning_rate=1e-4, weight_decay=0.1)
        loss_and_grad = nn.value_and_grad(model, lambda m, x, y: ((m(x) - y) ** 2).mean())
        loss, grads = loss_and_grad(model, mx.ones((4, 8)), mx.zeros((4, 1)))
        opt.update(model, grads)
        mx.eval(model.parameters(), opt.state)
    """

    def __init__(
        self,
        learning_rate: LearningRate,
        betas: Sequence[float] = (0.9, 0.99),
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__()
        if not callable(learning_rate):
            _real("learning_rate", learning_rate, "a finite number >= 0 or a schedule")
        try:
            betas = [b for b in betas]  # a list, tuple or 1-d array of two numbers
        except TypeError:
            raise ValueError(f"Invalid betas: {betas!r} (must be two values)") from None
        if len(betas) != 2:
            raise ValueError(f"Invalid betas: {betas!r} (must be two values)")
        # Python floats: MLX applies them in each parameter's math dtype, as it does its own
        betas = [_real(f"beta at index {i}", b, "in [0, 1)", below=1.0) for i, b in enumerate(betas)]
        weight_decay = _real("weight_decay", weight_decay, "a finite number >= 0")
        # an array learning rate is kept as given (mx.array(lr)), as mlx.optimizers.Lion does
        self._maybe_schedule("learning_rate", learning_rate)
        self.betas = betas
        self.weight_decay = weight_decay

    def init_single(self, parameter: mx.array, state: dict) -> None:
        """fp32 momentum (the parameter's dtype when that is fp32 or wider)."""
        state["m"] = mx.zeros(parameter.shape, dtype=_math_dtype(parameter.dtype))

    def _step(self, g: mx.array, w: mx.array, m: mx.array) -> tuple[mx.array, mx.array]:
        """(new parameter, new momentum) in the math dtype; the arithmetic of MLX's Lion."""
        dt = m.dtype
        g = g.astype(dt)
        w = w.astype(dt)
        lr = self.learning_rate.astype(dt)
        b1, b2 = self.betas
        # interpolation, used only for its sign
        c = b1 * m + (1 - b1) * g
        # decay the momentum
        m_new = b2 * m + (1 - b2) * g
        # stepweight decay
        if self.weight_decay > 0:
            w = (1 - lr * self.weight_decay) * w
        # weight update
        return w - lr * mx.sign(c), m_new

    def apply_single(self, gradient: mx.array, parameter: mx.array, state: dict) -> mx.array:
        """One Lion update of ``parameter``; stores the new momentum in ``state``."""
        m = state.get("m")
        if m is None:
            raise ValueError(
                f"{type(self).__name__} keeps its momentum as 'm', but this parameter's state holds "
                f"{sorted(state)}: an 8-bit state (from Lion8bit)? Load it into Lion8bit, or convert it "
                "with lionkit.interop (from_mlx, then to_mlx)"
            )
        w, m_new = self._step(gradient, parameter, m.astype(_math_dtype(m.dtype)))
        state["m"] = m_new.astype(m.dtype)
        return w.astype(parameter.dtype)


def _int(name: str, value: Any, want: str, low: int) -> int:
    """An int argument given as any integer (Python, numpy, a 0-d MLX array) as a Python int."""
    try:
        v = interop.integer(name, value)
    except TypeError:
        raise ValueError(f"Invalid {name}: {value!r} (must be {want})") from None
    if v < low:
        raise ValueError(f"Invalid {name}: {value!r} (must be {want})")
    return v


def _recorded_block_size(state: dict) -> Any:
    """The block size an 8-bit state records (None: per tensor), or ``...`` when it records
    none (saved before lionkit recorded it) or cannot be read here (inside ``mx.compile``)."""
    rec = state.get("block_size")
    if rec is None:
        return ...
    try:
        v = int(rec.item())
    except (RuntimeError, ValueError):  # a placeholder while mx.compile traces: checked eagerly
        return ...
    return None if v < 0 else v


class Lion8bit(Lion):
    """``Lion`` with 8-bit momentum: uint8 codes into bitsandbytes' signed dynamic map times one
    fp32 scale (max |m|) per block of ``block_size`` elements, 1.016 bytes per element instead
    of 4. Parameters with fewer than ``min_8bit_size`` elements keep fp32 momentum.

    Math is that of ``Lion`` in fp32: dequantize, step, requantize with the new per-block
    maximum (nearest code, ties to the larger one, a nonzero momentum never becomes zero or
    changes sign). The codes equal those of lionkit's PyTorch ``Lion8bit`` and of
    ``lionkit.jax.scale_by_lion(state_bits=8)`` for the same momentum, so states convert
    losslessly (``lionkit.interop``).

    Args:
      learning_rate, betas, weight_decay: as for ``Lion``.
      block_size: elements per scale (256; the only block size PyTorch reads), None for one
        scale per tensor.
      min_8bit_size: smaller parameters keep fp32 momentum (4096, as in bitsandbytes).

    State per parameter: ``{"codes": uint8, "absmax": fp32, "block_size": int32}`` (the block
    size the state was made with, -1 for per tensor), or ``{"m": fp32}``; it saves with
    ``mx.save_safetensors`` like any MLX optimizer state. A state made with another block size
    is refused with a ValueError.

    Example::

        opt = Lion8bit(learning_rate=optim.cosine_decay(3e-4, 1000), weight_decay=0.1)
    """

    def __init__(
        self,
        learning_rate: LearningRate,
        betas: Sequence[float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        block_size: Optional[int] = interop.BLOCK_SIZE,
        min_8bit_size: int = 4096,
    ) -> None:
        super().__init__(learning_rate, betas, weight_decay)
        if block_size is not None:
            block_size = _int("block_size", block_size, "a positive int, or None for one scale per tensor", low=1)
        self.block_size = block_size
        self.min_8bit_size = _int("min_8bit_size", min_8bit_size, "an int >= 0", low=0)

    def init_single(self, parameter: mx.array, state: dict) -> None:
        """Zero codes and scales, or fp32 momentum for small parameters."""
        if parameter.size >= self.min_8bit_size:
            state["codes"], state["absmax"] = quant.zeros(tuple(parameter.shape), self.block_size)
            state["block_size"] = _block_size_array(self.block_size)
        else:
            super().init_single(parameter, state)

    def apply_single(self, gradient: mx.array, parameter: mx.array, state: dict) -> mx.array:
        """One Lion update with the momentum dequantized, updated and requantized."""
        if "codes" in state:
            self._check_layout(state)
            m = quant.dequantize(state["codes"], state["absmax"], self.block_size)
        elif "m" in state and parameter.size >= self.min_8bit_size:
            # a 32-bit state (saved by Lion) for a parameter kept in 8 bits here: this step
            # starts from the exact momentum and stores the new one as codes
            m = state.pop("m")
            state["block_size"] = _block_size_array(self.block_size)
        else:
            return super().apply_single(gradient, parameter, state)
        # fp32 math, or the parameter's own when wider (CPU float64), as the 32-bit path
        w, m_new = self._step(gradient, parameter, m.astype(_math_dtype(parameter.dtype)))
        # absmax comes from the *updated* momentum, so every value fits its block's scale
        state["codes"], state["absmax"] = quant.quantize(m_new, self.block_size)
        return w.astype(parameter.dtype)

    def _check_layout(self, state: dict) -> None:
        """ValueError unless the 8-bit ``state`` was made with this optimizer's block size."""
        codes, absmax = state["codes"], state["absmax"]
        # the recorded block size tells apart sizes giving the same number of scales
        # (5000 elements: 3 scales with 1700 or with 2000); the count is checked always
        rec = _recorded_block_size(state)
        want = quant._layout(codes.size, self.block_size)[0]
        if (rec is not ... and rec != self.block_size) or absmax.size != want:
            made = f"made with block_size={rec}" if rec is not ... else f"has {absmax.size} scales for {codes.size} elements"
            raise ValueError(
                f"8-bit state {made}, but this optimizer has block_size={self.block_size} ({want} scales): "
                "was it saved with another block_size? Convert it with lionkit.interop (from_mlx, then to_mlx)"
            )


def _block_size_array(block_size: Optional[int]) -> mx.array:
    return mx.array(-1 if block_size is None else block_size, dtype=mx.int32)


# --------------------------------------------------------------------------- interop
def _param_states(optimizer: optim.Optimizer, parameters: Any) -> list[tuple[str, mx.array, Any]]:
    """(name, parameter, its state) triples in ``tree_flatten(parameters)`` order, the name
    being the ``tree_flatten`` key (``"layers.0.weight"``)."""
    out: list[tuple[str, mx.array, Any]] = []

    def walk(p: Any, st: Any, path: str) -> None:
        if isinstance(p, (list, tuple)):
            items: Any = enumerate(p)
        elif isinstance(p, dict):
            items = p.items()
        else:
            out.append((path, p, st))
            return
        for k, child in items:
            name = f"{path}.{k}" if path else str(k)
            try:
                sub = st[k]
            except (KeyError, IndexError, TypeError):
                raise ValueError(
                    f"the optimizer has no state for parameter {name!r}: pass the parameters it trains, "
                    "model.trainable_parameters() (frozen parameters have no optimizer state)"
                ) from None
            walk(child, sub, name)

    walk(parameters, optimizer.state, "")
    return out


def export_states(optimizer: optim.Optimizer, parameters: Any) -> list[interop.MomentumState]:
    """The momentum of every parameter as a named ``interop.MomentumState`` (numpy)."""
    step = int(np.array(optimizer.state["step"]))
    default_bs = getattr(optimizer, "block_size", interop.BLOCK_SIZE)
    out = []
    for name, p, st in _param_states(optimizer, parameters):
        if not isinstance(st, dict) or not st:
            raise ValueError(f"parameter {name!r} (shape {tuple(p.shape)}) has no optimizer state: call optimizer.init(params)")
        if "codes" in st:
            codes, absmax = np.array(st["codes"]), np.array(st["absmax"])
            rec = _recorded_block_size(st)
            bs = default_bs if rec is ... else rec  # the state says how it was made
            out.append(interop.MomentumState(step, codes.shape, codes=codes, absmax=absmax, block_size=bs, name=name))
        elif "m" in st:
            m = np.array(st["m"].astype(mx.float32))
            out.append(interop.MomentumState(step, m.shape, momentum=m, name=name))
        else:
            raise ValueError(f"parameter {name!r}: state has neither 'm' nor 'codes' (keys: {sorted(st)})")
    return out


def import_states(
    optimizer: optim.Optimizer,
    parameters: Any,
    states: Sequence[interop.MomentumState],
    step: int,
    by_name: Optional[bool] = None,
) -> None:
    """Put ``states`` into ``optimizer`` (initialised for ``parameters`` if needed), matched by
    name or position (``interop.match_states``), converting the layout where it differs
    (8-bit <-> fp32, another block size), and set its step."""
    optimizer.init(parameters)  # adds state only where missing: existing state is kept
    triples = _param_states(optimizer, parameters)
    states = interop.match_states(states, [t[0] for t in triples], "MLX parameters", by_name)
    bs = getattr(optimizer, "block_size", interop.BLOCK_SIZE)
    for (name, p, st), ms in zip(triples, states):
        if tuple(p.shape) != ms.shape:
            raise ValueError(f"parameter {name!r}: saved momentum has shape {ms.shape}, the MLX parameter has {tuple(p.shape)}")
        if "codes" in st:
            if ms.is_8bit and ms.block_size == bs:
                codes, absmax = ms.codes, ms.absmax
            else:  # another layout: quantize what it stands for, as PyTorch does
                codes, absmax = interop.quantize(ms.dequantize(), bs)
            st["codes"], st["absmax"] = mx.array(codes), mx.array(absmax)
            st["block_size"] = _block_size_array(bs)
        else:
            old = st.get("m")
            dtype = old.dtype if old is not None else mx.float32
            st["m"] = mx.array(ms.dequantize()).astype(dtype)
    optimizer.state["step"] = mx.array(step, dtype=mx.uint64)
