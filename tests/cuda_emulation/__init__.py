"""fastseq's CUDA attention kernels on the CPU: ``csrc/cuda/attention_{fwd,bwd}.cu`` compiled as host C++ against
the fiber emulator ``cuda_emulator.h``, and their operators ``csrc/cuda/attention_cuda_ops.cpp`` registered for CPU
tensors as ``torch.ops.fastseq_emu.*`` (the schemas of ``torch.ops.fastseq_cpp.sdpa_*``). Used by ``tests/test_attention_cuda_emulated.py`` and by the
opt-in pytest plugin ``emulate_cuda_backend`` (every attention test's "cuda" variant on the emulator)."""

from __future__ import annotations

import pathlib

import torch

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parents[1]
NAMESPACE = "fastseq_emu"


def load() -> None:
    """Builds (cached by torch's extension builder) and loads the emulated kernels once per process, with the
    fake implementations of their operators."""
    if hasattr(getattr(torch.ops, NAMESPACE), "sdpa_fwd"):
        return
    from torch.utils import cpp_extension

    from fastseq import cuda_kernels

    cpp_extension.load(
        name="fastseq_attention_emulated",
        sources=[str(HERE / f) for f in ("attention_emulated_schema.cpp", "attention_emulated_ops.cpp",
                                         "attention_emulated_fwd.cpp", "attention_emulated_bwd.cpp")],
        extra_include_paths=[str(ROOT / "csrc"), str(ROOT / "csrc" / "cuda"), str(HERE)],
        extra_cflags=["-O1", "-fno-strict-aliasing", "-Wno-unknown-pragmas"],
        is_python_module=False, verbose=False)
    cuda_kernels.register_fakes(NAMESPACE)
