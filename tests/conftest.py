"""Shared test set-up: the Triton interpreter on machines without a GPU, NaN-poisoned ``torch.empty``, and the
``device``/``kernel_backend`` parametrisation over what this machine has."""

import os
import zlib

# Under pytest-xdist (`-n auto`) each worker is a process of its own per core: one thread each, or the workers'
# OpenMP and BLAS pools oversubscribe the cores and spin (about 10 % of the suite's time on 2 cores). The tests of
# the multi-threaded paths set their own thread counts (tests/test_cpp.py, tests/test_small_gemm.py).
if os.environ.get("PYTEST_XDIST_WORKER"):
    for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_var, "1")

import torch  # noqa: E402

# Triton picks compiling or interpreting when a kernel is defined, i.e. when fastseq is imported: decide now.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import fastseq  # noqa: E402

_torch_empty = torch.empty


def _poisoned_empty(*args, **kwargs):
    """``torch.empty`` whose floating-point memory is NaN, so an element a kernel forgets to write fails."""
    t = _torch_empty(*args, **kwargs)
    if t.is_floating_point() or t.is_complex():
        with torch.no_grad():
            t.fill_(float("nan"))
    return t


@pytest.fixture(autouse=True)
def seed_per_test(request):
    """Fresh random inputs in every test, the same on every run: a failure reproduces."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture(autouse=True)
def fresh_auto_decisions():
    """"auto" remembers its decisions per process; a test that changes what is available must not see (or
    leave) decisions made under other conditions."""
    fastseq.dispatch._AUTO_CACHE.clear()
    yield
    fastseq.dispatch._AUTO_CACHE.clear()


@pytest.fixture(autouse=True)
def poison_empty(monkeypatch):
    monkeypatch.setattr(torch, "empty", _poisoned_empty)


def _device_params():
    cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")
    return [pytest.param("cpu"), pytest.param("cuda", marks=[pytest.mark.cuda, cuda])]


@pytest.fixture(params=_device_params())
def device(request):
    return torch.device(request.param)


@pytest.fixture(params=fastseq.dispatch.KERNEL_BACKENDS)
def kernel_backend(request, device):
    """Each fastseq kernel backend that can run the cells on ``device`` here; the others skip, saying why."""
    name = request.param
    try:
        fastseq.dispatch.select("lstm_cell", device, torch.float32, name)
    except fastseq.BackendUnavailableError as e:
        pytest.skip(str(e))
    return name
