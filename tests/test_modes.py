"""dcar.utils.modes.eval_mode: eval inside the block, every submodule's own flag back afterwards (also after an
exception), including the mixed flags DC-HT's train() leaves when a part is frozen."""

import pytest
import torch
from torch import nn

from dcar.utils.modes import eval_mode


def mixed() -> tuple[nn.Module, list[bool]]:
    model = nn.Sequential(nn.Linear(2, 2), nn.Sequential(nn.BatchNorm1d(2), nn.Dropout(0.5)), nn.BatchNorm1d(2))
    model.train()
    model[1].eval()  # a frozen part kept in eval, as DCHT.train() does (model.train() would not restore this)
    return model, [m.training for m in model.modules()]


def test_eval_inside_and_exact_flags_after():
    model, flags = mixed()
    other = nn.Dropout(0.5).train()
    x = torch.ones(4, 2)
    with eval_mode(model, other):
        assert not any(m.training for m in [*model.modules(), other])
        assert torch.equal(other(x), x)  # dropout off
    assert [m.training for m in model.modules()] == flags == [True, True, False, False, False, True]
    assert other.training


def test_flags_restored_after_an_exception():
    model, flags = mixed()
    with pytest.raises(RuntimeError, match="boom"), eval_mode(model):
        raise RuntimeError("boom")
    assert [m.training for m in model.modules()] == flags
