"""The C++ CPU kernels (backend "cpp", ``csrc/cpu/`` through ``fastseq/cpp_kernels.py``): what the backend-generic
tests (test_cells, test_layers, test_modules, test_ops, … parametrised over ``kernel_backend``) do not check.

- The extension really is built and ``fastseq.backends()["cpp"]`` available in a source checkout with a compiler.
- The launchers against the float64 reference, called directly (layers: the recurrence from a given ``gates_x``,
  as the operators call it), next to torch's own error in the same dtype, bfloat16 and float16 included.
- The launchers against the Triton launchers on the same tensors, workspaces included: the workspace layout is a
  contract, so cpp's forward followed by Triton's backward (under the interpreter on CPU) equals cpp's own
  backward, and the other way round.
- ``torch.library.opcheck`` on every ``torch.ops.fastseq_cpp`` operator (schema, fake implementation, dispatch).
- Strides, inference without workspace, empty sequences, NaN/Inf.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

import fastseq
from fastseq import dispatch, reference
from fastseq.check import rel_err, tolerance

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPP = dispatch.backends()["cpp"]["available"]
needs_cpp = pytest.mark.skipif(not CPP, reason=f"backend 'cpp' unavailable: {dispatch.backends()['cpp']['reason']}")
NUM_GATES = {"lstm": 4, "gru": 3, "rnn": 1}
KINDS = ["lstm", "gru", "rnn_tanh", "rnn_relu"]


def _should_be_built() -> bool:
    """A source checkout installed with a C++ compiler and without FASTSEQ_NO_EXTENSION builds fastseq._C."""
    return (os.path.exists(os.path.join(REPO, "csrc", "cpu")) and shutil.which(os.environ.get("CXX", "c++")) is not None
            and os.environ.get("FASTSEQ_NO_EXTENSION", "0") in ("", "0"))


def test_cpp_backend_is_available_after_the_build():
    if not CPP and not _should_be_built():
        pytest.skip("no compiler or FASTSEQ_NO_EXTENSION: the extension is not expected here")
    info = fastseq.backends()["cpp"]
    assert info == {"available": True, "reason": None}, info
    import fastseq._C as C

    assert sorted(C.kernels("cpu")) == sorted(["lstm_cell", "gru_cell", "rnn_cell", "lstm_layer", "gru_layer",
                                               "rnn_layer"])
    cpu = torch.device("cpu")
    for op in C.kernels("cpu"):
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            assert dispatch.select(op, cpu, dtype, "cpp") == "cpp"
        with pytest.raises(fastseq.BackendUnavailableError, match="float64"):
            dispatch.select(op, cpu, torch.float64, "cpp")


# ---------------------------------------------------------------------------------------------------------
# Where the Triton launchers run here (for the cross-backend checks)
# ---------------------------------------------------------------------------------------------------------


def _triton_device():
    if not dispatch.backends()["triton"]["available"]:
        return None
    if torch.cuda.is_available() and not dispatch.TRITON_INTERPRET:
        return torch.device("cuda")
    return torch.device("cpu") if dispatch.TRITON_INTERPRET else None


TRITON_DEVICE = _triton_device()
needs_triton = pytest.mark.skipif(TRITON_DEVICE is None, reason="the Triton launchers cannot run here")


def _to(obj, device):
    if obj is None:
        return None
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    return type(obj)(_to(o, device) for o in obj)


def _close(a, b, dtype, what):
    """cpp against Triton on the same tensors: both accumulate in float32, in different orders, and round their
    low-precision outputs once; a layout mismatch would be far outside these bounds."""
    if a is None or b is None:
        assert a is None and b is None, what
        return
    a, b = a.cpu(), b.cpu()
    assert a.shape == b.shape and a.dtype == b.dtype, (what, a.shape, b.shape, a.dtype, b.dtype)
    if dtype == torch.float32:
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5, msg=what)
        return
    # Low precision: a rounding (for sums of rounded terms, a few) apart; Triton also feeds float16 (and, on a
    # GPU, bfloat16) products the state rounded to the input dtype, where cpp keeps it in float32.
    tol = 2e-3 if dtype == torch.float16 else 1.6e-2
    assert rel_err(a, b) <= tol, f"{what}: relative difference {rel_err(a, b):.3e} > {tol:.1e}"


# ---------------------------------------------------------------------------------------------------------
# Cells
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CellCase:
    kind: str
    B: int
    I: int
    H: int
    state: bool = True
    bias: bool = True
    dtype: torch.dtype = torch.float32

    @property
    def op(self):
        return self.kind.split("_")[0]

    @property
    def nonlinearity(self):
        return "relu" if self.kind == "rnn_relu" else "tanh"

    def __str__(self):
        return (f"{self.kind}-B{self.B}-I{self.I}-H{self.H}" + ("" if self.state else "-nostate") +
                ("" if self.bias else "-nobias") + "-" + str(self.dtype).removeprefix("torch."))


def cell_tensors(case: CellCase):
    G = NUM_GATES[case.op] * case.H
    dt = case.dtype
    x = torch.randn(case.B, case.I, dtype=dt)
    h = torch.randn(case.B, case.H, dtype=dt) if case.state else None
    c = torch.randn(case.B, case.H, dtype=dt) if case.state and case.op == "lstm" else None
    w_ih = (torch.randn(G, case.I) / case.I ** 0.5).to(dt)
    w_hh = (torch.randn(G, case.H) / case.H ** 0.5).to(dt)
    b_ih = torch.randn(G, dtype=dt) * 0.5 if case.bias else None
    b_hh = torch.randn(G, dtype=dt) * 0.5 if case.bias else None
    grad_h = torch.randn(case.B, case.H, dtype=dt)
    grad_c = torch.randn(case.B, case.H, dtype=dt) if case.op == "lstm" else None
    return x, h, c, w_ih, w_hh, b_ih, b_hh, grad_h, grad_c


def cell_reference(case: CellCase, x, h, c, w_ih, w_hh, b_ih, b_hh, grad_h, grad_c):
    """float64: outputs and the gradients of x, h, c and of the gate pre-activations (input and hidden side)."""
    f64 = torch.float64

    def leaf(t):
        return None if t is None else t.detach().to(f64).requires_grad_()

    x, w_ih, w_hh, b_ih, b_hh = (leaf(t) for t in (x, w_ih, w_hh, b_ih, b_hh))
    H = case.H
    h = leaf(h) if h is not None else torch.zeros(case.B, H, dtype=f64)
    c = leaf(c) if c is not None else torch.zeros(case.B, H, dtype=f64)
    if case.op == "lstm":
        outs = list(reference.lstm_cell(x, h, c, w_ih, w_hh, b_ih, b_hh))
        grads = [grad_h, grad_c]
    elif case.op == "gru":
        outs, grads = [reference.gru_cell(x, h, w_ih, w_hh, b_ih, b_hh)], [grad_h]
    else:
        outs, grads = [reference.rnn_cell(x, h, w_ih, w_hh, b_ih, b_hh, case.nonlinearity)], [grad_h]
    torch.autograd.backward(outs, [g.to(f64) for g in grads])
    result = {"h": outs[0].detach(), "dx": x.grad}
    if case.op == "lstm":
        result["c"] = outs[1].detach()
    if case.state:
        result["dh"] = h.grad
        if case.op == "lstm":
            result["dc"] = c.grad
    return result


def cell_ours(kernels, case: CellCase, x, h, c, w_ih, w_hh, b_ih, b_hh, grad_h, grad_c, ws=None):
    """The launchers of ``kernels`` (forward with workspace, backward from ``ws`` if given else its own)."""
    h_out, c_out, own_ws = kernels.launch_cell_fwd(case.op, x, h, c, w_ih, w_hh, b_ih, b_hh, True, case.nonlinearity)
    ws = own_ws if ws is None else ws
    dgx, dgh, dx, dh, dc = kernels.launch_cell_bwd(case.op, grad_h, grad_c, ws, h, c, w_ih, w_hh, True,
                                                   case.nonlinearity)
    result = {"h": h_out, "c": c_out, "ws": own_ws, "dgx": dgx, "dgh": dgh, "dx": dx, "dh": dh, "dc": dc}
    return {k: v for k, v in result.items() if v is not None}


CELL_CASES = [CellCase(kind, B, I, H, state, bias, dtype)
              for kind in KINDS
              for (B, I, H, state, bias, dtype) in [
                  (1, 1, 1, True, True, torch.float32),
                  (5, 19, 33, True, False, torch.float32),
                  (13, 40, 70, False, True, torch.float32),
                  (7, 9, 37, True, True, torch.bfloat16),
                  (3, 5, 66, True, True, torch.float16),
              ]]


@needs_cpp
@pytest.mark.parametrize("case", CELL_CASES, ids=str)
def test_cell_launchers_match_reference(case):
    from fastseq import cpp_kernels

    tensors = cell_tensors(case)
    ours = cell_ours(cpp_kernels, case, *tensors)
    ref = cell_reference(case, *tensors)
    B, H = case.B, case.H
    G = NUM_GATES[case.op] * H
    assert ours["h"].shape == (B, H) and ours["h"].dtype == case.dtype
    assert ours["ws"].shape == (B, {"lstm": 5, "gru": 4, "rnn": 1}[case.op] * H)
    assert ours["ws"].dtype == torch.float32 and ours["dgx"].shape == (B, G) and ours["dgx"].dtype == case.dtype
    assert (ours["dgh"] is ours["dgx"]) == (case.op != "gru")
    assert set(ours) - {"ws", "dgx", "dgh"} == set(ref)
    floor = {torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[case.dtype]
    for name, r in ref.items():
        assert rel_err(ours[name], r) <= floor, (name, rel_err(ours[name], r))


@needs_cpp
@needs_triton
@pytest.mark.parametrize("case", [c for c in CELL_CASES if c.B * c.H < 500], ids=str)
def test_cell_launchers_match_triton_and_share_the_workspace(case):
    """Same tensors through both backends: every result close, the workspaces alike, and each backend's
    backward on the other's workspace equal to its backward on its own."""
    from fastseq import cpp_kernels
    from fastseq.kernels import rnn_cell

    tensors = cell_tensors(case)
    cpp = cell_ours(cpp_kernels, case, *tensors)
    tri = {k: v.cpu() for k, v in cell_ours(rnn_cell, case, *_to(tensors, TRITON_DEVICE)).items()}
    assert set(cpp) == set(tri)
    for name in cpp:
        _close(cpp[name], tri[name], case.dtype, f"{case} {name}")
    cpp_on_tri = cell_ours(cpp_kernels, case, *tensors, ws=tri["ws"])
    tri_on_cpp = cell_ours(rnn_cell, case, *_to(tensors, TRITON_DEVICE), ws=cpp["ws"].to(TRITON_DEVICE))
    for name in ("dgx", "dgh", "dx", "dh", "dc"):
        if name in cpp:
            _close(cpp_on_tri[name], tri[name], case.dtype, f"{case} cpp backward on Triton's workspace: {name}")
            _close(tri_on_cpp[name], cpp[name], case.dtype, f"{case} Triton backward on cpp's workspace: {name}")


