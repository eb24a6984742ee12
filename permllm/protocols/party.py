"""The per-party context every protocol op runs in.

A :class:`Party` is one of the three roles (model M, user U, helper H) with its
channels to the other two, its seeds, the share configuration, and the state ops
keep between phases: masked weights from the setup phase (``weights``),
correlations from the offline phase (``store``) and growing attention caches
(``caches``).

Ops are written once with a branch per role; the current ``phase`` ("setup",
"offline" or "online") and ``token`` index select which branch runs and key every
message tag and PRG stream, so many ops can be in flight at once.
"""
from __future__ import annotations

import asyncio
import contextlib
import copy
import math
import secrets
import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, AsyncIterator, Callable, Iterable, Mapping, TypeVar

import numpy as np

from ..net import Channel, Meter
from .config import RING_BITS, ShareConfig
from . import crt, ring
from .prg import stream, uniform_mask
from .transcript import Transcript

__all__ = ["Role", "Party", "ProtocolError", "OpRecord"]

T = TypeVar("T")

# Work above this many multiply-adds runs in a worker thread so the event loop keeps
# serving messages of other ops (numpy releases the GIL in BLAS calls).
THREAD_WORK = 1 << 20
PLAN_KEY = ("mask-plan", -1)  # store entry of the open mask plan (light-mode U)
PLAN_MAX = 1024               # elements of the largest mask a plan keeps
RESIDUE_BYTES = 3             # bytes of a residue mod one of crt.PRIMES on the wire (primes below 2^24)
assert all(q < 1 << 8 * RESIDUE_BYTES for q in crt.PRIMES)


class Role(str, Enum):
    """The three parties of PermLLM."""

    MODEL = "model"
    USER = "user"
    HELPER = "helper"


class ProtocolError(RuntimeError):
    """A message that does not fit the op awaiting it (shape, dtype, missing state)."""


