"""Shared table of kernel test cases: a fast backend against ``TorchBackend`` (the reference
path), comparing parameters and every state tensor bit for bit."""

from __future__ import annotations

from typing import Any, Optional

import torch

from lionkit import quant
from lionkit.kernels.base import StepHyper
from lionkit.kernels.torch_eager import TorchBackend
from lionkit.qstate import QuantizedState

DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# mseed: the 4-bit momentum's rounding key (ignored by 32/8-bit); keys >= 2**31 included
HYPERS = {
    "plain": dict(lr=1e-2, beta1=0.9, beta2=0.99, mseed=1),
    "wd": dict(lr=3e-3, beta1=0.9, beta2=0.99, weight_decay=0.1, mseed=2**31 + 12345),
    "scale_clip": dict(lr=1e-2, beta1=0.95, beta2=0.98, grad_scale=0.5, clip_value=2e-3, mseed=2**32 - 1),
    "all": dict(lr=1e-2, beta1=0.9, beta2=0.99, weight_decay=0.3, grad_scale=0.25, clip_value=1e-3, skip_zeros=True,
                mseed=987654321),
}


def make_case(
    shape: tuple[int, ...], dtype: torch.dtype, bits: int, block_wise: bool, seed: int = 0,
    grad_dtype: Optional[torch.dtype] = None,
) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """(p, g, momentum) with some exact zeros in g and m, momentum already nonzero."""
    gen = torch.Generator().manual_seed(seed)
    p = torch.randn(shape, generator=gen).to(dtype)
    g = (torch.randn(shape, generator=gen) * 1e-2).to(grad_dtype or dtype)
    g.view(-1)[::7] = 0  # skip_zeros has something to skip
    m = torch.randn(shape, generator=gen) * 1e-2
    m.view(-1)[::11] = 0
    return p, g, momentum_of(m, bits, block_wise)


def momentum_of(m: torch.Tensor, bits: int, block_wise: bool) -> Any:
    """fp32 momentum ``m`` as the kernels take it for ``bits`` (32: itself; 8: QuantizedState
    per block of 256 or per tensor; 4: 4-bit QuantizedState)."""
    if bits == 32:
        return m
    if bits == 4:
        return QuantizedState.from_float4(m.reshape(-1))
    return QuantizedState.from_float(m, quant.BLOCK_SIZE if block_wise else None)


def clone_mom(m: Any) -> Any:
    """A deep copy of a momentum (fp32 tensor or QuantizedState sharing only the map)."""
    if isinstance(m, QuantizedState):
        return QuantizedState(m.codes.clone(), m.absmax.clone(), m.qmap, m.block_size, m.bits, m.numel)
    return m.clone()


def bits_of(t: torch.Tensor) -> torch.Tensor:
    """The bit patterns of a float tensor (so that -0.0 != 0.0 and comparisons are exact)."""
    return t.view({8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}[t.element_size()])


def assert_same(p_ref: torch.Tensor, p: torch.Tensor, m_ref: Any, m: Any, what: str = "") -> None:
    """Parameters and every state tensor identical, bit for bit (NaN payloads aside)."""

    def same(a: torch.Tensor, b: torch.Tensor, name: str) -> None:
        if a.is_floating_point() and (a.isnan().any() or b.isnan().any()):
            torch.testing.assert_close(b, a, rtol=0, atol=0, equal_nan=True, msg=f"{what}: {name} differs")
            return
        if not torch.equal(bits_of(a), bits_of(b)):
            bad = (bits_of(a) != bits_of(b)).nonzero()[:3].tolist()
            raise AssertionError(f"{what}: {name} differs (first indices {bad})")

    same(p_ref, p, "param")
    if isinstance(m_ref, QuantizedState):
        same(m_ref.codes, m.codes, "codes")
        same(m_ref.absmax, m.absmax, "absmax")
    else:
        same(m_ref, m, "momentum")


def run_pair(backend, shape, dtype, bits, block_wise, hyper: dict, steps: int = 3, grad_dtype=None) -> None:
    """``steps`` steps of ``backend`` and of TorchBackend from the same start: identical."""
    p, g, m = make_case(shape, dtype, bits, block_wise, grad_dtype=grad_dtype)
    p_ref, m_ref = p.clone(), clone_mom(m)
    hp = StepHyper(**hyper)
    ref = TorchBackend()
    for k in range(steps):
        ref.step_many([p_ref], [g], [m_ref], [hp])
        backend.step_many([p], [g], [m], [hp])
        assert_same(p_ref, p, m_ref, m, f"step {k + 1}, {bits}-bit {dtype} shape={shape} {hyper}")


