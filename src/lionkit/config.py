"""Hyperparameter validation and per-parameter configuration overrides.

``GlobalOptimManager`` keeps bitsandbytes' method names. Overrides are looked up when a
parameter is stepped, not copied when the optimizer is built, so they take effect whether they
are registered before or after the optimizer exists (bitsandbytes' register-then-override order
silently did nothing for a long time).
"""

from __future__ import annotations

import numbers
import weakref
from typing import Any, Iterable

import torch
from torch.utils.weak import WeakIdKeyDictionary

SUPPORTED_BITS = (4, 8, 32)

# Keys an override (or `args`) may set, and the group keys an override may replace.
STATE_KEYS = ("optim_bits", "min_8bit_size", "percentile_clipping", "block_wise", "skip_zeros", "max_unorm")
GROUP_KEYS = ("lr", "betas", "weight_decay", "grad_clip_value")


def _is_real(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def check_lr(lr: Any) -> None:
    if callable(lr):
        return
    if isinstance(lr, torch.Tensor):
        if lr.numel() != 1:
            raise ValueError(f"Invalid learning rate: tensor lr must have one element, got shape {tuple(lr.shape)}")
        lr = lr.item()
    if not _is_real(lr) or not lr >= 0 or lr != lr or lr == float("inf"):
        raise ValueError(f"Invalid learning rate: {lr!r} (must be a finite number >= 0 or a callable step -> lr)")


def check_betas(betas: Any) -> None:
    try:
        b = tuple(betas)
    except TypeError:
        raise ValueError(f"Invalid betas: {betas!r} (must be a pair of numbers in [0, 1))") from None
    if len(b) != 2:
        raise ValueError(f"Invalid betas: {betas!r} (must be a pair of numbers in [0, 1))")
    for i, beta in enumerate(b):
        if not _is_real(beta) or not 0.0 <= beta < 1.0:
            raise ValueError(f"Invalid beta at index {i}: {beta!r} (must be in [0, 1))")


def check_nonneg(name: str, value: Any, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not _is_real(value) or not value >= 0 or value == float("inf"):
        raise ValueError(f"Invalid {name}: {value!r} (must be a finite number >= 0)")


def check_optim_bits(bits: Any) -> None:
    if bits not in SUPPORTED_BITS or isinstance(bits, bool):
        raise ValueError(f"Invalid optim_bits: {bits!r} (supported: {', '.join(map(str, SUPPORTED_BITS))})")


def check_bits_layout(cfg: dict[str, Any]) -> None:
    """4-bit momentum exists only block-wise (one scale per 32 elements): refuse
    ``block_wise=False`` with ``optim_bits=4``."""
    if cfg.get("optim_bits") == 4 and cfg.get("block_wise") is False:
        raise ValueError(
            "Invalid block_wise: False with optim_bits=4 (4-bit momentum needs one scale per block of 32; "
            "use block_wise=True, or optim_bits=8 for one scale per tensor)"
        )


def check_percentile(pc: Any) -> None:
    if not isinstance(pc, numbers.Integral) or isinstance(pc, bool) or not 1 <= pc <= 100:
        hint = ""
        if isinstance(pc, bool):  # bitsandbytes 0.50 dropped percentile_clipping: is_paged moved up
            hint = (
                "; bitsandbytes >= 0.50 takes is_paged in this position, lionkit keeps the <= 0.49 order "
                "(..., min_8bit_size, percentile_clipping, block_wise, is_paged): pass is_paged by keyword"
            )
        raise ValueError(f"Invalid percentile_clipping: {pc!r} (must be an int in [1, 100]; 100 turns it off{hint})")


def check_min_8bit_size(n: Any) -> None:
    if not isinstance(n, numbers.Integral) or isinstance(n, bool) or n < 0:
        raise ValueError(f"Invalid min_8bit_size: {n!r} (must be an int >= 0)")


def check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"Invalid {name}: {value!r} (must be True or False)")


def check_max_unorm(value: Any) -> None:
    if value != 0:
        raise ValueError(
            f"Invalid max_unorm: {value!r} (Lion's update is a sign, so update-norm clipping does not "
            "apply; only 0 is accepted)"
        )


def check_clip_norm(value: Any) -> None:
    if value is not None and (not _is_real(value) or not value > 0):
        raise ValueError(f"Invalid grad_clip_norm: {value!r} (must be a number > 0, or None for off)")


def check_clip_value(value: Any) -> None:
    if value is not None and (not _is_real(value) or not value > 0):
        raise ValueError(f"Invalid grad_clip_value: {value!r} (must be a number > 0, or None for off)")


_CHECKS = {
    "lr": check_lr,
    "betas": check_betas,
    "weight_decay": lambda v: check_nonneg("weight_decay", v),
    "optim_bits": check_optim_bits,
    "min_8bit_size": check_min_8bit_size,
    "percentile_clipping": check_percentile,
    "block_wise": lambda v: check_bool("block_wise", v),
    "skip_zeros": lambda v: check_bool("skip_zeros", v),
    "max_unorm": check_max_unorm,
    "grad_clip_value": check_clip_value,
}


def check(key: str, value: Any) -> None:
    """Validate one configuration value; unknown keys are refused."""
    if key not in _CHECKS:
        raise ValueError(f"Invalid config key: {key!r} (known keys: {', '.join(sorted(_CHECKS))})")
    _CHECKS[key](value)


def plain(key: str, value: Any) -> Any:
    """A checked ``value`` of ``key`` as the plain Python type a checkpoint can hold: numpy
    scalars and arrays (from ``np.logspace`` sweeps, say) pass the checks but would make
    ``torch.load(..., weights_only=True)`` refuse the state dict. Returns ``value`` itself when
    it already is plain; betas stay a list if given as one."""
    if key == "betas":
        if isinstance(value, (list, tuple)) and all(type(b) is float for b in value):
            return value
        floats = [float(b) for b in value]
        return floats if isinstance(value, list) else tuple(floats)
    if key in ("lr", "weight_decay", "grad_clip_value", "max_unorm"):
        # lr: a schedule (callable) or a tensor stays as it is
        if value is None or type(value) is float or callable(value) or isinstance(value, torch.Tensor):
            return value
        return float(value)
    if key in ("optim_bits", "min_8bit_size", "percentile_clipping"):
        return value if type(value) is int else int(value)
    return value


def checked(key: str, value: Any) -> Any:
    """``check`` the value, then return it ``plain``."""
    check(key, value)
    return plain(key, value)


def state_config_from_args(args: Any, **given: Any) -> dict[str, Any]:
    """bitsandbytes' ``args`` object: when given, its attributes replace the constructor values."""
    if args is None:
        return given
    out = dict(given)
    for key in STATE_KEYS:
        if hasattr(args, key):
            out[key] = getattr(args, key)
    return out


class GlobalOptimManager:
    """Per-parameter configuration overrides, shared by every lionkit optimizer.

    Example (keep an embedding's momentum 32-bit under ``Lion8bit``)::

        mng = lionkit.GlobalOptimManager.get_instance()
        mng.register_module_override(model.embed, "weight", {"optim_bits": 32})
        opt = lionkit.Lion8bit(model.parameters(), lr=1e-4)

    ``override_config`` may equally be called after the optimizer is built; the override takes
    effect at the parameter's next step (an existing state is converted to the new format).
    """

    _instance: "GlobalOptimManager | None" = None

    def __init__(self) -> None:
        raise RuntimeError("GlobalOptimManager is a singleton: use GlobalOptimManager.get_instance()")

    @classmethod
    def get_instance(cls) -> "GlobalOptimManager":
        if cls._instance is None:
            inst = cls.__new__(cls)
            inst.initialize()
            cls._instance = inst
        return cls._instance

    def initialize(self) -> None:
        """Forget every registration and override."""
        self._param_overrides: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self._module_overrides: list[tuple[weakref.ref, str, dict[str, Any]]] = []
        self._registered: list[weakref.ref] = []
        # bumped on every change, never reset (initialize too counts as a change): optimizers
        # cache their lookups per version, so a version seen before must mean the same overrides
        self.version = getattr(self, "version", -1) + 1

    def register_parameters(self, params: Iterable[Any] | torch.Tensor) -> None:
        """Accepted for bitsandbytes compatibility: lionkit keys overrides by the parameter object
        itself, so registering is not needed for overrides to work. Takes what an optimizer
        takes: tensors, or param-group dicts (their ``"params"``)."""
        if isinstance(params, torch.Tensor):
            params = [params]
        flat: list[torch.Tensor] = []
        for item in params:
            if isinstance(item, dict) and "params" in item:
                group = item["params"]
                flat.extend([group] if isinstance(group, torch.Tensor) else group)
            else:
                flat.append(item)
        for p in flat:
            if not isinstance(p, torch.Tensor):
                raise ValueError(f"register_parameters expects tensors or param-group dicts, got {type(p).__name__}")
        self._registered.extend(weakref.ref(p) for p in flat)
        self.version += 1

    def override_config(
        self,
        parameters: torch.Tensor | Iterable[torch.Tensor],
        key: str | None = None,
        value: Any = None,
        key_value_dict: dict[str, Any] | None = None,
    ) -> None:
        """Override ``key=value`` (or every item of ``key_value_dict``) for the given parameters."""
        if isinstance(parameters, torch.Tensor):
            parameters = [parameters]
        updates: dict[str, Any] = {}
        if key is not None:
            updates[key] = value
        if key_value_dict:
            updates.update(key_value_dict)
        if not updates:
            raise ValueError("override_config needs key and value, or key_value_dict")
        for k, v in updates.items():
            check(k, v)
        for p in parameters:
            if not isinstance(p, torch.Tensor):
                raise ValueError(f"override_config expects tensors, got {type(p).__name__}")
            current = self._param_overrides.get(p, {})
            self._param_overrides[p] = {**current, **updates}
        self.version += 1

    def register_module_override(self, module: torch.nn.Module, param_name: str, config: dict[str, Any]) -> None:
        """Override ``config`` for ``getattr(module, param_name)``, looked up at step time, so it
        follows the module even if the parameter object is replaced."""
        if not hasattr(module, param_name):
            raise ValueError(f"register_module_override: {type(module).__name__} has no attribute {param_name!r}")
        for k, v in config.items():
            check(k, v)
        self._module_overrides.append((weakref.ref(module), param_name, dict(config)))
        self.version += 1

    def overrides_for(self, p: torch.Tensor) -> dict[str, Any]:
        """The merged overrides for ``p`` (module overrides first, per-parameter ones win)."""
        out: dict[str, Any] = {}
        for mref, name, cfg in self._module_overrides:
            module = mref()
            if module is not None and getattr(module, name, None) is p:
                out.update(cfg)
        out.update(self._param_overrides.get(p, {}))
        return out
