"""Hugging Face transformers: ``fastseq.register_hf_attention()`` registers fastseq's attention as an attention
implementation, so that ``AutoModel.from_pretrained(..., attn_implementation="fastseq")`` (or
``model.set_attn_implementation("fastseq")``) runs it.

The registered forward is transformers' own ``sdpa_attention_forward`` run inside :func:`fastseq.sdpa_override`:
everything transformers does around the attention call (grouped-query heads, cutting the mask to the keys,
``is_causal`` only without a mask and with more than one query, T5's ``position_bias`` folded into the mask,
``softcap`` refused) stays transformers' own, and only the attention itself is fastseq's. transformers builds
attention masks only for implementations it knows the mask format of, so the name is also registered with its
``AttentionMaskInterface`` with the mask function of "sdpa".

transformers is optional: it is imported only when the function is called, which raises ``ImportError`` (saying
so) where it is not installed.
"""

from __future__ import annotations

from fastseq import dispatch as _dispatch
from fastseq.override import sdpa_override


def _make_forward(backend: str, sdpa_attention_forward):
    def fastseq_attention_forward(module, query, key, value, attention_mask, *args, **kwargs):
        with sdpa_override(backend=backend):
            return sdpa_attention_forward(module, query, key, value, attention_mask, *args, **kwargs)

    return fastseq_attention_forward


def register_hf_attention(name: str = "fastseq", *, backend: str = "auto") -> str:
    """Register fastseq's attention with ``transformers.AttentionInterface`` under ``name``; returns ``name``.

    Raises ``ImportError`` where transformers is not installed and ``ValueError`` for a bad backend name."""
    _dispatch.check_backend_name(backend)
    try:
        from transformers import AttentionInterface
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
    except ImportError as e:
        raise ImportError("fastseq.register_hf_attention needs Hugging Face transformers (with "
                          "transformers.AttentionInterface); it is not installed") from e
    AttentionInterface.register(name, _make_forward(backend, sdpa_attention_forward))
    try:
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError:  # an older transformers builds masks for every registered implementation
        pass
    else:
        AttentionMaskInterface.register(name, sdpa_mask)
    return name


__all__ = ["register_hf_attention"]
