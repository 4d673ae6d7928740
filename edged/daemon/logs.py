"""Logging: one line per event, text for people/journald or JSON for collectors.

Under systemd (JOURNAL_STREAM set) text lines carry no timestamp: journald adds its
own. Nothing here ever formats API keys or payloads; callers log ids and paths.

JSON lines carry fields besides `msg`: whatever a caller passes as `extra=` (event,
item_id, kind, readings, bytes, attempt, status, duration_ms, path, ...; see
docs/operations.md), plus `source` for every line logged while a source's task runs
(`current_source`), so a collector can filter without parsing the message.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from contextvars import ContextVar
from typing import Any

current_source: ContextVar[str | None] = ContextVar("edged_source", default=None)
"""The source whose task is running (set by the daemon for each source's task): log
lines and enqueue counts are attributed to it without threading a name through."""

# What every LogRecord has; anything else on a record came in through `extra=`.
_RECORD_ATTRS = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {
    "message",
    "asctime",
    "taskName",
}


def fields_of(record: logging.LogRecord) -> dict[str, Any]:
    """The structured fields of a record: its `extra=` values and the current source."""
    found = {k: v for k, v in record.__dict__.items() if k not in _RECORD_ATTRS}
    source = current_source.get()
    if source is not None:
        found.setdefault("source", source)
    return found


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in fields_of(record).items():
            doc.setdefault(key, value)
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, ensure_ascii=False, default=str)


def setup_logging(level: str = "info", fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(_JsonFormatter())
    elif os.environ.get("JOURNAL_STREAM"):
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # Python warnings (a library's RuntimeWarning) become records too: with `json`, a raw
    # warning text would be the one line a collector cannot parse.
    logging.captureWarnings(True)
    # Library chatter (h2 frames, watchdog inotify) is noise at info level.
    for noisy in ("hpack", "h2", "grpclib", "watchdog", "aiosqlite", "asyncio"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
