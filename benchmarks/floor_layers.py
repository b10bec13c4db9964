#!/usr/bin/env python
"""The floor of a recurrent *layer* (whole sequence) on a GPU: a model, not a measurement.

A layer of ``D`` directions over ``T`` steps, batch ``B``, input size ``I``, hidden ``H`` (``Hout`` = H, no
projection here), ``G`` gates (LSTM 4, GRU 3, RNN 1), element size ``s``:

- **Input projection**, every step and direction at once: one GEMM of ``2·T·B·D·G·H·I`` FLOPs, reading ``x``
  and ``W_ih`` once and writing the ``T·B·D·G·H`` projections (float32 accumulate, stored in ``s``).
- **Recurrence**, strictly sequential in time: per step ``2·B·G·H·H`` FLOPs per direction against ``W_hh``
  (``G·H·H·s`` bytes). Per step a design pays the larger of moving ``W_hh`` to the SMs that need it and the
  FLOPs over the rate of those SMs, plus its synchronisation: a kernel launch per step (cuDNN's usual
  algorithm), a grid barrier (persistent kernels), or nothing (fastseq's Triton kernel: one program owns its
  batch rows for all steps and synchronises only its own threads).
- fastseq's Triton kernel (``kernels/rnn_seq.py``) runs ``D·⌈B/BLOCK_B⌉`` programs, one SM each; every program
  streams all of ``W_hh`` from L2 every step unless ``H`` fits one tile (then ``W_hh`` stays in registers).
  Its per-step term is therefore ``G·H·H·s / (one SM's L2 read rate)``.

The device numbers are spec-sheet figures or stated assumptions for an H100 SXM5, not measurements; run as a
script it prints the table of ``benchmarks/NOTES.md``: ``python benchmarks/floor_layers.py``.
"""

from __future__ import annotations

import argparse

from floor_cells import ELEMENT_BYTES, GATES, H100_SXM_SPEC

# An assumption, not a spec figure: what one SM can read from L2 per clock (64 B) at the boost clock (1.755 GHz).
SM_L2_BYTES_PER_S = 64 * 1.755e9
SM_COUNT = 132
ONE_TILE_MAX_H = 32  # H at which the Triton kernel keeps W_hh in registers (its BLOCK_H); see rnn_seq.blocks


def layer_floor(cell: str, batch: int, hidden: int, steps: int, dtype: str, directions: int = 1,
                spec: dict = H100_SXM_SPEC) -> dict:
    """The terms of the forward floor of one layer. Times in µs."""
    g, s = GATES[cell], ELEMENT_BYTES[dtype]
    rate = spec["flops_per_s"][dtype]
    proj_flops = 2 * steps * batch * directions * g * hidden * hidden
    proj_bytes = s * (steps * batch * hidden + directions * g * hidden * hidden + steps * batch * directions * g * hidden)
    t_proj = max(proj_flops / rate, proj_bytes / spec["hbm_bytes_per_s"]) * 1e6
    w_hh_bytes = s * g * hidden * hidden
    step_flops = 2 * batch * g * hidden * hidden
    programs = directions * -(-batch // 16)
    sm_rate = rate / SM_COUNT  # one SM's share of the matrix rate
    per_program_flops = step_flops / -(-batch // 16)
    t_w = 0.0 if hidden <= ONE_TILE_MAX_H else w_hh_bytes / SM_L2_BYTES_PER_S * 1e6
    t_step_fastseq = max(t_w, per_program_flops / sm_rate * 1e6)
    # A design that shards W_hh over every SM (the CUDA extension's cooperative kernel): each SM holds
    # 1/132 of W_hh on chip, so the per-step term is the FLOPs over the whole chip plus one grid barrier.
    launch = spec["launch_s"][0] * 1e6
    t_step_sharded = directions * step_flops / rate * 1e6 + 1.0  # + ~1 µs grid barrier (assumed)
    return {
        "cell": cell, "B": batch, "H": hidden, "T": steps, "D": directions, "dtype": dtype,
        "programs": programs, "w_hh_bytes": w_hh_bytes, "t_proj_us": t_proj,
        "t_step_fastseq_us": t_step_fastseq, "t_step_sharded_us": t_step_sharded,
        "t_step_launch_us": launch,
        "layer_fastseq_us": t_proj + steps * t_step_fastseq,
    }


def markdown_table(cells, batches, hiddens, steps, dtypes) -> str:
    lines = ["| cell | dtype | H | B | programs | W_hh KiB | proj µs | step µs (fastseq Triton) | "
             "step µs (W_hh sharded, +1 µs barrier) | layer µs (fastseq, T=%d) |" % steps,
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for cell in cells:
        for dtype in dtypes:
            for h in hiddens:
                for b in batches:
                    f = layer_floor(cell, b, h, steps, dtype)
                    lines.append(f"| {cell} | {dtype} | {h} | {b} | {f['programs']} | {f['w_hh_bytes'] / 1024:.0f} | "
                                 f"{f['t_proj_us']:.2f} | {f['t_step_fastseq_us']:.2f} | "
                                 f"{f['t_step_sharded_us']:.2f} | {f['layer_fastseq_us']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cells", default="lstm,gru")
    p.add_argument("--batch", default="1,32")
    p.add_argument("--hidden", default="32,128,256,1024")
    p.add_argument("--steps", type=int, default=512)
    p.add_argument("--dtypes", default="bfloat16,float32")
    a = p.parse_args(argv)
    ints = lambda s: [int(v) for v in s.split(",") if v]  # noqa: E731
    print(markdown_table(a.cells.split(","), ints(a.batch), ints(a.hidden), a.steps, a.dtypes.split(",")), end="")


if __name__ == "__main__":
    main()
