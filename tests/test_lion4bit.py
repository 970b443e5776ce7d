"""Lion4bit: the step against the written-out reference, reproducibility and resume, state
conversions, checkpoints, errors, and the reason for stochastic rounding (momentum error)."""

from __future__ import annotations

import io

import pytest
import torch

import lionkit
from lionkit import checkpoint, interop, quant4
from lionkit.kernels import torch_eager
from lionkit.kernels.base import StepHyper
from lionkit.qstate import QuantizedState
from lionkit.reference import lion_reference, lion_reference_4bit
from conftest import DTYPES

HYPER = dict(lr=1e-2, beta1=0.9, beta2=0.99, weight_decay=0.1)


def _grads(shape, step, dtype=torch.float32):
    return (torch.randn(shape, generator=torch.Generator().manual_seed(100 + step)) * 1e-2).to(dtype)


def _state(opt, p):
    return {k: (v.clone() if torch.is_tensor(v) else v) for k, v in opt.state[p].items()}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 31, 33, 4097])
def test_kernel_step_matches_written_out_reference(dtype, n):
    """torch_eager.step_4bit == unpack -> fp32 reference -> brute-force neighbours -> u < p, bit
    for bit, with the uniforms of the step's key; over steps that start from nonzero momentum."""
    gen = torch.Generator().manual_seed(n)
    p = torch.randn(n, generator=gen).to(dtype)
    q = QuantizedState.from_float4(torch.randn(n, generator=gen) * 1e-2)
    for step in range(3):
        g = _grads(n, step, dtype)
        g[::5] = 0
        hp = StepHyper(**HYPER, skip_zeros=step == 2, mseed=1000 + step)
        want_p, want_codes, want_absmax = lion_reference_4bit(
            p, g, q.codes, q.absmax, q.qmap, quant4.uniform(hp.mseed, 0, n), skip_zeros=hp.skip_zeros, **HYPER
        )
        torch_eager.step_4bit(p, g, q, hp)
        assert torch.equal(p, want_p.to(dtype))
        assert torch.equal(q.codes, want_codes)
        assert torch.equal(q.absmax, want_absmax)


def test_step_does_not_depend_on_chunking(monkeypatch):
    """The random numbers belong to elements, not to chunks: any chunk size, the same result."""
    n = 5000
    results = []
    for chunk in (torch_eager.CHUNK, 64, 96):
        monkeypatch.setattr(torch_eager, "CHUNK", chunk)
        p = torch.nn.Parameter(torch.randn(n, generator=torch.Generator().manual_seed(0)))
        opt = lionkit.Lion4bit([p], lr=1e-3, min_8bit_size=0)
        for step in range(3):
            p.grad = _grads(n, step)
            opt.step()
        results.append((p.detach().clone(), _state(opt, p)))
    for p, st in results[1:]:
        assert torch.equal(p, results[0][0])
        assert all(torch.equal(st[k], results[0][1][k]) for k in ("state1", "absmax1"))


def _run(steps, sr_seed=None, params=None, opt=None, start=0, **kw):
    params = params or [torch.nn.Parameter(torch.randn(s, generator=torch.Generator().manual_seed(i)))
                        for i, s in enumerate((6000, 300, 4100))]
    opt = opt or lionkit.Lion4bit(params, lr=1e-3, weight_decay=0.1, min_8bit_size=1000, sr_seed=sr_seed, **kw)
    for step in range(start, start + steps):
        for p in params:
            p.grad = _grads(p.shape, step * 7 + p.numel(), p.dtype)
        opt.step()
    return params, opt


def test_small_tensors_keep_fp32_and_state_is_0_625_bytes_per_element():
    params, opt = _run(1)
    big, small = opt.state[params[0]], opt.state[params[1]]
    assert small["state1"].dtype == torch.float32
    assert big["state1"].shape == (3000,) and big["absmax1"].shape == (188,) and big["qmap1"].shape == (15,)
    q = opt.momentum(big, params[0])
    assert q.bits == 4 and q.block_size == 32 and q.size() == 6000
    per_element = (big["state1"].numel() + 4 * big["absmax1"].numel()) / 6000
    assert per_element == pytest.approx(0.625, abs=0.001)


