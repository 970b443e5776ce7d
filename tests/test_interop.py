"""One 8-bit format across frameworks: the numpy map/quantizer against PyTorch's, round trips
torch -> jax -> torch and torch -> mlx -> torch (bit-exact), identical trajectories on a shared
problem, and 8-bit against 32-bit error statistics per framework."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from lionkit import interop

B1, B2, LR = 0.9, 0.99, 1e-2
SHAPES = {"0_w": (40, 130), "1_b": (130,)}  # 5200 elements (8-bit) and 130 (fp32 below min_8bit_size)


def _torch():
    return pytest.importorskip("torch", reason="PyTorch not installed (lionkit's PyTorch side)")


def _jax():
    pytest.importorskip("jax", reason="jax not installed (pip install 'lionkit[jax]')")
    pytest.importorskip("optax", reason="optax not installed (pip install 'lionkit[jax]')")
    import jax
    import jax.numpy as jnp
    import optax

    import lionkit.jax as ljax

    return jax, jnp, optax, ljax


def _mlx():
    mx = pytest.importorskip("mlx.core", reason="MLX not installed (pip install 'lionkit[mlx]')")
    import lionkit.mlx as lmlx

    return mx, lmlx


# --------------------------------------------------------------------------- the shared problem
class Problem:
    """Least squares whose gradients are computed in numpy fp32 from each framework's current
    weights, so all frameworks see the same gradient function."""

    def __init__(self, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.x = rng.standard_normal((96, 40)).astype(np.float32)
        w_true = rng.standard_normal((40, 130)).astype(np.float32) * 0.1
        self.y = (self.x @ w_true + 0.01 * rng.standard_normal((96, 130))).astype(np.float32)
        self.init = {k: (rng.standard_normal(s) * 0.05).astype(np.float32) for k, s in SHAPES.items()}

    def grads(self, p: dict) -> dict:
        r = (self.x @ p["0_w"] + p["1_b"] - self.y).astype(np.float32)
        return {"0_w": (self.x.T @ r / np.float32(len(r))).astype(np.float32), "1_b": r.mean(axis=0).astype(np.float32)}

    def loss(self, p: dict) -> float:
        r = self.x.astype(np.float64) @ p["0_w"] + p["1_b"] - self.y
        return float(0.5 * np.mean(r**2))


def run_torch(prob, steps, bits, wd=0.0, block_wise=True, opt=None, params=None):
    torch = _torch()
    import lionkit

    if params is None:
        params = [torch.nn.Parameter(torch.from_numpy(prob.init[k].copy())) for k in SHAPES]
    if opt is None:
        opt = lionkit.Lion(
            params, lr=LR, betas=(B1, B2), weight_decay=wd, optim_bits=bits, block_wise=block_wise, backend="torch"
        )
    for _ in range(steps):
        g = prob.grads({k: p.detach().numpy() for k, p in zip(SHAPES, params)})
        for k, p in zip(SHAPES, params):
            p.grad = torch.from_numpy(g[k])
        opt.step()
    return {k: p.detach().numpy().copy() for k, p in zip(SHAPES, params)}, opt, params


def run_jax(prob, steps, bits, wd=0.0, block_size=256, state=None, params=None):
    jax, jnp, optax, ljax = _jax()
    tx = ljax.lion(LR, b1=B1, b2=B2, weight_decay=wd, state_bits=bits, block_size=block_size)
    p = {k: jnp.asarray(v) for k, v in (params or prob.init).items()}
    s = tx.init(p) if state is None else state
    for _ in range(steps):
        g = prob.grads({k: np.asarray(v) for k, v in p.items()})
        u, s = tx.update({k: jnp.asarray(v) for k, v in g.items()}, s, p)
        p = optax.apply_updates(p, u)
    return {k: np.asarray(v) for k, v in p.items()}, s, tx


def run_mlx(prob, steps, bits, wd=0.0, opt=None, params=None):
    mx, lmlx = _mlx()
    if opt is None:
        opt = lmlx.Lion8bit(LR, betas=(B1, B2), weight_decay=wd) if bits == 8 else lmlx.Lion(LR, (B1, B2), wd)
    p = {k: mx.array(v) for k, v in (params or prob.init).items()}
    for _ in range(steps):
        g = prob.grads({k: np.array(v) for k, v in p.items()})
        p = opt.apply_gradients({k: mx.array(v) for k, v in g.items()}, p)
        mx.eval(p, opt.state)
    return {k: np.array(v) for k, v in p.items()}, opt, p


def _same_params(a: dict, b: dict) -> bool:
    return all(np.array_equal(a[k], b[k]) for k in SHAPES)


def _same_states(a, b) -> bool:
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if x.step != y.step or x.shape != y.shape or x.is_8bit != y.is_8bit or x.block_size != y.block_size:
            return False
        if x.is_8bit:
            if not (np.array_equal(x.codes, y.codes) and np.array_equal(x.absmax, y.absmax) and np.array_equal(x.qmap, y.qmap)):
                return False
        elif not np.array_equal(x.momentum, y.momentum):
            return False
    return True


# --------------------------------------------------------------------------- the format
def test_numpy_map_and_thresholds_equal_torch():
    torch = _torch()
    from lionkit import quant

    assert np.array_equal(interop.dynamic_map(), quant.dynamic_map().numpy())
    t, zero = quant.code_thresholds(quant.dynamic_map())
    tn, zn = interop.code_thresholds()
    assert np.array_equal(tn, t.numpy()) and zn == zero == 127
    assert interop.dynamic_map()[255] == 1.0 and interop.dynamic_map()[127] == 0.0
    assert torch is not None


@pytest.mark.parametrize("block_size", [256, None, 100])
def test_numpy_quantizer_equals_torch(block_size):
    torch = _torch()
    from lionkit import quant

    g = torch.Generator().manual_seed(0)
    x = torch.randn(20011, generator=g) * torch.logspace(-9, 3, 20011)
    x[::7] = 0
    codes, absmax = quant.quantize(x, quant.dynamic_map(), block_size)
    cn, an = interop.quantize(x.numpy(), block_size)
    assert np.array_equal(codes.numpy(), cn) and np.array_equal(absmax.numpy(), an)
    assert np.array_equal(quant.dequantize(codes, absmax, quant.dynamic_map(), block_size).numpy(),
                          interop.dequantize(cn, an, block_size))


@pytest.mark.parametrize("framework", ["jax", "mlx"])
@pytest.mark.parametrize("block_size", [256, None, 100])
def test_framework_quantizers_equal_numpy(framework, block_size):
    rng = np.random.default_rng(3)
    x = (rng.standard_normal(9001) * 10.0 ** rng.uniform(-9, 3, 9001)).astype(np.float32)
    x[::5] = 0
    t, _ = interop.code_thresholds()
    x[: 3 * t.size] = np.concatenate([t, np.nextafter(t, np.float32(-2)), np.nextafter(t, np.float32(2))])
    codes, absmax = interop.quantize(x, block_size)
    if framework == "jax":
        jax, jnp, _, _ = _jax()
        from lionkit.jax import quant as fq

        for fn in (fq.quantize, jax.jit(fq.quantize, static_argnums=1)):
            c, a = fn(jnp.asarray(x), block_size)
            assert np.array_equal(np.asarray(c), codes) and np.array_equal(np.asarray(a), absmax)
        back = np.asarray(fq.dequantize(jnp.asarray(codes), jnp.asarray(absmax), block_size))
    else:
        mx, _ = _mlx()
        from lionkit.mlx import quant as fq

        c, a = fq.quantize(mx.array(x), block_size)
        assert np.array_equal(np.array(c), codes) and np.array_equal(np.array(a), absmax)
        back = np.array(fq.dequantize(mx.array(codes), mx.array(absmax), block_size))
    assert np.array_equal(back, interop.dequantize(codes, absmax, block_size))


# --------------------------------------------------------------------------- same problem, same numbers
@pytest.mark.parametrize("bits", [32, 8])
def test_all_frameworks_follow_the_same_trajectory(bits):
    # Without weight decay every front end computes p - lr*sign(c) and the same momentum in
    # the same fp32 operations, and gradients come from the same numpy code: all three runs
    # must agree bit for bit, 8-bit codes included.
    prob = Problem()
    pt, opt, _ = run_torch(prob, 20, bits)
    pj, sj, _ = run_jax(prob, 20, bits)
    pm, om, mp = run_mlx(prob, 20, bits)
    assert _same_params(pt, pj) and _same_params(pt, pm)
    st = interop.from_torch(opt)
    assert _same_states(st, interop.from_jax(sj))
    assert _same_states(st, interop.from_mlx(om, mp))
    assert st[0].is_8bit == (bits == 8) and not st[1].is_8bit
    assert prob.loss(pt) < 0.5 * prob.loss(prob.init)


# --------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("block_wise", [True, False])
@pytest.mark.parametrize("bits", [8, 32])
def test_torch_jax_torch_round_trip(bits, block_wise):
    torch = _torch()
    import lionkit

    prob = Problem(1)
    p5, opt, params = run_torch(prob, 5, bits, block_wise=block_wise)
    sd = copy.deepcopy(opt.state_dict())  # state_dict() shares the live state
    states = interop.from_torch(opt)
    if bits == 8:
        assert states[0].block_size == (256 if block_wise else None)

    _, _, tx = run_jax(prob, 0, bits, block_size=256 if block_wise else None)
    jstate = interop.to_jax(states, tx.init({k: v for k, v in prob.init.items()}))
    assert _same_states(states, interop.from_jax(jstate))

    # continue 5 steps in both frameworks from the same point: the same result
    p10_jax, jstate10, _ = run_jax(prob, 5, bits, block_size=256 if block_wise else None, state=jstate, params=p5)
    p10_torch, opt, _ = run_torch(prob, 5, bits, opt=opt, params=params)
    assert _same_params(p10_jax, p10_torch)
    assert _same_states(interop.from_jax(jstate10), interop.from_torch(opt))

    # and back into a fresh torch optimizer: the original state dict, bit for bit
    params2 = [torch.nn.Parameter(torch.from_numpy(p5[k].copy())) for k in SHAPES]
    opt2 = lionkit.Lion(params2, lr=LR, optim_bits=bits, block_wise=block_wise, backend="torch")
    interop.to_torch(interop.from_jax(jstate), opt2)
    sd2 = opt2.state_dict()
    for key, st in sd["state"].items():
        st2 = sd2["state"][key]
        assert set(st) == set(st2)
        for name, value in st.items():
            if isinstance(value, torch.Tensor):
                assert value.dtype == st2[name].dtype and torch.equal(value, st2[name]), name
            else:
                assert value == st2[name], name


@pytest.mark.parametrize("bits", [8, 32])
def test_torch_mlx_torch_round_trip(bits):
    torch = _torch()
    mx, lmlx = _mlx()
    import lionkit

    prob = Problem(2)
    p5, opt, params = run_torch(prob, 5, bits)
    sd = copy.deepcopy(opt.state_dict())  # state_dict() shares the live state
    states = interop.from_torch(opt)

    mopt = lmlx.Lion8bit(LR, betas=(B1, B2)) if bits == 8 else lmlx.Lion(LR, (B1, B2))
    mparams = {k: mx.array(v) for k, v in p5.items()}
    interop.to_mlx(states, mopt, mparams)
    assert int(mopt.state["step"]) == 5
    assert _same_states(states, interop.from_mlx(mopt, mparams))

    p10_mlx, mopt, mp = run_mlx(prob, 5, bits, opt=mopt, params=p5)
    p10_torch, opt, _ = run_torch(prob, 5, bits, opt=opt, params=params)
    assert _same_params(p10_mlx, p10_torch)
    assert _same_states(interop.from_mlx(mopt, mp), interop.from_torch(opt))

    # back: a fresh MLX optimizer loaded from the step-5 states, exported to torch
    mopt5 = lmlx.Lion8bit(LR) if bits == 8 else lmlx.Lion(LR)
    interop.to_mlx(states, mopt5, mparams)
    params2 = [torch.nn.Parameter(torch.from_numpy(p5[k].copy())) for k in SHAPES]
    opt2 = lionkit.Lion(params2, lr=LR, optim_bits=bits, backend="torch")
    interop.to_torch(interop.from_mlx(mopt5, mparams), opt2)
    sd2 = opt2.state_dict()
    for key, st in sd["state"].items():
        for name, value in st.items():
            other = sd2["state"][key][name]
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, other), name
            else:
                assert value == other, name


def test_npz_round_trip(tmp_path):
    prob = Problem(3)
    rng = np.random.default_rng(0)
    m = rng.standard_normal((40, 130)).astype(np.float32)
    codes, absmax = interop.quantize(m, None)
    states = [
        interop.MomentumState(7, (40, 130), codes=codes, absmax=absmax, block_size=None),
        interop.MomentumState(7, (130,), momentum=rng.standard_normal(130).astype(np.float32)),
    ]
    interop.save_npz(tmp_path / "s.npz", states)
    assert _same_states(states, interop.load_npz(tmp_path / "s.npz"))
    assert prob is not None


def test_npz_path_without_suffix(tmp_path):
    # numpy's savez adds ".npz"; load_npz finds that file from the same name
    states = [interop.MomentumState(3, (5,), momentum=np.arange(5, dtype=np.float32))]
    interop.save_npz(str(tmp_path / "ckpt"), states)
    assert (tmp_path / "ckpt.npz").exists()
    assert _same_states(states, interop.load_npz(str(tmp_path / "ckpt")))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"step": -3}, "step"),
        ({"step": 1.5}, "step"),
        ({"block_size": 0}, "block_size"),  # was a bare ZeroDivisionError
        ({"block_size": -256}, "block_size"),
    ],
)
def test_momentum_state_checks_its_fields(kwargs, match):
    codes, absmax = interop.quantize(np.ones(300, dtype=np.float32))
    args = {"step": 1, "shape": (300,), "codes": codes, "absmax": absmax, **kwargs}
    with pytest.raises(ValueError, match=match):
        interop.MomentumState(**args)


def test_8bit_state_into_32bit_jax_is_dequantized_exactly():
    _, jnp, _, ljax = _jax()
    rng = np.random.default_rng(1)
    m = rng.standard_normal((40, 130)).astype(np.float32)
    codes, absmax = interop.quantize(m)
    states = [
        interop.MomentumState(3, (40, 130), codes=codes, absmax=absmax),
        interop.MomentumState(3, (130,), momentum=np.zeros(130, np.float32)),
    ]
    params = {k: jnp.zeros(s) for k, s in SHAPES.items()}
    st = interop.to_jax(states, ljax.lion(LR).init(params))
    back = interop.from_jax(st)
    assert np.array_equal(back[0].momentum, interop.dequantize(codes, absmax)) and back[0].step == 3


def test_errors_name_the_problem():
    _, jnp, _, ljax = _jax()
    params = {k: jnp.zeros(s) for k, s in SHAPES.items()}
    init = ljax.lion(LR, state_bits=8).init(params)
    good = interop.from_jax(init)
    with pytest.raises(ValueError, match="2 parameters"):
        interop.to_jax(good[:1], init)
    bad = [interop.MomentumState(0, (130, 40), momentum=np.zeros((130, 40), np.float32)), good[1]]
    with pytest.raises(ValueError, match="shape"):
        interop.to_jax(bad, init)
    custom = np.linspace(-1, 1, 256).astype(np.float32)
    odd = [interop.MomentumState(0, (40, 130), codes=good[0].codes, absmax=good[0].absmax, qmap=custom), good[1]]
    with pytest.raises(ValueError, match="custom quantization map"):
        interop.to_jax(odd, init)
    with pytest.raises(ValueError, match="exactly one of"):
        interop.MomentumState(0, (3,))
    with pytest.raises(ValueError, match="absmax"):
        interop.MomentumState(0, (1000,), codes=np.zeros(1000, np.uint8), absmax=np.zeros(2, np.float32))


# --------------------------------------------------------------------------- 8-bit vs 32-bit
STAT_STEPS = 150
_STATS: dict = {}  # the PyTorch figures, computed once per session


def _step_8bit(framework: str, prob: Problem, wd: float, out, p):
    """One 8-bit step continuing ``out`` (None at first); returns the runner's result."""
    if framework == "torch":
        return run_torch(prob, 1, 8, wd=wd, opt=out[1], params=out[2]) if out else run_torch(prob, 1, 8, wd=wd)
    if framework == "jax":
        return run_jax(prob, 1, 8, wd=wd, state=out[1] if out else None, params=p)
    return run_mlx(prob, 1, 8, wd=wd, opt=out[1] if out else None, params=p)


