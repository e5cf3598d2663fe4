"""The MAR diffusion MLP head of DC-AR (dcar.models.generator.diffusion_head)."""

import math

import pytest
import torch

from dcar.models.generator import DiffusionHead, HeadConfig


def _head(token_dim=4, width=32, depth=2, cond_dim=8, **kw) -> DiffusionHead:
    torch.manual_seed(0)
    head = DiffusionHead(HeadConfig(token_dim=token_dim, width=width, depth=depth, **kw), cond_dim)
    with torch.no_grad():  # leave the zero init so that eps and v are not trivially zero
        for p in head.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return head


def test_paper_head_parameter_count():
    with torch.device("meta"):
        head = DiffusionHead(HeadConfig(), cond_dim=1152)
    assert sum(p.numel() for p in head.parameters()) == 36_192_320
    assert head.scheduler.alphas_cumprod.device.type == "cpu"  # the schedule is real even on meta


def test_init_is_mar():
    head = DiffusionHead(HeadConfig(token_dim=4, width=32, depth=2), 8)
    net = head.net
    zero = [b.ada for b in net.blocks] + [net.final_ada, net.final_linear]
    assert all(not m.weight.any() and not m.bias.any() for m in zero)
    assert 0.01 < net.time_fc1.weight.std().item() < 0.03
    out = net(torch.randn(5, 4), torch.tensor([0, 1, 2, 500, 999]), torch.randn(5, 8))
    assert out.shape == (5, 8) and not out.any()


