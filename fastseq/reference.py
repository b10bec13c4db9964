"""Reference math for every op fastseq ships, in plain PyTorch.

This module is the documentation of the math: each function is written the way the equations read, with
torch's own conventions (gate order, where the biases sit, what is returned), so that every kernel can be
checked against it in float64. Nothing here is fast and nothing here knows about kernels or backends.

Notation: ``x`` is the input of one time step ``(B, I)``, ``h`` / ``c`` the hidden and cell state ``(B, H)``,
``W_ih`` is ``(G·H, I)`` and ``W_hh`` is ``(G·H, H)`` with ``G`` gates stacked in torch's order, ``b_ih`` and
``b_hh`` the two biases ``(G·H,)`` (either may be ``None``: ``bias=False``). ``σ`` is the logistic sigmoid and
``⊙`` the element-wise product.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _linear(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    """``x · wᵀ + b``."""
    y = x @ w.t()
    return y if b is None else y + b


# ---------------------------------------------------------------------------------------------------------
# Cells: one time step
# ---------------------------------------------------------------------------------------------------------


def rnn_cell(x: Tensor, h: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor | None = None,
             b_hh: Tensor | None = None, nonlinearity: str = "tanh") -> Tensor:
    """Elman cell (``torch.nn.RNNCell``), one gate (G = 1)::

        h' = act(W_ih x + b_ih + W_hh h + b_hh),   act = tanh or relu
    """
    pre = _linear(x, w_ih, b_ih) + _linear(h, w_hh, b_hh)
    if nonlinearity == "tanh":
        return torch.tanh(pre)
    if nonlinearity == "relu":
        return torch.relu(pre)
    raise ValueError(f"Unknown nonlinearity '{nonlinearity}'. Select from 'tanh' or 'relu'.")


def lstm_cell(x: Tensor, h: Tensor, c: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor | None = None,
              b_hh: Tensor | None = None, w_hr: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """LSTM cell (``torch.nn.LSTMCell``), gates stacked as (i, f, g, o), G = 4::

        i = σ(W_ii x + b_ii + W_hi h + b_hi)        input gate
        f = σ(W_if x + b_if + W_hf h + b_hf)        forget gate
        g = tanh(W_ig x + b_ig + W_hg h + b_hg)     cell candidate
        o = σ(W_io x + b_io + W_ho h + b_ho)        output gate
        c' = f ⊙ c + i ⊙ g
        h' = o ⊙ tanh(c')

    With a projection (``nn.LSTM(proj_size=P)``), ``h' = W_hr (o ⊙ tanh(c'))`` with ``W_hr`` of shape
    ``(P, H)``; ``h`` is then ``(B, P)`` and ``W_hh`` is ``(4H, P)``.
    Returns ``(h', c')``.
    """
    gates = _linear(x, w_ih, b_ih) + _linear(h, w_hh, b_hh)
    i, f, g, o = gates.chunk(4, dim=-1)
    i, f, g, o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
    c_next = f * c + i * g
    h_next = o * torch.tanh(c_next)
    if w_hr is not None:
        h_next = h_next @ w_hr.t()
    return h_next, c_next


def gru_cell(x: Tensor, h: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor | None = None,
             b_hh: Tensor | None = None) -> Tensor:
    """GRU cell (``torch.nn.GRUCell``), gates stacked as (r, z, n), G = 3::

        r = σ(W_ir x + b_ir + W_hr h + b_hr)              reset gate
        z = σ(W_iz x + b_iz + W_hz h + b_hz)              update gate
        n = tanh(W_in x + b_in + r ⊙ (W_hn h + b_hn))     candidate: the reset gate scales the
                                                          *whole* hidden-side term, bias included
        h' = (1 − z) ⊙ n + z ⊙ h
    """
    xr, xz, xn = _linear(x, w_ih, b_ih).chunk(3, dim=-1)
    hr, hz, hn = _linear(h, w_hh, b_hh).chunk(3, dim=-1)
    r = torch.sigmoid(xr + hr)
    z = torch.sigmoid(xz + hz)
    n = torch.tanh(xn + r * hn)
    return (1 - z) * n + z * h
