"""The 4-bit format: map, packing, the counter-based uniforms, and rounding (nearest and
stochastic) against brute force and statistics."""

from __future__ import annotations

import math

import pytest
import torch

from lionkit import quant4

QMAP = quant4.normal_map()


def test_map_is_the_pinned_normal_quantile_map():
    # the 7 positive levels, as fp32 bit patterns: a change of the format breaks checkpoints
    want = ["0x1.1b5b4ep-4", "0x1.200afap-3", "0x1.bcf922p-3", "0x1.36d462p-2", "0x1.a22a06p-2", "0x1.1d233cp-1",
            "0x1.0p+0"]
    assert [float.hex(x) for x in QMAP[8:].tolist()] == [float.hex(float.fromhex(w)) for w in want]
    assert torch.equal(QMAP[:7], -QMAP[8:].flip(0)) and QMAP[quant4.ZERO_CODE] == 0
    quant4.validate_map4(QMAP)


@pytest.mark.parametrize(
    "bad, msg",
    [
        (torch.zeros(16), "15 values"),
        (torch.linspace(-1, 1, 15, dtype=torch.float64), "float32"),
        (QMAP.flip(0), "increasing"),
        (QMAP * 2, "within"),
        (QMAP * 0.9 + 0.01, "0 at code 7"),
    ],
)
def test_validate_map4_names_the_problem(bad, msg):
    with pytest.raises(ValueError, match=msg):
        quant4.validate_map4(bad, "qmap1")


@pytest.mark.parametrize("n", [1, 2, 31, 32, 33, 1000, 1001])
def test_pack_unpack_round_trip(n):
    codes = torch.randint(0, 15, (n,), dtype=torch.uint8, generator=torch.Generator().manual_seed(n))
    packed = quant4.pack(codes)
    assert packed.dtype == torch.uint8 and packed.numel() == quant4.packed_numel(n) == (n + 1) // 2
    assert torch.equal(quant4.unpack(packed, n), codes)
    assert int(packed[0]) & 15 == int(codes[0])  # element 0 in the low nibble
    if n % 2:
        assert int(packed[-1]) >> 4 == quant4.ZERO_CODE  # the odd tail's padding


def test_uniform_depends_only_on_key_and_index():
    full = quant4.uniform(123, 0, 5000)
    for start, count in [(0, 1), (17, 100), (4999, 1), (1000, 3000)]:
        assert torch.equal(quant4.uniform(123, start, count), full[start : start + count])
    assert not torch.equal(quant4.uniform(124, 0, 5000), full)
    # multiples of 2**-24 in [0, 1)
    assert full.min() >= 0 and full.max() < 1
    assert torch.equal(full * 2**24, (full * 2**24).round())


def test_uniform_above_2_to_the_32_elements():
    lo = quant4.uniform(5, 0, 64)
    hi = quant4.uniform(5, (1 << 32), 64)  # the same low index bits, another high word
    across = quant4.uniform(5, (1 << 32) - 32, 64)
    assert not torch.equal(lo, hi)
    assert torch.equal(across[32:], hi[:32])
    assert torch.equal(across[:32], quant4.uniform(5, (1 << 32) - 32, 32))


def test_uniform_statistics():
    """Uniform and uncorrelated (neighbours, keys one apart): bounds that a broken mixer (e.g. no
    multiply rounds) fails."""
    n = 1 << 20
    u = quant4.uniform(2024, 0, n).double()
    hist = torch.histc(u, bins=64, min=0, max=1)
    chi2 = float(((hist - n / 64) ** 2 / (n / 64)).sum())
    assert chi2 < 130  # 63 degrees of freedom: p ~ 1e-6
    assert abs(u.mean() - 0.5) < 5 * math.sqrt(1 / 12 / n)
    for other in (u.roll(1), quant4.uniform(2025, 0, n).double()):
        corr = torch.corrcoef(torch.stack([u, other]))[0, 1]
        assert abs(corr) < 5 / math.sqrt(n)


def _special_values() -> torch.Tensor:
    """Every level, every midpoint and their fp32 neighbours, random values, +-1 and +-0."""
    mids = ((QMAP[1:].double() + QMAP[:-1].double()) / 2).float()
    pts = torch.cat([QMAP, mids])
    up = torch.nextafter(pts, torch.tensor(2.0))
    down = torch.nextafter(pts, torch.tensor(-2.0))
    rnd = torch.rand(20000, generator=torch.Generator().manual_seed(0)) * 2 - 1
    vals = torch.cat([pts, up, down, rnd, torch.tensor([-0.0, 0.0, 1.0, -1.0])])
    return vals[(vals >= -1) & (vals <= 1)]


