"""``scale_by_lion``: the Lion direction as an optax ``GradientTransformation``, with 32- or
8-bit momentum, and the helpers ``lionkit.interop`` uses to read and replace its state."""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from .. import interop
from . import quant


class ScaleByLionState(NamedTuple):
    """State of ``scale_by_lion(state_bits=32)``: step count and momentum (a tree like params)."""

    count: jax.Array  # int32 scalar: updates done
    mu: optax.Updates


class ScaleByLion8bitState(NamedTuple):
    """State of ``scale_by_lion(state_bits=8)``; ``mu``, ``codes`` and ``absmax`` are trees
    shaped like params.

    A leaf with at least ``min_8bit_size`` elements keeps uint8 ``codes`` (shaped like the
    leaf) and fp32 ``absmax`` (one per block), with an empty ``mu``; a smaller leaf keeps fp32
    ``mu`` with empty ``codes`` and ``absmax``. Empty entries are zero-size arrays, so the
    three trees always have the structure of params. ``block_size`` is -1 for per-tensor scales.
    """

    count: jax.Array  # int32 scalar: updates done
    mu: optax.Updates
    codes: optax.Updates
    absmax: optax.Updates
    block_size: jax.Array  # int32 scalar, recorded so the state describes itself


def _increment(count: jax.Array) -> jax.Array:
    """count + 1, saturating at the int32 maximum instead of wrapping around."""
    return jnp.where(count < jnp.iinfo(jnp.int32).max, count + 1, count)


def _math_dtype(dtype: Any) -> Any:
    # fp32 math for bf16/fp16 params; float64 stays float64 when jax_enable_x64 is on
    return jnp.promote_types(dtype, jnp.float32)


def is_traced(x: Any) -> bool:
    """True for a value being traced by ``jax.jit`` and friends (its number is unknown)."""
    return isinstance(x, jax.core.Tracer)


def check_real(
    name: str, value: Any, *, low: float = 0.0, high: Optional[float] = None, low_open: bool = False,
    allow_inf: bool = False,
) -> None:
    """Range check of a real hyperparameter given as any number (Python, numpy, a 0-d JAX
    array): NaN is always refused, +inf unless ``allow_inf`` (a clipping threshold: no
    clipping); a traced value (``optax.inject_hyperparams`` under ``jit``) is not checked."""
    if is_traced(value):
        return
    v = interop.real_number(name, value)
    bad_range = not (v > low if low_open else v >= low) or (high is not None and not v < high)
    if bad_range or (v == math.inf and not allow_inf):
        rng = f"[{low}, {high})" if high is not None else f"{'>' if low_open else '>='} {low}"
        finite = "" if allow_inf or high is not None else "finite and "
        raise ValueError(f"Invalid {name}: {value!r} (must be {finite}{'in ' if high is not None else ''}{rng})")


def _float_dtype(name: str, dtype: Any) -> Any:
    """``dtype`` as a JAX floating dtype; ValueError naming ``name`` for anything else (an
    integer momentum would round every update to zero)."""
    try:
        d = jnp.dtype(dtype)
    except TypeError:
        d = None
    if d is None or not jnp.issubdtype(d, jnp.floating):
        raise ValueError(f"Invalid {name}: {dtype!r} (must be a floating dtype, e.g. jnp.float32 or jnp.bfloat16)")
    return d


def _check_beta(name: str, b: Any) -> None:
    check_real(name, b, high=1.0)


class _Traced:
    """A structural argument that arrived traced: an error naming it as soon as it is needed."""

    def __init__(self, name: str, value: Any) -> None:
        self.name, self.value = name, value

    def need(self) -> None:
        raise ValueError(
            f"{self.name} arrived as a traced value ({self.value}): it fixes the layout of the optimizer state, "
            "so it must be a concrete int. With optax.inject_hyperparams, pass "
            "static_args=('state_bits', 'block_size', 'min_8bit_size')"
        )


def _static(x: Any) -> Any:
    """``x``, or the error of a traced structural argument."""
    if isinstance(x, _Traced):
        x.need()
    return x


