"""The public async API: private generation embedded in an asyncio application.

* :func:`local` — the embedded default: model, user and helper parties in this
  process, over in-memory pairs or loopback TCP.
* :func:`connect` — the user side only, talking to a model-party daemon and a
  helper daemon (``permllm serve``) over mutual TLS (or plain TCP when its
  settings say ``insecure``).

Both return a :class:`Session`; ``async for piece in session.generate(prompt)``
streams text as tokens are chosen, and ``session.last`` holds the stats of the
last generation (:class:`GenerationResult`).
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Callable

from ..model import DEFAULT_MODEL, LoadedModel, StepShape, load_model
from ..model.forward import step_hops
from ..model.loaders import load_tokenizer
from ..net import Channel, HandshakeError, LinkEmulator, Meter, NetError, open_channel, tcp_connect
from ..net.tls import check_pin
from ..protocols import Party, ProtocolError, Role, ShareConfig
from ..protocols.sampling import Sampler
from ..protocols.transcript import Transcript
from .config import PartyConfig, load_config
from .identity import received_fingerprint, share_terms
from .mesh import Trio, gather_fail_fast, local_trio
from .session import PREFILL_CHUNK, HelperSession, ModelSession, UserSession
from .speculate import AdaptiveK, CostAwareK, Drafter, Speculator

__all__ = ["Session", "GenerationResult", "local", "connect", "parse_addr", "encode_prompt"]


@dataclass
class GenerationResult:
    """What one generation produced and cost (times in seconds, bytes over all links seen)."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    prompt_token_ids: list[int] = field(default_factory=list)
    online_s: float = 0.0
    offline_s: float = 0.0
    online_bytes: int = 0
    offline_bytes: int = 0
    setup_s: float = 0.0
    setup_bytes: int = 0
    online_hops: int = 0
    step_s: list[float] = field(default_factory=list)  # online seconds of each step (step 0: prefill)
    offline_step_s: list[float] = field(default_factory=list)  # U's offline seconds per step (a batch's split evenly)
    speculative: bool = False  # verify passes after the prompt (speculate=...)
    drafted: list[int] = field(default_factory=list)  # per verify pass: the drafts it verified (K)
    accepted: list[int] = field(default_factory=list)  # per verify pass: the drafts it accepted

    @property
    def passes(self) -> int:
        """Verify passes after the prompt's steps (speculation)."""
        return len(self.accepted)

    @property
    def tokens_per_s(self) -> float:
        return len(self.token_ids) / self.online_s if self.online_s > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        out = {"text": self.text, "token_ids": self.token_ids, "prompt_token_ids": self.prompt_token_ids,
               "online_s": self.online_s, "offline_s": self.offline_s, "online_bytes": self.online_bytes,
               "offline_bytes": self.offline_bytes, "setup_s": self.setup_s, "setup_bytes": self.setup_bytes,
               "online_hops": self.online_hops, "tokens_per_s": self.tokens_per_s}
        if self.speculative:
            out.update(passes=self.passes, drafted=self.drafted, accepted=self.accepted)
        return out


