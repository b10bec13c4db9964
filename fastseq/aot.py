"""``python -m fastseq aot``: every Triton kernel compiled ahead of time for the GPU archs, without a GPU, and a
resource report per kernel and specialisation.

For each kernel of ``fastseq.kernels`` and each specialisation the launchers can choose (dtype, dot precision,
every distinct ``blocks(...)`` choice over batch sizes, the constexpr flags in both values), for each arch:

- compile with ``triton.compile`` for ``GPUTarget("cuda", arch, 32)`` (PTX and cubin, no GPU needed);
- ``ptxas -v`` on the PTX (the ptxas that Triton ships): registers, spill stores/loads, stack frame;
- ``cuobjdump --dump-sass`` of the cubin: tensor-core instructions (``HMMA``; ``HGMMA`` on sm_90) and
  local-memory loads/stores (``LDL``/``STL``);
- shared memory (``metadata.shared``) against the arch's per-block limit, and an estimated occupancy from
  registers, warps and shared memory against the arch's per-SM limits.

A row fails on: a compile error; shared memory over the limit; spill bytes or local-memory instructions above
the kernel's budget (``AOT_BUDGETS`` at the end of the kernel's file, zero unless a reason is written there);
a half-precision (or TF32) matrix kernel without tensor-core instructions. The command exits non-zero and
names every failing kernel and specialisation.

Limitation: kernels are compiled with the most general signature (no launch-time specialisation of integer
arguments equal to 1 or pointers/integers divisible by 16), i.e. the code that runs for odd sizes and
strides; contiguous, aligned launches get vectorised loads on top of it.

The compiled extension's CUDA kernels (``fastseq._C``) are reported from ``cuobjdump`` of the built library
where it was built with CUDA; elsewhere the report says so in one line.

Compiling needs Triton's real JIT functions: it must run without ``TRITON_INTERPRET=1`` (the CLI re-executes
itself without it).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import datetime
import io
import itertools
import json
import math
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from fastseq.tables import markdown_table

# ---------------------------------------------------------------------------------------------------------
# Archs
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Arch:
    """Per-SM and per-block limits of a compute capability (CUDA C Programming Guide, compute capabilities)."""
    cc: int
    shared_per_block: int     # bytes a block may opt in to
    shared_per_sm: int        # bytes of shared memory per SM
    max_warps_per_sm: int = 64
    max_blocks_per_sm: int = 32
    regs_per_sm: int = 65536
    reg_alloc_unit: int = 256   # registers are allocated per warp in units of 256
    shared_reserved: int = 1024  # per block, taken by the system (sm_80 and later)
    shared_alloc_unit: int = 128

    @property
    def name(self) -> str:
        return f"sm_{self.cc}"


ARCHS = {
    80: Arch(80, shared_per_block=163 * 1024, shared_per_sm=164 * 1024),
    90: Arch(90, shared_per_block=227 * 1024, shared_per_sm=228 * 1024),
}
DTYPES = ("float32", "float16", "bfloat16")
SHORT = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}
FLAG_GRIDS = ("pairwise", "full", "all-on")


def occupancy(arch: Arch, registers: int, num_warps: int, shared: int) -> dict:
    """Blocks and warps per SM as the CUDA occupancy calculator estimates them, and what limits them."""
    regs_per_warp = math.ceil(max(registers, 1) * 32 / arch.reg_alloc_unit) * arch.reg_alloc_unit
    by = {
        "warps": arch.max_warps_per_sm // num_warps,
        "registers": (arch.regs_per_sm // regs_per_warp) // num_warps,
        "shared": arch.max_blocks_per_sm if shared <= 0 else arch.shared_per_sm // (
            math.ceil((shared + arch.shared_reserved) / arch.shared_alloc_unit) * arch.shared_alloc_unit),
        "blocks": arch.max_blocks_per_sm,
    }
    blocks = min(by.values())
    limiter = min(by, key=lambda k: (by[k], k != "warps"))
    warps = blocks * num_warps
    return {"blocks_per_sm": blocks, "warps_per_sm": warps, "occupancy": warps / arch.max_warps_per_sm,
            "occupancy_limiter": limiter}


# ---------------------------------------------------------------------------------------------------------
# What gets compiled
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Spec:
    """One compilation: a kernel with every constexpr fixed, and how it is judged."""
    kernel: str
    fn: Any                                  # a triton JITFunction
    dtype: str                               # float32 / float16 / bfloat16: the pointers' element type
    constexprs: dict                         # name -> value for every constexpr argument
    num_warps: int = 4
    num_stages: int | None = None            # None: Triton's default, as the launchers use
    label: str = ""                          # the specialisation, as the report names it
    tensor_cores: bool = False               # must the SASS contain tensor-core instructions?
    budget: dict = field(default_factory=lambda: {"spill_bytes": 0, "local_ops": 0})
    pointer_dtypes: dict = field(default_factory=dict)   # argument name -> element type, overriding dtype

    def signature(self) -> dict:
        """Pointers in ``dtype`` (or their override), constexprs as such, every other argument an i32."""
        sig = {}
        for name in self.fn.arg_names:
            if name in self.constexprs:
                sig[name] = "constexpr"
            elif name.endswith("_ptr"):
                sig[name] = "*" + SHORT.get(self.pointer_dtypes.get(name, self.dtype),
                                            self.pointer_dtypes.get(name, self.dtype))
            else:
                sig[name] = "i32"
        return sig


def _flag_rows(flags: list[str], grid: str) -> list[dict]:
    """Values of the boolean constexpr ``flags``: all combinations ("full"), only all true ("all-on"), or a
    pairwise covering set ("pairwise": every flag in both values, every pair of flags in all four value
    pairs, always including all-true and all-false)."""
    if not flags:
        return [{}]
    if grid == "all-on":
        return [{f: True for f in flags}]
    full = [dict(zip(flags, values)) for values in itertools.product((True, False), repeat=len(flags))]
    if grid == "full" or len(flags) <= 2:
        return full
    chosen = [full[0], full[-1]]  # all true, all false

    def uncovered(rows):
        return {(a, va, b, vb) for a, b in itertools.combinations(flags, 2)
                for va in (True, False) for vb in (True, False)} - {
            (a, r[a], b, r[b]) for r in rows for a, b in itertools.combinations(flags, 2)}

    while uncovered(chosen):  # greedy: the combination that covers the most missing pairs
        missing = uncovered(chosen)
        best = max((r for r in full if r not in chosen),
                   key=lambda r: len(missing) - len(uncovered(chosen + [r])))
        chosen.append(best)
    return chosen


# The cells' boolean constexprs, and which kernels take them (from the signatures themselves).
CELL_FLAGS = ("HAS_STATE", "HAS_B_IH", "HAS_B_HH", "SAVE", "RELU")
CELL_BATCHES = (1, 2, 3, 5, 8, 13, 16, 17, 31, 32, 33, 63, 64, 65, 127, 128, 255, 256, 1000, 4096, 65536)
# The layers' (kernels/rnn_seq.py): packed input, workspace, state on chip, hidden bias, LSTM projection, relu.
SEQ_FLAGS = ("PACKED", "SAVE", "ON_CHIP", "HAS_B_HH", "HAS_PROJ", "RELU")
_FLAG_NAMES = {"HAS_STATE": "state", "HAS_B_IH": "b_ih", "HAS_B_HH": "b_hh", "SAVE": "save", "RELU": "relu",
               "PACKED": "packed", "ON_CHIP": "on_chip", "HAS_PROJ": "proj"}


def _label(dtype: str, precision: str, launch: dict, flags: dict) -> str:
    tiles = "x".join(str(launch[k]) for k in ("BLOCK_B", "BLOCK_H", "BLOCK_K") if k in launch)
    parts = [SHORT[dtype] + ("/tf32" if precision == "tf32" else ""), f"{tiles} w{launch.get('num_warps', 4)}"]
    parts += [f"{_FLAG_NAMES.get(k, k)}={int(v)}" for k, v in flags.items()]
    return " ".join(parts)


def _family_specs(module_name: str, kernels: tuple[str, ...], flag_names: tuple[str, ...], pointer_dtypes: dict,
                  ops: Iterable[str] | None, dtypes: Iterable[str] | None, flag_grid: str) -> list[Spec]:
    """Every specialisation of ``kernels`` (in ``fastseq.kernels.<module_name>``) that its launchers can choose on
    a GPU: each dtype (float32 in IEEE and in TF32 mode, as ``torch.backends.cuda.matmul.allow_tf32`` picks),
    each distinct ``blocks(batch, dtype, on_gpu=True)`` of the module over batch sizes (the backward's apart),
    and the boolean constexprs among ``flag_names`` that each kernel takes, per ``flag_grid``."""
    import importlib

    import torch
    import triton.language as tl

    module = importlib.import_module(f"fastseq.kernels.{module_name}")
    budgets = getattr(module, "AOT_BUDGETS", {})
    tl_dtypes = {"float32": tl.float32, "float16": tl.float16, "bfloat16": tl.bfloat16}
    torch_dtypes = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    specs = []
    for name in kernels:
        if ops is not None and name not in ops:
            continue
        fn = getattr(module, name)
        flags = [f for f in flag_names if f in fn.arg_names]
        for dtype in dtypes or DTYPES:
            backward = name.endswith("_bwd_kernel")  # the launchers pick the backward's tiles apart
            launches = sorted({json.dumps(module.blocks(b, torch_dtypes[dtype], on_gpu=True, backward=backward),
                                          sort_keys=True)
                               for b in CELL_BATCHES}, key=lambda s: json.loads(s)["BLOCK_B"])
            precisions = ("ieee", "tf32") if dtype == "float32" else ("ieee",)
            for precision in precisions:
                for launch in map(json.loads, launches):
                    for flag_values in _flag_rows(flags, flag_grid):
                        tiles = {k: v for k, v in launch.items() if k not in ("num_warps", "num_stages")}
                        specs.append(Spec(
                            kernel=name, fn=fn, dtype=dtype,
                            constexprs=dict(DOT_DTYPE=tl_dtypes[dtype], PRECISION=precision, **tiles, **flag_values),
                            num_warps=launch.get("num_warps", 4),
                            label=_label(dtype, precision, launch, flag_values),
                            tensor_cores=dtype != "float32" or precision == "tf32",
                            budget=dict(budgets.get(name, {"spill_bytes": 0, "local_ops": 0})),
                            pointer_dtypes={k: v for k, v in pointer_dtypes.items() if k in fn.arg_names}))
    return specs


def cell_specs(ops: Iterable[str] | None = None, dtypes: Iterable[str] | None = None,
               flag_grid: str = "pairwise") -> list[Spec]:
    """Every specialisation of the Triton cell kernels (``kernels/rnn_cell.py``) the launchers can choose on a
    GPU (see ``_family_specs``)."""
    return _family_specs("rnn_cell", CELL_KERNELS, CELL_FLAGS, {"ws_ptr": "float32"}, ops, dtypes, flag_grid)


# The layer kernels' pointers that are not in the input dtype: the float32 workspace, scratch states and
# dh_total, and the int64 batch sizes and step offsets of packed sequences.
_SEQ_POINTERS = {**{p: "float32" for p in ("ws_ptr", "h_scr_ptr", "c_scr_ptr", "m_scr_ptr", "dh_scr_ptr",
                                           "dc_scr_ptr", "dht_ptr")},
                 "bs_ptr": "i64", "off_ptr": "i64"}


def seq_specs(ops: Iterable[str] | None = None, dtypes: Iterable[str] | None = None,
              flag_grid: str = "pairwise") -> list[Spec]:
    """Every specialisation of the Triton layer kernels (``kernels/rnn_seq.py``: the whole recurrence of a
    layer) the launchers can choose on a GPU (see ``_family_specs``)."""
    return _family_specs("rnn_seq", SEQ_KERNELS, SEQ_FLAGS, _SEQ_POINTERS, ops, dtypes, flag_grid)


CELL_KERNELS = ("lstm_cell_fwd_kernel", "gru_cell_fwd_kernel", "rnn_cell_fwd_kernel",
                "lstm_cell_bwd_kernel", "gru_cell_bwd_kernel", "rnn_cell_bwd_kernel")
SEQ_KERNELS = ("lstm_seq_fwd_kernel", "gru_seq_fwd_kernel", "rnn_seq_fwd_kernel",
               "lstm_seq_bwd_kernel", "gru_seq_bwd_kernel", "rnn_seq_bwd_kernel")
# The attention kernels (kernels/attention.py) with matrix products: forward (general and split-key decode),
# dK/dV and dQ. (Its three small kernels, the decode combine, backward's D = rowsum(dO·O) and the dropout-mask
# writer for tests, have no products and are not listed: every half-precision row here must use tensor cores.)
ATTN_KERNELS = ("attn_fwd_kernel", "attn_bwd_dkdv_kernel", "attn_bwd_dq_kernel")
ATTN_HEADS = (64, 128, 256)  # one head size per tile class of attention.blocks (<= 64, <= 128, <= 256)
_ATTN_POINTERS = {"seed_ptr": "i64", "lse_ptr": "float32", "part_ptr": "float32", "ml_ptr": "float32",
                  "delta_ptr": "float32", "dmask_ptr": "float32"}
_ATTN_FLOATS = ("scale", "scale_log2", "p_drop", "drop_scale")


@dataclass
class _FloatScalarSpec(Spec):
    """A Spec whose scalar arguments named in ``floats`` are float32 (the others stay i32)."""
    floats: tuple = ()

    def signature(self) -> dict:
        sig = super().signature()
        for name in self.floats:
            if sig.get(name) == "i32":
                sig[name] = "fp32"
        return sig


def _attention_rows(name: str, flag_grid: str, head_class: int, dtype: str, precision: str) -> list[dict]:
    """The feature constexprs (mask kind, causality, dropout; for dK/dV which gradients and whether dS is
    written) compiled for one tile choice. "all-on": every feature, with a bool and with a float mask (dS
    written for the float one). "pairwise": for every tile choice the dense row (no mask, causality or dropout)
    and the all-on float row (the most registers); for the middle head class in float16 and float32 (IEEE) also
    rows covering every pair of feature values (mask kind x causal x dropout) and, for dK/dV, the separate dK
    and dV passes of H_k != H_v. "full": every combination for every tile choice."""
    def row(mask, causal, dropout, dk=True, dv=True):
        r = {"MASK_KIND": mask, "IS_CAUSAL": causal, "DROPOUT": dropout}
        if name == "attn_bwd_dkdv_kernel":
            r.update(COMPUTE_DK=dk, COMPUTE_DV=dv, WRITE_DMASK=mask == 2 and dk)
        return r

    if flag_grid == "all-on":
        return [row(1, True, True), row(2, True, True)]
    if flag_grid == "full":
        passes = ((True, True), (True, False), (False, True)) if name == "attn_bwd_dkdv_kernel" else ((True, True),)
        return [row(m, c, d, dk, dv) for m in (0, 1, 2) for c in (True, False) for d in (True, False)
                for dk, dv in passes]
    rows = [row(0, False, False), row(2, True, True)]
    if head_class == 1 and (dtype, precision) in (("float16", "ieee"), ("float32", "ieee")):
        rows += [row(1, True, True), row(0, True, True), row(1, True, False), row(1, False, True),
                 row(2, False, False)]
        if name == "attn_bwd_dkdv_kernel":
            rows += [row(2, True, False, dk=True, dv=False), row(1, False, True, dk=False, dv=True)]
    return rows


def attention_specs(ops: Iterable[str] | None = None, dtypes: Iterable[str] | None = None,
                    flag_grid: str = "pairwise") -> list[Spec]:
    """Every specialisation of the attention kernels (``kernels/attention.py``) the launchers can choose on a
    GPU: each dtype (float32 in IEEE and in TF32 mode), each head-size class of ``attention.blocks`` (the
    forward with its general tiles, ``SPLIT=False``, and its decode tiles, ``SPLIT=True``), and the feature
    constexprs of ``_attention_rows``."""
    import importlib

    import torch
    import triton.language as tl

    module = importlib.import_module("fastseq.kernels.attention")
    budgets = getattr(module, "AOT_BUDGETS", {})
    tl_dtypes = {"float32": tl.float32, "float16": tl.float16, "bfloat16": tl.bfloat16}
    torch_dtypes = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    kinds = {"attn_fwd_kernel": (("fwd", False), ("decode", True)), "attn_bwd_dkdv_kernel": (("bwd", None),),
             "attn_bwd_dq_kernel": (("dq", None),)}
    specs = []
    for name in ATTN_KERNELS:
        if ops is not None and name not in ops:
            continue
        fn = getattr(module, name)
        for dtype in dtypes or DTYPES:
            for precision in (("ieee", "tf32") if dtype == "float32" else ("ieee",)):
                for kind, split in kinds[name]:
                    for head_class, head in enumerate(ATTN_HEADS):
                        launch = module.blocks(4096, 4096, head, head, torch_dtypes[dtype], True, kind, precision)
                        tiles = {k: v for k, v in launch.items() if k not in ("num_warps", "num_stages")}
                        for features in _attention_rows(name, flag_grid, head_class, dtype, precision):
                            consts = dict(DOT_DTYPE=tl_dtypes[dtype], PRECISION=precision, **tiles, **features)
                            if split is not None:
                                consts["SPLIT"] = split
                            consts = {k: v for k, v in consts.items() if k in fn.arg_names}
                            shape = "x".join(str(launch[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_E", "BLOCK_EV"))
                            label = " ".join(
                                [SHORT[dtype] + ("/tf32" if precision == "tf32" else ""),
                                 f"{shape} w{launch['num_warps']}" + (f" chunk{consts['CHUNK']}"
                                                                      if consts.get("CHUNK") else "")
                                 + (f" s{launch['num_stages']}" if launch.get("num_stages") else ""),
                                 kind, f"mask={('none', 'bool', 'float')[features['MASK_KIND']]}"]
                                + [f"{k.lower()}={int(v)}" for k, v in features.items() if k != "MASK_KIND"])
                            specs.append(_FloatScalarSpec(
                                kernel=name, fn=fn, dtype=dtype, constexprs=consts, num_warps=launch["num_warps"],
                                num_stages=launch.get("num_stages"), label=label,
                                tensor_cores=dtype != "float32" or precision == "tf32",
                                budget=dict(budgets.get(name, {"spill_bytes": 0, "local_ops": 0})),
                                pointer_dtypes={k: v for k, v in _ATTN_POINTERS.items() if k in fn.arg_names}
                                | ({"mask_ptr": "u8"} if features["MASK_KIND"] == 1 else {}),
                                floats=_ATTN_FLOATS))
    return specs


# Every kernel family: a function (ops, dtypes, flag_grid) -> specs, and the kernel names it knows.
FAMILIES: dict[str, tuple[Callable[..., list[Spec]], tuple[str, ...]]] = {
    "rnn_cell": (cell_specs, CELL_KERNELS),
    "rnn_seq": (seq_specs, SEQ_KERNELS),
    "attention": (attention_specs, ATTN_KERNELS),
}


def all_kernel_names() -> list[str]:
    return [k for _, names in FAMILIES.values() for k in names]


def default_specs(ops=None, dtypes=None, flag_grid="pairwise") -> list[Spec]:
    return [s for fn, _ in FAMILIES.values() for s in fn(ops, dtypes, flag_grid)]


# ---------------------------------------------------------------------------------------------------------
# Tools: Triton's ptxas and cuobjdump, and parsers of their output
# ---------------------------------------------------------------------------------------------------------


def tool(name: str) -> str:
    """Path of an NVIDIA tool Triton's package carries (``ptxas``, ``cuobjdump``, ``nvdisasm``)."""
    from triton import knobs

    return getattr(knobs.nvidia, name).path


def ptxas_version() -> str:
    out = subprocess.run([tool("ptxas"), "--version"], capture_output=True, text=True).stdout
    m = re.search(r"release [\d.]+, V[\d.]+", out)
    return m.group(0) if m else out.strip().splitlines()[-1]


_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILLS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def parse_ptxas(log: str) -> dict:
    """Registers, spill stores/loads and stack frame from ``ptxas -v`` output (one entry function)."""
    regs = _PTXAS_REGS.search(log)
    spills = _PTXAS_SPILLS.search(log)
    if not regs or not spills:
        raise ValueError(f"no register/spill lines in ptxas -v output:\n{log[-2000:]}")
    stack, stores, loads = map(int, spills.groups())
    return {"registers": int(regs.group(1)), "spill_stores": stores, "spill_loads": loads, "stack": stack}


_SASS_OP = re.compile(r"^\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P[T\d]+\s+)?([A-Z][A-Z0-9_]*)", re.M)
SASS_COUNTED = ("HMMA", "HGMMA", "IMMA", "LDL", "STL")


def parse_sass(sass: str) -> dict:
    """Counts of the tensor-core and local-memory opcodes (``HMMA.16816.F32`` counts as ``HMMA``) and the
    total instruction count in ``cuobjdump --dump-sass`` / ``nvdisasm`` output."""
    ops = _SASS_OP.findall(sass)
    counts = {op: 0 for op in SASS_COUNTED}
    for op in ops:
        if op in counts:
            counts[op] += 1
    counts["instructions"] = len(ops)
    return counts


def run_ptxas(ptx: str, arch: int, workdir: str) -> str:
    """``ptxas -v`` on ``ptx`` for ``arch`` with the options Triton compiles with; its log."""
    from triton.backends.nvidia.compiler import sm_arch_from_capability

    src = os.path.join(workdir, "kernel.ptx")
    with open(src, "w") as f:
        f.write(ptx)
    proc = subprocess.run([tool("ptxas"), "-lineinfo", "-v", f"--gpu-name={sm_arch_from_capability(arch)}", src,
                           "-o", src + ".o"], capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"ptxas failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return proc.stdout + proc.stderr


def dump_sass(binary: bytes | str, workdir: str) -> str:
    """``cuobjdump --dump-sass`` of a cubin (bytes) or of a file holding device code (a path)."""
    path = binary
    if isinstance(binary, bytes):
        path = os.path.join(workdir, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(binary)
    proc = subprocess.run([tool("cuobjdump"), "--dump-sass", path], capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"cuobjdump --dump-sass failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return proc.stdout


_RESOURCE_FN = re.compile(r"^\s*Function ([^\s:]+):\s*\n\s*(.+)$", re.M)


def parse_resource_usage(text: str) -> dict[str, dict]:
    """``cuobjdump --dump-resource-usage`` output: per function ``{"REG": n, "STACK": n, "SHARED": n, ...}``."""
    return {name: {k: int(v) for k, v in re.findall(r"([A-Z_\[\]0-9]+):(\d+)", fields)}
            for name, fields in _RESOURCE_FN.findall(text)}


def split_sass_by_function(sass: str) -> dict[str, str]:
    parts = re.split(r"^\s*Function : (\S+)\s*$", sass, flags=re.M)
    return {parts[i]: parts[i + 1] for i in range(1, len(parts) - 1, 2)}


# ---------------------------------------------------------------------------------------------------------
# One compilation, judged
# ---------------------------------------------------------------------------------------------------------


def compile_spec(spec: Spec, arch_cc: int) -> dict:
    """Compile ``spec`` for ``arch_cc`` and measure it; a row of the report (errors reported, not raised)."""
    import triton
    from triton.backends.compiler import GPUTarget

    arch = ARCHS[arch_cc]
    row = {"kernel": spec.kernel, "spec": spec.label, "arch": arch.name, "dtype": spec.dtype,
           "num_warps": spec.num_warps,
           "constexprs": {k: v if isinstance(v, (bool, int, str)) else str(v) for k, v in spec.constexprs.items()},
           "budget": spec.budget, "tensor_cores_required": spec.tensor_cores, "error": None, "failures": []}
    if not isinstance(spec.fn, triton.runtime.jit.JITFunction):
        row["error"] = ("not a compiled Triton JIT function (TRITON_INTERPRET=1 replaces them): "
                        "run without TRITON_INTERPRET")
        row["failures"].append("compile error: " + row["error"])
        return row
    options = {"num_warps": spec.num_warps}
    if spec.num_stages is not None:
        options["num_stages"] = spec.num_stages
    t0 = time.perf_counter()
    # Triton runs `ptxas -v` itself when it builds the cubin; its log is kept (printed, under
    # dump_ptxas_log) rather than running ptxas a second time. A cache hit builds nothing: then ptxas -v
    # runs here on the PTX.
    printed = io.StringIO()
    try:
        src = triton.compiler.ASTSource(
            fn=spec.fn, signature=spec.signature(),
            constexprs={(spec.fn.arg_names.index(k),): v for k, v in spec.constexprs.items()})
        with _ptxas_log_printed(), contextlib.redirect_stdout(printed):
            compiled = triton.compile(src, target=GPUTarget("cuda", arch_cc, 32), options=options)
    except Exception as e:  # noqa: BLE001 -- every compile error is reported with its kernel and spec
        msg = f"{type(e).__name__}: {e}".strip()
        row["error"] = msg[:3000]
        lines = [line.strip() for line in msg.splitlines() if line.strip()] or [msg]
        summary_line = lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1]}"
        row["failures"].append("compile error: " + summary_line[:400])
        return row
    row["compile_s"] = round(time.perf_counter() - t0, 3)
    with tempfile.TemporaryDirectory(prefix="fastseq-aot-") as workdir:
        try:
            log = printed.getvalue()
            if not _PTXAS_REGS.search(log):
                log = run_ptxas(compiled.asm["ptx"], arch_cc, workdir)
            row.update(parse_ptxas(log))
            row.update(parse_sass(dump_sass(compiled.asm["cubin"], workdir)))
        except Exception as e:  # noqa: BLE001
            row["error"] = f"{type(e).__name__}: {e}"[:3000]
            row["failures"].append("tool error: " + row["error"].splitlines()[0][:300])
            return row
    row["shared"] = int(compiled.metadata.shared)
    row["shared_limit"] = arch.shared_per_block
    row["cubin_bytes"] = len(compiled.asm["cubin"])
    row.update(occupancy(arch, row["registers"], spec.num_warps, row["shared"]))
    row["spill_bytes"] = row["spill_stores"] + row["spill_loads"]
    row["local_ops"] = row["LDL"] + row["STL"]
    row["tensor_core_ops"] = row["HMMA"] + row["HGMMA"]
    if row["shared"] > arch.shared_per_block:
        row["failures"].append(f"shared memory {row['shared']} B over the {arch.name} limit of "
                               f"{arch.shared_per_block} B per block")
    if row["spill_bytes"] > spec.budget.get("spill_bytes", 0):
        row["failures"].append(f"spills {row['spill_stores']} B stored + {row['spill_loads']} B loaded, over the "
                               f"budget of {spec.budget.get('spill_bytes', 0)} B")
    if row["local_ops"] > spec.budget.get("local_ops", 0):
        row["failures"].append(f"{row['LDL']} LDL + {row['STL']} STL local-memory instructions, over the budget "
                               f"of {spec.budget.get('local_ops', 0)}")
    if spec.tensor_cores and row["tensor_core_ops"] == 0:
        row["failures"].append(f"{SHORT.get(spec.dtype, spec.dtype)} matrix kernel without tensor-core "
                               f"instructions (no HMMA/HGMMA in the SASS)")
    return row


@contextlib.contextmanager
def _ptxas_log_printed():
    from triton import knobs

    before = knobs.nvidia.dump_ptxas_log
    knobs.nvidia.dump_ptxas_log = True
    try:
        yield
    finally:
        knobs.nvidia.dump_ptxas_log = before


_TASKS: list[tuple[Spec, int]] = []


def _run_task(i: int) -> dict:
    spec, arch = _TASKS[i]
    return compile_spec(spec, arch)


def compile_all(specs: list[Spec], archs: list[int], jobs: int | None = None,
                progress: Callable[[int, int], None] | None = None) -> list[dict]:
    """Every spec for every arch, on ``jobs`` processes (forked: specs may hold kernels defined anywhere)."""
    global _TASKS
    _TASKS = [(s, a) for a in archs for s in specs]
    jobs = max(1, min(jobs or os.cpu_count() or 1, len(_TASKS)))
    rows: list[dict | None] = [None] * len(_TASKS)
    if jobs == 1:
        for i in range(len(_TASKS)):
            rows[i] = _run_task(i)
            if progress:
                progress(i + 1, len(_TASKS))
    else:
        ctx = multiprocessing.get_context("fork")
        with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=ctx) as pool:
            futures = {pool.submit(_run_task, i): i for i in range(len(_TASKS))}
            for done, fut in enumerate(concurrent.futures.as_completed(futures), 1):
                rows[futures[fut]] = fut.result()
                if progress:
                    progress(done, len(_TASKS))
    return rows  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------------------
# The compiled extension's CUDA kernels
# ---------------------------------------------------------------------------------------------------------


def extension_report() -> dict:
    """Resources of ``fastseq._C``'s CUDA kernels from ``cuobjdump`` of the built library, or why there are none."""
    try:
        import importlib

        ext = importlib.import_module("fastseq._C")
    except ImportError as e:
        return {"built_with_cuda": False, "kernels": [], "note": f"fastseq._C is not built ({e}): no CUDA kernels"}
    if not ext.built_with_cuda():
        return {"built_with_cuda": False, "kernels": [], "library": ext.__file__,
                "note": "fastseq._C was built without CUDA (a CPU build of torch, or no CUDA toolkit at build time): "
                        "no CUDA kernels to report"}
    with tempfile.TemporaryDirectory(prefix="fastseq-aot-") as workdir:
        usage = subprocess.run([tool("cuobjdump"), "--dump-resource-usage", ext.__file__],
                               capture_output=True, text=True)
        sass = dump_sass(ext.__file__, workdir)
    per_fn = split_sass_by_function(sass)
    kernels = []
    for name, res in parse_resource_usage(usage.stdout).items():
        counts = parse_sass(per_fn.get(name, ""))
        kernels.append({"function": name, "registers": res.get("REG"), "stack": res.get("STACK"),
                        "shared": res.get("SHARED"), "local": res.get("LOCAL"), **counts})
    return {"built_with_cuda": True, "library": ext.__file__, "kernels": kernels,
            "note": f"{len(kernels)} CUDA kernel(s) in {os.path.basename(ext.__file__)}"}


# ---------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------


def rows_table(rows: list[dict]) -> str:
    header = ["kernel", "arch", "specialisation", "regs", "spill st/ld B", "stack B", "shared KiB (limit)", "HMMA",
              "HGMMA", "LDL/STL", "warps/SM", "occupancy", "limited by", "verdict"]
    lines = []
    for r in rows:
        if r.get("registers") is None:
            lines.append([r["kernel"], r["arch"], r["spec"]] + ["-"] * 10 + ["FAIL"])
            continue
        lines.append([
            r["kernel"], r["arch"], r["spec"], r["registers"], f"{r['spill_stores']}/{r['spill_loads']}", r["stack"],
            f"{r['shared'] / 1024:.1f} ({r['shared_limit'] // 1024})", r["HMMA"], r["HGMMA"],
            f"{r['LDL']}/{r['STL']}", r["warps_per_sm"], f"{r['occupancy']:.0%}", r["occupancy_limiter"],
            "ok" if not r["failures"] else "FAIL"])
    return markdown_table(header, lines, right={3, 5, 7, 8, 10, 11})


def summary(rows: list[dict]) -> list[dict]:
    """Per kernel and arch: the range of registers, the worst spills, the lowest occupancy, tensor-core use."""
    out = []
    keys = sorted({(r["kernel"], r["arch"]) for r in rows}, key=lambda k: (k[1], k[0]))
    for kernel, arch in keys:
        rs = [r for r in rows if r["kernel"] == kernel and r["arch"] == arch]
        ok = [r for r in rs if r.get("registers") is not None]
        half = [r for r in ok if r["tensor_cores_required"]]
        out.append({
            "kernel": kernel, "arch": arch, "specs": len(rs), "failed": sum(bool(r["failures"]) for r in rs),
            "registers": (min(r["registers"] for r in ok), max(r["registers"] for r in ok)) if ok else None,
            "max_spill_bytes": max((r["spill_bytes"] for r in ok), default=None),
            "max_local_ops": max((r["local_ops"] for r in ok), default=None),
            "max_shared": max((r["shared"] for r in ok), default=None),
            "occupancy": (min(r["occupancy"] for r in ok), max(r["occupancy"] for r in ok)) if ok else None,
            "tensor_core_ops": (min(r["tensor_core_ops"] for r in half), max(r["tensor_core_ops"] for r in half))
            if half else None,
        })
    return out


def summary_table(rows: list[dict]) -> str:
    header = ["kernel", "arch", "specs", "regs (min-max)", "max spill B", "max LDL+STL", "max shared KiB",
              "occupancy (min-max)", "tensor-core ops, fp16/bf16/tf32 (min-max)", "failed"]
    lines = []
    for s in summary(rows):
        def rng(v, f=str):
            return "-" if v is None else (f(v[0]) if v[0] == v[1] else f"{f(v[0])}-{f(v[1])}")

        lines.append([s["kernel"], s["arch"], s["specs"], rng(s["registers"]), s["max_spill_bytes"],
                      s["max_local_ops"], "-" if s["max_shared"] is None else f"{s['max_shared'] / 1024:.1f}",
                      rng(s["occupancy"], lambda x: f"{x:.0%}"), rng(s["tensor_core_ops"]), s["failed"]])
    return markdown_table(header, lines, right={2, 4, 5, 6})


def failures(rows: list[dict]) -> list[str]:
    return [f"{r['kernel']} [{r['spec']}] {r['arch']}: {f}" for r in rows for f in r["failures"]]


def header_info(archs: list[int], flag_grid: str) -> dict:
    import triton

    return {"triton": triton.__version__, "ptxas": ptxas_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "archs": [ARCHS[a].name for a in archs], "flag_grid": flag_grid}


def markdown(info: dict, rows: list[dict], ext: dict) -> str:
    failed = failures(rows)
    limits = ", ".join(f"{a.name}: {a.shared_per_block // 1024} KiB shared per block, {a.shared_per_sm // 1024} KiB "
                       f"per SM" for a in ARCHS.values() if a.name in info["archs"])
    parts = [
        f"# AOT report: fastseq's Triton kernels for {', '.join(info['archs'])}",
        "",
        f"Generated by `python -m fastseq aot` (no GPU: compiled ahead of time). Triton {info['triton']}, "
        f"ptxas {info['ptxas']} (Triton's own), {info['date']}. Flag grid: {info['flag_grid']}.",
        "",
        f"{len(rows)} compilations, {len({(r['kernel'], r['spec'], r['arch']) for r in rows if r['failures']})} "
        f"failed. Limits: {limits}; 64 warps, 32 blocks and 65536 registers per SM (allocated per warp in units "
        "of 256). Occupancy: warps resident per SM over 64, from registers, warps and shared memory (1 KiB "
        "reserved per block); `limited by` names the binding limit. Registers and spills from `ptxas -v` on the "
        "PTX; HMMA/HGMMA (tensor cores) and LDL/STL (local memory) counted in the SASS of the cubin "
        "(`cuobjdump --dump-sass`). Compiled with the general signature (no divisibility/unit-stride "
        "specialisation).",
        "",
        "## Summary per kernel",
        "",
        summary_table(rows),
        "",
    ]
    if failed:
        parts += ["## Failures", ""] + [f"- {f}" for f in failed] + [""]
    parts += ["## CUDA extension (`fastseq._C`)", "", ext["note"], ""]
    if ext.get("kernels"):
        parts += [markdown_table(["function", "regs", "stack B", "shared B", "local B", "HMMA", "HGMMA", "LDL/STL"],
                             [[k["function"], k["registers"], k["stack"], k["shared"], k["local"], k["HMMA"],
                               k["HGMMA"], f"{k['LDL']}/{k['STL']}"] for k in ext["kernels"]]), ""]
    parts += ["## Every kernel and specialisation", "",
              "Specialisation: dtype (`/tf32`: float32 with TF32 products), tile `BLOCK_B x BLOCK_H x BLOCK_K`, "
              "warps, and the constexpr flags.", "", rows_table(rows), ""]
    return "\n".join(parts)


# ---------------------------------------------------------------------------------------------------------
# Command
# ---------------------------------------------------------------------------------------------------------


def add_arguments(parser) -> None:
    parser.add_argument("--archs", default="80,90", help="compute capabilities, comma-separated (default 80,90)")
    parser.add_argument("--ops", nargs="+", default=None, metavar="KERNEL",
                        help=f"kernels (default: every one); a family name ({', '.join(FAMILIES)}) selects all of "
                             "its kernels")
    parser.add_argument("--dtypes", nargs="+", choices=DTYPES, default=list(DTYPES))
    parser.add_argument("--flags", choices=FLAG_GRIDS, default="pairwise",
                        help="constexpr flag values: a pairwise covering set (default), every combination, or "
                             "only all true")
    parser.add_argument("--jobs", type=int, default=None, help="compile processes (default: one per CPU)")
    parser.add_argument("--json", metavar="PATH", help="write the report as JSON")
    parser.add_argument("--md", metavar="PATH", help="write the report as markdown")
    parser.add_argument("--quiet", action="store_true", help="print the summary only, not every row")


def run(args, extra_specs: list[Spec] | None = None) -> int:
    """The ``aot`` command; ``extra_specs`` joins kernels defined elsewhere (tests inject bad ones)."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise SystemExit("fastseq aot: compiling needs Triton's JIT functions; run without TRITON_INTERPRET=1")
    try:
        archs = [int(a) for a in str(args.archs).replace(" ", "").split(",") if a]
    except ValueError:
        raise SystemExit(f"fastseq aot: --archs must be comma-separated integers such as 80,90, got {args.archs!r}")
    unknown = [a for a in archs if a not in ARCHS]
    if unknown:
        raise SystemExit(f"fastseq aot: unknown arch(s) {unknown}; choose from {sorted(ARCHS)}")
    ops = None
    if args.ops:
        ops = set()
        for op in args.ops:
            if op in FAMILIES:
                ops.update(FAMILIES[op][1])
            else:
                ops.add(op)
        known = set(all_kernel_names()) | {s.kernel for s in extra_specs or []}
        bad = sorted(ops - known)
        if bad:
            raise SystemExit(f"fastseq aot: unknown kernel(s) {bad}; choose from {sorted(known)} or a family "
                             f"{sorted(FAMILIES)}")
    specs = default_specs(ops, args.dtypes, args.flags)
    specs += [s for s in extra_specs or [] if ops is None or s.kernel in ops]
    info = header_info(archs, args.flags)
    print(f"fastseq aot: {len(specs)} specialisations x {len(archs)} arch(s); Triton {info['triton']}, "
          f"ptxas {info['ptxas']}", flush=True)

    def progress(done, total):
        if done % 50 == 0 or done == total:
            print(f"  compiled {done}/{total}", file=sys.stderr, flush=True)

    rows = compile_all(specs, archs, args.jobs, progress)
    ext = extension_report()
    failed = failures(rows)
    if not args.quiet:
        print(rows_table(rows))
        print()
    print(summary_table(rows))
    print()
    print(f"CUDA extension: {ext['note']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**info, "rows": rows, "summary": summary(rows), "extension": ext,
                       "failures": failed}, f, separators=(",", ":"), default=str)
    if args.md:
        with open(args.md, "w") as f:
            f.write(markdown(info, rows, ext))
    for line in failed:
        print("FAIL " + line)
    print(f"{len(rows) - sum(bool(r['failures']) for r in rows)} of {len(rows)} compilations passed, "
          f"{len(failed)} failure(s)")
    return 1 if failed else 0


def main(argv: list[str] | None = None, extra_specs: list[Spec] | None = None) -> int:
    """Run ``aot`` with command-line ``argv`` (without the ``aot`` word) and optional extra kernels."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m fastseq aot")
    add_arguments(parser)
    return run(parser.parse_args(sys.argv[1:] if argv is None else argv), extra_specs)


__all__ = ["ARCHS", "Arch", "Spec", "cell_specs", "seq_specs", "compile_spec", "compile_all", "occupancy",
           "parse_ptxas", "parse_sass", "parse_resource_usage", "extension_report", "run", "main"]
