"""The recurrent layers (``fastseq.LSTM``, ``GRU``, ``RNN``) against the float64 reference and against torch's own
layers holding the same parameters: outputs, final states and the gradients of the input, the initial states and
every parameter, from the same random upstream gradients on every output. Over the grid of layer options
(kind, num_layers, bidirectional, batch_first, bias, initial state), projections, unbatched and packed input,
inference, odd and multi-block hidden sizes, batch 1, length 1, a long sequence, and dropout between layers.

Criterion (SPEC.md, Numerics): for every quantity ``‖ours − ref‖ / ‖ref‖ ≤ 2 · (torch's own error) + FLOOR[dtype]``.
"""

from __future__ import annotations

import copy
import itertools
import math
import os
import types

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import fastseq
from fastseq import reference
from fastseq.check import rel_err, tolerance

# kind -> (fastseq class, torch class, constructor keywords)
KINDS = {
    "lstm": (fastseq.LSTM, nn.LSTM, {}),
    "gru": (fastseq.GRU, nn.GRU, {}),
    "rnn_tanh": (fastseq.RNN, nn.RNN, {"nonlinearity": "tanh"}),
    "rnn_relu": (fastseq.RNN, nn.RNN, {"nonlinearity": "relu"}),
}


# -- set-up ---------------------------------------------------------------------------------------------------


def make_layers(kind, input_size, hidden_size, *, dtype=torch.float32, device="cpu", backend, **kw):
    """A fastseq layer and a torch layer holding equal (torch-initialised, random) parameters."""
    fast_cls, torch_cls, extra = KINDS[kind]
    theirs = torch_cls(input_size, hidden_size, device=device, dtype=dtype, **extra, **kw)
    ours = fast_cls(input_size, hidden_size, device=device, dtype=dtype, backend=backend, **extra, **kw)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return ours, theirs


def random_states(module, batch, dtype, device):
    """Random initial states for ``module``: ``(h0, c0)`` for an LSTM, ``h0`` otherwise; ``batch=None``: unbatched."""
    rows = module.num_layers * (2 if module.bidirectional else 1)
    lead = (rows,) if batch is None else (rows, batch)
    h_out = module.proj_size if getattr(module, "proj_size", 0) > 0 else module.hidden_size
    h0 = torch.randn(*lead, h_out, dtype=dtype, device=device)
    if module.mode == "LSTM":
        return h0, torch.randn(*lead, module.hidden_size, dtype=dtype, device=device)
    return h0


def random_input(module, batch, length, dtype, device):
    """A padded input in the module's layout, ``batch=None``: unbatched ``(T, I)``."""
    if batch is None:
        return torch.randn(length, module.input_size, dtype=dtype, device=device)
    shape = (batch, length) if module.batch_first else (length, batch)
    return torch.randn(*shape, module.input_size, dtype=dtype, device=device)


def state_list(state) -> list:
    if state is None:
        return []
    return list(state) if isinstance(state, (tuple, list)) else [state]


def _leaf(t):
    return t.detach().clone().requires_grad_()


def _with_data(x, data):
    return PackedSequence(data, x.batch_sizes, x.sorted_indices, x.unsorted_indices)


def run_module(module, x, hx, grad_outs):
    """``module(x, hx)`` and backward from ``grad_outs`` (one per output: output data, then each final state;
    ``None``: forward only, under ``no_grad``). Returns (raw result, outputs, gradients of [input, states…,
    parameters…])."""
    packed = isinstance(x, PackedSequence)
    data = _leaf(x.data if packed else x)
    states = [_leaf(s) for s in state_list(hx)]
    st = None if hx is None else (tuple(states) if isinstance(hx, tuple) else states[0])
    module.zero_grad(set_to_none=True)
    with torch.set_grad_enabled(grad_outs is not None):
        result = module(_with_data(x, data) if packed else data, st)
    out, final = result
    outs = [out.data if packed else out] + state_list(final)
    if grad_outs is None:
        return result, [o.detach() for o in outs], []
    torch.autograd.backward(outs, grad_outs)
    grads = [data.grad] + [s.grad for s in states] + [p.grad for p in module.parameters()]
    return result, [o.detach() for o in outs], grads


