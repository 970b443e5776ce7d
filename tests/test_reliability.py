"""Reliability of a step (issue 7): the non-finite gradient policy, GradScaler, bad input refused
with the parameter named and nothing half-updated, non-contiguous / complex / empty parameters,
and what happens when a step fails part-way."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from conftest import NEEDS_GRAD_DTYPE

import lionkit
from lionkit import guards, kernels, paging
from lionkit.guards import NonFiniteGradientError
from lionkit.kernels.torch_eager import TorchBackend

# name -> constructor; every variant keeps percentile clipping and the global norm on, so their
# state (gnorm_vec) and scales are part of what must stay untouched.
VARIANTS = {
    "lion32": lambda ps, **kw: lionkit.Lion(ps, lr=1e-2, weight_decay=0.1, **kw),
    "lion8-block": lambda ps, **kw: lionkit.Lion8bit(ps, lr=1e-2, min_8bit_size=0, **kw),
    "lion8-tensor": lambda ps, **kw: lionkit.Lion8bit(ps, lr=1e-2, min_8bit_size=0, block_wise=False, **kw),
    "lion4": lambda ps, **kw: lionkit.Lion4bit(ps, lr=1e-2, min_8bit_size=0, **kw),
    "lion32-clip": lambda ps, **kw: lionkit.Lion32bit(
        ps, lr=1e-2, percentile_clipping=90, grad_clip_norm=0.5, grad_clip_value=0.1, **kw
    ),
}


# ---------------------------------------------------------------------- helpers
def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes of a tensor: compares NaNs, -0.0 and dtypes exactly."""
    t = t.detach()
    if t.is_complex():
        t = torch.view_as_real(t)
    return t.contiguous().reshape(-1).view(torch.uint8).clone()


def snapshot(opt: torch.optim.Optimizer) -> dict:
    """Everything a step may change: parameters (and their identity), per-parameter state,
    group settings, counters."""
    params = [p for g in opt.param_groups for p in g["params"]]
    state = {}
    for i, p in enumerate(params):
        if p in opt.state:
            state[i] = {
                k: (v.dtype, tuple(v.shape), bits(v)) if isinstance(v, torch.Tensor) else copy.deepcopy(v)
                for k, v in opt.state[p].items()
            }
    groups = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    return {
        "params": [(id(p), p.data_ptr(), p.dtype, tuple(p.shape), bits(p)) for p in params],
        "state": state,
        "groups": copy.deepcopy(groups),
    }


def assert_same(a: dict, b: dict, same_objects: bool = True) -> None:
    """Bit-identical snapshots; ``same_objects``: of one optimizer (identities and addresses
    of the parameters must match too), else of two twins."""
    assert len(a["params"]) == len(b["params"])
    for (ia, pa, da, sa, ba), (ib, pb, db, sb, bb) in zip(a["params"], b["params"]):
        if same_objects:
            assert (ia, pa) == (ib, pb)
        assert (da, sa) == (db, sb)
        assert torch.equal(ba, bb)
    assert a["state"].keys() == b["state"].keys()
    for i in a["state"]:
        sa, sb = a["state"][i], b["state"][i]
        assert sa.keys() == sb.keys(), i
        for k in sa:
            if isinstance(sa[k], tuple) and len(sa[k]) == 3 and isinstance(sa[k][2], torch.Tensor):
                assert sa[k][:2] == sb[k][:2], (i, k)
                assert torch.equal(sa[k][2], sb[k][2]), (i, k)
            else:
                assert sa[k] == sb[k], (i, k)
    assert a["groups"] == b["groups"]


