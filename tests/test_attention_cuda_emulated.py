"""The CUDA attention kernels (``csrc/cuda/attention_fwd.cu``, ``attention_bwd.cu``) run on the CPU: compiled as
host C++ against the fiber emulator of ``tests/cuda_emulation`` (threads as fibers, barriers, votes, shuffles,
``mma.sync`` m16n8k16 and ``ldmatrix`` by the PTX ISA's fragment layouts) and registered for CPU tensors as
``torch.ops.fastseq_emu.*``. The launchers of ``fastseq/cuda_kernels.py`` are pointed at them, and their outputs
and gradients are held against the float64 reference over every head class, dtype, mask kind and broadcast,
causality with L ≠ S and shifted diagonals, GQA with Hk ≠ Hv, strides (transposed, broadcast heads, rows not
16-byte aligned), the decode split path, dropout (the keep-mask bit for bit equal to the Triton kernels'),
fully masked rows and tiles that must never be read.

This tests the kernels' index arithmetic on machines without a GPU; the GPU itself runs the same cases through
the "cuda" backend in tests/test_attention.py (marked ``cuda``). The emulator's sums run in float32 in a fixed
order, so the tolerances here are those of the dtype, not the hardware's exact rounding."""

from __future__ import annotations

import math
import shutil

import pytest
import torch

from fastseq import reference
from fastseq.check import rel_err

# relative error against the float64 reference, per dtype (inputs rounded to the dtype first)
TOLERANCE = {torch.float32: 2e-6, torch.float16: 4e-3, torch.bfloat16: 3e-2}


@pytest.fixture(scope="module")
def emu():
    """``fastseq.cuda_kernels`` with its launchers calling the emulated build."""
    if shutil.which("c++") is None:
        pytest.skip("no C++ compiler to build the emulated CUDA kernels")
    try:
        from fastseq import cuda_kernels
    except ImportError as e:
        pytest.skip(f"fastseq._C is not built: {e}")
    import cuda_emulation

    cuda_emulation.load()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cuda_kernels, "_ops", getattr(torch.ops, cuda_emulation.NAMESPACE))
        yield cuda_kernels


def _causal_keep(L, S, diag):
    i = torch.arange(L)[:, None]
    j = torch.arange(S)[None, :]
    return j <= i + diag


