"""The fused kernels' C library (wuneng.fused.cpu): built by the operators' machinery (wuneng.ops.c_library) into a
library of its own, its argument layouts checked against the Python structures at load, refused when built for
another key, and usable in a forked child.

The cache, lock and trust rules themselves are tested on the operators' library (tests/ops/test_kernel_build.py).
"""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from wuneng.fused import _abi
from wuneng.fused import cpu as fused_cpu
from wuneng.fused.cpu import fused_kernel_available, fused_kernel_error

from _helpers import results_of_a_fork_child

needs_kernel = pytest.mark.skipif(not fused_kernel_available(), reason=f"C kernel unavailable: {fused_kernel_error()}")
LOGGER = "wuneng.fused.cpu"


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """A private cache folder holding a copy of the fused library this process loaded; no cached handle."""
    loaded = fused_cpu.LIBRARY.path() if fused_kernel_available() else None
    for name in ("XDG_CACHE_HOME", "WUNENG_CPU_KERNEL"):
        monkeypatch.delenv(name, raising=False)
    folder = tmp_path / "kernels"
    folder.mkdir(mode=0o755)
    if loaded is not None:
        shutil.copy2(loaded, folder / loaded.name)
        os.chmod(folder / loaded.name, 0o755)
    monkeypatch.setenv("WUNENG_KERNEL_CACHE", str(folder))
    fused_cpu._library.cache_clear()
    monkeypatch.setattr(fused_cpu.LIBRARY, "warned", False)
    yield folder
    monkeypatch.undo()
    fused_cpu._library.cache_clear()


@needs_kernel
def test_the_fused_library_is_its_own_file_and_loads_from_the_cache(fresh, monkeypatch):
    from wuneng.ops.wkv7 import cpu as cpu_mod

    assert fused_cpu.LIBRARY.path().name.startswith("fused_cpu_")
    assert fused_cpu.LIBRARY.key() != cpu_mod.LIBRARY.key()
    monkeypatch.setattr(
        fused_cpu.LIBRARY, "compile", lambda out: pytest.fail("compiled although the library was cached")
    )
    assert fused_kernel_available(), fused_kernel_error()


@needs_kernel
def test_a_fused_library_built_for_another_key_is_refused_with_one_warning(fresh, monkeypatch, caplog):
    monkeypatch.setattr(fused_cpu.LIBRARY, "key", lambda: "0123456789abcdef0123")
    shutil.copy2(next(fresh.glob("fused_cpu_*.so")), fresh / "fused_cpu_0123456789abcdef0123.so")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert not fused_kernel_available()
        fused_cpu._library.cache_clear()
        assert not fused_kernel_available()
    assert "was built for key" in fused_kernel_error() and "delete it to rebuild" in fused_kernel_error()
    warned = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert len(warned) == 1 and "fused one-token kernels" in warned[0], warned


@needs_kernel
def test_a_group_writable_fused_library_is_refused(fresh):
    next(fresh.glob("fused_cpu_*.so")).chmod(0o775)
    assert not fused_kernel_available()
    assert "writable by other users (mode 775)" in fused_kernel_error()


# -- argument layouts -------------------------------------------------------------------------------------------


@needs_kernel
def test_loaded_library_layouts_equal_the_python_structures():
    lib = fused_cpu._library()
    for kernel, cls in _abi.FUSED_KERNELS.items():
        for suffix in ("f32", "f64"):
            fn = getattr(lib, f"{kernel}_layout_{suffix}")
            assert fn().decode() == cls.layout
            assert getattr(lib, f"{kernel}_args_size_{suffix}")() == ctypes.sizeof(cls)
    # the weights' NamedTuple fields are C fields of the same name (they are passed by name)
    from wuneng.fused.one_token import HybridStateWeights, TimeMixWeights

    for weights, cls in ((TimeMixWeights, _abi.TimeMixArgs), (HybridStateWeights, _abi.HybridStateArgs)):
        names = [n for n, _ in cls._fields_]
        assert set(weights._fields[:-1]) <= set(names) and "eps" in names


class _FakeLibrary:
    """Stands in for the C library with given layout texts (everything else as this package expects); plain
    functions take the restype / argtypes attributes that the checks set."""

    def __init__(self, layouts: dict, abi: int = _abi.KERNEL_ABI, key: str = "k"):
        self.wuneng_kernel_abi = lambda: abi
        self.wuneng_kernel_key = lambda: key.encode()
        for kernel, cls in _abi.FUSED_KERNELS.items():
            for suffix in ("f32", "f64"):
                setattr(self, f"{kernel}_layout_{suffix}", lambda text=layouts.get(kernel, cls.layout): text.encode())
                setattr(self, f"{kernel}_args_size_{suffix}", lambda cls=cls: ctypes.sizeof(cls))
                setattr(self, f"{kernel}_{suffix}", lambda *a: None)


