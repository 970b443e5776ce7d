"""``lionkit bench``: how fast an optimizer step is, against what the machine can do.

An optimizer step streams over memory: read p, g and the state, write p and the state. So the
yardstick is this machine's in-place streaming bandwidth, measured in the same run: the best
of an in-place scale (``x.mul_(s)``: 8 bytes per fp32 element) and torch's fused AdamW (28
bytes per fp32 parameter). For a GPT-2-shaped set of tensors (12 layers, vocabulary 50257,
context 1024, d_model chosen to reach ``--params``; 148 tensors, most of them small), each
variant reports:

- **step ms**: median over ``--rounds`` rounds; each round steps every variant once, in turn,
  so a change in machine load hits all variants alike and no variant keeps its data in cache;
- **GB/s**: bytes the step must move (2x the parameter, the gradient, 2x every state tensor)
  divided by the step time, and **of ceiling**: that over the ceiling;
- **first step**: the first ``step()`` of a fresh process (state allocation, kernel loading),
  with a warm kernel cache; **cold**: the same with an empty cache (the C++ build for the
  compiled CPU kernel, Triton's compilation on CUDA);
- **extra MiB**: peak memory a (non-first) step allocates beyond what existed before it. CPU:
  the process's peak resident set size (``VmHWM``) reset just before the step through
  ``/proc/self/clear_refs`` and read after it, in a separate process run with
  ``MALLOC_MMAP_THRESHOLD_=65536`` so that glibc maps every large temporary afresh instead of
  recycling freed pages (which would hide it). CUDA: ``torch.cuda.max_memory_allocated``.

Variants: lionkit 32/8/4-bit momentum x fp32/bf16 parameters x each backend (4-bit: the
compiled CPU kernel and the eager backend), and the installed
peers on the same tensors: bitsandbytes ``Lion``/``Lion8bit``, lion-pytorch (plain and
foreach), DeepSpeed's ``DeepSpeedCPULion`` (CPU), torch ``AdamW(fused=True)``. A peer that is
missing or fails says why in the table instead of a number. The run ends with the goals of the
fused kernels, each marked met or not. ``--json PATH`` writes everything, with a
description of the machine.

Example::

    lionkit bench                       # ~23M parameters, CPU, a few minutes
    lionkit bench --params 60e6 --json bench.json
    lionkit bench --quick               # tiny sizes, seconds: a smoke test
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

RESULT_TAG = "LIONKIT_BENCH_RESULT "
VOCAB, CONTEXT, LAYERS = 50257, 1024, 12


# ---------------------------------------------------------------------- the model's tensors
def gpt2_shapes(n_params: float, layers: int = LAYERS) -> list[tuple[str, tuple[int, ...]]]:
    """Tensor names and shapes of a GPT-2-like model (tied embeddings) with about ``n_params``
    parameters: ``layers`` blocks, d_model the multiple of 8 that comes closest."""

    def total(d: int) -> int:
        return VOCAB * d + CONTEXT * d + layers * (12 * d * d + 13 * d) + 2 * d

    d = 8
    while abs(total(d + 8) - n_params) < abs(total(d) - n_params):
        d += 8
    shapes = [("wte", (VOCAB, d)), ("wpe", (CONTEXT, d))]
    for i in range(layers):
        h = f"h.{i}."
        shapes += [
            (h + "ln_1.weight", (d,)), (h + "ln_1.bias", (d,)),
            (h + "attn.c_attn.weight", (d, 3 * d)), (h + "attn.c_attn.bias", (3 * d,)),
            (h + "attn.c_proj.weight", (d, d)), (h + "attn.c_proj.bias", (d,)),
            (h + "ln_2.weight", (d,)), (h + "ln_2.bias", (d,)),
            (h + "mlp.c_fc.weight", (d, 4 * d)), (h + "mlp.c_fc.bias", (4 * d,)),
            (h + "mlp.c_proj.weight", (4 * d, d)), (h + "mlp.c_proj.bias", (d,)),
        ]
    shapes += [("ln_f.weight", (d,)), ("ln_f.bias", (d,))]
    return shapes


def make_params(shapes, dtype, device, seed: int = 0) -> list:
    """Parameters with fixed gradients (deterministic, scaled like real ones)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    params = []
    for _, shape in shapes:
        p = torch.nn.Parameter((torch.randn(shape, generator=gen) * 0.02).to(device=device, dtype=dtype))
        p.grad = (torch.randn(shape, generator=gen) * 1e-3).to(device=device, dtype=dtype)
        params.append(p)
    return params