def _states(framework: str, out) -> list:
    if framework == "torch":
        return interop.from_torch(out[1])
    if framework == "jax":
        return interop.from_jax(out[1])
    return interop.from_mlx(out[1], out[2])


def error_statistics(framework: str, wd: float = 0.1, steps: int = STAT_STEPS) -> dict:
    """On the shared problem, for the 8-bit run: the relative error of its dequantized
    momentum against an fp32 momentum fed the same gradients, how often the update
    directions sign(b1*m + (1-b1)*g) of the two agree, and the final loss against an fp32 run."""
    prob = Problem(4)
    runner = {"torch": run_torch, "jax": run_jax, "mlx": run_mlx}[framework]
    p32 = runner(prob, steps, 32, wd=wd)[0]
    shadow = np.zeros(SHAPES["0_w"], np.float32)
    p, out, agree = prob.init, None, []
    for _ in range(steps):
        g = prob.grads(p)["0_w"]
        m8 = _states(framework, out)[0].dequantize() if out else np.zeros_like(shadow)
        c8 = np.sign(np.float32(B1) * m8 + np.float32(1 - B1) * g)
        c32 = np.sign(np.float32(B1) * shadow + np.float32(1 - B1) * g)
        agree.append(np.mean(c8 == c32))
        shadow = np.float32(B2) * shadow + np.float32(1 - B2) * g
        out = _step_8bit(framework, prob, wd, out, p)
        p = out[0]
    m8 = _states(framework, out)[0].dequantize()
    l0, l32, l8 = prob.loss(prob.init), prob.loss(p32), prob.loss(p)
    return {
        "momentum_rel_err": float(np.linalg.norm(m8 - shadow) / np.linalg.norm(shadow)),
        "direction_agreement": float(np.mean(agree)),
        "loss0": l0,
        "loss32": l32,
        "loss8": l8,
        "loss_gap_rel": abs(l8 - l32) / l32,
    }


