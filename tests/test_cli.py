"""``python -m fastseq check``: runs end to end, writes its table and JSON, and reports a wrong kernel as wrong."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

import fastseq
from fastseq import cli
from fastseq.kernels import rnn_cell


def test_check_runs_end_to_end(tmp_path):
    out = tmp_path / "check.json"
    env = dict(os.environ)
    proc = subprocess.run(
        [sys.executable, "-m", "fastseq", "check", "--dtypes", "float32", "float16", "--ops", "gru_cell",
         "rnn_cell_relu", "--json", str(out)],
        env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "| op " in proc.stdout and "verdict" in proc.stdout
    rows = json.loads(out.read_text())["rows"]
    assert {r["op"] for r in rows} == {"gru_cell", "rnn_cell_relu"}
    assert {r["dtype"] for r in rows} == {"float32", "float16"}
    assert all(r["verdict"] == "ok" for r in rows)
    # every kernel backend available here is checked (the interpreted Triton one always, "cpp" where built)
    available = {b for b in fastseq.dispatch.KERNEL_BACKENDS if fastseq.backends()[b]["available"]}
    assert {r["backend"] for r in rows} == available and "triton" in available


def test_a_wrong_kernel_is_reported_as_wrong(monkeypatch, capsys):
    """A kernel that is off by a little (1e-3 relative on one output) must fail the check and its exit code."""
    launch = rnn_cell.launch_cell_fwd

    def slightly_wrong(kind, *args, **kwargs):
        h, c, ws = launch(kind, *args, **kwargs)
        return h * (1 + 1e-3), c, ws

    monkeypatch.setattr(rnn_cell, "launch_cell_fwd", slightly_wrong)
    code = cli.main(["check", "--dtypes", "float32", "--ops", "lstm_cell", "--backends", "triton",
                     "--device", "cuda" if torch.cuda.is_available() else "cpu"])
    printed = capsys.readouterr().out
    assert code == 1
    assert "FAIL" in printed and "output[0]" in printed


def test_a_kernel_that_leaves_elements_unwritten_is_reported(monkeypatch, capsys):
    launch = rnn_cell.launch_cell_bwd

    def forgets_a_row(kind, *args, **kwargs):
        dgates, dgates_h, dx, dh, dc = launch(kind, *args, **kwargs)
        if dx is not None:
            dx[-1] = float("nan")
        return dgates, dgates_h, dx, dh, dc

    monkeypatch.setattr(rnn_cell, "launch_cell_bwd", forgets_a_row)
    code = cli.main(["check", "--dtypes", "float32", "--ops", "gru_cell", "--backends", "triton",
                     "--device", "cuda" if torch.cuda.is_available() else "cpu"])
    assert code == 1
    assert "missing/NaN" in capsys.readouterr().out
