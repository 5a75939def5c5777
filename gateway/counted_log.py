"""Process log lines for what can happen on every request while something is down (a device
source, the session store): the first occurrence is logged at once, then at most one line per
interval carrying how many occurred since the previous line, as the decision log does for its
drops. A line per request was 800 lines a second under load, which buries everything else and
costs disk. What must be kept per request (each refusal and its reason) is in the decision log.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

REPEAT_LINE_SECONDS = 10.0


@dataclass(slots=True)
class _Count:
    since_line: int = 0  # occurrences not yet reported in a line
    total: int = 0  # occurrences since the count began (or was ``reset``)
    line_at: float | None = None  # when the last line was written


class CountedLog:
    """``logger`` lines at ``level``, at most one per message every ``interval`` seconds. The
    message is a format string whose last two arguments are filled in here: the occurrences since
    the previous line of that message (this one included) and since its count began. Messages are
    the callers' literals, so the counts kept are bounded by the call sites."""

    def __init__(self, logger: logging.Logger, level: int = logging.WARNING, *,
                 interval: float = REPEAT_LINE_SECONDS, timer: Callable[[], float] = time.monotonic) -> None:
        self.logger, self.level, self.interval = logger, level, interval
        self.timer = timer
        self._counts: dict[str, _Count] = {}

    def log(self, message: str, *args: object) -> bool:
        """Count one occurrence of ``message``; write its line if none was written within the
        interval. True when a line was written."""
        count = self._counts.setdefault(message, _Count())
        count.since_line += 1
        count.total += 1
        now = self.timer()
        if count.line_at is not None and now - count.line_at < self.interval:
            return False
        self.logger.log(self.level, message, *args, count.since_line, count.total, stacklevel=2)  # the caller's line
        count.line_at, count.since_line = now, 0
        return True

    def reset(self, message: str) -> tuple[int, int]:
        """What is over (a source answers again): the occurrences of ``message`` not yet in a line,
        and in all, for a closing line; the next occurrence starts a new count, logged at once."""
        count = self._counts.pop(message, None)
        return (count.since_line, count.total) if count is not None else (0, 0)
