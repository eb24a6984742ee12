"""Malformed frames: property-based tests of the decoder and the channel, and a fuzz run against live daemons.

* hypothesis: :func:`decode_message` and :func:`unpackb` raise only FrameError on any
  bytes and on near-valid structures; a channel fed a malformed frame fails with a
  FrameError (never another exception) and tells the peer why.
* live: more than 2,000 malformed frames (truncated, oversized, random bytes, unknown
  ext types, bad arrays, bad hellos, bad envelopes, unknown phases, frames of another
  session, duplicates, invalid setup messages) against a real model daemon and a real
  helper over mutual TLS, a few at a time; each is refused with a clear error, neither
  daemon crashes, and a session afterwards gives transformers' greedy tokens.
"""
from __future__ import annotations

import asyncio
import random
import re
import secrets
import struct

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import permllm
from permllm.net import (
    PROTOCOL_VERSION, Channel, FrameError, Meter, NetError, PeerAborted, PeerClosed, decode_message, encode_message,
    memory_pair, open_channel, packb, tcp_connect, unpackb,
)
from permllm.net.channel import ABORT, _binding
from permllm.net.tls import client_context
from permllm.protocols import Role, ShareConfig
from permllm.runtime.identity import share_terms

from .daemons import Proc, deployment_keys, tls_flags, user_settings
from .test_daemon import check_log
from .test_generation import _llama_dir, hf_greedy

# ---------------------------------------------------------------- hypothesis: the decoder

plain = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.floats() | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=5) | st.integers(-2**63, 2**63),
                                                                 inner, max_size=5),
    max_leaves=20)


def ext(code: int, body: bytes) -> bytes:
    """A raw msgpack ext (any code, negative ones included: msgpack.ExtType refuses those)."""
    head = b"\xc7" + struct.pack("!B", len(body)) if len(body) < 256 else b"\xc8" + struct.pack("!H", len(body))
    return head + struct.pack("!b", code) + body


def envelope_with(item: bytes) -> bytes:
    """``[["k", 1], "online", 1, <item>]`` with ``item`` already encoded."""
    return b"\x94" + msgpack.packb(["k", 1]) + msgpack.packb("online") + msgpack.packb(1) + item


@st.composite
def array_ext(draw) -> bytes:
    """An ndarray/torch ext whose header is drawn: sometimes valid, mostly not."""
    code = draw(st.sampled_from([1, 2, 1, 0, 3, 127, -1, -5]))
    dtype = draw(st.sampled_from(["<f8", "<f4", "|b1", "<i8", ">f8", "<c16", "|O", "V8", "<U4", "", 5]))
    shape = draw(st.one_of(st.lists(st.integers(-2, 5), max_size=4), st.integers(), st.text(max_size=3),
                           st.lists(st.integers(0, 1), min_size=33, max_size=40)))
    raw = draw(st.binary(max_size=64))
    fields = draw(st.sampled_from([[dtype, shape, raw], [dtype, shape], [dtype, shape, raw, 1], {"d": dtype}]))
    try:
        body = msgpack.packb(fields, use_bin_type=True)
    except (TypeError, ValueError, OverflowError):
        body = b"\xc1"
    if draw(st.booleans()):
        body = body[:draw(st.integers(0, len(body)))]
    return envelope_with(ext(code, body))


def _only_frame_errors(data: bytes, session: bytes | None = None) -> None:
    try:
        decode_message(data, session)
    except FrameError:
        pass
    try:
        unpackb(data)
    except FrameError:
        pass


@settings(max_examples=600, deadline=None)
@given(st.binary(max_size=300))
def test_decoder_random_bytes(data):
    _only_frame_errors(data)
    _only_frame_errors(data, b"12345678")


@settings(max_examples=300, deadline=None)
@given(array_ext())
def test_decoder_array_headers(data):
    _only_frame_errors(data)