_READ_ONLY_STATE = {"qmap1", "qmap2", "step", "gnorm_vec"}


def step_bytes(opt, params) -> int:
    """Bytes one step must move: read and write p, read g, read and write each state tensor."""
    import torch

    total = 0
    for p in params:
        total += 2 * p.numel() * p.element_size() + p.grad.numel() * p.grad.element_size()
        state = opt.state.get(p, {})
        if "__bnb_optimizer_quant_state__" in state:
            state = {**state, **state["__bnb_optimizer_quant_state__"]}
        for key, value in state.items():
            if key == "exp_avg_sq" and type(opt).__name__ == "DeepSpeedCPULion":
                continue  # allocated by DeepSpeed's Lion but never read or written by its step
            if isinstance(value, torch.Tensor) and key not in _READ_ONLY_STATE and value.numel() > 1:
                total += 2 * value.numel() * value.element_size()
            elif isinstance(value, torch.Tensor) and key not in _READ_ONLY_STATE:
                total += 2 * value.element_size()
    return total


# ---------------------------------------------------------------------- variants
@dataclass
class Variant:
    """One optimizer configuration to measure."""

    name: str  # table label
    family: str  # "lionkit", "peer" or "ceiling"
    dtype: str  # "fp32" / "bf16"
    backend: str = ""  # lionkit backend, or the peer's package
    bits: int = 32
    compiles: bool = False  # first step includes a build/compile (measure cold too)
    guard: bool = False  # lionkit: keep the default non-finite-gradient check (nonfinite="raise")
    # one tensor holding all the model's parameters: the kernel's speed without the optimizer's
    # per-tensor Python work (the goals are judged on the real, many-tensor rows)
    flat: bool = False
    sr: bool = False  # lionkit, bf16: stochastic rounding of the parameters

    def key(self) -> str:
        return f"{self.name} [{self.dtype}]"


def _dtype(name: str):
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def build_optimizer(v: Variant, params) -> Any:
    """The optimizer object for variant ``v`` (raises with the reason when it cannot run)."""
    import torch

    lr, betas, wd = 1e-4, (0.9, 0.99), 0.01
    if v.family == "lionkit":
        import lionkit

        import inspect

        cls = {8: lionkit.Lion8bit, 4: lionkit.Lion4bit}.get(v.bits, lionkit.Lion)
        kw = {}
        from .optimizer import _LionBase

        if not v.guard and "nonfinite" in inspect.signature(_LionBase.__init__).parameters:
            # the step itself: without the separate pass over every gradient that the default
            # nonfinite="raise" makes (its cost is the "+ finite check" row)
            kw["nonfinite"] = "propagate"
        if v.sr:
            kw.update(stochastic_rounding=True, sr_seed=0)
        return cls(params, lr=lr, betas=betas, weight_decay=wd, backend=v.backend, **kw)
    if v.name == "bnb Lion":
        import bitsandbytes as bnb

        return bnb.optim.Lion(params, lr=lr, betas=betas, weight_decay=wd, optim_bits=32)
    if v.name == "bnb Lion8bit":
        import bitsandbytes as bnb

        return bnb.optim.Lion8bit(params, lr=lr, betas=betas, weight_decay=wd)
    if v.name == "lion-pytorch":
        import lion_pytorch

        return lion_pytorch.Lion(params, lr=lr, betas=betas, weight_decay=wd)
    if v.name == "lion-pytorch foreach":
        from lion_pytorch.foreach import Lion as ForeachLion

        return ForeachLion(params, lr=lr, betas=betas, weight_decay=wd)
    if v.name == "DeepSpeed CPULion":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        from deepspeed.ops.lion import DeepSpeedCPULion

        return DeepSpeedCPULion(params, lr=lr, betas=betas, weight_decay=wd)
    if v.name == "torch AdamW fused":
        return torch.optim.AdamW(params, lr=lr, weight_decay=wd, fused=True)
    raise ValueError(f"unknown variant {v.name!r}")


