"""Can Lion's momentum live in 4 bits? A study on the tasks of ``lionkit compare``.

Lion keeps one state, the momentum ``m <- beta2 * m + (1 - beta2) * g`` (beta2 = 0.98-0.99),
and steps along ``sign(beta1 * m + (1 - beta1) * g)``. Stored in k bits, ``m`` is re-quantized
every step. Each step moves it by ``(1 - beta2) * (g - m)``, 1-2% of its size; with 8 bits the
block-wise dynamic map resolves that, with 4 bits (15 levels) rounding to nearest sends it back
to the same code and the momentum stalls. This script measures what each fix buys:

* maps: linear (15 evenly spaced levels), dynamic (sign + 3-bit exponent, the 4-bit analogue of
  bitsandbytes' dynamic map), a normal-quantile map (levels at quantiles of a Gaussian, the shape
  of QLoRA's NF4), and a map fitted to Lion's momentum (quantiles of |m|/absmax measured on the
  task itself, i.e. "a map designed for Lion");
* block sizes 256, 64, 32, 16 (smaller blocks: finer scales, more scale bytes);
* stochastic rounding of the momentum (unbiased, so the EMA does not stall; but its noise
  accumulates over ~1/(1-beta2^2) steps);
* error feedback: the quantization residual carried to the next step, itself stored in 2 or 4
  bits (the only way to keep it that is not a full-precision buffer);
* other splits of the byte budget: 5 and 6 bits, and a larger beta2 spacing (beta2 = 0.9).

Everything is simulated in fp32 with fp32 weights (the update is ``lionkit.reference``'s), and
checked against the real ``Lion8bit`` for the 8-bit map. Measured per variant: final validation
loss (mean over seeds) against 32-bit Lion, the bytes per parameter of the state, and the
"sign agreement": the fraction of coordinates whose update has the sign the exact (fp32) momentum
of the same trajectory would give.

Usage::

    python scripts/fourbit_study.py                     # the study in docs/fourbit.md
    python scripts/fourbit_study.py --quick             # smoke run
    python scripts/fourbit_study.py --variants fp32,q8-dyn-b256,q4-dyn-b32-sr --seeds 2
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any, Optional

import torch

from lionkit import compare, quant, tasks
from lionkit.reference import lion_reference

MIN_QUANT_SIZE = 4096  # as Lion8bit's min_8bit_size: smaller tensors keep fp32 momentum


# ---------------------------------------------------------------------------------- maps
def linear_map(bits: int) -> torch.Tensor:
    """2**bits - 1 evenly spaced levels in [-1, 1] (symmetric, with 0)."""
    half = 2 ** (bits - 1) - 1
    return torch.arange(-half, half + 1, dtype=torch.float32) / half


def dynamic_map(bits: int) -> torch.Tensor:
    """Sign + exponent: 0 and +-2**-k for k = 0 .. 2**(bits-1) - 2 (for 8 bits use bnb's map)."""
    if bits == 8:
        return quant.dynamic_map()
    n = 2 ** (bits - 1) - 1
    mags = torch.tensor([2.0**-k for k in range(n)], dtype=torch.float32)
    return torch.cat([-mags, torch.zeros(1), mags]).sort().values


def normal_quantile_map(bits: int) -> torch.Tensor:
    """Levels at evenly spaced quantiles of a standard normal, scaled to [-1, 1], with 0."""
    n = 2 ** (bits - 1) - 1
    probs = torch.linspace(0.5, 0.995, n + 1, dtype=torch.float64)[1:]
    q = torch.special.ndtri(probs)
    mags = (q / q.max()).to(torch.float32)
    return torch.cat([-mags.flip(0), torch.zeros(1), mags]).sort().values


def fitted_map(samples: torch.Tensor, bits: int) -> torch.Tensor:
    """Levels at evenly spaced quantiles of the observed |m| / block absmax (both signs, with 0,
    and 1 as the top level): a map fitted to Lion's momentum on the task."""
    n = 2 ** (bits - 1) - 1
    s = samples.abs().flatten().double()
    s = s[s > 0]
    probs = torch.linspace(0, 1, n + 1, dtype=torch.float64)[1:-1]
    q = torch.quantile(s[torch.randperm(len(s), generator=torch.Generator().manual_seed(0))[:1_000_000]], probs)
    mags = torch.cat([q, torch.ones(1, dtype=torch.float64)]).to(torch.float32)
    mags = torch.unique(mags)
    return torch.cat([-mags.flip(0), torch.zeros(1), mags]).sort().values


# ---------------------------------------------------------------------------------- quantizer
def _block_scale(x: torch.Tensor, block: int) -> torch.Tensor:
    """Per-element scale: max |x| of its block (x flat, padded to whole blocks)."""
    n = x.numel()
    nb = -(-n // block)
    pad = torch.zeros(nb * block - n, dtype=x.dtype)
    absmax = torch.cat([x.abs(), pad]).view(nb, block).amax(1)
    return absmax.repeat_interleave(block)[:n], absmax


def quantize(x: torch.Tensor, qmap: torch.Tensor, block: int, stochastic: bool, gen: Optional[torch.Generator],
             keep_sign: bool = True):
    """(dequantized value, codes) of flat fp32 ``x`` with block-wise absmax scaling. ``keep_sign``
    (nearest rounding): a nonzero value never rounds to 0, as lionkit's 8-bit momentum; off for
    residuals, where it would turn every small residual into a full level."""
    scale, _ = _block_scale(x, block)
    normed = torch.where(scale > 0, x / scale, torch.zeros_like(x))
    if stochastic:
        # neighbours lo <= v <= hi in the map, up with probability (v - lo) / (hi - lo)
        hi_idx = torch.bucketize(normed, qmap).clamp(1, len(qmap) - 1)
        lo_v, hi_v = qmap[hi_idx - 1], qmap[hi_idx]
        p_up = ((normed - lo_v) / (hi_v - lo_v)).clamp(0, 1)
        u = torch.rand(normed.shape, generator=gen)
        codes = torch.where(u < p_up, hi_idx, hi_idx - 1)
    else:
        codes = quant.nearest_code(normed, qmap).long() if len(qmap) == 256 else _nearest(normed, qmap, keep_sign)
    return qmap[codes] * scale, codes


def _nearest(normed: torch.Tensor, qmap: torch.Tensor, keep_sign: bool = True) -> torch.Tensor:
    """Nearest level, ties up; with ``keep_sign`` a nonzero value keeps its sign (the smallest
    level of its sign), as lionkit's 8-bit quantizer does."""
    mid = (qmap[1:] + qmap[:-1]) / 2
    codes = torch.bucketize(normed, mid, right=True)
    if not keep_sign:
        return codes
    zero = int((qmap == 0).nonzero()[0, 0])
    codes = torch.where((normed > 0) & (codes <= zero), zero + 1, codes)
    codes = torch.where((normed < 0) & (codes >= zero), zero - 1, codes)
    return codes


@dataclass(frozen=True)
class Variant:
    """How the momentum is stored."""

    name: str
    bits: int = 32  # 32 = fp32 momentum (no quantization)
    map: str = "dynamic"  # linear | dynamic | normal | fitted
    block: int = 256
    stochastic: bool = False
    ef_bits: int = 0  # error feedback residual stored in this many bits (0 = none)
    beta2: Optional[float] = None  # override of the task's beta2
    note: str = ""

    def state_bytes_per_element(self) -> float:
        """Bytes per element of a quantized tensor: codes + fp32 block scale (+ residual)."""
        if self.bits == 32:
            return 4.0
        b = self.bits / 8 + 4 / self.block
        if self.ef_bits:
            b += self.ef_bits / 8 + 4 / self.block
        return b


VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant("fp32", note="32-bit Lion, the reference"),
        Variant("q8-dyn-b256", 8, "dynamic", 256, note="Lion8bit's format (checked against lionkit.Lion8bit)"),
        Variant("q6-dyn-b256", 6, "dynamic", 256),
        Variant("q5-dyn-b64", 5, "dynamic", 64),
        Variant("q4-lin-b256", 4, "linear", 256, note="plain 4-bit"),
        Variant("q4-dyn-b256", 4, "dynamic", 256),
        Variant("q4-dyn-b64", 4, "dynamic", 64),
        Variant("q4-dyn-b32", 4, "dynamic", 32),
        Variant("q4-dyn-b16", 4, "dynamic", 16),
        Variant("q4-lin-b32", 4, "linear", 32),
        Variant("q4-nf-b32", 4, "normal", 32, note="normal-quantile map (NF4 shape)"),
        Variant("q4-fit-b32", 4, "fitted", 32, note="map fitted to Lion's momentum on the task"),
        Variant("q4-dyn-b256-sr", 4, "dynamic", 256, stochastic=True),
        Variant("q4-dyn-b32-sr", 4, "dynamic", 32, stochastic=True),
        Variant("q4-lin-b32-sr", 4, "linear", 32, stochastic=True),
        Variant("q4-fit-b32-sr", 4, "fitted", 32, stochastic=True),
        Variant("q4-nf-b32-sr", 4, "normal", 32, stochastic=True, note="fixed normal-quantile map + SR"),
        Variant("q4-dyn-b256-ef2", 4, "dynamic", 256, ef_bits=2, note="error feedback in 2 bits"),
        Variant("q4-dyn-b32-ef2", 4, "dynamic", 32, ef_bits=2, note="error feedback in 2 bits"),
        Variant("q4-dyn-b32-ef4", 4, "dynamic", 32, ef_bits=4, note="error feedback in 4 bits"),
        Variant("q4-dyn-b32-sr-b2=0.9", 4, "dynamic", 32, stochastic=True, beta2=0.9, note="beta2 0.9"),
        Variant("fp32-b2=0.9", 32, beta2=0.9, note="32-bit Lion with beta2 0.9 (what the previous row costs)"),
    )
}
DEFAULT_VARIANTS = tuple(VARIANTS)


