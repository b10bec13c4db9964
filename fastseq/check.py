"""The self-check: every available kernel against the float64 reference on random inputs, next to torch's own
error in the same dtype. Used by ``python -m fastseq check`` and by the tests (one copy of the comparison).

A case passes when, for the output and for the gradient of every input, state and parameter,
``‖ours − ref‖ / ‖ref‖ ≤ 2 · (torch's own error) + floor(dtype)`` (SPEC.md, Numerics).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from fastseq import reference
from fastseq.nn import GRU, LSTM, RNN, GRUCell, LSTMCell, RNNCell

# kind -> (fastseq class, torch class, constructor keywords)
CELLS = {
    "lstm_cell": (LSTMCell, nn.LSTMCell, {}),
    "gru_cell": (GRUCell, nn.GRUCell, {}),
    "rnn_cell_tanh": (RNNCell, nn.RNNCell, {"nonlinearity": "tanh"}),
    "rnn_cell_relu": (RNNCell, nn.RNNCell, {"nonlinearity": "relu"}),
}

# kind -> (fastseq class, torch class, constructor keywords): whole layers, two of them stacked, bidirectional.
LAYERS = {
    "lstm_layer": (LSTM, nn.LSTM, {}),
    "lstm_layer_proj": (LSTM, nn.LSTM, {"proj_size": 3}),
    "gru_layer": (GRU, nn.GRU, {}),
    "rnn_layer_tanh": (RNN, nn.RNN, {"nonlinearity": "tanh"}),
    "rnn_layer_relu": (RNN, nn.RNN, {"nonlinearity": "relu"}),
}

# Rounding floor per dtype, added to twice torch's own error.
FLOOR = {torch.float32: 1e-6, torch.float16: 5e-4, torch.bfloat16: 4e-3, torch.float64: 1e-12}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``‖out − ref‖ / ‖ref‖`` in float64 (``‖out − ref‖`` alone where ``ref`` is zero)."""
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    diff = (out - ref).norm().item()
    norm = ref.norm().item()
    return diff / norm if norm > 0 else diff


def tolerance(torch_err: float, dtype: torch.dtype) -> float:
    return 2 * torch_err + FLOOR[dtype]


def make_cells(kind: str, input_size: int, hidden_size: int, bias: bool, dtype, device, backend: str):
    """A fastseq cell and a torch cell holding equal (random) parameters."""
    fast_cls, torch_cls, kw = CELLS[kind]
    theirs = torch_cls(input_size, hidden_size, bias=bias, device=device, dtype=dtype, **kw)
    ours = fast_cls(input_size, hidden_size, bias=bias, device=device, dtype=dtype, backend=backend, **kw)
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


def make_inputs(kind: str, batch, input_size: int, hidden_size: int, dtype, device, with_state: bool):
    """Random input and state (``batch=None``: unbatched); the state is ``None`` without ``with_state``."""
    lead = () if batch is None else (batch,)
    x = torch.randn(*lead, input_size, dtype=dtype, device=device)
    if not with_state:
        return x, None
    if kind == "lstm_cell":
        return x, tuple(torch.randn(*lead, hidden_size, dtype=dtype, device=device) for _ in range(2))
    return x, torch.randn(*lead, hidden_size, dtype=dtype, device=device)


def state_list(state) -> list:
    if state is None:
        return []
    return list(state) if isinstance(state, tuple) else [state]


def run_cell(module, x, state, grad_outs):
    """Outputs of ``module`` and the gradients of (input, states…, parameters…) for ``grad_outs``."""
    x = x.detach().clone().requires_grad_()
    states = [s.detach().clone().requires_grad_() for s in state_list(state)]
    st = None if state is None else (tuple(states) if isinstance(state, tuple) else states[0])
    module.zero_grad(set_to_none=True)
    out = module(x, st)
    outs = list(out) if isinstance(out, tuple) else [out]
    torch.autograd.backward(outs, grad_outs)
    grads = [x.grad] + [s.grad for s in states] + [p.grad for p in module.parameters()]
    return [o.detach() for o in outs], grads


