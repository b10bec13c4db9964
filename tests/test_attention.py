"""``fastseq.scaled_dot_product_attention`` on the Triton kernels against the float64 reference and against
torch's own function in the same dtype: the output and the gradients of query, key, value (and of a float
mask) within twice torch's own error plus a rounding floor, over odd sizes, every mask kind and broadcast
shape, causality with L ≠ S, GQA, leading dimensions, fully masked rows, large logits and dropout; the decode
(split-key) path; bad input; ``opcheck`` and ``torch.compile``.

On CPU the kernels run under the Triton interpreter, which is slow: shapes are small. bfloat16 (which the
interpreter computes wrongly) is tested only on a GPU."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastseq
from fastseq import reference
from fastseq.check import rel_err, tolerance
from fastseq.kernels import attention as kernels
from fastseq.ops import attention as ops

sdpa = fastseq.scaled_dot_product_attention


# The kernel backends with attention kernels: Triton (GPU, or CPU under the interpreter) and the CUDA kernels of
# the compiled extension (GPU only: marked cuda, skipped saying why elsewhere).
SDPA_BACKENDS = [pytest.param("triton"), pytest.param("cuda", marks=pytest.mark.cuda)]


def require(backend, device):
    """Skip, saying why, where ``backend`` cannot run attention on ``device``."""
    try:
        fastseq.dispatch.select("sdpa", torch.device(device), torch.float32, backend)
    except fastseq.BackendUnavailableError as e:
        pytest.skip(str(e))
    return backend


@pytest.fixture(params=SDPA_BACKENDS)
def backend(request, device):
    """Each kernel backend that can run attention on ``device``; the others skip, saying why."""
    return require(request.param, device)


def launchers(backend):
    """The backend's launcher module (``kernels/attention.py`` or ``fastseq/cuda_kernels.py``)."""
    return ops._kernels(backend)


# ---------------------------------------------------------------------------------------------------------
# The comparison
# ---------------------------------------------------------------------------------------------------------


def _keep_for(seed, out_shape, L, S, p, backend):
    """The kernels' keep-mask for ``seed`` in the shape of the scores ``(..., H, L, S)``."""
    lead = out_shape[:-2]
    H = lead[-1] if lead else 1
    B = 1
    for d in lead[:-1]:
        B *= d
    keep = ops.dropout_keep_mask(seed, (B, H, L, S), p, backend)
    return keep.reshape(*lead, L, S) if lead else keep.reshape(L, S)


def _rng_state(device):
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def _set_rng_state(device, state):
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


def compare(q, k, v, mask=None, *, backend, dtype=torch.float32, is_causal=False, scale=None,
            enable_gqa=False, dropout_p=0.0, mask_grad=False, device="cpu", torch_math=False):
    """Run fastseq, torch and the float64 reference on the same values; assert every output and gradient is
    within ``2 · torch's error + FLOOR``. ``q, k, v`` are float32 values (rounded to ``dtype`` first). torch's
    error is that of its default dispatch, or of its math backend with ``torch_math`` (where the two disagree,
    SPEC.md: the math backend is the one to match) and with dropout (which takes the kernels' keep-mask)."""
    q, k, v = (t.to(device=device, dtype=dtype) for t in (q, k, v))
    if mask is not None:
        mask = mask.to(device)
        if mask.is_floating_point():
            mask = mask.to(dtype)
    L, S = q.size(-2), k.size(-2)

    def leaves(ts, with_mask):
        out = [t.detach().clone().requires_grad_() for t in ts]
        m = mask
        if mask is not None and with_mask and mask_grad:
            m = mask.detach().clone().requires_grad_()
        return out, m

    seed_state = _rng_state(q.device)
    (qo, ko, vo), mo = leaves((q, k, v), True)
    before = [t.detach().clone() for t in (q, k, v)] + ([] if mask is None else [mask.clone()])
    out = sdpa(qo, ko, vo, mo, dropout_p, is_causal, scale, enable_gqa, backend=backend)
    assert torch.isfinite(out).all()
    keep = None
    if dropout_p > 0:
        _set_rng_state(q.device, seed_state)
        seed = ops.draw_dropout_seed(q.device)
        keep = _keep_for(seed, tuple(out.shape), L, S, dropout_p, backend)
    grad_out = torch.randn_like(out)
    ours = [out] + list(torch.autograd.grad(out, [qo, ko, vo] + ([mo] if mask_grad else []), grad_out))

    (qt, kt, vt), mt = leaves((q, k, v), True)
    if keep is None and not torch_math and (mask is None or mask.dim() >= 2):
        theirs_out = F.scaled_dot_product_attention(qt, kt, vt, mt, 0.0, is_causal, scale=scale,
                                                    enable_gqa=enable_gqa)
    elif keep is None:  # torch's CPU dispatch refuses a 1-D mask (IndexError); its math backend takes it
        theirs_out = torch.ops.aten._scaled_dot_product_attention_math(
            qt, kt, vt, mt, 0.0, is_causal, scale=scale, enable_gqa=enable_gqa)[0]
    else:
        theirs_out = torch.ops.aten._scaled_dot_product_attention_math(
            qt, kt, vt, mt, dropout_p, is_causal, keep, scale=scale, enable_gqa=enable_gqa)[0]
    theirs = [theirs_out] + list(torch.autograd.grad(theirs_out, [qt, kt, vt] + ([mt] if mask_grad else []),
                                                     grad_out))

    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    m64 = None
    if mask is not None:
        m64 = mask.detach().double() if mask.is_floating_point() else mask
        if mask_grad:
            m64.requires_grad_()
    ref_out = reference.scaled_dot_product_attention(q64, k64, v64, m64, dropout_p, is_causal, scale, enable_gqa,
                                                     dropout_keep=keep)
    ref = [ref_out] + list(torch.autograd.grad(ref_out, [q64, k64, v64] + ([m64] if mask_grad else []),
                                               grad_out.double()))
    names = ["output", "grad query", "grad key", "grad value", "grad mask"]
    failures = []
    for name, o, t, r in zip(names, ours, theirs, ref):
        assert o.shape == r.shape == t.shape, (name, o.shape, t.shape, r.shape)
        assert o.dtype == t.dtype, (name, o.dtype, t.dtype)
        assert torch.isfinite(o).all(), name
        err, torch_err = rel_err(o, r), rel_err(t, r)
        if not err <= tolerance(torch_err, dtype):
            failures.append(f"{name}: error {err:.3e}, tolerance {tolerance(torch_err, dtype):.3e} "
                            f"(torch's own {torch_err:.3e})")
    assert not failures, "; ".join(failures)
    after = [q, k, v] + ([] if mask is None else [mask])
    assert all(torch.equal(a, b) for a, b in zip(before, after)), "an input was modified"
    return ours, ref


