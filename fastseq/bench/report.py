"""What a benchmark run writes: the markdown table (also printed), the JSON with everything, and the plots.

JSON (``results.json``): ``{"meta": {...}, "cases": [...]}``. ``meta``: when and where (device name, CPU or GPU,
threads), the versions (python, torch, CUDA, triton, fastseq, git), the timer, the preset and arguments, the
measured ceilings. Each case: ``op``, ``shape``, ``sizes``, ``options``, ``dtype``, ``mode``, ``work`` (FLOPs,
bytes, calls, steps), ``floor_us``, and ``impls``: per implementation (``torch``, torch's SDPA backends
``torch:flash`` …, each fastseq backend, ``…+graph`` for a CUDA-graph replay) its ``status`` (ok, unavailable,
error, with the ``reason``), ``median_us``, ``p20_us``, ``p80_us``, ``samples``, ``us_per_step``, ``tflops``,
``gbps``, ``floor_fraction``, ``speedup`` (torch's median over this one's), ``err_out``, ``err_grad``, ``worst``,
``checked`` (what the reference covered) and, for fastseq, the ``verdict``. Non-finite numbers are written as the
strings ``"inf"`` and ``"nan"``.
"""

from __future__ import annotations

import json
import math
import os

from fastseq.bench.runner import is_torch


