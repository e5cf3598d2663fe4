"""dcar.utils.background: a job beside this process on a shared thread budget, its failures, and its cleanup."""

from __future__ import annotations

import sys
import time

import pytest
import torch

from dcar.utils.background import BackgroundJob, BackgroundJobError

PRINT_THREADS = "import os, time, torch; print('omp', os.environ['OMP_NUM_THREADS'], 'torch', torch.get_num_threads())"


@pytest.fixture
def four_threads(torch_threads):
    torch_threads(4)


def test_the_job_and_this_process_split_the_threads_until_it_ends(tmp_path, four_threads):
    log = tmp_path / "logs" / "job.log"
    job = BackgroundJob([sys.executable, "-c", PRINT_THREADS + "; time.sleep(1.0)"], log, threads=1).start()
    assert torch.get_num_threads() == 3  # the rest of the budget while the job runs
    assert job.poll() is False
    while not job.poll():
        time.sleep(0.05)
    assert torch.get_num_threads() == 4  # all back once poll sees the end
    seconds = job.wait()
    assert 1.0 <= seconds < 30.0
    assert log.read_text().split() == ["omp", "1", "torch", "1"]


def test_a_failing_job_raises_with_the_end_of_its_log(tmp_path, four_threads):
    cmd = [sys.executable, "-c", "print('step 1 ok'); raise SystemExit('config error: bad key train.stpes')"]
    expected = r"exited with status 1[\s\S]*step 1 ok[\s\S]*bad key train.stpes"
    with pytest.raises(BackgroundJobError, match=expected), BackgroundJob(cmd, tmp_path / "job.log", threads=2):
        pass
    assert torch.get_num_threads() == 4


def test_an_error_in_the_block_stops_the_job(tmp_path, four_threads):
    job = BackgroundJob([sys.executable, "-c", "import time; time.sleep(120)"], tmp_path / "job.log")
    t0 = time.perf_counter()
    with pytest.raises(KeyboardInterrupt), job:
        raise KeyboardInterrupt
    assert job.proc is not None and job.proc.returncode is not None  # terminated, not left running
    assert time.perf_counter() - t0 < 30.0
    assert torch.get_num_threads() == 4


def test_threads_are_capped_by_the_budget(tmp_path, torch_threads):
    torch_threads(1)
    job = BackgroundJob([sys.executable, "-c", PRINT_THREADS], tmp_path / "job.log", threads=8)
    assert job.threads == 1
    with job:
        assert torch.get_num_threads() == 1  # never below one thread here either
    assert (tmp_path / "job.log").read_text().split() == ["omp", "1", "torch", "1"]
