"""Checks that keep an optimizer step all-or-nothing: what parameters, gradients and existing
state must look like, and the non-finite gradient policy.

Everything here only reads. The optimizer runs all of it for every parameter of a step before it
writes anything, so bad input is reported with the parameter's name and nothing is half-updated.
"""

from __future__ import annotations

import functools
import os
import sys
from collections import defaultdict
from typing import Any, Callable, Iterable, Optional, Sequence

import torch

from . import quant, quant4

NONFINITE_POLICIES = ("propagate", "skip", "raise")


class NonFiniteGradientError(ValueError):
    """A gradient holds NaN or +-inf and the optimizer's policy is ``nonfinite="raise"``.
    Raised before anything is written: parameters and state are as they were."""


def check_nonfinite_policy(value: Any) -> None:
    """Validate the ``nonfinite`` argument."""
    if value not in NONFINITE_POLICIES or not isinstance(value, str):
        raise ValueError(f"Invalid nonfinite: {value!r} (must be one of {', '.join(map(repr, NONFINITE_POLICIES))})")


def where(gi: int, i: int, p: torch.Tensor) -> str:
    """How errors name a parameter: its place in the optimizer, shape and dtype."""
    return f"parameter {i} of param group {gi} (shape {tuple(p.shape)}, dtype {p.dtype})"


