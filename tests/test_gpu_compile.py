"""Every Triton kernel compiles for the GPUs we target (sm_80, sm_90) without a GPU. The interpreter accepts
code that the NVIDIA backend refuses, so the suite compiles each kernel ahead of time through
``python -m fastseq aot`` (``fastseq/aot.py``), per dtype, dot precision and batch tile the launchers can pick,
with every constexpr flag on, and checks that it compiles, that its shared memory fits the arch, and that the
half-precision products use tensor cores. (The full flag grid, plain ``python -m fastseq aot``, takes over 12
minutes on 2 CPU cores: run it by hand before a release.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from fastseq.aot import all_kernel_names

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERNELS = tuple(all_kernel_names())  # every kernel of every family (cells, layers, attention, ...)


@pytest.fixture(scope="module")
def aot_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("aot") / "aot.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "fastseq", "aot", "--archs", "80,90", "--flags", "all-on", "--quiet",
                           "--json", str(out)], env=env, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert out.exists(), proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc, json.loads(out.read_text())


def test_every_kernel_compiles_for_sm80_and_sm90(aot_report):
    _, report = aot_report
    rows = report["rows"]
    seen = {(r["kernel"], r["dtype"], r["arch"]) for r in rows}
    assert seen == {(k, d, a) for k in KERNELS for d in ("float32", "float16", "bfloat16") for a in ("sm_80", "sm_90")}
    assert len(rows) >= len(KERNELS) * 3 * 2  # kernels x dtypes x archs (x batch tiles and flags)
    failed = [f"{r['kernel']} [{r['spec']}] {r['arch']}: {r['error']}" for r in rows if r["error"]]
    assert not failed, "\n".join(failed)


def test_shared_memory_within_the_limit(aot_report):
    over = [r for r in aot_report[1]["rows"] if not r["error"] and r["shared"] > r["shared_limit"]]
    assert not over, over


def test_half_precision_products_use_tensor_cores(aot_report):
    rows = aot_report[1]["rows"]
    missing = [f"{r['kernel']} [{r['spec']}] {r['arch']}" for r in rows
               if not r["error"] and r["dtype"] != "float32" and r["tensor_core_ops"] == 0]
    assert not missing, missing
    assert all(r["tensor_cores_required"] for r in rows if r["dtype"] != "float32")


def test_the_command_passes_on_the_flags_on_grid(aot_report):
    """Spills and local memory within each kernel's AOT_BUDGETS too: the whole gate, as CI runs it."""
    proc, report = aot_report
    assert proc.returncode == 0 and not report["failures"], "\n".join(report["failures"]) + proc.stderr[-2000:]
