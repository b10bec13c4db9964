#!/usr/bin/env python
"""The floor of one decoder-loop step of a recurrent cell on a GPU: a model, not a measurement.

Per step of ``h' = cell(x, h)`` with ``G`` gates (LSTM 4, GRU 3, RNN 1), input size ``I``, hidden size ``H``,
batch ``B`` and element size ``s`` bytes:

- weights ``W_ih (G·H, I)`` and ``W_hh (G·H, H)``: ``G·H·(I+H)`` elements must reach the SMs at least once per
  step. fastseq's forward kernel (``kernels/rnn_cell.py``) has a grid of ``⌈B/BLOCK_B⌉ × ⌈H/BLOCK_H⌉``
  programs and every row block ``pb`` reads all the weights, so the weights are *requested* ``⌈B/BLOCK_B⌉``
  times per step; from HBM they need to come only once (the re-reads may hit L2).
- activations: ``x`` (B·I), ``h`` (B·H), LSTM ``c`` (B·H) read; ``h'`` (and ``c'``) written.
- FLOPs: ``2·B·G·H·(I+H)`` for the two products (the pointwise part is negligible next to it).
- launches: fastseq's forward is one kernel per step; torch's cell on CUDA is two GEMMs plus one fused
  pointwise kernel for LSTM/GRU (``_thnn_fused_{lstm,gru}_cell``), and two GEMMs plus an add and the
  activation for the Elman cell (ATen ``RNN.cpp``: ``linear_hh(h).add_(linear_ih(x)).tanh()``).

``floor = max(bytes / HBM bandwidth, FLOPs / matrix rate) + launches · launch latency``.

The device numbers are NVIDIA's spec-sheet figures for the H100 SXM5, to be replaced by measured ones
(``benchmarks/NOTES.md``); nothing here was measured. Run as a script it prints the markdown tables of
``NOTES.md`` for the benchmark grid: ``python benchmarks/floor_cells.py``.
"""

from __future__ import annotations

import argparse
import math

# Spec-sheet numbers (H100 SXM5, dense, no sparsity). NOT measurements.
H100_SXM_SPEC = {
    "name": "H100 SXM5 (spec sheet)",
    "hbm_bytes_per_s": 3.35e12,  # HBM3
    "l2_bytes": 50 * 2**20,  # 50 MB L2
    "flops_per_s": {
        "bfloat16": 990e12,  # dense tensor-core bf16
        "float16": 990e12,  # dense tensor-core fp16
        "float32": 67e12,  # FP32 CUDA cores, no tensor cores (TF32 is off unless torch allows it)
    },
    "launch_s": (2e-6, 5e-6),  # per dependent kernel launch, a range, not a measurement
}

GATES = {"lstm": 4, "gru": 3, "rnn": 1, "rnn_relu": 1}
ELEMENT_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# Launches per forward step (see the module docstring). Training adds the backward: see NOTES.md.
LAUNCHES_FWD = {"fastseq": {"lstm": 1, "gru": 1, "rnn": 1, "rnn_relu": 1},
                "torch": {"lstm": 3, "gru": 3, "rnn": 4, "rnn_relu": 4}}


def fastseq_block_b(batch: int, dtype: str) -> int:
    """``BLOCK_B`` of fastseq's cell kernels on a GPU, from the launcher's own rule."""
    import torch

    from fastseq.kernels.rnn_cell import blocks

    return int(blocks(batch, getattr(torch, dtype), on_gpu=True)["BLOCK_B"])


