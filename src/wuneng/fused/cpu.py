"""The fused kernels' C library: ``csrc/fused_cpu.c`` (the one-token kernels of :mod:`.one_token` and
:mod:`.channel_mix`, which call the
operators' WKV-7 step and read-out from ``wuneng/ops/wkv7/csrc``), built, trusted and loaded by
:class:`~wuneng.ops.c_library.CLibrary` into ``fused_cpu_<key>.so`` beside the operators' library (same cache
folder, lock, ownership checks, ABI and key check), then checked field by field against :mod:`._abi`.

Unavailable (no compiler, build failed, refused, ``WUNENG_CPU_KERNEL=0``): one warning per process says why,
:func:`fused_kernel_available` is False, and decoding takes the tensor-op references.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

from ..ops.c_library import DTYPE_SUFFIX, CLibrary
from ._abi import BF16_KERNELS, KERNEL_ABI, check_layouts

logger = logging.getLogger(__name__)

_CSRC = Path(__file__).with_name("csrc")
_OPS_CSRC = Path(__file__).parent.parent / "ops" / "wkv7" / "csrc"


def _torch_uses_libgomp() -> bool:
    """Whether this process has GNU libgomp (``libgomp.so.1``) loaded, as torch's Linux wheels do: a library built
    with ``-fopenmp`` then shares torch's OpenMP runtime and thread pool instead of starting a second one (two
    runtimes would each keep their threads spinning between regions, on the same cores)."""
    try:
        with open("/proc/self/maps") as maps:
            return any("/libgomp" in line for line in maps)
    except OSError:
        return False


#: the fused decoding kernels' C library
LIBRARY = CLibrary(
    "fused_cpu",
    _CSRC / "fused_cpu.c",
    [_CSRC / name for name in ("fused_cpu.c", "args.h", "parallel.h", "one_token_impl.h", "channel_mix_impl.h")]
    + [_OPS_CSRC / name for name in ("wkv7_cpu_impl.h", "readout_impl.h")],
    include_dirs=[_OPS_CSRC],
    abi=KERNEL_ABI,
    logger=logger,
    fallback="decoding steps take the slower PyTorch paths of the fused one-token kernels",
    check=lambda lib: (
        check_layouts(lib, DTYPE_SUFFIX.values()),
        check_layouts(lib, ("bf16",), BF16_KERNELS),  # bfloat16 weights: not the hybrid state kernel
    ),
    # the time-mix kernel splits its work across torch's threads in one OpenMP region; the library then needs
    # libgomp.so.1, which the dynamic loader finds already loaded by torch (one runtime, one thread pool)
    optional_flags=("-fopenmp",) if _torch_uses_libgomp() else (),
)
#: the loaded library or None (``_library.cache_clear()`` forgets it)
_library = LIBRARY.load


def fused_kernel_available() -> bool:
    """True when the fused kernels' C library is built (or builds now) and loads."""
    return _library() is not None


def fused_kernel_error() -> Optional[str]:
    """Why :func:`fused_kernel_available` is False (None when it is True or was not tried yet)."""
    _library()
    return LIBRARY.error
