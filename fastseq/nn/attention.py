"""``fastseq.MultiheadAttention``: a drop-in subclass of ``torch.nn.MultiheadAttention`` on fastseq's attention.

Same constructor, parameters, ``state_dict``, input forms (batched, unbatched, ``batch_first``) and return
structure as torch's; one extra keyword-only argument, ``backend``. The forward pass is
``F.multi_head_attention_forward``'s, step for step, with the attention itself on
:func:`fastseq.scaled_dot_product_attention`:

- the in-projections are torch's (``F._in_projection_packed`` / ``F._in_projection``: the same matmuls);
- ``bias_k``/``bias_v`` and ``add_zero_attn`` append a key (and pad the masks) as torch does;
- ``key_padding_mask`` and ``attn_mask`` are canonicalised as torch does (bool becomes an additive ``-inf``
  float mask, a float mask is added as it is) and merged into one additive mask that *broadcasts* to
  ``(N, H, L, S)``: ``(1, 1, L, S)`` for a 2-D ``attn_mask``, ``(N, 1, 1, S)`` for a padding mask,
  ``(N, 1, L, S)`` for both, ``(N, H, L, S)`` only where a 3-D mask already has that many elements;
- ``is_causal`` is passed to the kernel as torch passes it to its sdpa (only with no padding mask and
  ``need_weights=False``; otherwise ``attn_mask`` is used);
- dropout ``p = self.dropout`` in training only;
- ``need_weights=True``: the output still comes from the fused kernel; the weights are computed separately,
  as torch computes them (softmax of the scaled scores plus the mask, dropout in training, mean over heads with
  ``average_attn_weights``). In training with dropout the weights' dropout is drawn independently of the
  kernel's (torch's output uses the dropped weights it returns; here the two are separate draws of the same
  distribution).

Where the backend resolves to ``"torch"`` (``"auto"`` on CPU, float64, a head size over the kernels' limit), for
nested tensors and for arguments with ``__torch_function__``, the call is torch's own ``forward`` (its
inference fast path included).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import has_torch_function

from fastseq import dispatch as _dispatch
from fastseq import functional as _functional
from fastseq.nn._base import FastModule


def _pad_key(mask: Optional[Tensor]) -> Optional[Tensor]:
    """One more key that takes part: a zero column appended to an additive mask."""
    return None if mask is None else F.pad(mask, (0, 1))


class MultiheadAttention(FastModule, nn.MultiheadAttention):
    """``torch.nn.MultiheadAttention`` with the attention on fastseq's kernels. ``backend``: see
    :func:`fastseq.backends`."""

    _op, _name, _torch_class = "sdpa", "MultiheadAttention", nn.MultiheadAttention

    def __init__(self, *args, backend: str = "auto", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._init_backend(backend)

    # -- dispatch ---------------------------------------------------------------------------------------

    def _resolve(self, query: Tensor, key: Tensor) -> str:
        device = query.device
        dtype = query.dtype
        if torch.is_autocast_enabled(device.type) and dtype != torch.float64:
            dtype = torch.get_autocast_dtype(device.type)
        backend = self._backend()
        # sequence lengths for "auto": dimension 0 of a sequence-first (or unbatched) input, else 1
        seq_dim = 1 if self.batch_first and query.dim() == 3 else 0
        training = torch.is_grad_enabled() and (query.requires_grad or any(p.requires_grad
                                                                           for p in self.parameters()))
        shaped = query.dim() in (2, 3) and key.dim() == query.dim()  # else the checks below raise
        chosen = _dispatch.select("sdpa", device, dtype, backend, q_len=query.size(seq_dim) if shaped else None,
                                  kv_len=key.size(seq_dim) if shaped else None, head_dim=self.head_dim,
                                  training=training)
        if chosen != "torch" and backend == "auto" and self.head_dim > _functional.MAX_HEAD_SIZE:
            return "torch"
        return chosen

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Optional[Tensor] = None,
                need_weights: bool = True, attn_mask: Optional[Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, Optional[Tensor]]:
        for label, t in (("query", query), ("key", key), ("value", value)):
            if not isinstance(t, Tensor):
                raise TypeError(f"MultiheadAttention.forward(): {label} must be a Tensor, got {type(t).__name__}")
        for label, t in (("key_padding_mask", key_padding_mask), ("attn_mask", attn_mask)):
            if t is not None and not isinstance(t, Tensor):
                raise TypeError(f"MultiheadAttention.forward(): {label} must be a Tensor or None, got "
                                f"{type(t).__name__}")
        tensors = (query, key, value, self.in_proj_weight, self.in_proj_bias, self.bias_k, self.bias_v,
                   self.out_proj.weight, self.out_proj.bias, key_padding_mask, attn_mask)
        if (query.is_nested or key.is_nested or value.is_nested or has_torch_function(tensors)
                or self._resolve(query, key) == "torch"):
            return super().forward(query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights,
                                   attn_mask=attn_mask, average_attn_weights=average_attn_weights,
                                   is_causal=is_causal)
        return self._fast_forward(query, key, value, key_padding_mask, need_weights, attn_mask,
                                  average_attn_weights, is_causal)

    # -- the fastseq path -------------------------------------------------------------------------------

    def _fast_forward(self, query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights,
                      is_causal):
        # torch's MultiheadAttention.forward canonicalises both masks (warning on mismatched types) ...
        key_padding_mask = F._canonical_mask(mask=key_padding_mask, mask_name="key_padding_mask",
                                             other_type=F._none_or_dtype(attn_mask), other_name="attn_mask",
                                             target_type=query.dtype)
        attn_mask = F._canonical_mask(mask=attn_mask, mask_name="attn_mask", other_type=None, other_name="",
                                      target_type=query.dtype, check_other=False)
        batched_first = self.batch_first and query.dim() == 3
        if batched_first:  # transposes keep the "is" relations the in-projection uses
            if key is value:
                if query is key:
                    query = key = value = query.transpose(1, 0)
                else:
                    query, key = (x.transpose(1, 0) for x in (query, key))
                    value = key
            else:
                query, key, value = (x.transpose(1, 0) for x in (query, key, value))

        # ... then F.multi_head_attention_forward: its checks, in its exception classes.
        num_heads = self.num_heads
        is_batched = F._mha_shape_check(query, key, value, key_padding_mask, attn_mask, num_heads)
        if not is_batched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        tgt_len, bsz, embed_dim = query.shape
        src_len = key.shape[0]
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint. You may use the Transformer "
                               "module method `generate_square_subsequent_mask` to create this mask.")
        if is_causal and key_padding_mask is None and not need_weights:
            attn_mask = None  # the hint is used as is (as torch gives it to its sdpa)
        else:
            is_causal = False
        if embed_dim != self.embed_dim:
            raise AssertionError(f"was expecting embedding dimension of {self.embed_dim}, but got {embed_dim}")
        head_dim = embed_dim // num_heads
        if head_dim * num_heads != embed_dim:
            raise AssertionError(f"embed_dim {embed_dim} not divisible by num_heads {num_heads}")
        if not self._qkv_same_embed_dim:
            if key.shape[:2] != value.shape[:2]:
                raise AssertionError(f"key's sequence and batch dims {key.shape[:2]} do not match value's "
                                     f"{value.shape[:2]}")
        elif key.shape != value.shape:
            raise AssertionError(f"key shape {key.shape} does not match value shape {value.shape}")

        # in-projection: torch's own
        if self._qkv_same_embed_dim:
            q, k, v = F._in_projection_packed(query, key, value, self.in_proj_weight, self.in_proj_bias)
        else:
            b_q = b_k = b_v = None
            if self.in_proj_bias is not None:
                b_q, b_k, b_v = self.in_proj_bias.chunk(3)
            q, k, v = F._in_projection(query, key, value, self.q_proj_weight, self.k_proj_weight,
                                       self.v_proj_weight, b_q, b_k, b_v)

        # attn_mask as (1 or N·H, L, S)
        if attn_mask is not None:
            if attn_mask.dim() == 2:
                if attn_mask.shape != (tgt_len, src_len):
                    raise RuntimeError(f"The shape of the 2D attn_mask is {attn_mask.shape}, but should be "
                                       f"{(tgt_len, src_len)}.")
                attn_mask = attn_mask.unsqueeze(0)
            elif attn_mask.shape != (bsz * num_heads, tgt_len, src_len):
                raise RuntimeError(f"The shape of the 3D attn_mask is {attn_mask.shape}, but should be "
                                   f"{(bsz * num_heads, tgt_len, src_len)}.")

        if self.bias_k is not None and self.bias_v is not None:
            k = torch.cat([k, self.bias_k.repeat(1, bsz, 1)])
            v = torch.cat([v, self.bias_v.repeat(1, bsz, 1)])
            attn_mask, key_padding_mask = _pad_key(attn_mask), _pad_key(key_padding_mask)
        elif self.bias_k is not None or self.bias_v is not None:
            raise AssertionError("bias_k and bias_v must both be set or both be None")

        # (N, H, n, head_dim) views
        q = q.view(tgt_len, bsz * num_heads, head_dim).transpose(0, 1).view(bsz, num_heads, tgt_len, head_dim)
        k = k.view(k.shape[0], bsz * num_heads, head_dim).transpose(0, 1).view(bsz, num_heads, -1, head_dim)
        v = v.view(v.shape[0], bsz * num_heads, head_dim).transpose(0, 1).view(bsz, num_heads, -1, head_dim)
        if self.add_zero_attn:
            zeros = torch.zeros((bsz, num_heads, 1, head_dim), dtype=k.dtype, device=k.device)
            k = torch.cat([k, zeros], dim=2)
            v = torch.cat([v, zeros.to(v.dtype)], dim=2)
            attn_mask, key_padding_mask = _pad_key(attn_mask), _pad_key(key_padding_mask)
        src_len = k.size(2)

        # one additive mask broadcasting to (N, H, L, S), never expanded
        mask = None
        if attn_mask is not None:
            mask = attn_mask.unsqueeze(0) if attn_mask.size(0) == 1 else attn_mask.view(bsz, num_heads, tgt_len,
                                                                                         src_len)
        if key_padding_mask is not None:
            if key_padding_mask.shape[0] != bsz:
                raise AssertionError(f"Expected key_padded_mask.shape[0] to be {bsz}, but got "
                                     f"{key_padding_mask.shape[0]}")
            if key_padding_mask.shape[1] != src_len:
                raise AssertionError(f"Expected key_padded_mask.shape[1] to be {src_len}, but got "
                                     f"{key_padding_mask.shape[1]}")
            kpm = key_padding_mask.view(bsz, 1, 1, src_len)
            mask = kpm if mask is None else mask + kpm

        dropout_p = self.dropout if self.training else 0.0
        out = _functional.scaled_dot_product_attention(q, k, v, mask, dropout_p, is_causal, backend=self._backend())
        out = out.permute(2, 0, 1, 3).reshape(bsz * tgt_len, embed_dim)
        out = F.linear(out, self.out_proj.weight, self.out_proj.bias).view(tgt_len, bsz, -1)

        weights = None
        if need_weights:
            weights = self._weights(q, k, mask, dropout_p, average_attn_weights)
            if mask is not None:
                # torch computes this output from the weights, NaN where a query has no key (softmax of -inf
                # only); the kernel gives 0 there: the same NaN rows as torch's.
                dead = (mask == float("-inf")).all(-1).any(1)  # (N or 1, L or 1)
                out = out.masked_fill(dead.transpose(0, 1).unsqueeze(-1), float("nan"))
        if not is_batched:
            out = out.squeeze(1)
            if weights is not None:
                weights = weights.squeeze(0)
        elif batched_first:
            out = out.transpose(1, 0)
        return out, weights

    @staticmethod
    def _weights(q: Tensor, k: Tensor, mask: Optional[Tensor], dropout_p: float, average: bool) -> Tensor:
        """The attention weights as torch's ``need_weights=True`` path computes them, ``(N, H, L, S)``."""
        scores = (q * math.sqrt(1.0 / float(q.size(-1)))) @ k.transpose(-2, -1)
        if mask is not None:
            scores = scores + mask
        weights = torch.softmax(scores, dim=-1)
        if dropout_p > 0.0:
            weights = F.dropout(weights, p=dropout_p)
        return weights.mean(dim=1) if average else weights


__all__ = ["MultiheadAttention"]
