"""The daemon's Prometheus metrics (served by `edged.ingest.metrics.MetricsServer` when
`status.metrics_listen` is set).

Two kinds, on purpose:
- events, counted where they happen: readings enqueued (outbox, attributed to the
  source whose task enqueued them), upload calls, their latency, failures, retries,
  dead letters (uploader). Counters start at zero with the process, as Prometheus
  expects.
- state, read at scrape time from the same snapshot `edged status` shows
  (`Daemon.status()`): backlog, its age, state, dead letters, quarantine, drops, disk.
  `SnapshotCollector` turns that dict into samples, so nothing is kept twice.

Every daemon owns its registry, so daemons in one process never share a metric.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from edged.daemon.logs import current_source

UPLOAD_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
STATES = ("running", "paused", "offline", "auth_failed", "draining")
NO_SOURCE = "-"  # enqueued outside any source's task (tests, tools)


class DaemonMetrics:
    """One daemon's registry and its event counters."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.enqueued_readings = Counter(
            "edged_enqueued_readings",
            "readings committed to the outbox (a binary reading or a file counts one),"
            " by source and kind",
            ["source", "kind"],
            registry=r,
        )
        self.enqueued_bytes = Counter(
            "edged_enqueued_bytes",
            "payload bytes committed to the outbox, by source and kind",
            ["source", "kind"],
            registry=r,
        )
        self.uploaded_items = Counter(
            "edged_uploaded_items", "upload calls acknowledged, by kind", ["kind"], registry=r
        )
        self.uploaded_readings = Counter(
            "edged_uploaded_readings", "readings acknowledged, by kind", ["kind"], registry=r
        )
        self.uploaded_bytes = Counter(
            "edged_uploaded_bytes", "payload bytes acknowledged, by kind", ["kind"], registry=r
        )
        self.upload_duration = Histogram(
            "edged_upload_duration_seconds",
            "upload call latency, successful or not, by kind",
            ["kind"],
            buckets=UPLOAD_BUCKETS,
            registry=r,
        )
        self.failures = Counter(
            "edged_upload_failures",
            "failed upload calls, by kind and gRPC status",
            ["kind", "status"],
            registry=r,
        )
        self.retries = Counter(
            "edged_upload_retries",
            "items put back to be sent again later, by kind",
            ["kind"],
            registry=r,
        )
        self.dead_lettered = Counter(
            "edged_dead_lettered",
            "items moved to the dead letters, by status (SOURCE: the file went bad)",
            ["status"],
            registry=r,
        )
        self.snapshot = SnapshotCollector()
        r.register(self.snapshot)

    def enqueued(self, kind: str, readings: int, nbytes: int) -> None:
        """Outbox hook: called after each committed enqueue."""
        source = current_source.get() or NO_SOURCE
        self.enqueued_readings.labels(source, kind).inc(readings)
        self.enqueued_bytes.labels(source, kind).inc(nbytes)

    def call_ended(self, kind: str, seconds: float, status: str) -> None:
        self.upload_duration.labels(kind).observe(seconds)
        if status != "OK":
            self.failures.labels(kind, status).inc()

    def uploaded(self, kind: str, readings: int, nbytes: int) -> None:
        self.uploaded_items.labels(kind).inc()
        self.uploaded_readings.labels(kind).inc(readings)
        self.uploaded_bytes.labels(kind).inc(nbytes)


def disk_figures(state_dir: Path) -> dict[str, int]:
    """The outbox's files on disk (database, WAL, spool) and the free space under it."""
    used = 0
    for name in ("outbox.sqlite3", "outbox.sqlite3-wal", "outbox.sqlite3-shm"):
        with contextlib.suppress(OSError):  # no WAL right after a checkpoint
            used += os.stat(state_dir / name).st_size
    return {"outbox_file_bytes": used, "disk_free_bytes": shutil.disk_usage(state_dir).free}


class SnapshotCollector(Collector):
    """Samples from the last status snapshot (`Daemon.status()` plus `disk_figures`),
    which the metrics server refreshes before every scrape."""

    def __init__(self) -> None:
        self.status: dict[str, Any] | None = None

    def collect(self) -> Iterator[Any]:
        s = self.status
        if s is None:
            return
        yield from _state(s)
        yield from _backlog(s)
        yield from _bandwidth(s)
        yield from _problems(s)
        yield from _sources(s)


def _gauge(name: str, doc: str, value: float | None, labels: dict[str, str] | None = None) -> Any:
    g = GaugeMetricFamily(name, doc, labels=list(labels or {}))
    if value is not None:
        g.add_metric(list((labels or {}).values()), value)
    return g


def _state(s: dict[str, Any]) -> Iterator[Any]:
    state = GaugeMetricFamily("edged_state", "1 for the uploader's current state", labels=["state"])
    for name in STATES:
        state.add_metric([name], 1.0 if s["state"] == name else 0.0)
    yield state
    cloud = s["cloud"]
    yield _gauge("edged_upload_inflight", "upload calls in flight", cloud["inflight"])
    yield _gauge(
        "edged_last_upload_success_timestamp_seconds",
        "wall-clock time of the last acknowledged upload",
        cloud["last_success_at"],
    )
    yield _gauge(
        "edged_next_retry_seconds",
        "seconds until the next probe while offline (absent when online)",
        cloud["next_retry_in_s"],
    )


