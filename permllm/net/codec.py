"""Wire codec: msgpack with numpy/torch arrays, and the message envelope.

Part of ``permllm.net``, the bottom layer of permllm; it knows nothing of
protocols or models. :func:`packb`/:func:`unpackb` serialise plain data
(None, bool, int, float, str, bytes, lists, tuples, dicts) plus numpy arrays
and CPU torch tensors as msgpack ext types, never with pickle.
:func:`encode_message`/:func:`decode_message` wrap a payload in the
``[tag, phase, stamp, payload]`` envelope that ``Channel`` sends;
:func:`encode_keepalive` makes the envelope of a keep-alive frame.

Decoding is strict: anything malformed raises :class:`FrameError`.
"""

from __future__ import annotations

from typing import Any

import msgpack
import numpy as np

from .errors import FrameError

__all__ = ["DEFAULT_MAX_FRAME", "KEEPALIVE", "packb", "unpackb", "encode_message", "decode_message",
           "encode_keepalive"]

DEFAULT_MAX_FRAME = 256 * 1024 * 1024
KEEPALIVE = "!alive"  # the reserved tag kind of a keep-alive frame

EXT_NDARRAY = 1
EXT_TORCH = 2

# Allowed dtypes, keyed by their little-endian (or byte-order-free) ``dtype.str``.
_DTYPES: dict[str, np.dtype] = {
    np.dtype(name).newbyteorder("<").str: np.dtype(name).newbyteorder("<")
    for name in (
        "bool", "int8", "int16", "int32", "int64",
        "uint8", "uint16", "uint32", "uint64",
        "float16", "float32", "float64",
    )
}

# Byte patterns that can start a msgpack timestamp ext (type -1): fixext4,
# fixext8 and ext8 of length 12. msgpack decodes those itself, bypassing the
# ext hook, so a frame that contains one of them is checked by a tree walk.
_TIMESTAMP_MARKS = (b"\xd6\xff", b"\xd7\xff", b"\xc7\x0c\xff")


def _array_ext(code: int, arr: np.ndarray) -> msgpack.ExtType:
    dt = arr.dtype
    if dt.byteorder == ">":
        arr = arr.astype(dt.newbyteorder("<"))
        dt = arr.dtype
    if dt.str not in _DTYPES:
        if dt.hasobject:
            raise TypeError("cannot encode an object-dtype array (only numeric and bool arrays are sent)")
        raise TypeError(f"cannot encode an array of dtype {dt.str!r}; allowed: {sorted(_DTYPES)}")
    if not arr.flags.c_contiguous:
        arr = np.ascontiguousarray(arr)  # non-contiguous implies ndim >= 1, so the shape is kept
    body = msgpack.packb([dt.str, list(arr.shape), memoryview(arr)], use_bin_type=True)
    return msgpack.ExtType(code, body)


def _default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        return _array_ext(EXT_NDARRAY, obj)
    if isinstance(obj, np.generic):
        return obj.item()
    if type(obj).__module__.startswith("torch"):
        import torch

        if isinstance(obj, torch.Tensor):
            try:
                arr = obj.detach().cpu().numpy()
            except (TypeError, RuntimeError) as e:
                raise TypeError(f"cannot encode a torch tensor of dtype {obj.dtype}: {e}") from e
            return _array_ext(EXT_TORCH, arr)
    raise TypeError(f"cannot encode an object of type {type(obj).__module__}.{type(obj).__qualname__}")


def packb(obj: Any) -> bytes:
    """Serialise ``obj`` to msgpack bytes (``use_bin_type=True``; tuples become lists).

    Wire format of arrays: a msgpack ext of code 1 (numpy ndarray) or 2 (torch
    tensor, sent from CPU) whose payload is the msgpack array
    ``[dtype.str, shape, raw]``: ``dtype.str`` one of ``'|b1' '|i1' '|u1' '<i2'
    '<i4' '<i8' '<u2' '<u4' '<u8' '<f2' '<f4' '<f8'`` (big-endian input is
    converted to little-endian), ``shape`` a list of non-negative ints, ``raw``
    a bin of the C-order element bytes (``prod(shape) * itemsize`` of them).
    numpy scalars are sent as Python scalars. Other types raise TypeError.
    """
    return msgpack.packb(obj, default=_default, use_bin_type=True)


