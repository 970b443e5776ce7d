"""lionkit under ``torch.distributed``: DTensor (FSDP2) parameters, global norms and scales, and
the reshardable checkpoint form of 8-bit state.

DDP needs nothing from here: every rank holds whole parameters and all-reduced gradients, so
each rank's optimizer does the same step. With FSDP2 (``torch.distributed.fsdp.fully_shard``)
parameters and gradients are ``DTensor``s sharded along dim 0, and lionkit

- steps each rank's local shard (``p.to_local()``, ``p.grad.to_local()``) with the usual kernels;
- decides 8-bit vs fp32 state by the parameter's *global* size (``min_8bit_size``), so precision
  does not depend on the world size;
- computes ``grad_clip_norm`` and ``percentile_clipping`` norms over the whole parameter
  (squared norms all-reduced over the shard groups of its device mesh), and the 8-bit
  per-tensor scale (``block_wise=False``) as the global max;
- keeps the 8-bit blocks of the *unsharded* tensor: block ``b`` covers flat elements
  ``[256 b, 256 b + 256)`` of the global tensor, wherever the shard boundaries fall. A block cut
  by a shard boundary is held in part by two (or more) ranks, each with a copy of its scale; the
  new scale is their partial maxima all-reduced (one small all-reduce per step for all such
  blocks). So a sharded run takes the same steps, bit for bit, as one process holding the whole
  parameter (global-norm clipping aside: its norm is a sum in a different order, equal to
  within fp32 rounding).

The state of a DTensor parameter lives on its rank as plain tensors: ``state1`` shaped like the
local shard, ``absmax1`` with the scales of the blocks that intersect it. ``state_dict()``
returns a form that does not depend on the sharding: ``state1`` as a DTensor placed like the
parameter, ``absmax1`` as the full vector of the global tensor's block scales (identical on every
rank). ``torch.distributed.checkpoint`` saves that, reshards it on load (save on N ranks, load
on M, or into a single unsharded process), and ``get_optimizer_state_dict(...,
full_state_dict=True)`` gives exactly the state dict of an unsharded optimizer.
Calling ``state_dict()`` with FSDP2 parameters is collective: every rank must call it (as
``get_optimizer_state_dict`` does).

8-bit block-wise state needs each local shard to be a contiguous range of the flattened
parameter: sharding along dim 0 on one mesh dimension (FSDP2, HSDP). Other layouts (tensor
parallel ``Shard(1)``, ...) work with fp32 state or ``block_wise=False``; see
``docs/distributed.md``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional, Sequence

import torch
import torch.distributed as dist

from . import clipping, guards, quant, rounding

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor


_DTENSOR: Any = None  # the class, once torch.distributed.tensor has been imported


def _dtensor_type() -> Any:
    # Importing torch.distributed.tensor costs about a second; a DTensor cannot exist before
    # it is imported (FSDP2 imports it), so look it up instead of importing it. Once found it
    # is kept: the optimizer asks for every parameter of every step.
    global _DTENSOR
    if _DTENSOR is None:
        _DTENSOR = getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)
    return _DTENSOR


def world_size() -> int:
    """Processes in the default process group (1 without torch.distributed)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_dtensor(t: Any) -> bool:
    """True if ``t`` is a ``torch.distributed.tensor.DTensor`` (e.g. an FSDP2 parameter)."""
    cls = _dtensor_type()
    return cls is not None and isinstance(t, cls)


def any_dtensor(tensors: Sequence[Any]) -> bool:
    """True if any of ``tensors`` is a DTensor."""
    cls = _dtensor_type()
    return cls is not None and any(isinstance(t, cls) for t in tensors)


