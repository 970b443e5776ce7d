"""``lionkit compare`` and its tasks: data, measurement, determinism, summary, goals, outputs."""

from __future__ import annotations

import json
import math

import pytest
import torch

pytest.importorskip("sklearn", reason="the compare tasks need scikit-learn (pip install 'lionkit[demo]')")
pytest.importorskip("matplotlib", reason="lionkit compare plots with matplotlib (pip install 'lionkit[demo]')")

import lionkit  # noqa: E402
from lionkit import cli, compare, quant, tasks  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One torch thread, as compare's workers use: these models are too small for more, and on
    a busy machine a second thread mostly waits for the first."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="module")
def lm_task():
    try:
        return tasks.make_task("charlm", quick=True)
    except ImportError as e:
        pytest.skip(f"this Python lacks pydoc_data: {e}")


# ---------------------------------------------------------------------------------- tasks
def test_lm_corpus_is_the_python_reference_and_split_cleanly(lm_task):
    text = tasks.python_docs_corpus()
    assert len(text) > 200_000
    assert 'The "if" statement' in text and "while_stmt" in text
    assert lm_task.corpus_sha256 == tasks._sha256(text)
    assert 60 < lm_task.vocab < 200
    # validation windows come from held-out blocks: none of them appears in the training stream
    train = lm_task.train_data
    val = lm_task.val_windows
    n_val, n_train = val[:, 1:].numel(), len(train)
    assert 0.05 < n_val / (n_train + n_val) < 0.2 or len(val) == 64
    w = val[0]
    hits = (train.unfold(0, len(w), 1) == w).all(1).any()
    assert not hits


def test_lm_batches_are_next_character_pairs(lm_task):
    gen = torch.Generator().manual_seed(0)
    x, y = lm_task.batch(0, gen)
    assert x.shape == y.shape == (lm_task.batch_size, lm_task.context)
    assert torch.equal(x[:, 1:], y[:, :-1])
    model = lm_task.make_model(0, torch.float32)
    assert model(x).shape == (*x.shape, lm_task.vocab)
    loss, acc = lm_task.evaluate(model)
    assert abs(loss - math.log(lm_task.vocab)) < 0.5 and 0 <= acc <= 1  # untrained: ~uniform


def test_digits_split_is_stratified_and_fixed():
    plain = tasks.DigitsTask(noise=0.0, shift=False)
    counts = torch.bincount(plain.y_va, minlength=10)
    assert counts.min() >= 34 and counts.max() <= 38
    assert len(plain.x_tr) + len(plain.x_va) == 1797
    a, b = tasks.DigitsTask(), tasks.DigitsTask()
    assert torch.equal(a.x_va, b.x_va) and torch.equal(a.y_va, b.y_va)  # validation fixed once
    assert len(a.x_va) == 10 * len(plain.x_va) and torch.equal(a.y_va, plain.y_va.repeat(10))


def test_digits_augmentation_shifts_and_adds_noise():
    task = tasks.DigitsTask(noise=0.0, shift=True)
    img = torch.zeros(1, 64)
    img[0, 3 * 8 + 4] = 1.0  # one lit pixel at (3, 4)
    moved = task.augment(img.repeat(500, 1), torch.Generator().manual_seed(0))
    where = {tuple(divmod(int(i), 8)) for i in moved.argmax(1)}
    assert where == {(r, c) for r in (2, 3, 4) for c in (3, 4, 5)}  # all 9 shifts, nothing else
    assert torch.equal(moved.sum(1), torch.ones(500))
    noisy = tasks.DigitsTask(noise=0.2, shift=False).augment(img.repeat(4000, 1), torch.Generator().manual_seed(0))
    assert abs((noisy - img).std().item() - 0.2) < 0.01


def test_tensor_bytes_counts_shared_storage_once():
    t = torch.zeros(10)
    assert tasks.tensor_bytes([t, t, {"a": t.view(2, 5)}, 3.0]) == 40
    assert tasks.tensor_bytes([t, torch.zeros(3, dtype=torch.uint8)]) == 43