def _ext_hook(code: int, data: bytes) -> Any:
    if code not in (EXT_NDARRAY, EXT_TORCH):
        raise FrameError(f"unknown msgpack ext type {code}")
    what = "ndarray" if code == EXT_NDARRAY else "torch tensor"
    try:
        fields = msgpack.unpackb(data, raw=False, use_list=True)
    except (ValueError, TypeError, msgpack.UnpackException) as e:
        raise FrameError(f"bad {what} ext payload: {e}") from e
    if not (isinstance(fields, list) and len(fields) == 3):
        raise FrameError(f"bad {what} ext payload: expected [dtype, shape, raw], got {_brief(fields)}")
    dstr, shape, raw = fields
    if not isinstance(dstr, str):
        raise FrameError(f"bad {what} ext payload: dtype must be a str, got {_brief(dstr)}")
    dtype = _DTYPES.get(dstr)
    if dtype is None:
        if dstr.startswith(">"):
            raise FrameError(f"big-endian dtype {dstr!r} is not allowed in a frame (arrays travel little-endian)")
        raise FrameError(f"dtype {dstr!r} is not allowed in a frame; allowed: {sorted(_DTYPES)}")
    if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
        raise FrameError(f"bad {what} ext payload: shape must be a list of non-negative ints, got {_brief(shape)}")
    if not isinstance(raw, bytes):
        raise FrameError(f"bad {what} ext payload: raw data must be bin, got {type(raw).__name__}")
    count = 1
    for d in shape:
        count *= d
    if len(raw) != count * dtype.itemsize:
        raise FrameError(
            f"bad {what} ext payload: shape {tuple(shape)} of {dstr} needs {count * dtype.itemsize} bytes, got {len(raw)}"
        )
    try:
        arr = np.frombuffer(raw, dtype=dtype).reshape(shape)
    except ValueError as e:  # e.g. more dimensions than numpy supports
        raise FrameError(f"bad {what} ext payload: {e}") from e
    if code == EXT_NDARRAY:
        return arr
    try:
        import torch
    except ImportError as e:
        raise FrameError("received a torch tensor but torch is not installed") from e
    return torch.from_numpy(np.array(arr))


def _brief(obj: Any) -> str:
    """A short description of a received value for an error message (array contents are never shown)."""
    if isinstance(obj, np.ndarray):
        return f"ndarray of {obj.dtype} with shape {obj.shape}"
    if isinstance(obj, (list, dict)):
        return f"{type(obj).__name__} of {len(obj)} items"
    if isinstance(obj, (bytes, str)):
        return f"{type(obj).__name__} of length {len(obj)}"
    text = repr(obj)
    return text if len(text) <= 80 else text[:77] + "..."


def _reject_timestamps(obj: Any) -> None:
    stack: list = [[obj]]
    while stack:
        x = stack.pop()
        parts = (x, x.values()) if type(x) is dict else (x,)
        for items in parts:
            types = set(map(type, items))  # C-speed scan, no per-element Python code
            if msgpack.Timestamp in types:
                raise FrameError("unknown msgpack ext type -1 (timestamp)")
            if list in types or dict in types:
                stack.extend(y for y in items if type(y) is list or type(y) is dict)


def unpackb(data: bytes) -> Any:
    """Decode bytes written by :func:`packb`; raise FrameError on anything malformed.

    Decoded arrays are zero-copy views (``np.frombuffer``) on the received
    bytes and therefore read-only; copy them before writing. Torch tensors are
    decoded into fresh, writable CPU tensors. Map keys may be ints.
    """
    try:
        obj = msgpack.unpackb(
            data, raw=False, use_list=True, strict_map_key=False, ext_hook=_ext_hook
        )
    except FrameError:
        raise
    except msgpack.ExtraData as e:
        raise FrameError(f"invalid frame: {len(e.extra)} trailing bytes after the msgpack object") from e
    except (ValueError, TypeError, OverflowError, RecursionError, msgpack.UnpackException) as e:
        # ValueError covers msgpack's FormatError, StackError, OutOfData and bad UTF-8.
        raise FrameError(f"invalid msgpack frame ({type(e).__name__}: {e})") from e
    if any(mark in data for mark in _TIMESTAMP_MARKS):
        _reject_timestamps(obj)
    return obj


