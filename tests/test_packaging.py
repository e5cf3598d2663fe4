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


def test_scripts_ship_as_a_package_and_the_top_level_folder_links_there():
    import setuptools

    package = Path(dcar.__file__).resolve().parent
    assert (ROOT / "scripts").resolve() == package / "scripts"  # python scripts/<name>.py keeps working
    assert "dcar.scripts" in setuptools.find_packages(str(ROOT), include=["dcar*"])  # so the wheel has them
    tomllib = pytest.importorskip("tomllib")
    entry = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert entry == {"dcar": "dcar.__main__:main"}


def test_dcar_command_lists_and_runs_every_script(capsys):
    from dcar.__main__ import commands, main

    names = set(commands())
    assert names == {p.stem for p in (ROOT / "scripts").glob("*.py") if p.stem != "__init__"}
    assert {"train_tokenizer", "train_generator", "sample", "eval_rfid", "eval_mjhq", "benchmark"} <= names
    with pytest.raises(SystemExit) as stop:
        main([])
    listing = capsys.readouterr().out
    assert stop.value.code == 2 and "usage: dcar <command>" in listing
    assert "  train-tokenizer  Train DC-HT for one stage of the three-stage adaptation" in listing
    assert all(f"  {n.replace('_', '-')} " in listing for n in names)
    with pytest.raises(SystemExit) as stop:
        main(["--help"])
    assert stop.value.code == 0 and capsys.readouterr().out == listing
    with pytest.raises(SystemExit) as stop:
        main(["smaple", "x=1"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.startswith("error: unknown command 'smaple' (did you mean sample?)")


def test_dcar_command_passes_its_arguments(capsys, monkeypatch):
    from dcar.__main__ import main

    monkeypatch.setattr("sys.argv", ["dcar"])
    with pytest.raises(SystemExit) as stop:  # the script's own check of its keys: the arguments arrived
        main(["sample", "prompts=a red circle"])
    assert stop.value.code == 2 and "tokenizer=PATH" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:
        main(["eval-shapes", "--help"])
    out = capsys.readouterr().out
    assert stop.value.code == 0 and out.startswith("ShapesEval: exact text alignment") and "inference.dtype" in out


def test_python_m_dcar_runs_a_command():
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "dcar", "train-generator", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("Train the DC-AR generator") and "train.steps" in done.stdout
