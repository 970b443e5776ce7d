"""Optimizer checkpoints: reading lionkit, bitsandbytes (plain and nested layouts) and
lion-pytorch state dicts with every part validated before anything is committed, and an atomic
save helper.

lionkit's own ``state_dict()`` is bitsandbytes' plain layout: per parameter ``step`` (int),
``state1`` (fp32 momentum, or uint8 codes), for 8-bit ``absmax1`` (fp32 per block) and
``qmap1`` (the 256-value map), and ``gnorm_vec`` when percentile clipping is on. 4-bit momentum
(lionkit only) keeps the same keys: ``state1`` packed (two codes per byte, flat), ``absmax1``
one scale per 32 elements, ``qmap1`` the 15-level map, by whose size it is recognised.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

import torch

from . import clipping, config, guards, quant, quant4

BNB_NESTED_KEY = "__bnb_optimizer_quant_state__"
_DROPPED_GROUP_KEYS = frozenset({"eps"})  # bitsandbytes' unused Lion eps
_DROPPED_STATE_KEYS = frozenset({"unorm_vec"})  # bitsandbytes' update-norm buffer (max_unorm, unused by Lion)


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read (missing, truncated, corrupted, not a checkpoint)."""


def flatten_param_state(st: dict[str, Any]) -> dict[str, Any]:
    """Undo bitsandbytes' nesting of tensors under ``__bnb_optimizer_quant_state__``."""
    if BNB_NESTED_KEY not in st:
        return dict(st)
    nested = st[BNB_NESTED_KEY]
    if not isinstance(nested, dict):
        raise ValueError(f"{BNB_NESTED_KEY} must be a dict, got {type(nested).__name__}")
    out = {k: v for k, v in st.items() if k != BNB_NESTED_KEY}
    out.update(nested)
    return out


def to_bitsandbytes(state_dict: dict[str, Any]) -> dict[str, Any]:
    """A copy of a lionkit ``state_dict`` that bitsandbytes' Lion/Lion8bit loads: its nested
    layout (bnb >= 0.49.2; tensors other than ``step`` under ``__bnb_optimizer_quant_state__``)
    and the ``eps`` its param groups must carry. The tensors are shared, not copied."""
    out_state = {}
    for key, st in state_dict["state"].items():
        if isinstance(st, dict) and not st:
            continue  # no state yet
        st = flatten_param_state(st)
        if quant4.is_map4(st.get("qmap1")):
            raise ValueError(
                f"parameter id {key!r} has 4-bit momentum, which bitsandbytes cannot load; load the state dict "
                "into a lionkit optimizer with optim_bits=8 (it converts), then export that one"
            )
        nested = {k: v for k, v in st.items() if k != "step"}
        out_state[key] = {"step": st.get("step", 0), BNB_NESTED_KEY: nested}
    groups = [{**g, "eps": g.get("eps", 0.0)} for g in state_dict["param_groups"]]
    return {"state": out_state, "param_groups": groups}


def _to_int_step(value: Any, where: str) -> int:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{where}: 'step' must be a scalar, got shape {tuple(value.shape)}")
        value = value.item()
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{where}: 'step' must be an integer >= 0, got {value!r}")
    return value


