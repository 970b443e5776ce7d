"""Stochastic rounding: the primitive (neighbours, unbiasedness, reproducibility) and the
optimizers' ``stochastic_rounding=True`` (against the fp32 reference step, seeds, resume,
routing, and pure-bf16 training that tracks fp32)."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

import lionkit
from lionkit import kernels, rounding
from lionkit.reference import lion_reference

LOW = [torch.bfloat16, torch.float16]
# Every optimizer class, built with keyword arguments only (the Paged* ones warn on CPU).
CLASSES = [lionkit.Lion, lionkit.Lion8bit, lionkit.Lion32bit, lionkit.PagedLion, lionkit.PagedLion8bit,
           lionkit.PagedLion32bit]


def _neighbours(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(largest value of dtype <= x, smallest value of dtype >= x), as fp64, by brute force."""
    near = x.to(dtype)
    up = torch.nextafter(near, torch.full_like(near, math.inf))
    down = torch.nextafter(near, torch.full_like(near, -math.inf))
    x64, n64 = x.double(), near.double()
    lo = torch.where(n64 <= x64, n64, down.double())
    hi = torch.where(n64 >= x64, n64, up.double())
    return lo, hi


def _spread_values(n: int, seed: int = 0) -> torch.Tensor:
    """fp32 values over many binades, both signs, including fp16 subnormals."""
    g = torch.Generator().manual_seed(seed)
    mag = torch.exp2(torch.empty(n).uniform_(-26, 15, generator=g))
    sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    return (sign * mag).to(torch.float32)


# ---------------------------------------------------------------------------------- primitive
@pytest.mark.parametrize("dtype", LOW)
def test_result_is_one_of_the_two_neighbours(dtype):
    x = _spread_values(20000)
    out = rounding.stochastic_round(x, dtype, rounding.generator_for(1))
    assert out.dtype == dtype and out.shape == x.shape
    lo, hi = _neighbours(x, dtype)
    o = out.double()
    assert ((o == lo) | (o == hi)).all()
    # and both neighbours occur (it is not rounding one way)
    inexact = lo != hi
    assert (o[inexact] == lo[inexact]).any() and (o[inexact] == hi[inexact]).any()


@pytest.mark.parametrize("dtype", LOW)
def test_exact_and_special_values_pass_through(dtype):
    x = torch.tensor([0.0, -0.0, 1.0, -2.5, 0.15625, math.inf, -math.inf, math.nan])
    for seed in range(5):
        out = rounding.stochastic_round(x, dtype, rounding.generator_for(seed))
        assert torch.equal(out[:-1], x[:-1].to(dtype))
        assert torch.signbit(out[1]) and out[-1].isnan()


