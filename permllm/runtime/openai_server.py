"""The user party as an OpenAI-compatible HTTP endpoint on the user's machine (``permllm serve user``).

Layer: runtime, on top of the async API (:func:`~permllm.runtime.api.connect`); the CLI runs
it. An application that speaks the OpenAI API points its ``base_url`` at
``http://127.0.0.1:PORT/v1`` and gets private inference: the prompt and the answer stay
on this machine, the weights at the model party.

* :class:`UserDaemon` sets up ``limits.max_sessions`` sessions with the model-party and
  helper daemons at start-up (the masked-weight setup is paid once per session, not per
  request), then serves ``GET /v1/models``, ``POST /v1/chat/completions`` (the model's chat
  template) and ``POST /v1/completions`` (raw text) with aiohttp in the same event loop.
  A request takes a free session or waits for one; a session that failed (its links are
  gone) is set up again for the next request.
* Streams are server-sent events in OpenAI's chunk format, ending with ``data: [DONE]``.
  A client that leaves ends its generation at all three parties (the API's early stop)
  and the session serves the next request.
* Errors are OpenAI error objects (``{"error": {"message", "type", "param", "code"}}``):
  400 for a bad body, an unsupported parameter or a prompt that does not fit the context,
  404 for an unknown model or path, 503 when the model party or the helper cannot be
  reached or a session fails.

Logs hold counts, times and errors; never a prompt, a token or generated text.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Callable

from aiohttp import web

from ..model import DEFAULT_MODEL
from ..model.loaders import NAMED_MODELS
from ..model.loaders import load_tokenizer
from ..net import NetError
from ..protocols import ProtocolError
from ..protocols.sampling import Sampler
from .api import Session, connect, encode_prompt, parse_addr
from .config import PartyConfig
from .session import ContextTooLong, check_context
from .speculate import Drafter, Speculator, make_drafter

__all__ = ["UserDaemon", "ApiError"]

log = logging.getLogger("permllm.user")

Ready = Callable[[str, int], None]
MAX_BODY = 4 * 1024 * 1024  # bytes of a request body
MAX_STOPS = 4               # stop sequences per request (as OpenAI)
# Why a session cannot be set up or fails: the model party or the helper is unreachable or ends it (503);
# OSError covers refused connections and timeouts.
_UNAVAILABLE = (NetError, ProtocolError, OSError)

# Accepted fields of each endpoint, and OpenAI parameters accepted only at their neutral value
# (anything else is a 400: a parameter this endpoint does not implement is never silently ignored).
_COMMON = {"model", "max_tokens", "temperature", "top_p", "seed", "stop", "stream", "stream_options", "user"}
_FIELDS = {"chat": _COMMON | {"messages", "max_completion_tokens"}, "text": _COMMON | {"prompt"}}
_NEUTRAL: dict[str, Callable[[Any], bool]] = {
    "n": lambda v: v == 1 and not isinstance(v, bool),
    "logprobs": lambda v: v is False or (v == 0 and not isinstance(v, bool)),
    "top_logprobs": lambda v: v == 0 and not isinstance(v, bool),
    "presence_penalty": lambda v: v == 0 and not isinstance(v, bool),
    "frequency_penalty": lambda v: v == 0 and not isinstance(v, bool),
    "logit_bias": lambda v: v == {},
    "tools": lambda v: v == [],
    "functions": lambda v: v == [],
    "tool_choice": lambda v: v == "none",
    "response_format": lambda v: v == {"type": "text"},
    "echo": lambda v: v is False,
    "best_of": lambda v: v == 1 and not isinstance(v, bool),
    "suffix": lambda v: v == "",
}
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


class ApiError(Exception):
    """A request that fails: the HTTP status and the fields of OpenAI's error object."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def response(self) -> web.Response:
        """The error as an HTTP response."""
        return web.json_response({"error": self.body()}, status=self.status)

    def body(self) -> dict[str, Any]:
        """OpenAI's error object."""
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"message": self.message, "type": kind, "param": self.param, "code": self.code}


def _bad(message: str, param: str | None = None, code: str | None = "invalid_value") -> ApiError:
    return ApiError(400, message, param=param, code=code)


# -- request parsing -------------------------------------------------------------------------

