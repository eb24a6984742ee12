"""Party daemons: the model party and the helper as long-running TCP services.

* :func:`serve_model` loads the weights and calibrates the mask magnitudes once,
  then runs one :class:`ModelSession` per user connection; for each, it connects
  to the helper daemon under the user's session id.
* :func:`serve_helper` pairs the model's and the user's connections by session id
  and runs one :class:`HelperSession` per pair.

A session that fails (peer gone, malformed message) is ended and its state freed;
the daemon keeps serving other sessions. Logs name sessions and errors only,
never weights, masks, shares, prompts or tokens.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Callable

from ..model import DEFAULT_MODEL, LoadedModel, calibrate, load_model
from ..net import Channel, Meter, accept_channel, open_channel, tcp_connect, tcp_serve
from ..protocols import Party, Role, ShareConfig
from .api import parse_addr
from .session import HelperSession, ModelSession

__all__ = ["serve_model", "serve_helper"]

log = logging.getLogger("permllm.daemon")
PAIRING_TIMEOUT = 60.0


async def _close(chans: list[Channel]) -> None:
    for ch in chans:
        with contextlib.suppress(Exception):
            await ch.close()


async def serve_model(listen: str, helper: str, model: str | LoadedModel = DEFAULT_MODEL, *,
                      config: ShareConfig | None = None,
                      on_ready: Callable[[str, int], None] | None = None) -> None:
    """Serve the model party on ``listen`` (HOST:PORT) until cancelled."""
    config = config or ShareConfig()
    lm = model if isinstance(model, LoadedModel) else await asyncio.to_thread(load_model, model)
    mags = await calibrate(lm.weights)
    h_host, h_port = parse_addr(helper)

    async def on_transport(t) -> None:  # type: ignore[no-untyped-def]
        meter = Meter()
        chans: list[Channel] = []
        sid = "?"
        try:
            ch_u, _, sid = await accept_channel(t, meter, role="model", peer_roles={"user"})
            chans.append(ch_u)
            log.info("session %s: user connected", sid)
            th = await tcp_connect(h_host, h_port, peer="helper", retries=10)
            ch_h = await open_channel(th, meter, role="model", peer_role="helper", session=sid)
            chans.append(ch_h)
            ms = ModelSession(Party(Role.MODEL, {Role.USER: ch_u, Role.HELPER: ch_h}, config, meter),
                              lm.weights, mags)
            await ms.setup()
            await ms.serve()
            log.info("session %s: closed by the user", sid)
        except Exception as e:
            log.warning("session %s ended: %s: %s", sid, type(e).__name__, e)
        finally:
            await _close(chans)

    await _serve(listen, on_transport, "model party", on_ready)


async def serve_helper(listen: str, *, config: ShareConfig | None = None,
                       on_ready: Callable[[str, int], None] | None = None) -> None:
    """Serve the helper on ``listen`` (HOST:PORT) until cancelled."""
    config = config or ShareConfig()
    waiting: dict[str, tuple[dict[str, Channel], asyncio.Event]] = {}

    async def on_transport(t) -> None:  # type: ignore[no-untyped-def]
        meter = Meter()
        try:
            ch, role, sid = await accept_channel(t, meter, role="helper", peer_roles={"model", "user"})
        except Exception as e:
            log.warning("rejected a connection: %s", e)
            return
        chans, done = waiting.setdefault(sid, ({}, asyncio.Event()))
        if role in chans:
            log.warning("session %s: a second %s connection was refused", sid, role)
            await ch.close()
            return
        chans[role] = ch
        if len(chans) < 2:
            try:
                await asyncio.wait_for(done.wait(), PAIRING_TIMEOUT)
            except asyncio.TimeoutError:
                log.warning("session %s: no %s connection within %.0f s", sid,
                            "user" if role == "model" else "model", PAIRING_TIMEOUT)
                waiting.pop(sid, None)
                await ch.close()
            return
        waiting.pop(sid, None)
        try:
            hs = HelperSession(Party(Role.HELPER, {Role.MODEL: chans["model"], Role.USER: chans["user"]},
                                     config, meter))
            log.info("session %s: model and user connected", sid)
            await hs.setup()
            await hs.serve()
            log.info("session %s: closed by the user", sid)
        except Exception as e:
            log.warning("session %s ended: %s: %s", sid, type(e).__name__, e)
        finally:
            done.set()
            await _close(list(chans.values()))

    await _serve(listen, on_transport, "helper", on_ready)


async def _serve(listen: str, on_transport, what: str,  # type: ignore[no-untyped-def]
                 on_ready: Callable[[str, int], None] | None) -> None:
    host, port = parse_addr(listen)
    server = await tcp_serve(host, port, on_transport, peer="client")
    bound = server.sockets[0].getsockname()
    log.info("%s listening on %s:%d", what, bound[0], bound[1])
    if on_ready:
        on_ready(bound[0], bound[1])
    try:
        async with server:
            await server.serve_forever()
    except asyncio.CancelledError:
        pass
