"""quant_fast: the bucket-table quantizer equals quant.nearest_code exactly.

The normal run checks every float32 within 64 ulps of each threshold (against the float64
brute force too) and a strided subset of all floats in [-1, 1]. The exhaustive check of all
2,130,706,434 floats runs with LIONKIT_EXHAUSTIVE=1 (or ``python -m lionkit.quant_fast``).
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from lionkit import quant, quant_fast

QMAP = quant.dynamic_map()
EXHAUSTIVE = os.environ.get("LIONKIT_EXHAUSTIVE") == "1"


def test_table_of_the_dynamic_map():
    table = quant_fast.bucket_table(QMAP)
    assert table is not None and table.zero == 127
    # every threshold has its own bucket, and the table covers |x| up to 1.0
    assert table.lut.shape == (2 * table.nb,)
    assert (0x3F800000 >> 16) - table.key0 == table.nb - 1
    lows = table.lut & 0x1FFFF
    assert (lows < 65536).sum() == 127 + 126  # positive and negative thresholds
    first = table.lut >> 17
    assert np.all(np.diff(first[: table.nb].astype(np.int64)) >= 0)


def test_near_every_threshold_matches_nearest_code_and_bruteforce():
    x = quant_fast.near_thresholds(QMAP, ulps=64)
    fast = quant_fast.nearest_code_fast(x, QMAP)
    assert torch.equal(fast, quant.nearest_code(x, QMAP))
    assert torch.equal(fast, quant.nearest_code_bruteforce(x, QMAP))


def test_special_values():
    tiny = torch.tensor(1e-45)  # the smallest subnormal
    x = torch.tensor([0.0, -0.0, 1.0, -1.0, tiny, -tiny, float("nan"), 0.5, -0.5])
    got = quant_fast.nearest_code_fast(x, QMAP)
    assert got.tolist()[:6] == [127, 127, 255, 0, 128, 126]  # nonzero never gets the zero code
    assert got[6] == 255  # NaN, where torch.bucketize puts it
    assert torch.equal(got, quant.nearest_code(x, QMAP))


def test_strided_subset_of_all_floats():
    n = quant_fast.check_exhaustive(lambda x: quant_fast.nearest_code_fast(x, QMAP), QMAP, stride=2039)
    assert n > 1_000_000


def test_random_values_and_shape_kept():
    x = (torch.rand(3, 1000, generator=torch.Generator().manual_seed(0)) * 2 - 1) ** 5
    got = quant_fast.nearest_code_fast(x, QMAP)
    assert got.shape == x.shape and got.dtype == torch.uint8
    assert torch.equal(got, quant.nearest_code(x, QMAP))


def test_another_map_with_a_table():
    # log-spaced magnitudes (9.5 % apart): at most one threshold per 2**-7 bucket
    mags = torch.logspace(-5, 0, 128, dtype=torch.float64).to(torch.float32)
    mags[-1] = 1.0
    qmap = torch.cat([-mags[:-1].flip(0), torch.zeros(1), mags])
    quant.validate_qmap(qmap)
    assert quant_fast.bucket_table(qmap) is not None
    x = torch.cat([quant_fast.near_thresholds(qmap, ulps=8), torch.rand(10000) * 2 - 1])
    assert torch.equal(quant_fast.nearest_code_fast(x, qmap), quant.nearest_code(x, qmap))


def test_map_without_a_table_is_refused():
    # three codes one ulp apart: the two thresholds between them share a bucket
    qmap = quant.dynamic_map()
    qmap[200] = torch.nextafter(qmap[201], torch.tensor(0.0))
    qmap[202] = torch.nextafter(qmap[201], torch.tensor(1.0))
    quant.validate_qmap(qmap)
    assert quant_fast.bucket_table(qmap) is None
    assert quant_fast.kernel_constants(qmap) is None
    with pytest.raises(ValueError, match="bucket table"):
        quant_fast.nearest_code_fast(torch.zeros(3), qmap)


def test_kernel_constants_layout():
    qc = quant_fast.kernel_constants(QMAP)
    table = quant_fast.bucket_table(QMAP)
    assert qc[0] == quant_fast.MAGIC
    assert (qc[quant_fast.HDR_KEY0], qc[quant_fast.HDR_NB], qc[quant_fast.HDR_ZERO]) == (table.key0, table.nb, 127)
    assert np.array_equal(qc[quant_fast.QMAP_AT : quant_fast.QMAP_AT + 256].view(np.float32), QMAP.numpy())
    assert np.array_equal(qc[quant_fast.LUT_AT : quant_fast.LUT_AT + 2 * table.nb], table.lut)
    assert np.array_equal(qc[quant_fast.LUT_AT + 2 * table.nb :], quant_fast.code_table(table))
    assert qc[quant_fast.HDR_SYM] == 1  # the dynamic map is symmetric around its zero code
    assert not qc.flags.writeable


def _codes_by_code_table(x: torch.Tensor, qmap: torch.Tensor) -> torch.Tensor:
    """code_table's rule written out in int64 (what the AVX-512 kernel computes)."""
    table = quant_fast.bucket_table(qmap)
    entries = torch.from_numpy(quant_fast.code_table(table).astype(np.int64))
    b = x.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    low = torch.where(b >> 31 == 1, ~(b & 0xFFFF) & 0xFFFFFFFF, b & 0xFFFF)
    return ((entries[b >> 16] + low) & 0xFFFFFFFF) >> 17


