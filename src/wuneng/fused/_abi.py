"""The calling convention of the fused kernels' C library (``csrc/``), declared once on the Python side and checked
at load.

The fused one-token kernels take one struct of named fields; ``csrc/args.h`` lists the fields as X-macros
(``TIME_MIX_FIELDS``, ``HYBRID_STATE_FIELDS``, ``CHANNEL_MIX_FIELDS``, ``LINEAR_FIELDS``) from which the C struct and a layout text are generated, and the
structures below list the same fields for ctypes. :func:`check_layouts` compares the two (names, kinds, order,
struct size) when the library is loaded (after :class:`~wuneng.ops.c_library.CLibrary` has checked the ABI
version and the cache key the library was built for): a field added, removed, renamed or reordered on either side raises there, naming both layouts,
instead of passing pointers into the wrong slots. :func:`kernel_args` fills a structure by field name and
refuses a missing or unknown name.
"""

from __future__ import annotations

import ctypes
import operator
import struct

#: must equal WUNENG_KERNEL_ABI in csrc/args.h (bumped whenever an argument layout changes)
KERNEL_ABI = 6

_KINDS = {"i": ctypes.c_int64, "d": ctypes.c_double, "p": ctypes.c_void_p, "o": ctypes.c_void_p}
_FORMATS = {"i": "q", "d": "d", "p": "P", "o": "P"}


def _structure(name: str, spec: str) -> type:
    """A ctypes structure from ``"kind:name kind:name ..."`` (kinds: i int64, d double, p input pointer,
    o output pointer); its ``layout`` is the text the C library returns for the same fields."""
    fields = [tuple(item.split(":")) for item in spec.split()]
    cls = type(name, (ctypes.Structure,), {"_fields_": [(n, _KINDS[k]) for k, n in fields]})
    cls.layout = "".join(f"{k}:{n};" for k, n in fields)
    cls.field_names = frozenset(n for _, n in fields)
    cls.order = tuple(n for _, n in fields)
    cls.getter = operator.itemgetter(*cls.order)
    # One struct.pack call fills the C struct (a ctypes Structure set field by field costs more than the
    # smallest kernel call); "@": native sizes and alignment, as the C compiler lays the struct out.
    cls.packer = struct.Struct("@" + "".join(_FORMATS[k] for k, _ in fields))
    assert cls.packer.size == ctypes.sizeof(cls), (name, cls.packer.size, ctypes.sizeof(cls))
    return cls


TimeMixArgs = _structure(
    "TimeMixArgs",
    "i:B i:C i:H i:N i:Dw i:Da i:Dv i:Dg i:value_residual i:sse_blocks i:threads d:eps "
    "p:x p:mask p:shift p:state p:v_first p:mix p:W_r p:W_k p:W_v p:W_o p:w0 p:w1 p:w2 p:a0 p:a1 p:a2 "
    "p:v0 p:v1 p:v2 p:g1 p:g2 p:k_k p:k_a p:r_k p:ln_w p:ln_b "
    "o:work o:out o:shift_out o:state_out o:v_first_out o:readout_out",
)

HybridStateArgs = _structure(
    "HybridStateArgs",
    "i:B i:C i:H i:Hkv i:N i:Dw i:Da i:Dv i:Dr i:Dg i:Dm i:Wm i:value_residual i:threads d:eps "
    "p:u p:mask p:shift p:state p:v_first p:q p:k p:v p:mix p:w0 p:w1 p:w2 p:a0 p:a1 p:a2 p:v0 p:v1 p:v2 "
    "p:R1 p:R2 p:G1 p:G2 p:gate_bias p:P1 p:P2 p:k_k p:k_a p:r_k p:ln_w p:ln_b "
    "o:work o:y_out o:shift_out o:state_out o:v_first_out o:gamma_out o:middle_out",
)

ChannelMixArgs = _structure(
    "ChannelMixArgs", "i:B i:C i:F i:threads p:x p:mask p:shift p:mix p:W_key p:W_value o:work o:out o:shift_out"
)

LinearArgs = _structure("LinearArgs", "i:B i:O i:I i:threads p:x p:W o:y")

#: kernel name (without the dtype suffix) -> its argument structure
FUSED_KERNELS = {
    "time_mix_one_token": TimeMixArgs,
    "hybrid_state_one_token": HybridStateArgs,
    "channel_mix_one_token": ChannelMixArgs,
    "linear_one_token": LinearArgs,
}
#: the kernels also built for bfloat16 weight matrices (suffix "bf16"; float32 activations)
BF16_KERNELS = ("time_mix_one_token", "channel_mix_one_token", "linear_one_token")


def kernel_args(cls: type, values: dict) -> bytes:
    """The bytes of a ``cls`` struct with every field given by name in ``values`` and no other name (pointers
    as ints, 0 for NULL), passed to the kernel as its argument pointer (the C side only reads it). Refuses a
    missing or unknown name: a missing pointer would otherwise be passed as NULL without a word."""
    try:
        row = cls.getter(values)
    except KeyError:
        row = None
    if row is None or len(values) != len(cls.order):
        missing, unknown = cls.field_names - values.keys(), values.keys() - cls.field_names
        raise TypeError(f"{cls.__name__}: missing fields {sorted(missing)}, unknown fields {sorted(unknown)}")
    return cls.packer.pack(*row)


def check_layouts(lib, suffixes, kernels=None) -> None:
    """Raise RuntimeError unless every fused kernel of ``lib`` (or those named in ``kernels``), for each dtype suffix,
    has the argument layout of the structures above; sets the kernels' ctypes signatures (one argument: the bytes
    of :func:`kernel_args`)."""
    for kernel, cls in FUSED_KERNELS.items():
        if kernels is not None and kernel not in kernels:
            continue
        for suffix in suffixes:
            layout_fn = getattr(lib, f"{kernel}_layout_{suffix}")
            layout_fn.restype, layout_fn.argtypes = ctypes.c_char_p, []
            size_fn = getattr(lib, f"{kernel}_args_size_{suffix}")
            size_fn.restype, size_fn.argtypes = ctypes.c_int64, []
            c_layout = layout_fn().decode()
            if c_layout != cls.layout:
                raise RuntimeError(
                    f"{kernel}_{suffix}: the C argument layout differs from {cls.__name__} "
                    f"(csrc/args.h vs wuneng/fused/_abi.py):\n  C:      {c_layout}\n  Python: {cls.layout}"
                )
            if size_fn() != ctypes.sizeof(cls):
                raise RuntimeError(f"{kernel}_{suffix}: C struct size {size_fn()} != ctypes size {ctypes.sizeof(cls)}")
            fn = getattr(lib, f"{kernel}_{suffix}")
            fn.argtypes, fn.restype = [ctypes.c_char_p], None  # the bytes of kernel_args, passed by address
