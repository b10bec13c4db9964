"""Which backends exist on this machine, and which one runs a given call.

Backends (SPEC.md): ``"auto"``, ``"triton"``, ``"cuda"``, ``"cpp"``, ``"torch"``. An explicit backend never falls
back: where it cannot run a call, :func:`select` raises :class:`BackendUnavailableError` saying why. ``"auto"``
picks the implementation measured fastest for the call's sizes (``crossovers.json``, from the benchmark suite) among
those that can run it, torch's own included.
"""

from __future__ import annotations

import importlib
import json
import math
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
        return False, ("fastseq._C was built without its CUDA kernels (a CPU build of torch, no CUDA toolkit found at "
                       "build time, or FASTSEQ_NO_CUDA=1); rebuild with a CUDA build of torch and nvcc on PATH or "
                       "CUDA_HOME set")
    if not torch.cuda.is_available():
        return False, "no CUDA GPU is visible"
    if not EXTENSION_OPS["cuda"]:
        return False, "fastseq._C was built with CUDA but registers no CUDA kernel (a broken build?)"
    return True, None


# The CUDA kernels' oldest architecture (bfloat16 tensor-core products and mma.sync m16n8k16 need sm_80).
CUDA_MIN_CAPABILITY = (8, 0)


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


def _cuda_capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


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
        capability = _cuda_capability(device)
        if capability < CUDA_MIN_CAPABILITY:
            return (f"the CUDA kernels need a GPU of compute capability {CUDA_MIN_CAPABILITY[0]}."
                    f"{CUDA_MIN_CAPABILITY[1]} or newer; {device} is {capability[0]}.{capability[1]}")
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


# ---------------------------------------------------------------------------------------------------------
# "auto": the crossovers measured by the benchmark suite
# ---------------------------------------------------------------------------------------------------------

# What "auto" knows about speed: ``fastseq/crossovers.json``, written by ``python -m fastseq bench
# --record-crossovers`` from its measurements (each point: an operator, device type, dtype, mode and sizes, with
# the median time of every implementation whose numbers passed the error check there), plus, where nothing was
# measured yet, *predicted* rules from the floor models in benchmarks/NOTES*.md, each with its reason.
CROSSOVERS_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "crossovers.json")

# The sizes a call can be described by (keywords of :func:`select`), in the order a table key lists them.
SIZE_KEYS = ("batch", "hidden", "steps", "q_len", "kv_len", "head_dim")


class Crossovers:
    """The table "auto" reads: measured points, searched by nearest sizes, and predicted fallback rules.

    ``points[(op, device_type, dtype, mode)]`` holds ``(log_sizes, times)`` pairs: ``log_sizes`` maps a size
    name to its natural logarithm, ``times`` maps each implementation (a kernel backend or ``"torch"``) that ran
    correctly there to its median time. For a call, the point nearest in log-sizes (over the size names both
    give) decides: the fastest implementation of that point that can run the call here. ``rules[(op,
    device_type)]`` lists predicted ``(backend, dtypes or None, max_sizes)`` for operators nothing was measured
    for; the first whose backend can run the call and whose limits hold wins."""

    def __init__(self, table: dict):
        self.source = table
        self.points: dict[tuple, list] = {}
        for p in table.get("measured", []):
            key = (p["op"], p["device"], p["dtype"], p["mode"])
            log_sizes = {k: math.log(max(int(v), 1)) for k, v in p["sizes"].items()}
            self.points.setdefault(key, []).append((log_sizes, dict(p["times_us"])))
        self.rules: dict[tuple, list] = {}
        for r in table.get("predicted", []):
            dtypes = None if r.get("dtypes") is None else frozenset(r["dtypes"])
            self.rules.setdefault((r["op"], r["device"]), []).append((r["backend"], dtypes, dict(r.get("max", {}))))

    def nearest(self, op: str, device_type: str, dtype: str, mode: str, sizes: dict):
        """The times of the measured point nearest to ``sizes`` (``mode``'s points first, else the other mode's),
        or ``None`` where nothing was measured for the operator, device type and dtype."""
        for m in (mode, "training" if mode == "inference" else "inference"):
            candidates = self.points.get((op, device_type, dtype, m))
            if candidates:
                logs = {k: math.log(max(v, 1)) for k, v in sizes.items() if v is not None}
                if not any(k in candidates[0][0] for k in logs):
                    return self._overall(candidates)
                best, best_d = None, math.inf
                for point_logs, times in candidates:
                    d = 0.0
                    for k, v in logs.items():
                        if k in point_logs:
                            d += (point_logs[k] - v) ** 2
                    if d < best_d:
                        best, best_d = times, d
                return best
        return None

    @staticmethod
    def _overall(candidates: list) -> dict:
        """Where no size of the call describes the points: each implementation's total time over the points
        (those measured at every point)."""
        names = set(candidates[0][1])
        for _, times in candidates[1:]:
            names &= set(times)
        total = {}
        for name in names:
            total[name] = 0.0
            for _, times in candidates:
                total[name] += times[name]
        return total

    def predicted(self, op: str, device_type: str, dtype: str, sizes: dict) -> list[str]:
        """Backends the predicted rules admit for the call, in the rules' order."""
        out = []
        for backend, dtypes, limits in self.rules.get((op, device_type), ()):
            if dtypes is not None and dtype not in dtypes:
                continue
            if all(sizes.get(k) is None or sizes[k] <= v for k, v in limits.items()):
                out.append(backend)
        return out


