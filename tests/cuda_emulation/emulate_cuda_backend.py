"""Opt-in pytest plugin: the "cuda" attention backend on CPU tensors runs the emulated CUDA kernels, so the
"cuda" variants of the attention suites run on a machine without a GPU (slowly; the index arithmetic, not the
hardware, is what they test). From the repository root:

    PYTHONPATH=tests TRITON_INTERPRET=1 pytest -p cuda_emulation.emulate_cuda_backend tests/test_attention.py -k cuda
"""

from __future__ import annotations

import torch


def pytest_configure(config):
    import fastseq.dispatch as dispatch
    from fastseq import cuda_kernels

    import cuda_emulation

    cuda_emulation.load()
    cuda_kernels._ops = getattr(torch.ops, cuda_emulation.NAMESPACE)
    real = dispatch._why_not

    def why_not(backend, op, device, dtype):
        if backend == "cuda" and op == "sdpa" and device.type == "cpu":
            return None if dtype in dispatch.KERNEL_DTYPES else f"it does not take {dtype}"
        return real(backend, op, device, dtype)

    dispatch._why_not = why_not