def encode_message(tag: tuple, phase: str, stamp: int, payload: Any, session: bytes | None = None) -> bytes:
    """Encode one channel message (the frame body, without the length prefix).

    Wire format: the msgpack array ``[tag, phase, stamp, payload]``, or
    ``[tag, phase, stamp, payload, session]`` on a session-bound channel:
    ``tag`` a non-empty list of str/int (``tag[0]`` is the message kind),
    ``phase`` a str, ``stamp`` the sender's hop-clock stamp (int >= 0),
    ``payload`` anything :func:`packb` accepts, ``session`` a short bin naming
    the session (so a frame replayed from another session is refused). Raises
    TypeError/ValueError for a bad envelope.
    """
    if not tag or not all(isinstance(t, (str, int)) and not isinstance(t, bool) for t in tag):
        raise TypeError(f"a tag must be a non-empty tuple of str/int, got {tag!r}")
    if not isinstance(phase, str):
        raise TypeError(f"phase must be a str, got {phase!r}")
    if type(stamp) is not int or stamp < 0:
        raise ValueError(f"stamp must be an int >= 0, got {stamp!r}")
    if session is None:
        return packb([list(tag), phase, stamp, payload])
    return packb([list(tag), phase, stamp, payload, session])


def decode_message(body: bytes, session: bytes | None = None) -> tuple[tuple, str, int, Any]:
    """Decode a frame body written by :func:`encode_message` into ``(tag, phase, stamp, payload)``.

    With ``session``, the frame must carry exactly that session binding; without,
    it must carry none. Anything else raises FrameError.
    """
    msg = unpackb(body)
    n = 4 if session is None else 5
    if not (isinstance(msg, list) and len(msg) == n):
        if isinstance(msg, list) and {len(msg), n} == {4, 5}:
            raise FrameError("bad message: a session-bound frame on an unbound channel" if session is None
                             else "bad message: a frame without a session binding on a session-bound channel")
        fields = "[tag, phase, stamp, payload]" if session is None else "[tag, phase, stamp, payload, session]"
        raise FrameError(f"bad message: expected {fields}, got {_brief(msg)}")
    tag, phase, stamp, payload = msg[:4]
    if session is not None and msg[4] != session:
        got = msg[4].hex() if isinstance(msg[4], bytes) else _brief(msg[4])
        raise FrameError(f"frame of another session (binding {got}, this session's is {session.hex()}): "
                         "replayed or misrouted")
    if not (
        isinstance(tag, list)
        and tag
        and all(isinstance(t, (str, int)) and not isinstance(t, bool) for t in tag)
    ):
        raise FrameError(f"bad message: tag must be a non-empty list of str/int, got {_brief(tag)}")
    if not isinstance(phase, str):
        raise FrameError(f"bad message: phase must be a str, got {_brief(phase)}")
    if type(stamp) is not int or stamp < 0:
        raise FrameError(f"bad message: stamp must be an int >= 0, got {_brief(stamp)}")
    if tag[0] == KEEPALIVE:
        wrong = [what for what, bad in (("a longer tag", len(tag) != 1), ("another phase", phase != "setup"),
                                        ("a stamp", stamp != 0), ("a payload", payload is not None)) if bad]
        if wrong:
            raise FrameError(f"bad keep-alive frame: expected [[{KEEPALIVE!r}], 'setup', 0, nil], got "
                             f"{', '.join(wrong)}")
    return tuple(tag), phase, stamp, payload


def encode_keepalive(session: bytes | None = None) -> bytes:
    """The body of a keep-alive frame: it shows that the sender is alive and carries nothing.

    Wire format: the envelope ``[["!alive"], "setup", 0, nil]`` (plus ``session``
    on a session-bound channel, as every frame); :func:`decode_message` refuses
    any other envelope with the tag kind ``"!alive"``. 27 bytes with a binding,
    17 without, plus the 4-byte length prefix.
    """
    return encode_message((KEEPALIVE,), "setup", 0, None, session)
