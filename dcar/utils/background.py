"""A command run beside this process on a shared CPU budget (the quickstart's tokenizer stage beside the generator).

On a small CPU, two single-threaded jobs get far more done than one job on two threads: measured on the 2-core
machine, the shapes tokenizer's alternate stage ran at 2.8 steps/s and the shapes generator at 3.7 steps/s side by
side, against 3.3 and 5.4 steps/s alone on two threads (README). :class:`BackgroundJob` starts the command with
``threads`` intra-op threads, gives this process the rest of the budget while it runs, and the whole budget back
as soon as :meth:`poll` (e.g. a trainer's step hook) or :meth:`wait` sees it end.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import torch


class BackgroundJobError(RuntimeError):
    """The background command exited with an error; the message holds the end of its log."""


class BackgroundJob:
    """``with BackgroundJob(cmd, log, threads=1) as job: ...`` runs ``cmd`` (stdout + stderr to ``log``) beside
    the block; leaving the block waits for it and raises :class:`BackgroundJobError` if it failed, or terminates it
    if the block raised."""

    def __init__(self, cmd: Sequence[str], log: str | os.PathLike, threads: int = 1,
                 env: dict[str, str] | None = None) -> None:
        self.cmd = list(cmd)
        self.log = Path(log)
        self.total_threads = torch.get_num_threads()
        self.threads = max(1, min(threads, self.total_threads))
        self.env = env
        self.proc: subprocess.Popen | None = None
        self.started = self.ended = 0.0  # perf_counter at start and at exit (a watcher thread notes the exit)
        self._released = False

    def start(self) -> BackgroundJob:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        env = {**(self.env if self.env is not None else os.environ), "OMP_NUM_THREADS": str(self.threads),
               "MKL_NUM_THREADS": str(self.threads), "PYTHONUNBUFFERED": "1"}
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        self.started = time.perf_counter()
        threading.Thread(target=self._note_exit, args=(self.proc,), daemon=True).start()
        torch.set_num_threads(max(1, self.total_threads - self.threads))
        return self

    def poll(self, *_: object) -> bool:
        """Whether the job has ended (and if so, this process has its full thread budget again)."""
        if self.proc is None or self.proc.poll() is None:
            return False
        self._release()
        return True

    def wait(self) -> float:
        """Wait for the job; return its wall time in seconds or raise :class:`BackgroundJobError`."""
        assert self.proc is not None, "start() first"
        code = self.proc.wait()
        while not self.ended:  # the watcher notes the exit time right after wait() returns there too
            time.sleep(0.001)
        self._release()
        if code != 0:
            tail = self.log.read_text(errors="replace").strip().splitlines()[-15:]
            raise BackgroundJobError(f"`{' '.join(self.cmd)}` exited with status {code}; the end of its log "
                                     f"({self.log}):\n" + "\n".join(tail))
        return self.ended - self.started

    def terminate(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._release()

    def _note_exit(self, proc: subprocess.Popen) -> None:
        proc.wait()
        self.ended = time.perf_counter()

    def _release(self) -> None:
        # on the calling (training) thread: torch's intra-op thread count is per thread under OpenMP
        if not self._released:
            self._released = True
            torch.set_num_threads(self.total_threads)

    def __enter__(self) -> BackgroundJob:
        return self.start()

    def __exit__(self, exc_type: object, *_: object) -> None:
        if exc_type is not None:
            self.terminate()
        else:
            self.wait()