CPU_SIZES = (1, 0, 255, 256, 257, 4096, 32769, 65836)  # around block and 32K-chunk edges


def multi_tensor_set(seed: int = 1, sizes=CPU_SIZES) -> list[tuple[torch.Tensor, torch.Tensor, Any, StepHyper]]:
    """A model-like mix in one call: dtypes, both momentum kinds, sizes around block and chunk
    edges, an empty tensor, per-tensor hyperparameters."""
    items = []
    kinds = [(32, True), (8, True), (8, False), (4, True)]
    i = 0
    for dtype in DTYPES:
        for bits, bw in kinds:
            for n in sizes:
                if bits in (8, 4) and n == 0:
                    continue
                p, g, m = make_case((n,), dtype, bits, bw, seed=seed + i)
                name = list(HYPERS)[i % len(HYPERS)]
                items.append((p, g, m, StepHyper(**HYPERS[name])))
                i += 1
    return items


def run_multi(backend, steps: int = 2, sizes=CPU_SIZES) -> None:
    """All of ``multi_tensor_set`` in one ``step_many`` per step, against TorchBackend."""
    items = multi_tensor_set(sizes=sizes)
    ref_items = [(p.clone(), g, clone_mom(m), hp) for p, g, m, hp in items]
    ref = TorchBackend()
    for _ in range(steps):
        ref.step_many(*zip(*ref_items))
        backend.step_many(*zip(*items))
    for (p, _, m, hp), (pr, _, mr, _) in zip(items, ref_items):
        assert_same(pr, p, mr, m, f"multi-tensor {p.dtype} n={p.numel()} {type(m).__name__} {hp}")


def run_subnormal_case(backend, bits: int, block_wise: bool, dtype: torch.dtype, lr: float) -> None:
    """Two steps of ``backend`` and of TorchBackend on parameters in the subnormal range of
    ``dtype`` (an unused row under weight decay) with zero momentum and mostly zero gradients,
    so that results are subnormal where p only decays; with a subnormal lr, elements that take
    a step (whole vectors of them included) become subnormal too. Vectors that step sit beside
    vectors that do not, in both orders. Identical bit for bit."""
    n = 4096 + 77
    gen = torch.Generator().manual_seed(9)
    tiny = torch.finfo(dtype).smallest_normal
    sub = (torch.rand(n, generator=gen) * 2 - 1) * tiny  # subnormals of the dtype (and fp32's below them)
    sub[::5] *= 2.0**-6
    p = sub.to(dtype)
    p[1::3] = torch.randn(len(p[1::3]), generator=gen).to(dtype)  # normal neighbours in the same vectors
    g = torch.zeros(n, dtype=dtype)  # c = 0 where the momentum is zero too: p only decays
    g[2::9] = 1e-3
    g[1024:2048] = -1e-3  # whole vectors that take a step
    # pairs of vectors (the CPU kernel converts two at once) where one takes a step and the
    # other holds subnormal results: first half stepping, then second half
    g[2048:2560].view(-1, 32)[:, :16] = 1e-3
    g[2560:3072].view(-1, 32)[:, 16:] = -1e-3
    m = momentum_of(torch.zeros(n), bits, block_wise)
    hp = StepHyper(**{**HYPERS["wd"], "lr": lr})
    for k in range(2):
        p_ref, m_ref = p.clone(), clone_mom(m)
        TorchBackend().step_many([p_ref], [g], [m_ref], [hp])
        backend.step_many([p], [g], [m], [hp])
        assert_same(p_ref, p, m_ref, m, f"step {k + 1}, {bits}-bit {dtype} subnormal parameters, lr={lr}")
        assert (p_ref.abs() < tiny).sum() > n // 4  # the case holds subnormal results


__all__ = ["DTYPES", "HYPERS", "make_case", "momentum_of", "clone_mom", "assert_same", "run_pair", "run_multi",
           "run_subnormal_case"]
