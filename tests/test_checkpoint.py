"""Atomic checkpoints, keep-last-K, pickle-free loading and safetensors round trips."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from torch import nn

from dcar.train import checkpoint as ckpt


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))


def test_round_trip_is_exact(tmp_path):
    model, opt_state = _model(0), {"lr": 0.1, "t": torch.arange(3)}
    path = ckpt.save_checkpoint(tmp_path, 10, {"model": model}, {"opt": opt_state}, {"samples_seen": 40})
    assert path.name == "step_00000010" and ckpt.is_complete(path)
    other = _model(1)
    state, meta = ckpt.load_checkpoint(path, {"model": other})
    for a, b in zip(model.state_dict().values(), other.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert meta["step"] == 10 and meta["samples_seen"] == 40
    assert state["opt"]["lr"] == 0.1 and torch.equal(state["opt"]["t"], torch.arange(3))


def test_keep_last_k_and_latest(tmp_path):
    model = _model()
    for step in (1, 2, 3, 4):
        ckpt.save_checkpoint(tmp_path, step, {"model": model}, {}, keep_last=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_00000003", "step_00000004"]
    assert ckpt.latest_checkpoint(tmp_path).name == "step_00000004"


def test_crash_mid_write_keeps_previous(tmp_path, monkeypatch):
    model = _model()
    good = ckpt.save_checkpoint(tmp_path, 5, {"model": model}, {"x": 1})

    def failing_save(obj, f, *a, **k):  # a full disk while writing state.pt
        with open(f, "wb") as fh:
            fh.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt.torch, "save", failing_save)
    with pytest.raises(OSError, match="No space left"):
        ckpt.save_checkpoint(tmp_path, 6, {"model": model}, {"x": 2})
    assert ckpt.latest_checkpoint(tmp_path) == good
    assert not list(tmp_path.glob(".tmp-*"))  # the partial folder was removed


def test_killed_writer_leftovers_are_never_picked(tmp_path):
    model = _model()
    good = ckpt.save_checkpoint(tmp_path, 5, {"model": model}, {})
    # what a SIGKILL mid-save leaves: a tmp folder, or (rename done by hand) a folder whose files were truncated
    stale = tmp_path / ".tmp-step_00000006-999"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"xx")
    damaged = tmp_path / "step_00000007"
    damaged.mkdir()
    (damaged / "model.safetensors").write_bytes(b"xx")
    torn = ckpt.save_checkpoint(tmp_path, 8, {"model": model}, {})
    (torn / "state.pt").write_bytes(b"trunc")  # size no longer matches meta.json
    assert ckpt.latest_checkpoint(tmp_path) == good
    with pytest.raises(ckpt.CheckpointError, match="not a complete checkpoint"):
        ckpt.load_checkpoint(torn, {"model": model})


def test_non_finite_weights_are_refused(tmp_path):
    model = _model()
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    with pytest.raises(ckpt.CheckpointError, match=r"model.0.weight contains NaN"):
        ckpt.save_checkpoint(tmp_path, 1, {"model": model}, {})
    assert ckpt.latest_checkpoint(tmp_path) is None


def test_wrong_architecture_lists_keys_and_shapes(tmp_path):
    path = ckpt.save_checkpoint(tmp_path, 1, {"model": _model()}, {})
    wider = nn.Sequential(nn.Linear(4, 16), nn.BatchNorm1d(16), nn.Linear(16, 2))
    with pytest.raises(ckpt.CheckpointError, match=r"mismatched shapes 0.bias: file \(8,\) vs model \(16,\)"):
        ckpt.load_checkpoint(path, {"model": wider})
    extra = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2), nn.Linear(2, 2))
    with pytest.raises(ckpt.CheckpointError, match=r"missing keys \['3.bias', '3.weight'\]"):
        ckpt.load_checkpoint(path, {"model": extra})


class _Evil:
    def __reduce__(self):
        return (exec, ("import pathlib; pathlib.Path('PWNED').write_text('x')",))


def test_pickled_code_is_never_executed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = ckpt.save_checkpoint(tmp_path / "ck", 1, {"model": _model()}, {})
    payload = pickle.dumps({"x": _Evil()})
    (path / "state.pt").write_bytes(payload)
    meta = json.loads((path / "meta.json").read_text())
    meta["files"]["state.pt"] = len(payload)  # a "complete" checkpoint whose state.pt is a malicious pickle
    (path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(pickle.UnpicklingError):
        ckpt.load_checkpoint(path, {"model": _model()})
    assert not (tmp_path / "PWNED").exists()
