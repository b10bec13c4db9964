"""``python -m fastseq``: the command line.

``check``: every available fastseq kernel against the float64 reference on random inputs, next to torch's own
error in the same dtype; prints a table and exits non-zero when any case fails.

``bench``: every available fastseq backend against torch on the same tensors, interleaved: medians with p20/p80,
ratios, errors against the float64 reference, the floor; a markdown table, JSON and plots (``fastseq/bench``);
``--record-crossovers`` writes what ``backend="auto"`` decides by. Exits non-zero when a fastseq kernel crashed or
broke the error rule.

``aot``: every Triton kernel compiled ahead of time for the GPU archs (default sm_80 and sm_90), without a GPU:
registers, spills, shared memory, tensor-core and local-memory instructions and occupancy per kernel and
specialisation (``fastseq/aot.py``); exits non-zero, naming them, where one fails to compile or breaks a limit.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from fastseq.dispatch import KERNEL_BACKENDS
from fastseq.tables import markdown_table

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# (batch, input_size, hidden_size): odd sizes, batch 1, and (on GPU) a size of practice.
SHAPES = {"cpu": [(1, 7, 37), (13, 40, 70)], "cuda": [(1, 7, 37), (13, 40, 70), (64, 256, 512)]}
# (batch, steps, input_size, hidden_size) of the layers (two layers, bidirectional): one that fits a kernel tile
# and one that does not; on GPU also a size of practice.
LAYER_SHAPES = {
    "cpu": [(1, 3, 5, 7), (3, 5, 6, 37)],
    "cuda": [(1, 3, 5, 7), (3, 5, 6, 37), (32, 64, 256, 256)],
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m fastseq", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="every available kernel against the float64 reference")
    check.add_argument("--device", choices=["cpu", "cuda"], default=None,
                       help="default: cuda where a GPU is visible, else cpu")
    check.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    check.add_argument("--ops", nargs="+", default=None, help="default: every op (see the table)")
    check.add_argument("--backends", nargs="+", choices=KERNEL_BACKENDS + ("torch",), default=None,
                       help="default: every kernel backend available for the device")
    check.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    check.add_argument("--no-interpret", action="store_true",
                       help="on a machine without a GPU, do not re-run under TRITON_INTERPRET=1")
    check.add_argument("--seed", type=int, default=0)
    bench = sub.add_parser("bench", help="every available backend against torch: times, errors, floors",
                           formatter_class=argparse.RawTextHelpFormatter)
    from fastseq import bench as bench_module

    bench_module.add_arguments(bench)
    aot = sub.add_parser("aot", help="every Triton kernel compiled for the GPU archs without a GPU: a resource "
                                     "report")
    from fastseq import aot as aot_module

    aot_module.add_arguments(aot)
    return parser


def _reexec_with_interpreter(argv: list[str]) -> None:
    """Triton runs on CPU only when TRITON_INTERPRET=1 is set before fastseq is imported: start again so."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    print("fastseq check: no GPU visible; checking the Triton kernels on CPU under TRITON_INTERPRET=1",
          file=sys.stderr, flush=True)
    os.execve(sys.executable, [sys.executable, "-m", "fastseq", *argv], env)


def _reexec_without_interpreter(argv: list[str]) -> None:
    """Compiling for a GPU needs Triton's real JIT functions, which TRITON_INTERPRET=1 replaces: start again
    without it."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    print("fastseq aot: TRITON_INTERPRET=1 is set; compiling needs Triton's JIT, so running again without it",
          file=sys.stderr, flush=True)
    os.execve(sys.executable, [sys.executable, "-m", "fastseq", *argv], env)


def _format_err(value: float | None) -> str:
    return "missing/NaN" if value is None else f"{value:.2e}"


def _table(rows) -> str:
    header = ["op", "backend", "device", "dtype", "shape", "out err", "grad err", "torch out err",
              "torch grad err", "verdict", "worst"]
    return markdown_table(header, [[r.op, r.backend, r.device, r.dtype, r.shape, _format_err(r.out_err),
                                     _format_err(r.grad_err), _format_err(r.torch_out_err),
                                     _format_err(r.torch_grad_err), r.verdict, r.worst] for r in rows])


def run_check(args) -> int:
    import fastseq
    from fastseq import check, dispatch

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    known = {**check.CELLS, **check.LAYERS}
    ops = args.ops or list(known)
    unknown = [op for op in ops if op not in known]
    if unknown:
        raise SystemExit(f"fastseq check: unknown op(s) {unknown}; choose from {list(known)}")
    info = fastseq.backends()
    print(f"fastseq {fastseq.__version__}, torch {torch.__version__}, device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))
    for name in KERNEL_BACKENDS:
        status = "available" if info[name]["available"] else f"unavailable: {info[name]['reason']}"
        print(f"  backend {name}: {status}")
    rows = []
    for op in ops:
        for backend in args.backends or KERNEL_BACKENDS:
            try:
                dispatch.select(known[op][0]._op, device, torch.float32, backend)
            except fastseq.BackendUnavailableError as e:
                if args.backends:  # asked for by name: say why it is not checked
                    print(f"  skipped {op} on {backend}: {e}")
                continue
            is_layer = op in check.LAYERS
            for dtype_name in args.dtypes:
                for shape in (LAYER_SHAPES if is_layer else SHAPES)[device.type]:
                    torch.manual_seed(args.seed)
                    run = check.check_layer if is_layer else check.check_cell
                    rows.append(run(op, backend, device, DTYPES[dtype_name], shape))
    if not rows:
        print("no fastseq kernel backend can run here (see the reasons above): nothing to check")
        return 0
    print(_table(rows))
    failed = [r for r in rows if r.verdict != "ok"]
    print(f"{len(rows) - len(failed)} passed, {len(failed)} failed")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "device": str(device), "rows": [r.as_dict() for r in rows]},
                      f, indent=2)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = _parser().parse_args(argv)
    if args.command == "check":
        from fastseq import dispatch

        device_is_cpu = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")) == "cpu"
        if device_is_cpu and not dispatch.TRITON_INTERPRET and not args.no_interpret:
            _reexec_with_interpreter(argv)
        return run_check(args)
    if args.command == "bench":
        from fastseq import bench

        return bench.run(args)
    if args.command == "aot":
        if os.environ.get("TRITON_INTERPRET", "0") == "1":
            _reexec_without_interpreter(argv)
        from fastseq import aot

        return aot.run(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
