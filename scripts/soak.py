"""Soak test (issue 7; a script, not part of CI): a long run on a small model that checks

1. drift: Lion8bit's momentum against an fp32 momentum fed the very same gradients (a shadow),
   every step; the 8-bit error must settle and stay, not grow with the step count;
2. trajectory: Lion8bit against Lion32 from the same start on the same batches (final losses);
3. memory: resident set size (RSS) and live Python objects over the run, with every feature on
   (schedule, percentile and global-norm clipping, nonfinite="skip" with injected NaNs,
   checkpoints saved and loaded through save_checkpoint/load_checkpoint);
4. the cost a snapshot-and-restore step would have had (why lionkit validates instead).

Usage::

    python scripts/soak.py                 # 10,000 steps, prints a report, writes soak.json
    python scripts/soak.py --steps 2000 --json out.json

Exit status 1 if drift grew (last window's error > 1.5x the first window's after warm-up) or
RSS grew by more than --max-rss-growth-mb after warm-up.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import tempfile
import time

import torch

import lionkit
from lionkit.qstate import QuantizedState


def rss_mb() -> float:
    """Resident set size of this process in MiB (Linux /proc; ru_maxrss elsewhere)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def make_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(32, 256), torch.nn.GELU(), torch.nn.Linear(256, 256), torch.nn.GELU(), torch.nn.Linear(256, 10)
    )


class Task:
    """A fixed random teacher network; batch k is a pure function of (seed, k)."""

    def __init__(self, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed + 1)
        self.w1 = torch.randn(32, 64, generator=gen) / 32**0.5
        self.w2 = torch.randn(64, 10, generator=gen) / 64**0.5
        self.seed = seed

    def batch(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + k)
        x = torch.randn(64, 32, generator=gen)
        logits = torch.tanh(x @ self.w1) @ self.w2 * 3
        return x, logits.argmax(dim=1)


def loss_of(model, x, y) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(model(x), y)


def schedule(step: int) -> float:
    """Warm-up 200 steps, then cosine to 10% at the end of a 10,000-step run."""
    if step < 200:
        return 3e-4 * (step + 1) / 200
    t = min(step, 10_000) / 10_000
    return 3e-4 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


# ---------------------------------------------------------------------- 1. drift
def drift(steps: int, seed: int, window: int) -> dict:
    """Lion8bit trains; an fp32 shadow momentum gets the same gradients. Per window: relative
    L2 error of the 8-bit momentum, the worst element error in units of its block's scale, and
    how often the update direction sign(b1*m + (1-b1)*g) differs from the shadow's."""
    task = Task(seed)
    model = make_model(seed)
    b1, b2 = 0.9, 0.99
    opt = lionkit.Lion8bit(model.parameters(), lr=schedule, betas=(b1, b2), weight_decay=0.1, min_8bit_size=4096)
    eight = [p for p in model.parameters() if p.numel() >= 4096]
    shadow = {p: torch.zeros_like(p) for p in eight}
    rows, cur = [], {"rel": [], "blockerr": [], "flip": []}
    for k in range(steps):
        x, y = task.batch(k)
        opt.zero_grad()
        loss_of(model, x, y).backward()
        num = den = 0.0
        flips = total = 0
        worst = 0.0
        for p in eight:
            st = opt.state.get(p)
            m8 = opt.momentum(st, p).dequantize() if st else torch.zeros_like(p)
            m32 = shadow[p]
            g = p.grad
            flips += int((torch.sign(b1 * m8 + (1 - b1) * g) != torch.sign(b1 * m32 + (1 - b1) * g)).sum())
            total += g.numel()
            num += float((m8 - m32).square().sum())
            den += float(m32.square().sum())
            if st:
                q = opt.momentum(st, p)
                scale = q.absmax.repeat_interleave(256)[: p.numel()].reshape(p.shape)
                worst = max(worst, float(((m8 - m32).abs() / scale.clamp(min=1e-30)).max()))
        if k > 0:
            cur["rel"].append(math.sqrt(num / den) if den else 0.0)
            cur["blockerr"].append(worst)
            cur["flip"].append(flips / total)
        opt.step()
        for p in eight:
            shadow[p].mul_(b2).add_(p.grad, alpha=1 - b2)
        if (k + 1) % window == 0:
            rows.append(
                {
                    "step": k + 1,
                    "loss": float(loss_of(model, x, y).detach()),
                    "rel_l2_mean": statistics.fmean(cur["rel"]),
                    "rel_l2_max": max(cur["rel"]),
                    "block_err_max": max(cur["blockerr"]),
                    "sign_flip_mean": statistics.fmean(cur["flip"]),
                }
            )
            cur = {"rel": [], "blockerr": [], "flip": []}
    return {"windows": rows}