def parse_param_state(st: Any, p: torch.Tensor, where: str) -> dict[str, Any]:
    """Validate one parameter's saved state against ``p`` and return a fresh copy on p's device."""
    if not isinstance(st, dict):
        raise ValueError(f"{where}: state must be a dict, got {type(st).__name__}")
    st = flatten_param_state(st)
    if "exp_avg" in st and "state1" not in st:  # lion-pytorch's name for the momentum
        st["state1"] = st.pop("exp_avg")
    out: dict[str, Any] = {"step": _to_int_step(st.get("step", 0), where)}
    if "state1" not in st:
        raise ValueError(f"{where}: state has no momentum ('state1')")
    s1 = st["state1"]
    if not isinstance(s1, torch.Tensor):
        raise ValueError(f"{where}: 'state1' must be a tensor, got {type(s1).__name__}")
    for key in ("state1", "absmax1", "qmap1", "gnorm_vec"):
        t = st.get(key)
        if isinstance(t, torch.Tensor) and (t.is_meta or t.layout != torch.strided):
            kind = "on the meta device (no data)" if t.is_meta else f"of layout {t.layout}"
            raise ValueError(f"{where}: '{key}' is a tensor {kind}; a checkpoint holds dense tensors with data")
    like = guards.as_real(p)  # a complex parameter's state is that of its real view
    qmap = st.get("qmap1")
    four = quant4.is_map4(qmap)
    if s1.dtype != torch.uint8 and not s1.is_floating_point():  # before the shape: the dtype is the fault
        raise ValueError(f"{where}: momentum dtype {s1.dtype} is neither float nor uint8")
    shape, blocks = guards.state_layout(like, s1, qmap)
    if s1.shape != shape:
        if four and s1.dtype == torch.uint8:
            msg = (f"4-bit codes (packed two per byte) of shape {tuple(s1.shape)}, expected {tuple(shape)} for the "
                   f"parameter's {like.numel()} elements")
        else:
            msg = f"momentum shape {tuple(s1.shape)} does not match parameter shape {tuple(like.shape)}"
            if s1.dtype == torch.uint8 and qmap is None and s1.numel() == quant4.packed_numel(like.numel()):
                msg += " (packed 4-bit codes? their map 'qmap1' is missing)"
        raise ValueError(f"{where}: {msg}")
    dev = p.device
    # Copies are contiguous whatever the saved strides: the kernels work on flat memory.
    contiguous = torch.contiguous_format
    if s1.dtype == torch.uint8:
        bits = 4 if four else 8
        if "absmax1" not in st and "max1" in st:
            raise ValueError(
                f"{where}: bitsandbytes' per-tensor 8-bit state ('max1', from block_wise=False in bitsandbytes "
                "<= 0.49) cannot be loaded: its codes were written with one scale and are read with another, so "
                "the momentum it holds is not defined. Save it from bitsandbytes with block_wise=True, or leave "
                "this parameter's state out of the dict to restart its momentum from zero"
            )
        if "absmax1" not in st:
            raise ValueError(f"{where}: {bits}-bit momentum (uint8 'state1') without its scales ('absmax1')")
        absmax = st["absmax1"]
        if not isinstance(absmax, torch.Tensor) or not absmax.is_floating_point() or absmax.numel() not in blocks:
            got = tuple(absmax.shape) if isinstance(absmax, torch.Tensor) else type(absmax).__name__
            per_tensor = " (or 1 per-tensor scale)" if not four else ""
            raise ValueError(
                f"{where}: 'absmax1' must be a float tensor of {blocks[-1]} block scales{per_tensor}, got {got}"
            )
        if bool((absmax < 0).any()):
            # a scale is a maximum of absolute values; a negative one would flip every sign
            raise ValueError(f"{where}: 'absmax1' holds negative scales (the checkpoint is damaged)")
        if qmap is None:
            qmap = quant.dynamic_map()
        if four:
            quant4.validate_map4(qmap, f"{where}: 'qmap1'")
            # 15 levels: codes 0..14 (code 15 is never written; a kernel would read past the map)
            bad = int(((s1 & 15) == 15).sum()) + int(((s1 >> 4) == 15).sum())
            if bad:
                raise ValueError(
                    f"{where}: 4-bit 'state1' holds code 15 in {bad} place(s); the map has 15 levels (codes 0..14): "
                    "the checkpoint is damaged"
                )
        else:
            quant.validate_qmap(qmap, f"{where}: 'qmap1'")
        out["state1"] = s1.to(dev, copy=True, memory_format=contiguous)
        out["absmax1"] = absmax.to(dev, torch.float32, copy=True).reshape(-1)
        out["qmap1"] = qmap.to(dev, copy=True)
    elif s1.is_floating_point():
        out["state1"] = s1.to(dev, torch.float32, copy=True, memory_format=contiguous)
    else:  # refused above
        raise AssertionError(s1.dtype)
    if "gnorm_vec" in st:
        gv = st["gnorm_vec"]
        if not isinstance(gv, torch.Tensor) or gv.numel() != clipping.GNORM_HISTORY:
            raise ValueError(f"{where}: 'gnorm_vec' must hold {clipping.GNORM_HISTORY} values")
        out["gnorm_vec"] = gv.to(dev, torch.float32, copy=True).reshape(-1)
    for k, v in st.items():
        if k not in out and k not in _DROPPED_STATE_KEYS and k not in ("absmax1", "qmap1"):
            out[k] = v.to(dev, copy=True) if isinstance(v, torch.Tensor) else v
    return out


