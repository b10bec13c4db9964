"""Fused recurrent layers in Triton: the whole time loop of one LSTM, GRU or Elman RNN (tanh / relu) layer, in one
or two directions, forward and backward, over padded or packed sequences.

Math (``fastseq.reference.lstm_layer`` / ``gru_layer`` / ``rnn_layer``, one layer). The caller has already done
the input side for every step and direction, ``gates_x = x·W_ihᵀ + b_ih`` (one large matmul, no recurrence in
it); the kernels run what is left, the recurrence. Per direction d and step t, with ``h`` the state the step
consumes (``h0`` at a sequence's first step) and ``G`` gates stacked in torch's order:

- LSTM (i, f, g, o): ``a = gates_x[t] + h·W_hhᵀ + b_hh``; ``c' = σ(a_f)·c + σ(a_i)·tanh(a_g)``;
  ``m = σ(a_o)·tanh(c')``; ``h' = m``, or ``h' = m·W_hrᵀ`` with a projection (``proj_size = P > 0``).
- GRU (r, z, n): ``r, z = σ(gx_rz + h·W_hh_rzᵀ + b_hh_rz)``; ``hn = h·W_hnᵀ + b_hn``;
  ``a_n = gx_n + r·hn``; ``n = tanh(a_n)``; ``h' = n + z·(h − n)`` (torch's rounding structure).
- RNN: ``h' = tanh or relu(gates_x[t] + h·W_hhᵀ + b_hh)``.

The forward direction runs t = 0…T−1, the reverse one t = T−1…0. Packed sequences (``batch_sizes``): at step
t only rows ``b < batch_sizes[t]`` advance, the others keep their state, so a sequence's final state is the
one after its own last step and the reverse direction of a sequence starts from ``h0`` at its last step.

Forward, one launch per layer. The grid is ``(D, ⌈B/BLOCK_B⌉)``: program ``(d, pb)`` owns a block of batch
rows of one direction and *all* hidden units, and loops over time by itself: a step needs only the previous
state of its own rows, so no program ever waits on another (which is also what lets the interpreter, which
runs programs one after another, run it). Per step it builds the gates ``BLOCK_H`` units of every gate at a
time (as the cell kernel does), reading ``h`` in ``BLOCK_K`` slices against ``W_hh``, adds ``gates_x[t]`` and
``b_hh`` and applies the update in registers. The state is float32 whatever the input dtype.

- On chip (``ON_CHIP``: ``H ≤ BLOCK_H`` and ``H_out ≤ BLOCK_K``, one chunk holds every unit): ``h`` and ``c``
  stay in registers for the whole sequence and the ``W_hh`` (and ``W_hr``) tiles are loaded once, before the
  time loop. Per step the only memory traffic is ``gates_x[t]`` in and ``out[t]`` (and, in training, the
  workspace) out.
- Otherwise ``h`` lives in a small float32 scratch ``(2, D, B, H_out)``, ping-ponged between steps (a step
  reads all of ``h`` while writing its chunks of ``h'``), ``c`` likewise ``(2, D, B, H)``; with a projection
  ``m`` goes through a scratch ``(D, B, H)`` too, because ``h' = m·W_hrᵀ`` needs every unit of ``m``. The
  phases of a step are separated by ``tl.debug_barrier()`` (``__syncthreads``: it makes the block's global
  writes visible to the whole block). The scratch, ``BLOCK_B·(2·H_out + 2·H)`` floats per program, stays in
  L2. ``W_hh`` is then re-read from L2 every step, ``G·H_out`` elements per program per step: for large ``H``
  at small ``B`` that traffic, not the arithmetic, bounds a step; splitting ``W_hh`` across programs that keep
  their slice on chip needs a grid-wide barrier per step, which is the CUDA extension's cooperative kernel,
  not this one.

In inference (``SAVE`` off) the gates never reach memory: only ``out``, ``h_n`` and ``c_n`` are written. In
training the program also writes a float32 workspace row per (direction, row, step), which the backward and
the caller's weight gradients read (the layout is part of the contract, see :func:`workspace_layout`):

- LSTM: ``[a_i, a_f, a_g, a_o, c', c, m (only when P > 0), h]``: width ``6H (+H) + H_out``
- GRU:  ``[a_r, a_z, a_n, hn, h]``: width ``5H``
- RNN:  ``[a, h]``: width ``2H``

with the pre-activations including every bias, and ``h`` the state the step consumed. Backward derives each
gate and its slope from the pre-activations (no cancellation in ``1 − y²`` or ``σ(1 − σ)`` near saturation).

Backward, one launch, same grid, each direction's steps in the reverse of its forward order, carrying ``dh``
(float32, ``H_out``) and, for LSTM, ``dc`` (float32, ``H``). Per step: ``dh += grad_out[t]`` (that total is
written for LSTM with a projection, where the caller needs it for ``dW_hr``, and ``dm = dh·W_hr``); the
pointwise gate gradients from the workspace, written to ``dgates_x`` (and ``dgates_h``, which differs for
GRU's n gate: ``dn·r``); ``dc ← dc_total·f``; then ``dh ← dgates_h·W_hh`` (+ GRU's direct ``dh·z``). On chip
both products use register tiles loaded once; otherwise the gate gradients are read back, as ``W_hh``'s
``BLOCK_K`` column slices need every gate of their rows (a barrier between the two phases), and ``dh``/``dc``
ping-pong in a float32 scratch like the forward's state. The weight gradients, large products over all rows,
are the caller's (``dW_hh = dgates_hᵀ·h_prev``, ``dW_hr = dh_totalᵀ·m``, from the workspace).

Blocks (:func:`blocks`): ``BLOCK_H = BLOCK_K = 32``; on the GPU 16 rows per program and 8 warps, the largest
tile that keeps every specialisation's registers without more than a few spilled words.

Precision: ``tl.dot`` gets operands in the input dtype (tensor cores for float16/bfloat16; float32 in IEEE
mode unless torch allows TF32 matmuls), accumulation, state and pointwise math are float32. Under the Triton
interpreter bfloat16 operands are upcast right after loading (its bfloat16 arithmetic is wrong) and bfloat16
stores are rounded to nearest. Any size works: every load and store is masked, nothing needs a multiple of 16.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .rnn_cell import (_dot_config, _gate_bias, _gates_mm, _interpreting, _load_f32, _load_tile, _mm, _sigmoid,
                       _sigmoid_and_grad, _store_tile, _tanh, _tanh_grad)

# ---------------------------------------------------------------------------------------------------------
# Time steps and rows
# ---------------------------------------------------------------------------------------------------------


@triton.jit
def _step(s, T, d, B, bs_ptr, off_ptr, PACKED: tl.constexpr, BACKWARD: tl.constexpr):
    """Loop iteration ``s`` of direction ``d``: its time index (forward t = s, reverse t = T−1−s; backward runs
    each direction the other way), the first row of step t in the row-major outputs (``t·B``, or packed
    ``offsets[t]``; int64: workspaces pass 2³¹ elements) and how many rows advance at t (``batch_sizes[t]``)."""
    if BACKWARD:
        t = (T - 1 - s) + d * (2 * s - (T - 1))
    else:
        t = s + d * (T - 1 - 2 * s)
    if PACKED:
        n = tl.load(bs_ptr + t).to(tl.int32)
        row0 = tl.load(off_ptr + t)
    else:
        n = B
        row0 = t.to(tl.int64) * B
    return t, row0, n


@triton.jit
def _seq_base(t, row0, s_t, s_b, PACKED: tl.constexpr):
    """Offset of step t's first row in a caller's sequence tensor: (T, B, ·) with any strides, or packed data
    (N, ·) whose row stride is ``s_b``."""
    if PACKED:
        return row0 * s_b
    else:
        return t.to(tl.int64) * s_t


@triton.jit
def _load_seq(ptr_t, rb, cols, s_b, s_c, n, n_cols):
    """Rows ``rb < n`` of step t of a caller's sequence tensor (``ptr_t`` from ``_seq_base``), float32. The row
    offsets are int64: in a batch-first view (B, T, ·) seen as (T, B, ·) the batch stride is T times a row."""
    return _load_f32(ptr_t, rb.to(tl.int64), cols, s_b, s_c, n, n_cols)


@triton.jit
def _copy_rows(dst_ptr, s_db, s_dk, src_ptr, s_sb, s_sk, rb, B, K, BLOCK_K: tl.constexpr):
    """``dst[rb, :K] = src[rb, :K]`` for rows below ``B``, converting dtype, in ``BLOCK_K`` column slices."""
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        _store_tile(dst_ptr, _load_f32(src_ptr, rb, rk, s_sb, s_sk, B, K), rb, rk, s_db, s_dk, B, K)


@triton.jit
def _gate_input(gx_t, gate, H, rb, rj, s_gb, s_gc, n, b_ptr, s_b, HAS_BIAS: tl.constexpr):
    """``gates_x[t, rb, gate·H + rj] (+ b_hh[gate·H + rj])``: the part of a pre-activation that does not
    depend on ``h``, the starting accumulator of the gate's product with ``h``. Zero past the last unit and
    on rows that do not advance."""
    a = _load_seq(gx_t + gate * H * s_gc, rb, rj, s_gb, s_gc, n, H)
    if HAS_BIAS:
        a += _gate_bias(b_ptr, gate, H, rj, s_b)
    return a


@triton.jit
def _advance_hidden(h_src, h_dst, h_new, out_t, s_out, ws_h, W, rb, rk, n, B, HO, SAVE: tl.constexpr):
    """Commit one slice of ``h'`` (multi-chunk path): rows that advance take ``h_new``, the others keep ``h``;
    ``out[t]`` gets ``h_new``, the workspace the consumed ``h``."""
    h = _load_f32(h_src, rb, rk, HO, 1, B, HO)
    _store_tile(h_dst, tl.where((rb < n)[:, None], h_new, h), rb, rk, HO, 1, B, HO)
    _store_tile(out_t, h_new, rb, rk, s_out, 1, n, HO)
    if SAVE:
        _store_tile(ws_h, h, rb, rk, W, 1, n, HO)


# ---------------------------------------------------------------------------------------------------------
# Pointwise math: the update (forward) and the gate gradients from the workspace (backward)
# ---------------------------------------------------------------------------------------------------------


@triton.jit
def _lstm_update(a_i, a_f, a_g, a_o, c):
    """``c' = f·c + i·g`` and ``m = o·tanh(c')`` from the four pre-activations."""
    c_new = _sigmoid(a_f) * c + _sigmoid(a_i) * _tanh(a_g)
    return c_new, _sigmoid(a_o) * _tanh(c_new)


@triton.jit
def _gru_update(a_r, a_z, gx_n, hn, h):
    """``a_n = gx_n + r·hn`` and ``h' = n + z·(h − n)``, written as torch's kernels write it: where the terms
    nearly cancel, the same rounding structure keeps the error where torch's is."""
    a_n = gx_n + _sigmoid(a_r) * hn
    n = _tanh(a_n)
    return a_n, n + _sigmoid(a_z) * (h - n)


