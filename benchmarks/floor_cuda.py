#!/usr/bin/env python
"""The per-step floor of the CUDA persistent layer kernel (``csrc/cuda/rnn_persistent.cu``) on an H100: a model, not
a measurement.

The slicing (units per block, blocks, shared memory) is the extension's own plan on a described H100 SXM5
(``fastseq._C.cuda_layer_plan_model``: 132 SMs, 227 KiB of shared memory per block, 228 KiB per SM, the occupancy
modelled from shared memory and threads), so this needs ``fastseq._C`` built with the CUDA kernels. Per forward
step of a persistent launch, every block:

- reads the whole state h (``B·H_out`` elements of the product dtype) from L2: ``t_h = B·H_out·s / rate_L2(SM)``,
  with the SM's L2 read rate an assumption (64 B/clk at 1.755 GHz, as in ``floor_layers.py``), shared by the
  blocks resident on one SM;
- per pass of 16 rows, reads its W_hh slice (``C·H_out·s`` bytes, C = G·units columns) from shared memory at
  128 B/clk, and does ``2·rows·C·H_out`` FLOPs at its SM's share of the dtype's rate (float32: FMAs at 128 lanes
  per SM; half precision: the tensor cores' dense rate / 132); the pass costs the larger of the two;
- pays one grid barrier (1 µs, an assumption; two with a projection).

``step = barrier + t_h + Σ_passes max(t_smem, t_flops)``; the per-step fallback (cuBLAS per step) is bounded below
by two launches per direction and step (2 µs each, the low end of the assumed 2-5 µs), and cuDNN's non-persistent
algorithm by one launch per step. Run: ``python benchmarks/floor_cuda.py`` (prints the table of
``benchmarks/NOTES_cuda.md``).
"""

from __future__ import annotations

import argparse

from floor_cells import ELEMENT_BYTES, GATES, H100_SXM_SPEC

CLOCK = 1.755e9
SM_COUNT = 132
SM_L2_BYTES_PER_S = 64 * CLOCK       # assumption (floor_layers.py)
SM_SMEM_BYTES_PER_S = 128 * CLOCK    # 32 banks × 4 B per clock
BARRIER_S = 1e-6                     # assumption
LAUNCH_S = 2e-6                      # low end of the assumed 2-5 µs
H100_PLAN = dict(sms=132, smem_optin=227 * 1024, smem_per_sm=228 * 1024)
DTYPE_NAMES = {"bfloat16": "bfloat16", "float32": "float32", "float16": "float16"}


def step_floor(cell: str, batch: int, hidden: int, dtype: str, directions: int = 1) -> dict:
    import fastseq._C as C

    plan = C.cuda_layer_plan_model(cell, DTYPE_NAMES[dtype], False, directions, batch, hidden, 0, **H100_PLAN)
    s = ELEMENT_BYTES[dtype]
    out = {"cell": cell, "dtype": dtype, "H": hidden, "B": batch, "D": directions, "path": plan["path"]}
    if plan["path"] != "persistent":
        out.update(reason=plan["reason"])
        return out
    units, blocks = plan["units_per_block"], plan["blocks"]
    per_sm = -(-blocks // SM_COUNT)  # blocks sharing one SM's L2 port and shared memory
    cols = GATES[cell] * units
    sm_rate = H100_SXM_SPEC["flops_per_s"][dtype] / SM_COUNT
    t_h = per_sm * batch * hidden * s / SM_L2_BYTES_PER_S
    passes, t_passes = -(-batch // 16), 0.0
    for p in range(passes):
        rows = min(16, batch - 16 * p) if dtype == "float32" else 16  # FMA skips absent rows; MMA computes 16
        t_smem = per_sm * cols * hidden * s / SM_SMEM_BYTES_PER_S
        t_flops = per_sm * 2 * rows * cols * hidden / sm_rate
        t_passes += max(t_smem, t_flops)
    step = BARRIER_S + t_h + t_passes
    out.update(units=units, blocks=blocks, smem_kib=plan["shared_memory_bytes"] / 1024, t_h_us=t_h * 1e6,
               t_passes_us=t_passes * 1e6, step_us=step * 1e6,
               fallback_us=2 * directions * LAUNCH_S * 1e6, cudnn_us=LAUNCH_S * 1e6)
    return out


def markdown_table(cells, batches, hiddens, dtypes) -> str:
    lines = ["| cell | dtype | H | B | units/block | blocks | smem KiB | h from L2 µs | W·h passes µs | "
             "step µs (model) | per-step fallback ≥ µs | cuDNN non-persistent ≥ µs |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for cell in cells:
        for dtype in dtypes:
            for h in hiddens:
                for b in batches:
                    f = step_floor(cell, b, h, dtype)
                    if f["path"] != "persistent":
                        lines.append(f"| {cell} | {dtype} | {h} | {b} | fallback: {f['reason']} ||||||||")
                        continue
                    lines.append(f"| {cell} | {dtype} | {h} | {b} | {f['units']} | {f['blocks']} | {f['smem_kib']:.0f} | "
                                 f"{f['t_h_us']:.2f} | {f['t_passes_us']:.2f} | {f['step_us']:.2f} | "
                                 f"{f['fallback_us']:.0f} | {f['cudnn_us']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cells", default="lstm,gru")
    p.add_argument("--batch", default="1,8,32")
    p.add_argument("--hidden", default="256,512,1024")
    p.add_argument("--dtypes", default="bfloat16,float32")
    a = p.parse_args(argv)
    print(markdown_table(a.cells.split(","), [int(b) for b in a.batch.split(",")],
                         [int(h) for h in a.hidden.split(",")], a.dtypes.split(",")), end="")


if __name__ == "__main__":
    main()
