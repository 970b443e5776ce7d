"""Property-based tests (hypothesis) for the 8-bit quantizer and the Lion step (issue 7).

Example counts are kept small (the suite must stay fast) and the examples fixed
(``derandomize``), so that CI passes or fails the same way every time. To explore instead, set
``LIONKIT_HYPOTHESIS_EXAMPLES`` (e.g. 2000): that many random examples per test; hypothesis' own
database replays failures first on the next run.
"""

from __future__ import annotations

import os
from unittest import mock

import numpy as np
import pytest
import torch

hypothesis = pytest.importorskip("hypothesis", reason="hypothesis not installed (pip install 'lionkit[test]')")
from hypothesis import HealthCheck, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.extra import numpy as hnp  # noqa: E402

import lionkit  # noqa: E402
from lionkit import guards, quant  # noqa: E402

QMAP = quant.dynamic_map()
Q64 = QMAP.double()
ZERO = int((QMAP == 0).nonzero()[0, 0])
_EXPLORE = os.environ.get("LIONKIT_HYPOTHESIS_EXAMPLES")
FAST = settings(
    max_examples=int(_EXPLORE or 40),
    derandomize=_EXPLORE is None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)

F32_MAX = float(np.finfo(np.float32).max)
TINY = float(np.finfo(np.float32).smallest_subnormal)

# values of every scale in one tensor: normal, subnormal, huge, zeros of both signs
any_f32 = st.floats(width=32, allow_nan=False, allow_infinity=False)
MAX_SUB = float(np.nextafter(np.finfo(np.float32).smallest_normal, np.float32(0)))  # largest fp32 subnormal
HUGE = float(np.float32(1e36))
subnormal = st.floats(min_value=-MAX_SUB, max_value=MAX_SUB, width=32)
huge = st.floats(min_value=HUGE, max_value=F32_MAX, width=32) | st.floats(min_value=-F32_MAX, max_value=-HUGE, width=32)
mixed = st.one_of(any_f32, subnormal, huge, st.just(0.0), st.just(-0.0))


def tensors(elements=mixed, max_size=700):
    """1-D fp32 tensors across block boundaries (256) and partial last blocks."""
    return hnp.arrays(np.float32, st.integers(1, max_size), elements=elements).map(torch.from_numpy)


BLOCKS = st.sampled_from([quant.BLOCK_SIZE, None])


def _scales(absmax: torch.Tensor, n: int, block_size) -> torch.Tensor:
    return quant._expand_scale(absmax, n, block_size).double()


# ---------------------------------------------------------------------- quantization
@FAST
@given(x=tensors(), block_size=BLOCKS)
def test_decode_is_within_the_local_spacing_of_the_map(x, block_size):
    codes, absmax = quant.quantize(x, QMAP, block_size)
    y = quant.dequantize(codes, absmax, QMAP, block_size).double()
    scale = _scales(absmax, x.numel(), block_size)
    assert torch.isfinite(y).all()
    r = torch.where(scale > 0, x.double() / scale, torch.zeros_like(scale))  # exact ratio in [-1, 1]
    assert (r.abs() <= 1).all()
    # the map interval [q_i, q_i+1] holding r: nearest rounding errs by at most half its width;
    # next to zero the sign rule may take the far end (one full width)
    i = torch.searchsorted(Q64, r, right=True).clamp(1, 255)
    lo, hi = Q64[i - 1], Q64[i]
    width = hi - lo
    allowed = torch.where((lo == 0) | (hi == 0), width, width / 2)
    # fp32 rounding of the ratio and of the product, and the subnormal grid of the result
    slack = 2.0**-22 * r.abs() * scale + 2.0**-23 * y.abs() + TINY
    err = (y - x.double()).abs()
    assert (err <= allowed * scale + slack).all(), (err - allowed * scale).max()


