"""Configuration dataclasses of the DC-AR generator: ``DCARConfig`` (transformer), ``HeadConfig`` (diffusion MLP
head) and ``TextEncoderConfig`` (the frozen text encoder, which is not part of ``DCAR``).

Defaults are the paper's model (DC-AR, ICCV 2025): a PixArt-alpha transformer without adaLN, 28 x 1152, 16 heads,
codebook 16384, T5-base captions (768-d) -> 634,942,336 transformer parameters; MAR's SimpleMLPAdaLN head of width
1024 and depth 6 on the 1152-d condition -> 36,192,320 parameters (see ``/work/shared/design/DCAR_SPEC.md`` s.3, s.6).
String fields with a fixed set of values are declared with :func:`dcar.config.schema.choice`; ``validate`` checks them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ...config.schema import choice


def check_choices(config: Any, prefix: str = "") -> None:
    """Raise ``ValueError`` for a ``choice()`` field (also in nested dataclasses) holding another value."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            check_choices(value, f"{prefix}{f.name}.")
        elif "choices" in f.metadata and value not in f.metadata["choices"]:
            raise ValueError(f"invalid choice {value!r} for '{prefix}{f.name}'; valid choices: {f.metadata['choices']}")


@dataclass
class HeadConfig:
    """MAR's diffusion MLP head (SimpleMLPAdaLN) and its Gaussian diffusion (cosine schedule, eps + learned range).

    ``condition``: what conditions the head at a position (HART's design, the default ``"hidden+code"``: the
    transformer's final-normed hidden state plus the token embedding of that position's discrete code, the ground
    truth in training and the sampled code at inference; ``"hidden"``: the hidden state alone, MAR's).
    ``loss_tokens``: ``"masked"`` (MAR: the diffusion loss is a mean over the positions that were [MASK]ed in the
    input) or ``"all"`` (every position). ``loss``: ``"mse+vlb"`` (MAR/ADM hybrid loss, trains the variance
    interpolation) or ``"mse"`` (eps only; the sampler then uses the fixed posterior variance).
    ``residual_scale``: targets are divided by it before diffusion and samples multiplied back (HART uses 0.6).
    ``clip_denoised``: clamp the sampler's x0 prediction to [-1, 1] in those scaled units (HART: on; MAR: off).
    Few-step sampling from t = 999 needs it (see ``diffusion_head``), and it bounds the samples, so choose
    ``residual_scale`` such that residual / residual_scale stays within [-1, 1] (e.g. a high quantile of |residual|).
    ``num_sampling_steps``: default number of respaced denoising steps (HART 8, MAR 100).
    """

    token_dim: int = 32  # channels of a residual token (the tokenizer's latent channels)
    width: int = 1024  # the MLP's width (MAR SimpleMLPAdaLN)
    depth: int = 6  # residual blocks
    num_train_timesteps: int = 1000
    beta_schedule: str = choice("squaredcos_cap_v2", "squaredcos_cap_v2", "linear")  # squaredcos_cap_v2: cosine
    loss: str = choice("mse+vlb", "mse+vlb", "mse")  # mse+vlb: eps + learned variance (MAR/ADM); mse: eps only
    diffusion_batch_mul: int = 4  # each token's target repeated with this many noise draws per step (MAR: 4)
    num_sampling_steps: int = 8  # respaced denoising steps at sampling (HART 8, MAR 100)
    clip_denoised: bool = True  # clamp the x0 prediction to [-1, 1] (in residual_scale units; HART on, MAR off)
    residual_scale: float = 1.0  # targets are residual / residual_scale (HART 0.6)
    condition: str = choice("hidden+code", "hidden+code", "hidden")  # hidden+code: HART's; hidden: MAR's
    loss_tokens: str = choice("masked", "masked", "all")  # the positions the diffusion loss averages over


