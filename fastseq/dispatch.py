"""Which backends exist on this machine, and which one runs a given call.

Backends (SPEC.md): ``"auto"``, ``"triton"``, ``"cuda"``, ``"cpp"``, ``"torch"``. An explicit backend never falls
back: where it cannot run a call, :func:`select` raises :class:`BackendUnavailableError` saying why. ``"auto"``
picks the fastest fastseq backend that can run the call and falls back to ``"torch"`` where none can.
"""

from __future__ import annotations

import importlib
import os

import torch

BACKENDS = ("auto", "triton", "cuda", "cpp", "torch")
# The backends that run fastseq's own kernels (the others choose one, or run torch's).
KERNEL_BACKENDS = ("triton", "cuda", "cpp")



def _triton_interprets() -> bool:
    """Whether Triton turns kernels into interpreted functions, as Triton itself reads TRITON_INTERPRET."""
    try:
        from triton import knobs

        return bool(knobs.runtime.interpret)
    except (ImportError, AttributeError):  # older Triton without knobs
        return os.environ.get("TRITON_INTERPRET", "0") == "1"


# Read once, at import: Triton decides between compiling and interpreting when a kernel is defined, which
# happens when fastseq is imported, so the variable must be set before that.
TRITON_INTERPRET = _triton_interprets()