def run_reference(module, x, hx, grad_outs):
    """The same as :func:`run_module` in float64 through ``fastseq.reference.*_layer``, with the module's
    parameters (copied to float64 leaves) and the caller's forms handled as torch documents them."""
    params = {n: p.detach().double().requires_grad_() for n, p in module.named_parameters()}
    holder = types.SimpleNamespace(mode=module.mode, num_layers=module.num_layers,
                                   bidirectional=module.bidirectional, **params)
    weights = reference.layer_weights(holder)
    packed = isinstance(x, PackedSequence)
    data = (x.data if packed else x).detach().double().requires_grad_()
    states = [s.detach().double().requires_grad_() for s in state_list(hx)]
    batched = packed or data.dim() == 3
    inp = data if batched else data.unsqueeze(0 if module.batch_first else 1)
    st = [s if batched else s.unsqueeze(1) for s in states]
    if packed and x.sorted_indices is not None:
        st = [s.index_select(1, x.sorted_indices) for s in st]
    kw = dict(num_layers=module.num_layers, bidirectional=module.bidirectional, batch_first=module.batch_first,
              batch_sizes=x.batch_sizes if packed else None)
    if module.mode == "LSTM":
        out, finals = reference.lstm_layer(inp, tuple(st) if st else None, weights, proj_size=module.proj_size, **kw)
        finals = list(finals)
    elif module.mode == "GRU":
        out, h_n = reference.gru_layer(inp, st[0] if st else None, weights, **kw)
        finals = [h_n]
    else:
        out, h_n = reference.rnn_layer(inp, st[0] if st else None, weights, nonlinearity=module.nonlinearity, **kw)
        finals = [h_n]
    if packed and x.unsorted_indices is not None:
        finals = [s.index_select(1, x.unsorted_indices) for s in finals]
    if not batched:
        out = out.squeeze(0 if module.batch_first else 1)
        finals = [s.squeeze(1) for s in finals]
    outs = [out] + finals
    if grad_outs is None:
        return [o.detach() for o in outs], []
    torch.autograd.backward(outs, [g.double() for g in grad_outs])
    return [o.detach() for o in outs], [data.grad] + [s.grad for s in states] + [params[n].grad for n in params]


def random_grad_outs(theirs, x, hx):
    """Random upstream gradients for every output of ``theirs(x, hx)``, shaped and typed as torch's."""
    with torch.no_grad():
        out, final = theirs(x, hx)
    outs = [out.data if isinstance(out, PackedSequence) else out] + state_list(final)
    return [torch.randn_like(o) for o in outs]


def compare(ours, theirs, x, hx, dtype, grad_outs=None, grads=True):
    """Every output and gradient (``grads=False``: outputs only, under ``no_grad``) of ``ours`` and ``theirs``
    against the float64 reference. Returns the list of failures (empty: all within tolerance) and the raw results
    of both modules."""
    if grad_outs is None and grads:
        grad_outs = random_grad_outs(theirs, x, hx)
    our_res, our_outs, our_grads = run_module(ours, x, hx, grad_outs)
    their_res, their_outs, their_grads = run_module(theirs, x, hx, grad_outs)
    ref_outs, ref_grads = run_reference(ours, x, hx, grad_outs)
    names = ["output"] + [f"final state[{i}]" for i in range(len(our_outs) - 1)]
    if grads:
        names += (["grad input"] + [f"grad initial state[{i}]" for i in range(len(state_list(hx)))]
                  + [f"grad {n}" for n, _ in ours.named_parameters()])
    ours_all, theirs_all, ref_all = our_outs + our_grads, their_outs + their_grads, ref_outs + ref_grads
    assert len(ours_all) == len(theirs_all) == len(ref_all) == len(names)
    failures = []
    for name, o, t, r in zip(names, ours_all, theirs_all, ref_all):
        if o is None or o.shape != t.shape or o.dtype != t.dtype:
            failures.append(f"{name}: got {None if o is None else (tuple(o.shape), o.dtype)}, "
                            f"torch has {(tuple(t.shape), t.dtype)}")
            continue
        if not torch.isfinite(o).all():
            failures.append(f"{name}: non-finite values")
            continue
        torch_err = rel_err(t, r)
        err, tol = rel_err(o, r), tolerance(torch_err, dtype)
        if not err <= tol:
            failures.append(f"{name}: error {err:.3e} > tolerance {tol:.3e} (torch's own {torch_err:.3e})")
    return failures, our_res, their_res