class SimLion(torch.optim.Optimizer):
    """Lion with the momentum of every tensor >= MIN_QUANT_SIZE elements stored as ``variant``
    says (decoded, updated in fp32, re-encoded every step). Also tracks, for the diagnostics,
    the exact fp32 momentum of the same gradients (not part of the state it would need)."""

    def __init__(self, params, lr: float, betas: tuple[float, float], weight_decay: float, variant: Variant,
                 qmap: Optional[torch.Tensor], seed: int) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay))
        self.variant = variant
        self.qmap = qmap
        self.gen = torch.Generator().manual_seed(seed)
        self.agree = 0.0
        self.count = 0

    def _store(self, m_new: torch.Tensor, st: dict[str, Any]) -> torch.Tensor:
        v = self.variant
        if v.ef_bits:
            target = m_new + st["residual"]
        else:
            target = m_new
        deq, _ = quantize(target, self.qmap, v.block, v.stochastic, self.gen)
        if v.ef_bits:
            resid_map = linear_map(v.ef_bits) if v.ef_bits > 1 else torch.tensor([-1.0, 0.0, 1.0])
            st["residual"], _ = quantize(target - deq, resid_map, v.block, False, None, keep_sign=False)
        return deq

    @torch.no_grad()
    def step(self) -> None:
        v = self.variant
        for group in self.param_groups:
            b1, b2 = group["betas"]
            if v.beta2 is not None:
                b2 = v.beta2
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if not st:
                    st["m"] = torch.zeros(p.numel())
                    st["exact"] = torch.zeros(p.numel())
                    st["residual"] = torch.zeros(p.numel())
                g = p.grad.reshape(-1).float()
                m = st["m"]
                quantized = v.bits != 32 and p.numel() >= MIN_QUANT_SIZE
                p_new, m_new = lion_reference(p.reshape(-1).float(), g, m, lr=group["lr"], beta1=b1, beta2=b2,
                                              weight_decay=group["weight_decay"])
                # diagnostics: does the update have the sign the exact momentum would give?
                exact = st["exact"]
                c_exact = b1 * exact + (1 - b1) * g
                c_used = b1 * m + (1 - b1) * g
                if quantized:
                    self.agree += (torch.sign(c_exact) == torch.sign(c_used)).float().sum().item()
                    self.count += p.numel()
                st["exact"] = b2 * exact + (1 - b2) * g
                p.copy_(p_new.view_as(p))
                if quantized:
                    st["m"] = self._store(m_new, st)
                else:
                    st["m"] = m_new

    def state_bytes_per_param(self) -> float:
        """Bytes per parameter of the state this variant would keep (formula per tensor)."""
        total, n = 0.0, 0
        for group in self.param_groups:
            for p in group["params"]:
                quantized = self.variant.bits != 32 and p.numel() >= MIN_QUANT_SIZE
                total += p.numel() * (self.variant.state_bytes_per_element() if quantized else 4.0)
                n += p.numel()
        return total / n