def check_quant_args(state_bits: Any, block_size: Any, min_8bit_size: Any) -> tuple[Any, Any, Any]:
    """(state_bits, block_size, min_8bit_size) as Python ints (block_size may be None), from
    Python/numpy ints or concrete integer arrays; ValueError naming a bad one. A traced one
    (``optax.inject_hyperparams``) comes back as a marker that raises when it is needed:
    ``state_bits`` only by ``init``, ``block_size`` by 8-bit ``init`` and ``update``,
    ``min_8bit_size`` by 8-bit ``init``."""

    def convert(name: str, value: Any, ok: Any, want: str) -> Any:
        if is_traced(value):
            return _Traced(name, value)
        try:
            v = interop.integer(name, value)
        except TypeError:
            raise ValueError(f"Invalid {name}: {value!r} (must be {want})") from None
        if not ok(v):
            raise ValueError(f"Invalid {name}: {value!r} (must be {want})")
        return v

    bits = convert("state_bits", state_bits, lambda v: v in (8, 32), "8 or 32")
    if block_size is not None:
        block_size = convert("block_size", block_size, lambda v: v >= 1, "a positive int, or None for one scale per tensor")
    min_8bit_size = convert("min_8bit_size", min_8bit_size, lambda v: v >= 0, "an int >= 0")
    return bits, block_size, min_8bit_size


