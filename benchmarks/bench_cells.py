#!/usr/bin/env python
"""Decoder-loop benchmark: fastseq's fused cells against torch.nn's cells, same tensors, same parameters.

What is timed is a seq2seq decoder loop: the cell is stepped ``T`` times, the state it returns fed back
as the next state (``(h, c)`` for LSTM, ``h`` for GRU/RNN); the inputs ``x_1 … x_T`` are given (teacher
forcing), one ``(B, I)`` tensor per step, ``I = H``. Modes:

- ``inference``: the loop under ``torch.no_grad()``.
- ``training``: the loop, then ``torch.autograd.grad`` of all ``T`` outputs (with fixed random output
  gradients) with respect to the parameters, the inputs and the initial state.

For every case, each fastseq kernel backend that can run it and torch's own module run on the *same* input
tensors and the *same* ``Parameter`` objects, in the same process, their measurements interleaved (rounds in
alternating order). On CUDA the timer is ``triton.testing.do_bench`` (CUDA events, L2 flushed before each
loop; samples pooled over the rounds, median and p20/p80 reported); in inference the loop is also captured
in a CUDA graph and the replay timed the same way (``+graph``: no host in the loop). On CPU (``--smoke``)
the timer is ``time.perf_counter`` and only proves that the script works.

Next to each time: the relative error ``‖out − ref‖ / ‖ref‖`` of the final state (and, in training, the worst
gradient) against ``fastseq.reference`` in float64 on the same numbers, for fastseq and for torch, and the
verdict of SPEC.md's rule (fastseq's error ≤ 2 × torch's + a rounding floor), so that a fast wrong kernel
shows as wrong. The exit status is non-zero when a case crashed or failed that rule (``--no-strict``: 0).

Writes ``results.json`` and ``results.md`` into ``--out`` (rewritten after every case, so an interrupted run
keeps what it measured).

    python benchmarks/bench_cells.py --out out/bench_cells                  # full grid, on a GPU
    TRITON_INTERPRET=1 python benchmarks/bench_cells.py --smoke --out /tmp/b  # tiny, on CPU
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)

CELLS = ("lstm", "gru", "rnn", "rnn_relu")
MODES = ("inference", "training")
OPS = {"lstm": "lstm_cell", "gru": "gru_cell", "rnn": "rnn_cell", "rnn_relu": "rnn_cell"}  # fastseq operators
SMOKE = {"batch": "2", "hidden": "16", "steps": 3}


def _ints(s: str) -> list[int]:
    return [int(v) for v in s.split(",") if v.strip()]


def _names(s: str) -> list[str]:
    return [v.strip() for v in s.split(",") if v.strip()]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Decoder-loop benchmark of fastseq's cells against torch.nn's.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available, else cpu)")
    p.add_argument("--cells", default="lstm,gru,rnn", help=f"comma list of {', '.join(CELLS)} (rnn = tanh)")
    p.add_argument("--batch", default=None, help="comma list of B (default 1,8,64,256; --smoke: 2)")
    p.add_argument("--hidden", default=None, help="comma list of H = input_size (default 128,256,512,1024; "
                                                  "--smoke: 16)")
    p.add_argument("--dtypes", default="float32,bfloat16", help="comma list of float32, bfloat16, float16")
    p.add_argument("--modes", default="inference,training", help="comma list of inference, training")
    p.add_argument("--steps", type=int, default=None, help="decoder steps T per loop (default 32; --smoke: 3)")
    p.add_argument("--backends", default=None,
                   help="fastseq backends to compare (default: every available kernel backend)")
    p.add_argument("--rep-ms", type=float, default=100.0,
                   help="measuring time per implementation and case, split over the rounds (CUDA)")
    p.add_argument("--warmup-ms", type=float, default=10.0, help="warm-up per do_bench call (CUDA)")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds per case")
    p.add_argument("--no-graph", action="store_true", help="skip the CUDA-graph replay of the inference loop")
    p.add_argument("--order", choices=("coverage", "grid"), default="coverage",
                   help="run order: 'coverage' runs the (H, B) corners of every cell/mode/dtype first and "
                        "interleaves the groups, so a spent --time-budget thins the grid evenly; results are "
                        "written in grid order either way")
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds; cases not started when it is spent are recorded as skipped")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads (default: unchanged; --smoke on CPU: 1, as torch's CPU thread "
                        "pool makes tiny ops erratic on small machines)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.path.join(REPO, "out", "bench_cells"), help="output folder")
    p.add_argument("--smoke", action="store_true",
                   help="tiny shapes that run on CPU under TRITON_INTERPRET=1 (sets it on CPU if unset)")
    p.add_argument("--no-strict", action="store_true", help="exit 0 even if a case crashed or failed numerics")
    a = p.parse_args(argv)
    if a.batch is None:
        a.batch = SMOKE["batch"] if a.smoke else "1,8,64,256"
    if a.hidden is None:
        a.hidden = SMOKE["hidden"] if a.smoke else "128,256,512,1024"
    if a.steps is None:
        a.steps = SMOKE["steps"] if a.smoke else 32
    a.cells, a.dtypes, a.modes = _names(a.cells), _names(a.dtypes), _names(a.modes)
    a.batch, a.hidden = _ints(a.batch), _ints(a.hidden)
    for c in a.cells:
        if c not in CELLS:
            p.error(f"--cells: unknown cell {c!r}; expected some of {', '.join(CELLS)}")
    for m in a.modes:
        if m not in MODES:
            p.error(f"--modes: unknown mode {m!r}; expected some of {', '.join(MODES)}")
    for d in a.dtypes:
        if d not in ("float32", "bfloat16", "float16"):
            p.error(f"--dtypes: unknown dtype {d!r}; expected some of float32, bfloat16, float16")
    if a.steps < 1 or a.rounds < 1:
        p.error("--steps and --rounds must be at least 1")
    return a


# ---------------------------------------------------------------------------------------------------------
# Statistics and timers
# ---------------------------------------------------------------------------------------------------------


def quantile(xs: list[float], q: float) -> float:
    """Linear-interpolation quantile (as ``torch.quantile``) of a non-empty list."""
    s = sorted(xs)
    pos = q * (len(s) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


class CudaTimer:
    """``triton.testing.do_bench``: CUDA events around each call, the L2 cache flushed before each call.
    Returns every sample, in ms per call."""

    name = "triton.testing.do_bench (CUDA events; L2 flushed before each loop)"

    def __init__(self, rep_ms: float, warmup_ms: float):
        import triton.testing

        self._do_bench = triton.testing.do_bench
        self.rep_ms, self.warmup_ms = rep_ms, warmup_ms

    def __call__(self, fn) -> list[float]:
        return list(self._do_bench(fn, warmup=self.warmup_ms, rep=self.rep_ms, return_mode="all"))


class CpuTimer:
    """Wall clock (``time.perf_counter``) per call, at least ``min_samples`` calls and about ``rep_ms``."""

    name = "time.perf_counter (CPU wall clock)"

    def __init__(self, rep_ms: float, min_samples: int = 3, max_samples: int = 1000):
        self.rep_ms, self.min_samples, self.max_samples = rep_ms, min_samples, max_samples

    def __call__(self, fn) -> list[float]:
        fn()  # warm-up
        times: list[float] = []
        end = time.perf_counter() + self.rep_ms / 1e3
        while len(times) < self.min_samples or (time.perf_counter() < end and len(times) < self.max_samples):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return times


# ---------------------------------------------------------------------------------------------------------
# The decoder loop
# ---------------------------------------------------------------------------------------------------------


def _torch_cell(torch, kind: str, size: int, hidden: int, device, dtype):
    if kind == "lstm":
        return torch.nn.LSTMCell(size, hidden, device=device, dtype=dtype)
    if kind == "gru":
        return torch.nn.GRUCell(size, hidden, device=device, dtype=dtype)
    nl = "relu" if kind == "rnn_relu" else "tanh"
    return torch.nn.RNNCell(size, hidden, nonlinearity=nl, device=device, dtype=dtype)


def _fastseq_cell(fastseq, kind: str, like, backend: str):
    """A fastseq cell holding the very ``Parameter`` objects of the torch cell ``like``."""
    size, hidden = like.input_size, like.hidden_size
    if kind == "lstm":
        cell = fastseq.LSTMCell(size, hidden, device="meta", backend=backend)
    elif kind == "gru":
        cell = fastseq.GRUCell(size, hidden, device="meta", backend=backend)
    else:
        cell = fastseq.RNNCell(size, hidden, nonlinearity=like.nonlinearity, device="meta", backend=backend)
    for name, p in like.named_parameters():
        setattr(cell, name, p)
    return cell


def decode(cell, lstm: bool, xs, h0, c0):
    """Step ``cell`` over ``xs`` feeding its state back. Returns ``(outputs h_1…h_T, final state tuple)``."""
    state = (h0, c0) if lstm else h0
    outs = []
    for x in xs:
        state = cell(x, state)
        outs.append(state[0] if lstm else state)
    return outs, (state if lstm else (state,))


def reference_decode(ref, kind: str, params, xs, h0, c0):
    """The same loop on ``fastseq.reference`` (float64 tensors in, float64 out)."""
    w_ih, w_hh, b_ih, b_hh = params
    h, c = h0, c0
    outs = []
    for x in xs:
        if kind == "lstm":
            h, c = ref.lstm_cell(x, h, c, w_ih, w_hh, b_ih, b_hh)
        elif kind == "gru":
            h = ref.gru_cell(x, h, w_ih, w_hh, b_ih, b_hh)
        else:
            h = ref.rnn_cell(x, h, w_ih, w_hh, b_ih, b_hh, "relu" if kind == "rnn_relu" else "tanh")
        outs.append(h)
    return outs, ((h, c) if kind == "lstm" else (h,))


def rel_err(torch, a, ref) -> float:
    from fastseq.check import rel_err as relative_error  # the one definition the tests use too

    return relative_error(a, ref)


GRAD_NAMES_BASE = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")


class Case:
    """The tensors of one case, shared by every implementation, and its float64 reference."""

    def __init__(self, torch, fastseq, kind, mode, batch, hidden, dtype, steps, device, seed):
        self.torch, self.kind, self.mode = torch, kind, mode
        self.lstm = kind == "lstm"
        torch.manual_seed(seed)
        self.module = _torch_cell(torch, kind, hidden, hidden, device, dtype)
        self.params = [self.module.weight_ih, self.module.weight_hh, self.module.bias_ih, self.module.bias_hh]
        train = mode == "training"
        mk = lambda *shape: torch.randn(*shape, device=device, dtype=dtype).requires_grad_(train)  # noqa: E731
        self.xs = [mk(batch, hidden) for _ in range(steps)]
        self.h0 = mk(batch, hidden)
        self.c0 = mk(batch, hidden) if self.lstm else None
        self.gys = [torch.randn(batch, hidden, device=device, dtype=dtype) for _ in range(steps)] if train else None
        self.leaves = [*self.params, *self.xs, self.h0] + ([self.c0] if self.lstm else [])
        self.grad_names = [*GRAD_NAMES_BASE, *(f"x[{t}]" for t in range(steps)), "h0"] + (
            ["c0"] if self.lstm else [])
        self._reference(fastseq)

    def _reference(self, fastseq) -> None:
        torch = self.torch
        import fastseq.reference as ref

        train = self.mode == "training"
        d = lambda t: None if t is None else t.detach().double().requires_grad_(train)  # noqa: E731
        params, xs, h0, c0 = [d(p) for p in self.params], [d(x) for x in self.xs], d(self.h0), d(self.c0)
        with torch.set_grad_enabled(train):
            outs, final = reference_decode(ref, self.kind, params, xs, h0, c0)
        self.ref_final = [t.detach() for t in final]
        self.ref_grads = None
        if train:
            leaves = [*params, *xs, h0] + ([c0] if self.lstm else [])
            self.ref_grads = torch.autograd.grad(outs, leaves, [g.double() for g in self.gys])

    def fn(self, cell):
        """The timed callable for ``cell``: returns ``(final state tuple, grads or None)``."""
        torch, lstm = self.torch, self.lstm
        xs, h0, c0, gys, leaves = self.xs, self.h0, self.c0, self.gys, self.leaves
        if self.mode == "inference":
            def run():
                with torch.no_grad():
                    return decode(cell, lstm, xs, h0, c0)[1], None
        else:
            def run():
                outs, final = decode(cell, lstm, xs, h0, c0)
                return final, torch.autograd.grad(outs, leaves, gys)
        return run

    def errors(self, result) -> dict:
        torch = self.torch
        final, grads = result
        out = {"err_out": max(rel_err(torch, a, r) for a, r in zip(final, self.ref_final))}
        if grads is not None:
            per = {n: rel_err(torch, g, r) for n, g, r in zip(self.grad_names, grads, self.ref_grads)}
            worst = max(per, key=lambda n: per[n] if not math.isnan(per[n]) else math.inf)
            out["err_grad"] = per[worst]
            out["err_grad_worst"] = worst
            out["err_grads"] = {n: per[n] for n in GRAD_NAMES_BASE + ("h0",)}
            out["err_grad_x_max"] = max(v for n, v in per.items() if n.startswith("x["))
        return out


def capture_graph(torch, run):
    """``run`` captured in a CUDA graph: ``(graph, static result)``; warmed up on a side stream first."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            run()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        result = run()
    return graph, result


