"""The private base of every lionkit PyTorch optimizer: validation, lazily built state,
per-parameter configuration, clipping, and one dispatch to the update kernels.

The public classes in ``lion.py`` only fix defaults (``optim_bits``, ``is_paged``).
"""

from __future__ import annotations

import functools
import operator
import warnings
from collections import defaultdict
from typing import Any, Callable, Iterable, Optional, Union

import torch
from torch.optim import optimizer as _torch_optimizer

from . import checkpoint, clipping, config, distributed, fastpath, guards, kernels, paging, quant, quant4, rounding
from .kernels.base import Momentum, StepHyper
from .kernels import sr_adapter
from .qstate import QuantizedState

ParamsT = Union[Iterable[torch.Tensor], Iterable[dict[str, Any]]]
LRType = Union[float, torch.Tensor, Callable[[int], float]]


def _step_hooks(func: Callable[..., Any]) -> Callable[..., Any]:
    """``step`` wrapped as ``torch.optim.Optimizer`` wraps every optimizer's step (step pre- and
    post-hooks, global and per-optimizer, and a profiler range named after the class), except
    that the profiler range is entered only while a profiler runs: entering one is a dispatcher
    call that costs ~0.2 ms per step once a 20M-parameter step has evicted the caches (measured
    on the 2-core machine of docs/benchmarks.md). With any hook registered or a profiler on,
    torch's own wrapper runs, unchanged. ``hooked`` tells torch not to wrap it again.

    torch.compile does not trace into it (``torch.compiler.disable``): a compiled function that
    calls ``opt.step()`` runs the step as it is, with its fused kernel (called through pointers,
    which the compiler could not trace), as a graph break."""
    wrapped = _not_traced(torch.optim.Optimizer.profile_hook_step(func))
    names = ("_global_optimizer_pre_hooks", "_global_optimizer_post_hooks")
    tables = [getattr(_torch_optimizer, name, None) for name in names]
    if any(t is None for t in tables) or not hasattr(torch.autograd, "_profiler_enabled"):
        wrapped.hooked = True  # a torch without these internals: its wrapper, always
        return wrapped
    pre, post = tables
    profiling = torch.autograd._profiler_enabled

    @functools.wraps(func)
    def step(*args: Any, **kwargs: Any) -> Any:
        self = args[0]
        if pre or post or self._optimizer_step_pre_hooks or self._optimizer_step_post_hooks or profiling():
            return wrapped(*args, **kwargs)
        out = func(*args, **kwargs)
        self._optimizer_step_code()
        return out

    step = _not_traced(step)
    step.hooked = True
    return step


def _not_traced(fn: Callable[..., Any]) -> Callable[..., Any]:
    # torch._disable_dynamo imports the compiler on the first call, not now (importing it costs
    # ~1.7 s, which `import lionkit` would otherwise pay); torch.optim uses it the same way
    disable = getattr(torch, "_disable_dynamo", None)
    if disable is None:
        disable = getattr(getattr(torch, "compiler", None), "disable", None)
    return disable(fn) if disable is not None else fn


_MOMENTUM_STREAM = fastpath._MOMENTUM_STREAM  # separates the 4-bit momentum's random numbers from the weights


