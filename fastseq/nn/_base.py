"""What every fastseq module shares: the ``backend`` attribute, its repr, and scripting as torch's twin."""

from __future__ import annotations

import torch

from fastseq import dispatch as _dispatch

# torch's autocast casts these operators to the lower-precision dtype on these device types (ATen's autocast
# lists: on CUDA the cells and cuDNN's layers; on CPU the Elman cells and the LSTM and Elman layers, not GRU).
# fastseq's modules follow the same lists, keyed by fastseq's operator names.
AUTOCAST_OPS = {
    "cuda": {"lstm_cell", "gru_cell", "rnn_cell", "lstm_layer", "gru_layer", "rnn_layer"},
    "cpu": {"rnn_cell", "lstm_layer", "rnn_layer"},
}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class FastModule:
    """Mixin placed before the torch class: ``class LSTM(FastModule, nn.LSTM)``."""

    _op: str  # operator name, e.g. "lstm_cell"
    _name: str  # torch's class name, for messages
    _torch_class: type  # the torch.nn class this one stands in for

    def _init_backend(self, backend: str) -> None:
        self.backend = _dispatch.check_backend_name(backend)

    def _backend(self) -> str:
        # Modules unpickled from elsewhere may lack the attribute; they behave as "auto".
        return getattr(self, "backend", "auto")

    def extra_repr(self) -> str:
        s = super().extra_repr()
        return s if self._backend() == "auto" else f"{s}, backend={self._backend()!r}"

    def __prepare_scriptable__(self):
        # torch.jit.script cannot compile fastseq's dispatch; a scripted fastseq module is torch's own module
        # holding the same Parameter objects (same numbers, torch's kernels).
        twin = self._torch_class.__new__(self._torch_class)
        twin.__dict__.update(self.__dict__)
        twin.__dict__.pop("backend", None)
        return twin

    def _autocast_dtype(self, device: torch.device):
        """The dtype torch's autocast would run this module's operator in on ``device``, or ``None``."""
        dev = device.type
        if self._op in AUTOCAST_OPS.get(dev, ()) and torch.is_autocast_enabled(dev):
            return torch.get_autocast_dtype(dev)
        return None