def test_lr_factor_warms_up_then_decays_to_zero():
    assert tasks.lr_factor(0, 100, 10) == pytest.approx(0.1)
    assert tasks.lr_factor(9, 100, 10) == pytest.approx(1.0)
    assert tasks.lr_factor(10, 100, 10) == pytest.approx(1.0)
    assert tasks.lr_factor(55, 100, 10) == pytest.approx(0.5)
    assert tasks.lr_factor(100, 100, 10) == pytest.approx(0.0, abs=1e-12)


# ---------------------------------------------------------------------------------- runs
def _expected_state_bytes(model: torch.nn.Module, bits: int) -> float:
    """State bytes per parameter from the format: 8-bit tensors (>= 4096 elements) take a byte
    per element and an fp32 scale per 256, the others fp32; the 256-entry map once."""
    total, n, any8 = 0, 0, False
    for p in model.parameters():
        n += p.numel()
        if bits == 8 and p.numel() >= 4096:
            total += p.numel() + 4 * quant.num_blocks(p.numel(), quant.BLOCK_SIZE)
            any8 = True
        else:
            total += 4 * p.numel()
    return (total + (4 * 256 if any8 else 0)) / n


@pytest.mark.parametrize("config", ["lion32", "lion8", "bf16-sr-lion8", "adamw"])
def test_run_measures_memory_from_the_state(config):
    rec = compare.run_job(compare.Job("digits", config, 0, True))
    model = tasks.DigitsTask().make_model(0, torch.float32)
    n = sum(p.numel() for p in model.parameters())
    assert rec["n_params"] == n
    spec = compare.CONFIGS[config]
    weight = 2.0 if spec.param_dtype == torch.bfloat16 else 4.0
    assert rec["weight_bytes_per_param"] == weight
    if config == "adamw":
        # exp_avg and exp_avg_sq, fp32, plus one scalar step tensor per parameter tensor
        assert rec["state_bytes_per_param"] == pytest.approx(8.0, abs=0.01)
    else:
        assert rec["state_bytes_per_param"] == pytest.approx(_expected_state_bytes(model, spec.optim_bits), rel=1e-12)
    assert rec["total_bytes_per_param"] == pytest.approx(rec["weight_bytes_per_param"] + rec["state_bytes_per_param"])
    assert rec["final_val_loss"] < rec["val_loss"][0]  # it trained
    assert rec["eval_steps"][-1] == compare.HYPER["digits"].quick_steps


def test_runs_are_reproducible_and_paired():
    a = compare.run_job(compare.Job("digits", "bf16-sr-lion8", 1, True))
    b = compare.run_job(compare.Job("digits", "bf16-sr-lion8", 1, True))
    assert a["val_loss"] == b["val_loss"]
    # paired: every configuration starts from the same weights, so the same initial loss
    c = compare.run_job(compare.Job("digits", "lion32", 1, True))
    assert c["val_loss"][0] == pytest.approx(a["val_loss"][0], rel=1e-2)
    d = compare.run_job(compare.Job("digits", "lion32", 2, True))
    assert d["val_loss"][0] != c["val_loss"][0]


def test_sr_config_reaches_the_optimizer():
    build = compare.build_optimizer(compare.CONFIGS["bf16-sr-lion8"], compare.HYPER["digits"].lion, seed=4)
    opt = build([torch.nn.Parameter(torch.zeros(10, dtype=torch.bfloat16))])
    assert isinstance(opt, lionkit.Lion) and opt.stochastic_rounding and opt.sr_seed == 4
    assert opt.param_groups[0]["optim_bits"] == 8


# ---------------------------------------------------------------------------------- summary
def _summary(lion32, lion8, sr, nosr=None, adamw=None, task="charlm"):
    def entry(vals):
        return {"final_val_loss": compare._stats(vals)}

    per = {"lion32": entry(lion32), "lion8": entry(lion8), "bf16-sr-lion8": entry(sr)}
    if nosr:
        per["bf16-lion8"] = entry(nosr)
    if adamw:
        per["adamw"] = entry(adamw)
    return {task: per}


