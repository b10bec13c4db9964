#!/usr/bin/env python
"""CPU benchmark: fastseq's C++ kernels (backend "cpp") against torch's own CPU layers and cells, same parameters,
same tensors, float32.

For each case (kind, batch B, hidden H = input size, one layer, one direction, T = 64 steps for the layers; one
step for the cells) torch's module and a fastseq module holding equal parameters run on the same
input, in the same process, timed with ``torch.utils.benchmark.Timer`` (``blocked_autorange``: medians of blocks
of runs). Modes: ``fwd`` (forward under ``torch.no_grad()``) and ``fwd+bwd`` (forward, then ``torch.autograd.grad``
of the outputs with respect to the input, the initial state and every parameter). Reported per case: torch's
median, fastseq's median and ``torch / fastseq`` (> 1: fastseq faster), with the threads torch uses. These ratios
are what decides whether ``"auto"`` on CPU should pick "cpp".

    python benchmarks/bench_cpu.py                         # the default grid (about two minutes on 2 cores)
    python benchmarks/bench_cpu.py --batch 8 --hidden 64 --kinds lstm --json out/cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
from torch.utils.benchmark import Timer

import fastseq

LAYERS = {"lstm": (torch.nn.LSTM, fastseq.LSTM), "gru": (torch.nn.GRU, fastseq.GRU), "rnn": (torch.nn.RNN, fastseq.RNN)}
CELLS = {"lstm_cell": (torch.nn.LSTMCell, fastseq.LSTMCell), "gru_cell": (torch.nn.GRUCell, fastseq.GRUCell),
         "rnn_cell": (torch.nn.RNNCell, fastseq.RNNCell)}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--kinds", default="lstm,gru,rnn,lstm_cell,gru_cell,rnn_cell")
    p.add_argument("--batch", default="1,8,64")
    p.add_argument("--hidden", default="64,256")
    p.add_argument("--steps", type=int, default=64, help="sequence length T of the layers")
    p.add_argument("--modes", default="fwd,fwd+bwd")
    p.add_argument("--backend", default="cpp", help="the fastseq backend to time against torch")
    p.add_argument("--min-time", type=float, default=0.4, help="seconds of timing per measurement")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--json", default=None, help="also write the rows here")
    a = p.parse_args(argv)
    names = lambda s: [v for v in s.split(",") if v]  # noqa: E731
    a.kinds, a.modes = names(a.kinds), names(a.modes)
    a.batch, a.hidden = [int(v) for v in names(a.batch)], [int(v) for v in names(a.hidden)]
    return a


def _pair(kind: str, hidden: int, backend: str):
    """torch's module and a fastseq module holding equal parameters."""
    torch_cls, fast_cls = {**LAYERS, **CELLS}[kind]
    theirs = torch_cls(hidden, hidden)
    ours = fast_cls(hidden, hidden, backend=backend)
    ours.load_state_dict(theirs.state_dict())
    return theirs, ours


def _inputs(kind: str, batch: int, hidden: int, steps: int):
    if kind in LAYERS:
        x = torch.randn(steps, batch, hidden)
        h = torch.randn(1, batch, hidden)
        state = (h, torch.randn(1, batch, hidden)) if kind == "lstm" else h
    else:
        x = torch.randn(batch, hidden)
        h = torch.randn(batch, hidden)
        state = (h, torch.randn(batch, hidden)) if kind == "lstm_cell" else h
    return x, state


def _flat(out):
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for o in out for t in _flat(o)]


def _runner(module, kind: str, x, state, mode: str):
    if mode == "fwd":
        def run():
            with torch.no_grad():
                return module(x, state)
        return run
    xs = x.detach().requires_grad_()
    states = tuple(s.detach().requires_grad_() for s in (state if isinstance(state, tuple) else (state,)))
    st = states if isinstance(state, tuple) else states[0]
    leaves = [xs, *states, *module.parameters()]
    outs = _flat(module(xs, st))
    grads = [torch.randn_like(o) for o in outs]

    def run():
        return torch.autograd.grad(_flat(module(xs, st)), leaves, grads)
    return run


def _median(fn, min_time: float) -> float:
    fn()  # warm up (first call allocates, builds workspaces)
    return Timer(stmt="fn()", globals={"fn": fn}).blocked_autorange(min_run_time=min_time).median


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    info = fastseq.backends()[a.backend]
    if not info["available"]:
        print(f"backend {a.backend!r} unavailable: {info['reason']}", file=sys.stderr)
        return 1
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fastseq backend={a.backend!r}, float32, "
          f"T={a.steps} for layers; ratio = torch / fastseq (> 1: fastseq faster)")
    header = f"{'kind':<10} {'B':>3} {'H':>4} {'mode':<8} {'torch ms':>9} {'fastseq ms':>10} {'ratio':>6}"
    print(header)
    print("-" * len(header))
    rows = []
    for kind in a.kinds:
        for hidden in a.hidden:
            theirs, ours = _pair(kind, hidden, a.backend)
            for batch in a.batch:
                x, state = _inputs(kind, batch, hidden, a.steps)
                for mode in a.modes:
                    t_torch = _median(_runner(theirs, kind, x, state, mode), a.min_time)
                    t_fast = _median(_runner(ours, kind, x, state, mode), a.min_time)
                    row = dict(kind=kind, B=batch, H=hidden, T=a.steps if kind in LAYERS else 1, mode=mode,
                               torch_ms=t_torch * 1e3, fastseq_ms=t_fast * 1e3, ratio=t_torch / t_fast,
                               threads=torch.get_num_threads(), backend=a.backend)
                    rows.append(row)
                    print(f"{kind:<10} {batch:>3} {hidden:>4} {mode:<8} {row['torch_ms']:>9.3f} "
                          f"{row['fastseq_ms']:>10.3f} {row['ratio']:>6.2f}", flush=True)
    if a.json:
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        with open(a.json, "w") as f:
            json.dump({"torch": torch.__version__, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
