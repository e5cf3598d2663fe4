"""Text encoders of the DC-AR generator (dcar.models.generator.text_encoder), offline: a tiny random T5 with a
tokenizer made from captions at test time, a tiny local BERT through ``kind="hf"``, and the safetensors cache."""

import pytest
import torch

from dcar.models.generator import (
    DCAR,
    DCARConfig,
    HeadConfig,
    TextEncoder,
    TextEncoderConfig,
    build_text_encoder,
    build_word_tokenizer,
    load_cached,
)

CAPTIONS = [
    "a red circle above a blue square",
    "a green triangle left of a yellow diamond",
    "an orange square",
    "a purple circle below a cyan triangle, and a pink square",
]
TINY_T5 = {"d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 2, "num_heads": 4}


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    build_word_tokenizer(CAPTIONS, out)
    return out


@pytest.fixture(scope="module")
def encoder(tok_dir):
    return TextEncoder(TextEncoderConfig(kind="t5-random", tokenizer_path=str(tok_dir), max_length=8, t5_config=TINY_T5))


def test_word_tokenizer_round_trip(tok_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    words = sorted({w for c in CAPTIONS for w in c.replace(",", " , ").split()})
    assert len(tok) == 3 + len(words)
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    ids = tok("A Red circle above a blue square")["input_ids"]
    assert ids[-1] == 1 and len(ids) == 8 and 2 not in ids
    assert ids[:-1] == [3 + words.index(w) for w in ["a", "red", "circle", "above", "a", "blue", "square"]]
    assert tok.decode(ids, skip_special_tokens=True) == "a red circle above a blue square"
    assert tok("a zebra")["input_ids"] == [3 + words.index("a"), 2, 1]  # unknown word -> <unk>


def test_tiny_t5_encode_mask_and_truncation(encoder):
    states, mask = encoder.encode(["an orange square", CAPTIONS[3]])
    assert states.shape == (2, 8, 32) and mask.dtype == torch.bool
    assert mask.sum(1).tolist() == [4, 8]  # 3 words + </s>; the long caption is truncated to max_length
    assert mask[0, :4].all() and not mask[0, 4:].any()
    assert encoder.hidden_size == 32 and torch.isfinite(states).all()
    # the same words give the same states whatever the padding
    alone, _ = encoder.encode(["an orange square"])
    torch.testing.assert_close(alone[0, :4], states[0, :4], rtol=1e-5, atol=1e-5)


def test_frozen_and_seeded(encoder, tok_dir):
    assert not any(p.requires_grad for p in encoder.parameters())
    encoder.train()
    assert not encoder.model.training
    again = TextEncoder(encoder.config)
    assert torch.equal(encoder.encode(CAPTIONS)[0], again.encode(CAPTIONS)[0])


def test_cache_round_trip(encoder, tmp_path):
    written = encoder.encode_and_cache(CAPTIONS, tmp_path / "cache" / "text.safetensors", batch_size=3)
    cached = load_cached(tmp_path / "cache" / "text.safetensors")
    assert cached.captions == CAPTIONS
    assert torch.equal(cached.states, written.states) and torch.equal(cached.mask, written.mask)
    direct, mask = encoder.encode(CAPTIONS)
    torch.testing.assert_close(cached.states, direct, rtol=1e-5, atol=1e-6)
    assert torch.equal(cached.mask, mask)


def test_hf_kind_with_a_local_model(tok_dir, tmp_path):
    from transformers import AutoTokenizer, BertConfig, BertModel

    torch.manual_seed(0)
    bert = BertModel(BertConfig(vocab_size=64, hidden_size=24, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=48, max_position_embeddings=32))
    bert.save_pretrained(tmp_path / "bert")
    AutoTokenizer.from_pretrained(str(tok_dir)).save_pretrained(tmp_path / "bert")
    enc = build_text_encoder({"text_encoder": {"kind": "hf", "name_or_path": str(tmp_path / "bert"), "max_length": 6}})
    states, mask = enc.encode(CAPTIONS[:2])
    assert states.shape == (2, 6, 24) and enc.hidden_size == 24 and mask.all()


def test_offline_errors_are_clear(tmp_path):
    with pytest.raises(OSError, match="kind='t5-random'"):
        TextEncoder(TextEncoderConfig(kind="t5", name_or_path=str(tmp_path / "missing-t5")))
    with pytest.raises(ValueError, match="tokenizer_path"):
        TextEncoder(TextEncoderConfig(kind="t5-random"))
    with pytest.raises(ValueError, match="text_encoder.max_lenght"):
        build_text_encoder({"text_encoder": {"max_lenght": 3}})


def test_encoder_feeds_the_generator(encoder):
    states, mask = encoder.encode(CAPTIONS)
    cfg = DCARConfig(codebook_size=16, num_layers=1, width=32, num_heads=2, caption_dim=encoder.hidden_size,
                     max_text_len=8, image_size=64, pos_base_size=2, head=HeadConfig(token_dim=4, width=16, depth=1))
    out = DCAR(cfg)(torch.randint(0, 17, (4, 2, 2)), states, mask, torch.tensor([False, True, False, False]))
    assert out.logits.shape == (4, 4, 16)


def test_position_features_make_word_order_visible(tok_dir, encoder):
    """A random T5 is nearly a bag of words; position_features adds sin-cos features of each real token's position
    (padding untouched), so captions with swapped colour words become far apart."""
    from dcar.models.generator.transformer import sincos_1d

    ordered = TextEncoder(TextEncoderConfig(kind="t5-random", tokenizer_path=str(tok_dir), max_length=8,
                                            t5_config=TINY_T5, position_features=True))
    caps = ["a red circle above a blue square", "a blue circle above a red square"]
    plain, mask = encoder.encode(caps)
    with_pos, mask2 = ordered.encode(caps)
    assert torch.equal(mask, mask2)
    expected = plain + sincos_1d(torch.arange(8), 32).float()[None] * mask[..., None]
    torch.testing.assert_close(with_pos, expected)
    assert torch.equal(with_pos[~mask], plain[~mask])

    def set_distance(states):  # mean distance of each token of caption 0 to its nearest token of caption 1
        a, b = states[0][mask[0]], states[1][mask[1]]
        return (torch.cdist(a, b).min(1).values.mean() / a.norm(dim=-1).mean()).item()

    assert set_distance(plain) < 0.1  # the bag-of-words problem
    assert set_distance(with_pos) > 2 * set_distance(plain)
    with pytest.raises(ValueError, match="must be even"):
        sincos_1d(torch.arange(3), 5)


def test_context_window_puts_each_words_neighbours_into_its_state(tok_dir, encoder, tmp_path):
    """context_window=1: state_i + (R_-1 state_{i-1} + R_+1 state_{i+1}) / sqrt(2) over valid neighbours, with fixed
    orthogonal R; then the state of "circle" tells its colour, which a random T5's state does not."""
    from dcar.models.generator.text_encoder import context_features, random_rotations
    from dcar.pipeline import load_text_encoder, save_text_encoder

    cfg = TextEncoderConfig(kind="t5-random", tokenizer_path=str(tok_dir), max_length=8, t5_config=TINY_T5,
                            context_window=1)
    ctx = TextEncoder(cfg)
    caps = ["a red circle above a blue square", "a blue circle above a red square"]
    plain, mask = encoder.encode(caps)
    states, mask2 = ctx.encode(caps)
    assert torch.equal(mask, mask2) and torch.equal(states[~mask], plain[~mask])
    rot = random_rotations(2, 32, cfg.seed + 1)
    eye = torch.eye(32)
    torch.testing.assert_close(rot @ rot.transpose(1, 2), torch.stack([eye, eye]), atol=1e-5, rtol=0)
    n = int(mask[0].sum())  # 7 words + </s>
    for i in range(n):  # the formula, written out for caption 0
        want = plain[0, i].clone()
        if i > 0:
            want += rot[0] @ plain[0, i - 1] / 2**0.5
        if i < n - 1:
            want += rot[1] @ plain[0, i + 1] / 2**0.5
        torch.testing.assert_close(states[0, i], want, atol=1e-5, rtol=1e-5)
    circle = 2  # "a red circle ...": swapping the colours moves the state of "circle" only with context
    moved = (states[0, circle] - states[1, circle]).norm() / states[0, circle].norm()
    plain_moved = (plain[0, circle] - plain[1, circle]).norm() / plain[0, circle].norm()
    assert plain_moved < 0.05 and moved > 0.3
    # saved with a pipeline's text encoder and loaded back: the same rotations, the same states
    loaded = load_text_encoder(save_text_encoder(ctx, tmp_path / "te"))
    assert loaded.config.context_window == 1
    torch.testing.assert_close(loaded.encode(caps)[0], states)
    with pytest.raises(ValueError, match="context_window must be >= 0"):
        TextEncoderConfig(context_window=-1).validate()
    torch.testing.assert_close(context_features(plain, mask, rot), states)
