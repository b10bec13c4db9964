"""``fastseq.LSTMCell``, ``GRUCell``, ``RNNCell``: drop-in subclasses of torch's cells.

Same constructor, parameters, ``state_dict``, input forms and return structure as torch's; one extra keyword,
``backend``. Inputs are validated here, before any kernel runs, with torch's exception classes and messages
that name the argument, what was expected and what was given. Where the selected backend is ``"torch"`` the
call is torch's own ``forward``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from fastseq import dispatch as _dispatch
from fastseq.nn._base import FastModule, dtype_name
from fastseq.ops import cells as _ops


class _FastCell(FastModule):
    """What the three cells share: validation and the choice of backend."""

    # -- validation -----------------------------------------------------------------------------------

    def _check_input(self, input: Tensor) -> None:
        if not isinstance(input, Tensor):
            raise TypeError(f"{self._name}: input must be a Tensor, got {type(input).__name__}")
        if input.dim() not in (1, 2):
            raise ValueError(f"{self._name}: Expected input to be 1D or 2D, got {input.dim()}D instead")
        if input.size(-1) != self.input_size:
            raise RuntimeError(f"{self._name}: input.size(-1) must be equal to input_size. "
                               f"Expected {self.input_size}, got {input.size(-1)}")

    def _check_state(self, state: Tensor, label: str, input: Tensor) -> None:
        if not isinstance(state, Tensor):
            raise TypeError(f"{self._name}: {label} must be a Tensor, got {type(state).__name__}")
        if state.dim() not in (1, 2):
            raise ValueError(f"{self._name}: Expected {label} to be 1D or 2D, got {state.dim()}D instead")
        if state.dim() != input.dim():
            raise RuntimeError(f"{self._name}: {label} must be batched or unbatched as input is. "
                               f"Expected {input.dim()}D, got {state.dim()}D")
        if state.dim() == 2 and state.size(0) != input.size(0):
            raise RuntimeError(f"{self._name}: Input batch size {input.size(0)} doesn't match {label} batch "
                               f"size {state.size(0)}")
        if state.size(-1) != self.hidden_size:
            raise RuntimeError(f"{self._name}: {label}.size(-1) must be equal to hidden_size. "
                               f"Expected {self.hidden_size}, got {state.size(-1)}")

    def _check_dtype_device(self, tensors: dict[str, Optional[Tensor]], check_dtype: bool) -> None:
        w = self.weight_ih
        for label, t in tensors.items():
            if t is None:
                continue
            if check_dtype and t.dtype != w.dtype:
                raise RuntimeError(f"{self._name}: {label} dtype must match the parameters' dtype. "
                                   f"Expected {dtype_name(w.dtype)}, got {dtype_name(t.dtype)}")
            if t.device != w.device:
                raise RuntimeError(f"{self._name}: Expected all tensors to be on the same device: {label} is on "
                                   f"{t.device}, the parameters are on {w.device}")

    # -- dispatch ---------------------------------------------------------------------------------------

    def _select(self, input: Tensor, states: dict[str, Optional[Tensor]]) -> tuple[str, torch.dtype]:
        """Validate the call before anything runs; return the backend and the dtype it computes in."""
        self._check_input(input)
        for label, state in states.items():
            if state is not None:
                self._check_state(state, label, input)
        cast = self._autocast_dtype(input.device)
        self._check_dtype_device({"input": input, **states}, check_dtype=cast is None)
        dtype = input.dtype if cast is None else cast
        training = torch.is_grad_enabled() and (
            input.requires_grad or any(s is not None and s.requires_grad for s in states.values())
            or any(p is not None and p.requires_grad for p in (self.weight_ih, self.weight_hh, self.bias_ih,
                                                                self.bias_hh)))
        batch = input.size(0) if input.dim() == 2 else 1
        return _dispatch.select(self._op, input.device, dtype, self._backend(), hidden=self.hidden_size,
                                batch=batch, training=training), dtype

    def _kernel_args(self, input: Tensor, states: tuple[Optional[Tensor], ...], dtype: torch.dtype):
        """Batched ``(input, *states)`` and ``(W_ih, W_hh, b_ih, b_hh)`` in ``dtype``, plus whether the
        kernel should save its workspace for backward (only when a gradient may be asked for)."""
        is_batched = input.dim() == 2

        def prep(t: Optional[Tensor]) -> Optional[Tensor]:
            if t is None:
                return None
            return (t if is_batched else t.unsqueeze(0)).to(dtype)

        tensors = tuple(prep(t) for t in (input, *states))
        params = tuple(p if p is None or p.dtype == dtype else p.to(dtype)
                       for p in (self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh))
        save = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (*tensors, *params))
        return tensors, params, save


def _unbatched(t: Tensor, input: Tensor) -> Tensor:
    return t if input.dim() == 2 else t.squeeze(0)


class LSTMCell(_FastCell, nn.LSTMCell):
    """``torch.nn.LSTMCell`` on fastseq's fused kernels. ``backend``: see :func:`fastseq.backends`."""

    _op, _name, _torch_class = "lstm_cell", "LSTMCell", nn.LSTMCell

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, device=None, dtype=None, *,
                 backend: str = "auto") -> None:
        super().__init__(input_size, hidden_size, bias, device, dtype)
        self._init_backend(backend)

    def forward(self, input: Tensor, hx: Optional[tuple[Tensor, Tensor]] = None) -> tuple[Tensor, Tensor]:
        if hx is not None and (not isinstance(hx, (tuple, list)) or len(hx) != 2):
            raise TypeError(f"LSTMCell: hx must be a tuple of two Tensors (h_0, c_0), got {type(hx).__name__}")
        h0, c0 = (None, None) if hx is None else hx
        backend, dtype = self._select(input, {"hx[0]": h0, "hx[1]": c0})
        if backend == "torch":
            return super().forward(input, hx)
        (x, h0, c0), params, save = self._kernel_args(input, (h0, c0), dtype)
        h, c, _ = _ops.lstm_cell(x, h0, c0, *params, backend, save)
        return _unbatched(h, input), _unbatched(c, input)


