"""``fastseq.MultiheadAttention`` against ``torch.nn.MultiheadAttention`` holding the same weights: every
constructor and forward option, outputs, weights and the gradients of the inputs and of every parameter within
twice torch's own error against a float64 run of torch's module plus a rounding floor; bad input (torch's
exception classes); ``state_dict`` both ways; ``patch``/``unpatch``; torch's Transformer containers in training
and in eval/no-grad with their fast-path conditions otherwise met, running fastseq's operator, while an
unpatched model in the same process keeps torch's fast paths.

On CPU the kernels run under the Triton interpreter: sizes are tiny."""

from __future__ import annotations

import copy
import inspect
import pickle

import pytest
import torch
from torch import nn

import fastseq
from fastseq.check import rel_err, tolerance

E, H = 8, 2


@pytest.fixture(params=["triton", pytest.param("cuda", marks=pytest.mark.cuda)])
def backend(request, device):
    """Each kernel backend that can run attention on ``device`` (skipped, saying why, elsewhere). The CUDA
    kernels take CUDA tensors only: tests that build their inputs on the CPU run the Triton backend alone."""
    if request.param == "cuda" and "device" not in inspect.signature(request.function).parameters:
        pytest.skip("this test builds CPU tensors; the CUDA kernels take CUDA tensors")
    try:
        fastseq.dispatch.select("sdpa", device, torch.float32, request.param)
    except fastseq.BackendUnavailableError as e:
        pytest.skip(str(e))
    return request.param


@pytest.fixture
def sdpa_calls(monkeypatch):
    """Every call of the operator ``torch.ops.fastseq.sdpa``: (query shape, mask shape or None, dropout p,
    is_causal)."""
    calls = []
    op = torch.ops.fastseq.sdpa

    def recording(q, k, v, mask, seed, p, is_causal, *rest):
        calls.append((tuple(q.shape), None if mask is None else tuple(mask.shape), p, is_causal))
        return op(q, k, v, mask, seed, p, is_causal, *rest)

    monkeypatch.setattr(torch.ops.fastseq, "sdpa", recording)
    return calls


def make(backend="triton", device="cpu", **kw):
    """torch's module, fastseq's with the same parameters, and a float64 copy of torch's."""
    theirs = nn.MultiheadAttention(E, H, device=device, **kw)
    with torch.no_grad():  # non-zero biases, so that their gradients are compared meaningfully
        for name, p in theirs.named_parameters():
            if "bias" in name:
                p.normal_()
    ours = fastseq.MultiheadAttention(E, H, backend=backend, device=device, **kw)
    ours.load_state_dict(theirs.state_dict())
    ref = copy.deepcopy(theirs).double()
    return ours, theirs, ref


def inputs(N, L, S, *, batch_first=False, kdim=E, vdim=E, device="cpu"):
    def seq(n, d):
        if N is None:
            return torch.randn(n, d, device=device)
        return torch.randn(N, n, d, device=device) if batch_first else torch.randn(n, N, d, device=device)
    return seq(L, E), seq(S, kdim), seq(S, vdim)


def run(module, q, k, v, kwargs, grads, self_attention):
    """Output, weights and gradients of the inputs and every parameter for the given output gradients."""
    module.zero_grad(set_to_none=True)
    if self_attention:
        q = k = v = q.detach().clone().requires_grad_()
        leaves = [q]
    else:
        q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
        leaves = [q, k, v]
    out, w = module(q, k, v, **kwargs)
    total = (out * grads[0].to(out.dtype)).sum()
    if w is not None:
        total = total + (w * grads[1].to(w.dtype)).sum()
    params = [p for _, p in module.named_parameters()]
    g = torch.autograd.grad(total, leaves + params, allow_unused=True)
    names = ["output", "weights"] + [f"grad input {i}" for i in range(len(leaves))] + [
        f"grad {n}" for n, _ in module.named_parameters()]
    return names, [out, w] + list(g)