@pytest.mark.parametrize("framework", ["jax", "mlx"])
def test_8bit_error_statistics_match_torch(framework):
    _torch()
    if "torch" not in _STATS:
        _STATS["torch"] = error_statistics("torch")
    ref, got = _STATS["torch"], error_statistics(framework)
    print(f"\n8-bit vs 32-bit after {STAT_STEPS} steps\n  torch: {ref}\n  {framework}: {got}")
    # Same format, same codes: the statistics agree with the PyTorch side's (exactly up to
    # the weight-decay arithmetic, which differs in the last bit between the front ends).
    for key in ("momentum_rel_err", "direction_agreement", "loss8", "loss32"):
        assert got[key] == pytest.approx(ref[key], rel=0.05), key
    # 8-bit training lands where fp32 training does, with mostly the same update directions
    assert got["loss8"] < 0.05 * got["loss0"] and got["loss_gap_rel"] < 0.25
    assert got["direction_agreement"] > 0.8


def test_from_torch_reads_bitsandbytes_nested_layout():
    _torch()
    prob = Problem(5)
    _, opt, _ = run_torch(prob, 3, 8)
    plain = interop.from_torch(opt)
    # bitsandbytes >= 0.49.2 moves every tensor but `step` under this key
    sd = copy.deepcopy(opt.state_dict())
    sd["state"] = {
        k: {"step": v["step"], "__bnb_optimizer_quant_state__": {n: t for n, t in v.items() if n != "step"}}
        for k, v in sd["state"].items()
    }
    nested = interop.from_torch(sd)
    assert _same_states(plain, nested) and plain[0].is_8bit and plain[0].step == 3