# ---------------------------------------------------------------------------------------------------------
# Numerics rule (SPEC.md: at most about twice torch's own error, plus a rounding floor)
# ---------------------------------------------------------------------------------------------------------

def numerics_ok(fs: float, th: float, dtype: str) -> bool:
    import torch

    from fastseq.check import tolerance  # the rule and rounding floors of the tests and `fastseq check`

    if math.isnan(fs):
        return math.isnan(th)
    return fs <= tolerance(th, getattr(torch, dtype))


# ---------------------------------------------------------------------------------------------------------
# One case
# ---------------------------------------------------------------------------------------------------------


def _stats(samples_ms: list[float], steps: int) -> dict:
    us = [s * 1e3 for s in samples_ms]
    return {
        "n_samples": len(us),
        "loop_median_us": statistics.median(us), "loop_p20_us": quantile(us, 0.2), "loop_p80_us": quantile(us, 0.8),
        "step_median_us": statistics.median(us) / steps, "step_p20_us": quantile(us, 0.2) / steps,
        "step_p80_us": quantile(us, 0.8) / steps,
    }


def _short_error(e: BaseException) -> str:
    msg = f"{type(e).__name__}: {e}".strip()
    return msg if len(msg) <= 500 else msg[:500] + "…"


def run_case(torch, fastseq, args, timer, device, backends, kind, mode, dtype_name, batch, hidden) -> dict:
    from floor_cells import step_floor

    dtype = getattr(torch, dtype_name)
    case = {"cell": kind, "mode": mode, "dtype": dtype_name, "B": batch, "H": hidden, "I": hidden,
            "steps": args.steps, "impls": {}, "comparisons": []}
    try:
        f = step_floor(kind, batch, hidden, hidden, dtype_name)
        case["floor_fwd_h100_spec"] = {k: f[k] for k in ("t_mem_us", "t_mem_requested_us", "t_flop_us",
                                                      "floor_fastseq_us", "floor_torch_us", "bound")}
    except Exception as e:  # the floor is decoration: never let it stop a measurement
        case["floor_fwd_h100_spec"] = {"error": _short_error(e)}
    t_case = time.monotonic()
    c = Case(torch, fastseq, kind, mode, batch, hidden, dtype, args.steps, device, args.seed)

    # Implementations: torch's module and one fastseq cell per backend, all on c.params.
    cells = {"torch": c.module}
    for b in backends:
        cell = _fastseq_cell(fastseq, kind, c.module, b)
        try:
            fastseq.dispatch.select(OPS[kind], device, dtype, b)
        except fastseq.BackendUnavailableError as e:
            case["impls"][b] = {"status": "skipped", "reason": str(e)}
            continue
        cells[b] = cell

    runs = {}
    for name, cell in cells.items():
        run = c.fn(cell)
        rec = case["impls"].setdefault(name, {})
        try:
            result = run()  # also compiles the Triton kernels: outside any timing
            if device.type == "cuda":
                torch.cuda.synchronize()
            rec.update(c.errors(result))
            rec["status"] = "ok"
            runs[name] = run
        except Exception as e:
            rec.update(status="error", reason=_short_error(e), traceback=traceback.format_exc(limit=8))

    if device.type == "cuda" and mode == "inference" and not args.no_graph:
        for name in list(runs):
            gname = name + "+graph"
            rec = case["impls"].setdefault(gname, {})
            try:
                graph, static = capture_graph(torch, runs[name])
                graph.replay()
                torch.cuda.synchronize()
                rec.update(c.errors(static))
                rec["status"] = "ok"
                runs[gname] = graph.replay
            except Exception as e:
                rec.update(status="error", reason=_short_error(e), traceback=traceback.format_exc(limit=8))
                try:
                    torch.cuda.synchronize()
                except Exception:
                    pass

    # Interleaved timing: every implementation once per round, the order reversed every other round.
    samples = {name: [] for name in runs}
    order = list(runs)
    for r in range(args.rounds):
        for name in (order if r % 2 == 0 else order[::-1]):
            if case["impls"][name].get("status") != "ok":
                continue  # failed in an earlier round
            try:
                samples[name] += timer(runs[name])
            except Exception as e:
                rec = case["impls"][name]
                rec.update(status="error", reason=_short_error(e), traceback=traceback.format_exc(limit=8))
    for name, s in samples.items():
        if s and case["impls"][name].get("status") == "ok":
            case["impls"][name].update(_stats(s, args.steps))

    # Comparisons: each fastseq backend against torch, eager against eager and graph against graph.
    for b in backends:
        for suffix in ("", "+graph"):
            fs, th = case["impls"].get(b + suffix), case["impls"].get("torch" + suffix)
            if not fs or not th:
                continue
            cmp = {"fastseq": b + suffix, "baseline": "torch" + suffix}
            if "step_median_us" in fs and "step_median_us" in th:
                cmp["ratio"] = th["step_median_us"] / fs["step_median_us"]
            if "err_out" in fs and "err_out" in th:
                ok = numerics_ok(fs["err_out"], th["err_out"], dtype_name)
                if "err_grad" in fs and "err_grad" in th:
                    ok = ok and numerics_ok(fs["err_grad"], th["err_grad"], dtype_name)
                cmp["numerics_ok"] = ok
            elif fs.get("status") == "error":
                cmp["numerics_ok"] = False
            case["comparisons"].append(cmp)
    case["seconds"] = time.monotonic() - t_case
    return case