@needs_cpp
@pytest.mark.parametrize("kind", KINDS)
def test_cell_strided_inputs_give_the_same_numbers(kind):
    from fastseq import cpp_kernels

    case = CellCase(kind, 4, 9, 21)
    tensors = cell_tensors(case)
    strided = [None if t is None else t.t().contiguous().t() if t.dim() == 2 else t[None].expand(2, -1)[1]
               for t in tensors]
    assert not strided[0].is_contiguous()
    dense, views = cell_ours(cpp_kernels, case, *tensors), cell_ours(cpp_kernels, case, *strided)
    for name in dense:
        torch.testing.assert_close(dense[name], views[name], rtol=0, atol=0, msg=name)


@needs_cpp
@pytest.mark.parametrize("case", [CellCase(kind, 3, 10, 17, state, True, dtype) for kind in KINDS
                                  for state in (True, False) for dtype in (torch.float32, torch.float16)], ids=str)
def test_cell_direct_entry_points_are_the_operators(case):
    """fastseq._C.*_cell_fwd (what the launchers call) give torch.ops.fastseq_cpp.*_cell_fwd's bits."""
    import fastseq._C as C

    x, h, c, w_ih, w_hh, b_ih, b_hh, _, _ = cell_tensors(case)
    for save in (False, True):
        if case.op == "lstm":
            args = (x, h, c, w_ih, w_hh, b_ih, b_hh, save)
        else:
            args = (x, h, w_ih, w_hh, b_ih, b_hh, save) + ((case.nonlinearity,) if case.op == "rnn" else ())
        name = f"{case.op}_cell_fwd"
        direct, operator = getattr(C, name)(*args), getattr(torch.ops.fastseq_cpp, name)(*args)
        assert len(direct) == len(operator)
        for got, want in zip(direct, operator):
            torch.testing.assert_close(got, want, rtol=0, atol=0)


