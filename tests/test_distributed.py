"""FSDP2 (DTensor parameters) and torch.distributed.checkpoint on 2 gloo ranks spawned by the
test, compared step by step with one process holding the whole tensors.

One spawned group (processes are slow to start) runs every check and writes what it measured;
the tests below assert on it. What must hold:

- sharded steps equal unsharded ones bit for bit (8-bit block-wise, including blocks cut by
  shard boundaries and ranks with an empty shard; 8-bit per-tensor; fp32), and 8-bit vs fp32 is
  decided by the global size;
- with global-norm and percentile clipping the norm is a sum in another order: equal to within
  fp32 rounding (a few sign flips at most);
- torch.distributed.checkpoint saves on 2 ranks and loads on 1, and the reverse, and training
  continues exactly as if uninterrupted; the full state dict equals the unsharded optimizer's.
"""

from __future__ import annotations

import copy
import json
import math
import os

import pytest
import torch
from dist_helpers import WORLD, init, require_gloo, spawn

import lionkit

LR = 1e-2
STEPS = 5
# What each shape does on 2 ranks (FSDP2 splits dim 0 like torch.chunk):
#   (33, 100): rows 17 | 16, the boundary at element 1700 cuts 8-bit block 6 in two
#   (5000,):   2500 | 2500, 8-bit by its global size although each shard is below MIN_8BIT
#   (64, 256): the boundary at 8192 falls between blocks
#   (9, 520):  rows 5 | 4, the boundary at 2600 cuts block 10
#   (1, 3500): all on rank 0, rank 1's shard is empty (8-bit)
#   (1, 300), (3, 7): small, fp32 state
SHAPES = [(33, 100), (5000,), (64, 256), (9, 520), (1, 3500), (1, 300), (3, 7)]
MIN_8BIT = 3000
CONFIGS = {
    "8bit": dict(optim_bits=8, min_8bit_size=MIN_8BIT, weight_decay=0.1),
    "8bit-per-tensor": dict(optim_bits=8, min_8bit_size=MIN_8BIT, block_wise=False, weight_decay=0.1),
    "32bit": dict(optim_bits=32, weight_decay=0.1),
    "8bit-clipping": dict(optim_bits=8, min_8bit_size=MIN_8BIT, percentile_clipping=80, grad_clip_norm=100.0),
    # the same sharded path on the plain PyTorch kernels ("auto" picks the compiled CPU kernel)
    "8bit-torch-backend": dict(optim_bits=8, min_8bit_size=MIN_8BIT, weight_decay=0.1, backend="torch"),
}
EXACT = ("8bit", "8bit-per-tensor", "32bit", "8bit-torch-backend")
DCP_CONFIGS = ("8bit", "8bit-per-tensor", "32bit")
DCP_FIRST, DCP_TOTAL = 3, 6


# ------------------------------------------------------------------------------ shared pieces
class Params(torch.nn.Module):
    """A bag of parameters of the shapes above, the same on every rank (seeded)."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.ps = torch.nn.ParameterList([torch.nn.Parameter(torch.randn(s, generator=gen)) for s in SHAPES])


def full_grads(step: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + step)
    return [torch.randn(s, generator=gen) * (1 + step) for s in SHAPES]


def set_grads(params, step: int) -> None:
    from torch.distributed.tensor import DTensor, distribute_tensor

    for p, g in zip(params, full_grads(step)):
        p.grad = distribute_tensor(g, p.device_mesh, p.placements) if isinstance(p, DTensor) else g


def full_values(params) -> list[torch.Tensor]:
    from torch.distributed.tensor import DTensor

    return [p.detach().full_tensor() if isinstance(p, DTensor) else p.detach().clone() for p in params]


def plain_state(opt) -> dict:
    """The optimizer's state dict with whole tensors (gathered where sharded)."""
    from torch.distributed.tensor import DTensor

    sd = opt.state_dict()
    return {
        k: {n: (v.full_tensor() if isinstance(v, DTensor) else v) for n, v in st.items()}
        for k, st in sd["state"].items()
    }