@triton.jit
def _rnn_activation(a, RELU: tl.constexpr):
    if RELU:
        return tl.where(a < 0.0, 0.0, a)  # not tl.maximum: NaN must propagate as in torch.relu
    else:
        return _tanh(a)


@triton.jit
def _lstm_save(ws_t, a_i, a_f, a_g, a_o, c_new, c, m, rb, rj, n, H, W, HAS_PROJ: tl.constexpr):
    """The workspace columns of one chunk of units: pre-activations, c', c and (with a projection) m."""
    _store_tile(ws_t + 0 * H, a_i, rb, rj, W, 1, n, H)
    _store_tile(ws_t + 1 * H, a_f, rb, rj, W, 1, n, H)
    _store_tile(ws_t + 2 * H, a_g, rb, rj, W, 1, n, H)
    _store_tile(ws_t + 3 * H, a_o, rb, rj, W, 1, n, H)
    _store_tile(ws_t + 4 * H, c_new, rb, rj, W, 1, n, H)
    _store_tile(ws_t + 5 * H, c, rb, rj, W, 1, n, H)
    if HAS_PROJ:
        _store_tile(ws_t + 6 * H, m, rb, rj, W, 1, n, H)


@triton.jit
def _lstm_gate_grads(ws_t, rb, rj, n, H, W, dm, dc):
    """Pre-activation gradients of i, f, g, o for one chunk from the workspace, given dL/dm and the carried
    dL/dc'; and dL/dc for the step before. Slopes come from the pre-activations (see ``_sigmoid_and_grad``)."""
    i, di = _sigmoid_and_grad(_load_f32(ws_t + 0 * H, rb, rj, W, 1, n, H))
    f, df = _sigmoid_and_grad(_load_f32(ws_t + 1 * H, rb, rj, W, 1, n, H))
    a_g = _load_f32(ws_t + 2 * H, rb, rj, W, 1, n, H)
    o, do = _sigmoid_and_grad(_load_f32(ws_t + 3 * H, rb, rj, W, 1, n, H))
    c_new = _load_f32(ws_t + 4 * H, rb, rj, W, 1, n, H)
    c = _load_f32(ws_t + 5 * H, rb, rj, W, 1, n, H)
    dct = dc + dm * o * _tanh_grad(c_new)  # total dL/dc'
    da_i = dct * _tanh(a_g) * di
    da_f = dct * c * df
    da_g = dct * i * _tanh_grad(a_g)
    da_o = dm * _tanh(c_new) * do
    return da_i, da_f, da_g, da_o, dct * f


@triton.jit
def _gru_gate_grads(ws_t, rb, rj, n, H, dh):
    """Gate gradients of one GRU chunk from the workspace: r, z, n on the input side, n·r on the hidden side,
    and z (the direct path h' = … + z·h)."""
    W = 5 * H
    r, dr = _sigmoid_and_grad(_load_f32(ws_t + 0 * H, rb, rj, W, 1, n, H))
    a_z = _load_f32(ws_t + 1 * H, rb, rj, W, 1, n, H)
    z, dz = _sigmoid_and_grad(a_z)
    a_n = _load_f32(ws_t + 2 * H, rb, rj, W, 1, n, H)
    hn = _load_f32(ws_t + 3 * H, rb, rj, W, 1, n, H)
    h = _load_f32(ws_t + 4 * H, rb, rj, W, 1, n, H)
    da_n = dh * _sigmoid(-a_z) * _tanh_grad(a_n)  # 1 − z = σ(−a_z), without cancellation
    da_r = da_n * hn * dr
    da_z = dh * (h - _tanh(a_n)) * dz
    return da_r, da_z, da_n, da_n * r, z


@triton.jit
def _rnn_gate_grad(ws_t, rb, rj, n, H, dh, RELU: tl.constexpr):
    a = _load_f32(ws_t, rb, rj, 2 * H, 1, n, H)
    if RELU:
        return tl.where(a > 0.0, dh, 0.0)  # torch's threshold_backward: no gradient at 0 or NaN
    else:
        return dh * _tanh_grad(a)


@triton.jit
def _carried_plus_output(dh_src, go_t, rb, rk, n, HO, s_ob, s_oc):
    """dL/dh of step t's output: the gradient carried from step t+1 plus ``grad_out[t]`` (multi-chunk path)."""
    return _load_f32(dh_src, rb, rk, HO, 1, n, HO) + _load_seq(go_t, rb, rk, s_ob, s_oc, n, HO)


# ---------------------------------------------------------------------------------------------------------
# Forward kernels
# ---------------------------------------------------------------------------------------------------------