def local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (no copy), or ``t`` itself."""
    return t.to_local() if is_dtensor(t) else t


# ---------------------------------------------------------------------------------- layout
def _shard_type() -> type:
    from torch.distributed.tensor import Shard

    return Shard


def _contiguous_stride(shape: Sequence[int]) -> tuple[int, ...]:
    stride, acc = [], 1
    for n in reversed(shape):
        stride.append(acc)
        acc *= max(n, 1)
    return tuple(reversed(stride))


def _local_shape_and_offset(p: "DTensor") -> tuple[tuple[int, ...], tuple[int, ...]]:
    try:
        from torch.distributed.tensor._utils import (
            compute_local_shape_and_global_offset,
        )

        shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
        return tuple(shape), tuple(offset)
    except ImportError:  # moved in some torch version: DCP's own description of the shard
        (chunk,) = p.__create_chunk_list__()
        return tuple(chunk.sizes), tuple(chunk.offsets)


@dataclass(frozen=True)
class Layout:
    """Where a rank's shard lies in its DTensor parameter, and the 8-bit blocks it touches.

    ``groups``: the process groups to reduce over for a global sum or max (one per mesh
    dimension that shards the tensor; replicas are not summed). ``start``/``end``: the shard as
    a range of the flattened global tensor, or None if it is not contiguous there.
    ``first``/``count``: the global blocks intersecting ``[start, end)``. ``shared``: the global
    blocks cut by a shard boundary (held in part by several ranks), sorted."""

    numel: int
    local_shape: tuple[int, ...]
    offset: tuple[int, ...]
    groups: tuple
    start: Optional[int]
    end: Optional[int]
    block_size: Optional[int]
    first: int
    count: int
    shared: tuple[int, ...]

    def block_range(self, j: int) -> tuple[int, int]:
        """Local flat element range of the j-th local block."""
        bs = self.block_size
        assert bs is not None and self.start is not None and self.end is not None
        b = self.first + j
        return max(self.start, b * bs) - self.start, min(self.end, (b + 1) * bs) - self.start


@functools.lru_cache(maxsize=4096)
def _layout(shape: tuple[int, ...], mesh: Any, placements: tuple, block_size: Optional[int], local_shape: tuple[int, ...],
            offset: tuple[int, ...]) -> Layout:
    numel = math.prod(shape)
    groups = []
    shard_dims = []
    for dim, pl in enumerate(placements):
        if pl.is_shard():
            groups.append(mesh.get_group(dim))
            shard_dims.append(dim)
        elif not pl.is_replicate():
            raise ValueError(
                f"lionkit cannot step a DTensor parameter with placement {pl} (placements {placements}): "
                "expected Shard or Replicate (FSDP2 parameters are Shard(0))"
            )
    contiguous = tuple(local_shape[1:]) == tuple(shape[1:])
    start = end = None
    ranges: list[tuple[int, int]] = []
    if contiguous and shape:
        row = math.prod(shape[1:])
        start = offset[0] * row
        end = start + math.prod(local_shape)
        if len(shard_dims) == 0:
            ranges = [(start, end)]
        elif len(shard_dims) == 1 and type(placements[shard_dims[0]]) is _shard_type():
            # DTensor's Shard(0) splits like torch.chunk: ceil(rows / world) rows per rank, the
            # last ranks short or empty. Every rank's range follows from that, without a collective.
            world = mesh.size(shard_dims[0])
            rows = shape[0]
            per = -(-rows // world) if rows else 0
            ranges = [(min(k * per, rows) * row, min((k + 1) * per, rows) * row) for k in range(world)]
            if (start, end) not in ranges:
                ranges = []  # not torch.chunk's split after all: unsupported for blocks
    elif not shape:
        start, end, ranges = 0, numel, [(0, numel)]
    if not ranges:
        start = end = None
    first = count = 0
    shared: tuple[int, ...] = ()
    if block_size is not None and start is not None and end is not None:
        first = start // block_size
        count = (-(-end // block_size) - first) if end > start else 0
        # A block is shared when a boundary between two non-empty shards falls inside it.
        cuts = {e // block_size for s, e in ranges if s < e and 0 < e < numel and e % block_size}
        shared = tuple(sorted(cuts))
    return Layout(numel, tuple(local_shape), tuple(offset), tuple(groups), start, end, block_size, first, count, shared)


# id(p) -> (weak reference, shape, placements, mesh, local shape, offset): finding a shard's
# offset takes ~50 us in torch, several times per parameter and step without this cache.
_PLACES: dict[int, tuple] = {}


def layout(p: "DTensor", block_size: Optional[int] = quant.BLOCK_SIZE) -> Layout:
    """The ``Layout`` of DTensor ``p`` on this rank for blocks of ``block_size`` (None: per tensor)."""
    key = id(p)
    hit = _PLACES.get(key)
    shape, placements, mesh = tuple(p.shape), tuple(p.placements), p.device_mesh
    if hit is None or hit[0]() is not p or hit[1] != shape or hit[2] != placements or hit[3] is not mesh:
        local_shape, offset = _local_shape_and_offset(p)
        ref = weakref.ref(p, lambda _, key=key: _PLACES.pop(key, None))
        hit = _PLACES[key] = (ref, shape, placements, mesh, local_shape, offset)
    return _layout(shape, mesh, placements, block_size, hit[4], hit[5])


@functools.lru_cache(maxsize=256)
def _groups_of(mesh: Any, placements: tuple) -> tuple:
    return tuple(mesh.get_group(dim) for dim, pl in enumerate(placements) if pl.is_shard())


def shard_groups(t: "DTensor") -> tuple:
    """The process groups over which ``t``'s shards differ (a sum or max over them covers the
    whole tensor; replicas are not counted twice)."""
    return _groups_of(t.device_mesh, tuple(t.placements))


def _name(opt: Any, p: torch.Tensor) -> str:
    """How errors name ``p``: its place in ``opt`` (only computed when raising)."""
    for gi, group in enumerate(getattr(opt, "param_groups", ())):
        for i, q in enumerate(group["params"]):
            if q is p:
                return guards.where(gi, i, p)
    return f"a DTensor parameter (shape {tuple(p.shape)})"


def _block_layout(p: "DTensor", block_size: Optional[int], opt: Any = None) -> Layout:
    lay = layout(p, block_size)
    if block_size is not None and lay.start is None:
        raise ValueError(
            f"{_name(opt, p)}: 8-bit block-wise state needs each shard to be a contiguous range of the "
            f"flattened parameter (sharding along dim 0 on one mesh dimension, as FSDP2 does), but its placements "
            f"are {tuple(p.placements)} with local shape {lay.local_shape}. Use block_wise=False (one scale per "
            "tensor, a global max) or fp32 state for it (GlobalOptimManager.get_instance().override_config(p, "
            "'optim_bits', 32))"
        )
    return lay


# ----------------------------------------------------------------------------- collectives
def _all_reduce(t: torch.Tensor, groups: Sequence[Any], op: Any) -> None:
    for g in groups:
        dist.all_reduce(t, op=op, group=g)


def _reduce_batched(values: list[tuple[tuple, torch.Tensor]], op_name: str) -> list[torch.Tensor]:
    """All-reduce (SUM or MAX) a list of (groups, 1-D tensor), one collective per group tuple.

    MAX treats NaN as the largest value (a NaN on any rank gives NaN), as ``torch.max`` does."""
    out: list[Optional[torch.Tensor]] = [None] * len(values)
    by_key: dict[tuple, list[int]] = {}
    for i, (groups, t) in enumerate(values):
        if not groups:
            out[i] = t
        else:
            by_key.setdefault((groups, t.device, t.dtype), []).append(i)
    op = dist.ReduceOp.SUM if op_name == "sum" else dist.ReduceOp.MAX
    for (groups, _, _), idx in by_key.items():  # insertion order: the same on every rank
        flat = torch.cat([values[i][1].reshape(-1) for i in idx])
        if flat.numel() == 0:  # sizes follow from global shapes: every rank skips alike
            for i in idx:
                out[i] = values[i][1]
            continue
        if op_name == "max":
            # Backends' MAX may drop NaN; +inf survives it. Scales are never +inf (a block
            # holding inf gets NaN, see quant.block_absmax), so inf maps back to NaN exactly.
            flat = flat.masked_fill(flat.isnan(), float("inf"))
        _all_reduce(flat, groups, op)
        if op_name == "max":
            flat = flat.masked_fill(flat.isinf(), float("nan"))
        pos = 0
        for i in idx:
            n = values[i][1].numel()
            out[i] = flat[pos : pos + n].reshape(values[i][1].shape)
            pos += n
    return out  # type: ignore[return-value]


def grad_sq_norms(grads: Sequence[Optional[torch.Tensor]]) -> list[Optional[torch.Tensor]]:
    """``clipping.grad_sq_norm`` of each gradient (None stays None); for DTensor gradients the
    norm of the whole tensor: local squared norms all-reduced, one collective per device mesh."""
    out: list[Optional[torch.Tensor]] = []
    pending: list[tuple[int, tuple, torch.Tensor]] = []
    for i, g in enumerate(grads):
        if g is None:
            out.append(None)
            continue
        sq = clipping.grad_sq_norm(guards.as_real(local(g)))
        out.append(sq)
        if is_dtensor(g):
            groups = shard_groups(g)
            if groups:
                pending.append((i, groups, sq.reshape(1)))
    if pending:
        reduced = _reduce_batched([(gr, t) for _, gr, t in pending], "sum")
        for (i, _, _), r in zip(pending, reduced):
            out[i] = r.reshape(())
    return out


def sharded_sq_norms(opt: Any, work: Sequence[tuple[int, dict[str, Any], torch.Tensor]]) -> dict[int, torch.Tensor]:
    """id(p) -> squared norm of the whole gradient, for the DTensor parameters of a step whose
    clipping needs it (``grad_clip_norm``, or ``percentile_clipping`` < 100). Collective."""
    if not any_dtensor([p for _, _, p in work]):
        return {}
    grads = []
    for _, group, p in work:
        need = is_dtensor(p) and (
            opt.grad_clip_norm is not None or opt._config(group, p)["percentile_clipping"] < 100
        )
        grads.append(p.grad if need else None)
    norms = grad_sq_norms(grads)
    return {id(p): sq for (_, _, p), sq in zip(work, norms) if sq is not None}


def nonfinite_params(grads: Sequence[torch.Tensor]) -> list[int]:
    """``guards.nonfinite_params`` over whole tensors: a DTensor gradient counts as non-finite on
    every rank when any rank's shard is, so all ranks skip (or raise) together."""
    if not any_dtensor(grads):
        return guards.nonfinite_params(grads)
    bad = set(guards.nonfinite_params([local(g) for g in grads]))
    flags = [(i, shard_groups(g)) for i, g in enumerate(grads) if is_dtensor(g)]
    flags = [(i, gr) for i, gr in flags if gr]
    if flags:
        vals = [(gr, torch.tensor([1.0 if i in bad else 0.0], device=local(grads[i]).device)) for i, gr in flags]
        reduced = _reduce_batched(vals, "max")
        reduced = torch.cat([r.reshape(1).to(reduced[0].device) for r in reduced]).tolist()  # one sync
        bad.update(i for (i, _), r in zip(flags, reduced) if r > 0)
    return sorted(bad)


