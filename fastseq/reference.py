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


# ---------------------------------------------------------------------------------------------------------
# Layers: whole sequences
# ---------------------------------------------------------------------------------------------------------
#
# A layer (``torch.nn.RNN`` / ``LSTM`` / ``GRU``) is the cell above run over time, stacked ``L = num_layers``
# deep, in ``D = 2`` directions when bidirectional (``D = 1`` otherwise)::
#
#     layer 0 reads the input x_t; layer l > 0 reads the output of layer l − 1 (times its dropout keep-mask)
#     forward direction:  s_t = cell(x_t, s_{t−1}),  t = 0 … T−1,       s_{−1} = initial state
#     reverse direction:  s_t = cell(x_t, s_{t+1}),  t = T−1 … 0,       s_T    = initial state
#     output of a layer at step t: [h_t(forward), h_t(reverse)] concatenated on the feature dimension
#     final state of (layer l, direction d): its state after its last step (t = T−1 forward, t = 0 reverse)
#
# Shapes, in torch's conventions: the input is ``(T, B, I)`` (``(B, T, I)`` with ``batch_first``); the output is
# ``(T, B, D·H_out)`` (likewise ``(B, T, D·H_out)``) with ``H_out = P`` for an LSTM with ``proj_size = P > 0`` and
# ``H`` otherwise; every state is stacked layer-major, direction-minor: ``(L·D, B, ·)`` with row ``l·D + d``.
# ``h`` is ``(L·D, B, H_out)``, the LSTM cell state ``c`` is ``(L·D, B, H)``. A missing initial state is zeros.
#
# ``weights[l·D + d]`` holds the parameters of (layer l, direction d) in the order of torch's ``_flat_weights``:
# ``(w_ih, w_hh, b_ih, b_hh)`` for RNN and GRU, ``(w_ih, w_hh, b_ih, b_hh, w_hr)`` for LSTM (``w_hr`` is ``None``
# without a projection; a 4-tuple is accepted too), with ``None`` biases for ``bias=False``. Layer 0's ``w_ih``
# is ``(G·H, I)``, deeper layers' are ``(G·H, D·H_out)``. ``layer_weights(module)`` builds this list.
#
# Packed sequences. With ``batch_sizes`` given, ``input`` is the *packed data* of a ``PackedSequence``: a 2-D
# ``(sum(batch_sizes), I)`` tensor holding step 0's ``batch_sizes[0]`` rows, then step 1's ``batch_sizes[1]``
# rows, and so on (``batch_sizes`` non-increasing, ``batch_sizes[0] = B``; ``batch_first`` is then ignored, as
# torch ignores it for packed input). At step t only the first ``batch_sizes[t]`` sequences advance; the others
# have ended and keep their state. So each sequence's final state is its state at its own last step, and the
# reverse direction of a sequence starts from the initial state at its own last step. The output is packed
# data too, ``(sum(batch_sizes), D·H_out)``. States are in the *packed (sorted) batch order*: a caller holding a
# ``PackedSequence`` with ``sorted_indices`` permutes ``hx`` by ``sorted_indices`` on the way in and the final
# states by ``unsorted_indices`` on the way out, exactly as torch's modules do.
#
# Dropout between layers. torch draws a fresh mask on the output of every layer but the last (in training);
# the reference never draws random numbers: ``dropout_masks[l]`` (``l = 0 … L−2``) multiplies the output of
# layer l before layer l + 1 reads it. It is the *scaled* keep-mask (0 where dropped, ``1 / (1 − p)`` where
# kept), broadcastable to that output in the layout of the returned output (``(T, B, D·H_out)``, batch-first, or
# packed data), or ``None`` for no dropout there; ``dropout_masks=None`` means no dropout anywhere.


