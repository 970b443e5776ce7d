"""lionkit.mlx: bit-exact against mlx.optimizers.Lion, schedule indexing, bf16 in fp32,
8-bit state, safetensors round trip, validation."""

from __future__ import annotations

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core", reason="MLX not installed (pip install 'lionkit[mlx]', i.e. mlx[cpu] on Linux)")
import mlx.optimizers as optim  # noqa: E402
from mlx import nn  # noqa: E402
from mlx.utils import tree_flatten, tree_unflatten  # noqa: E402

from lionkit import interop  # noqa: E402
from lionkit.mlx import Lion, Lion8bit  # noqa: E402
from lionkit.mlx import quant as mquant  # noqa: E402

STEPS = 25


def _model(seed: int = 0, dtype=mx.float32):
    mx.random.seed(seed)
    model = nn.Sequential(nn.Linear(16, 80), nn.Tanh(), nn.Linear(80, 4))
    model.set_dtype(dtype)
    return model


def _data(seed: int = 100):
    mx.random.seed(seed)
    return mx.random.normal((64, 16)), mx.sin(mx.random.normal((64, 4)))


def _loss(model, x, y):
    return ((model(x).astype(mx.float32) - y) ** 2).mean()


def _train(model, opt, steps=STEPS, clip=None):
    x, y = _data()
    loss_and_grad = nn.value_and_grad(model, _loss)
    for _ in range(steps):
        _, grads = loss_and_grad(model, x, y)
        if clip is not None:
            grads, _ = optim.clip_grad_norm(grads, clip)
        opt.update(model, grads)
        mx.eval(model.parameters(), opt.state)
    return model


def _params(model):
    return [np.array(v.astype(mx.float32)) for _, v in tree_flatten(model.parameters())]


def _same(a, b) -> bool:
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))


SCHEDULE = optim.join_schedules([optim.linear_schedule(0.0, 3e-2, 5), optim.cosine_decay(3e-2, STEPS)], [5])


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("lr", [1e-2, SCHEDULE], ids=["const", "schedule"])
@pytest.mark.parametrize("clip", [None, 0.05], ids=["noclip", "clip"])
def test_matches_mlx_lion_bitwise(weight_decay, lr, clip):
    ref = _train(_model(), optim.Lion(lr, betas=[0.9, 0.99], weight_decay=weight_decay), clip=clip)
    opt = Lion(lr, betas=(0.9, 0.99), weight_decay=weight_decay)
    ours = _train(_model(), opt, clip=clip)
    assert _same(_params(ref), _params(ours))
    assert not _same(_params(_model()), _params(ours))  # it moved
    assert int(opt.state["step"]) == STEPS


def test_schedule_update_k_uses_schedule_k_minus_1():
    seen = []

    def schedule(step):
        seen.append(int(step))
        return mx.array(1e-3) * (step + 1)

    opt = Lion(schedule)
    model = _train(_model(), opt, steps=4)
    # the constructor evaluates schedule(0); update k evaluates schedule(k - 1)
    assert seen == [0, 0, 1, 2, 3]
    assert np.isclose(float(opt.learning_rate), 4e-3)
    assert model is not None


def test_bf16_params_fp32_math():
    # each step equals MLX's Lion run in fp32 on the upcast values, rounded once to bf16
    model = _model(1, mx.bfloat16)
    ref_model = _model(1, mx.float32)
    opt, ref = Lion(1e-2, weight_decay=0.1), optim.Lion(1e-2, weight_decay=0.1)
    x, y = _data()
    loss_and_grad = nn.value_and_grad(model, _loss)
    for _ in range(8):
        ref_model.update(tree_unflatten([(k, v.astype(mx.float32)) for k, v in tree_flatten(model.parameters())]))
        _, grads = loss_and_grad(model, x, y)
        opt.update(model, grads)
        ref.update(ref_model, tree_unflatten([(k, g.astype(mx.float32)) for k, g in tree_flatten(grads)]))
        mx.eval(model.parameters(), ref_model.parameters(), opt.state, ref.state)
        for (_, p), (_, q) in zip(tree_flatten(model.parameters()), tree_flatten(ref_model.parameters())):
            assert p.dtype == mx.bfloat16
            assert np.array_equal(np.array(p.astype(mx.float32)), np.array(q.astype(mx.bfloat16).astype(mx.float32)))
        for (_, m), (_, n) in zip(tree_flatten(opt.state), tree_flatten(ref.state)):
            assert np.array_equal(np.array(m), np.array(n))