def test_goals_pass_and_fail_on_the_numbers():
    ok = compare.goals(_summary([1.00, 1.02, 0.98], [1.005, 0.995, 1.0], [1.01, 1.0, 1.02], [1.1] * 3, [1.0] * 3))
    by = {g["goal"]: g for g in ok}
    assert all(g["met"] for name, g in by.items() if not name.startswith("(shown"))
    assert not by["(shown for contrast, no goal) bf16 weights without SR + 8-bit vs fp32 Lion"]["met"]
    bad = compare.goals(_summary([1.00, 1.001, 0.999], [1.008] * 3, [1.03] * 3, None, [0.9] * 3))
    by = {g["goal"]: g for g in bad}
    # 0.8% off but outside a tight 32-bit spread: not met
    assert not by["Lion8bit within 1% of Lion 32-bit and within the 32-bit seed spread"]["met"]
    assert "outside" in by["Lion8bit within 1% of Lion 32-bit and within the 32-bit seed spread"]["detail"]
    assert not by["bf16 weights + SR + 8-bit within 2% of fp32 Lion"]["met"]
    assert not by["Lion no worse than AdamW + 2% on the language model"]["met"]
    # better than every 32-bit seed (and within 1%): met, and said to be below the spread
    better = compare.goals(_summary([1.00, 1.001, 0.999], [0.995] * 3, [1.0] * 3))
    g = {g["goal"]: g for g in better}["Lion8bit within 1% of Lion 32-bit and within the 32-bit seed spread"]
    assert g["met"] and "below (better)" in g["detail"]
    # better by more than 1%: not within 1%
    far = compare.goals(_summary([1.00, 1.001, 0.999], [0.985] * 3, [1.0] * 3))
    assert not {g["goal"]: g for g in far}["Lion8bit within 1% of Lion 32-bit and within the 32-bit seed spread"]["met"]


def test_diverged_runs_are_reported_not_averaged():
    s = compare._stats([1.0, math.inf, 1.2])
    assert s["mean"] == math.inf
    assert compare._fmt_loss(s) == "diverged"


