#!/usr/bin/env python
"""CPU benchmark: fastseq's C++ kernels (backend "cpp") against torch's own CPU layers and cells, same parameters,
same tensors, float32.

For each case (kind, batch B, hidden H = input size; layers: ``--num-layers``, ``--bidirectional``, T = ``--steps``
time steps; cells: a decode loop of ``--cell-steps`` steps, each feeding its state back) torch's module and a
fastseq module holding equal parameters run on the same input, in the same process, timed with
``torch.utils.benchmark.Timer`` (``blocked_autorange``: the median of blocks of runs), torch and fastseq
alternating for ``--rounds`` rounds, so that a change in the machine's load hits both; reported is the median over
the rounds. Modes: ``fwd`` (forward under ``torch.no_grad()``) and ``fwd+bwd`` (forward, then
``torch.autograd.grad`` of the outputs with respect to the input, the initial state and every parameter). Reported
per case: torch's time, fastseq's and ``torch / fastseq`` (> 1: fastseq faster), with the threads torch uses and
the load average when the case ran. These ratios are what decides whether ``"auto"`` on CPU should pick "cpp".

    python benchmarks/bench_cpu.py                         # the default grid (a few minutes on 2 cores)
    python benchmarks/bench_cpu.py --targets               # issue 6's target shapes
    python benchmarks/bench_cpu.py --batch 8 --hidden 64 --kinds lstm --json out/cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
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
    p.add_argument("--cell-steps", type=int, default=1, help="steps of the cells' decode loop")
    p.add_argument("--num-layers", type=int, default=1, help="layers of the LSTM/GRU/RNN modules")
    p.add_argument("--bidirectional", action="store_true", help="bidirectional layers")
    p.add_argument("--rounds", type=int, default=3, help="alternating torch/fastseq rounds per measurement")
    p.add_argument("--targets", action="store_true",
                   help="issue 6's target shapes instead of the grid (other shape options are ignored)")
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


# Issue 6's targets: (kind, B, H, layer options) — cell decode loops at B = 1, H = 128 and B = 8, H = 512 (T = 16
# steps); GRU and LSTM layers, T = 200, H = 256, 1 and 2 layers, bidirectional, B = 1 and 8.
TARGETS = ([(kind, B, H, {"cell_steps": 16}) for kind in CELLS for B, H in ((1, 128), (8, 512))] +
           [(kind, B, 256, {"steps": 200, "num_layers": L, "bidirectional": True})
            for kind in ("lstm", "gru") for L in (1, 2) for B in (1, 8)])


def _cases(a: argparse.Namespace):
    """(kind, B, H, options) of every case to run."""
    if a.targets:
        return TARGETS
    options = {"steps": a.steps, "cell_steps": a.cell_steps, "num_layers": a.num_layers,
               "bidirectional": a.bidirectional}
    return [(kind, batch, hidden, options) for kind in a.kinds for hidden in a.hidden for batch in a.batch]


def _pair(kind: str, hidden: int, backend: str, num_layers: int = 1, bidirectional: bool = False, **_):
    """torch's module and a fastseq module holding equal parameters."""
    torch_cls, fast_cls = {**LAYERS, **CELLS}[kind]
    layer_options = {"num_layers": num_layers, "bidirectional": bidirectional} if kind in LAYERS else {}
    theirs = torch_cls(hidden, hidden, **layer_options)
    ours = fast_cls(hidden, hidden, backend=backend, **layer_options)
    ours.load_state_dict(theirs.state_dict())
    return theirs, ours


def _inputs(kind: str, batch: int, hidden: int, steps: int = 1, num_layers: int = 1, bidirectional: bool = False,
            **_):
    if kind in LAYERS:
        x = torch.randn(steps, batch, hidden)
        rows = num_layers * (2 if bidirectional else 1)
        h = torch.randn(rows, batch, hidden)
        state = (h, torch.randn(rows, batch, hidden)) if kind == "lstm" else h
    else:
        x = torch.randn(batch, hidden)
        h = torch.randn(batch, hidden)
        state = (h, torch.randn(batch, hidden)) if kind == "lstm_cell" else h
    return x, state


