"""Every fastseq operator passes ``torch.library.opcheck``, and ``torch.compile(fullgraph=True)`` over the cells
compiles without a graph break and gives eager's numbers, forward and backward."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fastseq
from fastseq.ops import cells as ops


def _params(gates, input_size, hidden_size, device, requires_grad, bias=True):
    def p(*shape):
        return torch.randn(*shape, device=device, requires_grad=requires_grad)

    w_ih, w_hh = p(gates * hidden_size, input_size), p(gates * hidden_size, hidden_size)
    return (w_ih, w_hh, p(gates * hidden_size), p(gates * hidden_size)) if bias else (w_ih, w_hh, None, None)


# (requires_grad, save, with_state, bias): every pair of values of any two flags appears in some row (a pairwise
# covering array), so an interaction of two options is checked without the 16 rows of the full product (each
# opcheck runs the operator a dozen times, under the Triton interpreter on CPU).
_FLAG_ROWS = ((False, False, False, False), (False, True, True, True), (True, False, True, True),
              (True, True, False, True), (True, True, True, False))


def _forward_cases(device, backend):
    """(operator, args) for each forward operator over state/no-state, bias/no-bias, save/no-save, grad/no-grad."""
    B, I, H = 3, 5, 7
    for requires_grad, save, with_state, bias in _FLAG_ROWS:
        x = torch.randn(B, I, device=device, requires_grad=requires_grad)

        def state():
            if not with_state:
                return None
            return torch.randn(B, H, device=device, requires_grad=requires_grad)

        yield ops.lstm_cell, (x, state(), state(), *_params(4, I, H, device, requires_grad, bias), backend, save)
        yield ops.gru_cell, (x, state(), *_params(3, I, H, device, requires_grad, bias), backend, save)
        for nl in ("tanh", "relu"):
            yield ops.rnn_cell, (x, state(), *_params(1, I, H, device, requires_grad, bias), nl, backend, save)


def test_flag_rows_cover_every_pair():
    for i in range(4):
        for j in range(i + 1, 4):
            assert {(r[i], r[j]) for r in _FLAG_ROWS} == {(a, b) for a in (False, True) for b in (False, True)}


def test_opcheck_forward_operators(device, kernel_backend):
    for op, args in _forward_cases(device, kernel_backend):
        torch.library.opcheck(op, args)


def test_opcheck_backward_operators(device, kernel_backend):
    B, I, H = 3, 5, 7
    x = torch.randn(B, I, device=device)
    h, c = torch.randn(B, H, device=device), torch.randn(B, H, device=device)
    g = lambda: torch.randn(B, H, device=device)  # noqa: E731
    for with_state in (True, False):
        hx, cx = (h, c) if with_state else (None, None)
        for need_input_grad in (True, False):
            p = _params(4, I, H, device, False)
            ws = ops.lstm_cell(x, hx, cx, *p, kernel_backend, True)[2]
            torch.library.opcheck(ops.lstm_cell_backward,
                                  (g(), g(), ws, hx, cx, p[0], p[1], kernel_backend, need_input_grad))
            p = _params(3, I, H, device, False)
            ws = ops.gru_cell(x, hx, *p, kernel_backend, True)[1]
            torch.library.opcheck(ops.gru_cell_backward, (g(), ws, hx, p[0], p[1], kernel_backend, need_input_grad))
            for nl in ("tanh", "relu"):
                p = _params(1, I, H, device, False)
                ws = ops.rnn_cell(x, hx, *p, nl, kernel_backend, True)[1]
                torch.library.opcheck(ops.rnn_cell_backward,
                                      (g(), ws, with_state, p[0], p[1], nl, kernel_backend, need_input_grad))


CELLS = [
    (fastseq.LSTMCell, {}),
    (fastseq.GRUCell, {}),
    (fastseq.RNNCell, {"nonlinearity": "tanh"}),
    (fastseq.RNNCell, {"nonlinearity": "relu"}),
]


@pytest.mark.parametrize("cls,kw", CELLS, ids=["lstm", "gru", "rnn_tanh", "rnn_relu"])
def test_compile_fullgraph_forward_and_backward(cls, kw, device, kernel_backend):
    torch._dynamo.reset()
    cell = cls(6, 9, backend=kernel_backend, device=device, **kw)
    x = torch.randn(4, 6, device=device, requires_grad=True)
    state = torch.randn(4, 9, device=device)
    state = (state, torch.randn(4, 9, device=device)) if cls is fastseq.LSTMCell else state

    def step(x, state):
        out = cell(x, state)
        return (out[0] * out[1]).sum() if isinstance(out, tuple) else out.square().sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss = compiled(x, state)
    loss.backward()
    grads = [x.grad.clone()] + [p.grad.clone() for p in cell.parameters()]
    x.grad = None
    cell.zero_grad()
    expected = step(x, state)
    expected.backward()
    torch.testing.assert_close(loss, expected)
    for got, want in zip(grads, [x.grad] + [p.grad for p in cell.parameters()]):
        torch.testing.assert_close(got, want)


def test_compile_fullgraph_decoder_loop_no_grad(device, kernel_backend):
    """Inference under compile: a decoder loop of a GRU cell inside no_grad, unbatched input included."""
    torch._dynamo.reset()
    cell = fastseq.GRUCell(5, 8, backend=kernel_backend, device=device)
    proj = nn.Linear(8, 5, device=device)

    def decode(x, h, steps: int):
        for _ in range(steps):
            h = cell(x, h)
            x = proj(h)
        return h

    x, h = torch.randn(5, device=device), torch.randn(8, device=device)
    with torch.no_grad():
        got = torch.compile(decode, fullgraph=True, backend="aot_eager")(x, h, 3)
        want = decode(x, h, 3)
    torch.testing.assert_close(got, want)


def test_compile_inductor_backend(device, kernel_backend):
    """The default compiler (inductor) too, for one cell."""
    torch._dynamo.reset()
    cell = fastseq.LSTMCell(4, 6, backend=kernel_backend, device=device)
    x = torch.randn(3, 4, device=device, requires_grad=True)
    h, c = torch.compile(cell, fullgraph=True)(x)
    (h.sum() + c.sum()).backward()
    h2, c2 = cell(x)
    torch.testing.assert_close(h, h2)
    torch.testing.assert_close(c, c2)
    assert x.grad is not None and torch.isfinite(x.grad).all()


# ---------------------------------------------------------------------------------------------------------
# The eager inference path: run_*_cell call the kernel directly where nothing can tell the difference
# ---------------------------------------------------------------------------------------------------------

RUNNERS = {"lstm_cell": ops.run_lstm_cell, "gru_cell": ops.run_gru_cell, "rnn_cell": ops.run_rnn_cell}


def _cell_args(name, device, dtype=torch.float32, requires_grad=False, with_state=True):
    """(operator name, args without backend and save) for one cell call; RNN takes the relu nonlinearity."""
    B, I, H = 3, 11, 13
    gates = {"lstm_cell": 4, "gru_cell": 3, "rnn_cell": 1}[name]
    x = torch.randn(B, I, device=device, dtype=dtype)
    states = [torch.randn(B, H, device=device, dtype=dtype) if with_state else None
              for _ in range(2 if name == "lstm_cell" else 1)]
    params = [p.to(dtype).detach().requires_grad_(requires_grad)
              for p in _params(gates, I, H, device, False)]
    extra = ["relu"] if name == "rnn_cell" else []
    return [x, *states, *params, *extra]


def _spy_on_operator(monkeypatch, name):
    """Count the calls of the custom operator ``name`` that the run_* functions make."""
    calls = []
    op = getattr(ops, name)

    def spy(*args):
        calls.append(args)
        return op(*args)

    monkeypatch.setattr(ops, name, spy)
    return calls


@pytest.mark.parametrize("name", sorted(RUNNERS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_state", [True, False])
def test_eager_inference_skips_the_operator_and_gives_its_bits(name, dtype, with_state, device, kernel_backend,
                                                               monkeypatch):
    args = _cell_args(name, device, dtype, with_state=with_state)
    with torch.no_grad():
        through_operator = getattr(ops, name)(*args, kernel_backend, False)
        calls = _spy_on_operator(monkeypatch, name)
        direct = RUNNERS[name](*args, kernel_backend, False)
    assert not calls
    assert len(direct) == len(through_operator)
    for got, want in zip(direct, through_operator):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("name", sorted(RUNNERS))
def test_the_operator_runs_whenever_a_gradient_may_be_needed(name, device, kernel_backend, monkeypatch):
    calls = _spy_on_operator(monkeypatch, name)
    args = _cell_args(name, device, requires_grad=True)
    out = RUNNERS[name](*args, kernel_backend, True)
    assert len(calls) == 1 and out[0].grad_fn is not None
    out[0].sum().backward()
    assert args[-2 if name == "rnn_cell" else -1].grad is not None
    with torch.no_grad():  # parameters that require grad, but no grad mode: nothing to record
        RUNNERS[name](*args, kernel_backend, False)
    assert len(calls) == 1
    args = _cell_args(name, device)
    args[0].requires_grad_()  # only the input requires grad
    RUNNERS[name](*args, kernel_backend, True)
    assert len(calls) == 2


@pytest.mark.parametrize("name", sorted(RUNNERS))
def test_the_operator_runs_under_a_dispatch_mode(name, device, kernel_backend):
    """Modes (and tensor subclasses) must see fastseq's own operators, not the kernels' launchers."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    args = _cell_args(name, device)
    with torch.no_grad(), Record():
        RUNNERS[name](*args, kernel_backend, False)
    assert f"fastseq.{name}.default" in seen, seen


@pytest.mark.parametrize("cls,kw", CELLS, ids=["lstm", "gru", "rnn_tanh", "rnn_relu"])
def test_compile_sees_the_operator_in_inference_too(cls, kw, device, kernel_backend):
    """Under torch.compile the modules' no-grad calls stay ``torch.ops.fastseq.*`` in the graph."""
    torch._dynamo.reset()
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm.code)
        return gm.forward

    cell = cls(6, 9, backend=kernel_backend, device=device, **kw)
    x = torch.randn(4, 6, device=device)
    with torch.no_grad():
        got = torch.compile(cell, fullgraph=True, backend=capture)(x)
        want = cell(x)
    assert graphs and all("torch.ops.fastseq" in g for g in graphs), graphs
    assert not any("fastseq_cpp" in g for g in graphs), graphs
    torch.testing.assert_close(got, want, rtol=0, atol=0)
