"""The fused layer kernels (``kernels/rnn_seq.py``), called through their launchers, against the float64 reference
and against torch's own ``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN`` (one layer, the same weights, the same dtype).

The launchers get the input projection precomputed (``gates_x = x·W_ihᵀ + b_ih``, as the operator layer does)
and return gate gradients; the weight and input gradients are made from them here the way the operator layer
makes them (``dx = dgates_x·W_ih``, ``dW_hh = dgates_hᵀ·h_prev``, ``dW_hr = dh_totalᵀ·m``, with ``h_prev`` and
``m`` read from the workspace), so the workspace layout is checked as part of the contract. Every output and
gradient must be within twice torch's own error of the reference, plus a rounding floor (``fastseq.check``).

Sizes are small because the interpreter is slow (about 10 / 20 / 30 ms per step and program for RNN / GRU / LSTM
on one core); with ``BLOCK_H = BLOCK_K = 32`` on the CPU, H = 1 and 5 take the on-chip path, H = 37 and 70 (or an
output size over 32) the multi-chunk path with its scratch and barriers.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

from fastseq import reference
from fastseq.check import rel_err, tolerance
from fastseq.kernels import rnn_seq

MODULES = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn_tanh": nn.RNN, "rnn_relu": nn.RNN}


@dataclass(frozen=True)
class Case:
    kind: str  # a key of MODULES
    T: int
    B: int
    I: int
    H: int
    D: int = 1
    P: int = 0
    packed: bool = False
    bias: bool = True
    dtype: torch.dtype = torch.float32

    @property
    def op(self) -> str:  # the launchers' kind
        return self.kind.split("_")[0]

    @property
    def nonlinearity(self) -> str:
        return "relu" if self.kind == "rnn_relu" else "tanh"

    @property
    def hout(self) -> int:
        return self.P or self.H

    @property
    def gates(self) -> int:
        return rnn_seq.NUM_GATES[self.op] * self.H

    def __str__(self) -> str:
        flags = [f"D{self.D}", "packed" if self.packed else "", f"P{self.P}" if self.P else "",
                 "" if self.bias else "nobias", str(self.dtype).removeprefix("torch.")]
        return f"{self.kind}-T{self.T}-B{self.B}-H{self.H}-" + "-".join(f for f in flags if f)


def make_module(case: Case, device) -> nn.Module:
    kw = {"proj_size": case.P} if case.P else {}
    if case.op == "rnn":
        kw["nonlinearity"] = case.nonlinearity
    return MODULES[case.kind](case.I, case.H, bias=case.bias, bidirectional=case.D == 2, device=device,
                              dtype=case.dtype, **kw)


def lengths_for(case: Case) -> list[int]:
    """Unsorted lengths that include 1 and T (packed input), or all T."""
    if not case.packed:
        return [case.T] * case.B
    lengths = torch.randint(1, case.T + 1, (case.B,)).tolist()
    lengths[0] = case.T
    if case.B > 1:
        lengths[-1] = 1
    return lengths[::-1]  # the longest last: pack_padded_sequence must sort


@dataclass
class Inputs:
    """One case's tensors, states and gradients in the packed (sorted) batch order the kernels use."""
    x: torch.Tensor                  # (T, B, I) or the packed data (N, I)
    batch_sizes: torch.Tensor | None
    sorted_indices: torch.Tensor     # the sorted row b is the caller's row sorted_indices[b]
    unsorted_indices: torch.Tensor
    h0: torch.Tensor
    c0: torch.Tensor | None
    grad_out: torch.Tensor
    grad_hn: torch.Tensor
    grad_cn: torch.Tensor | None