# ---------------------------------------------------------------------------------- runs
@dataclass(frozen=True)
class StudyJob:
    task: str
    variant: str
    seed: int
    steps: int
    quick: bool
    lr: Optional[float] = None  # overrides compare.HYPER's Lion lr (for the small screening LM)


_FITTED: dict[tuple[str, int], torch.Tensor] = {}
_task = compare._task  # the tasks, built once per process as lionkit compare builds them


def _fit_map(job: StudyJob) -> torch.Tensor:
    """Fit the 4-bit map to the momentum of a short fp32-momentum run on the task (seed 1000,
    never one of the evaluated seeds), block size 32."""
    key = (job.task, job.steps)
    if key not in _FITTED:
        probe = Variant("probe", 32, block=32)
        opt_box = {}

        def build(params):
            opt_box["opt"] = _make_opt(params, job.task, probe, None, 1000, job.lr)
            return opt_box["opt"]

        tasks.train(_task(job.task, job.quick), build, seed=1000, steps=max(50, job.steps // 3), evals=1,
                    warmup_fraction=compare.HYPER[job.task].lion.warmup)
        opt = opt_box["opt"]
        samples = []
        for st in opt.state.values():
            m = st["m"]
            if m.numel() >= MIN_QUANT_SIZE:
                scale, _ = _block_scale(m, 32)
                samples.append((m / scale.clamp_min(1e-30))[scale > 0])
        _FITTED[key] = fitted_map(torch.cat(samples), 4)
    return _FITTED[key]


def _make_opt(params, task: str, variant: Variant, qmap, seed: int, lr: Optional[float] = None) -> SimLion:
    h = compare.HYPER[task].lion
    return SimLion(params, h.lr if lr is None else lr, h.betas, h.weight_decay, variant, qmap, seed)


def _qmap(variant: Variant, job: StudyJob) -> Optional[torch.Tensor]:
    if variant.bits == 32:
        return None
    if variant.map == "fitted":
        return _fit_map(job)
    return {"linear": linear_map, "dynamic": dynamic_map, "normal": normal_quantile_map}[variant.map](variant.bits)


def run_study_job(job: StudyJob) -> dict[str, Any]:
    """Train one (task, variant, seed) and measure it."""
    torch.set_num_threads(1)
    variant = VARIANTS[job.variant]
    qmap = _qmap(variant, job)
    box = {}

    def build(params):
        box["opt"] = _make_opt(params, job.task, variant, qmap, job.seed, job.lr)
        return box["opt"]

    rec = tasks.train(_task(job.task, job.quick), build, seed=job.seed, steps=job.steps, config_name=job.variant,
                      warmup_fraction=compare.HYPER[job.task].lion.warmup)
    opt = box["opt"]
    return {
        "task": job.task, "variant": job.variant, "seed": job.seed,
        "final_val_loss": rec.final_val_loss, "best_val_loss": rec.best_val_loss,
        "final_val_accuracy": rec.final_val_accuracy,
        "sign_agreement": opt.agree / opt.count if opt.count else 1.0,
        "state_bytes_per_param": opt.state_bytes_per_param(),
        "state_bytes_per_quantized_element": variant.state_bytes_per_element(),
        "cpu_s": rec.cpu_s, "val_loss": rec.val_loss, "eval_steps": rec.eval_steps,
        "qmap": None if qmap is None else [round(x, 5) for x in qmap.tolist()],
    }


def check_simulator(steps: int = 60) -> float:
    """Max |difference| of the final weights between the simulated 8-bit variant and the real
    lionkit.Lion8bit on the digits task (same seed); ~0 means the simulator is the real thing."""
    task = tasks.make_task("digits")
    h = compare.HYPER["digits"].lion
    out = []
    for which in ("sim", "real"):
        torch.manual_seed(0)
        model = task.make_model(0, torch.float32)
        params = list(model.parameters())
        if which == "sim":
            opt = SimLion(params, h.lr, h.betas, h.weight_decay, VARIANTS["q8-dyn-b256"], quant.dynamic_map(), 0)
        else:
            from lionkit import Lion8bit

            opt = Lion8bit(params, lr=h.lr, betas=h.betas, weight_decay=h.weight_decay)
        gen = torch.Generator().manual_seed(1)
        for step in range(steps):
            loss = task.loss(model, task.batch(step, gen))
            opt.zero_grad()
            loss.backward()
            opt.step()
        out.append(torch.cat([p.detach().flatten() for p in params]))
    return (out[0] - out[1]).abs().max().item()


def summarize(results: list[dict[str, Any]], variants: list[str]) -> dict[str, Any]:
    by: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in results:
        by.setdefault((r["task"], r["variant"]), []).append(r)
    out: dict[str, Any] = {}
    for (task, name), runs in by.items():
        losses = [r["final_val_loss"] for r in runs]
        out.setdefault(task, {})[name] = {
            "final_val_loss_mean": statistics.fmean(losses),
            "final_val_loss_std": statistics.stdev(losses) if len(losses) > 1 else 0.0,
            "final_val_accuracy_mean": statistics.fmean(r["final_val_accuracy"] for r in runs),
            "sign_agreement": statistics.fmean(r["sign_agreement"] for r in runs),
            "state_bytes_per_param": runs[0]["state_bytes_per_param"],
            "state_bytes_per_quantized_element": runs[0]["state_bytes_per_quantized_element"],
            "seeds": len(runs),
        }
    for task, per in out.items():
        ref = per.get("fp32", {}).get("final_val_loss_mean")
        for name, e in per.items():
            e["vs_fp32"] = (e["final_val_loss_mean"] - ref) / ref if ref else math.nan
    return out


def markdown(summary: dict[str, Any], variants: list[str], steps: dict[str, int], seeds: int) -> str:
    tasks_ = list(summary)
    head = ["variant", "state B/elem", *[f"{t}: val loss ({steps[t]} steps)" for t in tasks_],
            *[f"{t}: vs fp32" for t in tasks_], *[f"{t}: sign agr." for t in tasks_], "within 1.5% on all?"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for name in variants:
        if not all(name in summary[t] for t in tasks_):
            continue
        es = [summary[t][name] for t in tasks_]
        ok = all(abs(e["vs_fp32"]) <= 0.015 for e in es)
        lines.append("| " + " | ".join([
            f"`{name}`", f"{es[0]['state_bytes_per_quantized_element']:.3f}",
            *[f"{e['final_val_loss_mean']:.4f} ± {e['final_val_loss_std']:.4f}" for e in es],
            *[f"{100 * e['vs_fp32']:+.2f}%" for e in es],
            *[f"{100 * e['sign_agreement']:.1f}%" for e in es],
            "yes" if ok else "no",
        ]) + " |")
    return "\n".join(lines) + f"\n\n(mean ± std over {seeds} seeds)\n"


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", default="charlm,digits")
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS))
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--charlm-steps", type=int, default=None,
                        help="steps of the LM (default: compare's full-run steps)")
    parser.add_argument("--quick", action="store_true", help="the small LM and few steps")
    parser.add_argument("--lm-lr", type=float, default=None, help="Lion lr of the LM (default: compare's)")
    parser.add_argument("--small-lm", action="store_true",
                        help="screen on the small LM of --quick (1 layer, d=64) but with --charlm-steps steps")
    parser.add_argument("--jobs", type=int, default=max(1, min(8, os.cpu_count() or 1)))
    parser.add_argument("--json", default="fourbit_study.json")
    args = parser.parse_args(argv)
    task_names = [t for t in args.tasks.split(",") if t]
    variants = [v for v in args.variants.split(",") if v]
    for v in variants:
        if v not in VARIANTS:
            parser.error(f"unknown variant {v!r} (known: {', '.join(VARIANTS)})")
    steps = {}
    for t in task_names:
        th = compare.HYPER[t]
        steps[t] = th.quick_steps if args.quick else th.steps
    if args.charlm_steps and "charlm" in steps:
        steps["charlm"] = args.charlm_steps
    diff = check_simulator()
    print(f"simulator check: max |w_sim - w_Lion8bit| after 60 digits steps = {diff:.3g}", flush=True)
    small = {t: args.quick or (args.small_lm and t == "charlm") for t in task_names}
    lrs = {t: args.lm_lr if t == "charlm" else None for t in task_names}
    jobs = [StudyJob(t, v, s, steps[t], small[t], lrs[t]) for t in task_names for s in range(args.seeds)
            for v in variants]
    jobs.sort(key=lambda j: j.task != "charlm")
    t0 = time.perf_counter()
    results = []
    if args.jobs <= 1:
        it = map(run_study_job, jobs)
    else:
        pool = multiprocessing.get_context("spawn").Pool(args.jobs)
        it = pool.imap_unordered(run_study_job, jobs)
    for r in it:
        results.append(r)
        print(f"[{len(results)}/{len(jobs)}] {r['task']} {r['variant']} seed {r['seed']}: {r['final_val_loss']:.4f} "
              f"(sign agreement {100 * r['sign_agreement']:.1f}%, {r['cpu_s']:.0f} CPU s)", file=sys.stderr, flush=True)
    summary = summarize(results, variants)
    md = markdown(summary, variants, steps, args.seeds)
    print(md)
    with open(args.json, "w") as f:
        json.dump({"argv": sys.argv, "steps": steps, "small_lm": small.get("charlm"), "lm_lr": args.lm_lr, "seeds": args.seeds, "simulator_check": diff,
                   "variants": {v: asdict(VARIANTS[v]) for v in variants}, "summary": summary,
                   "runs": results, "wall_s": time.perf_counter() - t0}, f, indent=1)
    print(f"wrote {args.json} ({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