class Party:
    """Context of one party: role, channels, seeds, phase, and state kept across phases."""

    __slots__ = ("role", "channels", "config", "meter", "phase", "token", "store", "weights", "caches", "_seeds",
                 "trace", "op", "transcript", "ring", "modq")

    def __init__(self, role: Role, channels: Mapping[Role, Channel], config: ShareConfig, meter: Meter) -> None:
        self.role = Role(role)
        self.channels = dict(channels)
        self.config = config
        self.meter = meter
        self.phase = "setup"
        self.token = 0
        self.store: dict[tuple, Any] = {}
        self.weights: dict[str, Any] = {}
        self.caches: dict[str, Any] = {}
        self._seeds: dict[str, bytes] = {}
        self.trace: list[OpRecord] | None = None  # profiling: finished op records (shared by views)
        self.op: OpRecord | None = None  # profiling: the op this view is running
        self.transcript: Transcript | None = None  # audits: every array received (protocols/transcript.py)
        # Shares on Z_2^64 (else real numbers): config.arith "ring", or "auto" resolved so by the session setup.
        self.ring = config.arith == "ring"
        self.modq = 0  # a residue view of a wide value (protocols/crt.py): real-number code on integers mod q

    def view(self, phase: str, token: int) -> "Party":
        """The same party (shared channels, seeds and state) in another phase/token.

        Graphs of different tokens or phases run concurrently on separate views, e.g.
        the offline phase of token t+1 while token t is online.
        """
        v = copy.copy(self)
        v.phase, v.token = phase, token
        return v

    def residue(self, q: int) -> "Party":
        """This party computing mod the prime ``q`` (one residue of a wide value, :mod:`permllm.protocols.crt`):
        shares are float64 integers, masks uniform on [0, q), every array it sends reduced mod q. The ops
        run their real-number branches; their products are exact mod q (``crt.matmul``)."""
        v = copy.copy(self)
        v.ring, v.modq = False, int(q)
        return v

    # -- identities -------------------------------------------------------------------
    @property
    def is_model(self) -> bool:
        return self.role is Role.MODEL

    @property
    def is_user(self) -> bool:
        return self.role is Role.USER

    @property
    def is_helper(self) -> bool:
        return self.role is Role.HELPER

    @property
    def dtype(self) -> np.dtype:
        """The dtype of a share: uint64 words on the ring, else the float dtype."""
        return np.dtype(np.uint64) if self.ring else self.config.np_dtype

    @property
    def ratio(self) -> float:
        return self.config.ratio

    # -- seeds ------------------------------------------------------------------------
    async def establish_seeds(self) -> None:
        """Setup: M draws s_MH and U draws s_UH, each sending it to H only.

        M never learns s_UH and U never learns s_MH; H learns both (it is the dealer) and
        draws s_H, a seed of its own that it never sends.
        """
        if self.is_model:
            self._seeds["mh"] = secrets.token_bytes(32)
            self.channels[Role.HELPER].send(("seed", "mh"), self._seeds["mh"], phase="setup")
        elif self.is_user:
            self._seeds["uh"] = secrets.token_bytes(32)
            self.channels[Role.HELPER].send(("seed", "uh"), self._seeds["uh"], phase="setup")
        else:
            mh = await self.channels[Role.MODEL].recv(("seed", "mh"))
            uh = await self.channels[Role.USER].recv(("seed", "uh"))
            for which, s in (("mh", mh), ("uh", uh)):
                if not isinstance(s, bytes) or len(s) != 32:
                    raise ProtocolError(f"seed {which} must be 32 bytes")
                self._seeds[which] = s
            # s_H: the helper's own seed, never sent (masks only H knows, e.g. r_w of the 8-hop attention).
            self._seeds["h"] = secrets.token_bytes(32)

    def gen(self, which: str, name: str, *purpose: str | int) -> np.random.Generator:
        """PRG stream keyed by (seed, op name, current token, purpose)."""
        try:
            seed = self._seeds[which]
        except KeyError:
            raise ProtocolError(f"the {self.role.value} party does not hold seed s_{which.upper()}") from None
        return stream(seed, name, self.token, *purpose)

    def mask(self, which: str, name: str, purpose: str, shape: tuple[int, ...],
             width: float | np.ndarray) -> np.ndarray:
        """A uniform mask of the given width (a scalar, or per last-axis column) from the
        (which, name, token, purpose) stream; on the ring, uniform on Z_2^64 whatever the width."""
        if self.ring:
            return self.gen(which, name, purpose).ring(tuple(shape), RING_BITS)
        if self.modq:
            return self.gen(which, name, purpose).integers(0, self.modq, size=tuple(shape)).astype(np.float64)
        return uniform_mask(self.gen(which, name, purpose), tuple(shape), width, self.dtype)

    # -- masks a light-mode user draws twice ---------------------------------------------
    # The light client keeps no correlations between its offline and online phases: it
    # draws its s_UH masks again online. For the steps of a *mask plan* (the decode steps
    # of the current offline batch: one row each) it records the small ones (at most
    # PLAN_MAX elements: their cost is the stream's set-up, not their size) offline and
    # draws them once the batch's HE exchange is over (the session closes the batch inside
    # the plan), so they never share memory with its ciphertexts; its online steps look
    # them up and draw only the large ones.
    @contextlib.asynccontextmanager
    async def mask_plan(self, tokens: Iterable[int]) -> AsyncIterator[None]:
        """A light-mode U records the masks the offline steps of ``tokens`` (run inside) ask for with
        :meth:`plan_mask`, and draws them when the block ends without error. A no-op elsewhere."""
        if not (self.is_user and self.config.offline == "he"):
            yield
            return
        plan: list[tuple] = []
        self.store[PLAN_KEY] = (frozenset(tokens), plan)
        try:
            yield
        finally:
            self.store.pop(PLAN_KEY, None)
        token = None
        for t, which, name, purpose, shape, mag in plan:
            if t != token:  # one token's masks at a time: online steps of earlier tokens go on meanwhile
                await asyncio.sleep(0)
                token, view = t, self.view(self.phase, t)
            self.store[(f"{name}#{purpose}", t)] = view.mask(which, name, purpose, shape, self.ratio * mag)

    def plan_mask(self, which: str, name: str, purpose: str, shape: tuple[int, ...],
                  mag: float | np.ndarray) -> None:
        """Offline: note a mask of width R·``mag`` that :meth:`mask_again` will ask for online, if a
        plan covers this token and the mask is small (``mag`` is kept by reference: a public bound)."""
        plan = self.store.get(PLAN_KEY)
        if plan is not None and self.token in plan[0] and math.prod(shape) <= PLAN_MAX:
            plan[1].append((self.token, which, name, purpose, tuple(shape), mag))

    def mask_again(self, which: str, name: str, purpose: str, shape: tuple[int, ...],
                   width: float | np.ndarray) -> np.ndarray:
        """Online: the mask :meth:`mask` gave offline — drawn ahead by the plan, else drawn now."""
        got = self.store.pop((f"{name}#{purpose}", self.token), None)
        if got is None:
            return self.mask(which, name, purpose, shape, width)
        if got.shape != tuple(shape):
            raise ProtocolError(f"{self.role.value}: planned mask {name!r}/{purpose} has shape {got.shape}, "
                                f"the op asks for {tuple(shape)}")
        return got

    def forget(self, tokens: range) -> None:
        """Drop what the offline phase kept for ``tokens`` (a generation that stopped early)."""
        for key in [k for k in self.store if len(k) == 2 and type(k[1]) is int and k[1] in tokens]:
            del self.store[key]

    def discard_unread(self, tokens: range) -> int:
        """Drop the received op messages of ``tokens`` that no op will ask for (a generation that
        stopped early; call it once the peers have said they sent nothing more for them)."""
        def unwanted(tag: tuple) -> bool:  # op tags are (kind, op name, token, part): Party.tag
            return len(tag) == 4 and tag[0] != "ctl" and type(tag[2]) is int and tag[2] in tokens
        return sum(ch.discard(unwanted) for ch in self.channels.values())

    # -- messages ---------------------------------------------------------------------
    def tag(self, kind: str, name: str, part: str) -> tuple:
        return (kind, name, self.token, part)

    def send(self, to: Role, tag: tuple, payload: Any) -> None:
        """Send in the current phase (counted under that phase); a residue view sends its arrays mod q."""
        if self.modq:
            payload = _reduced(payload, self.modq)
        self.channels[to].send(tag, payload, phase=self.phase)
        if self.op is not None:
            n = payload_bytes(payload)
            self.op.msgs_sent += 1
            self.op.bytes_sent += n
            lane = tag[1].rpartition("#")[2] if len(tag) == 4 and isinstance(tag[1], str) and "#q" in tag[1] else ""
            key = f"{tag[0]}.{tag[-1]}" + (f"#{lane}" if lane else "")
            self.op.by_message[key] = self.op.by_message.get(key, 0) + n

    async def recv(self, frm: Role, tag: tuple, *, modulus: int | None = None, revealed: bool = False) -> Any:
        """The message ``tag`` from ``frm``. For the audit transcript: ``modulus`` is the m its elements are
        uniform on, [0, m), whatever the secrets (None for real-number values); ``revealed``: this party
        unmasks it by design (a permuted reveal), so it is not expected to look uniform."""
        op = self.op  # the op this message is for (a task outliving its op may run on)
        t0 = time.perf_counter()
        out = await self.channels[frm].recv(tag)
        if op is not None:
            op.wait_s += time.perf_counter() - t0
            op.msgs_recv += 1
            op.bytes_recv += payload_bytes(out)
        if self.modq:
            out = _widened(out, self.modq)
        if self.transcript is not None:  # a residue view records the values mod q its bytes carry
            self.transcript.record(frm.value, tag, _as_residues(out) if self.modq else out, modulus, revealed)
        return out

    @contextlib.asynccontextmanager
    async def traced(self, name: str) -> AsyncIterator[None]:
        """Record one op (wall and waiting time, messages, bytes, hops) when profiling is on."""
        if self.trace is None:
            yield
            return
        rec = OpRecord(name, self.role.value, self.phase, self.token, hops0=self.meter.hops(self.phase))
        self.op = rec
        t0 = time.perf_counter()
        try:
            yield
        finally:
            rec.wall_s = time.perf_counter() - t0
            rec.hops = self.meter.hops(self.phase) - rec.hops0
            self.op = None
            self.trace.append(rec)

    async def recv_array(self, frm: Role, tag: tuple, shape: tuple[int, ...] | None = None) -> np.ndarray:
        """Receive an ndarray of this session's dtype (and shape, when given), else ProtocolError. On the ring
        every such array is a masked share, uniform on Z_2^64 whatever the secrets (the transcript says so)."""
        a = await self.recv(frm, tag, modulus=2**64 if self.ring else self.modq or None)
        check_array(a, self.dtype, shape, f"message {tag} from {frm.value}")
        return a

    async def compute(self, fn: Callable[..., T], *args: Any, work: int = 0) -> T:
        """Run ``fn(*args)``; in a worker thread when ``work`` (multiply-adds) is large."""
        if work >= THREAD_WORK:
            return await asyncio.to_thread(fn, *args)
        return fn(*args)

    # -- offline state ----------------------------------------------------------------
    def keep(self, name: str, value: Any) -> None:
        """Keep an offline product for the online phase of the same op and token."""
        self.store[(name, self.token)] = value

    def peek(self, name: str) -> Any:
        """What :meth:`keep` kept for this op and token, left in place (a second use of the same value)."""
        try:
            return self.store[(name, self.token)]
        except KeyError:
            raise ProtocolError(f"{self.role.value}: nothing kept for op {name!r} token {self.token}") from None

    def take(self, name: str) -> Any:
        """Take what the offline phase kept for this op and token (exactly once)."""
        try:
            return self.store.pop((name, self.token))
        except KeyError:
            raise ProtocolError(
                f"{self.role.value}: no offline correlation for op {name!r} token {self.token}; "
                "run the offline phase for this token first") from None