def make_inputs(case: Case, device) -> Inputs:
    dt = case.dtype
    x = torch.randn(case.T, case.B, case.I, dtype=dt, device=device)
    batch_sizes = None
    order = torch.arange(case.B, device=device)
    unsorted = order
    if case.packed:
        packed = pack_padded_sequence(x, torch.tensor(lengths_for(case)), enforce_sorted=False)
        x, batch_sizes, order, unsorted = packed.data, packed.batch_sizes, packed.sorted_indices, \
            packed.unsorted_indices
    h0 = torch.randn(case.D, case.B, case.hout, dtype=dt, device=device)
    c0 = torch.randn(case.D, case.B, case.H, dtype=dt, device=device) if case.op == "lstm" else None
    grad_out = torch.randn(*x.shape[:-1], case.D * case.hout, dtype=dt, device=device)
    grad_hn = torch.randn_like(h0)
    grad_cn = torch.randn_like(c0) if c0 is not None else None
    return Inputs(x, batch_sizes, order, unsorted, h0, c0, grad_out, grad_hn, grad_cn)


def _leaf(t, dtype=None):
    return t.detach().to(dtype or t.dtype).clone().requires_grad_()


def run_torch(case: Case, module: nn.Module, inp: Inputs) -> dict:
    """torch's module: outputs and gradients, states in the sorted order (torch takes and gives them in the
    caller's order and permutes them itself)."""
    x = _leaf(inp.x)
    h0 = _leaf(inp.h0[:, inp.unsorted_indices])
    c0 = _leaf(inp.c0[:, inp.unsorted_indices]) if inp.c0 is not None else None
    seq = x if inp.batch_sizes is None else PackedSequence(x, inp.batch_sizes, inp.sorted_indices,
                                                           inp.unsorted_indices)
    module.zero_grad(set_to_none=True)
    out, state = module(seq, h0 if c0 is None else (h0, c0))
    out = out if inp.batch_sizes is None else out.data
    states = list(state) if isinstance(state, tuple) else [state]
    grads = [inp.grad_hn[:, inp.unsorted_indices]] + (
        [inp.grad_cn[:, inp.unsorted_indices]] if inp.grad_cn is not None else [])
    torch.autograd.backward([out] + states, [inp.grad_out] + grads)
    result = {"out": out, "h_n": states[0][:, inp.sorted_indices], "grad x": x.grad,
              "grad h0": h0.grad[:, inp.sorted_indices]}
    if c0 is not None:
        result["c_n"] = states[1][:, inp.sorted_indices]
        result["grad c0"] = c0.grad[:, inp.sorted_indices]
    result.update({f"grad {n}": p.grad for n, p in module.named_parameters()})
    return result


def run_reference(case: Case, module: nn.Module, inp: Inputs) -> dict:
    """The same through ``fastseq.reference`` in float64."""
    f64 = torch.float64
    x, h0 = _leaf(inp.x, f64), _leaf(inp.h0, f64)
    c0 = _leaf(inp.c0, f64) if inp.c0 is not None else None
    params = {n: _leaf(p, f64) for n, p in module.named_parameters()}
    names = ("weight_ih", "weight_hh", "bias_ih", "bias_hh") + (("weight_hr",) if case.op == "lstm" else ())
    weights = [tuple(params.get(f"{name}_l0{sfx}") for name in names) for sfx in ("", "_reverse")[:case.D]]
    kw = dict(bidirectional=case.D == 2, batch_sizes=inp.batch_sizes)
    if case.op == "lstm":
        out, (h_n, c_n) = reference.lstm_layer(x, (h0, c0), weights, proj_size=case.P, **kw)
        outs, grads = [out, h_n, c_n], [inp.grad_out, inp.grad_hn, inp.grad_cn]
    elif case.op == "gru":
        out, h_n = reference.gru_layer(x, h0, weights, **kw)
        outs, grads = [out, h_n], [inp.grad_out, inp.grad_hn]
    else:
        out, h_n = reference.rnn_layer(x, h0, weights, nonlinearity=case.nonlinearity, **kw)
        outs, grads = [out, h_n], [inp.grad_out, inp.grad_hn]
    torch.autograd.backward(outs, [g.to(f64) for g in grads])
    result = dict(zip(["out", "h_n", "c_n"], [o.detach() for o in outs]))
    result.update({"grad x": x.grad, "grad h0": h0.grad})
    if c0 is not None:
        result["grad c0"] = c0.grad
    result.update({f"grad {n}": p.grad for n, p in params.items()})
    return result


