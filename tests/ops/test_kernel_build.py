"""How the operators' C library (wuneng.ops.wkv7.cpu, through wuneng.ops.c_library) is found, built, trusted and
loaded, and that a forked child can use it (the fused kernels' library, built by the same machinery: tests/fused).

Most tests start from a private cache folder holding a copy of the library this process already loaded (named by
the same key), so that they need no compile; the concurrent-build test compiles for real (marked slow).
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from wuneng.ops import c_library
from wuneng.ops.wkv7 import cpu as cpu_mod
from wuneng.ops.wkv7.cpu import cpu_kernel_available, cpu_kernel_error

from _helpers import results_of_a_fork_child

needs_kernel = pytest.mark.skipif(not cpu_kernel_available(), reason=f"C kernel unavailable: {cpu_kernel_error()}")
LOGGER = "wuneng.ops.wkv7.cpu"
ROOT = os.geteuid() == 0  # root writes into read-only folders: those tests also make the writes fail


@pytest.fixture
def fresh(monkeypatch):
    """A clean slate: no cached library handle, the once-per-process warning not yet given, our own environment."""
    loaded = cpu_mod.LIBRARY.path() if cpu_kernel_available() else None
    for name in ("WUNENG_KERNEL_CACHE", "XDG_CACHE_HOME", "WUNENG_CPU_KERNEL"):
        monkeypatch.delenv(name, raising=False)
    cpu_mod._library.cache_clear()
    monkeypatch.setattr(cpu_mod.LIBRARY, "warned", False)
    yield loaded
    monkeypatch.undo()
    cpu_mod._library.cache_clear()  # the next test loads the default library again


def _private_cache(tmp_path: Path, loaded: Path, monkeypatch) -> Path:
    """A private cache folder (0755) holding a copy of the library that this process loaded."""
    folder = tmp_path / "kernels"
    folder.mkdir(mode=0o755)
    shutil.copy2(loaded, folder / loaded.name)
    os.chmod(folder / loaded.name, 0o755)
    monkeypatch.setenv("WUNENG_KERNEL_CACHE", str(folder))
    return folder


def _warnings(caplog) -> list:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING]


def test_cache_folder_follows_xdg_cache_home_and_the_override(fresh, monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert c_library.kernel_cache_dir() == tmp_path / "home" / ".cache" / "wuneng" / "kernels"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert c_library.kernel_cache_dir() == tmp_path / "xdg" / "wuneng" / "kernels"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/cache")  # the XDG spec: ignore a relative path
    assert c_library.kernel_cache_dir() == tmp_path / "home" / ".cache" / "wuneng" / "kernels"
    monkeypatch.setenv("WUNENG_KERNEL_CACHE", str(tmp_path / "mine"))
    assert c_library.kernel_cache_dir() == tmp_path / "mine"


@needs_kernel
def test_library_found_under_xdg_cache_home_is_loaded(fresh, monkeypatch, tmp_path, caplog):
    folder = tmp_path / "xdg" / "wuneng" / "kernels"
    folder.mkdir(parents=True, mode=0o755)
    shutil.copy2(fresh, folder / fresh.name)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(cpu_mod.LIBRARY, "compile", lambda out: pytest.fail("compiled although the library was cached"))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert cpu_kernel_available(), cpu_kernel_error()
    assert not _warnings(caplog)


@needs_kernel
def test_cached_library_loads_with_no_compiler_on_path(fresh, monkeypatch, tmp_path):
    _private_cache(tmp_path, fresh, monkeypatch)
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.delenv("CC", raising=False)
    assert shutil.which("cc") is None

    def no_subprocess(*args, **kwargs):
        raise AssertionError(f"ran a program to load a cached library: {args}")

    monkeypatch.setattr(c_library.subprocess, "run", no_subprocess)
    assert cpu_kernel_available(), cpu_kernel_error()
    # and it computes
    from wuneng.ops.wkv7 import wkv7_reference
    from wuneng.ops.wkv7.cpu import wkv7_cpu

    x = [torch.randn(1, 5, 2, 4, dtype=torch.float64) for _ in range(6)]
    x[1] = -torch.rand_like(x[1])
    assert torch.allclose(wkv7_cpu(*x)[0], wkv7_reference(*x)[0], rtol=1e-12, atol=1e-12)


@needs_kernel
def test_no_compiler_and_nothing_cached_warns_once_and_falls_back(fresh, monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("WUNENG_KERNEL_CACHE", str(tmp_path / "kernels"))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert not cpu_kernel_available()
        cpu_mod._library.cache_clear()
        assert not cpu_kernel_available()  # asked again: no second warning
    assert "no C compiler found" in cpu_kernel_error()
    assert not (tmp_path / "kernels").exists()  # nothing created for a build that cannot run
    warned = _warnings(caplog)
    assert len(warned) == 1 and "no C compiler found" in warned[0] and "slower PyTorch paths" in warned[0]


@needs_kernel
def test_failed_build_warns_with_the_compiler_message_and_leaves_nothing(fresh, monkeypatch, tmp_path, caplog):
    failing = tmp_path / "failing-cc"
    failing.write_text('#!/bin/sh\necho "fatal: boom from the compiler" >&2\nexit 3\n')
    failing.chmod(0o755)
    folder = tmp_path / "kernels"
    monkeypatch.setenv("WUNENG_KERNEL_CACHE", str(folder))
    monkeypatch.setenv("CC", str(failing))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert not cpu_kernel_available()
    warned = _warnings(caplog)
    assert len(warned) == 1 and "build failed" in warned[0] and "exited 3" in warned[0], warned
    assert "boom from the compiler" in warned[0]
    assert not [p.name for p in folder.iterdir() if p.suffix != ".lock"]  # no library, no temp file


def test_disabled_by_environment_says_so_once(fresh, monkeypatch, caplog):
    monkeypatch.setenv("WUNENG_CPU_KERNEL", "0")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert not cpu_kernel_available()
        assert not cpu_kernel_available()
    warned = _warnings(caplog)
    assert len(warned) == 1 and "disabled by WUNENG_CPU_KERNEL=0" in warned[0]


def _fail_writes_on_root(monkeypatch):
    """Root ignores a folder's write bits: make creating files there fail as on a read-only mount."""
    if ROOT:
        real_open = os.open

        def read_only_open(path, flags, *args, **kwargs):
            if flags & os.O_CREAT:
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
            return real_open(path, flags, *args, **kwargs)

        monkeypatch.setattr(c_library.os, "open", read_only_open)


