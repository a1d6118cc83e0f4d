"""Rate-limited rejection logging (SECURITY §4.7), and JSON log lines.

Each distinct rejection reason is logged at most once per ``interval`` seconds, with
a count of the repeats that were suppressed; never as a traceback.

:func:`jsonLine` renders one log event as one JSON object (``--log-format json``, and
``twistd --logger hbone.logs.jsonLogger``) for log shippers: ``time`` (RFC 3339 UTC),
``level``, ``logger`` (the namespace), ``message`` (the formatted text), the event's
own fields where they are plain values, and ``traceback`` for errors with one.
"""

from __future__ import annotations

import json
import sys
from datetime import datetime, timezone

from twisted.logger import Logger, LogLevel, formatEvent

__all__ = ["RejectionLog", "jsonLine", "jsonLogger"]

_PLAIN = (str, int, float, bool, type(None))


def jsonLine(event: dict, process: str = "hbone") -> str:
    out = {
        "time": datetime.fromtimestamp(event.get("log_time", 0), timezone.utc).isoformat(timespec="milliseconds"),
        "level": getattr(event.get("log_level"), "name", "info"),
        "logger": event.get("log_namespace", ""),
        "process": process,
        "message": formatEvent(event),
    }
    for key, value in event.items():
        if key.startswith("log_") or key in out or key.startswith("_"):
            continue
        if isinstance(value, _PLAIN):
            out[key] = value
        elif isinstance(value, (tuple, list)) and all(isinstance(v, _PLAIN) for v in value):
            out[key] = list(value)
    failure = event.get("log_failure")
    if failure is not None and event.get("log_level", LogLevel.info) >= LogLevel.error:
        out["traceback"] = failure.getTraceback()
    return json.dumps(out, default=str)


def jsonLogger():
    """For ``twistd --logger hbone.logs.jsonLogger``: JSON lines on stdout."""

    out = sys.__stdout__  # twistd sends sys.stdout itself into the log

    def observe(event):
        out.write(jsonLine(event, "twistd") + "\n")
        out.flush()

    return observe


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