def layer_weights(module: torch.nn.Module) -> list[tuple[Tensor | None, ...]]:
    """The ``weights`` list of ``rnn_layer`` / ``lstm_layer`` / ``gru_layer`` for a ``torch.nn.RNN``, ``LSTM`` or
    ``GRU`` (or any module with their parameter names): ``weights[l·D + d]`` is the tuple of (layer l,
    direction d), the module's own ``Parameter`` objects, ``None`` where the module has no such parameter
    (``bias=False``, no projection). LSTM tuples have five entries, RNN and GRU tuples four."""
    is_lstm = isinstance(module, torch.nn.LSTM) or getattr(module, "mode", None) == "LSTM"
    names = ("weight_ih", "weight_hh", "bias_ih", "bias_hh") + (("weight_hr",) if is_lstm else ())
    directions = 2 if module.bidirectional else 1
    weights = []
    for layer in range(module.num_layers):
        for direction in range(directions):
            suffix = f"_l{layer}" + ("_reverse" if direction == 1 else "")
            weights.append(tuple(getattr(module, name + suffix, None) for name in names))
    return weights


def _split_steps(x: Tensor, batch_first: bool, batch_sizes: list[int] | None) -> list[Tensor]:
    """A sequence tensor (time-major, batch-first or packed data) as the list of its T steps ``(B_t, F)``."""
    if batch_sizes is not None:
        return list(x.split(batch_sizes, dim=0))
    return list(x.unbind(1 if batch_first else 0))


def _join_steps(steps: list[Tensor], batch_first: bool, batch_sizes: list[int] | None) -> Tensor:
    """The inverse of ``_split_steps``."""
    if batch_sizes is not None:
        return torch.cat(steps, dim=0)
    return torch.stack(steps, dim=1 if batch_first else 0)


def _run_direction(step, xs: list[Tensor], state: tuple[Tensor, ...], reverse: bool
                   ) -> tuple[list[Tensor], tuple[Tensor, ...]]:
    """Run ``state = step(x_t, state)`` over the steps ``xs`` (backwards when ``reverse``). At step t only the
    first ``xs[t].size(0)`` rows of the state advance (all of them unless packed); the rest keep their value.
    Returns the output ``h`` (``state[0]``) of every step, in time order, and the final state."""
    outputs: list[Tensor] = [None] * len(xs)  # type: ignore[list-item]
    for t in (reversed(range(len(xs))) if reverse else range(len(xs))):
        n = xs[t].size(0)
        advanced = step(xs[t], tuple(s[:n] for s in state))
        state = tuple(torch.cat([new, s[n:]], dim=0) for new, s in zip(advanced, state))
        outputs[t] = advanced[0]
    return outputs, state


def _stacked_layers(step, input: Tensor, states: tuple[Tensor, ...], weights, *, num_layers: int,
                    bidirectional: bool, batch_first: bool, dropout_masks, batch_sizes
                    ) -> tuple[Tensor, tuple[Tensor, ...]]:
    """The layer recursion shared by RNN, LSTM and GRU. ``step(x, state, w)`` is one cell step returning the
    new state tuple (hidden first); ``states`` are the ``(L·D, B, ·)`` initial states."""
    directions = 2 if bidirectional else 1
    if len(weights) != num_layers * directions:
        raise ValueError(f"weights must hold num_layers * num_directions = {num_layers * directions} tuples, "
                         f"got {len(weights)}")
    if dropout_masks is not None and len(dropout_masks) != num_layers - 1:
        raise ValueError(f"dropout_masks must hold num_layers - 1 = {num_layers - 1} entries, "
                         f"got {len(dropout_masks)}")
    if batch_sizes is not None:
        batch_sizes = [int(n) for n in batch_sizes]
        if input.dim() != 2 or input.size(0) != sum(batch_sizes):
            raise ValueError(f"packed input must be 2-D (sum(batch_sizes), I) = ({sum(batch_sizes)}, I), "
                             f"got {tuple(input.shape)}")
    elif input.dim() != 3:
        raise ValueError(f"input must be 3-D (T, B, I) or (B, T, I), got {input.dim()}-D")

    xs = _split_steps(input, batch_first, batch_sizes)
    finals: list[tuple[Tensor, ...]] = []
    for layer in range(num_layers):
        if layer > 0 and dropout_masks is not None and dropout_masks[layer - 1] is not None:
            kept = _join_steps(xs, batch_first, batch_sizes) * dropout_masks[layer - 1]
            xs = _split_steps(kept, batch_first, batch_sizes)
        per_direction = []
        for direction in range(directions):
            index = layer * directions + direction
            w = weights[index]
            outputs, final = _run_direction(lambda x, s: step(x, s, w), xs, tuple(s[index] for s in states),
                                            reverse=direction == 1)
            per_direction.append(outputs)
            finals.append(final)
        xs = [torch.cat(step_outputs, dim=-1) for step_outputs in zip(*per_direction)]
    output = _join_steps(xs, batch_first, batch_sizes)
    return output, tuple(torch.stack(parts, dim=0) for parts in zip(*finals))