def compare(kw=None, fkw=None, *, N=2, L=5, S=6, self_attention=False, device="cpu", backend="triton",
            masks=None):
    kw, fkw = dict(kw or {}), dict(fkw or {})
    ours, theirs, ref = make(backend, device, **kw)
    if self_attention:
        S = L
    q, k, v = inputs(N, L, S, batch_first=kw.get("batch_first", False), kdim=kw.get("kdim") or E,
                     vdim=kw.get("vdim") or E, device=device)
    if masks is not None:
        fkw.update(masks(N, L, S, device))
    out_t, w_t = theirs(q, k, v, **fkw)
    grads = [torch.randn_like(out_t), None if w_t is None else torch.randn_like(w_t)]
    names, o = run(ours, q, k, v, fkw, grads, self_attention)
    _, t = run(theirs, q, k, v, fkw, grads, self_attention)
    fkw64 = {key: (val.double() if isinstance(val, torch.Tensor) and val.is_floating_point() else val)
             for key, val in fkw.items()}
    _, r = run(ref, q.double(), k.double(), v.double(), fkw64, grads, self_attention)
    failures = []
    for name, a, b, c in zip(names, o, t, r):
        if c is None:
            assert a is None and b is None, name
            continue
        assert a.shape == b.shape and a.dtype == b.dtype, (name, a.shape, b.shape, a.dtype, b.dtype)
        assert torch.isfinite(a).all(), name
        err, torch_err = rel_err(a, c), rel_err(b, c)
        if not err <= tolerance(torch_err, torch.float32):
            failures.append(f"{name}: {err:.3e} > {tolerance(torch_err, torch.float32):.3e}")
    assert not failures, "; ".join(failures)
    return o, t


# ---------------------------------------------------------------------------------------------------------
# Options against torch
# ---------------------------------------------------------------------------------------------------------


def _kpm_bool(N, L, S, device):
    m = torch.zeros(N, S, dtype=torch.bool, device=device)
    m[0, -2:] = True
    return {"key_padding_mask": m}


def _kpm_float(N, L, S, device):
    return {"key_padding_mask": torch.randn(N, S, device=device)}


def _attn2d_bool(N, L, S, device):
    m = torch.rand(L, S, device=device) < 0.3
    m[:, 0] = False  # every query keeps a key
    return {"attn_mask": m}


def _attn3d_float(N, L, S, device):
    return {"attn_mask": torch.randn(N * H, L, S, device=device)}


def _both_bool(N, L, S, device):
    return {**_attn2d_bool(N, L, S, device), **_kpm_bool(N, L, S, device)}


def _both_float_3d(N, L, S, device):
    return {**_attn3d_float(N, L, S, device), **_kpm_float(N, L, S, device)}


def _causal(N, L, S, device):
    return {"attn_mask": nn.Transformer.generate_square_subsequent_mask(L, device=device), "is_causal": True}


CASES = {
    "default": ({}, {}, None),
    "batch_first_no_weights": ({"batch_first": True}, {"need_weights": False}, None),
    "kdim_vdim": ({"kdim": 5, "vdim": 7}, {}, _kpm_bool),
    "no_bias": ({"bias": False}, {"need_weights": False}, _attn2d_bool),
    "bias_kv_zero_attn": ({"add_bias_kv": True, "add_zero_attn": True}, {}, _both_bool),
    "per_head_weights": ({"batch_first": True}, {"average_attn_weights": False}, _both_float_3d),
    "float_kpm": ({}, {"need_weights": False}, _kpm_float),
    "attn3d_no_weights": ({"add_zero_attn": True}, {"need_weights": False}, _attn3d_float),
}


@pytest.mark.parametrize("case", list(CASES))
def test_against_torch(case, device, backend, sdpa_calls):
    kw, fkw, masks = CASES[case]
    compare(kw, fkw, masks=masks, device=device, backend=backend)
    assert len(sdpa_calls) == 1  # the output comes from the fused operator, with or without weights


@pytest.mark.parametrize("need_weights", [False, True])
def test_self_attention_causal(need_weights, device, backend, sdpa_calls):
    compare({"batch_first": True}, {"need_weights": need_weights}, masks=_causal, self_attention=True,
            device=device, backend=backend)
    # torch gives the hint to its sdpa only without weights; then no mask is passed
    mask_shape, is_causal = sdpa_calls[0][1], sdpa_calls[0][3]
    assert (mask_shape is None and is_causal) if not need_weights else (mask_shape == (1, 1, 5, 5) and not is_causal)


def test_unbatched(device, backend):
    compare({}, {}, N=None, device=device, masks=lambda N, L, S, d: {
        "key_padding_mask": torch.tensor([False] * (S - 1) + [True], device=d),
        "attn_mask": torch.randn(H, L, S, device=d)}, backend=backend)