@dataclass
class _Request:
    """A validated completion request."""

    kind: str  # "chat" or "text"
    prompt: str | list[dict[str, str]]
    max_tokens: int | None
    sampler: Sampler
    stop: list[str]
    stream: bool
    include_usage: bool


def _number(body: dict[str, Any], name: str, lo: float, hi: float, default: float, *, lo_open: bool = False) -> float:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise _bad(f"{name} must be a number, got {json.dumps(v)[:40]}", name, "invalid_type")
    if v < lo or v > hi or (lo_open and v == lo):
        raise _bad(f"{name} must be in {'(' if lo_open else '['}{lo:g}, {hi:g}], got {v!r}", name)
    return float(v)


def _integer(body: dict[str, Any], name: str, lo: int) -> int | None:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise _bad(f"{name} must be an integer, got {json.dumps(v)[:40]}", name, "invalid_type")
    if v < lo:
        raise _bad(f"{name} must be at least {lo}, got {v}", name)
    return v


def _messages(value: Any) -> list[dict[str, str]]:
    """The chat messages as the chat template takes them: role and text content."""
    if not isinstance(value, list) or not value:
        raise _bad("messages must be a non-empty array of {role, content} objects", "messages", "invalid_type")
    out = []
    for i, m in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise _bad(f"{where} must be an object with role and content", where, "invalid_type")
        extra = sorted(set(m) - {"role", "content"})
        if extra:
            raise _bad(f"{where}.{extra[0]} is not supported: a message has a role and a text content",
                       f"{where}.{extra[0]}", "unsupported_parameter")
        role = m.get("role")
        if role not in _ROLES:
            raise _bad(f"{where}.role must be one of {', '.join(_ROLES)}, got {json.dumps(role)[:40]}",
                       f"{where}.role", "unsupported_value" if isinstance(role, str) else "invalid_type")
        content = m.get("content")
        if isinstance(content, list):  # content parts: text only
            texts = []
            for j, part in enumerate(content):
                if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
                        and set(part) == {"type", "text"}):
                    raise _bad(f"{where}.content[{j}]: only text parts are supported ({{\"type\": \"text\", "
                               f"\"text\": ...}})", f"{where}.content", "unsupported_value")
                texts.append(part["text"])
            content = "".join(texts)
        if not isinstance(content, str):
            raise _bad(f"{where}.content must be a string or an array of text parts", f"{where}.content",
                       "invalid_type")
        out.append({"role": _ROLES[role], "content": content})
    return out


def parse_request(body: Any, kind: str, model_id: str, aliases: set[str]) -> _Request:
    """Validate a completion request body (``kind``: "chat" or "text") for the model ``model_id``
    (``aliases``: other names accepted for it); raises :class:`ApiError`."""
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object", None, "invalid_type")
    body = {k: v for k, v in body.items() if v is not None}  # null: the parameter is not given
    for name in sorted(set(body) - _FIELDS[kind]):
        if name not in _NEUTRAL:
            raise _bad(f"unrecognized request argument {name!r}", name, "unknown_parameter")
        if not _NEUTRAL[name](body[name]):
            raise _bad(f"{name}={json.dumps(body[name])[:60]} is not supported by this endpoint", name,
                       "unsupported_parameter")
    model = body.get("model")
    if not isinstance(model, str):
        raise _bad("model is required: a string (GET /v1/models lists it)", "model",
                   "missing_required_parameter" if model is None else "invalid_type")
    if model != model_id and model not in aliases:
        raise ApiError(404, f"the model {model!r} does not exist; this endpoint serves {model_id!r}",
                       param="model", code="model_not_found")
    prompt: str | list[dict[str, str]]
    if kind == "chat":
        prompt = _messages(body.get("messages"))
    else:
        prompt = body.get("prompt")
        if not isinstance(prompt, str) or not prompt:
            raise _bad("prompt must be a non-empty string (one prompt per request)", "prompt",
                       "missing_required_parameter" if prompt is None else "invalid_type")
    max_tokens = _integer(body, "max_tokens", 1)
    if kind == "chat":
        mct = _integer(body, "max_completion_tokens", 1)
        if mct is not None and max_tokens is not None and mct != max_tokens:
            raise _bad("max_tokens and max_completion_tokens differ: give one", "max_completion_tokens")
        max_tokens = mct if mct is not None else max_tokens
    else:
        max_tokens = 16 if max_tokens is None else max_tokens  # OpenAI's default for /v1/completions
    seed = _integer(body, "seed", -(2 ** 63))
    if seed is not None and seed < 0:
        seed += 2 ** 64  # numpy seeds are non-negative: map an int64 seed one-to-one
    sampler = Sampler(temperature=_number(body, "temperature", 0.0, 2.0, 1.0),
                      top_p=_number(body, "top_p", 0.0, 1.0, 1.0, lo_open=True), seed=seed)
    stop = body.get("stop", [])
    stop = [stop] if isinstance(stop, str) else stop
    if not (isinstance(stop, list) and all(isinstance(s, str) and s for s in stop)):
        raise _bad("stop must be a non-empty string or an array of them", "stop", "invalid_type")
    if len(stop) > MAX_STOPS:
        raise _bad(f"stop takes at most {MAX_STOPS} sequences, got {len(stop)}", "stop")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise _bad("stream must be a boolean", "stream", "invalid_type")
    opts = body.get("stream_options", {})
    if not isinstance(opts, dict) or set(opts) - {"include_usage"} or not isinstance(
            opts.get("include_usage", False), bool):
        raise _bad("stream_options supports only {\"include_usage\": true|false}", "stream_options")
    if opts and not stream:
        raise _bad("stream_options is only allowed with stream: true", "stream_options")
    return _Request(kind, prompt, max_tokens, sampler, stop, stream, bool(opts.get("include_usage")))