def test_reproducible_and_seeded():
    a, _ = _run(4)
    b, _ = _run(4)
    c, _ = _run(4, sr_seed=7)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], c[0])  # another seed, other roundings, another trajectory
    assert torch.equal(a[1], c[1])  # the small tensor has fp32 momentum: no randomness


def test_parameters_draw_different_numbers():
    """Two identical tensors in one optimizer must not share their rounding noise."""
    x = torch.randn(4096, generator=torch.Generator().manual_seed(0))
    p1, p2 = torch.nn.Parameter(x.clone()), torch.nn.Parameter(x.clone())
    opt = lionkit.Lion4bit([p1, p2], lr=1e-3, min_8bit_size=0)
    for step in range(3):
        g = _grads(4096, step)
        p1.grad, p2.grad = g.clone(), g.clone()
        opt.step()
    assert not torch.equal(opt.state[p1]["state1"], opt.state[p2]["state1"])


@pytest.mark.parametrize("sr", [False, True])
def test_resume_is_bit_identical(sr):
    dtype = torch.bfloat16 if sr else torch.float32
    kw = dict(stochastic_rounding=True, sr_seed=11) if sr else dict(sr_seed=None)

    def fresh():
        return [torch.nn.Parameter(torch.randn(s, generator=torch.Generator().manual_seed(i)).to(dtype))
                for i, s in enumerate((6000, 300, 4100))]

    seed = kw.pop("sr_seed")
    straight, opt_s = _run(6, params=fresh(), sr_seed=seed, **kw)
    half, opt_h = _run(3, params=fresh(), sr_seed=seed, **kw)
    buf = io.BytesIO()
    torch.save({"p": [p.detach() for p in half], "opt": opt_h.state_dict()}, buf)
    buf.seek(0)
    ck = torch.load(buf, weights_only=True)
    resumed = [torch.nn.Parameter(t.clone()) for t in ck["p"]]
    opt_r = lionkit.Lion4bit(resumed, lr=1e-3, weight_decay=0.1, min_8bit_size=1000, sr_seed=seed, **kw)
    opt_r.load_state_dict(ck["opt"])
    _run(3, params=resumed, opt=opt_r, start=3)
    for a, b in zip(straight, resumed):
        assert torch.equal(a, b)
        assert torch.equal(opt_s.state[a]["state1"], opt_r.state[b]["state1"])


def test_compiled_backend_and_sr_adapter_give_the_eager_result():
    """With the fused CPU backend the 4-bit tensors go to the eager path (also under stochastic
    rounding of bf16 weights, where the other tensors go through the SR adapter): the result is
    the eager backend's, bit for bit."""
    from lionkit.kernels import compiled

    try:
        compiled.load()
    except compiled.BuildError as e:
        pytest.skip(f"compiled CPU kernel cannot be built here: {e}")
    out = []
    for backend in ("torch", "compiled"):
        params = [torch.nn.Parameter(torch.randn(s, generator=torch.Generator().manual_seed(i)).to(torch.bfloat16))
                  for i, s in enumerate((6000, 300, 4100))]
        _, opt = _run(3, params=params, backend=backend, stochastic_rounding=True, sr_seed=3)
        out.append((params, opt))
    assert out[1][1].backends_used["cpu"].startswith("compiled")
    for a, b in zip(out[0][0], out[1][0]):
        assert torch.equal(a, b)
        assert torch.equal(out[0][1].state[a]["state1"], out[1][1].state[b]["state1"])


