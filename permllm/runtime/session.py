"""One private-inference session, as three per-party programs.

Each party runs the same :class:`~permllm.model.forward.Forward` through its own
branch of the protocol ops. The life of a session:

1. **setup** (once): seeds; M publishes the architecture and the calibrated mask
   magnitudes (public); the masked weights D = W − U_W go to U (in the light mode,
   U's CKKS keys go to M instead).
2. per generation request from U (``prompt_len``, ``max_new_tokens``: public):
   * **offline** — every party runs the forward's offline branch for upcoming
     tokens, ahead of the online phase (a window of :data:`OFFLINE_AHEAD` tokens);
     the helper runs only this phase. U and H run the prefill alone, then the decode
     steps in batches of :data:`DEALT_BATCH`, each linear op's products of a batch as
     one matrix product (a decode step alone reads every weight for one row). In the light mode (``offline="he"``: no masked
     weights at U, CKKS products instead) U and M run the steps in batches — the
     prefill with the first decode steps (:data:`LIGHT_FIRST` steps), then runs of up
     to :data:`LIGHT_BATCH` steps — each batch's linear ops in one exchange per op, and
     a batch starts once the online phase has used the previous one (U's memory holds
     one batch: once its HE exchange is over, the masks of its decode steps, so that
     U's online steps need not draw them).
   * **online** — M and U run each step: embedding, layers, final norm, head, and
     private token selection; U learns the token and tells M whether to go on.
   * **speculation** (``speculate``: public) — after the prompt's steps each step is a
     *verify pass* over the last token and K drafts of U's (:mod:`.speculate`): selection at
     every row, U keeps the accepted drafts and one more token. A pass's shape depends on
     the previous pass's acceptance, so U's control map after each pass (:class:`_Passes`)
     tells M and H how many rows to keep and K of the next pass; all three cut the
     generation's KV caches back to the kept rows, then run the next pass's offline phase
     just in time, then its online phase.

Message tags are keyed by op name and a session-wide token index, so masks are
never reused across steps or generations.
"""
from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass
from typing import AsyncIterator, Awaitable, Callable

import numpy as np

from ..model import (Arch, Forward, ModelWeights, PrivateOps, StepShape, calibrate, setup_embedding, weight_names,
                     weight_shape)
from ..model.layout import prompt_steps
from ..model.forward import Fx, RingPlan, resolve_arith, weight_fracs, wide_weights
from ..protocols import Party, ProtocolError, Role, setup_weight
from ..protocols import crt, ring
from ..protocols.linear import dealt_batch
from ..protocols import he_matmul
from ..protocols.sampling import Sampler, Uniform, make_rng
from ..protocols.select import select_token
from .speculate import Speculator

__all__ = ["ModelSession", "UserSession", "HelperSession", "ContextTooLong", "OFFLINE_AHEAD", "DEALT_BATCH",
           "offline_batches", "PREFILL_CHUNK",
           "LIGHT_FIRST", "LIGHT_BATCH"]

OFFLINE_AHEAD = 8  # window units the offline phase may run ahead of the online phase: a decode step takes one
CHUNK_UNITS = OFFLINE_AHEAD // 2  # and a chunk of the prompt half the window: two chunks are in flight at most
PREFILL_CHUNK = 256  # prompt tokens per prefill step: each party holds a chunk's offline material, not the prompt's
LAYER_LEAD = 2  # a chunk's offline phase runs at most this many layers ahead of its online phase (_Pace)
DEALT_BATCH = 4    # decode steps whose offline products U and H compute together (at most half the window)
LIGHT_FIRST = 8    # light mode: steps in the first offline batch (the prefill and the first decode steps)
LIGHT_BATCH = 32   # light mode: steps per later batch (the fixed costs of its HE products are paid once per batch)
Progress = Callable[[str, int, int], None]


class ContextTooLong(ValueError):
    """The prompt plus the tokens to generate do not fit the model's context."""


def check_context(arch: Arch, prompt_len: int, max_new_tokens: int) -> None:
    """Raise :class:`ContextTooLong` (or ValueError) before any work when a request cannot fit."""
    if prompt_len < 1:
        raise ValueError("the prompt is empty")
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be at least 1")
    if prompt_len + max_new_tokens > arch.max_positions:
        raise ContextTooLong(f"prompt of {prompt_len} tokens + {max_new_tokens} new tokens exceeds the model's "
                             f"context of {arch.max_positions} tokens")


@dataclass
class _Gen:
    """Public parameters of one generation: the prompt's steps (chunks, :func:`prompt_steps`), then one
    step per generated token after the first (which ends the prompt's last step)."""

    index: int
    base: int
    prompt_len: int
    max_new: int
    ahead: int = OFFLINE_AHEAD  # window units the offline phase may run ahead (:meth:`units`)
    chunk: int = 0  # prompt tokens per prefill step (0: the whole prompt in one)
    first: int = 1  # steps of the prompt
    pacing: bool = True  # pace the prompt's steps layer by layer (not when the window holds the whole generation)
    speculate: bool = False  # after the prompt's steps, verify passes (:class:`_Passes`)

    @property
    def steps(self) -> int:
        return self.first - 1 + self.max_new

    @property
    def dealt(self) -> int:
        """Steps whose offline phase runs ahead of the online one: all of them, or with speculation the
        prompt's (a verify pass's shape depends on the previous pass: its offline phase runs just in time)."""
        return self.first if self.speculate else self.steps

    @property
    def tokens(self) -> range:
        """The token indices of this generation's steps."""
        return range(self.base, self.base + self.steps)

    def units(self, step: int) -> int:
        """Window units of ``step``'s offline material until its online step is over: a chunk of the
        prompt takes :data:`CHUNK_UNITS` (a whole prompt, one unit: it runs alone), a decode step one."""
        return CHUNK_UNITS if step < self.first and self.first > 1 else 1

    def emitted(self, step: int) -> int:
        """Index of the generated token ``step`` ends in (the prompt's chunks count to the first)."""
        return max(0, step - self.first + 1)

    def shape(self, arch: Arch, step: int) -> StepShape:
        return StepShape(arch, self.prompt_len, step, self.chunk if self.first > 1 else 0)

    def paced(self, step: int) -> bool:
        """A step of the prompt (a chunk, or the whole prompt in one): its offline phase is paced layer by
        layer (:class:`_Pace`)."""
        return self.pacing and step < self.first