def _batch_size(input: Tensor, batch_first: bool, batch_sizes) -> int:
    if batch_sizes is not None:
        return int(batch_sizes[0]) if len(batch_sizes) else 0
    return input.size(0 if batch_first else 1)


def _zeros_state(input: Tensor, rows: int, batch: int, size: int) -> Tensor:
    return torch.zeros(rows, batch, size, dtype=input.dtype, device=input.device)


def rnn_layer(input: Tensor, h0: Tensor | None, weights, *, nonlinearity: str = "tanh", num_layers: int = 1,
              bidirectional: bool = False, batch_first: bool = False, dropout_masks=None,
              batch_sizes=None) -> tuple[Tensor, Tensor]:
    """``torch.nn.RNN``: ``rnn_cell`` run over time, stacked and (optionally) bidirectional, as described at
    the top of this section. ``h0`` is ``(L·D, B, H)`` or ``None`` (zeros). Returns ``(output, h_n)``."""
    directions = 2 if bidirectional else 1
    if h0 is None:
        hidden = weights[0][1].size(1)
        h0 = _zeros_state(input, num_layers * directions, _batch_size(input, batch_first, batch_sizes), hidden)

    def step(x, state, w):
        w_ih, w_hh, b_ih, b_hh = w
        return (rnn_cell(x, state[0], w_ih, w_hh, b_ih, b_hh, nonlinearity),)

    output, (h_n,) = _stacked_layers(step, input, (h0,), weights, num_layers=num_layers,
                                     bidirectional=bidirectional, batch_first=batch_first,
                                     dropout_masks=dropout_masks, batch_sizes=batch_sizes)
    return output, h_n


def lstm_layer(input: Tensor, hx: tuple[Tensor, Tensor] | None, weights, *, num_layers: int = 1,
               bidirectional: bool = False, batch_first: bool = False, proj_size: int = 0, dropout_masks=None,
               batch_sizes=None) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """``torch.nn.LSTM``: ``lstm_cell`` run over time, stacked and (optionally) bidirectional, as described at
    the top of this section. ``hx = (h0, c0)`` with ``h0`` ``(L·D, B, H_out)`` and ``c0`` ``(L·D, B, H)``, or
    ``None`` (zeros). With ``proj_size = P > 0`` every tuple of ``weights`` carries ``w_hr`` ``(P, H)`` and
    ``h = W_hr (o ⊙ tanh c)``. Returns ``(output, (h_n, c_n))``."""
    directions = 2 if bidirectional else 1
    for w in weights:
        w_hr = w[4] if len(w) > 4 else None
        if (w_hr is None) != (proj_size == 0) or (w_hr is not None and w_hr.size(0) != proj_size):
            raise ValueError(f"proj_size={proj_size} does not match the weights' w_hr "
                             f"({None if w_hr is None else tuple(w_hr.shape)})")
    if hx is None:
        hidden = weights[0][1].size(0) // 4
        rows, batch = num_layers * directions, _batch_size(input, batch_first, batch_sizes)
        hx = (_zeros_state(input, rows, batch, proj_size or hidden), _zeros_state(input, rows, batch, hidden))

    def step(x, state, w):
        w_ih, w_hh, b_ih, b_hh = w[:4]
        return lstm_cell(x, state[0], state[1], w_ih, w_hh, b_ih, b_hh, w[4] if len(w) > 4 else None)

    output, (h_n, c_n) = _stacked_layers(step, input, tuple(hx), weights, num_layers=num_layers,
                                         bidirectional=bidirectional, batch_first=batch_first,
                                         dropout_masks=dropout_masks, batch_sizes=batch_sizes)
    return output, (h_n, c_n)


