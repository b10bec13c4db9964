"""Every Triton kernel compiles for the GPUs we target (sm_80, sm_90) without a GPU. The interpreter accepts
code that the NVIDIA backend refuses, so CI compiles each kernel ahead of time, per dtype and batch tile the
launchers can pick, and checks shared memory and tensor-core use. (The full resource report is the AOT
command's job.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def compiled_rows():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, os.path.join(HERE, "gpu_compile_cells.py")], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def test_every_cell_kernel_compiles_for_sm80_and_sm90(compiled_rows):
    assert len(compiled_rows) >= 6 * 3 * 2 * 2  # kernels x dtypes x archs x (at least two) batch tiles
    failed = [f"{r['kernel']} {r['dtype']} sm_{r['arch']} BLOCK_B={r['BLOCK_B']}: {r['error']}"
              for r in compiled_rows if r["error"]]
    assert not failed, "\n".join(failed)


def test_shared_memory_within_the_limit(compiled_rows):
    over = [r for r in compiled_rows if not r["error"] and r["shared"] > r["shared_limit"]]
    assert not over, over


def test_half_precision_products_use_tensor_cores(compiled_rows):
    missing = [f"{r['kernel']} {r['dtype']} sm_{r['arch']}" for r in compiled_rows
               if not r["error"] and r["dtype"] != "fp32" and not r["mma"]]
    assert not missing, missing
