"""config.py: validation at construction, args, GlobalOptimManager overrides."""

from __future__ import annotations

import pytest
import torch

import lionkit
from lionkit import GlobalOptimManager


def _p(n=5000):
    return torch.nn.Parameter(torch.randn(n))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(lr=-1e-3), r"Invalid learning rate: -0\.001"),
        (dict(lr=float("nan")), r"Invalid learning rate: nan"),
        (dict(betas=(1.0, 0.99)), r"Invalid beta at index 0: 1\.0"),
        (dict(betas=(0.9, -0.1)), r"Invalid beta at index 1: -0\.1"),
        (dict(betas=(0.9,)), r"Invalid betas: \(0\.9,\)"),
        (dict(weight_decay=-0.1), r"Invalid weight_decay: -0\.1"),
        (dict(optim_bits=16), r"Invalid optim_bits: 16"),
        (dict(percentile_clipping=0), r"Invalid percentile_clipping: 0"),
        (dict(percentile_clipping=101), r"Invalid percentile_clipping: 101"),
        (dict(percentile_clipping=50.5), r"Invalid percentile_clipping: 50\.5"),
        (dict(min_8bit_size=-1), r"Invalid min_8bit_size: -1"),
        (dict(block_wise="yes"), r"Invalid block_wise: 'yes'"),
        (dict(grad_clip_norm=-1.0), r"Invalid grad_clip_norm: -1\.0"),
        (dict(grad_clip_value=-0.5), r"Invalid grad_clip_value: -0\.5"),
        (dict(grad_clip_value=0.0), r"Invalid grad_clip_value: 0\.0"),
    ],
)
def test_bad_hyperparameters_raise_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        lionkit.Lion([_p()], **kwargs)


def test_bad_group_values_raise():
    with pytest.raises(ValueError, match=r"Invalid learning rate: -1"):
        lionkit.Lion([{"params": [_p()], "lr": -1}])
    opt = lionkit.Lion([_p()])
    with pytest.raises(ValueError, match=r"Invalid beta at index 1: 1"):
        opt.add_param_group({"params": [_p()], "betas": (0.9, 1)})


def test_args_with_max_unorm_is_refused():
    class Args:
        optim_bits, min_8bit_size, percentile_clipping, block_wise, max_unorm = 8, 4096, 100, True, 1.0

    with pytest.raises(ValueError, match=r"Invalid max_unorm: 1\.0"):
        lionkit.Lion8bit([_p()], args=Args())


def test_manager_is_a_singleton():
    assert GlobalOptimManager.get_instance() is GlobalOptimManager.get_instance()
    with pytest.raises(RuntimeError, match="get_instance"):
        GlobalOptimManager()


@pytest.mark.parametrize("when", ["before", "after"])
def test_override_config_before_or_after_building(when):
    emb, lin = _p(8000), _p(8000)
    mng = GlobalOptimManager.get_instance()
    if when == "before":
        mng.register_parameters([emb, lin])
        mng.override_config(emb, "optim_bits", 32)
    opt = lionkit.Lion8bit([emb, lin], lr=1e-3)
    if when == "after":
        mng.override_config(emb, "optim_bits", 32)
    emb.grad, lin.grad = torch.randn(8000), torch.randn(8000)
    opt.step()
    assert opt.state[emb]["state1"].dtype == torch.float32
    assert opt.state[lin]["state1"].dtype == torch.uint8


def test_override_after_first_step_converts_state():
    p = _p(8000)
    opt = lionkit.Lion8bit([p], lr=1e-3)
    p.grad = torch.randn(8000)
    opt.step()
    codes = opt.state[p]["state1"]
    m8 = lionkit.QuantizedState(codes, opt.state[p]["absmax1"], opt.state[p]["qmap1"]).dequantize()
    GlobalOptimManager.get_instance().override_config(p, key_value_dict={"optim_bits": 32})
    g = torch.randn(8000)
    p.grad = g
    opt.step()
    m = opt.state[p]["state1"]
    assert m.dtype == torch.float32 and "absmax1" not in opt.state[p]
    torch.testing.assert_close(m, 0.99 * m8 + 0.01 * g)


def test_module_override_keeps_embedding_32bit_and_follows_replacement():
    model = torch.nn.Sequential(torch.nn.Embedding(1000, 16), torch.nn.Linear(16, 1000))
    mng = GlobalOptimManager.get_instance()
    mng.register_module_override(model[0], "weight", {"optim_bits": 32})
    opt = lionkit.Lion8bit(model.parameters(), lr=1e-3)
    model(torch.tensor([[1, 2, 3]])).sum().backward()
    opt.step()
    assert opt.state[model[0].weight]["state1"].dtype == torch.float32
    assert opt.state[model[1].weight]["state1"].dtype == torch.uint8
    with pytest.raises(ValueError, match="has no attribute 'nope'"):
        mng.register_module_override(model[0], "nope", {"optim_bits": 32})


