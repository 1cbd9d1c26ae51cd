"""Helpers shared by test modules (importable as ``_helpers``: pytest puts tests/, the conftest's folder, on
sys.path)."""

import importlib.util
from pathlib import Path
from types import ModuleType
from typing import Callable, Optional

import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(script: str) -> ModuleType:
    """The module of ``benchmarks/<script>.py`` (the benchmarks are scripts, not a package), loaded fresh."""
    spec = importlib.util.spec_from_file_location(f"{script}_benchmark", BENCHMARKS / f"{script}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative error ||x - ref|| / ||ref|| (Frobenius norms), computed in float64 on CPU."""
    x, ref = x.detach().to(torch.float64).cpu(), ref.detach().to(torch.float64).cpu()
    return float((x - ref).norm() / ref.norm().clamp_min(1e-300))


@torch.no_grad()
def perturb_(
    module: torch.nn.Module,
    scale: float = 0.2,
    *,
    only: Optional[Callable[[str], bool]] = None,
    seed: Optional[int] = None,
) -> torch.nn.Module:
    """Add ``scale * N(0, 1)`` noise to the parameters whose name passes ``only`` (all when None), so that the
    zero-initialised paths matter. Noise from a private generator seeded with ``seed``, else the global RNG.
    Returns the module."""
    gen = None if seed is None else torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        if only is None or only(name):
            noise = torch.randn_like(p) if gen is None else torch.randn(p.shape, generator=gen, dtype=p.dtype)
            p.add_(scale * noise.to(p.device))
    return module


def results_of_a_fork_child(target, timeout: float = 60.0) -> list:
    """Run ``target(conn)`` in a forked child (as a DataLoader worker is made) and return the list it sends back as
    ``("ok", results)``; fails the test on anything else or when the child does not answer within ``timeout`` s."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    parent_end, child_end = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=target, args=(child_end,))
    proc.start()
    try:
        assert parent_end.poll(timeout), (
            f"the forked child did not finish its kernel calls within {timeout:g} s (deadlock)"
        )
        status, got = parent_end.recv()
    finally:
        proc.join(10)
        if proc.is_alive():
            proc.kill()
            proc.join()
    assert status == "ok", got
    return got