# ---------------------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------------------


def _git_rev() -> str | None:
    try:
        rev = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", REPO, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (rev + ("+dirty" if dirty else "")) if rev else None
    except Exception:
        return None


def meta_info(torch, triton, fastseq, args, device, timer, backends) -> dict:
    info = {
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "argv": sys.argv,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton.__version__,
        "fastseq": getattr(fastseq, "__version__", None),
        "fastseq_file": fastseq.__file__,
        "git": _git_rev(),
        "device_type": device.type,
        "triton_interpret": os.environ.get("TRITON_INTERPRET"),
        "fastseq_backends": fastseq.backends(),
        "compared_backends": backends,
        "allow_tf32_matmul": bool(torch.backends.cuda.matmul.allow_tf32),
        "timer": timer.name,
        "steps": args.steps, "rounds": args.rounds, "rep_ms": args.rep_ms, "warmup_ms": args.warmup_ms,
        "smoke": args.smoke, "torch_num_threads": torch.get_num_threads(),
        "floor_model": "benchmarks/floor_cells.py, H100 SXM spec-sheet numbers (not measured)",
    }
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(device_name=p.name, capability=f"{p.major}.{p.minor}", sm_count=p.multi_processor_count,
                    total_memory_gib=round(p.total_memory / 2**30, 1), cudnn=torch.backends.cudnn.version())
        try:
            info["cuda_driver"] = torch.cuda.driver_version() if hasattr(torch.cuda, "driver_version") else None
        except Exception:
            pass
    else:
        info["device_name"] = platform.processor() or platform.machine()
    return info


