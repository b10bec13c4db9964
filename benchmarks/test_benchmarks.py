"""The benchmark's cases under pytest-benchmark (see conftest.py). Each test builds its case (once per case,
shared by the implementations), checks the implementation's error against the float64 reference first (a fast
wrong kernel fails here rather than posting a time), then times it; on a GPU each timed call ends with a
synchronisation, so the time is the kernels' and not the launch's."""

from __future__ import annotations

import pytest
import torch

from fastseq.bench.cases import build
from fastseq.bench.runner import verdict

_CASES: dict = {}


def _case(device: str, spec):
    key = (device, spec)
    if key not in _CASES:
        _CASES.clear()  # one case's tensors alive at a time
        case = build(spec, torch.device(device))
        torch_result = case.implementations([])["torch"]()
        _CASES[key] = (case, case.errors(torch_result))
    return _CASES[key]


def test_case(benchmark, bench_pair):
    device, spec, impl = bench_pair
    case, torch_errors = _case(device, spec)
    fn = case.implementations([] if impl == "torch" else [impl])[impl]
    if isinstance(fn, str):
        pytest.skip(fn)
    errors = case.errors(fn())
    benchmark.group = spec.label
    benchmark.extra_info.update({k: v for k, v in errors.items() if k != "worst"}, torch_errors=torch_errors)
    if impl != "torch":
        judged = verdict(errors, torch_errors, getattr(torch, spec.dtype))
        benchmark.extra_info["verdict"] = judged
        assert judged != "WRONG", f"{impl} is wrong on {spec.label}: {errors} (torch: {torch_errors})"
    if device == "cuda":
        def timed():
            out = fn()
            torch.cuda.synchronize()
            return out
    else:
        timed = fn
    benchmark(timed)