def variants_for(device: str, peers: bool) -> list[Variant]:
    """Every variant measured on ``device``."""
    fast = "compiled" if device == "cpu" else "triton"
    out = []
    for dt in ("fp32", "bf16"):
        for bits in (32, 8):
            out.append(Variant(f"lionkit {bits}-bit {fast}", "lionkit", dt, fast, bits, compiles=True))
            out.append(Variant(f"lionkit {bits}-bit torch", "lionkit", dt, "torch", bits))
        out.append(Variant(f"lionkit 32-bit {fast} +check", "lionkit", dt, fast, 32, guard=True))
        if dt == "bf16":  # pure-bf16 training's recipe: weights rounded stochastically
            out.append(Variant(f"lionkit 8-bit {fast} +SR", "lionkit", dt, fast, 8, sr=True))
        # 4-bit momentum: fused on the CPU; the eager backend elsewhere (no Triton kernel yet)
        if device == "cpu":
            out.append(Variant(f"lionkit 4-bit {fast}", "lionkit", dt, fast, 4))
        out.append(Variant("lionkit 4-bit torch", "lionkit", dt, "torch", 4))
        for bits in (32, 8):
            out.append(Variant(f"lionkit {bits}-bit {fast} flat", "lionkit", dt, fast, bits, flat=True))
    if peers:
        for dt in ("fp32", "bf16"):
            out += [
                Variant("bnb Lion", "peer", dt, "bitsandbytes", 32),
                Variant("bnb Lion8bit", "peer", dt, "bitsandbytes", 8),
                Variant("lion-pytorch", "peer", dt, "lion_pytorch", 32),
                Variant("lion-pytorch foreach", "peer", dt, "lion_pytorch", 32),
            ]
            if device == "cpu":
                out.append(Variant("DeepSpeed CPULion", "peer", dt, "deepspeed", 32, compiles=True))
            out.append(Variant("torch AdamW fused", "peer", dt, "torch", 32))
    return out


# ---------------------------------------------------------------------- measuring
def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def _timed(fn: Callable[[], Any], device: str) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def _rss_now() -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _hwm() -> Optional[int]:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return None


def peak_extra_memory(fn: Callable[[], Any], device: str) -> tuple[Optional[int], str]:
    """(peak bytes allocated by ``fn`` beyond what existed before, how it was measured)."""
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return max(0, torch.cuda.max_memory_allocated() - before), "torch.cuda.max_memory_allocated"
    try:
        before = _rss_now()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak RSS (VmHWM) to the current RSS
        fn()
        peak = _hwm()
    except OSError as e:
        return None, f"unavailable ({e})"
    if before is None or peak is None:
        return None, "unavailable (no /proc/self/status)"
    return max(0, peak - before), "peak RSS (VmHWM reset) with MALLOC_MMAP_THRESHOLD_=65536"


def _shapes_of(v: Variant, shapes: list[tuple[str, tuple[int, ...]]]) -> list[tuple[str, tuple[int, ...]]]:
    """The model's tensors, or for a ``flat`` variant one tensor of the same total size."""
    return [("flat", (sum(math.prod(s) for _, s in shapes),))] if v.flat else shapes


def worker_first_step(spec: dict) -> dict:
    """In a fresh process: the first step's time, then the extra memory of a later step."""
    import torch

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    v = Variant(**spec["variant"])
    device = spec["device"]
    params = make_params(_shapes_of(v, gpt2_shapes(spec["params"])), _dtype(v.dtype), device)
    opt = build_optimizer(v, params)
    first = _timed(opt.step, device)
    opt.step()
    extra, how = peak_extra_memory(opt.step, device)
    out = {"first_step_s": first, "extra_bytes": extra, "memory_method": how}
    if v.family == "lionkit":
        out["backends_used"] = dict(opt.backends_used)
    return out


