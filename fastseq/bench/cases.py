"""The cases of the benchmark: for one :class:`~fastseq.bench.presets.Spec`, the tensors every implementation
shares, the callables to time, their errors against the float64 reference, and the work (FLOPs, bytes, calls)
that the floor is made of.

Every implementation of a case runs on the *same* tensors: torch's module and a fastseq module holding the very
same ``Parameter`` objects (built on the meta device, then handed torch's parameters), the same input, states and
upstream gradients. A timed callable returns a dict of named results: the outputs (``fwd``), or the outputs and
the gradient of every input, state and parameter (``bwd``, ``fwd+bwd``).

Errors are ``‖out − ref‖ / ‖ref‖`` against :mod:`fastseq.reference` in float64 on the same numbers
(:func:`fastseq.check.rel_err`), for fastseq and for torch, and SPEC.md's rule (:func:`fastseq.check.tolerance`:
at most twice torch's error plus a rounding floor) gives the verdict. Where the float64 reference of the whole case
would cost more than :data:`REFERENCE_BUDGET_FLOPS`, the recurrences are checked on their first batch rows (rows
are independent, so their outputs, states and input gradients are exact there; parameter gradients, which sum over
all rows, are then not checked), and attention on the first batch element's first query rows (outputs only).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import fastseq
from fastseq import reference
from fastseq.bench.presets import CELL_OPS, LAYER_OPS, Spec
from fastseq.check import rel_err

# float64 reference work allowed per case before it is subsampled (CPU: seconds; GPU: well under a second).
REFERENCE_BUDGET_FLOPS = {"cpu": 4e9, "cuda": 2e12}
GATES = {"lstm": 4, "gru": 3, "rnn": 1}
_TORCH_CELLS = {"lstm_cell": nn.LSTMCell, "gru_cell": nn.GRUCell, "rnn_cell": nn.RNNCell}
_FAST_CELLS = {"lstm_cell": fastseq.LSTMCell, "gru_cell": fastseq.GRUCell, "rnn_cell": fastseq.RNNCell}
_TORCH_LAYERS = {"lstm_layer": nn.LSTM, "gru_layer": nn.GRU, "rnn_layer": nn.RNN}
_FAST_LAYERS = {"lstm_layer": fastseq.LSTM, "gru_layer": fastseq.GRU, "rnn_layer": fastseq.RNN}


def _sharing_parameters(fast_cls, like: nn.Module, backend: str, **kwargs) -> nn.Module:
    """A fastseq module holding the very ``Parameter`` objects of torch's module ``like``."""
    module = fast_cls(device="meta", backend=backend, **kwargs)
    for name, p in like.named_parameters():
        setattr(module, name, p)  # the layers re-read their parameter list on every call
    return module.train(like.training)


def _grads(outs: list, leaves: list, grad_outs: list, retain: bool = False) -> list:
    return list(torch.autograd.grad(outs, leaves, grad_outs, retain_graph=retain, allow_unused=True))