@needs_cpp
@pytest.mark.parametrize("kind", KINDS)
def test_cell_inference_writes_no_workspace_and_matches_training(kind):
    from fastseq import cpp_kernels

    case = CellCase(kind, 3, 10, 17)
    x, h, c, w_ih, w_hh, b_ih, b_hh, _, _ = cell_tensors(case)
    args = (case.op, x, h, c, w_ih, w_hh, b_ih, b_hh)
    training = cpp_kernels.launch_cell_fwd(*args, True, case.nonlinearity)
    inference = cpp_kernels.launch_cell_fwd(*args, False, case.nonlinearity)
    assert inference[2].numel() == 0 and training[2].numel() > 0
    for a, b in zip(inference[:2], training[:2]):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerCase:
    kind: str
    T: int
    B: int
    H: int
    D: int = 1
    P: int = 0
    packed: bool = False
    bias: bool = True
    dtype: torch.dtype = torch.float32

    @property
    def op(self):
        return self.kind.split("_")[0]

    @property
    def nonlinearity(self):
        return "relu" if self.kind == "rnn_relu" else "tanh"

    @property
    def hout(self):
        return self.P or self.H

    @property
    def G(self):
        return NUM_GATES[self.op] * self.H

    def __str__(self):
        flags = [f"D{self.D}", "packed" if self.packed else "", f"P{self.P}" if self.P else "",
                 "" if self.bias else "nobias", str(self.dtype).removeprefix("torch.")]
        return f"{self.kind}-T{self.T}-B{self.B}-H{self.H}-" + "-".join(f for f in flags if f)