class _Passes:
    """Where a speculative generation stands, as each party tracks it from U's public control maps.

    After the prompt's last step (taken as a pass of one row and no drafts) and after each verify
    pass U sends ``{"go": bool, "keep": n, "next": K}``: the pass accepted n of its drafts (its first
    n + 1 rows stay in the KV caches) and the next pass verifies K drafts. Every pass emits at least
    one token, so a generation of ``max_new`` tokens takes at most ``max_new`` − 1 passes after the
    prompt: the steps (and token indices) of :class:`_Gen` hold them.
    """

    def __init__(self, g: _Gen) -> None:
        self.g = g
        self.step = g.first - 1  # the step that ran last
        self.past = g.prompt_len - 1  # rows cached before it
        self.k = 0  # its drafts
        self.emitted = 0  # tokens emitted before it

    def advance(self, ctl: object) -> bool:
        """Check U's control map after the current pass; move to the next pass (True) or end (False)."""
        where = f"speculation control after step {self.step} of generation {self.g.index}"
        if not (isinstance(ctl, dict) and set(ctl) == {"go", "keep", "next"} and type(ctl["go"]) is bool
                and type(ctl["keep"]) is int and type(ctl["next"]) is int):
            raise ProtocolError(f"malformed {where}: expected a map of go (a bool), keep and next (ints), "
                                f"got {ctl!r}")
        keep, k = ctl["keep"], ctl["next"]
        if not 0 <= keep <= self.k:
            raise ProtocolError(f"{where}: keeps {keep} drafts of a pass that verified {self.k}")
        if not ctl["go"]:
            return False
        emitted = self.emitted + keep + 1
        if k < 0 or emitted + k + 1 > self.g.max_new:
            raise ProtocolError(f"{where}: a pass of {k} drafts after {emitted} tokens would pass the "
                                f"generation's {self.g.max_new} tokens")
        self.step, self.past, self.k, self.emitted = self.step + 1, self.past + 1 + keep, k, emitted
        return True

    def shape(self, arch: Arch) -> StepShape:
        """The current pass: the last emitted token and K drafts after the kept rows."""
        return StepShape.verify(arch, self.g.prompt_len, self.past, self.k + 1)


class _At:
    """The uniform draw of the generation's ``k``-th token: the k-th of its rng, as a step-by-step
    generation draws them, so a pass's rows (chosen concurrently) draw what those tokens would."""

    __slots__ = ("draws", "k")

    def __init__(self, draws: "_Draws", k: int) -> None:
        self.draws, self.k = draws, k

    def random(self) -> float:
        d = self.draws
        while len(d.got) <= self.k:
            d.got.append(float(d.rng.random()))
        return d.got[self.k]


