"""Ring arithmetic mod 2^k against Python's exact integers."""
from __future__ import annotations

import numpy as np
import pytest

from permllm.protocols import ring

rng = np.random.default_rng(3)


def _uniform(shape: tuple[int, ...], bits: int) -> np.ndarray:
    hi = rng.integers(0, 2**32, size=shape, dtype=np.uint64) << np.uint64(32)
    return ring.mod((hi | rng.integers(0, 2**32, size=shape, dtype=np.uint64)).astype(ring.word(bits)), bits)


@pytest.mark.parametrize("bits", [13, 32, 48, 64])
def test_matmul_is_exact_mod_2k(bits):
    a, b = _uniform((3, 40), bits), _uniform((40, 5), bits)
    got = ring.matmul(a, b, bits)
    want = (a.astype(object) @ b.astype(object)) % (1 << bits)
    assert got.dtype == ring.word(bits)
    assert [int(v) for v in got.ravel()] == [int(v) for v in want.ravel()]


@pytest.mark.parametrize("bits", [20, 32, 64])
def test_encode_decode_and_shares(bits):
    x = rng.normal(size=(4, 6)) * 3
    scale = bits - 6
    v = ring.encode(x, scale, bits, "op")
    np.testing.assert_allclose(ring.decode(v, scale, bits, "op"), x, atol=2.0**-scale)
    # A sharing: v = (v − r) + r mod 2^k decodes the same.
    r = _uniform(x.shape, bits)
    total = ring.mod(ring.mod(v - r, bits) + r, bits)
    np.testing.assert_array_equal(ring.decode(total, scale, bits, "op"), ring.decode(v, scale, bits, "op"))


def test_out_of_range_values_are_refused_naming_the_op():
    with pytest.raises(ring.RingOverflow, match="L3.p.*does not fit"):
        ring.encode(np.array([40.0]), 26, 32, "L3.p")  # 40·2^26 > 2^31
    with pytest.raises(ring.RingOverflow, match="L3.p"):
        ring.encode(np.array([np.nan]), 0, 32, "L3.p")
    v = ring.encode(np.array([5.0, -3.0]), 10, 32, "op")
    with pytest.raises(ring.RingOverflow, match="embed.*left its encoding range"):
        ring.decode(v, 10, 32, "embed", range_bits=2)
    ring.decode(v, 10, 32, "embed", range_bits=3)


@pytest.mark.parametrize("bits", [8, 20, 32, 40, 64])
def test_pack_is_narrow_and_round_trips(bits):
    v = _uniform((7, 3), bits)
    b = ring.pack(v, bits)
    assert b.dtype == np.uint8 and b.shape == (7, 3, -(-bits // 8))
    np.testing.assert_array_equal(ring.unpack(b, bits, (7, 3), "m"), v)


def test_unpack_refuses_bad_frames():
    b = ring.pack(_uniform((4,), 20), 20)
    with pytest.raises(ValueError, match="expected a uint8 array of shape"):
        ring.unpack(b[:3], 20, (4,), "m")
    with pytest.raises(ValueError, match="expected a uint8 array"):
        ring.unpack(b.astype(np.int16), 20, (4,), "m")
    bad = b.copy()
    bad[0, 2] = 0xFF  # above 2^20
    with pytest.raises(ValueError, match="does not fit 20 bits"):
        ring.unpack(bad, 20, (4,), "m")