def state_diff(a: dict, b: dict) -> dict:
    """Largest differences between two plain_state results: momentum (dequantized) and scales."""
    out = {"codes_differ": 0, "momentum_max_abs": 0.0, "absmax_max_rel": 0.0, "keys_equal": True}
    for k in b:
        sa, sb = a[k], b[k]
        out["keys_equal"] &= sorted(sa) == sorted(sb)
        if sb["state1"].dtype == torch.uint8:
            out["codes_differ"] += int((sa["state1"] != sb["state1"]).sum())
            block = None if sb["absmax1"].numel() == 1 and sb["state1"].numel() > 256 else 256
            ma = lionkit.QuantizedState(sa["state1"], sa["absmax1"], sa["qmap1"], block).dequantize()
            mb = lionkit.QuantizedState(sb["state1"], sb["absmax1"], sb["qmap1"], block).dequantize()
            rel = ((sa["absmax1"] - sb["absmax1"]).abs() / sb["absmax1"].clamp_min(1e-30)).max()
            out["absmax_max_rel"] = max(out["absmax_max_rel"], float(rel))
        else:
            ma, mb = sa["state1"], sb["state1"]
        out["momentum_max_abs"] = max(out["momentum_max_abs"], float((ma - mb).abs().max()))
    return out


def param_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> dict:
    differ = sum(int((x != y).sum()) for x, y in zip(a, b))
    total = sum(x.numel() for x in b)
    return {
        "max_abs": max(float((x - y).abs().max()) for x, y in zip(a, b)),
        "differ": differ,
        "fraction": differ / total,
    }


def train(model, opt, steps) -> None:
    for s in steps:
        set_grads(list(model.ps), s)
        opt.step()


# ------------------------------------------------------------------------------ the ranks
def _equivalence(rank: int, out: dict) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from lionkit import distributed

    mesh = init_device_mesh("cpu", (WORLD,))
    for name, kw in CONFIGS.items():
        model = Params()
        fully_shard(model, mesh=mesh)
        ref = Params()
        opt = lionkit.Lion(model.parameters(), lr=LR, **kw)
        ropt = lionkit.Lion(ref.parameters(), lr=LR, **kw)
        steps = []
        for step in range(STEPS):
            train(model, opt, [step])
            train(ref, ropt, [step])
            steps.append(
                {"params": param_diff(full_values(model.ps), full_values(ref.ps)),
                 "state": state_diff(plain_state(opt), plain_state(ropt))}
            )
        ps = list(model.ps)
        out[name] = {
            "steps": steps,
            "eight": [opt.state[p]["state1"].dtype == torch.uint8 for p in ps],
            "ref_eight": [ropt.state[p]["state1"].dtype == torch.uint8 for p in ref.ps],
            "local_numel": [p.to_local().numel() for p in ps],
            "shared_blocks": [len(distributed.layout(p).shared) for p in ps],
        }
        if name == "8bit-clipping":
            # the clipping really acted: an unclipped run ends elsewhere
            free = Params()
            fopt = lionkit.Lion(free.parameters(), lr=LR, **{**kw, "percentile_clipping": 100, "grad_clip_norm": None})
            train(free, fopt, range(STEPS))
            out[name]["unclipped_differs"] = param_diff(full_values(free.ps), full_values(ref.ps))["differ"] > 0