def test_to_jax_sets_schedule_counts():
    jax, jnp, optax, ljax = _jax()
    params = {k: jnp.zeros(s) for k, s in SHAPES.items()}
    schedule = optax.linear_schedule(1.0, 0.0, 100)
    tx = ljax.lion(schedule, weight_decay=optax.linear_schedule(0.1, 0.0, 100), state_bits=8)
    states = [interop.MomentumState(42, s, momentum=np.zeros(s, np.float32)) for s in SHAPES.values()]
    st = interop.to_jax(states, tx.init(params))
    from lionkit.jax.alias import WeightDecayScheduleState

    kinds = (ljax.ScaleByLion8bitState, WeightDecayScheduleState, optax.ScaleByScheduleState)
    counts = [int(x.count) for x in jax.tree.leaves(st, is_leaf=lambda x: isinstance(x, kinds)) if isinstance(x, kinds)]
    assert counts == [42, 42, 42]  # Lion state, weight-decay schedule, learning-rate schedule
    # the fp32 momentum went into the 8-bit leaf quantized, into the small leaf as is
    back = interop.from_jax(st)
    assert back[0].is_8bit and not back[1].is_8bit


# --------------------------------------------------------------------------- names
def _qkv(order):
    """Two same-shape parameters whose momenta differ, in the given dict order."""
    values = {"wq": np.full((8, 8), 1.0, np.float32), "wk": np.full((8, 8), -2.0, np.float32)}
    return {k: values[k] for k in order}


