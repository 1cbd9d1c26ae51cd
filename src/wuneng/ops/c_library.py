"""Build, trust and load a C library of kernels: the machinery shared by the operators' library
(:mod:`wuneng.ops.wkv7.cpu`) and the fused decoding kernels' library (:mod:`wuneng.fused.cpu`).

A :class:`CLibrary` names one top-level C file, the sources it depends on, and its include folders:

- Cache folder: ``$WUNENG_KERNEL_CACHE`` if set, else ``$XDG_CACHE_HOME/wuneng/kernels`` (``~/.cache`` when
  XDG_CACHE_HOME is unset or not absolute), :func:`kernel_cache_dir`. The library file is named by a key hashed
  from the sources, the flags, the CPU (``-march=native``), the machine type and the ABI version, not from the
  compiler: a library already there is loaded without running (or having) a compiler. The first build runs
  ``$CC`` (or ``cc``; ``-O3 -march=native``) and records the compiler's identity in a ``.json`` beside the
  library; to rebuild with another compiler, delete the folder.
- Concurrent processes: the build runs under an exclusive ``fcntl.flock`` on a lock file beside the library;
  the first process builds (temp file, then an atomic rename), the others wait, then load its result.
- Trust: the folder and the library must belong to this user and not be writable by group or others, else they
  are refused (a library there runs as this user's code); the loaded library must report the ABI version of its
  Python side and the key it was built for (``wuneng_kernel_abi()``, ``wuneng_kernel_key()``, compiled in from
  ``-DWUNENG_KERNEL_KEY``), and pass the library's own ``check`` (the fused kernels compare their argument
  layouts), else it is refused.
- Unavailable (no compiler, build failed, folder not usable, refused, ``WUNENG_CPU_KERNEL=0``): one warning per
  library and process through the library's logger saying why; :meth:`CLibrary.load` returns None and
  :attr:`CLibrary.error` holds the reason.
- Fork: each library's lock is replaced in a forked child (``os.register_at_fork``).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import json
import logging
import os
import platform
import shutil
import stat
import subprocess
import tempfile
import threading
import weakref
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

try:
    import fcntl
except ImportError:  # not POSIX: builds are not locked across processes
    fcntl = None

__all__ = ["CLibrary", "KernelUnavailable", "kernel_cache_dir", "DTYPE_SUFFIX", "data_ptr"]

#: the scalar types the kernels are compiled for, and the suffix of their function names
DTYPE_SUFFIX = {torch.float32: "f32", torch.float64: "f64"}
CFLAGS = ("-O3", "-march=native", "-fopenmp-simd", "-fno-math-errno", "-shared", "-fPIC")


class KernelUnavailable(RuntimeError):
    """Why a C library cannot be used (the message is the reason shown to the user)."""


def data_ptr(t: Optional[torch.Tensor]) -> int:
    """The address of a tensor's data, 0 (NULL) for None."""
    return 0 if t is None else t.data_ptr()


def kernel_cache_dir() -> Path:
    """``$WUNENG_KERNEL_CACHE``, else ``$XDG_CACHE_HOME/wuneng/kernels`` (``~/.cache`` if unset or relative)."""
    override = os.environ.get("WUNENG_KERNEL_CACHE")
    if override:
        return Path(override).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(xdg) if os.path.isabs(xdg) else Path.home() / ".cache"
    return base / "wuneng" / "kernels"


