"""Scaled dot-product attention in Triton: forward (with a split-key decode path), backward, and the dropout
keep-mask generator.

Math (``fastseq.reference``, Attention): for one (batch, head) with ``q (L, E)``, ``k (S, E)``, ``v (S, Ev)``,
``s = scale · q kᵀ + bias`` (bias: 0 / −∞ from a bool mask or causality, a float mask as is),
``P = softmax(s)`` over the keys (a row with every score −∞ has ``P = 0``), ``P̃ = P ⊙ keep / (1 − p)`` under
dropout, ``out = P̃ v``. Everything below works in base 2: ``s₂ = s · log₂e``, so ``exp`` is ``exp2``.

Forward (``attn_fwd_kernel``). Grid ``(⌈L/BLOCK_M⌉, B·H, splits)``. A program owns ``BLOCK_M`` query rows of
one head: it loads its ``q`` tile once and walks the key tiles (``BLOCK_N`` keys) with the online softmax
(running row maximum ``m``, running sum ``l``, float32 accumulator ``acc`` of ``P̃ v``, rescaled by
``exp2(m_old − m_new)`` when the maximum grows). The score tile lives in registers only: the (L, S) matrix is
never written. At the end ``out = acc / l`` and the log-sum-exp of the row, in the base-2 units the kernels
work in, ``lse₂ = m + log₂ l = log₂e · logsumexp(s)`` (float32, ``(B, H, L)``), is saved for backward. (Saved
in natural units it would be rounded twice more on the way back, an absolute error of ``ε·|s|`` in every
recomputed exponent: with large logits that visibly scaled whole rows of ``P`` in backward.) A row with no key
taking part ends with ``m = −∞``: its output is 0 and its ``lse₂`` is ``+∞``, so that backward's
``P = exp2(s₂ − lse₂)`` is 0 on it and every gradient through it is 0.

Masks are read as tiles through four strides ``(batch, head, row, key)``; a broadcast dimension has stride 0,
so a ``(L, S)`` or ``(N, 1, 1, S)`` mask is read as it is stored and never expanded in memory. Bool masks are
read as bytes, float masks in their own dtype (upcast to float32). What is skipped, never computed:

- causality (``key ≤ query + diagonal``; ``diagonal = 0`` is ``is_causal``'s top-left alignment, ``S − L`` the
  lower-right one of ``CausalBias``): the key loop stops at the last key tile any row of the block can see,
  and backward's query loop starts at the first query tile that can see the key block;
- any key tile in which the mask (bool, or a float mask that is −∞ there) removes every (query, key) pair of
  the block: the mask tile is loaded first and, when it holds no live pair, the tile's ``q kᵀ``, ``exp`` and
  ``P v`` are not computed (a key-padding mask ``(N, 1, 1, S)`` skips every padded key tile, in forward and in
  both backward kernels).

Decode (``SPLIT=True``): for a few query rows (``L ≤ 16``) against many keys, one program per head would leave
the GPU idle, so the key range is split across ``splits`` programs per (row block, head) (flash-decoding). Each
writes its unnormalised float32 ``acc`` and its ``(m, l)``; ``attn_fwd_combine_kernel`` merges them with
``w_i = exp2(m_i − max m)``: ``out = Σ w_i acc_i / Σ w_i l_i``. Backward of a decode call uses the general
kernels (the saved ``lse₂`` is the same).

Dropout: ``keep = u ≥ p`` with ``u`` uniform from Philox (``tl.philox``, 10 rounds) keyed by a 64-bit seed and
counted by (key group ``j // 4``, query row ``i``, batch·head, stream): one Philox call gives the four keys
``4·(j // 4) … + 3``. The seed and stream are drawn from torch's generator by the caller and passed as a
tensor; the mask is a pure function of them and of the element's indices, so backward regenerates it exactly
and nothing is stored. ``dropout_keep_kernel`` writes the same mask out for tests.

Backward (three launches, no atomics, deterministic):

1. ``attn_bwd_preprocess_kernel``: ``D = rowsum(dO ⊙ O)`` (float32, ``(B, H, L)``); with dropout it is still
   ``Σ_j P_j dP_j`` since ``O`` already holds the dropped, rescaled probabilities.
2. ``attn_bwd_dkdv_kernel``: grid ``(⌈S/BLOCK_N⌉, B·H_kv)``. A program owns one key block of one key/value
   head and keeps ``dK`` and ``dV`` for it in registers while it walks every query head of its GQA group and
   every query tile: it recomputes ``s`` and ``P = exp2(s₂ − lse₂)``, ``dV += P̃ᵀ dO``, ``dP = dO vᵀ`` (dropped
   and rescaled like ``P``), ``dS = P ⊙ (dP − D)``, ``dK += dSᵀ q · scale``. ``dS`` is the gradient of the
   float mask too: when that gradient is wanted it is stored here, each (head, query, key) exactly once, into a
   float32 ``(B, H, L, S)`` buffer that the operator reduces over the mask's broadcast dimensions.
3. ``attn_bwd_dq_kernel``: grid ``(⌈L/BLOCK_M⌉, B·H)``: recomputes ``P`` and ``dS`` the same way along the
   key tiles and accumulates ``dQ = dS k · scale``.

Recomputing ``s`` in both (2) and (3) costs one more ``q kᵀ`` and ``dO vᵀ`` per tile than a single pass with
``dQ`` accumulated by atomics, but keeps every gradient a plain store: deterministic, no float32 atomic
traffic on ``dQ``, no zero-initialised ``dQ`` buffer, and GQA needs no cross-program reduction of ``dK/dV``
because one program owns the whole group of a key/value head. With ``H_k ≠ H_v`` (torch allows it), ``dK`` and
``dV`` are two passes of the same kernel, each over its own heads.

GQA is index mapping: query head ``h`` reads key head ``h // GROUP_K`` and value head ``h // GROUP_V``; keys and
values are never repeated in memory.

Precision: ``q kᵀ``, ``P v`` and the backward products take the input dtype on the tensor cores (float16 /
bfloat16; float32 in IEEE mode on CUDA cores unless torch allows TF32 matmuls), with float32 accumulation;
softmax, ``lse₂``, ``D`` and ``dS`` are float32. In IEEE float32, ``tl.dot`` holds the whole reduced dimension
of both operands in registers, so from a head of 128 on the forward (and dQ from 256 on) computes ``q kᵀ`` and
``dO vᵀ`` by ``CHUNK``-column slices of the head read from memory instead of holding ``q`` in registers.

Cost of skipping: where a mask is given, each key tile's loads sit behind the branch that skips it, which
Triton does not software-pipeline; without a mask (and with causality alone) the loop has no branch.

Head sizes ``E`` and ``Ev`` are padded in-kernel to a power-of-2 block (≥ 16) with masked loads; any ``L`` and
``S`` work. Under the Triton interpreter bfloat16 arithmetic is wrong, so there bfloat16 operands are upcast
right after loading and bfloat16 stores are rounded to nearest.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastseq.kernels.rnn_cell import _dot_config, _interpreting, _round_to_bf16

_LOG2E = 1.4426950408889634
LOG2E = tl.constexpr(_LOG2E)  # kernels may read only constexpr globals
# Query rows up to which a call with many keys takes the split-key decode path.
DECODE_MAX_ROWS = 16

# ---------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------


@triton.jit
def _load_rows(base, rows, cols, s_r, s_c, n_rows, n_cols):
    """``base[rows, cols]`` as a (len(rows), len(cols)) tile, zero outside; row offsets in int64."""
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    offs = rows.to(tl.int64)[:, None] * s_r + cols[None, :] * s_c
    return tl.load(base + offs, mask=mask, other=0.0)


@triton.jit
def _store_rows(base, value, rows, cols, s_r, s_c, n_rows, n_cols):
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    if base.dtype.element_ty == tl.bfloat16:
        value = _round_to_bf16(value.to(tl.float32))
    offs = rows.to(tl.int64)[:, None] * s_r + cols[None, :] * s_c
    tl.store(base + offs, value.to(base.dtype.element_ty), mask=mask)


@triton.jit
def _tile_bias(mask_base, rm, rn, L, S, s_ml, s_ms, diag,
               MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr):
    """The additive bias of a (rows ``rm``, keys ``rn``) score tile in base-2 units: −∞ where the pair does not
    take part (key or row out of range, causality, a False bool-mask entry), ``log₂e · mask`` for a float
    mask, 0 elsewhere. ``MASK_KIND``: 0 none, 1 bool (read as bytes), 2 float."""
    ok = (rm[:, None] < L) & (rn[None, :] < S)
    if IS_CAUSAL:
        ok = ok & (rn[None, :] <= rm[:, None] + diag)
    offs = rm.to(tl.int64)[:, None] * s_ml + rn.to(tl.int64)[None, :] * s_ms
    if MASK_KIND == 1:
        bits = tl.load(mask_base + offs, mask=ok, other=0)
        ok = ok & (bits != 0)
        bias = tl.where(ok, 0.0, float("-inf"))
    elif MASK_KIND == 2:
        b = tl.load(mask_base + offs, mask=ok, other=0.0).to(tl.float32)
        bias = tl.where(ok, b * LOG2E, float("-inf"))
    else:
        bias = tl.where(ok, 0.0, float("-inf"))
    return bias


@triton.jit
def _tile_live(bias):
    """Whether any pair of the tile takes part (its bias is not −∞ everywhere)."""
    return tl.max(tl.max(bias, 1), 0) > float("-inf")


@triton.jit
def _keep(seed, stream, bh, rm, n0, p_drop, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Dropout keep-mask of the (rows ``rm``, keys ``n0 … n0 + BLOCK_N``) tile (``n0`` a multiple of 4): one
    Philox call per (row, group of 4 keys) counted by (key // 4, row, batch·head, stream); its four outputs are
    the four keys of the group, in order."""
    shape: tl.constexpr = (BLOCK_M, BLOCK_N // 4)
    zero = tl.zeros(shape, tl.uint32)
    c0 = zero + (n0 // 4 + tl.arange(0, BLOCK_N // 4))[None, :].to(tl.uint32)
    c1 = zero + rm[:, None].to(tl.uint32)
    c2 = zero + bh.to(tl.uint32)
    c3 = zero + stream.to(tl.uint32)
    r0, r1, r2, r3 = tl.philox(seed, c0, c1, c2, c3)
    r = tl.interleave(tl.interleave(r0, r2), tl.interleave(r1, r3))
    return tl.uint_to_uniform_float(r) >= p_drop


@triton.jit
def _fwd_tiles(acc, m_i, l_i, q, q_base, k_base, v_base, mask_base, rm, lo, hi, L, S, E, EV,
               s_ql, s_qe, s_ks, s_ke, s_vs, s_ve, s_ml, s_ms, scale_log2, diag, seed, stream, bh, p_drop,
               MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr, DROPOUT: tl.constexpr,
               DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_E: tl.constexpr, BLOCK_EV: tl.constexpr, CHUNK: tl.constexpr):
    """The online softmax over the key tiles ``lo … hi`` (multiples of BLOCK_N): updated ``(acc, m, l)``. With
    ``CHUNK = 0`` the query tile ``q`` is held in registers; else ``q kᵀ`` goes by head slices (``_dot_nt``)."""
    re = tl.arange(0, BLOCK_E)
    rev = tl.arange(0, BLOCK_EV)
    for n0 in range(lo, hi, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        bias = _tile_bias(mask_base, rm, rn, L, S, s_ml, s_ms, diag, MASK_KIND, IS_CAUSAL)
        if MASK_KIND != 0:
            live = _tile_live(bias)
        else:
            live = True
        if live:  # a tile the mask removes entirely is skipped
            if CHUNK == 0:
                k = _load_rows(k_base, rn, re, s_ks, s_ke, S, E).to(DOT_DTYPE)
                qk = tl.dot(q, tl.trans(k), input_precision=PRECISION)
            else:
                qk = _dot_nt(tl.zeros((BLOCK_M, BLOCK_N), tl.float32), q_base, rm, s_ql, s_qe, L, k_base, rn,
                             s_ks, s_ke, S, E, DOT_DTYPE, PRECISION, BLOCK_E, CHUNK)
            s = qk * scale_log2 + bias
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing yet: no −∞ − −∞
            alpha = tl.exp2(m_i - m_safe)
            p = tl.exp2(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            if DROPOUT:
                p = tl.where(_keep(seed, stream, bh, rm, n0, p_drop, BLOCK_M, BLOCK_N), p, 0.0)
            v = _load_rows(v_base, rn, rev, s_vs, s_ve, S, EV).to(DOT_DTYPE)
            acc = tl.dot(p.to(DOT_DTYPE), v, acc * alpha[:, None], input_precision=PRECISION)
            m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _dot_nt(acc, a_base, ra, s_ar, s_ac, n_a, b_base, rb, s_br, s_bc, n_b, n_cols,
            DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, BLOCK_C: tl.constexpr, CHUNK: tl.constexpr):
    """``acc + a[ra, :n_cols] · b[rb, :n_cols]ᵀ`` with the shared (head) dimension in ``CHUNK``-column slices
    loaded from memory: the float32 products on CUDA cores (``tl.dot`` in IEEE mode) otherwise hold the whole
    head of both operands in registers and spill from a head of 128 on."""
    for c0 in range(0, BLOCK_C, CHUNK):
        rc = c0 + tl.arange(0, CHUNK)
        a = _load_rows(a_base, ra, rc, s_ar, s_ac, n_a, n_cols).to(DOT_DTYPE)
        b = _load_rows(b_base, rb, rc, s_br, s_bc, n_b, n_cols).to(DOT_DTYPE)
        acc = tl.dot(a, tl.trans(b), acc, input_precision=PRECISION)
    return acc


@triton.jit
def _causal_key_end(m0, S, diag, IS_CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr):
    """One past the last key any row ``m0 … m0 + BLOCK_M − 1`` may see."""
    if IS_CAUSAL:
        return tl.maximum(tl.minimum(S, m0 + BLOCK_M + diag), 0)
    else:
        return S


# ---------------------------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------------------------


@triton.jit
def attn_fwd_kernel(
    q_ptr, k_ptr, v_ptr, mask_ptr, seed_ptr, o_ptr, lse_ptr, part_ptr, ml_ptr,
    H, L, S, E, EV, GROUP_K, GROUP_V, TILES_PER_SPLIT,
    s_qb, s_qh, s_ql, s_qe, s_kb, s_kh, s_ks, s_ke, s_vb, s_vh, s_vs, s_ve,
    s_mb, s_mh, s_ml, s_ms, s_ob, s_oh, s_ol, s_oe,
    scale_log2, diag, p_drop, drop_scale,
    MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, SPLIT: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_EV: tl.constexpr,
    CHUNK: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    m0 = pid_m * BLOCK_M
    rm = m0 + tl.arange(0, BLOCK_M)
    re = tl.arange(0, BLOCK_E)
    rev = tl.arange(0, BLOCK_EV)
    q_base = q_ptr + b * s_qb + h.to(tl.int64) * s_qh
    k_base = k_ptr + b * s_kb + (h // GROUP_K).to(tl.int64) * s_kh
    v_base = v_ptr + b * s_vb + (h // GROUP_V).to(tl.int64) * s_vh
    mask_base = mask_ptr + b * s_mb + h.to(tl.int64) * s_mh
    if CHUNK == 0:
        q = _load_rows(q_base, rm, re, s_ql, s_qe, L, E).to(DOT_DTYPE)
    else:
        q = 0
    if DROPOUT:
        seed = tl.load(seed_ptr)
        stream = tl.load(seed_ptr + 1)
    else:
        seed = 0
        stream = 0
    hi = _causal_key_end(m0, S, diag, IS_CAUSAL, BLOCK_M)
    lo = 0
    if SPLIT:
        lo = tl.program_id(2) * TILES_PER_SPLIT * BLOCK_N
        hi = tl.minimum(hi, lo + TILES_PER_SPLIT * BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_EV), tl.float32)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc, m_i, l_i = _fwd_tiles(acc, m_i, l_i, q, q_base, k_base, v_base, mask_base, rm, lo, hi, L, S, E, EV,
                               s_ql, s_qe, s_ks, s_ke, s_vs, s_ve, s_ml, s_ms, scale_log2, diag, seed, stream, bh,
                               p_drop, MASK_KIND, IS_CAUSAL, DROPOUT, DOT_DTYPE, PRECISION,
                               BLOCK_M, BLOCK_N, BLOCK_E, BLOCK_EV, CHUNK)
    if SPLIT:
        # Partial results of this key range: acc (unnormalised) and (m, l), float32.
        split = tl.program_id(2)
        n_splits = tl.num_programs(2)
        row = (bh * n_splits + split).to(tl.int64)
        _store_rows(part_ptr + row * L * EV, acc, rm, rev, EV, 1, L, EV)
        tl.store(ml_ptr + row * 2 * L + rm, m_i, mask=rm < L)
        tl.store(ml_ptr + row * 2 * L + L + rm, l_i, mask=rm < L)
    else:
        dead = m_i == float("-inf")  # no key took part: output 0, lse +inf
        l_safe = tl.where(dead, 1.0, l_i)
        out = acc * (drop_scale / l_safe)[:, None]
        out = tl.where(dead[:, None], 0.0, out)
        _store_rows(o_ptr + b * s_ob + h.to(tl.int64) * s_oh, out, rm, rev, s_ol, s_oe, L, EV)
        lse = tl.where(dead, float("inf"), (m_i + tl.log2(l_safe)))
        tl.store(lse_ptr + bh.to(tl.int64) * L + rm, lse, mask=rm < L)


@triton.jit
def attn_fwd_combine_kernel(
    part_ptr, ml_ptr, o_ptr, lse_ptr, H, L, EV, NUM_SPLITS,
    s_ob, s_oh, s_ol, s_oe, drop_scale,
    BLOCK_M: tl.constexpr, BLOCK_EV: tl.constexpr,
):
    """Merges the split-key partials of the decode path: ``out = Σ w_i acc_i / Σ w_i l_i`` with
    ``w_i = exp2(m_i − max m)``."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rev = tl.arange(0, BLOCK_EV)
    row_ok = rm < L
    m_max = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    for i in range(0, NUM_SPLITS):
        row = (bh * NUM_SPLITS + i).to(tl.int64)
        m_max = tl.maximum(m_max, tl.load(ml_ptr + row * 2 * L + rm, mask=row_ok, other=float("-inf")))
    dead = m_max == float("-inf")
    m_safe = tl.where(dead, 0.0, m_max)
    acc = tl.zeros((BLOCK_M, BLOCK_EV), tl.float32)
    l_sum = tl.zeros((BLOCK_M,), tl.float32)
    for i in range(0, NUM_SPLITS):
        row = (bh * NUM_SPLITS + i).to(tl.int64)
        w = tl.exp2(tl.load(ml_ptr + row * 2 * L + rm, mask=row_ok, other=float("-inf")) - m_safe)
        l_sum += w * tl.load(ml_ptr + row * 2 * L + L + rm, mask=row_ok, other=0.0)
        acc += w[:, None] * _load_rows(part_ptr + row * L * EV, rm, rev, EV, 1, L, EV)
    l_safe = tl.where(dead, 1.0, l_sum)
    out = tl.where(dead[:, None], 0.0, acc * (drop_scale / l_safe)[:, None])
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    _store_rows(o_ptr + b * s_ob + h * s_oh, out, rm, rev, s_ol, s_oe, L, EV)
    lse = tl.where(dead, float("inf"), (m_max + tl.log2(l_safe)))
    tl.store(lse_ptr + bh.to(tl.int64) * L + rm, lse, mask=row_ok)


# ---------------------------------------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------------------------------------


@triton.jit
def attn_bwd_preprocess_kernel(
    o_ptr, do_ptr, delta_ptr, H, L, EV,
    s_ob, s_oh, s_ol, s_oe, s_db, s_dh, s_dl, s_de,
    BLOCK_M: tl.constexpr, BLOCK_EV: tl.constexpr,
):
    """``D = rowsum(dO ⊙ O)`` in float32, ``(B, H, L)``."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rev = tl.arange(0, BLOCK_EV)
    o = _load_rows(o_ptr + b * s_ob + h * s_oh, rm, rev, s_ol, s_oe, L, EV).to(tl.float32)
    do = _load_rows(do_ptr + b * s_db + h * s_dh, rm, rev, s_dl, s_de, L, EV).to(tl.float32)
    tl.store(delta_ptr + bh.to(tl.int64) * L + rm, tl.sum(o * do, 1), mask=rm < L)


@triton.jit
def attn_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, mask_ptr, seed_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, dmask_ptr,
    H, L, S, E, EV, GROUP_K, GROUP_V, GROUP,
    s_qb, s_qh, s_ql, s_qe, s_kb, s_kh, s_ks, s_ke, s_vb, s_vh, s_vs, s_ve,
    s_mb, s_mh, s_ml, s_ms, s_db, s_dh, s_dl, s_de,
    s_dkb, s_dkh, s_dks, s_dke, s_dvb, s_dvh, s_dvs, s_dve,
    scale, scale_log2, diag, p_drop, drop_scale,
    MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr, DROPOUT: tl.constexpr,
    COMPUTE_DK: tl.constexpr, COMPUTE_DV: tl.constexpr, WRITE_DMASK: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_EV: tl.constexpr,
):
    """dK and/or dV of one key block of one key/value head (the program's head: ``GROUP`` consecutive query
    heads use it), over every query head of the group and every query tile that can see the block; with
    ``WRITE_DMASK`` also ``dS`` into the float32 ``(B, H, L, S)`` mask-gradient buffer."""
    pid_n = tl.program_id(0)
    bkv = tl.program_id(1)
    HKV = H // GROUP
    b = (bkv // HKV).to(tl.int64)
    hkv = bkv % HKV
    n0 = pid_n * BLOCK_N
    rn = n0 + tl.arange(0, BLOCK_N)
    re = tl.arange(0, BLOCK_E)
    rev = tl.arange(0, BLOCK_EV)
    if DROPOUT:
        seed = tl.load(seed_ptr)
        stream = tl.load(seed_ptr + 1)
    else:
        seed = 0
        stream = 0
    m_lo = 0
    if IS_CAUSAL:  # queries i see key j when j <= i + diag: the first query tile that sees this block
        m_lo = (tl.maximum(n0 - diag, 0) // BLOCK_M) * BLOCK_M
    dk = tl.zeros((BLOCK_N, BLOCK_E), tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_EV), tl.float32)
    for g in range(0, GROUP):
        h = hkv * GROUP + g
        bh = (b * H + h).to(tl.int32)
        k = _load_rows(k_ptr + b * s_kb + (h // GROUP_K).to(tl.int64) * s_kh, rn, re, s_ks, s_ke, S, E)
        k = k.to(DOT_DTYPE)
        v = _load_rows(v_ptr + b * s_vb + (h // GROUP_V).to(tl.int64) * s_vh, rn, rev, s_vs, s_ve, S, EV)
        v = v.to(DOT_DTYPE)
        q_base = q_ptr + b * s_qb + h.to(tl.int64) * s_qh
        do_base = do_ptr + b * s_db + h.to(tl.int64) * s_dh
        mask_base = mask_ptr + b * s_mb + h.to(tl.int64) * s_mh
        row_base = bh.to(tl.int64) * L
        for m0 in range(m_lo, L, BLOCK_M):
            rm = m0 + tl.arange(0, BLOCK_M)
            bias = _tile_bias(mask_base, rm, rn, L, S, s_ml, s_ms, diag, MASK_KIND, IS_CAUSAL)
            if MASK_KIND != 0:
                live = _tile_live(bias)
            else:
                live = True
            if live:
                q = _load_rows(q_base, rm, re, s_ql, s_qe, L, E).to(DOT_DTYPE)
                do = _load_rows(do_base, rm, rev, s_dl, s_de, L, EV).to(DOT_DTYPE)
                lse2 = tl.load(lse_ptr + row_base + rm, mask=rm < L, other=float("inf"))
                d_i = tl.load(delta_ptr + row_base + rm, mask=rm < L, other=0.0)
                s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2 + bias
                p = tl.exp2(s - lse2[:, None])
                dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
                if DROPOUT:
                    keep = _keep(seed, stream, bh, rm, n0, p_drop, BLOCK_M, BLOCK_N)
                    p_v = tl.where(keep, p * drop_scale, 0.0)
                    dp = tl.where(keep, dp * drop_scale, 0.0)
                else:
                    p_v = p
                if COMPUTE_DV:
                    dv = tl.dot(tl.trans(p_v.to(DOT_DTYPE)), do, dv, input_precision=PRECISION)
                ds = p * (dp - d_i[:, None])
                if WRITE_DMASK:
                    _store_rows(dmask_ptr + row_base * S, ds, rm, rn, S, 1, L, S)
                if COMPUTE_DK:
                    dk = tl.dot(tl.trans(ds.to(DOT_DTYPE)), q, dk, input_precision=PRECISION)
    if COMPUTE_DK:
        _store_rows(dk_ptr + b * s_dkb + hkv.to(tl.int64) * s_dkh, dk * scale, rn, re, s_dks, s_dke, S, E)
    if COMPUTE_DV:
        _store_rows(dv_ptr + b * s_dvb + hkv.to(tl.int64) * s_dvh, dv, rn, rev, s_dvs, s_dve, S, EV)


@triton.jit
def attn_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, mask_ptr, seed_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr,
    H, L, S, E, EV, GROUP_K, GROUP_V,
    s_qb, s_qh, s_ql, s_qe, s_kb, s_kh, s_ks, s_ke, s_vb, s_vh, s_vs, s_ve,
    s_mb, s_mh, s_ml, s_ms, s_db, s_dh, s_dl, s_de, s_dqb, s_dqh, s_dql, s_dqe,
    scale, scale_log2, diag, p_drop, drop_scale,
    MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr, DROPOUT: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_EV: tl.constexpr,
    CHUNK: tl.constexpr,
):
    """dQ of one query block of one head, along the key tiles its rows can see."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    m0 = pid_m * BLOCK_M
    rm = m0 + tl.arange(0, BLOCK_M)
    re = tl.arange(0, BLOCK_E)
    rev = tl.arange(0, BLOCK_EV)
    if DROPOUT:
        seed = tl.load(seed_ptr)
        stream = tl.load(seed_ptr + 1)
    else:
        seed = 0
        stream = 0
    k_base = k_ptr + b * s_kb + (h // GROUP_K).to(tl.int64) * s_kh
    v_base = v_ptr + b * s_vb + (h // GROUP_V).to(tl.int64) * s_vh
    mask_base = mask_ptr + b * s_mb + h.to(tl.int64) * s_mh
    q_base = q_ptr + b * s_qb + h.to(tl.int64) * s_qh
    do_base = do_ptr + b * s_db + h.to(tl.int64) * s_dh
    if CHUNK == 0:
        q = _load_rows(q_base, rm, re, s_ql, s_qe, L, E).to(DOT_DTYPE)
        do = _load_rows(do_base, rm, rev, s_dl, s_de, L, EV).to(DOT_DTYPE)
    row_base = bh.to(tl.int64) * L
    lse2 = tl.load(lse_ptr + row_base + rm, mask=rm < L, other=float("inf"))
    d_i = tl.load(delta_ptr + row_base + rm, mask=rm < L, other=0.0)
    dq = tl.zeros((BLOCK_M, BLOCK_E), tl.float32)
    hi = _causal_key_end(m0, S, diag, IS_CAUSAL, BLOCK_M)
    for n0 in range(0, hi, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        bias = _tile_bias(mask_base, rm, rn, L, S, s_ml, s_ms, diag, MASK_KIND, IS_CAUSAL)
        if MASK_KIND != 0:
            live = _tile_live(bias)
        else:
            live = True
        if live:
            k = _load_rows(k_base, rn, re, s_ks, s_ke, S, E).to(DOT_DTYPE)
            if CHUNK == 0:
                v = _load_rows(v_base, rn, rev, s_vs, s_ve, S, EV).to(DOT_DTYPE)
                qk = tl.dot(q, tl.trans(k), input_precision=PRECISION)
                dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
            else:
                zero = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
                qk = _dot_nt(zero, q_base, rm, s_ql, s_qe, L, k_base, rn, s_ks, s_ke, S, E,
                             DOT_DTYPE, PRECISION, BLOCK_E, CHUNK)
                dp = _dot_nt(zero, do_base, rm, s_dl, s_de, L, v_base, rn, s_vs, s_ve, S, EV,
                             DOT_DTYPE, PRECISION, BLOCK_EV, CHUNK)
            p = tl.exp2(qk * scale_log2 + bias - lse2[:, None])
            if DROPOUT:
                keep = _keep(seed, stream, bh, rm, n0, p_drop, BLOCK_M, BLOCK_N)
                dp = tl.where(keep, dp * drop_scale, 0.0)
            ds = p * (dp - d_i[:, None])
            dq = tl.dot(ds.to(DOT_DTYPE), k, dq, input_precision=PRECISION)
    _store_rows(dq_ptr + b * s_dqb + h.to(tl.int64) * s_dqh, dq * scale, rm, re, s_dql, s_dqe, L, E)


@triton.jit
def dropout_keep_kernel(seed_ptr, out_ptr, L, S, p_drop, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The keep-mask (uint8, ``(B·H, L, S)``) that the attention kernels draw for this seed: for tests."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    bh = tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n0 = pid_n * BLOCK_N
    rn = n0 + tl.arange(0, BLOCK_N)
    keep = _keep(tl.load(seed_ptr), tl.load(seed_ptr + 1), bh, rm, n0, p_drop, BLOCK_M, BLOCK_N)
    ok = (rm[:, None] < L) & (rn[None, :] < S)
    offs = bh.to(tl.int64) * L * S + rm.to(tl.int64)[:, None] * S + rn[None, :]
    tl.store(out_ptr + offs, keep.to(tl.uint8), mask=ok)


# ---------------------------------------------------------------------------------------------------------
# Launchers: tensors in, tensors out. They allocate outputs, pick blocks and launch; they check nothing a
# caller could get wrong (the operators validate before they get here). Shapes: q (B, H, L, E),
# k (B, Hk, S, E), v (B, Hv, S, Ev) with Hk and Hv dividing H, any strides; mask None or 4-D
# (1 or B, 1 or H, 1 or L, 1 or S), bool or floating, any strides; seed None or int64 (2,) (seed, stream).
# ---------------------------------------------------------------------------------------------------------


def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(max(n, 1)))


def blocks(L: int, S: int, E: int, Ev: int, dtype: torch.dtype, on_gpu: bool, kind: str = "fwd",
           precision: str | None = None) -> dict[str, int]:
    """Tiles (and, on the GPU, warps) for a call. ``kind``: "fwd", "decode", "bwd" (dK/dV and D), "dq";
    ``precision``: the dot precision of float32 ("ieee" or "tf32"; ``None``: what torch allows now).

    The head dimensions are padded to a power of 2 (``BLOCK_E``, ``BLOCK_EV``, ≥ 16: tl.dot needs every
    dimension ≥ 16 on the GPU). On the GPU the row/key tiles shrink as the head grows so that the accumulators
    (forward: ``BLOCK_M × BLOCK_EV``; backward: ``dK`` and ``dV``, ``BLOCK_N × (BLOCK_E + BLOCK_EV)``, float32),
    the operand tiles and, with dropout, the Philox state stay in registers: these are the largest tiles that
    compile without spills on sm_90 with every feature on (float mask, causality, dropout, mask gradient), per
    ``python -m fastseq aot``, which holds them to the spill budgets at the end of this file. float32 runs
    ``tl.dot`` on CUDA cores (IEEE; tensor cores only where torch allows TF32), whose operands hold the whole
    reduced dimension in registers: there the forward's and dQ's products over the head dimension go by
    ``CHUNK``-column slices (``CHUNK = 0``: whole tiles in registers). The decode path uses 16-row tiles (all
    of ``L ≤ 16``). The interpreter runs programs one after another: there the largest tiles are fastest.
    """
    be, bev = _pow2(E), _pow2(Ev)
    head = max(be, bev)
    if not on_gpu:
        bm = 16 if kind == "decode" else min(64, _pow2(L))
        return {"BLOCK_M": bm, "BLOCK_N": min(64, _pow2(S)), "BLOCK_E": be, "BLOCK_EV": bev, "CHUNK": 0}
    if precision is None:
        precision = "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
    cls = 0 if head <= 64 else 1 if head <= 128 else 2
    # (BLOCK_M, BLOCK_N, warps) per head class (<= 64, <= 128, <= 256) and per kernel: "fwd", "decode",
    # "bwd" (dK/dV, and D), "dq"; for half precision, for float32 on tensor cores (TF32), for float32 in IEEE.
    chunk = 0
    if dtype != torch.float32:
        table = {"fwd": ((128, 64, 8), (128, 32, 8), (32, 16, 8)),
                 "decode": ((16, 64, 8), (16, 64, 8), (16, 32, 8)),
                 "bwd": ((32, 32, 8), (16, 16, 8), (16, 16, 8)),
                 "dq": ((32, 32, 8), (32, 32, 8), (16, 32, 8))}
    elif precision == "tf32":
        table = {"fwd": ((128, 64, 8), (128, 16, 8), (32, 16, 8)),
                 "decode": ((16, 64, 8), (16, 64, 8), (16, 32, 8)),
                 "bwd": ((32, 32, 8), (16, 16, 8), (16, 16, 8)),
                 "dq": ((32, 32, 8), (32, 16, 8), (16, 16, 8))}
    else:
        table = {"fwd": ((32, 16, 4), (32, 16, 4), (16, 16, 4)),
                 "decode": ((16, 32, 4), (16, 32, 4), (16, 16, 8)),
                 "bwd": ((16, 16, 4), (16, 16, 8), (16, 16, 8)),
                 "dq": ((16, 16, 4), (16, 16, 8), (16, 16, 8))}
        # the forward's products sliced from a head of 128 on, dQ's from 256 on; dK/dV never (the whole head
        # in registers compiles without spills there, sliced it spills)
        chunk = 32 if cls >= (1 if kind in ("fwd", "decode") else 2) and kind != "bwd" else 0
    bm, bn, warps = table[kind][cls]
    cfg = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_E": be, "BLOCK_EV": bev, "CHUNK": chunk, "num_warps": warps}
    if dtype == torch.float32 and precision == "ieee" and kind == "bwd":
        # dK/dV on CUDA cores: software pipelining of the query tiles buys nothing there, and without a mask
        # (no branch around the loads) it multi-buffers them and spills kilobytes (head 256: 8 KB)
        cfg["num_stages"] = 1
    return cfg


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter: small, so that modest test shapes take the decode path


def decode_splits(BH: int, L: int, S: int, block_m: int, block_n: int, num_sms: int) -> int:
    """How many programs share the keys of one (row block, head) in forward: 1 (the general kernel) unless
    there are few query rows (``L ≤ DECODE_MAX_ROWS``), at least 4 key tiles, and fewer (row block, head)
    programs than SMs; then enough splits to give every SM about two programs, each at least two tiles."""
    if L > DECODE_MAX_ROWS:
        return 1
    tiles = triton.cdiv(S, block_n)
    programs = BH * triton.cdiv(L, block_m)
    if tiles < 4 or programs >= num_sms:
        return 1
    splits = max(1, min(triton.cdiv(2 * num_sms, programs), tiles // 2))
    per = triton.cdiv(tiles, splits)
    return triton.cdiv(tiles, per)


def _mask_args(mask: torch.Tensor | None, like: torch.Tensor):
    """``(pointer tensor, MASK_KIND, strides)``: a bool mask as bytes, a broadcast (size-1) dim as stride 0."""
    if mask is None:
        return like, 0, (0, 0, 0, 0)
    strides = tuple(0 if mask.size(i) == 1 else mask.stride(i) for i in range(4))
    if mask.dtype == torch.bool:
        return mask.view(torch.uint8), 1, strides
    return mask, 2, strides


def _scalars(E: int, scale: float, p_drop: float):
    scale = 0.0 if E == 0 else scale  # torch: 1/√0 times an empty product is 0, not NaN
    drop_scale = 0.0 if p_drop >= 1.0 else 1.0 / (1.0 - p_drop)
    return scale, scale * _LOG2E, drop_scale


def launch_attention_fwd(q, k, v, mask, seed, p_drop: float, is_causal: bool, diag: int, scale: float,
                         num_splits: int | None = None, config: dict | None = None):
    """Forward: ``(out (B, H, L, Ev) in q's dtype, lse₂ (B, H, L) float32)``, ``lse₂`` the log-sum-exp of each
    score row in base 2 (``log₂e · logsumexp(s)``, ``+inf`` for a row where no key takes part). ``num_splits``
    forces the number of key splits (1: the general kernel); ``None`` picks (``decode_splits``). ``config``
    replaces entries of the tiles ``blocks`` picks (tests: the GPU's head-sliced products on the interpreter)."""
    B, H, L, E = q.shape
    Hk, S = k.shape[1], k.shape[2]
    Hv, Ev = v.shape[1], v.shape[3]
    out = torch.empty((B, H, L, Ev), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, L), dtype=torch.float32, device=q.device)
    if B * H * L == 0:
        return out, lse
    on_gpu = not _interpreting(q)
    dot_dtype, precision = _dot_config(q)
    dropout = seed is not None and p_drop > 0.0
    scale, scale_log2, drop_scale = _scalars(E, scale, p_drop)
    mask_t, mask_kind, ms = _mask_args(mask, q)
    if num_splits is None:
        dec = blocks(L, S, E, Ev, q.dtype, on_gpu, "decode")
        num_splits = decode_splits(B * H, L, S, dec["BLOCK_M"], dec["BLOCK_N"], _num_sms(q.device))
    kind = "decode" if num_splits > 1 else "fwd"
    cfg = {**blocks(L, S, E, Ev, q.dtype, on_gpu, kind), **(config or {})}
    tiles = triton.cdiv(S, cfg["BLOCK_N"])
    num_splits = max(1, min(num_splits, tiles))
    per_split = triton.cdiv(tiles, num_splits)
    num_splits = triton.cdiv(tiles, per_split) if tiles else 1
    split = num_splits > 1
    if split:
        part = torch.empty((B * H, num_splits, L, Ev), dtype=torch.float32, device=q.device)
        ml = torch.empty((B * H, num_splits, 2, L), dtype=torch.float32, device=q.device)
    else:
        part = ml = lse
    grid = (triton.cdiv(L, cfg["BLOCK_M"]), B * H, num_splits)
    attn_fwd_kernel[grid](
        q, k, v, mask_t, q if seed is None else seed, out, lse, part, ml,
        H, L, S, E, Ev, H // Hk, H // Hv, per_split,
        *q.stride(), *k.stride(), *v.stride(), *ms, *out.stride(),
        scale_log2, diag, p_drop, drop_scale,
        MASK_KIND=mask_kind, IS_CAUSAL=is_causal, DROPOUT=dropout, SPLIT=split,
        DOT_DTYPE=dot_dtype, PRECISION=precision, **cfg)
    if split:
        attn_fwd_combine_kernel[(triton.cdiv(L, cfg["BLOCK_M"]), B * H)](
            part, ml, out, lse, H, L, Ev, num_splits, *out.stride(), drop_scale,
            BLOCK_M=cfg["BLOCK_M"], BLOCK_EV=cfg["BLOCK_EV"], **({"num_warps": 4} if on_gpu else {}))
    return out, lse


def launch_attention_bwd(grad_out, q, k, v, mask, out, lse, seed, p_drop: float, is_causal: bool, diag: int,
                         scale: float, mask_grad: bool, config: dict | None = None):
    """Backward: ``(dq, dk, dv, dmask)`` with dq/dk/dv contiguous in the inputs' shapes and dtype, and ``dmask``
    the float32 ``(B, H, L, S)`` gradient of the scores (of a float mask, before its broadcast is reduced)
    when ``mask_grad``, else ``None``. ``config`` as in ``launch_attention_fwd``."""
    B, H, L, E = q.shape
    Hk, S = k.shape[1], k.shape[2]
    Hv, Ev = v.shape[1], v.shape[3]
    dev = q.device
    dq = torch.empty((B, H, L, E), dtype=q.dtype, device=dev)
    dk = torch.empty((B, Hk, S, E), dtype=k.dtype, device=dev)
    dv = torch.empty((B, Hv, S, Ev), dtype=v.dtype, device=dev)
    dmask = torch.zeros((B, H, L, S), dtype=torch.float32, device=dev) if mask_grad else None
    if B * H == 0:
        return dq, dk, dv, dmask
    if L == 0 or S == 0:  # nothing attends: every gradient is zero
        return dq.zero_(), dk.zero_(), dv.zero_(), dmask
    on_gpu = not _interpreting(q)
    dot_dtype, precision = _dot_config(q)
    dropout = seed is not None and p_drop > 0.0
    scale, scale_log2, drop_scale = _scalars(E, scale, p_drop)
    mask_t, mask_kind, ms = _mask_args(mask, q)
    seed_t = q if seed is None else seed
    cfg = {**blocks(L, S, E, Ev, q.dtype, on_gpu, "bwd"), **(config or {})}
    cfg_dq = {**blocks(L, S, E, Ev, q.dtype, on_gpu, "dq"), **(config or {})}
    warps = {"num_warps": 4} if on_gpu else {}
    delta = torch.empty((B, H, L), dtype=torch.float32, device=dev)
    attn_bwd_preprocess_kernel[(triton.cdiv(L, cfg["BLOCK_M"]), B * H)](
        out, grad_out, delta, H, L, Ev, *out.stride(), *grad_out.stride(),
        BLOCK_M=cfg["BLOCK_M"], BLOCK_EV=cfg["BLOCK_EV"], **warps)
    common = dict(MASK_KIND=mask_kind, IS_CAUSAL=is_causal, DROPOUT=dropout, DOT_DTYPE=dot_dtype,
                  PRECISION=precision)
    tiles = {key: val for key, val in cfg.items() if key != "CHUNK"}
    dmask_t = dq if dmask is None else dmask
    # dK and dV per key block; with Hk == Hv one pass computes both, else one pass per tensor.
    passes = [(Hk, True, True)] if Hk == Hv else [(Hk, True, False), (Hv, False, True)]
    for heads, want_k, want_v in passes:
        attn_bwd_dkdv_kernel[(triton.cdiv(S, cfg["BLOCK_N"]), B * heads)](
            q, k, v, mask_t, seed_t, grad_out, lse, delta, dk, dv, dmask_t,
            H, L, S, E, Ev, H // Hk, H // Hv, H // heads,
            *q.stride(), *k.stride(), *v.stride(), *ms, *grad_out.stride(), *dk.stride(), *dv.stride(),
            scale, scale_log2, diag, p_drop, drop_scale,
            COMPUTE_DK=want_k, COMPUTE_DV=want_v, WRITE_DMASK=mask_grad and want_k, **common, **tiles)
    attn_bwd_dq_kernel[(triton.cdiv(L, cfg_dq["BLOCK_M"]), B * H)](
        q, k, v, mask_t, seed_t, grad_out, lse, delta, dq,
        H, L, S, E, Ev, H // Hk, H // Hv,
        *q.stride(), *k.stride(), *v.stride(), *ms, *grad_out.stride(), *dq.stride(),
        scale, scale_log2, diag, p_drop, drop_scale, **common, **cfg_dq)
    return dq, dk, dv, dmask


def dropout_keep_mask(seed: torch.Tensor, B: int, H: int, L: int, S: int, p_drop: float) -> torch.Tensor:
    """The keep-mask (bool ``(B, H, L, S)``, True = kept) that the kernels draw for ``seed`` (int64 (2,)), by
    the same Triton code (``_keep``)."""
    out = torch.empty((B * H, L, S), dtype=torch.uint8, device=seed.device)
    if out.numel():
        bm, bn = (32, 64) if seed.device.type == "cuda" else (64, 64)
        dropout_keep_kernel[(triton.cdiv(L, bm), triton.cdiv(S, bn), B * H)](
            seed, out, L, S, p_drop, BLOCK_M=bm, BLOCK_N=bn)
    return out.view(torch.bool).reshape(B, H, L, S)


# ---------------------------------------------------------------------------------------------------------
# AOT budgets (``python -m fastseq aot``, fastseq/aot.py): the most spill bytes (stores + loads, from ptxas -v)
# and local-memory instructions (LDL + STL in the SASS) any specialisation of each kernel may have on sm_80 and
# sm_90. Zero unless a reason is written beside it; a non-zero budget is the measured worst case (Triton 3.6.0,
# ptxas 12.8), so nothing may grow past it unnoticed.
# ---------------------------------------------------------------------------------------------------------

AOT_BUDGETS = {
    "attn_fwd_kernel": {"spill_bytes": 228, "local_ops": 57},  # sm_80 only, 128-row tiles of a head of 64 with
    # a float mask, causality and dropout all on (the Philox state of a 128 x 16 tile on top of the score and
    # accumulator tiles): TF32 228 B, fp16/bf16 36 B. Without dropout, and everywhere on sm_90: 0.
    "attn_bwd_dkdv_kernel": {"spill_bytes": 680, "local_ops": 170},  # head 256 (16 x 16 tiles, 8 warps): dK and
    # dV accumulators of 16 x 256 float32 each plus the k, v, q and dO tiles of the whole head; worst with
    # dropout: sm_80 TF32 680 B, fp16/bf16 436 B, float32 100 B; sm_90 TF32 432 B, fp16/bf16 108 B. Heads
    # <= 128: at most 24 B (sm_80 TF32, float mask with its gradient, dropout), else 0.
    "attn_bwd_dq_kernel": {"spill_bytes": 56, "local_ops": 14},  # sm_80 fp16/bf16 head 256 (16 x 32 tiles) with
    # a mask and causality: 56 B; sm_90 float32 head 128 (16 x 16, causal, no mask): 48 B; else 0 or <= 8 B.
}