def randn(*shape):
    return torch.randn(*shape)


# ---------------------------------------------------------------------------------------------------------
# Sizes, masks, causality, GQA, leading dimensions
# ---------------------------------------------------------------------------------------------------------

# (B, H, L, S, E, Ev, dtype): every L, S in {1, 7, 13, 64, 65, 129}, every head size in
# {8, 16, 40, 64, 72, 128}, one Ev != E, float32 and float16.
SHAPES = [
    (1, 1, 1, 1, 8, 8, torch.float32),
    (2, 1, 7, 13, 16, 16, torch.float32),
    (1, 2, 13, 7, 40, 40, torch.float16),
    (1, 1, 64, 65, 64, 64, torch.float32),
    (1, 1, 65, 64, 72, 72, torch.float16),
    (1, 1, 129, 13, 128, 128, torch.float32),
    (1, 1, 7, 129, 40, 24, torch.float32),
    (1, 1, 129, 129, 16, 16, torch.float16),
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}H{}_L{}_S{}_E{}_Ev{}_{}".format(
    *s[:6], str(s[6]).removeprefix("torch.")))
def test_dense(shape, device, backend):
    B, H, L, S, E, Ev, dtype = shape
    compare(randn(B, H, L, E), randn(B, H, S, E), randn(B, H, S, Ev), dtype=dtype, device=device, backend=backend)


def _bool_mask(shape, p=0.7):
    return torch.rand(shape) < p


# (mask shape for B=2, H=3, L=13, S=65): every broadcast form torch takes
MASK_SHAPES = {
    "LS": (13, 65),
    "S": (65,),
    "L1": (13, 1),
    "1LS": (1, 13, 65),
    "HLS": (3, 13, 65),
    "N1LS": (2, 1, 13, 65),
    "N11S": (2, 1, 1, 65),
    "1H1S": (1, 3, 1, 65),
    "NHLS": (2, 3, 13, 65),
}


@pytest.mark.parametrize("kind", ["bool", "float"])
@pytest.mark.parametrize("name", list(MASK_SHAPES))
def test_mask_broadcast_shapes(name, kind, device, backend):
    shape = MASK_SHAPES[name]
    if kind == "bool":
        mask = _bool_mask(shape)
    else:
        mask = torch.randn(shape) * 2
        mask[torch.rand(shape) < 0.2] = float("-inf")
    # A float mask broadcast over the keys shifts whole rows: its gradient is 0 (rounding noise) and has no
    # relative error to compare; the other float masks' gradients are compared.
    compare(randn(2, 3, 13, 16), randn(2, 3, 65, 16), randn(2, 3, 65, 16), mask,
            mask_grad=kind == "float" and shape[-1] != 1, device=device, backend=backend)


def test_float_mask_gradient_float16(device, backend):
    mask = torch.randn(2, 1, 7, 64)
    compare(randn(2, 2, 7, 40), randn(2, 2, 64, 40), randn(2, 2, 64, 40), mask, mask_grad=True,
            dtype=torch.float16, device=device, backend=backend)


def test_float32_mask_with_float16_inputs(device, backend):
    """torch takes a float32 mask with half-precision inputs; its gradient stays float32."""
    q, k, v = (t.to(device, torch.float16) for t in (randn(1, 2, 7, 16), randn(1, 2, 13, 16), randn(1, 2, 13, 16)))
    mask = torch.randn(7, 13, device=device, requires_grad=True)
    out = sdpa(q, k, v, mask, backend=backend)
    ref = F.scaled_dot_product_attention(q, k, v, mask)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out, ref, rtol=2e-3, atol=2e-3)
    out.float().sum().backward()
    assert mask.grad.dtype == torch.float32 and torch.isfinite(mask.grad).all()