@triton.jit
def lstm_seq_fwd_kernel(
    gx_ptr, h0_ptr, c0_ptr, w_hh_ptr, b_hh_ptr, w_hr_ptr, bs_ptr, off_ptr,
    out_ptr, hn_ptr, cn_ptr, ws_ptr, h_scr_ptr, c_scr_ptr, m_scr_ptr,
    T, B, H, HO, N_ROWS,
    s_gt, s_gb, s_gc, s_hd, s_hb, s_hk, s_cd, s_cb, s_ck, s_wd, s_wr, s_wc, s_bd, s_bc, s_rd, s_rr, s_rc,
    PACKED: tl.constexpr, SAVE: tl.constexpr, ON_CHIP: tl.constexpr, HAS_B_HH: tl.constexpr,
    HAS_PROJ: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
):
    d = tl.program_id(0)
    D = tl.num_programs(0)
    rb = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    G = 4 * H
    W = 6 * H + HO
    if HAS_PROJ:
        W = W + H
    s_out = D * HO
    gx_ptr += d * G * s_gc
    h0_ptr += d * s_hd
    c0_ptr += d * s_cd
    w_hh_ptr += d * s_wd
    b_hh_ptr += d * s_bd
    w_hr_ptr += d * s_rd
    out_ptr += d * HO
    hn_ptr += d * B * HO
    cn_ptr += d * B * H
    ws_ptr += d.to(tl.int64) * N_ROWS * W
    if ON_CHIP:  # every unit in one chunk: state in registers, W_hh (and W_hr) loaded once
        tl.static_assert(BLOCK_H == BLOCK_K)
        rj = tl.arange(0, BLOCK_H)  # the hidden units, and the units of h as well
        h = _load_f32(h0_ptr, rb, rj, s_hb, s_hk, B, HO)
        c = _load_f32(c0_ptr, rb, rj, s_cb, s_ck, B, H)
        # W_hh[g·H + j, k] as (k, j) tiles, zero past the last unit so that padding units stay exactly 0.
        w_i = _load_tile(w_hh_ptr + 0 * H * s_wr, rj, rj, s_wc, s_wr, HO, H).to(DOT_DTYPE)
        w_f = _load_tile(w_hh_ptr + 1 * H * s_wr, rj, rj, s_wc, s_wr, HO, H).to(DOT_DTYPE)
        w_g = _load_tile(w_hh_ptr + 2 * H * s_wr, rj, rj, s_wc, s_wr, HO, H).to(DOT_DTYPE)
        w_o = _load_tile(w_hh_ptr + 3 * H * s_wr, rj, rj, s_wc, s_wr, HO, H).to(DOT_DTYPE)
        if HAS_PROJ:
            w_r = _load_tile(w_hr_ptr, rj, rj, s_rc, s_rr, H, HO).to(DOT_DTYPE)  # W_hr[p, j] as (j, p)
        for s in range(T):
            t, row0, n = _step(s, T, d, B, bs_ptr, off_ptr, PACKED, False)
            gx_t = gx_ptr + _seq_base(t, row0, s_gt, s_gb, PACKED)
            a_i = _mm(_gate_input(gx_t, 0, H, rb, rj, s_gb, s_gc, n, b_hh_ptr, s_bc, HAS_B_HH), h, w_i,
                      DOT_DTYPE, PRECISION)
            a_f = _mm(_gate_input(gx_t, 1, H, rb, rj, s_gb, s_gc, n, b_hh_ptr, s_bc, HAS_B_HH), h, w_f,
                      DOT_DTYPE, PRECISION)
            a_g = _mm(_gate_input(gx_t, 2, H, rb, rj, s_gb, s_gc, n, b_hh_ptr, s_bc, HAS_B_HH), h, w_g,
                      DOT_DTYPE, PRECISION)
            a_o = _mm(_gate_input(gx_t, 3, H, rb, rj, s_gb, s_gc, n, b_hh_ptr, s_bc, HAS_B_HH), h, w_o,
                      DOT_DTYPE, PRECISION)
            c_new, m = _lstm_update(a_i, a_f, a_g, a_o, c)
            if HAS_PROJ:
                h_new = _mm(tl.zeros((BLOCK_B, BLOCK_K), tl.float32), m, w_r, DOT_DTYPE, PRECISION)
            else:
                h_new = m
            _store_tile(out_ptr + row0 * s_out, h_new, rb, rj, s_out, 1, n, HO)
            if SAVE:
                ws_t = ws_ptr + row0 * W
                _lstm_save(ws_t, a_i, a_f, a_g, a_o, c_new, c, m, rb, rj, n, H, W, HAS_PROJ)
                _store_tile(ws_t + (W - HO), h, rb, rj, W, 1, n, HO)
            active = (rb < n)[:, None]
            h = tl.where(active, h_new, h)
            c = tl.where(active, c_new, c)
        _store_tile(hn_ptr, h, rb, rj, HO, 1, B, HO)
        _store_tile(cn_ptr, c, rb, rj, H, 1, B, H)
    else:  # state in a float32 scratch (ping-pong); W_hh re-read every step
        h_buf = D * B * HO  # elements between the two h buffers
        c_buf = D * B * H
        h_scr_ptr += d * B * HO
        c_scr_ptr += d * B * H
        m_scr_ptr += d * B * H
        _copy_rows(h_scr_ptr, HO, 1, h0_ptr, s_hb, s_hk, rb, B, HO, BLOCK_K)
        _copy_rows(c_scr_ptr, H, 1, c0_ptr, s_cb, s_ck, rb, B, H, BLOCK_H)
        tl.debug_barrier()
        for s in range(T):
            t, row0, n = _step(s, T, d, B, bs_ptr, off_ptr, PACKED, False)
            gx_t = gx_ptr + _seq_base(t, row0, s_gt, s_gb, PACKED)
            out_t = out_ptr + row0 * s_out
            ws_t = ws_ptr + row0 * W
            h_src = h_scr_ptr + (s % 2) * h_buf
            h_dst = h_scr_ptr + ((s + 1) % 2) * h_buf
            c_src = c_scr_ptr + (s % 2) * c_buf
            c_dst = c_scr_ptr + ((s + 1) % 2) * c_buf
            for j0 in range(0, H, BLOCK_H):
                rj = j0 + tl.arange(0, BLOCK_H)
                a_i = _gate_input(gx_t, 0, H, rb, rj, s_gb, s_gc, n, b_hh_ptr, s_bc, HAS_B_HH)
                a_f = _gate_input(gx_t, 1, H, rb, rj, s_gb, s_gc, n, b_hh_ptr, s_bc, HAS_B_HH)
                a_g = _gate_input(gx_t, 2, H, rb, rj, s_gb, s_gc, n, b_hh_ptr, s_bc, HAS_B_HH)
                a_o = _gate_input(gx_t, 3, H, rb, rj, s_gb, s_gc, n, b_hh_ptr, s_bc, HAS_B_HH)
                a_i, a_f, a_g, a_o = _gates_mm(a_i, a_f, a_g, a_o, h_src, HO, 1, w_hh_ptr, s_wr, s_wc, rb, rj, n,
                                               HO, H, 4, DOT_DTYPE, PRECISION, BLOCK_K)
                c = _load_f32(c_src, rb, rj, H, 1, B, H)
                c_new, m = _lstm_update(a_i, a_f, a_g, a_o, c)
                _store_tile(c_dst, tl.where((rb < n)[:, None], c_new, c), rb, rj, H, 1, B, H)
                if SAVE:
                    _lstm_save(ws_t, a_i, a_f, a_g, a_o, c_new, c, m, rb, rj, n, H, W, HAS_PROJ)
                if HAS_PROJ:
                    _store_tile(m_scr_ptr, m, rb, rj, H, 1, B, H)
                else:
                    _advance_hidden(h_src, h_dst, m, out_t, s_out, ws_t + (W - HO), W, rb, rj, n, B, HO, SAVE)
            if HAS_PROJ:
                tl.debug_barrier()  # every slice of h' = m·W_hrᵀ reads every unit of m
                for k0 in range(0, HO, BLOCK_K):
                    rk = k0 + tl.arange(0, BLOCK_K)
                    acc = tl.zeros((BLOCK_B, BLOCK_K), tl.float32)
                    acc, _, _, _ = _gates_mm(acc, acc, acc, acc, m_scr_ptr, H, 1, w_hr_ptr, s_rr, s_rc, rb, rk, n,
                                             H, HO, 1, DOT_DTYPE, PRECISION, BLOCK_H)
                    _advance_hidden(h_src, h_dst, acc, out_t, s_out, ws_t + (W - HO), W, rb, rk, n, B, HO, SAVE)
            tl.debug_barrier()  # the next step reads every unit of h'
        _copy_rows(hn_ptr, HO, 1, h_scr_ptr + (T % 2) * h_buf, HO, 1, rb, B, HO, BLOCK_K)
        _copy_rows(cn_ptr, H, 1, c_scr_ptr + (T % 2) * c_buf, H, 1, rb, B, H, BLOCK_H)


