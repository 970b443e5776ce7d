"""Exact resume across processes (issue 7): train N steps, save, kill the process, load in a new
process, continue M steps: the result equals the uninterrupted N + M steps bit for bit, for
every variant, with schedules, clipping and percentile clipping on.

The three runs (uninterrupted, first part, second part) are this file run as a script in fresh
Python processes; the first part ends with SIGKILL right after its checkpoint is written.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys

import pytest
import torch

N_FIRST, N_SECOND = 7, 8

# variant -> (optimizer class name, optimizer kwargs, param dtype, lr: "callable" or a torch
# scheduler name, override the bias to 32-bit, inject a non-finite gradient at these steps)
VARIANTS = {
    "lion32-schedule-clipnorm": (
        "Lion", dict(lr="callable", weight_decay=0.1, percentile_clipping=90, grad_clip_norm=0.5),
        torch.float32, False, ()),
    "lion8-blockwise-steplr-clipvalue": (
        "Lion8bit", dict(lr=3e-3, min_8bit_size=1024, percentile_clipping=95, grad_clip_value=0.05),
        torch.float32, True, ()),
    "lion8-per-tensor-bf16-schedule-both-clips": (
        "Lion8bit", dict(lr="callable", block_wise=False, min_8bit_size=1024, percentile_clipping=80,
                         grad_clip_norm=1.0, grad_clip_value=0.1, weight_decay=0.05),
        torch.bfloat16, False, ()),
    "lion32bit-bf16-cosine": (
        "Lion32bit", dict(lr=1e-2, weight_decay=0.2, percentile_clipping=90, grad_clip_value=0.2),
        torch.bfloat16, False, ()),
    "lion8-skip-nonfinite": (
        "Lion8bit", dict(lr="callable", min_8bit_size=1024, percentile_clipping=90, grad_clip_norm=2.0,
                         nonfinite="skip"),
        torch.float32, False, (3, N_FIRST + 2)),
}


def _schedule(step: int) -> float:
    """Warm-up then cosine decay: a plain function, so the new process can rebuild it."""
    if step < 3:
        return 1e-2 * (step + 1) / 3
    return 1e-2 * 0.5 * (1 + math.cos(math.pi * min(step, 40) / 40))


def _build(name: str):
    import lionkit

    cls_name, kwargs, dtype, override_bias, _ = VARIANTS[name]
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(12, 300), torch.nn.Tanh(), torch.nn.Linear(300, 4)).to(dtype)
    kwargs = dict(kwargs)
    if kwargs["lr"] == "callable":
        kwargs["lr"] = _schedule
    if override_bias:  # overrides live outside the state dict: registered again in every process
        lionkit.GlobalOptimManager.get_instance().register_module_override(model[0], "bias", {"optim_bits": 32})
    opt = getattr(lionkit, cls_name)(model.parameters(), **kwargs)
    sched = None
    if name.startswith("lion8-blockwise"):
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.5)
    elif name.startswith("lion32bit-bf16"):
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=20)
    return model, opt, sched


def _train(name: str, model, opt, sched, steps) -> None:
    dtype = VARIANTS[name][2]
    bad_steps = VARIANTS[name][4]
    for k in steps:
        gen = torch.Generator().manual_seed(1000 + k)  # the batch of step k, in any process
        x = torch.randn(16, 12, generator=gen).to(dtype)
        y = torch.randn(16, 4, generator=gen).to(dtype)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x).float(), y.float()).backward()
        if k in bad_steps:
            model[2].weight.grad[0, 0] = float("nan")
        opt.step()
        if sched is not None:
            sched.step()


def _result(model, opt) -> dict:
    return {"model": model.state_dict(), "opt": opt.state_dict(), "skipped": opt.skipped_steps}


def _worker(phase: str, folder: str) -> None:
    """One process: 'full' (N + M steps), 'first' (N steps, checkpoint, SIGKILL), 'second'
    (load, M steps)."""
    import lionkit

    torch.set_num_threads(1)
    results = {}
    for name in VARIANTS:
        lionkit.GlobalOptimManager.get_instance().initialize()
        model, opt, sched = _build(name)
        if phase == "full":
            _train(name, model, opt, sched, range(N_FIRST + N_SECOND))
            results[name] = _result(model, opt)
        elif phase == "first":
            _train(name, model, opt, sched, range(N_FIRST))
            ckpt = {"model": model.state_dict(), "opt": opt.state_dict(),
                    "sched": sched.state_dict() if sched is not None else None}
            lionkit.save_checkpoint(ckpt, os.path.join(folder, f"{name}.pt"))
        else:
            ckpt = lionkit.load_checkpoint(os.path.join(folder, f"{name}.pt"))
            model.load_state_dict(ckpt["model"])
            opt.load_state_dict(ckpt["opt"])
            if sched is not None:
                sched.load_state_dict(ckpt["sched"])
            _train(name, model, opt, sched, range(N_FIRST, N_FIRST + N_SECOND))
            results[name] = _result(model, opt)
    if phase == "first":
        os.kill(os.getpid(), signal.SIGKILL)  # no clean shutdown: only the files survive
    torch.save(results, os.path.join(folder, f"{phase}.pt"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("resume"))
    env = dict(os.environ, PYTHONHASHSEED="0")
    for phase in ("full", "first", "second"):
        proc = subprocess.run([sys.executable, __file__, phase, folder], env=env, capture_output=True, text=True,
                              timeout=600)
        if phase == "first":
            assert proc.returncode == -signal.SIGKILL, proc.stderr
        else:
            assert proc.returncode == 0, proc.stderr
    return (torch.load(os.path.join(folder, "full.pt"), weights_only=True),
            torch.load(os.path.join(folder, "second.pt"), weights_only=True))


def _assert_bitwise(a, b, where="") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a.view(torch.uint8) if a.dtype != torch.uint8 and a.dim() else a,
                           b.view(torch.uint8) if b.dtype != torch.uint8 and b.dim() else b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_bitwise(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_bitwise(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


@pytest.mark.parametrize("name", VARIANTS)
def test_resume_in_a_new_process_is_bit_exact(runs, name):
    full, resumed = runs
    _assert_bitwise(full[name]["model"], resumed[name]["model"], name)
    _assert_bitwise(full[name]["opt"], resumed[name]["opt"], name)
    # the run really trained, with the state the variant promises
    state = full[name]["opt"]["state"]
    assert all(s["step"] == N_FIRST + N_SECOND - len(VARIANTS[name][4]) for s in state.values())
    assert all("gnorm_vec" in s for s in state.values())
    eight = VARIANTS[name][0] == "Lion8bit"
    assert any(s["state1"].dtype == torch.uint8 for s in state.values()) == eight
    if name.startswith("lion8-skip"):
        # skipped steps are a per-process count: 1 in each half, 2 in the uninterrupted run
        assert full[name]["skipped"] == 2 and resumed[name]["skipped"] == 1


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2])
