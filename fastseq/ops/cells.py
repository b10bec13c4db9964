"""Operators for one step of the recurrent cells: ``torch.ops.fastseq.{lstm,gru,rnn}_cell`` and their backward.

Each forward operator takes the backend that :func:`fastseq.backends.select` chose (a kernel backend, never
"auto" or "torch") and a flag ``save_workspace``: in training the kernel also writes the float32 activations
that backward needs; in inference it writes nothing but the new state, and returns an empty workspace. If a
backward is asked for anyway (the flag was off), the workspace is recomputed first, so the answer is right.
Weight and bias gradients are large products of the gate gradients with the layer inputs, done here with
torch matmuls so that torch.compile sees them.

The modules call :func:`run_lstm_cell`, :func:`run_gru_cell` and :func:`run_rnn_cell`: in eager inference (no
gradient to record, not under torch.compile, no subclass or mode watching) they call the backend's kernel directly,
skipping the custom operator's eager wrapper, which costs more than a small cell's whole kernel; everywhere else
they call the operator. Either way the same kernel runs on the same arguments.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

_WORKSPACE_GATES = {"lstm": 5, "gru": 4, "rnn": 1}


def _kernels(backend: str):
    """The module of launchers for a kernel backend."""
    if backend == "triton":
        from fastseq.kernels import rnn_cell

        return rnn_cell
    if backend in ("cpp", "cuda"):  # the same torch.ops.fastseq_cpp operators, dispatched on the tensors' device
        from fastseq import cpp_kernels

        return cpp_kernels
    raise RuntimeError(f"fastseq has no {backend!r} kernels for the recurrent cells")


# ---------------------------------------------------------------------------------------------------------
# What the modules call: the operator, or in eager inference its kernel directly
# ---------------------------------------------------------------------------------------------------------

# Tensor types that carry no __torch_function__ / __torch_dispatch__ of their own.
_PLAIN_TENSOR_TYPES = (Tensor, torch.nn.Parameter)

# _kernels(backend), looked up once per backend (its import statement costs a µs or two per call).
_LAUNCHERS: dict = {}


def _launchers(backend: str):
    launchers = _LAUNCHERS.get(backend)
    if launchers is None:
        launchers = _LAUNCHERS[backend] = _kernels(backend)
    return launchers


def may_skip_operator(*tensors: Optional[Tensor]) -> bool:
    """Whether a forward may call its kernel directly instead of going through its custom operator, whose eager
    wrapper (autograd setup, schema checks) costs tens of µs per call, more than a small cell's kernel. Only where
    nothing could notice the difference: not traced by torch.compile (which must see ``torch.ops.fastseq.*``), no
    gradient to record (nothing requires grad, or grad mode is off), plain tensors and no torch function or
    dispatch mode (subclasses and modes must see fastseq's own operators). The kernel is the one the operator would
    run, with the same arguments, so the results are the same bits."""
    if torch.compiler.is_compiling():
        return False
    if torch._C._len_torch_function_stack() or torch._C._len_torch_dispatch_stack():
        return False
    grad = torch.is_grad_enabled()
    for t in tensors:
        if t is not None and (type(t) not in _PLAIN_TENSOR_TYPES or (grad and t.requires_grad)):
            return False
    return True


def run_lstm_cell(input: Tensor, hx: Optional[Tensor], cx: Optional[Tensor], w_ih: Tensor, w_hh: Tensor,
                  b_ih: Optional[Tensor], b_hh: Optional[Tensor], backend: str,
                  save_workspace: bool) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`lstm_cell`, through its operator or, where :func:`may_skip_operator`, its kernel directly."""
    if may_skip_operator(input, hx, cx, w_ih, w_hh, b_ih, b_hh):
        return _launchers(backend).launch_cell_fwd("lstm", input, hx, cx, w_ih, w_hh, b_ih, b_hh, save_workspace)
    return lstm_cell(input, hx, cx, w_ih, w_hh, b_ih, b_hh, backend, save_workspace)


def run_gru_cell(input: Tensor, hx: Optional[Tensor], w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor],
                 b_hh: Optional[Tensor], backend: str, save_workspace: bool) -> tuple[Tensor, Tensor]:
    """:func:`gru_cell`, through its operator or, where :func:`may_skip_operator`, its kernel directly."""
    if may_skip_operator(input, hx, w_ih, w_hh, b_ih, b_hh):
        h, _, ws = _launchers(backend).launch_cell_fwd("gru", input, hx, None, w_ih, w_hh, b_ih, b_hh,
                                                      save_workspace)
        return h, ws
    return gru_cell(input, hx, w_ih, w_hh, b_ih, b_hh, backend, save_workspace)


