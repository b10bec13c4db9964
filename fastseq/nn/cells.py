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


_WEIGHT_NAMES = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
_NOT_REGISTERED = object()


class _FastCell(FastModule):
    """What the three cells share: validation and the choice of backend."""

    # -- validation -----------------------------------------------------------------------------------

    # Every call of a cell runs through here, and at small sizes (a decoder stepping one token at B = 1) this Python
    # costs as much as the kernel: each attribute and method of a tensor is fetched once.

    def _check_input(self, input: Tensor) -> int:
        """Validate ``input``; return its number of dimensions."""
        if not isinstance(input, Tensor):
            raise TypeError(f"{self._name}: input must be a Tensor, got {type(input).__name__}")
        dim = input.dim()
        if dim not in (1, 2):
            raise ValueError(f"{self._name}: Expected input to be 1D or 2D, got {dim}D instead")
        if input.shape[-1] != self.input_size:
            raise RuntimeError(f"{self._name}: input.size(-1) must be equal to input_size. "
                               f"Expected {self.input_size}, got {input.size(-1)}")
        return dim

    def _check_state(self, state: Tensor, label: str, input: Tensor, input_dim: int) -> None:
        if not isinstance(state, Tensor):
            raise TypeError(f"{self._name}: {label} must be a Tensor, got {type(state).__name__}")
        dim, shape = state.dim(), state.shape
        if dim not in (1, 2):
            raise ValueError(f"{self._name}: Expected {label} to be 1D or 2D, got {dim}D instead")
        if dim != input_dim:
            raise RuntimeError(f"{self._name}: {label} must be batched or unbatched as input is. "
                               f"Expected {input_dim}D, got {dim}D")
        if dim == 2 and shape[0] != input.shape[0]:
            raise RuntimeError(f"{self._name}: Input batch size {input.size(0)} doesn't match {label} batch "
                               f"size {shape[0]}")
        if shape[-1] != self.hidden_size:
            raise RuntimeError(f"{self._name}: {label}.size(-1) must be equal to hidden_size. "
                               f"Expected {self.hidden_size}, got {shape[-1]}")

    def _check_dtype_device(self, tensors: tuple[Optional[Tensor], ...], labels: tuple[str, ...], w: Tensor,
                            check_dtype: bool) -> None:
        w_dtype, w_device = w.dtype, w.device
        for label, t in zip(labels, tensors):
            if t is None:
                continue
            if check_dtype and t.dtype != w_dtype:
                raise RuntimeError(f"{self._name}: {label} dtype must match the parameters' dtype. "
                                   f"Expected {dtype_name(w_dtype)}, got {dtype_name(t.dtype)}")
            if t.device != w_device:
                raise RuntimeError(f"{self._name}: Expected all tensors to be on the same device: {label} is on "
                                   f"{t.device}, the parameters are on {w_device}")

    def _weights(self) -> tuple[Optional[Tensor], ...]:
        """``(weight_ih, weight_hh, bias_ih, bias_hh)``. Read from ``_parameters`` where they are registered
        there (``Module.__getattr__`` costs about a µs each); where one is not (a parametrization moved it, or it
        was replaced by a plain attribute) through ``getattr``, as torch's own forward reads it."""
        registered = self._parameters
        weights = tuple(registered.get(name, _NOT_REGISTERED) for name in _WEIGHT_NAMES)
        for w in weights:  # by identity: `in` would compare tensors with ==
            if w is _NOT_REGISTERED:
                return tuple(getattr(self, name) for name in _WEIGHT_NAMES)
        return weights

    # -- dispatch ---------------------------------------------------------------------------------------

    def _prepare(self, input: Tensor, states: tuple[Optional[Tensor], ...], labels: tuple[str, ...]):
        """Validate the call before anything runs. Returns the backend, and for a kernel backend the batched
        ``(input, *states)`` and ``(W_ih, W_hh, b_ih, b_hh)`` in the dtype the call computes in, and whether the
        kernel should save its workspace for backward (only when a gradient may be asked for)."""
        input_dim = self._check_input(input)
        for label, state in zip(labels, states):
            if state is not None:
                self._check_state(state, label, input, input_dim)
        device = input.device
        cast = self._autocast_dtype(device)
        params = self._weights()
        tensors = (input, *states)
        self._check_dtype_device(tensors, ("input", *labels), params[0], check_dtype=cast is None)
        dtype = input.dtype if cast is None else cast
        training = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (*tensors, *params))
        backend = _dispatch.select(self._op, device, dtype, self._backend(), hidden=self.hidden_size,
                                   batch=input.size(0) if input_dim == 2 else 1, training=training)
        if backend == "torch":
            return backend, tensors, params, False
        if input_dim == 1:
            tensors = tuple(None if t is None else t.unsqueeze(0) for t in tensors)
        if cast is not None:  # else the inputs are in the parameters' dtype (checked above)
            tensors = tuple(None if t is None else t.to(dtype) for t in tensors)
        for p in params:
            if p is not None and p.dtype != dtype:  # autocast, or parameters of mixed dtypes
                params = tuple(q if q is None or q.dtype == dtype else q.to(dtype) for q in params)
                break
        return backend, tensors, params, training  # training: the kernel saves what backward needs


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
        backend, (x, h0, c0), params, save = self._prepare(input, (h0, c0), ("hx[0]", "hx[1]"))
        if backend == "torch":
            return super().forward(input, hx)
        h, c, _ = _ops.run_lstm_cell(x, h0, c0, *params, backend, save)
        return _unbatched(h, input), _unbatched(c, input)


class GRUCell(_FastCell, nn.GRUCell):
    """``torch.nn.GRUCell`` on fastseq's fused kernels. ``backend``: see :func:`fastseq.backends`."""

    _op, _name, _torch_class = "gru_cell", "GRUCell", nn.GRUCell

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, device=None, dtype=None, *,
                 backend: str = "auto") -> None:
        super().__init__(input_size, hidden_size, bias, device, dtype)
        self._init_backend(backend)

    def forward(self, input: Tensor, hx: Optional[Tensor] = None) -> Tensor:
        backend, (x, h0), params, save = self._prepare(input, (hx,), ("hx",))
        if backend == "torch":
            return super().forward(input, hx)
        h, _ = _ops.run_gru_cell(x, h0, *params, backend, save)
        return _unbatched(h, input)


class RNNCell(_FastCell, nn.RNNCell):
    """``torch.nn.RNNCell`` (tanh or relu) on fastseq's fused kernels. ``backend``: see :func:`fastseq.backends`."""

    _op, _name, _torch_class = "rnn_cell", "RNNCell", nn.RNNCell

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, nonlinearity: str = "tanh",
                 device=None, dtype=None, *, backend: str = "auto") -> None:
        super().__init__(input_size, hidden_size, bias, nonlinearity, device, dtype)
        self._init_backend(backend)

    def forward(self, input: Tensor, hx: Optional[Tensor] = None) -> Tensor:
        backend, (x, h0), params, save = self._prepare(input, (hx,), ("hx",))
        if self.nonlinearity not in ("tanh", "relu"):
            raise RuntimeError(f"Unknown nonlinearity: {self.nonlinearity}. Expected 'tanh' or 'relu'")
        if backend == "torch":
            return super().forward(input, hx)
        h, _ = _ops.run_rnn_cell(x, h0, *params, self.nonlinearity, backend, save)
        return _unbatched(h, input)