def test_override_values_are_validated():
    mng = GlobalOptimManager.get_instance()
    with pytest.raises(ValueError, match="Invalid optim_bits: 16"):
        mng.override_config(_p(), "optim_bits", 16)
    with pytest.raises(ValueError, match="Invalid config key: 'optim_bitz'"):
        mng.override_config(_p(), "optim_bitz", 8)


def test_override_group_hyperparameters_per_parameter():
    a, b = torch.nn.Parameter(torch.zeros(4)), torch.nn.Parameter(torch.zeros(4))
    GlobalOptimManager.get_instance().override_config(b, "lr", 0.5)
    opt = lionkit.Lion([a, b], lr=0.1)
    a.grad, b.grad = torch.ones(4), torch.ones(4)
    opt.step()
    assert a[0].item() == pytest.approx(-0.1) and b[0].item() == pytest.approx(-0.5)


def test_numpy_hyperparameters_are_stored_as_plain_values():
    # np.logspace sweeps: numpy scalars pass the checks, and must not make the state dict
    # unloadable with torch.load(weights_only=True)
    import io

    import numpy as np

    p = torch.nn.Parameter(torch.randn(5000))
    q = torch.nn.Parameter(torch.randn(10))
    opt = lionkit.Lion8bit(
        [p], lr=np.float64(1e-3), betas=np.array([0.9, 0.99]), weight_decay=np.float64(0.1),
        min_8bit_size=np.int64(100), percentile_clipping=np.int64(50), grad_clip_value=np.float32(1.0),
    )
    opt.add_param_group({"params": [q], "weight_decay": np.float32(0.5), "betas": [np.float64(0.8), 0.9]})
    for group in opt.param_groups:
        for key in ("lr", "weight_decay", "min_8bit_size", "percentile_clipping"):
            assert type(group[key]) in (int, float), (key, type(group[key]))
        assert all(type(b) is float for b in group["betas"])
    assert type(opt.param_groups[1]["betas"]) is list  # a list given stays a list
    for t in (p, q):
        t.grad = torch.randn_like(t)
    opt.param_groups[0]["weight_decay"] = np.float64(0.2)  # set by hand between steps
    opt.step()
    assert type(opt.param_groups[0]["weight_decay"]) is float
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    torch.load(buf, weights_only=True)
    # set by hand between planned steps (which do not rewrite the groups): the state dict is
    # still plain
    opt = lionkit.Lion8bit([{"params": [p]}, {"params": [q]}], min_8bit_size=100)
    for t in (p, q):
        t.grad = torch.randn_like(t)
    opt.step()
    opt.step()
    assert opt._plan is not None
    opt.param_groups[0]["lr"] = np.float64(5e-4)  # a new lr: still planned
    opt.param_groups[1]["betas"] = (np.float64(0.9), np.float64(0.99))  # equal values: still planned
    planned = []
    real = opt._planned_step
    opt._planned_step = lambda plan: planned.append(real(plan)) or planned[-1]
    opt.step()
    assert planned == [True]
    assert type(opt.param_groups[0]["lr"]) is np.float64  # the planned step leaves the groups as they are
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    assert loaded["param_groups"][0]["lr"] == 5e-4 and loaded["param_groups"][1]["betas"] == (0.9, 0.99)


def test_register_parameters_takes_param_groups_like_an_optimizer():
    mng = lionkit.GlobalOptimManager.get_instance()
    a, b, c = (torch.nn.Parameter(torch.zeros(3)) for _ in range(3))
    mng.register_parameters([{"params": [a, b]}, {"params": c}])
    assert [r() for r in mng._registered] == [a, b, c]
    with pytest.raises(ValueError, match="expects tensors or param-group dicts, got str"):
        mng.register_parameters([{"params": ["x"]}])


def test_is_paged_in_bitsandbytes_050_position_gets_a_hint():
    p = torch.nn.Parameter(torch.zeros(3))
    # bitsandbytes 0.50: (params, lr, betas, weight_decay, args, min_8bit_size, is_paged)
    with pytest.raises(ValueError, match=r"Invalid percentile_clipping: False .*pass is_paged by keyword"):
        lionkit.Lion8bit([p], 1e-4, (0.9, 0.99), 0.0, None, 4096, False)
