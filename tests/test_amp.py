"""Mixed precision: lionkit under torch.autocast (CPU bf16 and fp16) and with torch.amp.GradScaler,
whose ``scaler.step(opt)`` skips steps with inf/NaN gradients and leaves the state untouched."""

from __future__ import annotations

import copy

import pytest
import torch

import lionkit
from lionkit.reference import lion_reference

OPTIMIZERS = {
    "Lion": (lionkit.Lion, {}),
    "Lion8bit": (lionkit.Lion8bit, {"min_8bit_size": 1000}),
    "Lion8bit-per-tensor": (lionkit.Lion8bit, {"min_8bit_size": 1000, "block_wise": False}),
    "Lion4bit": (lionkit.Lion4bit, {"min_8bit_size": 1000}),
}


def build() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(32, 128), torch.nn.GELU(), torch.nn.Linear(128, 8))


def data(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(step)
    return torch.randn(16, 32, generator=gen), torch.randn(16, 8, generator=gen)


def state_copy(opt) -> dict:
    return copy.deepcopy({i: st for i, st in enumerate(opt.state.values())})


def states_equal(a: dict, b: dict) -> bool:
    if a.keys() != b.keys():
        return False
    for k in a:
        if a[k].keys() != b[k].keys():
            return False
        for n, v in a[k].items():
            same = torch.equal(v, b[k][n]) if isinstance(v, torch.Tensor) else v == b[k][n]
            if not same:
                return False
    return True


def cpu_autocast_or_skip(dtype: torch.dtype) -> None:
    try:
        with torch.autocast("cpu", dtype=dtype):
            torch.nn.functional.linear(torch.randn(2, 2), torch.randn(2, 2))
    except (RuntimeError, ValueError) as e:
        pytest.skip(f"CPU autocast with {dtype} is not supported by this torch: {e}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_step_matches_float64_reference(dtype):
    """Forward in low precision under autocast, fp32 master weights and gradients: one Lion step
    (taken inside the autocast region, as training loops often do) equals the float64 reference."""
    cpu_autocast_or_skip(dtype)
    model = build()
    opt = lionkit.Lion(model.parameters(), lr=1e-2, weight_decay=0.1)
    x, y = data(0)
    with torch.autocast("cpu", dtype=dtype):
        out = model(x)
        assert out.dtype == dtype  # autocast is really on
        loss = torch.nn.functional.mse_loss(out.float(), y)
    loss.backward()
    before = [(p.detach().clone(), p.grad.clone()) for p in model.parameters()]
    with torch.autocast("cpu", dtype=dtype):
        opt.step()
    for p, (p0, g) in zip(model.parameters(), before):
        assert p.dtype == torch.float32 and g.dtype == torch.float32
        want, _ = lion_reference(p0.double(), g.double(), torch.zeros_like(p0, dtype=torch.float64), lr=1e-2,
                                 beta1=0.9, beta2=0.99, weight_decay=0.1)
        # fp32 arithmetic: the decay product and the subtraction each round once, by at most half
        # an ulp of their operands
        bound = torch.finfo(torch.float32).eps * (p0.double().abs() + 1e-2)
        assert bool(((p.detach().double() - want).abs() <= bound).all())


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_step_inside_autocast_equals_step_outside(name):
    """autocast must not change the optimizer's own arithmetic (norms, 8-bit scales)."""
    cpu_autocast_or_skip(torch.bfloat16)
    cls, kw = OPTIMIZERS[name]
    runs = []
    for inside in (False, True):
        model = build()
        opt = cls(model.parameters(), lr=1e-2, percentile_clipping=90, grad_clip_norm=1.0, **kw)
        for step in range(4):
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = torch.nn.functional.mse_loss(model(data(step)[0]).float(), data(step)[1])
            loss.backward()
            if inside:
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    opt.step()
            else:
                opt.step()
        runs.append(([p.detach().clone() for p in model.parameters()], state_copy(opt)))
    for a, b in zip(runs[0][0], runs[1][0]):
        assert torch.equal(a, b)
    assert states_equal(runs[0][1], runs[1][1])


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_grad_scaler_steps_with_unscaled_gradients_and_skips_inf(name):
    """GradScaler("cpu"): a finite step equals a plain step with the unscaled gradient; a step
    with an inf gradient is skipped (parameters and every state tensor unchanged, the scale
    backs off), under lionkit's default nonfinite="raise"; training then continues."""
    cpu_autocast_or_skip(torch.float16)
    cls, kw = OPTIMIZERS[name]
    model, plain = build(), build()
    opt = cls(model.parameters(), lr=1e-2, **kw)
    popt = cls(plain.parameters(), lr=1e-2, **kw)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)

    def forward(m, step):
        x, y = data(step)
        with torch.autocast("cpu", dtype=torch.float16):
            return torch.nn.functional.mse_loss(m(x).float(), y)

    for step in range(5):
        opt.zero_grad()
        scaler.scale(forward(model, step)).backward()
        inject = step == 2
        if inject:
            next(model.parameters()).grad[0, 0] = float("inf")
            params_before = [p.detach().clone() for p in model.parameters()]
            state_before = state_copy(opt)
            scale_before = scaler.get_scale()
        scaler.step(opt)
        scaler.update()
        if inject:
            assert all(torch.equal(a, b) for a, b in zip(params_before, model.parameters()))
            assert states_equal(state_before, state_copy(opt))
            assert scaler.get_scale() < scale_before
            continue
        # the plain optimizer sees the gradient GradScaler handed over: scaled / scale (exact:
        # the scale is a power of two)
        popt.zero_grad()
        for p, q in zip(plain.parameters(), model.parameters()):
            p.grad = q.grad.clone()
        popt.step()
        for p, q in zip(plain.parameters(), model.parameters()):
            assert torch.equal(p, q)
    assert all(st["step"] == 4 for st in opt.state.values())


def test_grad_scaler_unscale_then_clip_pattern():
    """The documented pattern: scaler.unscale_(opt), clip, scaler.step(opt)."""
    cpu_autocast_or_skip(torch.float16)
    model = build()
    opt = lionkit.Lion8bit(model.parameters(), lr=1e-2, min_8bit_size=1000)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    x, y = data(0)
    with torch.autocast("cpu", dtype=torch.float16):
        loss = torch.nn.functional.mse_loss(model(x).float(), y)
    scaler.scale(loss).backward()
    scaler.unscale_(opt)
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
    assert norm > 0.1  # the clip acted on unscaled gradients
    before = [p.detach().clone() for p in model.parameters()]
    scaler.step(opt)
    scaler.update()
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