# ----------------------------------------------------------------------------- validation
def check_grad(p: "DTensor", g: Any, name: str) -> None:
    """A DTensor parameter needs a DTensor gradient sharded the same way."""
    if not is_dtensor(g):
        raise TypeError(f"{name} is a DTensor but its gradient is a {type(g).__name__}: expected a DTensor placed like it")
    if g.device_mesh != p.device_mesh or tuple(g.placements) != tuple(p.placements):
        raise ValueError(
            f"{name}: gradient placements {tuple(g.placements)} differ from the parameter's {tuple(p.placements)} "
            "(redistribute the gradient, e.g. p.grad = p.grad.redistribute(p.device_mesh, p.placements))"
        )
    if p.is_complex():
        raise TypeError(f"{name}: complex DTensor parameters are not supported")
    odd = [pl for pl in p.placements if not (pl.is_shard() or pl.is_replicate())]
    if odd:
        raise ValueError(
            f"{name} has placements {tuple(p.placements)}: lionkit steps Shard and Replicate DTensors "
            "(FSDP2 parameters are Shard(0)); redistribute the others first"
        )


def check_state(state: dict[str, Any], p: "DTensor", name: str) -> None:
    """The DTensor counterpart of ``guards.check_state``: existing (local) state must fit the
    local shard; canonical (checkpoint) forms are accepted and converted at the step."""
    s1 = state.get("state1")
    if s1 is None:
        return
    loc = local(p)
    if is_dtensor(s1):
        if s1.shape != p.shape:
            raise ValueError(f"{name}: its optimizer state has global shape {tuple(s1.shape)}, the parameter {tuple(p.shape)}")
        return
    if s1.shape not in (loc.shape, p.shape):
        raise ValueError(
            f"{name}: its optimizer state has shape {tuple(s1.shape)}, the local shard {tuple(loc.shape)} "
            f"(global {tuple(p.shape)}): was the model resharded after the optimizer was built? Load the state "
            "through torch.distributed.checkpoint, which reshards it"
        )
    if s1.device != loc.device:
        raise ValueError(f"{name}: its optimizer state is on {s1.device}, the parameter's shard on {loc.device}")
    if s1.dtype == torch.uint8:
        absmax = state.get("absmax1")
        if absmax is None or absmax.device != loc.device:
            raise ValueError(f"{name}: its 8-bit optimizer state has no matching 'absmax1'")


