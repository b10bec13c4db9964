"""``fastseq.LSTM``, ``GRU``, ``RNN``: drop-in subclasses of torch's recurrent layers.

Same constructor, parameters, ``state_dict``, input forms (padded time-major or ``batch_first``, unbatched,
``PackedSequence`` sorted or not, optional initial states) and return structure as torch's; one extra keyword,
``backend``. Inputs are validated here with torch's own checks (``check_forward_args``), so errors have torch's
exception classes and messages. Where the selected backend is ``"torch"`` the call is torch's own ``forward``.

Otherwise each layer runs as: the input projection of the whole sequence and both directions, one product
(``F.linear`` with the directions' ``W_ih`` side by side); then ``torch.ops.fastseq.{lstm,gru,rnn}_layer``, one
fused launch for the recurrence of both directions; then, between layers in training, dropout on the layer's
output (torch's generator, so ``torch.manual_seed`` repeats it). Packed data stays packed throughout: the
kernels shrink the batch over time as ``batch_sizes`` says.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from fastseq import dispatch as _dispatch
from fastseq.nn._base import FastModule, dtype_name
from fastseq.nn._dynamo import allow_fastseq_layers
from fastseq.ops import layers as _ops


class _FastRNNBase(FastModule):
    """What the three layers share: input forms, validation, the layer loop."""

    _kind: str  # "lstm", "gru" or "rnn"

    def _init_backend(self, backend: str) -> None:
        super()._init_backend(backend)
        allow_fastseq_layers(_FastRNNBase)

    def __setstate__(self, state) -> None:  # unpickled in a fresh process: no __init__ ran
        super().__setstate__(state)
        allow_fastseq_layers(_FastRNNBase)

    def forward(self, input, hx=None):
        self._update_flat_weights()
        call = self._parse(input, hx)
        batch, steps = self._batch_and_steps(call)
        backend = _dispatch.select(self._op, call["data"].device, call["dtype"], self._backend(),
                                   hidden=self.hidden_size, batch=batch, steps=steps,
                                   training=self._needs_grad(call))
        if backend == "torch":
            return super().forward(input, hx)
        out, states = self._run_layers(call, backend)
        return self._format(call, out, states)

    # -- input forms and validation ----------------------------------------------------------------------

    def _parse(self, input, hx) -> dict:
        """torch's reading of ``(input, hx)``, validated: time-major data, states ``(L·D, B, ·)`` in the
        sorted order of packed data, and what is needed to give the results back in the caller's form."""
        if isinstance(input, PackedSequence):
            data, batch_sizes, sorted_indices, unsorted_indices = input
            self._check_tensor(data, "input")
            batched = True
        else:
            self._check_tensor(input, "input")
            batch_sizes = sorted_indices = unsorted_indices = None
            if input.dim() not in (2, 3):
                tensor = "" if self._kind == "lstm" else " tensor"
                raise ValueError(f"{self._name}: Expected input to be 2D or 3D, got {input.dim()}D{tensor} instead")
            batched = input.dim() == 3
            data = input if batched else input.unsqueeze(0 if self.batch_first else 1)
        states = self._states_tuple(hx)
        if states is not None:
            states = tuple(self._check_state_rank(s, batched, data) for s in states)
        if batch_sizes is None:
            self.check_input(data, None)  # torch's dtype, rank and input_size checks
        else:
            self.check_input(data, batch_sizes)
        if states is None:
            states = self._zero_states(data, batch_sizes)
        else:
            self._check_states(data, states, batch_sizes)
            if sorted_indices is not None:
                states = tuple(s.index_select(1, sorted_indices) for s in states)
        if batch_sizes is None and data.size(1 if self.batch_first else 0) == 0:
            raise RuntimeError("Expected sequence length to be larger than 0 in RNN")
        cast = self._autocast_dtype(data.device)
        return {"input": input, "data": data, "batch_sizes": batch_sizes, "unsorted_indices": unsorted_indices,
                "batched": batched, "states": states, "dtype": data.dtype if cast is None else cast}

    def _batch_and_steps(self, call: dict) -> tuple[int, int]:
        """The batch size and the number of time steps of a parsed call (what "auto" chooses by)."""
        data, batch_sizes = call["data"], call["batch_sizes"]
        if batch_sizes is not None:
            return (int(batch_sizes[0]) if len(batch_sizes) else 0), len(batch_sizes)
        batch_dim, time_dim = (0, 1) if self.batch_first else (1, 0)
        return data.size(batch_dim), data.size(time_dim)

    def _needs_grad(self, call: dict) -> bool:
        """Whether autograd records this call (then the kernels keep what backward needs)."""
        return torch.is_grad_enabled() and (
            call["data"].requires_grad or any(s.requires_grad for s in call["states"])
            or any(p is not None and p.requires_grad for p in self._flat_weights))

    def _check_tensor(self, t: object, label: str) -> None:
        if not isinstance(t, Tensor):
            raise TypeError(f"{self._name}: {label} must be a Tensor or PackedSequence, got {type(t).__name__}")

    def _states_tuple(self, hx) -> Optional[tuple[Tensor, ...]]:
        if hx is None:
            return None
        if self._kind == "lstm":
            # torch raises RuntimeError for a Tensor or a tuple of the wrong length (its kernel finds the
            # states malformed); the same class here, so a caller's `except RuntimeError:` keeps working.
            if isinstance(hx, Tensor) or (isinstance(hx, (tuple, list)) and len(hx) != 2):
                got = "a Tensor" if isinstance(hx, Tensor) else f"{len(hx)} states"
                raise RuntimeError(f"{self._name}: hx must be a tuple of two Tensors (h_0, c_0), got {got}")
            if not isinstance(hx, (tuple, list)):
                raise TypeError(f"{self._name}: hx must be a tuple of two Tensors (h_0, c_0), "
                                f"got {type(hx).__name__}")
            for i, s in enumerate(hx):
                if not isinstance(s, Tensor):
                    raise TypeError(f"{self._name}: hx[{i}] must be a Tensor, got {type(s).__name__}")
            return tuple(hx)
        if not isinstance(hx, Tensor):
            raise TypeError(f"{self._name}: hx must be a Tensor, got {type(hx).__name__}")
        return (hx,)

    def _check_state_rank(self, state: Tensor, batched: bool, data: Tensor) -> Tensor:
        """torch's rank rule: 3-D states with batched input, 2-D with unbatched (made 3-D here)."""
        want = 3 if batched else 2
        if state.dim() != want:
            kind = "batched 3-D" if batched else "unbatched 2-D"
            raise RuntimeError(f"{self._name}: For {kind} input, hx should also be {want}-D but got "
                               f"{state.dim()}-D tensor")
        return state if batched else state.unsqueeze(1)

    def _check_states(self, data: Tensor, states: tuple[Tensor, ...], batch_sizes) -> None:
        """Shapes by torch's own checks, then dtype and device, which torch leaves to its kernels."""
        if self._kind == "lstm":
            self.check_forward_args(data, states, batch_sizes)
        else:
            self.check_forward_args(data, states[0], batch_sizes)
        labels = ("hx[0]", "hx[1]") if self._kind == "lstm" else ("hx",)
        for label, s in zip(labels, states):
            if s.dtype != data.dtype:
                raise RuntimeError(f"{self._name}: {label} dtype must match input's dtype. "
                                   f"Expected {dtype_name(data.dtype)}, got {dtype_name(s.dtype)}")
            if s.device != data.device:
                raise RuntimeError(f"{self._name}: Expected all tensors to be on the same device: {label} is on "
                                   f"{s.device}, input is on {data.device}")

    def _zero_states(self, data: Tensor, batch_sizes) -> tuple[Tensor, ...]:
        rows = self.num_layers * (2 if self.bidirectional else 1)
        if batch_sizes is not None:
            batch = int(batch_sizes[0]) if len(batch_sizes) else 0
        else:
            batch = data.size(0 if self.batch_first else 1)
        hidden_out = self.proj_size if self.proj_size > 0 else self.hidden_size
        h0 = torch.zeros(rows, batch, hidden_out, dtype=data.dtype, device=data.device)
        if self._kind != "lstm":
            return (h0,)
        return h0, torch.zeros(rows, batch, self.hidden_size, dtype=data.dtype, device=data.device)

    # -- the layers ----------------------------------------------------------------------------------------

    def _param(self, name: str, dtype: torch.dtype) -> Optional[Tensor]:
        p = self._flat_weights[self._flat_weights_names.index(name)] if name in self._flat_weights_names else None
        return p if p is None or p.dtype == dtype else p.to(dtype)

    def _layer_params(self, layer: int, dtype: torch.dtype) -> dict:
        """The directions' parameters of one layer, stacked as the operators take them."""
        suffixes = ("", "_reverse") if self.bidirectional else ("",)

        def gather(kind: str) -> list[Tensor]:
            return [self._param(f"{kind}_l{layer}{s}", dtype) for s in suffixes]

        w_ih, w_hh = gather("weight_ih"), gather("weight_hh")
        params = {"w_ih": torch.cat(w_ih) if len(w_ih) > 1 else w_ih[0], "w_hh": torch.stack(w_hh),
                  "b_ih": None, "b_hh": None, "w_hr": None}
        if self.bias:
            b_ih, b_hh = gather("bias_ih"), gather("bias_hh")
            params["b_ih"] = torch.cat(b_ih) if len(b_ih) > 1 else b_ih[0]
            params["b_hh"] = torch.stack(b_hh)
        if self.proj_size > 0:
            params["w_hr"] = torch.stack(gather("weight_hr"))
        return params

    def _run_layers(self, call: dict, backend: str) -> tuple[Tensor, tuple[Tensor, ...]]:
        dtype, batch_sizes = call["dtype"], call["batch_sizes"]
        x = call["data"]
        if batch_sizes is None and self.batch_first:
            x = x.transpose(0, 1)
        x = x.to(dtype)
        states = tuple(s.to(dtype) for s in call["states"])
        save = self._needs_grad(call)
        finals: list[list[Tensor]] = [[] for _ in states]
        # Everything is already in the call's dtype; torch's autocast must not re-cast the input projection
        # (it would, for a layer autocast leaves in float32, such as GRU on CPU).
        with torch.autocast(x.device.type, enabled=False):
            for layer in range(self.num_layers):
                x = self._run_layer(layer, x, states, finals, batch_sizes, backend, dtype, save)
        return x, tuple(torch.cat(parts) for parts in finals)

    def _run_layer(self, layer, x, states, finals, batch_sizes, backend, dtype, save) -> Tensor:
        """One layer (both directions): dropout on its input (after the first layer, in training), the input
        projection, the fused recurrence. Appends the final states to ``finals``; returns the output."""
        directions = 2 if self.bidirectional else 1
        if layer > 0 and self.dropout > 0 and self.training:
            x = F.dropout(x, self.dropout, training=True)
        p = self._layer_params(layer, dtype)
        gates_x = F.linear(x, p["w_ih"], p["b_ih"])
        rows = slice(layer * directions, (layer + 1) * directions)
        layer_states = [s[rows].contiguous() for s in states]
        out, *layer_finals = self._recurrence(gates_x, layer_states, p, batch_sizes, backend, save)
        for acc, final in zip(finals, layer_finals):
            acc.append(final)
        return out

    def _format(self, call: dict, out: Tensor, states: tuple[Tensor, ...]):
        """Results in the caller's form: packed in, packed out; batch-first; unbatched; original order."""
        unsorted = call["unsorted_indices"]
        if unsorted is not None:
            states = tuple(s.index_select(1, unsorted) for s in states)
        if call["batch_sizes"] is not None:
            packed = call["input"]
            out = PackedSequence(out, packed.batch_sizes, packed.sorted_indices, packed.unsorted_indices)
        else:
            if self.batch_first:
                out = out.transpose(0, 1)
            if not call["batched"]:
                out = out.squeeze(0 if self.batch_first else 1)
                states = tuple(s.squeeze(1) for s in states)
        return out, (states if self._kind == "lstm" else states[0])


