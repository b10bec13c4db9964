"""The small-M GEMM of the C++ kernels (``csrc/cpu/small_gemm.h``) through its test operator
``torch.ops.fastseq_cpp.small_gemm_nt``: ``a·wᵀ (+ a2·w2ᵀ)`` on each code path this CPU runs, against ``torch.mm``
in float64, over sizes that are not multiples of the tile or of any vector width; strided operands; NaN and Inf;
empty sizes; and the promise that lets a batch be split anywhere: every output is computed the same way whatever
the number of rows or the threads, so a row's result is bitwise the same alone or inside a batch."""

from __future__ import annotations

import pytest
import torch

from fastseq import dispatch

CPP = dispatch.backends()["cpp"]["available"]
pytestmark = pytest.mark.skipif(not CPP, reason=f"backend 'cpp' unavailable: {dispatch.backends()['cpp']['reason']}")
ISAS = ["baseline", "avx2", "avx2_w16", "avx512"]


def gemm(a, w, a2=None, w2=None, isa="best"):
    return torch.ops.fastseq_cpp.small_gemm_nt(a, w, a2, w2, isa)


def _skip_unless_runs(isa):
    try:
        gemm(torch.ones(1, 1), torch.ones(1, 1), isa=isa)
    except RuntimeError as e:
        if "does not run" in str(e):
            pytest.skip(f"this CPU does not run the {isa!r} path")
        raise


def _reference(a, w, a2=None, w2=None):
    out = a.double() @ w.double().t()
    if a2 is not None:
        out += a2.double() @ w2.double().t()
    return out


def _assert_close_to_float64(out, ref, k_total):
    """float32 accumulation of k_total products of unit-variance terms: error ~ √k·ε·|terms|; bound it by k·ε."""
    assert out.dtype == torch.float32 and out.shape == ref.shape
    scale = ref.abs().amax().clamp_min(1.0).item()
    bound = 4 * max(k_total, 1) * torch.finfo(torch.float32).eps * scale
    err = (out.double() - ref).abs().max().item() if out.numel() else 0.0
    assert err <= bound, (err, bound)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("M", [1, 3, 8, 13, 17])
def test_matches_float64_over_odd_sizes(isa, M):
    _skip_unless_runs(isa)
    for K, N in [(1, 1), (7, 5), (33, 27), (100, 49), (129, 130)]:
        a, w = torch.randn(M, K), torch.randn(N, K)
        _assert_close_to_float64(gemm(a, w, isa=isa), _reference(a, w), K)


@pytest.mark.parametrize("isa", ISAS)
def test_two_operand_pairs_sum_into_one_output(isa):
    _skip_unless_runs(isa)
    M, N, K1, K2 = 5, 37, 19, 70
    a, w, a2, w2 = torch.randn(M, K1), torch.randn(N, K1), torch.randn(M, K2), torch.randn(N, K2)
    _assert_close_to_float64(gemm(a, w, a2, w2, isa=isa), _reference(a, w, a2, w2), K1 + K2)


@pytest.mark.parametrize("isa", ISAS)
def test_strided_operands_read_in_place_give_the_same_bits(isa):
    """Row strides other than K (views into larger tensors) are read in place; column-strided operands are copied
    first. Either way the numbers are those of the contiguous operands."""
    _skip_unless_runs(isa)
    M, N, K = 6, 29, 21
    a, w = torch.randn(M, K), torch.randn(N, K)
    a_rows = torch.randn(M, K + 5)[:, 2:2 + K]
    a_rows.copy_(a)
    w_rows = torch.randn(2 * N, K + 3)[::2, :K]
    w_rows.copy_(w)
    w_cols = w.t().contiguous().t()
    assert a_rows.stride() == (K + 5, 1) and w_rows.stride() == (2 * (K + 3), 1) and w_cols.stride(1) != 1
    dense = gemm(a, w, isa=isa)
    for args in ((a_rows, w_rows), (a, w_cols), (a_rows, w_cols)):
        torch.testing.assert_close(gemm(*args, isa=isa), dense, rtol=0, atol=0)


