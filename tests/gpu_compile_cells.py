"""Compile every Triton cell kernel ahead of time for sm_80 and sm_90, without a GPU; print one JSON line per
(kernel, dtype, arch, BLOCK_B). Run without TRITON_INTERPRET (compiling needs the real JIT functions):
tests/test_gpu_compile.py starts it in a fresh process."""

from __future__ import annotations

import json
import os
import sys

assert os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), "compile the kernels without TRITON_INTERPRET"

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

from fastseq.kernels import rnn_cell  # noqa: E402

KERNELS = {
    "lstm_cell_fwd_kernel": {},
    "gru_cell_fwd_kernel": {},
    "rnn_cell_fwd_kernel": {"RELU": True},
    "lstm_cell_bwd_kernel": {},
    "gru_cell_bwd_kernel": {},
    "rnn_cell_bwd_kernel": {"RELU": False},
}
DTYPES = {"fp32": tl.float32, "fp16": tl.float16, "bf16": tl.bfloat16}
TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
BATCHES = (1, 17, 33, 1000)  # every batch tile the launchers can choose
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}  # bytes of shared memory one block may use


def signature(fn, dtype: str, constexprs: dict) -> dict:
    """Pointers in the input dtype except the float32 workspace; every other runtime argument an i32."""
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = "*fp32" if name == "ws_ptr" else f"*{dtype}"
        else:
            sig[name] = "i32"
    return sig


def compile_one(kernel: str, dtype: str, arch: int, launch: dict) -> dict:
    """Compile ``kernel`` with the launcher's block choice ``launch`` (tiles and num_warps)."""
    fn = getattr(rnn_cell, kernel)
    tiles = {k: v for k, v in launch.items() if k.startswith("BLOCK_")}
    constexprs = dict(DOT_DTYPE=DTYPES[dtype], PRECISION="ieee", **tiles, **KERNELS[kernel])
    constexprs.update({f: True for f in ("HAS_STATE", "HAS_B_IH", "HAS_B_HH", "SAVE") if f in fn.arg_names})
    row = {"kernel": kernel, "dtype": dtype, "arch": arch, **launch}
    try:
        src = triton.compiler.ASTSource(fn=fn, signature=signature(fn, dtype, constexprs),
                                        constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()})
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                  options={"num_warps": launch["num_warps"]})
    except Exception as e:  # reported, not raised: the test names every failing specialisation
        return {**row, "error": f"{type(e).__name__}: {e}"[:2000]}
    ptx = compiled.asm["ptx"]
    return {**row, "error": None, "cubin_bytes": len(compiled.asm["cubin"]), "shared": compiled.metadata.shared,
            "shared_limit": SHARED_LIMIT[arch], "mma": ("mma" in ptx) or ("wgmma" in ptx)}


def main() -> int:
    for kernel in KERNELS:
        for dtype in DTYPES:
            launches = {json.dumps(rnn_cell.blocks(b, TORCH_DTYPES[dtype], on_gpu=True), sort_keys=True)
                        for b in BATCHES}
            for arch in SHARED_LIMIT:
                for launch in sorted(launches):
                    print(json.dumps(compile_one(kernel, dtype, arch, json.loads(launch))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
