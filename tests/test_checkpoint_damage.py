"""Damaged and mismatched checkpoints (issue 7): every problem is refused with the parameter and
the problem named, the optimizer is unchanged afterwards, and a crash while saving never leaves a
half-written file in place of the last good one."""

from __future__ import annotations

import copy
import os

import pytest
import torch

import lionkit
from lionkit import quant
from lionkit.checkpoint import CheckpointError, load_checkpoint, save_checkpoint

from test_reliability import assert_same, snapshot

P0 = r"parameter 0 of param group 0 \(shape \(40, 30\)\)"
P1G1 = r"parameter 1 of param group 1 \(shape \(600,\)\)"


def build():
    """Two groups: an 8-bit matrix and a 32-bit vector, then 32-bit small and 8-bit large;
    percentile clipping on, so every kind of state tensor exists."""
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in [(40, 30), (7,), (3, 5), (600,)]]
    opt = lionkit.Lion8bit(
        [{"params": params[:2]}, {"params": params[2:], "lr": 3e-3}],
        lr=1e-2,
        min_8bit_size=100,
        percentile_clipping=90,
    )
    return opt, params


@pytest.fixture
def trained():
    opt, params = build()
    for k in range(3):
        gen = torch.Generator().manual_seed(10 + k)
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
    return opt, params


def _mutate(sd, fn):
    sd = copy.deepcopy(sd)
    fn(sd)
    return sd


def _set(path, value):
    def fn(sd):
        target = sd
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value

    return fn


def _delete(path):
    def fn(sd):
        target = sd
        for key in path[:-1]:
            target = target[key]
        del target[path[-1]]

    return fn


def _bad_qmap(kind):
    q = quant.dynamic_map()
    if kind == "short":
        return q[:255]
    if kind == "unsorted":
        return q.flip(0)
    if kind == "nan":
        q[3] = float("nan")
        return q
    if kind == "no-zero":
        q[127] = 1e-9
        return q
    if kind == "too-large":
        q[-1] = 2.0
        return q
    return q.double()


# (id, mutation, regex the error must match)
DAMAGE = [
    ("state1-shape", _set(("state", 0, "state1"), torch.zeros(30, 40, dtype=torch.uint8)),
     P0 + r": momentum shape \(30, 40\) does not match parameter shape \(40, 30\)"),
    ("fewer-groups", lambda sd: sd["param_groups"].pop(), "state dict has 1 param groups, the optimizer has 2"),
    ("extra-param", lambda sd: sd["param_groups"][1]["params"].append(99),
     "param group 1: state dict has 3 parameters, the optimizer has 2"),
    ("codes-without-absmax", _delete(("state", 0, "absmax1")),
     P0 + r": 8-bit momentum \(uint8 'state1'\) without its scales \('absmax1'\)"),
    ("bnb-per-tensor-max1", lambda sd: (_delete(("state", 0, "absmax1"))(sd), _set(("state", 0, "max1"), torch.ones(1))(sd)),
     P0 + r": bitsandbytes' per-tensor 8-bit state \('max1'.* cannot be loaded"),
    ("absmax-length", _set(("state", 3, "absmax1"), torch.ones(2)),
     P1G1 + r": 'absmax1' must be a float tensor of 3 block scales \(or 1 per-tensor scale\), got \(2,\)"),
    ("absmax-not-float", _set(("state", 0, "absmax1"), torch.ones(5, dtype=torch.int64)), P0 + ": 'absmax1' must be a float"),
    ("absmax-negative", _set(("state", 3, "absmax1"), -torch.ones(3)), P1G1 + ": 'absmax1' holds negative scales"),
    *[
        (f"qmap-{kind}", _set(("state", 0, "qmap1"), _bad_qmap(kind)), P0 + ": 'qmap1' " + msg)
        for kind, msg in [
            ("short", "must be a 1-D float32 tensor of 256 values"),
            ("unsorted", "must be strictly increasing"),
            ("nan", "contains non-finite values"),
            ("no-zero", "must contain 0"),
            ("too-large", r"must lie within \[-1, 1\]"),
            ("double", "must be a 1-D float32 tensor"),
        ]
    ],
    ("momentum-int", _set(("state", 1, "state1"), torch.zeros(7, dtype=torch.int32)),
     r"parameter 1 of param group 0 \(shape \(7,\)\): momentum dtype torch.int32 is neither float nor uint8"),
    # the dtype named even when the shape is wrong too (it was blamed on the shape)
    ("codes-int8", _set(("state", 0, "state1"), torch.zeros(17, dtype=torch.int8)),
     P0 + r": momentum dtype torch.int8 is neither float nor uint8"),
    ("no-momentum", _delete(("state", 2, "state1")), r"parameter 0 of param group 1 \(shape \(3, 5\)\): state has no momentum"),
    ("step-negative", _set(("state", 0, "step"), -1), P0 + ": 'step' must be an integer >= 0, got -1"),
    ("step-fraction", _set(("state", 0, "step"), 2.5), P0 + ": 'step' must be an integer >= 0, got 2.5"),
    ("gnorm-length", _set(("state", 0, "gnorm_vec"), torch.zeros(10)), P0 + ": 'gnorm_vec' must hold 100 values"),
    ("unknown-param-id", _set(("state", 17), {"step": 1, "state1": torch.zeros(3)}),
     "state for parameter id 17, which no saved param group lists"),
    ("duplicate-param-id", _set(("param_groups", 1, "params"), [0, 3]), "lists parameter id 0 twice"),
    ("bad-lr", _set(("param_groups", 1, "lr"), -1.0), "param group 1 of the state dict: Invalid learning rate: -1.0"),
    ("bad-betas", _set(("param_groups", 0, "betas"), (0.9, 1.0)), "param group 0 of the state dict: Invalid beta at index 1"),
    ("betas-none", _set(("param_groups", 0, "betas"), None), "param group 0 of the state dict: Invalid betas: None"),
    ("state1-meta", _set(("state", 0, "state1"), torch.empty(300, 20, dtype=torch.uint8, device="meta")),
     P0 + ": 'state1' is a tensor on the meta device"),
    ("state1-sparse", _set(("state", 1, "state1"), torch.zeros(7).to_sparse()), "'state1' is a tensor of layout torch.sparse_coo"),
    ("bad-bits", _set(("param_groups", 0, "optim_bits"), 16), "param group 0 of the state dict: Invalid optim_bits: 16"),
    ("group-without-params", _delete(("param_groups", 0, "params")), "param group 0 of the state dict must be a dict with a 'params' list"),
    ("state-not-dict", _set(("state",), [1, 2]), "'state' must be a dict, got list"),
    ("groups-not-list", _set(("param_groups",), "x"), "'param_groups' must be a list, got str"),
    ("param-state-not-dict", _set(("state", 0), 5), P0 + ": state must be a dict, got int"),
    ("not-a-state-dict", lambda sd: sd.pop("state"), "not an optimizer state dict"),
]


