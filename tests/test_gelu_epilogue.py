"""The MLP's GELU in the fc1 GEMM's epilogue (``DCARBlock.gelu_epilogue``, ``DCAR.set_gelu_epilogue``).

The fused op (``torch._addmm_activation``) computes the tanh GELU only on CUDA; on the CPU it applies the exact GELU,
so the block never takes the path there. These tests check the wiring on the CPU by listing "cpu" among the devices
that take it and comparing with the exact-GELU MLP written out by hand."""

import pytest
import torch
import torch.nn.functional as F
from test_generator_model import inputs, tiny_model

from dcar.models.generator import transformer as tr


@pytest.fixture
def cpu_takes_epilogue(monkeypatch):
    """Let the CPU take the epilogue path and count the fused calls."""
    calls = []
    fused = torch._addmm_activation

    def counting(*args, **kwargs):
        calls.append(args[1].shape)
        return fused(*args, **kwargs)

    monkeypatch.setattr(tr, "TANH_EPILOGUE_DEVICES", frozenset({"cuda", "cpu"}))
    monkeypatch.setattr(torch, "_addmm_activation", counting)
    return calls


def test_linear_gelu_epilogue_is_the_linear_and_gelu():
    torch.manual_seed(0)
    fc = torch.nn.Linear(16, 24)
    x = torch.randn(2, 5, 16)
    out = tr.linear_gelu_epilogue(x, fc)
    assert out.shape == (2, 5, 24) and out.dtype == torch.float32
    torch.testing.assert_close(out, F.gelu(fc(x)), rtol=0, atol=1e-6)  # the CPU kernel's exact GELU
    # ... which is not the block's tanh GELU: why the CPU is not in TANH_EPILOGUE_DEVICES
    assert (out - F.gelu(fc(x), approximate="tanh")).abs().max() > 1e-5
    assert "cpu" not in tr.TANH_EPILOGUE_DEVICES and "cuda" in tr.TANH_EPILOGUE_DEVICES


def test_linear_gelu_epilogue_follows_autocast():
    torch.manual_seed(0)
    fc = torch.nn.Linear(16, 24)
    x = torch.randn(7, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = tr.linear_gelu_epilogue(x, fc)
        ref = F.gelu(fc(x))
    assert out.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref.float(), rtol=0, atol=2e-2)


def test_block_mlp_takes_the_epilogue_only_when_sampling(cpu_takes_epilogue):
    model = tiny_model()
    block = model.blocks[0]
    x = torch.randn(3, 16, 64)
    plain = block.mlp(x)
    model.set_gelu_epilogue(True)
    assert model.gelu_epilogue and all(b.gelu_epilogue for b in model.blocks)
    with torch.no_grad():
        fused = block.mlp(x)
        by_hand = block.fc2(F.gelu(block.fc1(block.norm2(x))))
    assert cpu_takes_epilogue == [torch.Size([48, 64])]
    torch.testing.assert_close(fused, by_hand, rtol=0, atol=1e-6)
    assert (fused - plain).abs().max() > 1e-7  # the exact GELU here vs the block's tanh GELU
    # with autograd on (training) the block keeps the differentiable plain path
    x.requires_grad_(True)
    out = block.mlp(x)
    assert len(cpu_takes_epilogue) == 1
    torch.testing.assert_close(out, plain, rtol=0, atol=0)
    out.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def forward_off_then_on():
    """A tiny model's outputs without, then with the epilogue switched on; the model and its inputs."""
    model = tiny_model()
    tokens, states, mask = inputs()
    with torch.no_grad():
        ref = model(tokens, states, mask)
        model.set_gelu_epilogue(True)
        out = model(tokens, states, mask)
    return model, (tokens, states, mask), ref, out


def test_model_forward_with_the_epilogue(cpu_takes_epilogue):
    model, (tokens, states, mask), ref, out = forward_off_then_on()
    assert len(cpu_takes_epilogue) == model.config.num_layers
    torch.testing.assert_close(out.hidden, ref.hidden, rtol=0, atol=2e-3)  # erf vs tanh GELU, nothing else
    model.set_gelu_epilogue(False)
    assert not model.gelu_epilogue
    with torch.no_grad():
        again = model(tokens, states, mask)
    assert len(cpu_takes_epilogue) == model.config.num_layers
    torch.testing.assert_close(again.logits, ref.logits, rtol=0, atol=0)


def test_epilogue_is_a_no_op_where_it_would_change_the_function():
    _, _, ref, out = forward_off_then_on()
    assert torch.equal(out.logits, ref.logits) and torch.equal(out.hidden, ref.hidden)


def test_epilogue_compiles_in_one_graph(cpu_takes_epilogue):
    model = tiny_model().set_gelu_epilogue(True)
    tokens, states, mask = inputs()
    kv = model.encode_text(states, mask)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        eager = model(tokens, text_kv=kv)
        out = compiled(tokens, text_kv=kv)
    assert out.hidden.dtype == eager.hidden.dtype
    torch.testing.assert_close(out.hidden.float(), eager.hidden.float(), rtol=0, atol=1e-5)
    assert len(cpu_takes_epilogue) >= 2 * model.config.num_layers  # eager + the traced graph
