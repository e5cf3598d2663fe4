"""The configs ship with the package: a wheel install (no repository checkout) finds the paper and shapes YAMLs."""

from __future__ import annotations

from pathlib import Path

import pytest

import dcar
from dcar.cli import configs_dir

ROOT = Path(__file__).resolve().parents[1]


def test_configs_live_in_the_package_and_the_top_level_folder_links_there(monkeypatch):
    monkeypatch.delenv("DCAR_CONFIGS", raising=False)
    assert configs_dir() == Path(dcar.__file__).resolve().parent / "configs"
    assert (ROOT / "configs").resolve() == configs_dir()  # the documented configs/... paths keep working
    names = {p.relative_to(configs_dir()).as_posix() for p in configs_dir().rglob("*.yaml")}
    assert {"tokenizer/dcht_f32c32.yaml", "generator/dcar_256.yaml", "generator/dcar_512.yaml",
            "tokenizer/shapes.yaml", "generator/shapes.yaml", "benchmark/paper.yaml", "data/shapes.yaml"} <= names
    monkeypatch.setenv("DCAR_CONFIGS", "/elsewhere")
    assert configs_dir() == Path("/elsewhere")


def test_every_config_is_package_data():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["dcar"]
    package = configs_dir().parent
    shipped = {p for pattern in patterns for p in package.glob(pattern)}
    assert set(configs_dir().rglob("*.yaml")) == shipped and len(shipped) >= 12