@needs_kernel
def test_read_only_cache_folder_warns_and_falls_back(fresh, monkeypatch, tmp_path, caplog):
    from wuneng.ops.wkv7 import wkv7, wkv7_reference

    folder = tmp_path / "kernels"
    folder.mkdir(mode=0o755)
    monkeypatch.setenv("WUNENG_KERNEL_CACHE", str(folder))
    folder.chmod(0o555)
    _fail_writes_on_root(monkeypatch)
    try:
        with caplog.at_level(logging.WARNING, logger=LOGGER):
            assert not cpu_kernel_available()
            x = [torch.randn(1, 5, 2, 4, dtype=torch.float64) for _ in range(6)]
            x[1] = -torch.rand_like(x[1])
            y, _ = wkv7(*x)  # the chunked form
        assert torch.allclose(y, wkv7_reference(*x)[0], rtol=1e-10, atol=1e-12)
        warned = _warnings(caplog)
        assert len(warned) == 1 and "not writable" in warned[0] and str(folder) in warned[0], warned
    finally:
        folder.chmod(0o755)


@needs_kernel
def test_read_only_cache_folder_with_the_library_built_loads_it(fresh, monkeypatch, tmp_path):
    folder = _private_cache(tmp_path, fresh, monkeypatch)
    folder.chmod(0o555)
    _fail_writes_on_root(monkeypatch)
    try:
        assert cpu_kernel_available(), cpu_kernel_error()
    finally:
        folder.chmod(0o755)


@needs_kernel
@pytest.mark.parametrize("what", ["folder-group-writable", "folder-world-writable", "library-writable", "other-owner"])
def test_cache_writable_by_others_is_refused(fresh, monkeypatch, tmp_path, caplog, what):
    folder = _private_cache(tmp_path, fresh, monkeypatch)
    library = folder / fresh.name
    if what == "folder-group-writable":
        folder.chmod(0o775)
        expected = "writable by other users (mode 775)"
    elif what == "folder-world-writable":
        folder.chmod(0o777)
        expected = "writable by other users (mode 777)"
    elif what == "library-writable":
        library.chmod(0o757)
        expected = "writable by other users (mode 757)"
    else:
        if ROOT:
            os.chown(library, 4321, -1)
        else:  # not root: pretend the file belongs to someone else
            monkeypatch.setattr(c_library.os, "geteuid", lambda: os.getuid() + 4321)
        expected = "owned by uid"
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert not cpu_kernel_available()
    assert expected in cpu_kernel_error() and "refusing to load code from it" in cpu_kernel_error()
    warned = _warnings(caplog)
    assert len(warned) == 1 and expected in warned[0]


@needs_kernel
def test_a_library_built_for_another_key_is_refused(fresh, monkeypatch, tmp_path):
    """A file with the expected name but another build inside (here: the real library under a new key) is not used."""
    folder = _private_cache(tmp_path, fresh, monkeypatch)
    monkeypatch.setattr(cpu_mod.LIBRARY, "key", lambda: "0123456789abcdef0123")
    shutil.copy2(folder / fresh.name, folder / "wkv7_cpu_0123456789abcdef0123.so")
    assert not cpu_kernel_available()
    assert "was built for key" in cpu_kernel_error() and "delete it to rebuild" in cpu_kernel_error()


