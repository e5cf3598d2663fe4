"""Loading public DC-AE weights into DC-HT's encoder/decoder, in either key format.

Two formats exist for DC-AE-f32c32 (``mit-han-lab/dc-ae-f32c32-{in,mix}-1.0`` and ``...-1.0-diffusers``):

- *native* (efficientvit ``DCAE``, 338 keys for f32c32), e.g. ``encoder.project_in.conv.conv.weight`` or
  ``encoder.stages.3.op_list.0.context_module.main.qkv.conv.weight`` (3C, C, 1, 1) whose output channels are laid out
  per head as [q|k|v] blocks of ``attention_head_dim`` (the reshape happens after the 1x1 conv);
- *diffusers* (``AutoencoderDC``, 362 keys), which DC-HT uses itself (``encoder.conv_in.conv.weight``, ...): diffusers
  splits ``qkv`` into ``to_q/to_k/to_v`` = the three thirds of the native output channels and concatenates them again
  before the per-head reshape, so they are not true all-head Q/K/V.

native -> diffusers uses diffusers' own converter (``diffusers.loaders.single_file_utils.
convert_autoencoder_dc_checkpoint_to_diffusers``). diffusers has no converter back, so :func:`to_native_state_dict`
(diffusers -> native, for export and tests) is written here; ``native_to_diffusers(to_native_state_dict(sd)) == sd``.
Pickled checkpoints are only ever read with ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
from safetensors.torch import load_file
from torch import Tensor

if TYPE_CHECKING:
    from .dcht import DCHT

CHECKPOINT_NAMES = (
    "diffusion_pytorch_model.safetensors",
    "model.safetensors",
    "vae/diffusion_pytorch_model.safetensors",
    "vae/model.safetensors",
    "diffusion_pytorch_model.bin",
    "pytorch_model.bin",
    "vae/diffusion_pytorch_model.bin",
)
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
_NATIVE_PREFIXES = (
    "encoder.project_in.",
    "encoder.stages.",
    "encoder.project_out.",
    "decoder.project_in.",
    "decoder.stages.",
    "decoder.project_out.",
)
_DIFFUSERS_PREFIXES = (
    "encoder.conv_in.",
    "encoder.down_blocks.",
    "encoder.conv_out.",
    "decoder.conv_in.",
    "decoder.up_blocks.",
    "decoder.norm_out.",
    "decoder.conv_out.",
)
# diffusers -> native renames inside one stage block (``{side}.{down,up}_blocks.{s}.{i}.<rest>``)
_BLOCK_RENAMES = (
    (r"conv1\.(weight|bias)", r"main.conv1.conv.\1"),
    (r"conv2\.weight", r"main.conv2.conv.weight"),
    (r"norm\.(\w+)", r"main.conv2.norm.\1"),
    (r"conv\.(weight|bias)", r"main.conv.conv.\1"),
    (r"attn\.to_out\.weight", r"context_module.main.proj.conv.weight"),
    (r"attn\.norm_out\.(\w+)", r"context_module.main.proj.norm.\1"),
    (r"attn\.to_qkv_multiscale\.(\d+)\.proj_in\.weight", r"context_module.main.aggreg.\1.0.weight"),
    (r"attn\.to_qkv_multiscale\.(\d+)\.proj_out\.weight", r"context_module.main.aggreg.\1.1.weight"),
    (r"conv_out\.conv_inverted\.(weight|bias)", r"local_module.main.inverted_conv.conv.\1"),
    (r"conv_out\.conv_depth\.(weight|bias)", r"local_module.main.depth_conv.conv.\1"),
    (r"conv_out\.conv_point\.(weight|bias)", r"local_module.main.point_conv.conv.\1"),
    (r"conv_out\.norm\.(\w+)", r"local_module.main.point_conv.norm.\1"),
)
_TOP_RENAMES = (
    (r"encoder\.conv_in\.conv\.(weight|bias)", r"encoder.project_in.conv.conv.\1"),  # pixel-unshuffle conv_in
    (r"encoder\.conv_in\.(weight|bias)", r"encoder.project_in.conv.\1"),
    (r"encoder\.conv_out\.(weight|bias)", r"encoder.project_out.main.op_list.0.conv.\1"),
    (r"decoder\.conv_in\.(weight|bias)", r"decoder.project_in.main.conv.\1"),
    (r"decoder\.norm_out\.(weight|bias)", r"decoder.project_out.op_list.0.\1"),
    (r"decoder\.conv_out\.conv\.(weight|bias)", r"decoder.project_out.op_list.2.conv.conv.\1"),  # pixel-shuffle
    (r"decoder\.conv_out\.(weight|bias)", r"decoder.project_out.op_list.2.conv.\1"),
)


def detect_format(state_dict: dict[str, Tensor]) -> Literal["native", "diffusers"]:
    """Which DC-AE key format ``state_dict`` uses (error if neither or a mix)."""
    native = any(k.startswith(_NATIVE_PREFIXES) for k in state_dict)
    diff = any(k.startswith(_DIFFUSERS_PREFIXES) for k in state_dict)
    if native == diff:
        sample = sorted(state_dict)[:5]
        raise ValueError(f"cannot tell the DC-AE key format (native={native}, diffusers={diff}); first keys {sample}")
    return "native" if native else "diffusers"


def native_to_diffusers(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """efficientvit keys -> diffusers keys with diffusers' converter (the input dict is left untouched)."""
    from diffusers.loaders.single_file_utils import convert_autoencoder_dc_checkpoint_to_diffusers

    return convert_autoencoder_dc_checkpoint_to_diffusers(dict(state_dict))