class _LionBase(torch.optim.Optimizer):
    """Lion with 32- or 8-bit momentum; see ``lionkit.Lion`` for the full documentation."""

    def __init__(
        self,
        params: ParamsT,
        lr: LRType = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        optim_bits: int = 32,
        args: Any = None,
        min_8bit_size: int = 4096,
        percentile_clipping: int = 100,
        block_wise: bool = True,
        is_paged: bool = False,
        *,
        grad_clip_norm: Optional[float] = None,
        grad_clip_value: Optional[float] = None,
        backend: str = "auto",
        nonfinite: str = "raise",
        stochastic_rounding: bool = False,
        sr_seed: Optional[int] = None,
    ) -> None:
        config.check_lr(lr)
        config.check_betas(betas)
        config.check_nonneg("weight_decay", weight_decay)
        config.check_clip_value(grad_clip_value)
        _check_own_settings(grad_clip_norm, is_paged, nonfinite, stochastic_rounding, sr_seed)
        if backend not in kernels.BACKEND_NAMES:
            raise ValueError(f"Invalid backend: {backend!r} (must be one of {', '.join(kernels.BACKEND_NAMES)})")
        state_cfg = config.state_config_from_args(
            args,
            optim_bits=optim_bits,
            min_8bit_size=min_8bit_size,
            percentile_clipping=percentile_clipping,
            block_wise=block_wise,
            skip_zeros=False,
            max_unorm=0.0,
        )
        for key, value in state_cfg.items():
            state_cfg[key] = config.checked(key, value)
        state_cfg.pop("max_unorm")
        config.check_bits_layout(state_cfg)

        self._default_schedule: Optional[Callable[[int], float]] = lr if callable(lr) else None
        self._lr_schedules: list[Optional[Callable[[int], float]]] = []
        self._sched_owners: list[dict[str, Any]] = []  # the group each schedule belongs to (same order)
        # per scheduled group: the lr lionkit last wrote into it, to notice a value set from
        # outside (by hand, or by a torch lr_scheduler), which the schedule overrides
        self._sched_lr: dict[int, Any] = {}
        self.grad_clip_norm = None if grad_clip_norm is None else float(grad_clip_norm)
        self.backend = backend
        self.is_paged = is_paged
        self._qmaps: dict[tuple[torch.device, int], torch.Tensor] = {}
        self._override_cache: dict[int, tuple[int, dict[str, Any]]] = {}
        self.backends_used: dict[str, str] = {}  # device -> backend name, filled at each step
        self.nonfinite = nonfinite
        self.stochastic_rounding = stochastic_rounding
        self.sr_seed = sr_seed  # with the step count and the parameter's place: every SR draw
        if stochastic_rounding and sr_seed is None:
            self._draw_sr_seed()
        self.skipped_steps = 0  # steps skipped under nonfinite="skip" (not saved in checkpoints)
        self._plan: Optional[fastpath.Plan] = None  # the cached step plan (fastpath.py)
        self.torn: Optional[str] = None  # why the last step stopped part-way; None when consistent

        defaults = dict(
            lr=self._lr_value(lr, 0),
            betas=tuple(config.plain("betas", betas)),
            weight_decay=config.plain("weight_decay", weight_decay),
            grad_clip_value=config.plain("grad_clip_value", grad_clip_value),
            **state_cfg,
        )
        super().__init__(params, defaults)
        self.register_state_dict_pre_hook(_refuse_if_torn)
        self.register_state_dict_pre_hook(_schedules_synced)
        self.register_state_dict_post_hook(_plain_groups)
        # FSDP2 (DTensor) parameters: save their state in a form that reshards (distributed.py)
        self.register_state_dict_post_hook(distributed.state_dict_post_hook)
        if is_paged:
            paging.warn_if_unpageable(p for g in self.param_groups for p in g["params"])

    # ------------------------------------------------------------------ groups and config
    @staticmethod
    def _lr_value(lr: LRType, step: int) -> float:
        if callable(lr):
            value = lr(step)
            value = value.item() if isinstance(value, torch.Tensor) else value
            try:
                config.check_lr(value)
            except ValueError as e:
                raise ValueError(f"Invalid learning rate from schedule at step {step}: {e}") from None
            return float(value)
        return lr.item() if isinstance(lr, torch.Tensor) else float(lr)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self._sync_schedules()
        gi = len(self.param_groups)  # the index the group will have
        if isinstance(param_group, dict) and "params" not in param_group:
            raise ValueError(f"param group {gi} has no 'params' entry (the tensors it holds)")
        # settings of the whole optimizer (grad_clip_norm, backend, ...) in a group are left there
        # unread: torch's ZeroRedundancyOptimizer puts its keyword arguments, which it also passes
        # to the constructor, into every group
        if isinstance(param_group, dict) and callable(param_group.get("lr")):
            schedule = param_group["lr"]
            param_group = {**param_group, "lr": self._lr_value(schedule, 0)}
        elif isinstance(param_group, dict) and "lr" not in param_group:
            schedule = self._default_schedule
        else:
            schedule = None
        if isinstance(param_group, dict) and "params" in param_group:
            params = guards.param_list(param_group["params"])
            param_group = {**param_group, "params": params}
            named = [isinstance(x, tuple) for x in params]
            if any(named):  # model.named_parameters(): (name, tensor) pairs, as torch >= 2.6 takes them
                if not all(named) or not all(len(x) == 2 and isinstance(x[0], str) for x in params):
                    raise ValueError(
                        f"param group {gi}: give every parameter as a tensor or every one as a "
                        "(name, tensor) pair (model.named_parameters()), not a mix"
                    )
                param_group["param_names"] = [name for name, _ in params]
                param_group["params"] = params = [t for _, t in params]
            # kept between calls: adding one group per parameter stays linear
            index = self.__dict__.setdefault("_group_index", {})
            guards.check_new_group(self.param_groups, param_group["params"], index)
        if isinstance(param_group, dict):
            plain = {}
            for key, value in param_group.items():
                if key in config.GROUP_KEYS or key in config.STATE_KEYS:
                    plain[key] = config.checked(key, value)
            if any(plain[k] is not param_group[k] for k in plain):
                param_group = {**param_group, **plain}
            try:  # the group's own values with the defaults it will take (optim_bits=4 per tensor)
                config.check_bits_layout({**self.defaults, **param_group})
            except ValueError as e:
                raise ValueError(f"param group {gi}: {e}") from None
        super().add_param_group(param_group)
        self._lr_schedules.append(schedule)
        self._sched_owners.append(self.param_groups[gi])
        if schedule is not None:
            self._sched_lr[gi] = self.param_groups[gi]["lr"]

    def _sync_schedules(self) -> None:
        """Keep each lr schedule with its group when ``param_groups`` was replaced from outside
        (Lightning's ``BaseFinetuning`` restores its groups by assigning a list of new dicts):
        a group keeps its schedule wherever it now stands, recognised as the same dict or by
        the same parameters; a group never seen has none, unless its lr is a callable, which
        becomes its schedule as in ``add_param_group``."""
        groups = self.param_groups
        owners = self.__dict__.get("_sched_owners")
        if owners is None:  # pickled by an older lionkit: the schedules were in the groups' order
            owners = self._sched_owners = list(groups[: len(self._lr_schedules)])
        unchanged = len(owners) == len(groups) and all(map(operator.is_, owners, groups))
        if unchanged and not any(callable(g.get("lr")) for g in groups):  # nor a callable set as an lr by hand
            return
        by_dict = {id(g): (g, i) for i, g in enumerate(owners)}
        # the old dicts keep their parameters alive, so these ids are not reused meanwhile; a
        # group without parameters has no key (several would share the empty one)
        by_params = {tuple(map(id, g["params"])): i for i, g in enumerate(owners) if g.get("params")}
        warned = self.__dict__.get("_sched_warned", set())
        schedules: list[Optional[Callable[[int], float]]] = []
        sched_lr: dict[int, Any] = {}
        now_warned: set[int] = set()
        for gi, group in enumerate(groups):
            if callable(group.get("lr")):
                schedule = group["lr"]
                group["lr"] = sched_lr[gi] = self._lr_value(schedule, 0)
                schedules.append(schedule)
                continue
            hit = by_dict.get(id(group))
            old = hit[1] if hit is not None and hit[0] is group else None
            if old is None and group.get("params"):
                old = by_params.get(tuple(map(id, group["params"])))
            schedule = None if old is None else self._lr_schedules[old]  # owners and schedules: one order
            if schedule is not None:
                written = self._sched_lr.get(old)
                sched_lr[gi] = written if written is not None else group["lr"]
                if old in warned:
                    now_warned.add(gi)
            schedules.append(schedule)
        self._lr_schedules, self._sched_lr, self._sched_owners = schedules, sched_lr, list(groups)
        self._sched_warned = now_warned  # warned once per group, wherever it now stands
        self.__dict__.pop("_group_index", None)  # add_param_group's duplicate check: rebuilt on use
        self._plan = None

    def _config(self, group: dict[str, Any], p: torch.Tensor) -> dict[str, Any]:
        """The group's settings with the global manager's overrides for ``p`` applied."""
        manager = config.GlobalOptimManager.get_instance()
        cached = self._override_cache.get(id(p))
        if cached is None or cached[0] != manager.version:
            cached = (manager.version, manager.overrides_for(p))
            self._override_cache[id(p)] = cached
        return {**group, **cached[1]} if cached[1] else group

    def _qmap(self, device: torch.device, bits: int = 8) -> torch.Tensor:
        """The map for ``bits``-bit momentum on ``device``, one tensor shared by all states."""
        key = (device, bits)
        if key not in self._qmaps:
            self._qmaps[key] = quant4.normal_map(device) if bits == 4 else quant.dynamic_map(device)
        return self._qmaps[key]

    # ------------------------------------------------------------------ state
    @staticmethod
    def momentum(state: dict[str, Any], p: torch.Tensor) -> Momentum:
        """The momentum of ``p`` as a kernel sees it: fp32 tensor or ``QuantizedState``."""
        s1 = state["state1"]
        if s1.dtype != torch.uint8:
            return s1
        absmax, qmap = state["absmax1"], state["qmap1"]
        numel = guards.as_real(p).numel()
        if quant4.is_map4(qmap):
            return QuantizedState(s1, absmax, qmap, quant4.BLOCK_SIZE, 4, numel)
        per_tensor = absmax.numel() == 1 and numel > quant.BLOCK_SIZE
        return QuantizedState(s1, absmax, qmap, None if per_tensor else quant.BLOCK_SIZE)

    @staticmethod
    def _format_of(m: Momentum) -> tuple[int, Optional[int]]:
        """(bits, block size) of a momentum as ``momentum`` returns it."""
        if isinstance(m, QuantizedState):
            return m.bits, m.block_size
        return 32, None

    def _wanted_format(self, cfg: dict[str, Any], p: torch.Tensor) -> tuple[int, Optional[int]]:
        """(bits, block size) the configuration asks for: 32 (block size None), 8 (256, or None
        for one scale per tensor) or 4 (32)."""
        numel = guards.as_real(p).numel()
        bits = cfg["optim_bits"] if numel >= cfg["min_8bit_size"] else 32
        if bits == 32:
            return 32, None
        if bits == 4:
            try:  # an override may have combined 4 bits with block_wise=False
                config.check_bits_layout(cfg)
            except ValueError as e:
                raise ValueError(f"{self._where(p)}: {e}") from None
            return 4, quant4.BLOCK_SIZE
        # a tensor of at most one block has the same layout either way: call it block-wise
        per_tensor = not cfg["block_wise"] and numel > quant.BLOCK_SIZE
        return 8, (None if per_tensor else quant.BLOCK_SIZE)

    def _where(self, p: torch.Tensor) -> str:
        """How an error names ``p`` (its place in the param groups, looked up)."""
        for gi, g in enumerate(self.param_groups):
            if any(q is p for q in g["params"]):
                return _name_of(gi, g, p)
        return f"a parameter of shape {tuple(p.shape)}"

    def _prepare_state(self, p: torch.Tensor, cfg: dict[str, Any]) -> dict[str, Any]:
        """Build the state of ``p`` lazily, or convert it when its configuration changed
        (an override after the first step, or a checkpoint of another bit width)."""
        state = self.state[p]
        bits, block_size = self._wanted_format(cfg, p)
        if distributed.is_dtensor(p):  # an FSDP2 shard: local state, global blocks and sizes
            if bits == 4:
                raise ValueError(
                    f"optim_bits=4 is not supported for DTensor (FSDP2) parameters ({self._where(p)}); "
                    "use optim_bits=8 for sharded parameters"
                )
            return distributed.prepare_state(self, p, cfg, bits == 8, block_size)
        like = guards.as_real(p)  # the state of a complex parameter is that of its real view
        if "state1" not in state:
            state["step"] = state.get("step", 0)
            self._store(state, like, None, bits, block_size)
        else:
            # Conversions put new tensors into `state` and never modify the old ones, so a step
            # that fails later can restore the state by restoring the dict (see `step`).
            current = self.momentum(state, p)
            if self._format_of(current) != (bits, block_size):
                m = current.dequantize() if isinstance(current, QuantizedState) else current
                self._store(state, like, m.reshape(-1), bits, block_size)
        return state

    def _store(
        self, state: dict[str, Any], p: torch.Tensor, m: Optional[torch.Tensor], bits: int, block_size: Optional[int]
    ) -> None:
        """Put momentum ``m`` (flat fp32; None = zeros) into ``state`` in the given format; new
        tensors only (rounding to nearest when converting, as ``quant`` and ``quant4`` do)."""
        paged = self.is_paged
        if bits == 32:
            s1 = paging.state_zeros(p, torch.float32, paged)
            if m is not None:
                s1.view(-1).copy_(m)
            state["state1"] = s1
            state.pop("absmax1", None)
            state.pop("qmap1", None)
            return
        old = state.get("qmap1")
        keep = old is not None and quant4.is_map4(old) == (bits == 4)  # a loaded map of this width
        qmap = old if keep else self._qmap(p.device, bits)
        if bits == 4:
            q = (QuantizedState.zeros4(p.numel(), p.device, qmap) if m is None
                 else QuantizedState.from_float4(m, qmap))
            codes = paging.state_zeros(p, torch.uint8, paged, shape=tuple(q.codes.shape))
        else:
            q = QuantizedState.zeros(p, block_size, qmap) if m is None else QuantizedState.from_float(
                m.view(p.shape), block_size, qmap)
            codes = paging.state_zeros(p, torch.uint8, paged)
        codes.copy_(q.codes)
        state["state1"], state["absmax1"], state["qmap1"] = codes, q.absmax, qmap

    def _draw_sr_seed(self) -> None:
        """``sr_seed`` for stochastic rounding asked for without one: drawn from torch's default
        generator, so torch.manual_seed(...) fixes the run."""
        self.sr_seed = int(torch.randint(0, 2**62, (), dtype=torch.int64).item())
        if distributed.world_size() > 1:
            warnings.warn(
                "lionkit: stochastic_rounding=True with sr_seed=None under torch.distributed: each rank draws "
                "its seed from its own torch generator, so DDP replicas round differently (and drift apart) "
                "unless every rank's generator is seeded alike. Pass the same sr_seed on every rank",
                stacklevel=guards.user_stacklevel(),
            )

    # ------------------------------------------------------------------ step
    def _check_inputs(self) -> list[tuple[int, dict[str, Any], torch.Tensor]]:
        """Every (group index, group, parameter) with a gradient, after checking parameters,
        gradients, existing state and group settings; raises naming the first problem."""
        work = []
        # the optimizer's own settings are attributes a user may set between steps too
        try:
            _check_own_settings(self.grad_clip_norm, self.is_paged, self.nonfinite, self.stochastic_rounding, self.sr_seed)
        except ValueError as e:
            raise ValueError(f"optimizer setting: {e}") from None
        if self.stochastic_rounding and self.sr_seed is None:  # switched on, or the seed cleared, since
            self._draw_sr_seed()
        for gi, group in enumerate(self.param_groups):
            for key in (*config.GROUP_KEYS, *config.STATE_KEYS):
                # settings may have been changed by hand or by a scheduler since the last step
                if key in group and not (key == "lr" and self._lr_schedules[gi] is not None):
                    try:
                        # a value set by hand (a numpy scalar, say) is kept as a plain one
                        value = config.checked(key, group[key])
                    except ValueError as e:
                        raise ValueError(f"param group {gi}: {e}") from None
                    if value is not group[key]:
                        group[key] = value
            try:
                config.check_bits_layout(group)
            except ValueError as e:
                raise ValueError(f"param group {gi}: {e}") from None
            for i, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                guards.check_param(p, gi, i)
                guards.check_grad(p, p.grad, gi, i)
                state = self.state.get(p)
                if distributed.is_dtensor(p):
                    distributed.check_grad(p, p.grad, guards.where(gi, i, p))
                    if state is not None:
                        distributed.check_state(state, p, guards.where(gi, i, p))
                elif state is not None:
                    guards.check_state(state, p, gi, i)
                work.append((gi, group, p))
        return work

    def _nonfinite_gate(self, work: list[tuple[int, dict[str, Any], torch.Tensor]]) -> bool:
        """Apply the ``nonfinite`` policy; True when this step must be skipped."""
        if self.nonfinite == "propagate":
            return False
        # with sharded (DTensor) gradients: over whole tensors, so every rank decides alike
        bad = distributed.nonfinite_params([p.grad for _, _, p in work])
        if not bad:
            return False
        if self.nonfinite == "skip":
            self.skipped_steps += 1
            return True
        gi, group, p = work[bad[0]]
        name = _name_of(gi, group, p)
        more = f" (and {len(bad) - 1} more parameters)" if len(bad) > 1 else ""
        raise guards.NonFiniteGradientError(
            f"non-finite gradient in {name}: {guards.describe_nonfinite(p.grad)}{more}. Nothing was updated. "
            "Pass nonfinite='skip' to skip such steps (counted in opt.skipped_steps), or use "
            "torch.amp.GradScaler, which skips them for mixed-precision training"
        )

    @_step_hooks
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        """Perform one optimization step; returns the closure's loss, if a closure is given.

        All-or-nothing: every input is checked and every scale computed before the first write;
        see ``docs/reliability.md``."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.torn is not None:
            raise RuntimeError(_torn_message(self.torn))
        self._sync_schedules()
        if self._sched_lr:
            self._warn_if_schedule_overridden()
        plan, self._plan = self._plan, None
        # the planned step writes through the kernels' pointers (or under no_grad in Plan.run)
        if plan is not None and self._planned_step(plan):
            self._plan = plan
            return loss
        with torch.no_grad():
            return self._full_step(loss)

    def _warn_if_schedule_overridden(self) -> None:
        """A group with an lr schedule (callable lr) whose ``lr`` was set from outside since
        lionkit wrote it: the schedule still decides, say so (once per group)."""
        warned = self.__dict__.setdefault("_sched_warned", set())
        for gi, written in self._sched_lr.items():
            lr = self.param_groups[gi]["lr"]
            if lr is not written and lr != written and gi not in warned:
                warned.add(gi)
                warnings.warn(
                    f"lionkit: param group {gi} has an lr schedule (a callable lr), which decides every step's "
                    f"lr; its 'lr' was set to {lr!r} from outside (by hand or by a torch.optim.lr_scheduler) and "
                    "is overridden. Use one or the other: a float lr with a torch scheduler, or the callable alone",
                    stacklevel=guards.user_stacklevel(),
                )

    def _exact_sq_norm(self, plans: list) -> Callable[[int], float]:
        """For global clipping: plan row i's squared gradient norm accumulated in fp64, where the
        fp32 one overflowed (rare: it copies the gradient to fp64). Refused, before any write,
        where fp64 is not at hand (a DTensor shard, MPS)."""

        def exact(i: int) -> float:
            gi, group, p = plans[i][:3]
            g = guards.as_real(p.grad)
            if distributed.is_dtensor(p) or g.device.type == "mps":
                name = _name_of(gi, group, p)
                raise ValueError(
                    f"{name}: its gradient's norm overflows fp32 (above ~1.8e19), which grad_clip_norm cannot "
                    "recompute here (a sharded or MPS gradient): scale the loss down"
                )
            return float(torch.linalg.vector_norm(g, 2, dtype=torch.float64).square())

        return exact

    def _full_step(self, loss: Any) -> Any:
        """The step through every check (``step`` without a usable plan); returns ``loss``."""
        # 1. Check; nothing is written until every parameter has passed.
        work = self._check_inputs()
        if not work or self._nonfinite_gate(work):
            return loss

        # 2. Everything the update needs, computed from the inputs without writing.
        plans = []
        dist_sq = distributed.sharded_sq_norms(self, work)  # whole-tensor norms of FSDP2 shards
        for gi, group, p in work:
            cfg = self._config(group, p)
            state = self.state.get(p, {})
            step = state.get("step", 0) + 1
            schedule = self._lr_schedules[gi]
            # update k uses schedule(k - 1), as in MLX
            lr = self._lr_value(schedule, step - 1) if schedule is not None else self._lr_value(cfg["lr"], 0)
            need_norm = cfg["percentile_clipping"] < 100 or self.grad_clip_norm is not None
            if distributed.is_dtensor(p):
                sq = dist_sq.get(id(p))
            else:
                sq = clipping.grad_sq_norm(guards.as_real(p.grad)) if need_norm else None
            ring, pscale = None, None
            if cfg["percentile_clipping"] < 100:
                ring_now = state.get("gnorm_vec")
                fresh = ring_now is None  # clipping's first step for p (maybe not p's first step)
                if fresh:
                    ring_now = torch.zeros(clipping.GNORM_HISTORY, dtype=torch.float32, device=p.device)
                ring, pscale = clipping.percentile_scale(ring_now, sq, step, cfg["percentile_clipping"], fresh)
            plans.append((gi, group, p, cfg, step, lr, sq, ring, pscale))

        gscale = 1.0
        if self.grad_clip_norm is not None:
            sqs = [plan[6] for plan in plans]
            pscales = [plan[8] if plan[8] is not None else 1.0 for plan in plans]
            gscale = clipping.global_norm_scale(sqs, pscales, self.grad_clip_norm, exact=self._exact_sq_norm(plans))

        hypers = []
        hyper_of: dict[tuple, StepHyper] = {}  # parameters with equal settings share one object
        sr_index = self._sr_index() if self.stochastic_rounding else None
        for gi, group, p, cfg, step, lr, sq, ring, pscale in plans:
            beta1, beta2 = cfg["betas"]
            scale = gscale * (float(pscale) if pscale is not None else 1.0)
            mseed = 0
            if self._wanted_format(cfg, p)[0] == 4:
                sr_index = self._sr_index() if sr_index is None else sr_index
                # the 4-bit momentum's rounding key; sr_seed None (no SR of the weights): fixed 0,
                # so 4-bit runs are reproducible without drawing from torch's generator
                mseed = rounding.derive_seed(self.sr_seed or 0, step, sr_index[id(p)], _MOMENTUM_STREAM) & 0xFFFFFFFF
            values = (
                lr,
                beta1,
                beta2,
                cfg["weight_decay"],
                scale,
                cfg["grad_clip_value"],
                cfg["skip_zeros"],
                self.stochastic_rounding and guards.as_real(p).dtype in rounding.LOW_PRECISION,
                # one seed per (optimizer, step, parameter): reproducible, and the same after a resume
                rounding.derive_seed(self.sr_seed, step, sr_index[id(p)]) if self.stochastic_rounding else 0,
                mseed,
            )
            hp = hyper_of.get(values)
            if hp is None:
                hp = hyper_of[values] = StepHyper(*values)
            hypers.append(hp)
        backends = {p.device: None for _, _, p in work}
        for device in backends:
            backends[device] = kernels.resolve(self.backend, device)

        # 3. Write. State creation or conversion puts new tensors into a parameter's state
        # dict, so until the first kernel runs, restoring the dicts undoes everything. After
        # that only an external failure (out of memory, a device error, an interrupt) can stop
        # the step; it is then marked torn and refuses to continue or be saved silently.
        saved_dicts = {p: (dict(st) if (st := self.state.get(p)) is not None else None) for _, _, p in work}
        kernels_started = False
        try:
            by_device: dict[torch.device, list] = defaultdict(list)
            plan_moms = []  # the momenta, for a step plan (fastpath.py)
            copies = []  # (parameter view, contiguous working copy) to write back
            dist_shared = []  # FSDP2: 8-bit blocks cut by shard boundaries, finished below
            for (gi, group, p, cfg, *_), hp in zip(plans, hypers):
                state = self._prepare_state(p, cfg)
                if distributed.is_dtensor(p):
                    items, shared = distributed.kernel_items(state, p, hp)
                    by_device[p.device].extend(items)
                    dist_shared.append(shared)
                    continue
                m = self.momentum(state, p)
                plan_moms.append(m)
                if self.is_paged and p.device.type == "cuda":
                    for t in (state["state1"],):
                        if t.numel() >= paging.PAGED_MIN_NUMEL:
                            paging.prefetch(t)
                # Kernels work on flat contiguous memory; a non-contiguous parameter (a
                # transposed or sliced view, channels_last) is updated through a copy that is
                # written back in place, so p.data is never replaced.
                pk, gk = guards.as_real(p), guards.as_real(p.grad)
                if not pk.is_contiguous():
                    copies.append((pk, pk.contiguous()))
                    pk = copies[-1][1]
                if not gk.is_contiguous():
                    gk = gk.contiguous()
                by_device[p.device].append((pk, gk, m, hp))

            kernels_started = True
            for device, items in by_device.items():
                backend = backends[device]
                self.backends_used[str(device)] = backend.name
                if not getattr(backend, "stochastic_rounding", False):
                    # a backend without stochastic rounding updates an fp32 copy that is then
                    # rounded stochastically (kernels/sr_adapter.py)
                    sr_items = [it for it in items if it[3].stochastic_rounding]
                    if sr_items:
                        items = [it for it in items if not it[3].stochastic_rounding]
                        sr_adapter.step_many(backend, *zip(*sr_items))
                        self.backends_used[str(device)] = f"{backend.name} (+ fp32 copy and stochastic rounding)"
                if not items:
                    continue
                ps, gs, ms, hps = zip(*items)
                backend.step_many(ps, gs, ms, hps)
                slow = getattr(backend, "fallback_count", 0)
                if slow:
                    self.backends_used[str(device)] += f" (+ torch for {slow} of {len(ps)} tensors)"
            for view, work_copy in copies:
                view.copy_(work_copy)
            distributed.finish(dist_shared)
            guards.mark_modified(
                [p for _, _, p, *_ in plans if getattr(backends[p.device], "writes_through_pointers", False)]
            )

            for gi, group, p, cfg, step, lr, sq, ring, pscale in plans:
                state = self.state[p]
                if self.nonfinite == "propagate" and "absmax1" in state and state["absmax1"].numel() == 1:
                    # An inf in a per-tensor 8-bit momentum cannot be stored: whatever the kernel
                    # did, the whole tensor decodes to NaN (as quant.block_absmax does per block),
                    # never to a flipped sign. Only "propagate" lets a non-finite value in.
                    absmax = state["absmax1"]
                    absmax.masked_fill_(absmax.isinf(), float("nan"))
                state["step"] = step
                if ring is not None:  # the ring is created by the first step that clips (fresh)
                    if "gnorm_vec" in state:
                        state["gnorm_vec"].copy_(ring)
                    else:
                        state["gnorm_vec"] = ring
                if self._lr_schedules[gi] is not None:
                    group["lr"] = self._sched_lr[gi] = lr  # visible, and what a checkpoint records
        except BaseException as e:
            if not kernels_started:
                for p, saved in saved_dicts.items():
                    if saved is None:
                        self.state.pop(p, None)
                    else:
                        self.state[p] = saved
            else:
                self.torn = f"{type(e).__name__}: {e}"
                if hasattr(e, "add_note"):
                    e.add_note(_torn_message(self.torn))
            raise
        if fastpath.eligible(self, plans, plan_moms):
            device = plans[0][2].device
            rows = [(gi, p, self.state[p], m, hp) for (gi, _, p, *_), m, hp in zip(plans, plan_moms, hypers)]
            plan = fastpath.Plan(self, rows, backends[device], device)
            self._plan = plan if plan.usable else None
        return loss

    def _planned_step(self, plan: fastpath.Plan) -> bool:
        """Take this step with the cached plan; False (nothing written) when the plan no longer
        fits or anything needs the full path (which then raises or decides as usual)."""
        if kernels.resolve(self.backend, plan.device) is not plan.backend:  # opt.backend changed
            return False
        found = plan.grads(self)
        if found is None:
            return False
        grads, gptrs = found
        if self.nonfinite != "propagate" and not plan.all_finite(grads, gptrs):
            return False  # the full path raises or skips, naming the parameter
        lrs = {}
        for gi in plan.active_groups:
            schedule = self._lr_schedules[gi]
            if schedule is not None:
                # update k uses schedule(k - 1); raises before any write, as the full path does
                lrs[gi] = self._lr_value(schedule, plan.group_step[gi])
                continue
            lr = self.param_groups[gi]["lr"]
            try:
                config.check_lr(lr)
            except ValueError:
                return False
            lrs[gi] = self._lr_value(lr, 0)
        hypers = plan.hypers(lrs)
        try:
            plan.run(grads, hypers, gptrs)
            if getattr(plan.backend, "writes_through_pointers", False):  # torch ops count themselves
                guards.mark_modified(plan.params)
        except BaseException as e:
            self.torn = f"{type(e).__name__}: {e}"
            if hasattr(e, "add_note"):
                e.add_note(_torn_message(self.torn))
            raise
        plan.advance()
        for gi in plan.active_groups:
            if self._lr_schedules[gi] is not None:
                self.param_groups[gi]["lr"] = self._sched_lr[gi] = lrs[gi]
        return True

    def __getstate__(self) -> dict[str, Any]:
        # torch.optim.Optimizer pickles and deep-copies only defaults, state and param_groups;
        # lionkit's own settings (backend, schedules, nonfinite policy, sr_seed, torn, its
        # state-dict hooks) go along, so a copy steps and saves like the original. The step plan
        # does not (it holds raw pointers to the original's tensors): a copy builds its own.
        state = dict(self.__dict__)
        state.pop("_plan", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._plan = None

    def _sr_index(self) -> dict[int, int]:
        """id(p) -> the parameter's place in the optimizer (over all groups), for SR seeds."""
        params = (p for group in self.param_groups for p in group["params"])
        return {id(p): k for k, p in enumerate(params)}

    def clear_torn(self) -> None:
        """Accept the state left by a step that stopped part-way (see ``torn``) and allow
        ``step()`` and ``state_dict()`` again. Loading a checkpoint clears it too."""
        self.torn = None

    # ------------------------------------------------------------------ checkpoints
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a lionkit or bitsandbytes Lion/Lion8bit state dict (plain or nested
        ``__bnb_optimizer_quant_state__`` layout). 8-bit state loaded into a 32-bit optimizer
        (or the reverse) is converted. Nothing changes unless the whole dict is valid."""
        state_dict = state_dict.copy()  # hooks may edit it: the caller's dict stays as it is (as torch)
        self._sync_schedules()
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        new_groups, new_state = checkpoint.parse_state_dict(self.param_groups, state_dict)
        # Everything validated: commit, then convert the loaded state to this optimizer's formats
        # (which can still fail: an override it cannot honour, out of memory); on failure the
        # optimizer gets back what it had (the loaded dicts are copies; conversions never
        # modify a tensor they read).
        before = ([dict(g) for g in self.param_groups], self.state, self._sched_lr, self._plan)
        try:
            self._plan = None
            for group, saved in zip(self.param_groups, new_groups):
                group.update(saved)
            self.state = defaultdict(dict, new_state)
            self._sched_lr = {
                gi: g["lr"] for gi, g in enumerate(self.param_groups) if self._lr_schedules[gi] is not None
            }
            for gi, group in enumerate(self.param_groups):
                for i, p in enumerate(group["params"]):
                    if p in self.state and "state1" in self.state[p]:
                        try:
                            self._prepare_state(p, self._config(group, p))
                        except ValueError as e:
                            raise ValueError(f"{guards.where(gi, i, p)}: {e}") from None
        except BaseException:
            groups, self.state, self._sched_lr, self._plan = before
            for group, old in zip(self.param_groups, groups):
                group.clear()
                group.update(old)
            raise
        self.torn = None
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)

    def __repr__(self) -> str:
        text = super().__repr__()
        extra = f"Optimizer settings\n    backend: {self.backend}"  # not a group's: a heading of their own
        if self.backends_used:
            extra += " (" + ", ".join(f"{d}: {b}" for d, b in self.backends_used.items()) + ")"
        if self.grad_clip_norm is not None:
            extra += f"\n    grad_clip_norm: {self.grad_clip_norm}"
        if self.is_paged:
            extra += "\n    is_paged: True"
        if self.stochastic_rounding:
            extra += f"\n    stochastic_rounding: True (sr_seed={self.sr_seed})"
        return text[:-1] + extra + "\n)"


def _name_of(gi: int, group: dict[str, Any], p: torch.Tensor) -> str:
    """How errors name ``p`` of param group ``gi`` (its place in the group, looked up)."""
    return guards.where(gi, next(i for i, q in enumerate(group["params"]) if q is p), p)


def _check_own_settings(grad_clip_norm: Any, is_paged: Any, nonfinite: Any, stochastic_rounding: Any, sr_seed: Any) -> None:
    """The optimizer-wide settings (constructor arguments, then attributes a user may set)."""
    config.check_clip_norm(grad_clip_norm)
    config.check_bool("is_paged", is_paged)
    guards.check_nonfinite_policy(nonfinite)
    config.check_bool("stochastic_rounding", stochastic_rounding)
    rounding.check_seed("sr_seed", sr_seed)


def _torn_message(reason: str) -> str:
    return (
        f"lionkit: an optimizer step stopped part-way ({reason}); some parameters and their state may have "
        "been updated and others not. step() and state_dict() refuse until you load a checkpoint "
        "(opt.load_state_dict) or accept the state with opt.clear_torn()."
    )


def _plain_groups(optimizer: _LionBase, state_dict: dict[str, Any]) -> None:
    """The saved groups' hyperparameters as plain Python values, whatever was set into the
    groups since the last full step (a numpy scalar would make the state dict refuse
    ``torch.load(..., weights_only=True)``). torch copies each group for the state dict."""
    for group in state_dict["param_groups"]:
        for key in (*config.GROUP_KEYS, *config.STATE_KEYS):
            if key in group:
                try:
                    group[key] = config.plain(key, group[key])
                except (TypeError, ValueError):
                    pass  # not a valid value at all: the next step or load says so


def _refuse_if_torn(optimizer: _LionBase) -> None:
    """state_dict pre-hook: never save a torn state without the user's say-so."""
    if getattr(optimizer, "torn", None) is not None:
        raise RuntimeError(_torn_message(optimizer.torn))


def _schedules_synced(optimizer: _LionBase) -> None:
    """state_dict pre-hook: a group assigned with a callable lr has it taken as its schedule
    first (a function cannot be saved)."""
    optimizer._sync_schedules()