def assert_matches(ours, theirs, x, hx, dtype, grad_outs=None, grads=True):
    failures, our_res, their_res = compare(ours, theirs, x, hx, dtype, grad_outs, grads)
    assert not failures, "; ".join(failures)
    assert_same_structure(our_res, their_res)
    return our_res, their_res


def assert_same_structure(ours, theirs):
    """``(output, h_n)`` or ``(output, (h_n, c_n))``, packed output with torch's indices."""
    assert type(ours) is type(theirs) and len(ours) == 2
    out, final = ours
    ref_out, ref_final = theirs
    assert type(out) is type(ref_out)
    if isinstance(ref_out, PackedSequence):
        assert torch.equal(out.batch_sizes, ref_out.batch_sizes)
        for a, b in ((out.sorted_indices, ref_out.sorted_indices), (out.unsorted_indices, ref_out.unsorted_indices)):
            assert (a is None) == (b is None) and (a is None or torch.equal(a, b))
    assert type(final) is type(ref_final)
    for a, b in zip(state_list(final), state_list(ref_final)):
        assert a.shape == b.shape and a.dtype == b.dtype


# -- the grid -------------------------------------------------------------------------------------------------

GRID = list(itertools.product(KINDS, (1, 2, 3), (False, True), (False, True), (False, True), (False, True)))


def _pairwise(grid):
    """A small subset of ``grid`` holding every pair of values of every two factors (greedy, deterministic)."""
    def pairs(case):
        return {(i, case[i], j, case[j]) for i, j in itertools.combinations(range(len(case)), 2)}

    need, chosen = set().union(*map(pairs, grid)), []
    while need:
        best = max(grid, key=lambda case: len(pairs(case) & need))
        chosen.append(best)
        need -= pairs(best)
    return chosen


# Every case of the grid runs forward (outputs and final states); these also run backward (every gradient). The
# interpreter makes each step of each layer and direction cost milliseconds: the whole grid with gradients would
# take over a minute here. The layer options that matter most to the backward kernels are also covered in full
# by the dedicated tests below (projection, packed, unbatched, sizes, dropout).
GRID_WITH_GRADIENTS = set(_pairwise(GRID))


def _grid_id(case):
    kind, layers, bidir, batch_first, bias, state = case
    return (f"{kind}-L{layers}-{'bi' if bidir else 'uni'}-{'bf' if batch_first else 'tm'}-"
            f"{'bias' if bias else 'nobias'}-{'hx' if state else 'nohx'}")


@pytest.mark.parametrize("case", GRID, ids=_grid_id)
def test_grid_matches_reference_and_torch(case, device, kernel_backend):
    """Every combination of kind × num_layers × bidirectional × batch_first × bias × initial state, tiny sizes:
    outputs and final states; and on a pairwise-covering subset (three steps) every gradient too."""
    kind, layers, bidir, batch_first, bias, with_state = case
    ours, theirs = make_layers(kind, 5, 7, device=device, backend=kernel_backend, num_layers=layers,
                               bidirectional=bidir, batch_first=batch_first, bias=bias)
    grads = case in GRID_WITH_GRADIENTS or device.type == "cuda"
    x = random_input(theirs, 3, 3 if grads else 2, torch.float32, device)  # 2 steps: a first and a last
    hx = random_states(theirs, 3, torch.float32, device) if with_state else None
    assert_matches(ours, theirs, x, hx, torch.float32, grads=grads)


def test_grid_gradient_subset_is_pairwise_covering():
    assert len(GRID_WITH_GRADIENTS) <= 16
    for i, j in itertools.combinations(range(6), 2):
        assert ({(c[i], c[j]) for c in GRID_WITH_GRADIENTS} == {(c[i], c[j]) for c in GRID}), (i, j)


_CUDA_ONLY = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")]
LOW_PRECISION = [pytest.param(torch.float16, id="float16"),
                 pytest.param(torch.bfloat16, id="bfloat16", marks=_CUDA_ONLY)]


@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("kind", list(KINDS))
def test_low_precision_matches_reference_and_torch(kind, dtype, device, kernel_backend):
    """float16 (CPU and GPU: torch's CPU layers take float16 too), bfloat16 on a GPU only (the interpreter's
    bfloat16 is approximate). Two layers with states and bias, bidirectional for the Elman kinds."""
    if dtype == torch.bfloat16 and device.type != "cuda":
        pytest.skip("bfloat16 under the Triton interpreter is not meaningful: GPU only")
    ours, theirs = make_layers(kind, 6, 9, dtype=dtype, device=device, backend=kernel_backend, num_layers=2,
                               bidirectional=kind.startswith("rnn") or device.type == "cuda")
    x = random_input(theirs, 3, 3, dtype, device)
    assert_matches(ours, theirs, x, random_states(theirs, 3, dtype, device), dtype)


