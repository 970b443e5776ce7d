"""The Triton backend (kernels/triton_lion.py) equals the reference bit for bit.

No GPU here: the kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1, set by this
module's fixture before the kernels are defined) on small shapes, with small tiles so that the
loops, masks and multi-tensor tables are all exercised. On a CUDA machine the same tests run
the compiled kernels on the GPU as well.
"""

from __future__ import annotations

import os

import pytest
import torch

# Before triton is first imported: its library functions are defined for the interpreter then.
_OLD_INTERPRET = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton", reason="triton not installed (pip install 'lionkit[triton]')")

from kernel_cases import DTYPES, HYPERS, clone_mom, make_case, run_multi, run_pair, run_subnormal_case  # noqa: E402
from lionkit.kernels.base import StepHyper  # noqa: E402
from lionkit import kernels, quant, quant_fast  # noqa: E402
from lionkit.kernels import triton_lion  # noqa: E402

try:
    triton_lion.import_triton()
except ImportError as _e:  # a triton older than the kernels are tested with
    pytest.skip(str(_e), allow_module_level=True)


def _interpreter_fault() -> str | None:
    """Why Triton's interpreter cannot run a loop whose bounds are loaded from memory (as the
    kernels' reductions do), or None. Seen with triton 3.2-3.5 and numpy 2.4, which no longer
    turns a 1-element array into a Python int; the compiled GPU kernels are not affected."""
    import triton
    import triton.language as tl

    @triton.jit
    def probe(X, OUT):
        acc = 0.0
        for _ in range(tl.load(X), tl.load(X + 1)):
            acc += 1.0
        tl.store(OUT, acc)

    out = torch.zeros(1)
    try:
        probe[(1,)](torch.tensor([1, 3], dtype=torch.int32), out)
    except Exception as e:  # InterpreterError wrapping numpy's TypeError; anything else is raised
        if "0-dimensional arrays can be converted to Python scalars" not in str(e):
            raise
        return f"{type(e).__name__}: {e}"
    return None if out.item() == 2.0 else f"the probe loop ran {out.item()} times, not 2"


_fault = _interpreter_fault()
if _fault is not None:
    import numpy as _np
    import triton as _triton

    pytest.skip(
        f"triton {_triton.__version__}'s CPU interpreter cannot run these kernels with numpy {_np.__version__} "
        f"({_fault}); a newer triton (3.9 does) or numpy < 2.4 can",
        allow_module_level=True,
    )

QMAP = quant.dynamic_map()
KINDS = [(32, True), (8, True), (8, False)]
KIND_IDS = ["32bit", "8bit-block", "8bit-tensor"]


@pytest.fixture(scope="module", autouse=True)
def _interpreter():
    os.environ["TRITON_INTERPRET"] = "1"
    yield
    if _OLD_INTERPRET is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = _OLD_INTERPRET


@pytest.fixture(scope="module")
def backend(_interpreter):
    # tiles: 32-bit programs of 2 x 128 elements, 8-bit programs of 2 x 2 blocks of 256
    return triton_lion.TritonBackend(allow_cpu=True, block=128, iters=2, rows=2, rows_iters=2)