def _fmt_t(rec: dict) -> str:
    if "step_median_us" not in rec:
        return rec.get("status", "—") if rec else "—"
    return f"{rec['step_median_us']:.1f} ({rec['step_p20_us']:.1f}–{rec['step_p80_us']:.1f})"


def _fmt_e(rec: dict, key: str) -> str:
    v = rec.get(key) if rec else None
    return "—" if v is None else f"{v:.1e}"


def markdown(meta: dict, cases: list[dict]) -> str:
    L = ["# fastseq cells: decoder-loop benchmark", ""]
    keys = ["device_name", "capability", "sm_count", "torch", "torch_cuda", "triton", "python", "fastseq",
            "fastseq_file", "git", "triton_interpret", "allow_tf32_matmul", "timer", "steps", "rounds", "rep_ms",
            "smoke", "started", "elapsed_s"]
    for k in keys:
        if k in meta:
            L.append(f"- **{k}**: `{meta[k]}`")
    L.append("- **backends**: " + "; ".join(
        f"{n}: {'available' if v['available'] else 'unavailable (' + str(v['reason']) + ')'}"
        for n, v in meta["fastseq_backends"].items() if n not in ("auto", "torch")))
    L += ["",
          "Times are µs per decoder step (median over the pooled samples, p20–p80 in parentheses). "
          "`torch/fastseq` > 1 means fastseq is faster. Errors: ‖out − ref‖/‖ref‖ against float64 "
          "`fastseq.reference` on the same numbers (final state; in training also the worst gradient). "
          "`ok`: fastseq's errors ≤ 2 × torch's + the rounding floor of `fastseq.check.FLOOR`. The floor is the H100 SXM spec-sheet model "
          "of `benchmarks/floor_cells.py` (µs per inference step at fastseq's one launch; none is given for training), "
          "not a measurement. `+graph`: the inference loop captured once in a CUDA graph and replayed, "
          "against torch's loop captured the same way.",
          "",
          "| cell | mode | dtype | B | H | fastseq | torch µs/step | fastseq µs/step | torch/fastseq | "
          "err fastseq (out / grad) | err torch (out / grad) | numerics | floor µs |",
          "|---|---|---|---:|---:|---|---:|---:|---:|---|---|---|---:|"]
    for c in cases:
        head = f"| {c['cell']} | {c['mode']} | {c['dtype']} | {c['B']} | {c['H']} "
        floor = c.get("floor_fwd_h100_spec", {}).get("floor_fastseq_us") if c["mode"] == "inference" else None
        floor_s = "—" if floor is None else f"{floor:.2f}"
        if c.get("status") == "skipped":
            L.append(head + f"| — | skipped: {c.get('reason', '')} | | | | | | |")
            continue
        if c.get("status") == "error":
            L.append(head + f"| — | error: {c.get('reason', '')} | | | | | | |")
            continue
        shown = False
        for cmp in c["comparisons"]:
            fs, th = c["impls"][cmp["fastseq"]], c["impls"][cmp["baseline"]]
            ratio = "—" if "ratio" not in cmp else f"{cmp['ratio']:.3g}"
            verdict = {True: "ok", False: "**FAIL**", None: "—"}[cmp.get("numerics_ok")]
            fs_t = _fmt_t(fs) if fs.get("status") != "error" else f"error: {fs.get('reason', '')[:120]}"
            th_t = _fmt_t(th) if th.get("status") != "error" else f"error: {th.get('reason', '')[:120]}"
            L.append(head + f"| {cmp['fastseq']} | {th_t} | {fs_t} | {ratio} | "
                     f"{_fmt_e(fs, 'err_out')} / {_fmt_e(fs, 'err_grad')} | "
                     f"{_fmt_e(th, 'err_out')} / {_fmt_e(th, 'err_grad')} | {verdict} | {floor_s} |")
            shown = True
        if not shown:  # torch only (no fastseq backend could run it)
            th = c["impls"].get("torch", {})
            why = "; ".join(f"{n}: {r.get('reason', r.get('status'))}" for n, r in c["impls"].items()
                            if n != "torch" and r.get("status") != "ok") or "no fastseq backend compared"
            L.append(head + f"| — | {_fmt_t(th)} | {why[:160]} | | | "
                     f"{_fmt_e(th, 'err_out')} / {_fmt_e(th, 'err_grad')} | | {floor_s} |")
    return "\n".join(L) + "\n"


