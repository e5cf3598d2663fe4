"""MaskGIT / MAR masking utilities of the DC-AR generator (dcar.models.generator.masking)."""

import math

import pytest
import torch

from dcar.models.generator.masking import (
    choose_tokens_to_mask,
    gumbel_temperature,
    mask_schedule,
    mask_schedule_counts,
    random_mask,
    sample_mask_ratio,
    sampled_log_prob,
)


def test_spec_worked_examples():
    assert mask_schedule_counts(12, 64) == [63, 61, 59, 55, 50, 45, 38, 32, 24, 16, 8, 0]
    assert mask_schedule_counts(12, 256) == [253, 247, 236, 221, 203, 181, 155, 128, 97, 66, 33, 0]
    assert [mask_schedule(s, 12, 64) for s in range(12)] == mask_schedule_counts(12, 64)


@pytest.mark.parametrize("num_tokens,num_steps", [(64, 12), (256, 12), (16, 12), (12, 12), (64, 1), (4, 3), (256, 64)])
def test_schedule_properties(num_tokens, num_steps):
    counts = mask_schedule_counts(num_steps, num_tokens)
    previous = [num_tokens] + counts[:-1]
    assert counts[-1] == 0
    assert all(c >= 1 for c in counts[:-1])
    assert all(p - c >= 1 for p, c in zip(previous, counts, strict=True))  # monotone, >= 1 unmasked per step


def test_schedule_more_steps_than_tokens_and_errors():
    counts = mask_schedule_counts(6, 3)
    assert counts[-1] == 0 and all(a >= b for a, b in zip([3] + counts, counts, strict=False))
    with pytest.raises(ValueError):
        mask_schedule(12, 12, 64)
    with pytest.raises(ValueError):
        mask_schedule_counts(0, 64)


def test_mask_ratio_distributions():
    g = torch.Generator().manual_seed(0)
    cos = sample_mask_ratio(200_000, "cosine", generator=g)
    assert cos.min() > 0 and cos.max() <= 1
    assert abs(cos.mean().item() - 2 / math.pi) < 5e-3  # E[cos(pi/2 U)] = 2/pi
    tn = sample_mask_ratio(200_000, "truncnorm", 0.7, generator=g)
    assert tn.min() >= 0.7 and tn.max() <= 1.0
    # mean of N(1, 0.25^2) truncated to [0.7, 1]: 1 - 0.25 * (phi(-1.2) - phi(0)) / (Phi(0) - Phi(-1.2))
    phi = lambda x: math.exp(-x * x / 2) / math.sqrt(2 * math.pi)
    cdf = lambda x: 0.5 * (1 + math.erf(x / math.sqrt(2)))
    expected = 1 + 0.25 * (phi(-1.2) - phi(0)) / (cdf(0) - cdf(-1.2))
    assert abs(tn.mean().item() - expected) < 2e-3
    a = sample_mask_ratio(8, "cosine", generator=torch.Generator().manual_seed(3))
    b = sample_mask_ratio(8, "cosine", generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    with pytest.raises(ValueError):
        sample_mask_ratio(2, "linear")


def test_random_mask_counts():
    ratios = torch.tensor([1e-6, 0.1, 0.5, 0.99, 1.0])
    mask = random_mask(ratios, 64, torch.Generator().manual_seed(0))
    assert mask.dtype == torch.bool and mask.shape == (5, 64)
    assert mask.sum(1).tolist() == [1, 7, 32, 64, 64]


def test_choose_tokens_never_remasks_known():
    g = torch.Generator().manual_seed(0)
    b, n = 4, 64
    known = torch.rand(b, n, generator=g) < 0.5
    conf = torch.log(torch.rand(b, n, generator=g)).masked_fill(known, math.inf)
    num = (~known).sum(1) - 3  # re-mask all but three of the unknown tokens
    for tau in (0.0, 4.5, 100.0):
        remask = choose_tokens_to_mask(conf, num, tau, torch.Generator().manual_seed(1))
        assert not (remask & known).any()
        assert torch.equal(remask.sum(1), num)
    # passing ``known`` instead of +inf confidences gives the same choice
    plain = torch.log(torch.rand(b, n, generator=g))
    a = choose_tokens_to_mask(plain.masked_fill(known, math.inf), 5, 2.0, torch.Generator().manual_seed(2))
    c = choose_tokens_to_mask(plain, 5, 2.0, torch.Generator().manual_seed(2), known=known)
    assert torch.equal(a, c)


def test_choose_tokens_zero_temperature_picks_lowest():
    conf = torch.tensor([[0.1, -3.0, -0.5, -2.0, math.inf]])
    remask = choose_tokens_to_mask(conf, 2, 0.0)
    assert remask.tolist() == [[False, True, False, True, False]]
    a = choose_tokens_to_mask(torch.zeros(2, 50), 10, 1.0, torch.Generator().manual_seed(5))
    b = choose_tokens_to_mask(torch.zeros(2, 50), 10, 1.0, torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and not torch.equal(a[0], a[1])


def test_gumbel_temperature_and_log_prob():
    assert gumbel_temperature(0, 12, 4.5) == pytest.approx(4.5 * 11 / 12)
    assert gumbel_temperature(11, 12, 4.5) == 0.0
    logits = torch.tensor([[0.0, math.log(3.0)]])
    assert sampled_log_prob(logits, torch.tensor([1])).item() == pytest.approx(math.log(0.75))
