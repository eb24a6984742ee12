"""Party daemons: the model party and the helper as network services.

Layer: runtime (above :mod:`permllm.model`, :mod:`permllm.protocols` and
:mod:`permllm.net`); ``permllm serve`` runs them. Each is configured by a
:class:`~permllm.runtime.config.PartyConfig`.

* :class:`ModelDaemon` loads the weights and calibrates the mask magnitudes once,
  checks at start-up that the helper answers (retrying with a bounded backoff),
  then runs one :class:`ModelSession` per user connection; for each, it connects
  to the helper under the user's session id.
* :class:`HelperDaemon` pairs the model's and the user's connections by session id
  and runs one :class:`HelperSession` per pair; it can be restarted between
  sessions (the model party connects to it afresh for each).

Links are mutual TLS unless the configuration says ``insecure``; a peer's
certificate must name the role it claims, and the handshake compares protocol
version, session id, share dtype, mask ratio and model fingerprint. Admission
refuses malformed or already-used session ids and, past ``limits.max_sessions``,
answers "busy". A session whose peer fails (gone, silent past
``limits.message_timeout``, malformed or invalid message) is ended, the other
peers are told why (``Channel.abort``), and its state is freed; other sessions go
on. Silent means no sign of life: every party sends keep-alives on its idle links,
so a peer that is busy elsewhere or has nothing to say is not ended, a dead or
hung one is. ``stop()`` (SIGTERM) stops accepting, lets running sessions finish within
``limits.drain_timeout`` and ends the rest.

Logs name sessions, peers' addresses and certificate names, counts and errors;
never weights, masks, shares, prompts or tokens.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Mapping

from ..model import LoadedModel, calibrate, load_model
from ..net import Channel, HandshakeError, Meter, NetError, PeerCert, Transport, accept_channel, open_channel
from ..net import tcp_connect, tcp_serve
from ..net.channel import printable
from ..net.tls import check_pin
from ..protocols import Party, ProtocolError, Role
from .api import parse_addr
from .config import PartyConfig
from .identity import received_fingerprint, share_terms, weights_fingerprint
from .session import ContextTooLong, HelperSession, ModelSession

__all__ = ["ModelDaemon", "HelperDaemon", "SESSION_ID", "PROBE"]

log = logging.getLogger("permllm.daemon")

SESSION_ID = re.compile(r"[0-9a-f]{32}")  # 128 random bits, chosen by the user party
PROBE = "probe"           # the session id of the model party's start-up check of the helper
REMEMBERED = 100_000      # session ids kept to refuse a replayed session
GRACE = 2.0               # seconds a session gets to fail by itself once one of its links is down
Ready = Callable[[str, int], None]


def _describe(e: BaseException) -> str:
    if isinstance(e, asyncio.TimeoutError):
        return f"timeout: {e}" if str(e) else "timeout"
    return f"{type(e).__name__}: {e}"


_EXPECTED = (NetError, ProtocolError, asyncio.TimeoutError, ConnectionError, ContextTooLong)


async def _supervise(work: Awaitable[None], chans: list[Channel]) -> None:
    """Await ``work``; if one of ``chans`` fails first, give ``work`` a moment to fail by itself
    (its error names the awaited message), then cancel it and raise the link's error."""
    task = asyncio.ensure_future(work)
    watchers = [asyncio.ensure_future(ch.wait_failed()) for ch in chans]
    try:
        done, _ = await asyncio.wait([task, *watchers], return_when=asyncio.FIRST_COMPLETED)
        if task not in done:
            await asyncio.wait({task}, timeout=GRACE)
            if not task.done():
                raise next(w.result() for w in watchers if w.done())
        task.result()
    finally:
        for w in watchers:
            w.cancel()
        if not task.done():
            task.cancel()
        await asyncio.gather(task, *watchers, return_exceptions=True)