class Session:
    """A user's private-inference session (setup done); generate as often as you like."""

    def __init__(self, user: UserSession, tokenizer: Any | None, meters: list[Meter],
                 closers: list[Callable[[], Any]], setup_s: float, watch: asyncio.Future | None = None) -> None:
        self._user = user
        self._watch = watch  # the in-process model/helper programs: their failure is the real cause
        self.trio: Trio | None = None  # the in-process parties (embedded mode), for inspection
        self.tokenizer = tokenizer
        self._meters = meters
        self._closers = closers
        self._setup_s = setup_s
        self.aborting = False  # set by close(abort=True): the closers stop the peers instead of awaiting them
        self.broken = False  # a generation failed: the session can only be closed (and aborts)
        self.last = GenerationResult()

    @property
    def arch(self) -> Any:
        return self._user.arch

    def pass_hops(self, drafts: int, context: int) -> int:
        """Dependent online hops of a verify pass with ``drafts`` drafts after ``context`` tokens (prompt and
        emitted: all but the last in the KV cache), by the hop model (:func:`~permllm.model.forward.step_hops`);
        a pass without drafts is a decode step. What :class:`~permllm.runtime.speculate.CostAwareK` weighs."""
        a, past = self._user.arch, context - 1
        return step_hops(a, self._user.p.config.attention_route, StepShape.verify(a, past, past, drafts + 1))

    def speculator(self, drafter: Drafter, k: int = 0) -> Speculator:
        """A speculator for this session: ``k`` drafts a pass, or (0) as many as :class:`CostAwareK` finds worth
        this session's hops."""
        policy = AdaptiveK.fixed(k) if k else CostAwareK(self.pass_hops)
        return Speculator(drafter, policy, self._user.arch.eos_ids)

    @property
    def error(self) -> BaseException | None:
        """Why this session can no longer generate (a failed or closed link), or None while it can."""
        for ch in self._user.p.channels.values():
            if ch.error is not None:
                return ch.error
        w = self._watch
        if w is not None and w.done():
            return (None if w.cancelled() else w.exception()) or RuntimeError("the session's parties have ended")
        return None

    def encode(self, prompt: str | list[dict[str, str]], chat: bool = True) -> list[int]:
        """Token ids of ``prompt`` (see :func:`encode_prompt`)."""
        return encode_prompt(self.tokenizer, prompt, chat)

    async def generate_ids(self, prompt_ids: list[int], max_new_tokens: int = 32,
                           sampler: Sampler | None = None, stop_at_eos: bool = True,
                           offline_first: bool = False, prefill_chunk: int = PREFILL_CHUNK,
                           speculate: Speculator | None = None) -> AsyncIterator[int]:
        """Yield token ids; fills :attr:`last` with the ids, times and traffic. A caller may stop
        early (``break``): the generation then ends at all three parties. The prompt is fed in steps
        of ``prefill_chunk`` tokens (0: all at once), which bounds each party's memory. ``speculate``:
        verify passes of the speculator's drafts after the prompt (:meth:`UserSession.generate`)."""
        res = GenerationResult(prompt_token_ids=list(prompt_ids), setup_s=self._setup_s,
                               speculative=speculate is not None)
        self.last = res
        before = [_totals(m) for m in self._meters]
        off0 = self._user.offline_s
        t_prev = time.perf_counter()
        try:
            async with contextlib.aclosing(self._user.generate(list(prompt_ids), max_new_tokens, sampler,
                                                               stop_at_eos, offline_first,
                                                               prefill_chunk, speculate)) as gen:
                async for tok in gen:  # a caller that stops early ends the generation at M and H too
                    now = time.perf_counter()
                    res.online_s += now - t_prev
                    res.token_ids.append(tok)
                    yield tok
                    t_prev = time.perf_counter()
        except GeneratorExit:  # the caller stopped early; the generation has ended (aclosing)
            self._fill(res, before, off0, offline_first)
            raise
        except Exception as e:
            self.broken = True  # the peers may be mid-step: closing must stop them, not wait for them
            w = self._watch
            if w is not None and w.done() and not w.cancelled() and w.exception() is not None:
                raise w.exception() from e  # type: ignore[misc]
            raise
        self._fill(res, before, off0, offline_first)

    def _fill(self, res: GenerationResult, before: list[tuple[int, int, int]], off0: float,
              offline_first: bool) -> None:
        """Complete a generation's result: traffic, offline time, step times, hops and text."""
        after = [_totals(m) for m in self._meters]
        for (b_on, b_off, b_set), (a_on, a_off, a_set) in zip(before, after):
            res.online_bytes += a_on - b_on
            res.offline_bytes += a_off - b_off
            res.setup_bytes += a_set
        res.offline_s = self._user.offline_s - off0
        res.step_s = list(self._user.last_steps)
        res.offline_step_s = list(self._user.offline_step_s[:len(res.step_s)])
        res.drafted, res.accepted = list(self._user.last_drafted), list(self._user.last_accepted)
        if offline_first:  # the first step also waited for the whole offline phase: count steps only
            res.online_s = sum(res.step_s)
        res.online_hops = max(m.hops("online") for m in self._meters)
        for m in self._meters:  # hops are counted per generation
            m.clock["online"] = 0
        if self.tokenizer is not None:
            res.text = self.tokenizer.decode(res.token_ids, skip_special_tokens=True)

    async def generate(self, prompt: str | list[int], max_new_tokens: int = 32, *, chat: bool = True,
                       sampler: Sampler | None = None, prefill_chunk: int = PREFILL_CHUNK,
                       speculate: Speculator | None = None) -> AsyncIterator[str]:
        """Stream the generated text piece by piece (the prompt stays private to the user); the pieces
        of a generation that was not stopped early add up to ``last.text``. ``speculate``: see
        :meth:`generate_ids`."""
        ids = self.encode(prompt, chat) if isinstance(prompt, str) else list(prompt)
        out: list[int] = []
        shown = ""
        async with contextlib.aclosing(self.generate_ids(ids, max_new_tokens, sampler, prefill_chunk=prefill_chunk,
                                                         speculate=speculate)) as gen:
            async for tok in gen:  # a caller that stops early ends the generation (generate_ids)
                out.append(tok)
                if self.tokenizer is None:
                    yield f"{tok} "
                    continue
                text = self.tokenizer.decode(out, skip_special_tokens=True)
                if text.startswith(shown) and not text.endswith("\ufffd"):
                    yield text[len(shown):]
                    shown = text
        if self.tokenizer is not None and self.last.text != shown and self.last.text.startswith(shown):
            yield self.last.text[len(shown):]  # the end of the text: a character left incomplete, say

    async def close(self, abort: bool = False) -> None:
        """End the session; ``abort``: after a failure, without waiting for the peers to finish."""
        self.aborting = abort or self.broken
        await self._user.close()
        for c in self._closers:
            r = c()
            if asyncio.iscoroutine(r):
                await r

    async def __aenter__(self) -> "Session":
        return self

    async def __aexit__(self, et: type[BaseException] | None, *exc: object) -> None:
        if et is None:
            await self.close()
            return
        with contextlib.suppress(Exception):  # the failure that ended the block is what the caller must see
            await self.close(abort=True)