def test_same_shape_parameters_are_matched_by_name_mlx_to_jax():
    # MLX flattens dicts in insertion order, JAX in sorted key order: by position, wq and wk
    # would swap (same shapes, so no shape check could notice)
    mx, lmlx = _mlx()
    _, jnp, _, ljax = _jax()
    grads = _qkv(["wq", "wk"])
    opt = lmlx.Lion(LR)
    mp = opt.apply_gradients({k: mx.array(v) for k, v in grads.items()}, {k: mx.zeros((8, 8)) for k in grads})
    mx.eval(mp, opt.state)
    states = interop.from_mlx(opt, mp)
    assert [st.name for st in states] == ["wq", "wk"]
    pj = {k: jnp.zeros((8, 8)) for k in grads}
    back = interop.from_jax(interop.to_jax(states, ljax.lion(LR).init(pj)))
    assert [st.name for st in back] == ["wk", "wq"]  # JAX's order
    for st in back:
        assert np.array_equal(st.momentum, np.array(opt.state[st.name]["m"]))
    # by position (names ignored) they are swapped: what by_name=False asks for
    swapped = interop.from_jax(interop.to_jax(states, ljax.lion(LR).init(pj), by_name=False))
    assert np.array_equal(swapped[0].momentum, np.array(opt.state["wq"]["m"]))
    # and JAX -> MLX in MLX's order again
    opt2 = lmlx.Lion8bit(LR, min_8bit_size=0)
    interop.to_mlx(back, opt2, {k: mx.zeros((8, 8)) for k in grads})
    again = interop.from_mlx(opt2, {k: mx.zeros((8, 8)) for k in grads})
    assert [st.name for st in again] == ["wq", "wk"]
    for a, b in zip(again, states):
        assert np.array_equal(a.codes, interop.quantize(b.momentum)[0])