def to_native_state_dict(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """diffusers DC-AE keys (``encoder.*``/``decoder.*``, e.g. ``DCHT.state_dict()``) -> efficientvit keys.

    ``to_q/to_k/to_v`` (C, C) are concatenated along the output dim into ``qkv.conv.weight`` (3C, C, 1, 1) and
    ``to_out`` (C, C) becomes ``proj.conv.weight`` (C, C, 1, 1). Keys outside encoder/decoder (the codebook) are
    dropped. Inverse of :func:`native_to_diffusers`.
    """
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        if not key.startswith(("encoder.", "decoder.")):
            continue
        m = re.fullmatch(r"(encoder|decoder)\.(?:down|up)_blocks\.(\d+)\.(\d+)\.(.+)", key)
        if m:
            side, stage, idx, rest = m.groups()
            prefix = f"{side}.stages.{stage}.op_list.{idx}."
            q = re.fullmatch(r"attn\.to_([qkv])\.weight", rest)
            if q:
                if q.group(1) == "q":
                    parts = [state_dict[key[: -len("to_q.weight")] + f"to_{n}.weight"] for n in "qkv"]
                    out[prefix + "context_module.main.qkv.conv.weight"] = torch.cat(parts, 0)[..., None, None]
                continue
            renames = _BLOCK_RENAMES
        else:
            prefix, rest, renames = "", key, _TOP_RENAMES
        for pattern, repl in renames:
            if re.fullmatch(pattern, rest):
                new = prefix + re.sub(pattern, repl, rest)
                out[new] = value[..., None, None] if new.endswith("proj.conv.weight") else value
                break
        else:
            raise ValueError(f"no efficientvit name for diffusers key {key!r}")
    return out


def read_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """Tensors of a ``.safetensors`` file, or of a pickle file loaded *only* with ``weights_only=True``.

    A top-level ``{"state_dict": ...}`` or ``{"model": ...}`` wrapper and a DDP ``module.`` prefix are removed.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        sd: object = load_file(str(path), device="cpu")
    elif path.suffix in PICKLE_SUFFIXES:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, AttributeError) as err:
            raise ValueError(
                f"refusing to load {path}: it cannot be read with torch.load(weights_only=True) (it pickles "
                f"arbitrary objects, which dcar never unpickles). Convert it to .safetensors. ({err})"
            ) from err
        for wrapper in ("state_dict", "model"):
            if isinstance(sd, dict) and isinstance(sd.get(wrapper), dict):
                sd = sd[wrapper]
    else:
        raise ValueError(f"unsupported weights file {path}: use .safetensors or one of {PICKLE_SUFFIXES}")
    if not isinstance(sd, dict) or not all(isinstance(v, Tensor) for v in sd.values()):
        raise ValueError(f"{path} does not hold a flat {{name: tensor}} state dict")
    return {k.removeprefix("module."): v for k, v in sd.items()}


def resolve_checkpoint(path_or_hub_id: str | os.PathLike, revision: str | None = None) -> Path:
    """A weights file: the path itself, the first of ``CHECKPOINT_NAMES`` in a directory, or a Hub download."""
    path = Path(path_or_hub_id)
    if path.is_file():
        return path
    if path.is_dir():
        for name in CHECKPOINT_NAMES:
            if (path / name).is_file():
                return path / name
        raise FileNotFoundError(f"no DC-AE weights in directory {path}; looked for {list(CHECKPOINT_NAMES)}")
    text = str(path_or_hub_id)
    if path.is_absolute() or text.startswith(".") or path.suffix in (".safetensors", *PICKLE_SUFFIXES):
        raise FileNotFoundError(f"DC-AE weights file {text} does not exist")
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import RemoteEntryNotFoundError

    for name in CHECKPOINT_NAMES:
        try:
            return Path(hf_hub_download(text, name, revision=revision))
        except RemoteEntryNotFoundError:
            continue  # the repo exists but has no file of this name
        except Exception as err:  # offline, unknown repo, auth
            raise OSError(
                f"could not download DC-AE weights {text!r} from the Hugging Face Hub ({type(err).__name__}: {err}). "
                "Without internet access (or with HF_HUB_OFFLINE=1 and nothing cached) pass a local .safetensors "
                "file or a directory holding diffusion_pytorch_model.safetensors / model.safetensors instead."
            ) from err
    raise FileNotFoundError(f"Hub repo {text!r} has none of {list(CHECKPOINT_NAMES)}")


def _listing(names: list[str], limit: int = 20) -> str:
    more = f" ... (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def load_dcae_weights(model: DCHT, path_or_hub_id: str | os.PathLike, *, revision: str | None = None) -> dict:
    """Load a DC-AE checkpoint (native or diffusers keys) into ``model.encoder`` / ``model.decoder``.

    The codebook is left as it is. Missing, unexpected or wrongly shaped keys raise ``ValueError`` listing them
    (a checkpoint without BatchNorm ``num_batches_tracked`` counters is accepted). On a meta-device model the
    checkpoint tensors are assigned. Returns ``{"path", "format", "num_tensors"}``.
    """
    path = resolve_checkpoint(path_or_hub_id, revision)
    sd = read_state_dict(path)
    fmt = detect_format(sd)
    if fmt == "native":
        sd = native_to_diffusers(sd)
    own = {k: v for k, v in model.state_dict().items() if k.startswith(("encoder.", "decoder."))}
    missing = sorted(k for k in own.keys() - sd.keys() if not k.endswith("num_batches_tracked"))
    unexpected = sorted(sd.keys() - own.keys())
    wrong = sorted(
        f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}"
        for k in own.keys() & sd.keys()
        if sd[k].shape != own[k].shape
    )
    if missing or unexpected or wrong:
        raise ValueError(
            f"DC-AE checkpoint {path} ({fmt} format) does not match this DC-HT config: "
            f"missing keys [{_listing(missing)}]; unexpected keys [{_listing(unexpected)}]; "
            f"shape mismatches [{_listing(wrong)}]"
        )
    on_meta = any(t.is_meta for t in own.values())
    model.load_state_dict(sd, strict=False, assign=on_meta)
    return {"path": str(path), "format": fmt, "num_tensors": len(sd)}