@pytest.mark.parametrize("isa", ISAS)
def test_a_row_gives_the_same_bits_alone_or_in_any_batch(isa):
    """Each output is one dot product in a fixed order, whatever tile it lands in: batch-size invariance."""
    _skip_unless_runs(isa)
    N, K = 50, 45
    w = torch.randn(N, K)
    batch = torch.randn(17, K)
    full = gemm(batch, w, isa=isa)
    for M in (1, 2, 3, 4, 5, 13):
        torch.testing.assert_close(gemm(batch[:M], w, isa=isa), full[:M], rtol=0, atol=0)
    for i in (0, 7, 16):
        torch.testing.assert_close(gemm(batch[i:i + 1], w, isa=isa), full[i:i + 1], rtol=0, atol=0)


def test_the_same_bits_with_one_thread_or_several():
    """Large enough products split W's rows across threads; every output is computed as on one thread."""
    a, w = torch.randn(8, 300), torch.randn(1100, 300)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = gemm(a, w)
        torch.set_num_threads(max(2, threads))
        several = gemm(a, w)
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(several, one, rtol=0, atol=0)


def test_the_avx512_blocking_gives_the_avx512_bits_where_both_run():
    """``avx2_w16`` is the AVX-512 path's 16-lane logic in AVX2 instructions: the same sums in the same order."""
    _skip_unless_runs("avx512")
    _skip_unless_runs("avx2_w16")
    a, w = torch.randn(9, 77), torch.randn(40, 77)
    torch.testing.assert_close(gemm(a, w, isa="avx2_w16"), gemm(a, w, isa="avx512"), rtol=0, atol=0)


@pytest.mark.parametrize("isa", ISAS)
def test_nan_and_inf_propagate_as_in_torch(isa):
    _skip_unless_runs(isa)
    M, N, K = 5, 30, 37  # the poisoned column sits in the vector part, the row's last column in the scalar tail
    a, w = torch.randn(M, K), torch.randn(N, K)
    a[1, 3] = float("nan")
    a[2, K - 1] = float("inf")
    w[4, 0] = float("-inf")
    ours, ref = gemm(a, w, isa=isa), a.double() @ w.double().t()
    assert torch.equal(torch.isnan(ours), torch.isnan(ref))
    assert torch.equal(torch.isinf(ours), torch.isinf(ref))
    assert torch.equal(torch.sign(ours[torch.isinf(ref)]), torch.sign(ref[torch.isinf(ref)]).float())
    finite = torch.isfinite(ref)
    _assert_close_to_float64(ours[finite], ref[finite], K)


@pytest.mark.parametrize("isa", ISAS)
def test_empty_sizes(isa):
    _skip_unless_runs(isa)
    assert gemm(torch.randn(0, 5), torch.randn(7, 5), isa=isa).shape == (0, 7)
    assert gemm(torch.randn(3, 5), torch.randn(0, 5), isa=isa).shape == (3, 0)
    out = gemm(torch.randn(3, 0), torch.randn(4, 0), isa=isa)
    torch.testing.assert_close(out, torch.zeros(3, 4), rtol=0, atol=0)


def test_bad_arguments_raise_and_say_why():
    with pytest.raises(RuntimeError, match="isa must be"):
        gemm(torch.ones(1, 1), torch.ones(1, 1), isa="sse9")
    with pytest.raises(RuntimeError, match="float32"):
        gemm(torch.ones(1, 1, dtype=torch.float64), torch.ones(1, 1, dtype=torch.float64))
    with pytest.raises(RuntimeError, match=r"\(M, K\) and \(N, K\)"):
        gemm(torch.ones(2, 3), torch.ones(4, 5))
    with pytest.raises(RuntimeError, match="go together"):
        gemm(torch.ones(2, 3), torch.ones(4, 3), torch.ones(2, 3), None)


def test_opcheck():
    import fastseq.cpp_kernels  # noqa: F401  (registers the fake implementation)

    op = torch.ops.fastseq_cpp.small_gemm_nt.default
    torch.library.opcheck(op, (torch.randn(3, 10), torch.randn(9, 10), None, None, "best"))
    torch.library.opcheck(op, (torch.randn(3, 10), torch.randn(9, 10), torch.randn(3, 4), torch.randn(9, 4), "best"))
