"""lionkit bench: the model shapes, the byte accounting, the goals and one tiny end-to-end run.
(Correctness only: no assertion on speed.)"""

from __future__ import annotations

import json
import math

import pytest
import torch

from lionkit import Lion, Lion8bit, bench


def test_gpt2_shapes_reach_the_requested_size():
    shapes = bench.gpt2_shapes(23e6)
    n = sum(math.prod(s) for _, s in shapes)
    assert len(shapes) == 2 + 12 * 12 + 2
    assert abs(n - 23e6) / 23e6 < 0.05 and n >= 16e6
    assert shapes[0] == ("wte", (bench.VOCAB, shapes[0][1][1]))
    small = bench.gpt2_shapes(1e5)
    assert sum(math.prod(s) for _, s in small) < sum(math.prod(s) for _, s in bench.gpt2_shapes(1e6))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_step_bytes_counts_what_a_step_moves(dtype):
    params = [torch.nn.Parameter(torch.zeros(8192, dtype=dtype))]
    params[0].grad = torch.ones(8192, dtype=dtype)
    es = params[0].element_size()
    opt = Lion(params, lr=1e-3, backend="torch")
    opt.step()
    assert bench.step_bytes(opt, params) == 8192 * (3 * es + 8)  # p twice, g, fp32 m twice
    opt8 = Lion8bit(params, lr=1e-3, backend="torch")
    opt8.step()
    # p twice, g, uint8 codes twice, one fp32 absmax per 256 twice; the map is not counted
    assert bench.step_bytes(opt8, params) == 8192 * (3 * es + 2) + 2 * 4 * (8192 // 256)


def _row(step_s, of_ceiling, extra=0, first=0.1, cold=None):
    return {"step_s": step_s, "of_ceiling": of_ceiling, "extra_bytes": extra, "first_step_s": first,
            "cold_first_step_s": cold}


def test_goals_are_judged_from_the_rows():
    rows = {
        "lionkit 32-bit compiled [fp32]": _row(0.010, 0.90, cold=12.0),
        "lionkit 8-bit compiled [fp32]": _row(0.012, 0.66, extra=20 * 2**20),
        "bnb Lion8bit [fp32]": _row(0.300, 0.05),
        "lion-pytorch [fp32]": _row(0.050, 0.2),
        "lionkit 32-bit compiled [bf16]": _row(0.008, 0.80),
        "DeepSpeed CPULion [bf16]": _row(0.009, 0.7),
    }
    goals = {g["goal"]: g for g in bench.evaluate_goals(rows, "cpu")}
    assert goals["fp32: 32-bit step >= 0.85 of ceiling"]["met"] is True
    assert goals["fp32: 8-bit step >= 0.70 of ceiling"]["met"] is False
    assert goals["fp32: 8-bit no slower than 32-bit (32-bit time / 8-bit time >= 1)"]["met"] is False
    assert goals["fp32: >= 15x bnb Lion8bit (8-bit vs its step)"]["value"] == pytest.approx(25.0)
    assert goals["fp32: >= 4x lion-pytorch (32-bit vs its step)"]["met"] is True
    assert goals["fp32: >= 1x DeepSpeed CPULion (32-bit vs its step)"]["met"] is None  # not measured
    assert goals["extra memory of a step <= 16 MiB (worst lionkit fused variant)"]["met"] is False
    assert goals["cold start (first step, empty cache) <= 30 s"]["met"] is True
    assert goals["bf16: 32-bit step >= 0.85 of ceiling"]["met"] is False
    assert goals["bf16: >= 1x DeepSpeed CPULion (32-bit vs its step)"]["value"] == pytest.approx(9 / 8)
    assert goals["bf16: 8-bit step >= 0.70 of ceiling"]["met"] is None  # not measured


def test_quick_run_end_to_end(tmp_path, capsys):
    out = tmp_path / "bench.json"
    # the eager backend: no kernel build, so two short worker processes
    rc = bench.main(["--quick", "--no-peers", "--variants", "32-bit torch \\[fp32", "--rounds", "1", "--json", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "ceiling" in text and "lionkit 32-bit torch" in text
    result = json.loads(out.read_text())
    row = result["rows"]["lionkit 32-bit torch [fp32]"]
    assert row["step_s"] > 0 and row["bytes"] > 0 and 0 < row["of_ceiling"]
    assert row["backends_used"] == {"cpu": "torch"}
    assert row["first_step_s"] is not None and "extra_bytes" in row
    assert result["ceiling_gbs"] > 0 and result["machine"]["cpu_count"] >= 1


def test_bad_arguments_are_refused(tmp_path, capsys, monkeypatch):
    # refused before any measuring (run() would take minutes): usage errors naming the option
    monkeypatch.setattr(bench, "run", lambda args: pytest.fail("measured despite a bad argument"))
    bad = [
        (["--rounds", "0"], "--rounds must be >= 1"),
        (["--device", "tpu"], "--device must be cpu or cuda"),
        (["--variants", "("], "--variants '(' is not a valid regular expression"),
        (["--timeout", "-1"], "--timeout must be > 0 seconds"),
        (["--json", str(tmp_path / "missing" / "b.json")], "does not exist or is not writable"),
        (["--json", str(tmp_path)], "is a directory"),
    ]
    if not torch.cuda.is_available():
        bad.append((["--device", "cuda"], "--device cuda: no CUDA device here"))
    for argv, message in bad:
        with pytest.raises(SystemExit) as e:
            bench.main(argv)
        assert e.value.code == 2
        assert message in capsys.readouterr().err, argv
