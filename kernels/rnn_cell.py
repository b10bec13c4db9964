"""Fused recurrent cells in Triton: LSTM, GRU and Elman RNN (tanh / relu), one time step, forward and backward.

Math (``fastseq.reference``): with ``G`` gates stacked in torch's order (LSTM i,f,g,o; GRU r,z,n; RNN one),
``a = x·W_ihᵀ + b_ih + h·W_hhᵀ + b_hh`` of shape ``(B, G·H)``, then the gate nonlinearities and the state update.

Forward, one launch. The grid is ``(⌈B/BLOCK_B⌉, ⌈H/BLOCK_H⌉)``: program ``(pb, pj)`` owns rows
``pb·BLOCK_B…`` and hidden units ``pj·BLOCK_H…`` *of every gate*, so the pointwise update needs nothing from
other programs. It loops over the reduction dimension in ``BLOCK_K`` slices, first of ``x`` against
``W_ih`` then of ``h`` against ``W_hh``, keeping one ``(BLOCK_B, BLOCK_H)`` float32 accumulator per gate
(GRU keeps the hidden-side candidate apart, since the reset gate scales it). Biases, nonlinearities and the
update happen in registers; only ``h'`` (and ``c'``) are written. In training the program also writes a
float32 workspace for backward: the gate *pre-activations* (LSTM: a_i, a_f, a_g, a_o and c'; GRU: a_r, a_z,
a_n and W_hn·h + b_hn; RNN: a), from which backward derives each gate and its slope without the cancellation
of ``1 − y²`` or ``σ(1 − σ)`` near saturation; in inference the gates never leave the chip.

Backward, one launch. Program ``(pb, 0)`` does the pointwise part alone: it turns the output gradients and
the workspace into the pre-activation gate gradients ``dA`` (written, because the weight gradients
``dW_ih = dAᵀ·x`` and ``dW_hh = dAᵀ·h`` are large products done afterwards by torch) and, for LSTM, ``dc``.
Programs ``(pb, 1…)`` each own a ``BLOCK_K`` slice of columns of ``dx = dA_x·W_ih`` or ``dh = dA_h·W_hh``:
they recompute the pointwise gradients tile by tile over the gate dimension, in registers, and reduce them
against the matching weight tile, so ``dA`` is never read back. Recomputing the pointwise part per column
slice costs a few flops per weight element loaded, which is cheap next to the weight traffic.

Precision: operands are fed to ``tl.dot`` in the input dtype (tensor cores for float16/bfloat16; float32 in
IEEE mode unless torch allows TF32 matmuls), accumulation and all pointwise math are float32. Under the
Triton interpreter bfloat16 arithmetic is wrong, so there bfloat16 operands are upcast right after loading.
Any size works: every load and store is masked, nothing needs a multiple of 16.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# ---------------------------------------------------------------------------------------------------------
# Pointwise helpers
# ---------------------------------------------------------------------------------------------------------


@triton.jit
def _sigmoid_and_grad(a):
    """σ(a) and σ'(a) = e / (1 + e)² with e = exp(−|a|): no overflow, and no cancellation in 1 − σ near
    saturation, where the textbook σ(1 − σ) from a rounded σ loses most of its digits."""
    e = tl.exp(-tl.abs(a))
    d = 1.0 / (1.0 + e)
    return tl.where(a >= 0.0, d, e * d), e * d * d


@triton.jit
def _sigmoid(a):
    s, _ = _sigmoid_and_grad(a)
    return s


@triton.jit
def _tanh_grad(a):
    """tanh'(a) = 1 − tanh²(a) = 4e / (1 + e)² with e = exp(−2|a|), exact to rounding even where tanh ≈ ±1."""
    e = tl.exp(-2.0 * tl.abs(a))
    d = 1.0 / (1.0 + e)
    return 4.0 * e * d * d


@triton.jit
def _tanh(x):
    # |x| < 0.625: an odd minimax polynomial (Cephes' tanhf coefficients, ~1 ulp); beyond, 1 − 2/(e^{2|x|} + 1),
    # which neither overflows (e = inf gives 1) nor cancels badly (the subtracted term is < 0.45).
    # NaN falls through both branches.
    ax = tl.abs(x)
    z = ax * ax
    p = ((((-5.70498872745e-3 * z + 2.06390887954e-2) * z - 5.37397155531e-2) * z + 1.33314422036e-1) * z
         - 3.33332819422e-1)
    small = ax + ax * z * p
    big = 1.0 - 2.0 / (tl.exp(2.0 * ax) + 1.0)
    t = tl.where(ax < 0.625, small, big)
    return tl.where(x < 0.0, -t, t)


@triton.jit
def _load_tile(ptr, rows, cols, stride_r, stride_c, n_rows, n_cols):
    """``ptr[rows, cols]`` as a (len(rows), len(cols)) tile, zero outside the matrix."""
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    return tl.load(ptr + rows[:, None] * stride_r + cols[None, :] * stride_c, mask=mask, other=0.0)


@triton.jit
def _load_f32(ptr, rows, cols, stride_r, stride_c, n_rows, n_cols):
    return _load_tile(ptr, rows, cols, stride_r, stride_c, n_rows, n_cols).to(tl.float32)