@dataclass
class LayerTensors:
    gates_x: torch.Tensor
    h0: torch.Tensor
    c0: torch.Tensor | None
    w_hh: torch.Tensor
    b_hh: torch.Tensor | None
    w_hr: torch.Tensor | None
    batch_sizes: torch.Tensor | None
    grad_out: torch.Tensor
    grad_hn: torch.Tensor
    grad_cn: torch.Tensor | None


def layer_tensors(case: LayerCase) -> LayerTensors:
    dt, D, H, HO, G = case.dtype, case.D, case.H, case.hout, case.G
    batch_sizes = None
    if case.packed:  # non-increasing lengths including T and 1, in the packed (sorted) batch order
        lengths = sorted(torch.randint(1, case.T + 1, (case.B,)).tolist(), reverse=True)
        lengths[0] = case.T
        if case.B > 1:
            lengths[-1] = 1
        batch_sizes = torch.tensor([sum(n > t for n in lengths) for t in range(case.T)], dtype=torch.int64)
        gates_x = torch.randn(int(batch_sizes.sum()), D * G, dtype=dt)
    else:
        gates_x = torch.randn(case.T, case.B, D * G, dtype=dt)
    h0 = torch.randn(D, case.B, HO, dtype=dt)
    c0 = torch.randn(D, case.B, H, dtype=dt) if case.op == "lstm" else None
    w_hh = (torch.randn(D, G, HO) / HO ** 0.5).to(dt)
    b_hh = torch.randn(D, G, dtype=dt) * 0.5 if case.bias else None
    w_hr = (torch.randn(D, case.P, H) / H ** 0.5).to(dt) if case.P else None
    grad_out = torch.randn(*gates_x.shape[:-1], D * HO, dtype=dt)
    grad_hn = torch.randn_like(h0)
    grad_cn = torch.randn_like(c0) if c0 is not None else None
    return LayerTensors(gates_x, h0, c0, w_hh, b_hh, w_hr, batch_sizes, grad_out, grad_hn, grad_cn)


def strided(x):
    """The same values in a layout with no unit stride and the dims permuted (on the same device)."""
    if x is None:
        return None
    big = torch.zeros(*reversed(x.shape), 2, dtype=x.dtype, device=x.device)
    view = big[..., 0].permute(*reversed(range(x.dim())))
    view.copy_(x)
    return view


def strided_layer_tensors(t: LayerTensors) -> LayerTensors:
    return LayerTensors(*(v if k == "batch_sizes" else strided(v) for k, v in vars(t).items()))


def layer_ours(kernels, case: LayerCase, t: LayerTensors, ws=None) -> dict:
    """Forward (with workspace) and backward (from ``ws`` if given, else its own) through the launchers of
    ``kernels``, and the hidden-side weight gradients made from their results as the operator layer makes them."""
    out, h_n, c_n, own_ws = kernels.launch_layer_fwd(case.op, t.gates_x, t.h0, t.c0, t.w_hh, t.b_hh, t.w_hr,
                                                     t.batch_sizes, True, case.nonlinearity)
    ws = own_ws if ws is None else ws
    dgx, dgh, dh0, dc0, dht = kernels.launch_layer_bwd(case.op, t.grad_out, t.grad_hn, t.grad_cn, ws, t.w_hh,
                                                       t.w_hr, t.batch_sizes, case.nonlinearity)
    D, G, H, HO = case.D, case.G, case.H, case.hout
    layout = kernels.workspace_layout(case.op, H, case.P)
    rows = dgh.reshape(-1, D * G).float()
    dw_hh, db_hh, dw_hr = [], [], []
    for d in range(D):
        dg = rows[:, d * G:(d + 1) * G]
        dw_hh.append(dg.t() @ ws[d, :, layout["h_prev"]:layout["h_prev"] + HO].float())
        db_hh.append(dg.sum(0))
        if case.P:
            dw_hr.append(dht[d].t() @ ws[d, :, layout["m"]:layout["m"] + H])
    result = {"out": out, "h_n": h_n, "c_n": c_n, "ws": own_ws, "dgx": dgx, "dgh": dgh, "dh0": dh0, "dc0": dc0,
              "dht": dht, "dw_hh": torch.stack(dw_hh).to(case.dtype),
              "db_hh": torch.stack(db_hh).to(case.dtype) if case.bias else None,
              "dw_hr": torch.stack(dw_hr).to(case.dtype) if case.P else None}
    return {k: v for k, v in result.items() if v is not None}