def write(out_dir: str, meta: dict, cases: list[dict]) -> None:
    os.makedirs(out_dir, exist_ok=True)
    tmp = os.path.join(out_dir, "results.json.tmp")
    with open(tmp, "w") as fh:
        json.dump({"meta": meta, "cases": cases}, fh, indent=1, default=str)
    os.replace(tmp, os.path.join(out_dir, "results.json"))
    with open(os.path.join(out_dir, "results.md"), "w") as fh:
        fh.write(markdown(meta, cases))


# ---------------------------------------------------------------------------------------------------------


def run_order(grid: list[tuple], args) -> list[tuple]:
    """``grid`` in the order to run it (``--order``)."""
    if args.order == "grid":
        return list(grid)
    groups = [(k, m, d) for k in args.cells for m in args.modes for d in args.dtypes]
    points = [(h, b) for h in args.hidden for b in args.batch]
    hs, bs = sorted(args.hidden), sorted(args.batch)
    corners = [(hs[0], bs[0]), (hs[-1], bs[-1]), (hs[-1], bs[0]), (hs[0], bs[-1])]
    first = [p for i, p in enumerate(corners) if p in points and p not in corners[:i]]
    ordered = first + [p for p in points if p not in first]
    return [(k, m, d, h, b) for (h, b) in ordered for (k, m, d) in groups]