class _Draws:
    """A generation's rng, drawn by token position (:class:`_At`)."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng, self.got = rng, []  # type: ignore[var-annotated]

    def at(self, k: int) -> _At:
        return _At(self, k)


class _Pace:
    """How far a generation's chunked prefill has got, layer by layer, in each phase at one party.

    A position is ``step·(layers + 1) + layer`` (layer ``layers``: the final norm and head). The
    offline phase enters a position only once the online phase (U's, as U reports it to H) has
    entered the position :data:`LAYER_LEAD` before it, and the online phase enters one once the
    offline phase has finished it: each party holds a few layers of a chunk's offline material,
    not the prompt's, whatever the prompt length.
    """

    def __init__(self, layers: int) -> None:
        self.width = layers + 1
        self.online = -1  # the last position the online phase entered
        self.offline: dict[int, int] = {}  # step -> layers (gates) the offline phase has passed
        self._tick = asyncio.Event()

    def _bump(self) -> None:
        self._tick.set()
        self._tick = asyncio.Event()

    async def _until(self, ok: Callable[[], bool]) -> None:
        while not ok():
            await self._tick.wait()

    def entered_online(self, step: int, layer: int) -> None:
        self.online = step * self.width + layer
        self._bump()

    def passed_offline(self, step: int, gates: int) -> None:
        self.offline[step] = gates
        self._bump()

    async def offline_may_enter(self, step: int, layer: int) -> None:
        await self._until(lambda: self.online >= step * self.width + layer - LAYER_LEAD)

    async def online_may_enter(self, step: int, layer: int) -> None:
        """Layer ``layer`` of ``step`` (−1: the embedding before layer 0) is done offline."""
        await self._until(lambda: self.offline.get(step, -1) > layer)


class _Party:
    """What the three party programs share: the forward, the setup of weights, the offline runner."""

    def __init__(self, p: Party) -> None:
        self.p = p
        self.arch: Arch | None = None
        self.mags: dict[str, float] = {}
        self.weights: ModelWeights | None = None
        self.plan: RingPlan | None = None  # the ring's public precision (config.ring)
        self.next_token = 0
        self.gens = 0
        self.offline_s = 0.0  # wall time spent in offline steps (they overlap the online phase)
        self.offline_step_s: list[float] = []  # this generation's offline seconds per step (batches split evenly)
        self.progress: Progress | None = None  # progress of the setup and offline phases
        self.pace: _Pace | None = None  # the running generation's chunked prefill, layer by layer
        self.off: asyncio.Task | None = None  # the running generation's offline phase
        self.ready: list[asyncio.Event] = []  # the running generation's steps done offline

    def tell_end(self, g: _Gen, *to: Role) -> None:
        """Tell ``to`` that this party has sent all it will for generation ``g`` (the channels keep order)."""
        for r in to:
            self.p.view("offline", g.base).send(r, ("ctl", g.index, "end"), True)

    async def await_end(self, g: _Gen, frm: Role) -> None:
        """Wait until ``frm`` has sent all it will for generation ``g`` (:meth:`tell_end`)."""
        if await self.p.view("offline", g.base).recv(frm, ("ctl", g.index, "end")) is not True:
            raise ProtocolError(f"malformed end of generation from the {frm.value} party")

    def ops(self, phase: str, token: int, gen: int) -> tuple[Party, PrivateOps]:
        pv = self.p.view(phase, token)
        return pv, PrivateOps(pv, self.arch, self.mags, self.weights, f"g{gen}.", plan=self.plan)  # type: ignore[arg-type]

    async def step(self, phase: str, g: _Gen, step: int, ids: list[int] | None,
                   rng: Uniform | None, sampler: Sampler) -> int | None:
        """One forward step and token selection in ``phase``; the token id at U online."""
        got = await self._forward(phase, g, step, g.shape(self.arch, step), ids, [rng], sampler)  # type: ignore[arg-type]
        return None if got is None else got[0]

    async def verify(self, phase: str, g: _Gen, sp: _Passes, ids: list[int] | None = None,
                     rngs: list[Uniform] | None = None, sampler: Sampler | None = None,
                     gate: Callable[[int], Awaitable[None]] | None = None) -> list[int] | None:
        """The current verify pass of ``sp`` in ``phase``: at U online, the tokens chosen at its K + 1 rows.
        ``gate``: awaited before each layer (:meth:`PrivateOps.gate`)."""
        shape = sp.shape(self.arch)  # type: ignore[arg-type]
        return await self._forward(phase, g, sp.step, shape, ids, rngs or [None] * shape.T,  # type: ignore[list-item]
                                   sampler or Sampler(), gate)

    async def overlapped(self, g: _Gen, sp: _Passes, ids: list[int] | None = None,
                         rngs: list[Uniform] | None = None, sampler: Sampler | None = None) -> list[int] | None:
        """The current verify pass with its offline phase (just in time: the pass's shape is known only now)
        running alongside its online phase, which enters each layer once the offline phase has done it: the
        offline work hides in the online phase's waits for the peer (M and U; the helper only deals). Returns
        what :meth:`verify` online does; the offline seconds count in :attr:`offline_s`."""
        pace, step = _Pace(self.arch.layers), sp.step  # type: ignore[union-attr]

        async def offline() -> None:
            t0 = time.perf_counter()
            await self.verify("offline", g, sp, gate=lambda layer: _passed(pace, step, layer))
            pace.passed_offline(step, self.arch.layers + 1)  # type: ignore[union-attr]
            self.offline_s += time.perf_counter() - t0

        async def online(layer: int) -> None:
            await _first(pace.online_may_enter(step, layer), off)

        off = asyncio.create_task(offline())
        try:
            await online(-1)  # the embedding
            got = await self.verify("online", g, sp, ids, rngs, sampler, gate=online)
            await off
            return got
        finally:
            await _cancel(off)

    async def _forward(self, phase: str, g: _Gen, step: int, shape: StepShape, ids: list[int] | None,
                       rngs: list[Uniform | None], sampler: Sampler,
                       gate: Callable[[int], Awaitable[None]] | None = None) -> list[int | None] | None:
        """The forward of ``step`` and private selection at each row with logits (a pass's concurrently,
        ``select/i``: still three hops); None for a chunk of the prompt before its last."""
        pv, ops = self.ops(phase, g.base + step, g.index)
        if gate is not None:
            ops.pace = gate
        elif g.paced(step):
            ops.pace = self._gate(phase, g, step)
        logits = await Forward(self.arch).step(ops, ids, shape)  # type: ignore[arg-type]
        if not shape.emits:
            return None
        enc = None
        if isinstance(logits, Fx):
            enc = ring.Enc(logits.scale, logits.bits, ops._range("logits"))
            logits = logits.v
        rows = [None] * shape.out if logits is None else list(logits.reshape(shape.out, -1))

        def select(name: str, row: np.ndarray | None, rng: Uniform | None) -> Awaitable[int | None]:
            return select_token(pv, name, row, sampler=sampler, rng=rng, mag=self.mags["logits"],
                                vocab=self.arch.vocab, enc=enc)  # type: ignore[union-attr]
        async with pv.traced("select"):
            if g.speculate and step >= g.first:
                return list(await asyncio.gather(*(select(f"select/{i}", r, q)
                                                   for i, (r, q) in enumerate(zip(rows, rngs)))))
            return [await select("select", rows[0], rngs[0])]

    def rollback(self, g: _Gen, rows: int) -> None:
        """Cut generation ``g``'s KV caches to their first ``rows`` rows: every array under its prefix (the
        12-hop and 8-hop routes' K and V, every residue lane's, U's /bu and /opened, H's /bu and /beta,
        M's /bm) keeps its rows on axis −2."""
        prefix = f"g{g.index}."
        for key, v in self.p.caches.items():
            if key.startswith(prefix) and v.shape[-2] > rows:
                self.p.caches[key] = v[..., :rows, :]

    def forget(self, g: _Gen) -> None:
        """Drop what this party holds of generation ``g`` once it has ended here: what the offline phase kept
        for its tokens and its KV caches (every array under its prefix). No later generation reads them, and
        a long session would otherwise hold every past generation's caches."""
        self.p.forget(g.tokens)
        prefix = f"g{g.index}."
        for key in [k for k in self.p.caches if k.startswith(prefix)]:
            del self.p.caches[key]

    def _gate(self, phase: str, g: _Gen, step: int) -> Callable[[int], Awaitable[None]]:
        """The per-layer pacing of a chunk of the prompt (:class:`_Pace`) in ``phase``."""
        pace = self.pace
        assert pace is not None

        async def offline(layer: int) -> None:
            if not self.p.is_helper:  # H follows U's online phase, as U reports it (HelperSession.credits)
                pace.passed_offline(step, layer)
            await pace.offline_may_enter(step, layer)

        async def online(layer: int) -> None:
            pace.entered_online(step, layer)
            if self.p.is_user:
                self.p.view("offline", g.base + step).send(Role.HELPER, at_tag(g, step, layer), True)
            await self.offline_done(g, step, layer)
        return offline if phase == "offline" else online

    async def offline_done(self, g: _Gen, step: int, layer: int = -1) -> None:
        """Wait until the offline phase has done ``step`` (a chunk of the prompt: its ``layer``, −1 the
        embedding), failing at once if the offline phase failed."""
        wait = self.pace.online_may_enter(step, layer) if g.paced(step) else self.ready[step].wait()  # type: ignore[union-attr]
        await _first(wait, self.off)  # type: ignore[arg-type]

    def start_offline(self, g: _Gen, window: asyncio.Semaphore | None) -> asyncio.Task:
        """Start generation ``g``'s offline phase of its first ``g.dealt`` steps (readiness: :meth:`offline_done`)."""
        self.ready = [asyncio.Event() for _ in range(g.dealt)]
        self.pace = _Pace(self.arch.layers)  # type: ignore[union-attr]
        self.off = asyncio.create_task(self.offline(g, window))
        return self.off

    async def offline(self, g: _Gen, window: asyncio.Semaphore | None) -> None:
        if self.p.config.offline == "he" and not self.p.is_helper:
            return await self.offline_light(g, window)
        self.offline_step_s = [0.0] * g.max_new
        batched = self.p.config.offline == "dealer" and not self.p.is_model
        for batch in offline_batches(g.dealt, max(1, min(DEALT_BATCH, g.ahead // 2)) if batched else 1, g.first):
            if window is not None:
                for step in batch:
                    for _ in range(g.units(step)):
                        await window.acquire()
            t0 = time.perf_counter()
            # A chunk of the prompt sends its products layer by layer (it is paced): not in a batch.
            async with dealt_batch(self.p, [g.base + s for s in batch]) if not g.paced(batch[0]) else _nothing():
                for step in batch:
                    await self.step("offline", g, step, None, None, Sampler())
            self._timed(g, batch, time.perf_counter() - t0)
            for step in batch:
                self.ready[step].set()
                if g.paced(step) and self.pace is not None:
                    self.pace.passed_offline(step, self.arch.layers + 1)  # type: ignore[union-attr]
                if self.progress:
                    self.progress("offline", step + 1, g.dealt)

    def _timed(self, g: _Gen, batch: list[int], seconds: float) -> None:
        """Count a batch's offline seconds, split evenly over its steps (a prompt's chunks: to the first token)."""
        self.offline_s += seconds
        for step in batch:
            self.offline_step_s[g.emitted(step)] += seconds / len(batch)

    async def offline_light(self, g: _Gen, window: asyncio.Semaphore | None) -> None:
        """U and M in the light mode: the offline phase in batches of steps, one HE exchange per op and batch.

        The first batch is the prefill with the first decode steps (:data:`LIGHT_FIRST` in
        all), the later ones ``g.ahead`` steps each (U's request sets the window to the
        largest batch); a later batch waits until the online phase has used the previous
        one (it takes the whole window), so U holds one batch. A request with the whole
        generation ahead (``offline_first``) is one batch.
        """
        self.offline_step_s = [0.0] * g.max_new
        steps = list(range(g.max_new))
        whole = g.ahead >= g.max_new
        first = g.max_new if whole else min(LIGHT_FIRST, g.ahead)
        batches = [steps[:first]] + [steps[i:i + g.ahead] for i in range(first, g.max_new, g.ahead)]
        for i, batch in enumerate(batches):
            if window is not None:
                need = g.ahead if i else len(batch)
                for _ in range(need):
                    await window.acquire()
                for _ in range(need - len(batch)):
                    window.release()
            t0 = time.perf_counter()
            he_matmul.open_batch(self.p, [g.base + s for s in batch])
            try:  # U's masks of the decode steps are drawn after the exchange (Party.mask_plan)
                async with self.p.mask_plan(g.base + s for s in batch if s > 0):
                    for step in batch:
                        await self.step("offline", g, step, None, None, Sampler())
                    await he_matmul.close_batch(self.p)
            finally:
                he_matmul.abort_batch(self.p)
            self._timed(g, batch, time.perf_counter() - t0)
            for step in batch:
                self.ready[step].set()
                if self.progress:
                    self.progress("offline", step + 1, g.max_new)

    async def setup_weights(self, progress: Progress | None) -> None:
        route = self.p.config.attention_route
        names = weight_names(self.arch, route, self.p.config.offline)  # type: ignore[arg-type]
        fracs = {} if self.plan is None or not self.p.is_model else weight_fracs(self.arch, self.weights, self.plan,
                                                                                 route)  # type: ignore[arg-type]
        for i, (name, _) in enumerate(names):
            if self.p.is_model:
                await setup_weight(self.p, name, self.weights[name], frac=fracs.get(name))  # type: ignore[index]
            else:
                await setup_weight(self.p, name, shape=weight_shape(self.arch, name))  # type: ignore[arg-type]
            if progress:
                progress("setup", i + 1, len(names))
        if self.plan is not None and self.plan.wide:  # the attention block's weights mod each prime as well
            for name in wide_weights(self.arch, route):  # type: ignore[arg-type]
                for i, q in enumerate(crt.PRIMES):
                    rv = self.p.residue(q)
                    if self.p.is_model:
                        await setup_weight(rv, f"{name}#q{i}", self.weights[name], frac=fracs[name])  # type: ignore[index]
                    else:
                        await setup_weight(rv, f"{name}#q{i}", shape=weight_shape(self.arch, name))  # type: ignore[arg-type]
        await setup_embedding(self.p, self.weights, self.arch)  # type: ignore[arg-type]

    async def requests(self) -> AsyncIterator[_Gen]:
        """U's generation requests, validated, until U closes the session (M and H)."""
        while True:
            req = await self.p.recv(Role.USER, ("ctl", self.gens, "req"))
            if isinstance(req, str) and req == "close":
                return
            yield self.accept(req)

    def accept(self, req: object) -> _Gen:
        """Validate a generation request from U (M and H)."""
        if not (isinstance(req, dict) and all(isinstance(req.get(k), int) for k in ("base", "prompt_len", "max_new"))):
            raise ProtocolError(f"malformed generation request (a {type(req).__name__}): expected a map of "
                                "base, prompt_len and max_new integers")
        chunk = req.get("chunk", 0)
        if not isinstance(chunk, int) or chunk < 0:
            raise ProtocolError(f"generation request: bad prefill chunk {chunk!r}")
        first = prompt_steps(self.arch, req["prompt_len"], chunk)  # type: ignore[arg-type]
        if first > 1 and self.p.config.offline == "he":
            raise ProtocolError("generation request: the light mode prefills the prompt in one step (chunk 0)")
        speculate = req.get("speculate", False)
        if type(speculate) is not bool or (speculate and self.p.config.offline == "he"):
            raise ProtocolError(f"generation request: bad speculation flag {speculate!r} (a bool; the light mode "
                                "has no verify passes)")
        if req["base"] != self.next_token:
            raise ProtocolError(f"generation request starts at token {req['base']}, expected {self.next_token}")
        try:
            check_context(self.arch, req["prompt_len"], req["max_new"])  # type: ignore[arg-type]
        except ValueError as e:
            raise ProtocolError(f"generation request refused: {e}") from e
        g = _Gen(self.gens, req["base"], req["prompt_len"], req["max_new"], OFFLINE_AHEAD, chunk, first,
                 speculate=speculate)
        g.ahead = req.get("ahead", OFFLINE_AHEAD)
        if not isinstance(g.ahead, int) or not max(g.units(0), 1) <= g.ahead <= whole_window(g) + OFFLINE_AHEAD:
            raise ProtocolError(f"generation request: bad offline window {g.ahead!r}")
        # The light mode's first batch is the prefill with the first decode steps, in one HE exchange per op.
        g.pacing = g.ahead < whole_window(g) and self.p.config.offline != "he"
        self.gens += 1
        self.next_token += g.steps
        return g


def offline_batches(steps: int, size: int, first: int = 1) -> list[list[int]]:
    """The dealt mode's offline batches of a generation: each of the prompt's ``first`` steps alone, then
    ``size`` steps each."""
    return [[s] for s in range(min(first, steps))] + [list(range(i, min(i + size, steps)))
                                                      for i in range(first, steps, size)]


def used_tag(g: _Gen, step: int) -> tuple:
    """Tag of U's word to H that its online step ``step`` is over (H's window, :meth:`HelperSession.credits`)."""
    return ("flow", "used", g.base + step, "u")


def at_tag(g: _Gen, step: int, layer: int) -> tuple:
    """Tag of U's word to H that its online phase entered ``layer`` of a chunk of the prompt (:class:`_Pace`)."""
    return ("flow", "at", g.base + step, layer)


@contextlib.asynccontextmanager
async def _nothing() -> AsyncIterator[None]:
    yield


def whole_window(g: _Gen) -> int:
    """The window that holds a whole generation's offline material (``offline_first``; with speculation the
    prompt's: the passes' runs just in time)."""
    return sum(g.units(s) for s in range(g.dealt))


def _light_ahead(max_new: int) -> int:
    """The light mode's window: the largest batch (the first one, or up to LIGHT_BATCH later steps)."""
    if max_new <= LIGHT_FIRST:
        return max_new
    return max(LIGHT_FIRST, min(LIGHT_BATCH, max_new - LIGHT_FIRST))


async def _cancel(task: asyncio.Task) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


class ModelSession(_Party):
    """The model party: holds the weights; learns neither the prompt nor the tokens."""

    def __init__(self, p: Party, weights: ModelWeights, mags: dict[str, float] | None = None) -> None:
        super().__init__(p)
        self.weights, self.arch = weights, weights.arch
        self.mags = dict(mags or {})

    async def setup(self, progress: Progress | None = None) -> None:
        p = self.p
        await p.establish_seeds()
        if not self.mags:
            self.mags = await calibrate(self.weights)
        info = {"arch": self.arch.to_dict(), "mags": self.mags, "config": _config_terms(p)}
        arith, self.plan = resolve_arith(p.config.arith, p.config.ring_possible, self.weights, self.mags,
                                         p.config.attention_route)
        p.ring = arith == "ring"
        info["arith"] = arith
        if self.plan is not None:
            info["ring"] = self.plan.to_list()
        p.send(Role.USER, ("hello", "model"), info)
        p.send(Role.HELPER, ("hello", "model"), info)
        await self.setup_weights(progress)
        if p.config.offline == "he":
            await he_matmul.setup_ckks(p)

    async def serve(self) -> None:
        """Answer generation requests until U closes the session."""
        async for g in self.requests():
            window = asyncio.Semaphore(g.ahead)
            off = self.start_offline(g, window)
            try:
                for step in range(g.dealt):
                    await self.offline_done(g, step)
                    await self.step("online", g, step, None, None, Sampler())
                    for _ in range(g.units(step)):
                        window.release()
                    if step < g.first - 1:
                        continue  # a chunk of the prompt: no token, no word from U
                    go = await self.p.view("online", g.base + step).recv(Role.USER, ("ctl", g.index, step))
                    if g.speculate:
                        await self.passes(g, go)
                        break
                    if not isinstance(go, bool):
                        raise ProtocolError(f"malformed step control {('ctl', g.index, step)} from the user: "
                                            f"expected true or false, got {type(go).__name__}")
                    if not go:
                        break
            finally:
                await _cancel(off)
                self.forget(g)
            # Once U and H have sent all they will for this generation, what they sent for steps
            # that did not run is dropped.
            for r in (Role.USER, Role.HELPER):
                await self.await_end(g, r)
            self.p.discard_unread(g.tokens)

    async def passes(self, g: _Gen, ctl: object) -> None:
        """The verify passes U asks for by its control maps (``ctl``: the one after the prompt's last step),
        each pass's offline phase just before its online one."""
        sp = _Passes(g)
        while sp.advance(ctl):
            self.rollback(g, sp.past)
            await self.overlapped(g, sp)
            ctl = await self.p.view("online", g.base + sp.step).recv(Role.USER, ("ctl", g.index, sp.step))


async def _passed(pace: _Pace, step: int, layer: int) -> None:
    """An overlapped pass's offline gate: everything before ``layer`` is done (:meth:`_Party.overlapped`)."""
    pace.passed_offline(step, layer)


async def _first(wait: object, task: asyncio.Task) -> None:
    """Await ``wait`` but fail at once if ``task`` (the offline runner) failed first."""
    w = asyncio.ensure_future(wait)  # type: ignore[arg-type]
    done, _ = await asyncio.wait({w, task}, return_when=asyncio.FIRST_COMPLETED)
    if w not in done:
        w.cancel()
        task.result()  # raises the offline failure
        raise ProtocolError("offline phase ended early")


class HelperSession(_Party):
    """The helper (dealer): derives every correlation offline; never sees an online message."""

    async def setup(self) -> None:
        await self.p.establish_seeds()
        info = await self.p.recv(Role.MODEL, ("hello", "model"))
        self.arch, self.mags, self.plan = _read_info(info, self.p)
        await self.setup_weights(None)

    async def serve(self) -> None:
        """Deal the offline phase of each generation U requests, until U says the generation ended
        (it may stop early: H then stops dealing) and, at last, closes the session."""
        async for g in self.requests():
            window = asyncio.Semaphore(g.ahead)
            off = self.start_offline(g, window)
            if g.speculate:
                off = asyncio.create_task(self.deal_passes(g, off))
            credit = asyncio.create_task(self.credits(g, window))
            end = asyncio.ensure_future(self.await_end(g, Role.USER))
            watch = {off, credit}
            try:
                while not end.done():
                    done, _ = await asyncio.wait(watch | {end}, return_when=asyncio.FIRST_COMPLETED)
                    for t in done - {end}:
                        if not end.done():
                            t.result()  # raises the offline failure, or a malformed credit or control map
                        watch.discard(t)
                await end
            finally:
                end.cancel()
                await _cancel(off)
                await _cancel(self.off)  # type: ignore[arg-type]
                await _cancel(credit)
                self.forget(g)
            self.p.discard_unread(g.tokens)  # U's credits for steps H had dealt already
            self.tell_end(g, Role.MODEL, Role.USER)

    async def credits(self, g: _Gen, window: asyncio.Semaphore) -> None:
        """Free the window as U reports its online steps done (:func:`used_tag`): H deals at most
        ``g.ahead`` units ahead of U, so neither U nor M buffers more of its material than that."""
        pace = self.pace
        assert pace is not None
        for step in range(g.dealt):
            pv = self.p.view("offline", g.base + step)
            for layer in range(self.arch.layers + 1) if g.paced(step) else ():  # type: ignore[union-attr]
                if await pv.recv(Role.USER, at_tag(g, step, layer)) is not True:
                    raise ProtocolError(f"malformed pacing word for step {step} from the user party")
                pace.entered_online(step, layer)
            if await pv.recv(Role.USER, used_tag(g, step)) is not True:
                raise ProtocolError(f"malformed offline credit for step {step} from the user party")
            for _ in range(g.units(step)):
                window.release()

    async def deal_passes(self, g: _Gen, prompt: asyncio.Task) -> None:
        """After the prompt's offline phase (``prompt``), deal each verify pass U asks for by its control map
        (U sends H the maps of the passes that run; the end of the generation is U's end word)."""
        await prompt
        sp = _Passes(g)
        while sp.advance(await self.p.view("offline", g.base + sp.step).recv(Role.USER, ("ctl", g.index, sp.step))):
            self.rollback(g, sp.past)
            await self.verify("offline", g, sp)


def _config_terms(p: Party) -> list:
    """What all three parties must agree on: share dtype, mask ratio, attention route, offline mode, arithmetic."""
    return [p.config.dtype, p.config.ratio, p.config.attention_route, p.config.offline, p.config.arith]


def _read_info(info: object, p: Party) -> tuple[Arch, dict[str, float | np.ndarray], RingPlan | None]:
    if not (isinstance(info, dict) and isinstance(info.get("arch"), dict) and isinstance(info.get("mags"), dict)):
        raise ProtocolError("malformed model description from the model party")
    cfg = info.get("config")
    if cfg != _config_terms(p):
        raise ProtocolError(f"share configuration mismatch: model party uses {cfg}, "
                            f"this party {_config_terms(p)} (dtype, ratio, attention route, offline mode, arithmetic)")
    mags: dict[str, float | np.ndarray] = {}
    for k, v in info["mags"].items():
        a = np.asarray(v, dtype=np.float64)
        if a.ndim > 1 or not np.all(np.isfinite(a)) or np.any(a <= 0):
            raise ProtocolError(f"malformed mask magnitude {k!r} from the model party")
        mags[str(k)] = a if a.ndim else float(a)
    arith = info.get("arith")
    if arith not in ("ring", "float") or p.config.arith not in ("auto", arith) or (
            arith == "ring" and not p.config.ring_possible):
        raise ProtocolError(f"the model party chose {arith!r} arithmetic; this party is configured for "
                            f"{p.config.arith!r}")
    p.ring = arith == "ring"
    plan = None
    if p.ring:
        try:
            plan = RingPlan.from_list(info.get("ring"))
        except ValueError as e:
            raise ProtocolError(f"model party's description: {e}") from None
    return Arch.from_dict(info["arch"]), mags, plan


class UserSession(_Party):
    """The user party: holds the prompt, sees permuted activations, learns the tokens."""

    async def setup(self, progress: Progress | None = None) -> Arch:
        p = self.p
        self.progress = progress
        await p.establish_seeds()
        info = await p.recv(Role.MODEL, ("hello", "model"))
        self.arch, self.mags, self.plan = _read_info(info, p)
        await self.setup_weights(progress)
        if p.config.offline == "he":
            await he_matmul.setup_ckks(p)
        return self.arch

    async def generate(self, prompt_ids: list[int], max_new_tokens: int,
                       sampler: Sampler | None = None, stop_at_eos: bool = True,
                       offline_first: bool = False, prefill_chunk: int = PREFILL_CHUNK,
                       speculate: Speculator | None = None) -> AsyncIterator[int]:
        """Yield generated token ids as they come; stops at the limit or (``stop_at_eos``) an end id.

        The prompt is fed in steps of ``prefill_chunk`` tokens (0: one step), each attending to the
        cache of the ones before, so each party holds the offline material of a chunk or two, not of
        the whole prompt (the light mode feeds it in one). With ``offline_first`` the whole offline
        phase runs before the first online step (benchmarks: the online time then excludes it, and
        memory holds all of it); otherwise it runs ahead by a window.

        With ``speculate`` every step after the prompt's is a verify pass of the speculator's drafts
        (:class:`_Passes`; its offline phase just in time, alongside its online phase, :meth:`overlapped`, or
        with ``offline_first`` before it): the same tokens (greedy, or sampling with a
        seed: the k-th token takes the k-th draw of the rng either way), in fewer dependent hops when
        the drafts are accepted. M and H learn K and the accepted count of every pass.
        """
        arch, p = self.arch, self.p
        assert arch is not None, "setup() first"
        sampler = sampler or Sampler()
        check_context(arch, len(prompt_ids), max_new_tokens)
        if any(not 0 <= int(t) < arch.vocab for t in prompt_ids):
            raise ValueError(f"prompt token id out of range [0, {arch.vocab})")
        if speculate is not None and p.config.offline == "he":
            raise ValueError("speculative decoding needs the dealt offline phase (the light mode has no verify passes)")
        chunk = 0 if p.config.offline == "he" else int(prefill_chunk)
        g = _Gen(self.gens, self.next_token, len(prompt_ids), max_new_tokens, chunk=chunk,
                 first=prompt_steps(arch, len(prompt_ids), chunk), speculate=speculate is not None)
        ahead = whole_window(g) if offline_first else (
            _light_ahead(max_new_tokens) if p.config.offline == "he" else OFFLINE_AHEAD)
        req = {"base": g.base, "prompt_len": g.prompt_len, "max_new": g.max_new, "ahead": ahead, "chunk": chunk}
        if speculate is not None:
            req["speculate"] = True
        p.send(Role.MODEL, ("ctl", self.gens, "req"), req)
        p.send(Role.HELPER, ("ctl", self.gens, "req"), req)
        g = self.accept(req)
        self.last_steps: list[float] = []  # online seconds of each generated token (the first: all the prompt's steps)
        self.last_drafted: list[int] = []  # drafts verified by each pass (speculation)
        self.last_accepted: list[int] = []  # drafts accepted by each pass
        rng = make_rng(sampler)
        draws = _Draws(rng)
        window = asyncio.Semaphore(g.ahead)
        off = self.start_offline(g, window)
        ids: list[int] = list(prompt_ids)
        done = False  # the generation was ended at all three parties
        spent = 0.0  # online seconds of the prompt's chunks so far
        stop: object = {"go": False, "keep": 0, "next": 0} if g.speculate else False  # U's word that ends it
        try:
            if offline_first:
                await _first(self.ready[-1].wait(), off)
            for step in range(g.dealt):
                await self.offline_done(g, step)
                t0 = time.perf_counter()
                if step < g.first:
                    pos = g.shape(arch, step).pos
                    ids = list(prompt_ids[int(pos[0]):int(pos[-1]) + 1]) if g.first > 1 else list(prompt_ids)
                tok = await self.step("online", g, step, ids, draws.at(0) if g.speculate else rng, sampler)
                for _ in range(g.units(step)):
                    window.release()
                p.view("offline", g.base + step).send(Role.HELPER, used_tag(g, step), True)
                if tok is None:  # a chunk of the prompt before its last: no token yet
                    spent += time.perf_counter() - t0
                    continue
                self.last_steps.append(spent + time.perf_counter() - t0)
                spent = 0.0
                if g.emitted(step) + 1 == g.max_new or (stop_at_eos and tok in arch.eos_ids):
                    await self.end(g, step, off, stop)  # the last token: end the generation before handing it out
                    done = True
                    yield tok
                    return
                yield tok  # the caller may stop here: the generation then ends at all parties (below)
                if g.speculate:
                    break
                p.view("online", g.base + step).send(Role.MODEL, ("ctl", g.index, step), True)
                ids = [tok]
            if speculate is None:
                return
            sp, ctx, keep = _Passes(g), list(prompt_ids) + [tok], 0
            while True:
                t0 = time.perf_counter()
                drafts = speculate.propose(ctx, g.max_new - sp.emitted - keep - 2)
                ctl = {"go": True, "keep": keep, "next": len(drafts)}
                p.view("online", g.base + step).send(Role.MODEL, ("ctl", g.index, step), ctl)
                p.view("offline", g.base + step).send(Role.HELPER, ("ctl", g.index, step), ctl)
                sp.advance(ctl)
                step = sp.step
                self.rollback(g, sp.past)
                rows, rngs = [ctx[-1]] + drafts, [draws.at(sp.emitted + i) for i in range(sp.k + 1)]
                dealt = self.offline_s  # the pass's offline seconds (overlapped: part of its online wait)
                if offline_first:  # the pass's offline phase first: its online time is measurable alone
                    t1 = time.perf_counter()
                    await self.verify("offline", g, sp)
                    self.offline_s += time.perf_counter() - t1
                    chosen = await self.verify("online", g, sp, rows, rngs, sampler)
                else:
                    chosen = await self.overlapped(g, sp, rows, rngs, sampler)
                dealt = self.offline_s - dealt
                emit = speculate.settle(drafts, chosen)  # type: ignore[arg-type]
                keep = len(emit) - 1
                stop = {"go": False, "keep": keep, "next": 0}
                self.last_drafted.append(len(drafts))
                self.last_accepted.append(keep)
                each = (time.perf_counter() - t0) / len(emit)
                for i, tok in enumerate(emit):
                    ctx.append(tok)
                    self.last_steps.append(each)
                    self.offline_step_s[sp.emitted + i] += dealt / len(emit)
                    if sp.emitted + i + 1 == g.max_new or (stop_at_eos and tok in arch.eos_ids):
                        await self.end(g, step, off, stop)
                        done = True
                        yield tok
                        return
                    yield tok
        except GeneratorExit:  # the caller stopped early, at the yield of ``step``'s token
            if not done:
                done = True
                await self.end(g, step, off, stop)
            raise
        finally:
            if not done:  # a failure: the session is over; drop this generation's state
                await _cancel(off)
                self.forget(g)

    async def end(self, g: _Gen, last: int, off: asyncio.Task, stop: object = False) -> None:
        """End a generation after step ``last`` (whose control message ``stop`` M waits for: false, or
        a control map with go false): stop the offline phase, tell M and H, wait for H's last word, and
        drop everything kept or received for steps that will not run."""
        self.p.view("online", g.base + last).send(Role.MODEL, ("ctl", g.index, last), stop)
        await _cancel(off)
        self.forget(g)
        self.tell_end(g, Role.MODEL, Role.HELPER)
        await self.await_end(g, Role.HELPER)
        self.p.discard_unread(g.tokens)

    async def close(self) -> None:
        """End the session: M and H stop serving it."""
        for r in (Role.MODEL, Role.HELPER):
            with contextlib.suppress(Exception):
                self.p.send(r, ("ctl", self.gens, "req"), "close")
                await self.p.channels[r].flush()