@triton.jit
def gru_seq_fwd_kernel(
    gx_ptr, h0_ptr, w_hh_ptr, b_hh_ptr, bs_ptr, off_ptr, out_ptr, hn_ptr, ws_ptr, h_scr_ptr,
    T, B, H, N_ROWS,
    s_gt, s_gb, s_gc, s_hd, s_hb, s_hk, s_wd, s_wr, s_wc, s_bd, s_bc,
    PACKED: tl.constexpr, SAVE: tl.constexpr, ON_CHIP: tl.constexpr, HAS_B_HH: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
):
    d = tl.program_id(0)
    D = tl.num_programs(0)
    rb = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    W = 5 * H
    s_out = D * H
    gx_ptr += d * 3 * H * s_gc
    h0_ptr += d * s_hd
    w_hh_ptr += d * s_wd
    b_hh_ptr += d * s_bd
    out_ptr += d * H
    hn_ptr += d * B * H
    ws_ptr += d.to(tl.int64) * N_ROWS * W
    if ON_CHIP:
        tl.static_assert(BLOCK_H == BLOCK_K)
        rj = tl.arange(0, BLOCK_H)
        h = _load_f32(h0_ptr, rb, rj, s_hb, s_hk, B, H)
        w_r = _load_tile(w_hh_ptr + 0 * H * s_wr, rj, rj, s_wc, s_wr, H, H).to(DOT_DTYPE)
        w_z = _load_tile(w_hh_ptr + 1 * H * s_wr, rj, rj, s_wc, s_wr, H, H).to(DOT_DTYPE)
        w_n = _load_tile(w_hh_ptr + 2 * H * s_wr, rj, rj, s_wc, s_wr, H, H).to(DOT_DTYPE)
        for s in range(T):
            t, row0, n = _step(s, T, d, B, bs_ptr, off_ptr, PACKED, False)
            gx_t = gx_ptr + _seq_base(t, row0, s_gt, s_gb, PACKED)
            a_r = _mm(_gate_input(gx_t, 0, H, rb, rj, s_gb, s_gc, n, b_hh_ptr, s_bc, HAS_B_HH), h, w_r,
                      DOT_DTYPE, PRECISION)
            a_z = _mm(_gate_input(gx_t, 1, H, rb, rj, s_gb, s_gc, n, b_hh_ptr, s_bc, HAS_B_HH), h, w_z,
                      DOT_DTYPE, PRECISION)
            hn = tl.zeros((BLOCK_B, BLOCK_H), tl.float32)
            if HAS_B_HH:
                hn += _gate_bias(b_hh_ptr, 2, H, rj, s_bc)
            hn = _mm(hn, h, w_n, DOT_DTYPE, PRECISION)
            gx_n = _gate_input(gx_t, 2, H, rb, rj, s_gb, s_gc, n, b_hh_ptr, s_bc, False)
            a_n, h_new = _gru_update(a_r, a_z, gx_n, hn, h)
            _store_tile(out_ptr + row0 * s_out, h_new, rb, rj, s_out, 1, n, H)
            if SAVE:
                ws_t = ws_ptr + row0 * W
                _store_tile(ws_t + 0 * H, a_r, rb, rj, W, 1, n, H)
                _store_tile(ws_t + 1 * H, a_z, rb, rj, W, 1, n, H)
                _store_tile(ws_t + 2 * H, a_n, rb, rj, W, 1, n, H)
                _store_tile(ws_t + 3 * H, hn, rb, rj, W, 1, n, H)
                _store_tile(ws_t + 4 * H, h, rb, rj, W, 1, n, H)
            h = tl.where((rb < n)[:, None], h_new, h)
        _store_tile(hn_ptr, h, rb, rj, H, 1, B, H)
    else:
        h_buf = D * B * H
        h_scr_ptr += d * B * H
        _copy_rows(h_scr_ptr, H, 1, h0_ptr, s_hb, s_hk, rb, B, H, BLOCK_K)
        tl.debug_barrier()
        for s in range(T):
            t, row0, n = _step(s, T, d, B, bs_ptr, off_ptr, PACKED, False)
            gx_t = gx_ptr + _seq_base(t, row0, s_gt, s_gb, PACKED)
            ws_t = ws_ptr + row0 * W
            h_src = h_scr_ptr + (s % 2) * h_buf
            h_dst = h_scr_ptr + ((s + 1) % 2) * h_buf
            for j0 in range(0, H, BLOCK_H):
                rj = j0 + tl.arange(0, BLOCK_H)
                a_r = _gate_input(gx_t, 0, H, rb, rj, s_gb, s_gc, n, b_hh_ptr, s_bc, HAS_B_HH)
                a_z = _gate_input(gx_t, 1, H, rb, rj, s_gb, s_gc, n, b_hh_ptr, s_bc, HAS_B_HH)
                hn = tl.zeros((BLOCK_B, BLOCK_H), tl.float32)  # W_hn·h + b_hn: the reset gate scales all of it
                if HAS_B_HH:
                    hn += _gate_bias(b_hh_ptr, 2, H, rj, s_bc)
                a_r, a_z, hn, _ = _gates_mm(a_r, a_z, hn, hn, h_src, H, 1, w_hh_ptr, s_wr, s_wc, rb, rj, n, H, H, 3,
                                            DOT_DTYPE, PRECISION, BLOCK_K)
                gx_n = _gate_input(gx_t, 2, H, rb, rj, s_gb, s_gc, n, b_hh_ptr, s_bc, False)
                h = _load_f32(h_src, rb, rj, H, 1, B, H)
                a_n, h_new = _gru_update(a_r, a_z, gx_n, hn, h)
                _advance_hidden(h_src, h_dst, h_new, out_ptr + row0 * s_out, s_out, ws_t + 4 * H, W, rb, rj, n, B,
                                H, SAVE)
                if SAVE:
                    _store_tile(ws_t + 0 * H, a_r, rb, rj, W, 1, n, H)
                    _store_tile(ws_t + 1 * H, a_z, rb, rj, W, 1, n, H)
                    _store_tile(ws_t + 2 * H, a_n, rb, rj, W, 1, n, H)
                    _store_tile(ws_t + 3 * H, hn, rb, rj, W, 1, n, H)
            tl.debug_barrier()  # the next step reads every unit of h'
        _copy_rows(hn_ptr, H, 1, h_scr_ptr + (T % 2) * h_buf, H, 1, rb, B, H, BLOCK_K)


@triton.jit
def rnn_seq_fwd_kernel(
    gx_ptr, h0_ptr, w_hh_ptr, b_hh_ptr, bs_ptr, off_ptr, out_ptr, hn_ptr, ws_ptr, h_scr_ptr,
    T, B, H, N_ROWS,
    s_gt, s_gb, s_gc, s_hd, s_hb, s_hk, s_wd, s_wr, s_wc, s_bd, s_bc,
    PACKED: tl.constexpr, SAVE: tl.constexpr, ON_CHIP: tl.constexpr, HAS_B_HH: tl.constexpr,
    RELU: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
):
    d = tl.program_id(0)
    D = tl.num_programs(0)
    rb = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    W = 2 * H
    s_out = D * H
    gx_ptr += d * H * s_gc
    h0_ptr += d * s_hd
    w_hh_ptr += d * s_wd
    b_hh_ptr += d * s_bd
    out_ptr += d * H
    hn_ptr += d * B * H
    ws_ptr += d.to(tl.int64) * N_ROWS * W
    if ON_CHIP:
        tl.static_assert(BLOCK_H == BLOCK_K)
        rj = tl.arange(0, BLOCK_H)
        h = _load_f32(h0_ptr, rb, rj, s_hb, s_hk, B, H)
        w = _load_tile(w_hh_ptr, rj, rj, s_wc, s_wr, H, H).to(DOT_DTYPE)
        for s in range(T):
            t, row0, n = _step(s, T, d, B, bs_ptr, off_ptr, PACKED, False)
            gx_t = gx_ptr + _seq_base(t, row0, s_gt, s_gb, PACKED)
            a = _mm(_gate_input(gx_t, 0, H, rb, rj, s_gb, s_gc, n, b_hh_ptr, s_bc, HAS_B_HH), h, w,
                    DOT_DTYPE, PRECISION)
            h_new = _rnn_activation(a, RELU)
            _store_tile(out_ptr + row0 * s_out, h_new, rb, rj, s_out, 1, n, H)
            if SAVE:
                ws_t = ws_ptr + row0 * W
                _store_tile(ws_t, a, rb, rj, W, 1, n, H)
                _store_tile(ws_t + H, h, rb, rj, W, 1, n, H)
            h = tl.where((rb < n)[:, None], h_new, h)
        _store_tile(hn_ptr, h, rb, rj, H, 1, B, H)
    else:
        h_buf = D * B * H
        h_scr_ptr += d * B * H
        _copy_rows(h_scr_ptr, H, 1, h0_ptr, s_hb, s_hk, rb, B, H, BLOCK_K)
        tl.debug_barrier()
        for s in range(T):
            t, row0, n = _step(s, T, d, B, bs_ptr, off_ptr, PACKED, False)
            gx_t = gx_ptr + _seq_base(t, row0, s_gt, s_gb, PACKED)
            ws_t = ws_ptr + row0 * W
            h_src = h_scr_ptr + (s % 2) * h_buf
            h_dst = h_scr_ptr + ((s + 1) % 2) * h_buf
            for j0 in range(0, H, BLOCK_H):
                rj = j0 + tl.arange(0, BLOCK_H)
                a = _gate_input(gx_t, 0, H, rb, rj, s_gb, s_gc, n, b_hh_ptr, s_bc, HAS_B_HH)
                a, _, _, _ = _gates_mm(a, a, a, a, h_src, H, 1, w_hh_ptr, s_wr, s_wc, rb, rj, n, H, H, 1,
                                       DOT_DTYPE, PRECISION, BLOCK_K)
                _advance_hidden(h_src, h_dst, _rnn_activation(a, RELU), out_ptr + row0 * s_out, s_out, ws_t + H, W,
                                rb, rj, n, B, H, SAVE)
                if SAVE:
                    _store_tile(ws_t, a, rb, rj, W, 1, n, H)
            tl.debug_barrier()  # the next step reads every unit of h'
        _copy_rows(hn_ptr, H, 1, h_scr_ptr + (T % 2) * h_buf, H, 1, rb, B, H, BLOCK_K)