def run_reference(kind: str, module, x, state, grad_outs):
    """The same as :func:`run_cell` in float64 through :mod:`fastseq.reference`."""
    def leaf(t):
        return t.detach().double().requires_grad_()

    x64 = leaf(x)
    states = [leaf(s) for s in state_list(state)]
    params = [leaf(p) for p in module.parameters()]
    w_ih, w_hh, *biases = params
    b_ih, b_hh = biases if biases else (None, None)

    def zeros():
        return torch.zeros(*x64.shape[:-1], module.hidden_size, dtype=torch.float64, device=x.device)

    if kind == "lstm_cell":
        h, c = states if states else (zeros(), zeros())
        outs = list(reference.lstm_cell(x64, h, c, w_ih, w_hh, b_ih, b_hh))
    elif kind == "gru_cell":
        outs = [reference.gru_cell(x64, states[0] if states else zeros(), w_ih, w_hh, b_ih, b_hh)]
    else:
        outs = [reference.rnn_cell(x64, states[0] if states else zeros(), w_ih, w_hh, b_ih, b_hh,
                                   CELLS[kind][2]["nonlinearity"])]
    torch.autograd.backward(outs, [g.double() for g in grad_outs])
    return [o.detach() for o in outs], [t.grad for t in [x64, *states, *params]]


@dataclass
class Comparison:
    """One quantity (an output or a gradient) of one case."""

    name: str
    error: float | None  # None: missing, wrong shape or non-finite (always a failure)
    torch_error: float
    tolerance: float

    @property
    def ok(self) -> bool:
        return self.error is not None and self.error <= self.tolerance


def compare_cell(kind: str, ours, theirs, x, state, dtype) -> list[Comparison]:
    """Outputs and every gradient of ``ours`` and ``theirs`` against the float64 reference."""
    n_out = 2 if kind == "lstm_cell" else 1
    grad_outs = [torch.randn(*x.shape[:-1], ours.hidden_size, dtype=dtype, device=x.device) for _ in range(n_out)]
    our_out, our_grads = run_cell(ours, x, state, grad_outs)
    their_out, their_grads = run_cell(theirs, x, state, grad_outs)
    ref_out, ref_grads = run_reference(kind, ours, x, state, grad_outs)
    names = ([f"output[{i}]" for i in range(n_out)] + ["grad input"]
             + [f"grad state[{i}]" for i in range(len(state_list(state)))]
             + [f"grad {n}" for n, _ in ours.named_parameters()])
    result = []
    for name, o, t, r in zip(names, our_out + our_grads, their_out + their_grads, ref_out + ref_grads):
        torch_error = rel_err(t, r)
        valid = o is not None and o.shape == r.shape and o.dtype == t.dtype and bool(torch.isfinite(o).all())
        result.append(Comparison(name, rel_err(o, r) if valid else None, torch_error, tolerance(torch_error, dtype)))
    return result


@dataclass
class CheckRow:
    """One line of the self-check table."""

    op: str
    backend: str
    device: str
    dtype: str
    shape: str
    out_err: float | None
    grad_err: float | None
    torch_out_err: float
    torch_grad_err: float
    verdict: str
    worst: str

    def as_dict(self) -> dict:
        return asdict(self)


def _worst(values: list[float | None]) -> float | None:
    return None if any(v is None for v in values) else max(values)


def check_cell(kind: str, backend: str, device, dtype, shape: tuple[int, int, int]) -> CheckRow:
    """Run one case (random inputs, with state and bias) and summarise it as a row."""
    batch, input_size, hidden_size = shape
    ours, theirs = make_cells(kind, input_size, hidden_size, True, dtype, device, backend)
    x, state = make_inputs(kind, batch, input_size, hidden_size, dtype, device, True)
    return _row(kind, backend, device, dtype, f"B={batch} I={input_size} H={hidden_size}",
                compare_cell(kind, ours, theirs, x, state, dtype))


def _row(kind: str, backend: str, device, dtype, shape: str, comps: list[Comparison]) -> CheckRow:
    outs = [c for c in comps if not c.name.startswith("grad")]
    grads = [c for c in comps if c.name.startswith("grad")]
    failed = [c for c in comps if not c.ok]
    worst = max(comps, key=lambda c: float("inf") if c.error is None else c.error / c.tolerance)
    return CheckRow(
        op=kind, backend=backend, device=str(device), dtype=str(dtype).removeprefix("torch."),
        shape=shape,
        out_err=_worst([c.error for c in outs]), grad_err=_worst([c.error for c in grads]),
        torch_out_err=max(c.torch_error for c in outs), torch_grad_err=max(c.torch_error for c in grads),
        verdict="FAIL" if failed else "ok", worst=worst.name,
    )


# ---------------------------------------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------------------------------------


def make_layers(kind: str, input_size: int, hidden_size: int, dtype, device, backend: str, num_layers: int = 2,
                bidirectional: bool = True):
    """A fastseq layer and a torch layer holding equal (random) parameters."""
    fast_cls, torch_cls, kw = LAYERS[kind]
    options = dict(num_layers=num_layers, bidirectional=bidirectional, device=device, dtype=dtype, **kw)
    theirs = torch_cls(input_size, hidden_size, **options)
    ours = fast_cls(input_size, hidden_size, backend=backend, **options)
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


