"""The fused CUDA backend: Triton kernels, every tensor of a step in one launch per kind.

Same contract as ``CompiledBackend`` on the CPU: each byte of p, g and the momentum is read and
written once; the 8-bit kernel dequantizes, updates, takes the new absmax of each 256-element
block and requantizes it in registers; the result equals ``TorchBackend`` bit for bit (fp32
math in the reference's order, FMA contraction disabled with ``enable_fp_fusion=False``, IEEE
division with ``div_rn``, quantization through ``quant_fast``'s bucket table).

Many tensors per launch: tensors are grouped by (momentum kind, parameter dtype, gradient
dtype); each group is one launch over a table of work items (tensor index, first element),
and each program reads its tensor's pointers from a device table. The tables are cached
between steps while the tensors stay the same; only the per-tensor scalars (lr, betas, ...)
are copied each step. Per-tensor 8-bit scales need a max over the whole tensor first, so that
kind takes four short launches (update + partial max, reduce, requantize, store scale).

Testing without a GPU: with ``TRITON_INTERPRET=1`` set before the first use, Triton runs the
same kernels on the CPU in numpy, and ``TritonBackend(allow_cpu=True)`` accepts CPU tensors.
"""

from __future__ import annotations

import os
import re
import warnings
from collections import OrderedDict
from typing import Any, Optional, Sequence

import numpy as np
import torch

from .. import quant_fast, rounding
from ..qstate import QuantizedState
from .base import Momentum, StepHyper, fused_momentum_ok, hyper_row
from .torch_eager import TorchBackend

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_MODE_32, _MODE_8_BLOCK, _MODE_8_TENSOR = 0, 1, 2


MIN_TRITON = (3, 2)
"""The oldest triton the kernels are tested with: before 3.2, Triton's CPU interpreter (where CI
runs them) reads nothing through a pointer loaded from memory, the multi-tensor tables' way."""


def triton_version(version: str) -> tuple[int, ...]:
    """``"3.0.0"`` -> ``(3, 0)``; the leading numbers of a version string."""
    return tuple(int(x) for x in re.findall(r"\d+", version.split("+")[0])[:2])


def import_triton() -> Any:
    """The ``triton`` module, or ImportError with the install command (also for a triton
    older than ``MIN_TRITON``)."""
    try:
        import triton
    except ImportError as e:
        raise ImportError("the Triton backend needs triton: pip install 'lionkit[triton]'") from e
    found = getattr(triton, "__version__", "0")
    if triton_version(found) < MIN_TRITON:
        want = ".".join(map(str, MIN_TRITON))
        raise ImportError(
            f"the Triton backend needs triton >= {want} (found {found}, which torch < 2.6 pins): "
            f"pip install -U 'torch>=2.6' brings it (a newer triton alone breaks that torch's "
            f"torch.compile); or use backend='torch'"
        )
    return triton


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on")


def _kernels() -> Any:
    """The kernel module, (re)imported so that its mode matches ``TRITON_INTERPRET`` now."""
    import_triton()
    import importlib

    from . import triton_kernels

    if triton_kernels.INTERPRETED != interpreting():
        import triton

        if hasattr(triton, "knobs"):
            triton.knobs.runtime.interpret = interpreting()
        triton_kernels = importlib.reload(triton_kernels)
    return triton_kernels


def _tl_dtype(dtype: torch.dtype) -> Any:
    import triton.language as tl

    return {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}[dtype]


_qc_tensors: dict[tuple[bytes, str], torch.Tensor] = {}


def _qc_tensor(qmap: torch.Tensor, device: torch.device) -> Optional[torch.Tensor]:
    """``quant_fast.kernel_constants`` as an int32 tensor on ``device`` (cached)."""
    qc = quant_fast.kernel_constants_of(qmap)
    if qc is None:
        return None
    key = (qc.tobytes(), str(device))
    t = _qc_tensors.get(key)
    if t is None:
        t = _qc_tensors[key] = torch.from_numpy(qc.view(np.int32).copy()).to(device)
    return t


