"""``fastseq.scaled_dot_product_attention``: ``torch.nn.functional.scaled_dot_product_attention`` on fastseq's
kernels.

Semantics are torch's (its math backend where its backends disagree): bool masks (True takes part) and float
masks (added to the scores, differentiable) broadcast from any shape that broadcasts to the scores
``(..., H, L, S)``; ``is_causal`` (top-left aligned ``tril`` of ``L × S``); ``scale``; ``enable_gqa``; any
number of leading dimensions (2-D inputs have no head dimension); a value head size ``Ev ≠ E``; dropout at any
``p`` (``p ≥ 1`` gives zeros, ``p ≤ 0`` none); rows where no key takes part give 0 and zero gradients.

The call is validated here first, whatever the backend, raising what torch raises (``TypeError`` for an
argument of the wrong type, ``RuntimeError`` for shapes, dtypes, devices, a mask with ``is_causal``, ``p > 1``),
with messages that name the argument, what was expected and what was given. Then:

- ``backend="torch"`` (or ``"auto"`` where no fastseq kernel can run the call: CPU tensors, float64, head size
  over ``MAX_HEAD_SIZE``) calls torch's own function;
- a kernel backend (``"triton"``) normalises the call to 4-D — leading dimensions broadcast and flattened to
  one batch dimension (a view where the strides allow, else a copy of the inputs, never of anything
  ``L × S``), a broadcast query head as stride 0, key/value heads mapped by index (GQA, or one head shared),
  the mask reshaped to 4-D with its broadcast dimensions kept at size 1 — and calls
  ``torch.ops.fastseq.sdpa``. Autograd runs through that operator; the reshapes around it reduce gradients
  over broadcast dimensions.

Tensor subclasses: ``torch.nn.attention.bias.CausalBias`` masks become the kernels' causal masking with the
bias's alignment (upper-left: ``is_causal``; lower-right: the diagonal shifted by ``S − L``); any other
argument with ``__torch_function__`` is handed to it as torch's function does.
"""

from __future__ import annotations

import math
import numbers
from typing import Optional

import torch
from torch import Tensor
from torch.nn.attention.bias import CausalBias, CausalVariant
from torch.overrides import handle_torch_function, has_torch_function

from fastseq import dispatch as _dispatch
from fastseq.ops import attention as _ops

