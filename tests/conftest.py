"""Fixtures shared by the test files."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def torch_threads():
    """``torch_threads(n)`` sets torch's intra-op thread count inside a test; the test's starting count comes back
    at teardown."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)