# ------------------------------------------------------------------------------- 8-bit state
# Block size of each DTensor parameter's local 8-bit codes, keyed by the codes tensor: the
# number of local scales alone cannot tell "one block in this shard" from "one per tensor".
# (Tensors compare elementwise, so the table is keyed by id with a weak reference to check it.)
_BLOCKS: dict[int, tuple["weakref.ref[torch.Tensor]", Optional[int]]] = {}
_NO_BLOCK: Any = object()


def _set_block(codes: torch.Tensor, block_size: Optional[int]) -> None:
    key = id(codes)
    _BLOCKS[key] = (weakref.ref(codes, lambda _, key=key: _BLOCKS.pop(key, None)), block_size)


def _get_block(codes: torch.Tensor, default: Any = _NO_BLOCK) -> Any:
    hit = _BLOCKS.get(id(codes))
    return hit[1] if hit is not None and hit[0]() is codes else default


def _zero_code(qmap: torch.Tensor) -> int:
    return quant.code_thresholds(qmap)[1]


def _local_scales(absmax: torch.Tensor, lay: Layout, n: int) -> torch.Tensor:
    """Per-element scale of the local shard (fp32, n values)."""
    if lay.block_size is None or n == 0:
        return absmax.reshape(-1)[:1].expand(n)
    idx = (torch.arange(n, device=absmax.device) + lay.start) // lay.block_size - lay.first
    return absmax[idx]