def test_a_reordered_field_fails_loudly_at_load():
    from wuneng.ops.c_library import check_identity

    good = _FakeLibrary({})
    _abi.check_layouts(good, ("f32", "f64"))  # the fake itself is consistent
    check_identity(good, _abi.KERNEL_ABI, "k")
    fields = _abi.TimeMixArgs.layout.split(";")[:-1]
    i, j = fields.index("p:W_k"), fields.index("p:W_v")  # two fields of one kind and type: C would not notice
    fields[i], fields[j] = fields[j], fields[i]
    swapped = ";".join(fields) + ";"
    with pytest.raises(RuntimeError, match=r"time_mix_one_token_f32: the C argument layout differs") as info:
        _abi.check_layouts(_FakeLibrary({"time_mix_one_token": swapped}), ("f32", "f64"))
    assert swapped in str(info.value) and _abi.TimeMixArgs.layout in str(info.value)
    with pytest.raises(RuntimeError, match="argument-layout version 1"):
        check_identity(_FakeLibrary({}, abi=1), _abi.KERNEL_ABI, "k")
    with pytest.raises(RuntimeError, match="built for key 'other'"):
        check_identity(_FakeLibrary({}, key="other"), _abi.KERNEL_ABI, "k")


def test_kernel_args_are_filled_by_name_and_all_of_them():
    cls = _abi.HybridStateArgs
    values = {n: 0 for n, _ in cls._fields_}
    values.update(Hkv=3, eps=0.5, gate_bias=0xABC0)
    packed = _abi.kernel_args(cls, values)
    assert packed == bytes(cls(**values))  # the packer lays the fields out as ctypes (and C) does
    view = cls.from_buffer_copy(packed)
    assert (view.Hkv, view.eps, view.gate_bias, view.v_first) == (3, 0.5, 0xABC0, None)
    with pytest.raises(TypeError, match=r"missing fields \['gate_bias'\]"):
        _abi.kernel_args(cls, {n: v for n, v in values.items() if n != "gate_bias"})
    with pytest.raises(TypeError, match=r"unknown fields \['gate'\]"):
        _abi.kernel_args(cls, {**values, "gate": 0})


# -- fork -------------------------------------------------------------------------------------------------------


def _call_every_fused_kernel() -> list:
    from test_one_token import make_hybrid_weights, make_inputs, make_weights

    from wuneng.fused.one_token import hybrid_state_one_token, time_mix_one_token

    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        tm = time_mix_one_token(*make_inputs(2, 32, 2, 16), make_weights(32, 2, 16, True), impl="cpu")
        u, shift, S0, v_first = make_inputs(2, 32, 2, 16, seed=3)
        q, k, v = (torch.randn(2, n, generator=g, dtype=torch.float64) for n in (32, 16, 16))
        hs = hybrid_state_one_token(
            u, shift, S0, v_first, q, k, v, make_hybrid_weights(32, 2, 16, True, True, 8), impl="cpu"
        )
    return [t.detach() for t in (*tm, *[x for x in hs if x is not None])]


def _child(conn) -> None:
    try:
        conn.send(("ok", [t.numpy() for t in _call_every_fused_kernel()]))
    except BaseException as err:  # noqa: BLE001 - report anything to the parent
        conn.send(("error", repr(err)))


@needs_kernel
def test_forked_child_calls_the_fused_kernels():
    """A DataLoader worker or multiprocessing fork child (the parent has called the kernels) gets equal results."""
    want = _call_every_fused_kernel()
    got = results_of_a_fork_child(_child)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert torch.equal(torch.from_numpy(g), w)


# -- a build from nothing ---------------------------------------------------------------------------------------


@pytest.mark.slow
@needs_kernel
def test_the_fused_library_builds_alone_into_an_empty_cache(tmp_path):
    """A new process on an empty cache builds the fused library (the operators' headers found through -I) without
    building the operators' library, and its kernels compute."""
    cache = tmp_path / "kernels"
    script = textwrap.dedent(
        """
        import torch
        from wuneng.fused.cpu import LIBRARY, fused_kernel_available, fused_kernel_error
        from wuneng.fused.one_token import time_mix_one_token, time_mix_one_token_reference
        from test_one_token import make_inputs, make_weights
        assert fused_kernel_available(), fused_kernel_error()
        args = make_inputs(2, 32, 2, 16), make_weights(32, 2, 16, True)
        with torch.no_grad():
            got = time_mix_one_token(*args[0], args[1], impl="cpu")
            want = time_mix_one_token_reference(*args[0], args[1])
        assert all(torch.allclose(a, b, rtol=1e-12, atol=1e-12) for a, b in zip(got, want))
        print(LIBRARY.build().name)
        """
    )
    here = Path(__file__).resolve().parent
    path = os.pathsep.join(
        [str(here), str(here.parent)] + [os.environ[k] for k in ("PYTHONPATH",) if os.environ.get(k)]
    )
    env = {**os.environ, "WUNENG_KERNEL_CACHE": str(cache), "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    env.pop("WUNENG_CPU_KERNEL", None)
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    name = proc.stdout.strip().splitlines()[-1]
    assert sorted(p.name for p in cache.iterdir() if p.suffix == ".so") == [name]
    assert name.startswith("fused_cpu_")


@needs_kernel
def test_the_fused_library_runs_on_torchs_openmp_runtime():
    """Built with OpenMP where torch runs on GNU libgomp, and loaded onto torch's own copy: one runtime and one
    thread pool in the process (a second runtime would keep its own threads spinning on the same cores)."""
    if not fused_cpu._torch_uses_libgomp():
        pytest.skip("torch does not run on GNU libgomp here: the kernels are built without OpenMP")
    lib = fused_cpu._library()
    lib.wuneng_fused_openmp.restype = ctypes.c_int64
    assert lib.wuneng_fused_openmp() == 1
    with open("/proc/self/maps") as maps:
        gomp = {line.split()[-1] for line in maps if "/libgomp" in line}
    assert len(gomp) == 1, gomp