def gru_layer(input: Tensor, h0: Tensor | None, weights, *, num_layers: int = 1, bidirectional: bool = False,
              batch_first: bool = False, dropout_masks=None, batch_sizes=None) -> tuple[Tensor, Tensor]:
    """``torch.nn.GRU``: ``gru_cell`` run over time, stacked and (optionally) bidirectional, as described at
    the top of this section. ``h0`` is ``(L·D, B, H)`` or ``None`` (zeros). Returns ``(output, h_n)``."""
    directions = 2 if bidirectional else 1
    if h0 is None:
        hidden = weights[0][1].size(1)
        h0 = _zeros_state(input, num_layers * directions, _batch_size(input, batch_first, batch_sizes), hidden)

    def step(x, state, w):
        w_ih, w_hh, b_ih, b_hh = w
        return (gru_cell(x, state[0], w_ih, w_hh, b_ih, b_hh),)

    output, (h_n,) = _stacked_layers(step, input, (h0,), weights, num_layers=num_layers,
                                     bidirectional=bidirectional, batch_first=batch_first,
                                     dropout_masks=dropout_masks, batch_sizes=batch_sizes)
    return output, h_n


# ---------------------------------------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------------------------------------
#
# Scaled dot-product attention, with the semantics of ``torch.nn.functional.scaled_dot_product_attention``
# (its math backend) of the installed torch. Shapes: ``query (..., Hq, L, E)``, ``key (..., Hk, S, E)``,
# ``value (..., Hk, S, Ev)``, any number of leading dimensions (broadcast by ``matmul``; the head dimension is
# just the third from last), output ``(..., Hq, L, Ev)``::
#
#     scores = scale · q kᵀ + bias                          (..., L, S),   scale = 1/√E unless given
#     P      = softmax(scores) over S                       each row sums to 1
#     P      = P ⊙ keep / (1 − p)                           dropout, only when a keep-mask is given
#     out    = P v
#
# ``bias`` is where the masks enter. A bool ``attn_mask`` says which (query, key) pairs take part (True takes
# part): a False entry puts −∞ into the score. A float ``attn_mask`` is added to the scores as is (it is
# differentiable). Either broadcasts to the scores' shape ``(..., L, S)`` from any broadcastable shape
# (``(L, S)``, ``(N, 1, L, S)``, ``(N, 1, 1, S)``, …). ``is_causal`` (no ``attn_mask`` then) lets query i see
# keys j ≤ i: the lower triangle of an ``L × S`` matrix aligned top-left (``torch.ones(L, S).tril()``), so with
# ``L > S`` the queries past ``S`` see every key, and with ``L < S`` the last keys are seen by none.
#
# Fully masked rows. A row whose scores are all −∞ (every key masked by a bool mask, or a float mask of −∞
# on the whole row) has no softmax; torch 2.13's math backend (``aten::_safe_softmax``) gives it probability 0
# everywhere, so the output row is 0 (not NaN), and every gradient through that row is 0: nothing flows to
# ``q``, ``k``, ``v`` or a float mask from it. torch 2.13's default CPU dispatch returns the same. (The
# explicit-softmax path of ``nn.MultiheadAttention`` with ``need_weights=True`` returns NaN for such rows
# instead; ``attention_weights`` below follows the math backend.)
#
# GQA: with ``enable_gqa`` and ``Hk < Hq`` (``Hq`` a multiple of ``Hk``), each key/value head serves
# ``Hq / Hk`` consecutive query heads: ``key.repeat_interleave(Hq // Hk, dim=-3)``, the same for ``value``.
#
# Dropout: torch draws ``keep ~ Bernoulli(1 − p)`` on the probabilities; the reference never draws random
# numbers and takes the keep-mask ``dropout_keep`` (bool, True = kept, broadcastable to ``(..., Hq, L, S)``).
#
# torch's math backend computes ``(√scale·q)(√scale·k)ᵀ`` (for stability in low precision; ``−√|scale|`` on
# ``q`` for a negative scale); the reference writes ``scale · q kᵀ``, the same number up to rounding.


