"""DistributedDataParallel needs nothing from lionkit: every rank holds whole parameters and the
all-reduced (averaged) gradient, so every rank's optimizer takes the same step.

2 gloo ranks spawned by the test, each with its own batch, against one process that computes
both ranks' gradients and averages them as DDP does (g0 / 2 + g1 / 2): equal bit for bit, step by
step, for 8-bit and 32-bit state with every clipping on; a checkpoint written by rank 0 and
loaded by every rank continues exactly; and ZeroRedundancyOptimizer around Lion8bit (each rank
holding a partition) takes the same steps.
"""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch
from dist_helpers import WORLD, init, require_gloo, spawn

import lionkit

STEPS = 6
SAVE_AT = 3
CONFIGS = {
    "Lion8bit": ("Lion8bit", dict(lr=3e-3, min_8bit_size=1000, weight_decay=0.1)),
    "Lion-clipping": ("Lion", dict(lr=3e-3, percentile_clipping=90, grad_clip_norm=0.5, grad_clip_value=0.05)),
    "Lion8bit-per-tensor": ("Lion8bit", dict(lr=3e-3, min_8bit_size=1000, block_wise=False, percentile_clipping=95)),
}


def build() -> torch.nn.Module:
    torch.manual_seed(11)
    return torch.nn.Sequential(torch.nn.Linear(20, 300), torch.nn.Tanh(), torch.nn.Linear(300, 20))


def batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 * step + rank)
    return torch.randn(8, 20, generator=gen), torch.randn(8, 20, generator=gen)


def loss_fn(model, x, y) -> torch.Tensor:
    return torch.nn.functional.mse_loss(model(x), y)


def reference_step(model, opt, step: int) -> None:
    """One process: each rank's gradient, averaged as DDP does (divided by the world size, then
    summed), then the step."""
    grads = []
    for r in range(WORLD):
        model.zero_grad()
        loss_fn(model, *batch(r, step)).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for p, *gs in zip(model.parameters(), *grads):
        p.grad = sum(g / WORLD for g in gs)
    opt.step()


def _worker(rank: int, port: int, folder: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    init(rank, port)
    out = {}
    for name, (cls, kw) in CONFIGS.items():
        ddp = DDP(build())
        ref = build()
        opt = getattr(lionkit, cls)(ddp.parameters(), **kw)
        ropt = getattr(lionkit, cls)(ref.parameters(), **kw)
        diffs = []
        for step in range(STEPS):
            opt.zero_grad()
            loss_fn(ddp, *batch(rank, step)).backward()  # DDP all-reduces the gradients here
            opt.step()
            reference_step(ref, ropt, step)
            diffs.append(max(float((a - b).abs().max()) for a, b in zip(ddp.parameters(), ref.parameters())))
            if step + 1 == SAVE_AT:
                path = os.path.join(folder, f"{name}.pt")
                if rank == 0:  # the usual DDP pattern: one rank writes, every rank reads
                    lionkit.save_checkpoint({"model": ddp.module.state_dict(), "opt": opt.state_dict()}, path)
                dist.barrier()
                ckpt = lionkit.load_checkpoint(path)
                resumed = DDP(build())
                resumed.module.load_state_dict(ckpt["model"])
                ropt2 = getattr(lionkit, cls)(resumed.parameters(), **kw)
                ropt2.load_state_dict(ckpt["opt"])
        for step in range(SAVE_AT, STEPS):
            ropt2.zero_grad()
            loss_fn(resumed, *batch(rank, step)).backward()
            ropt2.step()
        resume = max(float((a - b).abs().max()) for a, b in zip(resumed.parameters(), ddp.parameters()))
        out[name] = {"max_abs_per_step": diffs, "resume_max_abs": resume,
                     "moved": max(float((a - b).abs().max()) for a, b in zip(ref.parameters(), build().parameters()))}
    # ZeroRedundancyOptimizer: each rank's lionkit optimizer holds a partition; ZeRO puts its
    # keyword arguments (lionkit's optimizer-wide ones included) into every param group as well
    from torch.distributed.optim import ZeroRedundancyOptimizer

    kw = dict(lr=3e-3, min_8bit_size=1000, weight_decay=0.1, percentile_clipping=90, nonfinite="raise", backend="auto")
    ddp, ref = DDP(build()), build()
    opt = ZeroRedundancyOptimizer(ddp.parameters(), optimizer_class=lionkit.Lion8bit, **kw)
    ropt = lionkit.Lion8bit(ref.parameters(), **kw)
    diffs = []
    for step in range(STEPS):
        opt.zero_grad()
        loss_fn(ddp, *batch(rank, step)).backward()
        opt.step()
        reference_step(ref, ropt, step)
        diffs.append(max(float((a - b).abs().max()) for a, b in zip(ddp.parameters(), ref.parameters())))
    out["zero"] = {"max_abs_per_step": diffs}
    with open(os.path.join(folder, f"rank{rank}.json"), "w") as f:
        json.dump(out, f)
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    require_gloo()
    folder = str(tmp_path_factory.mktemp("ddp"))
    spawn(_worker, folder)
    out = []
    for r in range(WORLD):
        with open(os.path.join(folder, f"rank{r}.json")) as f:
            out.append(json.load(f))
    return out


@pytest.mark.parametrize("name", CONFIGS)
def test_ddp_steps_equal_single_process_average(ddp_run, name):
    for rank, res in enumerate(ddp_run):
        assert res[name]["moved"] > 0  # training did something
        assert res[name]["max_abs_per_step"] == [0.0] * STEPS, f"rank {rank}: {res[name]}"


@pytest.mark.parametrize("name", CONFIGS)
def test_ddp_checkpoint_from_rank0_resumes_exactly(ddp_run, name):
    for rank, res in enumerate(ddp_run):
        assert res[name]["resume_max_abs"] == 0.0, f"rank {rank}: {res[name]}"


def test_zero_redundancy_optimizer_steps_equal_single_process_average(ddp_run):
    for rank, res in enumerate(ddp_run):
        assert res["zero"]["max_abs_per_step"] == [0.0] * STEPS, f"rank {rank}: {res['zero']}"


def test_stochastic_rounding_without_a_seed_warns_under_torch_distributed(monkeypatch):
    # each rank would draw its own seed: DDP replicas must be told to pass one
    from lionkit import distributed

    p = torch.nn.Parameter(torch.zeros(10, dtype=torch.bfloat16))
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    with pytest.warns(UserWarning, match="Pass the same sr_seed on every rank"):
        lionkit.Lion([p], stochastic_rounding=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lionkit.Lion([p], stochastic_rounding=True, sr_seed=3)
    monkeypatch.setattr(distributed, "world_size", lambda: 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lionkit.Lion([p], stochastic_rounding=True)