def _mm(a, b, dtype):
    """``a·b`` accumulated in float32, rounded to ``dtype`` (as the operator layer's products are)."""
    return (a.float() @ b.float()).to(dtype)


def gates_input(case: Case, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``gates_x = x·W_ihᵀ + b_ih`` of every direction, side by side: what the operator layer passes."""
    sfx = ("", "_reverse")[:case.D]
    return torch.cat([F.linear(x, getattr(module, f"weight_ih_l0{s}"), getattr(module, f"bias_ih_l0{s}", None))
                      for s in sfx], dim=-1).detach()


def stacked(module: nn.Module, name: str, D: int):
    ps = [getattr(module, f"{name}_l0{s}", None) for s in ("", "_reverse")[:D]]
    return None if ps[0] is None else torch.stack([p.detach() for p in ps])


def run_ours(case: Case, module: nn.Module, inp: Inputs, gates_x: torch.Tensor | None = None) -> dict:
    """The launchers, and every gradient made from their outputs as the operator layer makes it."""
    dt, D, G, H, HO = case.dtype, case.D, case.gates, case.H, case.hout
    gx = gates_input(case, module, inp.x) if gates_x is None else gates_x
    w_hh, b_hh, w_hr = stacked(module, "weight_hh", D), stacked(module, "bias_hh", D), stacked(module, "weight_hr", D)
    out, h_n, c_n, ws = rnn_seq.launch_layer_fwd(case.op, gx, inp.h0, inp.c0, w_hh, b_hh, w_hr, inp.batch_sizes,
                                                 True, case.nonlinearity)
    dgx, dgh, dh0, dc0, dht = rnn_seq.launch_layer_bwd(case.op, inp.grad_out, inp.grad_hn, inp.grad_cn, ws, w_hh,
                                                       w_hr, inp.batch_sizes, case.nonlinearity)
    layout = rnn_seq.workspace_layout(case.op, H, case.P)
    n_rows = out.numel() // out.shape[-1]
    assert ws.shape == (D, n_rows, layout["width"]) and ws.dtype == torch.float32
    assert dgx.shape == gx.shape and dgx.dtype == dt and dgx.is_contiguous()
    assert (dgh is dgx) == (case.op != "gru")
    for t in (out, h_n, c_n, ws, dgx, dgh, dh0, dc0, dht):  # conftest NaN-poisons torch.empty: all written
        assert t is None or bool(torch.isfinite(t).all()), "an element was not written (or is not finite)"
    x_rows = inp.x.reshape(-1, case.I)
    dgx_rows, dgh_rows = dgx.reshape(-1, D * G), dgh.reshape(-1, D * G)
    result = {"out": out, "h_n": h_n, "grad h0": dh0, "grad x": torch.zeros_like(x_rows)}
    if c_n is not None:
        result.update({"c_n": c_n, "grad c0": dc0})
    for d, sfx in enumerate(("", "_reverse")[:D]):
        dg_x, dg_h = dgx_rows[:, d * G:(d + 1) * G], dgh_rows[:, d * G:(d + 1) * G]
        h_prev = ws[d, :, layout["h_prev"]:layout["h_prev"] + HO]
        result["grad x"] = result["grad x"] + _mm(dg_x, getattr(module, f"weight_ih_l0{sfx}").detach(), dt)
        result[f"grad weight_ih_l0{sfx}"] = _mm(dg_x.t(), x_rows, dt)
        result[f"grad weight_hh_l0{sfx}"] = _mm(dg_h.t(), h_prev, dt)
        if case.bias:
            result[f"grad bias_ih_l0{sfx}"] = dg_x.float().sum(0).to(dt)
            result[f"grad bias_hh_l0{sfx}"] = dg_h.float().sum(0).to(dt)
        if case.P:
            result[f"grad weight_hr_l0{sfx}"] = _mm(dht[d].t(), ws[d, :, layout["m"]:layout["m"] + H], dt)
    result["grad x"] = result["grad x"].reshape(inp.x.shape)
    return result


def check_case(case: Case, device) -> dict:
    """Run ``case`` three ways and assert every output and gradient within tolerance; returns our results."""
    module = make_module(case, device)
    inp = make_inputs(case, device)
    ours, theirs, ref = run_ours(case, module, inp), run_torch(case, module, inp), run_reference(case, module, inp)
    assert set(ours) == set(ref) == set(theirs), (sorted(ours), sorted(ref), sorted(theirs))
    failures = []
    for name, r in ref.items():
        o, t = ours[name], theirs[name]
        assert o.shape == r.shape and o.dtype == t.dtype == case.dtype, (name, o.shape, r.shape, o.dtype)
        torch_error = rel_err(t, r)
        error, tol = rel_err(o, r), tolerance(torch_error, case.dtype)
        if not error <= tol:
            failures.append(f"{name}: error {error:.3e} > tolerance {tol:.3e} (torch's own {torch_error:.3e})")
    assert not failures, f"{case}: " + "; ".join(failures)
    return ours


# Each kind over: on-chip and multi-chunk hidden sizes, one and two directions, packed (unsorted lengths with 1
# and T) and padded, no bias, float32, float16 and bfloat16 (the interpreter upcasts bfloat16 after loading and
# rounds its stores), batch 1, T = 1, and more than one block of rows (B = 70 > 64).
SHAPES = [
    dict(T=5, B=4, I=3, H=5, D=2, packed=True),
    dict(T=3, B=3, I=4, H=37, D=1, bias=False),
    dict(T=4, B=5, I=6, H=37, D=2, packed=True, dtype=torch.float16),
    dict(T=2, B=2, I=3, H=70, D=2, dtype=torch.bfloat16),
    dict(T=1, B=1, I=1, H=1, D=2, dtype=torch.float16),
    dict(T=3, B=70, I=2, H=5, D=1, packed=True, bias=False, dtype=torch.bfloat16),
]
CASES = [Case(kind, **shape) for kind in MODULES for shape in SHAPES]
# LSTM with a projection (torch needs P < H): on chip (H ≤ 32), multi-chunk with one slice of P, and with two
# slices of P (the h' = m·W_hrᵀ phase and the backward's dm = dh·W_hr loop over P).
CASES += [
    Case("lstm", T=4, B=3, I=3, H=5, P=3, D=2, packed=True),
    Case("lstm", T=3, B=2, I=4, H=37, P=3, D=2, dtype=torch.float16),
    Case("lstm", T=3, B=3, I=2, H=40, P=33, D=1, packed=True, bias=False),
]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_layer_matches_reference_and_torch(case, device):
    check_case(case, device)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")
@pytest.mark.parametrize("kind", list(MODULES))
@pytest.mark.parametrize("H", [5, 37, 130])
def test_bfloat16_and_larger_sizes_on_gpu(kind, H):
    """On a GPU bfloat16 goes to the tensor cores (not upcast as under the interpreter), with the real barriers
    of the multi-chunk path between the warps of a block."""
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        check_case(Case(kind, T=20, B=33, I=17, H=H, D=2, P=3 if kind == "lstm" and H == 130 else 0,
                        packed=H == 37, dtype=dtype), torch.device("cuda"))


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn_relu"])
@pytest.mark.parametrize("H", [5, 37])
def test_inference_writes_no_workspace_and_matches_training(kind, H, device):
    case = Case(kind, T=3, B=3, I=4, H=H, D=2, packed=True)
    module = make_module(case, device)
    inp = make_inputs(case, device)
    gx = gates_input(case, module, inp.x)
    args = (case.op, gx, inp.h0, inp.c0, stacked(module, "weight_hh", 2), stacked(module, "bias_hh", 2), None,
            inp.batch_sizes)
    training = rnn_seq.launch_layer_fwd(*args, True, case.nonlinearity)
    inference = rnn_seq.launch_layer_fwd(*args, False, case.nonlinearity)
    assert inference[3].numel() == 0 and training[3].numel() > 0
    for a, b in zip(inference[:3], training[:3]):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn_tanh"])
@pytest.mark.parametrize("H", [5, 37])
def test_any_strides_give_the_same_numbers(kind, H, device):
    """Strided views everywhere (a batch-first gates tensor, transposed weights, states and gradients with odd
    strides) give exactly the numbers of contiguous tensors."""
    case = Case(kind, T=3, B=2, I=3, H=H, D=2, P=4 if kind == "lstm" and H == 37 else 0)
    module = make_module(case, device)
    inp = make_inputs(case, device)

    def strided(t):  # the same values in a layout with no unit stride and the dims permuted
        if t is None:
            return None
        big = torch.zeros(*reversed(t.shape), 2, dtype=t.dtype, device=t.device)
        view = big[..., 0].permute(*reversed(range(t.dim())))
        view.copy_(t)
        assert not view.is_contiguous()
        return view

    gx = gates_input(case, module, inp.x)
    w_hh, b_hh, w_hr = (stacked(module, n, 2) for n in ("weight_hh", "bias_hh", "weight_hr"))
    dense = rnn_seq.launch_layer_fwd(case.op, gx, inp.h0, inp.c0, w_hh, b_hh, w_hr, None, True)
    views = rnn_seq.launch_layer_fwd(case.op, strided(gx), strided(inp.h0), strided(inp.c0), strided(w_hh),
                                     strided(b_hh), strided(w_hr), None, True)
    for a, b in zip(dense, views):
        if a is not None:
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    ws = dense[3]
    dense_b = rnn_seq.launch_layer_bwd(case.op, inp.grad_out, inp.grad_hn, inp.grad_cn, ws, w_hh, w_hr, None)
    views_b = rnn_seq.launch_layer_bwd(case.op, strided(inp.grad_out), strided(inp.grad_hn), strided(inp.grad_cn),
                                       ws, strided(w_hh), strided(w_hr), None)
    for a, b in zip(dense_b, views_b):
        if a is not None:
            torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn_tanh"])
def test_workspace_layout(kind, device):
    """The consumed state sits at ``h_prev`` (``h0`` at the first step, the previous output after); with a
    projection ``m`` sits at ``m`` and ``out = m·W_hrᵀ``."""
    case = Case(kind, T=3, B=2, I=3, H=6, D=2, P=4 if kind == "lstm" else 0)
    module = make_module(case, device)
    inp = make_inputs(case, device)
    w_hr = stacked(module, "weight_hr", 2)
    out, _, _, ws = rnn_seq.launch_layer_fwd(case.op, gates_input(case, module, inp.x), inp.h0, inp.c0,
                                             stacked(module, "weight_hh", 2), stacked(module, "bias_hh", 2), w_hr,
                                             None, True)
    layout = rnn_seq.workspace_layout(case.op, case.H, case.P)
    HO = case.hout
    h_prev = ws[..., layout["h_prev"]:layout["h_prev"] + HO].reshape(2, case.T, case.B, HO)
    torch.testing.assert_close(h_prev[0, 0], inp.h0[0], rtol=0, atol=0)    # forward starts at t = 0
    torch.testing.assert_close(h_prev[1, -1], inp.h0[1], rtol=0, atol=0)   # reverse starts at t = T−1
    torch.testing.assert_close(h_prev[0, 1:], out[:-1, :, :HO], rtol=0, atol=0)
    torch.testing.assert_close(h_prev[1, :-1], out[1:, :, HO:], rtol=0, atol=0)
    if case.P:
        m = ws[..., layout["m"]:layout["m"] + case.H].reshape(2, case.T, case.B, case.H)
        torch.testing.assert_close(m[0] @ w_hr[0].t(), out[..., :HO])


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_empty_sequence_or_batch(kind, packed, device):
    """Nothing to run: no launch; the final state is the initial one and its gradient passes straight through."""
    D, H, P = 2, 4, 0
    G = rnn_seq.NUM_GATES[kind] * H
    for T, B in ([(0, 3)] if packed else [(0, 3), (4, 0)]):
        gx = torch.randn((0, D * G) if packed else (T, B, D * G), device=device)
        batch_sizes = torch.zeros(0, dtype=torch.int64) if packed else None
        h0, c0 = torch.randn(D, B, H, device=device), torch.randn(D, B, H, device=device)
        w_hh = torch.randn(D, G, H, device=device)
        c0 = c0 if kind == "lstm" else None
        out, h_n, c_n, ws = rnn_seq.launch_layer_fwd(kind, gx, h0, c0, w_hh, None, None, batch_sizes, True)
        assert out.shape == (*gx.shape[:-1], D * H) and ws.shape[1] == 0
        torch.testing.assert_close(h_n, h0, rtol=0, atol=0)
        if c0 is not None:
            torch.testing.assert_close(c_n, c0, rtol=0, atol=0)
        dgx, dgh, dh0, dc0, dht = rnn_seq.launch_layer_bwd(kind, torch.randn_like(out), h0 * 2, c0, ws, w_hh, None,
                                                           batch_sizes)
        assert dgx.shape == gx.shape and dht is None
        torch.testing.assert_close(dh0, h0 * 2, rtol=0, atol=0)
        if c0 is not None:
            torch.testing.assert_close(dc0, c0, rtol=0, atol=0)


def test_nothing_the_caller_passed_is_modified(device):
    case = Case("lstm", T=3, B=2, I=3, H=37, D=2, P=5, packed=True)
    module = make_module(case, device)
    inp = make_inputs(case, device)
    tensors = [gates_input(case, module, inp.x), inp.h0, inp.c0, inp.grad_out, inp.grad_hn, inp.grad_cn,
               *(p.detach() for p in module.parameters())]
    before = [t.clone() for t in tensors]
    run_ours(case, module, inp, gates_x=tensors[0])
    for a, b in zip(tensors, before):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_workspace_layout_function():
    assert rnn_seq.workspace_layout("lstm", 10) == {"width": 70, "h_prev": 60, "m": None}
    assert rnn_seq.workspace_layout("lstm", 10, 3) == {"width": 73, "h_prev": 70, "m": 60}
    assert rnn_seq.workspace_layout("gru", 10) == {"width": 50, "h_prev": 40, "m": None}
    assert rnn_seq.workspace_layout("rnn", 10) == {"width": 20, "h_prev": 10, "m": None}


def test_blocks_are_valid_for_the_gpu():
    """tl.dot needs every block dimension ≥ 16; the on-chip path needs BLOCK_H == BLOCK_K."""
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for backward in (False, True):
            for batch in (1, 16, 17, 2048, 2049, 100000):
                b = rnn_seq.blocks(batch, dtype, on_gpu=True, backward=backward)
                assert min(b["BLOCK_B"], b["BLOCK_H"], b["BLOCK_K"]) >= 16 and b["BLOCK_H"] == b["BLOCK_K"]


@pytest.mark.parametrize("kind,hidden,proj", [("lstm", 10, 0), ("lstm", 10, 3), ("gru", 7, 0), ("rnn", 5, 0)])
def test_operator_reads_the_layout_the_kernel_writes(kind, hidden, proj):
    """The operators keep their own copy of the layout (they must not import Triton): the two must agree."""
    from fastseq.ops import layers as ops_layers

    assert ops_layers.workspace_layout(kind, hidden, proj) == rnn_seq.workspace_layout(kind, hidden, proj)