def scale_by_lion(
    b1: float = 0.9,
    b2: float = 0.99,
    state_bits: int = 32,
    block_size: Optional[int] = interop.BLOCK_SIZE,
    mu_dtype: Any = None,
    *,
    min_8bit_size: int = 4096,
) -> optax.GradientTransformation:
    r"""Rescale updates to Lion's direction, ``sign(b1*m + (1-b1)*g)``, and track the momentum.

    For each leaf, with gradient :math:`g_t` and momentum :math:`m_{t-1}` (zeros at start)::

        c_t = b1 * m_{t-1} + (1 - b1) * g_t      # interpolation, used only for its sign
        u_t = sign(c_t)                           # sign(0) = 0
        m_t = b2 * m_{t-1} + (1 - b2) * g_t

    Math is done in fp32 whatever the gradient dtype (bf16 gradients included) and the
    returned updates are fp32; ``optax.apply_updates`` writes them back once in each
    parameter's dtype. With ``state_bits=32`` and fp32 inputs the arithmetic is that of
    ``optax.scale_by_lion``, bit for bit.

    With ``state_bits=8``, leaves with at least ``min_8bit_size`` elements store the
    momentum as uint8 codes into bitsandbytes' signed dynamic map times one fp32 scale
    (max |m_t|) per block of ``block_size`` elements: 1.016 bytes per element instead of 4.
    Rounding is to the nearest code with ties to the larger one, and a nonzero momentum never
    becomes zero or changes sign. The codes equal those of lionkit's PyTorch ``Lion8bit`` for
    the same momentum, so states convert losslessly (``lionkit.interop``).

    Args:
      b1: interpolation rate between momentum and gradient for the update direction (0.9).
      b2: decay rate of the momentum (0.99).
      state_bits: 32 (fp32 momentum, or ``mu_dtype``) or 8 (quantized momentum).
      block_size: elements per 8-bit scale (256, bitsandbytes' size; the only block size
        lionkit's PyTorch side reads); None for one scale per tensor.
      mu_dtype: dtype of momentum kept unquantized (all leaves at 32 bits, small leaves at
        8 bits). None means fp32 (float64 for float64 leaves); unlike ``optax.scale_by_lion``
        bf16 parameters get fp32 momentum unless you ask for ``jnp.bfloat16`` here.
      min_8bit_size: leaves with fewer elements keep unquantized momentum at 8 bits (4096, as
        in bitsandbytes): their state is small and quantizing it saves nothing.

    ``b1`` and ``b2`` may be any real number, traced ones included (``optax.inject_hyperparams``);
    the three integer arguments may be numpy ints or concrete arrays, and must be concrete where
    they are needed (see ``lion``). ``update`` refuses a state of the other width, or one made
    with another block size (see ``check_block_size``).

    Returns:
      An ``optax.GradientTransformation`` whose state is ``ScaleByLionState`` (32-bit) or
      ``ScaleByLion8bitState`` (8-bit).

    Example::

        tx = optax.chain(scale_by_lion(state_bits=8), optax.scale(-1e-4))
        state = tx.init(params)
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
    """
    _check_beta("b1", b1)
    _check_beta("b2", b2)
    state_bits, block_size, min_8bit_size = check_quant_args(state_bits, block_size, min_8bit_size)
    if mu_dtype is not None:
        mu_dtype = _float_dtype("mu_dtype", mu_dtype)

    def mom_dtype(p: Any) -> Any:
        return mu_dtype if mu_dtype is not None else _math_dtype(p.dtype)

    def direction_and_momentum(g: jax.Array, m: jax.Array) -> tuple[jax.Array, jax.Array]:
        ct = _math_dtype(jnp.promote_types(g.dtype, m.dtype))
        g = g.astype(ct)
        m = m.astype(ct)
        # interpolation, used only for its sign
        u = jnp.sign((1.0 - b1) * g + b1 * m)
        # decay the momentum
        m_new = (1.0 - b2) * g + b2 * m
        return u, m_new

    def init32(params: optax.Params) -> ScaleByLionState:
        mu = jax.tree.map(lambda p: jnp.zeros(p.shape, mom_dtype(p)), params)
        return ScaleByLionState(count=jnp.zeros([], jnp.int32), mu=mu)

    def update32(updates, state):
        def leaf(g, m):
            u, m_new = direction_and_momentum(g, m)
            return u, m_new.astype(m.dtype)

        pairs = jax.tree.map(leaf, updates, state.mu)
        u, mu = _unzip(updates, pairs)
        return u, ScaleByLionState(count=_increment(state.count), mu=mu)

    def init8(params: optax.Params) -> ScaleByLion8bitState:
        bs, min_size = _static(block_size), _static(min_8bit_size)

        def quantized(p: Any) -> bool:
            return p.size >= min_size

        def mu_leaf(p):
            return jnp.zeros((0,), mom_dtype(p)) if quantized(p) else jnp.zeros(p.shape, mom_dtype(p))

        def codes_leaf(p):
            return quant.zeros(p.shape, bs)[0] if quantized(p) else jnp.zeros((0,), jnp.uint8)

        def absmax_leaf(p):
            return quant.zeros(p.shape, bs)[1] if quantized(p) else jnp.zeros((0,), jnp.float32)

        return ScaleByLion8bitState(
            count=jnp.zeros([], jnp.int32),
            mu=jax.tree.map(mu_leaf, params),
            codes=jax.tree.map(codes_leaf, params),
            absmax=jax.tree.map(absmax_leaf, params),
            block_size=jnp.asarray(-1 if bs is None else bs, jnp.int32),
        )

    def update8(updates, state):
        bs = _static(block_size)
        check_block_size(state, bs)

        def leaf(g, m, codes, absmax):
            if absmax.size == 0:  # kept unquantized (decided by shape: static under jit)
                u, m_new = direction_and_momentum(g, m)
                return u, m_new.astype(m.dtype), codes, absmax
            m_old = quant.dequantize(codes, absmax, bs)
            u, m_new = direction_and_momentum(g.astype(jnp.float32), m_old)
            # absmax comes from the *updated* momentum, so every value fits its block's scale
            new_codes, new_absmax = quant.quantize(m_new, bs)
            return u, m, new_codes, new_absmax

        quads = jax.tree.map(leaf, updates, state.mu, state.codes, state.absmax)
        u, mu, codes, absmax = _unzip(updates, quads, 4)
        new_state = ScaleByLion8bitState(
            count=_increment(state.count), mu=mu, codes=codes, absmax=absmax, block_size=state.block_size
        )
        return u, new_state

    def init_fn(params: optax.Params) -> Any:
        return init32(params) if _static(state_bits) == 32 else init8(params)

    def update_fn(updates, state, params=None):
        del params
        # the state's type says which layout it has; state_bits (traced under
        # optax.inject_hyperparams) only has to agree with it when it is known
        bits = 8 if isinstance(state, ScaleByLion8bitState) else 32 if isinstance(state, ScaleByLionState) else None
        if bits is None:
            raise TypeError(f"scale_by_lion got a {type(state).__name__}, not a ScaleByLionState/ScaleByLion8bitState")
        if not isinstance(state_bits, _Traced) and state_bits != bits:
            raise ValueError(
                f"a scale_by_lion(state_bits={state_bits}) transform got a {bits}-bit state ({type(state).__name__})"
            )
        return update8(updates, state) if bits == 8 else update32(updates, state)

    return optax.GradientTransformation(init_fn, update_fn)


