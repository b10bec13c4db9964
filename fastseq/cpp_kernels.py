"""The "cpp" and "cuda" backends' launchers: the compiled kernels of the extension (C++ for CPU tensors in
``csrc/cpu/``, CUDA for GPU tensors in ``csrc/cuda/``: the same operators, dispatched by torch on the tensors'
device), behind the launcher interface of the Triton kernels, so that the operators (``fastseq/ops/cells.py``,
``fastseq/ops/layers.py``) run any of them through ``_kernels(backend)`` unchanged.

The kernels are torch operators, ``torch.ops.fastseq_cpp.{lstm,gru,rnn}_{cell,layer}_{fwd,bwd}``, registered when
``fastseq._C`` loads (schemas in ``csrc/cpu/library.cpp``); their fake (meta) implementations are registered here,
so ``torch.library.opcheck`` and fake-tensor tracing see their output shapes. They have no autograd of their own:
the ``fastseq::*`` operators that call them carry it.

Each function below has the signature and the returns of its namesake in ``kernels/rnn_cell.py`` (cells) or
``kernels/rnn_seq.py`` (layers), and the kernels write the same float32 workspace layouts, so a workspace from
one backend's forward is a valid input to the other's backward. The operators return absent results as empty
tensors (a schema cannot return ``None``); here they become ``None`` again, from the arguments, never from the
sizes (a needed gradient may have no elements).
"""

from __future__ import annotations

import torch

import fastseq._C as _C  # loading the extension registers torch.ops.fastseq_cpp
from fastseq.ops import cells as _cell_ops
from fastseq.ops import layers as _layer_ops

_ops = torch.ops.fastseq_cpp

# The operators' own tables: the C++ kernels write exactly the workspaces the operators read.
NUM_GATES = _layer_ops._GATES
_CELL_WORKSPACE_GATES = _cell_ops._WORKSPACE_GATES
workspace_layout = _layer_ops.workspace_layout


# ---------------------------------------------------------------------------------------------------------
# Cells
# ---------------------------------------------------------------------------------------------------------


def launch_cell_fwd(kind: str, x, h, c, w_ih, w_hh, b_ih, b_hh, save: bool, nonlinearity: str = "tanh"):
    """Forward of one cell step. ``kind`` is "lstm", "gru" or "rnn". Returns ``(h', c' or None, workspace)``,
    the workspace float32 ``(B, k·H)`` when ``save`` else an empty tensor.

    The operator is called through ``fastseq._C``'s direct entry points (csrc/cpu/direct_calls.cpp), which reach it
    through the dispatcher from C++: through ``torch.ops`` the call's Python-side argument handling costs more than
    the kernel at decode sizes."""
    if kind == "lstm":
        h_out, c_out, ws = _C.lstm_cell_fwd(x, h, c, w_ih, w_hh, b_ih, b_hh, save)
        return h_out, c_out, ws
    if kind == "gru":
        h_out, ws = _C.gru_cell_fwd(x, h, w_ih, w_hh, b_ih, b_hh, save)
    else:
        h_out, ws = _C.rnn_cell_fwd(x, h, w_ih, w_hh, b_ih, b_hh, save, nonlinearity)
    return h_out, None, ws


def launch_cell_bwd(kind: str, grad_h, grad_c, ws, h, c, w_ih, w_hh, need_input_grad: bool,
                    nonlinearity: str = "tanh"):
    """Backward of one cell step from the forward's workspace. Returns ``(dgates_x, dgates_h, dx, dh, dc)``:
    the pre-activation gate gradients of the input side and of the hidden side (the same tensor except for
    GRU), in the input dtype, and the gradients of input and states (``None`` where not asked or absent).
    ``h`` and ``c`` are the states the forward consumed (``None`` where it started from zeros)."""
    has_state = h is not None
    dx = dh = dc = None
    if kind == "lstm":
        dgates, dx, dh, dc = _ops.lstm_cell_bwd(grad_h, grad_c, ws, h, c, w_ih, w_hh, need_input_grad)
        dgates_h = dgates
    elif kind == "gru":
        dgates, dgates_h, dx, dh = _ops.gru_cell_bwd(grad_h, ws, h, w_ih, w_hh, need_input_grad)
    else:
        dgates, dx, dh = _ops.rnn_cell_bwd(grad_h, ws, has_state, w_ih, w_hh, need_input_grad, nonlinearity)
        dgates_h = dgates
    return (dgates, dgates_h, dx if need_input_grad else None, dh if has_state else None,
            dc if has_state and kind == "lstm" else None)


