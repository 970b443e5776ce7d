"""lionkit.jax.braintools: bit-exact against braintools.optim.Lion (with an LRScheduler, weight
decay and both clippings) under brainstate's jit, one compilation, 8-bit state and interop.

braintools 0.4 needs Python >= 3.12. Run these in such an environment without torch, e.g.
``python -m pytest --noconftest tests/test_braintools.py`` (the shared conftest imports torch).
"""

from __future__ import annotations

import numpy as np
import pytest

braintools = pytest.importorskip(
    "braintools", reason="braintools not installed (Python >= 3.12: pip install 'lionkit[braintools]')"
)
brainstate = pytest.importorskip("brainstate", reason="brainstate not installed (pip install 'lionkit[braintools]')")
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from lionkit import interop  # noqa: E402
from lionkit.jax.braintools import Lion, Lion8bit  # noqa: E402

STEPS = 25


class _Net(brainstate.nn.Module):
    def __init__(self):
        super().__init__()
        self.l1 = brainstate.nn.Linear(16, 80)
        self.l2 = brainstate.nn.Linear(80, 4)

    def __call__(self, x):
        return self.l2(jnp.tanh(self.l1(x)))


def _leaves(weights) -> list[np.ndarray]:
    states = jax.tree.leaves(weights, is_leaf=lambda x: isinstance(x, brainstate.State))
    return [np.asarray(a) for s in states for a in jax.tree.leaves(s.value)]


def _train(make_opt, steps=STEPS):
    """Train a small MLP under brainstate's jit with a StepLR schedule stepped every step."""
    brainstate.random.seed(0)
    net = _Net()
    x = jax.random.normal(jax.random.PRNGKey(1), (64, 16))
    y = jnp.sin(jax.random.normal(jax.random.PRNGKey(2), (64, 4)))
    sched = braintools.optim.StepLR(base_lr=1e-2, step_size=5, gamma=0.5)
    opt = make_opt(sched)
    weights = net.states(brainstate.ParamState)
    opt.register_trainable_weights(weights)
    traces = []

    def loss():
        return jnp.mean((net(x) - y) ** 2)

    @brainstate.transform.jit
    def train_step():
        traces.append(1)  # runs only while tracing
        grads = brainstate.transform.grad(loss, weights)()
        opt.step(grads)
        return loss()

    first = float(loss())
    for _ in range(steps):
        train_step()
        sched.step()
    return _leaves(weights), len(traces), opt, first, float(loss())


@pytest.mark.parametrize(
    "kwargs",
    [dict(), dict(weight_decay=0.1), dict(weight_decay=0.1, grad_clip_norm=0.5, grad_clip_value=0.02)],
    ids=["plain", "wd", "wd-clip"],
)
def test_matches_braintools_lion_bitwise(kwargs):
    ref, _, _, l0, _ = _train(lambda s: braintools.optim.Lion(lr=s, **kwargs))
    ours, traces, opt, _, l1 = _train(lambda s: Lion(lr=s, **kwargs))
    assert len(ref) == len(ours) == 4
    assert all(np.array_equal(a, b) for a, b in zip(ref, ours))
    assert traces == 1  # one compilation for all steps, schedule included
    assert l1 < l0


def test_8bit_trains_close_to_32bit_and_exports():
    p32, _, _, l0, l32 = _train(lambda s: Lion(lr=s, weight_decay=0.1))
    p8, traces, opt, _, l8 = _train(lambda s: Lion8bit(lr=s, weight_decay=0.1, min_8bit_size=1000))
    assert traces == 1
    assert l8 < 0.8 * l0 and abs(l8 - l32) < 0.1 * l0
    states = interop.from_jax(opt.opt_state.value)
    assert sum(st.is_8bit for st in states) == 1  # only the 16x80 weight (1280 >= 1000 elements)
    assert all(st.step == STEPS for st in states)
    # and back in: a fresh optimizer resumes from the exported state
    fresh = Lion8bit(lr=1e-3, weight_decay=0.1, min_8bit_size=1000)
    net = _Net()
    fresh.register_trainable_weights(net.states(brainstate.ParamState))
    fresh.opt_state.value = interop.to_jax(states, fresh.opt_state.value)
    again = interop.from_jax(fresh.opt_state.value)
    for a, b in zip(states, again):
        if a.is_8bit:
            assert np.array_equal(a.codes, b.codes) and np.array_equal(a.absmax, b.absmax)
        else:
            assert np.array_equal(a.momentum, b.momentum)


def test_bad_arguments():
    with pytest.raises(ValueError, match="state_bits"):
        Lion(state_bits=4)
    with pytest.raises(ValueError, match="betas"):
        Lion(betas=(0.9, 1.5))
    with pytest.raises(ValueError, match="weight_decay"):
        Lion(weight_decay=-1.0)
    # numpy numbers are checked like Python ones (np.float32(1.5) used to pass)
    with pytest.raises(ValueError, match="betas"):
        Lion(betas=(np.float32(1.5), 0.99))
    with pytest.raises(ValueError, match="block_size"):
        Lion8bit(block_size=np.int64(0))
    assert Lion8bit(betas=np.float32([0.9, 0.99]), block_size=np.int64(128)).block_size == 128
    # braintools itself compares with < 0 only: NaN and inf passed and spoiled the weights
    # (weight_decay=nan was even dropped silently)
    nan, inf = float("nan"), float("inf")
    for kw, name in [
        ({"lr": nan}, "lr"), ({"lr": inf}, "lr"), ({"weight_decay": nan}, "weight_decay"),
        ({"weight_decay": inf}, "weight_decay"), ({"grad_clip_norm": nan}, "grad_clip_norm"),
        ({"grad_clip_value": nan}, "grad_clip_value"),
    ]:
        with pytest.raises(ValueError, match=name):
            Lion(**kw)
    Lion(grad_clip_norm=inf, grad_clip_value=inf)  # no clipping: allowed, as in lionkit.Lion


def test_docs_examples_run():
    import pathlib
    import re

    text = (pathlib.Path(__file__).resolve().parent.parent / "docs" / "braintools.md").read_text()
    ns: dict = {}
    for block in re.findall(r"```python\n(.*?)```", text, flags=re.S):
        exec(compile(block, "docs/braintools.md", "exec"), ns)
    assert float(ns["loss"]) < ns["first"]
