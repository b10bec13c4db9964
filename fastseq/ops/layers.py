"""Operators for one recurrent layer over a whole sequence: ``torch.ops.fastseq.{lstm,gru,rnn}_layer``.

A layer of ``D`` directions (1, or 2 when bidirectional; direction 1 runs backwards in time) is split where the
work splits. The input projection of every time step and both directions, ``gates_x = x·W_ihᵀ + b_ih``, is one
large product that the module computes with torch (so torch.compile sees it, and autograd gives ``dx``,
``dW_ih`` and ``db_ih`` from ``dgates_x``). These operators run the *recurrence* over that projection in one
fused kernel launch, and their backward runs the reverse-time recurrence in one launch, returning the gradient of
``gates_x``, of the initial states and of the hidden-side weights. Weight gradients are large products here:
``dW_hh[d] = Σ_rows dgates_h[d]ᵀ·h_prev[d]``, ``db_hh[d] = Σ_rows dgates_h[d]``, ``dW_hr[d] = Σ_rows dh[d]ᵀ·m[d]``
(LSTM with a projection), with ``h_prev`` and ``m`` read from the forward's float32 workspace.

Shapes (``G`` = gates × H: LSTM 4H, GRU 3H, RNN H; ``Hout`` = the projection size P if an LSTM has one, else H):

- ``gates_x``: ``(T, B, D·G)`` for a padded sequence (time-major), or ``(N, D·G)`` for packed data whose time steps
  hold ``batch_sizes[t]`` rows each (a CPU int64 tensor, as in ``PackedSequence``); direction ``d`` is columns
  ``[d·G, (d+1)·G)``.
- ``h0`` ``(D, B, Hout)`` and ``c0`` ``(D, B, H)``: always given (zeros when the caller had none), so no output
  shape depends on the values in ``batch_sizes``.
- ``w_hh`` ``(D, G, Hout)``, ``b_hh`` ``(D, G)`` or ``None``, ``w_hr`` ``(D, P, H)`` or ``None``.
- outputs: ``out`` ``(T, B, D·Hout)`` or ``(N, D·Hout)`` (directions side by side, as torch's layers return them),
  final states ``(D, B, ·)``, and the workspace: float32 ``(D, rows, W)`` in training (rows = T·B or N, in the
  order of ``gates_x``'s rows), an empty tensor in inference.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

_GATES = {"lstm": 4, "gru": 3, "rnn": 1}


def workspace_layout(kind: str, hidden: int, proj: int = 0) -> dict:
    """Columns of one (direction, row) of the float32 workspace the forward kernel writes for backward.

    LSTM: pre-activations a_i, a_f, a_g, a_o (4H), c', c_prev, then m = o·tanh(c') (H, only with a projection),
    then h_prev (Hout). GRU: a_r, a_z, a_n, W_hn·h + b_hn (4H), h_prev (H). RNN: a (H), h_prev (H). The kernels
    (``fastseq.kernels.rnn_seq.workspace_layout``) write the same layout; a test holds the two equal (the
    operators must not import the kernels: Triton is optional at import)."""
    if kind == "lstm":
        m = 6 * hidden if proj else None
        width = 6 * hidden + (hidden if proj else 0) + (proj or hidden)
        return {"width": width, "h_prev": width - (proj or hidden), "m": m}
    if kind == "gru":
        return {"width": 5 * hidden, "h_prev": 4 * hidden, "m": None}
    if kind == "rnn":
        return {"width": 2 * hidden, "h_prev": hidden, "m": None}
    raise ValueError(f"kind must be 'lstm', 'gru' or 'rnn', got {kind!r}")


def _kernels(backend: str):
    """The module of launchers for a kernel backend."""
    if backend == "triton":
        from fastseq.kernels import rnn_seq

        return rnn_seq
    if backend in ("cpp", "cuda"):  # the same torch.ops.fastseq_cpp operators, dispatched on the tensors' device
        from fastseq import cpp_kernels

        return cpp_kernels
    raise RuntimeError(f"fastseq has no {backend!r} kernels for the recurrent layers")


def _rows(gates_x: Tensor, packed: bool) -> int:
    return gates_x.shape[0] if packed else gates_x.shape[0] * gates_x.shape[1]


def _fake_forward(kind: str, gates_x: Tensor, h0: Tensor, w_hh: Tensor, hidden: int, proj: int,
                  packed: bool, save: bool):
    """Empty outputs of the right shapes for the fake (meta) implementations."""
    D, Hout = w_hh.shape[0], w_hh.shape[2]
    out = gates_x.new_empty((*gates_x.shape[:-1], D * Hout))
    h_n = torch.empty_like(h0, memory_format=torch.contiguous_format)
    width = workspace_layout(kind, hidden, proj)["width"]
    ws = gates_x.new_empty((D, _rows(gates_x, packed), width) if save else (0,), dtype=torch.float32)
    return out, h_n, ws


def _or_empty(t: Optional[Tensor], like: Tensor) -> Tensor:
    """Custom operators cannot return ``None``: an absent result travels as a fresh empty tensor."""
    return like.new_empty((0,)) if t is None else t


# ---------------------------------------------------------------------------------------------------------
# LSTM
# ---------------------------------------------------------------------------------------------------------


@torch.library.custom_op("fastseq::lstm_layer", mutates_args=())
def lstm_layer(gates_x: Tensor, h0: Tensor, c0: Tensor, w_hh: Tensor, b_hh: Optional[Tensor],
               w_hr: Optional[Tensor], batch_sizes: Optional[Tensor], backend: str,
               save_workspace: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The LSTM recurrence of one layer: ``(out, h_n, c_n, workspace)``."""
    out, h_n, c_n, ws = _kernels(backend).launch_layer_fwd(
        "lstm", gates_x, h0, c0, w_hh, b_hh, w_hr, batch_sizes, save_workspace)
    return out, h_n, c_n, ws


