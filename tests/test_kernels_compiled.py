"""The fused CPU backend (kernels/compiled.py + lion_cpu.cpp) equals the reference bit for bit:
parameters and every state tensor, against TorchBackend and against reference.py run in fp32.

Both builds are covered: the AVX-512 one (where the CPU has it) and the portable scalar one
(LIONKIT_CPU_ISA=scalar), which is what machines without AVX-512 run.
"""

from __future__ import annotations

import math
import tracemalloc

import pytest
import torch

from kernel_cases import DTYPES, HYPERS, assert_same, clone_mom, make_case, run_multi, run_pair, run_subnormal_case
from lionkit import Lion, Lion8bit, kernels, quant, quant4, quant_fast, reference, rounding
from lionkit.kernels import compiled
from lionkit.kernels.base import StepHyper
from lionkit.kernels.torch_eager import TorchBackend
from lionkit.qstate import QuantizedState

try:
    compiled.load(False)
    BUILD_ERROR = None
except compiled.BuildError as e:  # no compiler on this machine
    BUILD_ERROR = str(e).splitlines()[0]
pytestmark = pytest.mark.skipif(BUILD_ERROR is not None, reason=f"CPU kernel cannot be built here: {BUILD_ERROR}")

QMAP = quant.dynamic_map()
# (bits, block_wise): fp32, 8-bit per block, per tensor, 4-bit (blocks of 32)
KINDS = [(32, True), (8, True), (8, False), (4, True)]
KIND_IDS = ["32bit", "8bit-block", "8bit-tensor", "4bit"]


@pytest.fixture(scope="module")
def native():
    return compiled.CompiledBackend(scalar=False)


@pytest.fixture(scope="module")
def portable():
    """The build machines without AVX-512 run (plain C++ loops)."""
    return compiled.CompiledBackend(scalar=True)


@pytest.fixture(scope="module", params=[False, True], ids=["native", "scalar"])
def backend(request):
    return compiled.CompiledBackend(scalar=request.param)


