#!/usr/bin/env python
"""Layer benchmark: fastseq.LSTM / GRU / RNN against torch.nn's layers, same parameters, same tensors.

For each case (layer kind, batch B, hidden H = input size, length T, layers, directions, dtype, padded or packed
with lengths spread over [T/4, T]) torch's module and a fastseq module *holding the same Parameter objects* run
on the same input, in the same process, interleaved (bench_cells' timers: ``triton.testing.do_bench`` on CUDA,
wall clock on CPU). Modes: ``inference`` (forward under ``torch.no_grad()``) and ``training`` (forward, then
``torch.autograd.grad`` of the output with respect to the input, the initial state and every parameter).
Reported: median and p20/p80 per call and per time step, ``torch / fastseq`` (> 1: fastseq faster), the
relative error of the output (and, in training, the worst gradient) against ``fastseq.reference`` in float64
for both implementations, and SPEC.md's rule on it (``fastseq.check.tolerance``). Writes ``results.json`` and
``results.md`` into ``--out``; exits non-zero when a case crashed or failed the rule.

    python benchmarks/bench_layers.py --out out/bench_layers                 # default grid, on a GPU
    TRITON_INTERPRET=1 python benchmarks/bench_layers.py --smoke --out /tmp/l  # tiny, on CPU
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from bench_cells import CpuTimer, CudaTimer, _git_rev, _short_error, numerics_ok, quantile  # noqa: E402

KINDS = ("lstm", "gru", "rnn")
MODES = ("inference", "training")
SMOKE = dict(kinds="lstm,gru", batch="2", hidden="8", steps="5", layers="2", directions="2", dtypes="float32",
             packed="0,1")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="fastseq's recurrent layers against torch.nn's.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--kinds", default="lstm,gru,rnn")
    p.add_argument("--batch", default="1,8,32,128")
    p.add_argument("--hidden", default="256,512,1024")
    p.add_argument("--steps", default="128,512", help="sequence lengths T")
    p.add_argument("--layers", default="1,2")
    p.add_argument("--directions", default="1,2")
    p.add_argument("--dtypes", default="float32,bfloat16,float16")
    p.add_argument("--packed", default="0,1", help="0: padded batch; 1: packed, lengths spread over [T/4, T]")
    p.add_argument("--modes", default="inference,training")
    p.add_argument("--backends", default=None, help="fastseq backends (default: every available kernel backend)")
    p.add_argument("--rep-ms", type=float, default=100.0)
    p.add_argument("--warmup-ms", type=float, default=10.0)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--time-budget", type=float, default=None, help="seconds; later cases are recorded as skipped")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.path.join(os.path.dirname(HERE), "out", "bench_layers"))
    p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU under TRITON_INTERPRET=1")
    p.add_argument("--no-strict", action="store_true")
    a = p.parse_args(argv)
    if a.smoke:
        for k, v in SMOKE.items():
            if getattr(a, k) == p.get_default(k):
                setattr(a, k, v)
    names = lambda s: [v for v in s.split(",") if v]  # noqa: E731
    a.kinds, a.dtypes, a.modes = names(a.kinds), names(a.dtypes), names(a.modes)
    for field in ("batch", "hidden", "steps", "layers", "directions", "packed"):
        setattr(a, field, [int(v) for v in names(getattr(a, field))])
    return a


def _modules(torch, fastseq, kind, hidden, layers, directions, dtype, device, backend):
    """torch's layer and a fastseq layer holding the very same Parameter objects."""
    cls = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU, "rnn": torch.nn.RNN}[kind]
    fast_cls = {"lstm": fastseq.LSTM, "gru": fastseq.GRU, "rnn": fastseq.RNN}[kind]
    kw = dict(num_layers=layers, bidirectional=directions == 2)
    ref = cls(hidden, hidden, device=device, dtype=dtype, **kw)
    fast = fast_cls(hidden, hidden, device="meta", backend=backend, **kw)
    for name, p in ref.named_parameters():
        setattr(fast, name, p)
    return ref, fast


