"""The fused CPU backend: ``lion_cpu.cpp`` compiled on first use, every tensor of a step in one
multithreaded, vectorised call.

What it does per element: read p, g and the momentum once, write p and the momentum once
(8-bit: dequantize, update, new block absmax, requantize, block by block in a 1 KiB buffer).
A step allocates a few KiB of bookkeeping whatever the model size. Results are bit-identical
to ``TorchBackend`` (same fp32 operations in the same order, no FMA contraction).

Why a small C++ file and not ``torch.compile``: it builds in a few seconds without torch
headers (one build for every shape, dtype and hyperparameter, so nothing ever recompiles),
batches all tensors of a step into one OpenMP loop, and controls the 8-bit block loop and the
quantizer exactly. It needs a C++ compiler at run time, as inductor does; without one (or on a
platform where the build fails) ``resolve("auto", cpu)`` falls back to ``TorchBackend``.

Build cache: ``$LIONKIT_CACHE_DIR`` or ``~/.cache/lionkit``, one shared library per (source,
compiler, flags, CPU) key; ``$CXX`` picks the compiler. ``LIONKIT_CPU_ISA=scalar`` builds the
portable (non-AVX-512) code path, which the tests use to cover machines without AVX-512.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from .. import quant, quant_fast, rounding
from ..qstate import QuantizedState
from .base import Momentum, StepHyper, fused_momentum_ok, hyper_row
from .torch_eager import TorchBackend

SOURCE = Path(__file__).with_name("lion_cpu.cpp")

_DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_MODE_32, _MODE_8_BLOCK, _MODE_8_TENSOR, _MODE_4 = 0, 1, 2, 3
# (parameter, gradient) dtypes the kernel is built for: the gradient in the parameter's dtype
# or in fp32 (other pairs, rare, go to the eager backend: fewer instantiations, faster build)
_PAIRS = {(d, d) for d in _DTYPE_CODE} | {(torch.float16, torch.float32), (torch.bfloat16, torch.float32)}


class BuildError(RuntimeError):
    """The CPU kernel could not be compiled or loaded (the message carries the compiler output)."""


def cache_dir() -> Path:
    """Where built kernels are kept: ``$LIONKIT_CACHE_DIR``, else ``$XDG_CACHE_HOME/lionkit``."""
    env = os.environ.get("LIONKIT_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "lionkit"


def _compiler() -> str:
    for cand in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if cand and shutil.which(cand):
            return shutil.which(cand)  # type: ignore[return-value]
    raise BuildError("no C++ compiler found (set $CXX, or install g++/clang++)")


def _cpu_id() -> str:
    """What -march=native depends on."""
    text = platform.processor() + platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("model name", "flags", "Features", "CPU part")):
                    text += line
                    if line.startswith(("flags", "Features")):
                        break
    except OSError:
        pass
    return text


def _flags(scalar: bool) -> list[str]:
    # -ffp-contract=off: no FMA contraction, so results equal the eager reference bit for bit.
    flags = ["-O3", "-std=c++17", "-fPIC", "-ffp-contract=off", "-fno-math-errno"]
    if scalar:
        flags.append("-DLK_FORCE_SCALAR")
    return flags


def _attempts() -> list[list[str]]:
    """Extra flags to try in turn: tuned for this CPU with OpenMP, without OpenMP (Apple's
    clang has none), then plain (a compiler that rejects -march/-mcpu=native)."""
    arch = ["-march=native"] if platform.machine().lower() in ("x86_64", "amd64", "i686") else ["-mcpu=native"]
    return [["-fopenmp", *arch], arch, []]


_lock = threading.Lock()
_libs: dict[bool, object] = {}  # scalar? -> CDLL or the BuildError it raised


def _build(scalar: bool) -> Path:
    cxx = _compiler()
    # The compiler's identity without running it (a warm start should not fork a process):
    # the resolved binary's path, size and modification time change when it is updated.
    real = os.path.realpath(cxx)
    st = os.stat(real)
    version = f"{real}:{st.st_size}:{st.st_mtime_ns}"
    flags = _flags(scalar)
    key = hashlib.sha256(
        "\0".join([SOURCE.read_text(), cxx, version, " ".join(flags), repr(_attempts()), _cpu_id()]).encode()
    ).hexdigest()[:20]
    out = cache_dir() / f"lion_cpu_{'scalar_' if scalar else ''}{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    errors = []
    # OpenMP if the compiler has it; libgomp's soname matches the copy torch loads, so both
    # share one runtime and one thread pool.
    for extra in _attempts():
        with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
            # four translation units (one per parameter dtype, and the entry points) compiled
            # in parallel: the cold start is the slowest unit, not the sum
            units = [(f"-DLK_ONLY_PART={k}", f"part{k}.o") for k in range(3)] + [("-DLK_ONLY_MAIN", "main.o")]
            procs = []
            for define, obj in units:
                cmd = [cxx, *flags, *extra, define, "-c", str(SOURCE), "-o", os.path.join(tmp, obj)]
                procs.append((cmd, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)))
            failed = [(cmd, p.communicate()[1]) for cmd, p in procs]
            failed = [(cmd, err) for (cmd, err), (_, p) in zip(failed, procs) if p.returncode != 0]
            if not failed:
                so = os.path.join(tmp, "lion_cpu.so")
                cmd = [cxx, "-shared", *extra, *[os.path.join(tmp, obj) for _, obj in units], "-o", so]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                if proc.returncode == 0:
                    os.replace(so, out)  # atomic: concurrent builders write identical files
                    return out
                failed = [(cmd, proc.stderr)]
            errors += [f"$ {' '.join(cmd)}\n{err.strip()}" for cmd, err in failed]
    raise BuildError("building the CPU Lion kernel failed:\n" + "\n".join(errors))


def load(scalar: Optional[bool] = None):
    """The loaded kernel library (building it if needed); raises BuildError if impossible."""
    if scalar is None:
        scalar = os.environ.get("LIONKIT_CPU_ISA", "").lower() == "scalar"
    with _lock:
        lib = _libs.get(scalar)
        if lib is None:
            try:
                lib = ctypes.CDLL(str(_build(scalar)))
            except (OSError, BuildError) as e:
                lib = e if isinstance(e, BuildError) else BuildError(f"loading the CPU Lion kernel failed: {e}")
            else:
                p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
                lib.lk_step.argtypes = [i32, p, p, p, p, p, p, p, p, p, i32]
                lib.lk_step.restype = i32
                lib.lk_quantize.argtypes = [p, p, i64, ctypes.c_float, p, i32]
                lib.lk_all_finite.argtypes = [i32, p, p, p, p, i32]
                lib.lk_round_bf16_sr.argtypes = [p, p, i64, i64, ctypes.c_uint32]
                lib.lk_quantize.restype = None
                lib.lk_isa.restype = i32
            _libs[scalar] = lib
    if isinstance(lib, BuildError):
        raise lib
    return lib


def available() -> bool:
    """True if the kernel builds and loads on this machine."""
    try:
        load()
        return True
    except BuildError:
        return False


def isa_name(scalar: Optional[bool] = None) -> str:
    """The instruction set the loaded kernel vectorises with ("avx512" or "scalar")."""
    return "avx512" if load(scalar).lk_isa() == 512 else "scalar"


def quantize(x: torch.Tensor, qmap: torch.Tensor, scalar: Optional[bool] = None, scale: float = 1.0) -> torch.Tensor:
    """Codes of ``x / scale`` by the kernel's own quantizer, normalisation included, as the
    8-bit step computes them (``|x| <= scale``; for verification)."""
    qc = quant_fast.kernel_constants(qmap)
    if qc is None:
        raise ValueError("qmap has no bucket table (see quant_fast.bucket_table)")
    x = x.detach().to(torch.float32).contiguous()
    out = torch.empty(x.shape, dtype=torch.uint8)
    if x.numel() and not bool(x.abs().max() <= scale):
        raise ValueError(f"quantize needs |x| <= scale={scale}")
    load(scalar).lk_quantize(x.data_ptr(), out.data_ptr(), x.numel(), scale, qc.ctypes.data, torch.get_num_threads())
    return out


_constants = quant_fast.kernel_constants_of


def round_bf16_sr(x: torch.Tensor, key: int, start: int = 0, scalar: Optional[bool] = None) -> torch.Tensor:
    """fp32 ``x`` rounded stochastically to bf16 by the kernel's store, as elements ``start ..``
    of a tensor stepped with key ``key`` (``rounding.stochastic_round_keyed``'s numbers)."""
    x = x.detach().to(torch.float32).contiguous().view(-1)
    out = torch.empty(x.numel(), dtype=torch.bfloat16)
    load(scalar).lk_round_bf16_sr(x.data_ptr(), out.data_ptr(), x.numel(), start, key)
    return out


def all_finite(tensors: Sequence[torch.Tensor]) -> list[bool]:
    """For each CPU tensor (fp32/fp16/bf16, contiguous): True if it holds no NaN or inf.

    One multithreaded, vectorised pass over all of them in one call, for the optimizer's
    non-finite-gradient guard (what ``torch.aminmax`` per tensor does, without a parallel
    region and a Python round trip per tensor). Raises ValueError for other tensors.
    """
    items = [t for t in tensors if t.numel()]
    for t in items:
        if t.device.type != "cpu" or t.dtype not in _DTYPE_CODE or not t.is_contiguous():
            raise ValueError(f"all_finite takes contiguous fp32/fp16/bf16 CPU tensors, got {t.dtype} on {t.device}")
    n = len(items)
    out = np.ones(n, dtype=np.uint8)
    if n:
        arr = np.array([(t.data_ptr(), t.numel(), _DTYPE_CODE[t.dtype]) for t in items], dtype=np.int64)
        ptr, numel = np.ascontiguousarray(arr[:, 0]), np.ascontiguousarray(arr[:, 1])
        dt = np.ascontiguousarray(arr[:, 2].astype(np.int32))
        load().lk_all_finite(n, ptr.ctypes.data, numel.ctypes.data, dt.ctypes.data, out.ctypes.data,
                             torch.get_num_threads())
    it = iter(out.tolist())
    return [bool(next(it)) if t.numel() else True for t in tensors]


class CompiledBackend:
    """Fused, multithreaded, vectorised CPU kernel (C++ built on first use)."""

    name = "compiled"
    # its kernels write parameters through pointers, unseen by autograd's version counters:
    # the optimizer bumps them (guards.mark_modified)
    writes_through_pointers = True
    # honours StepHyper.stochastic_rounding: bf16 parameters in the kernel (the same random
    # numbers as TorchBackend: rounding.sr_hash); fp16 ones go to TorchBackend
    stochastic_rounding = True

    def __init__(self, scalar: Optional[bool] = None) -> None:
        self._lib = load(scalar)
        self._scalar = scalar
        self._fallback = TorchBackend()

    def step_many(
        self,
        params: Sequence[torch.Tensor],
        grads: Sequence[torch.Tensor],
        moms: Sequence[Momentum],
        hypers: Sequence[StepHyper],
    ) -> None:
        # Per tensor this costs a few attribute reads (a step of a model with hundreds of small
        # tensors would otherwise spend more time here than in the kernel): the kernel's tables
        # are built from Python lists in one numpy call each at the end.
        slow = []
        ptrs: list[int] = []  # (p, g, codes or momentum, absmax or 0, numel, 4-bit map or 0) per tensor
        infos: list[int] = []  # (mode, p dtype, g dtype, flags, 4-bit key, SR key) per tensor
        hrows: list[tuple[float, ...]] = []
        rows: dict[int, tuple[float, ...]] = {}  # by id(hp): the optimizer shares equal ones
        qc = None
        for item in zip(params, grads, moms, hypers):
            p, g, m, hp = item
            ok = (
                not (hp.stochastic_rounding and p.dtype == torch.float16)
                and g.device.type == "cpu"
                and g.is_contiguous()
                and g.numel() == p.numel()
                and self._fusable(p, g.dtype, m)
            )
            if ok and isinstance(m, QuantizedState) and m.bits == 8:
                qc_m = _constants(m.qmap)
                ok = qc is None or qc_m is qc  # one map per call (there is only one dynamic map)
                qc = qc_m if ok else qc
            if not ok:
                slow.append(item)
                continue
            if p.numel() == 0:
                continue
            ptrs += _pointers(p, g, m)
            infos += _info(p, g.dtype, m, hp)
            row = rows.get(id(hp))
            if row is None:
                row = rows[id(hp)] = hyper_row(hp)
            hrows.append(row)
        self.fallback_count = len(slow)  # tensors this kernel cannot take (float64, ...): eager
        if slow:
            self._fallback.step_many(*zip(*slow))
        if not hrows:
            return
        n = len(hrows)
        ptr = np.array(ptrs, dtype=np.int64).reshape(n, _NPTR).T.copy()  # one row per pointer kind
        self._launch(n, ptr, np.array(infos, dtype=np.int32), np.array(hrows, dtype=np.float32), qc)

    def _fusable(self, p: torch.Tensor, gdtype: torch.dtype, m: Momentum) -> bool:
        return (p.dtype, gdtype) in _PAIRS and self.supports(p, m)

    def supports(self, p: torch.Tensor, m: Momentum) -> bool:
        if p.device.type != "cpu" or p.dtype not in _DTYPE_CODE or not p.is_contiguous():
            return False
        return fused_momentum_ok(p, m, four_bit=True)

    def _launch(self, n: int, ptr: np.ndarray, info: np.ndarray, hyper: np.ndarray, qc: Optional[np.ndarray]) -> None:
        """One kernel call over ``n`` tensors: ``ptr`` (6, n) int64 (p, g, momentum or codes,
        absmax or 0, numel, 4-bit map or 0), ``info`` (n * 6) int32, ``hyper`` (n, 8) fp32
        (each double rounded to fp32, nearest even, as torch does)."""
        if qc is None:  # no 8-bit tensor: any valid constants do
            qc = _constants(quant._dynamic_map_cpu())
        rc = self._lib.lk_step(
            n,
            ptr[0].ctypes.data,
            ptr[1].ctypes.data,
            ptr[2].ctypes.data,
            ptr[3].ctypes.data,
            ptr[4].ctypes.data,
            ptr[5].ctypes.data,
            info.ctypes.data,
            hyper.ctypes.data,
            qc.ctypes.data,
            torch.get_num_threads(),
        )
        if rc != 0:
            raise RuntimeError(f"CPU Lion kernel failed (code {rc})")

    def prepare(
        self, params: Sequence[torch.Tensor], gdtypes: Sequence[torch.dtype], moms: Sequence[Momentum]
    ) -> Optional["Prepared"]:
        """The kernel's tables for these parameters and momenta, built once, for repeated steps
        whose gradients have ``gdtypes`` (lionkit.fastpath checks that they do); None if some
        tensor is not for this kernel (step_many sends it elsewhere)."""
        qc = None
        for p, gd, m in zip(params, gdtypes, moms):
            if p.numel() == 0 or not self._fusable(p, gd, m):
                return None
            if isinstance(m, QuantizedState) and m.bits == 8:
                if qc is not None and _constants(m.qmap) is not qc:
                    return None
                qc = _constants(m.qmap)
        return Prepared(self, params, gdtypes, moms, qc)


_NPTR = 6  # pointers (and sizes) per tensor, as lk_step takes them


def _pointers(p: torch.Tensor, g: torch.Tensor, m: Momentum) -> tuple[int, ...]:
    if isinstance(m, QuantizedState):
        map4 = m.qmap.data_ptr() if m.bits == 4 else 0
        return (p.data_ptr(), g.data_ptr(), m.codes.data_ptr(), m.absmax.data_ptr(), p.numel(), map4)
    return (p.data_ptr(), g.data_ptr(), m.data_ptr(), 0, p.numel(), 0)


def _as_int32(u: int) -> int:
    """uint32 bits as the int32 the kernel's info table holds."""
    return u - (1 << 32) if u >= (1 << 31) else u


def _info(p: torch.Tensor, gdtype: torch.dtype, m: Momentum, hp: StepHyper) -> tuple[int, ...]:
    key = 0
    if isinstance(m, QuantizedState) and m.bits == 4:
        mode = _MODE_4
        key = _as_int32(hp.mseed)
    elif isinstance(m, QuantizedState):
        mode = _MODE_8_TENSOR if m.block_size is None else _MODE_8_BLOCK
    else:
        mode = _MODE_32
    srkey = _as_int32(rounding.key32(hp.seed)) if hp.stochastic_rounding else 0
    return (mode, _DTYPE_CODE[p.dtype], _DTYPE_CODE[gdtype], _hyper_flags(hp), key, srkey)


def _hyper_flags(hp: StepHyper) -> int:
    # 4: round stochastically (the kernel does so for bf16 parameters only)
    gsc = hp.grad_scale != 1.0 or hp.clip_value is not None
    return int(hp.skip_zeros) | 2 * int(gsc) | 4 * int(hp.stochastic_rounding)


class Prepared:
    """``CompiledBackend`` tables for a fixed list of tensors: each ``run`` fills in only the
    gradient pointers (and the hyperparameter rows when the list of StepHypers changed)."""

    def __init__(
        self, backend: CompiledBackend, params: Sequence[torch.Tensor], gdtypes: Sequence[torch.dtype],
        moms: Sequence[Momentum], qc: Optional[np.ndarray],
    ) -> None:
        self.backend = backend
        self.n = len(params)
        self.ptr = np.array([_pointers(p, p, m) for p, m in zip(params, moms)], dtype=np.int64).reshape(self.n, _NPTR).T.copy()
        plain = StepHyper(0.0, 0.0, 0.0)
        self.info = np.array([_info(p, gd, m, plain) for p, gd, m in zip(params, gdtypes, moms)], dtype=np.int32)
        self.qc = qc
        self._hypers: Optional[Sequence[StepHyper]] = None
        self.hyper = np.zeros((self.n, 8), dtype=np.float32)
        self._numel = np.ascontiguousarray(self.ptr[4])
        self._gdt = np.ascontiguousarray(self.info[:, 2])
        self._grads: Optional[Sequence[torch.Tensor]] = None

    def _set_grads(self, grads: Sequence[torch.Tensor], ptrs: Optional[Sequence[int]] = None) -> None:
        # the pointers of this step's gradients (``ptrs`` if the caller read them already),
        # written once for the finite check and the step
        if grads is not self._grads:
            if ptrs is None:
                ptrs = np.fromiter((g.data_ptr() for g in grads), dtype=np.int64, count=self.n)
            self.ptr[1] = ptrs
            self._grads = grads

    def all_finite(self, grads: Sequence[torch.Tensor], ptrs: Optional[Sequence[int]] = None) -> bool:
        """True if no gradient holds NaN or inf (one pass, as ``all_finite``); ``ptrs``: their
        data pointers, if already read."""
        self._set_grads(grads, ptrs)
        out = np.ones(self.n, dtype=np.uint8)
        g = np.ascontiguousarray(self.ptr[1])
        self.backend._lib.lk_all_finite(self.n, g.ctypes.data, self._numel.ctypes.data, self._gdt.ctypes.data,
                                        out.ctypes.data, torch.get_num_threads())
        finite = bool(out.all())
        if not finite:
            self._grads = None
        return finite

    def run(
        self, grads: Sequence[torch.Tensor], hypers: Sequence[StepHyper], srkeys: Optional[np.ndarray] = None,
        mkeys: Optional[np.ndarray] = None, ptrs: Optional[Sequence[int]] = None,
    ) -> None:
        """One step; ``srkeys`` / ``mkeys`` (uint32, one per tensor): this step's stochastic-
        rounding keys of the bf16 tensors whose StepHyper asks for it, and of the 4-bit momenta
        (the hypers' own seeds are not read)."""
        if hypers is not self._hypers:
            rows: dict[int, tuple[tuple[float, ...], int]] = {}
            table, flags = [], []
            for hp in hypers:
                row = rows.get(id(hp))
                if row is None:
                    row = rows[id(hp)] = (hyper_row(hp), _hyper_flags(hp))
                table.append(row[0])
                flags.append(row[1])
            self.hyper = np.array(table, dtype=np.float32)
            self.info[:, 3] = flags
            self._hypers = hypers
        if srkeys is not None:
            self.info[:, 5] = srkeys.view(np.int32)
        if mkeys is not None:
            self.info[:, 4] = mkeys.view(np.int32)
        self._set_grads(grads, ptrs)
        try:
            self.backend._launch(self.n, self.ptr, self.info.reshape(-1), self.hyper, self.qc)
        finally:
            self._grads = None  # never keep gradients alive after the step (zero_grad frees them)