class _Daemon:
    """What both daemons share: listening, admission, running sessions, draining."""

    role = ""

    def __init__(self, cfg: PartyConfig) -> None:
        self.cfg = cfg
        self.config = cfg.share_config()
        self.terms: dict[str, Any] = share_terms(self.config)
        self.server_ssl = cfg.server_ssl()
        self.pins: Mapping[str, str] = cfg["tls.pins"]
        self.slots: dict[str, asyncio.Task | None] = {}  # sessions admitted (None: not started yet)
        self.used: OrderedDict[str, None] = OrderedDict()
        self.draining = False
        self._stop = asyncio.Event()
        self._hurry = asyncio.Event()

    # -- admission ----------------------------------------------------------------------
    def _check_peer(self, role: str, cert: PeerCert | None, terms: Mapping[str, Any], required: set[str]) -> None:
        """The peer's pinned certificate, and every term it must state (an absent one is no agreement)."""
        check_pin(cert, role, self.pins, role)
        missing = sorted(required - terms.keys())
        if missing:
            raise HandshakeError(f"the {role} party's hello does not state {', '.join(missing)}")

    def _check_new_session(self, sid: str) -> None:
        if not SESSION_ID.fullmatch(sid):
            raise HandshakeError(f"bad session id {printable(sid, 40)!r}: expected 32 lowercase hex digits")
        if sid in self.used:
            raise HandshakeError(f"session id {sid} was already used: a session cannot be replayed")
        if sid in self.slots:
            raise HandshakeError(f"session {sid} is already running")
        if self.draining:
            raise HandshakeError(f"the {self.role} party is shutting down")
        if len(self.slots) >= self.cfg["limits.max_sessions"]:
            raise HandshakeError(f"busy: the {self.role} party already serves its maximum of "
                                 f"{self.cfg['limits.max_sessions']} sessions; try again later")

    def _release(self, sid: str) -> None:
        """Free a session's slot and remember its id (a later hello with it is a replay)."""
        if sid in self.slots:
            del self.slots[sid]
            self.used[sid] = None
            while len(self.used) > REMEMBERED:
                self.used.popitem(last=False)

    def _link_kw(self, bounded: bool = True) -> dict[str, Any]:
        """Channel settings; ``bounded``: cap what the peer may send ahead (not on the model's link to the
        helper, which deals a whole generation's correlations ahead of the model's offline phase)."""
        return {"timeout": self.cfg["limits.handshake_timeout"], "bind": True,
                "link_timeout": self.cfg["limits.message_timeout"],
                "max_unread": self.cfg["limits.max_unread"] if bounded else None}

    async def _accept(self, t: Transport, meter: Meter, peer_roles: set[str],
                      admit: Callable[[str, str, Mapping[str, Any], PeerCert | None], None],
                      ) -> tuple[Channel, str, str] | None:
        """The handshake of an incoming connection; None (logged) if it was refused."""
        try:
            return await accept_channel(
                t, meter, role=self.role, terms=self.terms, peer_roles=peer_roles,
                admit=lambda role, sid, terms: admit(role, sid, terms, t.peer_cert), **self._link_kw())
        except (NetError, asyncio.TimeoutError) as e:
            log.warning("refused a connection from %s: %s", t.peer, e)
            return None

    # -- sessions -----------------------------------------------------------------------
    async def _session(self, sid: str, chans: list[Channel], work: Awaitable[None]) -> None:
        """Run one session's work under supervision; end it cleanly, telling the peers why if it failed."""
        t0 = time.monotonic()
        try:
            await _supervise(work, chans)
            self._release(sid)
            log.info("session %s: finished after %.1f s (%d active)", sid, time.monotonic() - t0, len(self.slots))
            for ch in chans:
                await ch.close()
        except asyncio.CancelledError:
            self._release(sid)
            log.warning("session %s: ended: the %s party is shutting down (%d active)", sid, self.role,
                        len(self.slots))
            await self._abort(chans, f"the {self.role} party ended session {sid}: it is shutting down")
            raise
        except Exception as e:
            self._release(sid)
            reason = _describe(e)
            log.warning("session %s: ended: %s (%d active)", sid, reason, len(self.slots),
                        exc_info=not isinstance(e, _EXPECTED))
            await self._abort(chans, f"the {self.role} party ended session {sid}: {reason}")

    @staticmethod
    async def _abort(chans: list[Channel], reason: str) -> None:
        for ch in chans:
            with contextlib.suppress(Exception):
                await ch.abort(reason)

    # -- life cycle ---------------------------------------------------------------------
    async def _on_connection(self, t: Transport) -> None:
        raise NotImplementedError

    async def run(self, on_ready: Ready | None = None) -> None:
        """Listen on ``listen`` and serve until :meth:`stop`; then drain and return."""
        host, port = parse_addr(self.cfg["listen"])
        server = await tcp_serve(host, port, self._on_connection, ssl=self.server_ssl,
                                 max_frame=self.cfg["limits.max_frame"],
                                 handshake_timeout=self.cfg["limits.handshake_timeout"])
        bound = server.sockets[0].getsockname()
        log.info("%s party listening on %s:%d (%s)", self.role, bound[0], bound[1],
                 "mutual TLS" if self.server_ssl else "plain TCP: insecure")
        if on_ready:
            on_ready(bound[0], bound[1])
        try:
            await self._stop.wait()
        finally:
            server.close()
            await self._drain()
            log.info("%s party stopped", self.role)

    def stop(self) -> None:
        """Stop accepting and drain (SIGTERM); a second call ends running sessions at once."""
        if self._stop.is_set():
            self._hurry.set()
        self._stop.set()

    async def _drain(self) -> None:
        self.draining = True
        running = [t for t in self.slots.values() if t is not None and not t.done()]
        if running and not self._hurry.is_set():
            limit = self.cfg["limits.drain_timeout"]
            log.info("draining: %d sessions running, waiting up to %g s for them to finish", len(running), limit)
            hurry = asyncio.ensure_future(self._hurry.wait())
            deadline = time.monotonic() + limit
            while not self._hurry.is_set() and time.monotonic() < deadline:
                alive = [t for t in running if not t.done()]
                if not alive:
                    break
                await asyncio.wait([*alive, hurry], timeout=deadline - time.monotonic(),
                                   return_when=asyncio.FIRST_COMPLETED)
            hurry.cancel()
        for t in running:
            t.cancel()
        await asyncio.gather(*running, return_exceptions=True)


