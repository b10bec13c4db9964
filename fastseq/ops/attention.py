"""Operators of scaled dot-product attention: ``torch.ops.fastseq.sdpa`` and ``torch.ops.fastseq.sdpa_backward``.

They take the normalised 4-D form that :func:`fastseq.scaled_dot_product_attention` builds (it validates,
broadcasts the leading dimensions and picks the backend before it gets here):

- ``query (B, H, L, E)``, ``key (B, Hk, S, E)``, ``value (B, Hv, S, Ev)``, any strides (a broadcast query head
  may have stride 0); ``Hk`` and ``Hv`` divide ``H``: query head ``h`` uses key head ``h // (H / Hk)`` (GQA, and
  torch's broadcast of a single key/value head, by index mapping);
- ``attn_mask``: ``None`` or 4-D, each dimension 1 (broadcast) or full — ``(1 or B, 1 or H, 1 or L, 1 or S)``;
  bool (True takes part) or floating (added to the scores, differentiable). It goes to the kernels as it is
  stored, its size-1 dimensions as stride 0: never expanded to ``(B, H, L, S)``;
- ``dropout_seed``: ``None`` or an int64 tensor ``(2,)`` (Philox seed, stream) drawn by the caller from torch's
  generator (:func:`draw_dropout_seed`); the kernels regenerate the keep-mask from it in backward;
- ``is_causal`` with ``causal_diagonal``: keys ``j ≤ i + causal_diagonal`` take part (0: torch's
  ``is_causal``, top-left; ``S − L``: ``CausalBias``'s lower-right alignment);
- ``scale``: the resolved float (``1/√E`` when the caller gave none).

The forward returns ``(out (B, H, L, Ev) in the query's dtype, lse (B, H, L) float32)``: the log-sum-exp of
every score row in base 2 (``log₂e · logsumexp(scores)``, the units the kernels work in, so that backward
recomputes the probabilities without a change of base), ``+inf`` for a row where no key takes part (its output
is 0 and every gradient through it is 0).

Mask gradient: when a floating ``attn_mask`` requires grad, the backward kernel writes ``dS`` (the gradient of
the scores, which is the float mask's gradient before broadcasting) into a float32 ``(B, H, L, S)`` buffer,
each element once, and it is summed here over the mask's broadcast dimensions and cast to the mask's dtype.
That buffer exists only when the mask's gradient is needed (a choice: exact and deterministic, at
``4·B·H·L·S`` bytes for that call; atomics into the mask's own shape would save the memory but not be
deterministic). Without it nothing of size ``L × S`` is ever written.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


# The largest head size (E and Ev) the kernels take: a tile of rows spans the whole head, padded to a power of 2.
MAX_HEAD_SIZE = 256


def _kernels(backend: str):
    """The module of launchers for a kernel backend."""
    if backend == "triton":
        from fastseq.kernels import attention

        return attention
    if backend == "cuda":
        from fastseq import cuda_kernels

        return cuda_kernels
    raise RuntimeError(f"fastseq has no {backend!r} kernels for attention")


def draw_dropout_seed(device: torch.device) -> Tensor:
    """A Philox (seed, stream) pair, int64 ``(2,)`` on ``device``, drawn from torch's default generator of that
    device (so ``torch.manual_seed`` makes dropout repeatable). No host synchronisation on CUDA."""
    seed = torch.randint(0, 2**62, (1,), dtype=torch.int64, device=device)
    stream = torch.randint(0, 2**31, (1,), dtype=torch.int64, device=device)
    return torch.cat([seed, stream])


def dropout_keep_mask(seed: Tensor, shape: tuple[int, int, int, int], dropout_p: float,
                      backend: str = "triton") -> Tensor:
    """The keep-mask (bool ``(B, H, L, S)``, True = kept) that the kernels use for ``seed`` and ``dropout_p``,
    computed by the kernels' own random-number code: ``reference.scaled_dot_product_attention(...,
    dropout_keep=mask)`` then gives what the kernel gives."""
    B, H, L, S = shape
    return _kernels(backend).dropout_keep_mask(seed, B, H, L, S, float(dropout_p))


def _mask_grad_reduced(dmask_full: Tensor, mask: Tensor) -> Tensor:
    """``dS (B, H, L, S)`` summed over the dimensions where ``mask`` is broadcast, in ``mask``'s dtype."""
    dims = [i for i in range(4) if mask.size(i) == 1 and dmask_full.size(i) != 1]
    g = dmask_full.sum(dims, keepdim=True) if dims else dmask_full
    return g.to(mask.dtype).reshape(mask.shape).contiguous()


