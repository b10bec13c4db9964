#!/usr/bin/env python
"""Every CUDA kernel of fastseq once, on tiny shapes, through the public modules and functions with backend="cuda":
the workload ``benchmarks/gpu_check.sh`` runs under ``compute-sanitizer --tool memcheck`` and ``--tool racecheck``.

Covered: the fused cells (LSTM, GRU, RNN tanh/relu; forward and backward) and the layers (LSTM with and without a
projection, GRU, RNN; bidirectional, padded and packed, 17 rows so that a step takes two passes of 16) on both CUDA
layer paths, the persistent cooperative kernel and the per-step fallback (forced in turn), in float32 and bfloat16
(float16 shares bfloat16's code path); attention through ``fastseq.scaled_dot_product_attention(..., backend="cuda")``
where the extension has CUDA attention kernels. Exits 0 after printing what ran; without a GPU it says so and exits 0
(the gpu_check smoke mode), since there is nothing to sanitize.

    compute-sanitizer --tool memcheck --error-exitcode 1 python benchmarks/cuda_sanitize.py
"""

from __future__ import annotations

import sys
import time

import torch


def cells(device, dtype) -> int:
    import fastseq

    n = 0
    for cls, kw in ((fastseq.LSTMCell, {}), (fastseq.GRUCell, {}), (fastseq.RNNCell, {"nonlinearity": "tanh"}),
                    (fastseq.RNNCell, {"nonlinearity": "relu"})):
        cell = cls(7, 19, backend="cuda", device=device, dtype=dtype, **kw)
        x = torch.randn(5, 7, device=device, dtype=dtype, requires_grad=True)
        state = torch.randn(5, 19, device=device, dtype=dtype, requires_grad=True)
        out = cell(x, (state, state.detach().clone()) if cls is fastseq.LSTMCell else state)
        out = out[0] + out[1] if isinstance(out, tuple) else out
        out.float().square().sum().backward()
        n += 1
    return n


def layers(device, dtype) -> int:
    import fastseq
    from torch.nn.utils.rnn import pack_padded_sequence

    n = 0
    for cls, kw in ((fastseq.LSTM, {}), (fastseq.LSTM, {"proj_size": 5}), (fastseq.GRU, {}),
                    (fastseq.RNN, {"nonlinearity": "relu"})):
        layer = cls(6, 21, bidirectional=True, backend="cuda", device=device, dtype=dtype, **kw)
        x = torch.randn(4, 17, 6, device=device, dtype=dtype, requires_grad=True)
        lengths = torch.tensor([4] * 5 + [3] * 6 + [1] * 6)
        for inp in (x, pack_padded_sequence(x, lengths, enforce_sorted=False)):
            out = layer(inp)[0]
            out = out if isinstance(out, torch.Tensor) else out.data  # a PackedSequence's data
            out.float().square().sum().backward()
            n += 1
    return n


def attention(device, dtype) -> int:
    import fastseq

    q, k, v = (torch.randn(2, 3, 9, 16, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    out = fastseq.scaled_dot_product_attention(q, k, v, is_causal=True, backend="cuda")
    out.float().square().sum().backward()
    return 1


def main() -> int:
    if not torch.cuda.is_available():
        print("cuda_sanitize: no CUDA GPU visible, nothing to sanitize")
        return 0
    import fastseq
    import fastseq._C as C

    if not fastseq.backends()["cuda"]["available"]:
        print("cuda_sanitize: backend 'cuda' unavailable:", fastseq.backends()["cuda"]["reason"])
        return 1
    device, t0, ran = torch.device("cuda"), time.time(), []
    for dtype in (torch.float32, torch.bfloat16):
        ran.append(f"cells {dtype}: {cells(device, dtype)}")
        for path in ("persistent", "fallback"):
            C.set_cuda_layer_path(path)
            try:
                ran.append(f"layers {path} {dtype}: {layers(device, dtype)}")
            finally:
                C.set_cuda_layer_path("auto")
        if "sdpa" in C.kernels("cuda"):
            ran.append(f"attention {dtype}: {attention(device, dtype)}")
        else:
            ran.append("attention: no CUDA attention kernels in this build, skipped")
    torch.cuda.synchronize()
    print("cuda_sanitize:", "; ".join(ran), f"({time.time() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
