"""``lionkit demo`` in a one-epoch run: table, PNG, JSON, measured state sizes, learning."""

from __future__ import annotations

import json
import math
import sys

import pytest

pytest.importorskip("matplotlib", reason="the demo needs matplotlib: pip install 'lionkit[demo]'")
pytest.importorskip("sklearn", reason="the demo needs scikit-learn: pip install 'lionkit[demo]'")
pytest.importorskip("tqdm", reason="the demo needs tqdm: pip install 'lionkit[demo]'")

import torch  # noqa: E402

import lionkit  # noqa: E402
from lionkit import cli, demo, quant  # noqa: E402

NAMES = ["AdamW", "Lion", "Lion8bit"]


@pytest.fixture(scope="module")
def one_epoch(tmp_path_factory):
    """Run `lionkit demo --epochs 1` once (progress bar on) and keep what it printed and wrote."""
    folder = tmp_path_factory.mktemp("demo")
    png, js = folder / "sub" / "curves.png", folder / "results.json"
    capture = pytest.MonkeyPatch()
    out_lines: list[str] = []

    class Tee:
        def write(self, s):
            out_lines.append(s)

        def flush(self):
            pass

    capture.setattr(sys, "stdout", Tee())
    err = Tee()
    capture.setattr(sys, "stderr", err)
    threads = torch.get_num_threads()
    try:
        rc = cli.main(["demo", "--epochs", "1", "--seed", "3", "--out", str(png), "--json", str(js)])
    finally:
        capture.undo()
    assert torch.get_num_threads() == threads, "the demo must restore torch's thread count"
    return rc, "".join(out_lines), png, js


def test_demo_succeeds_and_prints_one_row_per_optimizer(one_epoch):
    rc, out, _, _ = one_epoch
    assert rc == 0
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("optimizer"))
    for col in ("train loss", "val loss", "val acc", "state B/param", "step ms"):
        assert col in lines[header]
    rows = [lines[header + 2 + i].split() for i in range(3)]
    assert [r[0] for r in rows] == NAMES
    for r in rows:
        assert r[6].endswith("%") and 0 <= float(r[6][:-1]) <= 100
        assert all(math.isfinite(float(x)) for x in (r[4], r[5], r[7], r[8]))


def test_png_is_written(one_epoch):
    _, _, png, _ = one_epoch
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 10_000  # a real figure, not an empty canvas


def test_json_has_the_three_optimizers_and_they_learned(one_epoch):
    _, out, _, js = one_epoch
    payload = json.loads(js.read_text())
    assert payload["epochs"] == 1 and payload["seed"] == 3
    results = {r["optimizer"]: r for r in payload["results"]}
    assert sorted(results) == sorted(NAMES)
    for name, r in results.items():
        assert len(r["train_loss"]) == 1 and len(r["val_loss_curve"]) == 2
        # epoch 0 is the untrained model (about ln 10); one epoch must improve on it
        assert r["val_loss_curve"][1] < r["val_loss_curve"][0], name
        assert r["val_accuracy_curve"][1] > r["val_accuracy_curve"][0] + 0.2, name
        assert r["step_ms"] > 0
        # the printed table and the JSON agree
        assert f"{100 * r['val_accuracy']:.1f}%" in out


def test_measured_state_sizes(one_epoch):
    _, _, _, js = one_epoch
    results = {r["optimizer"]: r for r in json.loads(js.read_text())["results"]}
    assert results["Lion"]["state_bytes_per_param"] == pytest.approx(4.0, abs=1e-9)
    assert results["Lion8bit"]["state_bytes_per_param"] < 1.3
    assert results["AdamW"]["state_bytes_per_param"] == pytest.approx(8.0, abs=0.01)


def test_state_bytes_match_the_8bit_layout():
    """The measurement agrees with SPEC 2's layout: codes (1 B) + one fp32 absmax per 256
    elements for tensors >= min_8bit_size, fp32 below it, and the 1 KiB map counted once."""
    model = demo.make_model(0)
    opt = lionkit.Lion8bit(model.parameters(), lr=1e-3)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    expected = 0
    for p in model.parameters():
        if p.numel() >= 4096:
            expected += p.numel() + 4 * quant.num_blocks(p.numel(), quant.BLOCK_SIZE)
        else:
            expected += 4 * p.numel()
    expected += 4 * quant.MAP_SIZE
    n = sum(p.numel() for p in model.parameters())
    assert demo.state_bytes_per_param(opt) == pytest.approx(expected / n, rel=1e-12)
    assert any(p.numel() >= 4096 for p in model.parameters()), "the demo model must exercise 8-bit state"


def test_split_is_fixed_by_the_seed_and_stratified():
    a, b = demo.load_data(5), demo.load_data(5)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    x_tr, y_tr, x_va, y_va = a
    assert len(x_tr) + len(x_va) == 1797
    # every class is split 80/20
    for c in range(10):
        n_tr, n_va = int((y_tr == c).sum()), int((y_va == c).sum())
        assert n_va == round((n_tr + n_va) * demo.VAL_FRACTION)
    other = demo.load_data(6)
    assert not torch.equal(a[2], other[2])


def test_missing_dependency_names_the_extra(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r"pip install 'lionkit\[demo\]'"):
        demo.run(epochs=1, out=None, progress=False)
    assert cli.main(["demo", "--epochs", "1"]) == 1
    assert "pip install 'lionkit[demo]'" in capsys.readouterr().err


def test_bad_arguments():
    with pytest.raises(ValueError, match="Invalid epochs: 0"):
        demo.run(epochs=0)
    with pytest.raises(ValueError, match="Invalid threads: 0"):
        demo.run(epochs=1, threads=0)