def _layer_module(case: LayerCase, t: LayerTensors, dtype) -> nn.Module:
    """torch's layer whose input is ``gates_x`` itself: W_ih of direction d selects d's columns, b_ih = 0, so
    the gradient of its input is the gradient of ``gates_x``."""
    D, G = case.D, case.G
    kw = {"proj_size": case.P} if case.P else {}
    if case.op == "rnn":
        kw["nonlinearity"] = case.nonlinearity
    cls = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}[case.op]
    m = cls(D * G, case.H, bias=case.bias, bidirectional=D == 2, dtype=dtype, **kw)
    with torch.no_grad():
        for d, sfx in enumerate(("", "_reverse")[:D]):
            select = torch.zeros(G, D * G, dtype=dtype)
            select[:, d * G:(d + 1) * G] = torch.eye(G, dtype=dtype)
            getattr(m, f"weight_ih_l0{sfx}").copy_(select)
            getattr(m, f"weight_hh_l0{sfx}").copy_(t.w_hh[d])
            if case.bias:
                getattr(m, f"bias_ih_l0{sfx}").zero_()
                getattr(m, f"bias_hh_l0{sfx}").copy_(t.b_hh[d])
            if case.P:
                getattr(m, f"weight_hr_l0{sfx}").copy_(t.w_hr[d])
    return m


def layer_torch(case: LayerCase, t: LayerTensors, dtype, device="cpu") -> dict:
    """torch's module in ``dtype`` (float64: the reference) on the same tensors: outputs and gradients."""
    m = _layer_module(case, t, dtype).to(device)
    x = t.gates_x.detach().to(device, dtype).requires_grad_()
    h0 = t.h0.detach().to(device, dtype).requires_grad_()
    c0 = t.c0.detach().to(device, dtype).requires_grad_() if t.c0 is not None else None
    seq = x if t.batch_sizes is None else PackedSequence(x, t.batch_sizes)
    out, state = m(seq, h0 if c0 is None else (h0, c0))
    out = out if t.batch_sizes is None else out.data
    states = list(state) if isinstance(state, tuple) else [state]
    grads = [t.grad_out, t.grad_hn] + ([t.grad_cn] if c0 is not None else [])
    torch.autograd.backward([out] + states, [g.to(device, dtype) for g in grads])
    sfx = ("", "_reverse")[:case.D]
    result = {"out": out, "h_n": states[0], "dgx": x.grad, "dh0": h0.grad,
              "dw_hh": torch.stack([getattr(m, f"weight_hh_l0{s}").grad for s in sfx])}
    if c0 is not None:
        result.update({"c_n": states[1], "dc0": c0.grad})
    if case.bias:
        result["db_hh"] = torch.stack([getattr(m, f"bias_hh_l0{s}").grad for s in sfx])
    if case.P:
        result["dw_hr"] = torch.stack([getattr(m, f"weight_hr_l0{s}").grad for s in sfx])
    return result


LAYER_CASES = [LayerCase(kind, **shape) for kind in KINDS for shape in [
    dict(T=5, B=4, H=5, D=2, packed=True),
    dict(T=3, B=3, H=37, bias=False),
    dict(T=4, B=5, H=37, D=2, packed=True, dtype=torch.float16),
    dict(T=6, B=2, H=70, D=2, dtype=torch.bfloat16),
    dict(T=1, B=1, H=1, D=2),
    dict(T=7, B=70, H=5, packed=True, bias=False, dtype=torch.bfloat16),
    dict(T=9, B=33, H=130, D=2, packed=True),
]]
LAYER_CASES += [
    LayerCase("lstm", T=4, B=3, H=5, P=3, D=2, packed=True),
    LayerCase("lstm", T=3, B=2, H=37, P=3, D=2, dtype=torch.float16),
    LayerCase("lstm", T=5, B=3, H=40, P=33, D=1, packed=True, bias=False),
    LayerCase("lstm", T=6, B=9, H=64, P=20, D=2, dtype=torch.bfloat16),
]


@needs_cpp
@pytest.mark.parametrize("case", LAYER_CASES, ids=str)
def test_layer_launchers_match_reference_and_torch(case):
    """Every output and gradient (of gates_x, the initial states, W_hh, b_hh and W_hr) within twice torch's own
    error (same tensors, same dtype) of the float64 reference, plus the rounding floor."""
    from fastseq import cpp_kernels

    t = layer_tensors(case)
    ours = layer_ours(cpp_kernels, case, t)
    theirs, ref = layer_torch(case, t, case.dtype), layer_torch(case, t, torch.float64)
    D, H, G = case.D, case.H, case.G
    rows = t.gates_x.numel() // t.gates_x.shape[-1]
    assert ours["ws"].shape == (D, rows, cpp_kernels.workspace_layout(case.op, H, case.P)["width"])
    assert ours["dgx"].shape == t.gates_x.shape and ours["dgx"].is_contiguous() and ours["out"].is_contiguous()
    for name in ("out", "h_n", "c_n", "dgx", "dgh", "dh0", "dc0"):
        assert name not in ours or ours[name].dtype == case.dtype, name
    for v in ours.values():  # every element written (C++ allocations are not NaN-poisoned: finiteness is the check)
        assert bool(torch.isfinite(v).all())
    failures = []
    for name, r in ref.items():
        error, torch_error = rel_err(ours[name], r), rel_err(theirs[name], r)
        if not error <= tolerance(torch_error, case.dtype):
            failures.append(f"{name}: {error:.3e} > {tolerance(torch_error, case.dtype):.3e} (torch {torch_error:.3e})")
    assert not failures, f"{case}: " + "; ".join(failures)