def _expand_kv_heads(t: Tensor, query: Tensor, enable_gqa: bool) -> Tensor:
    """``key`` / ``value`` with each head repeated for its group of query heads (GQA), else unchanged."""
    if not enable_gqa or t.size(-3) == query.size(-3):
        return t
    if query.size(-3) % t.size(-3) != 0:
        raise ValueError(f"enable_gqa needs the number of query heads to be a multiple of the key/value heads. "
                         f"Got query.size(-3)={query.size(-3)} and {t.size(-3)}")
    return t.repeat_interleave(query.size(-3) // t.size(-3), dim=-3)


def attention_scores(query: Tensor, key: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False,
                     scale: float | None = None, enable_gqa: bool = False) -> Tensor:
    """``scale · q kᵀ + bias`` ``(..., L, S)``: the logits of attention, −∞ where a pair does not take part."""
    if is_causal and attn_mask is not None:
        raise RuntimeError("Explicit attn_mask should not be set when is_causal=True")
    scale = 1.0 / query.size(-1) ** 0.5 if scale is None else scale
    key = _expand_kv_heads(key, query, enable_gqa)
    scores = (query @ key.transpose(-2, -1)) * scale
    if is_causal:
        L, S = query.size(-2), key.size(-2)
        attn_mask = torch.ones(L, S, dtype=torch.bool, device=query.device).tril()
    if attn_mask is None:
        return scores
    if attn_mask.dtype == torch.bool:
        return scores.masked_fill(attn_mask.logical_not(), float("-inf"))
    return scores + attn_mask


def attention_weights(query: Tensor, key: Tensor, attn_mask: Tensor | None = None, dropout_p: float = 0.0,
                      is_causal: bool = False, scale: float | None = None, enable_gqa: bool = False, *,
                      dropout_keep: Tensor | None = None) -> Tensor:
    """The attention probabilities ``P`` ``(..., Hq, L, S)`` (after dropout when ``dropout_keep`` is given):
    what ``nn.MultiheadAttention`` returns with ``need_weights=True, average_attn_weights=False``, except for
    fully masked rows, which are 0 here (torch's math backend) and NaN there. Arguments as in
    ``scaled_dot_product_attention``."""
    scores = attention_scores(query, key, attn_mask, is_causal, scale, enable_gqa)
    # softmax over the keys; a row with no key taking part (all −∞) gets probability 0 everywhere. Its scores
    # are replaced by 0 before the softmax so that neither the value nor the gradient sees the 0/0.
    dead = torch.isneginf(scores).all(dim=-1, keepdim=True)
    probabilities = torch.softmax(scores.masked_fill(dead, 0.0), dim=-1).masked_fill(dead, 0.0)
    if dropout_keep is None:
        if dropout_p > 0.0:
            raise ValueError("the reference draws no random numbers: dropout_p > 0 needs dropout_keep")
        return probabilities
    if dropout_keep.dtype != torch.bool:
        raise TypeError(f"dropout_keep must be a bool tensor (True = kept), got {dropout_keep.dtype}")
    if not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"dropout_p must be in [0, 1], got {dropout_p}")
    if dropout_p == 1.0:
        return torch.zeros_like(probabilities)
    return probabilities.masked_fill(dropout_keep.logical_not(), 0.0) / (1.0 - dropout_p)


def scaled_dot_product_attention(query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None = None,
                                 dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
                                 enable_gqa: bool = False, *, dropout_keep: Tensor | None = None) -> Tensor:
    """``torch.nn.functional.scaled_dot_product_attention`` (math backend), as described at the top of this
    section; the positional arguments are torch's, in torch's order. ``dropout_p > 0`` needs the keep-mask
    ``dropout_keep`` (bool, True = kept); a keep-mask is applied whenever given, scaled by ``1 / (1 − p)``.
    Returns ``P v`` ``(..., Hq, L, Ev)``."""
    probabilities = attention_weights(query, key, attn_mask, dropout_p, is_causal, scale, enable_gqa,
                                      dropout_keep=dropout_keep)
    return probabilities @ _expand_kv_heads(value, query, enable_gqa)