def test_key_padding_skips_whole_tiles(device, backend):
    """A (N, 1, 1, S) key-padding mask whose padded keys fill whole key tiles: the skipped tiles contribute
    nothing, forward and backward (fp16 and a float padding mask too)."""
    S = 129
    lengths = torch.tensor([20, 129])
    pad = torch.arange(S)[None, :] < lengths[:, None]
    compare(randn(2, 2, 64, 40), randn(2, 2, S, 40), randn(2, 2, S, 40), pad[:, None, None, :], device=device,
            backend=backend)
    fmask = torch.zeros(2, 1, 1, S).masked_fill(~pad[:, None, None, :], float("-inf"))
    compare(randn(2, 2, 65, 16), randn(2, 2, S, 16), randn(2, 2, S, 16), fmask, mask_grad=True,
            dtype=torch.float16, device=device, backend=backend)


@pytest.mark.filterwarnings("ignore:All-NaN slice:RuntimeWarning")
def test_removed_tiles_are_not_computed(device, backend):
    """Keys whose tiles a key-padding mask or causality removes entirely are never read: NaN there (which a
    computed tile would spread: NaN + −∞ is NaN) leaves the output and the query gradient finite."""
    S, cut = 192, 64  # keys from 64 on: whole tiles for every BLOCK_N the launchers pick (≤ 64)
    q, k, v = randn(2, 2, 13, 16).to(device), randn(2, 2, S, 16).to(device), randn(2, 2, S, 16).to(device)
    k[:, :, cut:] = float("nan")
    v[:, :, cut:] = float("nan")
    pad = (torch.arange(S, device=device) < cut)[None, None, None, :].expand(2, 1, 1, S)
    q.requires_grad_()
    out = sdpa(q, k, v, pad, backend=backend)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(q.grad).all()
    torch.testing.assert_close(out, reference.scaled_dot_product_attention(q, k[:, :, :cut], v[:, :, :cut]).float())
    # causality: the query blocks that end before `cut` see no key tile from `cut` on
    if backend == "cuda":  # forward and dQ row blocks: 16 rows per warp, 4 warps for float32 heads <= 64
        bm = 64  # (csrc/cuda/attention_common.cuh: FwdConfig, DqConfig)
    else:
        bm = kernels.blocks(S, S, 16, 16, torch.float32, device.type == "cuda")["BLOCK_M"]
    rows = (cut // bm) * bm
    assert rows > 0
    q2 = randn(1, 2, S, 16).to(device).requires_grad_()
    out = sdpa(q2, k[:1], v[:1], is_causal=True, backend=backend)
    out[:, :, :rows].sum().backward()
    assert torch.isfinite(out[:, :, :rows]).all() and torch.isfinite(q2.grad[:, :, :rows]).all()


@pytest.mark.parametrize("L,S", [(13, 65), (65, 13), (64, 64), (1, 7), (129, 1)])
def test_causal(L, S, device, backend):
    compare(randn(1, 2, L, 16), randn(1, 2, S, 16), randn(1, 2, S, 16), is_causal=True, device=device, backend=backend)


def test_causal_float16_and_scale(device, backend):
    compare(randn(2, 1, 65, 72), randn(2, 1, 129, 72), randn(2, 1, 129, 72), is_causal=True, scale=0.3,
            dtype=torch.float16, device=device, backend=backend)


@pytest.mark.parametrize("hq,hk,hv", [(4, 2, 2), (4, 1, 1), (6, 3, 2)])
def test_gqa(hq, hk, hv, device, backend):
    mask = _bool_mask((2, 1, 13, 65))
    compare(randn(2, hq, 13, 16), randn(2, hk, 65, 16), randn(2, hv, 65, 8), mask, enable_gqa=True,
            device=device, backend=backend)


def test_gqa_causal_dropout_float_mask(device, backend):
    compare(randn(1, 4, 13, 16), randn(1, 2, 65, 16), randn(1, 2, 65, 16), torch.randn(13, 65), enable_gqa=True,
            dropout_p=0.25, mask_grad=True, device=device, backend=backend)


def test_broadcast_single_kv_head_without_gqa(device, backend):
    """torch broadcasts a key/value head dim of 1 (and a query head dim of 1) like matmul does."""
    compare(randn(2, 3, 7, 16), randn(2, 1, 13, 16), randn(2, 1, 13, 16), device=device, backend=backend)
    compare(randn(2, 1, 7, 16), randn(2, 3, 13, 16), randn(2, 3, 13, 16), device=device, backend=backend)


@pytest.mark.parametrize("shapes", [
    ((7, 16), (13, 16), (13, 8)),                          # no head dimension
    ((3, 7, 16), (3, 13, 16), (3, 13, 8)),                 # heads only
    ((2, 3, 7, 16), (2, 3, 13, 16), (2, 3, 13, 8)),        # one leading dimension
    ((2, 2, 3, 7, 16), (2, 3, 13, 16), (1, 2, 3, 13, 8)),  # two, broadcast between the inputs
    ((7, 16), (2, 3, 13, 16), (3, 13, 8)),                 # a 2-D query against 4-D keys
], ids=["2d", "3d", "4d", "5d_broadcast", "mixed"])
def test_leading_dimensions(shapes, device, backend):
    sq, sk, sv = shapes
    mask = _bool_mask((7, 13))
    compare(randn(*sq), randn(*sk), randn(*sv), mask, device=device, backend=backend)


def test_non_contiguous_inputs(device, backend):
    """(B, L, H, E) tensors seen as (B, H, L, E), the layout of projections: strides, no copies needed."""
    q = randn(2, 13, 3, 16).transpose(1, 2)
    k = randn(2, 65, 3, 16).transpose(1, 2)
    v = randn(2, 65, 3, 16).transpose(1, 2)
    assert not q.is_contiguous()
    compare(q, k, v, _bool_mask((65,)), device=device, backend=backend)


def test_large_logits_stay_finite(device, backend):
    """Scale 100: logits in the hundreds. In float16 (products exact, float32 sums) within torch's tolerance; in
    float32 the rounding of q·kᵀ times 100 dominates every implementation's error (torch's own varies tenfold
    with the summation order), so there the output and gradients must be finite and close to the reference."""
    compare(randn(1, 2, 13, 64), randn(1, 2, 65, 64), randn(1, 2, 65, 64), scale=100.0, dtype=torch.float16,
            device=device, backend=backend)
    q, k, v = (t.to(device).requires_grad_() for t in (randn(1, 2, 13, 64), randn(1, 2, 65, 64), randn(1, 2, 65, 64)))
    out = sdpa(q, k, v, scale=100.0, backend=backend)
    out.sum().backward()
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = reference.scaled_dot_product_attention(q64, k64, v64, scale=100.0)
    ref.sum().backward()
    assert rel_err(out, ref) < 1e-4
    # Where a row is one-hot to within the float32 rounding of its normaliser, its exact dq and dk are ~0, and a
    # flash-style backward (D = rowsum(dO ⊙ O) from the output rounded to float32) leaves the rounding of D,
    # up to 2⁻²⁴ · E · max|dO| · max|v| per row, times the scale and a row of k (dq) or q (dk): that noise is
    # the floor beside the relative bound (with all rows one-hot, a relative error alone is noise over noise).
    rows = out.shape[0] * out.shape[1] * out.shape[2]
    noise = 2.0**-24 * 100.0 * 64 * v.abs().max().item() * rows**0.5 * max(
        q.norm(dim=-1).max().item(), k.norm(dim=-1).max().item())
    for t, r in ((q, q64), (k, k64), (v, v64)):
        err = (t.grad.double() - r.grad).norm().item()
        assert torch.isfinite(t.grad).all() and err < 1e-2 * r.grad.norm().item() + noise, (err, noise)
    # torch's CPU dispatch gives NaN for is_causal with a scale <= 0; its math backend does not
    compare(randn(1, 1, 7, 16), randn(1, 1, 13, 16), randn(1, 1, 13, 16), scale=-2.0, is_causal=True,
            device=device, torch_math=True, backend=backend)


@pytest.mark.parametrize("kind", ["bool", "float"])
def test_fully_masked_rows(kind, device, backend):
    """Rows where no key takes part give 0 and zero (finite) gradients, as torch's math backend."""
    L, S = 13, 65
    keep = _bool_mask((2, 1, L, S))
    keep[0, 0, 3] = False
    keep[1, 0, :5] = False
    if kind == "bool":
        mask = keep
    else:
        mask = torch.randn(2, 1, L, S).masked_fill(~keep, float("-inf"))
    ours, _ = compare(randn(2, 2, L, 16), randn(2, 2, S, 16), randn(2, 2, S, 16), mask, mask_grad=kind == "float",
                      device=device, backend=backend)
    out, dq = ours[0], ours[1]
    assert (out[0, :, 3] == 0).all() and (out[1, :, :5] == 0).all()
    assert (dq[0, :, 3] == 0).all() and (dq[1, :, :5] == 0).all()
    if kind == "float":
        assert (ours[4][1, :, :5] == 0).all()


def test_no_keys_and_no_queries(device, backend):
    q, k, v = randn(1, 2, 5, 8).to(device), randn(1, 2, 0, 8).to(device), randn(1, 2, 0, 6).to(device)
    for t in (q, k, v):
        t.requires_grad_()
    out = sdpa(q, k, v, backend=backend)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v))
    out.sum().backward()
    assert (q.grad == 0).all()
    out = sdpa(randn(2, 3, 0, 8).to(device), randn(2, 3, 4, 8).to(device), randn(2, 3, 4, 6).to(device),
               backend=backend)
    assert out.shape == (2, 3, 0, 6)
    q, k, v = (randn(0, 3, 5, 8).to(device).requires_grad_() for _ in range(3))  # empty batch
    out = sdpa(q, k, v, backend=backend)
    assert out.shape == (0, 3, 5, 8)
    out.sum().backward()
    assert q.grad.shape == (0, 3, 5, 8)


