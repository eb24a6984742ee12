"""Tests of permllm.net.codec: round-trips, sizes, and strict rejection of malformed frames."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest
import torch

from permllm.net import FrameError, decode_message, encode_message, packb, unpackb

ALLOWED = ["bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
           "float16", "float32", "float64"]


def ext(code: int, fields: list) -> bytes:
    """A hand-made frame holding one ext of ``code`` whose payload is msgpack of ``fields``."""
    return msgpack.packb(msgpack.ExtType(code, msgpack.packb(fields, use_bin_type=True)), use_bin_type=True)


def roundtrip(x):
    return unpackb(packb(x))


@pytest.mark.parametrize("dtype", ALLOWED)
def test_roundtrip_every_allowed_dtype(dtype):
    rng = np.random.default_rng(0)
    a = (rng.integers(0, 100, size=(3, 4, 5)) % (2 if dtype == "bool" else 100)).astype(dtype)
    b = roundtrip(a)
    assert isinstance(b, np.ndarray) and b.dtype == np.dtype(dtype) and b.shape == a.shape
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("a", [np.array(3.5), np.zeros((0,)), np.zeros((4, 0, 2), np.int32), np.array(True)])
def test_zero_d_and_empty(a):
    b = roundtrip(a)
    assert b.shape == a.shape and b.dtype == a.dtype
    np.testing.assert_array_equal(a, b)


def test_non_contiguous_input():
    a = np.arange(60, dtype=np.int64).reshape(6, 10)
    for view in (a.T, a[::2, 1::3], a[:, ::-1]):
        assert not view.flags.c_contiguous
        b = roundtrip(view)
        np.testing.assert_array_equal(view, b)


def test_big_endian_input_is_sent_little_endian():
    a = np.arange(10, dtype=">f8") / 3
    data = packb(a)
    assert b"<f8" in data and b">f8" not in data
    b = unpackb(data)
    assert b.dtype.str == "<f8"
    np.testing.assert_array_equal(a, b)


def test_decoded_arrays_are_read_only_views():
    b = roundtrip(np.arange(5))
    assert not b.flags.writeable


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.int64])
def test_torch_tensor_roundtrip(dtype):
    t = (torch.arange(24) - 7).reshape(2, 3, 4).to(dtype)
    u = roundtrip(t)
    assert isinstance(u, torch.Tensor) and u.dtype == dtype and u.shape == t.shape
    assert torch.equal(t, u)
    u += 1  # decoded tensors are writable copies


def test_torch_tensor_requiring_grad_and_non_contiguous():
    t = torch.randn(4, 5, requires_grad=True)
    assert torch.equal(roundtrip(t), t.detach())
    assert torch.equal(roundtrip(t.detach().T), t.detach().T)


def test_nested_structures():
    obj = {
        "a": [1, 2.5, "x", b"raw", None, True, (np.arange(3), {"k": np.ones((2, 2), np.float32)})],
        7: (np.int64(5), np.float32(1.5), np.bool_(True)),
        "t": torch.tensor([1.0, 2.0]),
    }
    out = roundtrip(obj)
    assert out["a"][:6] == [1, 2.5, "x", b"raw", None, True]
    np.testing.assert_array_equal(out["a"][6][0], np.arange(3))
    np.testing.assert_array_equal(out["a"][6][1]["k"], np.ones((2, 2), np.float32))
    assert out[7] == [5, 1.5, True] and type(out[7][0]) is int and type(out[7][2]) is bool
    assert torch.equal(out["t"], torch.tensor([1.0, 2.0]))


def test_large_array_is_raw_bytes():
    a = np.random.default_rng(1).random(1_000_000)
    data = packb(a)
    assert 8_000_000 < len(data) < 8_000_000 + 64
    np.testing.assert_array_equal(unpackb(data), a)


@pytest.mark.parametrize("bad", [np.array([object(), 1], dtype=object), np.array(["ab", "c"]),
                                 np.zeros(3, np.complex128), {1, 2}, object()])
def test_encode_rejects_unsupported(bad):
    with pytest.raises(TypeError):
        packb(bad)


def test_encode_object_array_message():
    with pytest.raises(TypeError, match="object"):
        packb(np.array([None], dtype=object))


def test_random_garbage():
    rng = np.random.default_rng(2)
    raised = 0
    for _ in range(300):
        data = rng.integers(0, 256, size=int(rng.integers(1, 64)), dtype=np.uint8).tobytes()
        try:
            unpackb(data)
        except FrameError as e:
            assert str(e)
            raised += 1
    assert raised > 250  # a few random strings happen to be valid msgpack; none may raise anything else


@pytest.mark.parametrize("data", [b"\xc1", b"\xdc\xff\xff", b"\x81\x01", b"\xd9\x05ab", b"\xa2\xff\xfe"])
def test_invalid_msgpack(data):
    with pytest.raises(FrameError):
        unpackb(data)


def test_truncated_valid_frame():
    data = packb({"x": np.arange(100)})
    for cut in (1, 10, len(data) // 2, len(data) - 1):
        with pytest.raises(FrameError):
            unpackb(data[:cut])


def test_trailing_bytes():
    with pytest.raises(FrameError, match="trailing"):
        unpackb(packb([1, 2]) + b"\x00")


def test_unknown_ext_code():
    with pytest.raises(FrameError, match="unknown msgpack ext type 42"):
        unpackb(msgpack.packb(msgpack.ExtType(42, b"abc")))
    with pytest.raises(FrameError, match="-1"):
        unpackb(msgpack.packb([1, {"t": msgpack.Timestamp(5, 0)}]))


def test_ext_wrong_byte_count():
    with pytest.raises(FrameError, match="needs 24 bytes, got 16"):
        unpackb(ext(1, ["<f8", [3], b"\x00" * 16]))
    with pytest.raises(FrameError, match="needs"):
        unpackb(ext(2, ["<i4", [2, 2], b"\x00" * 17]))


@pytest.mark.parametrize("fields, match", [
    (["|O", [1], b"\x00" * 8], "not allowed"),
    (["<U1", [1], b"\x00" * 4], "not allowed"),
    ([">f8", [1], b"\x00" * 8], "big-endian"),
    (["<c16", [1], b"\x00" * 16], "not allowed"),
    (["<f8", [-1], b""], "non-negative"),
    (["<f8", [True], b"\x00" * 8], "non-negative"),
    (["<f8", "3", b"\x00" * 24], "shape"),
    ([8, [1], b"\x00" * 8], "dtype must be a str"),
    (["<f8", [1], "12345678"], "bin"),
    (["<f8", [1]], r"\[dtype, shape, raw\]"),
    ({"dtype": "<f8"}, r"\[dtype, shape, raw\]"),
])
def test_bad_ext_payload(fields, match):
    with pytest.raises(FrameError, match=match):
        unpackb(ext(1, fields))


def test_ext_payload_not_msgpack():
    with pytest.raises(FrameError, match="bad ndarray ext payload"):
        unpackb(msgpack.packb(msgpack.ExtType(1, b"\xc1\xc1")))


def test_message_roundtrip():
    body = encode_message(("linear", "L0.q", 3, "u"), "online", 7, {"x": np.arange(4)})
    tag, phase, stamp, payload = decode_message(body)
    assert tag == ("linear", "L0.q", 3, "u") and phase == "online" and stamp == 7
    np.testing.assert_array_equal(payload["x"], np.arange(4))


@pytest.mark.parametrize("obj, match", [
    ([["k"], "online", 1], "expected"),
    ({"tag": ["k"]}, "expected"),
    ([[], "online", 1, None], "tag"),
    (["k", "online", 1, None], "tag"),
    ([["k", 1.5], "online", 1, None], "tag"),
    ([["k", True], "online", 1, None], "tag"),
    ([["k"], 3, 1, None], "phase"),
    ([["k"], "online", -1, None], "stamp"),
    ([["k"], "online", "1", None], "stamp"),
])
def test_decode_message_rejects_bad_structure(obj, match):
    with pytest.raises(FrameError, match=match):
        decode_message(packb(obj))


def test_encode_message_rejects_bad_envelope():
    with pytest.raises(TypeError):
        encode_message((), "online", 1, None)
    with pytest.raises(TypeError):
        encode_message(("k", 1.0), "online", 1, None)
    with pytest.raises(ValueError):
        encode_message(("k",), "online", -1, None)
