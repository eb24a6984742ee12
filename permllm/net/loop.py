"""Event-loop selection: uvloop when it is installed, asyncio's default otherwise.

Part of ``permllm.net``, the bottom layer of permllm; it knows nothing of
protocols or models. Entry points call :func:`run` (or :func:`install_uvloop`
before starting their own loop) to get the faster loop where available.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any, Coroutine

__all__ = ["install_uvloop", "run"]


def install_uvloop() -> bool:
    """Make uvloop's event loop policy the default when uvloop is importable; return whether it did."""
    try:
        import uvloop
    except ImportError:
        return False
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return True


def run(main: Coroutine[Any, Any, Any]) -> Any:
    """Run ``main`` to completion on a fresh uvloop loop when available (else asyncio's) and return its result."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    if sys.version_info >= (3, 11):
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(main)
    install_uvloop()
    return asyncio.run(main)