@pytest.mark.filterwarnings("ignore:All-NaN slice:RuntimeWarning", "ignore:invalid value:RuntimeWarning")
def test_nan_and_inf_propagate_as_in_torch(device, backend):
    q, k, v = (t.to(device) for t in (randn(1, 2, 7, 16), randn(1, 2, 13, 16), randn(1, 2, 13, 16)))
    q[0, 0, 2, 3] = float("nan")
    k[0, 1, 5, 0] = float("inf")
    v[0, 0, 4, 1] = float("nan")
    # torch's CPU dispatch returns 0 for a row whose query holds a NaN; its math backend (the one to match)
    # and the reference return NaN
    out, ref = sdpa(q, k, v, backend=backend), torch.ops.aten._scaled_dot_product_attention_math(q, k, v)[0]
    assert torch.equal(torch.isnan(out), torch.isnan(ref))
    torch.testing.assert_close(out, ref, equal_nan=True)


# ---------------------------------------------------------------------------------------------------------
# Decode: few query rows, many keys, the keys split across programs
# ---------------------------------------------------------------------------------------------------------


def test_decode_path_is_taken_and_matches(device, backend):
    """L = 1 against 1024 keys: the launcher splits the keys; output and gradients against the reference. (The
    CUDA launcher picks its splits in C++, by the same rule: tests/test_attention_cuda_emulated.py checks them.)"""
    if backend == "triton":
        dec = kernels.blocks(1, 1024, 64, 64, torch.float32, device.type == "cuda", "decode")
        splits = kernels.decode_splits(2, 1, 1024, dec["BLOCK_M"], dec["BLOCK_N"], kernels._num_sms(device))
        assert splits > 1
    compare(randn(1, 2, 1, 64), randn(1, 2, 1024, 64), randn(1, 2, 1024, 64), _bool_mask((1, 1, 1, 1024)),
            device=device, backend=backend)


