"""One 8-bit Lion state format across PyTorch, JAX and MLX, with numpy as the neutral form.

Every lionkit front end stores Lion's momentum the same way: fp32 for small parameters (fewer
than ``min_8bit_size`` elements) or 32-bit optimizers, and otherwise uint8 ``codes`` into the
256-value signed dynamic map (bitsandbytes' ``create_dynamic_map(signed=True)``) times one fp32
``absmax`` per block of 256 elements (or per tensor). The same codes come out of all three
front ends for the same momentum, so a state can move between them without loss (the momentum
and step count; PyTorch's ``percentile_clipping`` norm history is not part of the format, and
``to_torch`` leaves it to be started again by the next step, from that step's norm):

    torch optimizer --from_torch--> [MomentumState, ...] --to_jax-->  optax state
                                     (numpy; save_npz)   --to_mlx-->  MLX optimizer state

Every exported state carries the parameter's name where the framework has one: its tree path
in JAX (``"layers.0.weight"``: dict keys, sequence indices and attribute names joined with
dots), its ``tree_flatten`` key in MLX (the same spelling), and in PyTorch the names given to
``from_torch(..., names=...)`` (or the ``param_names`` a state dict's groups carry: optimizers
built from ``named_parameters()`` keep them, lionkit's and torch's >= 2.6).
When both the states and the target name every parameter, loading matches them by name and
refuses (ValueError listing the names) when the two sets differ; otherwise, or with
``by_name=False``, parameters are matched by position: the order of ``optimizer.param_groups``
in PyTorch, of ``jax.tree.leaves(params)`` in JAX (sorted dict keys), of
``mlx.utils.tree_flatten(params)`` in MLX (insertion order). Positional matching checks the
count and every shape, so it catches most wrong orders, but not two parameters of the same
shape in different orders: keep the names (or the same order) when shapes repeat.

This module imports no framework at import time (numpy only), so the JAX and MLX front ends
and a torch-free Python can use the map and the converters; each ``*_torch``, ``*_jax`` and
``*_mlx`` function imports its framework when called.

Example, PyTorch -> JAX -> PyTorch::

    states = interop.from_torch(torch_opt)            # list of MomentumState (numpy)
    opt_state = interop.to_jax(states, tx.init(params))
    ...                                               # train in JAX
    interop.to_torch(interop.from_jax(opt_state), torch_opt)

and for MLX: ``interop.to_mlx(states, opt, model.trainable_parameters())`` and
``interop.from_mlx(opt, model.trainable_parameters())``.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np

BLOCK_SIZE = 256
"""Elements per block (bitsandbytes' optimizer block size; the only block-wise size PyTorch reads)."""
MAP_SIZE = 256


# --------------------------------------------------------------------------- the format (numpy)
@functools.lru_cache(maxsize=None)
def _dynamic_map() -> np.ndarray:
    values: list[np.ndarray] = []
    f32 = np.float32
    for i in range(7):
        n = 2**i + 1
        # torch.linspace(0.1, 1.0, n) in fp32, reproduced: step = (end - start) / (n - 1) in
        # fp32, then start + step*k for the first half and end - step*(n-1-k) for the second,
        # each rounded once to fp32 (torch fuses the multiply-add). float64 holds the exact
        # product and sum, so one cast gives the same single rounding without torch.
        start, end = f32(0.1), f32(1.0)
        step = f32((end - start) / f32(n - 1))
        k = np.arange(n, dtype=np.float64)
        lo = np.float64(start) + np.float64(step) * k
        hi = np.float64(end) - np.float64(step) * (n - 1 - k)
        bounds = np.where(k < n // 2, lo, hi).astype(f32)
        means = (bounds[:-1] + bounds[1:]) / f32(2.0)
        scaled = means * f32(10.0 ** (i - 6))  # the Python scale is rounded to fp32 first, as in torch
        values += [scaled, -scaled]
    values.append(np.array([0.0, 1.0], dtype=f32))
    qmap = np.sort(np.concatenate(values).astype(f32))
    assert qmap.size == MAP_SIZE
    qmap.setflags(write=False)
    return qmap


def dynamic_map() -> np.ndarray:
    """The 256-entry signed dynamic map as a float32 numpy array, bit-identical to
    ``lionkit.quant.dynamic_map()`` (and bitsandbytes'), computed without torch."""
    return _dynamic_map().copy()


@functools.lru_cache(maxsize=16)
def _thresholds(key: bytes) -> tuple[np.ndarray, int]:
    q = np.frombuffer(key, dtype=np.float32).astype(np.float64)
    mid = (q[:-1] + q[1:]) / 2  # exact in float64 for two float32 values
    t = mid.astype(np.float32)
    # smallest float32 >= the exact midpoint: `x >= t` then decides `x >= mid` exactly
    below = t.astype(np.float64) < mid
    t = np.where(below, np.nextafter(t, np.float32(np.inf)), t).astype(np.float32)
    t.setflags(write=False)
    return t, int(np.flatnonzero(q == 0)[0])


def code_thresholds(qmap: Optional[np.ndarray] = None) -> tuple[np.ndarray, int]:
    """(255 float32 decision thresholds, index of the zero code) for ``qmap`` (default: the
    dynamic map). Same values as ``lionkit.quant.code_thresholds``: code = number of
    thresholds <= x, which is the nearest map value with ties going to the larger code."""
    q = _dynamic_map() if qmap is None else np.ascontiguousarray(qmap, dtype=np.float32)
    return _thresholds(q.tobytes())


def num_blocks(numel: int, block_size: Optional[int]) -> int:
    """Number of scales: ceil(numel / block_size), or 1 per tensor (``block_size=None``)."""
    if block_size is None:
        return 1
    return max(1, -(-numel // block_size))


def real_number(name: str, value: Any) -> float:
    """A concrete real hyperparameter as a Python float: Python and numpy numbers and 0-d arrays
    of any framework (numpy, JAX, MLX); TypeError naming ``name`` for anything else."""
    a = _scalar_array(name, value, "a real number")
    if a.dtype.kind not in "iuf":
        raise TypeError(f"Invalid {name}: {value!r} (must be a real number)")
    return float(a)


def integer(name: str, value: Any) -> int:
    """A concrete integer argument as a Python int: Python and numpy integers and 0-d integer
    arrays of any framework; TypeError naming ``name`` for anything else (floats included)."""
    a = _scalar_array(name, value, "an int")
    if a.dtype.kind not in "iu":
        raise TypeError(f"Invalid {name}: {value!r} (must be an int)")
    return int(a)


def _scalar_array(name: str, value: Any, what: str) -> np.ndarray:
    # bools are numbers to numpy, never a meaningful hyperparameter
    if value is None or isinstance(value, (bool, np.bool_, str, bytes)):
        raise TypeError(f"Invalid {name}: {value!r} (must be {what})")
    try:
        a = np.asarray(value)
    except (TypeError, ValueError):  # e.g. an MLX bfloat16 scalar has no numpy buffer format
        item = getattr(value, "item", None)
        if item is None or getattr(value, "ndim", None) != 0:
            raise TypeError(f"Invalid {name}: {value!r} (must be {what})") from None
        a = np.asarray(item())
    if a.shape != ():
        raise TypeError(f"Invalid {name}: {value!r} (must be a single number, got shape {a.shape})")
    return a


def _expand(absmax: np.ndarray, numel: int, block_size: Optional[int]) -> np.ndarray:
    if block_size is None:
        return np.broadcast_to(absmax.reshape(1), (numel,))
    return np.repeat(absmax, block_size)[:numel]


def quantize(x: np.ndarray, block_size: Optional[int] = BLOCK_SIZE, qmap: Optional[np.ndarray] = None):
    """numpy reference quantizer: (uint8 codes shaped like ``x``, float32 absmax per block).

    The same rules as ``lionkit.quant.quantize``: absmax = max |x| over the block, code =
    nearest map value to x/absmax (ties to the larger code), a nonzero value never gets the
    zero code or a code of the other sign."""
    x = np.asarray(x, dtype=np.float32)
    flat = x.reshape(-1)
    nb = num_blocks(flat.size, block_size)
    padded = np.zeros(nb * (block_size or max(flat.size, 1)), dtype=np.float32)
    padded[: flat.size] = np.abs(flat)
    absmax = padded.reshape(nb, -1).max(axis=1).astype(np.float32)
    scale = _expand(absmax, flat.size, block_size)
    with np.errstate(divide="ignore", invalid="ignore"):
        normed = np.where(scale > 0, flat / scale, np.float32(0)).astype(np.float32)
    t, zero = code_thresholds(qmap)
    codes = np.searchsorted(t, normed, side="right")
    codes = np.where((normed > 0) & (codes <= zero), zero + 1, codes)
    codes = np.where((normed < 0) & (codes >= zero), zero - 1, codes)
    return codes.astype(np.uint8).reshape(x.shape), absmax


def dequantize(
    codes: np.ndarray, absmax: np.ndarray, block_size: Optional[int] = BLOCK_SIZE, qmap: Optional[np.ndarray] = None
) -> np.ndarray:
    """float32 ``qmap[codes] * absmax[block]``, shaped like ``codes``."""
    q = _dynamic_map() if qmap is None else np.asarray(qmap, dtype=np.float32)
    flat = q[np.asarray(codes).reshape(-1).astype(np.int64)]
    return (flat * _expand(np.asarray(absmax, np.float32), flat.size, block_size)).reshape(np.shape(codes))


def infer_block_size(numel: int, n_scales: int) -> Optional[int]:
    """Block size of a saved 8-bit state from its number of scales: 256 when it has one per
    256 elements, None (per tensor) when it has one scale for more than 256 elements."""
    if n_scales == num_blocks(numel, BLOCK_SIZE):
        return BLOCK_SIZE
    if n_scales == 1:
        return None
    raise ValueError(
        f"absmax has {n_scales} scales for {numel} elements: expected {num_blocks(numel, BLOCK_SIZE)} "
        f"(blocks of {BLOCK_SIZE}) or 1 (per tensor)"
    )


# --------------------------------------------------------------------------- the neutral state
@dataclass
class MomentumState:
    """One parameter's Lion momentum in the neutral (numpy) form.

    Either ``momentum`` (float32, shaped like the parameter) for 32-bit state, or ``codes``
    (uint8, shaped like the parameter) with ``absmax`` (float32, one per block of
    ``block_size`` elements, or one per tensor when ``block_size`` is None) for 8-bit state.
    ``step`` counts the updates this momentum has seen; ``name`` is the parameter's name
    (``"layers.0.weight"``) where the exporting framework knows it, else None.
    """

    step: int
    shape: tuple[int, ...]
    momentum: Optional[np.ndarray] = None
    codes: Optional[np.ndarray] = None
    absmax: Optional[np.ndarray] = None
    block_size: Optional[int] = BLOCK_SIZE
    qmap: np.ndarray = field(default_factory=dynamic_map)
    name: Optional[str] = None

    def __post_init__(self) -> None:
        self.shape = tuple(int(s) for s in self.shape)
        try:
            step = integer("step", self.step)
        except TypeError:
            raise ValueError(f"Invalid step: {self.step!r} (must be an int >= 0)") from None
        if step < 0:
            raise ValueError(f"Invalid step: {self.step!r} (must be an int >= 0)")
        self.step = step
        if self.block_size is not None:
            try:
                bs = integer("block_size", self.block_size)
            except TypeError:
                bs = 0
            if bs < 1:
                raise ValueError(f"Invalid block_size: {self.block_size!r} (must be an int >= 1, or None for one scale per tensor)")
            self.block_size = bs
        if self.name is not None:
            self.name = str(self.name)
        if (self.momentum is None) == (self.codes is None):
            raise ValueError("MomentumState needs exactly one of 'momentum' (32-bit) or 'codes' (8-bit)")
        if self.momentum is not None:
            self.momentum = np.asarray(self.momentum, dtype=np.float32)
            _check_shape("momentum", self.momentum.shape, self.shape)
        else:
            self.codes = np.asarray(self.codes)
            if self.codes.dtype != np.uint8:
                raise ValueError(f"codes must be uint8, got {self.codes.dtype}")
            _check_shape("codes", self.codes.shape, self.shape)
            if self.absmax is None:
                raise ValueError("8-bit MomentumState needs 'absmax'")
            self.absmax = np.asarray(self.absmax, dtype=np.float32).reshape(-1)
            want = num_blocks(self.codes.size, self.block_size)
            if self.absmax.size != want:
                raise ValueError(
                    f"absmax has {self.absmax.size} scales, expected {want} for {self.codes.size} elements "
                    f"with block_size={self.block_size}"
                )
        self.qmap = np.asarray(self.qmap, dtype=np.float32)
        if self.qmap.shape != (MAP_SIZE,):
            raise ValueError(f"qmap must hold {MAP_SIZE} values, got shape {self.qmap.shape}")

    @property
    def is_8bit(self) -> bool:
        """True for uint8 codes + scales, False for fp32 momentum."""
        return self.codes is not None

    def dequantize(self) -> np.ndarray:
        """The float32 momentum this state stands for."""
        if self.momentum is not None:
            return self.momentum.copy()
        return dequantize(self.codes, self.absmax, self.block_size, self.qmap)

    def __repr__(self) -> str:
        kind = f"8-bit, block_size={self.block_size}" if self.is_8bit else "fp32"
        named = "" if self.name is None else f", name={self.name!r}"
        return f"MomentumState(step={self.step}, shape={self.shape}, {kind}{named})"


def _check_shape(name: str, got: tuple, want: tuple) -> None:
    if tuple(got) != tuple(want):
        raise ValueError(f"{name} shape {tuple(got)} does not match parameter shape {tuple(want)}")


def _check_standard_map(states: Sequence[MomentumState], where: str) -> None:
    std = _dynamic_map()
    for i, st in enumerate(states):
        if st.is_8bit and not np.array_equal(st.qmap, std):
            raise ValueError(
                f"parameter {i}: its 8-bit state uses a custom quantization map; the {where} front end "
                "only supports lionkit's standard dynamic map"
            )


def _global_step(states: Sequence[MomentumState]) -> int:
    # JAX and MLX keep one step count for all parameters; PyTorch keeps one per parameter,
    # equal unless some parameters had no gradient on some steps. The largest is the number
    # of optimizer steps taken.
    return max((st.step for st in states), default=0)


def _check_count(states: Sequence[MomentumState], n: int, where: str) -> None:
    if len(states) != n:
        raise ValueError(f"got {len(states)} momentum states, but the {where} has {n} parameters")


def match_states(
    states: Sequence[MomentumState], names: Sequence[Optional[str]], where: str, by_name: Optional[bool] = None
) -> list[MomentumState]:
    """``states`` in the order of a target whose parameters are called ``names`` (None where
    unknown): by name when both sides name every parameter (``by_name=None``) or always
    (``by_name=True``, ValueError when a name is missing), by position with ``by_name=False``
    or when names are missing. The count is checked; shapes are checked by the caller."""
    _check_count(states, len(names), where)
    named = all(st.name is not None for st in states) and all(n is not None for n in names)
    if by_name is False or (by_name is None and not named):
        return list(states)
    if not named:
        raise ValueError(
            f"by_name=True, but {'the states' if any(st.name is None for st in states) else 'the ' + where} "
            "do not name every parameter"
        )
    saved = {}
    for st in states:
        if st.name in saved:
            raise ValueError(f"two momentum states are both named {st.name!r}")
        saved[st.name] = st
    missing = [n for n in names if n not in saved]
    if missing:
        unexpected = sorted(set(saved) - set(names))
        raise ValueError(
            f"the {where} has parameters the states do not name: {missing[:5]}{' ...' if len(missing) > 5 else ''}; "
            f"the states have {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''} instead. Rename them, "
            "or pass by_name=False to match by position"
        )
    return [saved[n] for n in names]


def save_npz(path, states: Sequence[MomentumState]) -> None:
    """Write states to one ``.npz`` file readable without any framework (see ``load_npz``)."""
    arrays: dict[str, np.ndarray] = {"count": np.array(len(states))}
    for i, st in enumerate(states):
        arrays[f"{i}.step"] = np.array(st.step, dtype=np.int64)
        arrays[f"{i}.shape"] = np.array(st.shape, dtype=np.int64)
        if st.name is not None:
            arrays[f"{i}.name"] = np.array(st.name)
        if st.is_8bit:
            arrays[f"{i}.codes"] = st.codes
            arrays[f"{i}.absmax"] = st.absmax
            arrays[f"{i}.block_size"] = np.array(-1 if st.block_size is None else st.block_size, dtype=np.int64)
            arrays[f"{i}.qmap"] = st.qmap
        else:
            arrays[f"{i}.momentum"] = st.momentum
    np.savez(path, **arrays)


def load_npz(path) -> list[MomentumState]:
    """Read states written by ``save_npz`` (``"ckpt"`` finds ``"ckpt.npz"``, the file that
    ``save_npz("ckpt", ...)`` writes: numpy adds the suffix)."""
    if isinstance(path, (str, os.PathLike)) and not os.path.exists(path) and os.path.exists(os.fspath(path) + ".npz"):
        path = os.fspath(path) + ".npz"
    with np.load(path) as f:
        out = []
        for i in range(int(f["count"])):
            common = dict(step=int(f[f"{i}.step"]), shape=tuple(int(s) for s in f[f"{i}.shape"]))
            if f"{i}.name" in f:
                common["name"] = str(f[f"{i}.name"])
            if f"{i}.codes" in f:
                bs = int(f[f"{i}.block_size"])
                out.append(
                    MomentumState(
                        **common,
                        codes=f[f"{i}.codes"],
                        absmax=f[f"{i}.absmax"],
                        block_size=None if bs < 0 else bs,
                        qmap=f[f"{i}.qmap"],
                    )
                )
            else:
                out.append(MomentumState(**common, momentum=f[f"{i}.momentum"]))
    return out


# --------------------------------------------------------------------------- PyTorch
def from_torch(optimizer_or_state_dict: Any, names: Optional[Sequence[str]] = None) -> list[MomentumState]:
    """States of a lionkit (or bitsandbytes) Lion optimizer, in ``param_groups`` order.

    Accepts the optimizer or its ``state_dict()`` (plain or bitsandbytes' nested layout).
    ``names`` (one per parameter, in ``param_groups`` order, e.g. ``[n for n, _ in
    model.named_parameters()]``) names the states, so that ``to_jax``/``to_mlx`` match them by
    name; without it the names a state dict's groups carry (``param_names``, kept by
    optimizers built from ``named_parameters()``, lionkit's included) are used
    when present. A parameter that has no state yet (never stepped) raises
    ValueError: it has no shape in a state dict; step the optimizer once or leave such
    parameters out."""
    import torch  # noqa: F401  (a state dict holds torch tensors)

    from . import checkpoint, quant4

    sd = optimizer_or_state_dict
    if hasattr(sd, "state_dict") and callable(sd.state_dict):
        sd = sd.state_dict()
    if not isinstance(sd, dict) or "state" not in sd or "param_groups" not in sd:
        raise ValueError("from_torch expects a lionkit optimizer or its state_dict()")
    names = _torch_names(sd, names)
    out = []
    for gi, group in enumerate(sd["param_groups"]):
        for key in group["params"]:
            name = names[len(out)]
            if key not in sd["state"]:
                raise ValueError(f"parameter id {key!r} of param group {gi} has no state (never stepped)")
            st = checkpoint.flatten_param_state(sd["state"][key])
            s1 = st.get("state1", st.get("exp_avg"))
            if s1 is None:
                raise ValueError(f"parameter id {key!r}: state has no momentum ('state1')")
            step = int(st.get("step", 0))
            shape = tuple(s1.shape)
            if s1.dtype.is_floating_point:
                out.append(MomentumState(step, shape, momentum=_np_copy(s1.float()), name=name))
                continue
            qmap = st.get("qmap1")
            if quant4.is_map4(qmap):
                raise ValueError(
                    f"parameter id {key!r} has 4-bit momentum, which the JAX/MLX front ends do not have; "
                    "load the state dict into a lionkit optimizer with optim_bits=8 (it converts) and export that"
                )
            absmax = _np_copy(st["absmax1"].float()).reshape(-1)
            out.append(
                MomentumState(
                    step,
                    shape,
                    codes=_np_copy(s1),
                    absmax=absmax,
                    block_size=infer_block_size(s1.numel(), absmax.size),
                    qmap=_dynamic_map() if qmap is None else _np_copy(qmap),
                    name=name,
                )
            )
    return out


def _torch_names(sd: dict, names: Optional[Sequence[str]]) -> list[Optional[str]]:
    """One name (or None) per parameter of a torch state dict, in ``param_groups`` order."""
    n = sum(len(g["params"]) for g in sd["param_groups"])
    if names is not None:
        names = [str(x) for x in names]
        if len(names) != n:
            raise ValueError(f"got {len(names)} names for the {n} parameters of the PyTorch optimizer")
        return names
    # torch >= 2.6 keeps the names of an optimizer built from model.named_parameters()
    kept = [x for g in sd["param_groups"] for x in g.get("param_names", [None] * len(g["params"]))]
    return kept if len(kept) == n and all(x is not None for x in kept) else [None] * n


def _np_copy(t: Any) -> np.ndarray:
    if hasattr(t, "full_tensor"):  # a DTensor: each rank holds a shard of the state
        raise ValueError(
            "from_torch: this optimizer's state is sharded (DTensor, e.g. FSDP2); export the whole state "
            "first: torch.distributed.checkpoint.state_dict.get_optimizer_state_dict(model, opt, "
            "options=StateDictOptions(full_state_dict=True)), loaded into an unsharded lionkit optimizer"
        )
    # .numpy() shares memory with the tensor, which the optimizer updates in place
    return t.detach().cpu().numpy().copy()


def to_torch(
    states: Sequence[MomentumState], optimizer: Any, names: Optional[Sequence[str]] = None, by_name: Optional[bool] = None
) -> None:
    """Load ``states`` into a lionkit PyTorch optimizer, shapes checked. Matched by name when
    the states are named and ``names`` (or the optimizer's ``param_names``) name the
    parameters, else by ``param_groups`` order (see the module docstring; ``by_name`` forces
    one or the other). Goes through ``optimizer.load_state_dict``, so hyperparameters stay and
    the optimizer converts a state whose width differs from its own configuration."""
    import torch

    params = [p for g in optimizer.param_groups for p in g["params"]]
    sd = optimizer.state_dict()
    states = match_states(states, _torch_names(sd, names), "PyTorch optimizer", by_name)
    keys = [k for g in sd["param_groups"] for k in g["params"]]
    new_state = {}
    for i, (key, p, st) in enumerate(zip(keys, params, states)):
        if tuple(p.shape) != st.shape:
            raise ValueError(f"parameter {i}: state shape {st.shape} does not match parameter shape {tuple(p.shape)}")
        if st.is_8bit:
            if st.block_size not in (BLOCK_SIZE, None):
                raise ValueError(
                    f"parameter {i}: block_size={st.block_size}; PyTorch reads blocks of {BLOCK_SIZE} or per-tensor"
                )
            entry = {
                "step": st.step,
                "state1": torch.from_numpy(st.codes.copy()),
                "absmax1": torch.from_numpy(st.absmax.copy()),
                "qmap1": torch.from_numpy(st.qmap.copy()),
            }
        else:
            entry = {"step": st.step, "state1": torch.from_numpy(st.momentum.copy())}
        new_state[key] = entry
    optimizer.load_state_dict({"state": new_state, "param_groups": sd["param_groups"]})


# --------------------------------------------------------------------------- JAX
def from_jax(opt_state: Any) -> list[MomentumState]:
    """States held by the (single) ``lionkit.jax.scale_by_lion`` state inside ``opt_state``
    (the state of ``lionkit.jax.lion(...)`` or of any chain containing ``scale_by_lion``),
    in ``jax.tree.leaves`` order of the parameters, each named by its tree path."""
    from .jax import transform

    st = transform.find_lion_state(opt_state)
    step = int(st.count)
    names = transform.leaf_names(st.mu)
    out = []
    if isinstance(st, transform.ScaleByLionState):
        for name, mu in zip(names, transform.leaves(st.mu)):
            out.append(MomentumState(step, mu.shape, momentum=np.asarray(mu, dtype=np.float32), name=name))
        return out
    bs = transform.block_size_of(st)
    for name, mu, codes, absmax in zip(
        names, transform.leaves(st.mu), transform.leaves(st.codes), transform.leaves(st.absmax)
    ):
        if absmax.size == 0:  # kept unquantized (smaller than min_8bit_size)
            out.append(MomentumState(step, mu.shape, momentum=np.asarray(mu, dtype=np.float32), name=name))
        else:
            out.append(
                MomentumState(
                    step, codes.shape, codes=np.asarray(codes), absmax=np.asarray(absmax), block_size=bs, name=name
                )
            )
    return out


def to_jax(states: Sequence[MomentumState], opt_state: Any, by_name: Optional[bool] = None) -> Any:
    """A copy of ``opt_state`` (e.g. ``tx.init(params)`` of a ``lionkit.jax`` transform) with
    its Lion momentum replaced by ``states`` (matched by tree path when the states are named,
    else in ``jax.tree.leaves`` order; ``by_name`` forces one or the other; shapes and 8-bit
    layout checked) and its step counters set to the states' step, so schedules go on where
    the saved run stopped. The counters set are exactly: the Lion state's ``count``, the
    ``count`` of every ``optax.ScaleByScheduleState`` (a scheduled learning rate) and of
    lionkit's weight-decay schedule state, ``gradient_step`` of ``optax.MultiSteps`` (with
    ``mini_step`` left as initialised: accumulation restarts), and the ``count`` of
    ``optax.inject_hyperparams``' state and of its wrapped schedules. Any other counter in the
    state (another transform's, a custom schedule's) keeps its value in ``opt_state``."""
    _check_standard_map(states, "JAX")
    from .jax import transform

    lion_state = transform.find_lion_state(opt_state)
    states = match_states(states, transform.leaf_names(lion_state.mu), "JAX optimizer state", by_name)
    return transform.replace_lion_state(opt_state, states, _global_step(states))


# --------------------------------------------------------------------------- MLX
def from_mlx(optimizer: Any, parameters: Any) -> list[MomentumState]:
    """States of a ``lionkit.mlx`` Lion/Lion8bit (or ``mlx.optimizers.Lion``) optimizer for
    ``parameters`` (``model.trainable_parameters()``: frozen parameters have no optimizer
    state), in ``tree_flatten`` order, each named by its ``tree_flatten`` key."""
    from .mlx import optimizers

    return optimizers.export_states(optimizer, parameters)


def to_mlx(states: Sequence[MomentumState], optimizer: Any, parameters: Any, by_name: Optional[bool] = None) -> None:
    """Load ``states`` into a ``lionkit.mlx`` optimizer for ``parameters`` (e.g.
    ``model.trainable_parameters()``), matched by ``tree_flatten`` key when the states are
    named, else in ``tree_flatten`` order (``by_name`` forces one or the other); shapes checked.
    Sets the optimizer's step, so schedules go on where the saved run stopped."""
    _check_standard_map(states, "MLX")
    from .mlx import optimizers

    optimizers.import_states(optimizer, parameters, states, _global_step(states), by_name)