@triton.jit
def _round_to_bf16(x):
    """float32 → the float32 nearest to a bfloat16 (round to nearest, ties to even), so the cast after it is
    exact. The GPU's own conversion rounds the same way; the interpreter's truncates, which this corrects.
    NaN and ±inf keep their class (the added bits never reach the exponent of an all-ones pattern)."""
    u = x.to(tl.uint32, bitcast=True)
    u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
    return u.to(tl.float32, bitcast=True)


@triton.jit
def _store_tile(ptr, value, rows, cols, stride_r, stride_c, n_rows, n_cols):
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    if ptr.dtype.element_ty == tl.bfloat16:
        value = _round_to_bf16(value.to(tl.float32))
    tl.store(ptr + rows[:, None] * stride_r + cols[None, :] * stride_c, value.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _mm(acc, a, w_t, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """``acc + a · w_t`` with operands cast to the dot dtype and a float32 accumulator."""
    return tl.dot(a.to(DOT_DTYPE), w_t.to(DOT_DTYPE), acc, input_precision=PRECISION)


@triton.jit
def _gate_bias(b_ptr, gate, H, rj, stride):
    """Row vector ``b[gate·H + rj]`` of one gate's bias (zero past the last unit), for a (rows, units) tile."""
    return tl.load(b_ptr + (gate * H + rj) * stride, mask=rj < H, other=0.0).to(tl.float32)[None, :]


@triton.jit
def _gates_mm(acc_0, acc_1, acc_2, acc_3, a_ptr, s_ab, s_ak, w_ptr, s_wr, s_wc, rb, rj, B, K, H,
              NUM_GATES: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, BLOCK_K: tl.constexpr):
    """``acc_g += a[rb, :K] · W[g·H + rj, :K]ᵀ`` for the first ``NUM_GATES`` gates, over ``K`` in ``BLOCK_K``
    slices: each slice of ``a`` is loaded once for every gate. ``W[g·H + rj, k]`` is loaded as a
    (BLOCK_K, BLOCK_H) tile, the transposed slice the product needs. Unused accumulators pass through."""
    G = NUM_GATES * H
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        a = _load_tile(a_ptr, rb, rk, s_ab, s_ak, B, K)
        acc_0 = _mm(acc_0, a, _load_tile(w_ptr, rk, 0 * H + rj, s_wc, s_wr, K, G), DOT_DTYPE, PRECISION)
        if NUM_GATES > 1:
            acc_1 = _mm(acc_1, a, _load_tile(w_ptr, rk, 1 * H + rj, s_wc, s_wr, K, G), DOT_DTYPE, PRECISION)
        if NUM_GATES > 2:
            acc_2 = _mm(acc_2, a, _load_tile(w_ptr, rk, 2 * H + rj, s_wc, s_wr, K, G), DOT_DTYPE, PRECISION)
        if NUM_GATES > 3:
            acc_3 = _mm(acc_3, a, _load_tile(w_ptr, rk, 3 * H + rj, s_wc, s_wr, K, G), DOT_DTYPE, PRECISION)
    return acc_0, acc_1, acc_2, acc_3


# ---------------------------------------------------------------------------------------------------------
# Forward kernels
# ---------------------------------------------------------------------------------------------------------


@triton.jit
def lstm_cell_fwd_kernel(
    x_ptr, h_ptr, c_ptr, w_ih_ptr, w_hh_ptr, b_ih_ptr, b_hh_ptr, h_out_ptr, c_out_ptr, ws_ptr,
    B, I, H,
    s_xb, s_xk, s_hb, s_hk, s_cb, s_ck, s_wir, s_wic, s_whr, s_whc, s_bi, s_bh,
    HAS_STATE: tl.constexpr, HAS_B_IH: tl.constexpr, HAS_B_HH: tl.constexpr, SAVE: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rb = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    rj = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    acc_i = tl.zeros((BLOCK_B, BLOCK_H), tl.float32)
    acc_f = tl.zeros((BLOCK_B, BLOCK_H), tl.float32)
    acc_g = tl.zeros((BLOCK_B, BLOCK_H), tl.float32)
    acc_o = tl.zeros((BLOCK_B, BLOCK_H), tl.float32)
    acc_i, acc_f, acc_g, acc_o = _gates_mm(acc_i, acc_f, acc_g, acc_o, x_ptr, s_xb, s_xk, w_ih_ptr, s_wir, s_wic,
                                           rb, rj, B, I, H, 4, DOT_DTYPE, PRECISION, BLOCK_K)
    if HAS_STATE:
        acc_i, acc_f, acc_g, acc_o = _gates_mm(acc_i, acc_f, acc_g, acc_o, h_ptr, s_hb, s_hk, w_hh_ptr, s_whr,
                                               s_whc, rb, rj, B, H, H, 4, DOT_DTYPE, PRECISION, BLOCK_K)
    if HAS_B_IH:
        acc_i += _gate_bias(b_ih_ptr, 0, H, rj, s_bi)
        acc_f += _gate_bias(b_ih_ptr, 1, H, rj, s_bi)
        acc_g += _gate_bias(b_ih_ptr, 2, H, rj, s_bi)
        acc_o += _gate_bias(b_ih_ptr, 3, H, rj, s_bi)
    if HAS_B_HH:
        acc_i += _gate_bias(b_hh_ptr, 0, H, rj, s_bh)
        acc_f += _gate_bias(b_hh_ptr, 1, H, rj, s_bh)
        acc_g += _gate_bias(b_hh_ptr, 2, H, rj, s_bh)
        acc_o += _gate_bias(b_hh_ptr, 3, H, rj, s_bh)
    i = _sigmoid(acc_i)
    f = _sigmoid(acc_f)
    g = _tanh(acc_g)
    o = _sigmoid(acc_o)
    if HAS_STATE:
        c_new = f * _load_f32(c_ptr, rb, rj, s_cb, s_ck, B, H) + i * g
    else:
        c_new = i * g
    h_new = o * _tanh(c_new)
    _store_tile(h_out_ptr, h_new, rb, rj, H, 1, B, H)
    _store_tile(c_out_ptr, c_new, rb, rj, H, 1, B, H)
    if SAVE:  # pre-activations: backward derives gates and their slopes from them without cancellation
        W = 5 * H
        _store_tile(ws_ptr + 0 * H, acc_i, rb, rj, W, 1, B, H)
        _store_tile(ws_ptr + 1 * H, acc_f, rb, rj, W, 1, B, H)
        _store_tile(ws_ptr + 2 * H, acc_g, rb, rj, W, 1, B, H)
        _store_tile(ws_ptr + 3 * H, acc_o, rb, rj, W, 1, B, H)
        _store_tile(ws_ptr + 4 * H, c_new, rb, rj, W, 1, B, H)


@triton.jit
def gru_cell_fwd_kernel(
    x_ptr, h_ptr, w_ih_ptr, w_hh_ptr, b_ih_ptr, b_hh_ptr, h_out_ptr, ws_ptr,
    B, I, H,
    s_xb, s_xk, s_hb, s_hk, s_wir, s_wic, s_whr, s_whc, s_bi, s_bh,
    HAS_STATE: tl.constexpr, HAS_B_IH: tl.constexpr, HAS_B_HH: tl.constexpr, SAVE: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rb = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    rj = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    acc_r = tl.zeros((BLOCK_B, BLOCK_H), tl.float32)
    acc_z = tl.zeros((BLOCK_B, BLOCK_H), tl.float32)
    acc_xn = tl.zeros((BLOCK_B, BLOCK_H), tl.float32)  # W_in x + b_in
    acc_hn = tl.zeros((BLOCK_B, BLOCK_H), tl.float32)  # W_hn h + b_hn: the reset gate scales all of it
    acc_r, acc_z, acc_xn, _ = _gates_mm(acc_r, acc_z, acc_xn, acc_xn, x_ptr, s_xb, s_xk, w_ih_ptr, s_wir, s_wic,
                                        rb, rj, B, I, H, 3, DOT_DTYPE, PRECISION, BLOCK_K)
    if HAS_STATE:
        acc_r, acc_z, acc_hn, _ = _gates_mm(acc_r, acc_z, acc_hn, acc_hn, h_ptr, s_hb, s_hk, w_hh_ptr, s_whr,
                                            s_whc, rb, rj, B, H, H, 3, DOT_DTYPE, PRECISION, BLOCK_K)
    if HAS_B_IH:
        acc_r += _gate_bias(b_ih_ptr, 0, H, rj, s_bi)
        acc_z += _gate_bias(b_ih_ptr, 1, H, rj, s_bi)
        acc_xn += _gate_bias(b_ih_ptr, 2, H, rj, s_bi)
    if HAS_B_HH:
        acc_r += _gate_bias(b_hh_ptr, 0, H, rj, s_bh)
        acc_z += _gate_bias(b_hh_ptr, 1, H, rj, s_bh)
        acc_hn += _gate_bias(b_hh_ptr, 2, H, rj, s_bh)
    r = _sigmoid(acc_r)
    z = _sigmoid(acc_z)
    a_n = acc_xn + r * acc_hn
    n = _tanh(a_n)
    # (1 − z) ⊙ n + z ⊙ h, written as torch's kernels write it: when the two terms nearly cancel, the same
    # rounding structure keeps the error where torch's is.
    if HAS_STATE:
        h_new = n + z * (_load_f32(h_ptr, rb, rj, s_hb, s_hk, B, H) - n)
    else:
        h_new = n - z * n
    _store_tile(h_out_ptr, h_new, rb, rj, H, 1, B, H)
    if SAVE:  # pre-activations of r, z, n and the hidden-side candidate term
        W = 4 * H
        _store_tile(ws_ptr + 0 * H, acc_r, rb, rj, W, 1, B, H)
        _store_tile(ws_ptr + 1 * H, acc_z, rb, rj, W, 1, B, H)
        _store_tile(ws_ptr + 2 * H, a_n, rb, rj, W, 1, B, H)
        _store_tile(ws_ptr + 3 * H, acc_hn, rb, rj, W, 1, B, H)


@triton.jit
def rnn_cell_fwd_kernel(
    x_ptr, h_ptr, w_ih_ptr, w_hh_ptr, b_ih_ptr, b_hh_ptr, h_out_ptr, ws_ptr,
    B, I, H,
    s_xb, s_xk, s_hb, s_hk, s_wir, s_wic, s_whr, s_whc, s_bi, s_bh,
    HAS_STATE: tl.constexpr, HAS_B_IH: tl.constexpr, HAS_B_HH: tl.constexpr, SAVE: tl.constexpr,
    RELU: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rb = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    rj = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    acc = tl.zeros((BLOCK_B, BLOCK_H), tl.float32)
    acc, _, _, _ = _gates_mm(acc, acc, acc, acc, x_ptr, s_xb, s_xk, w_ih_ptr, s_wir, s_wic, rb, rj, B, I, H, 1,
                             DOT_DTYPE, PRECISION, BLOCK_K)
    if HAS_STATE:
        acc, _, _, _ = _gates_mm(acc, acc, acc, acc, h_ptr, s_hb, s_hk, w_hh_ptr, s_whr, s_whc, rb, rj, B, H, H,
                                 1, DOT_DTYPE, PRECISION, BLOCK_K)
    if HAS_B_IH:
        acc += _gate_bias(b_ih_ptr, 0, H, rj, s_bi)
    if HAS_B_HH:
        acc += _gate_bias(b_hh_ptr, 0, H, rj, s_bh)
    if RELU:
        h_new = tl.where(acc < 0.0, 0.0, acc)  # not tl.maximum: NaN must propagate as in torch.relu
    else:
        h_new = _tanh(acc)
    _store_tile(h_out_ptr, h_new, rb, rj, H, 1, B, H)
    if SAVE:  # the pre-activation
        _store_tile(ws_ptr, acc, rb, rj, H, 1, B, H)


# ---------------------------------------------------------------------------------------------------------
# Backward kernels
# ---------------------------------------------------------------------------------------------------------


@triton.jit
def _column_slice(pid_k, NUM_X_BLOCKS, I, H, w_ih_ptr, w_hh_ptr, s_wir, s_wic, s_whr, s_whc,
                  BLOCK_K: tl.constexpr):
    """Which slice of ``[dx | dh]`` program column ``pid_k ≥ 1`` owns: its columns, their count and weight."""
    is_x = pid_k <= NUM_X_BLOCKS
    if is_x:
        col0 = (pid_k - 1) * BLOCK_K
        n_cols = I
        w_ptr = w_ih_ptr
        s_r = s_wir
        s_c = s_wic
    else:
        col0 = (pid_k - 1 - NUM_X_BLOCKS) * BLOCK_K
        n_cols = H
        w_ptr = w_hh_ptr
        s_r = s_whr
        s_c = s_whc
    return is_x, col0 + tl.arange(0, BLOCK_K), n_cols, w_ptr, s_r, s_c


@triton.jit
def lstm_cell_bwd_kernel(
    dh_ptr, dc_ptr, ws_ptr, c_ptr, w_ih_ptr, w_hh_ptr, dgates_ptr, dx_ptr, dh_prev_ptr, dc_prev_ptr,
    B, I, H, NUM_X_BLOCKS,
    s_dhb, s_dhk, s_dcb, s_dck, s_cb, s_ck, s_wir, s_wic, s_whr, s_whc,
    HAS_STATE: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_k = tl.program_id(1)
    rb = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    G = 4 * H
    if pid_k == 0:
        for j0 in range(0, H, BLOCK_H):
            rj = j0 + tl.arange(0, BLOCK_H)
            da_i, da_f, da_g, da_o, dct, f = _lstm_pointwise_bwd(
                dh_ptr, dc_ptr, ws_ptr, c_ptr, rb, rj, B, H, s_dhb, s_dhk, s_dcb, s_dck, s_cb, s_ck, HAS_STATE)
            _store_tile(dgates_ptr + 0 * H, da_i, rb, rj, G, 1, B, H)
            _store_tile(dgates_ptr + 1 * H, da_f, rb, rj, G, 1, B, H)
            _store_tile(dgates_ptr + 2 * H, da_g, rb, rj, G, 1, B, H)
            _store_tile(dgates_ptr + 3 * H, da_o, rb, rj, G, 1, B, H)
            if HAS_STATE:
                _store_tile(dc_prev_ptr, dct * f, rb, rj, H, 1, B, H)
    else:
        is_x, rk, n_cols, w_ptr, s_r, s_c = _column_slice(
            pid_k, NUM_X_BLOCKS, I, H, w_ih_ptr, w_hh_ptr, s_wir, s_wic, s_whr, s_whc, BLOCK_K)
        acc = tl.zeros((BLOCK_B, BLOCK_K), tl.float32)
        for j0 in range(0, H, BLOCK_H):
            rj = j0 + tl.arange(0, BLOCK_H)
            da_i, da_f, da_g, da_o, dct, f = _lstm_pointwise_bwd(
                dh_ptr, dc_ptr, ws_ptr, c_ptr, rb, rj, B, H, s_dhb, s_dhk, s_dcb, s_dck, s_cb, s_ck, HAS_STATE)
            acc = _mm(acc, da_i, _load_tile(w_ptr, 0 * H + rj, rk, s_r, s_c, G, n_cols), DOT_DTYPE, PRECISION)
            acc = _mm(acc, da_f, _load_tile(w_ptr, 1 * H + rj, rk, s_r, s_c, G, n_cols), DOT_DTYPE, PRECISION)
            acc = _mm(acc, da_g, _load_tile(w_ptr, 2 * H + rj, rk, s_r, s_c, G, n_cols), DOT_DTYPE, PRECISION)
            acc = _mm(acc, da_o, _load_tile(w_ptr, 3 * H + rj, rk, s_r, s_c, G, n_cols), DOT_DTYPE, PRECISION)
        if is_x:
            _store_tile(dx_ptr, acc, rb, rk, I, 1, B, I)
        else:
            _store_tile(dh_prev_ptr, acc, rb, rk, H, 1, B, H)


@triton.jit
def _lstm_pointwise_bwd(dh_ptr, dc_ptr, ws_ptr, c_ptr, rb, rj, B, H, s_dhb, s_dhk, s_dcb, s_dck, s_cb, s_ck,
                        HAS_STATE: tl.constexpr):
    """Pre-activation gate gradients of the LSTM cell for one (rows, units) tile, from the workspace."""
    W = 5 * H
    i, di = _sigmoid_and_grad(_load_f32(ws_ptr + 0 * H, rb, rj, W, 1, B, H))
    f, df = _sigmoid_and_grad(_load_f32(ws_ptr + 1 * H, rb, rj, W, 1, B, H))
    a_g = _load_f32(ws_ptr + 2 * H, rb, rj, W, 1, B, H)
    o, do = _sigmoid_and_grad(_load_f32(ws_ptr + 3 * H, rb, rj, W, 1, B, H))
    c_new = _load_f32(ws_ptr + 4 * H, rb, rj, W, 1, B, H)
    g = _tanh(a_g)
    tc = _tanh(c_new)
    dh = _load_f32(dh_ptr, rb, rj, s_dhb, s_dhk, B, H)
    dct = _load_f32(dc_ptr, rb, rj, s_dcb, s_dck, B, H) + dh * o * _tanh_grad(c_new)  # total dL/dc'
    if HAS_STATE:
        c = _load_f32(c_ptr, rb, rj, s_cb, s_ck, B, H)
    else:
        c = tl.zeros_like(dct)
    da_i = dct * g * di
    da_f = dct * c * df
    da_g = dct * i * _tanh_grad(a_g)
    da_o = dh * tc * do
    return da_i, da_f, da_g, da_o, dct, f


@triton.jit
def _gru_pointwise_bwd(dh_ptr, ws_ptr, h_ptr, rb, rj, B, H, s_dhb, s_dhk, s_hb, s_hk, HAS_STATE: tl.constexpr):
    """Gate gradients of the GRU cell for one tile: input-side (r, z, n) and the hidden-side n."""
    W = 4 * H
    r, dr = _sigmoid_and_grad(_load_f32(ws_ptr + 0 * H, rb, rj, W, 1, B, H))
    a_z = _load_f32(ws_ptr + 1 * H, rb, rj, W, 1, B, H)
    z, dz = _sigmoid_and_grad(a_z)
    a_n = _load_f32(ws_ptr + 2 * H, rb, rj, W, 1, B, H)
    hn = _load_f32(ws_ptr + 3 * H, rb, rj, W, 1, B, H)
    n = _tanh(a_n)
    dh = _load_f32(dh_ptr, rb, rj, s_dhb, s_dhk, B, H)
    if HAS_STATE:
        h = _load_f32(h_ptr, rb, rj, s_hb, s_hk, B, H)
    else:
        h = tl.zeros_like(dh)
    da_n = dh * _sigmoid(-a_z) * _tanh_grad(a_n)  # 1 − z = σ(−a_z), without cancellation
    da_r = da_n * hn * dr
    da_z = dh * (h - n) * dz
    return da_r, da_z, da_n, da_n * r


@triton.jit
def gru_cell_bwd_kernel(
    dh_ptr, ws_ptr, h_ptr, w_ih_ptr, w_hh_ptr, dgates_x_ptr, dgates_h_ptr, dx_ptr, dh_prev_ptr,
    B, I, H, NUM_X_BLOCKS,
    s_dhb, s_dhk, s_hb, s_hk, s_wir, s_wic, s_whr, s_whc,
    HAS_STATE: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_k = tl.program_id(1)
    rb = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    G = 3 * H
    if pid_k == 0:
        for j0 in range(0, H, BLOCK_H):
            rj = j0 + tl.arange(0, BLOCK_H)
            da_r, da_z, da_n, da_hn = _gru_pointwise_bwd(
                dh_ptr, ws_ptr, h_ptr, rb, rj, B, H, s_dhb, s_dhk, s_hb, s_hk, HAS_STATE)
            _store_tile(dgates_x_ptr + 0 * H, da_r, rb, rj, G, 1, B, H)
            _store_tile(dgates_x_ptr + 1 * H, da_z, rb, rj, G, 1, B, H)
            _store_tile(dgates_x_ptr + 2 * H, da_n, rb, rj, G, 1, B, H)
            _store_tile(dgates_h_ptr + 0 * H, da_r, rb, rj, G, 1, B, H)
            _store_tile(dgates_h_ptr + 1 * H, da_z, rb, rj, G, 1, B, H)
            _store_tile(dgates_h_ptr + 2 * H, da_hn, rb, rj, G, 1, B, H)
    else:
        is_x, rk, n_cols, w_ptr, s_r, s_c = _column_slice(
            pid_k, NUM_X_BLOCKS, I, H, w_ih_ptr, w_hh_ptr, s_wir, s_wic, s_whr, s_whc, BLOCK_K)
        acc = tl.zeros((BLOCK_B, BLOCK_K), tl.float32)
        for j0 in range(0, H, BLOCK_H):
            rj = j0 + tl.arange(0, BLOCK_H)
            da_r, da_z, da_n, da_hn = _gru_pointwise_bwd(
                dh_ptr, ws_ptr, h_ptr, rb, rj, B, H, s_dhb, s_dhk, s_hb, s_hk, HAS_STATE)
            # The n gate enters the input side as da_n and the hidden side as da_n ⊙ r.
            da_n_side = tl.where(is_x, da_n, da_hn)
            acc = _mm(acc, da_r, _load_tile(w_ptr, 0 * H + rj, rk, s_r, s_c, G, n_cols), DOT_DTYPE, PRECISION)
            acc = _mm(acc, da_z, _load_tile(w_ptr, 1 * H + rj, rk, s_r, s_c, G, n_cols), DOT_DTYPE, PRECISION)
            acc = _mm(acc, da_n_side, _load_tile(w_ptr, 2 * H + rj, rk, s_r, s_c, G, n_cols), DOT_DTYPE, PRECISION)
        if is_x:
            _store_tile(dx_ptr, acc, rb, rk, I, 1, B, I)
        else:
            # h' = … + z ⊙ h: the direct path adds dh' ⊙ z on the owned hidden units (z from its pre-activation).
            z = _sigmoid(_load_f32(ws_ptr + 1 * H, rb, rk, 4 * H, 1, B, H))
            dh = _load_f32(dh_ptr, rb, rk, s_dhb, s_dhk, B, H)
            _store_tile(dh_prev_ptr, acc + dh * z, rb, rk, H, 1, B, H)


@triton.jit
def _rnn_pointwise_bwd(dh_ptr, ws_ptr, rb, rj, B, H, s_dhb, s_dhk, RELU: tl.constexpr):
    a = _load_f32(ws_ptr, rb, rj, H, 1, B, H)
    dh = _load_f32(dh_ptr, rb, rj, s_dhb, s_dhk, B, H)
    if RELU:
        return tl.where(a > 0.0, dh, 0.0)  # torch's threshold_backward: no gradient at 0 or NaN
    else:
        return dh * _tanh_grad(a)


@triton.jit
def rnn_cell_bwd_kernel(
    dh_ptr, ws_ptr, w_ih_ptr, w_hh_ptr, dgates_ptr, dx_ptr, dh_prev_ptr,
    B, I, H, NUM_X_BLOCKS,
    s_dhb, s_dhk, s_wir, s_wic, s_whr, s_whc,
    RELU: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_k = tl.program_id(1)
    rb = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    if pid_k == 0:
        for j0 in range(0, H, BLOCK_H):
            rj = j0 + tl.arange(0, BLOCK_H)
            da = _rnn_pointwise_bwd(dh_ptr, ws_ptr, rb, rj, B, H, s_dhb, s_dhk, RELU)
            _store_tile(dgates_ptr, da, rb, rj, H, 1, B, H)
    else:
        is_x, rk, n_cols, w_ptr, s_r, s_c = _column_slice(
            pid_k, NUM_X_BLOCKS, I, H, w_ih_ptr, w_hh_ptr, s_wir, s_wic, s_whr, s_whc, BLOCK_K)
        acc = tl.zeros((BLOCK_B, BLOCK_K), tl.float32)
        for j0 in range(0, H, BLOCK_H):
            rj = j0 + tl.arange(0, BLOCK_H)
            da = _rnn_pointwise_bwd(dh_ptr, ws_ptr, rb, rj, B, H, s_dhb, s_dhk, RELU)
            acc = _mm(acc, da, _load_tile(w_ptr, rj, rk, s_r, s_c, H, n_cols), DOT_DTYPE, PRECISION)
        if is_x:
            _store_tile(dx_ptr, acc, rb, rk, I, 1, B, I)
        else:
            _store_tile(dh_prev_ptr, acc, rb, rk, H, 1, B, H)


# ---------------------------------------------------------------------------------------------------------
# Launchers: tensors in, tensors out. They allocate outputs, pick blocks and launch; they check nothing a
# caller could get wrong (the operators validate before they get here).
# ---------------------------------------------------------------------------------------------------------

_TRITON_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def _interpreting(t: torch.Tensor) -> bool:
    return t.device.type == "cpu"


def _dot_config(t: torch.Tensor) -> tuple[tl.dtype, str]:
    """The dtype fed to ``tl.dot`` and its precision mode for inputs like ``t``."""
    if t.dtype == torch.bfloat16 and _interpreting(t):
        return tl.float32, "ieee"  # the interpreter computes bfloat16 wrongly: upcast right after loading
    if t.dtype == torch.float32:
        return tl.float32, "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
    return _TRITON_DTYPES[t.dtype], "ieee"


def blocks(batch: int, dtype: torch.dtype, on_gpu: bool, backward: bool = False) -> dict[str, int]:
    """Tile sizes (and, on the GPU, warps) for a batch of ``batch`` rows.

    tl.dot needs every block dimension ≥ 16 on the GPU. float32 tiles take twice the shared memory of
    half-precision ones: the LSTM backward with a 64-row float32 tile needs 192 KiB, over sm_80's 163 KiB,
    so float32 stops at 32 rows. The backward's column programs keep an accumulator and the recomputed
    gradients of every gate live at once: with 4 warps they pass 255 registers and spill from 32 rows on
    (``python -m fastseq aot``), so the backward runs 8 warps and at most 32 rows (16 in float32, whose
    32-row LSTM tile still spilled 172 B on sm_90 with 8 warps). The AOT check holds every
    choice made here to the shared-memory limit and to the spill budgets at the end of this file. The
    interpreter runs programs one after another, so there larger tiles only mean fewer Python iterations.
    """
    if backward:
        max_rows = 16 if dtype == torch.float32 else 32
    else:
        max_rows = 32 if dtype == torch.float32 else 64
    block_b = min(max_rows, max(16, triton.next_power_of_2(max(batch, 1))))
    if not on_gpu:
        return {"BLOCK_B": block_b, "BLOCK_H": 32, "BLOCK_K": 32}
    return {"BLOCK_B": block_b, "BLOCK_H": 32, "BLOCK_K": 32, "num_warps": 8 if backward else 4}


def blocks_for(batch: int, t: torch.Tensor, backward: bool = False) -> dict[str, int]:
    return blocks(batch, t.dtype, on_gpu=not _interpreting(t), backward=backward)


def _state_args(t: torch.Tensor | None, like: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """Pointer and strides of an optional state; an absent one passes ``like`` (never read)."""
    return (like, 0, 0) if t is None else (t, t.stride(0), t.stride(1))


def _bias_args(b: torch.Tensor | None, like: torch.Tensor) -> tuple[torch.Tensor, int]:
    return (like, 0) if b is None else (b, b.stride(0))


def launch_cell_fwd(kind: str, x, h, c, w_ih, w_hh, b_ih, b_hh, save: bool, nonlinearity: str = "tanh"):
    """Forward of one cell step. ``kind`` is "lstm", "gru" or "rnn". Returns ``(h', c' or None, workspace)``,
    the workspace float32 ``(B, k·H)`` when ``save`` else an empty tensor."""
    B, I = x.shape
    H = w_hh.shape[1]
    ws_width = {"lstm": 5, "gru": 4, "rnn": 1}[kind] * H
    h_out = torch.empty((B, H), dtype=x.dtype, device=x.device)
    c_out = torch.empty((B, H), dtype=x.dtype, device=x.device) if kind == "lstm" else None
    ws = torch.empty((B, ws_width) if save else (0,), dtype=torch.float32, device=x.device)
    if B == 0 or H == 0:
        return h_out, c_out, ws
    dot_dtype, precision = _dot_config(x)
    blocks = blocks_for(B, x)
    grid = (triton.cdiv(B, blocks["BLOCK_B"]), triton.cdiv(H, blocks["BLOCK_H"]))
    h_t, s_hb, s_hk = _state_args(h, x)
    b_ih_t, s_bi = _bias_args(b_ih, w_ih)
    b_hh_t, s_bh = _bias_args(b_hh, w_hh)
    flags = dict(HAS_STATE=h is not None, HAS_B_IH=b_ih is not None, HAS_B_HH=b_hh is not None, SAVE=save,
                 DOT_DTYPE=dot_dtype, PRECISION=precision, **blocks)
    weights = (w_ih.stride(0), w_ih.stride(1), w_hh.stride(0), w_hh.stride(1), s_bi, s_bh)
    if kind == "lstm":
        c_t, s_cb, s_ck = _state_args(c, x)
        lstm_cell_fwd_kernel[grid](
            x, h_t, c_t, w_ih, w_hh, b_ih_t, b_hh_t, h_out, c_out, ws, B, I, H,
            x.stride(0), x.stride(1), s_hb, s_hk, s_cb, s_ck, *weights, **flags)
    elif kind == "gru":
        gru_cell_fwd_kernel[grid](
            x, h_t, w_ih, w_hh, b_ih_t, b_hh_t, h_out, ws, B, I, H,
            x.stride(0), x.stride(1), s_hb, s_hk, *weights, **flags)
    else:
        rnn_cell_fwd_kernel[grid](
            x, h_t, w_ih, w_hh, b_ih_t, b_hh_t, h_out, ws, B, I, H,
            x.stride(0), x.stride(1), s_hb, s_hk, *weights, RELU=nonlinearity == "relu", **flags)
    return h_out, c_out, ws


def launch_cell_bwd(kind: str, grad_h, grad_c, ws, h, c, w_ih, w_hh, need_input_grad: bool,
                    nonlinearity: str = "tanh"):
    """Backward of one cell step from the forward's workspace. Returns ``(dgates_x, dgates_h, dx, dh, dc)``:
    the pre-activation gate gradients of the input side and of the hidden side (the same tensor except for
    GRU), in the input dtype, and the gradients of input and states (``None`` where not asked or absent).
    ``h`` and ``c`` are the states the forward consumed (``None`` where it started from zeros)."""
    B, H = grad_h.shape
    I = w_ih.shape[1]
    G = {"lstm": 4, "gru": 3, "rnn": 1}[kind] * H
    dtype, device = w_ih.dtype, w_ih.device
    has_state = h is not None
    dgates = torch.empty((B, G), dtype=dtype, device=device)
    dgates_h = torch.empty((B, G), dtype=dtype, device=device) if kind == "gru" else dgates
    dx = torch.empty((B, I), dtype=dtype, device=device) if need_input_grad else None
    dh = torch.empty((B, H), dtype=dtype, device=device) if has_state else None
    dc = torch.empty((B, H), dtype=dtype, device=device) if has_state and kind == "lstm" else None
    if B == 0 or H == 0:
        if dx is not None:
            dx.zero_()
        return dgates, dgates_h, dx, dh, dc
    dot_dtype, precision = _dot_config(w_ih)
    blocks = blocks_for(B, w_ih, backward=True)
    num_x_blocks = triton.cdiv(I, blocks["BLOCK_K"]) if need_input_grad else 0
    num_h_blocks = triton.cdiv(H, blocks["BLOCK_K"]) if has_state else 0
    grid = (triton.cdiv(B, blocks["BLOCK_B"]), 1 + num_x_blocks + num_h_blocks)
    # Unused output pointers point at dgates: their stores are never reached.
    dx_t = dgates if dx is None else dx
    dh_t = dgates if dh is None else dh
    h_t, s_hb, s_hk = _state_args(h, grad_h)
    weights = (w_ih.stride(0), w_ih.stride(1), w_hh.stride(0), w_hh.stride(1))
    flags = dict(DOT_DTYPE=dot_dtype, PRECISION=precision, **blocks)
    if kind == "lstm":
        c_t, s_cb, s_ck = _state_args(c, grad_h)
        lstm_cell_bwd_kernel[grid](
            grad_h, grad_c, ws, c_t, w_ih, w_hh, dgates, dx_t, dh_t, dgates if dc is None else dc,
            B, I, H, num_x_blocks, grad_h.stride(0), grad_h.stride(1), grad_c.stride(0), grad_c.stride(1),
            s_cb, s_ck, *weights, HAS_STATE=has_state, **flags)
    elif kind == "gru":
        gru_cell_bwd_kernel[grid](
            grad_h, ws, h_t, w_ih, w_hh, dgates, dgates_h, dx_t, dh_t, B, I, H, num_x_blocks,
            grad_h.stride(0), grad_h.stride(1), s_hb, s_hk, *weights, HAS_STATE=has_state, **flags)
    else:
        rnn_cell_bwd_kernel[grid](
            grad_h, ws, w_ih, w_hh, dgates, dx_t, dh_t, B, I, H, num_x_blocks,
            grad_h.stride(0), grad_h.stride(1), *weights, RELU=nonlinearity == "relu", **flags)
    return dgates, dgates_h, dx, dh, dc


# ---------------------------------------------------------------------------------------------------------
# AOT budgets (``python -m fastseq aot``, fastseq/aot.py): the most spill bytes (stores + loads, from ptxas -v)
# and local-memory instructions (LDL + STL in the SASS) any specialisation of each kernel may have on sm_80 and
# sm_90. Zero unless a reason is written beside it; a non-zero budget is the measured worst case (Triton 3.6.0,
# ptxas 12.8), so nothing may grow past it unnoticed.
# ---------------------------------------------------------------------------------------------------------

AOT_BUDGETS = {
    "lstm_cell_fwd_kernel": {"spill_bytes": 16, "local_ops": 4},  # sm_90 float32/TF32 32x32x32, every flag on:
    # four (32, 32) float32 accumulators plus the TF32 operand tiles reach 255 registers; 16 B spilled.
    "gru_cell_fwd_kernel": {"spill_bytes": 0, "local_ops": 0},
    "rnn_cell_fwd_kernel": {"spill_bytes": 0, "local_ops": 0},
    "lstm_cell_bwd_kernel": {"spill_bytes": 0, "local_ops": 0},
    "gru_cell_bwd_kernel": {"spill_bytes": 8, "local_ops": 2},  # sm_90 float32 16x32x32, 8 warps, no state:
    # ptxas spills 8 B at under 200 registers (not register-bound; cause not yet understood: look with a
    # profile on a GPU). Every other specialisation: 0.
    "rnn_cell_bwd_kernel": {"spill_bytes": 0, "local_ops": 0},
}
