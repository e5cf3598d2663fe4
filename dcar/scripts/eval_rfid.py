"""Reconstruction eval of a DC-HT (EVAL_PROTOCOLS.md section 3.1, DC-AE's evaluator): rFID, PSNR, SSIM, LPIPS of the
continuous and the discrete path, codebook usage; one JSON.

    python scripts/eval_rfid.py tokenizer=PATH data.path=/imagenet/val resolution=256 out=results/rfid_256.json
    accelerate launch --multi_gpu --num_processes 8 scripts/eval_rfid.py tokenizer=PATH data.path=... resolution=512
    python scripts/eval_rfid.py tokenizer=runs/t/alternate/final data=shapes out=results/rfid_shapes.json

Images: ``data.heldout_path`` if set, else ``data.path`` (ImageFolder, ADM centre crop at ``resolution``), all of
them or ``num_images`` evenly spaced ones; ``data=shapes``: the shapes held-out split, laid out as the tokenizer's
training run recorded (``<run>/config.yaml``: grid, align, exposure, ...; ``data.shapes`` when there is none). rFID is measured against the
originals' statistics at the same resolution, cached in ``ref_stats`` (default
``<out folder>/fid_stats/<data>_<R>px_<N>_<extractor>.npz``). Per-chunk results go to ``<out>.parts/``; a rerun
reuses them (resume) and reuses the reference statistics. See :mod:`dcar.eval.runner`, :mod:`dcar.eval.fid`.
"""


import dataclasses
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from dcar.cli import data_preset, run_cli
from dcar.config import ConfigError, DataConfig, choice, load_config

PROTOCOL = "dcae-reconstruction"
PROTOCOL_SOURCE = "EVAL_PROTOCOLS.md section 3.1 (efficientvit@de7d773 efficientvit/aecore/evaluator.py)"


@dataclass
class RfidConfig:
    """Keys of ``scripts/eval_rfid.py`` (``key=value``)."""

    config: str = ""
    tokenizer: str = ""  # DC-HT save_pretrained folder
    data: DataConfig = field(default_factory=lambda: DataConfig(kind="imagefolder"))
    resolution: int = 0  # 0: data.resolution
    num_images: int = 0  # 0: all (50,000 for ImageNet val; data.shapes.heldout_size for shapes)
    batch_size: int = 32
    chunk_size: int = 1000  # images per resumable part file
    num_workers: int = 4
    out: str = "results/rfid.json"
    ref_stats: str = ""  # "": <out folder>/fid_stats/<data>_<R>px_<N>_<extractor>.npz
    fid_weights: str = ""  # torch-fidelity feature_extractor_weights_path ("" = torch hub cache)
    feature_extractor: str = "inception-v3-compat"
    feature_layer: str = ""  # "": the extractor's FID layer (2048)
    fid_resize: str = choice("bilinear-299", "bilinear-299", "extractor")
    lpips: str = choice("auto", "auto", "required", "off")
    device: str = "auto"
    progress: bool = True