class Case:
    """What every family shares: the spec, the device, the mode's callables and the comparison."""

    spec: Spec
    device: torch.device
    leaves: list  # tensors whose gradients are compared, named by ``leaf_names``
    leaf_names: list

    def __init__(self, spec: Spec, device: torch.device, seed: int):
        self.spec, self.device = spec, device
        self.dtype = getattr(torch, spec.dtype)
        self.training = spec.mode != "fwd"
        torch.manual_seed(seed)

    # -- implementations ------------------------------------------------------------------------------------

    def implementations(self, backends: list[str]) -> dict:
        """``{name: callable or the reason it cannot run}``: torch first, then each fastseq backend."""
        impls = {"torch": self.callable(self.torch_impl())}
        for b in backends:
            try:
                fastseq.dispatch.select(self.spec.op, self.device, self.dtype, b)
            except fastseq.BackendUnavailableError as e:
                impls[b] = str(e)
                continue
            impls[b] = self.callable(self.fastseq_impl(b))
        return impls

    def callable(self, forward):
        """The timed callable of the mode around ``forward`` (a function returning ``{name: output}``)."""
        if self.spec.mode == "fwd":
            def run():
                with torch.no_grad():
                    return forward()
            return run
        if self.spec.mode == "fwd+bwd":
            def run():
                outs = forward()
                names = list(outs)
                grads = _grads([outs[n] for n in names], self.leaves, self.grad_outs(outs, names))
                return {**{n: o.detach() for n, o in outs.items()}, **dict(zip(self.leaf_names, grads))}
            return run
        # "bwd": the forward is recorded once, here; the callable runs the backward over it again and again
        outs = forward()
        names = list(outs)
        grad_outs = self.grad_outs(outs, names)

        def run():
            grads = _grads([outs[n] for n in names], self.leaves, grad_outs, retain=True)
            return {**{n: o.detach() for n, o in outs.items()}, **dict(zip(self.leaf_names, grads))}
        return run

    def grad_outs(self, outs: dict, names: list) -> list:
        """Upstream gradients, the same random numbers for every implementation (drawn once per output)."""
        if not hasattr(self, "_grad_outs"):
            g = torch.Generator(device="cpu").manual_seed(1234)
            self._grad_outs = {n: torch.randn(outs[n].shape, generator=g, dtype=torch.float32).to(
                self.device, outs[n].dtype) for n in names}
        return [self._grad_outs[n] for n in names]

    # -- errors -------------------------------------------------------------------------------------------------

    def errors(self, result: dict) -> dict:
        """Relative errors of ``result`` against the reference: the worst output and the worst gradient, and the
        name of the worst of all; ``None`` values where a quantity is missing or not finite."""
        ref, rows = self.reference()
        if ref is None:
            return {"err_out": None, "err_grad": None, "worst": None, "checked": rows}
        errs = {}  # a missing, misshapen or non-finite result counts as an infinite error
        for name, r in ref.items():
            ours = result.get(name)
            if ours is None:
                errs[name] = math.inf
                continue
            ours = self.restrict(name, ours)
            ok = ours.shape == r.shape and bool(torch.isfinite(ours).all() or not torch.isfinite(r).all())
            errs[name] = rel_err(ours, r) if ok else math.inf
        outs = [v for n, v in errs.items() if not n.startswith("grad")]
        grads = [v for n, v in errs.items() if n.startswith("grad")]
        worst = max(errs, key=lambda n: math.inf if math.isnan(errs[n]) else errs[n])
        return {"err_out": _worst(outs), "err_grad": _worst(grads) if grads else None, "worst": worst,
                "checked": rows}

    def restrict(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """``t`` cut to what the reference covers (all of it unless the reference was subsampled)."""
        return t

    def reference(self):
        if not hasattr(self, "_reference"):
            self._reference = self.compute_reference()
        return self._reference

    # -- work --------------------------------------------------------------------------------------------------

    def work(self) -> dict:
        """``{"flops", "bytes", "calls", "steps"}`` of one timed call: FLOPs of the products, the fewest bytes the
        call must move through memory, the fewest separate calls, and the sequential steps (µs per step)."""
        fwd = self.forward_work()
        # the backward: twice the forward's products (data and weight gradients), 2.5× for attention (the
        # scores are recomputed); twice its bytes
        bwd_flops = 2.5 if self.spec.op == "sdpa" else 2.0
        flops, nbytes, calls = {"fwd": (1.0, 1.0, 1), "bwd": (bwd_flops, 2.0, 1),
                                "fwd+bwd": (1.0 + bwd_flops, 3.0, 2)}[self.spec.mode]
        return {"flops": fwd["flops"] * flops, "bytes": fwd["bytes"] * nbytes, "calls": fwd["calls"] * calls,
                "steps": fwd["steps"]}


def _worst(values: list) -> float | None:
    """The largest error (``inf`` where one is NaN), ``None`` where there is none."""
    if not values:
        return None
    return math.inf if any(math.isnan(v) for v in values) else max(values)


def _reference_rows(batch: int, flops_per_row: float, device: torch.device) -> int:
    """How many batch rows the float64 reference can afford (all of them, or at least one)."""
    budget = REFERENCE_BUDGET_FLOPS.get(device.type, REFERENCE_BUDGET_FLOPS["cpu"])
    return max(1, min(batch, int(budget // max(flops_per_row, 1.0))))


# ---------------------------------------------------------------------------------------------------------
# Cells: a decoder loop
# ---------------------------------------------------------------------------------------------------------


class CellCase(Case):
    """A cell stepped ``T`` times, its state fed back, inputs ``x_1 … x_T`` given (teacher forcing). Outputs:
    every step's ``h`` (and the final ``c`` of an LSTM)."""

    def __init__(self, spec: Spec, device: torch.device, seed: int):
        super().__init__(spec, device, seed)
        self.kind = spec.op.removesuffix("_cell")
        B, H, T = spec.size("batch"), spec.size("hidden"), spec.size("steps")
        self.module = _TORCH_CELLS[spec.op](H, H, device=device, dtype=self.dtype)

        def leaf(*shape):
            return torch.randn(*shape, device=device, dtype=self.dtype).requires_grad_(self.training)

        self.xs = [leaf(B, H) for _ in range(T)]
        self.h0 = leaf(B, H)
        self.c0 = leaf(B, H) if self.kind == "lstm" else None
        params = list(self.module.parameters())
        self.leaves = [*params, *self.xs, self.h0] + ([self.c0] if self.c0 is not None else [])
        self.leaf_names = ([f"grad {n}" for n, _ in self.module.named_parameters()]
                           + [f"grad x[{t}]" for t in range(T)] + ["grad h0"] + (["grad c0"] if self.c0 is not None
                                                                                  else []))

    def torch_impl(self):
        return self._loop(self.module)

    def fastseq_impl(self, backend: str):
        return self._loop(_sharing_parameters(_FAST_CELLS[self.spec.op], self.module, backend,
                                              **self._ctor()))

    def _ctor(self) -> dict:
        return {"input_size": self.module.input_size, "hidden_size": self.module.hidden_size}

    def _loop(self, cell):
        xs, h0, c0, lstm = self.xs, self.h0, self.c0, self.kind == "lstm"

        def forward():
            state = (h0, c0) if lstm else h0
            outs = {}
            for t, x in enumerate(xs):
                state = cell(x, state)
                outs[f"h[{t}]"] = state[0] if lstm else state
            if lstm:
                outs["c_T"] = state[1]
            return outs
        return forward

    def restrict(self, name: str, t: torch.Tensor) -> torch.Tensor:
        n = self._rows
        return t if name.startswith("grad weight") or name.startswith("grad bias") else t[:n]

    def compute_reference(self):
        B, H, T = (self.spec.size(k) for k in ("batch", "hidden", "steps"))
        per_row = 3 * T * 2 * GATES[self.kind] * H * 2 * H
        self._rows = n = _reference_rows(B, per_row, self.device)

        def d(t, grad):
            return None if t is None else t.detach()[:n].double().requires_grad_(grad)

        train = self.training
        params = [p.detach().double().requires_grad_(train and n == B) for p in self.module.parameters()]
        xs, h0, c0 = [d(x, train) for x in self.xs], d(self.h0, train), d(self.c0, train)
        w_ih, w_hh, b_ih, b_hh = params
        with torch.set_grad_enabled(train):
            h, c, outs = h0, c0, {}
            for t, x in enumerate(xs):
                if self.kind == "lstm":
                    h, c = reference.lstm_cell(x, h, c, w_ih, w_hh, b_ih, b_hh)
                elif self.kind == "gru":
                    h = reference.gru_cell(x, h, w_ih, w_hh, b_ih, b_hh)
                else:
                    h = reference.rnn_cell(x, h, w_ih, w_hh, b_ih, b_hh, self.module.nonlinearity)
                outs[f"h[{t}]"] = h
            if self.kind == "lstm":
                outs["c_T"] = c
        ref = {k: v.detach() for k, v in outs.items()}
        if train:
            names = list(outs)
            grad_outs = [g[:n].double() for g in self.grad_outs(outs, names)]
            leaves = ([*params] if n == B else []) + [*xs, h0] + ([c0] if c0 is not None else [])
            names_l = (self.leaf_names[:len(params)] if n == B else []) + self.leaf_names[len(params):]
            grads = _grads([outs[k] for k in names], leaves, grad_outs)
            ref.update({k: g for k, g in zip(names_l, grads)})
        return ref, f"{n} of {B} batch rows" + ("" if n == B or not train else "; parameter gradients not checked")

    def grad_outs(self, outs: dict, names: list) -> list:
        if not hasattr(self, "_grad_outs"):
            B, H = self.spec.size("batch"), self.spec.size("hidden")
            g = torch.Generator(device="cpu").manual_seed(1234)
            self._grad_outs = {k: torch.randn(B, H, generator=g).to(self.device, self.dtype) for k in outs}
        return [self._grad_outs[k] for k in names]

    def forward_work(self) -> dict:
        B, H, T = (self.spec.size(k) for k in ("batch", "hidden", "steps"))
        G, s = GATES[self.kind], self.dtype.itemsize
        state_words = (2 if self.kind == "lstm" else 1) * 2 * B * H  # read and written each step
        return {"flops": T * 2 * B * G * H * 2 * H,
                # every step is a call of its own: the weights stream in every step, the activations once
                "bytes": T * s * (2 * G * H * H + B * H + state_words),
                "calls": T, "steps": T}


# ---------------------------------------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------------------------------------


class LayerCase(Case):
    """A whole layer (stack) over a sequence, padded or packed; outputs ``out`` and the final states."""

    def __init__(self, spec: Spec, device: torch.device, seed: int):
        super().__init__(spec, device, seed)
        self.kind = spec.op.removesuffix("_layer")
        B, H, T = spec.size("batch"), spec.size("hidden"), spec.size("steps")
        self.layers, self.bidirectional = spec.option("layers", 1), spec.option("bidirectional", False)
        self.packed = spec.option("packed", False)
        self.module = _TORCH_LAYERS[spec.op](H, H, num_layers=self.layers, bidirectional=self.bidirectional,
                                             device=device, dtype=self.dtype)
        D = 2 if self.bidirectional else 1
        x = torch.randn(T, B, H, device=device, dtype=self.dtype)
        self.batch_sizes = None
        if self.packed:  # lengths spread over [T/4, T], sorted (the longest first)
            g = torch.Generator(device="cpu").manual_seed(seed)
            lo = max(1, T // 4)
            lengths = sorted(torch.randint(lo, T + 1, (B,), generator=g).tolist(), reverse=True)
            lengths[0] = T
            packed = pack_padded_sequence(x, torch.tensor(lengths), enforce_sorted=True)
            x, self.batch_sizes = packed.data, packed.batch_sizes
        self.x = x.detach().requires_grad_(self.training)
        self.states = [torch.randn(self.layers * D, B, H, device=device, dtype=self.dtype).requires_grad_(
            self.training) for _ in range(2 if self.kind == "lstm" else 1)]
        params = list(self.module.parameters())
        self.leaves = [*params, self.x, *self.states]
        self.leaf_names = ([f"grad {n}" for n, _ in self.module.named_parameters()] + ["grad input"]
                           + [f"grad state[{i}]" for i in range(len(self.states))])

    def torch_impl(self):
        return self._call(self.module)

    def fastseq_impl(self, backend: str):
        m = self.module
        return self._call(_sharing_parameters(_FAST_LAYERS[self.spec.op], m, backend, input_size=m.input_size,
                                              hidden_size=m.hidden_size, num_layers=m.num_layers,
                                              bidirectional=m.bidirectional))

    def _call(self, module):
        def forward():
            x = PackedSequence(self.x, self.batch_sizes) if self.packed else self.x
            out, final = module(x, tuple(self.states) if self.kind == "lstm" else self.states[0])
            finals = final if isinstance(final, tuple) else (final,)
            return {"output": out.data if self.packed else out,
                    **{f"final state[{i}]": f for i, f in enumerate(finals)}}
        return forward

    def restrict(self, name: str, t: torch.Tensor) -> torch.Tensor:
        n, B = self._rows, self.spec.size("batch")
        if n == B or name.startswith("grad weight") or name.startswith("grad bias"):
            return t
        return t[:, :n]  # (T, B, ·) and (L·D, B, ·) alike

    def compute_reference(self):
        B, H, T = (self.spec.size(k) for k in ("batch", "hidden", "steps"))
        D = 2 if self.bidirectional else 1
        per_row = 3 * T * self.layers * D * 2 * GATES[self.kind] * H * 2 * H
        self._rows = n = _reference_rows(B, per_row, self.device)
        if self.packed and n < B:
            return None, "not checked: the packed case's float64 reference is over the budget"
        train = self.training

        def d(t, rows_dim):
            t = t.detach()
            if n < B:
                t = t.narrow(rows_dim, 0, n)
            return t.double().requires_grad_(train)

        x, states = d(self.x, 1), [d(s, 1) for s in self.states]
        params = [p.detach().double().requires_grad_(train and n == B) for p in self.module.parameters()]
        per = len(params) // (self.layers * D)
        weights = [tuple(params[i:i + per]) for i in range(0, len(params), per)]
        options = dict(num_layers=self.layers, bidirectional=self.bidirectional,
                       batch_sizes=None if self.batch_sizes is None else self.batch_sizes.tolist())
        with torch.set_grad_enabled(train):
            if self.kind == "lstm":
                out, finals = reference.lstm_layer(x, tuple(states), weights, **options)
            elif self.kind == "gru":
                out, h = reference.gru_layer(x, states[0], weights, **options)
                finals = (h,)
            else:
                out, h = reference.rnn_layer(x, states[0], weights, nonlinearity=self.module.nonlinearity,
                                             **options)
                finals = (h,)
        outs = {"output": out, **{f"final state[{i}]": f for i, f in enumerate(finals)}}
        ref = {k: v.detach() for k, v in outs.items()}
        if train:
            names = list(outs)
            grad_outs = [self.restrict_rows(g, n).double() for g in self.grad_outs(outs, names)]
            leaves = ([*params] if n == B else []) + [x, *states]
            names_l = (self.leaf_names[:len(params)] if n == B else []) + self.leaf_names[len(params):]
            ref.update(zip(names_l, _grads([outs[k] for k in names], leaves, grad_outs)))
        return ref, f"{n} of {B} batch rows" + ("" if n == B or not train else "; parameter gradients not checked")

    def restrict_rows(self, t: torch.Tensor, n: int) -> torch.Tensor:
        return t if n == self.spec.size("batch") else t[:, :n]

    def grad_outs(self, outs: dict, names: list) -> list:
        if not hasattr(self, "_grad_outs"):
            # shapes from the full-size call (the reference may see fewer rows): one forward's shapes
            with torch.no_grad():
                full = self._call(self.module)()
            g = torch.Generator(device="cpu").manual_seed(1234)
            self._grad_outs = {k: torch.randn(v.shape, generator=g).to(self.device, self.dtype)
                               for k, v in full.items()}
        return [self._grad_outs[k] for k in names]

    def forward_work(self) -> dict:
        B, H, T = (self.spec.size(k) for k in ("batch", "hidden", "steps"))
        D, G, s = 2 if self.bidirectional else 1, GATES[self.kind], self.dtype.itemsize
        rows = self.x.shape[0] if self.packed else T * B  # time steps × active rows
        per_layer_flops = D * 2 * rows * G * H * (H + H)  # input projection + recurrence
        weights = D * G * H * (H + H)
        # per layer: its input read, its output written, its weights once (kept on chip across steps), states
        per_layer_bytes = s * (rows * H + rows * D * H + weights + 4 * D * B * H)
        return {"flops": self.layers * per_layer_flops, "bytes": self.layers * per_layer_bytes,
                "calls": self.layers, "steps": T * self.layers}


# ---------------------------------------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------------------------------------


class AttentionCase(Case):
    """``scaled_dot_product_attention(q, k, v, mask, dropout, causal, GQA)`` on ``(B, heads, L, E)`` tensors."""

    REF_QUERY_ROWS = 128

    def __init__(self, spec: Spec, device: torch.device, seed: int):
        super().__init__(spec, device, seed)
        B, Hq, L, S, E = (spec.size(k) for k in ("batch", "heads", "q_len", "kv_len", "head_dim"))
        Hk = spec.option("kv_heads", Hq)
        self.causal, self.dropout = spec.option("causal", False), spec.option("dropout", 0.0)
        self.gqa = Hk != Hq

        def leaf(*shape):
            return torch.randn(*shape, device=device, dtype=self.dtype).requires_grad_(self.training)

        self.q, self.k, self.v = leaf(B, Hq, L, E), leaf(B, Hk, S, E), leaf(B, Hk, S, E)
        self.mask = self._mask(spec.option("mask", "none"), B, Hq, L, S)
        self.leaves = [self.q, self.k, self.v]
        self.leaf_names = ["grad query", "grad key", "grad value"]

    def _mask(self, kind: str, B: int, Hq: int, L: int, S: int):
        if kind == "none":
            return None
        if kind == "padding":  # the last half of the keys of every batch element masked out
            keep = torch.ones(B, 1, 1, S, dtype=torch.bool, device=self.device)
            keep[..., S - S // 2:] = False
            return keep
        if kind == "bool":  # random, with one key per row kept so that no row is empty
            keep = torch.rand(B, 1, L, S, device=self.device) > 0.3
            rows = torch.arange(L, device=self.device)
            keep[:, :, rows, rows % S] = True
            return keep
        if kind == "float":
            return torch.randn(B, 1, L, S, device=self.device, dtype=self.dtype)
        raise ValueError(f"unknown mask kind {kind!r}")

    def _call(self, fn, **kw):
        def forward():
            return {"output": fn(self.q, self.k, self.v, attn_mask=self.mask, dropout_p=self.dropout,
                                 is_causal=self.causal, enable_gqa=self.gqa, **kw)}
        return forward

    def torch_impl(self):
        return self._call(F.scaled_dot_product_attention)

    def fastseq_impl(self, backend: str):
        return self._call(fastseq.scaled_dot_product_attention, backend=backend)

    def torch_sdpa_backends(self) -> dict:
        """On CUDA, torch's SDPA backends one at a time (``torch.nn.attention.sdpa_kernel``): names to
        callables."""
        from torch.nn.attention import SDPBackend, sdpa_kernel

        out = {}
        for name in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION"):
            backend = getattr(SDPBackend, name, None)
            if backend is None:
                continue
            inner = self.callable(self.torch_impl())

            def run(inner=inner, backend=backend):
                with sdpa_kernel(backend):
                    return inner()
            out[f"torch:{name.split('_')[0].lower()}"] = run
        return out

    def restrict(self, name: str, t: torch.Tensor) -> torch.Tensor:
        return t if self._full else t[:1, :, :self.REF_QUERY_ROWS]

    def compute_reference(self):
        B, Hq, L, S, E = (self.spec.size(k) for k in ("batch", "heads", "q_len", "kv_len", "head_dim"))
        if self.dropout > 0:
            return None, "not checked: dropout draws a different mask in every implementation"
        full_flops = 3 * 4 * B * Hq * L * S * E
        budget = REFERENCE_BUDGET_FLOPS.get(self.device.type, REFERENCE_BUDGET_FLOPS["cpu"])
        self._full = full_flops <= budget
        train = self.training and self._full

        def d(t, rows=None):
            if t is None:
                return None
            t = t.detach()
            if not self._full:
                t = t[:1]
                if rows is not None:
                    t = t[:, :, :rows] if t.size(2) > 1 else t
            return t.double().requires_grad_(train) if t.is_floating_point() else t

        q, k, v = d(self.q, self.REF_QUERY_ROWS), d(self.k), d(self.v)
        mask = d(self.mask, self.REF_QUERY_ROWS)
        with torch.set_grad_enabled(train):
            out = reference.scaled_dot_product_attention(q, k, v, mask, is_causal=self.causal,
                                                         enable_gqa=self.gqa)
        ref = {"output": out.detach()}
        if train:
            grad_out = self.grad_outs({"output": self.q.new_empty(out.shape)}, ["output"])[0].double()
            ref.update(zip(self.leaf_names, _grads([out], [q, k, v], [grad_out])))
        if self._full:
            return ref, "all"
        return ref, (f"outputs of batch element 0, first {min(L, self.REF_QUERY_ROWS)} of {L} query rows "
                     f"(gradients not checked: reference over budget)")

    def grad_outs(self, outs: dict, names: list) -> list:
        if not hasattr(self, "_grad_outs"):
            g = torch.Generator(device="cpu").manual_seed(1234)
            shape = (*self.q.shape[:-1], self.v.shape[-1])
            self._grad_outs = {"output": torch.randn(shape, generator=g).to(self.device, self.dtype)}
        return [self._grad_outs[n] for n in names]

    def forward_work(self) -> dict:
        B, Hq, L, S, E = (self.spec.size(k) for k in ("batch", "heads", "q_len", "kv_len", "head_dim"))
        Hk, s = self.spec.option("kv_heads", Hq), self.dtype.itemsize
        pairs = L * S
        if self.causal:  # top-left aligned: query i sees keys 0 … i
            pairs = sum(min(i + 1, S) for i in range(L)) if L <= 65536 else L * S / 2
        mask_bytes = 0 if self.mask is None else self.mask.numel() * self.mask.element_size()
        return {"flops": 4 * B * Hq * pairs * E,
                "bytes": s * (2 * B * Hq * L * E + 2 * B * Hk * S * E) + mask_bytes,
                "calls": 1, "steps": 1}


def build(spec: Spec, device: torch.device, seed: int = 0) -> Case:
    """The case of ``spec`` on ``device``, its tensors drawn from ``seed``."""
    if spec.op in CELL_OPS:
        return CellCase(spec, device, seed)
    if spec.op in LAYER_OPS:
        return LayerCase(spec, device, seed)
    if spec.op == "sdpa":
        return AttentionCase(spec, device, seed)
    raise ValueError(f"unknown op {spec.op!r}")
