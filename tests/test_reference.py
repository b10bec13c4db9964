"""The reference (``fastseq/reference.py``) against torch's own modules and functions, in float64.

The reference is what every kernel is checked against, so it is itself checked here against the thing it
documents: ``torch.nn.RNN`` / ``LSTM`` / ``GRU`` over every option they have, and
``torch.nn.functional.scaled_dot_product_attention`` under its math backend. Outputs and gradients (the same
upstream gradient on both sides) must agree to float64 rounding.
"""

from __future__ import annotations

import itertools
import zlib

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

from fastseq import reference as R

DTYPE = torch.float64
TOL = dict(rtol=1e-10, atol=1e-12)


def _seed(*key) -> None:
    """A fixed seed per test case, different across cases."""
    torch.manual_seed(zlib.crc32(repr(key).encode()))


def _assert_all_close(actual, expected, what: str) -> None:
    assert len(actual) == len(expected), what
    for i, (a, e) in enumerate(zip(actual, expected)):
        if e is None:
            assert a is None, f"{what}[{i}]"
            continue
        torch.testing.assert_close(a, e, **TOL, msg=lambda m: f"{what}[{i}]: {m}")


def _grads(outputs, upstream, inputs):
    return torch.autograd.grad(outputs, inputs, upstream, allow_unused=True, retain_graph=True)


# ---------------------------------------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------------------------------------

KINDS = ["rnn_tanh", "rnn_relu", "gru", "lstm", "lstm_proj"]
T, I, H, P = 5, 3, 4, 2  # small odd-ish sizes; P < H as torch requires


def _module(kind: str, num_layers: int, bidirectional: bool, batch_first: bool, bias: bool,
            input_size: int = I) -> torch.nn.RNNBase:
    common = dict(num_layers=num_layers, bidirectional=bidirectional, batch_first=batch_first, bias=bias,
                  dtype=DTYPE)
    if kind.startswith("rnn"):
        m = torch.nn.RNN(input_size, H, nonlinearity=kind[4:], **common)
    elif kind == "gru":
        m = torch.nn.GRU(input_size, H, **common)
    else:
        m = torch.nn.LSTM(input_size, H, proj_size=P if kind == "lstm_proj" else 0, **common)
    with torch.no_grad():  # not torch's init only: make every parameter O(1) and never zero
        for p in m.parameters():
            p.copy_(torch.randn_like(p) * 0.6)
    return m


def _initial_state(kind: str, rows: int, batch: int) -> tuple[torch.Tensor, ...]:
    h_out = P if kind == "lstm_proj" else H
    h0 = torch.randn(rows, batch, h_out, dtype=DTYPE, requires_grad=True)
    if kind.startswith("lstm"):
        return h0, torch.randn(rows, batch, H, dtype=DTYPE, requires_grad=True)
    return (h0,)


def _torch_hx(kind, state):
    if state is None:
        return None
    return tuple(state) if kind.startswith("lstm") else state[0]


def _reference(kind, module, input, state, *, batch_first, batch_sizes=None, dropout_masks=None, weights=None,
               num_layers=None, bidirectional=None):
    """Run the reference layer for ``module``; returns ``(output, [final states])``."""
    common = dict(num_layers=num_layers or module.num_layers,
                  bidirectional=module.bidirectional if bidirectional is None else bidirectional,
                  batch_first=batch_first, batch_sizes=batch_sizes, dropout_masks=dropout_masks)
    weights = R.layer_weights(module) if weights is None else weights
    if kind.startswith("rnn"):
        out, h = R.rnn_layer(input, None if state is None else state[0], weights, nonlinearity=kind[4:],
                             **common)
        return out, [h]
    if kind == "gru":
        out, h = R.gru_layer(input, None if state is None else state[0], weights, **common)
        return out, [h]
    out, (h, c) = R.lstm_layer(input, state, weights, proj_size=module.proj_size, **common)
    return out, [h, c]


def _lengths(batch: int, sorted_: bool) -> list[int]:
    lengths = torch.randint(1, T + 1, (batch,)).tolist()
    lengths[int(torch.randint(0, batch, ()).item())] = T  # the longest one spans the padded length
    return sorted(lengths, reverse=True) if sorted_ else lengths


