"""``fastseq.patch`` / ``fastseq.unpatch``: swap torch's modules for fastseq's in place, and back.

The swap changes each module's class and nothing else, so the module keeps its ``Parameter`` objects (an
optimizer built before the call keeps training them), buffers, hooks and registration in its parent. Only
modules whose type *is* the torch class are swapped: a user's subclass may override ``forward``.

torch's transformer containers have inference fast paths that read the attention's weights directly and never
call its ``forward``; for containers whose attention is fastseq's, ``patch`` makes those paths' own conditions
false on that one container (torch's ``torch.backends.mha`` flag and every other module are left alone):

- ``nn.TransformerEncoderLayer`` (``torch._transformer_encoder_layer_fwd`` in eval/no-grad): its attribute
  ``activation_relu_or_gelu`` is read only by that fast path (the slow path calls ``self.activation``), and the
  fast path is skipped when it is falsy: ``patch`` sets it to 0 and keeps the value in
  ``_fastseq_activation_relu_or_gelu``; ``unpatch`` puts it back.
- ``nn.TransformerEncoder`` (nested-tensor conversion with a padding mask in eval/no-grad, which would hand
  nested tensors to the layers): ``use_nested_tensor`` is set to False (kept in ``_fastseq_use_nested_tensor``)
  and put back by ``unpatch``.
- ``nn.MultiheadAttention``'s own fast path (``torch._native_multi_head_attention``) is in torch's ``forward``,
  which fastseq's ``forward`` calls only where the backend resolves to ``"torch"``.
- ``nn.TransformerDecoderLayer``, ``nn.TransformerDecoder`` and ``nn.Transformer`` have no fast path of their own
  beyond those of their encoder and attention modules.
"""

from __future__ import annotations

from torch import nn

from fastseq import dispatch as _dispatch
from fastseq import nn as _fnn

# Which torch class each fastseq class stands in for.
FASTSEQ_CLASS = {
    nn.LSTM: _fnn.LSTM,
    nn.GRU: _fnn.GRU,
    nn.RNN: _fnn.RNN,
    nn.LSTMCell: _fnn.LSTMCell,
    nn.GRUCell: _fnn.GRUCell,
    nn.RNNCell: _fnn.RNNCell,
    nn.MultiheadAttention: _fnn.MultiheadAttention,
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
    for module in model.modules():
        _block_fast_paths(module)
    return model


# (container class, attribute read only by its fast path, value that turns the fast path off)
_FAST_PATH_SWITCHES = (
    (nn.TransformerEncoderLayer, "activation_relu_or_gelu", 0),
    (nn.TransformerEncoder, "use_nested_tensor", False),
)


def _attention_of(module: nn.Module):
    if isinstance(module, nn.TransformerEncoderLayer):
        return getattr(module, "self_attn", None)
    if isinstance(module, nn.TransformerEncoder) and len(module.layers) > 0:
        return getattr(module.layers[0], "self_attn", None)
    return None


def _block_fast_paths(module: nn.Module) -> None:
    """Turn off, on this one container, torch's fast path that would bypass its fastseq attention."""
    for cls, attr, off in _FAST_PATH_SWITCHES:
        if (isinstance(module, cls) and hasattr(module, attr)  # (absent, torch already skips the fast path)
                and isinstance(_attention_of(module), _fnn.MultiheadAttention)):
            saved = f"_fastseq_{attr}"
            if saved not in module.__dict__:
                module.__dict__[saved] = getattr(module, attr)
            setattr(module, attr, off)


def _restore_fast_paths(module: nn.Module) -> None:
    for cls, attr, _ in _FAST_PATH_SWITCHES:
        saved = f"_fastseq_{attr}"
        if isinstance(module, cls) and saved in module.__dict__:
            setattr(module, attr, module.__dict__.pop(saved))


def unpatch(model: nn.Module) -> nn.Module:
    """The reverse of :func:`patch`: fastseq modules inside ``model`` become torch's again, in place."""
    _check_module(model)
    for module in model.modules():
        torch_cls = TORCH_CLASS.get(type(module))
        if torch_cls is not None:
            module.__class__ = torch_cls
            module.__dict__.pop("backend", None)
    for module in model.modules():
        _restore_fast_paths(module)
    return model