def quantize(x: torch.Tensor, qmap: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """The Triton kernel's nearest-code quantizer on fp32 values in [-1, 1] (for verification)."""
    k = _kernels()
    x = x.detach().to(torch.float32).contiguous()
    qc = _qc_tensor(qmap, x.device)
    if qc is None:
        raise ValueError("qmap has no bucket table (see quant_fast.bucket_table)")
    out = torch.empty(x.shape, dtype=torch.uint8, device=x.device)
    n = x.numel()
    k.quantize[(max(1, -(-n // block)),)](x, out, n, qc, BLOCK=block)
    return out


class TritonBackend:
    """Fused Triton kernels for CUDA tensors (CPU tensors too under ``TRITON_INTERPRET=1``
    with ``allow_cpu=True``, for testing)."""

    name = "triton"
    # its kernels write parameters through pointers, unseen by autograd's version counters:
    # the optimizer bumps them (guards.mark_modified)
    writes_through_pointers = True
    # honours StepHyper.stochastic_rounding: bf16 parameters in the kernels (rounding.sr_hash's
    # numbers, as TorchBackend); fp16 ones go to TorchBackend
    stochastic_rounding = True

    def __init__(
        self,
        allow_cpu: bool = False,
        block: int = 1024,
        iters: int = 8,
        rows: int = 4,
        rows_iters: int = 4,
        fallback_on_error: bool = False,
    ):
        import_triton()
        if allow_cpu and not interpreting():
            raise ValueError("allow_cpu=True needs TRITON_INTERPRET=1 (Triton's CPU interpreter)")
        for name, v in (("block", block), ("rows", rows)):
            if v < 1 or v & (v - 1):
                raise ValueError(f"{name} must be a power of two, got {v}")
        self.allow_cpu = allow_cpu
        self.block, self.iters, self.rows, self.rows_iters = block, iters, rows, rows_iters
        self._fallback = TorchBackend()
        self._tables: OrderedDict[tuple, dict[str, torch.Tensor]] = OrderedDict()
        # backend="auto": if Triton cannot compile for this GPU, say so once and use the eager
        # path from then on rather than failing the training step
        self.fallback_on_error = fallback_on_error
        self.broken: Optional[str] = None

    def _device_ok(self, t: torch.Tensor) -> bool:
        return t.device.type == "cuda" or (self.allow_cpu and t.device.type == "cpu")

    def supports(self, p: torch.Tensor, m: Momentum) -> bool:
        if not self._device_ok(p) or p.dtype not in _DTYPES or not p.is_contiguous():
            return False
        return fused_momentum_ok(p, m)

    # ------------------------------------------------------------------ step
    def step_many(
        self,
        params: Sequence[torch.Tensor],
        grads: Sequence[torch.Tensor],
        moms: Sequence[Momentum],
        hypers: Sequence[StepHyper],
    ) -> None:
        groups: dict[tuple, list] = {}
        slow = []
        for item in zip(params, grads, moms, hypers):
            p, g, m, hp = item
            ok = (
                not (getattr(hp, "stochastic_rounding", False) and p.dtype == torch.float16)
                and g.dtype in _DTYPES and g.device == p.device and g.is_contiguous() and g.numel() == p.numel()
                and self.supports(p, m)
            )
            if not ok:
                slow.append(item)
                continue
            if p.numel() == 0:
                continue
            if isinstance(m, QuantizedState):
                mode = _MODE_8_TENSOR if m.block_size is None else _MODE_8_BLOCK
                qkey = id(quant_fast.kernel_constants_of(m.qmap))  # one array per distinct map
            else:
                mode, qkey = _MODE_32, 0
            groups.setdefault((p.device, mode, p.dtype, g.dtype, qkey), []).append(item)
        self.fallback_count = len(slow)  # tensors this kernel cannot take (float64, ...): eager
        if slow:
            self._fallback.step_many(*zip(*slow))
        for (device, mode, pdt, gdt, _), items in groups.items():
            if self.broken is not None:
                self._fallback.step_many(*zip(*items))
                continue
            try:
                self._launch(device, mode, pdt, gdt, items)
            except Exception as e:  # compilation happens before the kernel touches any tensor
                if not self.fallback_on_error:
                    raise
                self.broken = f"{type(e).__name__}: {e}".splitlines()[0]
                self.name = "torch (triton failed)"
                warnings.warn(f"lionkit: the Triton kernels failed ({self.broken}); using the eager backend", stacklevel=3)
                self._fallback.step_many(*zip(*items))

    def _chunk(self, mode: int) -> int:
        return self.block * self.iters if mode == _MODE_32 else 256 * self.rows * self.rows_iters

    def _group_tables(self, device: torch.device, mode: int, items: list) -> dict[str, torch.Tensor]:
        """Pointer and work-item tables of a group (cached while the tensors are the same)."""
        ptrs = []
        for p, g, m, _ in items:
            if isinstance(m, QuantizedState):
                ptrs.append((p.data_ptr(), g.data_ptr(), m.codes.data_ptr(), m.absmax.data_ptr(), p.numel()))
            else:
                ptrs.append((p.data_ptr(), g.data_ptr(), m.data_ptr(), 0, p.numel()))
        key = (str(device), mode, tuple(ptrs))
        hit = self._tables.get(key)
        if hit is not None:
            self._tables.move_to_end(key)
            return hit
        arr = np.array(ptrs, dtype=np.int64).reshape(-1, 5)
        numel = arr[:, 4]
        per = -(-numel // self._chunk(mode))
        first = np.concatenate([[0], np.cumsum(per)])
        item_t = np.repeat(np.arange(len(items), dtype=np.int32), per)
        item_s = (np.arange(first[-1], dtype=np.int64) - first[:-1].repeat(per)) * self._chunk(mode)

        def dev(a: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(np.ascontiguousarray(a)).to(device)

        tables = {
            "P": dev(arr[:, 0]), "G": dev(arr[:, 1]), "M": dev(arr[:, 2]), "A": dev(arr[:, 3]),
            "NUMEL": dev(numel), "ITEM_T": dev(item_t), "ITEM_S": dev(item_s),
            "FIRST": dev(first.astype(np.int64)),
        }
        self._tables[key] = tables
        while len(self._tables) > 16:
            self._tables.popitem(last=False)
        return tables

    def _launch(self, device: torch.device, mode: int, pdt: torch.dtype, gdt: torch.dtype, items: list) -> None:
        k = _kernels()
        tb = self._group_tables(device, mode, items)
        rows: dict[StepHyper, tuple[float, ...]] = {}
        hyp = np.empty((len(items), 8), dtype=np.float32)  # numpy rounds to fp32 like torch
        flags = np.empty(len(items), dtype=np.int32)
        keys = np.zeros(len(items), dtype=np.uint32)
        for i, (_, _, _, hp) in enumerate(items):
            row = rows.get(hp)
            if row is None:
                row = rows[hp] = hyper_row(hp)
            hyp[i] = row
            # 4: round stochastically (the kernels do so for bf16 parameters only)
            flags[i] = int(hp.skip_zeros) | 4 * int(hp.stochastic_rounding)
            if hp.stochastic_rounding:
                keys[i] = rounding.key32(hp.seed)
        hyp_t = torch.from_numpy(hyp.reshape(-1)).to(device)
        flags_t = torch.from_numpy(np.stack([flags, keys.view(np.int32)])).to(device)
        flags_t, keys_t = flags_t[0], flags_t[1]  # one copy to the device for both
        nitems = int(tb["ITEM_T"].numel())
        grid = (nitems,)
        pt, gt = _tl_dtype(pdt), _tl_dtype(gdt)
        common = (tb["ITEM_T"], tb["ITEM_S"], tb["P"], tb["G"], tb["M"])
        # enable_fp_fusion=False: no FMA contraction, so results equal the reference bit for bit
        opts = {"enable_fp_fusion": False}
        if mode == _MODE_32:
            k.lion32[grid](*common, tb["NUMEL"], hyp_t, flags_t, keys_t, PT=pt, GT=gt, BLOCK=self.block, ITERS=self.iters,
                           **opts)
            return
        qmap = items[0][2].qmap
        qc = _qc_tensor(qmap, device)
        launch = dict(PT=pt, GT=gt, ROWS=self.rows, ITERS=self.rows_iters, **opts)
        if mode == _MODE_8_BLOCK:
            k.lion8[grid](*common, tb["A"], tb["NUMEL"], hyp_t, flags_t, keys_t, qc, hyp_t, hyp_t, PASS=0, **launch)
            return
        part = torch.empty(nitems, dtype=torch.float32, device=device)
        scale = torch.empty(len(items), dtype=torch.float32, device=device)
        k.lion8[grid](*common, tb["A"], tb["NUMEL"], hyp_t, flags_t, keys_t, qc, part, scale, PASS=1, **launch)
        k.reduce_parts[(len(items),)](part, tb["FIRST"], scale, BLOCK=256)
        k.lion8[grid](*common, tb["A"], tb["NUMEL"], hyp_t, flags_t, keys_t, qc, part, scale, PASS=2, **launch)
        k.store_scales[(len(items),)](tb["A"], scale)
