"""The private base of every lionkit PyTorch optimizer: validation, lazily built state,
per-parameter configuration, clipping, and one dispatch to the update kernels.

The public classes in ``lion.py`` only fix defaults (``optim_bits``, ``is_paged``).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Callable, Iterable, Optional, Union

import torch

from . import checkpoint, clipping, config, kernels, paging, quant
from .kernels.base import Momentum, StepHyper
from .qstate import QuantizedState

ParamsT = Union[Iterable[torch.Tensor], Iterable[dict[str, Any]]]
LRType = Union[float, torch.Tensor, Callable[[int], float]]


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
    ) -> None:
        config.check_lr(lr)
        config.check_betas(betas)
        config.check_nonneg("weight_decay", weight_decay)
        config.check_clip_norm(grad_clip_norm)
        config.check_clip_value(grad_clip_value)
        config.check_bool("is_paged", is_paged)
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
            config.check(key, value)
        state_cfg.pop("max_unorm")

        self._default_schedule: Optional[Callable[[int], float]] = lr if callable(lr) else None
        self._lr_schedules: list[Optional[Callable[[int], float]]] = []
        self.grad_clip_norm = grad_clip_norm
        self.backend = backend
        self.is_paged = is_paged
        self._qmaps: dict[torch.device, torch.Tensor] = {}
        self._override_cache: dict[int, tuple[int, dict[str, Any]]] = {}
        self.backends_used: dict[str, str] = {}  # device -> backend name, filled at each step

        defaults = dict(
            lr=self._lr_value(lr, 0),
            betas=tuple(betas),
            weight_decay=weight_decay,
            grad_clip_value=grad_clip_value,
            **state_cfg,
        )
        super().__init__(params, defaults)
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
        if isinstance(param_group, dict) and callable(param_group.get("lr")):
            schedule = param_group["lr"]
            param_group = {**param_group, "lr": self._lr_value(schedule, 0)}
        elif isinstance(param_group, dict) and "lr" not in param_group:
            schedule = self._default_schedule
        else:
            schedule = None
        for key, value in param_group.items() if isinstance(param_group, dict) else ():
            if key in config.GROUP_KEYS or key in config.STATE_KEYS:
                config.check(key, value)
        super().add_param_group(param_group)
        self._lr_schedules.append(schedule)

    def _config(self, group: dict[str, Any], p: torch.Tensor) -> dict[str, Any]:
        """The group's settings with the global manager's overrides for ``p`` applied."""
        manager = config.GlobalOptimManager.get_instance()
        cached = self._override_cache.get(id(p))
        if cached is None or cached[0] != manager.version:
            cached = (manager.version, manager.overrides_for(p))
            self._override_cache[id(p)] = cached
        return {**group, **cached[1]} if cached[1] else group

    def _qmap(self, device: torch.device) -> torch.Tensor:
        if device not in self._qmaps:
            self._qmaps[device] = quant.dynamic_map(device)
        return self._qmaps[device]

    # ------------------------------------------------------------------ state
    @staticmethod
    def momentum(state: dict[str, Any], p: torch.Tensor) -> Momentum:
        """The momentum of ``p`` as a kernel sees it: fp32 tensor or ``QuantizedState``."""
        s1 = state["state1"]
        if s1.dtype != torch.uint8:
            return s1
        absmax = state["absmax1"]
        per_tensor = absmax.numel() == 1 and p.numel() > quant.BLOCK_SIZE
        return QuantizedState(s1, absmax, state["qmap1"], None if per_tensor else quant.BLOCK_SIZE)

    def _wanted_format(self, cfg: dict[str, Any], p: torch.Tensor) -> tuple[bool, Optional[int]]:
        eight = cfg["optim_bits"] == 8 and p.numel() >= cfg["min_8bit_size"]
        return eight, (quant.BLOCK_SIZE if cfg["block_wise"] else None)

    def _prepare_state(self, p: torch.Tensor, cfg: dict[str, Any]) -> dict[str, Any]:
        """Build the state of ``p`` lazily, or convert it when its configuration changed
        (an override after the first step, or a checkpoint of the other bit width)."""
        state = self.state[p]
        eight, block_size = self._wanted_format(cfg, p)
        paged = self.is_paged
        if "state1" not in state:
            state["step"] = state.get("step", 0)
            if eight:
                self._store_8bit(state, p, None, block_size, paged)
            else:
                state["state1"] = paging.state_zeros(p, torch.float32, paged)
        else:
            current = self.momentum(state, p)
            is8 = isinstance(current, QuantizedState)
            if is8 and not eight:
                m = current.dequantize()
                state["state1"] = paging.state_zeros(p, torch.float32, paged)
                state["state1"].copy_(m)
                del state["absmax1"], state["qmap1"]
            elif eight and (not is8 or current.block_size != block_size):
                m = current.dequantize() if is8 else current
                self._store_8bit(state, p, m, block_size, paged)
        if cfg["percentile_clipping"] < 100 and "gnorm_vec" not in state:
            state["gnorm_vec"] = torch.zeros(clipping.GNORM_HISTORY, dtype=torch.float32, device=p.device)
        return state

    def _store_8bit(
        self, state: dict[str, Any], p: torch.Tensor, m: Optional[torch.Tensor], block_size: Optional[int], paged: bool
    ) -> None:
        qmap = state.get("qmap1", self._qmap(p.device))
        if m is None:
            q = QuantizedState.zeros(p, block_size, qmap)
        else:
            q = QuantizedState.from_float(m, block_size, qmap)
        codes = paging.state_zeros(p, torch.uint8, paged)
        codes.copy_(q.codes)
        state["state1"], state["absmax1"], state["qmap1"] = codes, q.absmax, qmap

    # ------------------------------------------------------------------ step
    def _check_grad(self, p: torch.Tensor) -> None:
        g = p.grad
        if g.is_sparse:
            raise RuntimeError("Lion does not support sparse gradients")
        if g.shape != p.shape:
            raise RuntimeError(f"gradient shape {tuple(g.shape)} does not match parameter shape {tuple(p.shape)}")
        if g.device != p.device:
            raise RuntimeError(f"gradient on {g.device} but parameter on {p.device}")
        if not p.is_floating_point():
            raise RuntimeError(f"Lion needs floating-point parameters, got dtype {p.dtype}")

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        """Perform one optimization step; returns the closure's loss, if a closure is given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        work = []
        for gi, group in enumerate(self.param_groups):
            for p in group["params"]:
                if p.grad is None:
                    continue
                self._check_grad(p)
                work.append((gi, group, p))
        if not work:
            return loss

        plans = []
        for gi, group, p in work:
            cfg = self._config(group, p)
            state = self._prepare_state(p, cfg)
            step = state["step"] + 1
            schedule = self._lr_schedules[gi]
            # update k uses schedule(k - 1), as in MLX
            lr = self._lr_value(schedule, step - 1) if schedule is not None else self._lr_value(cfg["lr"], 0)
            need_norm = cfg["percentile_clipping"] < 100 or self.grad_clip_norm is not None
            sq = clipping.grad_sq_norm(p.grad) if need_norm else None
            ring, pscale = None, None
            if cfg["percentile_clipping"] < 100:
                ring, pscale = clipping.percentile_scale(state["gnorm_vec"], sq, step, cfg["percentile_clipping"])
            plans.append((gi, group, p, cfg, state, step, lr, sq, ring, pscale))

        gscale = 1.0
        if self.grad_clip_norm is not None:
            sqs = [plan[7] for plan in plans]
            pscales = [plan[9] if plan[9] is not None else 1.0 for plan in plans]
            gscale = clipping.global_norm_scale(sqs, pscales, self.grad_clip_norm)

        by_device: dict[torch.device, list] = defaultdict(list)
        for gi, group, p, cfg, state, step, lr, sq, ring, pscale in plans:
            beta1, beta2 = cfg["betas"]
            scale = gscale * (float(pscale) if pscale is not None else 1.0)
            hp = StepHyper(
                lr=lr,
                beta1=beta1,
                beta2=beta2,
                weight_decay=cfg["weight_decay"],
                grad_scale=scale,
                clip_value=cfg["grad_clip_value"],
                skip_zeros=cfg["skip_zeros"],
            )
            m = self.momentum(state, p)
            if self.is_paged and p.device.type == "cuda":
                for t in (state["state1"],):
                    if t.numel() >= paging.PAGED_MIN_NUMEL:
                        paging.prefetch(t)
            by_device[p.device].append((p, p.grad, m, hp))

        for device, items in by_device.items():
            backend = kernels.resolve(self.backend, device)
            self.backends_used[str(device)] = backend.name
            ps, gs, ms, hps = zip(*items)
            backend.step_many(ps, gs, ms, hps)

        for gi, group, p, cfg, state, step, lr, sq, ring, pscale in plans:
            state["step"] = step
            if ring is not None:
                state["gnorm_vec"].copy_(ring)
            if self._lr_schedules[gi] is not None:
                group["lr"] = lr  # visible, and what a checkpoint records
        return loss

    # ------------------------------------------------------------------ checkpoints
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a lionkit or bitsandbytes Lion/Lion8bit state dict (plain or nested
        ``__bnb_optimizer_quant_state__`` layout). 8-bit state loaded into a 32-bit optimizer
        (or the reverse) is converted. Nothing changes unless the whole dict is valid."""
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        new_groups, new_state = checkpoint.parse_state_dict(self.param_groups, state_dict)
        # Everything validated: commit.
        for group, saved in zip(self.param_groups, new_groups):
            group.update(saved)
        self.state = defaultdict(dict, new_state)
        for group in self.param_groups:
            for p in group["params"]:
                if p in self.state and "state1" in self.state[p]:
                    self._prepare_state(p, self._config(group, p))
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)

    def __repr__(self) -> str:
        text = super().__repr__()
        extra = f"    backend: {self.backend}"
        if self.backends_used:
            extra += " (" + ", ".join(f"{d}: {b}" for d, b in self.backends_used.items()) + ")"
        if self.grad_clip_norm is not None:
            extra += f"\n    grad_clip_norm: {self.grad_clip_norm}"
        if self.is_paged:
            extra += "\n    is_paged: True"
        return text[:-1] + extra + "\n)"