def test_name_mismatch_is_refused():
    _, jnp, _, ljax = _jax()
    states = [interop.MomentumState(1, (8, 8), momentum=np.ones((8, 8), np.float32), name=n) for n in ("a", "b")]
    init = ljax.lion(LR).init({"a": jnp.zeros((8, 8)), "c": jnp.zeros((8, 8))})
    with pytest.raises(ValueError, match=r"\['c'\].*\['b'\].*by_name=False"):
        interop.to_jax(states, init)
    assert len(interop.from_jax(interop.to_jax(states, init, by_name=False))) == 2
    unnamed = [interop.MomentumState(1, (8, 8), momentum=np.ones((8, 8), np.float32)) for _ in range(2)]
    with pytest.raises(ValueError, match="by_name=True"):
        interop.to_jax(unnamed, init, by_name=True)
    interop.to_jax(unnamed, init)  # no names: by position


def test_nested_names_agree_between_jax_and_mlx():
    mx, lmlx = _mlx()
    _, jnp, _, ljax = _jax()
    tree = {"layers": [{"weight": (4, 3), "bias": (4,)}, {"weight": (2, 4)}]}
    pm = {"layers": [{"weight": mx.zeros((4, 3)), "bias": mx.zeros(4)}, {"weight": mx.zeros((2, 4))}]}
    pj = {"layers": [{"weight": jnp.zeros((4, 3)), "bias": jnp.zeros(4)}, {"weight": jnp.zeros((2, 4))}]}
    opt = lmlx.Lion(LR)
    opt.init(pm)
    want = {"layers.0.weight", "layers.0.bias", "layers.1.weight"}
    assert {st.name for st in interop.from_mlx(opt, pm)} == want
    assert {st.name for st in interop.from_jax(ljax.lion(LR).init(pj))} == want
    assert tree is not None