def _clean(x):
    """JSON-safe: non-finite floats as strings, recursively."""
    if isinstance(x, float) and not math.isfinite(x):
        return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items() if k != "traceback" or v}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def write_json(path: str, meta: dict, rows: list[dict]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(_clean({"meta": meta, "cases": rows}), f, indent=1, default=str)
    os.replace(tmp, path)


def _num(v, fmt: str) -> str:
    if v is None:
        return "—"
    if isinstance(v, str) or not math.isfinite(v):
        return str(v)
    return format(v, fmt)


def duration(us) -> str:
    """Microseconds in the unit that reads best: ``812 µs``, ``12.3 ms``, ``1.52 s``."""
    if us is None or isinstance(us, str) or not math.isfinite(us):
        return _num(us, "")
    if us < 1e3:
        return f"{us:.3g} µs"
    if us < 1e6:
        return f"{us / 1e3:.3g} ms"
    return f"{us / 1e6:.3g} s"


def _time(rec: dict) -> str:
    if "median_us" not in rec:
        return rec.get("status", "—")
    return f"{duration(rec['median_us'])} ({duration(rec['p20_us'])}–{duration(rec['p80_us'])})"


def header(device: str) -> list[str]:
    rate = "TFLOP/s" if device == "cuda" else "GFLOP/s"
    return ["op", "shape", "mode", "dtype", "impl", "median (p20–p80)", "per step", "× torch", rate, "GB/s",
            "floor", "% of floor", "err out", "err grad", "verdict"]


def table_rows(rows: list[dict], device: str = "cpu") -> list[list[str]]:
    """One line per implementation that ran (torch's included), in case order."""
    flops_unit = 1e12 if device == "cuda" else 1e9
    out = []
    for row in rows:
        head = [row["op"], row["shape"], row["mode"], row["dtype"]]
        if row.get("status") == "error":
            out.append(head + ["—", f"case failed: {row.get('reason', '')[:80]}"] + [""] * 9)
            continue
        for name, rec in row["impls"].items():
            if rec.get("status") == "unavailable":
                continue
            if rec.get("status") == "error":
                out.append(head + [name, f"error: {rec.get('reason', '')[:80]}"] + [""] * 8 + ["CRASH"])
                continue
            frac = rec.get("floor_fraction")
            rate = rec.get("tflops")
            out.append(head + [
                name, _time(rec), duration(rec.get("us_per_step")),
                _num(rec.get("speedup"), ".2f") if not (name == "torch") else "1",
                _num(None if rate is None else rate * 1e12 / flops_unit, ".3g"), _num(rec.get("gbps"), ".3g"),
                duration(row.get("floor_us")),
                "—" if frac is None else f"{100 * frac:.0f}%",
                _num(rec.get("err_out"), ".1e"), _num(rec.get("err_grad"), ".1e"),
                rec.get("verdict", "(baseline)" if is_torch(name) else "—")])
    return out


def not_run(rows: list[dict]) -> list[str]:
    """The implementations that could not run, grouped by reason."""
    reasons: dict[str, list[str]] = {}
    for row in rows:
        for name, rec in row.get("impls", {}).items():
            if rec.get("status") == "unavailable":
                reasons.setdefault(f"{name}: {rec.get('reason')}", []).append(row["op"])
    return [f"- {reason} ({', '.join(sorted(set(ops)))})" for reason, ops in reasons.items()]


def meta_lines(meta: dict) -> list[str]:
    """Where, when and with what: device, versions, timer, the measured ceilings (markdown list items)."""
    lines = []
    for key in ("device_name", "device", "threads", "python", "torch", "torch_cuda", "cudnn", "triton", "fastseq",
                "git", "started", "elapsed_s", "timer", "rounds", "min_time_s", "cpus", "load_average_at_start",
                "load_average_at_end"):
        if meta.get(key) is not None:
            lines.append(f"- **{key}**: `{meta[key]}`")
    c = meta.get("ceilings")
    if c:
        rates = ", ".join(f"{k} {v / 1e9:.4g} GFLOP/s" for k, v in c["matmul_flops"].items())
        lines.append(f"- **measured ceilings**: matrix {rates}; bandwidth {c['bandwidth'] / 1e9:.4g} GB/s; "
                     f"call latency {c['call_latency'] * 1e6:.3g} µs ({c['how']})")
    return lines


def markdown(meta: dict, rows: list[dict]) -> str:
    lines = [f"# fastseq bench: preset `{meta.get('preset')}` on {meta.get('device_name')}", ""]
    lines += meta_lines(meta)
    lines += ["", "Medians over the pooled samples of interleaved rounds, p20–p80 in parentheses; `× torch` is "
              "torch's median over this implementation's (> 1: faster; `+graph` rows against torch's graph). "
              "Errors are ‖out − ref‖/‖ref‖ against the float64 reference on the same numbers (worst output, "
              "worst gradient); `ok`: within 2 × torch's error + the rounding floor (SPEC.md), `WRONG` "
              "otherwise. The floor is max(FLOPs / matrix rate, bytes / bandwidth) + calls × call latency, from "
              "the ceilings above.", ""]
    lines.append(terminal_table(rows, meta.get("device", "cpu")))
    missing = not_run(rows)
    if missing:
        lines += ["", "Not run here:"] + missing
    return "\n".join(lines) + "\n"


def terminal_table(rows: list[dict], device: str = "cpu") -> str:
    from tabulate import tabulate

    return tabulate(table_rows(rows, device), headers=header(device), tablefmt="github", disable_numparse=True)


# ---------------------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------------------

SWEEP_KEYS = ("batch", "steps", "hidden", "q_len", "head_dim")


def _speedup_series(rows: list[dict]) -> dict:
    """``{(op, key): {(impl, mode, dtype): {x: [speedups]}}}`` for the size keys an op's cases sweep."""
    series: dict = {}
    for row in rows:
        if row.get("status") != "ok":
            continue
        for name, rec in row["impls"].items():
            if is_torch(name) or "speedup" not in rec:
                continue
            for key in SWEEP_KEYS:
                if key in row["sizes"]:
                    line = series.setdefault((row["op"], key), {}).setdefault((name, row["mode"], row["dtype"]), {})
                    line.setdefault(row["sizes"][key], []).append(rec["speedup"])
    # keep only the (op, key) pairs with at least two values of the key
    return {k: v for k, v in series.items() if len({x for line in v.values() for x in line}) >= 2}


def plot(rows: list[dict], path: str, title: str) -> str:
    """Speed-up against torch (log scale) over each swept size, one line per fastseq backend (and mode, dtype);
    where a size has several cases (other sizes differ), the line shows their geometric mean. Without any sweep,
    one bar per case. Writes a PNG to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = _speedup_series(rows)
    if series:
        n = len(series)
        cols = min(3, n)
        fig, axes = plt.subplots((n + cols - 1) // cols, cols, figsize=(5 * cols, 3.6 * ((n + cols - 1) // cols)),
                                 squeeze=False)
        for ax, ((op, key), lines) in zip(axes.flat, sorted(series.items())):
            for (name, mode, dtype), points in sorted(lines.items()):
                xs = sorted(points)
                ys = [math.exp(sum(math.log(v) for v in points[x]) / len(points[x])) for x in xs]
                ax.plot(xs, ys, marker="o", label=f"{name} {mode} {dtype}")
            ax.axhline(1.0, color="grey", lw=0.8, ls="--")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log", base=2)
            ax.set_title(f"{op}: speed-up over {key}")
            ax.set_xlabel(key)
            ax.set_ylabel("torch time / fastseq time")
            ax.legend(fontsize=7)
        for ax in list(axes.flat)[n:]:
            ax.axis("off")
    else:
        bars = [(f"{row['op']} {row['shape']} {row['mode']} [{name}]", rec["speedup"])
                for row in rows if row.get("status") == "ok"
                for name, rec in row["impls"].items() if not is_torch(name) and "speedup" in rec]
        fig, ax = plt.subplots(figsize=(10, 0.35 * max(len(bars), 4) + 1))
        if bars:
            ax.barh([b[0] for b in bars], [b[1] for b in bars])
            ax.axvline(1.0, color="grey", lw=0.8, ls="--")
            ax.set_xscale("log", base=2)
            ax.invert_yaxis()
        else:
            ax.text(0.5, 0.5, "no fastseq backend ran here: nothing to compare", ha="center", va="center")
            ax.axis("off")
        ax.set_xlabel("torch time / fastseq time")
        ax.tick_params(axis="y", labelsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def headline(rows: list[dict]) -> str:
    """The short table (README, end of a run): per case torch's median and each fastseq backend's, with its
    speed-up and verdict."""
    from tabulate import tabulate

    lines = []
    for row in rows:
        t = row.get("impls", {}).get("torch", {})
        for name, rec in row.get("impls", {}).items():
            if is_torch(name) or "median_us" not in rec:
                continue
            lines.append([row["op"], row["shape"], row["mode"], row["dtype"], duration(t.get("median_us")), name,
                          duration(rec["median_us"]), _num(rec.get("speedup"), ".2f"), rec.get("verdict", "—")])
    return tabulate(lines, headers=["op", "shape", "mode", "dtype", "torch", "fastseq", "time", "× torch",
                                    "numerics"], tablefmt="github", disable_numparse=True)