def test_conversions_between_4_8_and_32_bits():
    params, opt4 = _run(3)
    p = params[0]
    m4 = opt4.momentum(opt4.state[p], p).dequantize()
    sd = opt4.state_dict()
    q = [torch.nn.Parameter(t.detach().clone()) for t in params]
    o32 = lionkit.Lion(q, lr=1e-3)
    o32.load_state_dict(sd)
    assert torch.equal(o32.state[q[0]]["state1"].view(-1), m4)  # exact: 4-bit values are fp32 values
    o8 = lionkit.Lion8bit(q, lr=1e-3, min_8bit_size=1000)
    o8.load_state_dict(sd)
    want = QuantizedState.from_float(m4.view(p.shape))
    assert torch.equal(o8.state[q[0]]["state1"], want.codes) and torch.equal(o8.state[q[0]]["absmax1"], want.absmax)
    # and back: 32 -> 4 rounds to nearest
    o4 = lionkit.Lion4bit(q, lr=1e-3, min_8bit_size=1000)
    o4.load_state_dict(o32.state_dict())
    back = QuantizedState.from_float4(m4)
    assert torch.equal(o4.state[q[0]]["state1"], back.codes) and torch.equal(o4.state[q[0]]["absmax1"], back.absmax)
    o4.state_dict()  # a valid state: saves


def test_override_to_4_bits_mid_training():
    params = [torch.nn.Parameter(torch.randn(5000))]
    opt = lionkit.Lion8bit(params, lr=1e-3)
    params[0].grad = _grads(5000, 0)
    opt.step()
    m8 = opt.momentum(opt.state[params[0]], params[0]).dequantize().view(-1)
    lionkit.GlobalOptimManager.get_instance().override_config(params[0], "optim_bits", 4)
    params[0].grad = _grads(5000, 1)
    opt.step()
    st = opt.state[params[0]]
    assert st["qmap1"].numel() == 15 and st["state1"].numel() == 2500
    # the step ran from the 8-bit momentum, converted to 4 bits by rounding to nearest
    p_ref, m_ref = lion_reference(torch.zeros(5000), _grads(5000, 1), QuantizedState.from_float4(m8).dequantize(),
                                  lr=1e-3, beta1=0.9, beta2=0.99)
    got = opt.momentum(st, params[0]).dequantize()
    assert ((got - m_ref).abs() <= 0.45 * st["absmax1"].repeat_interleave(32)[:5000]).all()


def test_block_wise_false_is_refused():
    p = torch.nn.Parameter(torch.randn(5000))
    with pytest.raises(ValueError, match="block_wise: False with optim_bits=4"):
        lionkit.Lion4bit([p], block_wise=False)
    with pytest.raises(ValueError, match="block_wise: False with optim_bits=4"):
        lionkit.Lion([p], optim_bits=4, block_wise=False)
    # through an override: refused at the step, nothing written
    opt = lionkit.Lion4bit([p], lr=1e-3)
    lionkit.GlobalOptimManager.get_instance().override_config(p, "block_wise", False)
    p.grad = torch.ones(5000)
    before = p.detach().clone()
    with pytest.raises(ValueError, match="block_wise"):
        opt.step()
    assert torch.equal(p.detach(), before) and not opt.state.get(p)


@pytest.mark.parametrize(
    "damage, msg",
    [
        (lambda st: st.__setitem__("state1", st["state1"][:-1]), "4-bit codes"),
        (lambda st: st.__setitem__("absmax1", st["absmax1"][:-1]), "188 block scales"),
        (lambda st: st.__setitem__("absmax1", -st["absmax1"]), "negative"),
        (lambda st: st.__setitem__("qmap1", st["qmap1"].flip(0)), "qmap1"),
        (lambda st: st.pop("absmax1"), "4-bit momentum"),
        (lambda st: st["state1"].__setitem__(3, 0xF7), "code 15 in 1 place"),  # one flipped nibble
    ],
)
def test_damaged_4bit_checkpoint_is_refused_by_name(damage, msg):
    params, opt = _run(1)
    sd = opt.state_dict()
    damage(sd["state"][0])
    fresh = lionkit.Lion4bit([torch.nn.Parameter(p.detach().clone()) for p in params], min_8bit_size=1000)
    with pytest.raises(ValueError, match=msg):
        fresh.load_state_dict(sd)
    assert not fresh.state


