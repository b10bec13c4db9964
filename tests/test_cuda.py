"""The CUDA kernels of the compiled extension (backend "cuda", ``csrc/cuda/`` through ``fastseq/cpp_kernels.py``): what
the backend-generic tests (test_cells, test_layers, test_modules, test_ops, … parametrised over ``kernel_backend``)
do not check.

Without a GPU (CI): the build really contains the CUDA kernels (``built_with_cuda()``, every family registered for
the CUDA dispatch key), and the choice between the persistent layer kernel and the per-step fallback on described
devices (``cuda_layer_plan_model``). With a GPU (``-m cuda``): the launchers against the float64 reference and
torch's own error, on both layer paths (the persistent cooperative kernel and the per-step fallback, forced in turn),
against the C++ CPU kernels on the same tensors with each other's workspaces, odd sizes (H, B, T not multiples of any
tile; B = 1, T = 1; three row passes), packed, bidirectional, projections, float16/bfloat16, the plan on the real
device, strides, inference, empty inputs, NaN/Inf, opcheck, and bad input.
"""

from __future__ import annotations

import os

import pytest
import torch

import fastseq
from fastseq import dispatch
from fastseq.check import rel_err, tolerance

from test_cpp import (CELL_CASES, KINDS, LAYER_CASES, NUM_GATES, CellCase, LayerCase, LayerTensors, _close,
                      _opcheck_samples, cell_ours, cell_reference, cell_tensors, layer_ours, layer_tensors, layer_torch,
                      strided_layer_tensors)

FAMILIES = ["lstm_cell", "gru_cell", "rnn_cell", "lstm_layer", "gru_layer", "rnn_layer"]


def _extension():
    try:
        import fastseq._C as C
    except ImportError:
        return None
    return C


C = _extension()
BUILT_WITH_CUDA = C is not None and C.built_with_cuda()
needs_cuda_build = pytest.mark.skipif(not BUILT_WITH_CUDA, reason="fastseq._C was built without the CUDA kernels")
CUDA = dispatch.backends()["cuda"]["available"]
NO_GPU_REASON = f"backend 'cuda' unavailable: {dispatch.backends()['cuda']['reason']}"
GPU = torch.device("cuda")


def needs_gpu(test):
    """Marked ``cuda`` (``pytest -m cuda`` selects it) and skipped, saying why, where the backend cannot run."""
    return pytest.mark.cuda(pytest.mark.skipif(not CUDA, reason=NO_GPU_REASON)(test))


def _cuda_build_expected() -> bool:
    """CI's CUDA build step sets FASTSEQ_EXPECT_CUDA_BUILD: there a build without the CUDA kernels is a failure."""
    return os.environ.get("FASTSEQ_EXPECT_CUDA_BUILD", "0") not in ("", "0")


# ---------------------------------------------------------------------------------------------------------
# Without a GPU: the build and the plan
# ---------------------------------------------------------------------------------------------------------


def test_cuda_build_registers_every_family():
    if not BUILT_WITH_CUDA:
        if _cuda_build_expected():
            pytest.fail("FASTSEQ_EXPECT_CUDA_BUILD is set but fastseq._C was built without the CUDA kernels")
        pytest.skip("fastseq._C was built without the CUDA kernels")
    assert sorted(set(C.kernels("cuda")) - {"sdpa"}) == sorted(FAMILIES)
    assert C.cuda_layer_path() == "auto"
    if not torch.cuda.is_available():
        reason = fastseq.backends()["cuda"]["reason"]
        assert "GPU" in reason, reason


# An H100 SXM as the plan sees it: 132 SMs, 227 KiB of shared memory per block (opt-in), 228 KiB per SM.
H100 = dict(sms=132, smem_optin=227 * 1024, smem_per_sm=228 * 1024)


def _plan(kind, dtype, backward, D, B, H, P=0, **device):
    return C.cuda_layer_plan_model(kind, dtype, backward, D, B, H, P, **{**H100, **device})