@needs_cpp
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("D,packed", [(1, False), (1, True), (2, True)])
def test_layer_steps_split_across_threads_give_the_single_thread_bits(kind, D, packed):
    """Steps large enough (B·G·H ≥ 2²², rnn_layers.cpp) split their units across the threads a direction has (its
    own when D ≥ threads): every number is computed as on one thread, packed rows that stop advancing keep their
    state, and the result is the reference's."""
    from fastseq import cpp_kernels

    H = {"lstm": 256, "gru": 300}.get(kind.split("_")[0], 512)  # B·G·H just over 2²²
    case = LayerCase(kind, T=3, B=16, H=H, D=D, packed=packed)
    t = layer_tensors(case)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = layer_ours(cpp_kernels, case, t)
        torch.set_num_threads(2 * D)  # 2 threads for each direction: each step split in two
        split = layer_ours(cpp_kernels, case, t)
    finally:
        torch.set_num_threads(threads)
    assert set(one) == set(split)
    for name in one:
        torch.testing.assert_close(split[name], one[name], rtol=0, atol=0, msg=name)
    theirs, ref = layer_torch(case, t, case.dtype), layer_torch(case, t, torch.float64)
    for name, r in ref.items():
        assert rel_err(split[name], r) <= tolerance(rel_err(theirs[name], r), case.dtype), name


@needs_cpp
@needs_triton
@pytest.mark.parametrize("case", [c for c in LAYER_CASES if c.T * c.H * c.D <= 300 and c.B <= 8], ids=str)
def test_layer_launchers_match_triton_and_share_the_workspace(case):
    from fastseq import cpp_kernels
    from fastseq.kernels import rnn_seq

    t = layer_tensors(case)
    t_dev = LayerTensors(*(_to(v, TRITON_DEVICE) if k != "batch_sizes" else v for k, v in vars(t).items()))
    cpp = layer_ours(cpp_kernels, case, t)
    tri = {k: v.cpu() for k, v in layer_ours(rnn_seq, case, t_dev).items()}
    assert set(cpp) == set(tri)
    for name in cpp:
        _close(cpp[name], tri[name], case.dtype, f"{case} {name}")
    cpp_on_tri = layer_ours(cpp_kernels, case, t, ws=tri["ws"])
    tri_on_cpp = {k: v.cpu() for k, v in layer_ours(rnn_seq, case, t_dev, ws=cpp["ws"].to(TRITON_DEVICE)).items()}
    for name in ("dgx", "dgh", "dh0", "dc0", "dht", "dw_hh", "db_hh", "dw_hr"):
        if name in cpp:
            _close(cpp_on_tri[name], tri[name], case.dtype, f"{case} cpp backward on Triton's workspace: {name}")
            _close(tri_on_cpp[name], cpp[name], case.dtype, f"{case} Triton backward on cpp's workspace: {name}")


@needs_cpp
@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn_tanh"])
@pytest.mark.parametrize("H", [5, 37])
def test_layer_any_strides_give_the_same_numbers(kind, H):
    from fastseq import cpp_kernels

    case = LayerCase(kind, T=3, B=2, H=H, D=2, P=4 if kind == "lstm" and H == 37 else 0)
    t = layer_tensors(case)
    views = strided_layer_tensors(t)
    dense, other = layer_ours(cpp_kernels, case, t), layer_ours(cpp_kernels, case, views)
    for name in dense:
        torch.testing.assert_close(dense[name], other[name], rtol=0, atol=0, msg=name)


@needs_cpp
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("P", [0, 3])
def test_layer_inference_writes_no_workspace_and_matches_training(kind, P):
    from fastseq import cpp_kernels

    if P and kind != "lstm":
        pytest.skip("projection is LSTM-only")
    case = LayerCase(kind, T=4, B=3, H=7, D=2, P=P, packed=True)
    t = layer_tensors(case)
    args = (case.op, t.gates_x, t.h0, t.c0, t.w_hh, t.b_hh, t.w_hr, t.batch_sizes)
    training = cpp_kernels.launch_layer_fwd(*args, True, case.nonlinearity)
    inference = cpp_kernels.launch_layer_fwd(*args, False, case.nonlinearity)
    assert inference[3].numel() == 0 and training[3].numel() > 0
    for a, b in zip(inference[:3], training[:3]):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=0, atol=0)


