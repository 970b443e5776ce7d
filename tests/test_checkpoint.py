"""checkpoint.py: bit-identical round trips, bitsandbytes layouts, 8<->32-bit conversion."""

from __future__ import annotations

import copy
import io

import pytest
import torch

import lionkit
from lionkit import checkpoint, quant
from conftest import bnb_or_skip


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.ReLU(), torch.nn.Linear(96, 8))


def _train(model, opt, steps, seed=100, sched=None):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(32, 64, generator=gen)
        y = torch.randn(32, 8, generator=gen)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        if sched is not None:
            sched.step()


def _roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


VARIANTS = {
    "Lion": lambda ps: lionkit.Lion(ps, lr=1e-3, weight_decay=0.1),
    "Lion8bit": lambda ps: lionkit.Lion8bit(ps, lr=1e-3, weight_decay=0.1, min_8bit_size=100),
    "Lion8bit-per-tensor": lambda ps: lionkit.Lion8bit(ps, lr=1e-3, min_8bit_size=100, block_wise=False),
    "percentile+clip": lambda ps: lionkit.Lion8bit(
        ps, lr=lambda s: 1e-3 / (1 + s), min_8bit_size=100, percentile_clipping=90, grad_clip_norm=1.0,
        grad_clip_value=0.5),
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_state_dict_roundtrip_resumes_bit_identically(name):
    make = VARIANTS[name]
    ref_model = _model()
    ref_opt = make(ref_model.parameters())
    _train(ref_model, ref_opt, 6)
    saved_model = _roundtrip(ref_model.state_dict())
    saved_opt = _roundtrip(ref_opt.state_dict())
    _train(ref_model, ref_opt, 6, seed=200)

    model = _model(seed=1)
    model.load_state_dict(saved_model)
    opt = make(model.parameters())
    opt.load_state_dict(saved_opt)
    _train(model, opt, 6, seed=200)
    for a, b in zip(ref_model.parameters(), model.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(ref_model.parameters(), model.parameters()):
        sa, sb = ref_opt.state[a], opt.state[b]
        assert sa.keys() == sb.keys()
        for k in sa:
            if isinstance(sa[k], torch.Tensor):
                assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
            else:
                assert sa[k] == sb[k], k


def test_load_keeps_fp32_state_for_bf16_params():
    """torch's default load casts state to the parameter dtype; fp32 momentum must stay fp32."""
    p = torch.nn.Parameter(torch.randn(5000, dtype=torch.bfloat16))
    opt = lionkit.Lion([p], lr=1e-3)
    p.grad = torch.randn(5000, dtype=torch.bfloat16)
    opt.step()
    opt2 = lionkit.Lion([p], lr=1e-3)
    opt2.load_state_dict(_roundtrip(opt.state_dict()))
    assert opt2.state[p]["state1"].dtype == torch.float32
    assert torch.equal(opt2.state[p]["state1"], opt.state[p]["state1"])


def test_loaded_state_is_a_copy():
    p = torch.nn.Parameter(torch.randn(5000))
    opt = lionkit.Lion8bit([p], lr=1e-3)
    p.grad = torch.randn(5000)
    opt.step()
    sd = opt.state_dict()
    opt2 = lionkit.Lion8bit([p], lr=1e-3)
    before = copy.deepcopy(sd)
    opt2.load_state_dict(sd)
    for t in opt2.state[p].values():
        if isinstance(t, torch.Tensor):
            t.zero_()
    opt2.step()
    for k, v in before["state"][0].items():
        assert torch.equal(v, sd["state"][0][k]) if isinstance(v, torch.Tensor) else v == sd["state"][0][k]


@pytest.mark.parametrize("nested", [False, True])
def test_bnb_layouts_load(nested):
    """A state dict in bnb's plain or nested layout (built here, so no bnb needed)."""
    p = torch.nn.Parameter(torch.randn(5000))
    opt = lionkit.Lion8bit([p], lr=1e-3)
    p.grad = torch.randn(5000)
    opt.step()
    sd = opt.state_dict()
    sd["param_groups"][0]["eps"] = 0.0  # bnb's groups carry an unused eps
    if nested:
        sd = checkpoint.to_bitsandbytes(sd)
        assert set(sd["state"][0]) == {"step", checkpoint.BNB_NESTED_KEY}
    opt2 = lionkit.Lion8bit([p], lr=1e-3)
    opt2.load_state_dict(_roundtrip(sd))
    assert "eps" not in opt2.param_groups[0]
    for k in ("state1", "absmax1", "qmap1"):
        assert torch.equal(opt2.state[p][k], opt.state[p][k])


@pytest.mark.parametrize("bits", [32, 8])
def test_bitsandbytes_checkpoint_continues_as_in_bitsandbytes(bits):
    bnb = bnb_or_skip()
    torch.manual_seed(7)
    w = torch.randn(64, 300)
    theirs, ours = torch.nn.Parameter(w.clone()), torch.nn.Parameter(w.clone())
    bopt = bnb.optim.Lion([theirs], lr=1e-2, weight_decay=0.1, optim_bits=bits)
    for step in range(5):
        theirs.grad = torch.randn(64, 300, generator=torch.Generator().manual_seed(step))
        bopt.step()
    sd = bopt.state_dict()  # bnb 0.50: nested layout
    ours.data.copy_(theirs.data)
    lopt = lionkit.Lion([ours], lr=1e-2, weight_decay=0.1, optim_bits=bits)
    lopt.load_state_dict(_roundtrip(sd))
    assert lopt.state[ours]["step"] == 5
    g = torch.randn(64, 300, generator=torch.Generator().manual_seed(99))
    theirs.grad, ours.grad = g.clone(), g.clone()
    bopt.step()
    lopt.step()
    # the first step after loading uses the same decoded momentum; only sign ties may differ
    assert (ours != theirs).float().mean().item() < 1e-3
    if bits == 8:
        diff = (lopt.state[ours]["state1"].long() - bopt.state[theirs]["state1"].long()).abs()
        assert diff.float().mean().item() < 0.01


def test_lionkit_8bit_state_loads_into_bitsandbytes():
    bnb = bnb_or_skip()
    p = torch.nn.Parameter(torch.randn(64, 300))
    lopt = lionkit.Lion8bit([p], lr=1e-2)
    for step in range(3):
        p.grad = torch.randn(64, 300, generator=torch.Generator().manual_seed(step))
        lopt.step()
    q = torch.nn.Parameter(p.detach().clone())
    bopt = bnb.optim.Lion8bit([q], lr=1e-2)
    bopt.load_state_dict(lionkit.to_bitsandbytes(lopt.state_dict()))  # exported as README says
    assert torch.equal(bopt.state[q]["state1"], lopt.state[p]["state1"])
    assert torch.equal(bopt.state[q]["absmax1"], lopt.state[p]["absmax1"])
    g = torch.randn(64, 300)
    p.grad, q.grad = g.clone(), g.clone()
    lopt.step()
    bopt.step()
    assert (p != q).float().mean().item() < 1e-3


def test_8bit_checkpoint_into_32bit_optimizer_and_back():
    p = torch.nn.Parameter(torch.randn(5000))
    o8 = lionkit.Lion8bit([p], lr=1e-3)
    for step in range(3):
        p.grad = torch.randn(5000)
        o8.step()
    st = o8.state[p]
    m8 = quant.dequantize(st["state1"], st["absmax1"], st["qmap1"], 256)
    o32 = lionkit.Lion([p], lr=1e-3)
    o32.load_state_dict(_roundtrip(o8.state_dict()))
    assert o32.state[p]["state1"].dtype == torch.float32 and "absmax1" not in o32.state[p]
    assert torch.equal(o32.state[p]["state1"], m8)  # dequantized exactly, at load time
    assert o32.state[p]["step"] == 3
    back = lionkit.Lion8bit([p], lr=1e-3)
    back.load_state_dict(_roundtrip(o32.state_dict()))
    # converted back exactly as a Lion8bit step would quantize that fp32 momentum
    codes, absmax = quant.quantize(m8, quant.dynamic_map(), 256)
    assert torch.equal(back.state[p]["state1"], codes) and torch.equal(back.state[p]["absmax1"], absmax)
    assert back.state[p]["step"] == 3


def test_lion_pytorch_state_loads():
    lp = pytest.importorskip("lion_pytorch", reason="lion-pytorch not installed (pip install 'lionkit[peers]')")
    p = torch.nn.Parameter(torch.randn(500))
    theirs = lp.Lion([p], lr=1e-3)
    p.grad = torch.randn(500)
    theirs.step()
    ours = lionkit.Lion([p], lr=1e-3)
    ours.load_state_dict(theirs.state_dict())
    assert torch.equal(ours.state[p]["state1"], theirs.state[p]["exp_avg"])


def test_save_checkpoint_is_atomic_and_loadable(tmp_path):
    p = torch.nn.Parameter(torch.randn(5000))
    opt = lionkit.Lion8bit([p], lr=1e-3)
    p.grad = torch.randn(5000)
    opt.step()
    path = tmp_path / "opt.pt"
    lionkit.save_checkpoint(opt.state_dict(), path)
    loaded = torch.load(path, weights_only=True)
    assert torch.equal(loaded["state"][0]["state1"], opt.state[p]["state1"])
    assert [f.name for f in tmp_path.iterdir()] == ["opt.pt"]  # no temporary left behind


def test_empty_state_entries_and_load_hooks_behave_as_in_torch():
    # reading opt.state[p] of a parameter that never stepped adds {} (a defaultdict, as torch):
    # the state dict then holds it, and must load back (as "no state yet")
    p, q = torch.nn.Parameter(torch.randn(5000)), torch.nn.Parameter(torch.randn(4))
    opt = lionkit.Lion8bit([p, q], min_8bit_size=100)
    p.grad = torch.randn(5000)
    opt.step()
    assert opt.state[q] == {}
    sd = opt.state_dict()
    assert sd["state"][1] == {}
    opt.load_state_dict(sd)
    assert q not in opt.state or opt.state[q] == {}
    assert 1 not in lionkit.to_bitsandbytes(sd)["state"]
    # a load pre-hook that edits the dict edits lionkit's copy, not the caller's (as torch)
    sd["mine"] = 1
    def drop_mine(optimizer, state_dict):
        del state_dict["mine"]

    opt.register_load_state_dict_pre_hook(drop_mine)
    opt.load_state_dict(sd)
    assert sd["mine"] == 1