def test_torch_names_and_npz_keep_names(tmp_path):
    torch = _torch()
    _, jnp, _, ljax = _jax()
    import lionkit

    a, b = torch.nn.Parameter(torch.zeros(8, 8)), torch.nn.Parameter(torch.zeros(8, 8))
    opt = lionkit.Lion([a, b], lr=LR, backend="torch")
    a.grad, b.grad = torch.ones(8, 8), -torch.ones(8, 8)
    opt.step()
    with pytest.raises(ValueError, match="1 names"):
        interop.from_torch(opt, names=["wq"])
    states = interop.from_torch(opt, names=["wq", "wk"])
    assert [st.name for st in states] == ["wq", "wk"] and interop.from_torch(opt)[0].name is None
    interop.save_npz(tmp_path / "s.npz", states)
    loaded = interop.load_npz(tmp_path / "s.npz")
    assert [st.name for st in loaded] == ["wq", "wk"] and _same_states(states, loaded)
    back = interop.from_jax(interop.to_jax(loaded, ljax.lion(LR).init({"wq": jnp.zeros((8, 8)), "wk": jnp.zeros((8, 8))})))
    assert {st.name: float(st.momentum[0, 0]) for st in back} == pytest.approx({"wq": 0.01, "wk": -0.01})
    # into torch by name, whatever the order of the names
    c, d = torch.nn.Parameter(torch.zeros(8, 8)), torch.nn.Parameter(torch.zeros(8, 8))
    opt2 = lionkit.Lion([c, d], lr=LR, backend="torch")
    interop.to_torch(back, opt2, names=["wq", "wk"])
    got = interop.from_torch(opt2)
    assert float(got[0].momentum[0, 0]) == pytest.approx(0.01) and float(got[1].momentum[0, 0]) == pytest.approx(-0.01)


def test_from_mlx_with_frozen_parameters_names_trainable_parameters():
    _mx, lmlx = _mlx()
    from mlx import nn

    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))
    model.layers[1].freeze()
    opt = lmlx.Lion(LR)
    opt.init(model.trainable_parameters())
    with pytest.raises(ValueError, match=r"'layers.1.weight'.*trainable_parameters\(\)"):
        interop.from_mlx(opt, model.parameters())
    assert len(interop.from_mlx(opt, model.trainable_parameters())) == 4


# --------------------------------------------------------------------------- counters
def test_to_jax_sets_multisteps_and_inject_hyperparams_counts():
    _, jnp, optax, ljax = _jax()
    params = {k: jnp.zeros(s) for k, s in SHAPES.items()}
    states = [interop.MomentumState(7, s, momentum=np.zeros(s, np.float32)) for s in SHAPES.values()]
    sched = optax.linear_schedule(1.0, 0.0, 100)
    ms = interop.to_jax(states, optax.MultiSteps(ljax.lion(sched), 2).init(params))
    assert int(ms.gradient_step) == 7 and int(ms.mini_step) == 0
    tx = optax.inject_hyperparams(ljax.lion)(learning_rate=sched)
    ih = interop.to_jax(states, tx.init(params))
    assert int(ih.count) == 7
    assert int(ih.hyperparams_states["learning_rate"].count) == 7
    _, ih = tx.update({k: jnp.ones(s) for k, s in SHAPES.items()}, ih, params)
    assert float(ih.hyperparams["learning_rate"]) == pytest.approx(float(sched(7)))
