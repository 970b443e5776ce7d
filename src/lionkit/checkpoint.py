"""Optimizer checkpoints: reading lionkit, bitsandbytes (plain and nested layouts) and
lion-pytorch state dicts with every part validated before anything is committed, and an atomic
save helper.

lionkit's own ``state_dict()`` is bitsandbytes' plain layout: per parameter ``step`` (int),
``state1`` (fp32 momentum, or uint8 codes), for 8-bit ``absmax1`` (fp32 per block) and
``qmap1`` (the 256-value map), and ``gnorm_vec`` when percentile clipping is on.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

import torch

from . import clipping, config, quant

BNB_NESTED_KEY = "__bnb_optimizer_quant_state__"
_DROPPED_GROUP_KEYS = frozenset({"eps"})  # bitsandbytes' unused Lion eps
_DROPPED_STATE_KEYS = frozenset({"unorm_vec"})  # bitsandbytes' update-norm buffer (max_unorm, unused by Lion)


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


def nest_bnb(state_dict: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``state_dict`` in bitsandbytes >= 0.49.2's nested layout (tensors other than
    ``step`` moved under ``__bnb_optimizer_quant_state__``)."""
    out_state = {}
    for key, st in state_dict["state"].items():
        st = flatten_param_state(st)
        nested = {k: v for k, v in st.items() if k != "step"}
        out_state[key] = {"step": st.get("step", 0), BNB_NESTED_KEY: nested}
    return {"state": out_state, "param_groups": [dict(g) for g in state_dict["param_groups"]]}


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
    if s1.shape != p.shape:
        raise ValueError(f"{where}: momentum shape {tuple(s1.shape)} does not match parameter shape {tuple(p.shape)}")
    dev = p.device
    if s1.dtype == torch.uint8:
        if "absmax1" not in st:
            raise ValueError(f"{where}: 8-bit momentum (uint8 'state1') without its scales ('absmax1')")
        absmax = st["absmax1"]
        blocks = quant.num_blocks(p.numel(), quant.BLOCK_SIZE)
        if not isinstance(absmax, torch.Tensor) or not absmax.is_floating_point() or absmax.numel() not in (1, blocks):
            got = tuple(absmax.shape) if isinstance(absmax, torch.Tensor) else type(absmax).__name__
            raise ValueError(
                f"{where}: 'absmax1' must be a float tensor of {blocks} block scales (or 1 per-tensor scale), got {got}"
            )
        qmap = st.get("qmap1")
        if qmap is None:
            qmap = quant.dynamic_map()
        quant.validate_qmap(qmap, f"{where}: 'qmap1'")
        out["state1"] = s1.to(dev, copy=True)
        out["absmax1"] = absmax.to(dev, torch.float32, copy=True).reshape(-1)
        out["qmap1"] = qmap.to(dev, copy=True)
    elif s1.is_floating_point():
        out["state1"] = s1.to(dev, torch.float32, copy=True)
    else:
        raise ValueError(f"{where}: momentum dtype {s1.dtype} is neither float nor uint8")
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
    if len(saved_groups) != len(groups):
        raise ValueError(f"state dict has {len(saved_groups)} param groups, the optimizer has {len(groups)}")
    id_map: dict[Any, tuple[torch.Tensor, str]] = {}
    new_groups = []
    for gi, (group, saved) in enumerate(zip(groups, saved_groups)):
        if len(saved["params"]) != len(group["params"]):
            raise ValueError(
                f"param group {gi}: state dict has {len(saved['params'])} parameters, the optimizer has "
                f"{len(group['params'])}"
            )
        for i, (key, p) in enumerate(zip(saved["params"], group["params"])):
            id_map[key] = (p, f"parameter {i} of param group {gi} (shape {tuple(p.shape)})")
        upd = {k: v for k, v in saved.items() if k != "params" and k not in _DROPPED_GROUP_KEYS}
        if "betas" in upd:
            upd["betas"] = tuple(upd["betas"])
        for k, v in upd.items():
            if k in config.GROUP_KEYS or k in config.STATE_KEYS:
                try:
                    config.check(k, v)
                except ValueError as e:
                    raise ValueError(f"param group {gi} of the state dict: {e}") from None
        new_groups.append(upd)
    new_state: dict[torch.Tensor, dict[str, Any]] = {}
    for key, st in state_dict["state"].items():
        if key not in id_map:
            raise ValueError(f"state dict has state for parameter id {key!r}, which no saved param group lists")
        p, where = id_map[key]
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