def as_real(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself, or for a complex tensor its real view with a trailing (real, imag) axis:
    lionkit updates a complex parameter as pairs of independent reals."""
    return torch.view_as_real(t) if t.is_complex() else t


def param_list(params: Any) -> list[torch.Tensor]:
    """The ``params`` entry of a param group as a list (as torch.optim normalises it)."""
    if isinstance(params, torch.Tensor):
        return [params]
    if isinstance(params, set):
        raise TypeError("optimizer parameters need to be organized in ordered collections, but the ordering of "
                        "tensors in sets will change between runs. Please use a list instead.")
    try:
        return list(params)
    except TypeError:
        raise TypeError(f"a param group's 'params' must be a tensor or an iterable of tensors, got {params!r}") from None


def check_param(p: Any, gi: int, i: int) -> None:
    """Refuse what Lion cannot update: non-tensors, meta tensors, sparse tensors, integer and
    boolean dtypes. ``gi``, ``i``: where ``p`` is, to name it in the error."""
    if not isinstance(p, torch.Tensor):
        raise TypeError(f"parameter {i} of param group {gi} is a {type(p).__name__}, not a tensor")
    if p.is_meta or p.layout != torch.strided or not (p.is_floating_point() or p.is_complex()):
        _refuse_param(p, where(gi, i, p))


def _refuse_param(p: torch.Tensor, name: str) -> None:
    if p.is_meta:
        raise ValueError(
            f"{name} is on the meta device: it has no data to update. Materialize the model first "
            "(e.g. model.to_empty(device=...) and initialize it), then build the optimizer from its parameters"
        )
    if p.layout != torch.strided:
        raise TypeError(f"{name} has layout {p.layout}: lionkit updates dense (strided) tensors only")
    if not (p.is_floating_point() or p.is_complex()):
        raise TypeError(
            f"{name} has dtype {p.dtype}: Lion updates floating-point (or complex) parameters only. Leave "
            "integer and boolean tensors out of the optimizer, e.g. [p for p in model.parameters() if "
            "p.is_floating_point()]"
        )


def user_stacklevel() -> int:
    """The ``stacklevel`` that makes a warning raised by the caller point at the user's code:
    the first frame outside lionkit and torch (the step goes through wrappers of both, so a
    fixed count would point inside them)."""
    # the packages' folders with a trailing separator: "torch/" is not "torchvision/"
    inside = tuple(os.path.dirname(os.path.abspath(f)) + os.sep for f in (__file__, torch.__file__))
    frame = sys._getframe(1)  # the function that will call warnings.warn: stacklevel 1
    level = 1
    while frame is not None and frame.f_code.co_filename.startswith(inside):
        frame = frame.f_back
        level += 1
    return level


def mark_modified(params: Sequence[torch.Tensor]) -> None:
    """Bump the autograd version counter of parameters a kernel wrote through their pointers
    (the compiled CPU kernel, Triton), as an in-place torch op would: a graph that saved one of
    them for backward then fails loudly ("modified by an inplace operation") instead of
    differentiating with the new weights. Torch ops bump again; counting twice is harmless."""
    if _increment_takes_lists():
        torch.autograd.graph.increment_version(params)
    else:
        for p in params:
            torch.autograd.graph.increment_version(p)


@functools.cache
def _increment_takes_lists() -> bool:
    """Whether this torch bumps a list of tensors in one call (2.4 takes one tensor only and
    raises RuntimeError for a list). Found at the first step, not at import: a probe tensor
    there would follow ``torch.set_default_device`` and could initialise CUDA in the importer."""
    try:
        torch.autograd.graph.increment_version([torch.zeros(1, device="cpu")])
    except Exception:  # RuntimeError on 2.4; whatever else a build raises, one at a time works
        return False
    return True


def _memory_key(p: torch.Tensor) -> tuple | None:
    # Two distinct tensor objects with this key are the same memory seen twice (e.g. two
    # nn.Parameter wrappers of one tensor, or a reshaped or transposed view of another
    # parameter): updating both would apply every step twice, or one would overwrite the other.
    # A dense tensor (its elements fill one block of memory, in any order of dimensions) is keyed
    # by that block; another layout (a strided view) by its exact view.
    if hasattr(p, "to_local"):  # a DTensor (FSDP2): data_ptr() is 0, its memory is the local shard
        p = p.to_local()
    if p.numel() == 0:
        return None
    expect = 1
    for stride, size in sorted((st, sz) for sz, st in zip(p.shape, p.stride()) if sz != 1):
        if stride != expect:
            return (p.device, p.data_ptr(), tuple(p.shape), p.stride(), p.dtype)
        expect *= size
    return (p.device, p.data_ptr(), p.numel() * p.element_size())


def check_new_group(
    groups: Sequence[dict[str, Any]], params: list[torch.Tensor], index: dict[str, Any] | None = None
) -> None:
    """Check the parameters of a group about to be added as group ``len(groups)``: each one
    usable, and none already present (in this group, an earlier one, or as the same memory).

    ``index``: a dict the caller keeps between calls, so that adding groups one by one is not
    quadratic; rebuilt whenever it does not cover exactly the groups in ``groups``."""
    gi = len(groups)
    index = {} if index is None else index
    if index.get("groups") != gi:
        # (group, index) of every parameter so far; names are formatted only for an error
        index.clear()
        index.update(seen={}, memory={}, groups=0)
        for gj, group in enumerate(groups):
            _index_params(index, gj, group["params"])
        index["groups"] = gi
    seen, memory = index["seen"], index["memory"]

    def name_of(place: tuple[int, int]) -> str:
        gj, j = place
        return where(gj, j, (groups[gj]["params"] if gj < gi else params)[j])

    new_seen: dict[int, tuple[int, int]] = {}
    new_memory: dict[tuple, tuple[int, int]] = {}
    for i, p in enumerate(params):
        check_param(p, gi, i)
        if not (p.is_leaf or p.retains_grad):
            raise ValueError(
                f"{where(gi, i, p)} is not a leaf tensor (it is computed from other tensors): an optimizer "
                "updates leaves, e.g. a model's nn.Parameters"
            )
        place = seen.get(id(p), new_seen.get(id(p)))
        if place is not None:
            raise ValueError(
                f"{where(gi, i, p)} is the same tensor as {name_of(place)}: a tensor may appear only once "
                "across all param groups (it would be updated twice per step)"
            )
        key = _memory_key(p)
        place = None if key is None else memory.get(key, new_memory.get(key))
        if place is not None:
            raise ValueError(
                f"{where(gi, i, p)} shares its memory with {name_of(place)}: the same data may appear only "
                "once across all param groups (it would be updated twice per step)"
            )
        new_seen[id(p)] = (gi, i)
        if key is not None:
            new_memory[key] = (gi, i)
    _index_params(index, gi, params)


def _index_params(index: dict[str, Any], gi: int, params: Sequence[torch.Tensor]) -> None:
    for j, q in enumerate(params):
        index["seen"][id(q)] = (gi, j)
        key = _memory_key(q)
        if key is not None:
            index["memory"][key] = (gi, j)
    index["groups"] = gi + 1


def check_grad(p: torch.Tensor, g: torch.Tensor, gi: int, i: int) -> None:
    """Refuse a gradient the update cannot use as is: sparse, or a shape, device or dtype that
    does not match its parameter."""
    # the common case in a few attribute reads; the name is only built for an error
    expected = getattr(p, "grad_dtype", p.dtype)
    if (
        g.layout == torch.strided
        and g.shape == p.shape
        and g.device == p.device
        and g.is_complex() == p.is_complex()
        and (g.is_floating_point() or g.is_complex())
        and (expected is None or g.dtype == expected)
    ):
        return
    name = where(gi, i, p)
    if g.layout != torch.strided:
        raise TypeError(
            f"{name} has a sparse gradient (layout {g.layout}): Lion needs dense gradients "
            "(e.g. nn.Embedding(..., sparse=False))"
        )
    if g.shape != p.shape:
        raise ValueError(f"{name}: gradient shape {tuple(g.shape)} does not match the parameter's {tuple(p.shape)}")
    if g.device != p.device:
        raise ValueError(f"{name}: gradient is on {g.device}, the parameter on {p.device}")
    if p.is_complex() != g.is_complex() or not (g.is_floating_point() or g.is_complex()):
        raise TypeError(f"{name}: gradient dtype {g.dtype} cannot update a parameter of dtype {p.dtype}")
    # torch's own contract: a gradient has the parameter's dtype unless `p.grad_dtype` says
    # otherwise (None allows any dtype, e.g. fp32 gradients for bf16 weights).
    if expected is not None and g.dtype != expected:
        raise TypeError(
            f"{name}: gradient dtype {g.dtype} differs from the parameter's gradient dtype {expected} "
            "(set p.grad_dtype to allow another gradient dtype)"
        )


def check_state(state: dict[str, Any], p: torch.Tensor, gi: int, i: int) -> None:
    """Refuse existing state that no longer fits its parameter (e.g. ``p.data`` was resized or
    moved after the optimizer was built), before the kernels would fail on it half-way."""
    s1 = state.get("state1")
    if s1 is None:
        return
    like = as_real(p)
    qmap = state.get("qmap1")
    shape, blocks = state_layout(like, s1, qmap)
    if s1.shape == shape and s1.device == p.device and s1.is_contiguous():
        if s1.dtype != torch.uint8:
            return
        absmax = state.get("absmax1")
        if (
            absmax is not None and absmax.device == p.device and absmax.numel() in blocks
            and absmax.dtype == torch.float32 and absmax.is_contiguous() and _usable_map(qmap, p.device)
        ):
            return
    name = where(gi, i, p)
    if s1.shape != shape:
        raise ValueError(
            f"{name}: its optimizer state has shape {tuple(s1.shape)}, the parameter now has shape "
            f"{tuple(like.shape)} (was it resized after the optimizer was built? Rebuild the optimizer or load a "
            "matching state dict)"
        )
    if s1.device != p.device:
        raise ValueError(
            f"{name}: its optimizer state is on {s1.device}, the parameter now on {p.device} (move the optimizer "
            "state too, e.g. by loading opt.state_dict() again after moving the model)"
        )
    if not s1.is_contiguous():
        raise ValueError(f"{name}: its optimizer state 'state1' is not contiguous (was it replaced by hand?)")
    if s1.dtype == torch.uint8:
        absmax = state.get("absmax1")
        if absmax is None or absmax.numel() not in blocks or absmax.device != p.device:
            raise ValueError(
                f"{name}: its quantized optimizer state has no matching 'absmax1' ({blocks[-1]} block scales)"
            )
        if absmax.dtype != torch.float32 or not absmax.is_contiguous():
            raise ValueError(f"{name}: its 'absmax1' must be a contiguous float32 tensor, got {absmax.dtype}")
        if not _usable_map(qmap, p.device):
            got = f"{qmap.dtype} {tuple(qmap.shape)} on {qmap.device}" if isinstance(qmap, torch.Tensor) else repr(qmap)
            raise ValueError(
                f"{name}: its quantized optimizer state has no usable 'qmap1' (a float32 map of 256 values, or "
                f"lionkit's 4-bit one, on {p.device}); got {got}"
            )


def _usable_map(qmap: Any, device: torch.device) -> bool:
    return (
        isinstance(qmap, torch.Tensor) and qmap.dtype == torch.float32 and qmap.device == device
        and qmap.dim() == 1 and (qmap.numel() == 256 or quant4.is_map4(qmap))
    )


def state_layout(like: torch.Tensor, s1: torch.Tensor, qmap: Any) -> tuple[torch.Size, tuple[int, ...]]:
    """(shape of ``state1``, allowed numbers of scales) for the momentum of ``like``: fp32 or
    8-bit codes are shaped like it (8-bit: one scale per tensor or per block of 256); 4-bit codes
    (told apart by their 15-level map) are packed, with one scale per block of 32."""
    n = like.numel()
    if s1.dtype == torch.uint8 and quant4.is_map4(qmap):
        return torch.Size([quant4.packed_numel(n)]), (quant.num_blocks(n, quant4.BLOCK_SIZE),)
    return like.shape, (1, quant.num_blocks(n, quant.BLOCK_SIZE))


def nonfinite_params(grads: Sequence[torch.Tensor]) -> list[int]:
    """Indices of the gradients that hold NaN or +-inf.

    One reduction pass over each gradient (NaN propagates through min and max, so the extremes are
    finite exactly when every element is) and one host sync per device.
    """
    by_device: dict[torch.device, dict[torch.dtype, list[int]]] = defaultdict(lambda: defaultdict(list))
    for i, g in enumerate(grads):
        if g.numel():  # min/max of an empty tensor are undefined; it is finite anyway
            r = as_real(g)
            by_device[r.device][r.dtype].append(i)
    bad: list[int] = []
    for device, by_dtype in by_device.items():
        idx, flags = [], []
        fast = _cpu_all_finite() if device.type == "cpu" else None
        if fast is not None:
            # the C++ kernel's multi-tensor check: one parallel pass, no Python per tensor
            eligible = [i for ii in by_dtype.values() for i in ii if _fast_eligible(as_real(grads[i]))]
            if eligible:
                ok = fast([as_real(grads[i]) for i in eligible])
                bad += [i for i, finite in zip(eligible, ok) if not finite]
                taken = set(eligible)
                by_dtype = {dt: [i for i in ii if i not in taken] for dt, ii in by_dtype.items()}
                by_dtype = {dt: ii for dt, ii in by_dtype.items() if ii}
        for dtype_idx in by_dtype.values():
            tensors = [as_real(grads[i]) for i in dtype_idx]
            if tensors[0].device.type == "cpu":
                # min and max in one vectorised pass: ~10x faster than the inf-norm on CPU
                mins, maxs = zip(*(torch.aminmax(t) for t in tensors))
                flags.append(torch.stack(mins + maxs).isfinite().view(2, -1).all(dim=0))
            else:
                # max |g| of every tensor in one multi-tensor launch, in g's own dtype (no
                # overflow); foreach needs one dtype per call
                flags.append(torch.stack(torch._foreach_norm(tensors, float("inf"))).isfinite())
            idx += dtype_idx
        if not flags:
            continue
        finite = torch.cat(flags)
        if not bool(finite.all()):  # the one sync of the check
            bad += [idx[j] for j in (~finite).nonzero().flatten().tolist()]
    return sorted(bad)


_FAST_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _fast_eligible(t: torch.Tensor) -> bool:
    # plain dense tensors only: the kernel reads raw memory (no subclasses such as DTensor)
    return type(t) in (torch.Tensor, torch.nn.Parameter) and t.dtype in _FAST_DTYPES and t.is_contiguous()


def _cpu_all_finite() -> Optional[Callable[[Sequence[torch.Tensor]], list[bool]]]:
    """``kernels.compiled.all_finite`` (about 2x faster than ``aminmax`` per tensor, measured
    single-threaded) when the compiled CPU backend is in use in this process, else None.
    Only then: the check must never trigger a C++ build for a user who chose another backend
    (the module is imported only when that backend is constructed)."""
    compiled = sys.modules.get("lionkit.kernels.compiled")
    if compiled is None or not getattr(compiled, "available", lambda: False)():
        return None
    return getattr(compiled, "all_finite", None)


def describe_nonfinite(g: torch.Tensor) -> str:
    """'3 NaN, 1 +inf of 4096 elements' (only used to word an error)."""
    r = as_real(g)
    nan = int(r.isnan().sum())
    pinf = int((r == float("inf")).sum())
    ninf = int((r == float("-inf")).sum())
    parts = [f"{n} {what}" for n, what in ((nan, "NaN"), (pinf, "+inf"), (ninf, "-inf")) if n]
    return f"{', '.join(parts)} of {r.numel()} elements"


def all_params(groups: Iterable[dict[str, Any]]) -> Iterable[torch.Tensor]:
    """Every parameter of the groups, in order."""
    for group in groups:
        yield from group["params"]
