"""Atomic file writes (dcar.utils.atomic): contents, no temporary left behind, the previous file kept when writing
fails, usual permissions, safetensors with metadata, and dcar.eval.runner re-exporting the same functions."""

import json
import os

import numpy as np
import pytest
import torch
from safetensors import safe_open

from dcar.eval import runner as R
from dcar.utils import atomic as A


def test_bytes_text_json_and_no_temporary(tmp_path):
    assert A.atomic_write_bytes(tmp_path / "sub" / "a.bin", b"\x00\x01") == tmp_path / "sub" / "a.bin"
    assert (tmp_path / "sub" / "a.bin").read_bytes() == b"\x00\x01"
    A.atomic_write_text(tmp_path / "b.txt", "héllo\n")
    assert (tmp_path / "b.txt").read_bytes() == "héllo\n".encode()
    obj = {"z": 1, "a": [1, 2]}
    A.atomic_write_json(tmp_path / "c.json", obj)
    assert (tmp_path / "c.json").read_text() == json.dumps(obj, indent=2) + "\n"
    A.atomic_write_json(tmp_path / "d.json", obj, sort_keys=True)
    assert (tmp_path / "d.json").read_text() == json.dumps(obj, indent=2, sort_keys=True) + "\n"
    A.atomic_savez(tmp_path / "e.npz", x=np.arange(3))
    assert np.load(tmp_path / "e.npz")["x"].tolist() == [0, 1, 2]
    A.atomic_write_text(tmp_path / "b.txt", "new")  # replaces an existing file
    assert (tmp_path / "b.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.txt", "c.json", "d.json", "e.npz", "sub"]
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["a.bin"]


def test_permissions_are_those_of_a_plain_write(tmp_path):
    (tmp_path / "plain").write_text("x")
    A.atomic_write_text(tmp_path / "atomic", "x")
    assert (tmp_path / "atomic").stat().st_mode == (tmp_path / "plain").stat().st_mode


def test_failed_write_keeps_the_previous_file_and_removes_the_temporary(tmp_path):
    target = tmp_path / "f.json"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="boom"), A.atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".f.json.") and tmp.name.endswith(".tmp")
        tmp.write_text("partial")
        raise RuntimeError("boom")
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["f.json"]


def test_safetensors_with_metadata(tmp_path):
    path = tmp_path / "cache" / "t.safetensors"
    tensors = {"a": torch.arange(6).reshape(2, 3), "b": torch.ones(2, dtype=torch.uint8)}
    assert A.atomic_save_safetensors(tensors, path, metadata={"k": "v"}) == path
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"k": "v"} and torch.equal(f.get_tensor("a"), tensors["a"])
    with pytest.raises(ValueError):  # a non-contiguous tensor: save_file refuses, nothing is left behind
        A.atomic_save_safetensors({"a": torch.zeros(3, 4).t()}, tmp_path / "bad.safetensors")
    assert sorted(os.listdir(tmp_path)) == ["cache"] and os.listdir(tmp_path / "cache") == ["t.safetensors"]


def test_runner_re_exports_the_same_functions():
    for name in ("atomic_write_bytes", "atomic_write_json", "atomic_savez", "atomic_save_image"):
        assert getattr(R, name) is getattr(A, name) and name in R.__all__