@settings(max_examples=300, deadline=None)
@given(plain, st.sampled_from([None, b"12345678"]), st.integers(0, 40))
def test_decoder_structures_and_truncations(obj, session, cut):
    """Arbitrary msgpack structures as envelopes, whole and truncated: only FrameError."""
    data = msgpack.packb(obj, use_bin_type=True)
    _only_frame_errors(data, session)
    _only_frame_errors(data[:max(0, len(data) - cut)], session)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 4), max_size=3), st.sampled_from(["<f8", "<f4", "<i8", "|b1", "|u1"]),
       st.text(max_size=8), st.integers(0, 2**40))
def test_decoder_round_trip_and_session_binding(shape, dtype, kind, stamp):
    a = np.arange(int(np.prod(shape)), dtype=np.float64).astype(dtype).reshape(shape)
    tag = (kind or "k", 3)
    mine, other = _binding("a" * 32), _binding("b" * 32)
    body = encode_message(tag, "offline", stamp, {"x": a}, mine)
    t, phase, s, payload = decode_message(body, mine)
    assert (t, phase, s) == (tag, "offline", stamp) and payload["x"].dtype == a.dtype
    np.testing.assert_array_equal(payload["x"], a)
    with pytest.raises(FrameError, match="frame of another session .*replayed or misrouted"):
        decode_message(body, other)
    with pytest.raises(FrameError, match="session-bound frame on an unbound channel"):
        decode_message(body)
    with pytest.raises(FrameError, match="without a session binding on a session-bound channel"):
        decode_message(encode_message(tag, "offline", stamp, 1), mine)


# ---------------------------------------------------------------- hypothesis: a channel fed bad frames


async def _channel_fed(frames: list[bytes]) -> tuple[BaseException | None, list]:
    """A session-bound channel whose peer sends ``frames`` raw; returns its error and what the peer got back."""
    ta, tb = memory_pair("user", "model")
    ch, _ = await asyncio.gather(
        open_channel(ta, Meter(), role="user", peer_role="model", session="s" * 32, bind=True, max_unread=4096),
        _raw_hello(tb))
    for f in frames:
        await tb.send(f)
    err = await asyncio.wait_for(ch.wait_failed(), 5) if frames else None
    back = []
    while True:
        try:
            back.append(decode_message(await asyncio.wait_for(tb.recv(), 5), _binding("s" * 32)))
        except (PeerClosed, FrameError):
            break
    await ch.close()
    return err, back


async def _raw_hello(t) -> None:
    await t.recv()
    await t.send(packb({"permllm": PROTOCOL_VERSION, "role": "model", "session": "s" * 32, "bind": True}))


@st.composite
def bad_envelopes(draw) -> bytes:
    good = _binding("s" * 32)
    tag = draw(st.sampled_from([["k", 1], [], [True], [1.5], [b"x"], [["k"]], "k", None, [ABORT]]))
    phase = draw(st.sampled_from(["online", "setup", "bogus", 3, None]))
    stamp = draw(st.sampled_from([1, -1, 2.5, "1", None]))
    binding = draw(st.sampled_from([good, _binding("t" * 32), b"", "s", None]))
    payload = draw(plain)
    env = draw(st.sampled_from([[tag, phase, stamp, payload, binding], [tag, phase, stamp, payload],
                                [tag, phase, stamp], {"tag": tag}]))
    data = msgpack.packb(env, use_bin_type=True)
    try:
        decode_message(data, good)
        if tuple(env[0]) != (ABORT,):
            return data + b"\x00"  # a valid one: make it malformed (trailing byte)
    except FrameError:
        pass
    return data


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(bad_envelopes())
def test_channel_refuses_bad_envelopes_and_says_why(frame):
    err, back = asyncio.run(_channel_fed([frame]))
    assert isinstance(err, (FrameError, PeerAborted)), repr(err)  # an abort frame with odd payload is PeerAborted
    if isinstance(err, FrameError):
        assert back and back[-1][0] == (ABORT,) and "malformed frame from peer 'model'" in back[-1][3]