@needs_cuda_build
def test_plan_takes_the_persistent_kernel_where_w_hh_fits():
    plan = _plan("lstm", "bfloat16", False, 1, 32, 1024)
    assert plan["path"] == "persistent", plan
    assert plan["units_per_block"] == 8 and plan["blocks"] == 128 and plan["blocks"] <= plan["co_resident_capacity"]
    assert plan["shared_memory_bytes"] <= H100["smem_optin"]
    tiny = _plan("gru", "float32", False, 2, 1, 5)
    assert tiny["path"] == "persistent" and tiny["blocks"] == 2, tiny
    proj = _plan("lstm", "float16", True, 2, 3, 40, P=33)
    assert proj["path"] == "persistent" and proj["proj_cols_per_block"] * proj["blocks_per_direction"] >= 33, proj


@needs_cuda_build
def test_plan_falls_back_and_says_why():
    big = _plan("lstm", "float32", False, 2, 32, 4096)
    assert big["path"] == "fallback" and "does not fit on chip" in big["reason"], big
    no_coop = _plan("rnn", "float32", False, 1, 1, 8, cooperative=False)
    assert no_coop["path"] == "fallback" and "cooperative" in no_coop["reason"], no_coop
    few_sms = _plan("lstm", "bfloat16", False, 2, 8, 1024, sms=8)
    assert few_sms["path"] == "fallback" and "co-resident" in few_sms["reason"], few_sms


