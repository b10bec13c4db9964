#!/usr/bin/env python
"""This machine's ceilings for the C++ CPU kernels, and the floor they give each of issue 6's target shapes
(benchmarks/NOTES_cpu.md explains the model).

Ceilings, one thread (``--threads``), medians of repeated runs:
- read bandwidth by working set, as the kernels read weights: the small-M kernel at M = 1 against a weight matrix
  of 384 KiB (L2), 4 MiB (L3) and 256 MiB (memory), read once per call, the call's fixed cost subtracted; and a
  large copy (256 MiB, bytes read + written);
- multiply-add rate: torch.mm on 2048² (MKL at its best) and fastseq's small-M kernel on an 8 × 1024 · 256 product
  (``torch.ops.fastseq_cpp.small_gemm_nt``, weights L2/L3-resident);
- per-call overhead: a ``torch.ops.fastseq_cpp`` call doing no work, and a fastseq cell module call at H = 1.

Floor of a shape = max(multiply-adds / rate, weight bytes / bandwidth of the cache level they live in) + the
per-call overhead of the calls it makes.

    python benchmarks/floor_cpu.py [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

import fastseq


def _seconds(fn, min_time: float = 0.3) -> float:
    """Median seconds per call over blocks of calls lasting about ``min_time / 5`` each."""
    fn()
    n, t0 = 1, time.perf_counter()
    while time.perf_counter() - t0 < min_time / 20:
        fn()
        n += 1
    per_block = max(1, n)
    blocks = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(per_block):
            fn()
        blocks.append((time.perf_counter() - t0) / per_block)
    return statistics.median(blocks)


def ceilings() -> dict:
    c = {}
    gemm = torch.ops.fastseq_cpp.small_gemm_nt
    one, w1 = torch.randn(1, 1), torch.randn(1, 1)
    c["op_call_us"] = _seconds(lambda: gemm(one, w1, None, None, "best")) * 1e6
    x = torch.randn(1, 256)
    for label, nbytes in (("L2", 384 << 10), ("L3", 4 << 20), ("memory", 256 << 20)):
        w = torch.randn(nbytes // 1024, 256)
        seconds = _seconds(lambda: gemm(x, w, None, None, "best")) - c["op_call_us"] * 1e-6
        c[f"read_{label}_GBps"] = nbytes / seconds / 1e9
    src, dst = torch.randn(64 << 20), torch.empty(64 << 20)
    c["copy_GBps"] = 2 * src.numel() * 4 / _seconds(lambda: dst.copy_(src)) / 1e9
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    c["mm_2048_GFLOPs"] = 2 * 2048 ** 3 / _seconds(lambda: torch.mm(a, b)) / 1e9
    x, w = torch.randn(8, 256), torch.randn(1024, 256)
    c["small_gemm_8x1024x256_GFLOPs"] = 2 * 8 * 1024 * 256 / _seconds(lambda: gemm(x, w, None, None, "best")) / 1e9
    cell = fastseq.LSTMCell(1, 1, backend="cpp")
    h = (torch.randn(1, 1), torch.randn(1, 1))
    with torch.no_grad():
        c["cell_module_call_us"] = _seconds(lambda: cell(one, h)) * 1e6
    return c


def floors(c: dict) -> list[tuple[str, float, str]]:
    """(shape, floor in ms, what bounds it) for issue 6's targets, fp32, inference."""
    rate = c["small_gemm_8x1024x256_GFLOPs"] * 1e9 / 2  # multiply-adds per second
    rows = []
    for kind, gates in (("lstm_cell", 4), ("gru_cell", 3), ("rnn_cell", 1)):
        for B, H in ((1, 128), (8, 512)):
            macs, wbytes = B * gates * H * 2 * H, 4 * gates * H * 2 * H
            bw = c["read_L2_GBps"] if wbytes <= (512 << 10) else c["read_L3_GBps"]
            t_work, t_bytes = macs / rate, wbytes / (bw * 1e9)
            t = max(t_work, t_bytes) + c["cell_module_call_us"] * 1e-6
            rows.append((f"{kind} B={B} H={H}, one step", t * 1e3,
                         "weights' bytes" if t_bytes >= t_work else "multiply-adds"))
    for kind, gates in (("lstm", 4), ("gru", 3)):
        for B in (1, 8):
            H, T, D = 256, 200, 2
            proj = 2 * T * B * H * D * gates * H / (c["mm_2048_GFLOPs"] * 1e9)  # x·W_ihᵀ, torch's GEMM
            macs = T * D * B * gates * H * H
            wbytes = T * D * 4 * gates * H * H  # W_hh of the step's direction, read every step (L3)
            t_rec = max(macs / rate, wbytes / (c["read_L3_GBps"] * 1e9))
            rows.append((f"{kind} layer B={B} H=256 T=200 bi, per layer, one thread", (proj + t_rec) * 1e3,
                         "recurrence weights' bytes" if wbytes / (c["read_L3_GBps"] * 1e9) >= macs / rate
                         else "multiply-adds"))
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), load {os.getloadavg()[0]:.1f}")
    c = ceilings()
    for k, v in c.items():
        print(f"  {k:<30} {v:10.1f}")
    for shape, ms, bound in floors(c):
        print(f"  floor {shape:<52} {ms:8.3f} ms  ({bound})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