# torch's own function, bound at import: fastseq's sdpa_override may later put fastseq's in its place.
_TORCH_SDPA = torch._C._nn.scaled_dot_product_attention
# Largest head size (E and Ev) the kernels take; "auto" gives larger ones to torch.
MAX_HEAD_SIZE = _ops.MAX_HEAD_SIZE
_NAME = "scaled_dot_product_attention"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _check_types(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa) -> None:
    for pos, (label, t) in enumerate((("query", query), ("key", key), ("value", value)), 1):
        if not isinstance(t, Tensor):
            raise TypeError(f"{_NAME}(): argument '{label}' (position {pos}) must be Tensor, not {type(t).__name__}")
    if attn_mask is not None and not isinstance(attn_mask, Tensor):
        raise TypeError(f"{_NAME}(): argument 'attn_mask' must be Tensor or None, not {type(attn_mask).__name__}")
    if not isinstance(dropout_p, numbers.Real):
        raise TypeError(f"{_NAME}(): argument 'dropout_p' must be float, not {type(dropout_p).__name__}")
    if not isinstance(is_causal, bool):
        raise TypeError(f"{_NAME}(): argument 'is_causal' must be bool, not {type(is_causal).__name__}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, numbers.Real)):
        raise TypeError(f"{_NAME}(): argument 'scale' must be float or None, not {type(scale).__name__}")
    if not isinstance(enable_gqa, bool):
        raise TypeError(f"{_NAME}(): argument 'enable_gqa' must be bool, not {type(enable_gqa).__name__}")


def _shape(t: Tensor) -> str:
    return str(tuple(t.shape))


class _Plan:
    """The normalised 4-D call: batch shape, heads, sizes and the output shape."""

    def __init__(self, batch, H, L, S, E, Ev, out_shape):
        self.batch, self.H, self.L, self.S, self.E, self.Ev, self.out_shape = batch, H, L, S, E, Ev, out_shape
        self.B = math.prod(batch)


def _validate(query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor], dropout_p: float,
              is_causal: bool, enable_gqa: bool) -> _Plan:
    """torch's checks, in torch's exception classes, with messages naming argument, expectation and value."""
    if not (query.dtype == key.dtype == value.dtype):
        raise RuntimeError(f"Expected query, key, and value to have the same dtype, but got query.dtype: "
                           f"{_dtype_name(query.dtype)} key.dtype: {_dtype_name(key.dtype)} and value.dtype: "
                           f"{_dtype_name(value.dtype)} instead.")
    if not (query.device == key.device == value.device):
        raise RuntimeError(f"Expected query, key, and value to have the same device type, but got query.device: "
                           f"{query.device} key.device: {key.device} and value.device: {value.device} instead.")
    if query.dim() < 2 or key.dim() < 2 or value.dim() < 2:
        raise RuntimeError(f"Expected query, key, and value to all be at least 2 dimensional, but got query.dim: "
                           f"{query.dim()} key.dim: {key.dim()} and value.dim: {value.dim()} instead.")
    if not query.is_floating_point():
        raise RuntimeError(f"{_NAME}: expected query, key and value to be floating-point tensors, but got "
                           f"{_dtype_name(query.dtype)}")
    if attn_mask is not None:
        if attn_mask.dtype not in (torch.bool, torch.float32, query.dtype):
            raise RuntimeError(f"Expected attn_mask dtype to be bool or float or to match query dtype, but got "
                               f"attn_mask.dtype: {_dtype_name(attn_mask.dtype)} and query.dtype: "
                               f"{_dtype_name(query.dtype)} instead.")
        if attn_mask.device != query.device:
            raise RuntimeError(f"Expected attn_mask to be on the device of query ({query.device}), but got "
                               f"attn_mask.device: {attn_mask.device} instead.")
        if is_causal:
            raise RuntimeError("_scaled_dot_product_attention: Explicit attn_mask should not be set when "
                               "is_causal=True")
    if key.size(-1) != query.size(-1):
        raise RuntimeError(f"{_NAME}: key.size(-1) must be equal to query.size(-1) (the head size E). Expected "
                           f"{query.size(-1)}, got {key.size(-1)} (query {_shape(query)}, key {_shape(key)})")
    if value.size(-2) != key.size(-2):
        raise RuntimeError(f"{_NAME}: value.size(-2) must be equal to key.size(-2) (the number of keys S). "
                           f"Expected {key.size(-2)}, got {value.size(-2)} (key {_shape(key)}, value "
                           f"{_shape(value)})")
    if enable_gqa and min(query.dim(), key.dim(), value.dim()) < 3:
        raise IndexError(f"{_NAME}: enable_gqa=True needs a head dimension (-3) in query, key and value; got "
                         f"query.dim: {query.dim()} key.dim: {key.dim()} and value.dim: {value.dim()}")
    q3, k3, v3 = (t if t.dim() >= 3 else t.unsqueeze(0) for t in (query, key, value))
    try:
        batch = tuple(torch.broadcast_shapes(q3.shape[:-3], k3.shape[:-3], v3.shape[:-3]))
    except RuntimeError:
        raise RuntimeError(f"{_NAME}: the leading (batch) dimensions of query, key and value must broadcast; got "
                           f"query {_shape(query)}, key {_shape(key)} and value {_shape(value)}") from None
    Hq, Hk, Hv = q3.size(-3), k3.size(-3), v3.size(-3)
    if enable_gqa and not Hq == Hk == Hv:
        if Hk == 0 or Hv == 0 or Hq % Hk or Hq % Hv:
            raise RuntimeError(f"Number of heads in key and value must divide the number of heads in query "
                               f"(enable_gqa=True): got {Hq} query heads, {Hk} key heads and {Hv} value heads")
        H = Hq
    else:
        H = max(Hq, Hk, Hv)
        for label, h in (("query", Hq), ("key", Hk), ("value", Hv)):
            if h not in (1, H):
                hint = "" if enable_gqa else "; pass enable_gqa=True for grouped-query attention"
                raise RuntimeError(f"{_NAME}: the head dimension (-3) of {label} must be 1 or {H} to broadcast, got "
                                   f"{h} (query {_shape(query)}, key {_shape(key)}, value {_shape(value)}){hint}")
        if min(Hq, Hk, Hv) == 0:
            H = 0
    L, S, E, Ev = query.size(-2), key.size(-2), query.size(-1), value.size(-1)
    if max(query.dim(), key.dim(), value.dim()) >= 3:
        out_shape = (*batch, H, L, Ev)
    else:
        out_shape = (L, Ev)
    if attn_mask is not None:
        target = (*batch, H, L, S)
        ok = attn_mask.dim() <= len(target) and all(
            m in (1, t) for m, t in zip(reversed(attn_mask.shape), reversed(target)))
        if not ok:
            raise RuntimeError(f"{_NAME}: attn_mask must broadcast to the shape of the attention scores "
                               f"{tuple(target) if len(out_shape) > 2 else (L, S)}; got attn_mask of shape "
                               f"{_shape(attn_mask)}")
    if dropout_p > 1.0:
        raise RuntimeError(f"dropout probability has to be between 0 and 1, but got {dropout_p}")
    return _Plan(batch, H, L, S, E, Ev, out_shape)