@torch.library.custom_op("fastseq::sdpa", mutates_args=())
def sdpa(query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor], dropout_seed: Optional[Tensor],
         dropout_p: float, is_causal: bool, causal_diagonal: int, scale: float,
         backend: str) -> tuple[Tensor, Tensor]:
    """Attention forward on the normalised 4-D form: ``(out, lse)``."""
    return _kernels(backend).launch_attention_fwd(query, key, value, attn_mask, dropout_seed, dropout_p, is_causal,
                                                  causal_diagonal, scale)


@sdpa.register_fake
def _(query, key, value, attn_mask, dropout_seed, dropout_p, is_causal, causal_diagonal, scale, backend):
    B, H, L, _ = query.shape
    out = query.new_empty((B, H, L, value.shape[-1]))
    lse = query.new_empty((B, H, L), dtype=torch.float32)
    return out, lse


@torch.library.custom_op("fastseq::sdpa_backward", mutates_args=())
def sdpa_backward(grad_out: Tensor, query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor],
                  out: Tensor, lse: Tensor, dropout_seed: Optional[Tensor], dropout_p: float, is_causal: bool,
                  causal_diagonal: int, scale: float, need_mask_grad: bool,
                  backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(d_query, d_key, d_value, d_mask)`` in the shapes of the inputs (contiguous); ``d_mask`` has the mask's
    shape and dtype when ``need_mask_grad`` (a floating mask), else it is an empty tensor."""
    dq, dk, dv, dmask_full = _kernels(backend).launch_attention_bwd(
        grad_out, query, key, value, attn_mask, out, lse, dropout_seed, dropout_p, is_causal, causal_diagonal,
        scale, need_mask_grad)
    dmask = _mask_grad_reduced(dmask_full, attn_mask) if need_mask_grad else query.new_empty((0,))
    return dq, dk, dv, dmask


@sdpa_backward.register_fake
def _(grad_out, query, key, value, attn_mask, out, lse, dropout_seed, dropout_p, is_causal, causal_diagonal,
      scale, need_mask_grad, backend):
    dmask = attn_mask.new_empty(attn_mask.shape) if need_mask_grad else query.new_empty((0,))
    return (query.new_empty(query.shape), key.new_empty(key.shape), value.new_empty(value.shape), dmask)


def _setup(ctx, inputs, output):
    query, key, value, attn_mask, dropout_seed, dropout_p, is_causal, causal_diagonal, scale, backend = inputs
    out, lse = output
    ctx.args = (dropout_p, is_causal, causal_diagonal, scale, backend)
    ctx.save_for_backward(query, key, value, attn_mask, dropout_seed, out, lse)
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out, _grad_lse):
    query, key, value, attn_mask, dropout_seed, out, lse = ctx.saved_tensors
    dropout_p, is_causal, causal_diagonal, scale, backend = ctx.args
    need = ctx.needs_input_grad
    need_mask_grad = attn_mask is not None and attn_mask.is_floating_point() and need[3]
    dq, dk, dv, dmask = sdpa_backward(grad_out, query, key, value, attn_mask, out, lse, dropout_seed, dropout_p,
                                      is_causal, causal_diagonal, scale, need_mask_grad, backend)
    return (dq if need[0] else None, dk if need[1] else None, dv if need[2] else None,
            dmask if need_mask_grad else None, None, None, None, None, None, None)


sdpa.register_autograd(_backward, setup_context=_setup)