def test_nearest_rounding_matches_brute_force():
    v = _special_values()
    got = quant4.round_to_codes(v, QMAP, None).long()
    dist = (v.double().reshape(-1, 1) - QMAP.double().reshape(1, -1)).abs()
    best = dist.min(dim=1, keepdim=True).values
    idx = torch.arange(15).reshape(1, -1)
    want = torch.where(dist == best, idx, -1).amax(dim=1)  # ties to the larger code
    assert torch.equal(got, want)


def test_stochastic_rounding_picks_a_neighbour_by_the_threshold():
    v = _special_values()
    u = torch.rand(v.shape, generator=torch.Generator().manual_seed(1))
    codes = quant4.round_to_codes(v, QMAP, u).long()
    q = QMAP.double()
    lo = (q.reshape(1, -1) <= v.double().reshape(-1, 1)).sum(1) - 1
    on_level = q[lo] == v.double()
    # on a level: that level, whatever u is
    assert torch.equal(codes[on_level], lo[on_level])
    off = ~on_level
    lo, vv, uu, cc = lo[off], v[off], u[off], codes[off]
    p_up = (vv - QMAP[lo]) / (QMAP[lo + 1] - QMAP[lo])  # fp32, as specified
    assert torch.equal(cc, lo + (uu < p_up).long())
    # u = 0 always rounds up off-level, u just below 1 down unless p_up is 1 in fp32
    assert torch.equal(quant4.round_to_codes(vv, QMAP, torch.zeros_like(vv)).long(), lo + 1)


def test_stochastic_rounding_is_unbiased():
    """E[level(code)] == v: for values across every gap, the mean decoded value over 20,000
    draws lies within 5 standard errors of v (rounding to nearest is off by up to half a gap)."""
    v = torch.linspace(-1, 1, 101)[1:-1]
    draws = 20000
    vals = v.repeat(draws)
    u = quant4.uniform(99, 0, vals.numel())
    dec = QMAP[quant4.round_to_codes(vals, QMAP, u).long()].double().view(draws, -1)
    mean = dec.mean(0)
    hi = torch.bucketize(v, QMAP).clamp(1, 14)
    gap = (QMAP[hi] - QMAP[hi - 1]).double()
    stderr = gap / 2 / math.sqrt(draws)  # at most: Bernoulli std <= gap / 2
    assert ((mean - v.double()).abs() <= 5 * stderr + 1e-7).all()
    nearest = QMAP[quant4.round_to_codes(v, QMAP, None).long()].double()
    assert (nearest - v.double()).abs().max() > 50 * stderr.max()  # the bias the test would catch


def test_quantize_blocks_of_32_and_exact_extremes():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(32 * 5 + 7, generator=gen) * torch.logspace(-6, 2, 32 * 5 + 7)
    x[32:64] = 0  # a block of zeros: scale 0, decodes to exact zeros
    codes, absmax = quant4.quantize(x, QMAP, quant4.uniform(1, 0, x.numel()))
    assert absmax.numel() == 6 and codes.numel() == (x.numel() + 1) // 2
    for b in range(6):
        assert absmax[b] == x[32 * b : 32 * b + 32].abs().max()
    dec = quant4.dequantize(codes, absmax, QMAP, x.numel())
    assert torch.equal(dec[32:64], torch.zeros(32))
    # each block's largest element decodes exactly; every element lies within its block's gap
    for b in (0, 2, 3, 4, 5):
        blk = slice(32 * b, min(32 * b + 32, x.numel()))
        k = x[blk].abs().argmax()
        assert dec[blk][k] == x[blk][k]
        assert ((dec[blk] - x[blk]).abs() <= 0.45 * absmax[b]).all()  # the widest gap is 0.443
    assert torch.equal(torch.sign(dec[dec != 0]), torch.sign(x[dec != 0]))


def test_nonfinite_block_decodes_to_nan():
    x = torch.ones(64)
    x[40] = float("inf")
    codes, absmax = quant4.quantize(x, QMAP)
    assert absmax[0] == 1 and absmax[1].isnan()
    dec = quant4.dequantize(codes, absmax, QMAP, 64)
    assert torch.equal(dec[:32], x[:32]) and dec[32:].isnan().all()