@pytest.mark.parametrize("hyper", list(HYPERS), ids=list(HYPERS))
@pytest.mark.parametrize("shape", [(1,), (4097,), (33, 1025)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("bits,block_wise", KINDS, ids=KIND_IDS)
def test_equals_torch_backend(native, bits, block_wise, dtype, shape, hyper):
    run_pair(native, shape, dtype, bits, block_wise, HYPERS[hyper], steps=2)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("bits,block_wise", KINDS, ids=KIND_IDS)
def test_portable_build_equals_torch_backend(portable, bits, block_wise, dtype):
    for hyper in ("plain", "all"):
        run_pair(portable, (4097,), dtype, bits, block_wise, HYPERS[hyper], steps=2)


@pytest.mark.parametrize(
    "bits,block_wise,dtype",
    [(32, True, torch.float32), (32, True, torch.bfloat16), (8, True, torch.float32), (8, True, torch.float16),
     (8, False, torch.bfloat16), (4, True, torch.bfloat16)],
    ids=["32bit-f32", "32bit-bf16", "8bit-block-f32", "8bit-block-f16", "8bit-tensor-bf16", "4bit-bf16"],
)
def test_large_odd_shape(native, bits, block_wise, dtype):
    # 1024 x 1023: many chunks per tensor (per-tensor scales reduced across them), a partial block
    run_pair(native, (1024, 1023), dtype, bits, block_wise, HYPERS["all"], steps=1)


@pytest.mark.parametrize("grad_dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_gradient_dtype_differs_from_parameter(native, dtype, grad_dtype):
    for bits in (32, 8, 4):
        run_pair(native, (777,), dtype, bits, True, HYPERS["scale_clip"], steps=2, grad_dtype=grad_dtype)


def test_many_tensors_in_one_call(backend):
    run_multi(backend)


@pytest.mark.parametrize("hyper", list(HYPERS), ids=list(HYPERS))
@pytest.mark.parametrize("bits", [32, 8, 4])
def test_equals_fp32_reference(native, bits, hyper):
    # reference.py, the paper's equations, run in fp32: the same numbers bit for bit
    p, g, m = make_case((3000,), torch.float32, bits, True, seed=5)
    hp = HYPERS[hyper]
    kw = {k: v for k, v in hp.items() if k != "mseed"}  # the reference's arguments
    if bits == 32:
        want_p, want_m = reference.lion_reference(p, g, m, **kw)
        native.step_many([p], [g], [m], [StepHyper(**hp)])
        assert_same(want_p, p, want_m, m, "32-bit vs reference")
    elif bits == 4:
        u = quant4.uniform(hp["mseed"], 0, p.numel())
        want_p, want_codes, want_absmax = reference.lion_reference_4bit(p, g, m.codes, m.absmax, m.qmap, u, **kw)
        native.step_many([p], [g], [m], [StepHyper(**hp)])
        want = QuantizedState(want_codes, want_absmax, m.qmap, 32, 4, p.numel())
        assert_same(want_p, p, want, m, "4-bit vs reference")
    else:
        want_p, want_codes, want_absmax = reference.lion_reference_8bit(
            p, g, m.codes, m.absmax, m.qmap, m.block_size, **kw
        )
        native.step_many([p], [g], [m], [StepHyper(**hp)])
        assert_same(want_p, p, QuantizedState(want_codes, want_absmax, QMAP), m, "8-bit vs reference")


@pytest.mark.parametrize("bits,block_wise", KINDS, ids=KIND_IDS)
def test_non_finite_values_follow_the_reference(native, bits, block_wise):
    p, g, m = make_case((1000,), torch.float32, bits, block_wise, seed=3)
    g[5] = float("nan")
    g[300] = float("inf")
    g[600] = -float("inf")
    p_ref, m_ref = p.clone(), clone_mom(m)
    hp = StepHyper(**HYPERS["plain"])
    TorchBackend().step_many([p_ref], [g], [m_ref], [hp])
    native.step_many([p], [g], [m], [hp])
    assert_same(p_ref, p, m_ref, m, "non-finite gradients")


@pytest.mark.parametrize("lr", [3e-3, 2.0**-130], ids=["lr", "subnormal_lr"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("bits,block_wise", KINDS, ids=KIND_IDS)
def test_subnormal_parameters_follow_the_reference(backend, bits, block_wise, dtype, lr):
    """Parameters decayed into the subnormal range stay subnormal as in the reference: the
    AVX-512 bf16 conversion instruction flushes them to zero, the kernel must not."""
    run_subnormal_case(backend, bits, block_wise, dtype, lr)


def test_quantizer_near_thresholds_and_strided(backend):
    scalar = backend._scalar
    x = quant_fast.near_thresholds(QMAP)
    assert torch.equal(compiled.quantize(x, QMAP, scalar=scalar), quant.nearest_code(x, QMAP))
    n = quant_fast.check_exhaustive(lambda v: compiled.quantize(v, QMAP, scalar=scalar), QMAP, stride=1021)
    assert n > 2_000_000


@pytest.mark.parametrize("scale", [1.0, 3.0, 7.1e-5, 1e30, 2.0**-120])
def test_normalisation_and_quantizer_near_thresholds(backend, scale):
    # what the step quantizes is m / absmax (an IEEE division): values whose quotient lands on
    # or next to a threshold, for scales of every size
    scalar = backend._scalar
    t = quant_fast.near_thresholds(QMAP, ulps=4)
    x = (t.to(torch.float64) * scale).to(torch.float32)
    x = x.clamp(-scale, scale)
    want = quant.nearest_code(x / torch.tensor(scale, dtype=torch.float32), QMAP)
    assert torch.equal(compiled.quantize(x, QMAP, scalar=scalar, scale=scale), want)


@pytest.mark.parametrize("scale", [0.3, 1.7e-9, 2.0**-40, 2.0**-40 * 0.99, 3e9, 2.0**40, 2.0**40 * 1.01, 3e20])
def test_normalisation_of_every_magnitude(backend, scale):
    # the normalisation before the quantizer is an IEEE division in every build: random values
    # and quotients of every size down to subnormal and zero, for scales small and large
    scalar = backend._scalar
    gen = torch.Generator().manual_seed(int(abs(math.log2(scale)) * 1000))
    n = 1 << 16
    mant = 1 + torch.rand(n, generator=gen, dtype=torch.float64)
    expo = -torch.randint(0, 170, (n,), generator=gen).to(torch.float64)
    sign = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0).to(torch.float64)
    x = (sign * mant * torch.exp2(expo) * scale / 2).to(torch.float32)
    x[:64] = 0.0
    x[64:128] = -0.0
    x[128:192] = torch.tensor(scale, dtype=torch.float32)
    x[192:256] = torch.finfo(torch.float32).smallest_normal * torch.rand(64, generator=gen)  # subnormals
    # quotients next to 2^-150, where the division's result turns from 0 to the smallest subnormal
    k = torch.arange(-128, 128, dtype=torch.float64)
    x[256:512] = (scale * 2.0**-150 * (1 + k * 2.0**-21)).to(torch.float32)
    x = x.clamp(-scale, scale)
    want = quant.nearest_code(x / torch.tensor(scale, dtype=torch.float32), QMAP)
    assert torch.equal(compiled.quantize(x, QMAP, scalar=scalar, scale=scale), want)


def test_step_allocates_nothing_in_proportion_to_the_tensor(native):
    # Python/numpy side of a step: a few arrays per tensor, whatever its size. (The C++ side
    # allocates one entry per 32K-element chunk and a 1 KiB stack buffer per thread.)
    p, g, m = make_case((1 << 22,), torch.float32, 8, True)
    hp = StepHyper(**HYPERS["all"])
    native.step_many([p], [g], [m], [hp])
    tracemalloc.start()
    native.step_many([p], [g], [m], [hp])
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 64 * 1024, peak


def test_unsupported_tensors_fall_back_to_torch(native):
    # a float64 parameter, and a map without a bucket table: TorchBackend handles them
    p = torch.randn(64, 64, dtype=torch.float64)
    g = torch.randn(64, 64, dtype=torch.float64)
    m = torch.randn(64, 64) * 1e-2
    odd_map = quant.dynamic_map()
    odd_map[200] = torch.nextafter(odd_map[201], torch.tensor(0.0))
    odd_map[202] = torch.nextafter(odd_map[201], torch.tensor(1.0))
    p2, g2, q2 = make_case((5000,), torch.float32, 8, True)
    q2 = QuantizedState.from_float(q2.dequantize(), quant.BLOCK_SIZE, odd_map)
    assert not native.supports(p, m) and not native.supports(p2, q2)
    refs = [(p.clone(), clone_mom(m)), (p2.clone(), clone_mom(q2))]
    hp = StepHyper(**HYPERS["wd"])
    TorchBackend().step_many([refs[0][0], refs[1][0]], [g, g2], [refs[0][1], refs[1][1]], [hp, hp])
    native.step_many([p, p2], [g, g2], [m, q2], [hp, hp])
    assert_same(refs[0][0], p, refs[0][1], m, "float64")
    assert_same(refs[1][0], p2, refs[1][1], q2, "custom map")


@pytest.mark.parametrize("cls,kw", [(Lion, {}), (Lion8bit, {"min_8bit_size": 16}), (Lion8bit, {"block_wise": False})])
def test_optimizer_uses_and_reports_it(cls, kw):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(40, 300), torch.nn.Tanh(), torch.nn.Linear(300, 7))
    clone = torch.nn.Sequential(torch.nn.Linear(40, 300), torch.nn.Tanh(), torch.nn.Linear(300, 7))
    clone.load_state_dict(model.state_dict())
    fast = cls(model.parameters(), lr=1e-3, weight_decay=0.1, backend="compiled", **kw)
    slow = cls(clone.parameters(), lr=1e-3, weight_decay=0.1, backend="torch", **kw)
    x = torch.randn(64, 40)
    for _ in range(3):
        fast.zero_grad()
        slow.zero_grad()
        model(x).square().mean().backward()
        # the same gradients for both (two backward passes of identical models can differ in
        # the last bits: torch's matmul depends on memory alignment)
        for a, b in zip(model.parameters(), clone.parameters()):
            b.grad = a.grad.clone()
        fast.step()
        slow.step()
    assert fast.backends_used == {"cpu": "compiled"} and slow.backends_used == {"cpu": "torch"}
    for a, b in zip(model.parameters(), clone.parameters()):
        assert torch.equal(a, b)
        for key, value in slow.state[b].items():
            other = fast.state[a][key]
            assert torch.equal(torch.as_tensor(other), torch.as_tensor(value)), key


def test_auto_picks_it_on_cpu():
    assert kernels.resolve("auto", torch.device("cpu")).name == "compiled"
    assert kernels.resolve("compiled", torch.device("cpu")).name == "compiled"
    with pytest.raises(ValueError, match="cpu"):
        kernels.resolve("compiled", torch.device("meta"))


def test_build_cache_is_reused(monkeypatch):
    path = compiled._build(scalar=False)  # built when this module was imported
    assert path.exists() and path.parent == compiled.cache_dir()
    mtime = path.stat().st_mtime_ns

    real_popen = compiled.subprocess.Popen
    compiles = []

    def watch(cmd, *args, **kwargs):
        if "-c" in cmd:  # a compilation, as opposed to `c++ --version` (part of the cache key)
            compiles.append(cmd)
        return real_popen(cmd, *args, **kwargs)

    monkeypatch.setattr(compiled.subprocess, "Popen", watch)
    assert compiled._build(scalar=False) == path and path.stat().st_mtime_ns == mtime
    assert compiles == []


def test_build_error_names_the_compiler_output(tmp_path, monkeypatch):
    monkeypatch.setenv("LIONKIT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(compiled, "SOURCE", tmp_path / "broken.cpp")
    (tmp_path / "broken.cpp").write_text("this is not C++\n")
    with pytest.raises(compiled.BuildError, match="broken.cpp"):
        compiled._build(scalar=False)


def test_all_finite_matches_torch():
    gen = torch.Generator().manual_seed(0)
    tensors = []
    for dtype in DTYPES:
        for n, bad_at, value in [(1, None, 0), (7, 6, float("inf")), (40000, 39999, float("nan")),
                                 (70000, 33000, -float("inf")), (5000, None, 0), (0, None, 0)]:
            t = torch.randn(n, generator=gen).to(dtype)
            if bad_at is not None:
                t[bad_at] = value
            tensors.append(t)
    tensors.append(torch.tensor([torch.finfo(torch.float16).max], dtype=torch.float16))  # finite, exponent not all ones
    want = [bool(torch.isfinite(t).all()) for t in tensors]
    assert compiled.all_finite(tensors) == want
    with pytest.raises(ValueError, match="contiguous"):
        compiled.all_finite([torch.zeros(4, 4).t()])


def test_normalisation_at_the_underflow_tie(backend):
    # x = scale * 2^-150 exactly: x / scale is the tie between 0 (zero code) and the smallest
    # subnormal (smallest code of its sign); a reciprocal multiply (x * (1 / scale)) gets it
    # wrong for some of these scales, so this pins the kernel to a true division
    scalar = backend._scalar
    gen = torch.Generator().manual_seed(5)
    for scale in (2.0 ** (24 + 16 * torch.rand(300, generator=gen, dtype=torch.float64))).to(torch.float32).tolist():
        x = (torch.tensor([scale], dtype=torch.float64) * 2.0**-150 * torch.tensor([1.0, -1.0, 1 + 2**-23, 1 - 2**-24])).to(torch.float32)
        x = torch.cat([x, torch.tensor([scale], dtype=torch.float32)])
        want = quant.nearest_code(x / torch.tensor(scale, dtype=torch.float32), QMAP)
        assert torch.equal(compiled.quantize(x, QMAP, scalar=scalar, scale=scale), want), scale


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d)[6:])
def test_map_not_symmetric_equals_torch_backend(backend, dtype):
    # the AVX-512 kernel decodes the (symmetric) dynamic map from 128 magnitudes; any other map
    # with a bucket table takes its general lookup, and must give the same results
    qmap = quant.dynamic_map().clone()
    qmap[27] = (qmap[26] + 3 * qmap[27]) / 4  # a common code (|value| ~ 0.56) moved by a quarter step
    assert quant_fast.kernel_constants(qmap)[quant_fast.HDR_SYM] == 0
    gen = torch.Generator().manual_seed(5)
    p = torch.randn(4097, generator=gen).to(dtype)
    g = (torch.randn(4097, generator=gen) * 1e-2).to(dtype)
    m = QuantizedState.from_float(torch.randn(4097, generator=gen) * 1e-2, quant.BLOCK_SIZE, qmap)
    p_ref, m_ref = p.clone(), clone_mom(m)
    hp = StepHyper(**HYPERS["wd"])
    for k in range(3):
        TorchBackend().step_many([p_ref], [g], [m_ref], [hp])
        backend.step_many([p], [g], [m], [hp])
        assert_same(p_ref, p, m_ref, m, f"step {k + 1}")
    assert backend.supports(p, m)


# ------------------------------------------------------------------ stochastic rounding (bf16)
SR_HYPER = dict(lr=1e-3, beta1=0.9, beta2=0.99, weight_decay=0.1, stochastic_rounding=True, seed=2**62 + 12345,
                mseed=99)


@pytest.mark.parametrize("grad_dtype", [torch.bfloat16, torch.float32], ids=["g_bf16", "g_fp32"])
@pytest.mark.parametrize("bits,block_wise", KINDS, ids=KIND_IDS)
def test_stochastic_rounding_equals_torch_backend(backend, bits, block_wise, grad_dtype):
    # the kernel rounds a bf16 parameter stochastically with rounding.counter_hash's numbers:
    # the same bits as TorchBackend, over sizes across blocks and 32K-element chunks
    for shape in [(1,), (4097,), (70001,)]:
        run_pair(backend, shape, torch.bfloat16, bits, block_wise, SR_HYPER, steps=2, grad_dtype=grad_dtype)
    # and it is not rounding to nearest in disguise: the same step without SR ends elsewhere
    p, g, m = make_case((4097,), torch.bfloat16, bits, block_wise)
    p_sr, m_sr = p.clone(), clone_mom(m)
    backend.step_many([p_sr], [g], [m_sr], [StepHyper(**SR_HYPER)])
    backend.step_many([p], [g], [m], [StepHyper(**{**SR_HYPER, "stochastic_rounding": False})])
    assert not torch.equal(p_sr, p)


@pytest.mark.parametrize("scalar", [False, True], ids=["native", "scalar"])
def test_stochastic_rounding_store_at_any_index(scalar):
    # the vector store hashes element indices itself: starts around 2**32 (where the index's
    # high half joins the hash, and 16 lanes can straddle it) and beyond
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(53, generator=gen) * torch.logspace(-30, 30, 53)
    x[[3, 9, 17, 30]] = torch.tensor([float("nan"), float("inf"), -float("inf"), 3.3895e38])
    x[40] = torch.tensor(0.5, dtype=torch.bfloat16).float()  # exact in bf16
    for start in (0, 7, 2**32 - 9, 2**32 + 3, 2**40 + 1):
        for key in (0, 0x89ABCDEF):
            want = rounding.stochastic_round_keyed(x, torch.bfloat16, key, start)
            got = compiled.round_bf16_sr(x, key, start, scalar=scalar)
            nan = want.isnan()
            assert torch.equal(got.isnan(), nan), (start, key)  # NaN payloads aside
            assert torch.equal(got[~nan].view(torch.int16), want[~nan].view(torch.int16)), (start, key)