def dequantize_local(codes: torch.Tensor, absmax: torch.Tensor, qmap: torch.Tensor, lay: Layout) -> torch.Tensor:
    """fp32 value of a rank's local 8-bit state (shaped like ``codes``)."""
    flat = qmap[codes.reshape(-1).long()]
    return (flat * _local_scales(absmax, lay, flat.numel())).reshape(codes.shape)


def _partial_maxima(m: torch.Tensor, lay: Layout) -> torch.Tensor:
    """max |m| over the part of each local block on this rank (NaN for a block holding NaN/inf)."""
    flat = m.reshape(-1)
    if lay.block_size is None:
        return quant.block_absmax(flat, None)
    parts = [quant.block_absmax(flat[a:b], None) for a, b in (lay.block_range(j) for j in range(lay.count))]
    return torch.cat(parts) if parts else flat.new_zeros(0, dtype=torch.float32)


def _slot_vector(lay: Layout, maxima: torch.Tensor) -> torch.Tensor:
    """This rank's contribution to the shared blocks' scales (0 where it holds no part)."""
    if lay.block_size is None:
        return maxima.reshape(1)
    vec = maxima.new_zeros(len(lay.shared))
    for j in (0, lay.count - 1) if lay.count else ():
        b = lay.first + j
        if b in lay.shared:
            vec[lay.shared.index(b)] = maxima[j]
    return vec


def _apply_slots(lay: Layout, maxima: torch.Tensor, vec: torch.Tensor) -> torch.Tensor:
    if lay.block_size is None:
        return vec.reshape(1).clone()
    maxima = maxima.clone()
    for j in (0, lay.count - 1) if lay.count else ():
        b = lay.first + j
        if b in lay.shared:
            maxima[j] = vec[lay.shared.index(b)]
    return maxima