def encode_prompt(tokenizer: Any | None, prompt: str | list[dict[str, str]], chat: bool = True) -> list[int]:
    """Token ids of ``prompt``: a string (with the chat template for instruct models unless
    ``chat=False``) or chat messages (``[{"role": "user", "content": ...}, ...]``, always through
    the chat template: a tokenizer without one is an error)."""
    if tokenizer is None:
        raise ValueError("this model has no tokenizer: pass token ids")
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(prompt, str):
        if not (chat and template):
            return list(tokenizer.encode(prompt))
        prompt = [{"role": "user", "content": prompt}]
    elif not template:
        raise ValueError("this model's tokenizer has no chat template: send raw text instead of messages")
    ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def _totals(m: Meter) -> tuple[int, int, int]:
    return (m.total("online").bytes_sent, m.total("offline").bytes_sent, m.total("setup").bytes_sent)


async def local(model: str | LoadedModel = DEFAULT_MODEL, *, transport: str = "memory",
                config: ShareConfig | None = None, link: LinkEmulator | None = None,
                progress: Callable[[str, int, int], None] | None = None, offline: str | None = None,
                transcript: str | Path | None = None) -> Session:
    """All three parties in this process (the embedded default); returns a ready :class:`Session`.

    ``offline="he"`` selects the light client (no masked weights at the user; CKKS products in
    the offline phase), overriding ``config.offline``. ``transcript``: a directory where each
    party writes every array it receives, for audits (:mod:`permllm.protocols.transcript`).
    """
    lm = model if isinstance(model, LoadedModel) else await asyncio.to_thread(load_model, model)
    t0 = time.perf_counter()
    config = config or ShareConfig()
    if offline is not None:
        config = dataclasses.replace(config, offline=offline)
    trio: Trio = await local_trio(transport, config, link=link, seeds=False)
    if transcript is not None:
        for p in trio.parties:
            p.transcript = Transcript(transcript, p.role.value)
    ms, us, hs = ModelSession(trio.model, lm.weights), UserSession(trio.user), HelperSession(trio.helper)
    try:
        await gather_fail_fast([ms.setup(), us.setup(progress), hs.setup()])
    except BaseException:
        await trio.close()
        _close_transcripts(trio.parties)
        raise
    served = asyncio.ensure_future(gather_fail_fast([ms.serve(), hs.serve()]))
    user = us

    async def close() -> None:
        try:
            if session.aborting:  # after a failure: stop the model and helper programs, do not await their result
                served.cancel()
                await asyncio.wait({served})
            else:
                await asyncio.wait_for(served, 30)
        finally:
            await trio.close()
            _close_transcripts(trio.parties)

    served.add_done_callback(lambda t: t.cancelled() or t.exception() is None
                             or asyncio.ensure_future(trio.close()))
    session = Session(user, lm.tokenizer, [p.meter for p in trio.parties], [close], time.perf_counter() - t0,
                      watch=served)
    session.trio = trio
    return session


def _close_transcripts(parties: Any) -> None:
    """Write the index of each party's transcript (on every way out of a session, failures included)."""
    for party in parties:
        if party.transcript is not None:
            party.transcript.close()


def parse_addr(addr: str) -> tuple[str, int]:
    """'HOST:PORT' → (host, port), with a clear error."""
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ValueError(f"expected HOST:PORT, got {addr!r}")
    return host.strip("[]"), int(port)