# ---------------------------------------------------------------------------------------------------------
# Backward kernels
# ---------------------------------------------------------------------------------------------------------


@triton.jit
def lstm_seq_bwd_kernel(
    go_ptr, ghn_ptr, gcn_ptr, ws_ptr, w_hh_ptr, w_hr_ptr, bs_ptr, off_ptr,
    dg_ptr, dh0_ptr, dc0_ptr, dht_ptr, dh_scr_ptr, dc_scr_ptr,
    T, B, H, HO, N_ROWS,
    s_ot, s_ob, s_oc, s_hd, s_hb, s_hk, s_cd, s_cb, s_ck, s_wd, s_wr, s_wc, s_rd, s_rr, s_rc,
    PACKED: tl.constexpr, ON_CHIP: tl.constexpr, HAS_PROJ: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
):
    d = tl.program_id(0)
    D = tl.num_programs(0)
    rb = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    G = 4 * H
    W = 6 * H + HO
    if HAS_PROJ:
        W = W + H
    s_dg = D * G
    go_ptr += d * HO * s_oc
    ghn_ptr += d * s_hd
    gcn_ptr += d * s_cd
    w_hh_ptr += d * s_wd
    w_hr_ptr += d * s_rd
    dg_ptr += d * G
    dh0_ptr += d * B * HO
    dc0_ptr += d * B * H
    ws_ptr += d.to(tl.int64) * N_ROWS * W
    dht_ptr += d.to(tl.int64) * N_ROWS * HO
    if ON_CHIP:
        tl.static_assert(BLOCK_H == BLOCK_K)
        rj = tl.arange(0, BLOCK_H)
        dh = _load_f32(ghn_ptr, rb, rj, s_hb, s_hk, B, HO)
        dc = _load_f32(gcn_ptr, rb, rj, s_cb, s_ck, B, H)
        # W_hh[g·H + j, k] as (j, k) tiles: dh_prev = Σ_g da_g · W_g.
        w_i = _load_tile(w_hh_ptr + 0 * H * s_wr, rj, rj, s_wr, s_wc, H, HO).to(DOT_DTYPE)
        w_f = _load_tile(w_hh_ptr + 1 * H * s_wr, rj, rj, s_wr, s_wc, H, HO).to(DOT_DTYPE)
        w_g = _load_tile(w_hh_ptr + 2 * H * s_wr, rj, rj, s_wr, s_wc, H, HO).to(DOT_DTYPE)
        w_o = _load_tile(w_hh_ptr + 3 * H * s_wr, rj, rj, s_wr, s_wc, H, HO).to(DOT_DTYPE)
        if HAS_PROJ:
            w_r = _load_tile(w_hr_ptr, rj, rj, s_rr, s_rc, HO, H).to(DOT_DTYPE)  # W_hr[p, j] as (p, j)
        for s in range(T):
            t, row0, n = _step(s, T, d, B, bs_ptr, off_ptr, PACKED, True)
            dh_t = dh + _load_seq(go_ptr + _seq_base(t, row0, s_ot, s_ob, PACKED), rb, rj, s_ob, s_oc, n, HO)
            if HAS_PROJ:
                _store_tile(dht_ptr + row0 * HO, dh_t, rb, rj, HO, 1, n, HO)
                dm = _mm(tl.zeros((BLOCK_B, BLOCK_H), tl.float32), dh_t, w_r, DOT_DTYPE, PRECISION)
            else:
                dm = dh_t
            da_i, da_f, da_g, da_o, dc_prev = _lstm_gate_grads(ws_ptr + row0 * W, rb, rj, n, H, W, dm, dc)
            dg_t = dg_ptr + row0 * s_dg
            _store_tile(dg_t + 0 * H, da_i, rb, rj, s_dg, 1, n, H)
            _store_tile(dg_t + 1 * H, da_f, rb, rj, s_dg, 1, n, H)
            _store_tile(dg_t + 2 * H, da_g, rb, rj, s_dg, 1, n, H)
            _store_tile(dg_t + 3 * H, da_o, rb, rj, s_dg, 1, n, H)
            dh_prev = _mm(tl.zeros((BLOCK_B, BLOCK_K), tl.float32), da_i, w_i, DOT_DTYPE, PRECISION)
            dh_prev = _mm(dh_prev, da_f, w_f, DOT_DTYPE, PRECISION)
            dh_prev = _mm(dh_prev, da_g, w_g, DOT_DTYPE, PRECISION)
            dh_prev = _mm(dh_prev, da_o, w_o, DOT_DTYPE, PRECISION)
            active = (rb < n)[:, None]
            dh = tl.where(active, dh_prev, dh)
            dc = tl.where(active, dc_prev, dc)
        _store_tile(dh0_ptr, dh, rb, rj, HO, 1, B, HO)
        _store_tile(dc0_ptr, dc, rb, rj, H, 1, B, H)
    else:
        dh_buf = D * B * HO
        dc_buf = D * B * H
        dh_scr_ptr += d * B * HO
        dc_scr_ptr += d * B * H
        _copy_rows(dh_scr_ptr, HO, 1, ghn_ptr, s_hb, s_hk, rb, B, HO, BLOCK_K)
        _copy_rows(dc_scr_ptr, H, 1, gcn_ptr, s_cb, s_ck, rb, B, H, BLOCK_H)
        tl.debug_barrier()
        for s in range(T):
            t, row0, n = _step(s, T, d, B, bs_ptr, off_ptr, PACKED, True)
            go_t = go_ptr + _seq_base(t, row0, s_ot, s_ob, PACKED)
            ws_t = ws_ptr + row0 * W
            dg_t = dg_ptr + row0 * s_dg
            dh_src = dh_scr_ptr + (s % 2) * dh_buf
            dh_dst = dh_scr_ptr + ((s + 1) % 2) * dh_buf
            dc_src = dc_scr_ptr + (s % 2) * dc_buf
            dc_dst = dc_scr_ptr + ((s + 1) % 2) * dc_buf
            # Phase 1, per chunk of units: dL/dm, the gate gradients (written) and dL/dc.
            for j0 in range(0, H, BLOCK_H):
                rj = j0 + tl.arange(0, BLOCK_H)
                if HAS_PROJ:  # dm = (dh + grad_out[t]) · W_hr over the P units, in BLOCK_K slices
                    dm = tl.zeros((BLOCK_B, BLOCK_H), tl.float32)
                    for p0 in range(0, HO, BLOCK_K):
                        rp = p0 + tl.arange(0, BLOCK_K)
                        dm = _mm(dm, _carried_plus_output(dh_src, go_t, rb, rp, n, HO, s_ob, s_oc),
                                 _load_tile(w_hr_ptr, rp, rj, s_rr, s_rc, HO, H), DOT_DTYPE, PRECISION)
                else:
                    dm = _carried_plus_output(dh_src, go_t, rb, rj, n, HO, s_ob, s_oc)
                dc = _load_f32(dc_src, rb, rj, H, 1, B, H)
                da_i, da_f, da_g, da_o, dc_prev = _lstm_gate_grads(ws_t, rb, rj, n, H, W, dm, dc)
                _store_tile(dg_t + 0 * H, da_i, rb, rj, s_dg, 1, n, H)
                _store_tile(dg_t + 1 * H, da_f, rb, rj, s_dg, 1, n, H)
                _store_tile(dg_t + 2 * H, da_g, rb, rj, s_dg, 1, n, H)
                _store_tile(dg_t + 3 * H, da_o, rb, rj, s_dg, 1, n, H)
                _store_tile(dc_dst, tl.where((rb < n)[:, None], dc_prev, dc), rb, rj, H, 1, B, H)
            if HAS_PROJ:
                for p0 in range(0, HO, BLOCK_K):
                    rp = p0 + tl.arange(0, BLOCK_K)
                    _store_tile(dht_ptr + row0 * HO, _carried_plus_output(dh_src, go_t, rb, rp, n, HO, s_ob, s_oc),
                                rb, rp, HO, 1, n, HO)
            tl.debug_barrier()  # phase 2 reads the gate gradients of every unit
            # Phase 2, per BLOCK_K slice of h: dh_prev = dgates · W_hh over all 4H gate rows.
            for k0 in range(0, HO, BLOCK_K):
                rk = k0 + tl.arange(0, BLOCK_K)
                acc = tl.zeros((BLOCK_B, BLOCK_K), tl.float32)
                acc, _, _, _ = _gates_mm(acc, acc, acc, acc, dg_t, s_dg, 1, w_hh_ptr, s_wc, s_wr, rb, rk, n, G, HO,
                                         1, DOT_DTYPE, PRECISION, BLOCK_H)
                dh = _load_f32(dh_src, rb, rk, HO, 1, B, HO)
                _store_tile(dh_dst, tl.where((rb < n)[:, None], acc, dh), rb, rk, HO, 1, B, HO)
            tl.debug_barrier()  # the next step reads every unit of dh
        _copy_rows(dh0_ptr, HO, 1, dh_scr_ptr + (T % 2) * dh_buf, HO, 1, rb, B, HO, BLOCK_K)
        _copy_rows(dc0_ptr, H, 1, dc_scr_ptr + (T % 2) * dc_buf, H, 1, rb, B, H, BLOCK_H)


