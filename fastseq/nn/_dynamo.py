"""Let torch.compile trace fastseq's recurrent layers.

Dynamo refuses every module that is an instance of ``nn.RNN``, ``nn.GRU`` or ``nn.LSTM`` (it graph-breaks on
them unless ``torch._dynamo.config.allow_rnn`` is set, because torch's own layers call opaque fused kernels).
fastseq's layers are such instances by contract (``isinstance(m, nn.LSTM)``), yet everything they run is
traceable: plain torch ops and fastseq's custom operators. So Dynamo's wrapping of a module is wrapped here:
for fastseq's layers only, the check is lifted while that one module is wrapped. torch's own layers, and the
global flag, are left exactly as they were. Installed on first use (a fastseq layer built, patched in or
unpickled), so that importing fastseq does not import Dynamo.
"""

from __future__ import annotations

_installed = False


def allow_fastseq_layers(layer_base: type) -> None:
    """Make Dynamo trace instances of ``layer_base`` (idempotent)."""
    global _installed
    if _installed:
        return
    _installed = True
    try:
        from torch._dynamo import config
        from torch._dynamo.variables.builder import VariableBuilder
    except ImportError:  # a torch without Dynamo: nothing to lift
        return
    if not hasattr(config, "allow_rnn") or not hasattr(VariableBuilder, "wrap_module"):
        return  # a torch whose Dynamo no longer refuses RNN modules this way
    wrap_module = VariableBuilder.wrap_module

    def wrap_module_tracing_fastseq_layers(self, value):
        if isinstance(value, layer_base) and not config.allow_rnn:
            with config.patch(allow_rnn=True):
                return wrap_module(self, value)
        return wrap_module(self, value)

    VariableBuilder.wrap_module = wrap_module_tracing_fastseq_layers