def _quantize_with(m: torch.Tensor, scales: torch.Tensor, qmap: torch.Tensor) -> torch.Tensor:
    flat = m.reshape(-1).to(torch.float32)
    normed = torch.where(scales > 0, flat / scales, torch.zeros_like(flat))
    return quant.nearest_code(normed, qmap).reshape(m.shape)


def quantize_local(m: torch.Tensor, qmap: torch.Tensor, lay: Layout) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a rank's fp32 local momentum with the unsharded tensor's blocks: scales of
    blocks cut by a shard boundary (and the per-tensor scale) are all-reduced. Collective."""
    maxima = _partial_maxima(m, lay)
    vec = _reduce_batched([(lay.groups, _slot_vector(lay, maxima))], "max")[0]
    absmax = _apply_slots(lay, maxima, vec)
    codes = _quantize_with(m, _local_scales(absmax, lay, m.numel()), qmap)
    return codes, absmax


def block_size_of(state: dict[str, Any], lay_numel: int, count_blockwise: int) -> Optional[int]:
    """Block size of an existing local 8-bit state."""
    known = _get_block(state["state1"])
    if known is not _NO_BLOCK:
        return known  # type: ignore[return-value]
    n = state["absmax1"].numel()
    return None if n == 1 and count_blockwise != 1 and lay_numel > quant.BLOCK_SIZE else quant.BLOCK_SIZE


def _to_local_state(state: dict[str, Any], p: "DTensor") -> None:
    """Turn a canonical (checkpoint) state of DTensor ``p`` into its local form, in place of the
    dict's entries (new tensors; the old ones are not modified)."""
    s1 = state["state1"]
    loc = local(p)
    if is_dtensor(s1):
        if s1.device_mesh != p.device_mesh or tuple(s1.placements) != tuple(p.placements):
            s1 = s1.redistribute(p.device_mesh, p.placements)
        s1 = s1.to_local()
    elif s1.shape != loc.shape:
        # a whole (unsharded) tensor: this rank's part of it
        lay = layout(p, None)
        s1 = s1[tuple(slice(o, o + n) for o, n in zip(lay.offset, lay.local_shape))]
    else:
        return  # already local
    state["state1"] = s1.to(loc.device, copy=True, memory_format=torch.contiguous_format)
    if s1.dtype == torch.uint8:
        absmax = state["absmax1"].reshape(-1)
        global_blocks = quant.num_blocks(p.numel(), quant.BLOCK_SIZE)
        if absmax.numel() == 1 and p.numel() > quant.BLOCK_SIZE:
            bs = None
        else:
            bs = quant.BLOCK_SIZE
            lay = _block_layout(p, bs)
            if absmax.numel() != global_blocks:
                raise ValueError(f"'absmax1' has {absmax.numel()} scales, expected {global_blocks} (or 1)")
            absmax = absmax[lay.first : lay.first + lay.count]
        state["absmax1"] = absmax.to(loc.device, torch.float32, copy=True)
        _set_block(state["state1"], bs)


def prepare_state(opt: Any, p: "DTensor", cfg: dict[str, Any], eight: bool, block_size: Optional[int]) -> dict[str, Any]:
    """``_LionBase._prepare_state`` for a DTensor parameter: build its local state lazily, bring
    a checkpoint's canonical form to the local one, or convert it to the wanted format.
    Conversions put new tensors into the state dict and never modify the old ones."""
    state = opt.state[p]
    loc = local(p)
    if "state1" not in state:
        state["step"] = state.get("step", 0)
        if eight:
            lay = _block_layout(p, block_size, opt)
            qmap = opt._qmap(loc.device)
            state["state1"] = torch.full(loc.shape, _zero_code(qmap), dtype=torch.uint8, device=loc.device)
            state["absmax1"] = torch.zeros(1 if block_size is None else lay.count, dtype=torch.float32, device=loc.device)
            state["qmap1"] = qmap
            _set_block(state["state1"], block_size)
        else:
            state["state1"] = torch.zeros(loc.shape, dtype=torch.float32, device=loc.device)
    else:
        _to_local_state(state, p)
        s1 = state["state1"]
        is8 = s1.dtype == torch.uint8
        if is8:
            blocks = layout(p, quant.BLOCK_SIZE)
            have_bs = block_size_of(state, p.numel(), blocks.count if blocks.start is not None else -1)
            if _get_block(s1) is _NO_BLOCK:  # a state loaded already in its local shape
                _set_block(s1, have_bs)
        if is8 and (not eight or have_bs != block_size):
            m = dequantize_local(s1, state["absmax1"], state["qmap1"], _block_layout(p, have_bs))
        elif not is8 and eight:
            m = s1
        else:
            m = None
        if m is not None:
            if eight:
                lay = _block_layout(p, block_size, opt)
                qmap = state.get("qmap1", opt._qmap(loc.device))
                codes, absmax = quantize_local(m, qmap, lay)
                state["state1"], state["absmax1"], state["qmap1"] = codes, absmax, qmap
                _set_block(codes, block_size)
            else:
                state["state1"] = m.to(torch.float32, copy=True)
                del state["absmax1"], state["qmap1"]
    return state