def _backlog(s: dict[str, Any]) -> Iterator[Any]:
    ob = s["outbox"]
    items = GaugeMetricFamily(
        "edged_backlog_items", "queued, not yet acknowledged (tabular: readings)", labels=["kind"]
    )
    nbytes = GaugeMetricFamily("edged_backlog_bytes", "payload bytes queued", labels=["kind"])
    for kind, k in sorted(ob["per_kind"].items()):
        items.add_metric([kind], k["items"])
        nbytes.add_metric([kind], k["bytes"])
    yield items
    yield nbytes
    yield _gauge(
        "edged_backlog_oldest_age_seconds",
        "age of the oldest queued item (0 when the outbox is empty)",
        ob["oldest_age_s"] or 0.0,
    )
    yield _gauge(
        "edged_outbox_stored_bytes",
        "bytes the outbox holds itself (readings, inline and spooled payloads)",
        ob["stored_bytes"],
    )
    yield _gauge("edged_outbox_max_bytes", "outbox.max_bytes", ob["max_bytes"])
    yield _gauge(
        "edged_outbox_file_bytes", "outbox database and WAL size on disk", s["outbox_file_bytes"]
    )
    yield _gauge(
        "edged_disk_free_bytes", "free bytes on the state_dir filesystem", s["disk_free_bytes"]
    )


def _bandwidth(s: dict[str, Any]) -> Iterator[Any]:
    b = s.get("bandwidth")
    if b is None:
        return
    yield _gauge(
        "edged_upload_bandwidth_limit_bytes_per_second",
        "the upload bandwidth cap in force (0: unlimited)",
        b["limit_bytes_per_s"],
    )
    yield _gauge(
        "edged_upload_bandwidth_override",
        "1 while `edged limit` overrides upload.max_bandwidth",
        0.0 if b["source"] == "config" else 1.0,
    )
    yield _gauge(
        "edged_upload_bandwidth_waiting", "messages waiting for the bandwidth cap", b["waiting"]
    )
    yield CounterMetricFamily(
        "edged_upload_sent_bytes",
        "message bytes let through the bandwidth cap to the connection (resends included)",
        value=b["sent_bytes"],
    )
    yield CounterMetricFamily(
        "edged_upload_bandwidth_wait_seconds",
        "time upload messages spent waiting for the bandwidth cap",
        value=b["waited_s"],
    )


def _problems(s: dict[str, Any]) -> Iterator[Any]:
    yield _gauge("edged_dead_letters", "items waiting in the dead letters", s["dead_letters"])
    dropped = s["dropped"]
    yield CounterMetricFamily(
        "edged_dropped_readings",
        "readings dropped by outbox.on_full: drop_oldest (since the outbox was created)",
        value=dropped["readings"],
    )
    yield CounterMetricFamily(
        "edged_dropped_bytes",
        "bytes dropped by outbox.on_full: drop_oldest (since the outbox was created)",
        value=dropped["bytes"],
    )


def _sources(s: dict[str, Any]) -> Iterator[Any]:
    quarantined = CounterMetricFamily(
        "edged_quarantined", "files moved to quarantine, by source", labels=["source"]
    )
    seen = CounterMetricFamily("edged_source_files", "files seen, by source", labels=["source"])
    last = GaugeMetricFamily(
        "edged_source_last_event_timestamp_seconds",
        "wall-clock time the source last took in input (absent before the first)",
        labels=["source"],
    )
    pressure = GaugeMetricFamily(
        "edged_source_backpressure", "1 while the outbox refuses the source", labels=["source"]
    )
    errors = GaugeMetricFamily(
        "edged_source_error", "1 while the source reports a last_error", labels=["source"]
    )
    allowed = GaugeMetricFamily(
        "edged_source_upload_allowed",
        "1 while the source may upload (window open, condition holds, not paused)",
        labels=["source"],
    )
    priority = GaugeMetricFamily(
        "edged_source_priority", "the source's configured priority", labels=["source"]
    )
    paused = GaugeMetricFamily(
        "edged_source_paused", "1 while `edged pause --source` holds it", labels=["source"]
    )
    window = GaugeMetricFamily(
        "edged_source_window_open",
        "1 inside one of the source's upload windows (absent without windows)",
        labels=["source"],
    )
    condition = GaugeMetricFamily(
        "edged_source_condition",
        "1 while the source's condition holds (absent without a condition)",
        labels=["source"],
    )
    expired_items = CounterMetricFamily(
        "edged_expired_items",
        "items dropped past the source's max_age (since the outbox was created)",
        labels=["source"],
    )
    expired_readings = CounterMetricFamily(
        "edged_expired_readings",
        "readings dropped past the source's max_age (since the outbox was created)",
        labels=["source"],
    )
    for src in s["sources"]:
        name = [src["name"]]
        if "upload_allowed" in src:
            allowed.add_metric(name, 1.0 if src["upload_allowed"] else 0.0)
            priority.add_metric(name, src["priority"])
            paused.add_metric(name, 1.0 if src["paused"] else 0.0)
        if src.get("window"):
            window.add_metric(name, 1.0 if src["window"]["open"] else 0.0)
        if src.get("condition"):
            condition.add_metric(name, 1.0 if src["condition"]["ok"] else 0.0)
        if "expired" in src:
            expired_items.add_metric(name, src["expired"]["items"])
            expired_readings.add_metric(name, src["expired"]["readings"])
        quarantined.add_metric(name, src["quarantined"])
        seen.add_metric(name, src["files_seen"])
        if src.get("last_event_at") is not None:
            last.add_metric(name, src["last_event_at"])
        pressure.add_metric(name, 1.0 if src.get("backpressure") else 0.0)
        errors.add_metric(name, 1.0 if src.get("last_error") else 0.0)
    yield from (quarantined, seen, last, pressure, errors)
    yield from (allowed, priority, paused, window, condition, expired_items, expired_readings)
