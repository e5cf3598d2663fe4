"""What only a GPU can check (``pytest -m gpu``; skipped without CUDA; ``benchmarks/gpu_check.sh`` runs it first):
the MLP's cuBLASLt GELU epilogue against the plain GELU, CUDA graphs (``reduce-overhead``) with the static K/V
buffers, autocast and bf16 weights on CUDA. Each compares with the eager float32 path, TF32 off."""

import copy
import os

import pytest
import torch
import torch.nn.functional as F
from test_pipeline import PROMPTS, TINY_T5, tiny_generator

from dcar.inference import InferenceConfig, configure_pipeline
from dcar.models.generator import TextEncoder, TextEncoderConfig, build_word_tokenizer
from dcar.models.generator import transformer as tr
from dcar.models.tokenizer import build_tokenizer
from dcar.pipeline import DCARPipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.fixture(autouse=True)
def no_tf32():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    torch.manual_seed(0)
    tokenizer = build_tokenizer(os.path.join(ROOT, "configs", "tokenizer", "shapes.yaml")).eval()
    words = tmp_path_factory.mktemp("words")
    build_word_tokenizer(PROMPTS, words)
    text = TextEncoder(TextEncoderConfig(kind="t5-random", tokenizer_path=str(words), max_length=8,
                                         t5_config=TINY_T5))
    return tokenizer, text


def pipeline(parts) -> DCARPipeline:
    return DCARPipeline(copy.deepcopy(parts[0]), tiny_generator(), copy.deepcopy(parts[1])).to("cuda")


@pytest.fixture
def fused_calls(monkeypatch):
    calls, real = [], torch._addmm_activation
    monkeypatch.setattr(torch, "_addmm_activation", lambda *a, **k: calls.append(a[1].dtype) or real(*a, **k))
    return calls


def test_gelu_epilogue_is_the_blocks_tanh_gelu_on_cuda(fused_calls):
    torch.manual_seed(0)
    block = tr.DCARBlock(64, 4).cuda().eval()
    x = torch.randn(2, 48, 64, device="cuda")
    with torch.no_grad():
        plain = block.mlp(x)
        block.gelu_epilogue = True
        fused = block.mlp(x)
        by_hand = block.fc2(F.gelu(block.fc1(block.norm2(x)), approximate="tanh"))
        assert fused_calls == [torch.float32]
        torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(fused, by_hand, rtol=1e-5, atol=1e-5)
        with torch.autocast("cuda", dtype=torch.bfloat16):  # no CUDA autocast kernel: the epilogue casts itself
            amp = block.mlp(x)
        assert fused_calls[-1] == torch.bfloat16 and amp.dtype == torch.bfloat16
        torch.testing.assert_close(amp.float(), plain, rtol=0, atol=5e-2)
        block.bfloat16()
        cast = block.mlp(x.bfloat16())
        assert fused_calls[-1] == torch.bfloat16 and cast.dtype == torch.bfloat16
        torch.testing.assert_close(cast.float(), plain, rtol=0, atol=5e-2)
    x.requires_grad_(True)
    block.float().mlp(x).sum().backward()  # training: the plain, differentiable path
    assert len(fused_calls) == 3 and x.grad.abs().sum() > 0


def test_gelu_epilogue_keeps_the_fp32_tokens(parts, fused_calls):
    """Issue #7: every optimisation keeps the fp32 tokens of the same seed (eager, so only the epilogue differs)."""
    ref = pipeline(parts)
    p = pipeline(parts)
    p.generator.set_gelu_epilogue(True)
    ref_codes, ref_res = ref.generate_tokens(PROMPTS, 6, 3.0, seed=4)
    codes, res = p.generate_tokens(PROMPTS, 6, 3.0, seed=4)
    assert len(fused_calls) >= 6 * p.generator.config.num_layers
    assert torch.equal(codes, ref_codes)
    torch.testing.assert_close(res, ref_res, rtol=1e-4, atol=1e-4)


def test_cuda_graph_pipeline_with_the_epilogue_samples_like_eager(parts, fused_calls):
    ref = pipeline(parts)
    p = configure_pipeline(pipeline(parts), InferenceConfig(compile=True, compile_mode="reduce-overhead",
                                                            gelu_epilogue=True, decoder_channels_last=True))
    ref_codes, ref_res = ref.generate_tokens(PROMPTS, 6, 3.0, seed=2)
    codes, res = p.generate_tokens(PROMPTS, 6, 3.0, seed=2)
    assert fused_calls  # traced into the compiled forward
    agree = (codes == ref_codes).float().mean().item()
    assert agree >= 0.9, agree  # fp32 rounding of inductor's kernels and the epilogue may flip a near tie
    again, _ = p.generate_tokens(PROMPTS, 6, 3.0, seed=2)
    assert torch.equal(again, codes)  # CUDA-graph replays are deterministic
    assert len(p._text_kv_buffers) == 1  # one static K/V set for the one shape
    same = (codes == ref_codes).flatten(1).all(1)
    if same.any():
        torch.testing.assert_close(res[same], ref_res[same], rtol=1e-3, atol=1e-3)
    images = p.decode(codes, res)
    assert images.shape == (3, 3, 128, 128) and torch.isfinite(images).all()
    torch.testing.assert_close(images, ref.decode(codes, res), rtol=0, atol=1e-4)


@pytest.mark.parametrize("precision", ["autocast", "cast"])
def test_bf16_pipeline_on_cuda(parts, precision):
    ref = pipeline(parts)
    p = configure_pipeline(pipeline(parts), InferenceConfig(dtype="bfloat16", precision=precision))
    weights = torch.bfloat16 if precision == "cast" else torch.float32
    assert {q.dtype for q in p.generator.parameters()} == {weights}
    seen = []
    p.generator.blocks[0].fc1.register_forward_hook(lambda m, a, out: seen.append(out.dtype))
    images = p(PROMPTS, 6, 3.0, seed=1)
    assert set(seen) == {torch.bfloat16} and images.dtype == torch.float32 and torch.isfinite(images).all()
    assert torch.equal(images, p(PROMPTS, 6, 3.0, seed=1))
    ref_images = ref(PROMPTS, 6, 3.0, seed=1)
    assert (images - ref_images).abs().mean() < 0.5  # same prompts and seed: close, not equal