def test_masks_passed_broadcast_not_expanded(device, backend, sdpa_calls):
    ours, _, _ = make(device=device, backend=backend)
    q, k, v = inputs(3, 4, 5, device=device)
    kpm = torch.zeros(3, 5, dtype=torch.bool, device=device)
    am = torch.zeros(4, 5, dtype=torch.bool, device=device)
    ours(q, k, v, key_padding_mask=kpm, need_weights=False)
    ours(q, k, v, attn_mask=am, need_weights=False)
    ours(q, k, v, key_padding_mask=kpm, attn_mask=am, need_weights=False)
    assert [c[1] for c in sdpa_calls] == [(3, 1, 1, 5), (1, 1, 4, 5), (3, 1, 4, 5)]


def test_fully_masked_rows_as_torch(device, backend):
    ours, theirs, _ = make(device=device, backend=backend)
    q, k, v = inputs(2, 3, 4, device=device)
    kpm = torch.zeros(2, 4, dtype=torch.bool, device=device)
    kpm[1] = True
    for nw in (False, True):
        a, b = ours(q, k, v, key_padding_mask=kpm, need_weights=nw), theirs(q, k, v, key_padding_mask=kpm,
                                                                          need_weights=nw)
        torch.testing.assert_close(a[0], b[0], equal_nan=True)
        assert torch.equal(a[0].isnan(), b[0].isnan())


def test_dropout_in_training_only(device, backend, sdpa_calls):
    ours, theirs, _ = make(device=device, dropout=0.5, backend=backend)
    q, k, v = inputs(2, 4, 4, device=device)
    out_train, _ = ours(q, k, v, need_weights=False)
    assert sdpa_calls[-1][2] == 0.5
    ours.eval()
    theirs.eval()
    out_eval, w = ours(q, k, v)
    assert sdpa_calls[-1][2] == 0.0
    torch.testing.assert_close(out_eval, theirs(q, k, v)[0])
    assert not torch.allclose(out_train, out_eval)


def test_auto_on_cpu_is_torch(sdpa_calls):
    if fastseq.dispatch.select("sdpa", torch.device("cpu"), torch.float32, "auto") != "torch":
        pytest.skip("'auto' picks a fastseq kernel for attention on CPU here")
    ours, theirs, _ = make(backend="auto")
    q, k, v = inputs(2, 4, 5)
    for m in (ours, theirs):
        m.eval()
    with torch.no_grad():
        a, b = ours(q, q, q), theirs(q, q, q)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert sdpa_calls == []


def test_inputs_not_modified(device, backend):
    ours, _, _ = make(device=device, backend=backend)
    q, k, v = inputs(2, 4, 5, device=device)
    kpm = torch.zeros(2, 5, dtype=torch.bool, device=device)
    am = torch.randn(4, 5, device=device)
    before = [t.clone() for t in (q, k, v, kpm, am)]
    ours(q, k, v, key_padding_mask=kpm.float(), attn_mask=am)
    assert all(torch.equal(a, b) for a, b in zip(before, (q, k, v, kpm, am)))


# ---------------------------------------------------------------------------------------------------------
# Bad input: torch's exception classes
# ---------------------------------------------------------------------------------------------------------

BAD = {
    "query_4d": lambda q, k, v: ((q.unsqueeze(0), k, v), {}),
    "key_2d": lambda q, k, v: ((q, k[0], v), {}),
    "embed_dim": lambda q, k, v: ((q[..., :6], k, v), {}),
    "key_value_shapes": lambda q, k, v: ((q, k, v[:-1]), {}),
    "int_mask": lambda q, k, v: ((q, k, v), {"attn_mask": torch.zeros(q.size(0), k.size(0), dtype=torch.int64)}),
    "attn_mask_2d_shape": lambda q, k, v: ((q, k, v), {"attn_mask": torch.zeros(3, 3)}),
    "attn_mask_3d_shape": lambda q, k, v: ((q, k, v), {"attn_mask": torch.zeros(1, q.size(0), k.size(0))}),
    "attn_mask_4d": lambda q, k, v: ((q, k, v), {"attn_mask": torch.zeros(1, 1, q.size(0), k.size(0))}),
    "kpm_shape": lambda q, k, v: ((q, k, v), {"key_padding_mask": torch.zeros(q.size(1), k.size(0) + 1)}),
    "kpm_3d": lambda q, k, v: ((q, k, v), {"key_padding_mask": torch.zeros(1, q.size(1), k.size(0))}),
    "causal_without_mask": lambda q, k, v: ((q, k, v), {"is_causal": True}),
    "dtype": lambda q, k, v: ((q.double(), k.double(), v.double()), {}),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_raises_what_torch_raises(name, backend):
    ours, theirs, _ = make()
    q, k, v = inputs(2, 3, 4)
    args, kwargs = BAD[name](q, k, v)
    with pytest.raises(Exception) as expected:
        theirs(*args, **kwargs)
    with pytest.raises(expected.type):
        ours(*args, **kwargs)


def test_bad_backend_name():
    with pytest.raises(ValueError, match="nope"):
        fastseq.MultiheadAttention(E, H, backend="nope")


# ---------------------------------------------------------------------------------------------------------
# state_dict, patch, unpatch, copies
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kw", [{}, {"kdim": 3, "vdim": 5, "add_bias_kv": True}, {"bias": False}])
def test_state_dict_both_ways(kw):
    theirs = nn.MultiheadAttention(E, H, **kw)
    ours = fastseq.MultiheadAttention(E, H, **kw)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict(), strict=True)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    assert isinstance(ours, nn.MultiheadAttention)
    assert "backend" not in repr(ours) and "backend='torch'" in repr(fastseq.MultiheadAttention(E, H, backend="torch"))


