"""``fastseq.sdpa_override``: run fastseq's attention wherever code calls ``F.scaled_dot_product_attention``.

Inside ``with fastseq.sdpa_override(backend=...):`` (or in a function decorated with it) the attribute
``torch.nn.functional.scaled_dot_product_attention`` is a wrapper that calls
:func:`fastseq.scaled_dot_product_attention` with that backend. What is caught is every call made *through the
attribute* — ``F.scaled_dot_product_attention(...)``, ``torch.nn.functional.scaled_dot_product_attention(...)``
— which is how Hugging Face transformers, torchaudio and most hand-written attention call it. A reference taken
before the override (``from torch.nn.functional import scaled_dot_product_attention`` at import time,
``torch._C._nn.scaled_dot_product_attention``, ``torch.ops.aten.*``) still calls torch's own function: those
cannot be caught without changing torch globally.

- Process-wide while active (every thread sees it), as the attribute is.
- Nestable: the innermost override's backend wins; leaving it puts back the function that was there when it
  was entered (the outer override, or torch's), an exception included. Overrides should be left in the reverse
  order of entering them (as ``with`` blocks are); the same object may be entered again (recursion through a
  decorated function).
- A bad backend name raises ``ValueError`` when the override is created, not when it is entered.
- ``torch.compile``: Dynamo guards a compiled frame on the identity of the function it found at
  ``F.scaled_dot_product_attention``, so a function compiled inside the override runs fastseq's attention, and
  run after exit it recompiles against torch's function.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention.bias import CausalBias
from torch.overrides import handle_torch_function, has_torch_function

from fastseq import dispatch as _dispatch
from fastseq import functional as _functional


def _make_sdpa(backend: str):
    """A function with torch's signature (``scale`` and ``enable_gqa`` keyword-only, as in torch) running
    fastseq's attention on ``backend``."""

    def scaled_dot_product_attention(query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor] = None,
                                     dropout_p: float = 0.0, is_causal: bool = False, *,
                                     scale: Optional[float] = None, enable_gqa: bool = False) -> Tensor:
        if not isinstance(attn_mask, CausalBias):
            args = (query, key, value) if attn_mask is None else (query, key, value, attn_mask)
            if has_torch_function(args):  # subclasses and modes see the function they were called through
                return handle_torch_function(scaled_dot_product_attention, args, query, key, value,
                                             attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                                             scale=scale, enable_gqa=enable_gqa)
        return _functional.scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, is_causal, scale,
                                                        enable_gqa, backend=backend)

    scaled_dot_product_attention.__doc__ = (f"torch.nn.functional.scaled_dot_product_attention on fastseq's "
                                            f"attention (backend={backend!r}), installed by fastseq.sdpa_override.")
    scaled_dot_product_attention._fastseq_backend = backend
    return scaled_dot_product_attention


class sdpa_override(contextlib.ContextDecorator):
    """Context manager and decorator: calls through ``torch.nn.functional.scaled_dot_product_attention`` run
    :func:`fastseq.scaled_dot_product_attention` with ``backend`` while it is active (see the module docstring).

    >>> with fastseq.sdpa_override(backend="triton"):
    ...     out = hf_model(**inputs)
    """

    def __init__(self, backend: str = "auto") -> None:
        self.backend = _dispatch.check_backend_name(backend)
        self._function = _make_sdpa(self.backend)
        self._saved: list = []

    def __enter__(self) -> "sdpa_override":
        self._saved.append(F.scaled_dot_product_attention)
        F.scaled_dot_product_attention = self._function
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        F.scaled_dot_product_attention = self._saved.pop()
        return False

    def __repr__(self) -> str:
        return f"sdpa_override(backend={self.backend!r})"


def is_overridden() -> bool:
    """Whether an :class:`sdpa_override` is active (``F.scaled_dot_product_attention`` is not torch's)."""
    return getattr(F.scaled_dot_product_attention, "_fastseq_backend", None) is not None


__all__ = ["sdpa_override", "is_overridden"]