def _check_layer(kind, num_layers, bidirectional, batch_first, bias, initial, packing, batch):
    _seed(kind, num_layers, bidirectional, batch_first, bias, initial, packing, batch)
    module = _module(kind, num_layers, bidirectional, batch_first, bias)
    rows = num_layers * (2 if bidirectional else 1)
    x = torch.randn(*((batch, T) if batch_first else (T, batch)), I, dtype=DTYPE, requires_grad=True)
    state = _initial_state(kind, rows, batch) if initial else None
    params = list(module.parameters())
    leaves = [x, *(state or ()), *params]

    if packing == "padded":
        out_t, hn_t = module(x, _torch_hx(kind, state))
        out_r, finals_r = _reference(kind, module, x, state, batch_first=batch_first)
    else:
        lengths = _lengths(batch, sorted_=packing == "packed_sorted")
        packed = pack_padded_sequence(x, torch.tensor(lengths), batch_first=batch_first,
                                      enforce_sorted=packing == "packed_sorted")
        assert (packed.sorted_indices is None) == (packing == "packed_sorted")
        out_p, hn_t = module(packed, _torch_hx(kind, state))
        out_t = out_p.data
        # the reference works in packed (sorted) order: permute states as torch's modules do
        ref_state = state
        if state is not None and packed.sorted_indices is not None:
            ref_state = tuple(s.index_select(1, packed.sorted_indices) for s in state)
        out_r, finals_r = _reference(kind, module, packed.data, ref_state, batch_first=batch_first,
                                     batch_sizes=packed.batch_sizes)
        if packed.unsorted_indices is not None:
            finals_r = [s.index_select(1, packed.unsorted_indices) for s in finals_r]
    finals_t = list(hn_t) if kind.startswith("lstm") else [hn_t]

    _assert_all_close([out_r, *finals_r], [out_t, *finals_t], "forward (output, final states)")
    upstream = [torch.randn_like(t) for t in [out_t, *finals_t]]
    grads_t = _grads([out_t, *finals_t], upstream, leaves)
    grads_r = _grads([out_r, *finals_r], upstream, leaves)
    _assert_all_close(grads_r, grads_t, "gradients (input, initial states, parameters)")


