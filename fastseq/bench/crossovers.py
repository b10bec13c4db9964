"""From measurements to ``backend="auto"``: the points of ``fastseq/crossovers.json``.

Each forward (``inference``) and forward+backward (``training``) case that ran torch and at least one fastseq
backend becomes a point: the operator, device type, dtype, mode, the sizes :func:`fastseq.dispatch.select` is
given for such a call (cells: batch and hidden; layers: batch, hidden, steps; attention: q_len, kv_len,
head_dim), and the median µs of every implementation whose numbers passed the error check (a fast wrong kernel
never becomes a winner). Cases that map to the same point (a layer measured with one and with two layers, say)
are summed. Recording replaces the points of the same key and keeps all others (other devices, dtypes, sizes).
"""

from __future__ import annotations

import json
import os

from fastseq import dispatch
from fastseq.bench.presets import ATTENTION_OPS, CELL_OPS

_MODE = {"fwd": "inference", "fwd+bwd": "training"}


def dispatch_sizes(op: str, sizes: dict) -> dict:
    """The sizes the modules give :func:`fastseq.dispatch.select` for a call of this case."""
    if op in CELL_OPS:
        keys = ("batch", "hidden")
    elif op in ATTENTION_OPS:
        keys = ("q_len", "kv_len", "head_dim")
    else:
        keys = ("batch", "hidden", "steps")
    return {k: int(sizes[k]) for k in keys if k in sizes}


def points(rows: list[dict], device_type: str, machine: str, source: str) -> list[dict]:
    """The crossover points the rows of a run measured (see the module's docstring)."""
    merged: dict[tuple, dict] = {}
    for row in rows:
        mode = _MODE.get(row.get("mode"))
        if mode is None or row.get("status") != "ok":
            continue
        times = {}
        for name, rec in row["impls"].items():
            if name not in ("torch", *dispatch.KERNEL_BACKENDS) or "median_us" not in rec:
                continue
            if name == "torch" or rec.get("verdict") in ("ok", "n/a"):
                times[name] = rec["median_us"]
        if "torch" not in times or len(times) < 2:
            continue  # nothing to choose between
        sizes = dispatch_sizes(row["op"], row["sizes"])
        key = (row["op"], device_type, row["dtype"], mode, tuple(sorted(sizes.items())))
        if key in merged:
            old = merged[key]["times_us"]
            merged[key]["times_us"] = {k: old[k] + v for k, v in times.items() if k in old}
        else:
            merged[key] = {"op": row["op"], "device": device_type, "dtype": row["dtype"], "mode": mode,
                           "sizes": sizes, "times_us": times}
    out = []
    for p in merged.values():
        p["times_us"] = {k: round(v, 3) for k, v in sorted(p["times_us"].items())}
        p["winner"] = min(p["times_us"], key=p["times_us"].get)
        p["machine"], p["source"] = machine, source
        out.append(p)
    return out


def _key(p: dict) -> tuple:
    return p["op"], p["device"], p["dtype"], p["mode"], tuple(sorted(p["sizes"].items()))


def record(new_points: list[dict], path: str = dispatch.CROSSOVERS_PATH) -> dict:
    """Merge ``new_points`` into the table at ``path`` (replacing points of the same key); returns the table."""
    try:
        with open(path) as f:
            table = json.load(f)
    except FileNotFoundError:
        table = {"measured": [], "predicted": []}
    replaced = {_key(p) for p in new_points}
    kept = [p for p in table.get("measured", []) if _key(p) not in replaced]
    table["measured"] = sorted(kept + new_points, key=lambda p: (p["device"], p["op"], p["dtype"], p["mode"],
                                                                 sorted(p["sizes"].items())))
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(table, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)
    return table
