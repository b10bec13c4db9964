"""fastseq: fused recurrent and attention kernels behind drop-in torch.nn modules.

Set ``TRITON_INTERPRET=1`` before importing fastseq to run the Triton kernels on CPU tensors (for testing).
"""

from __future__ import annotations

import importlib.util as _importlib_util
import os as _os
import sys as _sys


def _bind_source_kernels() -> None:
    """Installed, the Triton kernels are the subpackage ``fastseq/kernels``. In a source checkout they sit in
    the top-level ``kernels/`` folder: bind that folder as ``fastseq.kernels`` so the checkout runs as is."""
    here = _os.path.dirname(__file__)
    if _os.path.isdir(_os.path.join(here, "kernels")):
        return
    src = _os.path.join(_os.path.dirname(here), "kernels")
    init = _os.path.join(src, "__init__.py")
    if not _os.path.isfile(init):
        return
    spec = _importlib_util.spec_from_file_location("fastseq.kernels", init, submodule_search_locations=[src])
    module = _importlib_util.module_from_spec(spec)
    _sys.modules["fastseq.kernels"] = module
    spec.loader.exec_module(module)
    globals()["kernels"] = module


_bind_source_kernels()

from fastseq.dispatch import BACKENDS, BackendUnavailableError, backends  # noqa: E402
from fastseq import ops  # noqa: E402,F401  (registers torch.ops.fastseq.*)
from fastseq.nn import GRU, LSTM, RNN, GRUCell, LSTMCell, MultiheadAttention, RNNCell  # noqa: E402
from fastseq.functional import scaled_dot_product_attention  # noqa: E402
from fastseq.patch import patch, unpatch  # noqa: E402
from fastseq.override import sdpa_override  # noqa: E402
from fastseq.hf import register_hf_attention  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "GRU",
    "GRUCell",
    "LSTM",
    "LSTMCell",
    "MultiheadAttention",
    "RNN",
    "RNNCell",
    "backends",
    "patch",
    "register_hf_attention",
    "scaled_dot_product_attention",
    "sdpa_override",
    "unpatch",
]