@pytest.mark.parametrize("case, mutate, message", DAMAGE, ids=[d[0] for d in DAMAGE])
def test_damaged_state_dict_refused_and_optimizer_unchanged(trained, case, mutate, message):
    opt, params = trained
    good = opt.state_dict()
    before = snapshot(opt)
    bad = _mutate(good, mutate)
    with pytest.raises(ValueError, match=message):
        opt.load_state_dict(bad)
    assert_same(before, snapshot(opt))
    # and it still trains, and still loads a good checkpoint
    opt.load_state_dict(good)
    assert_same(before, snapshot(opt))
    opt.step()


def test_checkpoint_for_another_model_refused(trained):
    opt, params = trained
    other = torch.nn.Sequential(torch.nn.Linear(30, 40), torch.nn.Linear(40, 7))
    other_opt = lionkit.Lion8bit(other.parameters(), min_8bit_size=100)
    other(torch.randn(2, 30)).sum().backward()
    other_opt.step()
    before = snapshot(opt)
    with pytest.raises(ValueError, match="state dict has 1 param groups, the optimizer has 2"):
        opt.load_state_dict(other_opt.state_dict())
    assert_same(before, snapshot(opt))
    # same structure, transposed weight
    mine = [torch.nn.Parameter(torch.zeros(s)) for s in [(30, 40), (7,), (3, 5), (600,)]]
    twin = lionkit.Lion8bit([{"params": mine[:2]}, {"params": mine[2:]}], min_8bit_size=100)
    before = snapshot(twin)
    with pytest.raises(ValueError, match=r"parameter 0 of param group 0 \(shape \(30, 40\)\): momentum shape \(40, 30\)"):
        twin.load_state_dict(opt.state_dict())
    assert_same(before, snapshot(twin))


def test_bitsandbytes_nested_layout_damage_is_named(trained):
    opt, params = trained
    from lionkit.checkpoint import BNB_NESTED_KEY, to_bitsandbytes

    nested = to_bitsandbytes(opt.state_dict())
    before = snapshot(opt)
    del nested["state"][3][BNB_NESTED_KEY]["absmax1"]
    with pytest.raises(ValueError, match=P1G1 + ": 8-bit momentum"):
        opt.load_state_dict(nested)
    assert_same(before, snapshot(opt))