@triton.jit
def gru_seq_bwd_kernel(
    go_ptr, ghn_ptr, ws_ptr, w_hh_ptr, bs_ptr, off_ptr, dgx_ptr, dgh_ptr, dh0_ptr, dh_scr_ptr,
    T, B, H, N_ROWS,
    s_ot, s_ob, s_oc, s_hd, s_hb, s_hk, s_wd, s_wr, s_wc,
    PACKED: tl.constexpr, ON_CHIP: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
):
    d = tl.program_id(0)
    D = tl.num_programs(0)
    rb = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    G = 3 * H
    W = 5 * H
    s_dg = D * G
    go_ptr += d * H * s_oc
    ghn_ptr += d * s_hd
    w_hh_ptr += d * s_wd
    dgx_ptr += d * G
    dgh_ptr += d * G
    dh0_ptr += d * B * H
    ws_ptr += d.to(tl.int64) * N_ROWS * W
    if ON_CHIP:
        tl.static_assert(BLOCK_H == BLOCK_K)
        rj = tl.arange(0, BLOCK_H)
        dh = _load_f32(ghn_ptr, rb, rj, s_hb, s_hk, B, H)
        w_r = _load_tile(w_hh_ptr + 0 * H * s_wr, rj, rj, s_wr, s_wc, H, H).to(DOT_DTYPE)
        w_z = _load_tile(w_hh_ptr + 1 * H * s_wr, rj, rj, s_wr, s_wc, H, H).to(DOT_DTYPE)
        w_n = _load_tile(w_hh_ptr + 2 * H * s_wr, rj, rj, s_wr, s_wc, H, H).to(DOT_DTYPE)
        for s in range(T):
            t, row0, n = _step(s, T, d, B, bs_ptr, off_ptr, PACKED, True)
            dh_t = dh + _load_seq(go_ptr + _seq_base(t, row0, s_ot, s_ob, PACKED), rb, rj, s_ob, s_oc, n, H)
            da_r, da_z, da_n, da_hn, z = _gru_gate_grads(ws_ptr + row0 * W, rb, rj, n, H, dh_t)
            dgx_t = dgx_ptr + row0 * s_dg
            dgh_t = dgh_ptr + row0 * s_dg
            _store_tile(dgx_t + 0 * H, da_r, rb, rj, s_dg, 1, n, H)
            _store_tile(dgx_t + 1 * H, da_z, rb, rj, s_dg, 1, n, H)
            _store_tile(dgx_t + 2 * H, da_n, rb, rj, s_dg, 1, n, H)
            _store_tile(dgh_t + 0 * H, da_r, rb, rj, s_dg, 1, n, H)
            _store_tile(dgh_t + 1 * H, da_z, rb, rj, s_dg, 1, n, H)
            _store_tile(dgh_t + 2 * H, da_hn, rb, rj, s_dg, 1, n, H)
            dh_prev = _mm(dh_t * z, da_r, w_r, DOT_DTYPE, PRECISION)
            dh_prev = _mm(dh_prev, da_z, w_z, DOT_DTYPE, PRECISION)
            dh_prev = _mm(dh_prev, da_hn, w_n, DOT_DTYPE, PRECISION)
            dh = tl.where((rb < n)[:, None], dh_prev, dh)
        _store_tile(dh0_ptr, dh, rb, rj, H, 1, B, H)
    else:
        dh_buf = D * B * H
        dh_scr_ptr += d * B * H
        _copy_rows(dh_scr_ptr, H, 1, ghn_ptr, s_hb, s_hk, rb, B, H, BLOCK_K)
        tl.debug_barrier()
        for s in range(T):
            t, row0, n = _step(s, T, d, B, bs_ptr, off_ptr, PACKED, True)
            go_t = go_ptr + _seq_base(t, row0, s_ot, s_ob, PACKED)
            ws_t = ws_ptr + row0 * W
            dgx_t = dgx_ptr + row0 * s_dg
            dgh_t = dgh_ptr + row0 * s_dg
            dh_src = dh_scr_ptr + (s % 2) * dh_buf
            dh_dst = dh_scr_ptr + ((s + 1) % 2) * dh_buf
            for j0 in range(0, H, BLOCK_H):
                rj = j0 + tl.arange(0, BLOCK_H)
                dh_t = _carried_plus_output(dh_src, go_t, rb, rj, n, H, s_ob, s_oc)
                da_r, da_z, da_n, da_hn, _ = _gru_gate_grads(ws_t, rb, rj, n, H, dh_t)
                _store_tile(dgx_t + 0 * H, da_r, rb, rj, s_dg, 1, n, H)
                _store_tile(dgx_t + 1 * H, da_z, rb, rj, s_dg, 1, n, H)
                _store_tile(dgx_t + 2 * H, da_n, rb, rj, s_dg, 1, n, H)
                _store_tile(dgh_t + 0 * H, da_r, rb, rj, s_dg, 1, n, H)
                _store_tile(dgh_t + 1 * H, da_z, rb, rj, s_dg, 1, n, H)
                _store_tile(dgh_t + 2 * H, da_hn, rb, rj, s_dg, 1, n, H)
            tl.debug_barrier()  # phase 2 reads the gate gradients of every unit
            for k0 in range(0, H, BLOCK_K):
                rk = k0 + tl.arange(0, BLOCK_K)
                # h' = … + z·h: the direct path adds dh·z on these units (z from its pre-activation).
                acc = _carried_plus_output(dh_src, go_t, rb, rk, n, H, s_ob, s_oc) * _sigmoid(
                    _load_f32(ws_t + 1 * H, rb, rk, W, 1, n, H))
                acc, _, _, _ = _gates_mm(acc, acc, acc, acc, dgh_t, s_dg, 1, w_hh_ptr, s_wc, s_wr, rb, rk, n, G, H,
                                         1, DOT_DTYPE, PRECISION, BLOCK_H)
                dh = _load_f32(dh_src, rb, rk, H, 1, B, H)
                _store_tile(dh_dst, tl.where((rb < n)[:, None], acc, dh), rb, rk, H, 1, B, H)
            tl.debug_barrier()  # the next step reads every unit of dh
        _copy_rows(dh0_ptr, H, 1, dh_scr_ptr + (T % 2) * dh_buf, H, 1, rb, B, H, BLOCK_K)