# -- text: stop sequences ------------------------------------------------------------------

class _StopText:
    """The generated text cut at the first stop sequence: :meth:`feed` returns what may be sent
    (text that could begin a stop sequence is held back until it is clear)."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = stops
        self.text = ""
        self.sent = 0
        self.hit = False

    def feed(self, piece: str) -> str:
        self.text += piece
        t = self.text
        found = [i for i in (t.find(s, self.sent) for s in self.stops) if i >= 0]
        if found:
            self.hit = True
            end = min(found)
        else:
            hold = max((k for s in self.stops for k in range(1, len(s)) if t.endswith(s[:k])), default=0)
            end = max(self.sent, len(t) - hold)
        out, self.sent = t[self.sent:end], end
        return out

    def rest(self) -> str:
        """What was held back, once the generation has ended without a stop sequence."""
        out, self.sent = self.text[self.sent:], len(self.text)
        return out


@dataclass
class _Outcome:
    """How a generation ended: its finish reason, token counts and whether the client left."""

    prompt_tokens: int
    completion_tokens: int = 0
    finish: str = "length"
    gone: bool = False
    error: Exception | None = None  # the session failed
    passes: int | None = None  # speculation: verify passes, and drafts accepted
    accepted: int = 0
    t0: float = field(default_factory=time.perf_counter)

    def usage(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}


async def _pieces(session: Session, ids: list[int], max_new: int, req: _Request, gone: Callable[[], bool],
                  out: _Outcome, speculate: Speculator | None = None) -> AsyncIterator[str]:
    """The completion's text piece by piece, cut at a stop sequence; stops the generation early (at
    all three parties) at a stop sequence or when the client has left. ``speculate``: verify passes of
    its drafts (the same tokens)."""
    stops = _StopText(req.stop)
    try:
        async with contextlib.aclosing(session.generate(ids, max_new, sampler=req.sampler,
                                                        speculate=speculate)) as gen:
            async for piece in gen:
                text = stops.feed(piece)
                if text:
                    yield text
                if stops.hit:
                    break
                if gone():
                    out.gone = True
                    break
        if not stops.hit and not out.gone:
            text = stops.rest()
            if text:
                yield text
    finally:  # also when the caller closes this generator (the client left during a stream)
        got = session.last.token_ids
        out.completion_tokens = len(got)
        if session.last.speculative:
            out.passes, out.accepted = session.last.passes, sum(session.last.accepted)
        eos = bool(got) and got[-1] in session.arch.eos_ids
        out.finish = "stop" if stops.hit or eos else "length"


# -- sessions ----------------------------------------------------------------------------------

@dataclass
class _Slot:
    """One of the sessions a request may run on (None: to be set up)."""

    index: int
    session: Session | None = None
    drafter: Drafter | None = None  # the user's drafter (speculate), one per session: a draft model's cache


class _Pool:
    """Up to ``size`` sessions with the model party and the helper; a request takes one or queues."""

    def __init__(self, cfg: PartyConfig, size: int) -> None:
        self.cfg = cfg
        self.free: asyncio.Queue[_Slot] = asyncio.Queue()
        self.slots = [_Slot(i, drafter=make_drafter(cfg["speculate"], cfg["draft"])) for i in range(size)]
        for s in self.slots:
            self.free.put_nowait(s)
        self.arch: Any = None

    async def _open(self, slot: _Slot, retries: int | None = None) -> None:
        """Set up the slot's session (the masked-weight setup); ``retries`` overrides the settings'."""
        cfg = self.cfg
        if retries is not None:
            cfg = PartyConfig(cfg.role, {**cfg.values, "limits.connect_retries": retries}, cfg.source)
        t0 = time.perf_counter()
        slot.session = await connect(model=cfg["model"], settings=cfg)
        self.arch = slot.session.arch
        log.info("session %d: set up in %.1f s", slot.index, time.perf_counter() - t0)

    async def start(self) -> None:
        """Set up every session (with the configured connection retries); a failure is logged and the
        sessions not set up are tried again by the requests that need them."""
        for slot in self.slots:
            try:
                await self._open(slot)
            except _UNAVAILABLE as e:
                log.error("session %d: cannot be set up: %s; requests get 503 until it can", slot.index,
                          _describe(e))
                return

    @contextlib.asynccontextmanager
    async def lease(self) -> AsyncIterator[_Slot]:
        """A slot with a live session, for one request (waits for a free one; ApiError 503 if its
        session cannot be set up). The caller sets ``slot.session = None`` after closing a failed one."""
        slot = await self.free.get()
        try:
            s = slot.session
            if s is not None and s.error is not None:
                log.warning("session %d: ended (%s); setting up a new one", slot.index, _describe(s.error))
                await _close(s)
                slot.session = None
            if slot.session is None:
                try:
                    await self._open(slot, retries=0)
                except _UNAVAILABLE as e:
                    log.warning("session %d: cannot be set up: %s", slot.index, _describe(e))
                    raise ApiError(503, f"the private session cannot be set up: {_describe(e)}",
                                   code="service_unavailable") from None
            yield slot
        finally:
            self.free.put_nowait(slot)

    async def close(self) -> None:
        for slot in self.slots:
            if slot.session is not None:
                await _close(slot.session)
                slot.session = None


async def _close(s: Session) -> None:
    with contextlib.suppress(Exception):
        await s.close()


def _describe(e: BaseException) -> str:
    """An error in one line: the permllm errors' messages name the party; others get their type."""
    if isinstance(e, (NetError, ConnectionError)) and str(e):
        return str(e)
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