@needs_cpp
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn"])
def test_layer_empty_sequence_or_batch(kind, packed):
    from fastseq import cpp_kernels

    D, H = 2, 4
    G = NUM_GATES[kind] * H
    for T, B in ([(0, 3)] if packed else [(0, 3), (4, 0)]):
        gx = torch.randn((0, D * G) if packed else (T, B, D * G))
        batch_sizes = torch.zeros(0, dtype=torch.int64) if packed else None
        h0, c0 = torch.randn(D, B, H), torch.randn(D, B, H) if kind == "lstm" else None
        w_hh = torch.randn(D, G, H)
        out, h_n, c_n, ws = cpp_kernels.launch_layer_fwd(kind, gx, h0, c0, w_hh, None, None, batch_sizes, True)
        assert out.shape == (*gx.shape[:-1], D * H) and ws.shape[1] == 0
        torch.testing.assert_close(h_n, h0, rtol=0, atol=0)
        if c0 is not None:
            torch.testing.assert_close(c_n, c0, rtol=0, atol=0)
        dgx, dgh, dh0, dc0, dht = cpp_kernels.launch_layer_bwd(kind, torch.randn_like(out), h0 * 2, c0, ws, w_hh,
                                                               None, batch_sizes)
        assert dgx.shape == gx.shape and dht is None
        torch.testing.assert_close(dh0, h0 * 2, rtol=0, atol=0)
        if c0 is not None:
            torch.testing.assert_close(dc0, c0, rtol=0, atol=0)