def test_channel_bounds_unread_messages_and_refuses_duplicates():
    b = _binding("s" * 32)
    err, back = asyncio.run(_channel_fed([encode_message(("k", i), "online", 1, b"x" * 1000, b) for i in range(5)]))
    assert isinstance(err, FrameError) and "has not asked for yet (limit 4096)" in str(err)
    err, _ = asyncio.run(_channel_fed([encode_message(("k", 1), "online", 1, 1, b)] * 2))
    assert isinstance(err, FrameError) and "duplicate message for tag ('k', 1)" in str(err)


# ---------------------------------------------------------------- live daemons

TERMS = share_terms(ShareConfig())  # what an honest user states


class Fuzzer:
    """Makes malformed frames and sends each on a fresh mutual-TLS connection; records what came back."""

    def __init__(self, keys, model: str, helper: str, seed: int = 1) -> None:
        self.rng = random.Random(seed)
        self.ctx = client_context(keys["ca"], keys["user.cert"], keys["user.key"])
        self.model, self.helper = model, helper
        self.sent = 0
        self.outcomes: dict[str, int] = {}
        self.fingerprint = ""  # the model's, learnt from the model daemon's answer

    async def _open(self, addr: str):
        host, port = addr.rsplit(":", 1)
        return await tcp_connect(host, int(port), ssl=self.ctx, peer="daemon", timeout=10)

    def _hello(self, sid: str, terms: dict | None = None) -> dict:
        return {"permllm": PROTOCOL_VERSION, "role": "user", "session": sid, "bind": True,
                "terms": terms or dict(TERMS)}

    # -- the frames ----------------------------------------------------------------------
    def junk(self) -> object:
        r = self.rng
        pick = r.randrange(6)
        if pick == 0:
            return r.randbytes(r.randrange(0, 40))
        if pick == 1:
            return [r.random(), r.randrange(-5, 5), "x" * r.randrange(5), None]
        if pick == 2:
            return {r.choice(["role", "session", 7, "permllm"]): r.choice([None, 1, "user", [1]])}
        if pick == 3:
            return np.zeros((r.randrange(3), r.randrange(3)), dtype=r.choice([np.float32, np.int8, np.float64]))
        if pick == 4:
            return r.choice([True, 1.5, "context", b"\x00" * 8])
        return [[r.randbytes(3)], {"a": [1, {"b": None}]}]

    def raw_frame(self) -> tuple[str, bytes]:
        """(kind, bytes on the wire with their length prefix) of a transport- or decoder-level bad frame."""
        r = self.rng
        body = r.choice([
            lambda: r.randbytes(r.randrange(1, 200)),
            lambda: b"\xc1" + r.randbytes(r.randrange(0, 10)),
            lambda: envelope_with(ext(r.choice([0, 3, 9, 99, 127, -7, -128]), r.randbytes(8))),
            lambda: msgpack.packb([["k"], "online", 1, msgpack.Timestamp(5, 0)]),
            lambda: msgpack.packb(msgpack.ExtType(1, msgpack.packb(["<c16", [2], b"x" * 32]))),
            lambda: msgpack.packb(msgpack.ExtType(1, msgpack.packb(["<f8", [3], b"x" * 7]))),
            lambda: msgpack.packb(msgpack.ExtType(1, msgpack.packb([">f8", [1], b"x" * 8]))),
            lambda: msgpack.packb(msgpack.ExtType(2, msgpack.packb(["<f8", [-1], b""]))),
            lambda: b"\xdd\xff\xff\xff\xff",  # an array header claiming 4 billion items
        ])()
        kind = r.choice(["body"] * 6 + ["truncated", "oversized"])
        if kind == "truncated":
            return kind, struct.pack("!I", len(body) + r.randrange(1, 100)) + body
        if kind == "oversized":
            return kind, struct.pack("!I", r.choice([2**31, 2**32 - 1, 64 * 1024 * 1024 + 1])) + body
        return kind, struct.pack("!I", len(body)) + body

    def bad_hello(self) -> tuple[str, bytes]:
        r = self.rng
        h: dict = self._hello(secrets.token_hex(16))
        field = r.choice(["permllm", "role", "session", "terms", "bind", "error", "extra", "drop"])
        if field == "drop":
            del h[r.choice(list(h))]
        elif field == "terms":
            h["terms"] = r.choice([[1, 2], {"dtype": "float32"}, {"ratio": 2.0}, {3: 4}, "x", {"model": "0" * 32},
                                   {**h["terms"], "route": "12" if h["terms"].get("route") == "8" else "8"}, {}])
        elif field == "session":
            h["session"] = r.choice(["", "probe", "x" * 200, "ABCD" * 8, 12, None, "a" * 31])
        elif field == "role":
            h["role"] = r.choice(["helper", "model", "", "USER", 5, None, "u" * 1000])
        elif field == "permllm":
            h["permllm"] = r.choice([0, 1, 3, -1, "2", None, 2.0000001])
        elif field == "bind":
            h["bind"] = r.choice([False, None, 0])
        elif field == "error":
            h["error"] = "a client that refuses"
        else:
            h = self.junk() if r.random() < 0.5 else [h]
        body = packb(h)
        return "hello:" + field, struct.pack("!I", len(body)) + body

    def bad_message(self, sid: str, content: bool = True) -> tuple[str, bytes]:
        """A frame after a good hello: bad envelope, unknown phase, another session's, a duplicate, and with
        ``content`` a well-formed generation request the model party refuses."""
        r = self.rng
        b = _binding(sid)
        kind = r.choice(["unbound", "replay", "phase", "tag", "stamp", "abort", "dup", "raw"] + ["req"] * content)
        if kind == "raw":
            return self.raw_frame()
        if kind == "unbound":
            body = encode_message(("ctl", 0, "req"), "setup", 1, self.junk())
        elif kind == "replay":  # a frame of another session, as recorded
            body = encode_message(("ctl", 0, "req"), "setup", 1, {"base": 0, "prompt_len": 3, "max_new": 2},
                                  _binding(secrets.token_hex(16)))
        elif kind == "phase":
            body = packb([["k", 1], r.choice(["bogus", "", "ONLINE"]), 1, 0, b])
        elif kind == "tag":
            body = packb([r.choice([[], [True], [1.5], [[1]], "k", None]), "online", 1, 0, b])
        elif kind == "stamp":
            body = packb([["k", 1], "online", r.choice([-1, 1.5, "1", None]), 0, b])
        elif kind == "abort":
            body = packb([[ABORT], "setup", 0, self.junk(), b])
        elif kind == "dup":
            one = encode_message(("zz", 1), "online", 1, 0, b)
            return kind, (struct.pack("!I", len(one)) + one) * 2
        else:  # a well-formed message with content the model party refuses: a bad generation request
            body = encode_message(("ctl", 0, "req"), "setup", 1, r.choice([
                self.junk(), {"base": 0, "prompt_len": 10 ** 9, "max_new": 1}, {"base": "0"},
                {"base": 5, "prompt_len": 3, "max_new": 2}, {"base": 0, "prompt_len": 3, "max_new": 2, "ahead": -1}]),
                b)
        return kind, struct.pack("!I", len(body)) + body

    # -- sending -------------------------------------------------------------------------
    async def _drain(self, t) -> list:
        """Frames the daemon sends until it closes the connection."""
        got = []
        while True:
            try:
                got.append(await asyncio.wait_for(t.recv(), 20))
            except (PeerClosed, NetError):
                return got

    async def before_hello(self, addr: str) -> str:
        kind, wire = self.raw_frame() if self.rng.random() < 0.4 else self.bad_hello()
        t = await self._open(addr)
        try:
            t._writer.write(wire)
            got = [] if kind == "truncated" else await self._drain(t)  # truncated: we hang up mid-frame
        finally:
            await t.close()
        self.sent += 1
        if got:  # the daemon answered the hello: with an error, or it accepted a hello that is fine after all
            answer = unpackb(got[0])
            return f"{kind}: {'refused' if 'error' in answer else 'accepted'}"
        return f"{kind}: closed"

    async def after_hello(self, addr: str, role_of_daemon: str) -> str:
        sid = secrets.token_hex(16)
        t = await self._open(addr)
        try:
            terms = {**TERMS, "model": self.fingerprint}
            await t.send(packb(self._hello(sid, terms if role_of_daemon == "helper" else None)))
            answer = unpackb(await asyncio.wait_for(t.recv(), 20))
            assert "error" not in answer, answer
            if role_of_daemon == "model":
                self.fingerprint = answer["terms"]["model"]
            kind, wire = self.bad_message(sid, content=role_of_daemon == "model")
            t._writer.write(wire)
            got = [] if kind == "truncated" else await self._drain(t)
        finally:
            await t.close()
        self.sent += 1 if kind != "dup" else 2
        reasons = []
        for f in got:
            with_tag = None
            try:
                with_tag = decode_message(f, _binding(sid))
            except FrameError:
                pass
            if with_tag and with_tag[0] == (ABORT,):
                reasons.append(with_tag[3])
        if reasons:
            assert re.search(r"malformed frame|frame of another session|duplicate message|unknown phase|"
                             r"ProtocolError: (malformed )?generation request|no permllm role|dropped session", reasons[-1]), reasons
            return f"{role_of_daemon} {kind}: told why"
        return f"{role_of_daemon} {kind}: closed"

    async def seed_content(self) -> str:
        """A full pairing (user → model, user → helper), then a bad seed to the helper: the helper refuses it."""
        sid = secrets.token_hex(16)
        tm, th = await self._open(self.model), await self._open(self.helper)
        try:
            await tm.send(packb(self._hello(sid)))
            model_answer = unpackb(await asyncio.wait_for(tm.recv(), 20))
            h = self._hello(sid, {**TERMS, "model": model_answer["terms"]["model"]})
            await th.send(packb(h))
            assert "error" not in unpackb(await asyncio.wait_for(th.recv(), 20))
            seed = self.junk()
            while isinstance(seed, bytes) and len(seed) == 32:  # that would be a valid seed
                seed = self.junk()
            await th.send(encode_message(("seed", "uh"), "setup", 1, seed, _binding(sid)))
            got = await self._drain(th)
            await self._drain(tm)
        finally:
            await tm.close()
            await th.close()
        self.sent += 1
        abort = [decode_message(f, _binding(sid)) for f in got[-1:]]
        assert abort and abort[0][0] == (ABORT,) and "ProtocolError: seed uh must be 32 bytes" in abort[0][3], abort
        return "helper seed: told why"

    async def run(self, n: int, job) -> None:
        sem = asyncio.Semaphore(6)

        async def one() -> None:
            async with sem:
                outcome = await job()
                self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1

        await asyncio.gather(*(one() for _ in range(n)))


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    keys = deployment_keys(root / "keys")
    llama, hf = _llama_dir(root)
    common = ["--max-sessions", "64", "--message-timeout", "20", "--max-frame", str(64 * 1024 * 1024)]
    helper = Proc(["serve", "helper", "--listen", "127.0.0.1:0", "--pairing-timeout", "3", *common,
                   *tls_flags(keys, "helper")], root / "helper.log")
    model = Proc(["serve", "model", "--listen", "127.0.0.1:0", "--helper", helper.addr, "--model", str(llama),
                  *common, *tls_flags(keys, "model")], root / "model.log")
    yield keys, hf, model, helper
    assert (model.terminate(), helper.terminate()) == (0, 0)


