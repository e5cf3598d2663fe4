"""The shared evaluation plumbing (dcar.eval.runner, dcar.eval.generate): atomic image writes, file hashes, the
settings guard of a resumable folder, the round-robin share of a process, and resumable sharded generation (jobs
split over two simulated processes, lazy pipeline loading, MJHQ's partly required last batch)."""

import hashlib
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from dcar.config import ConfigError
from dcar.eval import runner as R
from dcar.eval.generate import GenJob, generate_missing

ONE = R.DistContext(rank=0, world=1, device="cpu")


def test_atomic_save_image_writes_the_png_and_no_temporary(tmp_path):
    img = Image.fromarray(np.arange(48, dtype=np.uint8).reshape(4, 4, 3))
    path = R.atomic_save_image(img, tmp_path / "sub" / "a.png")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    assert path.read_bytes() == buf.getvalue() and sorted(p.name for p in path.parent.iterdir()) == ["a.png"]

    class Broken:
        def save(self, fp, format, **kw):
            fp.write(b"partial")
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        R.atomic_save_image(Broken(), tmp_path / "b.png")
    assert not (tmp_path / "b.png").exists() and not list(tmp_path.glob(".b.png*"))


def test_sha256_file(tmp_path):
    data = bytes(range(256)) * 5000
    (tmp_path / "f").write_bytes(data)
    assert R.sha256_file(tmp_path / "f") == hashlib.sha256(data).hexdigest()


def test_check_settings_records_then_refuses_other_settings(tmp_path):
    path = tmp_path / "out" / "generation.json"
    assert R.check_settings(ONE, path, {"seed": 1, "shape": (2, 3)}) == {"seed": 1, "shape": [2, 3]}
    assert json.loads(path.read_text()) == {"seed": 1, "shape": [2, 3]}
    R.check_settings(ONE, path, {"seed": 1, "shape": [2, 3]})  # the same settings (tuples as lists) resume
    with pytest.raises(ConfigError, match=r"holds images computed with different settings \(seed\)"):
        R.check_settings(ONE, path, {"seed": 2, "shape": (2, 3)}, holds="images")


def test_map_share_is_round_robin_and_gathers():
    items = list(range(7))
    assert R.map_share(ONE, items, lambda x: x * 10, progress=False) == [x * 10 for x in items]
    rank1 = R.DistContext(rank=1, world=3, device="cpu")  # no accelerate state: gather returns the local share
    assert R.map_share(rank1, items, lambda x: x, progress=False) == [1, 4]


class CountingPipe:
    """Images whose pixels encode (seed, position in the call); counts calls."""

    def __init__(self):
        self.calls = []

    def __call__(self, prompts, seed=None, **kw):
        self.calls.append((tuple(prompts), seed, kw))
        return torch.stack([torch.full((3, 4, 4), (seed * 7 + i) % 200 / 100 - 1) for i in range(len(prompts))])


def jobs_in(folder, n=4, per=2):
    return [GenJob(tuple(f"p{j}" for _ in range(per)), tuple(folder / f"{j}_{k}.png" for k in range(per)), seed=j)
            for j in range(n)]


def test_generate_missing_over_two_processes_then_resume(tmp_path):
    jobs = jobs_in(tmp_path)
    pipe = CountingPipe()
    counts = generate_missing(pipe, jobs, {"num_steps": 2}, R.DistContext(1, 2, "cpu"), progress=False)
    assert counts == {"generated": 4, "reused": 0} and [c[1] for c in pipe.calls] == [1, 3]
    assert pipe.calls[0][2] == {"num_steps": 2} and not jobs[0].done() and jobs[1].done()
    (tmp_path / "0_1.png").write_bytes(b"kept")  # an existing PNG is never rewritten, the rest of its job is made
    counts = generate_missing(pipe, jobs, {"num_steps": 2}, R.DistContext(0, 2, "cpu"), progress=False)
    assert counts == {"generated": 3, "reused": 1} and [c[1] for c in pipe.calls] == [1, 3, 0, 2]
    assert (tmp_path / "0_1.png").read_bytes() == b"kept" and all(j.done() for j in jobs)
    assert not list(tmp_path.glob(".*"))  # no temporary files left
    assert generate_missing(None, jobs, {}, ONE, progress=False) == {"generated": 0, "reused": 8}


def test_generate_missing_loads_the_pipeline_only_when_needed(tmp_path):
    jobs = jobs_in(tmp_path, n=2)
    with pytest.raises(ConfigError, match="no pipeline"):
        generate_missing(None, jobs, {}, ONE, progress=False)
    loads = []
    generate_missing(None, jobs, {}, ONE, load_pipeline=lambda: loads.append(1) or CountingPipe(), progress=False)
    generate_missing(None, jobs, {}, ONE, load_pipeline=lambda: pytest.fail("pipeline loaded"), progress=False)
    assert loads == [1]


def test_required_prefix_of_a_job(tmp_path):
    job = GenJob(("a", "b", "c"), tuple(tmp_path / f"{k}.png" for k in range(3)), seed=0, required=2)
    pipe = CountingPipe()
    generate_missing(pipe, [job], {}, ONE, progress=False)
    assert all((tmp_path / f"{k}.png").is_file() for k in range(3))  # the whole batch is drawn and written
    (tmp_path / "2.png").unlink()  # beyond the required prefix: the job still counts as done
    assert job.done() and generate_missing(pipe, [job], {}, ONE, progress=False)["generated"] == 0
    assert len(pipe.calls) == 1