# ---------------------------------------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------------------------------------


def launch_layer_fwd(kind: str, gates_x, h0, c0, w_hh, b_hh, w_hr, batch_sizes, save: bool,
                     nonlinearity: str = "tanh"):
    """Forward of one layer, both directions. Returns ``(out, h_n, c_n, ws)``.

    ``gates_x``: ``(T, B, D·G)`` (any strides) or packed ``(N, D·G)`` with ``batch_sizes`` (int64, on the CPU,
    as in a PackedSequence); ``h0`` ``(D, B, H_out)``; ``c0`` ``(D, B, H)`` for LSTM else ``None``; ``w_hh``
    ``(D, G, H_out)``; ``b_hh`` ``(D, G)`` or ``None``; ``w_hr`` ``(D, P, H)`` or ``None``. ``out`` is
    ``(T, B, D·H_out)`` or ``(N, D·H_out)``, contiguous; ``ws`` the float32 ``(D, N_rows, width)`` workspace of
    :func:`workspace_layout` when ``save``, else an empty tensor."""
    if kind == "lstm":
        out, h_n, c_n, ws = _ops.lstm_layer_fwd(gates_x, h0, c0, w_hh, b_hh, w_hr, batch_sizes, save)
        return out, h_n, c_n, ws
    if kind == "gru":
        out, h_n, ws = _ops.gru_layer_fwd(gates_x, h0, w_hh, b_hh, batch_sizes, save)
    else:
        out, h_n, ws = _ops.rnn_layer_fwd(gates_x, h0, w_hh, b_hh, batch_sizes, save, nonlinearity)
    return out, h_n, None, ws


def launch_layer_bwd(kind: str, grad_out, grad_hn, grad_cn, ws, w_hh, w_hr, batch_sizes, nonlinearity: str = "tanh"):
    """Backward of one layer from the forward's workspace, both directions. Returns ``(dgates_x, dgates_h, dh0,
    dc0, dh_total)``: the gradients of ``gates_x`` and of the hidden-side pre-activations (the same tensor except
    for GRU), shaped like ``gates_x``, contiguous, in the input dtype; of ``h0`` and ``c0`` (``None`` for
    non-LSTM); and for LSTM with a projection the float32 ``(D, N_rows, P)`` total gradient of every step's
    output ``h``, else ``None``."""
    if kind == "lstm":
        dgates, dh0, dc0, dht = _ops.lstm_layer_bwd(grad_out, grad_hn, grad_cn, ws, w_hh, w_hr, batch_sizes)
        return dgates, dgates, dh0, dc0, dht if w_hr is not None else None
    if kind == "gru":
        dgx, dgh, dh0 = _ops.gru_layer_bwd(grad_out, grad_hn, ws, w_hh, batch_sizes)
        return dgx, dgh, dh0, None, None
    dgates, dh0 = _ops.rnn_layer_bwd(grad_out, grad_hn, ws, w_hh, batch_sizes, nonlinearity)
    return dgates, dgates, dh0, None, None


# ---------------------------------------------------------------------------------------------------------
# Fake (meta) implementations: the output shapes, from the input shapes alone
# ---------------------------------------------------------------------------------------------------------


def _empty(like, shape, dtype=None):
    return like.new_empty(shape, dtype=dtype or like.dtype)


def _cell_fwd_fake(kind, x, w_hh, save):
    B, H = x.shape[0], w_hh.shape[1]
    ws = _empty(x, (B, _CELL_WORKSPACE_GATES[kind] * H) if save else (0,), torch.float32)
    return _empty(x, (B, H)), ws


@torch.library.register_fake("fastseq_cpp::lstm_cell_fwd")
def _(x, h, c, w_ih, w_hh, b_ih, b_hh, save):
    h_out, ws = _cell_fwd_fake("lstm", x, w_hh, save)
    return h_out, torch.empty_like(h_out), ws


@torch.library.register_fake("fastseq_cpp::gru_cell_fwd")
def _(x, h, w_ih, w_hh, b_ih, b_hh, save):
    return _cell_fwd_fake("gru", x, w_hh, save)


@torch.library.register_fake("fastseq_cpp::rnn_cell_fwd")
def _(x, h, w_ih, w_hh, b_ih, b_hh, save, nonlinearity):
    return _cell_fwd_fake("rnn", x, w_hh, save)


def _cell_bwd_fake(kind, grad_h, w_ih, has_state, need_input_grad):
    B, H = grad_h.shape
    dgates = _empty(w_ih, (B, NUM_GATES[kind] * H))
    dx = _empty(w_ih, (B, w_ih.shape[1]) if need_input_grad else (0,))
    dh = _empty(w_ih, (B, H) if has_state else (0,))
    return dgates, dx, dh