# ------------------------------------------------------------------------------------ step
@dataclass
class _Shared:
    """Blocks of one parameter whose new scale needs other ranks' partial maxima."""

    lay: Layout
    codes: torch.Tensor  # flat local codes
    absmax: torch.Tensor
    qmap: torch.Tensor
    pieces: list  # (local block index j or -1 for per-tensor, a, b, fp32 momentum buffer)


def _shard_seed(hp: Any, lay: Layout, at: int) -> Any:
    """Stochastic rounding draws its numbers from (seed, offset in the tensor it is given): give
    each shard's piece its own seed, so ranks do not repeat each other's noise. Replicas (no
    shard group, or the same offset on a replicate dimension) keep equal seeds and stay equal."""
    if not getattr(hp, "stochastic_rounding", False) or not lay.groups:
        return hp
    return dataclasses.replace(hp, seed=rounding.derive_seed(hp.seed, *lay.offset, at))


def kernel_items(state: dict[str, Any], p: "DTensor", hp: Any) -> tuple[list[tuple], Optional[_Shared]]:
    """What the backend updates for DTensor ``p``: (param, grad, momentum, hyper) items on the
    local shard, plus the blocks to finish with ``finish`` after the kernels ran.

    Blocks wholly on this rank go to the backend as ordinary 8-bit state. Blocks cut by a shard
    boundary (or the whole shard, for a per-tensor scale) are stepped in fp32 from their
    dequantized value; ``finish`` requantizes them with the all-reduced scale, which is exactly
    what the 8-bit kernel does with a whole block."""
    pl, gl = local(p), local(p.grad)
    if not pl.is_contiguous():
        raise ValueError(f"the local shard of a DTensor parameter (shape {tuple(p.shape)}) is not contiguous")
    s1 = state["state1"]
    if s1.dtype != torch.uint8:
        return ([(pl, gl, s1, _shard_seed(hp, layout(p, None), 0))] if pl.numel() else []), None
    pf, gf, codes = pl.view(-1), gl.reshape(-1), s1.view(-1)
    absmax, qmap = state["absmax1"], state["qmap1"]
    bs = _get_block(s1, quant.BLOCK_SIZE)
    lay = _block_layout(p, bs)
    from .qstate import QuantizedState

    shared = _Shared(lay, codes, absmax, qmap, [])
    items: list[tuple] = []
    n = pf.numel()
    if bs is None:
        if n:
            m = qmap[codes.long()] * absmax.reshape(1)
            shared.pieces.append((-1, 0, n, m))
            items.append((pf, gf, m, _shard_seed(hp, lay, 0)))
        return items, shared
    if lay.count == 0:
        return items, shared
    head = lay.first in lay.shared
    tail = lay.count > (1 if head else 0) and (lay.first + lay.count - 1) in lay.shared
    j0, j1 = (1 if head else 0), lay.count - (1 if tail else 0)
    for j in ([0] if head else []) + ([lay.count - 1] if tail else []):
        a, b = lay.block_range(j)
        m = qmap[codes[a:b].long()] * absmax[j]
        shared.pieces.append((j, a, b, m))
        items.append((pf[a:b], gf[a:b], m, _shard_seed(hp, lay, a)))
    if j1 > j0:
        a, b = lay.block_range(j0)[0], lay.block_range(j1 - 1)[1]
        q = QuantizedState(codes[a:b], absmax[j0:j1], qmap, bs)
        items.append((pf[a:b], gf[a:b], q, _shard_seed(hp, lay, a)))
    return items, shared