# ---------------------------------------------------------------------- 2. trajectory
def trajectory(steps: int, seed: int) -> dict:
    """Lion32 and Lion8bit from one start on the same batches: final and held-out losses."""
    task = Task(seed)
    out = {}
    for name, cls in (("lion32", lionkit.Lion), ("lion8", lionkit.Lion8bit)):
        model = make_model(seed)
        opt = cls(model.parameters(), lr=schedule, weight_decay=0.1)
        t0 = time.perf_counter()
        for k in range(steps):
            x, y = task.batch(k)
            opt.zero_grad()
            loss_of(model, x, y).backward()
            opt.step()
        with torch.no_grad():
            held = [loss_of(model, *task.batch(10**8 + j)).item() for j in range(20)]
            acc = [float((model(task.batch(10**8 + j)[0]).argmax(1) == task.batch(10**8 + j)[1]).float().mean())
                   for j in range(20)]
        out[name] = {
            "held_out_loss": statistics.fmean(held),
            "held_out_accuracy": statistics.fmean(acc),
            "seconds": time.perf_counter() - t0,
            "params": [p.detach().clone() for p in model.parameters()],
        }
    a, b = out["lion32"].pop("params"), out["lion8"].pop("params")
    out["param_rel_distance"] = math.sqrt(
        sum(float((x - y).square().sum()) for x, y in zip(a, b)) / sum(float(x.square().sum()) for x in a)
    )
    return out


# ---------------------------------------------------------------------- 3. memory
def memory(steps: int, seed: int, window: int) -> dict:
    """Every feature on; RSS and live objects per window, checkpoints through files."""
    task = Task(seed)
    model = make_model(seed)
    opt = lionkit.Lion8bit(
        model.parameters(), lr=schedule, weight_decay=0.1, min_8bit_size=4096, percentile_clipping=95,
        grad_clip_norm=1.0, nonfinite="skip",
    )
    rows = []
    folder = tempfile.mkdtemp(prefix="lionkit-soak-")
    path = os.path.join(folder, "ckpt.pt")
    for k in range(steps):
        x, y = task.batch(k)
        opt.zero_grad()
        loss_of(model, x, y).backward()
        if k % 997 == 0:
            next(model.parameters()).grad[0, 0] = float("nan")  # skipped, counted
        opt.step()
        if (k + 1) % 2000 == 0:
            lionkit.save_checkpoint({"model": model.state_dict(), "opt": opt.state_dict()}, path)
            ckpt = lionkit.load_checkpoint(path)
            model.load_state_dict(ckpt["model"])
            opt.load_state_dict(ckpt["opt"])
            del ckpt
        if (k + 1) % window == 0:
            gc.collect()
            rows.append({"step": k + 1, "rss_mb": rss_mb(), "objects": len(gc.get_objects())})
    if os.path.exists(path):
        os.remove(path)
    os.rmdir(folder)
    return {"windows": rows, "skipped_steps": opt.skipped_steps}