@FAST
@given(x=tensors(), block_size=BLOCKS)
@example(x=torch.tensor([1.4013e-45, 8.1997e-40]), block_size=256)  # code 128, decoding to 0.0
def test_sign_is_kept(x, block_size):
    codes, absmax = quant.quantize(x, QMAP, block_size)
    y = quant.dequantize(codes, absmax, QMAP, block_size)
    scale = _scales(absmax, x.numel(), block_size)
    # every value whose ratio to its scale is representable in fp32 keeps its sign in its code
    # (a value 2**-149 times below its block's maximum underflows to the zero code)...
    visible = x.double().abs() >= scale * 2.0**-148
    c = codes.long()
    assert torch.equal((c > ZERO)[visible], (x > 0)[visible])
    assert torch.equal((c < ZERO)[visible], (x < 0)[visible])
    # ...and in its decoded value, unless map value x scale is below fp32's range (a subnormal
    # block maximum: the product rounds to zero, as the reference's fp32 multiply does)
    underflow = Q64[c].abs() * scale <= TINY / 2
    assert torch.equal(torch.sign(y)[visible & ~underflow], torch.sign(x)[visible & ~underflow])
    assert (y[underflow] == 0).all()
    assert (y[x == 0] == 0).all()
    assert ((codes == ZERO) == (y == 0))[~underflow].all()


@FAST
@given(x=tensors(max_size=256))
def test_codes_are_monotonic_in_the_value(x):
    xs = x.sort().values
    for block_size in (quant.BLOCK_SIZE, None):
        codes, _ = quant.quantize(xs, QMAP, block_size)  # one block: one scale
        assert (codes[1:].int() >= codes[:-1].int()).all()
    normed = torch.linspace(-1, 1, 4001)
    assert (quant.nearest_code(normed, QMAP)[1:].int() >= quant.nearest_code(normed, QMAP)[:-1].int()).all()


@FAST
@given(x=tensors(), zero_block=st.integers(0, 2), block_size=BLOCKS)
def test_zero_blocks_decode_to_exact_zero(x, zero_block, block_size):
    x = x.clone()
    bs = quant.BLOCK_SIZE
    x[zero_block * bs : (zero_block + 1) * bs] = 0
    codes, absmax = quant.quantize(x, QMAP, block_size)
    y = quant.dequantize(codes, absmax, QMAP, block_size)
    part = slice(zero_block * bs, (zero_block + 1) * bs)
    if block_size is not None and x[part].numel():
        assert absmax[zero_block] == 0
        assert (codes[part] == ZERO).all() and (y[part] == 0).all() and not torch.signbit(y[part]).any()
    if not x.any():
        assert (absmax == 0).all() and (y == 0).all()


@FAST
@given(x=tensors(elements=subnormal, max_size=600), block_size=BLOCKS)
def test_blocks_of_subnormals(x, block_size):
    codes, absmax = quant.quantize(x, QMAP, block_size)
    y = quant.dequantize(codes, absmax, QMAP, block_size)
    assert torch.isfinite(y).all()
    # as exact as the subnormal grid allows: half the map spacing of the block's maximum, or
    # one subnormal step
    scale = _scales(absmax, x.numel(), block_size)
    assert ((y.double() - x.double()).abs() <= scale * 0.5 + 2 * TINY).all()
    nonzero = x != 0
    assert (torch.sign(y)[nonzero] == torch.sign(x)[nonzero]).all() or (absmax < 2**-126).all()


@FAST
@given(x=tensors(elements=huge, max_size=600), block_size=BLOCKS)
def test_huge_values_stay_finite(x, block_size):
    codes, absmax = quant.quantize(x, QMAP, block_size)
    y = quant.dequantize(codes, absmax, QMAP, block_size)
    assert torch.isfinite(absmax).all() and torch.isfinite(y).all()
    assert (y.abs() <= absmax.max()).all()
    assert torch.equal(torch.sign(y), torch.sign(x))


