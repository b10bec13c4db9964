"""Backend names, availability and selection as SPEC.md says: explicit backends never fall back."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import fastseq
from fastseq import dispatch


def test_backends_reports_every_name_with_reasons():
    info = fastseq.backends()
    assert set(info) == set(fastseq.BACKENDS) == {"auto", "triton", "cuda", "cpp", "torch"}
    for name, entry in info.items():
        assert set(entry) == {"available", "reason"}
        assert isinstance(entry["available"], bool)
        assert (entry["reason"] is None) == entry["available"], name
    assert info["torch"]["available"] and info["auto"]["available"]


@pytest.mark.parametrize("bad", ["gpu", "Triton", "", None, 3])
def test_unknown_backend_names_raise_value_error_listing_valid_ones(bad):
    with pytest.raises(ValueError) as e:
        dispatch.check_backend_name(bad)
    assert repr(bad) in str(e.value)
    for name in fastseq.BACKENDS:
        assert repr(name) in str(e.value)


def test_explicit_backends_say_why_they_cannot_run():
    cpu = torch.device("cpu")
    for backend in ("cuda", "cpp"):
        if not fastseq.backends()[backend]["available"]:
            with pytest.raises(fastseq.BackendUnavailableError, match=backend) as e:
                dispatch.select("lstm_cell", cpu, torch.float32, backend)
            assert fastseq.backends()[backend]["reason"] in str(e.value) or "kernel" in str(e.value)
    with pytest.raises(fastseq.BackendUnavailableError, match="no Triton kernel for no_such_op"):
        dispatch.select("no_such_op", cpu, torch.float32, "triton")
    assert issubclass(fastseq.BackendUnavailableError, RuntimeError)


def test_wrong_device_and_missing_kernel_with_an_available_extension(monkeypatch):
    """Were the extension built with kernels, a tensor on the wrong device or an op it lacks still raises."""
    monkeypatch.setitem(dispatch._STATUS, "cuda", (True, None))
    monkeypatch.setitem(dispatch._STATUS, "cpp", (True, None))
    monkeypatch.setitem(dispatch.EXTENSION_OPS, "cpu", frozenset({"gru_cell"}))
    monkeypatch.setitem(dispatch.EXTENSION_OPS, "cuda", frozenset({"gru_cell"}))
    with pytest.raises(fastseq.BackendUnavailableError, match="take CUDA tensors; got a tensor on cpu"):
        dispatch.select("gru_cell", torch.device("cpu"), torch.float32, "cuda")
    with pytest.raises(fastseq.BackendUnavailableError, match="take CPU tensors; got a tensor on cuda"):
        dispatch.select("gru_cell", torch.device("cuda"), torch.float32, "cpp")
    with pytest.raises(fastseq.BackendUnavailableError, match="no CPU kernel for lstm_cell"):
        dispatch.select("lstm_cell", torch.device("cpu"), torch.float32, "cpp")
    with pytest.raises(fastseq.BackendUnavailableError, match="does not take float64"):
        dispatch.select("gru_cell", torch.device("cpu"), torch.float64, "cpp")
    assert dispatch.select("gru_cell", torch.device("cpu"), torch.float32, "cpp") == "cpp"


@pytest.mark.parametrize("capability, runs", [((7, 5), False), ((8, 0), True), ((9, 0), True)])
def test_cuda_kernels_refuse_gpus_older_than_sm80(monkeypatch, capability, runs):
    """The CUDA kernels are built for sm_80 and newer: an older GPU gets the reason, and auto passes it over."""
    monkeypatch.setitem(dispatch._STATUS, "cuda", (True, None))
    monkeypatch.setitem(dispatch.EXTENSION_OPS, "cuda", frozenset({"gru_cell"}))
    monkeypatch.setattr(dispatch, "_cuda_capability", lambda device: capability)
    gpu = torch.device("cuda")
    if runs:
        assert dispatch.select("gru_cell", gpu, torch.float16, "cuda") == "cuda"
    else:
        with pytest.raises(fastseq.BackendUnavailableError, match="compute capability 8.0 or newer; cuda is 7.5"):
            dispatch.select("gru_cell", gpu, torch.float16, "cuda")
        assert dispatch.select("gru_cell", gpu, torch.float16, "auto", hidden=64) != "cuda"


def test_auto_runs_only_what_can_run(monkeypatch):
    """"auto" never picks a backend that cannot run the call (whatever the crossover table says), and falls back
    to torch where none can; an explicit backend still runs any size. (tests/test_bench.py checks that "auto"
    follows the measured crossovers.)"""
    monkeypatch.setitem(dispatch._STATUS, "triton", (True, None))
    monkeypatch.setitem(dispatch._STATUS, "cuda", (False, "not built"))
    monkeypatch.setitem(dispatch._STATUS, "cpp", (False, "not built"))
    dispatch._AUTO_CACHE.clear()
    gpu, cpu = torch.device("cuda"), torch.device("cpu")
    for op in ("lstm_layer", "gru_layer", "rnn_layer", "lstm_cell", "sdpa"):
        assert dispatch.select(op, gpu, torch.float32, "auto", hidden=32) in ("triton", "torch")
        assert dispatch.select(op, gpu, torch.float64, "auto", hidden=32) == "torch"
        assert dispatch.select(op, cpu, torch.float32, "auto", hidden=32) != "cpp"
        assert dispatch.select(op, gpu, torch.float32, "triton", hidden=4096) == "triton"
    dispatch._AUTO_CACHE.clear()


def test_auto_and_torch_selection():
    cpu = torch.device("cpu")
    assert dispatch.select("gru_cell", cpu, torch.float32, "torch") == "torch"
    # The interpreter is a test tool, never a fast path: "auto" on CPU does not pick it (it picks the C++ kernels
    # or torch's, by the measured crossovers).
    assert dispatch.select("gru_cell", cpu, torch.float32, "auto", hidden=128) in ("cpp", "torch")
    assert dispatch.select("gru_cell", cpu, torch.float64, "auto") == "torch"


def test_triton_on_cpu_without_interpreter_raises_and_says_how():
    """In a fresh process without TRITON_INTERPRET and without a GPU, an explicit "triton" refuses CPU tensors."""
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: Triton is available without the interpreter")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = (
        "import torch, fastseq\n"
        "assert not fastseq.backends()['triton']['available']\n"
        "print(fastseq.backends()['triton']['reason'])\n"
        "try:\n"
        "    fastseq.LSTMCell(3, 4, backend='triton')(torch.randn(2, 3))\n"
        "except fastseq.BackendUnavailableError as e:\n"
        "    print('raised:', e)\n"
        "print('auto:', fastseq.LSTMCell(3, 4)(torch.randn(2, 3))[0].shape)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "TRITON_INTERPRET=1" in out.stdout
    assert "raised: backend='triton' cannot run lstm_cell" in out.stdout
    assert "auto: torch.Size([2, 4])" in out.stdout
