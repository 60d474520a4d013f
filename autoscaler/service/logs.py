"""Logging: human-readable text or one JSON object per line, and counted warnings for floods."""

from __future__ import annotations

import logging
import sys
import time
from collections import Counter
from collections.abc import Mapping
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


class CountedWarnings:
    """Counts events by key and logs each key at most once per ``period_s``.

    Bad input and failing devices come in floods; every event is counted (``counts``, which
    may be a table the caller owns), and a logged one says how many were left out since the
    previous one of its key (``suppressed``).
    """

    def __init__(
        self,
        logger: logging.Logger,
        counts: Counter[str] | None = None,
        *,
        period_s: float = 10.0,
    ) -> None:
        self.counts: Counter[str] = Counter() if counts is None else counts
        self.period_s = period_s
        self._log = logger
        self._last_s: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def warn(
        self,
        key: str,
        message: str,
        *args: object,
        count: int = 1,
        limit_key: str | None = None,
        extra: Mapping[str, object] | None = None,
        level: int = logging.WARNING,
        exc_info: bool = False,
    ) -> None:
        """Add ``count`` to ``counts[key]``; log ``message % args`` unless ``limit_key``
        (``key`` by default) was logged less than ``period_s`` ago."""
        self.counts[key] += count
        suppressed = self._allow(key if limit_key is None else limit_key)
        if suppressed is not None:
            self._log.log(
                level,
                message,
                *args,
                extra={**(extra or {}), "suppressed": suppressed},
                exc_info=exc_info,
            )

    def _allow(self, key: str, now_s: float | None = None) -> int | None:
        """``None`` to suppress; otherwise how many were suppressed since the last allowed."""
        now_s = time.monotonic() if now_s is None else now_s
        if now_s - self._last_s.get(key, -float("inf")) < self.period_s:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return None
        self._last_s[key] = now_s
        return self._suppressed.pop(key, 0)