@needs_cpp
@pytest.mark.parametrize("kind", KINDS)
def test_layer_nan_and_inf_propagate(kind):
    """A NaN in one row's gate input makes that row NaN from that step on, and no other row; an infinite gate
    input saturates its gate as a huge finite one does (relu passes it on)."""
    from fastseq import cpp_kernels

    case = LayerCase(kind, T=3, B=3, H=6)
    t = layer_tensors(case)

    def run(gates_x):
        return cpp_kernels.launch_layer_fwd(case.op, gates_x, t.h0, t.c0, t.w_hh, t.b_hh, None, None, True,
                                            case.nonlinearity)

    gx = t.gates_x.clone()
    gx[1, 0, 0] = float("nan")
    out, h_n, c_n, ws = run(gx)
    assert bool(torch.isnan(out[1:, 0]).any(-1).all()) and bool(torch.isnan(h_n[0, 0]).any())
    assert bool(torch.isfinite(out[:, 1:]).all()) and bool(torch.isfinite(out[0]).all())
    for sign in (1, -1):
        inf, huge = t.gates_x.clone(), t.gates_x.clone()
        inf[1, 2, 1], huge[1, 2, 1] = sign * float("inf"), sign * 1e30
        out_inf, out_huge = run(inf)[0], run(huge)[0]
        torch.testing.assert_close(out_inf[:, :2], out_huge[:, :2], rtol=0, atol=0)
        if kind == "rnn_relu" and sign > 0:
            assert bool(torch.isinf(out_inf[1, 2, 1]))
        else:
            torch.testing.assert_close(out_inf, out_huge, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------
# bfloat16 through the modules, larger sizes: torch's CPU layers and cells take bfloat16
# ---------------------------------------------------------------------------------------------------------


@needs_cpp
@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn"])
def test_bfloat16_modules_within_twice_torchs_error(kind):
    from fastseq.check import compare_cell, compare_layer, make_cells, make_inputs, make_layers, _layer_states

    dtype = torch.bfloat16
    layer = {"lstm": "lstm_layer", "gru": "gru_layer", "rnn": "rnn_layer_tanh"}[kind]
    ours, theirs = make_layers(layer, 24, 64, dtype, torch.device("cpu"), "cpp", num_layers=2, bidirectional=True)
    x = torch.randn(16, 8, 24, dtype=dtype)
    states = _layer_states(theirs, 8, dtype, torch.device("cpu"))
    failures = [c for c in compare_layer(layer, ours, theirs, x, states, dtype) if not c.ok]
    assert not failures, failures
    cell = {"lstm": "lstm_cell", "gru": "gru_cell", "rnn": "rnn_cell_tanh"}[kind]
    ours, theirs = make_cells(cell, 24, 96, True, dtype, torch.device("cpu"), "cpp")
    x, state = make_inputs(cell, 16, 24, 96, dtype, torch.device("cpu"), True)
    failures = [c for c in compare_cell(cell, ours, theirs, x, state, dtype) if not c.ok]
    assert not failures, failures


# ---------------------------------------------------------------------------------------------------------
# opcheck on every operator
# ---------------------------------------------------------------------------------------------------------


def _opcheck_samples():
    """(operator name, args) pairs covering optional arguments absent and present, packed and padded."""
    B, I, H, D, T = 3, 5, 4, 2, 3
    samples = []
    for kind, k in (("lstm", 5), ("gru", 4), ("rnn", 1)):
        G = NUM_GATES[kind] * H
        x, h, c = torch.randn(B, I), torch.randn(B, H), torch.randn(B, H)
        w_ih, w_hh, b = torch.randn(G, I), torch.randn(G, H), torch.randn(G)
        gh = torch.randn(B, H)
        for state in (True, False):
            hs = h if state else None
            if kind == "lstm":
                samples.append(("lstm_cell_fwd", (x, hs, c if state else None, w_ih, w_hh, b, None, True)))
                ws = torch.randn(B, k * H)
                samples.append(("lstm_cell_bwd", (gh, torch.randn(B, H), ws, hs, c if state else None, w_ih, w_hh,
                                                  state)))
            elif kind == "gru":
                samples.append(("gru_cell_fwd", (x, hs, w_ih, w_hh, None, b, state)))
                samples.append(("gru_cell_bwd", (gh, torch.randn(B, k * H), hs, w_ih, w_hh, True)))
            else:
                samples.append(("rnn_cell_fwd", (x, hs, w_ih, w_hh, b, b, True, "relu" if state else "tanh")))
                samples.append(("rnn_cell_bwd", (gh, torch.randn(B, k * H), state, w_ih, w_hh, not state, "tanh")))
        batch_sizes = torch.tensor([3, 2, 1])
        for packed in (False, True):
            for proj in ((0, 2) if kind == "lstm" else (0,)):
                HO = proj or H
                gx = torch.randn(6, D * G) if packed else torch.randn(T, B, D * G)
                bs = batch_sizes if packed else None
                h0, c0 = torch.randn(D, B, HO), torch.randn(D, B, H)
                whh = torch.randn(D, G, HO) * 0.3
                whr = torch.randn(D, proj, H) if proj else None
                rows = gx.shape[0] if packed else T * B
                width = fastseq.cpp_kernels.workspace_layout(kind, H, proj)["width"] if CPP else 0
                go = torch.randn(*gx.shape[:-1], D * HO)
                ws = torch.randn(D, rows, width)
                if kind == "lstm":
                    samples.append(("lstm_layer_fwd", (gx, h0, c0, whh, torch.randn(D, G), whr, bs, True)))
                    samples.append(("lstm_layer_bwd", (go, torch.randn(D, B, HO), torch.randn(D, B, H), ws, whh, whr,
                                                       bs)))
                elif kind == "gru":
                    samples.append(("gru_layer_fwd", (gx, h0, whh, None, bs, not packed)))
                    samples.append(("gru_layer_bwd", (go, torch.randn(D, B, HO), ws, whh, bs)))
                else:
                    samples.append(("rnn_layer_fwd", (gx, h0, whh, torch.randn(D, G), bs, True, "relu")))
                    samples.append(("rnn_layer_bwd", (go, torch.randn(D, B, HO), ws, whh, bs, "tanh")))
    return samples


@needs_cpp
def test_opcheck_every_operator():
    import fastseq.cpp_kernels  # noqa: F401  (registers the fake implementations)

    samples = _opcheck_samples()
    assert {name for name, _ in samples} == {f"{k}_{w}_{p}" for k in ("lstm", "gru", "rnn") for w in ("cell", "layer")
                                             for p in ("fwd", "bwd")}
    for name, args in samples:
        op = getattr(torch.ops.fastseq_cpp, name).default
        torch.library.opcheck(op, args)


@needs_cpp
def test_operators_check_dtypes_and_shapes():
    with pytest.raises(RuntimeError, match="float32, float16 or bfloat16"):
        torch.ops.fastseq_cpp.rnn_cell_fwd(torch.randn(2, 3, dtype=torch.float64), None,
                                           torch.randn(4, 3, dtype=torch.float64),
                                           torch.randn(4, 4, dtype=torch.float64), None, None, False, "tanh")
    with pytest.raises(RuntimeError, match="Unknown nonlinearity"):
        torch.ops.fastseq_cpp.rnn_cell_fwd(torch.randn(2, 3), None, torch.randn(4, 3), torch.randn(4, 4), None, None,
                                           False, "gelu")
    with pytest.raises(RuntimeError, match="weight shapes"):
        torch.ops.fastseq_cpp.gru_cell_fwd(torch.randn(2, 3), None, torch.randn(12, 3), torch.randn(8, 4), None,
                                           None, False)
    with pytest.raises(RuntimeError, match="c must be"):
        torch.ops.fastseq_cpp.lstm_cell_fwd(torch.randn(2, 3), torch.randn(2, 4), torch.randn(2, 5), torch.randn(16, 3),
                                            torch.randn(16, 4), None, None, False)
    with pytest.raises(RuntimeError, match="batch_sizes sum"):
        torch.ops.fastseq_cpp.gru_layer_fwd(torch.randn(5, 12), torch.randn(1, 3, 4), torch.randn(1, 12, 4), None,
                                            torch.tensor([3, 1]), True)