def _edges(qmap: torch.Tensor, reach: int) -> torch.Tensor:
    """Every float32 within ``reach`` patterns of a bucket edge of the table, both signs."""
    table = quant_fast.bucket_table(qmap)
    starts = (torch.arange(table.nb + 1, dtype=torch.int64) + table.key0) << quant_fast.KEY_SHIFT
    bits = (starts[:, None] + torch.arange(-reach, reach + 1)[None, :]).reshape(-1)
    bits = bits[(bits > 0) & (bits <= quant_fast.ONE_BITS)].unique()
    pos = bits.to(torch.int32).view(torch.float32)
    return torch.cat([pos, -pos])


def edge_map() -> torch.Tensor:
    """A map with a table whose thresholds sit on bucket edges: exactly at 0.125 and 0.5 (the
    bottom of a bucket), 2 patterns below 0.25 (a bucket's top), and one in the bucket below
    0.5 as well; log-spaced elsewhere, the two sides not symmetric."""
    special = [0.4985, 0.5 - 2**-10, 0.5 + 2**-10, 0.125 - 2**-12, 0.125 + 2**-12,
               0.25 - 2**-12 - 2**-25, 0.25 + 2**-12 - 2**-25]

    def side(n: int, lo_exp: float) -> torch.Tensor:
        for k in range(110, 150):
            base = torch.logspace(lo_exp, 0, k, dtype=torch.float64)
            keep = torch.ones(k, dtype=torch.bool)
            for c in (0.125, 0.25, 0.5):
                keep &= (base / c - 1).abs() > 0.06
            vals = torch.cat([base[keep], torch.tensor(special, dtype=torch.float64)]).sort().values
            if vals.numel() == n:
                return vals.float()
        raise AssertionError("no such map")

    return torch.cat([-side(127, -4.7).flip(0), torch.zeros(1), side(128, -5)]).float()


def test_edge_map_has_what_it_says():
    qmap = edge_map()
    quant.validate_qmap(qmap)
    low = quant_fast.bucket_table(qmap).lut & 0x1FFFF
    assert int(((low < 8) | ((low >= 65528) & (low < 65536))).sum()) >= 4


def _hard_values(qmap: torch.Tensor) -> torch.Tensor:
    """Values next to every threshold and bucket edge, a strided subset of [-1, 1], and zeros,
    denormals and +-1."""
    strided = torch.arange(0, quant_fast.ONE_BITS + 1, 4099, dtype=torch.int64).to(torch.int32).view(torch.float32)
    tiny = torch.arange(0, 40, dtype=torch.int32).view(torch.float32)
    special = torch.tensor([0.0, -0.0, 1e-38, -1e-38, 1.0, -1.0])
    return torch.cat([quant_fast.near_thresholds(qmap, ulps=12), _edges(qmap, 12), strided, -strided, tiny, -tiny, special])


@pytest.mark.parametrize("which", ["dynamic", "edges"])
def test_code_table_rule_equals_nearest_code(which):
    qmap = QMAP if which == "dynamic" else edge_map()
    x = _hard_values(qmap)
    assert torch.equal(_codes_by_code_table(x, qmap), quant.nearest_code(x, qmap).to(torch.int64))


@pytest.mark.parametrize("scalar", [False, True], ids=["native", "scalar"])
def test_kernel_quantizer_on_the_edge_map(scalar):
    from lionkit.kernels import compiled

    try:
        compiled.load(scalar)
    except compiled.BuildError as e:
        pytest.skip(f"CPU kernel cannot be built here: {str(e).splitlines()[0]}")
    qmap = edge_map()
    x = _hard_values(qmap)
    assert torch.equal(compiled.quantize(x, qmap, scalar=scalar), quant.nearest_code(x, qmap))


def test_symmetry_flag():
    bits = QMAP.numpy().view(np.uint32)
    assert quant_fast._symmetric(bits, 127)
    qmap = QMAP.clone()
    qmap[100] = torch.nextafter(qmap[100], torch.tensor(0.0))  # one negative code moved by an ulp
    assert quant_fast.kernel_constants(qmap)[quant_fast.HDR_SYM] == 0


@pytest.mark.skipif(not EXHAUSTIVE, reason="all 2.1e9 floats take minutes: set LIONKIT_EXHAUSTIVE=1")
def test_exhaustive_torch():
    n = quant_fast.check_exhaustive(lambda x: quant_fast.nearest_code_fast(x, QMAP), QMAP)
    assert n == 2 * (quant_fast.ONE_BITS + 1)