def make_params(seed: int = 0) -> list[torch.nn.Parameter]:
    """Two groups' worth of parameters: sizes above and below one 8-bit block, an odd size."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [(40, 30), (7,), (300,), (3, 5)]
    return [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]


def groups_of(params):
    return [{"params": params[:2]}, {"params": params[2:], "weight_decay": 0.05}]


def set_grads(params, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)


def trained(variant: str, steps: int = 3, **kw):
    """An optimizer of ``variant`` after a few finite steps (so every state tensor exists)."""
    params = make_params()
    opt = VARIANTS[variant](groups_of(params), **kw)
    for k in range(steps):
        set_grads(params, 100 + k)
        opt.step()
    return opt, params


# ---------------------------------------------------------------------- non-finite policy
def test_nonfinite_default_is_raise_and_value_checked():
    p = torch.nn.Parameter(torch.zeros(3))
    assert lionkit.Lion([p]).nonfinite == "raise"
    for cls in (lionkit.Lion8bit, lionkit.Lion32bit, lionkit.PagedLion8bit):
        with pytest.warns(UserWarning) if cls is lionkit.PagedLion8bit else contextlib.nullcontext():
            assert cls([p], nonfinite="skip").nonfinite == "skip"
    with pytest.raises(ValueError, match=r"Invalid nonfinite: 'ignore' \(must be one of 'propagate', 'skip', 'raise'\)"):
        lionkit.Lion([p], nonfinite="ignore")


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("which", [0, 3])
def test_skip_leaves_everything_bit_identical(variant, bad, which):
    opt, params = trained(variant, nonfinite="skip")
    twin, twin_params = trained(variant, nonfinite="skip")
    before = snapshot(opt)
    set_grads(params, 7)
    params[which].grad.view(-1)[-1] = bad
    opt.step()
    assert_same(before, snapshot(opt))
    assert opt.skipped_steps == 1
    # the next finite step is the one a run that never saw the bad step takes
    set_grads(params, 8)
    opt.step()
    set_grads(twin_params, 8)
    twin.step()
    assert_same(snapshot(twin), snapshot(opt), same_objects=False)
    assert twin.skipped_steps == 0


@pytest.mark.parametrize("variant", VARIANTS)
def test_skip_on_the_first_step_creates_no_state(variant):
    params = make_params()
    opt = VARIANTS[variant](groups_of(params), nonfinite="skip")
    set_grads(params, 1)
    params[2].grad[5] = float("nan")
    before = snapshot(opt)
    opt.step()
    assert len(opt.state) == 0
    assert_same(before, snapshot(opt))


@pytest.mark.parametrize("variant", VARIANTS)
def test_raise_names_the_parameter_before_any_write(variant):
    opt, params = trained(variant)
    before = snapshot(opt)
    set_grads(params, 7)
    params[3].grad[1, 2] = float("inf")
    params[2].grad[0] = float("nan")
    params[2].grad[1] = float("-inf")
    with pytest.raises(NonFiniteGradientError) as info:
        opt.step()
    msg = str(info.value)
    assert "parameter 0 of param group 1 (shape (300,), dtype torch.float32)" in msg
    assert "1 NaN, 1 -inf of 300 elements" in msg
    assert "and 1 more parameters" in msg
    assert isinstance(info.value, ValueError)
    assert_same(before, snapshot(opt))


def test_propagate_lets_nan_through_like_torch_optim():
    p = torch.nn.Parameter(torch.zeros(4))
    opt = lionkit.Lion([p], lr=0.1, nonfinite="propagate")
    p.grad = torch.tensor([1.0, float("nan"), -1.0, 0.0])
    opt.step()
    # the NaN stays in the momentum for good (that element's direction is lost from now on)
    assert torch.isnan(opt.state[p]["state1"][1])
    assert torch.equal(p.detach()[[0, 2, 3]], torch.tensor([-0.1, 0.1, 0.0]))
    assert opt.skipped_steps == 0


@pytest.mark.parametrize("backend", ["torch", "auto"])
@pytest.mark.parametrize("block_wise", [True, False])
@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_propagate_8bit_poisons_exactly_the_block(backend, block_wise, bad):
    # 8 bits cannot store NaN or inf: the block holding one (per-tensor: the tensor) decodes to
    # NaN, never to a finite value or an infinity of the other sign; other blocks are untouched
    p = torch.nn.Parameter(torch.zeros(600))
    opt = lionkit.Lion8bit([p], lr=0.1, min_8bit_size=0, block_wise=block_wise, nonfinite="propagate",
                           backend=backend)
    p.grad = torch.ones(600)
    p.grad[300] = bad
    opt.step()
    m = lionkit.Lion8bit.momentum(opt.state[p], p).dequantize()
    if block_wise:
        assert torch.isnan(m[256:512]).all()
        assert torch.isfinite(m[:256]).all() and torch.isfinite(m[512:]).all()
    else:
        assert torch.isnan(m).all()


def test_nonfinite_check_ignores_params_without_grad_and_empty_ones():
    a, b, e = (torch.nn.Parameter(torch.zeros(s)) for s in (3, 4, 0))
    opt = lionkit.Lion([a, b, e], lr=0.1)
    a.grad = torch.ones(3)
    e.grad = torch.zeros(0)
    opt.step()  # b has no gradient, e no elements: nothing to complain about
    assert torch.equal(a.detach(), torch.full((3,), -0.1))


# ---------------------------------------------------------------------- GradScaler
def _regression(seed=0):
    gen = torch.Generator().manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    x = torch.randn(64, 8, generator=gen)
    y = (x[:, :1] * 2 - x[:, 1:2]).tanh()
    return model, x, y


@pytest.mark.parametrize("variant", ["lion32", "lion8-block"])
def test_gradscaler_skips_inf_steps_with_state_untouched(variant):
    model, x, y = _regression()
    opt = VARIANTS[variant](list(model.parameters()))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    for k in range(2):
        opt.zero_grad()
        scaler.scale(torch.nn.functional.mse_loss(model(x), y)).backward()
        scaler.step(opt)
        scaler.update()
    before = snapshot(opt)
    scale = scaler.get_scale()
    opt.zero_grad()
    scaler.scale(torch.nn.functional.mse_loss(model(x), y)).backward()
    next(model.parameters()).grad[0, 0] = float("inf")  # an fp16-style overflow
    scaler.step(opt)  # under the default nonfinite="raise": GradScaler never calls step here
    scaler.update()
    assert_same(before, snapshot(opt))
    assert scaler.get_scale() == scale / 2
    assert opt.skipped_steps == 0


@pytest.mark.parametrize("variant", ["lion32", "lion8-block"])
def test_gradscaler_trains_like_no_scaler(variant):
    # A power-of-two loss scale is exact, so scaled-then-unscaled training equals plain training
    # bit for bit, and it learns.
    runs = []
    for use_scaler in (False, True):
        model, x, y = _regression()
        opt = VARIANTS[variant](list(model.parameters()))
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=5)
        losses = []
        for _ in range(60):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            losses.append(loss.item())
            if use_scaler:
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
            else:
                loss.backward()
                opt.step()
        runs.append((losses, [p.detach().clone() for p in model.parameters()]))
    (l0, p0), (l1, p1) = runs
    assert l1 == l0
    assert all(torch.equal(a, b) for a, b in zip(p0, p1))
    assert l1[-1] < 0.25 * l1[0]


# ---------------------------------------------------------------------- bad input
def test_empty_parameter_list():
    with pytest.raises(ValueError, match="empty parameter list"):
        lionkit.Lion([])


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool])
def test_integer_and_bool_params_refused_at_construction(dtype):
    good = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(TypeError, match=rf"parameter 1 of param group 0 \(shape \(2, 2\), dtype {dtype}\) has dtype"):
        lionkit.Lion8bit([good, torch.zeros(2, 2, dtype=dtype)])
    opt = lionkit.Lion([good])
    with pytest.raises(TypeError, match=r"parameter 0 of param group 1 .* has dtype"):
        opt.add_param_group({"params": [torch.zeros(2, dtype=dtype)]})
    assert len(opt.param_groups) == 1


def test_meta_params_refused_at_construction():
    with pytest.raises(ValueError, match=r"parameter 0 of param group 0 \(shape \(3,\).*meta device"):
        lionkit.Lion([torch.nn.Parameter(torch.zeros(3, device="meta"))])


def test_same_tensor_twice_is_named():
    a, b = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(4))
    with pytest.raises(ValueError, match=r"parameter 1 of param group 1 .* is the same tensor as parameter 1 of param group 0"):
        lionkit.Lion([{"params": [a, b]}, {"params": [torch.nn.Parameter(torch.zeros(2)), b]}])
    with pytest.raises(ValueError, match=r"parameter 2 of param group 0 .* is the same tensor as parameter 0 of"):
        lionkit.Lion([a, b, a])
    # two Parameter objects over one tensor are the same data
    t = torch.zeros(5)
    with pytest.raises(ValueError, match="shares its memory with parameter 0 of param group 0"):
        lionkit.Lion([torch.nn.Parameter(t), torch.nn.Parameter(t)])
    # so are a reshaped, a transposed and a reinterpreted view of one parameter's memory
    w = torch.zeros(10, 6)
    for alias in (w.view(60), w.t(), w.view(torch.int32).view(torch.float32).t()):
        with pytest.raises(ValueError, match="shares its memory with parameter 0 of param group 0"):
            lionkit.Lion([torch.nn.Parameter(w), torch.nn.Parameter(alias)])
    # disjoint views of one buffer are fine, interleaved ones too
    buf = torch.zeros(10)
    lionkit.Lion([buf[:5], buf[5:]])
    lionkit.Lion([buf[::2], buf[1::2]])


def _step_fails_cleanly(opt, params, exc, match):
    before = snapshot(opt)
    with pytest.raises(exc, match=match):
        opt.step()
    assert_same(before, snapshot(opt))
    assert opt.torn is None


@pytest.mark.parametrize("variant", VARIANTS)
def test_sparse_grad_refused_before_any_write(variant):
    opt, params = trained(variant)
    set_grads(params, 5)
    params[3].grad = torch.randn(3, 5).to_sparse()
    _step_fails_cleanly(opt, params, TypeError, r"parameter 1 of param group 1 \(shape \(3, 5\).*sparse gradient")


def test_sparse_embedding_grad_refused():
    emb = torch.nn.Embedding(10, 4, sparse=True)
    opt = lionkit.Lion(emb.parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(TypeError, match="sparse gradient"):
        opt.step()
    assert len(opt.state) == 0


@pytest.mark.parametrize("variant", VARIANTS)
def test_grad_shape_dtype_device_mismatch_refused(variant):
    opt, params = trained(variant)
    set_grads(params, 5)
    params[3].grad.data = torch.zeros(15)  # torch refuses `p.grad = ...` with another shape, not this
    _step_fails_cleanly(opt, params, ValueError, r"parameter 1 of param group 1 .*gradient shape \(15,\) does not match")
    set_grads(params, 5)
    params[1].grad.data = torch.zeros(7, dtype=torch.float64)
    _step_fails_cleanly(opt, params, TypeError, r"parameter 1 of param group 0 .*gradient dtype torch.float64 differs")
    # torch itself refuses gradients on another device; the check is there for what slips through
    with pytest.raises(ValueError, match=r"parameter 0 of param group 1 .*: gradient is on meta, the parameter on cpu"):
        guards.check_grad(params[2], torch.zeros(300, device="meta"), 1, 0)
    # a complex parameter whose grad_dtype was set to a real dtype: refused, not half-updated
    z = torch.nn.Parameter(torch.zeros(4, dtype=torch.complex64))
    with pytest.raises(TypeError, match="gradient dtype torch.float32 cannot update a parameter of dtype torch.complex64"):
        guards.check_grad(z, torch.zeros(4), 0, 0)


@NEEDS_GRAD_DTYPE
def test_grad_dtype_contract_follows_torch():
    # p.grad_dtype = None is torch's way to allow another gradient dtype (fp32 grads, bf16 weights)
    p = torch.nn.Parameter(torch.zeros(6, dtype=torch.bfloat16))
    opt = lionkit.Lion([p], lr=0.5)
    p.grad_dtype = None
    p.grad = torch.tensor([1.0, -1.0, 1e-30, -1e-30, 0.0, 3.0])
    opt.step()
    assert p.dtype == torch.bfloat16
    assert p.tolist() == [-0.5, 0.5, -0.5, 0.5, 0.0, -0.5]


def test_resized_parameter_refused():
    opt, params = trained("lion8-block")
    params[0].data = torch.zeros(10, 10)  # e.g. an embedding resized in place of the old one
    set_grads(params, 5)
    _step_fails_cleanly(opt, params, ValueError, r"parameter 0 of param group 0 .*state has shape \(40, 30\)")


def test_bad_group_setting_refused_before_any_write():
    opt, params = trained("lion32")
    set_grads(params, 5)
    opt.param_groups[1]["lr"] = float("nan")
    _step_fails_cleanly(opt, params, ValueError, r"param group 1: Invalid learning rate: nan")
    opt.param_groups[1]["lr"] = 1e-3
    opt.param_groups[0]["betas"] = (0.9, 1.5)
    _step_fails_cleanly(opt, params, ValueError, r"param group 0: Invalid beta at index 1")


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("optim_bits", 7, "Invalid optim_bits: 7"),
        ("percentile_clipping", 150, "Invalid percentile_clipping: 150"),
        ("percentile_clipping", 50.5, "Invalid percentile_clipping: 50.5"),
        ("min_8bit_size", "a", "Invalid min_8bit_size: 'a'"),
        ("block_wise", "no", "Invalid block_wise: 'no'"),
        ("skip_zeros", "no", "Invalid skip_zeros: 'no'"),
        ("max_unorm", 1.0, "Invalid max_unorm: 1.0"),
    ],
)
def test_storage_setting_changed_in_a_group_refused_before_any_write(key, value, message):
    opt, params = trained("lion8-block")
    set_grads(params, 5)
    opt.param_groups[1][key] = value
    _step_fails_cleanly(opt, params, ValueError, "param group 1: " + message)


@pytest.mark.parametrize(
    "attr, value, message",
    [
        ("grad_clip_norm", -1.0, "Invalid grad_clip_norm: -1.0"),  # would step uphill
        ("grad_clip_norm", 0.0, "Invalid grad_clip_norm: 0.0"),
        ("nonfinite", "bogus", "Invalid nonfinite: 'bogus'"),
        ("stochastic_rounding", "yes", "Invalid stochastic_rounding: 'yes'"),
        ("is_paged", "x", "Invalid is_paged: 'x'"),
        ("sr_seed", -5, "Invalid sr_seed: -5"),
    ],
)
def test_optimizer_setting_changed_by_hand_refused_before_any_write(attr, value, message):
    opt, params = trained("lion32")  # planned steps by now: the plan must hand over to the checks
    set_grads(params, 5)
    setattr(opt, attr, value)
    _step_fails_cleanly(opt, params, ValueError, "optimizer setting: " + message)


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_global_clipping_of_a_huge_finite_gradient(backend):
    # norm 1e20: its square overflows fp32; the scale must still be 1 / norm, not 0
    p = torch.nn.Parameter(torch.zeros(1000))
    opt = lionkit.Lion([p], lr=0.1, grad_clip_norm=1.0, backend=backend)
    g = torch.ones(1000)
    g[0] = 1e20
    p.grad = g
    opt.step()
    assert torch.equal(p.detach(), torch.full((1000,), -0.1))
    torch.testing.assert_close(opt.state[p]["state1"], 0.01 * g / 1e20)


def test_load_failing_in_conversion_changes_nothing():
    # the checkpoint is valid, converting it to what the optimizer wants is not (an override
    # asking 4 bits of a per-tensor optimizer): everything as before, the parameter named
    opt, params = trained("lion8-tensor")
    good = opt.state_dict()
    set_grads(params, 5)
    opt.step()
    before = snapshot(opt)
    lionkit.GlobalOptimManager.get_instance().override_config(params[2], "optim_bits", 4)
    with pytest.raises(ValueError, match=r"parameter 0 of param group 1 .*Invalid block_wise: False with optim_bits=4"):
        opt.load_state_dict(good)
    assert_same(before, snapshot(opt))


@pytest.mark.parametrize("backend", ["torch", "auto"])
@pytest.mark.parametrize("damage", ["qmap-short", "qmap-float64", "qmap-missing", "absmax-int", "state1-strided"])
def test_state_replaced_by_hand_refused_before_any_write(backend, damage):
    # opt.state edited directly (load_state_dict validates its input itself): checked before
    # the kernels would fail on it half-way (or, planned, ignore it)
    opt, params = trained("lion8-block", backend=backend)
    st = opt.state[params[2]]  # the third tensor: two are before it in the step
    if damage == "qmap-short":
        st["qmap1"] = st["qmap1"][:100].clone()
    elif damage == "qmap-float64":
        st["qmap1"] = st["qmap1"].double()
    elif damage == "qmap-missing":
        del st["qmap1"]
    elif damage == "absmax-int":
        st["absmax1"] = st["absmax1"].int()
    else:
        spread = torch.empty(600, dtype=torch.uint8)
        spread[::2] = st["state1"]
        st["state1"] = spread[::2]  # same values, every other byte
    set_grads(params, 5)
    _step_fails_cleanly(opt, params, ValueError, r"parameter 0 of param group 1 \(shape \(300,\)")


def test_failing_schedule_changes_nothing():
    params = make_params()

    def schedule(step):
        if step >= 2:
            raise ValueError("schedule exhausted")
        return 1e-2

    opt = lionkit.Lion8bit([{"params": params[:2]}, {"params": params[2:], "lr": schedule}], min_8bit_size=0)
    for k in range(2):
        set_grads(params, k)
        opt.step()
    set_grads(params, 9)
    _step_fails_cleanly(opt, params, ValueError, "schedule exhausted")


# ---------------------------------------------------------------------- unusual parameters
@pytest.mark.parametrize("variant", VARIANTS)
def test_non_contiguous_params_update_in_place_like_contiguous(variant):
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(20, 30, generator=gen)
    conv = torch.randn(4, 3, 5, 5, generator=gen).to(memory_format=torch.channels_last)
    strided_base = torch.randn(12, 40, generator=gen)
    odd = [
        torch.nn.Parameter(base.t()),  # transposed
        torch.nn.Parameter(conv),  # channels_last
        strided_base[:, ::3].requires_grad_(),  # a strided view into a larger tensor
    ]
    assert not any(p.is_contiguous() for p in odd)
    plain = [torch.nn.Parameter(p.detach().contiguous()) for p in odd]
    opts = [VARIANTS[variant](ps) for ps in (odd, plain)]
    ids = [(id(p), p.data_ptr(), p.stride()) for p in odd]
    untouched = strided_base.clone()
    for k in range(3):
        for ps in (odd, plain):
            gen = torch.Generator().manual_seed(50 + k)
            for p in ps:
                p.grad = torch.randn(p.shape, generator=gen)
        odd[0].grad = odd[0].grad.t().contiguous().t()  # a non-contiguous gradient too
        for opt in opts:
            opt.step()
    for p, q in zip(odd, plain):
        assert torch.equal(p.detach(), q.detach())
    assert [(id(p), p.data_ptr(), p.stride()) for p in odd] == ids
    # the view wrote through into its base, and only into its own elements
    assert torch.equal(strided_base[:, ::3], odd[2].detach())
    mask = torch.ones_like(strided_base, dtype=torch.bool)
    mask[:, ::3] = False
    assert torch.equal(strided_base[mask], untouched[mask])
    assert torch.equal(strided_base[:, ::3], plain[2].detach())


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_a_parameter_re_pointed_to_its_transpose_between_steps(backend):
    # same storage, pointer, shape and dtype, now non-contiguous: a planned step must notice
    runs = []
    for no_plan in (False, True):
        w = torch.nn.Parameter(torch.randn(64, 64, generator=torch.Generator().manual_seed(0)))
        opt = lionkit.Lion8bit([w], lr=0.1, min_8bit_size=100, backend=backend)
        if no_plan:
            opt._planned_step = lambda plan: False
        for k in range(4):
            if k == 2:
                w.data = w.data.t()
            w.grad = torch.randn(64, 64, generator=torch.Generator().manual_seed(k))
            opt.step()
        runs.append(w.detach().clone())
    assert torch.equal(runs[0], runs[1])


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_steps_bump_the_autograd_version_of_parameters(backend):
    # a graph that saved a parameter for backward fails after a step (as with torch.optim),
    # whichever kernel wrote it: the compiled one writes through pointers (full and planned steps)
    torch.manual_seed(0)
    gen, disc = torch.nn.Linear(4, 4), torch.nn.Linear(4, 1)
    opt = lionkit.Lion(disc.parameters(), lr=1e-2, backend=backend)
    for k in range(3):
        out = disc(gen(torch.randn(8, 4)))
        out.mean().backward(retain_graph=True)
        before = disc.weight._version
        opt.step()
        assert disc.weight._version > before
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            (-out.mean()).backward()
        opt.zero_grad()


def test_version_bump_one_tensor_at_a_time(monkeypatch):
    # torch 2.4's increment_version takes one tensor (a list raises RuntimeError there)
    seen = []
    monkeypatch.setattr(guards, "_increment_takes_lists", lambda: False)
    monkeypatch.setattr(torch.autograd.graph, "increment_version", lambda t: seen.append(t))
    params = [torch.zeros(3), torch.zeros(2)]
    guards.mark_modified(params)
    assert len(seen) == 2 and all(a is b for a, b in zip(seen, params))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128])
def test_complex_params_are_pairs_of_reals(variant, dtype):
    gen = torch.Generator().manual_seed(4)
    z = torch.nn.Parameter(torch.randn(300, 2, dtype=torch.float64 if dtype == torch.complex128 else torch.float32,
                                       generator=gen).contiguous())
    cz = torch.nn.Parameter(torch.view_as_complex(z.detach().clone()))
    assert cz.dtype == dtype
    real = torch.nn.Parameter(z.detach().clone())
    opt_c, opt_r = VARIANTS[variant]([cz]), VARIANTS[variant]([real])
    for k in range(4):
        g = torch.randn(300, 2, dtype=real.dtype, generator=gen)
        cz.grad = torch.view_as_complex(g.clone())
        real.grad = g
        opt_c.step()
        opt_r.step()
    assert torch.equal(torch.view_as_real(cz.detach()), real.detach())
    # its state is that of the real view, and it survives a checkpoint
    sd = opt_c.state_dict()
    # (4-bit codes are packed two per byte: 600 real elements in 300 bytes)
    assert sd["state"][0]["state1"].shape == ((300,) if variant == "lion4" else (300, 2))
    opt_c2 = VARIANTS[variant]([torch.nn.Parameter(cz.detach().clone())])
    opt_c2.load_state_dict(sd)
    assert torch.equal(opt_c2.state_dict()["state"][0]["state1"], sd["state"][0]["state1"])


@pytest.mark.parametrize("variant", VARIANTS)
def test_zero_element_params(variant):
    params = [torch.nn.Parameter(torch.zeros(0)), torch.nn.Parameter(torch.randn(300)),
              torch.nn.Parameter(torch.zeros(0, 4))]
    opt = VARIANTS[variant](params)
    for k in range(3):
        set_grads(params, k)
        opt.step()
    assert all(opt.state[p]["step"] == 3 for p in params)
    assert opt.state[params[0]]["state1"].numel() == 0
    sd = opt.state_dict()
    fresh = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt2 = VARIANTS[variant](fresh)
    opt2.load_state_dict(sd)
    set_grads(params, 9)
    set_grads(fresh, 9)
    opt.step()
    opt2.step()
    assert torch.equal(params[1].detach(), fresh[1].detach())


# ---------------------------------------------------------------------- failure part-way
class _FailingBackend(TorchBackend):
    """Updates the first tensor it is given, then fails as an out-of-memory would."""

    name = "failing"

    def __init__(self, exc):
        self.exc = exc

    def step_many(self, params, grads, moms, hypers):
        super().step_many(params[:1], grads[:1], moms[:1], hypers[:1])
        raise self.exc


@pytest.mark.parametrize("exc", [RuntimeError("CUDA out of memory (simulated)"), KeyboardInterrupt()])
def test_failure_inside_kernels_marks_the_step_torn(monkeypatch, exc, tmp_path):
    opt, params = trained("lion8-block")
    good = opt.state_dict()
    before = snapshot(opt)
    monkeypatch.setattr(kernels, "resolve", lambda name, device: _FailingBackend(exc))
    set_grads(params, 5)
    with pytest.raises(type(exc)) as info:
        opt.step()
    if hasattr(info.value, "__notes__"):
        assert "stopped part-way" in info.value.__notes__[-1]
    assert opt.torn is not None and type(exc).__name__ in opt.torn
    # the first parameter moved, the others did not, no step counter advanced
    after = snapshot(opt)
    assert not torch.equal(after["params"][0][4], before["params"][0][4])
    assert all(torch.equal(a[4], b[4]) for a, b in zip(after["params"][1:], before["params"][1:]))
    assert all(s["step"] == 3 for s in after["state"].values())
    monkeypatch.undo()
    # it refuses to go on or to be saved silently...
    with pytest.raises(RuntimeError, match="stopped part-way"):
        opt.step()
    with pytest.raises(RuntimeError, match="stopped part-way"):
        opt.state_dict()
    # ...until a checkpoint is loaded (or the user accepts the state)
    opt.load_state_dict(good)
    assert opt.torn is None
    opt.step()
    opt.torn = "simulated"
    opt.clear_torn()
    opt.state_dict()


def test_failure_before_kernels_restores_state(monkeypatch):
    # a failure while state is being created (e.g. out of memory) leaves no trace at all
    params = make_params()
    opt = lionkit.Lion8bit(groups_of(params), min_8bit_size=0, percentile_clipping=50)
    set_grads(params, 0)
    opt.step()
    extra = torch.nn.Parameter(torch.randn(500))
    opt.add_param_group({"params": [extra]})
    lionkit.GlobalOptimManager.get_instance().override_config(params[0], "optim_bits", 32)  # a conversion
    before = snapshot(opt)
    real = paging.state_zeros
    calls = []

    def failing(like, dtype, paged):
        calls.append(like.shape)
        if len(calls) == 2:
            raise RuntimeError("out of memory (simulated)")
        return real(like, dtype, paged)

    monkeypatch.setattr(paging, "state_zeros", failing)
    set_grads(params + [extra], 1)
    with pytest.raises(RuntimeError, match="simulated"):
        opt.step()
    assert opt.torn is None
    assert extra not in opt.state
    assert_same(before, snapshot(opt))
    monkeypatch.undo()
    opt.step()
    assert opt.state[extra]["step"] == 1 and opt.state[params[0]]["state1"].dtype == torch.float32