def test_patch_unpatch_keeps_parameters(backend):
    model = nn.Sequential(nn.MultiheadAttention(E, H))
    params = list(model.parameters())
    values = [p.detach().clone() for p in params]
    fastseq.patch(model, backend=backend)
    assert type(model[0]) is fastseq.MultiheadAttention and model[0].backend == backend
    assert all(a is b for a, b in zip(model.parameters(), params))
    fastseq.unpatch(model)
    assert type(model[0]) is nn.MultiheadAttention and "backend" not in model[0].__dict__
    assert all(a is b and torch.equal(a, c) for a, b, c in zip(model.parameters(), params, values))
    assert type(fastseq.patch(nn.MultiheadAttention(E, H))) is fastseq.MultiheadAttention


def test_deepcopy_and_pickle(backend):
    ours, theirs, _ = make()
    q, k, v = inputs(2, 3, 4)
    for other in (copy.deepcopy(ours), pickle.loads(pickle.dumps(ours))):
        assert type(other) is fastseq.MultiheadAttention and other.backend == backend
        torch.testing.assert_close(other(q, k, v)[0], ours(q, k, v)[0])


# ---------------------------------------------------------------------------------------------------------
# Transformer containers: fastseq's attention in training and in inference; torch's fast paths elsewhere
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture
def fast_path_calls(monkeypatch):
    """Calls of torch's inference fast paths (they bypass the attention module's forward)."""
    calls = []
    for name in ("_transformer_encoder_layer_fwd", "_native_multi_head_attention", "_nested_tensor_from_mask"):
        fn = getattr(torch, name)

        def recording(*args, _fn=fn, _name=name, **kwargs):
            calls.append(_name)
            return _fn(*args, **kwargs)

        monkeypatch.setattr(torch, name, recording)
    return calls


def _encoder(layers=1):
    # every fast-path condition met: batch_first, even heads, relu, bias, same embed dims, left-aligned padding
    layer = nn.TransformerEncoderLayer(E, H, dim_feedforward=16, dropout=0.0, batch_first=True)
    return nn.TransformerEncoder(layer, layers, enable_nested_tensor=True)


def _padded(N=2, L=5):
    src = torch.randn(N, L, E)
    kpm = torch.zeros(N, L, dtype=torch.bool)
    kpm[1, -2:] = True
    return src, kpm


def test_encoder_eval_runs_fastseq_and_matches_torch(backend, sdpa_calls, fast_path_calls):
    torch_model = _encoder(2).eval()
    model = fastseq.patch(copy.deepcopy(torch_model), backend=backend)
    assert torch_model.use_nested_tensor  # torch's own keeps its nested-tensor path
    src, kpm = _padded()
    with torch.no_grad():
        ours = model(src, src_key_padding_mask=kpm)
        assert len(sdpa_calls) == 2 and fast_path_calls == []
        ours_layer = model.layers[0](src)
        assert len(sdpa_calls) == 3 and fast_path_calls == []
        theirs = torch_model(src, src_key_padding_mask=kpm)
        assert "_nested_tensor_from_mask" in fast_path_calls
        assert "_transformer_encoder_layer_fwd" in fast_path_calls
        theirs_layer = torch_model.layers[0](src)
    assert torch.backends.mha.get_fastpath_enabled()
    keep = ~kpm  # torch's nested path gives 0 at padded positions; the padded outputs are not compared
    torch.testing.assert_close(ours[keep], theirs[keep], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours_layer, theirs_layer, atol=1e-5, rtol=1e-5)
    fastseq.unpatch(model)
    assert model.use_nested_tensor and model.layers[0].activation_relu_or_gelu == 1
    fast_path_calls.clear()
    with torch.no_grad():
        model(src, src_key_padding_mask=kpm)
    assert "_transformer_encoder_layer_fwd" in fast_path_calls


