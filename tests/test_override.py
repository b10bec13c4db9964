"""``fastseq.sdpa_override``: calls through ``torch.nn.functional.scaled_dot_product_attention`` run fastseq's
attention while it is active (context manager and decorator), nesting, restoring on exit and on exceptions, bad
backend names at creation, torch's signature, tensor subclasses, and ``torch.compile`` before and after exit.
Also ``fastseq.register_hf_attention`` where transformers is absent."""

from __future__ import annotations

import importlib.util
import inspect

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

import fastseq

TORCH_SDPA = F.scaled_dot_product_attention


@pytest.fixture
def backend(device):
    try:
        fastseq.dispatch.select("sdpa", device, torch.float32, "triton")
    except fastseq.BackendUnavailableError as e:
        pytest.skip(str(e))
    return "triton"


@pytest.fixture
def calls(monkeypatch):
    """The backends fastseq's functional is called with."""
    seen = []
    real = fastseq.functional.scaled_dot_product_attention

    def recording(*args, backend="auto", **kwargs):
        seen.append(backend)
        return real(*args, backend=backend, **kwargs)

    monkeypatch.setattr(fastseq.functional, "scaled_dot_product_attention", recording)
    return seen


@pytest.fixture(autouse=True)
def torch_function_restored():
    yield
    assert F.scaled_dot_product_attention is TORCH_SDPA


def qkv(B=2, H=2, L=4, S=5, E=8):
    return torch.randn(B, H, L, E), torch.randn(B, H, S, E), torch.randn(B, H, S, E)


def test_context_manager_routes_calls(backend, calls):
    q, k, v = qkv()
    mask = torch.rand(4, 5) < 0.8
    mask[:, 0] = True
    with fastseq.sdpa_override(backend=backend) as o:
        assert F.scaled_dot_product_attention is not TORCH_SDPA
        assert torch.nn.functional.scaled_dot_product_attention is F.scaled_dot_product_attention
        out = F.scaled_dot_product_attention(q, k, v, mask, 0.0, False, scale=0.3)
        assert fastseq.override.is_overridden()
    assert calls == [backend] and o.backend == backend
    torch.testing.assert_close(out, TORCH_SDPA(q, k, v, mask, scale=0.3), atol=1e-5, rtol=1e-5)
    F.scaled_dot_product_attention(q, k, v)
    assert calls == [backend] and not fastseq.override.is_overridden()


def test_decorator_and_recursion(calls):
    override = fastseq.sdpa_override("torch")

    @override
    def f(depth):
        q, k, v = qkv()
        F.scaled_dot_product_attention(q, k, v)
        if depth:
            f(depth - 1)
        return F.scaled_dot_product_attention

    assert f(2) is override._function
    assert calls == ["torch"] * 3


def test_nesting_inner_wins_and_restores(backend, calls):
    q, k, v = qkv()
    with fastseq.sdpa_override("torch"):
        outer = F.scaled_dot_product_attention
        with fastseq.sdpa_override(backend):
            F.scaled_dot_product_attention(q, k, v)
        assert F.scaled_dot_product_attention is outer
        F.scaled_dot_product_attention(q, k, v)
    assert calls == [backend, "torch"]


def test_restored_on_exception():
    with pytest.raises(KeyError):
        with fastseq.sdpa_override("torch"):
            with fastseq.sdpa_override("auto"):
                raise KeyError("x")
    assert F.scaled_dot_product_attention is TORCH_SDPA


def test_bad_backend_raises_at_creation():
    with pytest.raises(ValueError, match="nope"):
        fastseq.sdpa_override("nope")
    assert F.scaled_dot_product_attention is TORCH_SDPA


def test_signature_is_torchs(backend):
    with fastseq.sdpa_override(backend):
        sig = inspect.signature(F.scaled_dot_product_attention)
        q, k, v = qkv(H=4)
        k, v = k[:, :2], v[:, :2]
        out = F.scaled_dot_product_attention(q, k, v, None, 0.0, True, scale=None, enable_gqa=True)
        with pytest.raises(TypeError):
            F.scaled_dot_product_attention(q, k, v, None, 0.0, True, None)  # scale is keyword-only, as in torch
    assert list(sig.parameters) == ["query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale",
                                    "enable_gqa"]
    assert sig.parameters["scale"].kind is inspect.Parameter.KEYWORD_ONLY
    assert sig.parameters["enable_gqa"].kind is inspect.Parameter.KEYWORD_ONLY
    torch.testing.assert_close(out, TORCH_SDPA(q, k, v, is_causal=True, enable_gqa=True), atol=1e-5, rtol=1e-5)


def test_causal_bias_mask(backend, calls):
    q, k, v = qkv(L=3, S=5)
    bias = causal_lower_right(3, 5)
    with fastseq.sdpa_override(backend):
        out = F.scaled_dot_product_attention(q, k, v, bias)
    assert calls and all(c == backend for c in calls)
    torch.testing.assert_close(out, TORCH_SDPA(q, k, v, bias), atol=1e-5, rtol=1e-5)


def test_module_calling_functional(backend, calls):
    """A hand-written attention module that calls F.scaled_dot_product_attention, as HF models do."""

    class Attention(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = torch.nn.Linear(8, 24)

        def forward(self, x):
            q, k, v = self.qkv(x).unflatten(-1, (3, 2, 4)).permute(2, 0, 3, 1, 4)
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)

    m = Attention()
    x = torch.randn(2, 5, 8)
    ref = m(x)
    with fastseq.sdpa_override(backend):
        out = m(x)
        out.sum().backward()
    assert calls == [backend]
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_torch_compile_inside_and_after(backend, calls):
    torch._dynamo.reset()

    def f(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    compiled = torch.compile(f, fullgraph=True, backend="eager")
    q, k, v = qkv()
    ref = TORCH_SDPA(q, k, v, is_causal=True)
    with fastseq.sdpa_override(backend):
        inside = compiled(q, k, v)
    assert calls == [backend]  # traced through fastseq's function
    after = compiled(q, k, v)
    assert len(calls) == 1  # after exit: recompiled against torch's function (guarded on its identity)
    torch.testing.assert_close(inside, ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(after, ref)


def test_register_hf_attention_without_transformers():
    if importlib.util.find_spec("transformers") is not None:
        pytest.skip("transformers is installed")
    with pytest.raises(ImportError, match="transformers"):
        fastseq.register_hf_attention()
    with pytest.raises(ValueError, match="nope"):
        fastseq.register_hf_attention(backend="nope")