def worker_timing(spec: dict) -> dict:
    """In one process: every variant and the ceiling, round-robin, ``rounds`` times."""
    import torch

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    device = spec["device"]
    shapes = gpt2_shapes(spec["params"])
    n = sum(math.prod(s) for _, s in shapes)
    runs: dict[str, dict] = {}
    steppers: dict[str, Callable[[], Any]] = {}
    # the ceiling: an in-place scale over one buffer as large as the model, and fused AdamW
    buf = torch.randn(n, device=device)
    steppers["ceiling: in-place scale [fp32]"] = lambda: buf.mul_(0.999)
    runs["ceiling: in-place scale [fp32]"] = {"bytes": 8 * n}
    adam_params = make_params(shapes, torch.float32, device, seed=1)
    adam = torch.optim.AdamW(adam_params, lr=1e-4, fused=True)
    adam.step()
    steppers["ceiling: AdamW fused [fp32]"] = adam.step
    runs["ceiling: AdamW fused [fp32]"] = {"bytes": step_bytes(adam, adam_params)}
    for vd in spec["variants"]:
        v = Variant(**vd)
        try:
            params = make_params(_shapes_of(v, shapes), _dtype(v.dtype), device)
            opt = build_optimizer(v, params)
            opt.step()  # state
            opt.step()
            runs[v.key()] = {"bytes": step_bytes(opt, params)}
            if v.family == "lionkit":
                runs[v.key()]["backends_used"] = dict(opt.backends_used)
            steppers[v.key()] = opt.step
        except Exception as e:  # a peer that does not run here: report why
            msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
            runs[v.key()] = {"error": f"{type(e).__name__}: {msg}"[:160]}
    times: dict[str, list[float]] = {k: [] for k in steppers}
    for _ in range(spec["rounds"]):
        for k, fn in steppers.items():
            times[k].append(_timed(fn, device))
    for k, ts in times.items():
        runs[k]["times_s"] = ts
        runs[k]["step_s"] = statistics.median(ts)
        runs[k]["min_s"] = min(ts)
    return {"runs": runs, "numel": n, "tensors": len(shapes)}


def _run_worker(kind: str, spec: dict, env: dict, timeout: float) -> dict:
    """Run a worker in a fresh interpreter; its result is the tagged JSON line it prints."""
    cmd = [sys.executable, "-m", "lionkit.bench", "--worker", kind, json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    for line in proc.stdout.splitlines()[::-1]:
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG) :])
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return {"error": f"worker failed (exit {proc.returncode}): {tail}"[:200]}