def finish(shared: Sequence[Optional[_Shared]]) -> None:
    """Requantize the fp32-stepped blocks of ``kernel_items`` with their global scales: one
    all-reduce (MAX) per device mesh for every parameter of the step. Collective."""
    shared = [s for s in shared if s is not None]
    contributions = []
    for s in shared:
        if s.lay.block_size is None:
            vec = quant.block_absmax(s.pieces[0][3], None) if s.pieces else s.absmax.new_zeros(1)
        else:
            vec = s.absmax.new_zeros(len(s.lay.shared))
            for j, _, _, m in s.pieces:
                vec[s.lay.shared.index(s.lay.first + j)] = quant.block_absmax(m, None)[0]
        contributions.append((s.lay.groups, vec))
    reduced = _reduce_batched(contributions, "max")
    for s, vec in zip(shared, reduced):
        if s.lay.block_size is None:
            s.absmax.copy_(vec.reshape(s.absmax.shape))
            for _, a, b, m in s.pieces:
                s.codes[a:b].copy_(_quantize_with(m, vec.reshape(1).expand(m.numel()), s.qmap))
            continue
        for j, a, b, m in s.pieces:
            scale = vec[s.lay.shared.index(s.lay.first + j)]
            s.codes[a:b].copy_(_quantize_with(m, scale.expand(m.numel()), s.qmap))
            s.absmax[j] = scale


# ----------------------------------------------------------------------------- checkpoints
def state_dict_post_hook(opt: torch.optim.Optimizer, state_dict: dict[str, Any]) -> Optional[dict[str, Any]]:
    """``Optimizer.state_dict`` post-hook: the sharding-independent form of DTensor parameters'
    state (``state1`` a DTensor placed like the parameter; ``absmax1`` the global tensor's
    block scales, all-reduced so every rank holds the same vector). Collective when any
    parameter is a DTensor with 8-bit block-wise state; a no-op without DTensor parameters."""
    params = [p for g in opt.param_groups for p in g["params"]]
    if not any_dtensor(params):
        return None
    keys = {}
    # torch numbers parameters in param_group order; a state dict with other keys (FQNs from
    # torch.distributed.checkpoint.state_dict) maps through each group's 'params' list.
    for group, saved in zip(opt.param_groups, state_dict["param_groups"]):
        for p, key in zip(group["params"], saved["params"]):
            keys[key] = p
    new_state = dict(state_dict["state"])
    gathers = []
    for key, st in state_dict["state"].items():
        p = keys.get(key)
        if not is_dtensor(p) or "state1" not in st:
            continue
        st = dict(st)  # the inner dict is the optimizer's own: never modify it
        s1 = st["state1"]
        if not is_dtensor(s1) and s1.shape == local(p).shape:
            bs = _get_block(s1, quant.BLOCK_SIZE) if s1.dtype == torch.uint8 else None
            st["state1"] = _dtensor_type().from_local(
                s1, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=_contiguous_stride(p.shape)
            )
            if s1.dtype == torch.uint8 and bs is not None:
                lay = _block_layout(p, bs)
                full = torch.zeros(quant.num_blocks(p.numel(), bs), dtype=torch.float32, device=s1.device)
                full[lay.first : lay.first + lay.count] = st["absmax1"]
                gathers.append((key, st, lay.groups, full))
        new_state[key] = st
    if gathers:
        # Each rank holds its blocks' scales (shared blocks on several ranks, equal there) and
        # zeros elsewhere: their max is the full vector. Scales are >= 0 or NaN.
        reduced = _reduce_batched([(groups, full) for _, _, groups, full in gathers], "max")
        for (key, st, _, _), full in zip(gathers, reduced):
            st["absmax1"] = full
    return {**state_dict, "state": new_state}