class ModelDaemon(_Daemon):
    """The model party's daemon: one :class:`ModelSession` per user connection."""

    role = "model"

    def __init__(self, cfg: PartyConfig, model: LoadedModel, mags: Mapping[str, Any], fingerprint: str) -> None:
        super().__init__(cfg)
        if not cfg["helper"]:
            raise ValueError("the model party needs the helper's address: helper = \"HOST:PORT\" or --helper")
        self.helper = parse_addr(cfg["helper"])
        self.client_ssl = cfg.client_ssl()
        self.model = model
        self.mags = dict(mags)
        self.fingerprint = fingerprint
        self.terms["model"] = fingerprint

    @classmethod
    async def create(cls, cfg: PartyConfig, model: LoadedModel | None = None) -> "ModelDaemon":
        """Load the model (unless given), calibrate the mask magnitudes and compute the fingerprint."""
        lm = model or await asyncio.to_thread(load_model, cfg["model"])
        mags = await calibrate(lm.weights)
        config = cfg.share_config()
        fp = await asyncio.to_thread(weights_fingerprint, lm.weights, config, mags)
        a = lm.arch
        log.info("model %s: %s, %d layers, hidden %d, vocab %d; shares %s at ratio %g, route %s; fingerprint %s",
                 lm.source, a.family, a.layers, a.hidden, a.vocab, config.dtype, config.ratio, config.attention_route, fp)
        return cls(cfg, lm, mags, fp)

    async def _connect_helper(self, sid: str, meter: Meter) -> Channel:
        host, port = self.helper
        c = self.cfg
        try:
            t = await tcp_connect(host, port, peer="helper", ssl=self.client_ssl, max_frame=c["limits.max_frame"],
                                  retries=c["limits.connect_retries"], backoff=c["limits.connect_backoff"],
                                  max_backoff=c["limits.max_backoff"], timeout=c["limits.handshake_timeout"])
        except OSError as e:
            raise ConnectionError(f"cannot reach the helper: {e.strerror or e}") from e
        ch = await open_channel(t, meter, role="model", peer_role="helper", session=sid, terms=self.terms,
                                **self._link_kw(bounded=False))
        try:
            check_pin(ch.peer_cert, "helper", self.pins, "helper")
        except NetError:
            await ch.close()
            raise
        return ch

    async def run(self, on_ready: Ready | None = None) -> None:
        """Check the helper (with retries), then listen and serve until :meth:`stop`."""
        ch = await self._connect_helper(PROBE, Meter())
        log.info("helper at %s:%d answered the handshake", *self.helper)
        await ch.close()
        await super().run(on_ready)

    def _admit(self, role: str, sid: str, terms: Mapping[str, Any], cert: PeerCert | None) -> None:
        self._check_peer(role, cert, terms, set(share_terms(self.config)))
        self._check_new_session(sid)
        self.slots[sid] = None

    async def _on_connection(self, t: Transport) -> None:
        admitted: list[str] = []

        def admit(role: str, sid: str, terms: Mapping[str, Any], cert: PeerCert | None) -> None:
            self._admit(role, sid, terms, cert)
            admitted.append(sid)

        meter = Meter()
        got = await self._accept(t, meter, {"user"}, admit)
        if got is None:
            for sid in admitted:
                self.slots.pop(sid, None)
            return
        ch_u, _, sid = got
        self.slots[sid] = asyncio.current_task()
        who = f" (certificate {ch_u.peer_cert.subject!r})" if ch_u.peer_cert else ""
        log.info("session %s: user %s connected%s (%d active)", sid, t.peer, who, len(self.slots))
        chans = [ch_u]

        async def work() -> None:
            ch_h = await self._connect_helper(sid, meter)
            chans.append(ch_h)  # for the abort; the outer supervision watches the user's link, this one the helper's
            ms = ModelSession(Party(Role.MODEL, {Role.USER: ch_u, Role.HELPER: ch_h}, self.config, meter),
                              self.model.weights, self.mags)
            await _supervise(_model_program(ms), [ch_h])

        await self._session(sid, chans, work())