@pytest.mark.parametrize("variant", ["mask_causal", "float_mask_dropout"])
def test_decode_splits_equal_one_program(variant, device, backend):
    """The split-key forward gives what one program per row block gives, with masks, causality (a key range
    beyond a row's causal limit, fully masked rows) and dropout."""
    B, H, L, S, E = 2, 2, 9, 200, 16
    q, k, v = (t.to(device) for t in (randn(B, H, L, E), randn(B, H, S, E), randn(B, H, S, 24)))
    if variant == "mask_causal":
        mask = _bool_mask((B, 1, 1, S)).to(device)
        mask[0, 0, 0, :] = False  # batch 0: every key masked
        args = dict(mask=mask, seed=None, p_drop=0.0, is_causal=True, diag=S - L - 100)
    else:
        mask = torch.randn(L, S, device=device)[None, None]
        args = dict(mask=mask, seed=ops.draw_dropout_seed(q.device), p_drop=0.3, is_causal=False, diag=0)
    launch = launchers(backend).launch_attention_fwd
    whole = launch(q, k, v, args["mask"], args["seed"], args["p_drop"], args["is_causal"], args["diag"], 0.25,
                   num_splits=1)
    for splits in (2, 3, 7):
        split = launch(q, k, v, args["mask"], args["seed"], args["p_drop"], args["is_causal"], args["diag"], 0.25,
                       num_splits=splits)
        torch.testing.assert_close(split[0], whole[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(split[1], whole[1], rtol=1e-5, atol=1e-6)
    if variant == "mask_causal":
        assert (whole[0][0] == 0).all() and torch.isinf(whole[1][0]).all()


def test_head_sliced_products_match(device, backend):
    """The float32 GPU tiles compute q·kᵀ and dO·vᵀ by head slices (``CHUNK``): on the interpreter too, the
    forward and dQ of the sliced kernels equal the whole-tile ones (E = 40, Ev = 24: slices past the head)."""
    if backend != "triton":
        pytest.skip("head-sliced products are a tile option of the Triton kernels only")
    q, k, v = (t.to(device) for t in (randn(1, 2, 13, 40), randn(1, 2, 65, 40), randn(1, 2, 65, 24)))
    mask = _bool_mask((13, 65)).to(device)[None, None]
    seed = ops.draw_dropout_seed(q.device)
    args = (q, k, v, mask, seed, 0.2, False, 0, 0.3)
    whole = kernels.launch_attention_fwd(*args)
    sliced = kernels.launch_attention_fwd(*args, config={"CHUNK": 16})
    torch.testing.assert_close(sliced[0], whole[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sliced[1], whole[1], rtol=1e-5, atol=1e-6)
    g = torch.randn_like(whole[0])
    bwd_args = (g, q, k, v, mask, whole[0], whole[1], seed, 0.2, False, 0, 0.3, False)
    for a, b in zip(kernels.launch_attention_bwd(*bwd_args)[:3],
                    kernels.launch_attention_bwd(*bwd_args, config={"CHUNK": 16})[:3]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------
# Dropout
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_exact_against_reference_with_the_kernels_mask(p, device, backend):
    mask = _bool_mask((2, 1, 1, 65))
    compare(randn(2, 2, 13, 16), randn(2, 2, 65, 16), randn(2, 2, 65, 16), mask, dropout_p=p, device=device,
            backend=backend)
    compare(randn(1, 1, 64, 40), randn(1, 1, 64, 40), randn(1, 1, 64, 40), is_causal=True, dropout_p=p,
            dtype=torch.float16, device=device, backend=backend)


def test_dropout_keep_statistics(device, backend):
    seed = torch.tensor([123456789, 17], dtype=torch.int64, device=device)
    for p in (0.1, 0.5, 0.9):
        keep = ops.dropout_keep_mask(seed, (2, 4, 64, 128), p, backend).float()
        n = keep.numel()
        sigma = (p * (1 - p) / n) ** 0.5
        assert abs(keep.mean().item() - (1 - p)) < 5 * sigma, (p, keep.mean().item())
        # every (batch, head), row and key column sees the same rate: no stream repeats another
        per_head = keep.mean(dim=(2, 3))
        assert (per_head - (1 - p)).abs().max() < 6 * (p * (1 - p) / (64 * 128)) ** 0.5
        flat = keep.reshape(8, -1)
        assert not any(torch.equal(flat[i], flat[j]) for i in range(8) for j in range(i))
        # neighbouring keys (one Philox call gives four of them) are uncorrelated
        a, b = keep[..., :-1].flatten(), keep[..., 1:].flatten()
        corr = ((a - a.mean()) * (b - b.mean())).mean() / (a.std() * b.std())
        assert abs(corr.item()) < 0.03
    other = ops.dropout_keep_mask(torch.tensor([123456789, 18], device=device), (2, 4, 64, 128), 0.5, backend)
    assert not torch.equal(other, ops.dropout_keep_mask(seed, (2, 4, 64, 128), 0.5, backend))


def test_dropout_repeatable_under_manual_seed(device, backend):
    q, k, v = (t.to(device) for t in (randn(1, 2, 13, 16), randn(1, 2, 65, 16), randn(1, 2, 65, 16)))
    torch.manual_seed(7)
    a = sdpa(q, k, v, dropout_p=0.3, backend=backend)
    torch.manual_seed(7)
    b = sdpa(q, k, v, dropout_p=0.3, backend=backend)
    c = sdpa(q, k, v, dropout_p=0.3, backend=backend)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.equal(a, sdpa(q, k, v, backend=backend))


def test_dropout_p_one_gives_zeros_and_zero_gradients(device, backend):
    q, k, v = (t.to(device).requires_grad_() for t in (randn(1, 2, 7, 16), randn(1, 2, 13, 16), randn(1, 2, 13, 8)))
    out = sdpa(q, k, v, dropout_p=1.0, backend=backend)
    assert (out == 0).all()
    out.sum().backward()
    assert all((t.grad == 0).all() for t in (q, k, v))
    ref = F.scaled_dot_product_attention(q, k, v, dropout_p=1.0)
    assert (ref == 0).all()


def test_negative_dropout_is_no_dropout(device, backend):
    q, k, v = (t.to(device) for t in (randn(1, 1, 7, 16), randn(1, 1, 13, 16), randn(1, 1, 13, 16)))
    torch.testing.assert_close(sdpa(q, k, v, dropout_p=-0.1, backend=backend), sdpa(q, k, v, backend=backend))


# ---------------------------------------------------------------------------------------------------------
# Tensor subclasses: CausalBias, __torch_function__
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("L,S", [(7, 13), (13, 7), (9, 9)])
@pytest.mark.parametrize("variant", ["upper_left", "lower_right"])
def test_causal_bias(variant, L, S, device, backend):
    from torch.nn.attention.bias import causal_lower_right, causal_upper_left

    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # lower-right with L > S: torch warns of NaN in its fused kernels
        bias = (causal_upper_left if variant == "upper_left" else causal_lower_right)(L, S)
    q, k, v = (t.to(device) for t in (randn(2, 2, L, 16), randn(2, 2, S, 16), randn(2, 2, S, 16)))
    out = sdpa(q, k, v, bias, backend=backend)
    dense = bias._materialize(q.device)
    want = reference.scaled_dot_product_attention(q.double(), k.double(), v.double(), dense)
    assert rel_err(out, want) < 1e-5
    assert torch.isfinite(out).all()
    theirs = sdpa(q, k, v, bias, backend="torch")
    torch.testing.assert_close(theirs, F.scaled_dot_product_attention(q, k, v, bias))
    with pytest.raises(ValueError):
        sdpa(q, k, v, bias, is_causal=True, backend=backend)


class _Logged(torch.Tensor):
    """A tensor subclass with ``__torch_function__`` that records which functions it saw."""

    seen: list = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        cls.seen.append(getattr(func, "__name__", str(func)))
        return super().__torch_function__(func, types, args, kwargs or {})


def test_torch_function_is_honoured(device, backend):
    q, k, v = (t.to(device) for t in (randn(1, 2, 7, 16), randn(1, 2, 13, 16), randn(1, 2, 13, 16)))
    _Logged.seen = []
    out = sdpa(q.as_subclass(_Logged), k, v, backend=backend)
    assert "scaled_dot_product_attention" in _Logged.seen
    assert isinstance(out, _Logged)
    torch.testing.assert_close(out.as_subclass(torch.Tensor), sdpa(q, k, v, backend=backend))


# ---------------------------------------------------------------------------------------------------------
# Backends and bad input
# ---------------------------------------------------------------------------------------------------------


def test_backend_choice(device):
    q, k, v = (t.to(device) for t in (randn(1, 2, 7, 16), randn(1, 2, 13, 16), randn(1, 2, 13, 16)))
    with pytest.raises(ValueError, match="backend"):
        sdpa(q, k, v, backend="flash")
    torch.testing.assert_close(sdpa(q, k, v, backend="torch"), F.scaled_dot_product_attention(q, k, v),
                               rtol=0, atol=0)
    if device.type == "cpu":  # "auto" never picks the interpreter
        torch.testing.assert_close(sdpa(q, k, v), F.scaled_dot_product_attention(q, k, v), rtol=0, atol=0)
    with pytest.raises(fastseq.BackendUnavailableError, match="float64"):
        sdpa(q.double(), k.double(), v.double(), backend="triton")
    out = sdpa(q.double(), k.double(), v.double())  # "auto": torch
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q.double(), k.double(), v.double()))
    big = randn(1, 1, 3, 300).to(device)
    with pytest.raises(fastseq.BackendUnavailableError, match="head size"):
        sdpa(big, big, big, backend="triton")
    torch.testing.assert_close(sdpa(big, big, big), F.scaled_dot_product_attention(big, big, big))


def _bad_calls(device):
    """(description, args, kwargs) that torch rejects."""
    q, k, v = randn(2, 3, 7, 16).to(device), randn(2, 3, 13, 16).to(device), randn(2, 3, 13, 8).to(device)
    m = _bool_mask((7, 13)).to(device)
    return [
        ("1-D query", (randn(16).to(device), k, v), {}),
        ("E mismatch", (q, randn(2, 3, 13, 15).to(device), v), {}),
        ("S mismatch", (q, k, randn(2, 3, 12, 8).to(device)), {}),
        ("batch mismatch", (q, randn(3, 3, 13, 16).to(device), randn(3, 3, 13, 8).to(device)), {}),
        ("heads mismatch", (q, randn(2, 2, 13, 16).to(device), randn(2, 2, 13, 8).to(device)), {}),
        ("gqa not dividing", (randn(2, 4, 7, 16).to(device), randn(2, 3, 13, 16).to(device),
                              randn(2, 3, 13, 8).to(device)), {"enable_gqa": True}),
        ("mask wrong shape", (q, k, v), {"attn_mask": _bool_mask((7, 12)).to(device)}),
        ("mask too many dims", (q, k, v), {"attn_mask": _bool_mask((1, 2, 3, 7, 13)).to(device)}),
        ("mask dtype", (q, k, v), {"attn_mask": torch.zeros(7, 13, dtype=torch.int64, device=device)}),
        ("mask float64", (q, k, v), {"attn_mask": torch.zeros(7, 13, dtype=torch.float64, device=device)}),
        ("dtype mix", (q, k.half(), v), {}),
        ("mask and causal", (q, k, v), {"attn_mask": m, "is_causal": True}),
        ("dropout over 1", (q, k, v), {"dropout_p": 1.5}),
        ("key not a tensor", (q, 3, v), {}),
        ("mask not a tensor", (q, k, v), {"attn_mask": [[True]]}),
        ("is_causal not bool", (q, k, v), {"is_causal": 1}),
        ("dropout_p a string", (q, k, v), {"dropout_p": "0.1"}),
        ("integer inputs", (q.long(), k.long(), v.long()), {}),
    ]


BAD_CALLS = ["1-D query", "E mismatch", "S mismatch", "batch mismatch", "heads mismatch", "gqa not dividing",
             "mask wrong shape", "mask too many dims", "mask dtype", "mask float64", "dtype mix", "mask and causal",
             "dropout over 1", "key not a tensor", "mask not a tensor", "is_causal not bool", "dropout_p a string",
             "integer inputs"]


@pytest.mark.parametrize("name", BAD_CALLS)
def test_bad_input_raises_what_torch_raises(name, device, backend):
    calls = {n: (a, kw) for n, a, kw in _bad_calls(device)}
    assert list(calls) == BAD_CALLS
    args, kwargs = calls[name]
    before = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
    with pytest.raises(Exception) as theirs:
        F.scaled_dot_product_attention(*args, **kwargs)
    for b in (backend, "auto"):
        with pytest.raises(theirs.type) as ours:
            sdpa(*args, backend=b, **kwargs)
        assert str(ours.value), name
    for a, b in zip(before, args):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b), f"{name}: an input was modified"


def test_error_messages_name_argument_expected_and_got(device, backend):
    q, k, v = randn(2, 3, 7, 16).to(device), randn(2, 3, 13, 16).to(device), randn(2, 3, 13, 8).to(device)
    with pytest.raises(RuntimeError, match=r"key.size\(-1\) must be equal to query.size\(-1\).*Expected 16, got 15"):
        sdpa(q, randn(2, 3, 13, 15).to(device), v, backend=backend)
    with pytest.raises(RuntimeError, match=r"attn_mask must broadcast.*\(2, 3, 7, 13\).*\(7, 12\)"):
        sdpa(q, k, v, _bool_mask((7, 12)).to(device), backend=backend)
    with pytest.raises(ValueError, match=r"'auto'.*'torch'.*'flash'"):
        sdpa(q, k, v, backend="flash")


# ---------------------------------------------------------------------------------------------------------
# Operators: opcheck and torch.compile
# ---------------------------------------------------------------------------------------------------------


def _op_cases(device, backend):
    dev = device
    q, k, v = randn(2, 4, 7, 16).to(dev), randn(2, 2, 13, 16).to(dev), randn(2, 2, 13, 8).to(dev)
    seed = torch.tensor([99, 3], dtype=torch.int64, device=dev)
    bmask = _bool_mask((2, 1, 1, 13)).to(dev)
    fmask = torch.randn(1, 4, 7, 13, device=dev)
    yield (q, k, v, None, None, 0.0, False, 0, 0.25, backend)
    yield (q, k, v, bmask, None, 0.0, True, 6, 0.25, backend)
    yield (q, k, v, fmask, seed, 0.2, False, 0, 0.25, backend)


def test_opcheck(device, backend):
    for args in _op_cases(device, backend):
        q, k, v, mask = (t.clone().requires_grad_(t.is_floating_point()) if t is not None else None
                         for t in args[:4])
        torch.library.opcheck(torch.ops.fastseq.sdpa.default, (q, k, v, mask, *args[4:]))
        out, lse = torch.ops.fastseq.sdpa(*args)
        need_mask_grad = mask is not None and mask.is_floating_point()
        torch.library.opcheck(torch.ops.fastseq.sdpa_backward.default,
                              (torch.randn_like(out), *args[:4], out, lse, *args[4:9], need_mask_grad, backend))


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_compile_fullgraph_forward_and_backward(compiler, device, backend):
    torch._dynamo.reset()
    q, k, v = (t.to(device).requires_grad_() for t in (randn(2, 2, 13, 16), randn(2, 1, 65, 16), randn(2, 1, 65, 8)))
    mask = torch.randn(13, 65, device=device, requires_grad=True)

    def step(q, k, v, mask):
        out = fastseq.scaled_dot_product_attention(q, k, v, mask, enable_gqa=True, backend=backend)
        out2 = fastseq.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True, backend=backend)
        return (out * out2).sum()

    loss = torch.compile(step, fullgraph=True, backend=compiler)(q, k, v, mask)
    grads = torch.autograd.grad(loss, (q, k, v, mask))
    want = step(q, k, v, mask)
    want_grads = torch.autograd.grad(want, (q, k, v, mask))
    torch.testing.assert_close(loss, want)
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g, w)