@needs_cuda_build
@pytest.mark.parametrize("backward", [False, True])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_plan_never_exceeds_the_device(backward, dtype):
    """Whatever the sizes, a persistent plan fits the shared memory of a block and the co-resident capacity: the
    cooperative launch can never wait on a block that cannot start."""
    for kind in ("lstm", "gru", "rnn"):
        for D in (1, 2):
            for H in (1, 5, 16, 33, 130, 512, 1000, 1024, 2048, 4096):
                for B in (1, 17, 64, 512):
                    for P in ((0, H // 2) if kind == "lstm" and H > 1 else (0,)):
                        plan = _plan(kind, dtype, backward, D, B, H, P)
                        if plan["path"] != "persistent":
                            assert plan["reason"], plan
                            continue
                        assert plan["blocks"] == D * plan["blocks_per_direction"] <= plan["co_resident_capacity"]
                        assert plan["blocks_per_direction"] * plan["units_per_block"] >= H
                        assert plan["shared_memory_bytes"] <= H100["smem_optin"]
                        if P:
                            assert plan["blocks_per_direction"] * plan["proj_cols_per_block"] >= P


@needs_cuda_build
def test_layer_path_switch_checks_its_argument():
    with pytest.raises(RuntimeError, match="'auto', 'persistent' or 'fallback'"):
        C.set_cuda_layer_path("fast")
    assert C.cuda_layer_path() == "auto"


# ---------------------------------------------------------------------------------------------------------
# With a GPU
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(params=["persistent", "fallback"])
def layer_path(request):
    """Runs a test once on each CUDA layer path, forced; back to "auto" afterwards."""
    if not CUDA:
        pytest.skip(NO_GPU_REASON)
    C.set_cuda_layer_path(request.param)
    yield request.param
    C.set_cuda_layer_path("auto")


def _gpu(obj):
    if obj is None:
        return None
    if isinstance(obj, torch.Tensor):
        return obj.to(GPU)
    return type(obj)(_gpu(o) for o in obj)


def _gpu_layer(t: LayerTensors) -> LayerTensors:
    return LayerTensors(*(v if k == "batch_sizes" else _gpu(v) for k, v in vars(t).items()))


def _check_layer(case: LayerCase, path: str):
    """The CUDA launchers on ``case``: every result within twice torch's (cuDNN's) error of the float64 reference
    plus the rounding floor; the path forced is the one taken; the workspace interchangeable with the C++ kernels'."""
    from fastseq import cpp_kernels

    t = layer_tensors(case)
    ours = {k: v.cpu() for k, v in layer_ours(cpp_kernels, case, _gpu_layer(t)).items()}
    taken = C.cuda_last_layer_path()
    assert taken.startswith(path), taken
    ref = layer_torch(case, t, torch.float64)
    theirs = layer_torch(case, t, case.dtype, device=GPU)  # torch's own layer (cuDNN) on the GPU
    torch_errors = {name: rel_err(theirs[name], r) for name, r in ref.items()}
    failures = []
    for name, r in ref.items():
        error = rel_err(ours[name], r)
        if not error <= tolerance(torch_errors[name], case.dtype):
            failures.append(f"{name}: {error:.3e} > {tolerance(torch_errors[name], case.dtype):.3e} "
                            f"(torch {torch_errors[name]:.3e})")
    assert not failures, f"{case} ({path}): " + "; ".join(failures)
    for name in ("out", "h_n", "c_n", "dgx", "dgh", "dh0", "dc0"):
        assert name not in ours or ours[name].dtype == case.dtype, name
    # the same tensors through the C++ CPU kernels, and each backend's backward on the other's workspace
    cpu = layer_ours(cpp_kernels, case, t)
    for name in cpu:
        _close(ours[name], cpu[name], case.dtype, f"{case} ({path}) cuda vs cpp: {name}")
    cuda_on_cpu_ws = layer_ours(cpp_kernels, case, _gpu_layer(t), ws=cpu["ws"].to(GPU))
    for name in ("dgx", "dgh", "dh0", "dc0", "dht", "dw_hh", "db_hh", "dw_hr"):
        if name in cpu:
            _close(cuda_on_cpu_ws[name].cpu(), cpu[name], case.dtype,
                   f"{case} ({path}) cuda backward on cpp's workspace: {name}")


# Odd sizes for the CUDA tiles: H not a multiple of 16 (units per block 4-128), B past one and two row passes of 16,
# T = 1, B = 1, packed with the batch shrinking to one row, both directions, projections with P columns spread over
# several blocks.
CUDA_LAYER_CASES = LAYER_CASES + [LayerCase(kind, **shape) for kind in KINDS for shape in [
    dict(T=4, B=33, H=37, D=2, packed=True, dtype=torch.bfloat16),
    dict(T=3, B=1, H=300, D=1, dtype=torch.float16),
    dict(T=1, B=17, H=70, D=2, bias=False),
    dict(T=5, B=3, H=129, D=2, packed=True, dtype=torch.float32),
]] + [
    LayerCase("lstm", T=4, B=18, H=130, P=67, D=2, packed=True, dtype=torch.bfloat16),
    LayerCase("lstm", T=3, B=5, H=300, P=7, D=1, dtype=torch.float32),
]


@needs_gpu
@pytest.mark.parametrize("case", CUDA_LAYER_CASES, ids=str)
def test_layer_launchers_on_both_paths(case, layer_path):
    _check_layer(case, layer_path)



@needs_gpu
@pytest.mark.parametrize("case", CELL_CASES + [
    CellCase("lstm", 33, 70, 129, dtype=torch.bfloat16), CellCase("gru", 17, 300, 37, dtype=torch.float16),
    CellCase("rnn_relu", 1, 3, 200), CellCase("gru", 40, 5, 33, state=False, dtype=torch.bfloat16),
], ids=str)
def test_cell_launchers_match_reference_and_cpp(case):
    from fastseq import cpp_kernels

    tensors = cell_tensors(case)
    ours = {k: v.cpu() for k, v in cell_ours(cpp_kernels, case, *_gpu(tensors)).items()}
    ref = cell_reference(case, *tensors)
    assert set(ours) - {"ws", "dgx", "dgh"} == set(ref)
    floor = {torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[case.dtype]
    for name, r in ref.items():
        assert rel_err(ours[name], r) <= floor, (str(case), name, rel_err(ours[name], r))
    cpu = cell_ours(cpp_kernels, case, *tensors)
    for name in cpu:
        _close(ours[name], cpu[name], case.dtype, f"{case} cuda vs cpp: {name}")
    cuda_on_cpu_ws = cell_ours(cpp_kernels, case, *_gpu(tensors), ws=cpu["ws"].to(GPU))
    for name in ("dgx", "dgh", "dx", "dh", "dc"):
        if name in cpu:
            _close(cuda_on_cpu_ws[name].cpu(), cpu[name], case.dtype, f"{case} cuda backward on cpp's workspace")



@needs_gpu
@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn"])
def test_plan_on_this_device(kind):
    props = torch.cuda.get_device_properties(0)
    small = C.cuda_layer_plan(kind, "bfloat16", False, 2, 8, 256)
    assert small["path"] == "persistent" and small["blocks"] <= small["co_resident_capacity"], small
    assert small["co_resident_capacity"] >= props.multi_processor_count, small
    huge = C.cuda_layer_plan(kind, "float32", True, 2, 64, 8192)
    assert huge["path"] == "fallback" and huge["reason"], huge



@needs_gpu
@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn_tanh"])
def test_auto_falls_back_where_w_hh_does_not_fit(kind):
    """A layer too large for the persistent kernel takes the per-step path by itself, with the right numbers."""
    case = LayerCase(kind, T=3, B=2, H=2500, D=2)
    plan = C.cuda_layer_plan(case.op, "float32", False, 2, 2, 2500)
    assert plan["path"] == "fallback", plan
    from fastseq import cpp_kernels

    t = layer_tensors(case)
    out = cpp_kernels.launch_layer_fwd(case.op, *_gpu((t.gates_x, t.h0, t.c0, t.w_hh, t.b_hh, None)), None, False,
                                       case.nonlinearity)[0]
    assert C.cuda_last_layer_path().startswith("fallback"), C.cuda_last_layer_path()
    ref = cpp_kernels.launch_layer_fwd(case.op, t.gates_x, t.h0, t.c0, t.w_hh, t.b_hh, None, None, False,
                                       case.nonlinearity)[0]
    _close(out.cpu(), ref, case.dtype, f"{case} auto path vs cpp")



@needs_gpu
def test_forced_persistent_raises_where_it_cannot_run():
    from fastseq import cpp_kernels

    D, B, H = 2, 2, 3000
    C.set_cuda_layer_path("persistent")
    try:
        with pytest.raises(RuntimeError, match="cannot run persistent"):
            cpp_kernels.launch_layer_fwd("lstm", torch.randn(2, B, D * 4 * H, device=GPU),
                                         torch.zeros(D, B, H, device=GPU), torch.zeros(D, B, H, device=GPU),
                                         torch.randn(D, 4 * H, H, device=GPU), None, None, None, False)
    finally:
        C.set_cuda_layer_path("auto")



@needs_gpu
@pytest.mark.parametrize("kind", KINDS)
def test_inference_matches_training_and_strides_do_not_matter(kind, layer_path):
    from fastseq import cpp_kernels

    case = LayerCase(kind, T=4, B=3, H=21, D=2, P=5 if kind == "lstm" else 0, packed=True)
    t = _gpu_layer(layer_tensors(case))
    args = (case.op, t.gates_x, t.h0, t.c0, t.w_hh, t.b_hh, t.w_hr, t.batch_sizes)
    training = cpp_kernels.launch_layer_fwd(*args, True, case.nonlinearity)
    inference = cpp_kernels.launch_layer_fwd(*args, False, case.nonlinearity)
    assert inference[3].numel() == 0 and training[3].numel() > 0
    for a, b in zip(inference[:3], training[:3]):
        if a is not None:
            torch.testing.assert_close(a, b, rtol=0, atol=0)

    dense, other = layer_ours(cpp_kernels, case, t), layer_ours(cpp_kernels, case, strided_layer_tensors(t))
    for name in dense:
        torch.testing.assert_close(dense[name], other[name], rtol=0, atol=0, msg=name)



@needs_gpu
@pytest.mark.parametrize("kind", KINDS)
def test_nan_and_inf_propagate(kind, layer_path):
    from fastseq import cpp_kernels

    case = LayerCase(kind, T=3, B=3, H=6)
    t = layer_tensors(case)

    def run(gates_x, device):
        args = (t.h0, t.c0, t.w_hh, t.b_hh)
        if device.type == "cuda":
            gates_x, args = gates_x.to(device), _gpu(args)
        return cpp_kernels.launch_layer_fwd(case.op, gates_x, *args, None, None, True, case.nonlinearity)[0].cpu()

    for value in (float("nan"), float("inf"), -float("inf")):
        gx = t.gates_x.clone()
        gx[1, 0, 0], gx[2, 2, 1] = value, value
        torch.testing.assert_close(run(gx, GPU), run(gx, torch.device("cpu")), rtol=2e-5, atol=2e-5,
                                   equal_nan=True)



@needs_gpu
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn"])
def test_empty_sequence_or_batch(kind, packed):
    from fastseq import cpp_kernels

    D, H = 2, 4
    G = NUM_GATES[kind] * H
    for T, B in ([(0, 3)] if packed else [(0, 3), (4, 0)]):
        gx = torch.randn((0, D * G) if packed else (T, B, D * G), device=GPU)
        batch_sizes = torch.zeros(0, dtype=torch.int64) if packed else None
        h0 = torch.randn(D, B, H, device=GPU)
        c0 = torch.randn(D, B, H, device=GPU) if kind == "lstm" else None
        w_hh = torch.randn(D, G, H, device=GPU)
        out, h_n, c_n, ws = cpp_kernels.launch_layer_fwd(kind, gx, h0, c0, w_hh, None, None, batch_sizes, True)
        assert out.shape == (*gx.shape[:-1], D * H)
        torch.testing.assert_close(h_n, h0, rtol=0, atol=0)
        dgx, dgh, dh0, dc0, dht = cpp_kernels.launch_layer_bwd(kind, torch.randn_like(out), h0 * 2, c0, ws, w_hh,
                                                               None, batch_sizes)
        assert dgx.shape == gx.shape
        torch.testing.assert_close(dh0, h0 * 2, rtol=0, atol=0)



@needs_gpu
def test_opcheck_every_operator_on_cuda(layer_path):
    for name, args in _opcheck_samples():
        op = getattr(torch.ops.fastseq_cpp, name).default
        # batch_sizes (int64) stays on the CPU, as in a PackedSequence
        gpu_args = tuple(a if not isinstance(a, torch.Tensor) or a.dtype == torch.int64 else a.to(GPU) for a in args)
        torch.library.opcheck(op, gpu_args)



@needs_gpu
def test_bad_input_raises_clear_errors():
    ops = torch.ops.fastseq_cpp
    x, w_ih, w_hh = torch.randn(2, 3, device=GPU), torch.randn(4, 3, device=GPU), torch.randn(4, 4, device=GPU)
    with pytest.raises(RuntimeError, match="w_hh: the CUDA kernels take CUDA tensors"):
        ops.rnn_cell_fwd(x, None, w_ih, w_hh.cpu(), None, None, False, "tanh")
    with pytest.raises(RuntimeError, match="w_ih must have the dtype of input"):
        ops.rnn_cell_fwd(x, None, w_ih.half(), w_hh, None, None, False, "tanh")
    with pytest.raises(RuntimeError, match="float32, float16 or bfloat16"):
        ops.rnn_cell_fwd(x.double(), None, w_ih.double(), w_hh.double(), None, None, False, "tanh")
    with pytest.raises(RuntimeError, match="Unknown nonlinearity"):
        ops.rnn_cell_fwd(x, None, w_ih, w_hh, None, None, False, "gelu")
    with pytest.raises(RuntimeError, match="batch_sizes sum"):
        ops.gru_layer_fwd(torch.randn(5, 12, device=GPU), torch.randn(1, 3, 4, device=GPU),
                          torch.randn(1, 12, 4, device=GPU), None, torch.tensor([3, 1]), True)
    with pytest.raises(RuntimeError, match="the workspace must be float32"):
        ops.rnn_layer_bwd(torch.randn(2, 1, 4, device=GPU), torch.randn(1, 1, 4, device=GPU),
                          torch.randn(1, 2, 8, device=GPU).half(), torch.randn(1, 4, 4, device=GPU), None, "tanh")

