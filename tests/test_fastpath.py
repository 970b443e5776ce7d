"""The cached step plan (lionkit.fastpath): planned steps are bit-identical to full steps, and
every change the plan relies on sends the step back to the full path."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import NEEDS_GRAD_DTYPE

import lionkit
from lionkit import fastpath

CONFIGS = {
    "lion32": dict(cls=lionkit.Lion, kw={}),
    "lion8-block": dict(cls=lionkit.Lion8bit, kw=dict(min_8bit_size=300)),
    "lion8-tensor": dict(cls=lionkit.Lion8bit, kw=dict(min_8bit_size=300, block_wise=False)),
    "lion32-clip-skip": dict(cls=lionkit.Lion, kw=dict(grad_clip_value=1e-3, args=None)),
    "lion8-propagate": dict(cls=lionkit.Lion8bit, kw=dict(min_8bit_size=300, nonfinite="propagate")),
}
FOUR_BIT = dict(cls=lionkit.Lion4bit, kw=dict(min_8bit_size=300))  # planned on the compiled backend only
BACKENDS = ["torch", "auto"]


def _model(dtype=torch.float32) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in ((40, 30), (1000,), (7,), (300, 3))]


def _groups(params, schedule=False):
    lr2 = (lambda k: 1e-2 / (1 + k)) if schedule else 5e-3
    return [{"params": params[:2]}, {"params": params[2:], "lr": lr2, "weight_decay": 0.3}]


def _set_grads(params, step, skip=()):
    for i, p in enumerate(params):
        if i in skip:
            p.grad = None
            continue
        gen = torch.Generator().manual_seed(1000 * step + i)
        p.grad = (torch.randn(p.shape, generator=gen) * 1e-2).to(p.dtype)
        p.grad.view(-1)[:: 5 + i] = 0


class Pair:
    """The same optimizer twice: one may plan, the other never does."""

    def __init__(self, monkeypatch, config="lion32", backend="torch", dtype=torch.float32, schedule=False, **extra):
        spec = FOUR_BIT if config == "lion4" else CONFIGS[config]
        self.pa, self.pb = _model(dtype), _model(dtype)
        kw = dict(lr=1e-2, weight_decay=0.1, backend=backend, **spec["kw"], **extra)
        self.a = spec["cls"](_groups(self.pa, schedule), **kw)
        self.b = spec["cls"](_groups(self.pb, schedule), **kw)
        self.planned = 0
        real = self.a._planned_step

        def counting(plan):
            done = real(plan)
            self.planned += done
            return done

        monkeypatch.setattr(self.a, "_planned_step", counting)
        self.b._planned_step = lambda plan: False  # the full path, every step

    def step(self, k, skip=()):
        _set_grads(self.pa, k, skip)
        _set_grads(self.pb, k, skip)
        self.a.step()
        self.b.step()
        self.check()

    def both(self, fn):
        fn(self.a, self.pa)
        fn(self.b, self.pb)

    def check(self):
        for p, q in zip(self.pa, self.pb):
            assert torch.equal(p.detach(), q.detach())
            sa, sb = self.a.state.get(p, {}), self.b.state.get(q, {})
            assert sa.keys() == sb.keys()
            for key in sa:
                va, vb = sa[key], sb[key]
                if torch.is_tensor(va):
                    assert torch.equal(va, vb), key
                else:
                    assert va == vb, key
        for ga, gb in zip(self.a.param_groups, self.b.param_groups):
            assert ga.keys() == gb.keys()
            for k in ga:
                if k != "params":
                    same = torch.equal(ga[k], gb[k]) if torch.is_tensor(ga[k]) else ga[k] == gb[k]
                    assert same, k


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("config", list(CONFIGS))
def test_planned_steps_are_bit_identical(monkeypatch, config, backend):
    pair = Pair(monkeypatch, config, backend, schedule=True)
    if config == "lion32-clip-skip":
        for g in (*pair.a.param_groups, *pair.b.param_groups):
            g["skip_zeros"] = True
    for k in range(6):
        pair.step(k)
    assert pair.planned == 5  # every step after the first


@NEEDS_GRAD_DTYPE
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_planned_low_precision_and_fp32_grads(monkeypatch, dtype):
    pair = Pair(monkeypatch, "lion8-block", "auto", dtype)
    for k in range(4):
        pair.step(k)
    assert pair.planned == 3
    for p in (*pair.pa, *pair.pb):  # fp32 gradients for low-precision weights: a new plan
        p.grad_dtype = None
    for k in range(4, 7):
        for params in (pair.pa, pair.pb):
            for i, p in enumerate(params):
                p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(k * 10 + i)) * 1e-2
        pair.a.step()
        pair.b.step()
        pair.check()
    assert pair.planned == 3 + 2


def test_lr_scheduler_and_changed_settings(monkeypatch):
    pair = Pair(monkeypatch, "lion8-block", "auto")
    scheds = [torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5) for o in (pair.a, pair.b)]
    for k in range(3):
        pair.step(k)
        for s in scheds:
            s.step()
    assert pair.planned == 2  # a new lr each step: still planned
    # a changed setting: a full step, then planned again
    pair.both(lambda o, ps: o.param_groups[1].update(weight_decay=0.0, betas=(0.8, 0.9)))
    pair.step(3)
    pair.step(4)
    assert pair.planned == 3


def test_gradients_appearing_and_disappearing(monkeypatch):
    pair = Pair(monkeypatch, "lion8-block", "auto")
    pair.step(0)
    pair.step(1, skip=(2,))  # one gradient missing: full step
    pair.step(2, skip=(2,))  # same set as before: planned
    pair.step(3)  # it is back: full
    pair.step(4)
    assert pair.planned == 2


def test_replaced_tensors_and_loaded_checkpoints(monkeypatch):
    pair = Pair(monkeypatch, "lion8-block", "auto")
    pair.step(0)
    pair.step(1)
    # a parameter's data replaced (same values, new memory)
    pair.both(lambda o, ps: setattr(ps[1], "data", ps[1].data.clone()))
    pair.step(2)
    # a checkpoint loaded into both
    sd_a, sd_b = pair.a.state_dict(), pair.b.state_dict()
    pair.a.load_state_dict(sd_a)
    pair.b.load_state_dict(sd_b)
    pair.step(3)
    # a state tensor replaced by hand
    pair.both(lambda o, ps: o.state[ps[0]].__setitem__("state1", o.state[ps[0]]["state1"].clone()))
    pair.step(4)
    pair.step(5)
    # a parameter's whole state entry replaced by a copy (tensors cloned)
    copy = lambda st: {k: v.clone() if torch.is_tensor(v) else v for k, v in st.items()}
    pair.both(lambda o, ps: o.state.__setitem__(ps[2], copy(o.state[ps[2]])))
    pair.step(6)
    pair.step(7)
    # an entry removed and put back (the same dict, now last in the state's order)
    pair.both(lambda o, ps: o.state.__setitem__(ps[1], o.state.pop(ps[1])))
    pair.step(8)
    pair.step(9)
    assert pair.planned == 4  # steps 1, 5, 7 and 9


@pytest.mark.parametrize("config", ["lion32", "lion8-block", "lion4"])
@pytest.mark.parametrize("move", ["share_memory_", "set_"])
def test_state_moved_in_place_takes_the_full_path(monkeypatch, config, move):
    # share_memory_() (what handing a state dict to a checkpoint-writing process does) and set_()
    # give a state tensor new memory under the same object; the plan checked the object only, and
    # the compiled kernel wrote through the old address (freed memory: heap corruption)
    pair = Pair(monkeypatch, config, "auto")
    pair.step(0)
    pair.step(1)

    def moved(o, ps):
        for st in o.state.values():
            for v in st.values():
                if torch.is_tensor(v):
                    v.share_memory_() if move == "share_memory_" else v.set_(v.clone())

    pair.both(moved)
    pair.step(2)
    pair.step(3)
    assert pair.planned == 2  # steps 1 and 3


@pytest.mark.parametrize("backend", BACKENDS)
def test_state_set_to_another_size_is_refused_cleanly(backend):
    # set_() to a tensor of another size: the full path's check refuses it, naming the parameter,
    # and nothing is written (a planned eager step failed mid-way and left the optimizer torn)
    p = torch.nn.Parameter(torch.randn(512))
    opt = lionkit.Lion8bit([p], lr=1e-2, min_8bit_size=1, backend=backend)
    for _ in range(2):
        p.grad = torch.randn(512)
        opt.step()
    opt.state[p]["state1"].set_(torch.zeros(100, dtype=torch.uint8))
    before = p.detach().clone()
    p.grad = torch.randn(512)
    with pytest.raises(ValueError, match=r"parameter 0 of param group 0 .*has shape \(100,\)"):
        opt.step()
    assert opt.torn is None and torch.equal(p.detach(), before)


def test_overrides_and_new_groups(monkeypatch):
    pair = Pair(monkeypatch, "lion8-block", "auto")
    pair.step(0)
    pair.step(1)
    mng = lionkit.GlobalOptimManager.get_instance()
    mng.override_config([pair.pa[1], pair.pb[1]], "optim_bits", 32)
    pair.step(2)  # converted: full path; an override is present, so no plan after it either
    pair.step(3)
    mng.initialize()
    extra_a, extra_b = torch.nn.Parameter(torch.ones(500)), torch.nn.Parameter(torch.ones(500))
    pair.a.add_param_group({"params": [extra_a]})
    pair.b.add_param_group({"params": [extra_b]})
    pair.pa.append(extra_a)
    pair.pb.append(extra_b)
    pair.step(4)
    pair.step(5)
    assert pair.planned == 2  # steps 1 and 5


def test_settings_changed_in_place_or_on_the_optimizer(monkeypatch):
    pair = Pair(monkeypatch, "lion8-block", "auto")
    pair.both(lambda o, ps: o.param_groups[1].update(betas=[0.9, 0.99]))  # a list, as torch allows
    pair.step(0)
    pair.step(1)
    # changed inside the list: the plan must see it (it kept the list object itself before)
    pair.both(lambda o, ps: o.param_groups[1]["betas"].__setitem__(0, 0.0))
    pair.step(2)
    pair.step(3)
    # the optimizer's own settings, set by hand between steps
    pair.both(lambda o, ps: setattr(o, "grad_clip_norm", 1e-3))
    pair.step(4)
    pair.step(5)
    pair.both(lambda o, ps: setattr(o, "grad_clip_norm", None))
    pair.step(6)
    pair.step(7)
    assert pair.planned == 3  # steps 1, 3 and 7


def test_an_override_after_the_manager_is_reset(monkeypatch):
    # initialize() must not reset the manager's version: an optimizer (its plan and its
    # override cache) that saw version 1 before would take a new version 1 for the old one
    pair = Pair(monkeypatch, "lion32", "auto")
    mng = lionkit.GlobalOptimManager.get_instance()
    pair.step(0)
    mng.override_config([pair.pa[0], pair.pb[0]], "lr", 5e-3)
    pair.step(1)
    pair.step(2)
    mng.initialize()
    mng.override_config([pair.pa[1], pair.pb[1]], "lr", 0.0)
    before = [p.detach().clone() for p in pair.pa]
    pair.step(3)
    assert torch.equal(pair.pa[1].detach(), before[1])  # lr 0 now: not moved
    assert not torch.equal(pair.pa[0].detach(), before[0])  # its override is gone: lr 1e-2


@pytest.mark.parametrize("policy", ["raise", "skip"])
def test_nonfinite_gradient_goes_to_the_full_path(monkeypatch, policy):
    pair = Pair(monkeypatch, "lion8-block", "auto", nonfinite=policy)
    pair.step(0)
    pair.step(1)
    before = [p.detach().clone() for p in pair.pa]
    state = {k: v.clone() for k, v in pair.a.state[pair.pa[1]].items() if torch.is_tensor(v)}
    _set_grads(pair.pa, 2)
    pair.pa[1].grad[3] = math.nan
    if policy == "raise":
        with pytest.raises(lionkit.NonFiniteGradientError, match="parameter 1 of param group 0"):
            pair.a.step()
    else:
        pair.a.step()
        assert pair.a.skipped_steps == 1
    assert all(torch.equal(p.detach(), b) for p, b in zip(pair.pa, before))
    assert all(torch.equal(pair.a.state[pair.pa[1]][k], v) for k, v in state.items())
    assert pair.planned == 1


def test_bad_lr_is_refused_by_the_full_path(monkeypatch):
    pair = Pair(monkeypatch, "lion32")
    pair.step(0)
    pair.step(1)
    pair.a.param_groups[0]["lr"] = -1.0
    _set_grads(pair.pa, 2)
    with pytest.raises(ValueError, match="param group 0: Invalid learning rate: -1.0"):
        pair.a.step()


def test_failure_in_a_planned_kernel_marks_the_step_torn(monkeypatch):
    pair = Pair(monkeypatch, "lion32", "auto")
    pair.step(0)
    plan = pair.a._plan
    assert plan is not None

    def boom(grads, hypers, gptrs=None):
        raise RuntimeError("device lost")

    monkeypatch.setattr(plan, "run", boom)
    _set_grads(pair.pa, 1)
    with pytest.raises(RuntimeError, match="device lost"):
        pair.a.step()
    assert pair.a.torn is not None
    with pytest.raises(RuntimeError, match="stopped part-way"):
        pair.a.step()


@pytest.mark.parametrize("config", ["lion32", "lion8-block", "lion8-tensor"])
def test_planned_stochastic_rounding_is_bit_identical(monkeypatch, config):
    # bf16 parameters rounded stochastically: the plan computes each step's keys itself
    pair = Pair(monkeypatch, config, "auto", torch.bfloat16, schedule=True, stochastic_rounding=True, sr_seed=77)
    for k in range(5):
        pair.step(k)
    assert pair.planned == 4
    pair.step(5, skip=(2,))  # a gradient missing: full path, new plan
    pair.step(6, skip=(2,))
    assert pair.planned == 5
    # and the rounding is stochastic: the same run without it ends elsewhere
    plain = Pair(monkeypatch, config, "auto", torch.bfloat16, schedule=True)
    for k in range(5):
        plain.step(k)
    assert not all(torch.equal(p, q) for p, q in zip(pair.pa, plain.pa))


@pytest.mark.parametrize("dtype,extra", [(torch.float32, {}), (torch.float32, dict(sr_seed=5)),
                                         (torch.bfloat16, dict(stochastic_rounding=True, sr_seed=5))],
                         ids=["fp32", "fp32-seeded", "bf16-sr"])
def test_planned_4bit_momentum_is_bit_identical(monkeypatch, dtype, extra):
    # the 4-bit momentum's rounding keys change every step: the plan computes them itself
    pair = Pair(monkeypatch, "lion4", "auto", dtype, schedule=True, **extra)
    for k in range(5):
        pair.step(k)
    assert pair.planned == 4


def test_not_planned_when_steps_need_per_step_work():
    for kw in (dict(percentile_clipping=90), dict(grad_clip_norm=1.0), dict(stochastic_rounding=True, backend="torch")):
        params = _model(torch.bfloat16 if "stochastic_rounding" in kw else torch.float32)
        opt = lionkit.Lion8bit(params, lr=1e-3, min_8bit_size=300, **kw)
        for k in range(2):
            _set_grads(params, k)
            opt.step()
        assert opt._plan is None, kw
    params = _model()
    opt = lionkit.Lion4bit(params, lr=1e-3, min_8bit_size=300, backend="torch")
    _set_grads(params, 0)
    opt.step()
    assert opt._plan is None
    assert not fastpath.eligible(opt, [], [])
    # fp16 parameters rounded stochastically: the kernel leaves them to the eager backend
    params = _model(torch.float16)
    opt = lionkit.Lion8bit(params, lr=1e-3, min_8bit_size=300, stochastic_rounding=True)
    for k in range(2):
        _set_grads(params, k)
        opt.step()
    assert opt._plan is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_plan_keeps_no_gradient_alive(backend):
    import gc
    import weakref

    params = _model()
    opt = lionkit.Lion8bit(params, lr=1e-3, min_8bit_size=300, backend=backend)
    for k in range(3):
        _set_grads(params, k)
        opt.step()
    assert opt._plan is not None
    refs = [weakref.ref(p.grad) for p in params]
    opt.zero_grad(set_to_none=True)
    gc.collect()
    assert all(r() is None for r in refs)


def test_changed_backend_setting_is_followed(monkeypatch):
    pair = Pair(monkeypatch, "lion8-block", "auto")
    pair.step(0)
    pair.step(1)
    pair.both(lambda o, ps: setattr(o, "backend", "torch"))
    pair.step(2)
    assert pair.a.backends_used["cpu"] == "torch"
    pair.step(3)
    assert pair.planned == 2


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copied_and_unpickled_optimizers_step_like_the_original(how):
    """A copy keeps lionkit's settings (torch.optim keeps only groups and state) and builds its
    own plan: the original's points at the original's tensors."""
    import copy
    import io

    params = _model()
    opt = lionkit.Lion8bit(_groups(params, schedule=False), lr=1e-2, min_8bit_size=300, nonfinite="skip")
    for k in range(3):
        _set_grads(params, k)
        opt.step()
    assert opt._plan is not None
    if how == "deepcopy":
        twin = copy.deepcopy(opt)
    else:
        buf = io.BytesIO()
        torch.save(opt, buf)
        buf.seek(0)
        twin = torch.load(buf, weights_only=False)
    assert twin._plan is None and twin.nonfinite == "skip" and twin.backend == opt.backend
    tparams = [p for g in twin.param_groups for p in g["params"]]
    for k in range(3, 6):
        _set_grads(params, k)
        _set_grads(tparams, k)
        opt.step()
        twin.step()
    assert twin._plan is not None
    for p, q in zip(params, tparams):
        assert torch.equal(p, q)
        assert torch.equal(opt.state[p]["state1"], twin.state[q]["state1"])
    twin.state_dict()


def test_group_keys_added_by_other_code_are_compared_safely(monkeypatch):
    pair = Pair(monkeypatch, "lion32", "auto")
    pair.step(0)
    pair.both(lambda o, ps: o.param_groups[0].update(name="decoder", scale=torch.ones(3)))
    pair.step(1)  # new keys: full step, then a plan again
    pair.step(2)
    pair.both(lambda o, ps: o.param_groups[0].update(scale=torch.ones(3)))  # a new tensor object
    pair.step(3)
    pair.step(4)
    assert pair.planned == 2  # steps 2 and 4


@NEEDS_GRAD_DTYPE
def test_parameter_reinterpreted_in_place_takes_the_full_path(monkeypatch):
    """Same memory, same shape, another dtype (bf16 bits read as fp16) while the gradients keep
    their dtype (``grad_dtype``): not the planned step, which would read the bits as bf16."""
    pair = Pair(monkeypatch, "lion8-block", "auto", torch.bfloat16)
    pair.step(0)
    pair.step(1)

    def grads(params, k):
        for i, p in enumerate(params):
            gen = torch.Generator().manual_seed(1000 * k + i)
            p.grad = (torch.randn(p.shape, generator=gen) * 1e-2).to(torch.bfloat16)

    for params in (pair.pa, pair.pb):
        params[1].data = params[1].data.view(torch.float16)
        params[1].grad_dtype = torch.bfloat16
    for k in (2, 3):
        grads(pair.pa, k)
        grads(pair.pb, k)
        pair.a.step()
        pair.b.step()
        pair.check()
    assert pair.planned == 2  # steps 1 and 3


@pytest.mark.filterwarnings("error")  # e.g. the scheduler's "lr_scheduler.step() before optimizer.step()"
@pytest.mark.parametrize("backend", BACKENDS)
def test_step_hooks_and_profiler_range_as_torch_optimizers_have_them(backend):
    """lionkit's step wrapper skips torch's profiler range when no profiler runs (its cost, with
    cold caches, is a visible part of a planned step); hooks, their order and their contract,
    the profiler range under a profiler, and LR schedulers work as for any torch optimizer."""
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

    params = _model()
    ref_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt = lionkit.Lion8bit(_groups(params), lr=1e-3, min_8bit_size=300, backend=backend)
    ref = lionkit.Lion8bit(_groups(ref_params), lr=1e-3, min_8bit_size=300, backend=backend)
    scheds = [torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5) for o in (opt, ref)]
    calls = []
    handles = []
    mine = lambda o, label: calls.append(label) if o is opt else None  # global hooks see ref too
    for step in range(1, 7):
        _set_grads(params, step)
        _set_grads(ref_params, step)
        if step == 3:  # hooks of every kind, in torch's order: global pre, pre, post, global post
            handles = [
                register_optimizer_step_pre_hook(lambda o, a, k: mine(o, "global pre")),
                opt.register_step_pre_hook(lambda o, a, k: mine(o, ("pre", len(a), dict(k)))),
                opt.register_step_post_hook(lambda o, a, k: mine(o, "post")),
                register_optimizer_step_post_hook(lambda o, a, k: mine(o, "global post")),
            ]
        if step == 4:
            for h in handles:
                h.remove()
            # a pre-hook may replace the arguments
            h = opt.register_step_pre_hook(lambda o, a, k: (a, {"closure": lambda: 7.0}))
            assert opt.step() == 7.0
            h.remove()
        elif step == 5:
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                opt.step()
            assert "Optimizer.step#Lion8bit.step" in {e.name for e in prof.events()}
        else:
            opt.step()
        ref.step()
        for s in scheds:
            s.step()
    assert calls == ["global pre", ("pre", 1, {}), "post", "global post"]
    assert opt._plan is not None  # steps went through the plan
    for p, q in zip(params, ref_params):
        assert torch.equal(p, q)

