"""The diffusion MLP head that samples DC-AR's continuous residual tokens, and its diffusion loss and sampler.

Network: MAR's ``SimpleMLPAdaLN`` (``mar/models/diffloss.py``; HART's ``hart/modules/diffusion/diffloss.py`` is the
same net): input Linear(D, w); a timestep embedder (256-d [cos, sin] sinusoid, Linear 256->w, SiLU, Linear w->w);
cond_embed Linear(z, w); y = t_emb + c_emb; ``depth`` adaLN residual MLP blocks and an adaLN final layer giving
2*D channels (eps and the variance interpolation v). Init: xavier-uniform Linear, N(0, 0.02) for the timestep MLP,
zero for every adaLN modulation and the final Linear.

Diffusion (MAR's ``create_diffusion``, i.e. ADM, Nichol & Dhariwal 2021): cosine schedule with T = 1000,
epsilon prediction with a learned-range variance, loss = MSE(eps) + VLB, where the VLB term (ADM's
``_vb_terms_bpd``: KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) in bits per dim, with the mean from a detached eps
so it only trains the variance) is computed here from the diffusers scheduler's ``alphas_cumprod``. At t = 0 ADM
uses a discretized 8-bit-pixel likelihood; residual tokens are continuous, so the continuous Gaussian NLL is used.
The forward noising is ``DDPMScheduler.add_noise`` and sampling steps with ``DDPMScheduler.step`` on
``timestep_spacing="linspace"`` timesteps (= ADM's ``space_timesteps``: for 8 steps 999, 856, ..., 143, 0).
Temperature scales the injected noise (MAR): ``x = mean + temperature * (step(x) - mean)``.
``clip_denoised`` (HART: on, MAR: off) clamps the sampler's x0 prediction to [-1, 1] (in units of the target
divided by ``residual_scale``). It matters for few steps: the first respaced step from t = 999 (where the clipped
cosine schedule has alpha_bar ~ 2e-9) multiplies eps errors by ~1/sqrt(alpha_bar_999 / alpha_bar_856) ~ 4500 at
8 steps (~300 at 100 steps), which a barely-trained head cannot afford.
Classifier-free guidance (MAR form): both branches share x_t (hence the same noise), only eps is guided,
``eps = eps_u + s * (eps_c - eps_u)``, and the variance comes from the conditional branch. HART writes
``(1 + s) eps_c - s eps_u``, which is this form with scale s + 1 (HART's 4.5 = 5.5 here).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from torch import Tensor, nn

from .config import HeadConfig

__all__ = ["DiffusionHead", "SimpleMLPAdaLN", "timestep_embedding"]


def timestep_embedding(t: Tensor, dim: int = 256, max_period: float = 10000.0) -> Tensor:
    """[cos, sin] sinusoidal embedding (N, dim) of (possibly fractional) timesteps ``t`` (N,) (MAR/DiT)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


def _modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale) + shift


class _ResBlock(nn.Module):
    """LN(eps 1e-6, affine) -> modulate -> Linear -> SiLU -> Linear, gated residual; adaLN from y."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.fc1 = nn.Linear(width, width)
        self.fc2 = nn.Linear(width, width)
        self.ada = nn.Linear(width, 3 * width)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        shift, scale, gate = self.ada(F.silu(y)).chunk(3, dim=-1)
        h = self.fc2(F.silu(self.fc1(_modulate(self.norm(x), shift, scale))))
        return x + gate * h


class SimpleMLPAdaLN(nn.Module):
    """MAR's denoiser MLP: ``forward(x (N, D), t (N,), c (N, z)) -> (N, 2D)`` (eps, variance interpolation)."""

    def __init__(self, token_dim: int, width: int, depth: int, cond_dim: int, freq_dim: int = 256) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.input_proj = nn.Linear(token_dim, width)
        self.time_fc1 = nn.Linear(freq_dim, width)
        self.time_fc2 = nn.Linear(width, width)
        self.cond_embed = nn.Linear(cond_dim, width)
        self.blocks = nn.ModuleList(_ResBlock(width) for _ in range(depth))
        self.final_norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.final_ada = nn.Linear(width, 2 * width)
        self.final_linear = nn.Linear(width, 2 * token_dim)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """MAR's init (a no-op on the meta device)."""
        if self.input_proj.weight.is_meta:
            return
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.time_fc1.weight, std=0.02)
        nn.init.normal_(self.time_fc2.weight, std=0.02)
        for m in [b.ada for b in self.blocks] + [self.final_ada, self.final_linear]:
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(self, x: Tensor, t: Tensor, c: Tensor) -> Tensor:
        t_emb = self.time_fc2(F.silu(self.time_fc1(timestep_embedding(t, self.freq_dim).to(x.dtype))))
        y = t_emb + self.cond_embed(c)
        x = self.input_proj(x)
        for block in self.blocks:
            x = block(x, y)
        shift, scale = self.final_ada(F.silu(y)).chunk(2, dim=-1)
        return self.final_linear(_modulate(self.final_norm(x), shift, scale))