@triton.jit
def rnn_seq_bwd_kernel(
    go_ptr, ghn_ptr, ws_ptr, w_hh_ptr, bs_ptr, off_ptr, dg_ptr, dh0_ptr, dh_scr_ptr,
    T, B, H, N_ROWS,
    s_ot, s_ob, s_oc, s_hd, s_hb, s_hk, s_wd, s_wr, s_wc,
    PACKED: tl.constexpr, ON_CHIP: tl.constexpr, RELU: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
):
    d = tl.program_id(0)
    D = tl.num_programs(0)
    rb = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    W = 2 * H
    s_dg = D * H
    go_ptr += d * H * s_oc
    ghn_ptr += d * s_hd
    w_hh_ptr += d * s_wd
    dg_ptr += d * H
    dh0_ptr += d * B * H
    ws_ptr += d.to(tl.int64) * N_ROWS * W
    if ON_CHIP:
        tl.static_assert(BLOCK_H == BLOCK_K)
        rj = tl.arange(0, BLOCK_H)
        dh = _load_f32(ghn_ptr, rb, rj, s_hb, s_hk, B, H)
        w = _load_tile(w_hh_ptr, rj, rj, s_wr, s_wc, H, H).to(DOT_DTYPE)
        for s in range(T):
            t, row0, n = _step(s, T, d, B, bs_ptr, off_ptr, PACKED, True)
            dh_t = dh + _load_seq(go_ptr + _seq_base(t, row0, s_ot, s_ob, PACKED), rb, rj, s_ob, s_oc, n, H)
            da = _rnn_gate_grad(ws_ptr + row0 * W, rb, rj, n, H, dh_t, RELU)
            _store_tile(dg_ptr + row0 * s_dg, da, rb, rj, s_dg, 1, n, H)
            dh_prev = _mm(tl.zeros((BLOCK_B, BLOCK_K), tl.float32), da, w, DOT_DTYPE, PRECISION)
            dh = tl.where((rb < n)[:, None], dh_prev, dh)
        _store_tile(dh0_ptr, dh, rb, rj, H, 1, B, H)
    else:
        dh_buf = D * B * H
        dh_scr_ptr += d * B * H
        _copy_rows(dh_scr_ptr, H, 1, ghn_ptr, s_hb, s_hk, rb, B, H, BLOCK_K)
        tl.debug_barrier()
        for s in range(T):
            t, row0, n = _step(s, T, d, B, bs_ptr, off_ptr, PACKED, True)
            go_t = go_ptr + _seq_base(t, row0, s_ot, s_ob, PACKED)
            ws_t = ws_ptr + row0 * W
            dg_t = dg_ptr + row0 * s_dg
            dh_src = dh_scr_ptr + (s % 2) * dh_buf
            dh_dst = dh_scr_ptr + ((s + 1) % 2) * dh_buf
            for j0 in range(0, H, BLOCK_H):
                rj = j0 + tl.arange(0, BLOCK_H)
                dh_t = _carried_plus_output(dh_src, go_t, rb, rj, n, H, s_ob, s_oc)
                _store_tile(dg_t, _rnn_gate_grad(ws_t, rb, rj, n, H, dh_t, RELU), rb, rj, s_dg, 1, n, H)
            tl.debug_barrier()  # phase 2 reads the gate gradients of every unit
            for k0 in range(0, H, BLOCK_K):
                rk = k0 + tl.arange(0, BLOCK_K)
                acc = tl.zeros((BLOCK_B, BLOCK_K), tl.float32)
                acc, _, _, _ = _gates_mm(acc, acc, acc, acc, dg_t, s_dg, 1, w_hh_ptr, s_wc, s_wr, rb, rk, n, H, H,
                                         1, DOT_DTYPE, PRECISION, BLOCK_H)
                dh = _load_f32(dh_src, rb, rk, H, 1, B, H)
                _store_tile(dh_dst, tl.where((rb < n)[:, None], acc, dh), rb, rk, H, 1, B, H)
            tl.debug_barrier()  # the next step reads every unit of dh
        _copy_rows(dh0_ptr, H, 1, dh_scr_ptr + (T % 2) * dh_buf, H, 1, rb, B, H, BLOCK_K)


# ---------------------------------------------------------------------------------------------------------
# Launchers: tensors in, tensors out. They allocate outputs, pick blocks and launch; they check nothing a
# caller could get wrong (the operators validate before they get here).
# ---------------------------------------------------------------------------------------------------------

NUM_GATES = {"lstm": 4, "gru": 3, "rnn": 1}


def workspace_layout(kind: str, H: int, P: int = 0) -> dict:
    """Columns of one float32 workspace row (per direction and row): ``width``, where the consumed state
    ``h_prev`` starts, and where ``m = o·tanh(c')`` starts (LSTM with a projection; else ``None``)."""
    if kind == "lstm":
        hout = P or H
        width = 6 * H + (H if P else 0) + hout
        return {"width": width, "h_prev": width - hout, "m": 6 * H if P else None}
    if kind == "gru":
        return {"width": 5 * H, "h_prev": 4 * H, "m": None}
    return {"width": 2 * H, "h_prev": H, "m": None}


def blocks(batch: int, dtype: torch.dtype, on_gpu: bool, backward: bool = False) -> dict[str, int]:
    """Tile sizes (and, on the GPU, warps) for ``batch`` rows per direction.

    ``BLOCK_H == BLOCK_K`` (the on-chip path holds ``h`` and the gate units in tiles of one width). tl.dot needs
    every block dimension ≥ 16 on the GPU. On the GPU a program takes 16 rows, whatever the batch and dtype,
    and runs 8 warps: a step costs a program about one pass over ``W_hh`` whatever its row count, so more,
    smaller programs finish a step sooner while there are SMs for them; and the register budget decides the
    rest (``python -m fastseq aot``, Triton 3.6 / ptxas 12.8): with 8 warps 32-row tiles spill in every LSTM
    kernel (up to 1.2 KiB in the half-precision backward on chip, 0.7 KiB in the forward), with 4 warps even
    16-row tiles do (0.25-1.3 KiB in the LSTM forward), while 16 rows with 8 warps spill at most a few words
    (``AOT_BUDGETS``). Large batches then mean more programs, each reading ``W_hh`` from L2: the limit of this
    design (see the module docstring). The interpreter runs programs one after another, so there larger row
    tiles only mean fewer Python iterations.
    """
    if not on_gpu:
        return {"BLOCK_B": min(64, max(16, triton.next_power_of_2(max(batch, 1)))), "BLOCK_H": 32, "BLOCK_K": 32}
    return {"BLOCK_B": 16, "BLOCK_H": 32, "BLOCK_K": 32, "num_warps": 8}


def blocks_for(batch: int, t: torch.Tensor, backward: bool = False) -> dict[str, int]:
    return blocks(batch, t.dtype, on_gpu=not _interpreting(t), backward=backward)


def _sequence(x: torch.Tensor, batch_sizes, B: int):
    """``(T, N_rows, packed, (s_t, s_b, s_c))`` of a (T, B, ·) tensor or of packed data (N, ·)."""
    if batch_sizes is not None:
        return len(batch_sizes), x.shape[0], True, (0, x.stride(0), x.stride(1))
    return x.shape[0], x.shape[0] * B, False, (x.stride(0), x.stride(1), x.stride(2))