async def test_live_daemons_survive_malformed_frames(live):
    keys, hf, model, helper = live
    fz = Fuzzer(keys, model.addr, helper.addr)
    await fz.run(700, lambda: fz.before_hello(model.addr))
    await fz.run(300, lambda: fz.before_hello(helper.addr))
    await fz.run(800, lambda: fz.after_hello(model.addr, "model"))
    await fz.run(200, lambda: fz.after_hello(helper.addr, "helper"))
    await fz.run(40, fz.seed_content)
    print(f"\nmalformed frames sent: {fz.sent}")
    for k in sorted(fz.outcomes):
        print(f"  {fz.outcomes[k]:5d}  {k}")
    assert fz.sent >= 2000
    assert not any(k.endswith("accepted") for k in fz.outcomes), fz.outcomes
    assert model.alive() and helper.alive()
    # Every session the fuzz opened has ended and its state is freed; a real session is exact.
    await asyncio.sleep(2.5)
    async with await permllm.connect(model=None, settings=user_settings(keys, model.addr, helper.addr)) as s:
        prompt = [5, 17, 42, 99]
        assert [t async for t in s.generate_ids(prompt, 10)] == hf_greedy(hf, prompt, 10)
    model.wait_log(r"finished after [\d.]+ s \(0 active\)")
    helper.wait_log(r"finished after [\d.]+ s \(0 active\)")
    log = model.text() + helper.text()
    check_log(log, [prompt])
    refusals = len(re.findall(r"refused a connection|rejected a connection|: ended: |: dropped: ", log))
    assert refusals >= 2000, refusals