def _layer_states(module, batch: int, dtype, device) -> list:
    rows = module.num_layers * (2 if module.bidirectional else 1)
    h_size = module.proj_size or module.hidden_size
    states = [torch.randn(rows, batch, h_size, dtype=dtype, device=device)]
    if isinstance(module, nn.LSTM):
        states.append(torch.randn(rows, batch, module.hidden_size, dtype=dtype, device=device))
    return states


def _run_layer(module, x, states, grad_outs):
    """Output and final states of ``module`` (time-major input, given initial states) and the gradients of
    (input, states…, parameters…) for ``grad_outs``."""
    x = x.detach().clone().requires_grad_()
    states = [s.detach().clone().requires_grad_() for s in states]
    module.zero_grad(set_to_none=True)
    out, final = module(x, tuple(states) if len(states) == 2 else states[0])
    outs = [out, *(final if isinstance(final, tuple) else (final,))]
    torch.autograd.backward(outs, grad_outs)
    grads = [x.grad] + [s.grad for s in states] + [p.grad for p in module.parameters()]
    return [o.detach() for o in outs], grads


def _run_reference_layer(kind: str, module, x, states, grad_outs):
    """The same as :func:`_run_layer` in float64 through :mod:`fastseq.reference`."""
    def leaf(t):
        return t.detach().double().requires_grad_()

    x64, states64 = leaf(x), [leaf(s) for s in states]
    params = [leaf(p) for p in module.parameters()]
    per = len(params) // (module.num_layers * (2 if module.bidirectional else 1))
    weights = [tuple(params[i:i + per]) for i in range(0, len(params), per)]
    options = dict(num_layers=module.num_layers, bidirectional=module.bidirectional)
    if kind.startswith("lstm"):
        out, (h, c) = reference.lstm_layer(x64, tuple(states64), weights, proj_size=module.proj_size, **options)
        outs = [out, h, c]
    elif kind == "gru_layer":
        outs = list(reference.gru_layer(x64, states64[0], weights, **options))
    else:
        outs = list(reference.rnn_layer(x64, states64[0], weights, nonlinearity=module.nonlinearity, **options))
    torch.autograd.backward(outs, [g.double() for g in grad_outs])
    return [o.detach() for o in outs], [t.grad for t in [x64, *states64, *params]]


def compare_layer(kind: str, ours, theirs, x, states, dtype) -> list[Comparison]:
    """Output, final states and every gradient of ``ours`` and ``theirs`` against the float64 reference."""
    with torch.no_grad():  # only for the shapes of the upstream gradients
        their_fwd = theirs(x, tuple(states) if len(states) == 2 else states[0])
    their_outs = [their_fwd[0], *(their_fwd[1] if isinstance(their_fwd[1], tuple) else (their_fwd[1],))]
    grad_outs = [torch.randn_like(o) for o in their_outs]
    our_out, our_grads = _run_layer(ours, x, states, grad_outs)
    their_out, their_grads = _run_layer(theirs, x, states, grad_outs)
    ref_out, ref_grads = _run_reference_layer(kind, ours, x, states, grad_outs)
    names = (["output"] + [f"final state[{i}]" for i in range(len(states))] + ["grad input"]
             + [f"grad state[{i}]" for i in range(len(states))] + [f"grad {n}" for n, _ in ours.named_parameters()])
    result = []
    for name, o, t, r in zip(names, our_out + our_grads, their_out + their_grads, ref_out + ref_grads):
        torch_error = rel_err(t, r)
        valid = o is not None and o.shape == r.shape and o.dtype == t.dtype and bool(torch.isfinite(o).all())
        result.append(Comparison(name, rel_err(o, r) if valid else None, torch_error, tolerance(torch_error, dtype)))
    return result


def check_layer(kind: str, backend: str, device, dtype, shape: tuple[int, int, int, int]) -> CheckRow:
    """One case of a two-layer bidirectional layer (random input and initial states) as a row."""
    batch, steps, input_size, hidden_size = shape
    ours, theirs = make_layers(kind, input_size, hidden_size, dtype, device, backend)
    x = torch.randn(steps, batch, input_size, dtype=dtype, device=device)
    states = _layer_states(ours, batch, dtype, device)
    return _row(kind, backend, device, dtype, f"B={batch} T={steps} I={input_size} H={hidden_size} L=2 D=2",
                compare_layer(kind, ours, theirs, x, states, dtype))
