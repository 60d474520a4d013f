"""Logging: human-readable text or one JSON object per line, plus a rate limiter for floods."""

from __future__ import annotations

import logging
import sys
import time
from typing import Any, Final

import orjson

# Attributes every LogRecord has; anything else was passed with ``extra=`` and is structured data.
_RECORD_FIELDS: Final = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "taskName",
}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, and every ``extra=`` field."""

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _RECORD_FIELDS:
                data[key] = value
        if record.exc_info:
            data["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(data, default=str).decode()


class TextFormatter(logging.Formatter):
    """``time level logger: message key=value …`` with the ``extra=`` fields at the end."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        extras = [f"{k}={v}" for k, v in record.__dict__.items() if k not in _RECORD_FIELDS]
        return f"{text} {' '.join(extras)}" if extras else text


def setup_logging(level: str = "info", fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # paho logs every packet at debug level through aiomqtt's logger.
    logging.getLogger("mqtt").setLevel(max(root.level, logging.INFO))


class RateLimiter:
    """Allows one event per key per ``period_s``; counts what it suppressed in between."""

    def __init__(self, period_s: float = 10.0) -> None:
        self.period_s = period_s
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def allow(self, key: str, now_s: float | None = None) -> int | None:
        """``None`` to suppress; otherwise how many were suppressed since the last allowed."""
        now_s = time.monotonic() if now_s is None else now_s
        if now_s - self._last.get(key, -float("inf")) < self.period_s:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return None
        self._last[key] = now_s
        return self._suppressed.pop(key, 0)
