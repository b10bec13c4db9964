"""pytest-benchmark over the cases of ``python -m fastseq bench``: ``pytest benchmarks/`` times every
(case, implementation) pair of a preset with pytest-benchmark, so two installs can be compared with
``--benchmark-save`` / ``--benchmark-compare``. Options: ``--fastseq-preset`` (default quick), ``--fastseq-device``
(default cuda where a GPU is visible), ``--fastseq-backends`` (default: every fastseq backend available there).
``--benchmark-disable`` runs each case once without timing (what CI does to keep this file working)."""

from __future__ import annotations

import torch


def pytest_addoption(parser):
    group = parser.getgroup("fastseq")
    group.addoption("--fastseq-preset", default="quick", help="a preset of python -m fastseq bench")
    group.addoption("--fastseq-device", default=None, choices=("cpu", "cuda"))
    group.addoption("--fastseq-backends", default=None, help="comma list of fastseq backends")


def pytest_generate_tests(metafunc):
    if "bench_pair" not in metafunc.fixturenames:
        return
    import fastseq
    from fastseq.bench.presets import preset

    config = metafunc.config
    device = config.getoption("--fastseq-device") or ("cuda" if torch.cuda.is_available() else "cpu")
    backends = config.getoption("--fastseq-backends")
    if backends:
        backends = backends.split(",")
    else:
        info = fastseq.backends()
        backends = [b for b in fastseq.dispatch.KERNEL_BACKENDS if info[b]["available"]
                    and not (b == "triton" and device == "cpu")]
    pairs = [(spec, impl) for spec in preset(config.getoption("--fastseq-preset"), device)
             for impl in ("torch", *backends)]
    metafunc.parametrize("bench_pair", [(device, spec, impl) for spec, impl in pairs],
                         ids=[f"{spec.label.replace(' ', '-')}-{impl}" for spec, impl in pairs])
