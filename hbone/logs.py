"""Rate-limited rejection logging (SECURITY §4.7).

Each distinct rejection reason is logged at most once per ``interval`` seconds, with
a count of the repeats that were suppressed; never as a traceback.
"""

from __future__ import annotations

from twisted.logger import Logger

__all__ = ["RejectionLog"]


class RejectionLog:
    logger = Logger(namespace="hbone.rejections")

    def __init__(self, clock, interval: float = 10.0) -> None:
        self.clock = clock
        self.interval = interval
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def log(self, _key: str, _fmt: str, **kw) -> bool:
        """Log ``fmt`` for ``reason`` unless it was logged within the interval.
        Returns whether it was logged."""
        reason, fmt = _key, _fmt
        now = self.clock.seconds()
        last = self._last.get(reason)
        if last is not None and now - last < self.interval:
            self._suppressed[reason] = self._suppressed.get(reason, 0) + 1
            return False
        self._last[reason] = now
        suppressed = self._suppressed.pop(reason, 0)
        if suppressed:
            fmt += " ({suppressed} more like it suppressed)"
            kw["suppressed"] = suppressed
        self.logger.info(fmt, **kw)
        return True