def run_rnn_cell(input: Tensor, hx: Optional[Tensor], w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor],
                 b_hh: Optional[Tensor], nonlinearity: str, backend: str,
                 save_workspace: bool) -> tuple[Tensor, Tensor]:
    """:func:`rnn_cell`, through its operator or, where :func:`may_skip_operator`, its kernel directly."""
    if may_skip_operator(input, hx, w_ih, w_hh, b_ih, b_hh):
        _check_nonlinearity(nonlinearity)
        h, _, ws = _launchers(backend).launch_cell_fwd(
            "rnn", input, hx, None, w_ih, w_hh, b_ih, b_hh, save_workspace, nonlinearity)
        return h, ws
    return rnn_cell(input, hx, w_ih, w_hh, b_ih, b_hh, nonlinearity, backend, save_workspace)


def _empty_like_fwd(kind: str, input: Tensor, w_hh: Tensor, save_workspace: bool):
    B, H = input.shape[0], w_hh.shape[1]
    h = input.new_empty((B, H))
    ws = input.new_empty((B, _WORKSPACE_GATES[kind] * H) if save_workspace else (0,), dtype=torch.float32)
    return h, ws


def _or_empty(t: Optional[Tensor], like: Tensor) -> Tensor:
    """Custom operators cannot return ``None``: an absent gradient travels as a fresh empty tensor."""
    return like.new_empty((0,)) if t is None else t


# ---------------------------------------------------------------------------------------------------------
# LSTM
# ---------------------------------------------------------------------------------------------------------


@torch.library.custom_op("fastseq::lstm_cell", mutates_args=())
def lstm_cell(input: Tensor, hx: Optional[Tensor], cx: Optional[Tensor], w_ih: Tensor, w_hh: Tensor,
              b_ih: Optional[Tensor], b_hh: Optional[Tensor], backend: str,
              save_workspace: bool) -> tuple[Tensor, Tensor, Tensor]:
    """One LSTM step: ``(h', c', workspace)``. ``hx`` and ``cx`` are both given or both ``None`` (zeros)."""
    h, c, ws = _kernels(backend).launch_cell_fwd("lstm", input, hx, cx, w_ih, w_hh, b_ih, b_hh, save_workspace)
    return h, c, ws


@lstm_cell.register_fake
def _(input, hx, cx, w_ih, w_hh, b_ih, b_hh, backend, save_workspace):
    h, ws = _empty_like_fwd("lstm", input, w_hh, save_workspace)
    return h, torch.empty_like(h), ws