async def _model_program(ms: ModelSession) -> None:
    await ms.setup()
    await ms.serve()


@dataclass
class _Pairing:
    """A helper session waiting for its second party."""

    claimed: set[str] = field(default_factory=set)
    chans: dict[str, Channel] = field(default_factory=dict)
    paired: asyncio.Event = field(default_factory=asyncio.Event)


class HelperDaemon(_Daemon):
    """The helper's daemon: pairs the model's and the user's connections by session id."""

    role = "helper"

    def __init__(self, cfg: PartyConfig) -> None:
        super().__init__(cfg)
        if cfg["model_fingerprint"]:
            self.terms["model"] = cfg["model_fingerprint"]
        self.pairing: dict[str, _Pairing] = {}

    def _admit(self, role: str, sid: str, terms: Mapping[str, Any], cert: PeerCert | None) -> None:
        self._check_peer(role, cert, terms, {*share_terms(self.config), "model"})
        if sid == PROBE and role == "model":
            return
        p = self.pairing.get(sid)
        if p is None:
            self._check_new_session(sid)
            p = self.pairing[sid] = _Pairing()
            self.slots[sid] = None
        elif role in p.claimed:
            raise HandshakeError(f"session {sid} already has a {role} connection")
        p.claimed.add(role)

    def _unclaim(self, sid: str, role: str) -> None:
        p = self.pairing.get(sid)
        if p is not None and role in p.claimed and role not in p.chans:
            p.claimed.discard(role)
            if not p.claimed:
                del self.pairing[sid]
                self.slots.pop(sid, None)

    async def _on_connection(self, t: Transport) -> None:
        claims: list[tuple[str, str]] = []

        def admit(role: str, sid: str, terms: Mapping[str, Any], cert: PeerCert | None) -> None:
            self._admit(role, sid, terms, cert)
            claims.append((sid, role))

        meter = Meter()
        got = await self._accept(t, meter, {"model", "user"}, admit)
        if got is None:
            for sid, role in claims:
                self._unclaim(sid, role)
            return
        ch, role, sid = got
        if sid == PROBE:
            log.info("model party at %s checked in", t.peer)
            await ch.close()
            return
        p = self.pairing.get(sid)
        if p is None:  # the first party's wait ran out while this one was shaking hands
            log.warning("session %s: dropped: the %s party connected after the pairing timeout (%d active)", sid,
                        role, len(self.slots))
            await self._abort([ch], f"the helper dropped session {sid}: the pairing timed out")
            return
        p.chans[role] = ch
        other = "user" if role == "model" else "model"
        if other not in p.chans:
            log.info("session %s: %s %s connected, waiting for the %s party", sid, role, t.peer, other)
            await self._await_pair(sid, p, ch, role, other)
            return
        del self.pairing[sid]
        p.paired.set()
        self.slots[sid] = asyncio.current_task()
        chans = [p.chans["model"], p.chans["user"]]
        log.info("session %s: model and user connected (%d active)", sid, len(self.slots))
        await self._session(sid, chans, self._helper_program(sid, p.chans, meter))

    async def _await_pair(self, sid: str, p: _Pairing, ch: Channel, role: str, other: str) -> None:
        limit = self.cfg["limits.pairing_timeout"]
        waits = [asyncio.ensure_future(p.paired.wait()), asyncio.ensure_future(ch.wait_failed()),
                 asyncio.ensure_future(self._stop.wait())]
        await asyncio.wait(waits, timeout=limit, return_when=asyncio.FIRST_COMPLETED)
        for w in waits:
            w.cancel()
        if p.paired.is_set():
            return
        if ch.error is not None:
            reason = f"the {role} party left before the {other} party connected ({ch.error})"
        elif self._stop.is_set():
            reason = "the helper is shutting down"
        else:
            reason = f"no {other} party connected within {limit:g} s"
        self.pairing.pop(sid, None)
        self._release(sid)
        log.warning("session %s: dropped: %s (%d active)", sid, reason, len(self.slots))
        await self._abort([ch], f"the helper dropped session {sid}: {reason}")

    async def _helper_program(self, sid: str, chans: Mapping[str, Channel], meter: Meter) -> None:
        stated, told = chans["model"].peer_terms.get("model"), chans["user"].peer_terms.get("model")
        if stated != told:
            raise HandshakeError(f"model fingerprint mismatch in session {sid}: the model party states {stated!r}, "
                                 f"the user expects {told!r}")
        hs = HelperSession(Party(Role.HELPER, {Role.MODEL: chans["model"], Role.USER: chans["user"]},
                                 self.config, meter))
        await hs.setup()
        got = received_fingerprint(hs.p, hs.arch, hs.mags)  # type: ignore[arg-type]
        if got != stated:
            raise ProtocolError(f"the model party stated model {stated!r} but set up {got!r}")
        await hs.serve()