def _normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


class DiffusionHead(nn.Module):
    """``SimpleMLPAdaLN`` plus the MAR/ADM diffusion loss and sampler (see the module docstring).

    The schedule lives in a diffusers ``DDPMScheduler`` (not a module buffer); ``net`` holds all parameters.
    """

    def __init__(self, config: HeadConfig, cond_dim: int) -> None:
        super().__init__()
        self.config = config
        self.net = SimpleMLPAdaLN(config.token_dim, config.width, config.depth, cond_dim)
        self.scheduler = self.make_scheduler()
        self.net.reset_parameters()

    def make_scheduler(self) -> DDPMScheduler:
        """A fresh diffusers ``DDPMScheduler`` with this head's schedule (cosine, learned-range variance)."""
        c = self.config
        with torch.device("cpu"):  # the schedule is real data even when the module is built on the meta device
            return DDPMScheduler(
                num_train_timesteps=c.num_train_timesteps, beta_schedule=c.beta_schedule,
                variance_type="learned_range", prediction_type="epsilon", clip_sample=c.clip_denoised,
                clip_sample_range=1.0, timestep_spacing="linspace",
            )

    def _coeffs(self, t: Tensor, t_prev: Tensor, device: torch.device) -> dict[str, Tensor]:
        """Per-sample float64 schedule terms between ``t`` and ``t_prev`` (-1 = clean), shaped (N, 1)."""
        # float64 cumulative product of the scheduler's betas (its own alphas_cumprod is float32, which loses the
        # small betas near t = 0 when they are recovered as 1 - abar_t / abar_{t-1})
        abar = torch.cumprod(1 - self.scheduler.betas.to(device=device, dtype=torch.float64), dim=0)
        a_t = abar[t]
        a_prev = torch.where(t_prev >= 0, abar[t_prev.clamp(min=0)], torch.ones_like(a_t))
        beta = 1 - a_t / a_prev
        post_var = beta * (1 - a_prev) / (1 - a_t)
        # ADM's posterior_log_variance_clipped: at the last step the posterior variance of the next step is used
        t1 = torch.ones_like(t)
        a1 = abar[t1]
        var1 = (1 - a1 / abar[0]) * (1 - abar[0]) / (1 - a1)
        log_post = torch.log(torch.where(t_prev >= 0, post_var, var1.expand_as(post_var)).clamp(min=1e-20))
        out = {
            "a_t": a_t, "beta": beta, "log_post": log_post, "log_beta": torch.log(beta),
            "c_x0": a_prev.sqrt() * beta / (1 - a_t), "c_xt": (1 - beta).sqrt() * (1 - a_prev) / (1 - a_t),
        }
        return {k: v[:, None] for k, v in out.items()}

    def loss_terms(self, x0: Tensor, cond: Tensor, t: Tensor, noise: Tensor) -> dict[str, Tensor]:
        """Per-sample ``mse`` and ``vb`` (bits/dim) for fixed timesteps ``t`` (N,) and ``noise`` (N, D)."""
        x_t = self.scheduler.add_noise(x0, noise, t)
        eps, v = self.net(x_t, t, cond).chunk(2, dim=-1)
        terms = {"mse": ((noise - eps.float()) ** 2).mean(dim=-1)}
        if self.config.loss == "mse":
            terms["vb"] = torch.zeros_like(terms["mse"])
            return terms
        c = self._coeffs(t, t - 1, x0.device)
        xt64, x064 = x_t.double(), x0.double()
        pred_x0 = (xt64 - (1 - c["a_t"]).sqrt() * eps.detach().double()) / c["a_t"].sqrt()  # unclipped (ADM)
        model_mean = c["c_x0"] * pred_x0 + c["c_xt"] * xt64
        frac = (v.double() + 1) / 2
        model_logvar = frac * c["log_beta"] + (1 - frac) * c["log_post"]
        true_mean = c["c_x0"] * x064 + c["c_xt"] * xt64
        kl = _normal_kl(true_mean, c["log_post"], model_mean, model_logvar).mean(dim=-1) / math.log(2.0)
        nll = (0.5 * (math.log(2 * math.pi) + model_logvar + (x064 - model_mean) ** 2 * torch.exp(-model_logvar)))
        nll = nll.mean(dim=-1) / math.log(2.0)
        terms["vb"] = torch.where(t == 0, nll, kl).float()
        return terms

    def loss(
        self, target: Tensor, cond: Tensor, weight: Tensor | None = None, generator: torch.Generator | None = None
    ) -> Tensor:
        """Weighted mean of MSE(eps) + VLB over ``diffusion_batch_mul`` draws of (t, noise) per row.

        ``target`` (N, D) residual tokens (already divided by ``residual_scale``), ``cond`` (N, z), ``weight`` (N,).
        """
        mul = self.config.diffusion_batch_mul
        x0, c = target.repeat(mul, 1), cond.repeat(mul, 1)
        gen_device = generator.device if generator is not None else x0.device
        t = torch.randint(0, self.config.num_train_timesteps, (x0.shape[0],), generator=generator, device=gen_device)
        noise = torch.randn(x0.shape, generator=generator, device=gen_device, dtype=x0.dtype)
        terms = self.loss_terms(x0, c, t.to(x0.device), noise.to(x0.device))
        per = terms["mse"] + terms["vb"]
        if weight is None:
            return per.mean()
        w = weight.to(per.dtype).repeat(mul)
        return (per * w).sum() / w.sum().clamp(min=1e-8)

    @torch.no_grad()
    def sample(
        self,
        cond: Tensor,
        generator: torch.Generator | None = None,
        num_steps: int | None = None,
        guidance_scale: float = 1.0,
        temperature: float = 1.0,
        uncond: Tensor | None = None,
    ) -> Tensor:
        """Ancestral DDPM sampling of (N, D) tokens given ``cond`` (N, z); CFG with ``uncond`` (N, z) if given."""
        sched = self.make_scheduler()
        sched.set_timesteps(num_steps or self.config.num_sampling_steps)
        n, d = cond.shape[0], self.config.token_dim
        gen_device = generator.device if generator is not None else cond.device
        x = torch.randn((n, d), generator=generator, device=gen_device, dtype=torch.float32).to(cond.device)
        c_all = cond if uncond is None else torch.cat([cond, uncond])
        timesteps = sched.timesteps.tolist()
        # the temperature's float64 mean coefficients of every step, on the CPU once: python floats in the loop, so
        # no step copies schedule terms to the device (a host synchronisation per step on a GPU)
        c_x0, c_xt = (self._coeffs(torch.tensor(timesteps), torch.tensor([*timesteps[1:], -1]), torch.device("cpu"))[k]
                      .flatten().tolist() for k in ("c_x0", "c_xt"))
        for i, t in enumerate(timesteps):
            x_in = x if uncond is None else torch.cat([x, x])
            t_in = torch.full((x_in.shape[0],), t, device=x.device, dtype=torch.long)
            out = self.net(x_in.to(cond.dtype), t_in, c_all).float()
            eps, v = out[:n, :d], out[:n, d:]
            if uncond is not None:
                eps = out[n:, :d] + guidance_scale * (eps - out[n:, :d])
            # mse: the variance channel is untrained, use the fixed posterior variance; mse+vlb: the learned range
            # interpolates between beta and the posterior variance only for v in [-1, 1]
            v = torch.full_like(v, -1.0) if self.config.loss == "mse" else v.clamp(-1.0, 1.0)
            step = sched.step(torch.cat([eps, v], dim=1), t, x, generator=generator)
            if temperature != 1.0 and t > 0:
                mean = (c_x0[i] * step.pred_original_sample.double() + c_xt[i] * x.double()).float()
                x = mean + temperature * (step.prev_sample - mean)
            else:
                x = step.prev_sample
        return x