# dtypes each kernel backend computes in (float32 accumulation inside); float64 stays with torch.
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run this call (no GPU, not built, dtype, size or device)."""


def check_backend_name(backend: object) -> str:
    """Return ``backend`` if it names a backend, else raise ``ValueError`` naming it and the valid ones."""
    if not isinstance(backend, str) or backend not in BACKENDS:
        valid = ", ".join(repr(b) for b in BACKENDS)
        raise ValueError(f"backend must be one of {valid}; got {backend!r}")
    return backend


def _triton_status() -> tuple[bool, str | None]:
    try:
        import triton  # noqa: F401
    except ImportError as e:  # pragma: no cover - triton is a dependency, but may be broken
        return False, f"triton is not importable: {e}"
    if TRITON_INTERPRET:
        return True, None
    if not torch.cuda.is_available():
        return False, ("no CUDA GPU is visible; set TRITON_INTERPRET=1 before importing fastseq to run the "
                       "Triton kernels on CPU tensors (slowly, for testing)")
    return True, None


def _load_extension():
    """The compiled extension ``fastseq._C``, or the reason it is absent."""
    try:
        return importlib.import_module("fastseq._C"), None
    except ImportError as e:
        return None, f"the compiled extension fastseq._C is not built ({e}); see the README on building it"


_EXTENSION, _EXTENSION_MISSING = _load_extension()
# Operators the extension implements, per device type (empty where it is not built).
EXTENSION_OPS = {
    dev: frozenset(_EXTENSION.kernels(dev)) if _EXTENSION is not None else frozenset() for dev in ("cpu", "cuda")
}


def _cuda_status() -> tuple[bool, str | None]:
    if _EXTENSION is None:
        return False, _EXTENSION_MISSING
    if not _EXTENSION.built_with_cuda():
        return False, ("fastseq._C was built without CUDA kernels (none written yet, no CUDA toolkit found at build "
                       "time, or FASTSEQ_NO_CUDA=1)")
    if not torch.cuda.is_available():
        return False, "no CUDA GPU is visible"
    if not EXTENSION_OPS["cuda"]:
        return False, "fastseq._C has no CUDA kernels yet"
    return True, None


def _cpp_status() -> tuple[bool, str | None]:
    if _EXTENSION is None:
        return False, _EXTENSION_MISSING
    if not EXTENSION_OPS["cpu"]:
        return False, "fastseq._C has no CPU kernels yet"
    return True, None


# Availability is fixed for the life of the process: computed once here, so that backend selection is
# plain dictionary work that torch.compile traces without a graph break.
_STATUS = {
    "auto": (True, None),
    "torch": (True, None),
    "triton": _triton_status(),
    "cuda": _cuda_status(),
    "cpp": _cpp_status(),
}


def _status(backend: str) -> tuple[bool, str | None]:
    return _STATUS[backend]


def backends() -> dict[str, dict[str, object]]:
    """For each backend name, ``{"available": bool, "reason": str | None}`` on this machine."""
    out = {}
    for name in BACKENDS:
        available, reason = _status(name)
        out[name] = {"available": available, "reason": reason}
    return out


# Operators each kernel backend implements. The extension reports its own; Triton's are listed here.
TRITON_OPS = frozenset({"lstm_cell", "gru_cell", "rnn_cell", "lstm_layer", "gru_layer", "rnn_layer", "sdpa"})


def _why_not(backend: str, op: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """Why ``backend`` cannot run ``op`` on ``device``/``dtype``, or ``None`` if it can."""
    available, reason = _status(backend)
    if not available:
        return reason
    if backend == "triton":
        if op not in TRITON_OPS:
            return f"there is no Triton kernel for {op} yet"
        if device.type != "cuda" and not (device.type == "cpu" and TRITON_INTERPRET):
            return (f"Triton kernels take CUDA tensors; got a tensor on {device}. Set TRITON_INTERPRET=1 "
                    f"before importing fastseq to run them on CPU tensors")
    elif backend == "cuda":
        if device.type != "cuda":
            return f"the CUDA kernels take CUDA tensors; got a tensor on {device}"
        if op not in EXTENSION_OPS["cuda"]:
            return f"fastseq._C has no CUDA kernel for {op}"
    elif backend == "cpp":
        if device.type != "cpu":
            return f"the C++ kernels take CPU tensors; got a tensor on {device}"
        if op not in EXTENSION_OPS["cpu"]:
            return f"fastseq._C has no CPU kernel for {op}"
    if dtype not in KERNEL_DTYPES:
        names = ", ".join(str(d).removeprefix("torch.") for d in KERNEL_DTYPES)
        return (f"it does not take {str(dtype).removeprefix('torch.')} (it takes {names}); "
                f"use backend='torch' or 'auto'")
    return None


# Preference of "auto" per device type. The interpreter is a test tool, never a fast path, so "auto" on CPU does
# not pick Triton. The order on CUDA is provisional until the benchmark suite records crossovers.
_AUTO_ORDER = {"cuda": ("cuda", "triton"), "cpu": ("cpp",)}

# Sizes beyond which "auto" does not pick a kernel backend for an operator, predicted from the floor model
# (benchmarks/NOTES.md), not yet measured: the Triton layer kernel runs one program per block of batch rows
# and direction, which re-reads all of W_hh from L2 every time step. At H ≤ 128 that is ≤ 128 KiB (float32
# LSTM) per step and the recurrence is latency-bound, where one launch per layer beats cuDNN's per-step
# launches; at H = 1024 it is 8-16 MiB per step through one SM's share of L2 bandwidth (tens of µs), slower
# than cuDNN. Until the benchmark measures the crossover, "auto" gives larger layers to torch.
AUTO_MAX_HIDDEN = {
    ("triton", "lstm_layer"): 128,
    ("triton", "gru_layer"): 128,
    ("triton", "rnn_layer"): 128,
}


# Operators for which "auto" on CPU takes the C++ kernels: where they measured faster than torch's own
# (benchmarks/bench_cpu.py on a 2-core AVX-512 CI-class machine, float32, T = 64: GRU and Elman layers 1.3-10x
# faster; the LSTM layer 0.5-0.8x against oneDNN's fused LSTM, the cells 0.4-1.2x, so those stay with torch).
AUTO_CPP_OPS = frozenset({"gru_layer", "rnn_layer"})


def _auto_declines(backend: str, op: str, hidden: int | None) -> bool:
    if backend == "cpp" and op not in AUTO_CPP_OPS:
        return True
    limit = AUTO_MAX_HIDDEN.get((backend, op))
    return limit is not None and hidden is not None and hidden > limit


def select(op: str, device: torch.device, dtype: torch.dtype, requested: str, hidden: int | None = None) -> str:
    """The backend that runs ``op`` on tensors of ``device``/``dtype`` given the ``requested`` one. ``hidden``
    (the hidden size, where the operator has one) lets ``"auto"`` leave sizes a kernel is not predicted to win
    at to torch; an explicit backend runs any size."""
    check_backend_name(requested)
    if requested == "torch":
        return "torch"
    if requested == "auto":
        for candidate in _AUTO_ORDER.get(device.type, ()):
            if _why_not(candidate, op, device, dtype) is None and not _auto_declines(candidate, op, hidden):
                return candidate
        return "torch"
    reason = _why_not(requested, op, device, dtype)
    if reason is not None:
        raise BackendUnavailableError(f"backend={requested!r} cannot run {op}: {reason}")
    return requested
