"""Whether this gateway is stopping, and which requests it is still finishing.

On SIGTERM a gateway stops accepting, finishes what is in flight, then exits. Meanwhile readiness
fails (``health``: load balancers move on) and every answer is the last on its connection (the
``Drain`` addon applies that). One object, read by both, so they cannot disagree.
"""

from __future__ import annotations

import asyncio
import time


class DrainState:
    def __init__(self) -> None:
        self.draining = False
        self.in_flight: set[str] = set()  # requests between their headers and their answer, by flow id

    async def finish(self, timeout: float, poll: float = 0.05) -> int:
        """Mark the drain, then wait up to ``timeout`` seconds for the requests in flight; returns
        how many were still open when the time ran out."""
        self.draining = True
        deadline = time.monotonic() + timeout
        while self.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(poll)
        return len(self.in_flight)