def _flatten(t: Tensor, plan: _Plan, heads: int) -> Tensor:
    """``t (..., h, n, d)`` (or 2-D) as ``(B, heads, n, d)``: leading dims broadcast to the batch and merged
    (a view where the strides allow), the head dim broadcast to ``heads`` (stride 0) when it is 1."""
    t = t if t.dim() >= 3 else t.unsqueeze(0)
    t = t.expand(*plan.batch, heads, t.size(-2), t.size(-1))
    return t.reshape(plan.B, heads, t.size(-2), t.size(-1))


def _mask_4d(mask: Tensor, plan: _Plan) -> Tensor:
    """The mask as ``(1 or B, 1 or H, 1 or L, 1 or S)``: broadcast dimensions stay size 1."""
    target_dims = len(plan.batch) + 3
    m = mask.reshape((1,) * (target_dims - mask.dim()) + tuple(mask.shape))
    tail = tuple(m.shape[-3:])
    if all(d == 1 for d in m.shape[:-3]):
        return m.reshape(1, *tail)
    return m.expand(*plan.batch, *tail).reshape(plan.B, *tail)


def _autocast(tensors: list[Optional[Tensor]], device_type: str) -> list[Optional[Tensor]]:
    """torch's autocast casts sdpa's floating arguments (not float64) to the autocast dtype: the same here."""
    if not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return [t.to(dtype) if t is not None and t.is_floating_point() and t.dtype != torch.float64 else t
            for t in tensors]


def _kernel_limits(plan: _Plan) -> Optional[str]:
    if max(plan.E, plan.Ev) > MAX_HEAD_SIZE:
        return f"head sizes up to {MAX_HEAD_SIZE} (got E={plan.E}, Ev={plan.Ev})"
    return None


def _choose(backend: str, device: torch.device, dtype: torch.dtype, plan: _Plan, training: bool) -> str:
    chosen = _dispatch.select("sdpa", device, dtype, backend, q_len=plan.L, kv_len=plan.S,
                              head_dim=max(plan.E, plan.Ev), training=training)
    if chosen == "torch":
        return chosen
    reason = _kernel_limits(plan)
    if reason is not None:
        if backend == "auto":
            return "torch"
        raise _dispatch.BackendUnavailableError(f"backend={backend!r} cannot run sdpa: its kernels take {reason}; "
                                                f"use backend='torch' or 'auto'")
    return chosen