def step_floor(cell: str, batch: int, hidden: int, input_size: int, dtype: str, spec: dict = H100_SXM_SPEC,
               launch_s: float | None = None) -> dict:
    """The terms of the floor of one inference (forward) step. Times in µs."""
    g = GATES[cell]
    s = ELEMENT_BYTES[dtype]
    weights = g * hidden * (input_size + hidden)
    biases = 2 * g * hidden
    states = 2 if cell == "lstm" else 1
    act = batch * (input_size + states * hidden) + batch * states * hidden  # reads + writes
    block_b = fastseq_block_b(batch, dtype)
    row_blocks = math.ceil(batch / block_b)
    bytes_once = s * (weights + biases + act)
    bytes_requested = s * (row_blocks * (weights + biases) + act)
    flops = 2 * batch * g * hidden * (input_size + hidden)
    bw = spec["hbm_bytes_per_s"]
    rate = spec["flops_per_s"][dtype]
    launch = spec["launch_s"][0] if launch_s is None else launch_s
    t_mem = bytes_once / bw * 1e6
    t_mem_requested = bytes_requested / bw * 1e6
    t_flop = flops / rate * 1e6
    body = max(t_mem, t_flop)
    return {
        "cell": cell, "B": batch, "H": hidden, "I": input_size, "dtype": dtype,
        "weight_bytes": s * weights, "fits_l2": s * (weights + biases) <= spec["l2_bytes"],
        "block_b": block_b, "row_blocks": row_blocks,
        "bytes_once": bytes_once, "bytes_requested": bytes_requested, "flops": flops,
        "t_mem_us": t_mem, "t_mem_requested_us": t_mem_requested, "t_flop_us": t_flop,
        "bound": "memory" if t_mem >= t_flop else "compute",
        "launch_us": launch * 1e6,
        "floor_fastseq_us": body + LAUNCHES_FWD["fastseq"][cell] * launch * 1e6,
        "floor_torch_us": body + LAUNCHES_FWD["torch"][cell] * launch * 1e6,
    }


def markdown_tables(cells, batches, hiddens, dtypes, spec: dict = H100_SXM_SPEC) -> str:
    lines = []
    launch_us = spec["launch_s"][0] * 1e6
    lines.append("Weights per step (independent of B): bytes of `W_ih` and `W_hh`, and the time to stream them "
                 "once from HBM.\n")
    lines.append("| cell | dtype | H=I | weights MB | fits 50 MB L2 | HBM read µs |")
    lines.append("|---|---|---:|---:|:---:|---:|")
    for cell in cells:
        for dtype in dtypes:
            for h in hiddens:
                f = step_floor(cell, 1, h, h, dtype, spec)
                lines.append(f"| {cell} | {dtype} | {h} | {f['weight_bytes'] / 1e6:.2f} | "
                             f"{'yes' if f['fits_l2'] else 'no'} | {f['t_mem_us']:.2f} |")
    lines.append("")
    lines.append(f"Inference step floor, launch latency taken at its low end ({launch_us:g} µs per launch). "
                 "`t_mem`: weights once + activations over HBM bandwidth; `t_mem×rb`: with the weights "
                 "requested once per row block of fastseq's kernel (`rb` = ⌈B/BLOCK_B⌉); `t_flop`: FLOPs "
                 "over the matrix rate of the dtype; floors are `max(t_mem, t_flop)` plus the launches "
                 "(fastseq 1, torch 3 for LSTM/GRU, 4 for RNN).\n")
    lines.append("| cell | dtype | H=I | B | rb | MFLOP | t_mem µs | t_mem×rb µs | t_flop µs | bound | "
                 "floor fastseq µs | floor torch µs |")
    lines.append("|---|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|")
    for cell in cells:
        for dtype in dtypes:
            for h in hiddens:
                for b in batches:
                    f = step_floor(cell, b, h, h, dtype, spec)
                    lines.append(
                        f"| {cell} | {dtype} | {h} | {b} | {f['row_blocks']} | {f['flops'] / 1e6:.1f} | "
                        f"{f['t_mem_us']:.2f} | {f['t_mem_requested_us']:.2f} | {f['t_flop_us']:.2f} | "
                        f"{f['bound']} | {f['floor_fastseq_us']:.2f} | {f['floor_torch_us']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cells", default="lstm,gru,rnn")
    p.add_argument("--batch", default="1,8,64,256")
    p.add_argument("--hidden", default="128,256,512,1024")
    p.add_argument("--dtypes", default="float32,bfloat16")
    a = p.parse_args(argv)
    ints = lambda s: [int(v) for v in s.split(",") if v]  # noqa: E731
    print(markdown_tables(a.cells.split(","), ints(a.batch), ints(a.hidden), a.dtypes.split(",")), end="")


if __name__ == "__main__":
    main()
