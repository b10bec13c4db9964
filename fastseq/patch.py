"""``fastseq.patch`` / ``fastseq.unpatch``: swap torch's modules for fastseq's in place, and back.

The swap changes each module's class and nothing else, so the module keeps its ``Parameter`` objects (an
optimizer built before the call keeps training them), buffers, hooks and registration in its parent. Only
modules whose type *is* the torch class are swapped: a user's subclass may override ``forward``.
"""

from __future__ import annotations

from torch import nn

from fastseq import dispatch as _dispatch
from fastseq import nn as _fnn

# Which torch class each fastseq class stands in for; the attention issue adds MultiheadAttention.
FASTSEQ_CLASS = {
    nn.LSTM: _fnn.LSTM,
    nn.GRU: _fnn.GRU,
    nn.RNN: _fnn.RNN,
    nn.LSTMCell: _fnn.LSTMCell,
    nn.GRUCell: _fnn.GRUCell,
    nn.RNNCell: _fnn.RNNCell,
}
TORCH_CLASS = {fast: torch_cls for torch_cls, fast in FASTSEQ_CLASS.items()}


def _check_module(model: object) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")


def patch(model: nn.Module, *, backend: str = "auto") -> nn.Module:
    """Make every torch module of a supported class inside ``model`` (or ``model`` itself) fastseq's, in place.

    ``backend`` is given to every swapped module (and to fastseq modules already there). Returns ``model``.
    """
    _check_module(model)
    _dispatch.check_backend_name(backend)
    for module in model.modules():
        fast = FASTSEQ_CLASS.get(type(module))
        if fast is not None:
            module.__class__ = fast
        if type(module) in TORCH_CLASS:
            module.backend = backend
            if isinstance(module, _fnn.layers._FastRNNBase):
                _fnn.layers.allow_fastseq_layers(_fnn.layers._FastRNNBase)  # torch.compile may trace it
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """The reverse of :func:`patch`: fastseq modules inside ``model`` become torch's again, in place."""
    _check_module(model)
    for module in model.modules():
        torch_cls = TORCH_CLASS.get(type(module))
        if torch_cls is not None:
            module.__class__ = torch_cls
            module.__dict__.pop("backend", None)
    return model