async def connect(model_party: str | None = None, helper: str | None = None, *, model: str | None = DEFAULT_MODEL,
                  config: ShareConfig | None = None, settings: PartyConfig | None = None,
                  link: LinkEmulator | None = None,
                  progress: Callable[[str, int, int], None] | None = None, offline: str | None = None,
                  transcript: str | Path | None = None) -> Session:
    """The user side of a session with a model daemon and a helper daemon (``HOST:PORT`` each).

    ``settings`` is the user party's configuration (:func:`~permllm.runtime.config.load_config`
    with role "user": TLS files, pins, limits, an expected model fingerprint, and the
    addresses when ``model_party``/``helper`` are not given). Links are mutual TLS
    unless it says ``insecure``; the default settings have no certificates, so pass
    them. ``model`` names the tokenizer to use (the user never loads the weights;
    None: no tokenizer, token ids only). ``config`` overrides the settings' dtype and
    ratio. After the setup the user checks that what it received has the fingerprint
    the model party stated in the handshake. ``offline="he"`` asks for the light client
    (the daemons must serve it: ``--offline he``). ``transcript``: a directory where the
    user writes every array it receives (``DIR/user``, :mod:`permllm.protocols.transcript`).
    """
    settings = settings or load_config("user")
    config = config or settings.share_config()
    if offline is not None:
        config = dataclasses.replace(config, offline=offline)
    addrs = {Role.MODEL: model_party or settings["model_party"], Role.HELPER: helper or settings["helper"]}
    for role, addr in addrs.items():
        if not addr:
            raise ValueError(f"the user party needs the {role.value} daemon's address (HOST:PORT)")
    ssl = settings.client_ssl()
    tokenizer = None if model is None else await asyncio.to_thread(load_tokenizer, model)
    t0 = time.perf_counter()
    session_id = secrets.token_hex(16)
    meter = Meter()
    terms = share_terms(config)
    if settings["model_fingerprint"]:
        terms["model"] = settings["model_fingerprint"]
    chans: dict[Role, Channel] = {}
    p: Party | None = None
    try:
        for role in (Role.MODEL, Role.HELPER):  # the model party first: it states the fingerprint
            chans[role] = await _open_user_link(role, addrs[role], session_id, terms, meter, settings, ssl, link)
            if role is Role.MODEL:
                stated = chans[role].peer_terms.get("model")
                if not isinstance(stated, str):
                    raise HandshakeError("the model party stated no model fingerprint in its handshake")
                terms["model"] = stated
        p = Party(Role.USER, chans, config, meter)
        if transcript is not None:
            p.transcript = Transcript(transcript, "user")
        us = UserSession(p)
        await us.setup(progress)
        got = received_fingerprint(p, us.arch, us.mags)  # type: ignore[arg-type]
        if got != terms["model"]:
            raise ProtocolError(f"the model party stated model {terms['model']!r} but set up {got!r}")
    except BaseException:
        for ch in chans.values():
            await ch.close()
        if p is not None:
            _close_transcripts([p])
        raise

    async def close() -> None:
        for ch in chans.values():
            await ch.close()
        _close_transcripts([p])

    return Session(us, tokenizer, [meter], [close], time.perf_counter() - t0)


async def _open_user_link(role: Role, addr: str, session: str, terms: dict[str, Any], meter: Meter,
                          settings: PartyConfig, ssl: Any, link: LinkEmulator | None) -> Channel:
    """Connect (with retries) and handshake with one daemon; check its pinned certificate."""
    host, port = parse_addr(addr)
    lim = {k: settings[f"limits.{k}"] for k in ("connect_retries", "connect_backoff", "max_backoff",
                                                "handshake_timeout", "message_timeout", "max_frame")}
    try:
        t = await tcp_connect(host, port, peer=role.value, ssl=ssl, max_frame=lim["max_frame"],
                              retries=lim["connect_retries"], backoff=lim["connect_backoff"],
                              max_backoff=lim["max_backoff"], timeout=lim["handshake_timeout"])
    except OSError as e:
        raise ConnectionError(f"cannot reach the {role.value} party: {e.strerror or e}") from e
    ch = await open_channel(t, meter, role="user", peer_role=role.value, session=session, terms=terms, bind=True,
                            link=link, timeout=lim["handshake_timeout"], link_timeout=lim["message_timeout"])
    try:
        check_pin(ch.peer_cert, role.value, settings["tls.pins"], role.value)
    except NetError:
        await ch.close()
        raise
    return ch
