"""Bad input that the reader and text-encoder tests elsewhere do not cover: empty, 10k-character and non-ASCII
captions end to end (reader -> text encoder), and model code shipped with a checkpoint is never executed."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from PIL import Image

from dcar.data.captioned import JsonlCaptionDataset
from dcar.models.generator import TextEncoder, TextEncoderConfig, build_word_tokenizer

TINY_T5 = {"d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 1, "num_heads": 4}
LONG = ("a red circle " * 800)[:10_000]
CAPTIONS = ["", LONG, "un cercle rouge — 赤い円 🎈", "a red circle"]


def test_odd_captions_are_kept_truncated_or_encoded(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    rows = []
    for i, caption in enumerate(CAPTIONS):
        Image.new("RGB", (12, 10), (10 * i, 0, 0)).save(tmp_path / f"{i}.png")
        rows.append(json.dumps({"image": f"{i}.png", "caption": caption}, ensure_ascii=False))
    manifest = tmp_path / "data.jsonl"
    manifest.write_text("\n".join(rows) + "\n", encoding="utf-8")
    ds = JsonlCaptionDataset(manifest, 8, max_caption_chars=2048)
    got = [ds[i]["caption"] for i in range(len(ds))]
    assert got == ["", LONG[:2048], CAPTIONS[2], "a red circle"]  # empty kept (a null caption), long truncated
    assert ds.num_truncated == 1 and "truncated 1 caption" in caplog.text and "max_caption_chars=2048" in caplog.text

    build_word_tokenizer(["a red circle"], tmp_path / "words")
    text = TextEncoder(TextEncoderConfig(kind="t5-random", tokenizer_path=str(tmp_path / "words"), max_length=16,
                                         t5_config=TINY_T5))
    states, mask = text.encode(got)
    assert states.shape == (4, 16, 32) and torch.isfinite(states).all()
    assert mask.sum(1).tolist()[0] == 1  # the empty caption is just </s>
    assert mask[1].all()  # 2048 characters (~470 words) fill, and are cut to, max_length tokens
    assert 1 < int(mask[2].sum()) <= 16  # unknown words become <unk> tokens, nothing is dropped silently
    ids = text.tokenizer(got[2])["input_ids"]
    assert text.tokenizer.unk_token_id in ids


def test_checkpoint_code_is_never_executed(tmp_path: Path) -> None:
    """A model folder whose config points to its own Python code (``auto_map``) is refused; the code never runs."""
    marker = tmp_path / "executed"
    model_dir = tmp_path / "evil"
    model_dir.mkdir()
    (model_dir / "modeling_evil.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('pwned')\n"
        "from transformers import PreTrainedModel\nclass EvilModel(PreTrainedModel):\n    pass\n")
    (model_dir / "configuration_evil.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('pwned')\n"
        "from transformers import PretrainedConfig\nclass EvilConfig(PretrainedConfig):\n    model_type = 'evil'\n")
    (model_dir / "config.json").write_text(json.dumps({
        "model_type": "evil", "auto_map": {"AutoConfig": "configuration_evil.EvilConfig",
                                           "AutoModel": "modeling_evil.EvilModel"}}))
    build_word_tokenizer(["a red circle"], model_dir)
    with pytest.raises((OSError, ValueError)) as err:
        TextEncoder(TextEncoderConfig(kind="hf", name_or_path=str(model_dir)))
    assert "trust_remote_code" in str(err.value) or "evil" in str(err.value)
    assert not marker.exists()