# --------------------------------------------------------------------------- 8-bit
def test_8bit_state_layout():
    opt = Lion8bit(1e-3)
    model = _model()
    opt.init(model.trainable_parameters())
    st = opt.state["layers"][0]
    assert set(st["weight"]) == {"m"}  # 1280 elements < min_8bit_size: fp32
    opt = Lion8bit(1e-3, min_8bit_size=1000)
    opt.init(model.trainable_parameters())
    w = opt.state["layers"][0]["weight"]
    assert w["codes"].dtype == mx.uint8 and tuple(w["codes"].shape) == (80, 16)
    assert tuple(w["absmax"].shape) == (5,)
    assert np.all(np.array(w["codes"]) == mquant.ZERO_CODE)


@pytest.mark.parametrize("block_size", [256, None, 100])
def test_8bit_step_is_dequantize_step_requantize(block_size):
    rng = np.random.default_rng(0)
    w = mx.array(rng.standard_normal((30, 70)).astype(np.float32))
    opt = Lion8bit(1e-2, weight_decay=0.1, block_size=block_size, min_8bit_size=0)
    state = {}
    opt.init_single(w, state)
    opt.learning_rate = 1e-2
    for _ in range(5):
        g = mx.array((rng.standard_normal((30, 70)) * 10.0 ** rng.integers(-6, 2)).astype(np.float32))
        m = interop.dequantize(np.array(state["codes"]), np.array(state["absmax"]), block_size)
        new_w = opt.apply_single(g, w, state)
        gn, wn = np.array(g), np.array(w)
        c = np.float32(0.9) * m + np.float32(1 - 0.9) * gn
        m_new = np.float32(0.99) * m + np.float32(1 - 0.99) * gn
        lr = np.float32(1e-2)
        expect_w = (np.float32(1) - lr * np.float32(0.1)) * wn - lr * np.sign(c)
        codes, absmax = interop.quantize(m_new, block_size)
        assert np.array_equal(np.array(new_w), expect_w)
        assert np.array_equal(np.array(state["codes"]), codes)
        assert np.array_equal(np.array(state["absmax"]), absmax)
        w = new_w


def test_8bit_close_to_32bit():
    x, y = _data()
    m0 = _model(2)
    l0 = _loss(m0, x, y).item()
    l32 = _loss(_train(_model(2), Lion(1e-2, weight_decay=0.1), steps=40), x, y).item()
    l8 = _loss(_train(_model(2), Lion8bit(1e-2, weight_decay=0.1, min_8bit_size=0), steps=40), x, y).item()
    assert l8 < 0.5 * l0 and abs(l8 - l32) < 0.05 * l0


@pytest.mark.parametrize("cls", [Lion, Lion8bit])
def test_safetensors_round_trip_resumes_exactly(tmp_path, cls):
    kwargs = {"min_8bit_size": 0} if cls is Lion8bit else {}
    straight = _train(_model(3), cls(SCHEDULE, weight_decay=0.1, **kwargs), steps=20)

    model = _model(3)
    opt = cls(SCHEDULE, weight_decay=0.1, **kwargs)
    _train(model, opt, steps=10)
    path = str(tmp_path / "opt.safetensors")
    mx.save_safetensors(path, dict(tree_flatten(opt.state)))
    weights = dict(tree_flatten(model.parameters()))

    model2 = _model(99)
    model2.update(tree_unflatten(list(weights.items())))
    opt2 = cls(SCHEDULE, weight_decay=0.1, **kwargs)
    opt2.state = tree_unflatten(list(mx.load(path).items()))
    _train(model2, opt2, steps=10)
    assert _same(_params(straight), _params(model2))