# ---------------------------------------------------------------------- report
def machine_info(device: str) -> dict:
    """What the numbers were measured on."""
    import torch

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    try:
        with open("/proc/cpuinfo") as f:
            names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
        info["cpu"] = names[0] if names else platform.processor()
    except OSError:
        info["cpu"] = platform.processor()
    try:
        with open("/proc/meminfo") as f:
            info["mem_gib"] = round(int(f.readline().split()[1]) / 2**20, 1)
    except OSError:
        pass
    if hasattr(os, "getloadavg"):
        info["loadavg_start"] = [round(x, 2) for x in os.getloadavg()]
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name()
    try:
        from .kernels import compiled

        info["cpu_kernel_isa"] = compiled.isa_name()
    except Exception as e:  # no compiler
        info["cpu_kernel_isa"] = f"unavailable: {e}".splitlines()[0]
    from importlib import metadata

    for dist in ("bitsandbytes", "lion-pytorch", "deepspeed", "triton"):
        try:
            info[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            info[dist] = None
    return info


def _fmt(x: Optional[float], spec: str, none: str = "-") -> str:
    return none if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def evaluate_goals(rows: dict[str, dict], device: str) -> list[dict]:
    """The goals of the fused kernels, each with the measured value and met or not."""
    goals = []
    fast = "compiled" if device == "cpu" else "triton"

    def row(name: str, dt: str) -> Optional[dict]:
        r = rows.get(f"{name} [{dt}]")
        return r if r and r.get("step_s") else None

    def add(text: str, value: Optional[float], ok: Optional[bool], fmt: str) -> None:
        goals.append({"goal": text, "value": value, "met": ok, "shown": _fmt(value, fmt, "n/a")})

    for dt in ("fp32", "bf16"):
        r32, r8 = row(f"lionkit 32-bit {fast}", dt), row(f"lionkit 8-bit {fast}", dt)
        f32 = r32["of_ceiling"] if r32 else None
        f8 = r8["of_ceiling"] if r8 else None
        add(f"{dt}: 32-bit step >= 0.85 of ceiling", f32, None if f32 is None else f32 >= 0.85, ".2f")
        add(f"{dt}: 8-bit step >= 0.70 of ceiling", f8, None if f8 is None else f8 >= 0.70, ".2f")
        ratio = r32["step_s"] / r8["step_s"] if r32 and r8 else None
        add(f"{dt}: 8-bit no slower than 32-bit (32-bit time / 8-bit time >= 1)", ratio,
            None if ratio is None else ratio >= 1.0, ".2f")
        for peer, bits, need in (("bnb Lion8bit", 8, 15.0), ("lion-pytorch", 32, 4.0), ("DeepSpeed CPULion", 32, 1.0)):
            if peer == "DeepSpeed CPULion" and device != "cpu":
                continue
            ours, theirs = row(f"lionkit {bits}-bit {fast}", dt), row(peer, dt)
            x = theirs["step_s"] / ours["step_s"] if ours and theirs else None
            add(f"{dt}: >= {need:g}x {peer} ({bits}-bit vs its step)", x, None if x is None else x >= need, ".1f")
    extra = [r.get("extra_bytes") for k, r in rows.items() if k.startswith("lionkit") and fast in k]
    extra = [e for e in extra if e is not None]
    worst = max(extra) / 2**20 if extra else None
    add("extra memory of a step <= 16 MiB (worst lionkit fused variant)", worst, None if worst is None else worst <= 16, ".2f")
    colds = [r.get("cold_first_step_s") for k, r in rows.items() if k.startswith("lionkit") and fast in k]
    colds = [c for c in colds if c is not None]
    cold = max(colds) if colds else None
    add("cold start (first step, empty cache) <= 30 s", cold, None if cold is None else cold <= 30, ".2f")
    warms = [r.get("first_step_s") for k, r in rows.items() if k.startswith("lionkit") and fast in k]
    warms = [w for w in warms if w is not None]
    warm = max(warms) if warms else None
    add("warm start (first step, cache populated) <= 3 s", warm, None if warm is None else warm <= 3, ".2f")
    return goals


def render(result: dict) -> str:
    """The table and the goals as text."""
    lines = []
    m = result["machine"]
    lines.append(
        f"lionkit bench: {result['numel'] / 1e6:.1f}M parameters in {result['tensors']} tensors (GPT-2 shaped), "
        f"device {result['device']}, {m.get('cpu', '?')}, {m.get('cpu_count')} cores, torch {m.get('torch')} "
        f"({m.get('torch_threads')} threads), median of {result['rounds']} rounds"
    )
    lines.append(f"ceiling: {result['ceiling_gbs']:.1f} GB/s (best of: " + ", ".join(
        f"{k.split(': ')[1].split(' [')[0]} {v:.1f}" for k, v in result["ceiling_parts"].items()) + ")")
    head = f"{'variant':<30} {'params':<6} {'step ms':>9} {'GB/s':>7} {'of ceil':>8} {'1st step s':>10} {'cold s':>8} {'extra MiB':>10}"
    lines += ["", head, "-" * len(head)]
    for key, r in result["rows"].items():
        name, dt = key.rsplit(" [", 1)
        dt = dt.rstrip("]")
        if not r.get("step_s"):
            lines.append(f"{name:<30} {dt:<6} n/a: {r.get('error') or r.get('first_error') or 'not measured'}")
            continue
        extra = None if r.get("extra_bytes") is None else r["extra_bytes"] / 2**20
        lines.append(
            f"{name:<30} {dt:<6} {_fmt(r['step_s'] * 1e3, '9.2f')} {_fmt(r.get('gbs'), '7.1f')} "
            f"{_fmt(r.get('of_ceiling'), '8.2f')} {_fmt(r.get('first_step_s'), '10.2f')} "
            f"{_fmt(r.get('cold_first_step_s'), '8.2f')} {_fmt(extra, '10.2f')}"
        )
    if result.get("goals"):
        lines += ["", "goals of the fused kernels:"]
        for g in result["goals"]:
            mark = "n/a " if g["met"] is None else ("MET " if g["met"] else "MISS")
            lines.append(f"  [{mark}] {g['goal']}: {g['shown']}")
    notes = result.get("notes") or []
    if notes:
        lines += [""] + [f"note: {n}" for n in notes]
    return "\n".join(lines)


# ---------------------------------------------------------------------- main
def run(args: argparse.Namespace) -> dict:
    """Measure everything; returns the result dict (also what --json writes)."""
    device = args.device
    variants = variants_for(device, peers=not args.no_peers)
    if args.variants:
        pat = re.compile(args.variants)
        variants = [v for v in variants if pat.search(v.key())]
    cache_root = tempfile.mkdtemp(prefix="lionkit-bench-")
    base_env = dict(os.environ)
    base_env.setdefault("DS_ACCELERATOR", "cpu" if device == "cpu" else base_env.get("DS_ACCELERATOR", "cuda"))
    # One kernel cache for the whole run, empty at the start: the first run of each compiling
    # backend builds into it (its cold start), every later run finds it populated (warm).
    base_env["LIONKIT_CACHE_DIR"] = os.path.join(cache_root, "lionkit")
    base_env["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(cache_root, "inductor")
    base_env["TRITON_CACHE_DIR"] = os.path.join(cache_root, "triton")
    mem_env = {**base_env, "MALLOC_MMAP_THRESHOLD_": "65536"}
    spec_common = {"device": device, "params": args.params, "threads": args.threads}
    notes: list[str] = []
    rows: dict[str, dict] = {}
    try:
        # 1. first steps and memory, one fresh process per variant (cold: the first run of a
        # compiling lionkit backend, before the warm run of the same variant)
        cold_done: set[str] = set()
        for v in variants:
            r: dict[str, Any] = {}
            spec = {**spec_common, "variant": vars(v)}
            if v.compiles and v.family == "lionkit" and v.backend not in cold_done:
                cold_done.add(v.backend)
                cold = _run_worker("first", spec, mem_env, args.timeout)
                r["cold_first_step_s"] = cold.get("first_step_s")
                if "error" in cold:
                    r["first_error"] = cold["error"]
            first = _run_worker("first", spec, mem_env, args.timeout)
            for key in ("first_step_s", "extra_bytes", "memory_method", "backends_used"):
                if key in first:
                    r[key] = first[key]
            if "error" in first:
                r["first_error"] = first["error"]
            rows[v.key()] = r
            if args.verbose:
                print(f"  first step / memory: {v.key()}: {r}", file=sys.stderr)
        # 2. step times: all variants and the ceiling, interleaved, in one process
        timing = _run_worker(
            "timing", {**spec_common, "variants": [vars(v) for v in variants], "rounds": args.rounds},
            base_env, args.timeout * max(1, len(variants)),
        )
    finally:
        shutil.rmtree(cache_root, ignore_errors=True)
    if "error" in timing:
        raise RuntimeError(f"the timing run failed: {timing['error']}")
    runs = timing["runs"]
    ceiling_parts = {k: runs[k]["bytes"] / runs[k]["step_s"] / 1e9 for k in runs if k.startswith("ceiling")}
    ceiling = max(ceiling_parts.values())
    for v in variants:
        r = rows[v.key()]
        t = runs.get(v.key(), {})
        if "step_s" in t:
            r.update(step_s=t["step_s"], min_s=t["min_s"], bytes=t["bytes"], times_s=t["times_s"])
            r["gbs"] = t["bytes"] / t["step_s"] / 1e9
            r["of_ceiling"] = r["gbs"] / ceiling
            if "backends_used" in t:
                r["backends_used"] = t["backends_used"]
        elif "error" in t:
            r["error"] = t["error"]
    for k in list(ceiling_parts):
        rows[k] = {"step_s": runs[k]["step_s"], "min_s": runs[k]["min_s"], "bytes": runs[k]["bytes"],
                   "gbs": ceiling_parts[k], "of_ceiling": ceiling_parts[k] / ceiling, "times_s": runs[k]["times_s"]}
    machine = machine_info(device)
    if hasattr(os, "getloadavg"):
        machine["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
        if machine["loadavg_start"][0] > 0.5 * (os.cpu_count() or 1):
            notes.append(
                f"the machine was busy (load average {machine['loadavg_start'][0]} at the start, "
                f"{machine['loadavg_end'][0]} at the end, {os.cpu_count()} cores): absolute numbers are low, "
                "ratios within the run are what to read"
            )
    methods = {r.get("memory_method") for r in rows.values() if r.get("memory_method")}
    if methods:
        notes.append("extra memory measured by: " + "; ".join(sorted(methods)))
    notes = list(dict.fromkeys(notes))
    result = {
        "device": device, "numel": timing["numel"], "tensors": timing["tensors"], "rounds": args.rounds,
        "params_requested": args.params, "ceiling_gbs": ceiling, "ceiling_parts": ceiling_parts,
        "rows": rows, "machine": machine, "notes": notes,
    }
    result["goals"] = evaluate_goals(rows, device) if not args.no_goals else []
    return result


def build_parser() -> argparse.ArgumentParser:
    """``lionkit bench`` options."""
    ap = argparse.ArgumentParser(
        prog="lionkit bench",
        description="Step time, bandwidth, first-step time and step memory of lionkit's Lion variants "
        "and the installed peers, against this machine's streaming bandwidth ceiling.",
    )
    ap.add_argument("--params", type=float, default=23e6, help="model size in parameters (default 23e6, >= 16e6 for the goals)")
    ap.add_argument("--rounds", type=int, default=9, help="timed rounds (median reported; default 9)")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's default)")
    ap.add_argument("--variants", default="", help="regular expression selecting variants by name")
    ap.add_argument("--no-peers", action="store_true", help="lionkit only")
    ap.add_argument("--no-goals", action="store_true", help="do not evaluate the fused kernels' speed and memory goals")
    ap.add_argument("--quick", action="store_true", help="tiny model, 2 rounds, no goals: a smoke test (a few minutes on 2 cores: dozens of fresh processes, and the kernel's first C++ build)")
    ap.add_argument("--json", metavar="PATH", help="write the full results as JSON")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds allowed per worker process")
    ap.add_argument("--verbose", action="store_true", help="progress on stderr")
    ap.add_argument("--worker", nargs=2, metavar=("KIND", "SPEC"), help=argparse.SUPPRESS)
    return ap


def _check_writable(ap: argparse.ArgumentParser, option: str, path: str) -> None:
    """A usage error now, not after minutes of measuring, if ``path`` cannot be written."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        ap.error(f"{option} {path!r} is a directory")
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        ap.error(f"{option} {path!r}: folder {folder!r} does not exist or is not writable")


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point of ``lionkit bench``; returns the exit status."""
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.worker:
        kind, spec = args.worker
        fn = {"first": worker_first_step, "timing": worker_timing}[kind]
        try:
            out = fn(json.loads(spec))
        except Exception as e:
            out = {"error": f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:200]}
        print(RESULT_TAG + json.dumps(out), flush=True)
        return 0
    if args.rounds < 1:
        ap.error(f"--rounds must be >= 1, got {args.rounds}")
    if args.params < 1e4 and not args.quick:
        ap.error(f"--params must be >= 1e4, got {args.params:g}")
    if args.device not in ("cpu", "cuda") and not args.device.startswith("cuda:"):
        ap.error(f"--device must be cpu or cuda, got {args.device!r}")
    if args.device != "cpu":
        import torch

        if not torch.cuda.is_available():
            ap.error(f"--device {args.device}: no CUDA device here (torch {torch.__version__}); use --device cpu")
    if not args.timeout > 0:
        ap.error(f"--timeout must be > 0 seconds, got {args.timeout:g}")
    if args.variants:
        try:
            re.compile(args.variants)
        except re.error as e:
            ap.error(f"--variants {args.variants!r} is not a valid regular expression: {e}")
    if args.json:
        _check_writable(ap, "--json", args.json)
    if args.quick:
        args.params = min(args.params, 3e5)
        args.rounds = min(args.rounds, 2)
        args.no_goals = True
    result = run(args)
    print(render(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
