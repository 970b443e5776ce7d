"""The cached step plan: the common step without re-deriving what did not change.

A full ``step()`` checks every parameter, gradient, state tensor and setting, works out each
parameter's configuration, builds or converts state, and hands the kernels their tensors: for a
model with hundreds of tensors that Python costs 2-3 ms, 15-20% of a CPU step over 20M
parameters (``docs/benchmarks.md``). Once a step has gone through that path, almost all of it
is known for the next one; only the gradients (new tensors every step) and the learning rate
change. ``Plan`` keeps the rest, and a step uses it only after checking, in a few attribute reads
per parameter, that nothing it relies on moved:

* the same param groups, parameters (identity, data pointer, shape, dtype), settings other than ``lr``,
  and per-parameter overrides (``GlobalOptimManager`` version);
* every state dict (the optimizer's state holds the same entries, compared by identity), and
  the ``state1``/``absmax1`` tensors in it, the same objects with their data where it was
  (``share_memory_()`` or ``set_()`` moves it in place);
* every gradient present where it was, dense, contiguous, with the dtype, shape and device it had;
* the backend the optimizer's ``backend`` setting resolves to.

Anything else (a new or missing gradient, a replaced tensor, a loaded checkpoint, a changed
setting, a non-finite gradient) falls back to the full path, which raises its usual errors or
takes the step and builds a new plan. Stochastic rounding of bf16 parameters and 4-bit momentum
are planned when the kernel takes their keys (the compiled CPU backend): they are computed for
all parameters at once each step. Steps that need other per-step work per parameter are not
planned at all: gradient-norm and percentile clipping, DTensor, stochastic rounding or 4-bit
momentum on other backends, stochastic rounding of fp16 parameters,
complex or non-contiguous parameters, paged state, per-parameter overrides, and parameters at
different step counts in a group whose lr is a callable schedule. The result of a planned step is bit-identical to the full path's (tested).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Optional, Sequence

import numpy as np
import torch

from . import config, guards, rounding
from .kernels.base import Backend, Momentum, StepHyper
from .qstate import QuantizedState

_STRIDED = torch.strided
_MOMENTUM_STREAM = 4  # optimizer._MOMENTUM_STREAM: the 4-bit momentum's keys (derive_seed)


class Plan:
    """What a planned step needs, captured after a successful full step."""

    def __init__(
        self,
        opt: Any,
        items: Sequence[tuple[int, torch.Tensor, dict[str, Any], Momentum, StepHyper]],
        backend: Backend,
        device: torch.device,
    ) -> None:
        groups = opt.param_groups
        self.version = config.GlobalOptimManager.get_instance().version
        self.state_obj = opt.state
        self.plists = [g["params"] for g in groups]
        self.lens = [len(g["params"]) for g in groups]
        self.settings = [_settings(g) for g in groups]
        self.opt_settings = _opt_settings(opt)
        with_grad = {id(p) for _, p, _, _, _ in items}
        # per group, per parameter: whether it had a gradient
        self.had_grad = [[id(p) in with_grad for p in g["params"]] for g in groups]
        self.group_idx = [gi for gi, _, _, _, _ in items]
        self.params = [p for _, p, _, _, _ in items]
        self.states = [st for _, _, st, _, _ in items]
        self.s1 = [st["state1"] for st in self.states]
        self.absmax = [st.get("absmax1") for st in self.states]
        self.qmaps = [st.get("qmap1") for st in self.states]
        # where their data lives: a state tensor can move in place (share_memory_(), which
        # handing a state dict to another process does; set_()), and the compiled kernel's
        # tables hold these addresses
        self.s1_ptrs = [t.data_ptr() for t in self.s1]
        self.absmax_ptrs = [0 if t is None else t.data_ptr() for t in self.absmax]
        self.ptrs = [p.data_ptr() for p in self.params]
        self.shapes = [p.shape for p in self.params]
        self.pdtypes = [p.dtype for p in self.params]
        self.gdtypes = [p.grad.dtype for p in self.params]
        self.moms = [m for _, _, _, m, _ in items]
        # the full step's hyperparameters, one per group and stochastic-rounding flag (a group's
        # parameters share them: no overrides, clipping or 4-bit keys in a plan; the rounding
        # seeds, different per parameter and step, go to the kernel as keys instead); a planned
        # step changes only lr
        self.sr_flags = [hp.stochastic_rounding for _, _, _, _, hp in items]
        self.group_hyper = {(gi, hp.stochastic_rounding): replace(hp, seed=0, mseed=0) for gi, _, _, _, hp in items}
        self.steps = [st["step"] for st in self.states]  # each parameter's step count so far
        # the state dict's entries (parameter, its state dict), compared by identity each step:
        # one pass without hashing a tensor (Tensor.__hash__ is a Python call per parameter)
        self.state_items = list(opt.state.items())
        state_ok = all(opt.state.get(p) is st for p, st in zip(self.params, self.states))
        # a scheduled group's parameters share one step count (``eligible``): its lr's argument
        self.group_step = {gi: st for gi, st in zip(self.group_idx, self.steps)}
        self.backend = backend
        self.device = device
        self.active_groups = sorted(set(self.group_idx))
        prepare = getattr(backend, "prepare", None)
        self.prepared = prepare(self.params, self.gdtypes, self.moms) if prepare is not None else None
        # stochastic rounding of the weights and 4-bit momentum: each step's keys from (sr_seed,
        # step, parameter index), computed for all parameters at once; only a backend that takes
        # keys (the compiled one; bf16 parameters for the weights) can replay them
        self.sr_seed = opt.sr_seed if any(self.sr_flags) else None
        self.four = np.array([isinstance(m, QuantizedState) and m.bits == 4 for m in self.moms], dtype=bool)
        # the 4-bit map, read by the kernel through its address (an 8-bit map's tables are copies)
        self.map4 = [q if four else None for q, four in zip(self.qmaps, self.four)]
        self.map4_ptrs = [0 if q is None else q.data_ptr() for q in self.map4]
        self.m4_seed = (opt.sr_seed or 0) if self.four.any() else None
        self.usable = state_ok and (
            (self.sr_seed is None and self.m4_seed is None)
            or (
                self.prepared is not None
                and all(dt == torch.bfloat16 for dt, sr in zip(self.pdtypes, self.sr_flags) if sr)
            )
        )
        if self.sr_seed is not None or self.m4_seed is not None:
            sr_index = opt._sr_index()
            self.sr_idx = np.array([sr_index[id(p)] for p in self.params], dtype=np.uint64)
        self._hyper_key: Optional[tuple] = None
        self._hypers: list[StepHyper] = []

    def grads(self, opt: Any) -> Optional[tuple[list[torch.Tensor], Optional[list[int]]]]:
        """The gradients to use and, for the compiled kernel, their data pointers (else None),
        or None when anything the plan relies on has changed."""
        groups = opt.param_groups
        if (
            opt.state is not self.state_obj
            or len(groups) != len(self.plists)
            or config.GlobalOptimManager.get_instance().version != self.version
            or _opt_settings(opt) != self.opt_settings
        ):
            return None
        for g, plist, n, settings in zip(groups, self.plists, self.lens, self.settings):
            if g["params"] is not plist or len(plist) != n or not _same_settings(g, settings):
                return None
        state = opt.state
        if len(state) != len(self.state_items):
            return None
        for (key, val), (key0, val0) in zip(state.items(), self.state_items):
            if key is not key0 or val is not val0:  # an entry replaced, or removed and added again
                return None
        grads: list[torch.Tensor] = []
        append = grads.append
        # the compiled kernel's gradient pointers, read here while each gradient is in cache
        # (a second pass over them costs ~0.05 ms with cold caches)
        gptrs: Optional[list[int]] = [] if self.prepared is not None else None
        dev = self.device
        on_cpu = dev.type == "cpu"  # g.is_cpu: no device object per gradient
        k = 0
        params, states, s1, absmax, qmaps, ptrs, shapes, gdtypes, steps, pdtypes = (
            self.params, self.states, self.s1, self.absmax, self.qmaps, self.ptrs, self.shapes, self.gdtypes,
            self.steps, self.pdtypes,
        )
        s1_ptrs, absmax_ptrs, map4, map4_ptrs = self.s1_ptrs, self.absmax_ptrs, self.map4, self.map4_ptrs
        for plist, had_grad in zip(self.plists, self.had_grad):
            for p, had in zip(plist, had_grad):
                g = p.grad
                if g is None:
                    if had:
                        return None
                    continue
                if not had or p is not params[k]:
                    return None
                st = states[k]
                shape = shapes[k]
                if (
                    p.data_ptr() != ptrs[k]
                    or p.shape != shape
                    or not p.is_contiguous()  # p.data = p.data.t(): same pointer, shape and dtype
                    or p.dtype is not pdtypes[k]
                    or g.layout != _STRIDED
                    or g.dtype is not gdtypes[k]
                    or g.shape != shape
                    or (not g.is_cpu if on_cpu else g.device != dev)
                    or not g.is_contiguous()
                    or st.get("state1") is not s1[k]
                    or st.get("absmax1") is not absmax[k]
                    or st.get("qmap1") is not qmaps[k]  # the kernel's tables came from this map
                    or st.get("step") != steps[k]
                    # moved memory: the compiled kernel holds these addresses, and a set_() to
                    # another size must meet the full path's checks (torch ops would fail mid-step)
                    or s1[k].data_ptr() != s1_ptrs[k]
                    or (absmax[k] is not None and absmax[k].data_ptr() != absmax_ptrs[k])
                    or (map4[k] is not None and map4[k].data_ptr() != map4_ptrs[k])
                ):
                    return None
                append(g)
                if gptrs is not None:
                    gptrs.append(g.data_ptr())
                k += 1
        return grads, gptrs

    def hypers(self, lrs: dict[int, float]) -> list[StepHyper]:
        """One StepHyper per planned parameter (shared per group) for the lrs of the active
        groups; the same list object while the lrs do not change."""
        key = tuple(lrs.values())
        if key != self._hyper_key:
            by_group = {gk: replace(hp, lr=lrs[gk[0]]) for gk, hp in self.group_hyper.items()}
            self._hypers = [by_group[gi, sr] for gi, sr in zip(self.group_idx, self.sr_flags)]
            self._hyper_key = key
        return self._hypers

    def advance(self) -> None:
        """Count the step taken: in every state dict and in the plan."""
        steps = self.steps
        for k, st in enumerate(self.states):
            steps[k] += 1
            st["step"] = steps[k]
        for gi in self.group_step:
            self.group_step[gi] += 1

    def all_finite(self, grads: list[torch.Tensor], gptrs: Optional[list[int]] = None) -> bool:
        """True if no gradient holds NaN or inf (``gptrs``: their data pointers, from ``grads``)."""
        if self.prepared is not None:
            return self.prepared.all_finite(grads, gptrs)
        with torch.no_grad():
            return not guards.nonfinite_params(grads)

    def run(self, grads: list[torch.Tensor], hypers: list[StepHyper], gptrs: Optional[list[int]] = None) -> None:
        """The kernels, on the planned tensors (``gptrs``: the gradients' data pointers, from ``grads``)."""
        if self.prepared is not None:
            keys = mkeys = None
            step = np.array(self.steps, dtype=np.uint64) + 1  # this step is step + 1 of each parameter
            if self.sr_seed is not None:
                keys = rounding.derive_keys32(self.sr_seed, step, self.sr_idx)
            if self.m4_seed is not None:  # as the optimizer's mseed: the low 32 bits
                seeds = rounding.derive_seeds(self.m4_seed, step, self.sr_idx, _MOMENTUM_STREAM)
                mkeys = np.where(self.four, seeds & np.uint64(0xFFFFFFFF), 0).astype(np.uint32)
            self.prepared.run(grads, hypers, keys, mkeys, gptrs)
        else:
            with torch.no_grad():  # the parameters are leaves that require grad
                self.backend.step_many(self.params, grads, self.moms, hypers)


def _settings(group: dict[str, Any]) -> dict[str, Any]:
    """A group's settings other than its parameters and learning rate (a list, e.g. betas, as a
    copy: a change made inside it must show)."""
    return {k: list(v) if isinstance(v, list) else v for k, v in group.items() if k != "params" and k != "lr"}


def _opt_settings(opt: Any) -> tuple:
    """The optimizer's own settings that a plan depends on (attributes a user may set between
    steps; an eligible plan has no global clipping and no paging, so setting either ends it)."""
    return (opt.grad_clip_norm, opt.is_paged, opt.stochastic_rounding, opt.sr_seed, opt.nonfinite)


def _same_settings(group: dict[str, Any], settings: dict[str, Any]) -> bool:
    """Whether ``group`` still has ``settings`` (identity first; any value that cannot be
    compared plainly, e.g. a tensor someone put into the group, counts as changed)."""
    if len(group) - ("params" in group) - ("lr" in group) != len(settings):
        return False
    for key, old in settings.items():
        new = group.get(key, _MISSING)
        if new is old:
            continue
        if isinstance(new, torch.Tensor) or isinstance(old, torch.Tensor):
            return False
        try:
            if new != old:
                return False
        except Exception:
            return False
    return True


_MISSING = object()

def eligible(opt: Any, plans: Sequence[tuple], moms: Sequence[Momentum]) -> bool:
    """Whether a full step just taken (its ``plans`` rows and momenta) can be replayed by a Plan."""
    if opt.grad_clip_norm is not None or opt.is_paged or not plans or len(moms) != len(plans):
        return False
    device = plans[0][2].device
    scheduled_step: dict[int, int] = {}  # group -> the step count its parameters share
    for (gi, group, p, cfg, p_step, *_), m in zip(plans, moms):
        if opt._lr_schedules[gi] is not None and scheduled_step.setdefault(gi, p_step) != p_step:
            return False
        if (
            cfg is not group  # per-parameter overrides
            or cfg["percentile_clipping"] < 100
            or type(p) not in (torch.Tensor, torch.nn.Parameter)
            or p.is_complex()
            or not p.is_contiguous()
            or p.device != device
            or p.grad is None
            or not p.grad.is_contiguous()
            # an inf in a one-scale 8-bit momentum needs the full path's NaN fix-up
            or (opt.nonfinite == "propagate" and isinstance(m, QuantizedState) and m.block_size is None)
        ):
            return False
    return True