def test_exports_that_cannot_hold_4_bits_refuse():
    _, opt = _run(1)
    with pytest.raises(ValueError, match="4-bit momentum, which bitsandbytes cannot load"):
        checkpoint.to_bitsandbytes(opt.state_dict())
    with pytest.raises(ValueError, match="4-bit momentum"):
        interop.from_torch(opt)


def test_stochastic_rounding_keeps_the_momentum_unbiased():
    """Why 4-bit momentum is rounded stochastically: noisy gradients around a per-element mean,
    beta2 = 0.99, 300 steps. The SR momentum is an unbiased copy of the fp32 one (regression
    slope 1, noise aside); the same format rounded to nearest loses the small moves (slope
    0.92) and tracks the fp32 momentum worse (lower correlation). Deterministic (fixed seeds)."""
    n = 32 * 256
    gen = torch.Generator().manual_seed(0)
    mean = torch.randn(n, generator=gen) * 0.1
    p = torch.nn.Parameter(torch.zeros(n))
    opt = lionkit.Lion4bit([p], lr=0.0, betas=(0.9, 0.99), min_8bit_size=0)
    exact = torch.zeros(n)
    nearest = QuantizedState.from_float4(torch.zeros(n))
    for _ in range(300):
        g = mean + torch.randn(n, generator=gen)
        p.grad = g
        opt.step()
        exact = 0.99 * exact + 0.01 * g
        nearest = QuantizedState.from_float4(0.99 * nearest.dequantize() + 0.01 * g)
    sr = opt.momentum(opt.state[p], p).dequantize()
    nd = nearest.dequantize()

    def slope(y):
        return float((y * exact).sum() / (exact * exact).sum())

    def corr(y):
        return float(torch.corrcoef(torch.stack([y, exact]))[0, 1])

    assert abs(slope(sr) - 1) < 0.02 and slope(nd) < 0.95, (slope(sr), slope(nd))
    assert corr(sr) > corr(nd) + 0.1, (corr(sr), corr(nd))


def test_4bit_per_tensor_group_refused_when_added():
    # a group asking for optim_bits=4 with block_wise=False was accepted and refused only at
    # the first step
    p, q = torch.nn.Parameter(torch.randn(100)), torch.nn.Parameter(torch.randn(100))
    with pytest.raises(ValueError, match="param group 0: Invalid block_wise"):
        lionkit.Lion([{"params": [p], "optim_bits": 4, "block_wise": False}], min_8bit_size=1)
    opt = lionkit.Lion([p], min_8bit_size=1)
    with pytest.raises(ValueError, match="param group 1: Invalid block_wise"):
        opt.add_param_group({"params": [q], "optim_bits": 4, "block_wise": False})
    assert len(opt.param_groups) == 1
    # block_wise=False from the optimizer's defaults
    per_tensor = lionkit.Lion8bit([p], min_8bit_size=1, block_wise=False)
    with pytest.raises(ValueError, match="param group 1: Invalid block_wise"):
        per_tensor.add_param_group({"params": [q], "optim_bits": 4})


def test_4bit_override_on_per_tensor_optimizer_names_the_parameter():
    p, q = torch.nn.Parameter(torch.randn(100)), torch.nn.Parameter(torch.randn(300))
    opt = lionkit.Lion8bit([p, q], min_8bit_size=1, block_wise=False)
    lionkit.GlobalOptimManager.get_instance().override_config(q, "optim_bits", 4)  # conftest resets it
    p.grad, q.grad = torch.randn(100), torch.randn(300)
    with pytest.raises(ValueError, match=r"parameter 1 of param group 0 \(shape \(300,\).*Invalid block_wise"):
        opt.step()