def test_loaded_state_is_contiguous_whatever_was_saved():
    p = torch.nn.Parameter(torch.randn(4, 3, 5, 5).to(memory_format=torch.channels_last))
    opt = lionkit.Lion([p], lr=1e-2)
    p.grad = torch.randn_like(p)
    opt.step()
    sd = opt.state_dict()
    sd["state"][0]["state1"] = sd["state"][0]["state1"].to(memory_format=torch.channels_last)
    opt2 = lionkit.Lion([p], lr=1e-2)
    opt2.load_state_dict(sd)
    assert opt2.state[p]["state1"].is_contiguous()
    opt2.step()


# ---------------------------------------------------------------------- files
def test_round_trip_through_files(trained, tmp_path):
    opt, params = trained
    path = tmp_path / "ckpt.pt"
    save_checkpoint({"opt": opt.state_dict(), "step": 3}, path)
    loaded = load_checkpoint(path)  # weights_only=True: plain tensors and containers suffice
    assert loaded["step"] == 3
    fresh_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    fresh = lionkit.Lion8bit([{"params": fresh_params[:2]}, {"params": fresh_params[2:]}], min_8bit_size=100,
                             percentile_clipping=90)
    fresh.load_state_dict(loaded["opt"])
    assert_same(snapshot(opt), snapshot(fresh), same_objects=False)


def _good_file(trained, tmp_path):
    opt, _ = trained
    path = tmp_path / "ckpt.pt"
    save_checkpoint(opt.state_dict(), path)
    return path


@pytest.mark.parametrize("damage", ["truncated", "half", "empty", "flipped-bytes", "text"])
def test_unreadable_file_gets_a_clear_error(trained, tmp_path, damage):
    path = _good_file(trained, tmp_path)
    data = path.read_bytes()
    if damage == "truncated":
        data = data[: len(data) - 100]
    elif damage == "half":
        data = data[: len(data) // 2]
    elif damage == "empty":
        data = b""
    elif damage == "flipped-bytes":
        # the zip directory at the end of the file
        data = data[:-60] + bytes(b ^ 0xFF for b in data[-60:])
    else:
        data = b"this is not a checkpoint\n"
    path.write_bytes(data)
    with pytest.raises(CheckpointError, match=rf"cannot read checkpoint '{path}' \({len(data)} bytes\): .*truncated or corrupted"):
        load_checkpoint(path)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")
    assert issubclass(CheckpointError, ValueError)


def test_untrusted_objects_need_weights_only_false(tmp_path):
    path = tmp_path / "obj.pt"
    save_checkpoint({"x": _Custom()}, path)
    with pytest.raises(CheckpointError, match="weights_only=False"):
        load_checkpoint(path)
    assert isinstance(load_checkpoint(path, weights_only=False)["x"], _Custom)


class _Custom:
    pass


@pytest.mark.parametrize("exc", [OSError("disk full (simulated)"), KeyboardInterrupt()])
def test_crash_mid_save_keeps_the_last_good_file(trained, tmp_path, monkeypatch, exc):
    opt, params = trained
    path = _good_file(trained, tmp_path)
    good_bytes = path.read_bytes()
    real_save = torch.save

    def crashing_save(obj, f, *args, **kwargs):
        # write the first part of a real checkpoint, then die
        import io

        buf = io.BytesIO()
        real_save(obj, buf, *args, **kwargs)
        f.write(buf.getvalue()[: len(buf.getvalue()) // 3])
        raise exc

    monkeypatch.setattr(torch, "save", crashing_save)
    opt.step()
    with pytest.raises(type(exc)):
        save_checkpoint(opt.state_dict(), path)
    monkeypatch.undo()
    assert path.read_bytes() == good_bytes
    assert os.listdir(tmp_path) == ["ckpt.pt"]  # no temporary file left behind
    load_checkpoint(path)


def _four_bit_state():
    p = torch.nn.Parameter(torch.randn(33, generator=torch.Generator().manual_seed(0)))
    opt = lionkit.Lion4bit([p], min_8bit_size=1)
    p.grad = torch.ones(33)
    opt.step()
    return p, opt.state_dict()


@pytest.mark.parametrize(
    "damage, message",
    [
        # packed codes of the wrong size: said as such, not as a parameter-shape mismatch
        (lambda st: st.__setitem__("state1", torch.zeros(33, dtype=torch.uint8)),
         r"4-bit codes \(packed two per byte\) of shape \(33,\), expected \(17,\) for the parameter's 33 elements"),
        (lambda st: st.pop("qmap1"), r"packed 4-bit codes\? their map 'qmap1' is missing"),
    ],
    ids=["packed-size", "no-map"],
)
def test_damaged_4bit_state_is_named(damage, message):
    p, sd = _four_bit_state()
    sd = copy.deepcopy(sd)
    damage(sd["state"][0])
    opt = lionkit.Lion4bit([torch.nn.Parameter(p.detach().clone())], min_8bit_size=1)
    with pytest.raises(ValueError, match=message):
        opt.load_state_dict(sd)
