"""``python -m fastseq aot``: compiles for the GPU archs without a GPU, writes its report, and fails on a bad kernel.

Compiling needs Triton's real JIT functions, which TRITON_INTERPRET=1 (set for the whole suite on a machine
without a GPU) replaces; so every compilation here runs in a fresh process without it: the command itself, or
this file run as a script (``python tests/test_aot.py bad|tools OUT``), where the kernels below are real JIT
functions. Under pytest they are only defined, never compiled.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import triton
import triton.language as tl

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def _env_without_interpreter() -> dict:
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


# ---------------------------------------------------------------------------------------------------------
# Deliberately bad kernels (compiled only in script mode)
# ---------------------------------------------------------------------------------------------------------


@triton.jit
def dot_k8_kernel(a_ptr, b_ptr, c_ptr, BLOCK: tl.constexpr, K: tl.constexpr):
    """A tl.dot with K = 8: the interpreter runs it, the NVIDIA backend refuses it (K must be >= 16)."""
    r = tl.arange(0, BLOCK)
    k = tl.arange(0, K)
    a = tl.load(a_ptr + r[:, None] * K + k[None, :])
    b = tl.load(b_ptr + k[:, None] * BLOCK + r[None, :])
    tl.store(c_ptr + r[:, None] * BLOCK + r[None, :], tl.dot(a, b).to(c_ptr.dtype.element_ty))


@triton.jit
def tile_dot_kernel(a_ptr, b_ptr, c_ptr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """One (BM, BK) x (BK, BN) product: with BK = 2048 in float16 its operands need 256 KiB of shared memory."""
    m = tl.arange(0, BM)
    n = tl.arange(0, BN)
    k = tl.arange(0, BK)
    a = tl.load(a_ptr + m[:, None] * BK + k[None, :])
    b = tl.load(b_ptr + k[:, None] * BN + n[None, :])
    tl.store(c_ptr + m[:, None] * BN + n[None, :], tl.dot(a, b).to(c_ptr.dtype.element_ty))


@triton.jit
def upcast_dot_kernel(a_ptr, b_ptr, c_ptr, BLOCK: tl.constexpr):
    """A half-precision product done in float32 IEEE (as if the interpreter's upcast leaked to the GPU path):
    correct, but without tensor cores."""
    r = tl.arange(0, BLOCK)
    a = tl.load(a_ptr + r[:, None] * BLOCK + r[None, :])
    b = tl.load(b_ptr + r[:, None] * BLOCK + r[None, :])
    c = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    tl.store(c_ptr + r[:, None] * BLOCK + r[None, :], c.to(c_ptr.dtype.element_ty))


def _bad_specs():
    from fastseq import aot

    return [
        aot.Spec("dot_k8_kernel", dot_k8_kernel, "float16", dict(BLOCK=16, K=8), label="fp16 16x16 K=8",
                 tensor_cores=True),
        aot.Spec("tile_dot_kernel", tile_dot_kernel, "float16", dict(BM=32, BN=32, BK=2048),
                 label="fp16 32x32x2048 w4", tensor_cores=True, budget={"spill_bytes": 10**6, "local_ops": 10**6}),
        aot.Spec("upcast_dot_kernel", upcast_dot_kernel, "float16", dict(BLOCK=16), label="fp16 16 via fp32",
                 tensor_cores=True),
        # A good one beside them: small tiles, tensor cores, nothing spilled.
        aot.Spec("tile_dot_kernel", tile_dot_kernel, "float16", dict(BM=32, BN=32, BK=32), label="fp16 32x32x32 w4",
                 tensor_cores=True),
    ]


def _script_bad(out: str) -> int:
    from fastseq import aot

    return aot.main(["--archs", "80,90", "--ops", "dot_k8_kernel", "tile_dot_kernel", "upcast_dot_kernel",
                     "--jobs", "2", "--json", out], extra_specs=_bad_specs())


def _script_tools(out: str) -> int:
    """Real tool output for the parsers: one cell kernel compiled for sm_80 and sm_90, ptxas -v run here on its
    PTX, cuobjdump's SASS and resource usage of its cubin; and a kernel that really spills."""
    import tempfile

    import torch
    from triton.backends.compiler import GPUTarget

    from fastseq import aot

    spec = [s for s in aot.cell_specs(["lstm_cell_fwd_kernel"], ["float16"], "all-on")
            if s.constexprs["BLOCK_B"] == 64][0]
    spill = aot.Spec("tile_dot_kernel", tile_dot_kernel, "float16", dict(BM=128, BN=128, BK=32), num_warps=1,
                     label="fp16 128x128x32 w1", tensor_cores=True)
    result = {}
    for name, s in (("cell", spec), ("spill", spill)):
        for arch in (80, 90):
            src = triton.compiler.ASTSource(fn=s.fn, signature=s.signature(), constexprs={
                (s.fn.arg_names.index(k),): v for k, v in s.constexprs.items()})
            compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": s.num_warps})
            with tempfile.TemporaryDirectory() as d:
                log = aot.run_ptxas(compiled.asm["ptx"], arch, d)
                sass = aot.dump_sass(compiled.asm["cubin"], d)
                path = os.path.join(d, "kernel.cubin")
                usage = subprocess.run([aot.tool("cuobjdump"), "--dump-resource-usage", path],
                                       capture_output=True, text=True, check=True).stdout
            result[f"{name}_{arch}"] = {
                "ptxas_log": log, "ptxas": aot.parse_ptxas(log), "sass": aot.parse_sass(sass),
                "raw_counts": {op: sum(1 for line in sass.splitlines()
                                       if re.match(r"\s*/\*[0-9a-f]{4,}\*/", line) and re.search(rf"\s{op}[\s.]", line))
                               for op in ("HMMA", "HGMMA", "LDL", "STL")},
                "usage": aot.parse_resource_usage(usage),
                "row": aot.compile_spec(s, arch)}
    result["torch"] = torch.__version__
    with open(out, "w") as f:
        json.dump(result, f, default=str)
    return 0


# ---------------------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------------------


def test_aot_runs_on_a_tiny_grid_and_writes_json_and_markdown(tmp_path):
    """Through the CLI, with TRITON_INTERPRET=1 in the environment (the command re-runs itself without it)."""
    js, md = tmp_path / "aot.json", tmp_path / "aot.md"
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run(
        [sys.executable, "-m", "fastseq", "aot", "--archs", "80,90", "--ops", "rnn_cell_fwd_kernel", "--dtypes",
         "float16", "--flags", "all-on", "--json", str(js), "--md", str(md)],
        env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(js.read_text())
    rows = report["rows"]
    assert report["triton"] == triton.__version__ and "V1" in report["ptxas"]
    assert {r["arch"] for r in rows} == {"sm_80", "sm_90"}
    assert {r["constexprs"]["BLOCK_B"] for r in rows} == {16, 32, 64}  # every batch tile blocks() picks
    assert len(rows) == 6 and not report["failures"]
    for r in rows:
        assert r["kernel"] == "rnn_cell_fwd_kernel" and r["error"] is None
        assert 16 <= r["registers"] <= 255 and r["spill_bytes"] == 0 and r["LDL"] == r["STL"] == 0
        assert 0 < r["shared"] <= r["shared_limit"]
        assert 0 < r["occupancy"] <= 1 and r["warps_per_sm"] % r["num_warps"] == 0
        assert r["tensor_core_ops"] > 0 and r["instructions"] > r["tensor_core_ops"]
        if r["arch"] == "sm_80":
            assert r["HMMA"] > 0 and r["HGMMA"] == 0
    assert "built" in report["extension"]["note"]  # the extension has no CUDA kernels here: said in one line
    text = md.read_text()
    assert text.startswith("# AOT report") and f"Triton {triton.__version__}" in text and "ptxas" in text
    assert "| rnn_cell_fwd_kernel | sm_80 | fp16 16x32x32 w4" in text.replace("  ", " ").replace("  ", " ")
    assert "CUDA extension" in text and "| kernel " in proc.stdout and "6 of 6 compilations passed" in proc.stdout


def test_bad_kernels_are_reported_and_fail_the_command(tmp_path):
    out = tmp_path / "bad.json"
    proc = subprocess.run([sys.executable, __file__, "bad", str(out)], env=_env_without_interpreter(),
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    printed = proc.stdout
    for arch in ("sm_80", "sm_90"):
        assert f"FAIL dot_k8_kernel [fp16 16x16 K=8] {arch}: compile error" in printed, printed
        assert "K >= 16" in printed
        assert f"FAIL tile_dot_kernel [fp16 32x32x2048 w4] {arch}: shared memory 262144 B over the {arch} limit" \
            in printed, printed
        assert f"FAIL upcast_dot_kernel [fp16 16 via fp32] {arch}: fp16 matrix kernel without tensor-core" \
            in printed, printed
    assert "FAIL tile_dot_kernel [fp16 32x32x32 w4]" not in printed  # the good one passes
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 8
    good = [r for r in rows if r["spec"] == "fp16 32x32x32 w4"]
    assert len(good) == 2 and all(not r["failures"] and r["tensor_core_ops"] > 0 for r in good)


def test_parsers_read_real_ptxas_and_cuobjdump_output(tmp_path):
    out = tmp_path / "tools.json"
    proc = subprocess.run([sys.executable, __file__, "tools", str(out)], env=_env_without_interpreter(),
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    res = json.loads(out.read_text())
    for name in ("cell", "spill"):
        for arch in (80, 90):
            r = res[f"{name}_{arch}"]
            fn = "lstm_cell_fwd_kernel" if name == "cell" else "tile_dot_kernel"
            assert f"Compiling entry function '{fn}' for 'sm_{arch}" in r["ptxas_log"]
            # ptxas -v and cuobjdump's resource usage are two tools: they must agree through the parsers.
            usage = r["usage"][fn]
            assert r["ptxas"]["registers"] == usage["REG"] and r["ptxas"]["stack"] == usage["STACK"]
            # The SASS counts agree with a plain line scan, and with the row the command reports.
            for op in ("HMMA", "HGMMA", "LDL", "STL"):
                assert r["sass"][op] == r["raw_counts"][op], (name, arch, op)
            row = r["row"]
            assert row["registers"] == r["ptxas"]["registers"] and row["LDL"] == r["sass"]["LDL"]
            assert r["sass"]["HMMA"] + r["sass"]["HGMMA"] > 0
    assert res["cell_80"]["sass"]["HMMA"] > 0 and res["cell_90"]["sass"]["HGMMA"] > 0  # wgmma on Hopper
    for arch in (80, 90):
        spill = res[f"spill_{arch}"]
        assert spill["ptxas"]["spill_stores"] > 0 and spill["ptxas"]["registers"] == 255
        assert spill["sass"]["STL"] > 0 and spill["sass"]["LDL"] > 0
        assert any("spills" in f for f in spill["row"]["failures"])  # over the default budget of zero
        cell = res[f"cell_{arch}"]
        assert cell["ptxas"]["spill_stores"] == 0 and cell["sass"]["LDL"] == 0


def test_occupancy_estimate_matches_the_calculator():
    from fastseq import aot

    a80, a90 = aot.ARCHS[80], aot.ARCHS[90]
    # 32 registers, 4 warps, no shared memory: 16 blocks by warps -> full occupancy.
    assert aot.occupancy(a80, 32, 4, 0)["occupancy"] == 1.0
    # 255 registers -> 8192 per warp (granularity 256) -> 8 warps -> 2 blocks of 4 warps.
    o = aot.occupancy(a90, 255, 4, 0)
    assert (o["blocks_per_sm"], o["warps_per_sm"], o["occupancy_limiter"]) == (2, 8, "registers")
    # 100 KiB of shared memory per block: one block on sm_80 (164 KiB per SM), two on sm_90 (228 KiB).
    assert aot.occupancy(a80, 32, 4, 100 * 1024)["blocks_per_sm"] == 1
    assert aot.occupancy(a90, 32, 4, 100 * 1024)["blocks_per_sm"] == 2
    # Each flag in both values and every pair of flags in all four value pairs.
    flags = ["HAS_STATE", "HAS_B_IH", "HAS_B_HH", "SAVE", "RELU"]
    rows = aot._flag_rows(flags, "pairwise")
    for i in range(len(flags)):
        for j in range(i + 1, len(flags)):
            assert {(r[flags[i]], r[flags[j]]) for r in rows} == {(True, True), (True, False), (False, True),
                                                                   (False, False)}
    assert len(aot._flag_rows(flags, "full")) == 32 and len(rows) < 32


if __name__ == "__main__":
    assert os.environ.get("TRITON_INTERPRET", "0") != "1", "run without TRITON_INTERPRET"
    sys.path.insert(0, ROOT)
    sys.exit({"bad": _script_bad, "tools": _script_tools}[sys.argv[1]](sys.argv[2]))
