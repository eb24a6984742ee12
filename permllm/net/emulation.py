"""Network emulation: latency and bandwidth of one direction of a link.

Part of ``permllm.net``, the bottom layer of permllm; it knows nothing of
protocols or models. ``Channel`` asks a :class:`LinkEmulator` when each frame
arrives and its writer task delivers the frame then; senders never sleep.
"""

from __future__ import annotations

__all__ = ["LinkEmulator"]


class LinkEmulator:
    """One direction of a link: a FIFO that serialises frames at ``bandwidth_bps`` then delays them by ``delay_s``."""

    __slots__ = ("delay_s", "bandwidth_bps", "busy_until")

    def __init__(self, delay_s: float = 0.0, bandwidth_bps: float | None = None) -> None:
        if delay_s < 0:
            raise ValueError(f"delay_s must be >= 0, got {delay_s}")
        if bandwidth_bps is not None and bandwidth_bps <= 0:
            raise ValueError(f"bandwidth_bps must be > 0 or None, got {bandwidth_bps}")
        self.delay_s = delay_s
        self.bandwidth_bps = bandwidth_bps
        self.busy_until = float("-inf")

    @classmethod
    def from_spec(cls, rtt_ms: float = 0, bandwidth_mbit: float | None = None) -> LinkEmulator:
        """A link with round-trip time ``rtt_ms`` (one-way delay rtt/2) and ``bandwidth_mbit`` Mbit/s (None: unlimited)."""
        return cls(rtt_ms / 2000.0, None if bandwidth_mbit is None else bandwidth_mbit * 1e6)

    def schedule(self, nbytes: int, now: float) -> float:
        """Return the arrival time of ``nbytes`` handed to the link at ``now``.

        The frame starts leaving when the link is free (``max(now, busy_until)``),
        takes ``nbytes * 8 / bandwidth`` seconds to leave, and arrives ``delay_s``
        later; frames queue behind each other, sharing the bandwidth.
        """
        start = now if now > self.busy_until else self.busy_until
        end = start if self.bandwidth_bps is None else start + nbytes * 8 / self.bandwidth_bps
        self.busy_until = end
        return end + self.delay_s