def _strides3(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


class _Launch:
    """What both launchers derive the same way: grid, tiles and flags, the on-chip decision, the packed
    sequence's batch sizes and step offsets on the device, and the float32 scratch of the multi-chunk path."""

    def __init__(self, like: torch.Tensor, D: int, B: int, H: int, HO: int, batch_sizes, ws, backward: bool):
        self.device = like.device
        dot_dtype, precision = _dot_config(like)
        blk = blocks_for(B, like, backward=backward)
        self.on_chip = H <= blk["BLOCK_H"] and HO <= blk["BLOCK_K"]
        self.grid = (D, triton.cdiv(B, blk["BLOCK_B"]))
        self.flags = dict(PACKED=batch_sizes is not None, ON_CHIP=self.on_chip, DOT_DTYPE=dot_dtype,
                          PRECISION=precision, **blk)
        self._unused = ws  # a float32 stand-in for the scratch the on-chip path never touches
        if batch_sizes is None:  # never read (PACKED is off): any int64 pointer
            self.sizes = self.offsets = torch.zeros(1, dtype=torch.int64, device=self.device)
        else:  # each step's first packed row: the exclusive cumulative sum of the batch sizes
            sizes = batch_sizes.to(torch.int64)
            offsets = torch.zeros_like(sizes)
            offsets[1:] = torch.cumsum(sizes, 0)[:-1]
            self.sizes, self.offsets = sizes.to(self.device), offsets.to(self.device)

    def scratch(self, *shape: int) -> torch.Tensor:
        if self.on_chip:
            return self._unused
        return torch.empty(shape, dtype=torch.float32, device=self.device)


def launch_layer_fwd(kind: str, gates_x, h0, c0, w_hh, b_hh, w_hr, batch_sizes, save: bool,
                     nonlinearity: str = "tanh"):
    """Forward of one layer, both directions in one launch. Returns ``(out, h_n, c_n, ws)``.

    ``gates_x``: ``(T, B, D·G)`` (any strides) or packed ``(N, D·G)`` with ``batch_sizes`` (int64, on the CPU,
    as in a PackedSequence); ``h0`` ``(D, B, H_out)``; ``c0`` ``(D, B, H)`` for LSTM else ``None``; ``w_hh``
    ``(D, G, H_out)``; ``b_hh`` ``(D, G)`` or ``None``; ``w_hr`` ``(D, P, H)`` or ``None``. ``out`` is
    ``(T, B, D·H_out)`` or ``(N, D·H_out)``, contiguous; ``ws`` the float32 ``(D, N_rows, width)`` workspace of
    :func:`workspace_layout` when ``save``, else an empty tensor."""
    D, B, HO = h0.shape
    H = w_hh.shape[1] // NUM_GATES[kind]
    P = w_hr.shape[1] if w_hr is not None else 0
    dtype, device = gates_x.dtype, gates_x.device
    T, n_rows, _, (s_gt, s_gb, s_gc) = _sequence(gates_x, batch_sizes, B)
    out = torch.empty((*gates_x.shape[:-1], D * HO), dtype=dtype, device=device)
    h_n = torch.empty((D, B, HO), dtype=dtype, device=device)
    c_n = torch.empty((D, B, H), dtype=dtype, device=device) if kind == "lstm" else None
    width = workspace_layout(kind, H, P)["width"]
    ws = torch.empty((D, n_rows, width) if save else (0,), dtype=torch.float32, device=device)
    if T == 0 or B == 0 or n_rows == 0:  # nothing advances: the final state is the initial one
        h_n.copy_(h0)
        if c_n is not None:
            c_n.copy_(c0)
        return out, h_n, c_n, ws
    run = _Launch(gates_x, D, B, H, HO, batch_sizes, ws, backward=False)
    b_t, s_bd, s_bc = (w_hh, 0, 0) if b_hh is None else (b_hh, b_hh.stride(0), b_hh.stride(1))
    args = (T, B, H) + ((HO,) if kind == "lstm" else ()) + (n_rows, s_gt, s_gb, s_gc, *_strides3(h0))
    flags = dict(SAVE=save, HAS_B_HH=b_hh is not None, **run.flags)
    if kind == "lstm":
        w_r, s_r = (w_hh, (0, 0, 0)) if w_hr is None else (w_hr, _strides3(w_hr))
        lstm_seq_fwd_kernel[run.grid](
            gates_x, h0, c0, w_hh, b_t, w_r, run.sizes, run.offsets, out, h_n, c_n, ws,
            run.scratch(2, D, B, HO), run.scratch(2, D, B, H), run.scratch(D, B, H) if P else ws,
            *args, *_strides3(c0), *_strides3(w_hh), s_bd, s_bc, *s_r, HAS_PROJ=P > 0, **flags)
    else:
        kernel = gru_seq_fwd_kernel if kind == "gru" else rnn_seq_fwd_kernel
        if kind == "rnn":
            flags["RELU"] = nonlinearity == "relu"
        kernel[run.grid](gates_x, h0, w_hh, b_t, run.sizes, run.offsets, out, h_n, ws, run.scratch(2, D, B, H),
                         *args, *_strides3(w_hh), s_bd, s_bc, **flags)
    return out, h_n, c_n, ws


def launch_layer_bwd(kind: str, grad_out, grad_hn, grad_cn, ws, w_hh, w_hr, batch_sizes, nonlinearity: str = "tanh"):
    """Backward of one layer from the forward's workspace, both directions in one launch. Returns
    ``(dgates_x, dgates_h, dh0, dc0, dh_total)``: the gradients of ``gates_x`` and of the hidden-side
    pre-activations ``h·W_hhᵀ + b_hh`` (the same tensor except for GRU), shaped like ``gates_x``, contiguous, in
    the input dtype; of ``h0`` and ``c0`` (``None`` for non-LSTM); and for LSTM with a projection the float32
    ``(D, N_rows, P)`` total gradient of every step's output ``h`` (for ``dW_hr = dh_totalᵀ·m``), else ``None``."""
    D, B, HO = grad_hn.shape
    H = w_hh.shape[1] // NUM_GATES[kind]
    G = NUM_GATES[kind] * H
    P = w_hr.shape[1] if w_hr is not None else 0
    dtype, device = w_hh.dtype, w_hh.device
    T, n_rows, _, (s_ot, s_ob, s_oc) = _sequence(grad_out, batch_sizes, B)
    dgx = torch.empty((*grad_out.shape[:-1], D * G), dtype=dtype, device=device)
    dgh = torch.empty_like(dgx) if kind == "gru" else dgx
    dh0 = torch.empty((D, B, HO), dtype=dtype, device=device)
    dc0 = torch.empty((D, B, H), dtype=dtype, device=device) if kind == "lstm" else None
    dht = torch.empty((D, n_rows, P), dtype=torch.float32, device=device) if P else None
    if T == 0 or B == 0 or n_rows == 0:  # no step: the initial state's gradient is the final state's
        dh0.copy_(grad_hn)
        if dc0 is not None:
            dc0.copy_(grad_cn)
        return dgx, dgh, dh0, dc0, dht
    run = _Launch(w_hh, D, B, H, HO, batch_sizes, ws, backward=True)
    args = (T, B, H) + ((HO,) if kind == "lstm" else ()) + (n_rows, s_ot, s_ob, s_oc, *_strides3(grad_hn))
    if kind == "lstm":
        w_r, s_r = (w_hh, (0, 0, 0)) if w_hr is None else (w_hr, _strides3(w_hr))
        lstm_seq_bwd_kernel[run.grid](
            grad_out, grad_hn, grad_cn, ws, w_hh, w_r, run.sizes, run.offsets, dgx, dh0, dc0,
            ws if dht is None else dht, run.scratch(2, D, B, HO), run.scratch(2, D, B, H),
            *args, *_strides3(grad_cn), *_strides3(w_hh), *s_r, HAS_PROJ=P > 0, **run.flags)
    elif kind == "gru":
        gru_seq_bwd_kernel[run.grid](grad_out, grad_hn, ws, w_hh, run.sizes, run.offsets, dgx, dgh, dh0,
                                     run.scratch(2, D, B, H), *args, *_strides3(w_hh), **run.flags)
    else:
        rnn_seq_bwd_kernel[run.grid](grad_out, grad_hn, ws, w_hh, run.sizes, run.offsets, dgx, dh0,
                                     run.scratch(2, D, B, H), *args, *_strides3(w_hh),
                                     RELU=nonlinearity == "relu", **run.flags)
    return dgx, dgh, dh0, dc0, dht


# ---------------------------------------------------------------------------------------------------------
# AOT budgets (``python -m fastseq aot``, fastseq/aot.py): the most spill bytes (stores + loads, from ptxas -v)
# and local-memory instructions (LDL + STL in the SASS) any specialisation of each kernel may have on sm_80 and
# sm_90: the measured worst case over the *full* flag grid (``--flags full``; Triton 3.6.0, ptxas 12.8), so
# nothing may grow past it unnoticed.
#
# 48 of the 800 specialisations spill, and only a few words (stack <= 32 B, in L1). 40 of them are ptxas, free
# to use 255 registers, keeping a (float32) specialisation at exactly 128 so that two 8-warp blocks fit an SM.
# Given ``maxnreg`` 168, those tried compiled with 168-210 registers and no spill, but then one block fits an SM: these
# kernels run one program per 16 rows for the *whole* sequence, so a second wave of programs would double the
# run time, which costs far more than a few spilled words per step. The other eight are the float32 LSTM
# forward of the multi-chunk path with its workspace (mostly sm_90/TF32): 8-28 B at 255 registers, the most
# live state of any specialisation. Everything else spills nothing.
# ---------------------------------------------------------------------------------------------------------

AOT_BUDGETS = {
    "lstm_seq_fwd_kernel": {"spill_bytes": 36, "local_ops": 9},  # sm_90 fp32/tf32 on chip, save, no proj: 128 regs
    "gru_seq_fwd_kernel": {"spill_bytes": 56, "local_ops": 12},  # sm_90 fp32/tf32 multi-chunk, no save: 128 regs
    "rnn_seq_fwd_kernel": {"spill_bytes": 32, "local_ops": 8},  # sm_90 fp32 multi-chunk, packed, save: 128 regs
    "lstm_seq_bwd_kernel": {"spill_bytes": 32, "local_ops": 8},  # sm_90 fp32 multi-chunk with proj: 128 regs
    "gru_seq_bwd_kernel": {"spill_bytes": 16, "local_ops": 4},  # sm_90 fp32/tf32 multi-chunk, packed: 128 regs
    "rnn_seq_bwd_kernel": {"spill_bytes": 40, "local_ops": 10},  # sm_90 fp32 multi-chunk: 128 regs
}