def parse_state_dict(
    groups: list[dict[str, Any]], state_dict: Any
) -> tuple[list[dict[str, Any]], dict[torch.Tensor, dict[str, Any]]]:
    """Check ``state_dict`` against the optimizer's ``groups``; return (the group settings to
    apply, the new per-parameter state). Raises ValueError naming the first problem."""
    if not isinstance(state_dict, dict) or "state" not in state_dict or "param_groups" not in state_dict:
        raise ValueError("not an optimizer state dict: expected a dict with 'state' and 'param_groups'")
    saved_groups = state_dict["param_groups"]
    if not isinstance(saved_groups, (list, tuple)):
        raise ValueError(f"state dict 'param_groups' must be a list, got {type(saved_groups).__name__}")
    if not isinstance(state_dict["state"], dict):
        raise ValueError(f"state dict 'state' must be a dict, got {type(state_dict['state']).__name__}")
    if len(saved_groups) != len(groups):
        raise ValueError(f"state dict has {len(saved_groups)} param groups, the optimizer has {len(groups)}")
    id_map: dict[Any, tuple[torch.Tensor, str]] = {}
    new_groups = []
    for gi, (group, saved) in enumerate(zip(groups, saved_groups)):
        if not isinstance(saved, dict) or not isinstance(saved.get("params"), (list, tuple)):
            raise ValueError(f"param group {gi} of the state dict must be a dict with a 'params' list")
        if len(saved["params"]) != len(group["params"]):
            raise ValueError(
                f"param group {gi}: state dict has {len(saved['params'])} parameters, the optimizer has "
                f"{len(group['params'])}"
            )
        for i, (key, p) in enumerate(zip(saved["params"], group["params"])):
            if key in id_map:
                raise ValueError(f"state dict lists parameter id {key!r} twice (again in param group {gi})")
            id_map[key] = (p, f"parameter {i} of param group {gi} (shape {tuple(p.shape)})")
        upd = {k: v for k, v in saved.items() if k != "params" and k not in _DROPPED_GROUP_KEYS}
        for k, v in upd.items():
            if k in config.GROUP_KEYS or k in config.STATE_KEYS:
                try:
                    config.check(k, v)
                except ValueError as e:
                    raise ValueError(f"param group {gi} of the state dict: {e}") from None
        if "betas" in upd:
            upd["betas"] = tuple(upd["betas"])
        # The optimizer's own storage settings win over the checkpoint's (its state is converted
        # to them): that is how an 8-bit checkpoint loads into a 32-bit optimizer.
        upd = {k: v for k, v in upd.items() if k not in config.STATE_KEYS}
        new_groups.append(upd)
    new_state: dict[torch.Tensor, dict[str, Any]] = {}
    for key, st in state_dict["state"].items():
        if key not in id_map:
            raise ValueError(f"state dict has state for parameter id {key!r}, which no saved param group lists")
        p, where = id_map[key]
        if isinstance(st, dict) and not st:
            continue  # an empty entry: no state yet (reading opt.state[p] of a torch optimizer adds one)
        new_state[p] = parse_param_state(st, p, where)
    return new_groups, new_state


def save_checkpoint(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` that never leaves a half-written file in place of the last good one:
    write a temporary file beside ``path``, fsync it, rename it over ``path``, fsync the folder."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-" + os.path.basename(path) + "-", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    if hasattr(os, "O_DIRECTORY"):
        dfd = os.open(folder, os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def load_checkpoint(
    path: str | os.PathLike, map_location: Any = "cpu", *, weights_only: bool = True
) -> Any:
    """``torch.load`` for files written by ``save_checkpoint``, with a clear error.

    A missing, truncated or corrupted file raises ``CheckpointError`` (a ``ValueError``) naming
    the file and what went wrong, instead of a zip-reader traceback. ``weights_only=True``
    (the default) is safe for untrusted files and enough for lionkit's state dicts.

    Example::

        lionkit.save_checkpoint({"model": model.state_dict(), "opt": opt.state_dict()}, "ckpt.pt")
        ckpt = lionkit.load_checkpoint("ckpt.pt")
        model.load_state_dict(ckpt["model"]); opt.load_state_dict(ckpt["opt"])
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist")
    size = os.path.getsize(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=weights_only)
    except Exception as e:
        first_line = str(e).splitlines()[0] if str(e) else ""
        if weights_only and type(e).__name__ == "UnpicklingError" and "weights_only" in str(e):
            hint = "it holds objects other than tensors and plain containers; pass weights_only=False if you trust it"
        else:
            # save_checkpoint never leaves such a file in place of a good one
            hint = "the file is truncated or corrupted (written some other way, or damaged after saving)"
        raise CheckpointError(
            f"cannot read checkpoint {path!r} ({size} bytes): {hint}. {type(e).__name__}: {first_line}"
        ) from e
