"""The examples run end to end, in-process, with backend "auto", a couple of steps at tiny sizes."""

from __future__ import annotations

import importlib.util
import math
import pathlib

import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"

ARGS = {
    "transformer_classifier": ["--d-model", "16", "--heads", "2", "--layers", "1", "--seq-len", "6", "--batch",
                               "3"],
    "transformer_seq2seq": ["--d-model", "16", "--heads", "2", "--layers", "1", "--seq-len", "4", "--batch", "3"],
    "lstm_seq2seq_attention": ["--hidden", "16", "--seq-len", "4", "--batch", "3"],
}


def _load(name):
    spec = importlib.util.spec_from_file_location(f"fastseq_example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", list(ARGS))
def test_example_runs(name, capsys):
    result = _load(name).main(["--steps", "2", *ARGS[name]])
    assert len(result["losses"]) == 2 and all(math.isfinite(x) for x in result["losses"])
    assert 0.0 <= result["accuracy"] <= 1.0
    assert "backend='auto'" in capsys.readouterr().out