# ---------------------------------------------------------------------- 4. snapshot cost
def snapshot_cost(numel: int = 1 << 22, reps: int = 20) -> dict:
    """Step time of Lion8bit and Lion32 on one tensor of ``numel`` elements, and the time and
    memory a per-step snapshot (clone of parameters and state, for a restore on failure) would
    add. Best of ``reps``: the minimum is what the work costs, whatever else the machine runs."""
    out = {}
    for name, cls in (("lion32", lionkit.Lion), ("lion8", lionkit.Lion8bit)):
        p = torch.nn.Parameter(torch.randn(numel))
        p.grad = torch.randn(numel)
        opt = cls([p], lr=1e-4)
        opt.step()
        step_t, snap_t = [], []
        for _ in range(reps):
            t0 = time.perf_counter()
            opt.step()
            t1 = time.perf_counter()
            snap = [p.detach().clone()] + [v.clone() for v in opt.state[p].values() if torch.is_tensor(v)]
            t2 = time.perf_counter()
            step_t.append(t1 - t0)
            snap_t.append(t2 - t1)
        snap_bytes = sum(t.numel() * t.element_size() for t in snap)
        out[name] = {
            "numel": numel,
            "backend": opt.backends_used.get("cpu"),
            "step_ms": 1e3 * min(step_t),
            "snapshot_ms": 1e3 * min(snap_t),
            "snapshot_overhead": min(snap_t) / min(step_t),
            "snapshot_bytes_per_param": snap_bytes / numel,
        }
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=10_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--window", type=int, default=1000)
    ap.add_argument("--json", default="soak.json")
    ap.add_argument("--max-rss-growth-mb", type=float, default=20.0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    report: dict = {"steps": args.steps, "torch": torch.__version__, "lionkit": lionkit.__version__}
    t0 = time.perf_counter()

    report["drift"] = d = drift(args.steps, args.seed, args.window)
    print(f"1. drift of Lion8bit momentum vs an fp32 shadow fed the same gradients ({args.steps} steps)")
    print("   step    loss   rel.L2 mean  rel.L2 max  worst/blockscale  dir. flips")
    for r in d["windows"]:
        print(f"  {r['step']:6d}  {r['loss']:.4f}  {r['rel_l2_mean']:10.4%}  {r['rel_l2_max']:10.4%}  "
              f"{r['block_err_max']:16.4f}  {r['sign_flip_mean']:10.4%}")

    report["trajectory"] = tr = trajectory(args.steps, args.seed)
    print("2. Lion32 vs Lion8bit from one start, same batches")
    for name in ("lion32", "lion8"):
        r = tr[name]
        print(f"   {name:7s} held-out loss {r['held_out_loss']:.4f}  accuracy {r['held_out_accuracy']:.2%}  "
              f"({r['seconds']:.1f} s)")
    print(f"   relative distance between the final parameters: {tr['param_rel_distance']:.3%}")

    report["memory"] = mem = memory(args.steps, args.seed, args.window)
    print("3. memory, every feature on (schedule, percentile + norm clipping, skip, checkpoints)")
    for r in mem["windows"]:
        print(f"  {r['step']:6d}  RSS {r['rss_mb']:8.1f} MiB  live objects {r['objects']}")
    print(f"   skipped steps (injected NaNs): {mem['skipped_steps']}")

    report["snapshot_cost"] = sc = snapshot_cost()
    print("4. what a snapshot-and-restore step would cost (one 4M-element tensor)")
    for name, r in sc.items():
        print(f"   {name:7s} ({r['backend']}) step {r['step_ms']:.2f} ms, snapshot {r['snapshot_ms']:.2f} ms "
              f"(+{r['snapshot_overhead']:.0%}), +{r['snapshot_bytes_per_param']:.2f} bytes/param")

    # verdicts
    w = d["windows"]
    first = w[1] if len(w) > 2 else w[0]  # after warm-up
    drift_ratio = w[-1]["rel_l2_mean"] / first["rel_l2_mean"]
    m = mem["windows"]
    rss_growth = m[-1]["rss_mb"] - m[0]["rss_mb"]
    obj_growth = m[-1]["objects"] - m[0]["objects"]
    report["verdict"] = {
        "drift_ratio_last_vs_first": drift_ratio,
        "rss_growth_mb": rss_growth,
        "object_growth": obj_growth,
        "seconds": time.perf_counter() - t0,
    }
    ok = drift_ratio <= 1.5 and rss_growth <= args.max_rss_growth_mb
    report["verdict"]["ok"] = ok
    print(f"verdict: drift last/first window {drift_ratio:.2f}x, RSS growth {rss_growth:+.1f} MiB, "
          f"objects {obj_growth:+d}, {report['verdict']['seconds']:.0f} s -> {'OK' if ok else 'FAIL'}")
    with open(args.json, "w") as f:
        json.dump(report, f, indent=2)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