def main(argv=None) -> int:
    args = parse_args(argv)
    t0 = time.monotonic()
    import torch

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench_cells: --device cuda but no CUDA GPU is visible", file=sys.stderr)
        return 2
    if args.smoke and device.type == "cpu" and "TRITON_INTERPRET" not in os.environ:
        # Must happen before fastseq (and its Triton kernels) is imported.
        os.environ["TRITON_INTERPRET"] = "1"
        print("bench_cells: --smoke on CPU: set TRITON_INTERPRET=1", file=sys.stderr)
    if args.threads is None and args.smoke and device.type == "cpu":
        args.threads = 1
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    sys.path.insert(0, HERE)  # floor_cells
    import triton

    import fastseq
    from fastseq.dispatch import KERNEL_BACKENDS

    avail = fastseq.backends()
    if args.backends is None:
        backends = [b for b in KERNEL_BACKENDS if avail[b]["available"]]
    else:
        backends = _names(args.backends)
        for b in backends:
            if b not in KERNEL_BACKENDS:
                print(f"bench_cells: --backends: {b!r} is not a fastseq kernel backend "
                      f"({', '.join(KERNEL_BACKENDS)})", file=sys.stderr)
                return 2
    if device.type == "cuda":
        timer = CudaTimer(args.rep_ms / args.rounds, args.warmup_ms)
    else:
        timer = CpuTimer(args.rep_ms / args.rounds if not args.smoke else 20.0)
    meta = meta_info(torch, triton, fastseq, args, device, timer, backends)
    print(f"bench_cells: {meta['device_name']} torch {meta['torch']} triton {meta['triton']}; "
          f"fastseq backends compared: {backends or 'none'}; out: {args.out}", flush=True)

    grid = [(k, m, d, h, b) for k in args.cells for m in args.modes for d in args.dtypes
            for h in args.hidden for b in args.batch]
    position = {key: i for i, key in enumerate(grid)}
    cases: list[dict] = []
    bad = 0
    for i, (kind, mode, dtype, hidden, batch) in enumerate(run_order(grid, args)):
        label = f"[{i + 1}/{len(grid)}] {kind} {mode} {dtype} B={batch} H={hidden}"
        if args.time_budget is not None and time.monotonic() - t0 > args.time_budget:
            cases.append({"cell": kind, "mode": mode, "dtype": dtype, "B": batch, "H": hidden, "I": hidden,
                          "steps": args.steps, "status": "skipped", "reason": "time budget spent",
                          "impls": {}, "comparisons": [],
                          "grid_index": position[(kind, mode, dtype, hidden, batch)]})
            cases.sort(key=lambda c: c.get("grid_index", -1))
            print(f"{label}: skipped (time budget)", flush=True)
            continue
        try:
            case = run_case(torch, fastseq, args, timer, device, backends, kind, mode, dtype, batch, hidden)
        except Exception as e:
            case = {"cell": kind, "mode": mode, "dtype": dtype, "B": batch, "H": hidden, "I": hidden,
                    "steps": args.steps, "status": "error", "reason": _short_error(e),
                    "traceback": traceback.format_exc(limit=10), "impls": {}, "comparisons": []}
        case["grid_index"] = position[(kind, mode, dtype, hidden, batch)]
        cases.append(case)
        cases.sort(key=lambda c: c.get("grid_index", -1))
        failed = case.get("status") == "error" or any(
            r.get("status") == "error" for r in case["impls"].values()) or any(
            cmp.get("numerics_ok") is False for cmp in case["comparisons"])
        bad += failed
        parts = [f"{cmp['fastseq']}: " + (f"{cmp['ratio']:.3g}x " if "ratio" in cmp else "no time, ")
                 + ("ok" if cmp.get("numerics_ok") else "NUMERICS FAIL") for cmp in case["comparisons"]]
        if case.get("status") == "error":
            parts = [f"ERROR {case['reason']}"]
        parts += [f"{n} {r['status']}: {r.get('reason', '')[:200]}" for n, r in case["impls"].items()
                  if r.get("status") == "error"]
        print(f"{label}: {'; '.join(parts) or 'torch only'} ({case.get('seconds', 0):.1f}s)", flush=True)
        meta["elapsed_s"] = round(time.monotonic() - t0, 1)
        write(args.out, meta, cases)
    meta["elapsed_s"] = round(time.monotonic() - t0, 1)
    meta["failed_cases"] = bad
    meta["skipped_cases"] = sum(c.get("status") == "skipped" for c in cases)
    write(args.out, meta, cases)
    print(f"bench_cells: {len(cases)} cases, {bad} failed, {meta['skipped_cases']} skipped, "
          f"{meta['elapsed_s']} s; wrote {os.path.join(args.out, 'results.md')}", flush=True)
    return 1 if bad and not args.no_strict else 0


if __name__ == "__main__":
    sys.exit(main())