# ---------------------------------------------------------------------------------------------------------
# GPU only: bfloat16 (wrong under the interpreter), larger sizes
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("E", [64, 72, 128, 256])
def test_gpu_dtypes_and_head_sizes(dtype, E, backend):
    require(backend, "cuda")
    mask = _bool_mask((4, 1, 1, 300))
    compare(randn(4, 4, 257, E), randn(4, 4, 300, E), randn(4, 4, 300, E), mask, dtype=dtype, device="cuda",
            backend=backend)
    compare(randn(2, 4, 300, E), randn(2, 2, 300, E), randn(2, 2, 300, E), is_causal=True, enable_gqa=True,
            dropout_p=0.1, dtype=dtype, device="cuda", backend=backend)
    compare(randn(2, 4, 100, E), randn(2, 4, 100, E), randn(2, 4, 100, E), torch.randn(100, 100),
            mask_grad=True, dtype=dtype, device="cuda", backend=backend)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_gpu_decode(dtype, backend):
    require(backend, "cuda")
    compare(randn(2, 8, 1, 128), randn(2, 8, 8192, 128), randn(2, 8, 8192, 128), _bool_mask((2, 1, 1, 8192)),
            dtype=dtype, device="cuda", backend=backend)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")
def test_gpu_backends_draw_the_same_dropout_mask():
    """The CUDA kernels' Philox counters are the Triton kernels': one seed, one keep-mask."""
    require("triton", "cuda")
    require("cuda", "cuda")
    seed = torch.tensor([987654321987, 5], dtype=torch.int64, device="cuda")
    for p in (0.1, 0.5):
        torch.testing.assert_close(ops.dropout_keep_mask(seed, (2, 3, 37, 45), p, "cuda"),
                                   ops.dropout_keep_mask(seed, (2, 3, 37, 45), p, "triton"), rtol=0, atol=0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")
def test_gpu_cuda_kernel_operators_opcheck():
    """opcheck on the compiled operators themselves (torch.ops.fastseq_cpp.sdpa_*), with their fakes."""
    require("cuda", "cuda")
    from fastseq import cuda_kernels  # noqa: F401  (registers the fakes)

    q, k, v = randn(2, 4, 7, 16).cuda(), randn(2, 2, 13, 16).cuda(), randn(2, 2, 13, 8).cuda()
    seed = torch.tensor([99, 3], dtype=torch.int64, device="cuda")
    fmask = torch.randn(1, 4, 7, 13, device="cuda")
    fwd = torch.ops.fastseq_cpp.sdpa_fwd.default
    torch.library.opcheck(fwd, (q, k, v, fmask, seed, 0.2, False, 0, 0.25, -1))
    out, lse = fwd(q, k, v, fmask, seed, 0.2, False, 0, 0.25, -1)
    torch.library.opcheck(torch.ops.fastseq_cpp.sdpa_bwd.default,
                          (torch.randn_like(out), q, k, v, fmask, out, lse, seed, 0.2, False, 0, 0.25, True))
    torch.library.opcheck(torch.ops.fastseq_cpp.sdpa_dropout_mask.default, (seed, 2, 4, 7, 13, 0.2))