@dataclass
class DCARConfig:
    """The DC-AR transformer (PixArt-alpha blocks with the adaptive norms removed) and its optional diffusion head.

    Position embedding (PixArt-alpha ``get_2d_sincos_pos_embed``): grid index ``i`` maps to
    ``i / (grid / pos_base_size) / pos_interpolation_scale``. The 256 px model has an 8 x 8 grid with base 8 and
    scale 1 (positions 0..7); the 512 px model uses base 16 and scale 2 (positions 0..7.5, the 256 model's range),
    and a 256 model run at 512 px gets the same positions from its own settings.
    ``use_head: false`` is the discrete-only baseline (paper Table 4): no diffusion head, no residual tokens.
    ``train_mask_ratio``: the training mask-ratio distribution used by ``DCAR.random_mask``, MaskGIT's ``"cosine"``
    (default) or MAR's ``"truncnorm"`` on [``train_mask_ratio_min``, 1] (MAR 0.7, HART 0.5).
    The null caption for classifier-free guidance is PixArt's fixed random buffer of shape
    (``max_text_len``, ``caption_dim``), drawn from N(0, 1/caption_dim) with a generator seeded by
    ``null_caption_seed`` and saved in the state dict.
    """

    codebook_size: int = 16384  # the tokenizer's codes (the [MASK] token is one more)
    num_layers: int = 28
    width: int = 1152
    num_heads: int = 16
    mlp_ratio: float = 4.0  # MLP hidden width = width x mlp_ratio
    caption_dim: int = 768  # the text encoder's state width (T5-base: 768)
    max_text_len: int = 120  # caption tokens (the text encoder's max_length)
    image_size: int = 256  # pixels per side; the token grid is image_size / downsample
    downsample: int = 32  # the tokenizer's spatial compression
    pos_base_size: int = 8  # PixArt's base size of the sin-cos position grid (see the class docstring)
    pos_interpolation_scale: float = 1.0  # PixArt's interpolation scale (512 px: 2)
    null_caption_seed: int = 0  # seed of the fixed random null caption used for CFG
    train_mask_ratio: str = choice("cosine", "cosine", "truncnorm")  # MaskGIT's cosine or MAR's truncated normal
    train_mask_ratio_min: float = 0.7  # truncnorm's lower bound (MAR 0.7, HART 0.5)
    use_head: bool = True  # false: the discrete-only baseline (no diffusion head, no residual tokens)
    head: HeadConfig = field(default_factory=HeadConfig)

    def __post_init__(self) -> None:
        if isinstance(self.head, dict):
            self.head = HeadConfig(**self.head)

    @property
    def mask_token_id(self) -> int:
        """Id of the [MASK] token (the last row of the embedding table)."""
        return self.codebook_size

    @property
    def grid_size(self) -> int:
        """Tokens per side at ``image_size``."""
        return self.image_size // self.downsample

    def validate(self) -> None:
        """Raise ``ValueError`` for settings the model cannot build."""
        check_choices(self)
        if self.width % self.num_heads:
            raise ValueError(f"width={self.width} is not a multiple of num_heads={self.num_heads}")
        if self.width % 4:
            raise ValueError(f"width={self.width} must be a multiple of 4 for the 2-D sin-cos position embedding")
        if min(self.codebook_size, self.num_layers, self.caption_dim, self.max_text_len, self.pos_base_size) < 1:
            raise ValueError("codebook_size, num_layers, caption_dim, max_text_len and pos_base_size must be >= 1")
        if self.pos_interpolation_scale <= 0:
            raise ValueError("pos_interpolation_scale must be positive")
        if not 0.0 <= self.train_mask_ratio_min < 1.0:
            raise ValueError("train_mask_ratio_min must lie in [0, 1)")
        h = self.head
        if self.use_head and (min(h.width, h.depth, h.token_dim, h.diffusion_batch_mul, h.num_sampling_steps) < 1):
            raise ValueError("head width, depth, token_dim, diffusion_batch_mul and num_sampling_steps must be >= 1")
        if self.use_head and h.num_sampling_steps > h.num_train_timesteps:
            raise ValueError("head.num_sampling_steps cannot exceed head.num_train_timesteps")


@dataclass
class TextEncoderConfig:
    """A frozen text encoder giving per-token states (B, max_length, D) and a key-padding mask.

    ``kind``: ``"t5"`` (``T5EncoderModel.from_pretrained(name_or_path)``, T5-base by default, PixArt/DC-AR),
    ``"hf"`` (any ``AutoModel`` whose output has ``last_hidden_state``, e.g. a local MiniLM), or ``"t5-random"``
    (a randomly initialised ``T5EncoderModel(T5Config(**t5_config))`` seeded with ``seed``, with the tokenizer read
    from ``tokenizer_path``; for tests and the CPU shapes pipeline). For ``"t5"``/``"hf"``, ``tokenizer_path``
    defaults to ``name_or_path``.
    ``max_length`` = 120 tokens, PixArt-alpha's T5 length; captions are padded/truncated to it.
    ``position_features`` and ``context_window`` (not in PixArt; for the random stand-in T5 only). A randomly
    initialised T5's state at a token is that word plus a bag-of-words context: its attention is near uniform, so a
    token's state does not depend on where the other words stand (swapping a caption's two colour words changes the
    states at those two positions only). Which colour belongs to which shape, and which object is above, is then
    in no single state, whereas a pretrained T5 writes a word's modifiers and relations into its state.
    ``position_features``: add fixed sin-cos features of each token's position. ``context_window=w``: add to each
    token's state fixed random rotations of the states of its ``w`` neighbours on each side (one rotation per
    offset, sum scaled by ``1/sqrt(2w)``; padding contributes nothing), so the state of "circle" in "a red circle"
    carries "red", as a pretrained encoder's would.
    """

    kind: str = choice("t5", "t5", "hf", "t5-random")
    name_or_path: str = "google-t5/t5-base"
    tokenizer_path: str = ""
    max_length: int = 120
    dtype: str = choice("float32", "float32", "bfloat16", "float16")
    t5_config: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    position_features: bool = False
    context_window: int = 0

    def validate(self) -> None:
        """Raise ``ValueError`` for invalid settings."""
        check_choices(self)
        if self.context_window < 0:
            raise ValueError(f"context_window must be >= 0, got {self.context_window}")
        if self.max_length < 1:
            raise ValueError("max_length must be >= 1")