def build_images(cfg: RfidConfig, resolution: int):
    """(dataset, evaluated indices, description) of the images to reconstruct."""
    if cfg.data.kind == "shapes":
        from dcar.data.build import run_data_config, shapes_dataset

        trained = run_data_config(cfg.tokenizer, kind="shapes")  # the layout the tokenizer was trained on
        layout = trained.shapes if trained is not None else cfg.data.shapes
        n = cfg.num_images or cfg.data.shapes.heldout_size
        ds = shapes_dataset(dataclasses.replace(cfg.data, resolution=resolution, shapes=layout), "heldout", size=n)
        layout_dict = dataclasses.asdict(dataclasses.replace(layout, size=0, heldout_size=0))
        return ds, list(range(n)), {"kind": "shapes", "split": "heldout", "seed": cfg.data.seed, "layout": layout_dict}
    if cfg.data.kind != "imagefolder":
        raise ConfigError(f"data.kind={cfg.data.kind!r} is not supported here (use imagefolder or data=shapes)")
    root = cfg.data.heldout_path or cfg.data.path
    if not root:
        raise ConfigError("data.path=DIR is required (the ImageNet val folder, class sub-folders), or data=shapes")
    from dcar.data.imagefolder import ImageFolderDataset

    try:
        ds = ImageFolderDataset(root, resolution)
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(str(err)) from None
    total = len(ds)
    n = min(cfg.num_images or total, total)
    return ds, [i * total // n for i in range(n)], {"kind": "imagefolder", "path": str(root), "crop": "adm"}


def main(argv: Sequence[str]) -> dict:
    cfg = load_config(RfidConfig, argv, presets=[data_preset()])
    if not cfg.tokenizer:
        raise ConfigError("tokenizer=PATH is required (a DC-HT save_pretrained folder)")
    import torch
    from torch.utils.data import DataLoader

    from dcar.data.collate import collate
    from dcar.eval import fid as F
    from dcar.eval import metrics as M
    from dcar.eval import runner as R
    from dcar.models.tokenizer import DCHT

    resolution = cfg.resolution or cfg.data.resolution
    ds, indices, source = build_images(cfg, resolution)
    ctx = R.dist_context(cfg.device)
    torch.backends.cudnn.deterministic = True
    try:  # fails here, before any heavy work, when the Inception weights (or LPIPS's AlexNet) are missing
        with ctx.main_first():
            extractor = F.FeatureExtractor(cfg.feature_extractor, cfg.feature_layer, cfg.fid_weights, ctx.device,
                                           cfg.fid_resize)
        lpips, lpips_status = M.build_lpips(cfg.lpips, ctx.device)
    except (F.FidWeightsError, M.LpipsUnavailable) as err:
        raise ConfigError(str(err)) from None
    ext = {k: v for k, v in extractor.describe().items() if k != "weights"}
    out = Path(cfg.out)
    name = "-".join(Path(source["path"]).parts[-2:]) if "path" in source else f"shapes-heldout-seed{cfg.data.seed}-" + \
        hashlib.sha256(json.dumps(source["layout"], sort_keys=True).encode()).hexdigest()[:8]
    ref_path = Path(cfg.ref_stats or out.parent / "fid_stats" /
                    f"{name}_{resolution}px_{len(indices)}_{ext['name']}-{ext['layer']}.npz")
    ref_meta = {"kind": "reconstruction-reference", "data": source, "resolution": resolution,
                "num_images": len(indices), "extractor": ext}
    try:
        need_ref = F.reuse_stats(ref_path, ref_meta) is None
    except ValueError as err:
        raise ConfigError(str(err)) from None

    tok_path = Path(cfg.tokenizer)
    work = R.prepare_work_dir(ctx, out.with_suffix(".parts"), {
        "tokenizer": R.fingerprint(tok_path), "data": source, "resolution": resolution,
        "num_images": len(indices), "chunk_size": cfg.chunk_size, "extractor": ext})
    keys = M.recon_part_keys(lpips is not None, need_ref)
    chunks = [[indices[i] for i in r] for r in R.chunk_ranges(len(indices), cfg.chunk_size)]
    model: list = []  # the tokenizer is loaded only if some chunk still has to be computed

    def compute(items: Sequence[int]) -> dict:
        if not model:
            model.append(DCHT.from_pretrained(tok_path).to(ctx.device).eval())
        loader = DataLoader(R.IndexedImages(ds, items), batch_size=cfg.batch_size, collate_fn=collate,
                            num_workers=cfg.num_workers if cfg.data.kind == "imagefolder" else 0)
        return M.reconstruction_arrays(model[0], loader, extractor, lpips, need_ref)

    R.run_chunks(ctx, work, chunks, compute, keys, desc=f"rfid {resolution}px", progress=cfg.progress)
    if not ctx.is_main:
        return {}
    parts = R.load_parts(work, len(chunks), keys)
    if need_ref:
        F.save_stats(ref_path, {"all": F.FeatureStats.from_features(R.concat(parts, "feat_ref"))}, ref_meta)
    reference = F.load_stats(ref_path)[0]["all"]
    summary = M.summarize_reconstruction(parts, reference, lpips is not None)
    env = R.environment()
    result = {
        "protocol": PROTOCOL, "protocol_source": PROTOCOL_SOURCE,
        "tokenizer": str(tok_path), "tokenizer_fingerprint": R.fingerprint(tok_path),
        "data": source, "resolution": resolution, "num_requested": len(indices),
        **summary,
        "lpips_status": lpips_status,
        "fid": {"feature_extractor": extractor.describe(), "reference_stats": str(ref_path),
                "reference_count": reference.n},
        "dcar_version": env["dcar"], "environment": env,
    }
    R.atomic_write_json(out, result)
    for p in M.RECON_PATHS:
        m = result[p]
        lp = "n/a" if m["lpips"] is None else f"{m['lpips']:.4f}"
        print(f"{p:>10}: rFID {m['rfid']:.3f}  PSNR {m['psnr']:.2f}  SSIM {m['ssim']:.4f}  LPIPS {lp}")
    print(f"{result['num_images']} images at {resolution}px; wrote {out}")
    return result


if __name__ == "__main__":
    run_cli(main)
