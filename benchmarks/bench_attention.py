#!/usr/bin/env python
"""Attention benchmark: ``fastseq.scaled_dot_product_attention`` against torch's
``F.scaled_dot_product_attention`` on the same tensors.

On CUDA torch runs once per SDPA backend it has (``torch.nn.attention.sdpa_kernel``: flash, memory-efficient,
cuDNN, math) and once with its own choice ("default"); a backend that refuses a case is recorded with its
reason. On CPU torch runs its default dispatch. Implementations alternate within each round (interleaved) and
the rounds repeat, so drift hits all alike. Timers: ``fastseq.bench.timing``'s (``triton.testing.do_bench`` on
CUDA, ``torch.utils.benchmark`` on CPU). Reported per implementation: median and p20/p80 per call, ``torch / fastseq``
(> 1: fastseq faster, against torch's default), TFLOP/s (forward ``4·B·H·L·S·E``, halved where causal;
backward 2.5× the forward), and the relative error against ``fastseq.reference`` in float64 on a subsample
(first batch element, up to two heads, up to 128 query rows; gradients only where the case is small), with
SPEC.md's rule on fastseq's error (``fastseq.check.tolerance``). Dropout cases report no error (no two
implementations draw the same mask).

Cases (the issue's list): dense bf16/fp16, head 64/128, 1k-16k tokens, causal and not, forward and
forward+backward; a bool mask; key padding (50 % of the keys); dropout 0.1; float32; head 72; a float mask with
its gradient; ``nn.MultiheadAttention`` inside an ``nn.TransformerEncoder`` with key padding, train and eval;
decode (one query) against 8k-64k keys.

    python benchmarks/bench_attention.py --out out/bench_attention                  # full grid, on a GPU
    TRITON_INTERPRET=1 python benchmarks/bench_attention.py --smoke --out /tmp/att   # tiny, on CPU, < 60 s

Writes ``results.json`` and ``results.md`` into ``--out``. Spec-sheet floors: benchmarks/NOTES_attention.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from fastseq.bench import _git as _git_rev  # noqa: E402
from fastseq.bench.runner import _short as _short_error  # noqa: E402
from fastseq.bench.timing import CpuTimer as _CpuTimer, CudaTimer as _CudaTimer, quantile  # noqa: E402,F401


class CudaTimer:
    """``fastseq.bench``'s CUDA timer, in this script's units (ms per sample)."""

    def __init__(self, rep_ms: float, warmup_ms: float):
        self._timer = _CudaTimer(rep_ms / 1e3, warmup_ms / 1e3)
        self.name = self._timer.name

    def __call__(self, fn) -> list[float]:
        return [s * 1e3 for s in self._timer(fn)]


class CpuTimer(CudaTimer):
    """``fastseq.bench``'s CPU timer (``torch.utils.benchmark``), in ms per sample."""

    def __init__(self, rep_ms: float, min_samples: int = 1):
        self._timer = _CpuTimer(rep_ms / 1e3)
        self.name = self._timer.name


def numerics_ok(fs: float, th: float, dtype: str) -> bool:
    """SPEC.md's rule, as ``python -m fastseq bench`` applies it."""
    import math

    import torch

    from fastseq.check import tolerance

    return math.isnan(th) if math.isnan(fs) else fs <= tolerance(th, getattr(torch, dtype))