def _cpu_signature() -> str:
    """What -march=native depends on: the CPU model and flags (Linux), else the platform string."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        keep = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags", "Features"))]
        return "\n".join(sorted(set(keep))) or platform.processor()
    except OSError:
        return platform.platform() + platform.processor()


def _compiler() -> list:
    return os.environ.get("CC", "cc").split()


def find_compiler() -> list:
    """The compiler command, or KernelUnavailable when it is not on PATH."""
    cc = _compiler()
    if not cc or shutil.which(cc[0]) is None:
        raise KernelUnavailable(f"no C compiler found ({' '.join(cc) or '$CC is empty'} is not on PATH; set CC)")
    return cc


def refuse_if_shared(path: Path, what: str) -> None:
    """Raise KernelUnavailable when ``path`` belongs to another user or is writable by group or others."""
    st = path.stat()
    uid = os.geteuid() if hasattr(os, "geteuid") else st.st_uid
    if st.st_uid != uid:
        problem = f"is owned by uid {st.st_uid}, not by this user (uid {uid})"
    elif st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        problem = f"is writable by other users (mode {stat.S_IMODE(st.st_mode):o})"
    else:
        return
    raise KernelUnavailable(
        f"kernel cache {what} {path} {problem}; refusing to load code from it "
        "(chmod go-w it, or set WUNENG_KERNEL_CACHE to a private folder)"
    )


def check_identity(lib, abi: int, key: str) -> None:
    """Raise RuntimeError unless ``lib`` reports argument-layout version ``abi`` and was built for ``key``."""
    lib.wuneng_kernel_abi.restype = ctypes.c_int64
    lib.wuneng_kernel_abi.argtypes = []
    found = lib.wuneng_kernel_abi()
    if found != abi:
        raise RuntimeError(f"the library has argument-layout version {found}, this wuneng expects {abi}")
    lib.wuneng_kernel_key.restype = ctypes.c_char_p
    lib.wuneng_kernel_key.argtypes = []
    built_for = (lib.wuneng_kernel_key() or b"").decode()
    if built_for != key:
        raise RuntimeError(f"the library was built for key {built_for!r}, expected {key!r}")


_LIBRARIES: "weakref.WeakSet[CLibrary]" = weakref.WeakSet()


def _after_fork_in_child() -> None:
    """A lock held by another parent thread would never be released in a forked child: start afresh."""
    for library in list(_LIBRARIES):
        library.lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class CLibrary:
    """One C library: built into the kernel cache on first use, trusted, checked and loaded (see the module
    docstring).

    Args:
        name: the file stem (``<name>_<key>.so``).
        main: the top-level C file that is compiled.
        sources: every file the build reads (``main`` included): their bytes enter the key.
        include_dirs: folders given to the compiler with ``-I``.
        abi: the argument-layout version the library must report.
        logger: where the once-per-process "unavailable" warning goes.
        fallback: what runs instead, for that warning ("the ... take their slower PyTorch paths").
        check: ``check(lib)`` raises RuntimeError when the library does not fit its Python side.
        configure: ``configure(lib)`` sets the ctypes signatures of its functions.
        optional_flags: compiler flags added to :data:`CFLAGS` when the compiler accepts them (the fused kernels'
            ``-fopenmp``); a build that fails with them is retried without them (logged), and the code must work
            either way. They enter the key.
    """

    def __init__(
        self,
        name: str,
        main: Path,
        sources: Sequence[Path],
        include_dirs: Sequence[Path] = (),
        *,
        abi: int,
        logger: logging.Logger,
        fallback: str,
        check: Optional[Callable] = None,
        configure: Optional[Callable] = None,
        optional_flags: Sequence[str] = (),
    ):
        self.name, self.main, self.sources, self.include_dirs = name, Path(main), tuple(sources), tuple(include_dirs)
        self.abi, self.logger, self.fallback = abi, logger, fallback
        self.check, self.configure = check, configure
        self.optional_flags = tuple(optional_flags)
        self.error: Optional[str] = None
        self.warned = False  # the "unavailable" warning is logged once per process
        self.lock = threading.Lock()
        self.load = functools.lru_cache(maxsize=1)(self._load)  # .load.cache_clear() forgets the handle
        _LIBRARIES.add(self)

    @functools.cached_property
    def _key(self) -> str:
        digest = hashlib.sha256()
        for path in self.sources:
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
        flags = " ".join(CFLAGS + self.optional_flags)
        for part in (flags, _cpu_signature(), platform.machine(), str(self.abi)):
            digest.update(part.encode())
        return digest.hexdigest()[:20]

    def key(self) -> str:
        """Hash of what the library's code depends on: sources, flags, CPU, machine type, ABI (no compiler run)."""
        return self._key

    def path(self) -> Path:
        return kernel_cache_dir() / f"{self.name}_{self.key()}.so"

    def compile(self, out: Path) -> None:
        """Compile the library into ``out`` (temp file in the same folder, then an atomic rename)."""
        cc = find_compiler()
        fd, tmp = tempfile.mkstemp(suffix=".so.tmp", dir=out.parent)
        os.close(fd)
        try:
            flags = list(CFLAGS) + [f"-I{d}" for d in self.include_dirs] + [f'-DWUNENG_KERNEL_KEY="{self.key()}"']
            used = list(CFLAGS)
            proc = None
            if self.optional_flags:
                proc = subprocess.run(
                    cc + flags + list(self.optional_flags) + ["-o", tmp, str(self.main), "-lm"],
                    capture_output=True,
                    text=True,
                )
                if proc.returncode == 0:
                    used += self.optional_flags
                else:
                    self.logger.info(
                        "%s: the build with %s failed (%s); building without them",
                        self.name,
                        " ".join(self.optional_flags),
                        proc.stderr.strip()[-500:],
                    )
            if proc is None or proc.returncode != 0:
                proc = subprocess.run(cc + flags + ["-o", tmp, str(self.main), "-lm"], capture_output=True, text=True)
            if proc.returncode != 0:
                raise KernelUnavailable(
                    f"build failed: {' '.join(cc)} exited {proc.returncode}: {proc.stderr.strip()[-2000:]}"
                )
            os.chmod(tmp, 0o755)  # whatever the compiler and umask made of it: not writable by others
            version = subprocess.run(cc + ["--version"], capture_output=True, text=True).stdout.strip().splitlines()
            info = {"compiler": cc, "version": version[0] if version else "", "flags": used, "key": self.key()}
            info_tmp = out.with_suffix(".json.tmp")
            info_tmp.write_text(json.dumps(info, indent=1) + "\n")
            os.replace(info_tmp, out.with_suffix(".json"))
            os.replace(tmp, out)  # atomic: another process sees no file or a whole one
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def build(self) -> Path:
        """The path of a trusted library for this key: found in the cache (no compiler needed), or built there now
        under a cross-process lock. Raises KernelUnavailable with the reason."""
        out = self.path()
        folder = out.parent
        try:
            if folder.is_dir():
                refuse_if_shared(folder, "folder")
                if out.exists():
                    refuse_if_shared(out, "library")
                    return out
            find_compiler()  # before creating anything
            try:
                folder.mkdir(mode=0o755, parents=True, exist_ok=True)
            except OSError as err:
                raise KernelUnavailable(
                    f"kernel cache folder {folder} cannot be created ({err}); set WUNENG_KERNEL_CACHE"
                ) from err
            refuse_if_shared(folder, "folder")
            lock_path = out.with_suffix(".lock")
            try:
                lock_fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
            except OSError as err:
                raise KernelUnavailable(
                    f"kernel cache folder {folder} is not writable ({err.strerror}); set WUNENG_KERNEL_CACHE to a "
                    "writable private folder"
                ) from err
            try:
                if fcntl is not None:
                    fcntl.flock(lock_fd, fcntl.LOCK_EX)  # another process may be building the same key: wait for it
                if not out.exists():
                    try:
                        self.compile(out)
                    except OSError as err:
                        raise KernelUnavailable(
                            f"the library cannot be written into {folder} ({err}); set WUNENG_KERNEL_CACHE to a "
                            "writable private folder"
                        ) from err
                refuse_if_shared(out, "library")
            finally:
                os.close(lock_fd)  # releases the lock
        except OSError as err:  # stat of a folder or file that vanished, a permission error on the way
            raise KernelUnavailable(f"kernel cache {folder} not usable ({err})") from err
        return out

    def _warn_unavailable(self, reason: str) -> None:
        if not self.warned:
            self.warned = True
            self.logger.warning("wuneng C kernels unavailable (%s); %s", reason, self.fallback)

    def _load(self):
        """The loaded library, or None (reason in :attr:`error`, logged once as a warning)."""
        self.error = None
        lib = None
        if os.environ.get("WUNENG_CPU_KERNEL", "1").strip().lower() in ("0", "false", "no", "off"):
            self.error = "disabled by WUNENG_CPU_KERNEL=0"
        else:
            try:
                with self.lock:
                    path = self.build()
                    lib = ctypes.CDLL(str(path))
                    try:
                        check_identity(lib, self.abi, self.key())
                        if self.check is not None:
                            self.check(lib)
                    except (RuntimeError, AttributeError) as err:
                        raise KernelUnavailable(
                            f"{path} does not match this wuneng ({err}); delete it to rebuild"
                        ) from err
            except KernelUnavailable as err:
                self.error = str(err)
            except Exception as err:  # an unexpected platform: say what happened, fall back
                self.error = f"{type(err).__name__}: {err}"
        if self.error is not None:
            self._warn_unavailable(self.error)
            return None
        if self.configure is not None:
            self.configure(lib)
        return lib