@torch.library.custom_op("fastseq::lstm_cell_backward", mutates_args=())
def lstm_cell_backward(grad_h: Tensor, grad_c: Tensor, workspace: Tensor, hx: Optional[Tensor],
                       cx: Optional[Tensor], w_ih: Tensor, w_hh: Tensor, backend: str,
                       need_input_grad: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(d_gates, d_input, d_hx, d_cx)``; a gradient that is not needed or has no input is an empty tensor."""
    dgates, _, dx, dh, dc = _kernels(backend).launch_cell_bwd(
        "lstm", grad_h, grad_c, workspace, hx, cx, w_ih, w_hh, need_input_grad)
    return dgates, _or_empty(dx, grad_h), _or_empty(dh, grad_h), _or_empty(dc, grad_h)


@lstm_cell_backward.register_fake
def _(grad_h, grad_c, workspace, hx, cx, w_ih, w_hh, backend, need_input_grad):
    B, H = grad_h.shape
    dgates = grad_h.new_empty((B, 4 * H))
    dx = grad_h.new_empty((B, w_ih.shape[1]) if need_input_grad else (0,))
    dh = grad_h.new_empty((B, H) if hx is not None else (0,))
    dc = grad_h.new_empty((B, H) if hx is not None else (0,))
    return dgates, dx, dh, dc


def _lstm_setup(ctx, inputs, output):
    input, hx, cx, w_ih, w_hh, b_ih, b_hh, backend, save_workspace = inputs
    ctx.backend, ctx.has_workspace = backend, save_workspace
    ctx.save_for_backward(input, hx, cx, w_ih, w_hh, b_ih, b_hh, output[2])


def _lstm_backward(ctx, grad_h, grad_c, _grad_workspace):
    input, hx, cx, w_ih, w_hh, b_ih, b_hh, ws = ctx.saved_tensors
    if not ctx.has_workspace:
        ws = lstm_cell(input, hx, cx, w_ih, w_hh, b_ih, b_hh, ctx.backend, True)[2]
    need = ctx.needs_input_grad
    dgates, dx, dh, dc = lstm_cell_backward(grad_h, grad_c, ws, hx, cx, w_ih, w_hh, ctx.backend, need[0])
    dw_ih, dw_hh, db_ih, db_hh = _param_grads(need[3:7], dgates, dgates, input, hx, w_hh)
    return (dx if need[0] else None, dh if hx is not None and need[1] else None,
            dc if cx is not None and need[2] else None, dw_ih, dw_hh, db_ih, db_hh, None, None)


lstm_cell.register_autograd(_lstm_backward, setup_context=_lstm_setup)


# ---------------------------------------------------------------------------------------------------------
# GRU
# ---------------------------------------------------------------------------------------------------------


@torch.library.custom_op("fastseq::gru_cell", mutates_args=())
def gru_cell(input: Tensor, hx: Optional[Tensor], w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor],
             b_hh: Optional[Tensor], backend: str, save_workspace: bool) -> tuple[Tensor, Tensor]:
    """One GRU step: ``(h', workspace)``; ``hx=None`` starts from zeros."""
    h, _, ws = _kernels(backend).launch_cell_fwd("gru", input, hx, None, w_ih, w_hh, b_ih, b_hh, save_workspace)
    return h, ws


@gru_cell.register_fake
def _(input, hx, w_ih, w_hh, b_ih, b_hh, backend, save_workspace):
    return _empty_like_fwd("gru", input, w_hh, save_workspace)


@torch.library.custom_op("fastseq::gru_cell_backward", mutates_args=())
def gru_cell_backward(grad_h: Tensor, workspace: Tensor, hx: Optional[Tensor], w_ih: Tensor, w_hh: Tensor,
                      backend: str, need_input_grad: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(d_gates_input_side, d_gates_hidden_side, d_input, d_hx)``; absent gradients are empty tensors."""
    dgx, dgh, dx, dh, _ = _kernels(backend).launch_cell_bwd(
        "gru", grad_h, None, workspace, hx, None, w_ih, w_hh, need_input_grad)
    return dgx, dgh, _or_empty(dx, grad_h), _or_empty(dh, grad_h)


@gru_cell_backward.register_fake
def _(grad_h, workspace, hx, w_ih, w_hh, backend, need_input_grad):
    B, H = grad_h.shape
    dx = grad_h.new_empty((B, w_ih.shape[1]) if need_input_grad else (0,))
    dh = grad_h.new_empty((B, H) if hx is not None else (0,))
    return grad_h.new_empty((B, 3 * H)), grad_h.new_empty((B, 3 * H)), dx, dh


def _gru_setup(ctx, inputs, output):
    input, hx, w_ih, w_hh, b_ih, b_hh, backend, save_workspace = inputs
    ctx.backend, ctx.has_workspace = backend, save_workspace
    ctx.save_for_backward(input, hx, w_ih, w_hh, b_ih, b_hh, output[1])


def _gru_backward(ctx, grad_h, _grad_workspace):
    input, hx, w_ih, w_hh, b_ih, b_hh, ws = ctx.saved_tensors
    if not ctx.has_workspace:
        ws = gru_cell(input, hx, w_ih, w_hh, b_ih, b_hh, ctx.backend, True)[1]
    need = ctx.needs_input_grad
    dgx, dgh, dx, dh = gru_cell_backward(grad_h, ws, hx, w_ih, w_hh, ctx.backend, need[0])
    dw_ih, dw_hh, db_ih, db_hh = _param_grads(need[2:6], dgx, dgh, input, hx, w_hh)
    return (dx if need[0] else None, dh if hx is not None and need[1] else None,
            dw_ih, dw_hh, db_ih, db_hh, None, None)


gru_cell.register_autograd(_gru_backward, setup_context=_gru_setup)


# ---------------------------------------------------------------------------------------------------------
# Elman RNN (tanh / relu)
# ---------------------------------------------------------------------------------------------------------


def _check_nonlinearity(nonlinearity: str) -> None:
    if nonlinearity not in ("tanh", "relu"):
        raise RuntimeError(f"Unknown nonlinearity: {nonlinearity}. Expected 'tanh' or 'relu'")


@torch.library.custom_op("fastseq::rnn_cell", mutates_args=())
def rnn_cell(input: Tensor, hx: Optional[Tensor], w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor],
             b_hh: Optional[Tensor], nonlinearity: str, backend: str,
             save_workspace: bool) -> tuple[Tensor, Tensor]:
    """One Elman step, ``nonlinearity`` "tanh" or "relu": ``(h', workspace)``; ``hx=None`` starts from zeros."""
    _check_nonlinearity(nonlinearity)
    h, _, ws = _kernels(backend).launch_cell_fwd(
        "rnn", input, hx, None, w_ih, w_hh, b_ih, b_hh, save_workspace, nonlinearity)
    return h, ws


@rnn_cell.register_fake
def _(input, hx, w_ih, w_hh, b_ih, b_hh, nonlinearity, backend, save_workspace):
    _check_nonlinearity(nonlinearity)
    return _empty_like_fwd("rnn", input, w_hh, save_workspace)


@torch.library.custom_op("fastseq::rnn_cell_backward", mutates_args=())
def rnn_cell_backward(grad_h: Tensor, workspace: Tensor, has_state: bool, w_ih: Tensor, w_hh: Tensor,
                      nonlinearity: str, backend: str, need_input_grad: bool) -> tuple[Tensor, Tensor, Tensor]:
    """``(d_gates, d_input, d_hx)``; absent gradients are empty tensors."""
    # The hidden-state gradient depends only on whether a state was given, not on its values.
    state = grad_h if has_state else None
    dgates, _, dx, dh, _ = _kernels(backend).launch_cell_bwd(
        "rnn", grad_h, None, workspace, state, None, w_ih, w_hh, need_input_grad, nonlinearity)
    return dgates, _or_empty(dx, grad_h), _or_empty(dh, grad_h)


@rnn_cell_backward.register_fake
def _(grad_h, workspace, has_state, w_ih, w_hh, nonlinearity, backend, need_input_grad):
    B, H = grad_h.shape
    dx = grad_h.new_empty((B, w_ih.shape[1]) if need_input_grad else (0,))
    dh = grad_h.new_empty((B, H) if has_state else (0,))
    return grad_h.new_empty((B, H)), dx, dh


def _rnn_setup(ctx, inputs, output):
    input, hx, w_ih, w_hh, b_ih, b_hh, nonlinearity, backend, save_workspace = inputs
    ctx.backend, ctx.nonlinearity, ctx.has_workspace = backend, nonlinearity, save_workspace
    ctx.save_for_backward(input, hx, w_ih, w_hh, b_ih, b_hh, output[1])


def _rnn_backward(ctx, grad_h, _grad_workspace):
    input, hx, w_ih, w_hh, b_ih, b_hh, ws = ctx.saved_tensors
    if not ctx.has_workspace:
        ws = rnn_cell(input, hx, w_ih, w_hh, b_ih, b_hh, ctx.nonlinearity, ctx.backend, True)[1]
    need = ctx.needs_input_grad
    dgates, dx, dh = rnn_cell_backward(
        grad_h, ws, hx is not None, w_ih, w_hh, ctx.nonlinearity, ctx.backend, need[0])
    dw_ih, dw_hh, db_ih, db_hh = _param_grads(need[2:6], dgates, dgates, input, hx, w_hh)
    return (dx if need[0] else None, dh if hx is not None and need[1] else None,
            dw_ih, dw_hh, db_ih, db_hh, None, None, None)


rnn_cell.register_autograd(_rnn_backward, setup_context=_rnn_setup)


# ---------------------------------------------------------------------------------------------------------


def _param_grads(need, dgates_x: Tensor, dgates_h: Tensor, input: Tensor, hx: Optional[Tensor],
                 w_hh: Tensor):
    """Gradients of ``(W_ih, W_hh, b_ih, b_hh)`` from the gate gradients: ``dW = dAᵀ·x``, ``db = Σ_b dA``."""
    need_w_ih, need_w_hh, need_b_ih, need_b_hh = need
    dw_ih = dgates_x.t() @ input if need_w_ih else None
    if need_w_hh:
        dw_hh = torch.zeros_like(w_hh) if hx is None else dgates_h.t() @ hx
    else:
        dw_hh = None
    db_ih = dgates_x.sum(0) if need_b_ih else None
    db_hh = dgates_h.sum(0) if need_b_hh else None
    return dw_ih, dw_hh, db_ih, db_hh