class LSTM(_FastRNNBase, nn.LSTM):
    """``torch.nn.LSTM`` on fastseq's fused kernels. ``backend``: see :func:`fastseq.backends`."""

    _op, _kind, _name, _torch_class = "lstm_layer", "lstm", "LSTM", nn.LSTM

    def __init__(self, *args, backend: str = "auto", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._init_backend(backend)

    def _recurrence(self, gates_x, states, p, batch_sizes, backend, save):
        out, h_n, c_n, _ = _ops.lstm_layer(gates_x, states[0], states[1], p["w_hh"], p["b_hh"], p["w_hr"],
                                           batch_sizes, backend, save)
        return out, h_n, c_n


class GRU(_FastRNNBase, nn.GRU):
    """``torch.nn.GRU`` on fastseq's fused kernels. ``backend``: see :func:`fastseq.backends`."""

    _op, _kind, _name, _torch_class = "gru_layer", "gru", "GRU", nn.GRU

    def __init__(self, *args, backend: str = "auto", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._init_backend(backend)

    def _recurrence(self, gates_x, states, p, batch_sizes, backend, save):
        out, h_n, _ = _ops.gru_layer(gates_x, states[0], p["w_hh"], p["b_hh"], batch_sizes, backend, save)
        return out, h_n


class RNN(_FastRNNBase, nn.RNN):
    """``torch.nn.RNN`` (tanh or relu) on fastseq's fused kernels. ``backend``: see :func:`fastseq.backends`."""

    _op, _kind, _name, _torch_class = "rnn_layer", "rnn", "RNN", nn.RNN

    def __init__(self, *args, backend: str = "auto", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._init_backend(backend)

    def _recurrence(self, gates_x, states, p, batch_sizes, backend, save):
        out, h_n, _ = _ops.rnn_layer(gates_x, states[0], p["w_hh"], p["b_hh"], batch_sizes, self.nonlinearity,
                                     backend, save)
        return out, h_n