@pytest.mark.parametrize("packing", ["padded", "packed_sorted", "packed_unsorted"])
@pytest.mark.parametrize("initial", [False, True], ids=["h0=None", "h0"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("batch_first", [False, True], ids=["tmajor", "bfirst"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("num_layers", [1, 2, 3], ids=lambda n: f"L{n}")
@pytest.mark.parametrize("kind", KINDS)
def test_layer_matches_torch(kind, num_layers, bidirectional, batch_first, bias, initial, packing):
    _check_layer(kind, num_layers, bidirectional, batch_first, bias, initial, packing, batch=3)


@pytest.mark.parametrize("packing", ["padded", "packed_sorted"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("kind", KINDS)
def test_layer_batch_of_one(kind, bidirectional, packing):
    _check_layer(kind, 2, bidirectional, False, True, True, packing, batch=1)


@pytest.mark.parametrize("kind", KINDS)
def test_layer_packed_all_lengths_equal_is_padded(kind):
    """Packed data whose sequences all span T is the time-major padded input, flattened."""
    _seed(kind, "equal")
    module = _module(kind, 2, True, False, True)
    x = torch.randn(T, 3, I, dtype=DTYPE)
    state = _initial_state(kind, 4, 3)
    out_padded, finals_padded = _reference(kind, module, x, state, batch_first=False)
    out_packed, finals_packed = _reference(kind, module, x.reshape(T * 3, I), state, batch_first=False,
                                           batch_sizes=torch.full((T,), 3))
    _assert_all_close([out_packed, *finals_packed], [out_padded.reshape(T * 3, -1), *finals_padded], "packed")


# Dropout between layers: the reference takes explicit keep-masks. Checked against a stack of one-layer torch
# modules with the same masks applied by hand between them (exactly what torch's multi-layer module does with
# the masks it draws), and, with masks of all ones, against the multi-layer module with dropout=0.

def _keep_mask(shape, p: float) -> torch.Tensor:
    return (torch.rand(shape, dtype=DTYPE) >= p).to(DTYPE) / (1 - p)


@pytest.mark.parametrize("packing", ["padded", "packed_unsorted"])
@pytest.mark.parametrize("batch_first", [False, True], ids=["tmajor", "bfirst"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("kind", KINDS)
def test_layer_dropout_masks_match_stacked_torch_layers(kind, bidirectional, batch_first, packing):
    _seed(kind, bidirectional, batch_first, packing, "dropout")
    num_layers, batch, directions = 4, 3, 2 if bidirectional else 1
    h_out = P if kind == "lstm_proj" else H
    layers = [_module(kind, 1, bidirectional, batch_first, True, I if l == 0 else directions * h_out)
              for l in range(num_layers)]
    weights = [w for m in layers for w in R.layer_weights(m)]
    x = torch.randn(*((batch, T) if batch_first else (T, batch)), I, dtype=DTYPE, requires_grad=True)
    state = _initial_state(kind, num_layers * directions, batch)
    leaves = [x, *state, *(p for m in layers for p in m.parameters())]

    packed = None
    if packing != "padded":
        packed = pack_padded_sequence(x, torch.tensor(_lengths(batch, False)), batch_first=batch_first,
                                      enforce_sorted=False)
    # a layer's output, in the layout of the returned output: (T, B, F), (B, T, F) or packed data (N, F)
    out_shape = (tuple(x.shape[:2]) if packed is None else (packed.data.shape[0],)) + (directions * h_out,)
    # layer 1's input gets no dropout (None), the others a random scaled keep-mask; one of them broadcast
    masks = [_keep_mask(out_shape, 0.4), None, _keep_mask(out_shape[:-1] + (1,), 0.3)]

    # torch: one-layer modules, masks applied by hand between them
    finals_t: list[list[torch.Tensor]] = [[] for _ in state]
    seq = packed if packed is not None else x
    for l, m in enumerate(layers):
        if l > 0 and masks[l - 1] is not None:
            seq = (PackedSequence(seq.data * masks[l - 1], seq.batch_sizes, seq.sorted_indices,
                                  seq.unsorted_indices) if packed is not None else seq * masks[l - 1])
        rows = slice(l * directions, (l + 1) * directions)
        seq, hn = m(seq, _torch_hx(kind, tuple(s[rows] for s in state)))
        for acc, s in zip(finals_t, hn if kind.startswith("lstm") else [hn]):
            acc.append(s)
    out_t = seq.data if packed is not None else seq
    finals_t = [torch.cat(acc, dim=0) for acc in finals_t]

    # the reference, in one call
    if packed is None:
        out_r, finals_r = _reference(kind, layers[0], x, state, batch_first=batch_first, dropout_masks=masks,
                                     weights=weights, num_layers=num_layers)
    else:
        ref_state = tuple(s.index_select(1, packed.sorted_indices) for s in state)
        out_r, finals_r = _reference(kind, layers[0], packed.data, ref_state, batch_first=batch_first,
                                     batch_sizes=packed.batch_sizes, dropout_masks=masks, weights=weights,
                                     num_layers=num_layers)
        finals_r = [s.index_select(1, packed.unsorted_indices) for s in finals_r]

    _assert_all_close([out_r, *finals_r], [out_t, *finals_t], "forward with dropout masks")
    upstream = [torch.randn_like(t) for t in [out_t, *finals_t]]
    _assert_all_close(_grads([out_r, *finals_r], upstream, leaves), _grads([out_t, *finals_t], upstream, leaves),
                      "gradients with dropout masks")


@pytest.mark.parametrize("kind", KINDS)
def test_layer_dropout_masks_of_ones_match_torch_without_dropout(kind):
    _seed(kind, "ones")
    module = _module(kind, 3, True, True, True)
    x = torch.randn(3, T, I, dtype=DTYPE)
    width = 2 * (P if kind == "lstm_proj" else H)
    masks = [torch.ones(3, T, width, dtype=DTYPE), torch.ones(1, 1, width, dtype=DTYPE)]
    out_t, hn_t = module(x)
    out_r, finals_r = _reference(kind, module, x, None, batch_first=True, dropout_masks=masks)
    _assert_all_close([out_r, *finals_r], [out_t, *(hn_t if kind.startswith("lstm") else [hn_t])], "ones")


def test_layer_weights_follow_torch_flat_weights():
    for kind, bias in itertools.product(KINDS, [True, False]):
        m = _module(kind, 2, True, False, bias)
        flat = [w for tup in R.layer_weights(m) for w in tup if w is not None]
        assert len(flat) == len(m._flat_weights)
        assert all(a is b for a, b in zip(flat, m._flat_weights)), kind
        assert all(len(tup) == (5 if kind.startswith("lstm") else 4) for tup in R.layer_weights(m))


def test_layer_rejects_inconsistent_arguments():
    m = _module("lstm", 2, False, False, True)
    x = torch.randn(T, 2, I, dtype=DTYPE)
    with pytest.raises(ValueError, match="weights"):
        R.lstm_layer(x, None, R.layer_weights(m), num_layers=3)
    with pytest.raises(ValueError, match="proj_size"):
        R.lstm_layer(x, None, R.layer_weights(m), num_layers=2, proj_size=2)
    with pytest.raises(ValueError, match="dropout_masks"):
        R.lstm_layer(x, None, R.layer_weights(m), num_layers=2, dropout_masks=[None, None])


# ---------------------------------------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------------------------------------

def _qkv(lead, Hq, L, S, E, Ev, Hk=None):
    Hk = Hq if Hk is None else Hk
    heads_q = (Hq,) if Hq else ()
    heads_k = (Hk,) if Hq else ()
    q = torch.randn(*lead, *heads_q, L, E, dtype=DTYPE, requires_grad=True)
    k = torch.randn(*lead, *heads_k, S, E, dtype=DTYPE, requires_grad=True)
    v = torch.randn(*lead, *heads_k, S, Ev, dtype=DTYPE, requires_grad=True)
    return q, k, v


def _torch_sdpa_math(*args, **kwargs):
    with sdpa_kernel(SDPBackend.MATH):
        return F.scaled_dot_product_attention(*args, **kwargs)


def _check_sdpa(q, k, v, attn_mask=None, *, default_dispatch_too=False, **kwargs):
    leaves = [q, k, v] + ([attn_mask] if attn_mask is not None and attn_mask.requires_grad else [])
    out_t = _torch_sdpa_math(q, k, v, attn_mask=attn_mask, **kwargs)
    out_r = R.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, **kwargs)
    assert out_r.shape == out_t.shape
    assert not out_t.isnan().any()
    _assert_all_close([out_r], [out_t], "sdpa output")
    upstream = torch.randn_like(out_t)
    _assert_all_close(_grads(out_r, upstream, leaves), _grads(out_t, upstream, leaves), "sdpa gradients")
    if default_dispatch_too:
        _assert_all_close([out_r], [F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, **kwargs)],
                          "sdpa output (default dispatch)")
    return out_r


N, HEADS, L_, S_, E_, EV = 2, 3, 5, 7, 4, 6

MASK_SHAPES = {
    "LS": (L_, S_),
    "1S": (1, S_),
    "N1LS": (N, 1, L_, S_),
    "N11S": (N, 1, 1, S_),
    "NHLS": (N, HEADS, L_, S_),
    "1HL1": (1, HEADS, L_, 1),
}


def _bool_mask(shape):
    mask = torch.rand(shape) > 0.35
    mask[..., 0] = True  # keep every row alive here; fully masked rows have their own test
    return mask


def _float_mask(shape, requires_grad=True):
    mask = torch.randn(shape, dtype=DTYPE)
    mask = mask.masked_fill(torch.rand(shape) < 0.2, float("-inf"))
    mask[..., 0] = torch.randn(mask[..., 0].shape, dtype=DTYPE)
    return mask.requires_grad_(requires_grad)


@pytest.mark.parametrize("mask_kind", ["bool", "float"])
@pytest.mark.parametrize("shape", list(MASK_SHAPES), ids=list(MASK_SHAPES))
def test_sdpa_masks_broadcast(mask_kind, shape):
    _seed("mask", mask_kind, shape)
    q, k, v = _qkv((N,), HEADS, L_, S_, E_, EV)
    mask = (_bool_mask if mask_kind == "bool" else _float_mask)(MASK_SHAPES[shape])
    _check_sdpa(q, k, v, mask)


@pytest.mark.parametrize("mask_kind", [None, "bool", "float"])
def test_sdpa_three_dimensional(mask_kind):
    _seed("3d", mask_kind)
    q, k, v = _qkv((N,), 0, L_, S_, E_, EV)
    mask = None if mask_kind is None else (_bool_mask if mask_kind == "bool" else _float_mask)((N, L_, S_))
    _check_sdpa(q, k, v, mask)


@pytest.mark.parametrize("mask_kind", [None, "bool", "float"])
def test_sdpa_extra_leading_dims(mask_kind):
    _seed("lead", mask_kind)
    q, k, v = _qkv((2, 3), 2, L_, S_, E_, EV)
    mask = None if mask_kind is None else (_bool_mask if mask_kind == "bool" else _float_mask)((3, 1, L_, S_))
    _check_sdpa(q, k, v, mask)


@pytest.mark.parametrize("L,S", [(5, 5), (3, 7), (7, 3), (1, 4), (4, 1)])
def test_sdpa_causal(L, S):
    _seed("causal", L, S)
    q, k, v = _qkv((N,), HEADS, L, S, E_, EV)
    _check_sdpa(q, k, v, is_causal=True, default_dispatch_too=True)


@pytest.mark.parametrize("scale", [0.37, 1.9, -0.6, 0.0])
@pytest.mark.parametrize("is_causal", [False, True])
def test_sdpa_scale(scale, is_causal):
    _seed("scale", scale, is_causal)
    q, k, v = _qkv((N,), HEADS, L_, S_, E_, EV)
    _check_sdpa(q, k, v, is_causal=is_causal, scale=scale)


@pytest.mark.parametrize("Hq,Hk", [(6, 2), (6, 3), (4, 1), (3, 3)])
@pytest.mark.parametrize("mask_kind", [None, "bool", "float", "causal"])
def test_sdpa_gqa(Hq, Hk, mask_kind):
    _seed("gqa", Hq, Hk, mask_kind)
    q, k, v = _qkv((N,), Hq, L_, S_, E_, EV, Hk=Hk)
    mask = None
    if mask_kind in ("bool", "float"):
        mask = (_bool_mask if mask_kind == "bool" else _float_mask)((N, Hq, L_, S_))
    _check_sdpa(q, k, v, mask, is_causal=mask_kind == "causal", enable_gqa=True)


@pytest.mark.parametrize("E,Ev", [(4, 4), (5, 2), (3, 8)])
def test_sdpa_value_head_size(E, Ev):
    _seed("ev", E, Ev)
    q, k, v = _qkv((1,), 1, L_, S_, E, Ev)  # batch of one, one head
    _check_sdpa(q, k, v, _float_mask((L_, S_)))


@pytest.mark.parametrize("mask_kind", ["bool", "float", "bool_all_dead", "float_all_dead"])
def test_sdpa_fully_masked_rows_are_zero(mask_kind):
    """torch 2.13's math backend (and its default CPU dispatch) return 0 for a row where no key takes part,
    and no gradient flows from it."""
    _seed("dead", mask_kind)
    q, k, v = _qkv((N,), HEADS, L_, S_, E_, EV)
    if mask_kind.startswith("bool"):
        mask = _bool_mask((N, 1, L_, S_))
        dead = (slice(None), slice(None), slice(None)) if mask_kind.endswith("all_dead") else (0, 0, 2)
        mask[dead] = False
    else:
        mask = _float_mask((N, 1, L_, S_), requires_grad=False)
        dead = (slice(None), slice(None), slice(None)) if mask_kind.endswith("all_dead") else (1, 0, 3)
        mask[dead] = float("-inf")
        mask.requires_grad_(True)
    out = _check_sdpa(q, k, v, mask, default_dispatch_too=True)
    assert (out[dead[0], :, dead[2]] == 0).all()
    if mask.requires_grad:
        upstream = torch.randn_like(out)
        (grad_mask,) = _grads(R.scaled_dot_product_attention(q, k, v, attn_mask=mask), upstream, [mask])
        assert (grad_mask[dead] == 0).all()


@pytest.mark.parametrize("mask_kind", [None, "float"])
@pytest.mark.parametrize("keep_shape", ["full", "broadcast"])
@pytest.mark.filterwarnings("ignore:Dropout mask should only be used for testing")
def test_sdpa_dropout_keep_mask_matches_torch_math(mask_kind, keep_shape):
    """torch's math backend accepts an explicit dropout mask (for testing): the same mask gives the same
    output. (That private op expects a float mask: bool masks are converted by the public function.)"""
    _seed("dropout", mask_kind, keep_shape)
    q, k, v = _qkv((N,), HEADS, L_, S_, E_, EV)
    mask = None if mask_kind is None else _float_mask((L_, S_))
    keep = torch.rand(N, HEADS, L_, S_) >= 0.3
    keep_r = keep if keep_shape == "full" else keep[:, :1]
    if keep_shape != "full":
        keep = keep_r.expand(N, HEADS, L_, S_)
    leaves = [q, k, v] + ([mask] if mask is not None else [])
    out_t, weights_t = torch.ops.aten._scaled_dot_product_attention_math(q, k, v, mask, 0.3, False, keep)
    out_r = R.scaled_dot_product_attention(q, k, v, mask, 0.3, dropout_keep=keep_r)
    _assert_all_close([out_r], [out_t], "sdpa output with dropout")
    upstream = torch.randn_like(out_t)
    _assert_all_close(_grads(out_r, upstream, leaves), _grads(out_t, upstream, leaves), "sdpa grads with dropout")
    # torch returns the dropped but not rescaled probabilities as its second output
    weights_r = R.attention_weights(q, k, mask, 0.3, dropout_keep=keep_r)
    _assert_all_close([weights_r * 0.7], [weights_t], "attention weights with dropout")


def test_sdpa_dropout_needs_keep_mask():
    q, k, v = _qkv((1,), 1, 2, 3, 4, 4)
    with pytest.raises(ValueError, match="dropout_keep"):
        R.scaled_dot_product_attention(q, k, v, dropout_p=0.1)
    with pytest.raises(RuntimeError, match="is_causal"):
        R.scaled_dot_product_attention(q, k, v, torch.ones(2, 3, dtype=torch.bool), is_causal=True)


def test_attention_weights_match_torch_math_and_multihead_attention():
    _seed("weights")
    q, k, v = _qkv((N,), HEADS, L_, S_, E_, EV)
    mask = _float_mask((N, 1, L_, S_))
    _, weights_t = torch.ops.aten._scaled_dot_product_attention_math(q, k, v, mask)
    _assert_all_close([R.attention_weights(q, k, mask)], [weights_t], "weights vs math backend")

    embed, heads = 6, 3
    mha = torch.nn.MultiheadAttention(embed, heads, batch_first=True, dtype=DTYPE)
    x = torch.randn(N, L_, embed, dtype=DTYPE)
    mem = torch.randn(N, S_, embed, dtype=DTYPE)
    bool_mask = _bool_mask((L_, S_))
    _, weights_mha = mha(x, mem, mem, attn_mask=~bool_mask, need_weights=True, average_attn_weights=False)
    w_q, w_k, _ = mha.in_proj_weight.chunk(3)
    b_q, b_k, _ = mha.in_proj_bias.chunk(3)

    def heads_of(t):  # (N, T, embed) -> (N, heads, T, embed // heads)
        return t.unflatten(-1, (heads, embed // heads)).transpose(1, 2)

    weights_r = R.attention_weights(heads_of(F.linear(x, w_q, b_q)), heads_of(F.linear(mem, w_k, b_k)),
                                    bool_mask)
    _assert_all_close([weights_r], [weights_mha], "weights vs nn.MultiheadAttention")
