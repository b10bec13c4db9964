"""The fused cells against the float64 reference and against torch's own cells: outputs and the gradients of the
input, the states and every parameter, over odd sizes, batch 1, every dtype, with and without state and bias."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fastseq
from fastseq.check import CELLS, compare_cell, make_cells, make_inputs, state_list

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (batch, input_size, hidden_size): batch 1, sizes of 1, and sizes that are multiples of no block.
SHAPES = [(1, 1, 1), (1, 7, 37), (5, 19, 33), (13, 40, 70)]


def check_against_reference(kind, ours, theirs, x, state, dtype):
    """Every output and gradient within twice torch's own error of the float64 reference, plus a floor."""
    comparisons = compare_cell(kind, ours, theirs, x, state, dtype)
    assert len(comparisons) == (2 if kind == "lstm_cell" else 1) + 1 + len(state_list(state)) + len(
        list(ours.parameters()))
    failures = [f"{c.name}: error {c.error}, tolerance {c.tolerance:.3e} (torch's own {c.torch_error:.3e})"
                for c in comparisons if not c.ok]
    assert not failures, f"{kind} {dtype}: " + "; ".join(failures)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}_I{}_H{}".format(*s))
@pytest.mark.parametrize("variant", ["state_bias", "no_state", "no_bias"])
@pytest.mark.parametrize("kind", list(CELLS))
def test_cell_matches_reference_and_torch(kind, variant, shape, dtype, device, kernel_backend):
    batch, input_size, hidden_size = shape
    ours, theirs = make_cells(kind, input_size, hidden_size, variant != "no_bias", dtype, device, kernel_backend)
    x, state = make_inputs(kind, batch, input_size, hidden_size, dtype, device, variant != "no_state")
    check_against_reference(kind, ours, theirs, x, state, dtype)


@pytest.mark.parametrize("kind", list(CELLS))
def test_unbatched_input(kind, device, kernel_backend):
    ours, theirs = make_cells(kind, 6, 11, True, torch.float32, device, kernel_backend)
    x, state = make_inputs(kind, None, 6, 11, torch.float32, device, True)
    check_against_reference(kind, ours, theirs, x, state, torch.float32)
    assert ours(x)[0].shape == theirs(x)[0].shape  # no state either


@pytest.mark.parametrize("kind", list(CELLS))
def test_non_contiguous_inputs(kind, device, kernel_backend):
    """Inputs and weights that are strided views (a time slice of a batch-first sequence, transposed states
    and weights)."""
    ours, theirs = make_cells(kind, 9, 21, True, torch.float32, device, kernel_backend)
    for cell in (ours, theirs):
        for name in ("weight_ih", "weight_hh"):
            w = getattr(cell, name).detach()
            setattr(cell, name, nn.Parameter(w.t().contiguous().t()))  # same values, column-major
    assert not ours.weight_ih.is_contiguous()
    seq = torch.randn(4, 3, 9, device=device)  # (B, T, I): seq[:, 1] has row stride 27
    x = seq[:, 1]
    hs = [torch.randn(21, 4, device=device).t() for _ in range(2 if kind == "lstm_cell" else 1)]
    assert not x.is_contiguous() and not hs[0].is_contiguous()
    state = tuple(hs) if kind == "lstm_cell" else hs[0]
    check_against_reference(kind, ours, theirs, x, state, torch.float32)


@pytest.mark.parametrize("kind", list(CELLS))
def test_inference_writes_only_state_and_matches_training(kind, device, kernel_backend):
    """Under no_grad the kernel runs without its workspace; the numbers are those of the training path."""
    ours, _ = make_cells(kind, 10, 17, True, torch.float32, device, kernel_backend)
    x, state = make_inputs(kind, 3, 10, 17, torch.float32, device, True)
    with torch.no_grad():
        inference = ours(x, state)
    training = ours(x, state)
    for a, b in zip(*(t if isinstance(t, tuple) else (t,) for t in (inference, training))):
        torch.testing.assert_close(a, b.detach(), rtol=0, atol=0)