@FAST
@given(
    x=tensors(elements=any_f32, max_size=700),
    where=st.lists(st.integers(0, 699), min_size=1, max_size=4),
    bad=st.sampled_from([float("nan"), float("inf"), float("-inf")]),
    block_size=BLOCKS,
)
def test_nonfinite_state_poisons_exactly_its_block(x, where, bad, block_size):
    # The policy for NaN/inf in a state being quantized (only reachable with
    # nonfinite="propagate" or a loaded NaN state): its whole block decodes to NaN, never to a
    # made-up finite value or a flipped sign; other blocks are quantized as if it were not there.
    x = x.clone()
    where = sorted({w % x.numel() for w in where})
    x[where] = bad
    codes, absmax = quant.quantize(x, QMAP, block_size)
    y = quant.dequantize(codes, absmax, QMAP, block_size)
    if block_size is None:
        assert torch.isnan(y).all()
        return
    bs = block_size
    poisoned = {w // bs for w in where}
    for b in range(quant.num_blocks(x.numel(), bs)):
        part = slice(b * bs, (b + 1) * bs)
        if b in poisoned:
            assert torch.isnan(absmax[b]) and torch.isnan(y[part]).all()
        else:
            c, a = quant.quantize(x[part], QMAP, bs)
            assert torch.equal(codes[part], c) and torch.equal(absmax[b : b + 1], a)


# ---------------------------------------------------------------------- non-finite detection
@FAST
@given(
    sizes=st.lists(st.integers(0, 300), min_size=1, max_size=5),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.complex64]),
    hits=st.lists(st.tuples(st.integers(0, 4), st.integers(0, 299), st.sampled_from(["nan", "inf", "-inf"])),
                  max_size=4),
    seed=st.integers(0, 2**16),
    transposed=st.booleans(),
    path=st.sampled_from(["torch", "compiled"]),
)
def test_nonfinite_detection_matches_isfinite(sizes, dtype, hits, seed, transposed, path):
    gen = torch.Generator().manual_seed(seed)
    # transposed: non-contiguous gradients, which take the torch path even when the kernel is there
    shape = (lambda n: (2, n)) if transposed else (lambda n: (n,))
    grads = [(torch.randn(shape(n), generator=gen, dtype=torch.float64) * 1e3).to(dtype) for n in sizes]
    grads = [g.t() for g in grads] if transposed else grads
    for t, i, v in hits:
        if t < len(grads) and grads[t].numel():
            g = grads[t]
            g[(i % g.shape[0],) + ((i // g.shape[0]) % 2,) * (g.dim() - 1)] = float(v)
    expected = [k for k, g in enumerate(grads) if not torch.isfinite(guards.as_real(g)).all()]
    # both implementations of the CPU check: aminmax per tensor, and the C++ kernel's
    with mock.patch.object(guards, "_cpu_all_finite", _compiled_all_finite if path == "compiled" else lambda: None):
        assert guards.nonfinite_params(grads) == expected


def _compiled_all_finite():
    try:
        from lionkit.kernels import compiled
    except ImportError:
        return None
    return compiled.all_finite if compiled.available() else None


# ---------------------------------------------------------------------- the step
OPTIMIZERS = {
    "lion32": lambda ps, **kw: lionkit.Lion(ps, **kw),
    "lion8-block": lambda ps, **kw: lionkit.Lion8bit(ps, min_8bit_size=0, **kw),
    "lion8-tensor": lambda ps, **kw: lionkit.Lion8bit(ps, min_8bit_size=0, block_wise=False, **kw),
    "lion4": lambda ps, **kw: lionkit.Lion4bit(ps, min_8bit_size=0, **kw),
}

step_case = dict(
    variant=st.sampled_from(sorted(OPTIMIZERS)),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    n=st.integers(1, 600),
    lr=st.floats(1e-6, 0.5),
    wd=st.sampled_from([0.0, 1e-3, 0.1, 1.0]),
    seed=st.integers(0, 2**16),
)


def _ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of ``dtype`` at |x| (float64), at least the smallest subnormal step."""
    fi = torch.finfo(dtype)
    exp = torch.floor(torch.log2(x.abs().clamp(min=fi.smallest_normal)))
    return torch.maximum(2.0**exp * fi.eps, torch.tensor(fi.smallest_normal * fi.eps, dtype=torch.float64))


@FAST
@given(**step_case)
def test_step_moves_each_element_by_at_most_lr_times_one_plus_wd_p(variant, dtype, n, lr, wd, seed):
    gen = torch.Generator().manual_seed(seed)
    p = torch.nn.Parameter((torch.randn(n, generator=gen) * 3).to(dtype))
    opt = OPTIMIZERS[variant]([p], lr=lr, weight_decay=wd)
    for _ in range(2):  # the second step starts from a nonzero momentum
        before = p.detach().double().clone()
        p.grad = (torch.randn(n, generator=gen) * 10 ** torch.randint(-3, 3, (1,), generator=gen)).to(dtype)
        opt.step()
        delta = (p.detach().double() - before).abs()
        bound = lr * (1 + wd * before.abs())
        # the exact update is within the bound; rounding to p's dtype adds at most half an ulp
        # of the result (and the fp32 arithmetic a few fp32 ulps)
        slack = _ulp(p.detach().double(), dtype) / 2 + 4 * _ulp(before.abs() + lr, torch.float32)
        assert (delta <= bound + slack).all(), (delta - bound - slack).max()


@FAST
@given(**step_case, zero_frac=st.floats(0.0, 1.0))
def test_zero_gradient_and_zero_momentum_move_only_by_weight_decay(variant, dtype, n, lr, wd, seed, zero_frac):
    gen = torch.Generator().manual_seed(seed)
    p = torch.nn.Parameter((torch.randn(n, generator=gen) * 3).to(dtype))
    opt = OPTIMIZERS[variant]([p], lr=lr, weight_decay=wd)
    g = torch.randn(n, generator=gen).to(dtype)
    zero = torch.rand(n, generator=gen) < zero_frac
    g[zero] = 0
    p.grad = g
    before = p.detach().clone()
    opt.step()  # momentum starts at zero: where g == 0 the direction is sign(0) = 0
    after = p.detach()
    if wd == 0:
        assert torch.equal(after[zero], before[zero])
    else:
        decayed = before[zero].double() * (1 - lr * wd)
        tol = _ulp(decayed, dtype) / 2 + 2 * _ulp(before[zero].double(), torch.float32)
        assert ((after[zero].double() - decayed).abs() <= tol).all()
    m = opt.momentum(opt.state[p], p)
    m = m.dequantize() if isinstance(m, lionkit.QuantizedState) else m
    assert (m[zero] == 0).all()
    # elements with a gradient moved by exactly lr (before rounding) in the gradient's direction
    moved = ~zero
    expected = before[moved].double() * (1 - lr * wd) - lr * torch.sign(g[moved].double())
    tol = _ulp(expected, dtype) / 2 + 4 * _ulp(before[moved].double().abs() + lr, torch.float32)
    assert ((after[moved].double() - expected).abs() <= tol).all()


@FAST
@given(
    variant=st.sampled_from(sorted(OPTIMIZERS)),
    bad_param=st.integers(0, 2),
    bad_index=st.integers(0, 10**6),
    bad=st.sampled_from([float("nan"), float("inf"), float("-inf")]),
    seed=st.integers(0, 2**16),
)
def test_skip_policy_never_writes(variant, bad_param, bad_index, bad, seed):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in (5, 300, 1000)]
    opt = OPTIMIZERS[variant](params, lr=1e-2, nonfinite="skip", percentile_clipping=50)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    opt.step()
    copies = [p.detach().clone() for p in params]
    state = [{k: v.clone() if torch.is_tensor(v) else v for k, v in opt.state[p].items()} for p in params]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    params[bad_param].grad[bad_index % params[bad_param].numel()] = bad
    opt.step()
    assert opt.skipped_steps == 1
    for p, c, s in zip(params, copies, state):
        assert torch.equal(p.detach(), c)
        for k, v in s.items():
            assert torch.equal(opt.state[p][k], v) if torch.is_tensor(v) else opt.state[p][k] == v