@pytest.mark.parametrize("hyper", ["plain", "all"])
@pytest.mark.parametrize("shape", [(1,), (1031,), (3, 257)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("bits,block_wise", KINDS, ids=KIND_IDS)
def test_equals_torch_backend(backend, bits, block_wise, dtype, shape, hyper):
    run_pair(backend, shape, dtype, bits, block_wise, HYPERS[hyper], steps=2)


@pytest.mark.parametrize("hyper", ["wd", "scale_clip"])
@pytest.mark.parametrize("bits,block_wise", KINDS, ids=KIND_IDS)
def test_other_hyperparameters(backend, bits, block_wise, hyper):
    run_pair(backend, (700,), torch.bfloat16, bits, block_wise, HYPERS[hyper], steps=2)


@pytest.mark.parametrize("lr", [3e-3, 2.0**-130], ids=["lr", "subnormal_lr"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("bits,block_wise", KINDS, ids=KIND_IDS)
def test_subnormal_parameters_follow_the_reference(backend, bits, block_wise, dtype, lr):
    run_subnormal_case(backend, bits, block_wise, dtype, lr)


def test_gradient_dtype_differs_from_parameter(backend):
    run_pair(backend, (300,), torch.bfloat16, 8, True, HYPERS["all"], steps=1, grad_dtype=torch.float32)
    run_pair(backend, (300,), torch.float32, 32, True, HYPERS["all"], steps=1, grad_dtype=torch.float16)


def test_many_tensors_in_one_launch(backend):
    # sizes around the tiles' edges (32-bit programs cover 256 elements, 8-bit ones 1024)
    run_multi(backend, steps=2, sizes=(1, 0, 255, 257, 1025))


def test_quantizer_near_thresholds_and_strided(_interpreter):
    x = quant_fast.near_thresholds(QMAP)
    assert torch.equal(triton_lion.quantize(x, QMAP), quant.nearest_code(x, QMAP))
    n = quant_fast.check_exhaustive(lambda v: triton_lion.quantize(v, QMAP, block=1 << 16), QMAP, stride=8191)
    assert n > 250_000


def test_refuses_cpu_tensors_without_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        triton_lion.TritonBackend(allow_cpu=True)
    assert not triton_lion.TritonBackend().supports(torch.zeros(3), torch.zeros(3))
    with pytest.raises(ValueError, match="cuda"):
        kernels.resolve("triton", torch.device("cpu"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none here)")
def test_on_gpu_equals_torch_backend():
    os.environ["TRITON_INTERPRET"] = "0"
    try:
        gpu = triton_lion.TritonBackend()
        for bits, bw in KINDS:
            for dtype in DTYPES:
                from kernel_cases import make_case, clone_mom, assert_same
                from lionkit.kernels.base import StepHyper
                from lionkit.kernels.torch_eager import TorchBackend

                p, g, m = make_case((5000, 37), dtype, bits, bw)
                p, g = p.cuda(), g.cuda()
                m = m.cuda() if bits == 32 else type(m)(m.codes.cuda(), m.absmax.cuda(), m.qmap.cuda(), m.block_size)
                for hyper in (HYPERS["all"], SR_HYPER):  # SR: bf16 in the kernel, fp16 eager
                    pr, mr = p.clone(), clone_mom(m)
                    hp = StepHyper(**hyper)
                    TorchBackend().step_many([pr], [g], [mr], [hp])
                    gpu.step_many([p], [g], [m], [hp])
                    assert_same(pr, p, mr, m, f"GPU {bits}-bit {dtype} {hyper}")
    finally:
        os.environ["TRITON_INTERPRET"] = "1"


def test_auto_falls_back_when_the_kernels_fail(_interpreter, monkeypatch):
    # backend="auto" builds the Triton backend with fallback_on_error: a GPU Triton cannot
    # compile for must cost a warning, not the training step
    b = triton_lion.TritonBackend(allow_cpu=True, fallback_on_error=True)

    def broken(*args, **kwargs):
        raise RuntimeError("no kernel for this GPU")

    monkeypatch.setattr(b, "_launch", broken)
    with pytest.warns(UserWarning, match="no kernel for this GPU"):
        run_pair(b, (300,), torch.float32, 8, True, HYPERS["plain"], steps=2)
    assert b.broken and b.name.startswith("torch")
    strict = triton_lion.TritonBackend(allow_cpu=True)
    monkeypatch.setattr(strict, "_launch", broken)
    with pytest.raises(RuntimeError, match="no kernel"):
        run_pair(strict, (300,), torch.float32, 8, True, HYPERS["plain"], steps=1)


SR_HYPER = dict(lr=1e-3, beta1=0.9, beta2=0.99, weight_decay=0.1, stochastic_rounding=True, seed=2**62 + 12345)


@pytest.mark.parametrize("bits,block_wise", KINDS, ids=KIND_IDS)
def test_stochastic_rounding_equals_torch_backend(backend, bits, block_wise):
    # bf16 parameters rounded stochastically in the kernels: rounding.sr_hash's numbers, the
    # same bits as TorchBackend; and not rounding to nearest in disguise
    run_pair(backend, (1031,), torch.bfloat16, bits, block_wise, SR_HYPER, steps=2)
    run_pair(backend, (700,), torch.bfloat16, bits, block_wise, SR_HYPER, steps=1, grad_dtype=torch.float32)
    p, g, m = make_case((1031,), torch.bfloat16, bits, block_wise)
    p_sr, m_sr = p.clone(), clone_mom(m)
    backend.step_many([p_sr], [g], [m_sr], [StepHyper(**SR_HYPER)])
    backend.step_many([p], [g], [m], [StepHyper(**{**SR_HYPER, "stochastic_rounding": False})])
    assert not torch.equal(p_sr, p)