# ---------------------------------------------------------------------------------- end to end
def test_quick_run_writes_json_png_and_markdown(tmp_path, capsys):
    payload = compare.run(["digits"], ["lion32", "lion8", "bf16-sr-lion8", "bf16-lion8"], [0, 1], str(tmp_path),
                          quick=True, jobs=1, quiet=True)
    data = json.loads((tmp_path / "compare.json").read_text())
    assert data["summary"]["digits"]["lion8"]["seeds"] == [0, 1]
    assert len(data["runs"]) == 8
    assert data["meta"]["quick"] is True and data["steps"]["digits"] == compare.HYPER["digits"].quick_steps
    assert (tmp_path / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (tmp_path / "compare.md").read_text()
    assert "| configuration | final val loss (mean ± std) |" in md
    assert "Lion8bit (fp32 weights)" in md and "## Goals" in md
    out = capsys.readouterr().out
    assert "Lion8bit, bf16 weights + SR" in out and "wrote" in out
    assert {g["goal"] for g in payload["goals"]} >= {"bf16 weights + SR + 8-bit within 2% of fp32 Lion"}
    # --from-json rewrites the plot and the tables from the saved runs, training nothing
    again = tmp_path / "again"
    assert cli.main(["compare", "--from-json", str(tmp_path / "compare.json"), "--out", str(again)]) == 0
    assert (again / "compare.md").read_text() == md
    assert (again / "compare.png").read_bytes()[:4] == b"\x89PNG"
    assert "runs read from " in capsys.readouterr().out  # not "runs in N s": nothing trained now
    # a missing or foreign file is a usage error
    assert cli.main(["compare", "--from-json", str(tmp_path / "nope.json")]) == 2
    assert "--from-json" in capsys.readouterr().err
    (tmp_path / "other.json").write_text("[1, 2]")
    assert cli.main(["compare", "--from-json", str(tmp_path / "other.json")]) == 2
    assert "not a compare.json" in capsys.readouterr().err


def test_quick_cli_runs_both_tasks(tmp_path, capsys, lm_task):
    # the CI smoke run of the command itself: both tasks, every default configuration
    assert cli.main(["compare", "--quick", "--seeds", "1", "--jobs", "1", "--quiet", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "compare.json").read_text())
    assert set(data["summary"]) == {"charlm", "digits"}
    for task in ("charlm", "digits"):
        assert set(data["summary"][task]) == set(compare.DEFAULT_CONFIGS)
        for entry in data["summary"][task].values():
            assert math.isfinite(entry["final_val_loss"]["mean"]) and entry["diverged"] == 0
    assert data["tasks"]["charlm"]["corpus_sha256"] == lm_task.corpus_sha256
    out = capsys.readouterr().out
    assert "charlm:" in out and "digits:" in out and "compare.png" in out


def test_worker_processes_give_the_same_numbers_as_in_process(tmp_path):
    one = compare.run(["digits"], ["lion8"], [0, 1], str(tmp_path / "a"), quick=True, jobs=1, quiet=True)
    two = compare.run(["digits"], ["lion8"], [0, 1], str(tmp_path / "b"), quick=True, jobs=2, quiet=True)
    assert [r["val_loss"] for r in one["runs"]] == [r["val_loss"] for r in two["runs"]]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--configs", "lion32,bogus"], "Invalid --configs: 'lion32,bogus'"),
        (["--tasks", "imagenet"], "Invalid --tasks: 'imagenet'"),
        (["--seeds", "0"], "Invalid --seeds: 0 (must be >= 1)"),
        (["--jobs", "0"], "Invalid --jobs: 0"),
    ],
)
def test_cli_refuses_bad_options(argv, message, capsys):
    assert cli.main(["compare", *argv]) == 2
    assert message in capsys.readouterr().err


def test_cli_help(capsys):
    assert cli.main(["compare", "--help"]) == 0
    out = capsys.readouterr().out
    for option in ("--quick", "--seeds", "--configs", "--tasks", "--jobs", "--out"):
        assert option in out


# ---------------------------------------------------------------------------------- 4-bit study
def _fourbit_study():
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "fourbit_study.py"
    if not path.exists():
        pytest.skip("scripts/fourbit_study.py is not part of this installation")
    import sys

    if "fourbit_study" not in sys.modules:
        spec = importlib.util.spec_from_file_location("fourbit_study", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules["fourbit_study"] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
    return sys.modules["fourbit_study"]


def test_fourbit_study_simulator_is_the_real_lion8bit():
    # the study's numbers mean something only if its simulated 8-bit format is Lion8bit itself
    assert _fourbit_study().check_simulator(steps=30) == 0.0


def test_fourbit_study_maps_and_stochastic_quantizer():
    fb = _fourbit_study()
    for make in (fb.linear_map, fb.dynamic_map, fb.normal_quantile_map):
        q = make(4)
        assert len(q) == 15 and q[0] == -1 and q[-1] == 1 and (q == 0).any() and (q[1:] > q[:-1]).all()
    # stochastic quantization is unbiased: mean of many quantizations ~ the value
    q = fb.dynamic_map(4)
    x = torch.tensor([0.3, -0.07, 0.6, 1.0] * 64)  # 256 elements = one block, absmax 1
    gen = torch.Generator().manual_seed(0)
    mean = torch.stack([fb.quantize(x, q, 256, True, gen)[0] for _ in range(4000)]).mean(0)
    assert (mean - x).abs().max() < 0.01
    # rounding to nearest is not: 0.3 lies between the levels 0.25 and 0.5 and always goes to 0.25
    assert fb.quantize(x, q, 256, False, None)[0][0] == 0.25