def test_8bit_state_with_wrong_block_size_is_refused():
    model = _model()
    opt = Lion8bit(1e-3, min_8bit_size=0, block_size=256)
    _train(model, opt, steps=1)
    other = Lion8bit(1e-3, min_8bit_size=0, block_size=64)
    other.state = opt.state
    with pytest.raises(ValueError, match="block_size"):
        _train(model, other, steps=1)


def test_8bit_state_with_other_block_size_same_scale_count_is_refused(tmp_path):
    # 5000 elements: 3 scales with blocks of 2000 and of 1700; the state records its block size
    rng = np.random.default_rng(0)
    p = {"w": mx.array(rng.standard_normal((50, 100)).astype(np.float32))}
    g = {"w": mx.array(rng.standard_normal((50, 100)).astype(np.float32))}
    opt = Lion8bit(1e-3, block_size=2000)
    opt.apply_gradients(g, p)
    path = str(tmp_path / "s.safetensors")
    mx.save_safetensors(path, dict(tree_flatten(opt.state)))
    assert int(opt.state["w"]["block_size"]) == 2000
    other = Lion8bit(1e-3, block_size=1700)
    other.state = tree_unflatten(list(mx.load(path).items()))
    with pytest.raises(ValueError, match="block_size=2000.*block_size=1700"):
        other.apply_gradients(g, p)
    same = Lion8bit(1e-3, block_size=2000)
    same.state = tree_unflatten(list(mx.load(path).items()))
    same.apply_gradients(g, p)  # its own block size loads
    # a state saved before states recorded their block size (no "block_size" entry) still loads
    # and steps as the same state with it (only its number of scales can be checked)
    old = Lion8bit(1e-3, block_size=2000)
    old.state = tree_unflatten([(k, v) for k, v in mx.load(path).items() if not k.endswith("block_size")])
    assert "block_size" not in old.state["w"]
    fresh = Lion8bit(1e-3, block_size=2000)
    fresh.state = tree_unflatten(list(mx.load(path).items()))
    assert np.array_equal(np.array(old.apply_gradients(g, p)["w"]), np.array(fresh.apply_gradients(g, p)["w"]))
    for key in ("codes", "absmax"):
        assert np.array_equal(np.array(old.state["w"][key]), np.array(fresh.state["w"][key]))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"learning_rate": mx.array(1e-2)},
        {"learning_rate": np.float32(1e-2), "weight_decay": mx.array(0.1)},
        {"learning_rate": 1e-2, "betas": np.array([0.9, 0.99], dtype=np.float32), "weight_decay": np.float32(0.1)},
        {"learning_rate": 1e-2, "betas": [mx.array(0.95), np.float64(0.98)], "weight_decay": np.float64(0.1)},
    ],
    ids=["mx-lr", "np-lr-mx-wd", "np-betas", "mixed-betas"],
)
def test_array_and_numpy_hyperparameters_match_mlx_lion(kwargs):
    ref = _train(_model(), optim.Lion(**kwargs), steps=10)
    ours = _train(_model(), Lion(**kwargs), steps=10)
    assert _same(_params(ref), _params(ours))
    _train(_model(), Lion8bit(**kwargs, block_size=np.int64(128), min_8bit_size=mx.array(0)), steps=2)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"learning_rate": mx.array(-1.0)}, "learning_rate"),
        ({"learning_rate": mx.array([1e-3, 2e-3])}, "learning_rate"),
        ({"learning_rate": 1e-3, "betas": np.array([1.5, 0.9], dtype=np.float32)}, "beta at index 0"),
        ({"learning_rate": 1e-3, "betas": (0.9, np.float32(1.0))}, "beta at index 1"),
        ({"learning_rate": 1e-3, "weight_decay": mx.array(-0.1)}, "weight_decay"),
        ({"learning_rate": 1e-3, "weight_decay": "0.1"}, "weight_decay"),
        ({"learning_rate": 1e-3, "block_size": np.int64(0)}, "block_size"),
        ({"learning_rate": 1e-3, "block_size": 256.0}, "block_size"),
    ],
)
def test_bad_array_and_numpy_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Lion8bit(**kwargs)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"learning_rate": -1.0}, "learning_rate"),
        ({"learning_rate": 1e-3, "betas": (1.0, 0.99)}, "beta at index 0"),
        ({"learning_rate": 1e-3, "betas": (0.9,)}, "betas"),
        ({"learning_rate": 1e-3, "weight_decay": -0.5}, "weight_decay"),
        ({"learning_rate": 1e-3, "block_size": 0}, "block_size"),
        ({"learning_rate": 1e-3, "min_8bit_size": -3}, "min_8bit_size"),
        ({"learning_rate": float("inf")}, "learning_rate"),
        ({"learning_rate": 1e-3, "weight_decay": float("inf")}, "weight_decay"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Lion8bit(**kwargs)


def test_8bit_keeps_float64_parameters_exact():
    # the update of a float64 parameter is computed in float64 by Lion and by Lion8bit (it was
    # rounded to fp32 by Lion8bit: 1 + 1e-12 - 1e-10 came back as 1.0)
    w0 = 1.0 + 1e-12
    out = {}
    for cls in (Lion, Lion8bit):
        params = {"w": mx.full((5000,), w0, dtype=mx.float64, stream=mx.cpu)}
        grads = {"w": mx.ones((5000,), dtype=mx.float64, stream=mx.cpu)}
        with mx.stream(mx.cpu):
            opt = cls(learning_rate=1e-10)
            new = opt.apply_gradients(grads, params)
            mx.eval(new)
        out[cls.__name__] = np.array(new["w"])
    assert out["Lion"].dtype == np.float64
    assert np.array_equal(out["Lion8bit"], out["Lion"])
    assert out["Lion8bit"][0] == w0 - 1e-10


def test_state_of_the_other_kind():
    params = {"w": mx.linspace(-1, 1, 5000)}
    grads = {"w": mx.sin(mx.arange(5000, dtype=mx.float32))}
    # an 8-bit state given to Lion: a clear error, not a bare KeyError 'm'
    o8 = Lion8bit(learning_rate=1e-3)
    o8.init(params)
    lion32 = Lion(learning_rate=1e-3)
    lion32.state = tree_unflatten(list(tree_flatten(o8.state)))
    with pytest.raises(ValueError, match="8-bit state"):
        lion32.apply_gradients(grads, params)
    # a 32-bit state given to Lion8bit: this step starts from the exact momentum and the new
    # momentum is stored in 8 bits (it used to stay fp32, without the memory saving)
    o32 = Lion(learning_rate=1e-3)
    p1 = o32.apply_gradients(grads, params)
    ref = Lion(learning_rate=1e-3)
    ref.state = tree_unflatten(list(tree_flatten(o32.state)))
    want = ref.apply_gradients(grads, p1)
    conv = Lion8bit(learning_rate=1e-3)
    conv.state = tree_unflatten(list(tree_flatten(o32.state)))
    got = conv.apply_gradients(grads, p1)
    mx.eval(got, want)
    assert np.array_equal(np.array(got["w"]), np.array(want["w"]))
    st = conv.state["w"]
    assert sorted(st) == ["absmax", "block_size", "codes"] and st["codes"].dtype == mx.uint8
    codes, absmax = mquant.quantize(ref.state["w"]["m"], 256)
    assert np.array_equal(np.array(st["codes"]), np.array(codes))
    assert np.array_equal(np.array(st["absmax"]), np.array(absmax))


def test_docs_examples_run(capsys):
    import pathlib
    import re

    text = (pathlib.Path(__file__).resolve().parent.parent / "docs" / "mlx.md").read_text()
    ns: dict = {}
    for block in re.findall(r"```python\n(.*?)```", text, flags=re.S):
        exec(compile(block, "docs/mlx.md", "exec"), ns)
    assert ns["loss"].item() < ns["first"]
    assert "uint8" in capsys.readouterr().out