def _reference(q, k, v, mask, keep, p, is_causal, diag, scale):
    """Output and the float64 leaves of the reference (GQA by index, causality with any diagonal as a mask)."""
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    m64 = None
    if mask is not None:
        m64 = mask.detach().double().requires_grad_() if mask.is_floating_point() else mask
    bias = m64
    if is_causal:
        allowed = _causal_keep(q.size(2), k.size(2), diag)
        if bias is None:
            bias = allowed
        elif bias.dtype == torch.bool:
            bias = bias & allowed
        else:
            bias = bias.masked_fill(~allowed, float("-inf"))
    H, Hk, Hv = q.size(1), k.size(1), v.size(1)
    kx = k64.repeat_interleave(H // Hk, dim=1)
    vx = v64.repeat_interleave(H // Hv, dim=1)
    out = reference.scaled_dot_product_attention(q64, kx, vx, bias, p, False, scale, dropout_keep=keep)
    return out, (q64, k64, v64, m64)


def _lse_reference(q, k, mask, is_causal, diag, scale):
    """log₂e · logsumexp of every score row (+inf where no key takes part), in float64."""
    H, Hk = q.size(1), k.size(1)
    s = scale * q.double() @ k.double().repeat_interleave(H // Hk, dim=1).transpose(-1, -2)
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask.double()
    if is_causal:
        s = s.masked_fill(~_causal_keep(q.size(2), k.size(2), diag), float("-inf"))
    lse = torch.logsumexp(s, dim=-1) / math.log(2)
    return torch.where(torch.isneginf(lse), torch.full_like(lse, float("inf")), lse)


def run_case(emu, q, k, v, mask=None, *, p=0.0, is_causal=False, diag=0, scale=None, mask_grad=False,
             num_splits=None, dtype=torch.float32):
    """Forward and backward of the emulated kernels against the reference: output, lse, dq, dk, dv (and the
    float mask's dS)."""
    q, k, v = (t.to(dtype) for t in (q, k, v))
    if mask is not None and mask.is_floating_point() and mask.dtype != torch.float32:
        mask = mask.to(dtype)
    scale = 1.0 / math.sqrt(q.size(-1)) if scale is None else scale
    seed = torch.tensor([0x1234_5678_9ABC, 7], dtype=torch.int64) if p > 0 else None
    B, H, L, _ = q.shape
    S = k.size(2)
    keep = emu.dropout_keep_mask(seed, B, H, L, S, p) if p > 0 else None
    out, lse = emu.launch_attention_fwd(q, k, v, mask, seed, p, is_causal, diag, scale, num_splits=num_splits)
    ref, leaves = _reference(q, k, v, mask, keep, p, is_causal, diag, scale)
    tol = TOLERANCE[dtype]
    assert out.dtype == dtype and out.shape == ref.shape
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) <= tol, ("output", rel_err(out, ref))
    lse_ref = _lse_reference(q, k, mask, is_causal, diag, scale)
    assert torch.equal(torch.isinf(lse), torch.isinf(lse_ref))
    finite = torch.isfinite(lse_ref)
    torch.testing.assert_close(lse[finite].double(), lse_ref[finite], rtol=0, atol=20 * tol)
    grad_out = torch.randn_like(out)
    dq, dk, dv, dmask = emu.launch_attention_bwd(grad_out, q, k, v, mask, out, lse, seed, p, is_causal, diag, scale,
                                                 mask_grad)
    wanted = [t for t in leaves[:3]] + ([leaves[3]] if mask_grad else [])
    grads = torch.autograd.grad(ref, wanted, grad_out.double(), allow_unused=True)
    for name, got, want in zip(("dq", "dk", "dv"), (dq, dk, dv), grads):
        assert got.shape == want.shape and got.dtype == dtype, name
        assert torch.isfinite(got).all(), name
        assert rel_err(got, want) <= tol * 2, (name, rel_err(got, want))
    if mask_grad:
        full = dmask
        dims = [i for i in range(4) if mask.size(i) == 1 and full.size(i) != 1]
        reduced = full.sum(dims, keepdim=True) if dims else full
        assert rel_err(reduced, grads[3]) <= tol * 2, ("dmask", rel_err(reduced, grads[3]))
    return out, lse, (dq, dk, dv, dmask)


def randn(*shape):
    return torch.randn(*shape)


# (B, H, L, S, E, Ev): the three head classes (64, 128, 256), sizes that are not multiples of any tile
SHAPES = [(1, 1, 1, 1, 8, 8), (2, 2, 17, 33, 16, 16), (1, 1, 70, 45, 72, 40), (1, 1, 19, 37, 136, 200)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}H{}L{}S{}E{}Ev{}".format(*s))
def test_dense(emu, shape, dtype):
    B, H, L, S, E, Ev = shape
    run_case(emu, randn(B, H, L, E), randn(B, H, S, E), randn(B, H, S, Ev), dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_masks_causal_gqa_dropout(emu, dtype):
    B, H, L, S = 2, 4, 21, 70
    q, k, v = randn(B, H, L, 16), randn(B, 2, S, 16), randn(B, 1, S, 24)
    pad = torch.arange(S)[None, :] < torch.tensor([70, 9])[:, None]
    run_case(emu, q, k, v, pad[:, None, None, :], dtype=dtype)                       # key padding, bool
    fmask = torch.randn(1, H, L, S).masked_fill(torch.rand(1, H, L, S) < 0.2, float("-inf"))
    run_case(emu, q, k, v, fmask, mask_grad=True, dtype=dtype)                        # float32 mask + grad
    run_case(emu, q, k, v, torch.randn(L, 1)[None, None].to(dtype), dtype=dtype)     # input-dtype mask, (1,1,L,1)
    for diag in (0, S - L, -5):
        run_case(emu, q, k, v, is_causal=True, diag=diag, dtype=dtype)
    run_case(emu, q, k, v, p=0.3, is_causal=True, diag=S - L, dtype=dtype)
    run_case(emu, q, k, v, fmask, p=0.5, mask_grad=True, dtype=dtype)


def test_head_class_256_two_passes_with_gqa_and_dropout(emu):
    """Head class 256 runs dK and dV as two passes; with Hk ≠ Hv they cover different heads."""
    run_case(emu, randn(1, 4, 9, 130), randn(1, 2, 40, 130), randn(1, 4, 40, 100), p=0.2, is_causal=True,
             diag=30, dtype=torch.float16)


def test_fully_masked_rows_and_nan_in_skipped_tiles(emu):
    L, S = 13, 130
    q, k, v = randn(2, 2, L, 16), randn(2, 2, S, 16), randn(2, 2, S, 16)
    k[:, :, 64:] = float("nan")   # keys from 64 on sit in tiles the mask removes entirely (BLOCK_N <= 64)
    v[:, :, 64:] = float("nan")
    keep = torch.rand(2, 1, L, S) < 0.7
    keep[..., 64:] = False
    keep[0, 0, 3] = False          # fully masked rows
    keep[1, 0, :5] = False
    out, lse = emu.launch_attention_fwd(q, k, v, keep, None, 0.0, False, 0, 0.25)
    assert torch.isfinite(out).all() and (out[0, :, 3] == 0).all() and (out[1, :, :5] == 0).all()
    assert torch.isinf(lse[0, :, 3]).all() and torch.isinf(lse[1, :, :5]).all()
    ref, _ = _reference(q, k[:, :, :64], v[:, :, :64], keep[..., :64], None, 0.0, False, 0, 0.25)
    assert rel_err(out, ref) <= 2e-6
    g = torch.randn_like(out)
    dq, dk, dv, _ = emu.launch_attention_bwd(g, q, k, v, keep, out, lse, None, 0.0, False, 0, 0.25, False)
    assert torch.isfinite(dq).all() and (dq[0, :, 3] == 0).all() and (dq[1, :, :5] == 0).all()
    assert torch.isfinite(dk[:, :, :64]).all() and torch.isfinite(dv[:, :, :64]).all()


def test_strides_broadcast_heads_and_unaligned_rows(emu):
    # (B, L, H, E) seen as (B, H, L, E); a query head broadcast with stride 0; rows of 12 halves (not 16 bytes)
    q = randn(2, 17, 3, 16).transpose(1, 2)
    k = randn(2, 33, 3, 16).transpose(1, 2)
    v = randn(2, 33, 3, 16).transpose(1, 2)
    run_case(emu, q, k, v, dtype=torch.float16)
    run_case(emu, randn(2, 1, 17, 16).expand(2, 3, 17, 16), randn(2, 3, 33, 16), randn(2, 3, 33, 16))
    run_case(emu, randn(1, 2, 17, 12), randn(1, 2, 33, 12), randn(1, 2, 33, 12), dtype=torch.float16)
    cols = randn(1, 2, 17, 32)[..., ::2]  # column stride 2
    run_case(emu, cols, randn(1, 2, 33, 16), randn(1, 2, 33, 16), dtype=torch.bfloat16)


def test_decode_split_path_equals_one_block(emu):
    B, H, L, S = 1, 2, 3, 300
    q, k, v = randn(B, H, L, 64), randn(B, H, S, 64), randn(B, H, S, 40)
    mask = torch.rand(B, 1, 1, S) < 0.8
    whole = emu.launch_attention_fwd(q, k, v, mask, None, 0.0, True, S - L - 100, 0.3, num_splits=1)
    for splits in (None, 2, 5):
        split = emu.launch_attention_fwd(q, k, v, mask, None, 0.0, True, S - L - 100, 0.3, num_splits=splits)
        torch.testing.assert_close(split[0], whole[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(split[1], whole[1], rtol=1e-5, atol=1e-6)
    run_case(emu, q, k, v, mask, is_causal=True, diag=S - L - 100, scale=0.3, dtype=torch.float16)


def test_dropout_keep_mask_is_the_triton_kernels(emu):
    """The same seed draws the same keep-mask in both backends (the Triton kernels under the interpreter)."""
    from fastseq.dispatch import TRITON_INTERPRET

    seed = torch.tensor([123456789012345, 17], dtype=torch.int64)
    ours = emu.dropout_keep_mask(seed, 2, 3, 37, 45, 0.3)
    assert ours.dtype == torch.bool and ours.shape == (2, 3, 37, 45)
    assert abs(ours.float().mean().item() - 0.7) < 0.05
    if not TRITON_INTERPRET:
        pytest.skip("the Triton interpreter is off (TRITON_INTERPRET=1 before importing fastseq)")
    from fastseq.kernels import attention as triton_kernels

    torch.testing.assert_close(ours, triton_kernels.dropout_keep_mask(seed, 2, 3, 37, 45, 0.3), rtol=0, atol=0)


def test_empty_and_degenerate(emu):
    out, lse = emu.launch_attention_fwd(randn(1, 2, 5, 8), randn(1, 2, 0, 8), randn(1, 2, 0, 6), None, None, 0.0,
                                        False, 0, 0.3)
    assert (out == 0).all() and torch.isinf(lse).all()
    out, lse = emu.launch_attention_fwd(randn(2, 3, 0, 8), randn(2, 3, 4, 8), randn(2, 3, 4, 6), None, None, 0.0,
                                        False, 0, 0.3)
    assert out.shape == (2, 3, 0, 6)
    q, k, v = randn(1, 1, 4, 8), randn(1, 1, 6, 8), randn(1, 1, 6, 8)
    out, lse = emu.launch_attention_fwd(q, k, v, None, torch.tensor([1, 2]), 1.0, False, 0, 0.3)
    assert (out == 0).all()


def test_bad_input_names_the_argument(emu):
    q, k, v = randn(1, 2, 5, 8), randn(1, 2, 7, 8), randn(1, 2, 7, 8)
    with pytest.raises(RuntimeError, match=r"key.size\(3\) must be equal to query.size\(3\).*Expected 8, got 9"):
        emu.launch_attention_fwd(q, randn(1, 2, 7, 9), v, None, None, 0.0, False, 0, 1.0)
    with pytest.raises(RuntimeError, match="head sizes up to 256"):
        emu.launch_attention_fwd(randn(1, 1, 2, 300), randn(1, 1, 2, 300), randn(1, 1, 2, 8), None, None, 0.0,
                                 False, 0, 1.0)
    with pytest.raises(RuntimeError, match=r"mask.size\(3\) must be 1 or 7, got 6"):
        emu.launch_attention_fwd(q, k, v, torch.ones(1, 1, 5, 6, dtype=torch.bool), None, 0.0, False, 0, 1.0)
    with pytest.raises(RuntimeError, match="float32, float16 or bfloat16"):
        emu.launch_attention_fwd(q.double(), k.double(), v.double(), None, None, 0.0, False, 0, 1.0)
    with pytest.raises(ValueError, match="config"):
        emu.launch_attention_fwd(q, k, v, None, None, 0.0, False, 0, 1.0, config={"CHUNK": 16})