# -- the daemon --------------------------------------------------------------------------------

class UserDaemon:
    """The user party's daemon: an OpenAI-compatible HTTP endpoint over a pool of sessions."""

    def __init__(self, cfg: PartyConfig, tokenizer: Any) -> None:
        for key in ("model_party", "helper"):
            if not cfg[key]:
                raise ValueError(f"the user party needs the {key.replace('_', ' ')} daemon's address: "
                                 f"{key} = \"HOST:PORT\" or --{key.replace('_', '-')}")
        cfg.client_ssl()  # the TLS files (or --insecure) are checked before anything else
        self.cfg = cfg
        self.tokenizer = tokenizer
        name = cfg["model"]
        self.model_id = name if name in NAMED_MODELS else Path(name).name
        self.aliases = {name}  # the --model setting itself
        self.created = int(time.time())
        self.pool = _Pool(cfg, cfg["limits.max_sessions"])
        self._stop = asyncio.Event()

    @classmethod
    async def create(cls, cfg: PartyConfig) -> "UserDaemon":
        """Load the tokenizer (the user never loads the weights) and check the settings."""
        return cls(cfg, await asyncio.to_thread(load_tokenizer, cfg["model"]))

    def app(self) -> web.Application:
        """The aiohttp application: the routes and the OpenAI error format."""
        app = web.Application(middlewares=[_errors], client_max_size=MAX_BODY)
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/completions", self._text)
        return app

    async def run(self, on_ready: Ready | None = None) -> None:
        """Set up the sessions, listen on ``listen`` and serve until :meth:`stop`; then let running
        requests finish (up to ``limits.drain_timeout``) and end the sessions."""
        await self.pool.start()
        host, port = parse_addr(self.cfg["listen"])
        runner = web.AppRunner(self.app(), shutdown_timeout=self.cfg["limits.drain_timeout"])
        await runner.setup()
        try:
            site = web.TCPSite(runner, host, port)
            await site.start()
            bound = runner.addresses[0]
            log.info("user party listening on http://%s:%d/v1 (OpenAI-compatible, sessions: %d)", bound[0],
                     bound[1], len(self.pool.slots))
            if on_ready:
                on_ready(bound[0], bound[1])
            await self._stop.wait()
        finally:
            await runner.cleanup()
            await self.pool.close()
            log.info("user party stopped")

    def stop(self) -> None:
        """Stop serving (SIGTERM)."""
        self._stop.set()

    # -- endpoints ------------------------------------------------------------------------------
    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [
            {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "permllm"}]})

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        return await self._complete(request, "chat")

    async def _text(self, request: web.Request) -> web.StreamResponse:
        return await self._complete(request, "text")

    async def _complete(self, request: web.Request, kind: str) -> web.StreamResponse:
        try:
            body = json.loads(await request.read())
        except (ValueError, UnicodeDecodeError) as e:
            raise _bad(f"the request body is not valid JSON: {e}", None, "invalid_json") from None
        req = parse_request(body, kind, self.model_id, self.aliases)
        param = "messages" if kind == "chat" else "prompt"
        try:
            ids = encode_prompt(self.tokenizer, req.prompt, chat=False)
        except ValueError as e:  # e.g. a tokenizer without a chat template
            raise _bad(str(e), param) from None
        if self.pool.arch is not None:  # refuse what cannot fit before waiting for a session
            _fits(self.pool.arch, ids, req.max_tokens, param)
        async with self.pool.lease() as slot:
            session = slot.session
            assert session is not None
            max_new = _fits(session.arch, ids, req.max_tokens, param)
            if _gone(request):  # it left while waiting for a session
                return web.Response(status=499)
            out = _Outcome(len(ids))
            spec = None if slot.drafter is None else session.speculator(slot.drafter, self.cfg["draft_tokens"])
            pieces = _pieces(session, ids, max_new, req, lambda: _gone(request), out, spec)
            try:
                if req.stream:
                    resp = await self._stream(request, req, pieces, out)
                else:
                    async with contextlib.aclosing(pieces) as texts:
                        text = "".join([t async for t in texts])
            except Exception as e:  # the session failed: it is set up again for the next request
                out.error = e
            self._log(kind, out, slot.index)
            if out.gone and not req.stream:
                return web.Response(status=499)  # nobody reads it
            if out.error is not None:
                await _close(session)
                slot.session = None
                if not req.stream:
                    raise _failure(out.error)
            if req.stream:
                return resp
        return web.json_response(self._reply(req, text, out))

    def _log(self, kind: str, out: _Outcome, index: int) -> None:
        took = time.perf_counter() - out.t0
        if out.error is not None:
            log.warning("session %d: failed in a %s completion after %.2f s: %s", index, kind, took,
                        _describe(out.error), exc_info=None if isinstance(out.error, _UNAVAILABLE) else out.error)
            return
        how = "the client left" if out.gone else out.finish
        spec = "" if out.passes is None else f"; {out.passes} verify passes, {out.accepted} drafts accepted"
        log.info("session %d: %s completion: %d prompt tokens, %d tokens in %.2f s (%s%s)", index, kind,
                 out.prompt_tokens, out.completion_tokens, took, how, spec)

    def _reply(self, req: _Request, text: str, out: _Outcome) -> dict[str, Any]:
        if req.kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": out.finish}
            return {"id": _id("chatcmpl"), "object": "chat.completion", "created": int(time.time()),
                    "model": self.model_id, "choices": [choice], "usage": out.usage()}
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": out.finish}
        return {"id": _id("cmpl"), "object": "text_completion", "created": int(time.time()),
                "model": self.model_id, "choices": [choice], "usage": out.usage()}

    async def _stream(self, request: web.Request, req: _Request, pieces: AsyncIterator[str],
                      out: _Outcome) -> web.StreamResponse:
        """Send the completion as server-sent events; a client that leaves ends the generation."""
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        chat = req.kind == "chat"
        head = {"id": _id("chatcmpl" if chat else "cmpl"), "object": "chat.completion.chunk" if chat else
                "text_completion", "created": int(time.time()), "model": self.model_id}

        def chunk(text: str | None, finish: str | None = None, first: bool = False) -> dict[str, Any]:
            if chat:
                delta: dict[str, Any] = {} if text is None else {"content": text}
                if first:
                    delta["role"] = "assistant"
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            return {**head, "choices": [choice], **({"usage": None} if req.include_usage else {})}

        async def send(event: Any) -> bool:
            data = event if isinstance(event, str) else json.dumps(event)
            try:
                await resp.write(f"data: {data}\n\n".encode())
                return True
            except ConnectionError:  # the client has left
                out.gone = True
                return False

        try:
            async with contextlib.aclosing(pieces) as texts:
                if chat and not await send(chunk("", first=True)):
                    return resp
                async for text in texts:
                    if not await send(chunk(text)):
                        return resp  # closing ``texts`` ends the generation at all three parties
        except Exception as e:  # the stream has begun: the error is its last event
            out.error = e
            await send({"error": _failure(e).body()})
            return resp
        if out.gone:
            return resp
        if await send(chunk(None, out.finish)) and req.include_usage:
            await send({**head, "choices": [], "usage": out.usage()})
        await send("[DONE]")
        return resp