@pytest.mark.parametrize("kind", list(CELLS))
def test_backward_after_inference_forward(kind, device, kernel_backend):
    """Inputs that only start requiring grad after the module decided on no workspace still get gradients:
    the operator recomputes what backward needs."""
    from fastseq.ops import cells as ops

    ours, theirs = make_cells(kind, 5, 8, True, torch.float32, device, kernel_backend)
    x = torch.randn(2, 5, device=device, requires_grad=True)
    p = [t.detach().requires_grad_() for t in (ours.weight_ih, ours.weight_hh, ours.bias_ih, ours.bias_hh)]
    if kind == "lstm_cell":
        out = ops.lstm_cell(x, None, None, *p, kernel_backend, False)[0]
    elif kind == "gru_cell":
        out = ops.gru_cell(x, None, *p, kernel_backend, False)[0]
    else:
        out = ops.rnn_cell(x, None, *p, CELLS[kind][2]["nonlinearity"], kernel_backend, False)[0]
    out.sum().backward()
    x2 = x.detach().requires_grad_()
    ref = theirs(x2)
    (ref[0] if isinstance(ref, tuple) else ref).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(p[0].grad, theirs.weight_ih.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", list(CELLS))
def test_empty_batch(kind, device, kernel_backend):
    ours, theirs = make_cells(kind, 4, 6, True, torch.float32, device, kernel_backend)
    x = torch.randn(0, 4, device=device, requires_grad=True)
    out, ref = ours(x), theirs(x)
    out, ref = (out[0], ref[0]) if kind == "lstm_cell" else (out, ref)
    assert out.shape == ref.shape == (0, 6)
    out.sum().backward()
    assert x.grad.shape == (0, 4)


@pytest.mark.parametrize("kind", list(CELLS))
def test_nan_and_inf_propagate_as_in_torch(kind, device, kernel_backend):
    ours, theirs = make_cells(kind, 5, 9, True, torch.float32, device, kernel_backend)
    x, state = make_inputs(kind, 4, 5, 9, torch.float32, device, True)
    x[0, 1] = float("nan")
    x[1, 2] = float("inf")
    x[2, 0] = -float("inf")
    with torch.no_grad():
        out, ref = ours(x, state), theirs(x, state)
    for o, r in zip(*(t if isinstance(t, tuple) else (t,) for t in (out, ref))):
        torch.testing.assert_close(o, r, equal_nan=True, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", list(CELLS))
def test_nothing_the_caller_passed_is_modified(kind, device, kernel_backend):
    ours, _ = make_cells(kind, 7, 10, True, torch.float32, device, kernel_backend)
    x, state = make_inputs(kind, 3, 7, 10, torch.float32, device, True)
    x.requires_grad_()
    before = [t.clone() for t in [x, *state_list(state), *ours.parameters()]]
    out = ours(x, state)
    (sum(o.sum() for o in out) if isinstance(out, tuple) else out.sum()).backward()
    for a, b in zip(before, [x, *state_list(state), *ours.parameters()]):
        assert torch.equal(a, b.detach())


def test_decoder_loop_matches_torch(device, kernel_backend):
    """The seeds' use: a seq2seq decoder steps an LSTMCell over time, feeding back its own hidden state, with
    an output projection; losses and every gradient match torch's loop."""
    torch.manual_seed(0)
    steps, batch, emb, hidden, vocab = 6, 3, 11, 23, 13

    class Decoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(vocab, emb)
            self.cell = nn.LSTMCell(emb, hidden)
            self.out = nn.Linear(hidden, vocab)

        def forward(self, tokens, state):
            logits = []
            for t in range(tokens.shape[1]):
                state = self.cell(self.embed(tokens[:, t]), state)
                logits.append(self.out(state[0]))
            return torch.stack(logits, 1)

    theirs = Decoder().to(device)
    ours = Decoder().to(device)
    ours.load_state_dict(theirs.state_dict())
    fastseq.patch(ours, backend=kernel_backend)
    assert isinstance(ours.cell, fastseq.LSTMCell)
    tokens = torch.randint(0, vocab, (batch, steps), device=device)
    state = (torch.randn(batch, hidden, device=device), torch.randn(batch, hidden, device=device))
    losses = []
    for model in (ours, theirs):
        logits = model(tokens, state)
        loss = nn.functional.cross_entropy(logits.reshape(-1, vocab), tokens.roll(-1, 1).reshape(-1))
        loss.backward()
        losses.append(loss)
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)
    for (name, p), q in zip(ours.named_parameters(), theirs.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)