def _other_layouts(rank: int, out: dict) -> None:
    """Placements other than FSDP2's: tensor-parallel Shard(1), and HSDP's 2-D mesh."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (WORLD,))
    mesh2 = init_device_mesh("cpu", (1, WORLD), mesh_dim_names=("replicate", "shard"))
    gen = torch.Generator().manual_seed(5)
    full = torch.randn(6, 700, generator=gen)
    grads = [torch.randn(6, 700, generator=gen) for _ in range(STEPS)]
    cases = {
        "shard1-32bit": (mesh, [Shard(1)], dict(optim_bits=32)),
        "shard1-8bit-per-tensor": (mesh, [Shard(1)], dict(optim_bits=8, min_8bit_size=1, block_wise=False)),
        "hsdp-8bit": (mesh2, [Replicate(), Shard(0)], dict(optim_bits=8, min_8bit_size=1)),
    }
    for name, (m, placements, kw) in cases.items():
        p = torch.nn.Parameter(distribute_tensor(full.clone(), m, placements))
        r = torch.nn.Parameter(full.clone())
        opt, ropt = lionkit.Lion([p], lr=LR, **kw), lionkit.Lion([r], lr=LR, **kw)
        for g in grads:
            p.grad = distribute_tensor(g.clone(), m, placements)
            r.grad = g.clone()
            opt.step()
            ropt.step()
        out[name] = param_diff([p.detach().full_tensor()], [r.detach()])["max_abs"]
    # bf16 parameters with stochastic rounding: each element lands on one of the two bf16
    # neighbours of the fp32 (unsharded, unrounded) result, and not always on the nearest
    p = torch.nn.Parameter(distribute_tensor(full.clone().bfloat16(), mesh, [Shard(0)]))
    p.grad = distribute_tensor(grads[0].clone().bfloat16(), mesh, [Shard(0)])
    r = torch.nn.Parameter(full.clone().bfloat16().float())
    r.grad = grads[0].clone().bfloat16().float()
    lionkit.Lion8bit([p], lr=LR, min_8bit_size=1, stochastic_rounding=True, sr_seed=1).step()
    lionkit.Lion8bit([r], lr=LR, min_8bit_size=1).step()
    got, want = p.detach().full_tensor().float(), r.detach()
    ulp = want.abs() * 2.0**-7 + 1e-30
    out["sr-within-one-ulp"] = bool(((got - want).abs() <= ulp).all())
    out["sr-not-nearest"] = int((got != want.bfloat16().float()).sum())
    # 8-bit block-wise needs shards that are contiguous in the flattened tensor: a clear error
    p = torch.nn.Parameter(distribute_tensor(full.clone(), mesh, [Shard(1)]))
    p.grad = distribute_tensor(grads[0].clone(), mesh, [Shard(1)])
    try:
        lionkit.Lion8bit([p], lr=LR, min_8bit_size=1).step()
        out["shard1-8bit-blockwise-error"] = None
    except ValueError as e:
        out["shard1-8bit-blockwise-error"] = str(e)


def _nonfinite(rank: int, out: dict) -> None:
    """A NaN in rank 0's shard only: both ranks must skip (or raise) the same step."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (WORLD,))
    for policy in ("skip", "raise"):
        p = torch.nn.Parameter(distribute_tensor(torch.ones(8, 40), mesh, [Shard(0)]))
        local = torch.ones(4, 40)
        if rank == 0:
            local[1, 3] = float("nan")
        p.grad = DTensor.from_local(local, mesh, [Shard(0)], run_check=False)
        opt = lionkit.Lion([p], lr=LR, nonfinite=policy)
        try:
            opt.step()
            out[policy] = {"skipped": opt.skipped_steps, "unchanged": bool((p.to_local() == 1).all())}
        except lionkit.NonFiniteGradientError as e:
            out[policy] = {"raised": str(e)[:80], "unchanged": bool((p.to_local() == 1).all())}


def _model_run(rank: int, out: dict) -> None:
    """A real FSDP2 model: forward, backward (reduce-scatter), Lion8bit; same batch on both
    ranks, so the averaged gradient equals the single-process one."""
    from torch.distributed.fsdp import fully_shard

    def build():
        torch.manual_seed(3)
        return torch.nn.Sequential(torch.nn.Linear(40, 300), torch.nn.Tanh(), torch.nn.Linear(300, 257))

    model, ref = build(), build()
    for layer in (model[0], model[2]):
        fully_shard(layer)
    fully_shard(model)
    kw = dict(lr=LR, min_8bit_size=1000, weight_decay=0.1)
    opt, ropt = lionkit.Lion8bit(model.parameters(), **kw), lionkit.Lion8bit(ref.parameters(), **kw)
    gen = torch.Generator().manual_seed(7)
    diffs = []
    for _ in range(4):
        x = torch.randn(16, 40, generator=gen)
        for m, o in ((model, opt), (ref, ropt)):
            o.zero_grad()
            m(x).square().mean().backward()
            o.step()
        diffs.append(param_diff(full_values(model.parameters()), full_values(ref.parameters()))["max_abs"])
    out["max_abs_per_step"] = diffs