async def test_live_invalid_op_messages_end_only_their_session(live, monkeypatch):
    """A user whose offline or online message has the wrong dtype, shape or type: the model party ends that
    session naming the message, while another user's session gives exact tokens."""
    keys, hf, model, helper = live
    settings_ = user_settings(keys, model.addr, helper.addr)
    prompt = [3, 1, 4, 1, 5]
    corruptions = {
        "dtype": lambda a: a.astype(np.float32),
        "shape": lambda a: a.reshape(-1)[:-1],
        "type": lambda a: a.tolist(),
        "nan": lambda a: np.full_like(a, np.nan),
    }

    targets: dict[int, str] = {}  # id of a corrupting user's channel to the model party → corruption
    send = Channel.send

    def bad_send(self, tag, payload, *, phase="online"):
        name = targets.get(id(self))
        if name and isinstance(payload, np.ndarray) and tag[0] in ("linear", "reshare", "unperm", "smm"):
            del targets[id(self)]  # the first such message only
            payload = corruptions[name](payload)
        send(self, tag, payload, phase=phase)

    monkeypatch.setattr(Channel, "send", bad_send)

    async def corrupted(name: str) -> str:
        s = await permllm.connect(model=None, settings=settings_)
        targets[id(s._user.p.channels[Role.MODEL])] = name
        try:
            got = [t async for t in s.generate_ids(prompt, 6)]
        except Exception as e:
            return f"{type(e).__name__}: {e}"
        finally:
            await s.close()
        return f"completed {got}"

    async def honest() -> list[int]:
        async with await permllm.connect(model=None, settings=settings_) as s:
            return [t async for t in s.generate_ids(prompt, 12)]

    results = await asyncio.gather(honest(), *(corrupted(n) for n in corruptions))
    assert results[0] == hf_greedy(hf, prompt, 12)
    for name, r in zip(corruptions, results[1:]):
        if name == "nan":  # well-formed: no party can tell; the user only hurts its own output
            # (on real numbers NaN logits or some tokens; on the ring the words NaN casts to leave their range)
            assert r.startswith(("completed", "ValueError: logits contain NaN", "RingOverflow: ")), r
            continue
        assert re.search(r"PeerAborted: peer 'model' ended the session: the model party ended session [0-9a-f]{32}: "
                         r"ProtocolError: message \('\w+', '[^']+', \d+, '\w+'\) from user: expected", r), (name, r)
    check_log(model.text() + helper.text(), [prompt])
