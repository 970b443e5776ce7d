"""The Triton backend's version gate: a triton older than the kernels are tested with is refused
with the fix, and backend="auto" falls back to the eager path. Runs wherever triton is installed,
whatever its version (no kernel runs here)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="triton not installed (pip install 'lionkit[triton]')")

from lionkit import kernels
from lionkit.kernels import triton_lion


def test_older_triton_refused_with_the_fix_and_auto_falls_back(monkeypatch):
    import triton

    assert triton_lion.triton_version("3.0.0") == (3, 0)
    assert triton_lion.triton_version("3.2.0+git5a3f2e1") == (3, 2)
    assert triton_lion.triton_version("3.10.1") == (3, 10)
    monkeypatch.setattr(triton, "__version__", "3.1.0")
    with pytest.raises(ImportError, match=r"triton >= 3\.2 \(found 3\.1\.0.*pip install -U 'torch>=2\.6'"):
        triton_lion.TritonBackend(allow_cpu=True)
    # backend="auto" on a GPU: the eager backend, with the reason on record
    monkeypatch.setattr(kernels, "_cache", {})
    monkeypatch.setattr(kernels, "_unavailable", {})
    assert kernels.resolve("auto", torch.device("cuda")).name == "torch"
    assert "found 3.1.0" in kernels.unavailable()["triton"]
    with pytest.raises(ImportError, match="found 3.1.0"):
        kernels.resolve("triton", torch.device("cuda"))


def test_this_triton_is_judged_by_its_version():
    import triton

    if triton_lion.triton_version(triton.__version__) >= triton_lion.MIN_TRITON:
        assert triton_lion.import_triton() is triton
    else:  # e.g. triton 3.0.0 beside torch 2.4.1 (the CI's oldest-torch venv)
        with pytest.raises(ImportError, match=f"found {triton.__version__}"):
            triton_lion.import_triton()