@dataclass(slots=True)
class OpRecord:
    """What one op cost one party in one phase and token (the profiler's raw data)."""

    name: str
    party: str
    phase: str
    token: int
    wall_s: float = 0.0
    wait_s: float = 0.0       # awaiting the peers' messages (transfer + their compute)
    msgs_sent: int = 0
    msgs_recv: int = 0
    bytes_sent: int = 0
    bytes_recv: int = 0
    hops: int = 0             # dependent hops this op added to this party's clock
    hops0: int = 0
    by_message: dict[str, int] = field(default_factory=dict)  # bytes sent per message: "kind.part" (+ a lane's "#q…")

    @property
    def compute_s(self) -> float:
        return max(self.wall_s - self.wait_s, 0.0)


def _reduced(payload: Any, q: int) -> Any:
    """A message's float arrays mod q in RESIDUE_BYTES little-endian bytes each (what a residue view sends: uniform on
    [0, q) under its masks; :func:`ring.pack`), 3 bytes an element instead of 8."""
    if isinstance(payload, np.ndarray) and payload.dtype.kind == "f":
        return ring.pack(crt.reduce(payload, q).astype(np.uint32), 8 * RESIDUE_BYTES)
    if isinstance(payload, list):
        return [_reduced(x, q) for x in payload]
    return payload