class GRUCell(_FastCell, nn.GRUCell):
    """``torch.nn.GRUCell`` on fastseq's fused kernels. ``backend``: see :func:`fastseq.backends`."""

    _op, _name, _torch_class = "gru_cell", "GRUCell", nn.GRUCell

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, device=None, dtype=None, *,
                 backend: str = "auto") -> None:
        super().__init__(input_size, hidden_size, bias, device, dtype)
        self._init_backend(backend)

    def forward(self, input: Tensor, hx: Optional[Tensor] = None) -> Tensor:
        backend, dtype = self._select(input, {"hx": hx})
        if backend == "torch":
            return super().forward(input, hx)
        (x, h0), params, save = self._kernel_args(input, (hx,), dtype)
        h, _ = _ops.gru_cell(x, h0, *params, backend, save)
        return _unbatched(h, input)


class RNNCell(_FastCell, nn.RNNCell):
    """``torch.nn.RNNCell`` (tanh or relu) on fastseq's fused kernels. ``backend``: see :func:`fastseq.backends`."""

    _op, _name, _torch_class = "rnn_cell", "RNNCell", nn.RNNCell

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, nonlinearity: str = "tanh",
                 device=None, dtype=None, *, backend: str = "auto") -> None:
        super().__init__(input_size, hidden_size, bias, nonlinearity, device, dtype)
        self._init_backend(backend)

    def forward(self, input: Tensor, hx: Optional[Tensor] = None) -> Tensor:
        backend, dtype = self._select(input, {"hx": hx})
        if self.nonlinearity not in ("tanh", "relu"):
            raise RuntimeError(f"Unknown nonlinearity: {self.nonlinearity}. Expected 'tanh' or 'relu'")
        if backend == "torch":
            return super().forward(input, hx)
        (x, h0), params, save = self._kernel_args(input, (hx,), dtype)
        h, _ = _ops.rnn_cell(x, h0, *params, self.nonlinearity, backend, save)
        return _unbatched(h, input)