def _checkpoints(rank: int, folder: str, out: dict) -> None:
    """Save on 2 ranks; load the parent's 1-process checkpoint on 2 ranks and continue."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
        get_state_dict,
        set_state_dict,
    )
    from torch.distributed.fsdp import fully_shard

    for name in DCP_CONFIGS:
        kw = CONFIGS[name]
        # save after DCP_FIRST steps on 2 ranks
        model = Params()
        fully_shard(model)
        opt = lionkit.Lion(model.parameters(), lr=LR, **kw)
        train(model, opt, range(DCP_FIRST))
        msd, osd = get_state_dict(model, opt)
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=os.path.join(folder, f"{name}-two"))
        full = get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True))
        if rank == 0:
            torch.save(full, os.path.join(folder, f"{name}-full.pt"))
        # load the 1-process checkpoint into a fresh 2-rank model and optimizer, continue
        model2 = Params()
        fully_shard(model2)
        opt2 = lionkit.Lion(model2.parameters(), lr=LR, **kw)
        msd2, osd2 = get_state_dict(model2, opt2)
        dcp.load({"model": msd2, "optim": osd2}, checkpoint_id=os.path.join(folder, f"{name}-one"))
        set_state_dict(model2, opt2, model_state_dict=msd2, optim_state_dict=osd2)
        out.setdefault("steps_after_load", {})[name] = [opt2.state[p]["step"] for p in model2.ps]
        train(model2, opt2, range(DCP_FIRST, DCP_TOTAL))
        values = full_values(model2.ps)
        if rank == 0:
            torch.save(values, os.path.join(folder, f"{name}-two-from-one.pt"))
        # the 1-process run's plain state_dict (whole tensors, by index) loads with the ordinary
        # load_state_dict too; (1, 3500) is whole on rank 0, where a per-tensor state already
        # has the local shape (it was stepped as if block-wise and failed)
        model3 = Params()
        fully_shard(model3)
        opt3 = lionkit.Lion(model3.parameters(), lr=LR, **kw)
        train(model3, opt3, range(DCP_FIRST))
        opt3.load_state_dict(torch.load(os.path.join(folder, f"{name}-plain.pt"), weights_only=True))
        train(model3, opt3, range(DCP_FIRST, DCP_TOTAL))
        values3 = full_values(model3.ps)
        if rank == 0:
            torch.save(values3, os.path.join(folder, f"{name}-two-from-plain.pt"))


def _worker(rank: int, port: int, folder: str) -> None:
    import torch.distributed as dist

    init(rank, port)
    out: dict = {}
    _equivalence(rank, out.setdefault("equivalence", {}))
    _other_layouts(rank, out.setdefault("layouts", {}))
    _nonfinite(rank, out.setdefault("nonfinite", {}))
    _model_run(rank, out.setdefault("model", {}))
    _checkpoints(rank, folder, out.setdefault("checkpoints", {}))
    with open(os.path.join(folder, f"rank{rank}.json"), "w") as f:
        json.dump(out, f, indent=1)
    dist.destroy_process_group()


# ------------------------------------------------------------------------------ the tests
def _single_process_checkpoints(folder: str) -> dict:
    """Before the spawn: the uninterrupted runs, and 1-process DCP checkpoints after DCP_FIRST."""
    import warnings

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    refs = {}
    for name in DCP_CONFIGS:
        kw = CONFIGS[name]
        ref = Params()
        ropt = lionkit.Lion(ref.parameters(), lr=LR, **kw)
        train(ref, ropt, range(DCP_FIRST))
        plain_after_first = copy.deepcopy(ropt.state_dict())  # its inner dicts are the live state
        torch.save(plain_after_first, os.path.join(folder, f"{name}-plain.pt"))
        model = Params()
        opt = lionkit.Lion(model.parameters(), lr=LR, **kw)
        train(model, opt, range(DCP_FIRST))
        msd, osd = get_state_dict(model, opt)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "assuming the intent is to save in a single process"
            dcp.save({"model": msd, "optim": osd}, checkpoint_id=os.path.join(folder, f"{name}-one"))
        train(ref, ropt, range(DCP_FIRST, DCP_TOTAL))
        refs[name] = (full_values(ref.ps), plain_after_first)
    return refs


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    require_gloo()
    pytest.importorskip("torch.distributed.fsdp", reason="needs torch.distributed.fsdp (FSDP2, torch >= 2.6)")
    from torch.distributed import fsdp

    if not hasattr(fsdp, "fully_shard"):
        pytest.skip("torch.distributed.fsdp.fully_shard (FSDP2) needs torch >= 2.6")
    if not hasattr(torch.cpu.Stream, "record_event"):  # FSDP2 records events on the CPU stream
        pytest.skip(f"FSDP2 on CPU tensors needs torch >= 2.7 (torch {torch.__version__}: no torch.cpu.Stream.record_event)")
    folder = str(tmp_path_factory.mktemp("fsdp"))
    refs = _single_process_checkpoints(folder)
    spawn(_worker, folder)
    ranks = []
    for r in range(WORLD):
        with open(os.path.join(folder, f"rank{r}.json")) as f:
            ranks.append(json.load(f))
    return folder, refs, ranks


@pytest.mark.parametrize("name", EXACT)
def test_fsdp2_steps_equal_single_process(run, name):
    _, _, ranks = run
    res = ranks[0]["equivalence"][name]
    for step, d in enumerate(res["steps"]):
        assert d["params"]["max_abs"] == 0.0, f"step {step}: {d}"
        assert d["state"]["momentum_max_abs"] == 0.0 and d["state"]["codes_differ"] == 0, f"step {step}: {d}"
        assert d["state"]["absmax_max_rel"] == 0.0 and d["state"]["keys_equal"], f"step {step}: {d}"
    # the 8-bit choice follows the global size (the same as in one process), not the shard's
    assert res["eight"] == res["ref_eight"]


def test_fsdp2_exercises_cut_blocks_empty_shards_and_global_size(run):
    _, _, ranks = run
    res0, res1 = (r["equivalence"]["8bit"] for r in ranks)
    assert res0["eight"] == [True, True, True, True, True, False, False]
    assert res0["local_numel"][1] < MIN_8BIT  # (5000,) is 8-bit although each shard is smaller
    assert res0["shared_blocks"][0] == 1 and res0["shared_blocks"][3] == 1  # cut blocks exist
    assert res0["shared_blocks"][2] == 0  # an aligned boundary cuts none
    assert res1["local_numel"][4] == 0  # rank 1 holds nothing of (1, 3500)


def test_fsdp2_clipping_uses_global_norms(run):
    _, _, ranks = run
    res = ranks[0]["equivalence"]["8bit-clipping"]
    assert res["unclipped_differs"]
    for step, d in enumerate(res["steps"]):
        # The norm is summed in another order than in one process: scales agree to fp32
        # rounding, so a rare element may round to another code or flip its update's sign.
        # Per-shard (not all-reduced) norms would be off by ~sqrt(2) and fail this by far.
        assert d["state"]["absmax_max_rel"] < 1e-5, f"step {step}: {d}"
        assert d["params"]["fraction"] < 1e-3, f"step {step}: {d}"
        assert d["params"]["max_abs"] <= 2 * LR * (step + 1) + 1e-6, f"step {step}: {d}"


def test_other_placements(run):
    _, _, ranks = run
    lay = ranks[0]["layouts"]
    assert lay["shard1-32bit"] == 0.0
    assert lay["shard1-8bit-per-tensor"] == 0.0
    assert lay["hsdp-8bit"] == 0.0
    assert lay["sr-within-one-ulp"] and lay["sr-not-nearest"] > 0
    msg = lay["shard1-8bit-blockwise-error"]
    assert msg is not None and "block_wise=False" in msg and "Shard(dim=1)" in msg
    assert msg.startswith("parameter 0 of param group 0")


def test_nonfinite_gradient_on_one_rank_stops_both(run):
    _, _, ranks = run
    for r in ranks:
        assert r["nonfinite"]["skip"] == {"skipped": 1, "unchanged": True}
        assert "raised" in r["nonfinite"]["raise"] and r["nonfinite"]["raise"]["unchanged"]


def test_fsdp2_model_forward_backward_matches(run):
    _, _, ranks = run
    assert ranks[0]["model"]["max_abs_per_step"] == [0.0] * 4


@pytest.mark.parametrize("name", DCP_CONFIGS)
def test_dcp_one_process_checkpoint_loads_on_two_ranks(run, name):
    folder, refs, ranks = run
    assert ranks[0]["checkpoints"]["steps_after_load"][name] == [DCP_FIRST] * len(SHAPES)
    got = torch.load(os.path.join(folder, f"{name}-two-from-one.pt"), weights_only=True)
    want, _ = refs[name]
    assert param_diff(got, want)["max_abs"] == 0.0


@pytest.mark.parametrize("name", DCP_CONFIGS)
def test_dcp_two_rank_checkpoint_loads_in_one_process(run, name):
    import warnings

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    folder, refs, _ = run
    model = Params()
    opt = lionkit.Lion(model.parameters(), lr=LR, **CONFIGS[name])
    msd, osd = get_state_dict(model, opt)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "assuming the intent is to load in a single process"
        dcp.load({"model": msd, "optim": osd}, checkpoint_id=os.path.join(folder, f"{name}-two"))
    set_state_dict(model, opt, model_state_dict=msd, optim_state_dict=osd)
    assert all(opt.state[p]["step"] == DCP_FIRST for p in model.ps)
    train(model, opt, range(DCP_FIRST, DCP_TOTAL))
    want, _ = refs[name]
    assert param_diff(full_values(model.ps), want)["max_abs"] == 0.0


@pytest.mark.parametrize("name", DCP_CONFIGS)
def test_plain_state_dict_of_one_process_loads_on_two_ranks(run, name):
    folder, refs, _ = run
    got = torch.load(os.path.join(folder, f"{name}-two-from-plain.pt"), weights_only=True)
    want, _ = refs[name]
    assert param_diff(got, want)["max_abs"] == 0.0


@pytest.mark.parametrize("name", DCP_CONFIGS)
def test_full_state_dict_equals_unsharded_state_dict(run, name):
    folder, refs, _ = run
    full = torch.load(os.path.join(folder, f"{name}-full.pt"), weights_only=True)
    _, plain = refs[name]
    fqns = [f"ps.{i}" for i in range(len(SHAPES))]
    assert sorted(full["state"]) == sorted(fqns)
    for i, fqn in enumerate(fqns):
        a, b = full["state"][fqn], plain["state"][i]
        assert sorted(a) == sorted(b)
        for key in b:
            if isinstance(b[key], torch.Tensor):
                assert torch.equal(a[key], b[key]), (fqn, key)
            else:
                assert a[key] == b[key], (fqn, key)
    # ...so it also loads into a plain optimizer with the ordinary load_state_dict
    model = Params()
    opt = lionkit.Lion(model.parameters(), lr=LR, **CONFIGS[name])
    by_index = {"state": {i: full["state"][f] for i, f in enumerate(fqns)},
                "param_groups": [{**g, "params": list(range(len(fqns)))} for g in full["param_groups"]]}
    opt.load_state_dict(by_index)
    assert math.isclose(opt.param_groups[0]["lr"], LR)


@pytest.mark.parametrize("percentile", [50, 95])
def test_state_made_by_get_state_dict_keeps_percentile_clipping(percentile):
    # get_optimizer_state_dict before the first step (an initial checkpoint) creates the state
    # with one zero-gradient, lr-0 step: its ring of norms held only zeros and clipped every
    # gradient to 0 for 100 - percentile steps
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    def train(state_first: bool) -> list[torch.Tensor]:
        torch.manual_seed(0)
        m = torch.nn.Linear(32, 32)
        opt = lionkit.Lion8bit(m.parameters(), lr=1e-2, min_8bit_size=1, percentile_clipping=percentile)
        if state_first:
            get_optimizer_state_dict(m, opt)
            assert all(opt.state[p]["step"] == 1 for p in m.parameters())
        for s in range(12):
            x = torch.randn(8, 32, generator=torch.Generator().manual_seed(s))
            m(x).square().mean().backward()
            opt.step()
            opt.zero_grad()
        return [p.detach().clone() for p in m.parameters()]

    for a, b in zip(train(False), train(True)):
        assert torch.equal(a, b)