def check_block_size(state: ScaleByLion8bitState, block_size: Optional[int]) -> None:
    """ValueError unless ``state`` was made for ``block_size``: every leaf's number of scales
    (static, so checked under ``jit`` too) and the recorded block size (when it is concrete,
    i.e. outside ``jit``; two block sizes giving the same number of scales for every leaf
    pass under ``jit``)."""
    want = -1 if block_size is None else block_size
    if not is_traced(state.block_size) and int(np.asarray(state.block_size)) != want:
        rec = int(np.asarray(state.block_size))
        raise ValueError(
            f"the 8-bit state was made with block_size={None if rec < 0 else rec}, this transform has "
            f"block_size={block_size}: convert it with lionkit.interop.to_jax(interop.from_jax(state), tx.init(params))"
        )
    for name, codes, absmax in zip(leaf_names(state.codes), leaves(state.codes), leaves(state.absmax)):
        if absmax.size and absmax.size != interop.num_blocks(codes.size, block_size):
            raise ValueError(
                f"8-bit state of {name or 'the parameter'!r} has {absmax.size} scales for {codes.size} elements, "
                f"but block_size={block_size} needs {interop.num_blocks(codes.size, block_size)}: "
                "was it made with another block_size?"
            )


def _unzip(like: Any, tree_of_tuples: Any, n: int = 2) -> tuple[Any, ...]:
    """Split a tree whose leaves (in ``like``'s structure) are n-tuples into n trees."""
    treedef = jax.tree.structure(like)
    parts = treedef.flatten_up_to(tree_of_tuples)
    return tuple(jax.tree.unflatten(treedef, [p[i] for p in parts]) for i in range(n))


# --------------------------------------------------------------------------- state helpers
LionState = (ScaleByLionState, ScaleByLion8bitState)

def leaves(tree: Any) -> list:
    """Leaves of a state tree, in the order of ``jax.tree.leaves(params)``."""
    return jax.tree.leaves(tree)


