"""Hugging Face transformers: ``fastseq.register_hf_attention()`` registers fastseq's attention as an attention
implementation, so that ``AutoModel.from_pretrained(..., attn_implementation="fastseq")`` (or
``model.set_attn_implementation("fastseq")``) runs it.

transformers is optional: it is imported only when the function is called, which raises ``ImportError`` (saying
so) where it is not installed. The wrapped forward follows transformers' own ``sdpa_attention_forward``:
key/value heads repeated for grouped-query attention only where needed (fastseq's sdpa takes ``enable_gqa``), the
mask cut to the key length, ``is_causal`` where the module is causal, has no mask and more than one query, the
output transposed to ``(batch, seq, heads, head_dim)``; no attention weights are returned.
"""

from __future__ import annotations

from typing import Optional

import torch

from fastseq import dispatch as _dispatch
from fastseq import functional as _functional


def _make_forward(backend: str):
    def fastseq_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                                  value: torch.Tensor, attention_mask: Optional[torch.Tensor],
                                  dropout: float = 0.0, scaling: Optional[float] = None,
                                  is_causal: Optional[bool] = None, **kwargs):
        # query (B, H, L, D); key/value (B, H_kv, S, D)
        enable_gqa = key.size(1) != query.size(1)
        causal_mask = attention_mask
        if attention_mask is not None and attention_mask.dim() == 4:
            causal_mask = attention_mask[:, :, :, : key.shape[-2]]
        if is_causal is None:
            is_causal = query.shape[2] > 1 and causal_mask is None and getattr(module, "is_causal", True)
        if torch.jit.is_tracing() and isinstance(is_causal, torch.Tensor):
            is_causal = bool(is_causal.item())
        out = _functional.scaled_dot_product_attention(query, key, value, causal_mask, dropout_p=dropout,
                                                       is_causal=bool(is_causal), scale=scaling,
                                                       enable_gqa=enable_gqa, backend=backend)
        return out.transpose(1, 2).contiguous(), None

    return fastseq_attention_forward


def register_hf_attention(name: str = "fastseq", *, backend: str = "auto") -> str:
    """Register fastseq's attention with ``transformers.AttentionInterface`` under ``name``; returns ``name``.

    Raises ``ImportError`` where transformers is not installed and ``ValueError`` for a bad backend name."""
    _dispatch.check_backend_name(backend)
    try:
        from transformers import AttentionInterface
    except ImportError as e:
        raise ImportError("fastseq.register_hf_attention needs Hugging Face transformers (with "
                          "transformers.AttentionInterface); it is not installed") from e
    AttentionInterface.register(name, _make_forward(backend))
    return name


__all__ = ["register_hf_attention"]
