"""Fixtures shared by the test files."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
import torch


@contextlib.contextmanager
def _restored_threads() -> Iterator[None]:
    """Torch's intra-op thread count as it was on entry comes back on exit."""
    before = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def torch_threads():
    """``torch_threads(n)`` sets torch's intra-op thread count inside a test; the test's starting count comes back
    at teardown."""
    with _restored_threads():
        yield torch.set_num_threads


@pytest.fixture(scope="module")
def one_thread_module():
    """One intra-op thread for a whole test file (``pytestmark = pytest.mark.usefixtures("one_thread_module")``):
    its tiny models gain nothing from two, and a shared CPU punishes oversubscription. Restored after the file."""
    with _restored_threads():
        torch.set_num_threads(1)
        yield
