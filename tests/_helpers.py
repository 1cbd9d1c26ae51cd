"""Helpers shared by test modules (importable as ``_helpers``: pytest puts tests/, the conftest's folder, on
sys.path)."""

import torch


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative error ||x - ref|| / ||ref|| (Frobenius norms), computed in float64 on CPU."""
    x, ref = x.detach().to(torch.float64).cpu(), ref.detach().to(torch.float64).cpu()
    return float((x - ref).norm() / ref.norm().clamp_min(1e-300))