# H100 SXM spec sheet (not measured): dense bf16/fp16 tensor-core and fp32 (non-tensor) peaks, HBM3 bandwidth
PEAK_TFLOPS = {"bfloat16": 990.0, "float16": 990.0, "float32": 67.0}
HBM_TBPS = 3.35


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="fastseq's attention against torch's SDPA backends.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--backend", default=None,
                   help="fastseq backend (default: auto; triton with --smoke, where auto would pick torch on CPU)")
    p.add_argument("--groups", default="dense,variants,mha,decode", help="which case groups to run")
    p.add_argument("--tokens", default="1024,2048,4096,8192,16384", help="dense sequence lengths L = S")
    p.add_argument("--total-tokens", type=int, default=16384, help="dense: batch = total / L (at least 1)")
    p.add_argument("--decode-keys", default="8192,16384,32768,65536")
    p.add_argument("--rep-ms", type=float, default=100.0)
    p.add_argument("--warmup-ms", type=float, default=25.0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--time-budget", type=float, default=None, help="seconds; later cases are recorded as skipped")
    p.add_argument("--max-math-elems", type=float, default=2**31,
                   help="skip torch's math backend where B*H*L*S exceeds this (it materialises the scores)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.path.join(os.path.dirname(HERE), "out", "bench_attention"))
    p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU under TRITON_INTERPRET=1")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------------------------------------


def cases(args) -> list[dict]:
    """Each case: kind (sdpa / encoder / decode), sizes, dtype, mask, causal, dropout, mode."""
    out = []
    groups = set(args.groups.split(","))
    if args.smoke:
        # bfloat16 is computed wrongly by the Triton interpreter: float16 stands for it on CPU
        low = ["float16"]
        tokens, heads_for, batch_for = [16], {64: 2, 128: 1}, lambda L: 2
        E_dense, E72, decode_keys = [16, 32], 24, [64, 128]
        enc = dict(B=2, L=16, d_model=32, nhead=2, layers=1)
    else:
        low = ["bfloat16", "float16"]
        tokens = [int(t) for t in args.tokens.split(",")]
        heads_for = {64: 32, 128: 16}
        batch_for = lambda L: max(1, args.total_tokens // L)  # noqa: E731
        E_dense, E72, decode_keys = [64, 128], 72, [int(s) for s in args.decode_keys.split(",")]
        enc = dict(B=8, L=1024, d_model=1024, nhead=16, layers=2)
    E_of = {64: E_dense[0], 128: E_dense[1]}

    def sdpa_case(name, B, H, L, S, E, dtype, mode, mask="none", causal=False, dropout=0.0, Ev=None):
        return dict(kind="sdpa", name=name, B=B, H=H, L=L, S=S, E=E, Ev=Ev or E, dtype=dtype, mode=mode, mask=mask,
                    causal=causal, dropout=dropout)

    if "dense" in groups:
        for dtype in low:
            for head in (64, 128):
                for L in tokens:
                    for causal in (False, True):
                        for mode in ("fwd", "fwd+bwd"):
                            out.append(sdpa_case("dense", batch_for(L), heads_for[head], L, L, E_of[head], dtype,
                                                 mode, causal=causal))
    if "variants" in groups:
        L = tokens[min(1, len(tokens) - 1)]
        B, H, E, d = batch_for(L), heads_for[64], E_of[64], low[0]
        for mode in ("fwd", "fwd+bwd"):
            out.append(sdpa_case("bool mask", B, H, L, L, E, d, mode, mask="bool"))
            out.append(sdpa_case("key padding 50%", B, H, L, L, E, d, mode, mask="keypad"))
            out.append(sdpa_case("float32", B, H, L, L, E, "float32", mode))
            out.append(sdpa_case("head 72", B, H, L, L, E72, d, mode))
        out.append(sdpa_case("dropout 0.1", B, H, L, L, E, d, "fwd+bwd", dropout=0.1))
        out.append(sdpa_case("float mask + grad", B, H, L, L, E, d, "fwd+bwd", mask="float_grad"))
    if "mha" in groups:
        for mode in ("eval", "train"):
            out.append(dict(kind="encoder", name=f"TransformerEncoder key padding ({mode})", dtype=low[0],
                            mode=mode, **enc))
    if "decode" in groups:
        for S in decode_keys:
            out.append(sdpa_case("decode", 8 if not args.smoke else 2, heads_for[128], 1, S, E_of[128], low[0],
                                 "fwd"))
    return out


def flops(c: dict) -> float:
    if c["kind"] == "encoder":
        L, d = c["L"], c["d_model"]
        f = 4 * c["B"] * L * L * d * c["layers"]  # attention part only (4·B·H·L·S·E with H·E = d)
        return f * (3.5 if c["mode"] == "train" else 1.0)
    f = 2 * c["B"] * c["H"] * c["L"] * c["S"] * (c["E"] + c["Ev"])  # 4·B·H·L·S·E where Ev = E
    if c["causal"]:
        f /= 2
    return f * (3.5 if c["mode"] == "fwd+bwd" else 1.0)


def floor_us(c: dict, elem_bytes: int) -> dict:
    """Spec-sheet floors (H100 SXM; not measured): compute, and for decode the bytes of K and V over HBM."""
    peak = PEAK_TFLOPS[c["dtype"]]
    res = {"compute_floor_us": flops(c) / (peak * 1e12) * 1e6}
    if c["kind"] == "sdpa" and c["L"] == 1:
        kv_bytes = c["B"] * c["H"] * c["S"] * (c["E"] + c["Ev"]) * elem_bytes
        res["kv_bytes"] = kv_bytes
        res["memory_floor_us"] = kv_bytes / (HBM_TBPS * 1e12) * 1e6
    return res


# ---------------------------------------------------------------------------------------------------------
# Running one case
# ---------------------------------------------------------------------------------------------------------


def _torch_backends(torch, device, args, c) -> dict:
    """name -> context manager factory for each torch implementation to time."""
    import contextlib

    if device.type != "cuda":
        return {"torch default": contextlib.nullcontext}
    from torch.nn.attention import SDPBackend, sdpa_kernel

    res = {"torch default": contextlib.nullcontext}
    for name in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH"):
        be = getattr(SDPBackend, name, None)
        if be is None:
            continue
        if name == "MATH" and c.get("B", 1) * c.get("H", 1) * c.get("L", 1) * c.get("S", 1) > args.max_math_elems:
            continue
        res[f"torch {name.lower()}"] = lambda be=be: sdpa_kernel([be])
    return res


def _make_sdpa_inputs(torch, c, device, seed):
    g = torch.Generator(device="cpu").manual_seed(seed)
    dtype = getattr(torch, c["dtype"])
    B, H, L, S, E, Ev = c["B"], c["H"], c["L"], c["S"], c["E"], c["Ev"]

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    q, k, v = rnd(B, H, L, E), rnd(B, H, S, E), rnd(B, H, S, Ev)
    mask = None
    if c["mask"] == "bool":
        mask = (torch.rand(B, 1, L, S, generator=g) < 0.7).to(device)
        mask[..., 0] = True  # no fully masked row (torch's flash/efficient kernels differ there)
    elif c["mask"] == "keypad":
        mask = (torch.arange(S) < S // 2).reshape(1, 1, 1, S).expand(B, 1, 1, S).contiguous().to(device)
    elif c["mask"] == "float_grad":
        mask = rnd(B, 1, L, S)
    grad = c["mode"] == "fwd+bwd"
    for t in (q, k, v):
        t.requires_grad_(grad)
    if mask is not None and c["mask"] == "float_grad":
        mask.requires_grad_(True)
    go = rnd(B, H, L, Ev) if grad else None
    return q, k, v, mask, go


def _sdpa_fn(fn, c, q, k, v, mask, go):
    leaves = [q, k, v] + ([mask] if mask is not None and mask.requires_grad else [])

    def run():
        out = fn(q, k, v, mask, c["dropout"], c["causal"])
        if go is not None:
            return torch_grad(out, leaves, go)
        return out

    return run


def torch_grad(out, leaves, go):
    import torch

    return torch.autograd.grad(out, leaves, go)


def _sdpa_errors(torch, fastseq, c, fns, q, k, v, mask, go) -> dict:
    """Relative errors of each implementation on a subsample against the float64 reference."""
    from fastseq import reference
    from fastseq.check import rel_err

    if c["dropout"] > 0:
        return {}
    H2, rows = min(2, c["H"]), torch.linspace(0, c["L"] - 1, min(128, c["L"])).long().unique()
    small = c["H"] * c["L"] * c["S"] <= 2**22
    qs = q[:1, :H2].detach()[:, :, rows]
    ks, vs = k[:1, :H2].detach(), v[:1, :H2].detach()
    ms = None
    if mask is not None:
        ms = mask[:1].detach()
        ms = ms[:, :, rows] if ms.size(2) > 1 else ms
    if c["causal"]:
        ms = (rows.to(q.device).view(-1, 1) >= torch.arange(c["S"], device=q.device).view(1, -1))
    want_grad = go is not None and small
    errs = {}
    ref_leaves = [t.double().requires_grad_(want_grad) for t in (qs, ks, vs)]
    m64 = None if ms is None else (ms.double() if ms.is_floating_point() else ms)
    ref = reference.scaled_dot_product_attention(*ref_leaves, m64)
    gos = go[:1, :H2][:, :, rows] if want_grad else None
    ref_all = [ref] + (list(torch.autograd.grad(ref, ref_leaves, gos.double())) if want_grad else [])
    for name, fn in fns.items():
        try:
            with fn["ctx"]():
                leaves = [t.clone().requires_grad_(want_grad) for t in (qs, ks, vs)]
                out = fn["call"](*leaves, ms, 0.0, False)
                got = [out] + (list(torch.autograd.grad(out, leaves, gos)) if want_grad else [])
            errs[name] = {label: rel_err(a, b) for label, a, b in zip(["out", "dq", "dk", "dv"], got, ref_all)}
        except Exception as e:  # a torch backend that refuses the subsample's shapes
            errs[name] = {"error": _short_error(e)}
    return errs


def run_sdpa_case(torch, fastseq, args, timer, device, c) -> dict:
    import torch.nn.functional as F

    q, k, v, mask, go = _make_sdpa_inputs(torch, c, device, args.seed)
    backend = args.backend

    def ours(q_, k_, v_, m_, p, causal):
        return fastseq.scaled_dot_product_attention(q_, k_, v_, m_, p, causal, backend=backend)

    def theirs(q_, k_, v_, m_, p, causal):
        return F.scaled_dot_product_attention(q_, k_, v_, m_, p, causal)

    import contextlib

    impls = {"fastseq": {"call": ours, "ctx": contextlib.nullcontext}}
    for name, ctx in _torch_backends(torch, device, args, c).items():
        impls[name] = {"call": theirs, "ctx": ctx}
    runs = {name: _sdpa_fn(i["call"], c, q, k, v, mask, go) for name, i in impls.items()}
    rec = _time_interleaved(torch, args, timer, impls, runs)
    rec["errors"] = _sdpa_errors(torch, fastseq, c, impls, q, k, v, mask, go)
    return rec


def run_encoder_case(torch, fastseq, args, timer, device, c) -> dict:
    import contextlib

    from torch import nn

    torch.manual_seed(args.seed)
    dtype = getattr(torch, c["dtype"])
    layer = nn.TransformerEncoderLayer(c["d_model"], c["nhead"], 4 * c["d_model"], dropout=0.1, batch_first=True)
    theirs = nn.TransformerEncoder(layer, c["layers"], enable_nested_tensor=True).to(device=device, dtype=dtype)
    ours = fastseq.patch(copy.deepcopy(theirs), backend=args.backend)
    train = c["mode"] == "train"
    theirs.train(train)
    ours.train(train)
    g = torch.Generator().manual_seed(args.seed)
    x = torch.randn(c["B"], c["L"], c["d_model"], generator=g).to(device=device, dtype=dtype)
    pad = torch.zeros(c["B"], c["L"], dtype=torch.bool)
    pad[:, c["L"] // 2:] = True  # 50 % key padding
    pad = pad.to(device)

    def make(model):
        if train:
            def run():
                out = model(x.requires_grad_(), src_key_padding_mask=pad)
                return torch.autograd.grad(out, [x] + list(model.parameters()), torch.ones_like(out))
        else:
            def run():
                with torch.no_grad():
                    return model(x, src_key_padding_mask=pad)
        return run

    impls = {"fastseq": {"ctx": contextlib.nullcontext}, "torch default": {"ctx": contextlib.nullcontext}}
    runs = {"fastseq": make(ours), "torch default": make(theirs)}
    rec = _time_interleaved(torch, args, timer, impls, runs)
    rec["errors"] = {}
    if not train:  # eval: no dropout, compare at the positions that are not padding
        from fastseq.check import rel_err

        ref_model = copy.deepcopy(theirs).double().eval()
        with torch.no_grad():
            ref = ref_model(x.double()[:1], src_key_padding_mask=pad[:1])
            keep = ~pad[:1]
            for name, model in (("fastseq", ours), ("torch default", theirs)):
                out = model(x[:1], src_key_padding_mask=pad[:1])
                rec["errors"][name] = {"out": rel_err(out[keep], ref[keep])}
    return rec


def _time_interleaved(torch, args, timer, impls, runs) -> dict:
    samples = {name: [] for name in runs}
    errors = {}
    for _ in range(args.rounds):
        for name, run in runs.items():
            if name in errors:
                continue
            try:
                with impls[name]["ctx"]():
                    samples[name] += timer(run)
            except Exception as e:
                errors[name] = _short_error(e)
    timing = {}
    for name, s in samples.items():
        if name in errors or not s:
            timing[name] = {"error": errors.get(name, "no samples")}
            continue
        us = [t * 1e3 for t in s]
        timing[name] = {"n": len(us), "median_us": statistics.median(us), "p20_us": quantile(us, 0.2),
                        "p80_us": quantile(us, 0.8)}
    return {"timing": timing}


def run_case(torch, fastseq, args, timer, device, c) -> dict:
    rec = dict(c)
    try:
        res = (run_encoder_case if c["kind"] == "encoder" else run_sdpa_case)(torch, fastseq, args, timer, device, c)
    except Exception as e:
        rec["status"] = "crashed"
        rec["error"] = _short_error(e)
        rec["traceback"] = traceback.format_exc(limit=4)
        return rec
    rec.update(res)
    rec["flops"] = flops(c)
    rec.update(floor_us(c, torch.empty((), dtype=getattr(torch, c["dtype"])).element_size()))
    t = rec["timing"]
    fs, th = t.get("fastseq", {}), t.get("torch default", {})
    for name, tt in t.items():
        if "median_us" in tt:
            tt["tflops"] = rec["flops"] / (tt["median_us"] * 1e-6) / 1e12
    if "median_us" in fs and "median_us" in th:
        rec["ratio_torch_over_fastseq"] = th["median_us"] / fs["median_us"]
    errs = rec.get("errors", {})
    ok = True
    if "fastseq" in errs and "torch default" in errs:
        for key, e in errs["fastseq"].items():
            te = errs["torch default"].get(key)
            if isinstance(e, float) and isinstance(te, float) and not numerics_ok(e, te, c["dtype"]):
                ok = False
    rec["numerics_ok"] = ok
    rec["status"] = "ok" if ok and "median_us" in fs else ("numerics" if not ok else "fastseq failed")
    return rec


# ---------------------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------------------


def _shape(c) -> str:
    if c["kind"] == "encoder":
        return f"B{c['B']} L{c['L']} d{c['d_model']} h{c['nhead']} x{c['layers']}"
    s = f"B{c['B']} H{c['H']} L{c['L']} S{c['S']} E{c['E']}"
    return s + (" causal" if c.get("causal") else "") + (f" {c['mask']}" if c.get("mask", "none") != "none" else "")


def _t(tt) -> str:
    if not tt:
        return "-"
    if "median_us" not in tt:
        return "err"
    return f"{tt['median_us']:.1f} ({tt['p20_us']:.1f}-{tt['p80_us']:.1f})"


def markdown(meta: dict, recs: list[dict]) -> str:
    lines = ["# fastseq attention benchmark", "",
             f"device: {meta['device_name']} ({meta['device_type']}), torch {meta['torch']}, triton "
             f"{meta['triton']}, git {meta['git']}, timer: {meta['timer']}"
             + (" — SMOKE RUN (tiny shapes; timings meaningless)" if meta["smoke"] else ""), "",
             "Times in µs per call: median (p20-p80). ratio = torch default / fastseq (> 1: fastseq faster). "
             "TFLOP/s from the median (forward 4·B·H·L·S·E, halved where causal; backward 2.5× forward). "
             "Floors are H100 SXM spec-sheet numbers, not measurements.", "",
             "| case | shape | dtype | mode | fastseq | torch default | ratio | fastseq TFLOP/s | floor µs | "
             "err fastseq (out) | err torch (out) | other torch backends | status |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in recs:
        if r.get("status") == "skipped":
            lines.append(f"| {r['name']} | {_shape(r)} | {r['dtype']} | {r['mode']} | | | | | | | | | skipped |")
            continue
        if r.get("status") == "crashed":
            lines.append(f"| {r['name']} | {_shape(r)} | {r['dtype']} | {r['mode']} | | | | | | | | | crashed: "
                         f"{r['error'][:80]} |")
            continue
        t, e = r["timing"], r.get("errors", {})
        fl = max(r.get("compute_floor_us", 0), r.get("memory_floor_us", 0))
        others = ", ".join(f"{n.removeprefix('torch ')}: {_t(tt)}" for n, tt in t.items()
                           if n not in ("fastseq", "torch default"))
        ratio = r.get("ratio_torch_over_fastseq")

        def err(name):
            v = e.get(name, {}).get("out")
            return f"{v:.2e}" if isinstance(v, float) else "-"

        lines.append(f"| {r['name']} | {_shape(r)} | {r['dtype']} | {r['mode']} | {_t(t.get('fastseq'))} | "
                     f"{_t(t.get('torch default'))} | {'-' if ratio is None else f'{ratio:.2f}'} | "
                     f"{t.get('fastseq', {}).get('tflops', float('nan')):.3g} | {fl:.1f} | {err('fastseq')} | "
                     f"{err('torch default')} | {others or '-'} | {r['status']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch
    import triton

    import fastseq

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.smoke:
        args.rounds, args.rep_ms = 1, 1.0
    if args.backend is None:
        args.backend = "triton" if args.smoke else "auto"
    timer = CudaTimer(args.rep_ms, args.warmup_ms) if device.type == "cuda" else CpuTimer(
        args.rep_ms, min_samples=1 if args.smoke else 3)
    meta = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "argv": sys.argv,
            "torch": torch.__version__, "triton": triton.__version__, "git": _git_rev(),
            "device_type": device.type, "triton_interpret": os.environ.get("TRITON_INTERPRET"),
            "fastseq_backend": args.backend, "timer": timer.name, "smoke": args.smoke, "rounds": args.rounds,
            "rep_ms": args.rep_ms, "floors": "H100 SXM spec sheet (990 TFLOP/s dense bf16/fp16, 67 TFLOP/s fp32, "
                                             "3.35 TB/s HBM3): not measured",
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"}
    start = time.perf_counter()
    recs = []
    for c in cases(args):
        if args.time_budget is not None and time.perf_counter() - start > args.time_budget:
            recs.append(dict(c, status="skipped", reason="time budget"))
            continue
        rec = run_case(torch, fastseq, args, timer, device, c)
        recs.append(rec)
        print(f"[{time.perf_counter() - start:7.1f}s] {c['name']:<40} {_shape(c):<40} {c['dtype']:<9} "
              f"{c['mode']:<8} {rec['status']}", flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    meta["elapsed_s"] = time.perf_counter() - start
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"meta": meta, "cases": recs}, f, indent=1, default=str)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(markdown(meta, recs))
    print(f"wrote {args.out}/results.json and results.md ({meta['elapsed_s']:.1f} s)")
    return 0 if all(r["status"] in ("ok", "skipped") for r in recs) else 1


if __name__ == "__main__":
    sys.exit(main())