@torch.library.register_fake("fastseq_cpp::lstm_cell_bwd")
def _(grad_h, grad_c, workspace, h, c, w_ih, w_hh, need_input_grad):
    dgates, dx, dh = _cell_bwd_fake("lstm", grad_h, w_ih, h is not None, need_input_grad)
    return dgates, dx, dh, torch.empty_like(dh)


@torch.library.register_fake("fastseq_cpp::gru_cell_bwd")
def _(grad_h, workspace, h, w_ih, w_hh, need_input_grad):
    dgates, dx, dh = _cell_bwd_fake("gru", grad_h, w_ih, h is not None, need_input_grad)
    return dgates, torch.empty_like(dgates), dx, dh


@torch.library.register_fake("fastseq_cpp::rnn_cell_bwd")
def _(grad_h, workspace, has_state, w_ih, w_hh, need_input_grad, nonlinearity):
    return _cell_bwd_fake("rnn", grad_h, w_ih, has_state, need_input_grad)


@torch.library.register_fake("fastseq_cpp::small_gemm_nt")
def _(a, w, a2, w2, isa):
    return a.new_empty((a.shape[0], w.shape[0]))


def _layer_fwd_fake(kind, gates_x, h0, w_hh, w_hr, batch_sizes, save):
    D, B, HO = h0.shape
    H = w_hh.shape[1] // NUM_GATES[kind]
    P = 0 if w_hr is None else w_hr.shape[1]
    rows = gates_x.shape[0] if batch_sizes is not None else gates_x.shape[0] * gates_x.shape[1]
    out = _empty(gates_x, (*gates_x.shape[:-1], D * HO))
    ws = _empty(gates_x, (D, rows, workspace_layout(kind, H, P)["width"]) if save else (0,), torch.float32)
    return out, _empty(gates_x, (D, B, HO)), ws


@torch.library.register_fake("fastseq_cpp::lstm_layer_fwd")
def _(gates_x, h0, c0, w_hh, b_hh, w_hr, batch_sizes, save):
    out, h_n, ws = _layer_fwd_fake("lstm", gates_x, h0, w_hh, w_hr, batch_sizes, save)
    D, B = h0.shape[:2]
    return out, h_n, _empty(gates_x, (D, B, w_hh.shape[1] // 4)), ws


@torch.library.register_fake("fastseq_cpp::gru_layer_fwd")
def _(gates_x, h0, w_hh, b_hh, batch_sizes, save):
    return _layer_fwd_fake("gru", gates_x, h0, w_hh, None, batch_sizes, save)


@torch.library.register_fake("fastseq_cpp::rnn_layer_fwd")
def _(gates_x, h0, w_hh, b_hh, batch_sizes, save, nonlinearity):
    return _layer_fwd_fake("rnn", gates_x, h0, w_hh, None, batch_sizes, save)


def _layer_bwd_fake(grad_out, grad_hn, w_hh):
    D, B, HO = grad_hn.shape
    dgates = _empty(w_hh, (*grad_out.shape[:-1], D * w_hh.shape[1]))
    return dgates, _empty(w_hh, (D, B, HO))


@torch.library.register_fake("fastseq_cpp::lstm_layer_bwd")
def _(grad_out, grad_hn, grad_cn, workspace, w_hh, w_hr, batch_sizes):
    dgates, dh0 = _layer_bwd_fake(grad_out, grad_hn, w_hh)
    D, B = grad_hn.shape[:2]
    dc0 = _empty(w_hh, (D, B, w_hh.shape[1] // 4))
    rows = grad_out.shape[0] if batch_sizes is not None else grad_out.shape[0] * grad_out.shape[1]
    dht = _empty(w_hh, (D, rows, w_hr.shape[1]) if w_hr is not None else (0,), torch.float32)
    return dgates, dh0, dc0, dht


@torch.library.register_fake("fastseq_cpp::gru_layer_bwd")
def _(grad_out, grad_hn, workspace, w_hh, batch_sizes):
    dgates, dh0 = _layer_bwd_fake(grad_out, grad_hn, w_hh)
    return dgates, torch.empty_like(dgates), dh0


@torch.library.register_fake("fastseq_cpp::rnn_layer_bwd")
def _(grad_out, grad_hn, workspace, w_hh, batch_sizes, nonlinearity):
    return _layer_bwd_fake(grad_out, grad_hn, w_hh)