def test_encoder_training_gradients(backend, sdpa_calls):
    torch_model = _encoder(1)
    model = fastseq.patch(copy.deepcopy(torch_model), backend=backend)
    src, kpm = _padded()
    outs = []
    for m in (model, torch_model):
        out = m(src, src_key_padding_mask=kpm)
        grads = torch.autograd.grad(out.square().sum(), list(m.parameters()))
        outs.append((out, grads))
    assert len(sdpa_calls) == 1
    torch.testing.assert_close(outs[0][0], outs[1][0], atol=1e-5, rtol=1e-5)
    for a, b in zip(outs[0][1], outs[1][1]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_standalone_mha_eval_skips_native_fast_path(backend, sdpa_calls, fast_path_calls):
    ours, theirs, _ = make(batch_first=True)
    ours.eval()
    theirs.eval()
    x = torch.randn(2, 4, E)
    with torch.no_grad():
        a = ours(x, x, x)
        assert fast_path_calls == [] and len(sdpa_calls) == 1
        b = theirs(x, x, x)
        assert fast_path_calls == ["_native_multi_head_attention"]
    torch.testing.assert_close(a[0], b[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a[1], b[1], atol=1e-5, rtol=1e-5)


def test_transformer_seq2seq_train_and_eval(backend, sdpa_calls, fast_path_calls):
    torch_model = nn.Transformer(E, H, num_encoder_layers=1, num_decoder_layers=1, dim_feedforward=16,
                                 dropout=0.0, batch_first=True)
    model = fastseq.patch(copy.deepcopy(torch_model), backend=backend)
    src, tgt = torch.randn(2, 5, E), torch.randn(2, 4, E)
    tgt_mask = nn.Transformer.generate_square_subsequent_mask(4)
    kpm = torch.zeros(2, 5, dtype=torch.bool)
    kpm[0, -1] = True
    kw = dict(tgt_mask=tgt_mask, tgt_is_causal=True, src_key_padding_mask=kpm, memory_key_padding_mask=kpm)
    out = model(src, tgt, **kw)
    assert len(sdpa_calls) == 3  # encoder self, decoder self (causal), decoder cross
    torch.testing.assert_close(out, torch_model(src, tgt, **kw), atol=1e-5, rtol=1e-5)
    for m in (model, torch_model):
        m.eval()
    sdpa_calls.clear()
    with torch.no_grad():
        out = model(src, tgt, **kw)
        assert len(sdpa_calls) == 3 and fast_path_calls == []
        ref = torch_model(src, tgt, **kw)
    assert fast_path_calls  # torch's own model still takes its fast paths
    # (torch's nested path gives 0 memory at padded positions; the cross-attention masks them out)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_decoder_layer_eval(backend, sdpa_calls):
    layer = nn.TransformerDecoderLayer(E, H, dim_feedforward=16, dropout=0.0)
    model = fastseq.patch(copy.deepcopy(layer), backend=backend).eval()
    layer.eval()
    tgt, mem = torch.randn(3, 2, E), torch.randn(4, 2, E)
    with torch.no_grad():
        torch.testing.assert_close(model(tgt, mem), layer(tgt, mem), atol=1e-5, rtol=1e-5)
    assert len(sdpa_calls) == 2


def test_compile_fullgraph(backend):
    ours, theirs, _ = make(batch_first=True)
    x = torch.randn(2, 3, E)
    kpm = torch.zeros(2, 3, dtype=torch.bool)
    kpm[1, -1] = True
    compiled = torch.compile(lambda t: ours(t, t, t, need_weights=False)[0], fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x), theirs(x, x, x, need_weights=False)[0], atol=1e-5, rtol=1e-5)
    compiled = torch.compile(lambda t, m: ours(t, t, t, key_padding_mask=m), fullgraph=True, backend="eager")
    for a, b in zip(compiled(x, kpm), theirs(x, x, x, key_padding_mask=kpm)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_jit_script_as_torchs_twin(backend):
    layer = nn.TransformerEncoderLayer(E, H, dim_feedforward=16, dropout=0.0, batch_first=True).eval()
    model = fastseq.patch(copy.deepcopy(layer), backend=backend)
    scripted = torch.jit.script(model)
    x = torch.randn(2, 3, E)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), layer(x), atol=1e-5, rtol=1e-5)
