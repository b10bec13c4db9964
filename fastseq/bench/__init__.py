"""``python -m fastseq bench``: every available fastseq backend against torch on the same tensors.

For each case of a preset (:mod:`fastseq.bench.presets`), torch's implementation and every fastseq kernel backend
that can run it are built on the same tensors and parameters (:mod:`fastseq.bench.cases`), run once to measure
their error against the float64 reference, then timed in interleaved rounds (:mod:`fastseq.bench.timing`: CUDA
events on a GPU with a CUDA-graph replay of the decoder loops; ``torch.utils.benchmark`` on CPU), judged by
SPEC.md's error rule, and reported with µs per step, TFLOP/s, GB/s and the fraction of the floor reached
(:mod:`fastseq.bench.runner`): a markdown table on the terminal and in ``results.md``, ``results.json`` with
everything, and ``speedup.png`` (:mod:`fastseq.bench.report`). ``--record-crossovers`` turns the measurements
into the points ``backend="auto"`` decides by (:mod:`fastseq.bench.crossovers`). Exits non-zero when a fastseq
kernel crashed or broke the error rule.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import time

import torch

from fastseq.bench.presets import DTYPES, MODES, OPS, PRESETS, describe_presets, preset

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", choices=list(PRESETS), default="quick",
                   help="which cases (default quick: about a minute on a 2-core CPU):\n" + describe_presets())
    p.add_argument("--ops", nargs="+", choices=OPS, help="only these operators")
    p.add_argument("--modes", nargs="+", choices=MODES, help="only these modes")
    p.add_argument("--dtypes", nargs="+", choices=DTYPES, help="only these dtypes")
    p.add_argument("--backends", nargs="+", choices=("triton", "cuda", "cpp"),
                   help="fastseq backends to measure (default: every one available for the device; Triton on a "
                        "CPU only when asked, as the interpreter is a test tool)")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda where a GPU is visible, else cpu")
    p.add_argument("--out", default="bench-results", help="folder for results.json, results.md, speedup.png")
    p.add_argument("--min-time", type=float, default=None,
                   help="seconds of samples per implementation and round (default: 0.1 on CPU, 0.05 on CUDA)")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds per case")
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds; the cases not started by then are listed as skipped")
    p.add_argument("--record-crossovers", nargs="?", const="", default=None, metavar="PATH",
                   help="write the measured crossovers into the table backend='auto' reads (default: the "
                        "package's crossovers.json)")
    p.add_argument("--from-results", metavar="RESULTS_JSON",
                   help="measure nothing: print the tables of an earlier run's results.json (e.g. one made on a "
                        "GPU machine) and, with --record-crossovers, record its crossovers")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-plot", action="store_true", help="do not write speedup.png")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--list", action="store_true", help="list the cases of the preset and exit")


def _git() -> str | None:
    try:
        rev = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", REPO, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (rev + ("+dirty" if dirty else "")) if rev else None
    except (OSError, subprocess.SubprocessError):
        return None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} logical CPUs)"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} logical CPUs)"


def _load_average() -> list[float] | None:
    """The 1/5/15-minute load averages: a busy machine stretches CPU timings (and their spread)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def _meta(args, device: torch.device, timer, backends: list[str]) -> dict:
    import fastseq

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    meta = {
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "argv": sys.argv, "preset": args.preset, "device": device.type,
        "python": platform.python_version(), "platform": platform.platform(), "torch": torch.__version__,
        "torch_cuda": torch.version.cuda, "triton": triton_version, "fastseq": fastseq.__version__,
        "git": _git(), "threads": torch.get_num_threads(), "timer": timer.name, "rounds": args.rounds,
        "min_time_s": args.min_time, "backends_measured": backends, "fastseq_backends": fastseq.backends(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET"),
        "cpus": os.cpu_count(), "load_average_at_start": _load_average(),
    }
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        meta.update(device_name=p.name, capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
                    cudnn=torch.backends.cudnn.version())
    else:
        meta["device_name"] = _cpu_name()
    return meta


def _backends(args, device: torch.device) -> list[str]:
    import fastseq

    if args.backends:
        return list(args.backends)
    info = fastseq.backends()
    return [b for b in fastseq.dispatch.KERNEL_BACKENDS if info[b]["available"]
            and not (b == "triton" and device.type == "cpu")]


def select_specs(args, device: torch.device) -> list:
    specs = preset(args.preset, device.type)
    return [s for s in specs if (not args.ops or s.op in args.ops) and (not args.modes or s.mode in args.modes)
            and (not args.dtypes or s.dtype in args.dtypes)]


def _missing_requirements(plot: bool) -> list[str]:
    import importlib.util

    names = ["tabulate", "tqdm"] + (["matplotlib"] if plot else [])
    return [n for n in names if importlib.util.find_spec(n) is None]


def _record(args, rows: list[dict], device_type: str, machine: str, json_path: str) -> None:
    from fastseq.bench import crossovers

    path = args.record_crossovers or None
    source = os.path.relpath(os.path.abspath(json_path), REPO)
    source = source if not source.startswith("..") else os.path.abspath(json_path)
    new = crossovers.points(rows, device_type, machine, source)
    table = crossovers.record(new, *(() if path is None else (path,)))
    print(f"recorded {len(new)} crossover points ({len(table['measured'])} in all) into "
          f"{path or 'the package crossovers.json'}")


def _from_results(args) -> int:
    """``--from-results``: the tables (and crossovers) of an earlier run, without measuring."""
    import json

    from fastseq.bench import report
    from fastseq.bench.runner import failures

    with open(args.from_results) as f:
        data = json.load(f)
    meta, rows = data["meta"], data["cases"]
    print(report.terminal_table(rows, meta.get("device", "cpu")))
    print("\nSummary (fastseq against torch on the same tensors):\n" + report.headline(rows))
    if args.record_crossovers is not None:
        _record(args, rows, meta["device"], meta["device_name"], args.from_results)
    return 1 if failures(rows) else 0


def run(args) -> int:
    """The command: measure, write, print. Returns the exit status."""
    if args.from_results:
        return _from_results(args)
    missing = _missing_requirements(not args.no_plot)
    if missing:
        print(f"fastseq bench needs {', '.join(missing)}: pip install 'fastseq[bench]'", file=sys.stderr)
        return 2
    from tqdm import tqdm

    from fastseq.bench import report
    from fastseq.bench.runner import failures, run_case
    from fastseq.bench.timing import make_timer, measure_ceilings

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("fastseq bench: --device cuda, but no CUDA GPU is visible", file=sys.stderr)
        return 2
    specs = select_specs(args, device)
    if args.list:
        for s in specs:
            print(s.label)
        return 0
    if not specs:
        print("fastseq bench: no case left after the filters", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.min_time is None:
        args.min_time = 0.05 if device.type == "cuda" else 0.1
    t0 = time.monotonic()
    timer = make_timer(device, args.min_time)
    backends = _backends(args, device)
    meta = _meta(args, device, timer, backends)
    print(f"fastseq bench: preset {args.preset}, {len(specs)} cases on {meta['device_name']}; torch "
          f"{torch.__version__}; fastseq backends measured: {', '.join(backends) or 'none'}", flush=True)
    ceilings = measure_ceilings(device, sorted({s.dtype for s in specs}), make_timer(device, 0.2))
    meta["ceilings"] = ceilings.as_dict()
    os.makedirs(args.out, exist_ok=True)
    json_path, md_path, png_path = (os.path.join(args.out, n) for n in ("results.json", "results.md",
                                                                         "speedup.png"))
    rows = []
    bar = tqdm(specs, desc="fastseq bench", unit="case", disable=True if args.no_progress else None,
               file=sys.stderr, dynamic_ncols=True)
    for i, spec in enumerate(bar):
        bar.set_postfix_str(spec.label, refresh=False)
        if args.time_budget is not None and time.monotonic() - t0 > args.time_budget:
            rows.append({"op": spec.op, "shape": spec.shape, "sizes": dict(spec.sizes), "options":
                         dict(spec.options), "dtype": spec.dtype, "mode": spec.mode, "label": spec.label,
                         "status": "skipped", "reason": "time budget spent", "impls": {}})
            continue
        rows.append(run_case(spec, device, backends, timer, args.rounds, ceilings, seed=args.seed + i))
        meta["elapsed_s"] = round(time.monotonic() - t0, 1)
        report.write_json(json_path, meta, rows)  # after every case: an interrupted run keeps what it measured
    bar.close()
    meta["elapsed_s"] = round(time.monotonic() - t0, 1)
    meta["load_average_at_end"] = _load_average()
    failed = failures(rows)
    meta["failures"] = failed
    meta["skipped"] = sum(r.get("status") == "skipped" for r in rows)
    report.write_json(json_path, meta, rows)
    with open(md_path, "w") as f:
        f.write(report.markdown(meta, rows))
    if not args.no_plot:
        report.plot(rows, png_path, f"fastseq bench ({args.preset}) on {meta['device_name']}, torch "
                                    f"{torch.__version__}")
    print("\n".join(report.meta_lines(meta)))
    print(report.terminal_table(rows, device.type))
    for line in report.not_run(rows):
        print(line)
    print("\nSummary (fastseq against torch on the same tensors):\n" + report.headline(rows))
    if args.record_crossovers is not None:
        _record(args, rows, device.type, meta["device_name"], json_path)
    print(f"wrote {json_path}, {md_path}" + ("" if args.no_plot else f", {png_path}")
          + f" ({meta['elapsed_s']} s; {meta['skipped']} skipped)")
    if failed:
        print(f"{len(failed)} FAILED:", *failed, sep="\n  ", file=sys.stderr)
        return 1
    return 0