@lstm_layer.register_fake
def _(gates_x, h0, c0, w_hh, b_hh, w_hr, batch_sizes, backend, save_workspace):
    proj = 0 if w_hr is None else w_hr.shape[1]
    out, h_n, ws = _fake_forward("lstm", gates_x, h0, w_hh, c0.shape[2], proj, batch_sizes is not None,
                                 save_workspace)
    return out, h_n, torch.empty_like(c0, memory_format=torch.contiguous_format), ws


@torch.library.custom_op("fastseq::lstm_layer_backward", mutates_args=())
def lstm_layer_backward(grad_out: Tensor, grad_hn: Tensor, grad_cn: Tensor, workspace: Tensor, w_hh: Tensor,
                        w_hr: Optional[Tensor], batch_sizes: Optional[Tensor],
                        backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(d_gates, d_h0, d_c0, d_h)``: ``d_h`` (float32 ``(D, rows, P)``) is the total gradient of every step's
    projected output, from which ``dW_hr`` follows; an empty tensor without a projection."""
    dgates, _, dh0, dc0, dh = _kernels(backend).launch_layer_bwd(
        "lstm", grad_out, grad_hn, grad_cn, workspace, w_hh, w_hr, batch_sizes)
    dh = None if dh is None else dh.to(torch.float32)
    return dgates, dh0, dc0, _or_empty(dh, workspace)


@lstm_layer_backward.register_fake
def _(grad_out, grad_hn, grad_cn, workspace, w_hh, w_hr, batch_sizes, backend):
    D, G = w_hh.shape[0], w_hh.shape[1]
    dgates = grad_out.new_empty((*grad_out.shape[:-1], D * G))
    dh = (workspace.new_empty((D, workspace.shape[1], w_hr.shape[1])) if w_hr is not None
          else workspace.new_empty((0,)))
    return (dgates, torch.empty_like(grad_hn, memory_format=torch.contiguous_format),
            torch.empty_like(grad_cn, memory_format=torch.contiguous_format), dh)


def _lstm_setup(ctx, inputs, output):
    gates_x, h0, c0, w_hh, b_hh, w_hr, batch_sizes, backend, save_workspace = inputs
    ctx.backend, ctx.has_workspace = backend, save_workspace
    ctx.save_for_backward(gates_x, h0, c0, w_hh, b_hh, w_hr, batch_sizes, output[3])


def _lstm_backward(ctx, grad_out, grad_hn, grad_cn, _grad_ws):
    gates_x, h0, c0, w_hh, b_hh, w_hr, batch_sizes, ws = ctx.saved_tensors
    if not ctx.has_workspace:
        ws = lstm_layer(gates_x, h0, c0, w_hh, b_hh, w_hr, batch_sizes, ctx.backend, True)[3]
    grad_out, grad_hn, grad_cn = _zeros_for_none((grad_out, grad_hn, grad_cn), (gates_x, h0, c0), w_hh)
    dgates, dh0, dc0, dh = lstm_layer_backward(grad_out, grad_hn, grad_cn, ws, w_hh, w_hr, batch_sizes,
                                               ctx.backend)
    need = ctx.needs_input_grad
    proj = 0 if w_hr is None else w_hr.shape[1]
    layout = workspace_layout("lstm", c0.shape[2], proj)
    dw_hh, db_hh = _hidden_grads(need[3], need[4] and b_hh is not None, dgates, ws, layout, w_hh)
    dw_hr = None
    if w_hr is not None and need[5]:
        m = ws[:, :, layout["m"]:layout["m"] + c0.shape[2]]
        dw_hr = torch.bmm(dh.transpose(1, 2), m).to(w_hr.dtype)
    return (dgates, dh0, dc0, dw_hh, db_hh, dw_hr, None, None, None)


lstm_layer.register_autograd(_lstm_backward, setup_context=_lstm_setup)


# ---------------------------------------------------------------------------------------------------------
# GRU
# ---------------------------------------------------------------------------------------------------------


@torch.library.custom_op("fastseq::gru_layer", mutates_args=())
def gru_layer(gates_x: Tensor, h0: Tensor, w_hh: Tensor, b_hh: Optional[Tensor], batch_sizes: Optional[Tensor],
              backend: str, save_workspace: bool) -> tuple[Tensor, Tensor, Tensor]:
    """The GRU recurrence of one layer: ``(out, h_n, workspace)``."""
    out, h_n, _, ws = _kernels(backend).launch_layer_fwd(
        "gru", gates_x, h0, None, w_hh, b_hh, None, batch_sizes, save_workspace)
    return out, h_n, ws


@gru_layer.register_fake
def _(gates_x, h0, w_hh, b_hh, batch_sizes, backend, save_workspace):
    return _fake_forward("gru", gates_x, h0, w_hh, w_hh.shape[1] // 3, 0, batch_sizes is not None,
                         save_workspace)


@torch.library.custom_op("fastseq::gru_layer_backward", mutates_args=())
def gru_layer_backward(grad_out: Tensor, grad_hn: Tensor, workspace: Tensor, w_hh: Tensor,
                       batch_sizes: Optional[Tensor], backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """``(d_gates_input_side, d_gates_hidden_side, d_h0)``: the two differ in the n gate, which the reset gate
    scales on the hidden side only."""
    dgx, dgh, dh0, _, _ = _kernels(backend).launch_layer_bwd(
        "gru", grad_out, grad_hn, None, workspace, w_hh, None, batch_sizes)
    return dgx, dgh, dh0


@gru_layer_backward.register_fake
def _(grad_out, grad_hn, workspace, w_hh, batch_sizes, backend):
    shape = (*grad_out.shape[:-1], w_hh.shape[0] * w_hh.shape[1])
    return (grad_out.new_empty(shape), grad_out.new_empty(shape),
            torch.empty_like(grad_hn, memory_format=torch.contiguous_format))


def _gru_setup(ctx, inputs, output):
    gates_x, h0, w_hh, b_hh, batch_sizes, backend, save_workspace = inputs
    ctx.backend, ctx.has_workspace = backend, save_workspace
    ctx.save_for_backward(gates_x, h0, w_hh, b_hh, batch_sizes, output[2])


def _gru_backward(ctx, grad_out, grad_hn, _grad_ws):
    gates_x, h0, w_hh, b_hh, batch_sizes, ws = ctx.saved_tensors
    if not ctx.has_workspace:
        ws = gru_layer(gates_x, h0, w_hh, b_hh, batch_sizes, ctx.backend, True)[2]
    grad_out, grad_hn = _zeros_for_none((grad_out, grad_hn), (gates_x, h0), w_hh)
    dgx, dgh, dh0 = gru_layer_backward(grad_out, grad_hn, ws, w_hh, batch_sizes, ctx.backend)
    need = ctx.needs_input_grad
    layout = workspace_layout("gru", w_hh.shape[1] // 3)
    dw_hh, db_hh = _hidden_grads(need[2], need[3] and b_hh is not None, dgh, ws, layout, w_hh)
    return (dgx, dh0, dw_hh, db_hh, None, None, None)


gru_layer.register_autograd(_gru_backward, setup_context=_gru_setup)


# ---------------------------------------------------------------------------------------------------------
# Elman RNN (tanh / relu)
# ---------------------------------------------------------------------------------------------------------


def _check_nonlinearity(nonlinearity: str) -> None:
    if nonlinearity not in ("tanh", "relu"):
        raise RuntimeError(f"Unknown nonlinearity: {nonlinearity}. Expected 'tanh' or 'relu'")


@torch.library.custom_op("fastseq::rnn_layer", mutates_args=())
def rnn_layer(gates_x: Tensor, h0: Tensor, w_hh: Tensor, b_hh: Optional[Tensor], batch_sizes: Optional[Tensor],
              nonlinearity: str, backend: str, save_workspace: bool) -> tuple[Tensor, Tensor, Tensor]:
    """The Elman recurrence of one layer, ``nonlinearity`` "tanh" or "relu": ``(out, h_n, workspace)``."""
    _check_nonlinearity(nonlinearity)
    out, h_n, _, ws = _kernels(backend).launch_layer_fwd(
        "rnn", gates_x, h0, None, w_hh, b_hh, None, batch_sizes, save_workspace, nonlinearity)
    return out, h_n, ws


@rnn_layer.register_fake
def _(gates_x, h0, w_hh, b_hh, batch_sizes, nonlinearity, backend, save_workspace):
    _check_nonlinearity(nonlinearity)
    return _fake_forward("rnn", gates_x, h0, w_hh, w_hh.shape[1], 0, batch_sizes is not None, save_workspace)


@torch.library.custom_op("fastseq::rnn_layer_backward", mutates_args=())
def rnn_layer_backward(grad_out: Tensor, grad_hn: Tensor, workspace: Tensor, w_hh: Tensor,
                       batch_sizes: Optional[Tensor], nonlinearity: str, backend: str) -> tuple[Tensor, Tensor]:
    """``(d_gates, d_h0)``."""
    dgates, _, dh0, _, _ = _kernels(backend).launch_layer_bwd(
        "rnn", grad_out, grad_hn, None, workspace, w_hh, None, batch_sizes, nonlinearity)
    return dgates, dh0


@rnn_layer_backward.register_fake
def _(grad_out, grad_hn, workspace, w_hh, batch_sizes, nonlinearity, backend):
    shape = (*grad_out.shape[:-1], w_hh.shape[0] * w_hh.shape[1])
    return grad_out.new_empty(shape), torch.empty_like(grad_hn, memory_format=torch.contiguous_format)


def _rnn_setup(ctx, inputs, output):
    gates_x, h0, w_hh, b_hh, batch_sizes, nonlinearity, backend, save_workspace = inputs
    ctx.backend, ctx.nonlinearity, ctx.has_workspace = backend, nonlinearity, save_workspace
    ctx.save_for_backward(gates_x, h0, w_hh, b_hh, batch_sizes, output[2])


def _rnn_backward(ctx, grad_out, grad_hn, _grad_ws):
    gates_x, h0, w_hh, b_hh, batch_sizes, ws = ctx.saved_tensors
    if not ctx.has_workspace:
        ws = rnn_layer(gates_x, h0, w_hh, b_hh, batch_sizes, ctx.nonlinearity, ctx.backend, True)[2]
    grad_out, grad_hn = _zeros_for_none((grad_out, grad_hn), (gates_x, h0), w_hh)
    dgates, dh0 = rnn_layer_backward(grad_out, grad_hn, ws, w_hh, batch_sizes, ctx.nonlinearity, ctx.backend)
    need = ctx.needs_input_grad
    layout = workspace_layout("rnn", w_hh.shape[1])
    dw_hh, db_hh = _hidden_grads(need[2], need[3] and b_hh is not None, dgates, ws, layout, w_hh)
    return (dgates, dh0, dw_hh, db_hh, None, None, None, None)


rnn_layer.register_autograd(_rnn_backward, setup_context=_rnn_setup)


# ---------------------------------------------------------------------------------------------------------


def _zeros_for_none(grads, inputs, w_hh: Tensor):
    """Autograd passes ``None`` for an output whose gradient is zero; the kernels take real tensors. ``out``'s
    gradient has ``gates_x``'s leading shape and ``D·Hout`` columns; the states' gradients their shape."""
    filled = []
    for i, (g, like) in enumerate(zip(grads, inputs)):
        if g is None:
            if i == 0:
                g = like.new_zeros((*like.shape[:-1], w_hh.shape[0] * w_hh.shape[2]))
            else:
                g = torch.zeros_like(like)
        filled.append(g)
    return filled


def _hidden_grads(need_w: bool, need_b: bool, dgates_h: Tensor, ws: Tensor, layout: dict, w_hh: Tensor):
    """``dW_hh[d] = Σ_rows dgates_h[d]ᵀ·h_prev[d]`` and ``db_hh[d] = Σ_rows dgates_h[d]``, per direction ``d``.
    ``h_prev`` is rounded to the weights' dtype, as the state the forward's product consumed was."""
    D, G, Hout = w_hh.shape
    per_direction = dgates_h.reshape(-1, D, G).transpose(0, 1)  # (D, rows, G)
    dw_hh = db_hh = None
    if need_w:
        h_prev = ws[:, :, layout["h_prev"]:layout["h_prev"] + Hout].to(w_hh.dtype)
        dw_hh = torch.bmm(per_direction.transpose(1, 2), h_prev)
    if need_b:
        db_hh = per_direction.sum(1)
    return dw_hh, db_hh