def _inputs(torch, batch, hidden, steps, packed, dtype, device, grad, seed):
    """The input (padded, or packed with lengths spread over [T/4, T] in no sorted order) and the leaf tensor
    gradients are taken for: the padded tensor, or the packed data itself (a leaf, so that every timed call
    differentiates only its own graph)."""
    from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(steps, batch, hidden, generator=gen).to(device=device, dtype=dtype)
    if not packed:
        x.requires_grad_(grad)
        return x, x
    lengths = torch.linspace(steps, max(1, steps // 4), batch).round().long() if batch > 1 else torch.tensor([steps])
    lengths = lengths[torch.randperm(batch, generator=gen)]
    p = pack_padded_sequence(x, lengths, enforce_sorted=False)
    data = p.data.detach().requires_grad_(grad)
    return PackedSequence(data, p.batch_sizes, p.sorted_indices, p.unsorted_indices), data


def _data(out):
    return out.data if hasattr(out, "batch_sizes") else out


def run_case(torch, fastseq, args, timer, device, backends, key) -> dict:
    import fastseq.reference as ref

    kind, mode, dtype_name, hidden, batch, steps, layers, directions, packed = key
    dtype = getattr(torch, dtype_name)
    case = dict(kind=kind, mode=mode, dtype=dtype_name, H=hidden, B=batch, T=steps, layers=layers,
                directions=directions, packed=bool(packed), impls={}, comparisons=[])
    train = mode == "training"
    torch.manual_seed(args.seed)
    module, _ = _modules(torch, fastseq, kind, hidden, layers, directions, dtype, device, "torch")
    inp, x = _inputs(torch, batch, hidden, steps, packed, dtype, device, train, args.seed)
    params = list(module.parameters())
    leaves = [x, *params]
    upstream = torch.randn_like(_data(module(inp)[0])) if train else None

    # float64 reference on the same numbers
    d_inp, d_x = _inputs(torch, batch, hidden, steps, packed, torch.float64, device, train, args.seed)
    d_params = [p.detach().double().requires_grad_(train) for p in params]
    per = 4
    weights = [tuple(d_params[i:i + per]) for i in range(0, len(d_params), per)]
    fn = {"lstm": ref.lstm_layer, "gru": ref.gru_layer, "rnn": ref.rnn_layer}[kind]
    data_in = d_x
    kw = dict(num_layers=layers, bidirectional=directions == 2,
              batch_sizes=d_inp.batch_sizes if packed else None)
    with torch.set_grad_enabled(train):
        ref_out = fn(data_in, None, weights, **kw)[0]
        ref_grads = torch.autograd.grad(ref_out, [d_x, *d_params], upstream.double()) if train else None

    impls = {"torch": module}
    for b in backends:
        try:
            fastseq.dispatch.select(f"{kind}_layer", device, dtype, b)
        except fastseq.BackendUnavailableError as e:
            case["impls"][b] = {"status": "skipped", "reason": str(e)}
            continue
        impls[b] = _modules(torch, fastseq, kind, hidden, layers, directions, dtype, device, b)[1]
        for name, p in module.named_parameters():
            setattr(impls[b], name, p)

    runs = {}
    for name, mod in impls.items():
        if train:
            def run(mod=mod):
                out = _data(mod(inp)[0])
                return out, torch.autograd.grad(out, leaves, upstream)
        else:
            def run(mod=mod):
                with torch.no_grad():
                    return _data(mod(inp)[0]), None
        rec = case["impls"].setdefault(name, {})
        try:
            out, grads = run()
            rec["err_out"] = fastseq.check.rel_err(out, ref_out)
            if grads is not None:
                rec["err_grad"] = max(fastseq.check.rel_err(g, r) for g, r in zip(grads, ref_grads))
            rec["status"] = "ok"
            runs[name] = run
        except Exception as e:
            rec.update(status="error", reason=_short_error(e), traceback=traceback.format_exc(limit=8))

    samples = {name: [] for name in runs}
    order = list(runs)
    for r in range(args.rounds):
        for name in (order if r % 2 == 0 else order[::-1]):
            samples[name] += timer(runs[name])
    for name, s in samples.items():
        us = [v * 1e3 for v in s]
        case["impls"][name].update(median_us=statistics.median(us), p20_us=quantile(us, 0.2),
                                   p80_us=quantile(us, 0.8), step_us=statistics.median(us) / steps)
    for b in backends:
        fs, th = case["impls"].get(b, {}), case["impls"].get("torch", {})
        if fs.get("status") not in ("ok", "error"):
            continue
        cmp = {"fastseq": b}
        if "median_us" in fs and "median_us" in th:
            cmp["ratio"] = th["median_us"] / fs["median_us"]
        ok = fs.get("status") == "ok" and numerics_ok(fs["err_out"], th.get("err_out", float("nan")), dtype_name)
        if train and ok:
            ok = numerics_ok(fs["err_grad"], th["err_grad"], dtype_name)
        cmp["numerics_ok"] = ok
        case["comparisons"].append(cmp)
    return case


def _time(rec: dict) -> str:
    if "median_us" not in rec:
        return rec.get("status", "—")
    return f"{rec['median_us']:.0f} ({rec['p20_us']:.0f}–{rec['p80_us']:.0f})"


def _errors(rec: dict) -> str:
    parts = [f"{rec[k]:.1e}" for k in ("err_out", "err_grad") if k in rec]
    return " / ".join(parts) or "—"


def markdown(meta: dict, cases: list[dict]) -> str:
    lines = ["# fastseq layers against torch.nn", ""]
    lines += [f"- **{k}**: `{v}`" for k, v in meta.items() if k != "backends"]
    lines += ["", "Times: median (p20–p80) µs per call; `torch/fastseq` > 1 means fastseq is faster. Errors: "
              "‖out − ref‖/‖ref‖ against float64 `fastseq.reference` (training: worst gradient too).", "",
              "| kind | mode | dtype | H | B | T | L | D | packed | backend | torch µs | fastseq µs | µs/step fastseq | "
              "torch/fastseq | err fastseq | err torch | numerics |",
              "|---|---|---|---:|---:|---:|---:|---:|---|---|---:|---:|---:|---:|---|---|---|"]
    for c in cases:
        head = (f"| {c['kind']} | {c['mode']} | {c['dtype']} | {c['H']} | {c['B']} | {c['T']} | {c['layers']} | "
                f"{c['directions']} | {'yes' if c['packed'] else 'no'} ")
        if c.get("status") == "skipped":
            lines.append(head + f"| — | skipped: {c['reason']} | | | | | | |")
            continue
        th = c["impls"].get("torch", {})
        for cmp in c["comparisons"]:
            fs = c["impls"][cmp["fastseq"]]
            step = f"{fs['step_us']:.2f}" if "step_us" in fs else "—"
            ratio = f"{cmp['ratio']:.3g}" if "ratio" in cmp else "—"
            verdict = "ok" if cmp["numerics_ok"] else "**FAIL**"
            lines.append(head + f"| {cmp['fastseq']} | {_time(th)} | {_time(fs)} | {step} | {ratio} | "
                         f"{_errors(fs)} | {_errors(th)} | {verdict} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    t0 = time.monotonic()
    import torch

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.smoke and device.type == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before fastseq defines its kernels
    import triton

    import fastseq
    import fastseq.check  # noqa: F401
    from fastseq.dispatch import KERNEL_BACKENDS

    avail = fastseq.backends()
    backends = ([b for b in KERNEL_BACKENDS if avail[b]["available"]] if args.backends is None
                else [b for b in args.backends.split(",") if b])
    timer = (CudaTimer(args.rep_ms / args.rounds, args.warmup_ms) if device.type == "cuda"
             else CpuTimer(args.rep_ms / args.rounds if not args.smoke else 20.0))
    meta = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "torch_cuda": torch.version.cuda, "triton": triton.__version__,
            "git": _git_rev(), "timer": timer.name, "triton_interpret": os.environ.get("TRITON_INTERPRET"),
            "allow_tf32_matmul": bool(torch.backends.cuda.matmul.allow_tf32), "backends": avail,
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    grid = list(itertools.product(args.kinds, args.modes, args.dtypes, args.hidden, args.batch, args.steps,
                                  args.layers, args.directions, args.packed))
    cases, bad = [], 0
    for i, key in enumerate(grid):
        label = f"[{i + 1}/{len(grid)}] " + " ".join(map(str, key))
        if args.time_budget is not None and time.monotonic() - t0 > args.time_budget:
            kind, mode, dtype, h, b, t, layers, d, packed = key
            cases.append(dict(kind=kind, mode=mode, dtype=dtype, H=h, B=b, T=t, layers=layers, directions=d,
                              packed=bool(packed), status="skipped", reason="time budget spent"))
            continue
        try:
            case = run_case(torch, fastseq, args, timer, device, backends, key)
        except Exception as e:
            kind, mode, dtype, h, b, t, layers, d, packed = key
            case = dict(kind=kind, mode=mode, dtype=dtype, H=h, B=b, T=t, layers=layers, directions=d,
                        packed=bool(packed), status="skipped", reason="error: " + _short_error(e),
                        traceback=traceback.format_exc(limit=10))
            bad += 1
        cases.append(case)
        failed = any(not c["numerics_ok"] for c in case.get("comparisons", ()))
        bad += failed
        print(label + ": " + "; ".join(f"{c['fastseq']} {c.get('ratio', float('nan')):.3g}x "
                                        f"{'ok' if c['numerics_ok'] else 'NUMERICS FAIL'}"
                                        for c in case.get("comparisons", ())), flush=True)
        meta["elapsed_s"] = round(time.monotonic() - t0, 1)
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "results.json"), "w") as fh:
            json.dump({"meta": meta, "cases": cases}, fh, indent=1, default=str)
        with open(os.path.join(args.out, "results.md"), "w") as fh:
            fh.write(markdown(meta, cases))
    print(f"bench_layers: {len(cases)} cases, {bad} failed, {meta.get('elapsed_s')} s; "
          f"wrote {os.path.join(args.out, 'results.md')}")
    return 1 if bad and not args.no_strict else 0


if __name__ == "__main__":
    sys.exit(main())