def _bias_in_standard_errors(rounded: torch.Tensor, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Per value: (mean of its roundings - x) / the standard error an unbiased rounding has."""
    lo, hi = _neighbours(x, dtype)
    gap = hi - lo
    frac = (x.double() - lo) / gap
    n = rounded.shape[0]
    mean = rounded.double().mean(0)
    se = gap * torch.sqrt(frac * (1 - frac) / n)
    return (mean - x.double()) / se


@pytest.mark.parametrize("dtype", LOW)
def test_unbiased_statistically(dtype):
    # 48 values at assorted fractions of their gap (never exact), each rounded 20,000 times: the
    # mean must sit within 4.5 standard errors of x for every value (a false alarm has odds of
    # about 48 * 7e-6; a rounding biased by 1% of a gap is 10+ standard errors off).
    base = _spread_values(48, seed=3)
    lo, hi = _neighbours(base, dtype)
    frac = torch.linspace(0.03, 0.97, 48, dtype=torch.float64)
    x = (lo + frac * (hi - lo)).to(torch.float32)
    x = torch.where(x.double() == lo, torch.nextafter(x, torch.full_like(x, math.inf)), x)  # stay inexact
    n = 20000
    out = rounding.stochastic_round(x.expand(n, -1).contiguous(), dtype, rounding.generator_for(7))
    z = _bias_in_standard_errors(out, x, dtype)
    assert z.abs().max() < 4.5, z


@pytest.mark.parametrize("dtype", LOW)
def test_the_unbiasedness_check_catches_a_biased_rounding(dtype):
    # The statistic above, applied to roundings biased by 2% of a gap, must fail: it has power.
    base = _spread_values(48, seed=3)
    lo, hi = _neighbours(base, dtype)
    x = (lo + 0.3 * (hi - lo)).to(torch.float32)
    n = 20000
    g = rounding.generator_for(7)
    u = torch.rand((n, 48), generator=g, dtype=torch.float64)
    biased = torch.where(u < 0.32, hi, lo)  # up with probability 0.32 instead of 0.30
    z = _bias_in_standard_errors(biased, x, dtype)
    assert z.abs().max() > 4.5
    nearest = x.expand(n, -1).to(dtype)  # rounding to nearest: biased by 0.3 gap
    assert _bias_in_standard_errors(nearest, x, dtype).abs().min() > 50  # 0.3 gap = 92 standard errors


@pytest.mark.parametrize("dtype", LOW)
def test_reproducible_from_the_generator_seed(dtype):
    x = _spread_values(5000)
    a = rounding.stochastic_round(x, dtype, rounding.generator_for(42))
    b = rounding.stochastic_round(x, dtype, rounding.generator_for(42))
    c = rounding.stochastic_round(x, dtype, rounding.generator_for(43))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    torch.manual_seed(5)
    d = rounding.stochastic_round(x, dtype)
    torch.manual_seed(5)
    assert torch.equal(d, rounding.stochastic_round(x, dtype))


def test_fp32_target_and_bad_arguments():
    x = _spread_values(10)
    assert torch.equal(rounding.stochastic_round(x, torch.float32), x)
    with pytest.raises(ValueError, match="unsupported dtype torch.int8"):
        rounding.stochastic_round(x, torch.int8)
    with pytest.raises(TypeError, match="floating-point tensor, got tensor of dtype torch.int64"):
        rounding.stochastic_round(torch.arange(3), torch.bfloat16)
    with pytest.raises(TypeError, match="got list"):
        rounding.stochastic_round([1.0], torch.bfloat16)


def test_derive_seed_is_deterministic_and_spreads():
    assert rounding.derive_seed(1, 2, 3) == rounding.derive_seed(1, 2, 3)
    seeds = {rounding.derive_seed(0, step, i) for step in range(50) for i in range(50)}
    assert len(seeds) == 2500
    assert all(0 <= s < rounding.SEED_LIMIT for s in seeds)


# ---------------------------------------------------------------------------------- optimizers
def _param(dtype: torch.dtype, n: int = 6000, seed: int = 0) -> torch.nn.Parameter:
    g = torch.Generator().manual_seed(seed)
    return torch.nn.Parameter((torch.randn(n, generator=g) * 0.05).to(dtype))


def _grad(p: torch.Tensor, step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 + step)
    return (torch.randn(p.shape, generator=g) + 0.5 * p.detach().float()).to(p.dtype)


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("bits", [32, 8])
def test_step_rounds_the_fp32_result_to_a_neighbour_without_bias(dtype, bits):
    # lr far below half a spacing: rounding to nearest would leave every weight where it is.
    p = _param(dtype, n=20000)
    opt = lionkit.Lion([p], lr=2e-5, optim_bits=bits, weight_decay=0.5, stochastic_rounding=True, sr_seed=3)
    g = _grad(p, 0)
    p.grad = g
    before = p.detach().clone()
    opt.step()
    # fp32 result of the step from the same inputs (momentum starts at 0 either way)
    p32, _ = lion_reference(before.float(), g.float(), torch.zeros(p.shape), lr=2e-5, beta1=0.9, beta2=0.99,
                            weight_decay=0.5)
    lo, hi = _neighbours(p32, dtype)
    after = p.detach().double()
    assert ((after == lo) | (after == hi)).all()
    assert (after != before.double()).any()  # some moved although every step is < half a spacing
    # unbiased: the mean rounding error, in units of each element's gap, is ~0
    gap = hi - lo
    inexact = gap > 0
    frac = ((p32.double() - lo) / gap)[inexact]
    err = ((after - p32.double()) / gap)[inexact]
    se = math.sqrt((frac * (1 - frac)).sum().item()) / inexact.sum().item()
    assert abs(err.mean().item()) < 4.5 * se


@pytest.mark.parametrize("cls", CLASSES)
def test_every_optimizer_accepts_stochastic_rounding(cls):
    p = _param(torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Paged* on CPU warn that they cannot page
        opt = cls([p], lr=1e-5, stochastic_rounding=True, sr_seed=1)
    p.grad = _grad(p, 0)
    before = p.detach().clone()
    opt.step()
    assert (p.detach() != before).any()
    assert opt.stochastic_rounding is True and opt.sr_seed == 1
    assert "stochastic_rounding: True" in repr(opt)


def _trajectory(dtype=torch.bfloat16, steps=3, **kw) -> list[torch.Tensor]:
    p = _param(dtype)
    q = _param(dtype, n=300, seed=1)
    opt = lionkit.Lion([p, q], lr=1e-4, optim_bits=8, min_8bit_size=4096, **kw)
    out = []
    for step in range(steps):
        p.grad, q.grad = _grad(p, step), _grad(q, step)
        opt.step()
        out += [p.detach().clone(), q.detach().clone()]
    return out


def test_same_sr_seed_same_run_other_seed_other_run():
    a = _trajectory(stochastic_rounding=True, sr_seed=11)
    b = _trajectory(stochastic_rounding=True, sr_seed=11)
    c = _trajectory(stochastic_rounding=True, sr_seed=12)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[-2], c[-2])


def test_seed_drawn_from_torch_manual_seed():
    torch.manual_seed(123)
    a = _trajectory(stochastic_rounding=True)
    torch.manual_seed(123)
    b = _trajectory(stochastic_rounding=True)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("how", ["switched on", "seed cleared"])
def test_rounding_switched_on_between_steps_draws_its_seed(how):
    # the settings are attributes a user may set between steps; switching rounding on without a
    # seed crashed the step (int(None)) instead of drawing one as the constructor does
    p = _param(torch.bfloat16)
    if how == "switched on":
        opt = lionkit.Lion([p], lr=1e-4, optim_bits=8)
        opt.stochastic_rounding = True
    else:
        opt = lionkit.Lion([p], lr=1e-4, optim_bits=8, stochastic_rounding=True, sr_seed=3)
        opt.sr_seed = None
    p.grad = _grad(p, 0)
    torch.manual_seed(7)
    opt.step()
    torch.manual_seed(7)
    want_seed = int(torch.randint(0, 2**62, (), dtype=torch.int64).item())
    assert opt.sr_seed == want_seed
    q = _param(torch.bfloat16)
    ref = lionkit.Lion([q], lr=1e-4, optim_bits=8, stochastic_rounding=True, sr_seed=want_seed)
    q.grad = _grad(q, 0)
    ref.step()
    assert torch.equal(p, q)


def test_resume_continues_exactly():
    full = _trajectory(steps=4, stochastic_rounding=True, sr_seed=5)
    p, q = _param(torch.bfloat16), _param(torch.bfloat16, n=300, seed=1)
    opt = lionkit.Lion([p, q], lr=1e-4, optim_bits=8, stochastic_rounding=True, sr_seed=5)
    for step in range(2):
        p.grad, q.grad = _grad(p, step), _grad(q, step)
        opt.step()
    saved = opt.state_dict()
    p2, q2 = torch.nn.Parameter(p.detach().clone()), torch.nn.Parameter(q.detach().clone())
    opt2 = lionkit.Lion([p2, q2], lr=1e-4, optim_bits=8, stochastic_rounding=True, sr_seed=5)
    opt2.load_state_dict(saved)
    for step in range(2, 4):
        p2.grad, q2.grad = _grad(p2, step), _grad(q2, step)
        opt2.step()
    assert torch.equal(p2.detach(), full[-2]) and torch.equal(q2.detach(), full[-1])


def test_no_effect_on_fp32_parameters():
    a = _trajectory(dtype=torch.float32, stochastic_rounding=True, sr_seed=1)
    b = _trajectory(dtype=torch.float32)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(stochastic_rounding="yes"), "Invalid stochastic_rounding: 'yes'"),
        (dict(stochastic_rounding=1), "Invalid stochastic_rounding: 1"),
        (dict(stochastic_rounding=True, sr_seed=-1), r"Invalid sr_seed: -1 \(must be an int in \[0, 2\*\*63\)"),
        (dict(stochastic_rounding=True, sr_seed=2**63), "Invalid sr_seed"),
        (dict(stochastic_rounding=True, sr_seed=1.5), "Invalid sr_seed: 1.5"),
        (dict(stochastic_rounding=True, sr_seed=True), "Invalid sr_seed: True"),
    ],
)
def test_bad_arguments_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        lionkit.Lion([_param(torch.bfloat16)], **kwargs)


class _NoSRBackend:
    """A backend that does not implement stochastic rounding and records what it is given."""

    name = "nosr"

    def __init__(self) -> None:
        self.seen: list[torch.Tensor] = []

    def supports(self, p, m) -> bool:
        return True

    def step_many(self, params, grads, moms, hypers) -> None:
        assert not any(hp.stochastic_rounding for hp in hypers)
        self.seen += list(params)
        kernels.TorchBackend().step_many(params, grads, moms, hypers)


def _sr_model(block_wise: bool = True) -> list[torch.nn.Parameter]:
    # one tensor larger than a chunk of the eager backend (so chunk offsets matter), one small
    return [_param(torch.bfloat16, n=(1 << 18) + 1000), _param(torch.float16, n=300, seed=1),
            _param(torch.float32, n=5000, seed=2)]


def _sr_steps(params, steps=2, **kw) -> None:
    opt = lionkit.Lion(params, lr=1e-4, optim_bits=8, stochastic_rounding=True, sr_seed=9, **kw)
    for step in range(steps):
        for p in params:
            p.grad = _grad(p, step)
        opt.step()
    return opt


@pytest.mark.parametrize("block_wise", [True, False])
def test_backend_without_sr_updates_an_fp32_copy_with_the_same_result(monkeypatch, block_wise):
    ref = _sr_model()
    _sr_steps(ref, backend="torch", block_wise=block_wise)
    fake = _NoSRBackend()
    monkeypatch.setattr(kernels, "resolve", lambda name, device: fake)
    got = _sr_model()
    opt = _sr_steps(got, block_wise=block_wise)
    # it only ever saw fp32 tensors, never an SR request; and the parameters are bit-identical
    assert {t.dtype for t in fake.seen} == {torch.float32}
    assert all(torch.equal(a, b) for a, b in zip(ref, got))
    assert opt.backends_used["cpu"].startswith("nosr (+ fp32 copy and stochastic rounding)")


def test_compiled_backend_with_sr_matches_torch_backend():
    try:
        kernels.resolve("compiled", torch.device("cpu"))
    except Exception as e:  # no C++ compiler, or a build without that backend
        pytest.skip(f"compiled CPU backend unavailable: {e}")
    ref, got = _sr_model(), _sr_model()
    _sr_steps(ref, backend="torch")
    _sr_steps(got, backend="compiled")
    assert all(torch.equal(a, b) for a, b in zip(ref, got))


# ---------------------------------------------------------------------------------- training
def _train_regression(dtype: torch.dtype, sr: bool, steps: int = 300) -> tuple[torch.Tensor, list[float]]:
    """Linear regression to a fixed teacher, weights of magnitude ~1 (bf16 spacing 2**-7 there)
    and a decaying lr that ends far below half a spacing. Returns (weights, losses)."""
    g = torch.Generator().manual_seed(0)
    teacher = torch.randn(64, 8, generator=g)
    x = torch.randn(512, 64, generator=g)
    y = x @ teacher
    w = torch.nn.Parameter((teacher + 0.5 * torch.randn(64, 8, generator=g)).to(dtype))
    opt = lionkit.Lion([w], lr=3e-3, betas=(0.9, 0.99), min_8bit_size=0, optim_bits=8,
                       stochastic_rounding=sr, sr_seed=0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    losses = []
    for step in range(steps):
        idx = torch.randint(0, 512, (64,), generator=g)
        loss = ((x[idx].to(dtype) @ w).float() - y[idx]).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(((x.to(dtype) @ w).float() - y).pow(2).mean().item())
    return w.detach().float(), losses


def test_pure_bf16_training_with_sr_tracks_fp32_better_than_without():
    w32, l32 = _train_regression(torch.float32, sr=False)
    w_sr, l_sr = _train_regression(torch.bfloat16, sr=True)
    w_rn, l_rn = _train_regression(torch.bfloat16, sr=False)
    gap_sr, gap_rn = abs(l_sr[-1] - l32[-1]), abs(l_rn[-1] - l32[-1])
    assert gap_sr < 0.5 * gap_rn, (l32[-1], l_sr[-1], l_rn[-1])
    assert (w_sr - w32).norm() < 0.5 * (w_rn - w32).norm()


def test_derive_keys32_equals_the_scalar_derivation():
    steps = np.array([1, 2, 3, 1000, 2**40], dtype=np.uint64)
    idx = np.array([0, 5, 147, 3, 2**33], dtype=np.uint64)
    for seed in (0, 9, 2**62 + 7):
        want = [rounding.key32(rounding.derive_seed(seed, int(s), int(i))) for s, i in zip(steps, idx)]
        assert rounding.derive_keys32(seed, steps, idx).tolist() == want
        four = [rounding.derive_seed(seed, int(s), int(i), 4) for s, i in zip(steps, idx)]
        assert rounding.derive_seeds(seed, steps, idx, 4).tolist() == four


def test_keyed_rounding_checks_its_arguments_like_the_unkeyed_one():
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        rounding.stochastic_round_keyed(torch.arange(4), torch.bfloat16, 1)  # was rounded silently
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        rounding.stochastic_round_keyed([1.0, 2.0], torch.bfloat16, 1)
    with pytest.raises(TypeError, match="key must be an int"):
        rounding.stochastic_round_keyed(torch.ones(4), torch.bfloat16, None)
    out = rounding.stochastic_round_keyed(torch.ones(4), torch.bfloat16, np.uint32(7))  # numpy ints are ints
    assert out.dtype == torch.bfloat16
