"""Timers, statistics and the device's measured ceilings (matrix rate, memory bandwidth, per-call latency).

On CPU the timer is ``torch.utils.benchmark.Timer.blocked_autorange`` (blocks of calls sized to beat the clock's
resolution; one sample per block). On CUDA it is ``triton.testing.do_bench`` (CUDA events around each call, the
L2 cache flushed before each one; one sample per call). Warm-up calls are never sampled. Implementations of a
case are measured in interleaved rounds (the order reversed every other round), so drift and a noisy neighbour
hit all of them alike; the samples of the rounds are pooled.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict, dataclass

import torch


def quantile(xs: list[float], q: float) -> float:
    """Linear-interpolation quantile (as ``torch.quantile``) of a non-empty list."""
    s = sorted(xs)
    pos = q * (len(s) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def summary_us(samples_s: list[float]) -> dict:
    """Median and p20/p80 of samples given in seconds, in microseconds."""
    us = [s * 1e6 for s in samples_s]
    return {"median_us": statistics.median(us), "p20_us": quantile(us, 0.2), "p80_us": quantile(us, 0.8),
            "samples": len(us)}


class CpuTimer:
    """``torch.utils.benchmark`` on CPU: seconds per call, one sample per block of calls."""

    name = "torch.utils.benchmark.Timer.blocked_autorange (CPU wall clock)"

    def __init__(self, min_time_s: float):
        self.min_time_s = min_time_s

    def __call__(self, fn) -> list[float]:
        from torch.utils.benchmark import Timer

        fn()  # warm-up: first calls allocate and fill caches
        m = Timer(stmt="fn()", globals={"fn": fn}).blocked_autorange(min_run_time=self.min_time_s)
        return list(m.times)


class CudaTimer:
    """``triton.testing.do_bench`` on CUDA: seconds per call, one sample per call."""

    name = "triton.testing.do_bench (CUDA events, L2 flushed before each call)"

    def __init__(self, min_time_s: float, warmup_s: float = 0.01):
        self.rep_ms, self.warmup_ms = min_time_s * 1e3, warmup_s * 1e3

    def __call__(self, fn) -> list[float]:
        import triton.testing

        ms = triton.testing.do_bench(fn, warmup=self.warmup_ms, rep=self.rep_ms, return_mode="all")
        return [t / 1e3 for t in ms]


def make_timer(device: torch.device, min_time_s: float):
    return CudaTimer(min_time_s) if device.type == "cuda" else CpuTimer(min_time_s)


def interleaved(fns: dict, timer, rounds: int) -> dict[str, list[float]]:
    """Samples (seconds) of every callable in ``fns``, measured in ``rounds`` interleaved rounds. A callable that
    raises is dropped and its error returned in place of its samples (as the exception)."""
    samples: dict[str, list[float] | BaseException] = {name: [] for name in fns}
    order = list(fns)
    for r in range(rounds):
        for name in order if r % 2 == 0 else order[::-1]:
            if isinstance(samples[name], BaseException):
                continue
            try:
                samples[name] += timer(fns[name])
            except Exception as e:  # recorded with the case; the other implementations go on
                samples[name] = e
    return samples


def capture_cuda_graph(run):
    """``run`` captured in a CUDA graph: ``(replay, static result)``, warmed up on a side stream first (what
    torch's documentation asks before a capture)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            run()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        result = run()
    return graph.replay, result


# ---------------------------------------------------------------------------------------------------------
# Ceilings: measured once per run, the denominators of every floor
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Ceilings:
    """What this device was measured to do in this run."""

    matmul_flops: dict  # dtype name -> FLOP/s of a large square matrix product
    bandwidth: float  # bytes/s of a large device-to-device copy (bytes read + bytes written)
    call_latency: float  # seconds per call of a trivial operator (host issue; on CUDA a launch)
    how: str

    def as_dict(self) -> dict:
        return asdict(self)


def _best_seconds(fn, timer) -> float:
    """The median of ``timer``'s samples for ``fn`` (ceilings are repeatable enough for a median)."""
    return statistics.median(timer(fn))


def measure_ceilings(device: torch.device, dtypes: list[str], timer) -> Ceilings:
    """Matrix rate per dtype, copy bandwidth and per-call latency on ``device``, measured now."""
    cuda = device.type == "cuda"
    flops = {}
    for name in dtypes:
        dtype = getattr(torch, name)
        # large enough to reach the rate; on a CPU half precision is slow (torch has no fast path everywhere)
        n = (8192 if name != "float32" else 4096) if cuda else (1024 if name == "float32" else 512)
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        flops[name] = 2 * n**3 / _best_seconds(lambda: torch.mm(a, b), timer)
    words = (256 if cuda else 16) * 2**20  # 1 GiB of float32 on a GPU, 64 MiB on a CPU (past its caches)
    src = torch.randn(words, device=device)
    dst = torch.empty_like(src)
    bandwidth = 2 * src.numel() * 4 / _best_seconds(lambda: dst.copy_(src), timer)
    x, y, z = (torch.ones(1, device=device) for _ in range(3))
    calls = 200
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        torch.add(x, y, out=z)
    if cuda:
        torch.cuda.synchronize()
    latency = (time.perf_counter() - t0) / calls
    how = (f"matrix rate: torch.mm of {'4096² (float32), 8192²' if cuda else '1024² (float32), 512²'} matrices; "
           f"bandwidth: copy of "
           f"{words * 4 // 2**20} MiB (read + write); latency: {calls} calls of torch.add on 1-element tensors "
           f"(host wall clock{', then a synchronisation' if cuda else ''})")
    return Ceilings(flops, bandwidth, latency, how)