def _flat(out):
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for o in out for t in _flat(o)]


def _decode(module, x, state, cell_steps: int):
    """A cell stepped ``cell_steps`` times, each step's state fed back (the same input every step)."""
    for _ in range(cell_steps):
        state = module(x, state)
    return state


def _runner(module, kind: str, x, state, mode: str, cell_steps: int = 1, **_):
    def forward(x, state):
        return module(x, state) if kind in LAYERS else _decode(module, x, state, cell_steps)

    if mode == "fwd":
        def run():
            with torch.no_grad():
                return forward(x, state)
        return run
    xs = x.detach().requires_grad_()
    states = tuple(s.detach().requires_grad_() for s in (state if isinstance(state, tuple) else (state,)))
    st = states if isinstance(state, tuple) else states[0]
    leaves = [xs, *states, *module.parameters()]
    outs = _flat(forward(xs, st))
    grads = [torch.randn_like(o) for o in outs]

    def run():
        return torch.autograd.grad(_flat(forward(xs, st)), leaves, grads)
    return run


def _median(fn, min_time: float) -> float:
    return Timer(stmt="fn()", globals={"fn": fn}).blocked_autorange(min_run_time=min_time).median


def _compare(theirs, ours, rounds: int, min_time: float) -> tuple[float, float]:
    """Medians over ``rounds`` alternating measurements of torch's runner and fastseq's."""
    theirs(), ours()  # warm up (first calls allocate, build workspaces)
    t_torch, t_fast = [], []
    for _ in range(rounds):
        t_torch.append(_median(theirs, min_time))
        t_fast.append(_median(ours, min_time))
    return statistics.median(t_torch), statistics.median(t_fast)


def _describe(kind: str, options: dict) -> str:
    if kind in LAYERS:
        return f"T={options['steps']} L={options['num_layers']}" + (" bi" if options["bidirectional"] else "")
    return f"{options['cell_steps']} steps"


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    info = fastseq.backends()[a.backend]
    if not info["available"]:
        print(f"backend {a.backend!r} unavailable: {info['reason']}", file=sys.stderr)
        return 1
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fastseq backend={a.backend!r}, float32; "
          f"medians of {a.rounds} alternating rounds; ratio = torch / fastseq (> 1: fastseq faster)")
    header = (f"{'kind':<10} {'B':>3} {'H':>4} {'shape':<12} {'mode':<8} {'torch ms':>9} {'fastseq ms':>10} "
              f"{'ratio':>6} {'load':>5}")
    print(header)
    print("-" * len(header))
    rows = []
    for kind, batch, hidden, options in _cases(a):
        theirs, ours = _pair(kind, hidden, a.backend, **options)
        x, state = _inputs(kind, batch, hidden, **options)
        for mode in a.modes:
            t_torch, t_fast = _compare(_runner(theirs, kind, x, state, mode, **options),
                                       _runner(ours, kind, x, state, mode, **options), a.rounds, a.min_time)
            load = os.getloadavg()[0]
            row = dict(kind=kind, B=batch, H=hidden, mode=mode, torch_ms=t_torch * 1e3, fastseq_ms=t_fast * 1e3,
                       ratio=t_torch / t_fast, threads=torch.get_num_threads(), backend=a.backend, load=load,
                       **options)
            rows.append(row)
            print(f"{kind:<10} {batch:>3} {hidden:>4} {_describe(kind, options):<12} {mode:<8} "
                  f"{row['torch_ms']:>9.3f} {row['fastseq_ms']:>10.3f} {row['ratio']:>6.2f} {load:>5.1f}",
                  flush=True)
    if a.json:
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        with open(a.json, "w") as f:
            json.dump({"torch": torch.__version__, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