def _fits(arch: Any, ids: list[int], max_tokens: int | None, param: str) -> int:
    """The number of tokens to generate (default: the rest of the context); ApiError 400 if the
    prompt and they do not fit the model's context, or the tokenizer made ids the model lacks."""
    if ids and max(ids) >= arch.vocab:
        raise _bad(f"the prompt has token ids the model lacks (its vocabulary has {arch.vocab}): the tokenizer "
                   "does not fit the model", param)
    max_new = arch.max_positions - len(ids) if max_tokens is None else max_tokens
    try:
        check_context(arch, len(ids), max(max_new, 1))
    except ContextTooLong as e:
        raise ApiError(400, f"the request does not fit the model's context: {e}", param=param,
                       code="context_length_exceeded") from None
    except ValueError as e:
        raise _bad(str(e), param) from None
    return max_new


def _failure(e: Exception) -> ApiError:
    """The error of a session that failed during a generation: 503 when a party is unreachable or
    ended it, 500 otherwise."""
    if isinstance(e, _UNAVAILABLE):
        return ApiError(503, f"the private session failed: {_describe(e)}", code="service_unavailable")
    return ApiError(500, f"internal error: {type(e).__name__}", code="internal_error")


def _gone(request: web.Request) -> bool:
    t = request.transport
    return t is None or t.is_closing()


def _id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


@web.middleware
async def _errors(request: web.Request, handler: Callable[[web.Request], Any]) -> web.StreamResponse:
    """Every failure as an OpenAI error object, never a traceback."""
    try:
        return await handler(request)
    except ApiError as e:
        return e.response()
    except web.HTTPException as e:  # aiohttp's own: unknown path, wrong method, body too large
        if e.status < 400:
            raise
        message = {404: f"unknown path {request.path!r} (this endpoint serves /v1/models, "
                        "/v1/chat/completions and /v1/completions)",
                   405: f"{request.method} is not allowed on {request.path}"}.get(e.status, e.text or e.reason)
        return ApiError(e.status, message, code={404: "not_found", 405: "method_not_allowed"}.get(e.status)).response()
    except Exception as e:
        log.error("request %s %s failed: %s", request.method, request.path, _describe(e), exc_info=True)
        return ApiError(500, f"internal error: {type(e).__name__}", code="internal_error").response()