def load_crossovers(path: str = CROSSOVERS_PATH) -> Crossovers:
    """The crossover table at ``path`` (an empty one where the file is absent: "auto" then runs torch)."""
    try:
        with open(path) as f:
            return Crossovers(json.load(f))
    except FileNotFoundError:
        return Crossovers({})


CROSSOVERS = load_crossovers()


def set_crossovers(table: Crossovers) -> Crossovers:
    """Make ``table`` the one "auto" reads (the benchmark's tests and ``--record-crossovers`` use it); returns
    the previous one. Forgets the decisions already made."""
    global CROSSOVERS
    previous, CROSSOVERS = CROSSOVERS, table
    _AUTO_CACHE.clear()
    return previous


# Decisions of "auto" already made in this process (eager calls only; under torch.compile the decision is traced
# once per compiled graph anyway): a decoder loop asks the same question every step.
_AUTO_CACHE: dict[tuple, str] = {}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _auto(op: str, device: torch.device, dtype: torch.dtype, sizes: dict, training: bool) -> str:
    """The fastest implementation the table knows for the call among those that can run it here."""
    runnable = [b for b in KERNEL_BACKENDS if _why_not(b, op, device, dtype) is None]
    if not runnable:
        return "torch"
    name = _dtype_name(dtype)
    times = CROSSOVERS.nearest(op, device.type, name, "training" if training else "inference", sizes)
    if times is not None:
        best, best_t = "torch", times.get("torch", math.inf)
        for b in runnable:
            if times.get(b, math.inf) < best_t:
                best, best_t = b, times[b]
        return best
    for b in CROSSOVERS.predicted(op, device.type, name, sizes):
        if b in runnable:
            return b
    return "torch"


def select(op: str, device: torch.device, dtype: torch.dtype, requested: str, hidden: int | None = None, *,
           batch: int | None = None, steps: int | None = None, q_len: int | None = None,
           kv_len: int | None = None, head_dim: int | None = None, training: bool = False) -> str:
    """The backend that runs ``op`` on tensors of ``device``/``dtype`` given the ``requested`` one.

    An explicit backend runs the call or raises :class:`BackendUnavailableError` saying why (any size). ``"auto"``
    picks what the crossover table (:data:`CROSSOVERS`) measured fastest for the nearest sizes (``hidden``,
    ``batch``, ``steps`` of the recurrences; ``q_len``, ``kv_len``, ``head_dim`` of attention; ``training``:
    whether a gradient will be asked for) among the backends that can run the call, ``"torch"`` included."""
    check_backend_name(requested)
    if requested == "torch":
        return "torch"
    if requested == "auto":
        sizes = {"batch": batch, "hidden": hidden, "steps": steps, "q_len": q_len, "kv_len": kv_len,
                 "head_dim": head_dim}
        if torch.compiler.is_compiling():
            # Under torch.compile batch sizes and lengths may be dynamic (SymInts, which Dynamo cannot tell from
            # ints): the decision uses the module's own size only, so no graph specialises on the others.
            return _auto(op, device, dtype, {"hidden": hidden}, training)
        key = (op, device.type, dtype, batch, hidden, steps, q_len, kv_len, head_dim, training)
        chosen = _AUTO_CACHE.get(key)
        if chosen is None:
            if len(_AUTO_CACHE) > 4096:  # many distinct sizes (variable lengths): start over rather than grow
                _AUTO_CACHE.clear()
            chosen = _AUTO_CACHE[key] = _auto(op, device, dtype, sizes, training)
        return chosen
    reason = _why_not(requested, op, device, dtype)
    if reason is not None:
        raise BackendUnavailableError(f"backend={requested!r} cannot run {op}: {reason}")
    return requested
