"""The "cuda" backend's attention launchers: the CUDA kernels of the compiled extension
(``csrc/cuda/attention_fwd.cu``, ``csrc/cuda/attention_bwd.cu``), behind the launcher interface of the Triton
kernels (``kernels/attention.py``), so that the operators ``torch.ops.fastseq.sdpa`` / ``sdpa_backward``
(``fastseq/ops/attention.py``) run either backend through ``_kernels(backend)`` unchanged.

The kernels are torch operators, ``torch.ops.fastseq_cpp.sdpa_fwd``, ``sdpa_bwd`` and ``sdpa_dropout_mask``
(schemas in ``csrc/attention_schema.h``, CUDA implementations only), registered when ``fastseq._C`` loads;
their fake (meta) implementations are registered here, so ``torch.library.opcheck`` and ``torch.compile`` see
their output shapes. They have no autograd of their own: ``fastseq::sdpa`` carries it.

Both backends compute the same thing in the same units: ``lse`` in base 2, the same Philox counters for the
dropout keep-mask (a seed gives the same mask on either), the same skipped tiles. Limits of the CUDA kernels:
float32, float16 and bfloat16 (float32 exactly, on CUDA cores; the half types on tensor cores with float32
accumulation), head sizes ``E`` and ``Ev`` up to :data:`MAX_HEAD_SIZE`, a GPU of compute capability 8.0 or
newer; any strides, masks, GQA grouping, lengths.
"""

from __future__ import annotations

import torch

import fastseq._C  # noqa: F401  (loading the extension registers torch.ops.fastseq_cpp)

# The operator namespace the launchers call (the CPU emulation tests point it at their own build).
_ops = torch.ops.fastseq_cpp

# What the CUDA attention kernels take (csrc/cuda/attention_cuda_ops.cpp: kMaxHeadSize, check_qkv).
MAX_HEAD_SIZE = 256
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def launch_attention_fwd(q, k, v, mask, seed, p_drop: float, is_causal: bool, diag: int, scale: float,
                         num_splits: int | None = None, config: dict | None = None):
    """Forward: ``(out (B, H, L, Ev) in q's dtype, lse₂ (B, H, L) float32)`` as the Triton launcher's.
    ``num_splits`` forces the number of key splits of the decode path (1: the general kernel; ``None``: the
    kernel picks). ``config`` (the Triton launcher's tile override) does not apply: the CUDA tiles are
    compiled in."""
    _no_config(config)
    splits = -1 if num_splits is None else int(num_splits)
    return _ops.sdpa_fwd(q, k, v, mask, seed, float(p_drop), bool(is_causal), int(diag), float(scale), splits)


def launch_attention_bwd(grad_out, q, k, v, mask, out, lse, seed, p_drop: float, is_causal: bool, diag: int,
                         scale: float, mask_grad: bool, config: dict | None = None):
    """Backward: ``(dq, dk, dv, dmask)`` as the Triton launcher's: dq/dk/dv contiguous in the inputs' shapes
    and dtype, ``dmask`` the float32 ``(B, H, L, S)`` gradient of the scores when ``mask_grad``, else
    ``None``."""
    _no_config(config)
    dq, dk, dv, dmask = _ops.sdpa_bwd(grad_out, q, k, v, mask, out, lse, seed, float(p_drop), bool(is_causal),
                                      int(diag), float(scale), bool(mask_grad))
    return dq, dk, dv, dmask if mask_grad else None


def dropout_keep_mask(seed: torch.Tensor, B: int, H: int, L: int, S: int, p_drop: float) -> torch.Tensor:
    """The keep-mask (bool ``(B, H, L, S)``, True = kept) that the CUDA kernels draw for ``seed`` (int64 (2,)
    on the GPU); the same as the Triton kernels' for the same seed."""
    return _ops.sdpa_dropout_mask(seed, B, H, L, S, float(p_drop))


def _no_config(config):
    if config:
        raise ValueError(f"the CUDA attention kernels' tiles are compiled in: config must be None, got {config!r}")


# ---------------------------------------------------------------------------------------------------------
# Fake (meta) implementations: the output shapes, from the input shapes alone
# ---------------------------------------------------------------------------------------------------------


def _fwd_fake(q, k, v, mask, seed, p_drop, is_causal, diag, scale, num_splits):
    B, H, L, _ = q.shape
    return q.new_empty((B, H, L, v.shape[-1])), q.new_empty((B, H, L), dtype=torch.float32)


def _bwd_fake(grad_out, q, k, v, mask, out, lse, seed, p_drop, is_causal, diag, scale, mask_grad):
    B, H, L, _ = q.shape
    dmask = q.new_empty((B, H, L, k.shape[2]) if mask_grad else (0,), dtype=torch.float32)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dmask


def _dropout_mask_fake(seed, B, H, L, S, p_drop):
    return seed.new_empty((B, H, L, S), dtype=torch.bool)


def register_fakes(namespace: str) -> None:
    """Registers the fake implementations of ``namespace``'s sdpa_* operators (``fastseq_cpp`` here; the
    emulation tests' build has its own namespace)."""
    torch.library.register_fake(f"{namespace}::sdpa_fwd", _fwd_fake)
    torch.library.register_fake(f"{namespace}::sdpa_bwd", _bwd_fake)
    torch.library.register_fake(f"{namespace}::sdpa_dropout_mask", _dropout_mask_fake)


register_fakes("fastseq_cpp")
