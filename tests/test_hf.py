"""Hugging Face transformers with fastseq's attention: tiny randomly initialised models (no download) run with
``attn_implementation="sdpa"`` (torch's attention) and with ``"fastseq"`` (after
``fastseq.register_hf_attention(backend="triton")``), the same weights and the same token ids (and a padding
attention mask): logits and one backward (the gradients of every parameter) against a float64 run of the
"sdpa" model, within twice the float32 "sdpa" model's own error plus the float32 floor. Also: inside
``fastseq.sdpa_override(backend="triton")`` an "sdpa" model runs fastseq's attention (its calls are counted).

Skipped where transformers is not installed. On CPU the kernels run under the Triton interpreter: models are
tiny (hidden 16, 2 layers, 2 heads, vocabulary 50, 7 tokens)."""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

import fastseq  # noqa: E402
from fastseq import functional as fs_functional  # noqa: E402
from fastseq.check import rel_err, tolerance  # noqa: E402

VOCAB, HIDDEN, LAYERS, HEADS, TOKENS, BATCH = 50, 16, 2, 2, 7, 2


@pytest.fixture(scope="module")
def device():
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        fastseq.dispatch.select("sdpa", device, torch.float32, "triton")
    except fastseq.BackendUnavailableError as e:
        pytest.skip(str(e))
    return device


@pytest.fixture(scope="module")
def registered():
    return fastseq.register_hf_attention(backend="triton")


def _llama():
    # 2 query heads sharing 1 key/value head: grouped-query attention
    return transformers.LlamaForCausalLM, transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=32, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=1, max_position_embeddings=64)


def _bert():
    return transformers.BertForMaskedLM, transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=32, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, max_position_embeddings=64, attention_probs_dropout_prob=0.0,
        hidden_dropout_prob=0.0)


def _gpt2():
    return transformers.GPT2LMHeadModel, transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_positions=64, attn_pdrop=0.0,
        resid_pdrop=0.0, embd_pdrop=0.0)


def _t5():
    # relative position bias: transformers passes it to the attention function as ``position_bias``
    return transformers.T5ForConditionalGeneration, transformers.T5Config(
        vocab_size=VOCAB, d_model=HIDDEN, d_kv=8, d_ff=32, num_layers=LAYERS, num_decoder_layers=LAYERS,
        num_heads=HEADS, dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0)


MODELS = {"llama": _llama, "bert": _bert, "gpt2": _gpt2, "t5": _t5}


def _build(name, impl, state=None, dtype=torch.float32, device="cpu"):
    cls, config = MODELS[name]()
    config = copy.deepcopy(config)
    model = cls._from_config(config, attn_implementation=impl, dtype=dtype)
    if state is not None:
        model.load_state_dict(state)
    return model.to(device).eval()


def _inputs(name, device, padded):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, VOCAB, (BATCH, TOKENS), generator=g)
    mask = torch.ones(BATCH, TOKENS, dtype=torch.long)
    if padded:
        mask[1, :3] = 0 if name in ("llama", "gpt2") else mask[1, :3]  # left padding for the decoders
        if name not in ("llama", "gpt2"):
            mask[1, -3:] = 0  # right padding for the encoders
    kw = {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
    if name == "t5":
        kw["decoder_input_ids"] = torch.randint(1, VOCAB, (BATCH, 5), generator=g).to(device)
    return kw


def _run(model, inputs, grad_logits=None):
    """Logits and, with ``grad_logits``, the gradient of every parameter (in ``named_parameters`` order)."""
    model.zero_grad(set_to_none=True)
    logits = model(**inputs).logits
    if grad_logits is None:
        return [logits.detach()]
    logits.backward(grad_logits.to(logits.dtype))
    return [logits.detach()] + [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
                                for _, p in model.named_parameters()]


@pytest.mark.parametrize("padded", [False, True], ids=["dense", "padded"])
@pytest.mark.parametrize("name", list(MODELS))
def test_registered_attention_matches_sdpa(name, padded, device, registered):
    theirs_model = _build(name, "sdpa", device=device)
    state = theirs_model.state_dict()
    ours_model = _build(name, registered, state, device=device)
    ref_model = _build(name, "sdpa", state, dtype=torch.float64, device=device)
    inputs = _inputs(name, device, padded)
    with torch.no_grad():
        shape = theirs_model(**inputs).logits.shape
    grad_logits = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(device)

    calls = []
    real = fs_functional.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(kwargs.get("backend"))
        return real(*args, **kwargs)

    fs_functional.scaled_dot_product_attention = counting
    try:
        ours = _run(ours_model, inputs, grad_logits)
    finally:
        fs_functional.scaled_dot_product_attention = real
    assert calls and set(calls) == {"triton"}, "the fastseq attention implementation was not called"

    theirs = _run(theirs_model, inputs, grad_logits)
    ref = _run(ref_model, inputs, grad_logits)
    names = ["logits"] + [f"grad {n}" for n, _ in theirs_model.named_parameters()]
    failures = []
    for n, o, t, r in zip(names, ours, theirs, ref):
        if padded and n == "logits" and name in ("llama", "gpt2"):
            # left-padded positions attend to nothing real (their logits are arbitrary): compare the others
            keep = inputs["attention_mask"].bool()
            o, t, r = o[keep], t[keep], r[keep]
        err, torch_err = rel_err(o, r), rel_err(t, r)
        if not err <= tolerance(torch_err, torch.float32):
            failures.append(f"{n}: {err:.3e} > {tolerance(torch_err, torch.float32):.3e} (sdpa's {torch_err:.3e})")
    assert not failures, "; ".join(failures[:6]) + (f" … {len(failures)} in all" if len(failures) > 6 else "")


@pytest.mark.parametrize("name", ["llama", "bert"])
def test_sdpa_override_runs_fastseq_in_an_sdpa_model(name, device):
    model = _build(name, "sdpa", device=device)
    inputs = _inputs(name, device, padded=True)
    with torch.no_grad():
        expected = model(**inputs).logits

    calls = []
    real = fs_functional.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(kwargs.get("backend"))
        return real(*args, **kwargs)

    fs_functional.scaled_dot_product_attention = counting
    try:
        with torch.no_grad(), fastseq.sdpa_override(backend="triton"):
            got = model(**inputs).logits
    finally:
        fs_functional.scaled_dot_product_attention = real
    assert calls == ["triton"] * LAYERS, calls
    keep = inputs["attention_mask"].bool()
    torch.testing.assert_close(got[keep], expected[keep], rtol=1e-4, atol=1e-5)
    # after the override torch's function is back
    calls.clear()
    with torch.no_grad():
        model(**inputs)
    assert not calls