def _widened(payload: Any, q: int) -> Any:
    """A residue view's received arrays (:func:`_reduced`) as float64 integers (what its ops compute on); a
    message of another width, or a value at or above q, is refused."""
    if isinstance(payload, np.ndarray) and payload.dtype == np.uint8:
        try:
            v = ring.unpack(payload, 8 * RESIDUE_BYTES, payload.shape[:-1],
                            f"a residue message mod {q} ({RESIDUE_BYTES} bytes an element)")
        except ValueError as e:
            raise ProtocolError(str(e)) from None
        if v.size and int(v.max()) >= q:
            raise ProtocolError(f"a residue mod {q} out of range in a message")
        return v.astype(np.float64)
    if isinstance(payload, list):
        return [_widened(x, q) for x in payload]
    return payload


def _as_residues(payload: Any) -> Any:
    """Widened residues (float64 integers below q) as int64, for the transcript."""
    if isinstance(payload, np.ndarray) and payload.dtype.kind == "f":
        return payload.astype(np.int64)
    if isinstance(payload, list):
        return [_as_residues(x) for x in payload]
    return payload


def payload_bytes(x: Any) -> int:
    """Approximate wire size of a payload (exact for its arrays and bytes)."""
    if isinstance(x, np.ndarray):
        return x.nbytes
    if isinstance(x, (bytes, bytearray)):
        return len(x)
    if isinstance(x, (list, tuple)):
        return sum(payload_bytes(y) for y in x)
    if isinstance(x, dict):
        return sum(payload_bytes(y) for y in x.values())
    return 8


def check_array(a: Any, dtype: np.dtype | None, shape: tuple[int, ...] | None, what: str) -> None:
    """Validate a received array's type, dtype and shape."""
    if not isinstance(a, np.ndarray):
        raise ProtocolError(f"{what}: expected an ndarray, got {type(a).__name__}")
    if dtype is not None and a.dtype != dtype:
        raise ProtocolError(f"{what}: expected dtype {np.dtype(dtype).name}, got {a.dtype.name}")
    if shape is not None and tuple(a.shape) != tuple(shape):
        raise ProtocolError(f"{what}: expected shape {tuple(shape)}, got {tuple(a.shape)}")