def _key_name(k: Any) -> str:
    for attr in ("key", "idx", "name"):  # DictKey / FlattenedIndexKey, SequenceKey, GetAttrKey
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def leaf_names(tree: Any) -> list[str]:
    """Tree path of every leaf, in ``leaves`` order, spelled like MLX's ``tree_flatten`` keys
    and PyTorch's parameter names: ``{"layers": [{"weight": w}]}`` -> ``"layers.0.weight"``."""
    return [".".join(_key_name(k) for k in path) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _walk(x: Any, fn: Any) -> Any:
    """Rebuild ``x`` (tuples, NamedTuples, lists, dicts) with ``fn`` applied to every node
    ``fn`` recognises (it returns NotImplemented for the others)."""
    out = fn(x)
    if out is not NotImplemented:
        return out
    if isinstance(x, tuple) and hasattr(x, "_fields"):
        return type(x)(*(_walk(c, fn) for c in x))
    if isinstance(x, (tuple, list)):
        return type(x)(_walk(c, fn) for c in x)
    if isinstance(x, dict):
        return type(x)((k, _walk(v, fn)) for k, v in x.items())
    return x


def find_lion_state(opt_state: Any) -> Any:
    """The one ``ScaleByLionState``/``ScaleByLion8bitState`` inside ``opt_state``."""
    found: list = []

    def visit(x):
        if isinstance(x, LionState):
            found.append(x)
            return x
        return NotImplemented

    _walk(opt_state, visit)
    if len(found) != 1:
        raise ValueError(
            f"expected exactly one lionkit.jax scale_by_lion state inside the optimizer state, found {len(found)}"
        )
    return found[0]


def block_size_of(st: ScaleByLion8bitState) -> Optional[int]:
    """The block size recorded in an 8-bit state (None: one scale per tensor)."""
    bs = int(np.asarray(st.block_size))
    return None if bs < 0 else bs


def _leaf_from(ms: interop.MomentumState, i: int, mu: Any, codes: Any, absmax: Any, bs: Optional[int]):
    """(mu, codes, absmax) arrays of leaf ``i`` holding ``ms`` in the layout of the given leaves."""
    target_8bit = absmax is not None and absmax.size > 0
    shape = codes.shape if target_8bit else mu.shape
    if tuple(shape) != ms.shape:
        raise ValueError(f"parameter {i}: saved momentum has shape {ms.shape}, the JAX state has {tuple(shape)}")
    if not target_8bit:
        m = ms.dequantize()  # exact for 8-bit state: the values it stands for
        return jnp.array(m, dtype=mu.dtype), codes, absmax
    if ms.is_8bit and ms.block_size == bs:
        return mu, jnp.array(ms.codes), jnp.array(ms.absmax)
    # another layout (fp32 or another block size): quantize what it stands for, as PyTorch does
    c, a = interop.quantize(ms.dequantize(), bs)
    return mu, jnp.array(c), jnp.array(a)


def replace_lion_state(opt_state: Any, states: Sequence[interop.MomentumState], step: int) -> Any:
    """``opt_state`` with the Lion momentum replaced by ``states`` (in leaf order) and the step
    counters ``interop.to_jax`` lists set to ``step``."""
    from .alias import WeightDecayScheduleState

    lion_state = find_lion_state(opt_state)
    n = len(leaves(lion_state.mu))
    if len(states) != n:
        raise ValueError(f"got {len(states)} momentum states, but the JAX optimizer state has {n} parameters")
    count = jnp.asarray(step, jnp.int32)

    def rebuild(st: Any) -> Any:
        treedef = jax.tree.structure(st.mu)
        if isinstance(st, ScaleByLionState):
            mus = [_leaf_from(ms, i, mu, None, None, None)[0] for i, (ms, mu) in enumerate(zip(states, leaves(st.mu)))]
            return ScaleByLionState(count=count, mu=jax.tree.unflatten(treedef, mus))
        bs = block_size_of(st)
        trip = [
            _leaf_from(ms, i, mu, c, a, bs)
            for i, (ms, mu, c, a) in enumerate(zip(states, leaves(st.mu), leaves(st.codes), leaves(st.absmax)))
        ]
        return ScaleByLion8bitState(
            count=count,
            mu=jax.tree.unflatten(treedef, [t[0] for t in trip]),
            codes=jax.tree.unflatten(treedef, [t[1] for t in trip]),
            absmax=jax.tree.unflatten(treedef, [t[2] for t in trip]),
            block_size=st.block_size,
        )

    def visit(x):
        if isinstance(x, LionState):
            return rebuild(x)
        if isinstance(x, (optax.ScaleByScheduleState, WeightDecayScheduleState)):
            return type(x)(count=count)
        if isinstance(x, optax.MultiStepsState):
            # gradient_step counts the inner (Lion) updates; a partial accumulation is not saved
            x = x._replace(gradient_step=count)
        elif isinstance(x, (optax.InjectStatefulHyperparamsState, optax.InjectHyperparamsState)):
            # a plain schedule's state in hyperparams_states is a NamedTuple holding only its
            # count (optax does not export its class): recognised by that shape
            hyper = {
                k: type(v)(count=count) if isinstance(v, tuple) and getattr(v, "_fields", None) == ("count",) else v
                for k, v in x.hyperparams_states.items()
            }
            x = x._replace(count=count, hyperparams_states=hyper)
        else:
            return NotImplemented
        return type(x)(*(_walk(c, visit) for c in x))

    return _walk(opt_state, visit)