def scaled_dot_product_attention(query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor] = None,
                                 dropout_p: float = 0.0, is_causal: bool = False, scale: Optional[float] = None,
                                 enable_gqa: bool = False, *, backend: str = "auto") -> Tensor:
    """``torch.nn.functional.scaled_dot_product_attention`` with fastseq's kernels; one extra keyword,
    ``backend`` (``"auto"``, ``"triton"``, ``"cuda"``, ``"cpp"``, ``"torch"``). Returns ``(..., H, L, Ev)``."""
    _dispatch.check_backend_name(backend)
    if isinstance(attn_mask, CausalBias):
        return _causal_bias_call(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, backend)
    args = (query, key, value) if attn_mask is None else (query, key, value, attn_mask)
    if has_torch_function(args):
        return handle_torch_function(scaled_dot_product_attention, args, query, key, value, attn_mask=attn_mask,
                                     dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                                     enable_gqa=enable_gqa, backend=backend)
    return _attention(query, key, value, attn_mask, dropout_p, is_causal, 0, scale, enable_gqa, backend)


def _causal_bias_call(query, key, value, bias: CausalBias, dropout_p, is_causal, scale, enable_gqa, backend):
    """A ``CausalBias`` mask: torch's own function takes it as it is; the kernels take it as causal masking
    with the bias's alignment (what its ``__torch_function__`` makes of it for torch)."""
    if is_causal:
        raise ValueError("CausalBias should not be used with causal=True")
    _check_types(query, key, value, None, dropout_p, is_causal, scale, enable_gqa)
    if bias.seq_len_q == bias.seq_len_kv or bias.variant == CausalVariant.UPPER_LEFT:
        diagonal = 0
    else:
        L, S = query.size(-2), key.size(-2)
        if (bias.seq_len_q, bias.seq_len_kv) != (L, S):
            raise RuntimeError(f"{_NAME}: a lower-right CausalBias must match the attention's (L, S) = ({L}, {S}); "
                               f"got ({bias.seq_len_q}, {bias.seq_len_kv})")
        diagonal = S - L
    return _attention(query, key, value, None, dropout_p, True, diagonal, scale, enable_gqa, backend,
                      torch_mask=bias)


def _attention(query, key, value, attn_mask, dropout_p, is_causal, diagonal, scale, enable_gqa, backend,
               torch_mask=None):
    """The validated call: torch's function or the fastseq operator. ``is_causal`` with ``diagonal`` lets key
    j take part for query i when ``j ≤ i + diagonal``; ``torch_mask`` is what torch's function is given instead
    (a CausalBias) when it runs the call."""
    _check_types(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    from_bias = torch_mask is not None
    device = query.device
    q, k, v, m = _autocast([query, key, value, attn_mask], device.type)
    plan = _validate(q, k, v, m, float(dropout_p), is_causal and not from_bias, enable_gqa)
    training = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, m))
    chosen = _choose(backend, device, q.dtype, plan, training)
    if chosen == "torch":
        if from_bias:  # what CausalBias makes of itself for torch, without its __torch_function__ (which
            # recognises only torch's function object, which sdpa_override may have replaced)
            if diagonal == 0:
                return _TORCH_SDPA(query, key, value, None, dropout_p, True, scale=scale, enable_gqa=enable_gqa)
            return _TORCH_SDPA(query, key, value, torch_mask._materialize(device), dropout_p, False, scale=scale,
                               enable_gqa=enable_gqa)
        return _TORCH_SDPA(query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa)
    H = plan.H
    q4 = _flatten(q, plan, H)
    k4 = _flatten(k, plan, k.size(-3) if k.dim() >= 3 else 1)
    v4 = _flatten(v, plan, v.size(-3) if v.dim() >= 3 else 1)
    m4 = None if m is None else _mask_4d(m, plan)
    p = float(dropout_p)
    seed = _ops.draw_dropout_seed(device) if p > 0.0 else None
    if scale is None:
        scale_f = 1.0 / math.sqrt(plan.E) if plan.E > 0 else 0.0
    else:
        scale_f = float(scale)
    out, _ = torch.ops.fastseq.sdpa(q4, k4, v4, m4, seed, max(p, 0.0), is_causal, diagonal, scale_f, chosen)
    return out.reshape(plan.out_shape)


__all__ = ["scaled_dot_product_attention"]