def test_cosine_schedule_and_adm_spacing():
    head = _head()
    abar = head.scheduler.alphas_cumprod.double()
    f = lambda t: math.cos((t / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2
    for t in (0, 10, 500, 900):  # ADM: alpha_bar(t) = f(t+1)/f(0), beta clipped at 0.999 only near T
        assert abar[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-4)
    sched = head.make_scheduler()
    sched.set_timesteps(8)
    assert sched.timesteps.tolist() == [999, 856, 714, 571, 428, 285, 143, 0]  # HART's respaced "8"


def test_loss_matches_hand_computation():
    head = _head()
    g = torch.Generator().manual_seed(1)
    x0, cond = torch.randn(6, 4, generator=g), torch.randn(6, 8, generator=g)
    t = torch.tensor([0, 1, 5, 250, 600, 999])
    noise = torch.randn(6, 4, generator=g)
    terms = head.loss_terms(x0, cond, t, noise)
    betas = head.scheduler.betas.double()
    abar = torch.cumprod(1 - betas, 0)  # ADM's float64 schedule
    a = head.scheduler.alphas_cumprod[t][:, None]
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise  # float32, as the forward noising runs
    out = head.net(x_t, t, cond).double()
    x_t = x_t.double()
    eps, v = out[:, :4], out[:, 4:]
    torch.testing.assert_close(terms["mse"].double(), ((noise.double() - eps) ** 2).mean(1), rtol=1e-5, atol=1e-6)
    # VLB by hand from the betas (ADM), for t > 0: KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) in bits/dim
    for i in range(1, 6):
        ti = int(t[i])
        ab, ab_prev, beta = abar[ti], abar[ti - 1], betas[ti]
        post_var = beta * (1 - ab_prev) / (1 - ab)
        c0, ct = ab_prev.sqrt() * beta / (1 - ab), (1 - beta).sqrt() * (1 - ab_prev) / (1 - ab)
        x0_hat = (x_t[i] - (1 - ab).sqrt() * eps[i]) / ab.sqrt()
        mu_q, mu_p = c0 * x0.double()[i] + ct * x_t[i], c0 * x0_hat + ct * x_t[i]
        frac = (v[i] + 1) / 2
        logvar_p = frac * torch.log(beta) + (1 - frac) * torch.log(post_var)
        kl = 0.5 * (-1 + logvar_p - torch.log(post_var) + post_var / logvar_p.exp() + (mu_q - mu_p) ** 2 / logvar_p.exp())
        assert terms["vb"][i].item() == pytest.approx((kl.mean() / math.log(2)).item(), rel=1e-5, abs=1e-6)
    assert torch.isfinite(terms["vb"][0])


def test_loss_draws_and_weights():
    head = _head(diffusion_batch_mul=3)
    x0, cond = torch.randn(5, 4), torch.randn(5, 8)
    w = torch.tensor([1.0, 0.0, 2.0, 1.0, 0.0])
    loss = head.loss(x0, cond, w, generator=torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    t = torch.randint(0, 1000, (15,), generator=g)
    noise = torch.randn(15, 4, generator=g)
    terms = head.loss_terms(x0.repeat(3, 1), cond.repeat(3, 1), t, noise)
    per, wr = terms["mse"] + terms["vb"], w.repeat(3)
    assert loss.item() == pytest.approx(((per * wr).sum() / wr.sum()).item(), rel=1e-6)
    mse_only = _head(loss="mse")
    assert float(mse_only.loss_terms(x0, cond, t[:5], noise[:5])["vb"].abs().sum()) == 0.0


def test_sampling_deterministic_and_cfg_scale_one():
    head = _head()
    cond, uncond = torch.randn(7, 8), torch.randn(7, 8)
    a = head.sample(cond, torch.Generator().manual_seed(0), num_steps=8)
    b = head.sample(cond, torch.Generator().manual_seed(0), num_steps=8)
    c = head.sample(cond, torch.Generator().manual_seed(1), num_steps=8)
    assert torch.equal(a, b) and not torch.allclose(a, c)
    cfg1 = head.sample(cond, torch.Generator().manual_seed(0), num_steps=8, guidance_scale=1.0, uncond=uncond)
    torch.testing.assert_close(cfg1, a, rtol=1e-5, atol=1e-5)
    cfg4 = head.sample(cond, torch.Generator().manual_seed(0), num_steps=8, guidance_scale=4.0, uncond=uncond)
    assert not torch.allclose(cfg4, a, atol=1e-3)


def test_temperature_scales_injected_noise():
    """At t > 0 a step is ``mean + temperature * sigma * noise``, with diffusers' step and its noise draw."""
    head = _head()
    cond = torch.randn(3, 8)
    sched = head.make_scheduler()
    sched.set_timesteps(2)  # [999, 0]
    g = torch.Generator().manual_seed(0)
    x_init = torch.randn(3, 4, generator=g)
    out = head.net(x_init, torch.full((3,), 999), cond)
    step = sched.step(out, 999, x_init, generator=g)
    g_copy = torch.Generator().manual_seed(0)
    torch.randn(3, 4, generator=g_copy)
    noise = torch.randn(3, 4, generator=g_copy)  # the draw diffusers' step made
    c = head._coeffs(torch.tensor([999]), torch.tensor([0]), x_init.device)
    mean = c["c_x0"] * step.pred_original_sample.double() + c["c_xt"] * x_init.double()
    frac = (out[:, 4:].double() + 1) / 2
    sigma = (0.5 * (frac * c["log_beta"] + (1 - frac) * c["log_post"])).exp()
    # diffusers' step works from its float32 alphas_cumprod, the head's coefficients from float64 betas
    torch.testing.assert_close(step.prev_sample.double(), mean + sigma * noise, rtol=1e-3, atol=1e-4)
    for temperature in (0.0, 0.5):  # the sampler's two steps by hand: x_0 = clip(x0_hat) at t = 0 (no noise)
        x_mid = (mean + temperature * sigma * noise).float()
        final = sched.step(head.net(x_mid, torch.zeros(3, dtype=torch.long), cond), 0, x_mid).prev_sample
        sampled = head.sample(cond, torch.Generator().manual_seed(0), num_steps=2, temperature=temperature)
        torch.testing.assert_close(sampled, final, rtol=1e-3, atol=1e-3)


@pytest.fixture
def one_thread(torch_threads):
    """Small matmuls on a shared 2-core box run ~10x faster on one thread than on two contended ones."""
    torch_threads(1)


def test_head_learns_conditional_means(one_thread):
    """A tiny head fits a 4-class conditional 2-D Gaussian; its samples land at the right class means."""
    torch.manual_seed(0)
    head = DiffusionHead(HeadConfig(token_dim=2, width=64, depth=2, diffusion_batch_mul=2), cond_dim=4)
    means = torch.tensor([[0.6, 0.0], [-0.6, 0.0], [0.0, 0.6], [0.0, -0.6]])
    opt = torch.optim.AdamW(head.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(400):
        k = torch.randint(0, 4, (256,), generator=g)
        x0 = means[k] + 0.1 * torch.randn(256, 2, generator=g)
        loss = head.loss(x0, torch.nn.functional.one_hot(k, 4).float(), generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-50:]) / 50 < 0.5 * sum(losses[:20]) / 20
    k = torch.arange(4).repeat_interleave(200)
    cond = torch.nn.functional.one_hot(k, 4).float()
    for steps in (8, 50):
        samples = head.sample(cond, torch.Generator().manual_seed(0), num_steps=steps)
        for i in range(4):
            assert torch.dist(samples[k == i].mean(0), means[i]).item() < 0.1
            assert samples[k == i].std(0).max().item() < 0.3  # data std 0.1; a class-blind head would give ~0.45
