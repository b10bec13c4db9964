"""The cells as torch modules: subclassing, state_dict, initialisation, patch/unpatch, copying, pickling, hooks,
scripting, autocast, and clear errors for bad input (torch's exception classes, nothing modified)."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

import fastseq

PAIRS = [(fastseq.LSTMCell, nn.LSTMCell), (fastseq.GRUCell, nn.GRUCell), (fastseq.RNNCell, nn.RNNCell)]
IDS = ["lstm", "gru", "rnn"]


def _state(cls, batch, hidden):
    lead = (batch,) if batch is not None else ()
    if issubclass(cls, nn.LSTMCell):
        return torch.randn(*lead, hidden), torch.randn(*lead, hidden)
    return torch.randn(*lead, hidden)


def _first(out):
    return out[0] if isinstance(out, tuple) else out


@pytest.mark.parametrize("fast,theirs", PAIRS, ids=IDS)
def test_subclass_same_parameters_and_init(fast, theirs):
    torch.manual_seed(3)
    a = theirs(5, 7, bias=False)
    torch.manual_seed(3)
    b = fast(5, 7, bias=False)
    assert isinstance(b, theirs)
    assert [n for n, _ in a.named_parameters()] == [n for n, _ in b.named_parameters()]
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
    assert b.backend == "auto"
    assert repr(theirs(5, 7)) in repr(fast(5, 7))


@pytest.mark.parametrize("fast,theirs", PAIRS, ids=IDS)
def test_state_dict_round_trip_strict(fast, theirs):
    a, b = theirs(4, 6), fast(4, 6, backend="triton")
    b.load_state_dict(a.state_dict(), strict=True)
    c = theirs(4, 6)
    c.load_state_dict(b.state_dict(), strict=True)
    for p, q in zip(a.parameters(), c.parameters()):
        assert torch.equal(p, q)
    assert set(b.state_dict()) == set(a.state_dict())


def test_constructor_options_and_bad_backend():
    cell = fastseq.RNNCell(3, 4, False, "relu", dtype=torch.float64, backend="torch")
    assert cell.nonlinearity == "relu" and cell.bias is False and cell.weight_ih.dtype == torch.float64
    with pytest.raises(ValueError, match="'nope'.*'auto', 'triton', 'cuda', 'cpp', 'torch'|'auto'.*'nope'"):
        fastseq.LSTMCell(3, 4, backend="nope")
    with pytest.raises(TypeError):
        fastseq.LSTMCell(3, 4, True, None, None, "triton")  # backend is keyword-only


@pytest.mark.parametrize("fast,theirs", PAIRS, ids=IDS)
def test_patch_keeps_parameters_and_optimizer(fast, theirs):
    model = nn.Sequential(nn.Linear(3, 5), theirs(5, 6))
    params_before = list(model.parameters())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    returned = fastseq.patch(model, backend="triton")
    assert returned is model
    assert type(model[1]) is fast and model[1].backend == "triton"
    assert all(p is q for p, q in zip(params_before, model.parameters()))
    before = model[1].weight_ih.detach().clone()
    x = torch.randn(2, 3)
    _first(model[1](model[0](x))).sum().backward()
    opt.step()
    assert not torch.equal(before, model[1].weight_ih)  # the old optimizer trained the swapped module
    fastseq.unpatch(model)
    assert type(model[1]) is theirs and not hasattr(model[1], "backend")
    assert all(p is q for p, q in zip(params_before, model.parameters()))


def test_patch_model_itself_and_nested_and_subclasses_untouched():
    cell = nn.GRUCell(3, 4)
    assert fastseq.patch(cell) is cell and type(cell) is fastseq.GRUCell

    class MyLSTMCell(nn.LSTMCell):  # a user's subclass may override forward: leave it alone
        pass

    model = nn.ModuleDict({"a": nn.ModuleList([nn.RNNCell(2, 3)]), "b": MyLSTMCell(2, 3)})
    fastseq.patch(model, backend="torch")
    assert type(model["a"][0]) is fastseq.RNNCell and type(model["b"]) is MyLSTMCell
    fastseq.patch(model, backend="triton")  # re-patching sets the new backend
    assert model["a"][0].backend == "triton"
    with pytest.raises(ValueError):
        fastseq.patch(model, backend="gpu")
    with pytest.raises(TypeError):
        fastseq.patch("not a module")


def test_patched_model_matches_unpatched_numbers():
    torch.manual_seed(0)
    model = nn.ModuleList([nn.LSTMCell(4, 5), nn.GRUCell(5, 5), nn.RNNCell(5, 3, nonlinearity="relu")])
    x = torch.randn(3, 4)

    def run(m):
        h, _ = m[0](x)
        return m[2](m[1](h))

    expected = run(model)
    fastseq.patch(model, backend="triton")
    torch.testing.assert_close(run(model), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fast,theirs", PAIRS, ids=IDS)
def test_deepcopy_pickle_and_hooks(fast, theirs):
    cell = fast(3, 4, backend="triton")
    x, state = torch.randn(2, 3), _state(fast, 2, 4)
    expected = _first(cell(x, state))
    for clone in (copy.deepcopy(cell), pickle.loads(pickle.dumps(cell))):
        assert type(clone) is fast and clone.backend == "triton"
        torch.testing.assert_close(_first(clone(x, state)), expected)
    seen = []
    handle = cell.register_forward_hook(lambda mod, inp, out: seen.append(_first(out)))
    cell(x, state)
    handle.remove()
    assert len(seen) == 1 and torch.equal(seen[0], expected)


@pytest.mark.parametrize("fast,theirs", PAIRS, ids=IDS)
def test_torch_jit_script(fast, theirs):
    """torch.jit.script works wherever it works on torch's module, with the same parameters and numbers."""
    cell = fast(3, 4, backend="triton")
    scripted = torch.jit.script(cell)
    assert scripted.weight_ih is cell.weight_ih
    x, state = torch.randn(2, 3), _state(fast, 2, 4)
    torch.testing.assert_close(_first(scripted(x, state)), _first(cell(x, state)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fast,theirs", PAIRS, ids=IDS)
def test_autocast_gives_torch_dtypes(fast, theirs, device, kernel_backend):
    a = theirs(3, 4, device=device)
    b = fast(3, 4, device=device, backend=kernel_backend)
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 3, device=device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        want, got = _first(a(x)), _first(b(x))
    assert got.dtype == want.dtype
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=1e-2)


def test_auto_on_cpu_uses_torch_and_float64_stays_with_torch():
    cell = fastseq.LSTMCell(3, 4, dtype=torch.float64)
    x = torch.randn(2, 3, dtype=torch.float64)
    torch.testing.assert_close(cell(x), nn.LSTMCell.forward(cell, x))
    assert fastseq.dispatch.select("lstm_cell", x.device, torch.float64, "auto") == "torch"
    with pytest.raises(fastseq.BackendUnavailableError, match="float64"):
        fastseq.LSTMCell(3, 4, dtype=torch.float64, backend="triton")(x)


# -- bad input: the same exception class as torch, a message that names the argument, nothing modified -------

BAD_INPUTS = {
    "input 3-D": lambda cls: (torch.randn(2, 1, 4), None),
    "input 0-D": lambda cls: (torch.tensor(1.0), None),
    "input_size": lambda cls: (torch.randn(2, 3), None),
    "input dtype": lambda cls: (torch.randn(2, 4, dtype=torch.float64), None),
    "input int": lambda cls: (torch.ones(2, 4, dtype=torch.int64), None),
    "state batch": lambda cls: (torch.randn(2, 4), _state(cls, 3, 5)),
    "state hidden": lambda cls: (torch.randn(2, 4), _state(cls, 2, 6)),
    "state 3-D": lambda cls: (torch.randn(2, 4), tuple(s.unsqueeze(0) for s in _state(cls, 2, 5))
                              if issubclass(cls, nn.LSTMCell) else _state(cls, 2, 5).unsqueeze(0)),
    "state dtype": lambda cls: (torch.randn(2, 4), tuple(s.half() for s in _state(cls, 2, 5))
                                if issubclass(cls, nn.LSTMCell) else _state(cls, 2, 5).half()),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
@pytest.mark.parametrize("fast,theirs", PAIRS, ids=IDS)
def test_bad_input_raises_like_torch(fast, theirs, case):
    x, state = BAD_INPUTS[case](fast)
    ours, ref = fast(4, 5, backend="triton"), theirs(4, 5)
    with pytest.raises(Exception) as torch_error:
        ref(x, state)
    snapshot = [t.clone() for t in ([x] + (list(state) if isinstance(state, tuple) else [state] if state is not None else []))]
    with pytest.raises(torch_error.type) as ours_error:
        ours(x, state)
    message = str(ours_error.value)
    assert fast.__name__ in message
    assert any(word in message for word in ("input", "hx", "dtype", "Expected"))
    after = [x] + (list(state) if isinstance(state, tuple) else [state] if state is not None else [])
    assert all(torch.equal(a, b) for a, b in zip(snapshot, after))


def test_bad_input_messages_name_expected_and_given():
    cell = fastseq.GRUCell(8, 5, backend="triton")
    with pytest.raises(RuntimeError, match=r"input.size\(-1\) must be equal to input_size. Expected 8, got 7"):
        cell(torch.randn(2, 7))
    with pytest.raises(RuntimeError, match="Input batch size 2 doesn't match hx batch size 3"):
        cell(torch.randn(2, 8), torch.randn(3, 5))
    with pytest.raises(RuntimeError, match=r"hx.size\(-1\) must be equal to hidden_size. Expected 5, got 4"):
        cell(torch.randn(2, 8), torch.randn(2, 4))
    with pytest.raises(RuntimeError, match="dtype must match the parameters' dtype. Expected float32, got float16"):
        cell(torch.randn(2, 8).half())
    with pytest.raises(TypeError, match="hx must be a tuple of two Tensors"):
        fastseq.LSTMCell(8, 5)(torch.randn(2, 8), torch.randn(2, 5))


def test_unknown_nonlinearity_raises_like_torch():
    ours, theirs = fastseq.RNNCell(3, 4, backend="triton"), nn.RNNCell(3, 4)
    ours.nonlinearity = theirs.nonlinearity = "sigmoid"
    with pytest.raises(RuntimeError):
        theirs(torch.randn(2, 3))
    with pytest.raises(RuntimeError, match="Unknown nonlinearity: sigmoid"):
        ours(torch.randn(2, 3))


class _Doubled(nn.Module):
    def forward(self, w):
        return 2 * w


@pytest.mark.parametrize("fast,theirs", PAIRS, ids=IDS)
def test_parametrized_and_functional_call_weights_are_the_ones_used(fast, theirs, device, kernel_backend):
    """The cells read their weights from ``_parameters`` where registered there (fast), else through getattr: a
    parametrization (which moves the weight out of ``_parameters``) and ``torch.func.functional_call`` (which swaps
    the registered tensor) must both be seen."""
    from torch.nn.utils import parametrize

    ours, ref = fast(5, 7, backend=kernel_backend, device=device), theirs(5, 7, device=device)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(3, 5, device=device)
    for module in (ours, ref):
        parametrize.register_parametrization(module, "weight_hh", _Doubled())
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)
        for module in (ours, ref):
            parametrize.remove_parametrizations(module, "weight_hh")
        swapped = {"weight_ih": torch.randn(ref.weight_ih.shape, device=device)}
        want = torch.func.functional_call(ref, swapped, (x,))
        got = torch.func.functional_call(ours, swapped, (x,))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
