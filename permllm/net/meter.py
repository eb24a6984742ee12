"""Communication accounting: byte/message counters and a hop clock per phase.

Part of ``permllm.net``, the bottom layer of permllm; it knows nothing of
protocols or models. One :class:`Meter` belongs to one party and is shared by
all of that party's channels, so that its hop clock follows causality across
links: the dependent one-way hops of a computation are the maximum over the
parties of ``meter.hops("online")`` after running it from all-zero clocks.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

__all__ = ["PHASES", "Stat", "Meter"]

PHASES = ("setup", "offline", "online")


@dataclass(slots=True)
class Stat:
    """Traffic of one (phase, kind); bytes are counted on the wire (body + 4-byte prefix)."""

    bytes_sent: int = 0
    bytes_recv: int = 0
    msgs_sent: int = 0
    msgs_recv: int = 0


class Meter:
    """Per-party counters: bytes and messages per (phase, kind) where kind = str(tag[0]), and a Lamport hop clock per phase that measures dependent one-way hops."""

    __slots__ = ("clock", "stats")

    def __init__(self) -> None:
        self.clock: dict[str, int] = dict.fromkeys(PHASES, 0)
        self.stats: dict[tuple[str, str], Stat] = {}

    def _stat(self, phase: str, kind: str) -> Stat:
        st = self.stats.get((phase, kind))
        if st is None:
            if phase not in self.clock:
                raise ValueError(f"unknown phase {phase!r}; expected one of {PHASES}")
            st = self.stats[(phase, kind)] = Stat()
        return st

    def on_send(self, phase: str, kind: str, nbytes: int) -> int:
        """Count a sent message; return its stamp, ``clock[phase] + 1`` (the sender's clock does not move)."""
        st = self._stat(phase, kind)
        st.bytes_sent += nbytes
        st.msgs_sent += 1
        return self.clock[phase] + 1

    def on_arrive(self, phase: str, kind: str, nbytes: int) -> None:
        """Count a received message (when it arrives, consumed or not)."""
        st = self._stat(phase, kind)
        st.bytes_recv += nbytes
        st.msgs_recv += 1

    def on_consume(self, phase: str, stamp: int) -> None:
        """Advance the hop clock past a consumed message: ``clock[phase] = max(clock[phase], stamp)``."""
        if phase not in self.clock:
            raise ValueError(f"unknown phase {phase!r}; expected one of {PHASES}")
        if stamp > self.clock[phase]:
            self.clock[phase] = stamp

    def hops(self, phase: str = "online") -> int:
        """Dependent one-way hops seen by this party in ``phase``."""
        return self.clock[phase]

    def total(self, phase: str | None = None, kind: str | None = None) -> Stat:
        """Sum of the entries matching ``phase`` and ``kind`` (None matches all)."""
        out = Stat()
        for (p, k), st in self.stats.items():
            if (phase is None or p == phase) and (kind is None or k == kind):
                out.bytes_sent += st.bytes_sent
                out.bytes_recv += st.bytes_recv
                out.msgs_sent += st.msgs_sent
                out.msgs_recv += st.msgs_recv
        return out

    def reset(self) -> None:
        """Zero the clocks and drop all counters."""
        for phase in self.clock:
            self.clock[phase] = 0
        self.stats.clear()

    def snapshot(self) -> dict:
        """JSON-able copy: ``{"clock": {phase: n}, "stats": {"phase/kind": {field: n}}}``."""
        return {
            "clock": dict(self.clock),
            "stats": {f"{p}/{k}": asdict(st) for (p, k), st in self.stats.items()},
        }