@pytest.mark.parametrize("with_state", [False, True], ids=["nohx", "hx"])
def test_lstm_projection(with_state, device, kernel_backend):
    """proj_size: h is (·, P), c is (·, H), W_hr in every layer and direction; two bidirectional layers."""
    ours, theirs = make_layers("lstm", 5, 8, device=device, backend=kernel_backend, num_layers=2,
                               bidirectional=True, proj_size=3, batch_first=with_state)
    x = random_input(theirs, 3, 3, torch.float32, device)
    hx = random_states(theirs, 3, torch.float32, device) if with_state else None
    (out, (h, c)), _ = assert_matches(ours, theirs, x, hx, torch.float32)
    assert out.shape[-1] == 6 and h.shape == (4, 3, 3) and c.shape == (4, 3, 8)


def test_lstm_projection_three_layers_no_bias(device, kernel_backend):
    ours, theirs = make_layers("lstm", 4, 6, device=device, backend=kernel_backend, num_layers=3, proj_size=5,
                               bias=False)
    x = random_input(theirs, 2, 3, torch.float32, device)
    assert_matches(ours, theirs, x, random_states(theirs, 2, torch.float32, device), torch.float32)


@pytest.mark.parametrize("with_state", [False, True], ids=["nohx", "hx"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_unbatched_input(kind, with_state, device, kernel_backend):
    """(T, I) input and (L·D, H) states, results without a batch dimension (batch_first with states)."""
    ours, theirs = make_layers(kind, 5, 7, device=device, backend=kernel_backend, bidirectional=True,
                               batch_first=with_state)
    x = random_input(theirs, None, 3, torch.float32, device)
    hx = random_states(theirs, None, torch.float32, device) if with_state else None
    (out, final), _ = assert_matches(ours, theirs, x, hx, torch.float32)
    assert out.shape == (3, 14) and all(s.dim() == 2 for s in state_list(final))


def _packed(module, lengths, enforce_sorted, device, dtype=torch.float32):
    T, B = max(lengths), len(lengths)
    padded = random_input(module, B, T, dtype, device)
    return pack_padded_sequence(padded, torch.tensor(lengths), batch_first=module.batch_first,
                                enforce_sorted=enforce_sorted)


@pytest.mark.parametrize("bidir", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_packed_unsorted(kind, bidir, device, kernel_backend):
    """PackedSequence with enforce_sorted=False, lengths 1 … T in no order (two of length T): packed out with the
    same indices, final states in the caller's order (each sequence's state at its own last step), every
    gradient; two layers with states when bidirectional, one layer without states otherwise."""
    ours, theirs = make_layers(kind, 5, 7, device=device, backend=kernel_backend, num_layers=2 if bidir else 1,
                               bidirectional=bidir, batch_first=kind == "gru")
    x = _packed(theirs, [3, 1, 4, 4, 2], enforce_sorted=False, device=device)
    assert not torch.equal(x.sorted_indices.cpu(), torch.arange(5))
    hx = random_states(theirs, 5, torch.float32, device) if bidir else None
    (out, final), _ = assert_matches(ours, theirs, x, hx, torch.float32)
    assert torch.equal(out.sorted_indices, x.sorted_indices) and torch.equal(out.unsorted_indices,
                                                                             x.unsorted_indices)


@pytest.mark.parametrize("kind", list(KINDS))
def test_packed_sorted(kind, device, kernel_backend):
    """enforce_sorted=True (no indices), a length-1 sequence at the end; a projection for the LSTM."""
    extra = {"proj_size": 4} if kind == "lstm" else {}
    ours, theirs = make_layers(kind, 5, 7, device=device, backend=kernel_backend, bidirectional=True, **extra)
    x = _packed(theirs, [4, 3, 3, 1], enforce_sorted=True, device=device)
    assert x.sorted_indices is None
    (out, _), _ = assert_matches(ours, theirs, x, random_states(theirs, 4, torch.float32, device), torch.float32)
    assert out.sorted_indices is None and out.unsorted_indices is None


@pytest.mark.parametrize("kind", list(KINDS))
def test_packed_equals_each_sequence_alone(kind, device, kernel_backend):
    """Each sequence of a packed batch gives what it gives alone (no leakage between rows that have ended)."""
    ours, _ = make_layers(kind, 4, 6, device=device, backend=kernel_backend, bidirectional=True)
    lengths = [2, 4, 1]
    seqs = [torch.randn(n, 4, device=device) for n in lengths]
    packed = nn.utils.rnn.pack_sequence(seqs, enforce_sorted=False)
    with torch.no_grad():
        out, final = ours(packed)
        padded, _ = nn.utils.rnn.pad_packed_sequence(out)
        for b, seq in enumerate(seqs):
            alone, alone_final = ours(seq)
            torch.testing.assert_close(padded[: lengths[b], b], alone, rtol=1e-5, atol=1e-6)
            for s, a in zip(state_list(final), state_list(alone_final)):
                torch.testing.assert_close(s[:, b], a, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", list(KINDS))
def test_inference_matches_training(kind, device, kernel_backend):
    """no_grad(), inference_mode() and eval() give exactly the training forward's numbers when dropout is 0
    (the inference path keeps no workspace and builds no graph); eval() with grad enabled still trains, with the
    training gradients."""
    ours, _ = make_layers(kind, 5, 9, device=device, backend=kernel_backend, bidirectional=True)
    x = random_input(ours, 3, 3, torch.float32, device).requires_grad_()
    hx = random_states(ours, 3, torch.float32, device)
    out, final = ours(x, hx)
    training = [out] + state_list(final)
    with torch.no_grad():
        out_ng, final_ng = ours(x, hx)
    ours.eval()
    with torch.inference_mode():
        out_im, final_im = ours(x, hx)
    out_ev, final_ev = ours(x, hx)
    for results in ([out_ng] + state_list(final_ng), [out_im] + state_list(final_im),
                    [out_ev] + state_list(final_ev)):
        for a, b in zip(results, training):
            torch.testing.assert_close(a, b.detach(), rtol=0, atol=0)
    assert out_ng.grad_fn is None and not out_ng.requires_grad and out_im.is_inference()
    g = torch.randn_like(out)
    (grad_train,) = torch.autograd.grad(training[0], x, g)
    (grad_eval,) = torch.autograd.grad(out_ev, x, g)
    torch.testing.assert_close(grad_eval, grad_train, rtol=0, atol=0)


@pytest.mark.parametrize("kind,hidden", [("lstm", 37), ("gru", 37), ("rnn_relu", 37),
                                         ("lstm", 70), ("gru", 70), ("rnn_tanh", 70)])
def test_hidden_sizes_past_one_block(kind, hidden, device, kernel_backend):
    """Odd hidden sizes bigger than one kernel block (the multi-chunk path), with states; bidirectional at 37."""
    ours, theirs = make_layers(kind, 11, hidden, device=device, backend=kernel_backend, bidirectional=hidden < 64)
    x = random_input(theirs, 2, 2 if hidden > 64 else 3, torch.float32, device)
    assert_matches(ours, theirs, x, random_states(theirs, 2, torch.float32, device), torch.float32)


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn_tanh"])
def test_batch_one_and_length_one(kind, device, kernel_backend):
    for batch, length in ((1, 4), (3, 1), (1, 1)):
        ours, theirs = make_layers(kind, 3, 5, device=device, backend=kernel_backend, bidirectional=True,
                                   batch_first=True)
        x = random_input(theirs, batch, length, torch.float32, device)
        assert_matches(ours, theirs, x, random_states(theirs, batch, torch.float32, device), torch.float32)


@pytest.mark.parametrize("kind", ["rnn_tanh", "lstm", "gru"])
def test_long_sequence(kind, device, kernel_backend):
    """T = 1000 steps, forward and backward: every error stays within twice torch's own. The Triton kernels
    interpreted on CPU take 300 steps of the RNN (the interpreter spends some 50 ms a step); their LSTM and GRU
    run only when asked for (FASTSEQ_SLOW_TESTS=1), and always on a GPU."""
    interpreted = kernel_backend == "triton" and device.type == "cpu"
    if interpreted and kind != "rnn_tanh" and os.environ.get("FASTSEQ_SLOW_TESTS") != "1":
        pytest.skip("a minute or more under the Triton interpreter; FASTSEQ_SLOW_TESTS=1 runs it")
    ours, theirs = make_layers(kind, 3, 4, device=device, backend=kernel_backend)
    x = random_input(theirs, 2, 300 if interpreted else 1000, torch.float32, device)
    assert_matches(ours, theirs, x, random_states(theirs, 2, torch.float32, device), torch.float32)


def test_non_contiguous_input_states_and_weights(device, kernel_backend):
    """Strided views everywhere: a batch-first slice as input, permuted states, column-major weights."""
    ours, theirs = make_layers("lstm", 5, 7, device=device, backend=kernel_backend, num_layers=2,
                               bidirectional=True)
    for module in (ours, theirs):
        for name, p in list(module.named_parameters()):
            if p.dim() == 2:
                setattr(module, name, nn.Parameter(p.detach().t().contiguous().t()))
    x = torch.randn(3, 6, 5, device=device)[:, ::2].transpose(0, 1)  # (T=3, B=3, 5), strided
    hx = tuple(torch.randn(7, 3, 4, device=device).permute(2, 1, 0) for _ in range(2))  # (4, 3, 7)
    assert not x.is_contiguous() and not hx[0].is_contiguous() and not ours.weight_hh_l0.is_contiguous()
    assert_matches(ours, theirs, x, hx, torch.float32)


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn_tanh"])
def test_frozen_parameters_and_inputs_without_grad(kind, device, kernel_backend):
    """Only some leaves need gradients (a frozen layer, or only the initial state): those get the reference's
    gradients within tolerance, the others none."""
    ours, theirs = make_layers(kind, 4, 5, device=device, backend=kernel_backend, num_layers=2,
                               bidirectional=True)
    for module in (ours, theirs):
        module.requires_grad_(False)
    x = random_input(ours, 2, 3, torch.float32, device)
    hx = random_states(ours, 2, torch.float32, device)
    grad_outs = random_grad_outs(theirs, x, hx)
    ref_outs, ref_grads = run_reference(ours, x, hx, grad_outs)  # [input, states…, parameters…]
    n_states = len(state_list(hx))
    for x_grad in (True, False):  # frozen layer: the input's (and states') gradients; then the states' only
        results = []
        for module in (ours, theirs):
            leaf_x = x.detach().clone().requires_grad_(x_grad)
            states = [s.detach().clone().requires_grad_() for s in state_list(hx)]
            out, final = module(leaf_x, tuple(states) if isinstance(hx, tuple) else states[0])
            torch.autograd.backward([out] + state_list(final), grad_outs)
            results.append([leaf_x.grad] + [s.grad for s in states])
            assert all(p.grad is None for p in module.parameters())
        for i, (o, t, r) in enumerate(zip(results[0], results[1], ref_grads[: 1 + n_states])):
            if i == 0 and not x_grad:
                assert o is None and t is None
                continue
            assert o is not None and rel_err(o, r) <= tolerance(rel_err(t, r), torch.float32), i


@pytest.mark.parametrize("kind", ["lstm", "rnn_relu"])
def test_patched_deepcopy_of_torch_module_matches(kind, device, kernel_backend):
    """The other way to get a fastseq layer: ``fastseq.patch`` on a copy of torch's module."""
    _, torch_cls, extra = KINDS[kind]
    theirs = torch_cls(4, 6, num_layers=2, bidirectional=True, device=device, **extra)
    ours = fastseq.patch(copy.deepcopy(theirs), backend=kernel_backend)
    assert type(ours) is KINDS[kind][0]
    x = random_input(theirs, 2, 3, torch.float32, device)
    assert_matches(ours, theirs, x, random_states(theirs, 2, torch.float32, device), torch.float32)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_nothing_the_caller_passed_is_modified(kind, device, kernel_backend):
    ours, _ = make_layers(kind, 5, 7, device=device, backend=kernel_backend, bidirectional=True)
    x = random_input(ours, 3, 3, torch.float32, device).requires_grad_()
    hx = random_states(ours, 3, torch.float32, device)
    packed = _packed(ours, [3, 2, 3], enforce_sorted=False, device=device)
    for inp in (x, packed):
        before = [t.detach().clone() for t in [inp.data if isinstance(inp, PackedSequence) else inp,
                                               *state_list(hx), *ours.parameters()]]
        indices = [t.clone() for t in (packed.batch_sizes, packed.sorted_indices, packed.unsorted_indices)]
        out, final = ours(inp, hx)
        out = out.data if isinstance(out, PackedSequence) else out
        (out.sum() + sum(s.sum() for s in state_list(final))).backward()
        after = [inp.data if isinstance(inp, PackedSequence) else inp, *state_list(hx), *ours.parameters()]
        for a, b in zip(before, after):
            assert torch.equal(a, b.detach())
        for a, b in zip(indices, (packed.batch_sizes, packed.sorted_indices, packed.unsorted_indices)):
            assert torch.equal(a, b)


@pytest.mark.parametrize("kind", list(KINDS))
def test_empty_batch_as_torch(kind, device, kernel_backend):
    ours, theirs = make_layers(kind, 4, 6, device=device, backend=kernel_backend, num_layers=2,
                               bidirectional=True)
    x = torch.randn(3, 0, 4, device=device, requires_grad=True)
    out, final = ours(x)
    ref, ref_final = theirs(x)
    assert out.shape == ref.shape
    assert [s.shape for s in state_list(final)] == [s.shape for s in state_list(ref_final)]
    out.sum().backward()
    assert x.grad.shape == x.shape


@pytest.mark.parametrize("kind", list(KINDS))
def test_nan_and_inf_propagate_as_in_torch(kind, device, kernel_backend):
    ours, theirs = make_layers(kind, 4, 6, device=device, backend=kernel_backend)
    x = torch.randn(4, 3, 4, device=device)
    x[1, 0, 2] = float("nan")
    x[2, 1, 0] = float("inf")
    with torch.no_grad():
        got, want = ours(x), theirs(x)
    for o, r in zip([got[0]] + state_list(got[1]), [want[0]] + state_list(want[1])):
        assert torch.equal(torch.isnan(o), torch.isnan(r))
        torch.testing.assert_close(o, r, equal_nan=True, rtol=1e-5, atol=1e-6)


# -- dropout between layers -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(KINDS))
def test_dropout_eval_equals_no_dropout(kind, device, kernel_backend):
    ours, _ = make_layers(kind, 5, 7, device=device, backend=kernel_backend, num_layers=3,
                          bidirectional=kind.startswith("rnn"), dropout=0.5)
    plain = copy.deepcopy(ours)
    plain.dropout = 0.0
    x = random_input(ours, 3, 3, torch.float32, device)
    ours.eval()
    with torch.no_grad():
        got, want = ours(x), plain(x)
    for a, b in zip([got[0]] + state_list(got[1]), [want[0]] + state_list(want[1])):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    ours.train()
    with torch.no_grad():
        assert not torch.equal(ours(x)[0], want[0])  # dropout is live in training


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_dropout_repeatable_under_manual_seed(kind, device, kernel_backend):
    ours, _ = make_layers(kind, 5, 7, device=device, backend=kernel_backend, num_layers=2, dropout=0.5)
    x = random_input(ours, 3, 3, torch.float32, device).requires_grad_()

    def run(seed):
        torch.manual_seed(seed)
        out, _ = ours(x)
        (grad,) = torch.autograd.grad(out.square().sum(), x)
        return out.detach(), grad

    a, b, c = run(1), run(1), run(2)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def _mask_reader(num_layers, hidden, p, device, backend):
    """A bidirectional RNN (relu) whose output is the product of its dropout masks: layer 0 outputs 1 everywhere
    (relu of a bias of 1), each deeper layer copies its input unit for unit (identity W_ih, no recurrence). The
    output element (t, b, j) is then Π_l mask_l(t, b, j) over the L − 1 masks between layers."""
    m = fastseq.RNN(3, hidden, num_layers=num_layers, nonlinearity="relu", bidirectional=True, dropout=p,
                    device=device, backend=backend)
    with torch.no_grad():
        for name, param in m.named_parameters():
            param.zero_()
            if name.startswith("bias_ih_l0"):
                param.fill_(1.0)
            elif name.startswith("weight_ih") and "_l0" not in name:
                offset = hidden if name.endswith("_reverse") else 0
                param[:, offset:offset + hidden] = torch.eye(hidden, device=device)
    return m


@pytest.mark.parametrize("num_layers,p", [(2, 0.5), (3, 0.2)])
def test_dropout_masks_statistics_and_gradient(num_layers, p, device, kernel_backend):
    """Through a layer built so that its output is the product of the dropout masks: every output element is 0 or
    (1/(1−p))^(L−1) (inverted dropout, once between each pair of layers, not after the last); the fraction of zeros
    is 1 − (1−p)^(L−1) within 5σ; masks are drawn afresh per time step (not shared over time); and the gradient
    flows through the same mask as the forward (d out / d b_ih_l0 = out, unit for unit)."""
    hidden, T, B = 30, 8, 5
    m = _mask_reader(num_layers, hidden, p, device, kernel_backend)
    x = torch.randn(T, B, 3, device=device)
    out, _ = m(x)
    scale = (1.0 / (1.0 - p)) ** (num_layers - 1)
    zero = out == 0
    kept = out[~zero]
    torch.testing.assert_close(kept, torch.full_like(kept, scale), rtol=1e-6, atol=0,
                               msg="kept elements must be scaled by 1/(1-p) per dropout")
    expected = 1 - (1 - p) ** (num_layers - 1)
    sigma = math.sqrt(expected * (1 - expected) / out.numel())
    assert abs(zero.float().mean().item() - expected) < 5 * sigma, (zero.float().mean().item(), expected)
    same_as_next_step = (zero[1:] == zero[:-1]).float().mean().item()
    agree = expected ** 2 + (1 - expected) ** 2
    assert abs(same_as_next_step - agree) < 5 * math.sqrt(agree * (1 - agree) / zero[1:].numel())
    g = torch.randn_like(out)
    out.backward(g)
    # out(t, b, j) = Π masks · relu(b_ih_l0[j]) with b_ih_l0 = 1: d out / d b_ih_l0[j] is out itself
    want = (g * out.detach()).sum((0, 1))
    torch.testing.assert_close(m.bias_ih_l0.grad, want[:hidden], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(m.bias_ih_l0_reverse.grad, want[hidden:], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", list(KINDS))
def test_dropout_matches_reference_with_the_same_masks(kind, device, kernel_backend, monkeypatch):
    """Training with dropout against the reference given the masks that were drawn (recorded by wrapping
    ``torch.nn.functional.dropout``, the public function a Python layer draws them with): outputs and every
    gradient. Fails, saying so, if the module drew no mask that way."""
    masks = []
    real_dropout = torch.nn.functional.dropout

    def recording_dropout(input, p=0.5, training=True, inplace=False):
        keep = torch.bernoulli(torch.full_like(input, 1 - p))
        masks.append(keep / (1 - p))
        return input * masks[-1]

    bidir = kind.startswith("rnn")
    ours, theirs = make_layers(kind, 5, 6, device=device, backend=kernel_backend, num_layers=3, dropout=0.4,
                               bidirectional=bidir)
    x = random_input(ours, 3, 3, torch.float32, device)
    grad_outs = random_grad_outs(theirs.eval(), x, None)
    monkeypatch.setattr(torch.nn.functional, "dropout", recording_dropout)
    _, our_outs, our_grads = run_module(ours, x, None, grad_outs)
    monkeypatch.setattr(torch.nn.functional, "dropout", real_dropout)
    assert len(masks) == 2, f"expected one dropout mask between each pair of layers, got {len(masks)}"
    params = {n: q.detach().double().requires_grad_() for n, q in ours.named_parameters()}
    holder = types.SimpleNamespace(mode=ours.mode, num_layers=3, bidirectional=bidir, **params)
    x64 = x.double().requires_grad_()
    fn = {"lstm": reference.lstm_layer, "gru": reference.gru_layer}.get(kind, reference.rnn_layer)
    kw = {"nonlinearity": ours.nonlinearity} if kind.startswith("rnn") else {}
    out, final = fn(x64, None, reference.layer_weights(holder), num_layers=3, bidirectional=bidir,
                    dropout_masks=[mk.double() for mk in masks], **kw)
    ref_outs = [out] + state_list(final)
    torch.autograd.backward(ref_outs, [g.double() for g in grad_outs])
    ref_grads = [x64.grad] + [params[n].grad for n in params]
    names = ["output"] + [f"final state[{i}]" for i in range(len(ref_outs) - 1)] + ["grad input", *params]
    ours_all, ref_all = our_outs + our_grads, [o.detach() for o in ref_outs] + ref_grads
    assert len(names) == len(ours_all) == len(ref_all)
    for name, o, r in zip(names, ours_all, ref_all):
        assert o is not None and o.shape == r.shape, name
        assert rel_err(o, r) < 1e-5, f"{name}: error {rel_err(o, r):.3e}"  # float32 of values O(1), T=3