# -- fork -------------------------------------------------------------------------------------------------------


def _call_every_kernel() -> list:
    """Every operator C kernel once (heads / rows split over the pool when the caller allows), outputs and
    gradients."""
    from wuneng.ops.wkv7 import wkv7_step
    from wuneng.ops.wkv7.cpu import wkv7_cpu
    from wuneng.ops.wkv7.readout import group_norm_bonus

    g = torch.Generator().manual_seed(0)
    seq = [torch.randn(2, 12, 4, 8, generator=g, dtype=torch.float64).requires_grad_() for _ in range(6)]
    log_w = -torch.sigmoid(seq[1])
    y, S = wkv7_cpu(seq[0], log_w, *seq[2:])
    grads = torch.autograd.grad((y * y).sum() + S.sum(), seq)
    ro_in = [torch.randn(2, 12, 4, 8, generator=g, dtype=torch.float64).requires_grad_() for _ in range(4)]
    ro_par = [torch.randn(4, 8, generator=g, dtype=torch.float64), torch.ones(32, dtype=torch.float64),
              torch.zeros(32, dtype=torch.float64)]  # fmt: skip
    ro = group_norm_bonus(*ro_in, *ro_par, 64e-5, impl="cpu")
    ro_grads = torch.autograd.grad((ro * ro).sum(), ro_in)
    with torch.no_grad():
        step = wkv7_step(*[t[:, 0].detach() for t in seq], S.detach(), impl="cpu")
    return [t.detach() for t in (y, S, *grads, ro, *ro_grads, *step)]


def _child(conn) -> None:
    try:
        conn.send(("ok", [t.numpy() for t in _call_every_kernel()]))  # arrays: plain pickles, no shared memory
    except BaseException as err:  # noqa: BLE001 - report anything to the parent
        conn.send(("error", repr(err)))


def _two_ranges(n_items: int, work_per_item: int) -> list:
    """Always split work in two ranges, so that every kernel call goes through the worker pool."""
    return [0, n_items // 2, n_items] if n_items > 1 else [0, n_items]


@needs_kernel
def test_forked_child_calls_every_kernel(monkeypatch):
    """A DataLoader worker or multiprocessing fork child inherits the parent's worker pool object but not its
    threads: the child must get a pool of its own (work queued to the parent's would wait forever).

    torch stays at one intra-op thread in both processes, as in DataLoader workers (GNU OpenMP itself cannot run
    a parallel region in a fork child once the parent has run one); the kernels' ranges are forced through the
    pool by splitting every call in two."""
    from wuneng.ops.wkv7 import readout as readout_mod

    monkeypatch.setattr(cpu_mod, "_split", _two_ranges)
    monkeypatch.setattr(readout_mod, "_split", _two_ranges)
    want = _call_every_kernel()  # the parent's pool now has live threads
    assert cpu_mod._pool()._threads, "the parent did not use its pool"
    got = results_of_a_fork_child(_child)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert torch.equal(torch.from_numpy(g), w)


# -- concurrent builds ------------------------------------------------------------------------------------------


@pytest.mark.slow
@needs_kernel
def test_two_processes_building_at_once_make_one_library(tmp_path):
    """Both processes start on an empty cache at the same moment: one compiles, the other waits for it, both load."""
    real_cc = shutil.which(os.environ.get("CC", "cc").split()[0])
    log = tmp_path / "cc.log"
    wrapper = tmp_path / "cc-wrapper"
    wrapper.write_text(f'#!/bin/sh\necho "$@" >> "{log}"\nexec "{real_cc}" "$@"\n')
    wrapper.chmod(0o755)
    cache = tmp_path / "kernels"
    start = tmp_path / "go"
    script = textwrap.dedent(
        f"""
        import os, time
        while not os.path.exists({str(start)!r}):
            time.sleep(0.01)
        from wuneng.ops.wkv7.cpu import LIBRARY, cpu_kernel_available, cpu_kernel_error
        assert cpu_kernel_available(), cpu_kernel_error()
        print(LIBRARY.build())  # (found now: the path of the loaded library)
        """
    )
    env = {**os.environ, "WUNENG_KERNEL_CACHE": str(cache), "CC": str(wrapper), "OMP_NUM_THREADS": "1"}
    env.pop("WUNENG_CPU_KERNEL", None)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    start.touch()
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_out, err) in zip(procs, outs):
        assert p.returncode == 0, err
    paths = {out.strip() for out, _ in outs}
    assert len(paths) == 1
    compiles = [ln for ln in log.read_text().splitlines() if " -o " in f" {ln} "]
    assert len(compiles) == 1, compiles  # one build, not one per process
    libs = sorted(p.name for p in cache.iterdir() if p.suffix == ".so")
    assert libs == [Path(paths.pop()).name]
    assert not [p.name for p in cache.iterdir() if p.name.endswith(".tmp")]  # no temp file left behind
    assert stat.S_IMODE(cache.stat().st_mode) & 0o022 == 0
