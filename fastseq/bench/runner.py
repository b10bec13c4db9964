"""One benchmark case from end to end: build it, run every implementation once (its errors against the
reference), time them interleaved, judge them, and derive µs per step, TFLOP/s, GB/s and the fraction of the
floor reached.

The floor of a case (a lower bound, not a prediction): ``max(FLOPs / matrix rate, bytes / bandwidth) + calls ×
call latency``, with the three rates measured on this device at the start of the run
(:func:`fastseq.bench.timing.measure_ceilings`) and the work counted by the case (:meth:`Case.work`).
"""

from __future__ import annotations

import time
import traceback

import torch

from fastseq.bench.cases import build
from fastseq.bench.presets import CELL_OPS, Spec
from fastseq.bench.timing import capture_cuda_graph, interleaved, summary_us
from fastseq.check import tolerance

GRAPH = "+graph"


def _short(e: BaseException) -> str:
    msg = f"{type(e).__name__}: {e}".strip()
    return msg if len(msg) <= 400 else msg[:400] + "…"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def is_torch(name: str) -> bool:
    """torch's own implementations: ``torch``, its SDPA backends ``torch:flash`` …, and their graphs."""
    return name.split(GRAPH)[0].split(":")[0] == "torch"


def verdict(rec: dict, torch_rec: dict, dtype: torch.dtype) -> str:
    """SPEC.md's rule on a fastseq implementation: every error at most twice torch's own plus a rounding floor.
    ``"n/a"`` where the case has no reference (dropout)."""
    if rec.get("err_out") is None and rec.get("checked", "").startswith("not checked"):
        return "n/a"
    for key in ("err_out", "err_grad"):
        ours = rec.get(key)
        if ours is None and key == "err_grad":
            continue
        theirs = torch_rec.get(key) or 0.0  # torch crashed or has no such error: the floor alone
        if ours is None or not ours <= tolerance(theirs, dtype):
            return "WRONG"
    return "ok"


def _prepare(case, impls: dict, device: torch.device, graphs: bool) -> tuple[dict, dict]:
    """Run each implementation once (errors) and, on CUDA for the decoder loops' forward, capture it in a CUDA
    graph too. Returns the records and the callables that ran."""
    records, runnable = {}, {}
    for name, fn in impls.items():
        rec = records[name] = {}
        if isinstance(fn, str):
            rec.update(status="unavailable", reason=fn)
            continue
        try:
            result = fn()
            _sync(device)
            rec.update(case.errors(result), status="ok")
            runnable[name] = fn
        except Exception as e:
            rec.update(status="error", reason=_short(e), traceback=traceback.format_exc(limit=6))
            continue
        if graphs:
            grec = records[name + GRAPH] = {}
            try:
                replay, static = capture_cuda_graph(fn)
                replay()
                _sync(device)
                grec.update(case.errors(static), status="ok")
                runnable[name + GRAPH] = replay
            except Exception as e:
                grec.update(status="error", reason=_short(e))
                _sync(device)
    return records, runnable


def run_case(spec: Spec, device: torch.device, backends: list[str], timer, rounds: int, ceilings,
             seed: int = 0) -> dict:
    """Everything measured for ``spec``: a JSON-ready dict (see :mod:`fastseq.bench.report` for the fields)."""
    row = {"op": spec.op, "shape": spec.shape, "sizes": dict(spec.sizes), "options": dict(spec.options),
           "dtype": spec.dtype, "mode": spec.mode, "label": spec.label, "impls": {}}
    t0 = time.monotonic()
    try:
        case = build(spec, device, seed)
        impls = case.implementations(backends)
        if device.type == "cuda" and spec.op == "sdpa":
            impls.update(case.torch_sdpa_backends())
        graphs = device.type == "cuda" and spec.op in CELL_OPS and spec.mode == "fwd"
        records, runnable = _prepare(case, impls, device, graphs)
    except Exception as e:
        row.update(status="error", reason=_short(e), traceback=traceback.format_exc(limit=8))
        return row
    for name, samples in interleaved(runnable, timer, rounds).items():
        if isinstance(samples, BaseException):
            records[name].update(status="error", reason=_short(samples))
        else:
            records[name].update(summary_us(samples))
    row["impls"] = records
    row["status"] = "ok"
    _judge(row, case, ceilings)
    row["seconds"] = round(time.monotonic() - t0, 2)
    return row


def _judge(row: dict, case, ceilings) -> None:
    """Verdicts, speed-ups against torch (eager against eager, graph against graph) and derived figures."""
    records = row["impls"]
    dtype = getattr(torch, row["dtype"])
    work = case.work()
    rate = ceilings.matmul_flops.get(row["dtype"]) if ceilings else None
    floor_s = None
    if ceilings and rate:
        floor_s = max(work["flops"] / rate, work["bytes"] / ceilings.bandwidth) + work["calls"] * ceilings.call_latency
    row["work"] = work
    row["floor_us"] = None if floor_s is None else floor_s * 1e6
    for name, rec in records.items():
        if rec.get("status") != "ok":
            continue
        baseline = records.get("torch" + (GRAPH if name.endswith(GRAPH) else ""), {})
        if not is_torch(name):
            rec["verdict"] = verdict(rec, records.get("torch", {}), dtype)
        if "median_us" not in rec:
            continue
        t = rec["median_us"] * 1e-6
        rec["us_per_step"] = rec["median_us"] / max(work["steps"], 1)
        rec["tflops"] = work["flops"] / t / 1e12
        rec["gbps"] = work["bytes"] / t / 1e9
        if floor_s is not None:
            rec["floor_fraction"] = floor_s / t
        if "median_us" in baseline and name != "torch":
            rec["speedup"] = baseline["median_us"] / rec["median_us"]


def failures(rows: list[dict]) -> list[str]:
    """What makes the run fail: a fastseq implementation that crashed or broke the error rule, a case that could
    not be built."""
    out = []
    for row in rows:
        if row.get("status") == "error":
            out.append(f"{row['label']}: case failed: {row.get('reason')}")
            continue
        for name, rec in row["impls"].items():
            if is_torch(name):
                continue
            if rec.get("status") == "error":
                out.append(f"{row['label']}: {name} crashed: {rec.get('reason')}")
            elif rec.get("verdict") == "WRONG":
                out.append(f"{row['label']}: {name} is WRONG (error out {rec.get('err_out')}, grad "
                           f"{rec.get('err_grad')}; torch {row['impls'].get('torch', {}).get('err_out')}, "
                           f"{row['impls'].get('torch', {}).get('err_grad')}; worst {rec.get('worst')})")
    return out
