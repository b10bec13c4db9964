"""Comparison helpers shared by the tests: relative error in float64 and the tolerance rule of SPEC.md."""

from __future__ import annotations

import torch

# Rounding floor per dtype, added to twice torch's own error (SPEC.md, Numerics).
FLOOR = {torch.float32: 1e-6, torch.float16: 5e-4, torch.bfloat16: 4e-3, torch.float64: 1e-12}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``‖out − ref‖ / ‖ref‖`` computed in float64 (``‖out − ref‖`` alone where ``ref`` is zero)."""
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    diff = (out - ref).norm().item()
    norm = ref.norm().item()
    return diff / norm if norm > 0 else diff


def assert_close_to_reference(name: str, ours: torch.Tensor, torch_own: torch.Tensor, ref: torch.Tensor,
                              dtype: torch.dtype) -> None:
    """``ours`` may be at most twice as far from the float64 ``ref`` as torch's own result, plus a floor."""
    assert ours is not None, f"{name}: no value (gradient missing?)"
    assert ours.shape == ref.shape, f"{name}: shape {tuple(ours.shape)}, expected {tuple(ref.shape)}"
    assert torch.isfinite(ours).all(), f"{name}: non-finite values (an element never written?)"
    err, torch_err = rel_err(ours, ref), rel_err(torch_own, ref)
    bound = 2 * torch_err + FLOOR[dtype]
    assert err <= bound, f"{name}: relative error {err:.3e} > {bound:.3e} (torch's own {torch_err:.3e})"
