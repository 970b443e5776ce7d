"""lionkit.jax: bit-exact against optax.lion / braintools' optax chain, 8-bit state, mixed
dtypes, schedules, masks, jit without recompiling, validation."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

jax = pytest.importorskip("jax", reason="jax not installed (pip install 'lionkit[jax]')")
optax = pytest.importorskip("optax", reason="optax not installed (pip install 'lionkit[jax]')")
import jax.numpy as jnp  # noqa: E402

from lionkit import interop  # noqa: E402
from lionkit.jax import ScaleByLion8bitState, ScaleByLionState, lion, scale_by_lion  # noqa: E402
from lionkit.jax import quant as jquant  # noqa: E402

STEPS = 25


def _problem(seed: int = 0, dtype=jnp.float32):
    """A small tanh regression whose gradients depend on the current weights."""
    k = jax.random.split(jax.random.PRNGKey(seed), 4)
    params = {
        "w1": jax.random.normal(k[0], (24, 48)).astype(dtype) * 0.3,
        "b1": jnp.zeros(48, dtype),
        "w2": jax.random.normal(k[1], (48, 5)).astype(dtype) * 0.3,
    }
    x = jax.random.normal(k[2], (64, 24))
    y = jnp.sin(jax.random.normal(k[3], (64, 5)))

    def loss(p):
        p = jax.tree.map(lambda a: a.astype(jnp.float32), p)
        h = jnp.tanh(x @ p["w1"] + p["b1"])
        return jnp.mean((h @ p["w2"] - y) ** 2)

    return params, loss


_GRADS: dict = {}


def _grad(loss):
    """jax.grad(loss), jitted once per loss: the optimizer under test still runs eagerly."""
    if loss not in _GRADS:
        _GRADS[loss] = jax.jit(jax.grad(loss))
    return _GRADS[loss]


def _run(tx, params, loss, steps=STEPS, jit=False):
    state = tx.init(params)
    grad = _grad(loss)

    def step(p, s):
        u, s = tx.update(grad(p), s, p)
        return optax.apply_updates(p, u), s

    if jit:
        step = jax.jit(step)
    for _ in range(steps):
        params, state = step(params, state)
    return params, state


def _same(a, b) -> bool:
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(
        x.dtype == y.dtype and x.shape == y.shape and np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb)
    )


def _mu(state):
    """The momentum tree of the one Lion state (lionkit's or optax's) inside a chain state."""
    kinds = (ScaleByLionState, ScaleByLion8bitState, optax.ScaleByLionState)
    found = [s for s in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, kinds)) if isinstance(s, kinds)]
    assert len(found) == 1
    return found[0].mu


SCHEDULE = optax.warmup_cosine_decay_schedule(0.0, 3e-2, 5, STEPS)


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("lr", [1e-2, SCHEDULE], ids=["const", "schedule"])
@pytest.mark.parametrize("betas", [(0.9, 0.99), (0.95, 0.98)])
def test_matches_optax_lion_bitwise(weight_decay, lr, betas):
    params, loss = _problem()
    ref = optax.lion(lr, b1=betas[0], b2=betas[1], weight_decay=weight_decay)
    ours = lion(lr, b1=betas[0], b2=betas[1], weight_decay=weight_decay)
    p_ref, s_ref = _run(ref, params, loss)
    p_ours, s_ours = _run(ours, params, loss)
    assert _same(p_ref, p_ours)
    assert _same(_mu(s_ref), _mu(s_ours))
    assert not _same(params, p_ours)  # it moved


def test_matches_optax_lion_bitwise_under_jit():
    # under jit XLA may fuse multiply-adds, so jit and eager differ in the last bit, but the
    # same graph compiles the same way: lionkit and optax stay identical
    params, loss = _problem(1)
    p_ref, _ = _run(optax.lion(1e-2, weight_decay=0.1), params, loss, jit=True)
    p_ours, _ = _run(lion(1e-2, weight_decay=0.1), params, loss, jit=True)
    assert _same(p_ref, p_ours)


def _optax_takes_wd_schedules() -> bool:
    """Whether optax's own weight decay (the reference below) follows a schedule: from 0.2.7
    (0.2.4-0.2.5 refuse one; 0.2.6 takes one but never advances its step count)."""
    tx = optax.add_decayed_weights(lambda count: count * 1.0)
    p = {"w": jnp.ones(2)}
    try:
        u0, state = tx.update({"w": jnp.zeros(2)}, tx.init(p), p)
        u1, _ = tx.update({"w": jnp.zeros(2)}, state, p)
    except TypeError:
        return False
    return float(u0["w"][0]) == 0.0 and float(u1["w"][0]) == 1.0


@pytest.mark.skipif(
    not _optax_takes_wd_schedules(),
    reason=f"optax {optax.__version__}'s lion, the reference, takes no weight-decay schedule (optax >= 0.2.7 does)",
)
def test_weight_decay_schedule_and_mask_match_optax():
    params, loss = _problem(2)
    wd = optax.linear_schedule(0.0, 0.5, STEPS)
    mask = {"w1": True, "b1": False, "w2": True}
    p_ref, _ = _run(optax.lion(SCHEDULE, weight_decay=wd, mask=mask), params, loss)
    p_ours, _ = _run(lion(SCHEDULE, weight_decay=wd, mask=mask), params, loss)
    assert _same(p_ref, p_ours)
    # the mask matters: without it the bias decays too
    p_nomask, _ = _run(lion(SCHEDULE, weight_decay=wd), params, loss)
    assert not np.array_equal(np.asarray(p_nomask["b1"]), np.asarray(p_ours["b1"]))


@pytest.mark.parametrize(
    "clip", [{"grad_clip_norm": 0.05}, {"grad_clip_value": 1e-3}, {"grad_clip_norm": 0.05, "grad_clip_value": 1e-3}]
)
def test_clipping_matches_braintools_chain(clip):
    # braintools.optim.Lion is this optax chain (SPEC section 4); built here from optax parts
    params, loss = _problem(3)
    parts = []
    if "grad_clip_norm" in clip:
        parts.append(optax.clip_by_global_norm(clip["grad_clip_norm"]))
    if "grad_clip_value" in clip:
        parts.append(optax.clip(clip["grad_clip_value"]))
    parts += [optax.scale_by_lion(0.9, 0.99), optax.add_decayed_weights(0.1), optax.scale_by_schedule(lambda c: -SCHEDULE(c))]
    p_ref, _ = _run(optax.chain(*parts), params, loss)
    p_ours, _ = _run(lion(SCHEDULE, weight_decay=0.1, **clip), params, loss)
    assert _same(p_ref, p_ours)
    p_unclipped, _ = _run(lion(SCHEDULE, weight_decay=0.1), params, loss)
    assert not _same(p_unclipped, p_ours)  # the clipping was active


def _reference_f64(params, loss, lr_fn, wd, steps, b1=0.9, b2=0.99):
    """Lion in float64 numpy on the same problem (gradients in fp32 from fp64 weights)."""
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    for t in range(steps):
        g = _grad(loss)({k: jnp.asarray(v, jnp.float32) for k, v in p.items()})
        lr = float(lr_fn(t))
        for k in p:
            gk = np.asarray(g[k], np.float64)
            c = b1 * m[k] + (1 - b1) * gk
            p[k] = p[k] * (1 - lr * wd) - lr * np.sign(c)
            m[k] = b2 * m[k] + (1 - b2) * gk
    return p


def test_fp32_trajectory_close_to_float64_reference():
    params, loss = _problem(4)
    p_ours, _ = _run(lion(SCHEDULE, weight_decay=0.1), params, loss)
    ref = _reference_f64(params, loss, SCHEDULE, 0.1, STEPS)
    for k in ref:
        # sign flips of near-zero interpolations can differ between fp32 and fp64; allow a
        # handful of elements to disagree by 2*lr, the rest to rounding
        diff = np.abs(np.asarray(p_ours[k], np.float64) - ref[k])
        assert np.mean(diff > 1e-5) < 0.01, k


def test_bf16_params_fp32_math():
    # bf16 leaves: gradients, momentum and the update are fp32; the parameter is rounded to
    # bf16 once per step. Check each step against optax.lion run in fp32 on the upcast values.
    params, loss = _problem(5, dtype=jnp.bfloat16)
    params["b1"] = params["b1"].astype(jnp.float32)  # mixed pytree
    ours = lion(1e-2, weight_decay=0.1)
    ref = optax.lion(1e-2, weight_decay=0.1)
    s = ours.init(params)
    s_ref = ref.init(jax.tree.map(lambda a: a.astype(jnp.float32), params))
    assert all(m.dtype == jnp.float32 for m in jax.tree.leaves(_mu(s)))
    for _ in range(10):
        g = jax.grad(loss)(params)
        assert g["w1"].dtype == jnp.bfloat16
        up32 = jax.tree.map(lambda a: a.astype(jnp.float32), params)
        u, s = ours.update(g, s, params)
        assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(u))
        new = optax.apply_updates(params, u)
        u_ref, s_ref = ref.update(jax.tree.map(lambda a: a.astype(jnp.float32), g), s_ref, up32)
        expect = jax.tree.map(lambda a, p: a.astype(p.dtype), optax.apply_updates(up32, u_ref), params)
        assert _same(new, expect)
        assert _same(_mu(s), _mu(s_ref))
        params = new
    assert params["w1"].dtype == jnp.bfloat16 and params["b1"].dtype == jnp.float32


def test_mu_dtype_bfloat16():
    params, loss = _problem(6)
    tx = lion(1e-2, mu_dtype=jnp.bfloat16)
    p, s = _run(tx, params, loss, steps=5)
    assert all(m.dtype == jnp.bfloat16 for m in jax.tree.leaves(_mu(s)))
    assert np.isfinite(float(loss(p)))


# --------------------------------------------------------------------------- 8-bit
def test_8bit_state_layout():
    params = {"big": jnp.zeros((64, 100)), "small": jnp.zeros(10), "tail": jnp.zeros(4096 + 7)}
    s = scale_by_lion(state_bits=8).init(params)
    assert isinstance(s, ScaleByLion8bitState)
    assert s.codes["big"].dtype == jnp.uint8 and s.codes["big"].shape == (64, 100)
    assert s.absmax["big"].shape == (interop.num_blocks(6400, 256),)
    assert s.absmax["tail"].shape == (17,)
    assert np.all(np.asarray(s.codes["big"]) == jquant.ZERO_CODE)
    assert s.mu["small"].shape == (10,) and s.codes["small"].size == 0 and s.absmax["small"].size == 0
    assert s.mu["big"].size == 0
    assert int(s.block_size) == 256
    s2 = scale_by_lion(state_bits=8, block_size=None, min_8bit_size=0).init(params)
    assert s2.absmax["big"].shape == (1,) and s2.codes["small"].shape == (10,) and int(s2.block_size) == -1


@pytest.mark.parametrize("block_size", [256, None, 64])
def test_8bit_step_is_dequantize_step_requantize(block_size):
    # each 8-bit step equals: dequantize, the fp32 step, quantize with the numpy reference
    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.standard_normal((50, 90)), jnp.float32)}
    tx = scale_by_lion(0.9, 0.99, state_bits=8, block_size=block_size, min_8bit_size=0)
    s = tx.init(params)
    for _ in range(6):
        g = {"w": jnp.asarray(rng.standard_normal((50, 90)) * 10.0 ** rng.integers(-6, 2), jnp.float32)}
        m = interop.dequantize(np.asarray(s.codes["w"]), np.asarray(s.absmax["w"]), block_size)
        u, s = tx.update(g, s, params)
        gn = np.asarray(g["w"])
        c = np.float32(0.9) * m + np.float32(1 - 0.9) * gn
        m_new = np.float32(0.99) * m + np.float32(1 - 0.99) * gn
        codes, absmax = interop.quantize(m_new, block_size)
        assert np.array_equal(np.asarray(u["w"]), np.sign(c))
        assert np.array_equal(np.asarray(s.codes["w"]), codes)
        assert np.array_equal(np.asarray(s.absmax["w"]), absmax)
    assert int(s.count) == 6


def test_8bit_close_to_32bit():
    params, loss = _problem(7)
    p32, s32 = _run(lion(1e-2, weight_decay=0.1), params, loss, steps=40, jit=True)
    p8, s8 = _run(lion(1e-2, weight_decay=0.1, state_bits=8, min_8bit_size=0), params, loss, steps=40, jit=True)
    l0, l32, l8 = float(loss(params)), float(loss(p32)), float(loss(p8))
    assert l8 < 0.5 * l0 and abs(l8 - l32) < 0.05 * l0


def test_8bit_quantizer_matches_numpy_reference_on_thresholds():
    t, zero = interop.code_thresholds()
    x = np.concatenate(
        [t, np.nextafter(t, np.float32(-2)), np.nextafter(t, np.float32(2)), interop.dynamic_map(), [1e-30, -1e-30, 0.0]]
    ).astype(np.float32)
    rng = np.random.default_rng(1)
    x = np.concatenate([x, rng.uniform(-1, 1, 5000).astype(np.float32)])
    want = interop.quantize(x.reshape(1, -1), None)[0].reshape(-1)
    # normalised by absmax 1 -> codes of x itself
    assert np.array_equal(np.asarray(jquant.nearest_code(jnp.asarray(x))), want)


# --------------------------------------------------------------------------- jit
@pytest.mark.parametrize("state_bits", [32, 8])
def test_jit_compiles_once(state_bits):
    params, loss = _problem(8)
    params["emb"] = jnp.ones((80, 64)) * 0.01  # quantized at 8 bits (5120 elements)
    tx = lion(SCHEDULE, weight_decay=optax.linear_schedule(0.1, 0.0, STEPS), state_bits=state_bits, grad_clip_norm=1.0)
    traces = []

    def loss2(p):
        return loss(p) + jnp.sum(p["emb"] ** 2)

    @jax.jit
    def step(p, s):
        traces.append(1)  # runs only while tracing
        u, s = tx.update(jax.grad(loss2)(p), s, p)
        return optax.apply_updates(p, u), s

    p, s = params, tx.init(params)
    for _ in range(30):
        p, s = step(p, s)
    assert len(traces) == 1
    assert step._cache_size() == 1
    # and the jitted run agrees with the eager one up to fused multiply-adds (last-bit
    # differences, now and then a flipped sign of a near-zero interpolation)
    q, _ = _run(tx, params, loss2, steps=30)
    for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(q)):
        assert np.mean(np.abs(np.asarray(a) - np.asarray(b)) > 1e-5) < 0.02


# --------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"learning_rate": -1.0}, "learning_rate"),
        ({"learning_rate": "x"}, "learning_rate"),
        ({"learning_rate": 1e-3, "b1": 1.0}, "b1"),
        ({"learning_rate": 1e-3, "b2": -0.1}, "b2"),
        ({"learning_rate": 1e-3, "weight_decay": -1.0}, "weight_decay"),
        ({"learning_rate": 1e-3, "state_bits": 16}, "state_bits"),
        ({"learning_rate": 1e-3, "grad_clip_norm": 0.0}, "grad_clip_norm"),
        ({"learning_rate": 1e-3, "grad_clip_value": -2.0}, "grad_clip_value"),
        ({"learning_rate": 1e-3, "block_size": 0}, "block_size"),
        ({"learning_rate": 1e-3, "min_8bit_size": -1}, "min_8bit_size"),
        # NaN passed the "> 0" checks, inf every check; both spoil the weights in one step
        ({"learning_rate": 1e-3, "grad_clip_norm": float("nan")}, "grad_clip_norm"),
        ({"learning_rate": 1e-3, "grad_clip_value": float("nan")}, "grad_clip_value"),
        ({"learning_rate": float("inf")}, "learning_rate"),
        ({"learning_rate": float("nan")}, "learning_rate"),
        ({"learning_rate": 1e-3, "weight_decay": float("inf")}, "weight_decay"),
        # an integer momentum rounds every update to zero (Lion would become sign-SGD)
        ({"learning_rate": 1e-3, "mu_dtype": jnp.int8}, "mu_dtype"),
        ({"learning_rate": 1e-3, "mu_dtype": "foo"}, "mu_dtype"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        lion(**kwargs)


@pytest.mark.parametrize("inf", [float("inf"), np.float32(np.inf), jnp.array(jnp.inf)], ids=["python", "numpy", "jax"])
def test_infinite_clip_thresholds_mean_no_clipping(inf):
    # optax's clip_by_global_norm(inf) turned a norm that overflowed fp32 into NaN updates
    params = {"w": jnp.array([1.0, -2.0, 3.0])}
    grads = {"w": jnp.array([1e30, -5.0, 0.5])}
    plain = lion(1e-2)
    clipped = lion(1e-2, grad_clip_norm=inf, grad_clip_value=inf)
    u0, _ = plain.update(grads, plain.init(params), params)
    u1, _ = jax.jit(clipped.update)(grads, clipped.init(params), params)
    assert np.array_equal(np.asarray(u0["w"]), np.asarray(u1["w"]))
    # the same state structure as with a finite threshold (a state carries over), and traced
    finite = lion(1e-2, grad_clip_norm=1.0, grad_clip_value=1.0)
    assert jax.tree.structure(finite.init(params)) == jax.tree.structure(clipped.init(params))
    injected = optax.inject_hyperparams(lion)(learning_rate=1e-2, grad_clip_norm=inf)
    u2, _ = jax.jit(injected.update)(grads, injected.init(params), params)
    assert np.array_equal(np.asarray(u0["w"]), np.asarray(u2["w"]))


def test_add_decayed_weights_checks_its_argument():
    from lionkit.jax import add_decayed_weights

    with pytest.raises(ValueError, match="weight_decay"):
        add_decayed_weights(-1.0)
    with pytest.raises(ValueError, match="weight_decay"):
        add_decayed_weights(float("nan"))


def test_missing_optax_names_the_install():
    code = "import sys; sys.modules['optax'] = None\ntry:\n import lionkit.jax\nexcept ImportError as e: print(e)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "pip install 'lionkit[jax]'" in out.stdout, out.stdout + out.stderr


def run_doc_examples(doc: str, namespace: dict | None = None) -> dict:
    """Execute the ```python blocks of a docs page in order, in one namespace."""
    import pathlib
    import re

    text = (pathlib.Path(__file__).resolve().parent.parent / "docs" / doc).read_text()
    ns: dict = {} if namespace is None else namespace
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, f"no python examples in docs/{doc}"
    for block in blocks:
        exec(compile(block, f"docs/{doc}", "exec"), ns)
    return ns


def test_docs_examples_run(capsys):
    run_doc_examples("jax.md")  # the first example asserts that the loss went down
    out = capsys.readouterr().out
    assert "uint8 (1000, 64)" in out and "MomentumState(step=0" in out


# --------------------------------------------------------------------------- hyperparameters as arrays
STATIC = ("state_bits", "block_size", "min_8bit_size")


def _run_jit(tx, params, loss, steps=STEPS):
    return _run(tx, params, loss, steps=steps, jit=True)


def test_inject_hyperparams_under_jit_matches_optax():
    # optax.inject_hyperparams turns every numeric argument into an array, traced in update
    params, loss = _problem(9)
    lr = optax.cosine_decay_schedule(3e-2, STEPS)
    p_ref, _ = _run_jit(optax.inject_hyperparams(optax.lion)(learning_rate=lr, weight_decay=0.1), params, loss)
    tx = optax.inject_hyperparams(lion)(learning_rate=lr, weight_decay=0.1)
    p_ours, s = _run_jit(tx, params, loss)
    assert _same(p_ref, p_ours)
    assert s.hyperparams["state_bits"] == 32 and float(s.hyperparams["weight_decay"]) == pytest.approx(0.1)
    # and the hyperparameters can be changed between steps without recompiling
    s.hyperparams["weight_decay"] = jnp.asarray(0.5)
    _, s = tx.update(_grad(loss)(p_ours), s, p_ours)


def test_inject_hyperparams_8bit_with_static_args():
    params, loss = _problem(10)
    kw = {"weight_decay": 0.1, "state_bits": 8, "min_8bit_size": 0, "block_size": 64}
    p_ref, _ = _run_jit(lion(SCHEDULE, **kw), params, loss)
    p_ours, s = _run_jit(optax.inject_hyperparams(lion, static_args=STATIC)(learning_rate=SCHEDULE, **kw), params, loss)
    assert _same(p_ref, p_ours)
    assert interop.from_jax(s)[0].block_size == 64


def test_inject_hyperparams_traced_structural_argument_is_named():
    params, loss = _problem(11)
    tx = optax.inject_hyperparams(lion)(learning_rate=1e-2, state_bits=8, min_8bit_size=0)
    s = tx.init(params)  # concrete arrays here: converted
    assert isinstance(s.inner_state[1], ScaleByLion8bitState)
    with pytest.raises(ValueError, match=r"block_size arrived as a traced value.*static_args"):
        jax.jit(tx.update)(_grad(loss)(params), s, params)
    with pytest.raises(ValueError, match=r"state_bits arrived as a traced value"):
        jax.jit(lambda b: scale_by_lion(state_bits=b).init(params))(8)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"learning_rate": jnp.asarray(1e-2)},
        {"learning_rate": np.float32(1e-2)},
        {"learning_rate": np.float64(1e-2), "weight_decay": np.float32(0.1)},
        {"learning_rate": 1e-2, "weight_decay": jnp.asarray(0.1), "b1": np.float32(0.9), "b2": jnp.asarray(0.99)},
    ],
    ids=["jax-lr", "np32-lr", "np-wd", "arrays"],
)
def test_array_and_numpy_hyperparameters_match_optax(kwargs):
    params, loss = _problem(12)
    p_ref, _ = _run(optax.lion(**{"weight_decay": 0.0, **kwargs}), params, loss, steps=10)
    p_ours, _ = _run(lion(**kwargs), params, loss, steps=10)
    assert _same(p_ref, p_ours)


def test_integer_arguments_accept_numpy_and_concrete_arrays():
    params = {"w": jnp.zeros((40, 80))}
    for bs in (np.int64(128), jnp.asarray(128), np.array(128)):
        s = lion(1e-3, state_bits=np.int32(8), block_size=bs, min_8bit_size=jnp.asarray(0)).init(params)
        assert int(s[1].block_size) == 128 and s[1].absmax["w"].shape == (25,)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"learning_rate": 1e-3, "b1": np.float32(1.5)}, "b1"),
        ({"learning_rate": 1e-3, "b2": jnp.asarray(1.0)}, "b2"),
        ({"learning_rate": jnp.asarray(-1.0)}, "learning_rate"),
        ({"learning_rate": jnp.asarray([1e-3, 2e-3])}, "learning_rate"),
        ({"learning_rate": 1e-3, "weight_decay": np.float32(-0.1)}, "weight_decay"),
        ({"learning_rate": 1e-3, "block_size": np.int64(0)}, "block_size"),
        ({"learning_rate": 1e-3, "block_size": 256.0}, "block_size"),
        ({"learning_rate": 1e-3, "state_bits": jnp.asarray(16)}, "state_bits"),
    ],
)
def test_bad_numpy_and_array_arguments(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        lion(**kwargs)


# --------------------------------------------------------------------------- block size and width checks
def _state8(block_size, shape=(64, 80)):
    rng = np.random.default_rng(0)
    tx = scale_by_lion(state_bits=8, block_size=block_size, min_8bit_size=0)
    g = jnp.asarray(rng.standard_normal(shape) * np.linspace(0.01, 10, int(np.prod(shape))).reshape(shape), jnp.float32)
    s = tx.init(jnp.zeros(shape))
    return tx.update(g, s)[1], g


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_8bit_state_with_other_scale_count_is_refused(jit):
    s, g = _state8(256)  # 20 scales for 5120 elements
    update = scale_by_lion(state_bits=8, block_size=None, min_8bit_size=0).update
    with pytest.raises(ValueError, match="block_size"):
        (jax.jit(update) if jit else update)(g, s)


def test_8bit_state_with_other_block_size_same_count_is_refused():
    s, g = _state8(256)  # 5120 elements: 20 scales with blocks of 256 and of 260
    with pytest.raises(ValueError, match="block_size=256.*block_size=260"):
        scale_by_lion(state_bits=8, block_size=260, min_8bit_size=0).update(g, s)
    # its own block size passes, under jit too
    u, _ = jax.jit(scale_by_lion(state_bits=8, block_size=256, min_8bit_size=0).update)(g, s)
    assert u.shape == g.shape


def test_state_of_other_width_is_refused():
    s, g = _state8(256)
    with pytest.raises(ValueError, match="state_bits=32"):
        scale_by_lion(state_bits=32).update(g, s)


# --------------------------------------------------------------------------- subnormal momentum
@pytest.mark.parametrize("block_size", [256, None, 4])
def test_quantizer_codes_subnormal_values_like_numpy(block_size):
    # XLA on CPU flushes subnormals in float arithmetic; the quantizer works on bit patterns
    # where they occur, so its codes are numpy's (and PyTorch's and MLX's)
    tiny = np.float32(np.finfo(np.float32).smallest_subnormal)
    x = np.zeros(256, np.float32)
    x[:3] = [50.0, 1e-37, -2e-37]  # quotients subnormal (x normal)
    x[4:8] = [1e-40, -3e-41, 5e-44, -tiny]  # a block of subnormals: absmax subnormal
    x[8:12] = [2e-38, 1e-39, -1e-44, 3e-39]  # normal absmax, subnormal values, quotients not tiny
    x[12:16] = [3e38, tiny, -tiny, 1e-30]  # quotients below 2**-150: numpy rounds them to 0
    x[16:19] = [7.0, -1.0, 0.0]
    rng = np.random.default_rng(0)
    x[20:] = (rng.standard_normal(236) * 10.0 ** rng.integers(-45, 2, 236)).astype(np.float32)
    codes, absmax = interop.quantize(x, block_size)
    for fn in (jquant.quantize, jax.jit(jquant.quantize, static_argnums=1)):
        c, a = fn(jnp.asarray(x), block_size)
        assert np.array_equal(np.asarray(a).view(np.uint32), absmax.view(np.uint32))
        assert np.array_equal(np.asarray(c), codes)
    if block_size == 4:  # the cases that used to fail: a nonzero momentum got the zero code
        assert codes[1] == jquant.ZERO_CODE + 1 and codes[5] == 49


def test_quantizer_non_finite_blocks_like_numpy():
    x = np.array([1.0, np.inf, -2.0, 0.0, np.nan, 1.0, -1.0, 0.0, -np.inf, 3.0, np.inf, 1e-40], np.float32)
    codes, absmax = interop.quantize(x, 4)
    c, a = jax.jit(jquant.quantize, static_argnums=1)(jnp.asarray(x), 4)
    assert np.array_equal(np.asarray(c), codes)
    assert np.array_equal(np.asarray(a), absmax, equal_nan=True)
