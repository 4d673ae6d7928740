"""The daemon: the only place that wires config, outbox, sources, uploader and status.

Start-up order matters for the invariants: open the outbox and recover (release old
leases, settle half-done acks) before READY=1; sources start only after that.
Shutdown is two-stage: stop taking new input, let calls in flight finish within the
grace period, then close the outbox cleanly. A second signal cancels at once, which
still loses nothing: every item not yet acked is in the outbox.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import secrets
import signal
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edged import __version__
from edged.client import UploadClient
from edged.daemon.config import Config, SourceConfig, format_duration, load_config, split_listen
from edged.daemon.gates import Gates
from edged.daemon.logs import current_source, setup_logging
from edged.daemon.metrics import DaemonMetrics, disk_figures
from edged.daemon.notify import Notifier
from edged.daemon.outbox import Outbox
from edged.daemon.sources.base import Source, SourceContext, make_source
from edged.daemon.status import StatusServer
from edged.daemon.uploader import Uploader
from edged.errors import ConfigError, EdgedError
from edged.ingest import require_server
from edged.ingest.metrics import MetricsServer
from edged.options import format_rate
from edged.wire.cloud import connect_cloud
from edged.wire.connection import connect
from edged.wire.keyfile import resolve_api_key

if TYPE_CHECKING:
    from edged.ingest import IngestServer

log = logging.getLogger("edged")

SHUTDOWN_GRACE_S = 20.0
CANCEL_WAIT_S = 2.0  # after the grace: how long cancelled tasks get to unwind
MAX_RATE = 1 << 40  # bytes/s an `edged limit` may name (1 TiB/s: beyond any uplink)


async def _all_done(tasks: list[asyncio.Task[None]]) -> None:
    """Wait for tasks without ever raising their errors or cancelling them."""
    if tasks:
        await asyncio.wait(tasks)


async def cancel_within(tasks: list[asyncio.Task[Any]], timeout: float) -> set[asyncio.Task[Any]]:
    """Cancel `tasks` and wait up to `timeout` for them; returns those still running.

    The cancel is repeated every 0.1 s: a cancellation swallowed by a race (Python
    3.11's `wait_for` returns a result that lands in the same loop turn) is sent again
    instead of being waited for forever."""
    loop = asyncio.get_running_loop()
    pending = {t for t in tasks if not t.done()}
    deadline = loop.time() + timeout
    while pending and (left := deadline - loop.time()) > 0:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=min(left, 0.1))
    return pending


def _lock_state_dir(state_dir: Path) -> int:
    """One daemon per state_dir: a second one would release the first one's leases and
    sweep its spool files during recovery. The lock dies with the process (kill -9 too)."""
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(state_dir / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise EdgedError(f"another edged is already running on state_dir {state_dir}") from None
    return fd


@dataclass
class _Running:
    source: Source
    task: asyncio.Task[None]


class Daemon:
    def __init__(
        self, config: Config, *, until_empty: bool = False, limit_s: float | None = None
    ) -> None:
        self.config = config
        self.until_empty = until_empty
        self.limit_s = limit_s  # --until-empty LIMIT: give up after this long
        self.gave_up: str | None = None  # why --until-empty stopped before the outbox emptied
        self.started = time.monotonic()
        self.notifier = Notifier()
        self._stop = asyncio.Event()
        self._hard_stop = asyncio.Event()
        self._reloading: asyncio.Future[None] | None = None
        self._serving = False  # sources run; a SIGHUP reloads at once
        self._reload_pending = False  # a SIGHUP came before that
        self._signals = 0
        self.abandoned: set[asyncio.Task[Any]] = set()
        self._sources: dict[str, _Running] = {}
        self._ingest: IngestServer | None = None  # cloud.address: embedded
        self._client: UploadClient | None = None
        self.outbox: Outbox | None = None
        self.uploader: Uploader | None = None
        self.gates: Gates | None = None
        self.local_now: Callable[[], datetime] = datetime.now  # upload windows' clock
        self.cloud_address = config.cloud.address
        self.metrics = DaemonMetrics()
        self.metrics_server: MetricsServer | None = None

    # -- life cycle ------------------------------------------------------------------------

    async def run(self) -> int:
        cfg = self.config
        lock = _lock_state_dir(cfg.state_dir)  # before recovery touches anything
        try:
            return await self._run()
        finally:
            os.close(lock)

    async def _run(self) -> int:
        cfg = self.config
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):  # before anything can be interrupted
            loop.add_signal_handler(sig, self._on_stop_signal)
        # SIGHUP too: its default action kills the process, and a reload (logrotate, an
        # operator) may come while edged starts; it is then run once sources are up.
        loop.add_signal_handler(signal.SIGHUP, self._on_reload_signal)
        self.outbox = await Outbox.open(cfg.state_dir, cfg.outbox)
        try:
            recovered = await self.outbox.recover()
            log.info(
                "outbox open at %s (%s)",
                cfg.state_dir / "outbox.sqlite3",
                ", ".join(f"{k}={v}" for k, v in recovered.items()),
            )
            self.outbox.on_enqueue = self._enqueued
            self._client = await self._connect()
            self.uploader = Uploader(self.outbox, self._client, cfg.upload, metrics=self.metrics)
            self.gates = Gates(self.outbox, local_now=self.local_now)
            self.gates.configure(cfg.sources)  # held sources are known before any lease
            status = StatusServer(cfg.status.socket, self.handle)
            await status.start()
            try:
                await self._start_metrics()
                return await self._serve()
            finally:
                if self.metrics_server is not None:
                    await self.metrics_server.stop()
                await status.stop()
        finally:
            await self._close()

    async def _serve(self) -> int:
        assert self.uploader is not None and self.gates is not None
        gates = asyncio.create_task(self.gates.run(), name="gates")
        uploads = asyncio.create_task(self.uploader.run(), name="uploader")
        for source_cfg in self.config.sources:
            self._start_source(source_cfg)
        self._serving = True
        if self._reload_pending:  # a SIGHUP came while starting: the file may have changed
            self._on_reload_signal()
        self.notifier.send(READY="1", STATUS=self._status_line())
        log.info(
            "edged %s running: part %s, %d source(s), uploading to %s",
            __version__,
            self.config.part_id,
            len(self._sources),
            self.cloud_address,
        )
        pinger = asyncio.create_task(self._keepalive(), name="watchdog")
        try:
            if self.until_empty:
                await self._wait_until_empty(uploads)
            else:
                await self._stop.wait()
        finally:
            self.notifier.send(STOPPING="1", STATUS="stopping")
            log.info("stopping: no new input; finishing uploads in flight")
            self._serving = False  # a SIGHUP now is logged and ignored, never a kill
            await self._shutdown(uploads, pinger, gates)
            # SIGTERM/SIGINT/SIGHUP stay handled until the process exits (see run_daemon):
            # a late signal only logs instead of turning a clean exit into a kill.
        if uploads.done() and not uploads.cancelled() and uploads.exception() is not None:
            raise uploads.exception()  # type: ignore[misc]
        stats = await self.outbox.stats() if self.outbox else None
        log.info("stopped cleanly; %s item(s) stay queued", stats.items if stats else "?")
        if self.gave_up is not None:
            log.error("%s", await self._left_behind(self.gave_up))
            return 1
        return 0

    async def _left_behind(self, why: str) -> str:
        """`--until-empty` gave up: what stayed queued, for the operator (one block)."""
        assert self.outbox is not None
        stats = await self.outbox.stats()
        shown = 20
        lines = [
            f"--until-empty stopped: {why}; {stats.items} item(s), {stats.bytes} bytes stayed"
            f" queued (dead letters: {stats.dead_letters}):"
        ]
        rows = await self.outbox.waiting(shown)
        for kind, path, count, size, error in rows:
            what = path if path is not None else f"{count} reading(s)"
            lines.append(f"  {kind} {what} ({size} B)" + (f": {error}" if error else ""))
        if stats.readings and not any(kind == "tabular" for kind, *_ in rows):
            lines.append(f"  tabular {stats.readings} reading(s) not yet sent")
        if len(rows) == shown:
            lines.append("  ... (`edged status` shows the whole backlog)")
        return "\n".join(lines)

    async def _shutdown(
        self, uploads: asyncio.Task[None], pinger: asyncio.Task[None], gates: asyncio.Task[None]
    ) -> None:
        """Stage 1, until SHUTDOWN_GRACE_S or a second signal, whichever comes first:
        stop the sources and let uploads in flight finish. Stage 2: cancel whatever is
        left and wait CANCEL_WAIT_S at most. Both bounds are kept by `asyncio.wait`
        timeouts, so a task that ignores (or swallows) cancellation cannot stall the
        exit: it is named in the log and abandoned (`self.abandoned`)."""
        assert self.uploader is not None
        sources = [r.task for r in self._sources.values()]
        for task in sources:
            task.cancel()
        self.uploader.stop()
        drain = asyncio.create_task(_all_done([*sources, uploads]), name="drain")
        hard = asyncio.create_task(self._hard_stop.wait(), name="second signal")
        await asyncio.wait(
            {drain, hard}, timeout=SHUTDOWN_GRACE_S, return_when=asyncio.FIRST_COMPLETED
        )
        if not uploads.done():
            log.warning("uploads still in flight; leaving them queued (they will be resent)")
        self.abandoned = await cancel_within(
            [*sources, uploads, pinger, gates, drain, hard], CANCEL_WAIT_S
        )
        if self.abandoned:
            log.error(
                "%s ignored cancellation; exiting without waiting for it",
                ", ".join(sorted(t.get_name() for t in self.abandoned)),
            )

    async def _wait_until_empty(self, uploads: asyncio.Task[None]) -> None:
        """`--until-empty`: one scan of every source, then drain (arq's burst mode); give
        up (`gave_up`) once the limit passes or uploads stop for a reason only an
        operator can fix (credentials, certificate)."""
        loop = asyncio.get_running_loop()
        deadline = None if self.limit_s is None else loop.time() + self.limit_s
        await cancel_within([r.task for r in self._sources.values()], CANCEL_WAIT_S)
        for running in self._sources.values():
            token = current_source.set(running.source.name)
            try:
                await running.source.scan_once()
            finally:
                current_source.reset(token)
        assert self.uploader is not None and self.outbox is not None
        stop = asyncio.create_task(self._stop.wait())
        while not self._stop.is_set() and not uploads.done():
            # Nothing left that could be sent now or later (dead letters wait for retry-dead).
            # `waiting` counts leased items too: a worker holds its lease a moment before
            # it counts as in flight, and that item was once taken for "nothing left".
            if (
                self.uploader.inflight == 0
                and await self.outbox.next_due_in() is None
                and not await self.outbox.waiting(1)
            ):
                break
            if self.uploader.halted:
                self.gave_up = f"uploads are {self.uploader.state} ({self.uploader.last_error})"
                break
            if deadline is not None and loop.time() >= deadline:
                self.gave_up = f"time limit of {format_duration(self.limit_s or 0)} reached"
                if self.uploader.last_error:
                    self.gave_up += f" (last error: {self.uploader.last_error})"
                break
            await asyncio.wait({stop, uploads}, timeout=0.1, return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()

    def _on_reload_signal(self) -> None:
        """Reloads run one at a time; the task is kept so it is not garbage-collected.
        Before sources run the reload waits (`_serve` runs it); while stopping it is
        ignored."""
        if not self._serving:
            if self._stop.is_set():
                log.info("SIGHUP while stopping: ignored")
            else:
                self._reload_pending = True
            return
        self._reload_pending = False
        previous = self._reloading

        async def chain() -> None:
            if previous is not None:
                await asyncio.gather(previous, return_exceptions=True)
            await self.reload()

        self._reloading = asyncio.ensure_future(chain())

    def _on_stop_signal(self) -> None:
        self._signals += 1
        if self._signals == 1:
            log.info("signal received: shutting down (send again to stop at once)")
            self._stop.set()
            return
        log.warning("second signal: stopping now; unacknowledged items stay queued")
        self._stop.set()
        self._hard_stop.set()

    def stop(self) -> None:
        self._stop.set()

    async def _close(self) -> None:
        if self._client is not None:
            self._client.close()
        if self._ingest is not None:
            await self._ingest.stop(grace_s=2.0)
        if self.outbox is not None:
            await self.outbox.close()

    async def _connect(self) -> UploadClient:
        cloud = self.config.cloud
        if cloud.embedded:
            require_server("cloud.address: embedded")
            from edged.ingest import ApiKey, IngestServer, IngestSettings

            key = ApiKey(str(uuid.uuid4()), secrets.token_urlsafe(32), "local")
            self._ingest = IngestServer(
                IngestSettings(
                    data_dir=self.config.state_dir / "ingest",
                    keys=(key,),
                    access_log_level=logging.DEBUG,  # the uploader already logs each call
                )
            )
            await self._ingest.start()
            self.cloud_address = f"embedded ({self._ingest.address})"
            log.info(
                "embedded ingest server on %s, data in %s",
                self._ingest.address,
                self.config.state_dir / "ingest",
            )
            return connect(
                self._ingest.address,
                kind=UploadClient,
                api_key_id=key.key_id,
                api_key=key.secret,
                tls=False,
                timeout=self.config.upload.call_timeout,
                chunk_size=self.config.upload.chunk_size,
            )
        return connect_cloud(
            cloud,
            kind=UploadClient,
            timeout=self.config.upload.call_timeout,
            chunk_size=self.config.upload.chunk_size,
        )

    def _reload_api_key(self) -> None:
        """Re-read the API key (EDGED_API_KEY or the key file): after an auth failure the
        operator fixes the key, then resumes or reloads, as the log and README say."""
        cloud = self.config.cloud
        if cloud.embedded or self._client is None or not cloud.api_key_id:
            return
        try:
            secret = resolve_api_key(cloud.api_key_file)
        except ConfigError as exc:
            log.error("keeping the API key in use: %s", exc)
            return
        if secret:
            self._client.set_api_key(cloud.api_key_id, secret)

    def _context(self) -> SourceContext:
        assert self.outbox is not None
        return SourceContext(self.config.part_id, self.outbox, self.config.state_dir)

    def _start_source(self, source_cfg: SourceConfig) -> None:
        source = make_source(source_cfg, self._context())
        task = asyncio.create_task(self._guard(source), name=f"source {source.name}")
        self._sources[source.name] = _Running(source, task)

    async def _guard(self, source: Source) -> None:
        """A source that crashes is logged and restarted after a pause, never crash-loops
        the daemon (its files stay on disk, so nothing is lost)."""
        current_source.set(source.name)  # this task's own context: its logs and counts
        for attempt in range(1, 1_000_000):
            try:
                await source.run()
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the guard's whole job
                source.stats.last_error = f"{type(exc).__name__}: {exc}"
                delay = min(60.0, 2.0**attempt)
                log.exception("source %s failed; restarting it in %.0fs", source.name, delay)
                await asyncio.sleep(delay)

    async def _keepalive(self) -> None:
        """WATCHDOG=1 from the event loop itself, so a wedged loop gets us restarted."""
        interval = self.notifier.watchdog_interval_s or 10.0
        while True:
            if self.notifier.watchdog_interval_s:
                self.notifier.send(WATCHDOG="1")
            with contextlib.suppress(EdgedError):
                self.notifier.send(STATUS=await self._status_line_async())
            await asyncio.sleep(interval)

    # -- reload ------------------------------------------------------------------------------

    async def reload(self) -> None:
        """SIGHUP: re-read the config; add/remove sources and apply limits; a bad file
        keeps the running config."""
        path = self.config.source_file
        if path is None:
            return
        self.notifier.send(RELOADING="1")
        try:
            new = await asyncio.to_thread(load_config, path)
        except ConfigError as exc:
            log.error("config reload failed; keeping the running config:\n%s", exc)
            self.notifier.send(READY="1")
            return
        try:
            await self._apply(new)
        finally:
            self.notifier.send(READY="1", STATUS=self._status_line())
        log.info("config reloaded from %s", path)

    async def _stop_source(self, running: _Running) -> None:
        """Cancel a source and wait until its last outbox write has landed, so a
        replacement reading the same offsets cannot commit a chunk twice."""
        await cancel_within([running.task], CANCEL_WAIT_S)
        assert self.outbox is not None
        await self.outbox.settled()

    async def _apply(self, new: Config) -> None:
        if new.cloud != self.config.cloud or new.state_dir != self.config.state_dir:
            log.warning("cloud/state_dir changes take effect after a restart")
        if new.part_id != self.config.part_id:
            log.warning("part_id changes take effect after a restart")
        old_names = set(self._sources)
        wanted = {s.name: s for s in new.sources}
        for name in old_names - set(wanted):
            await self._stop_source(self._sources.pop(name))
            log.info("source %s removed", name)
        for name, source_cfg in wanted.items():
            current = self._sources.get(name)
            if current is not None and current.source.config == source_cfg:
                continue
            if current is not None:
                await self._stop_source(current)
            self._start_source(source_cfg)
            log.info("source %s %s", name, "restarted" if current else "added")
        assert self.outbox is not None and self.uploader is not None and self.gates is not None
        self.outbox.limits = new.outbox
        self.gates.configure(new.sources)
        self.uploader.config = replace(new.upload, workers=self.uploader.config.workers)
        if self.uploader.bandwidth_override is not None:
            log.info("reload: the `edged limit` override ends; upload.max_bandwidth applies")
        self.uploader.limit_bandwidth(None)  # a reload restores the config's cap
        self.config = replace(
            new,
            part_id=self.config.part_id,
            cloud=self.config.cloud,
            state_dir=self.config.state_dir,
        )
        self._reload_api_key()
        self.uploader.clear_auth_failure()  # the documented way out; an operator's pause stays

    # -- status --------------------------------------------------------------------------

    async def _start_metrics(self) -> None:
        """/metrics when `status.metrics_listen` is set (off by default)."""
        listen = self.config.status.metrics_listen
        where = split_listen(listen) if listen else None
        if where is None:
            return
        self.metrics_server = MetricsServer(
            self.metrics.registry, *where, refresh=self._refresh_metrics
        )
        await self.metrics_server.start()
        log.info("metrics on http://%s/metrics", self.metrics_server.address)

    def _enqueued(self, kind: str, readings: int, nbytes: int) -> None:
        """Outbox hook after each committed enqueue; it runs in the enqueuing source's
        context, so the count and the line carry that source's name."""
        if not readings:
            return  # a claim or an offset only: nothing queued
        self.metrics.enqueued(kind, readings, nbytes)
        log.debug(
            "enqueued %d %s reading(s), %d bytes",
            readings,
            kind,
            nbytes,
            extra={"event": "enqueued", "kind": kind, "readings": readings, "bytes": nbytes},
        )

    async def _refresh_metrics(self) -> None:
        """The snapshot the scrape-time collector reads: status plus disk figures."""
        snapshot = await self.status()
        snapshot |= await asyncio.to_thread(disk_figures, self.config.state_dir)
        self.metrics.snapshot.status = snapshot

    def _status_line(self) -> str:
        state = self.uploader.state if self.uploader else "starting"
        return f"{state}; uploading to {self.cloud_address}"

    async def _status_line_async(self) -> str:
        assert self.outbox is not None and self.uploader is not None
        stats = await self.outbox.stats()
        readings_s, _ = self.uploader.rates.rates()
        return (
            f"{self.uploader.state}; backlog {stats.items} items / {stats.bytes} bytes;"
            f" {readings_s:.0f} readings/s"
        )

    async def status(self) -> dict[str, Any]:
        assert self.outbox is not None and self.uploader is not None
        stats = await self.outbox.stats()
        up = self.uploader
        readings_s, bytes_s = up.rates.rates()
        c = stats.counters
        sources = []
        now = time.time()  # the sources stamp events with wall time (compared with mtimes)
        for running in self._sources.values():
            s = running.source
            sources.append(
                {
                    "name": s.name,
                    "kind": s.kind,
                    "path": str(s.config.path),
                    **s.stats.as_dict(),
                    "last_event_age_s": _age(now, s.stats.last_event_at),
                    **(self.gates.view(s.name) if self.gates else {}),
                    "expired": {
                        "items": c.get(f"expired_items:{s.name}", 0),
                        "readings": c.get(f"expired_readings:{s.name}", 0),
                    },
                }
            )
        wait = up.gate.wait_s() if up.gate.closed else None
        success_age, error_age = up.ages()
        return {
            "ok": True,
            "version": __version__,
            "uptime_s": round(time.monotonic() - self.started, 3),
            "state": up.state,
            "part_id": self.config.part_id,
            "outbox": {
                "items": stats.items,
                "readings": stats.readings,
                "bytes": stats.bytes,
                "stored_bytes": stats.stored_bytes,
                "oldest_age_s": stats.oldest_age_s,
                "per_kind": {
                    k: {"items": v.items, "bytes": v.bytes} for k, v in stats.per_kind.items()
                },
                "max_bytes": self.config.outbox.max_bytes,
            },
            "uploaded": {
                "items": c.get("uploaded_items", 0),
                "readings": c.get("uploaded_readings", 0),
                "bytes": c.get("uploaded_bytes", 0),
            },
            "rates": {"readings_per_s": round(readings_s, 3), "bytes_per_s": round(bytes_s, 1)},
            "bandwidth": _bandwidth(up),
            "cloud": {
                "address": self.cloud_address,
                "last_success_at": up.last_success_at,
                "last_success_age_s": _round(success_age),
                "last_error": up.last_error,
                "last_error_age_s": _round(error_age),
                "next_retry_in_s": wait,
                "calls": up.calls,
                "inflight": up.inflight,
            },
            "dead_letters": stats.dead_letters,
            "quarantined": sum(r.source.stats.quarantined for r in self._sources.values()),
            "dropped": {
                "readings": c.get("dropped_readings", 0),
                "bytes": c.get("dropped_bytes", 0),
            },
            "expired": {
                "items": c.get("expired_items", 0),
                "readings": c.get("expired_readings", 0),
                "bytes": c.get("expired_bytes", 0),
            },
            "sources": sources,
            "metrics": None if self.metrics_server is None else self.metrics_server.address,
        }

    async def handle(self, req: dict[str, Any]) -> dict[str, Any]:
        """One status-socket request (see design.md's protocol)."""
        assert self.outbox is not None and self.uploader is not None
        cmd = req["cmd"]
        if cmd == "status":
            return await self.status()
        if cmd == "sync-now":
            await self.uploader.sync_now()
            for running in list(self._sources.values()):
                running.source.request_rescan()  # in its own loop: never two scans at once
            return {"ok": True}
        if cmd in ("pause", "resume") and req.get("source") is not None:
            return self._pause_source(cmd, req["source"])
        if cmd == "pause":
            self.uploader.pause()
            return {"ok": True, "state": self.uploader.state}
        if cmd == "resume":
            self._reload_api_key()
            self.uploader.resume()
            return {"ok": True, "state": self.uploader.state}
        if cmd == "limit":
            return self._limit(req)
        if cmd == "dead-letters":
            letters = await self.outbox.dead_letters()
            return {"ok": True, "dead_letters": [d.__dict__ for d in letters]}
        if cmd == "retry-dead":
            ids = req.get("ids")
            if req.get("all"):
                n = await self.outbox.retry_dead(None)
            elif isinstance(ids, list) and all(isinstance(i, int) for i in ids):
                n = await self.outbox.retry_dead(ids)
            else:
                return {"ok": False, "error": 'retry-dead needs "ids": [int, ...] or "all": true'}
            return {"ok": True, "requeued": n}
        known = "status, sync-now, pause, resume, limit, dead-letters, retry-dead"
        return {"ok": False, "error": f"unknown cmd {cmd!r}; known: {known}"}

    def _limit(self, req: dict[str, Any]) -> dict[str, Any]:
        """`{"cmd": "limit", "rate": BYTES_PER_S}` (0: unlimited) overrides
        upload.max_bandwidth until a reload; `"rate": "config"` ends the override."""
        assert self.uploader is not None
        rate = req.get("rate")
        if rate == "config":
            cap = self.uploader.limit_bandwidth(None)
        elif isinstance(rate, int) and not isinstance(rate, bool) and 0 <= rate <= MAX_RATE:
            cap = self.uploader.limit_bandwidth(rate)
        else:
            return {
                "ok": False,
                "error": f'limit needs "rate": bytes per second (0 to {MAX_RATE}, 0: unlimited)'
                ' or "config"',
            }
        log.info(
            "bandwidth cap: %s (%s)",
            "unlimited" if cap.rate == 0 else format_rate(cap.rate),
            cap.source,
        )
        return {"ok": True, "bandwidth": _bandwidth(self.uploader)}

    def _pause_source(self, cmd: str, name: Any) -> dict[str, Any]:
        """`pause --source NAME` / `resume --source NAME`: hold or release one source's
        uploads (in memory, like the daemon-wide pause); its capture goes on."""
        assert self.gates is not None
        act = self.gates.pause if cmd == "pause" else self.gates.resume
        if not isinstance(name, str) or not act(name):
            known = ", ".join(sorted(self._sources)) or "none"
            return {"ok": False, "error": f"{cmd}: no source named {name!r}; sources: {known}"}
        log.info("source %s %s", name, "paused" if cmd == "pause" else "resumed")
        return {"ok": True, "source": name, "state": "paused" if cmd == "pause" else "resumed"}


def _bandwidth(up: Uploader) -> dict[str, Any]:
    """The cap in force, where it comes from, and what goes through it."""
    cap, shaper = up.cap, up.shaper
    return {
        "limit_bytes_per_s": cap.rate,  # 0: unlimited
        "source": cap.source,  # "config" or "edged limit"
        "config_bytes_per_s": up.config.max_bandwidth,
        "burst_bytes": shaper.burst,
        "bytes_per_s": round(shaper.measured(), 1),
        "sent_bytes": shaper.granted_bytes,
        "waited_s": round(shaper.waited_s, 3),
        "waiting": shaper.waiting,
    }


def _round(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds, 1)


def _age(now: float, then: float | None) -> float | None:
    """Seconds since `then` by the daemon's clock (never the reader's), at least 0."""
    return None if then is None else round(max(0.0, now - then), 1)


async def run_daemon(
    config_path: Path, *, until_empty: bool = False, limit_s: float | None = None
) -> int:
    config = load_config(config_path)
    setup_logging(config.log.level, config.log.format)
    daemon = Daemon(config, until_empty=until_empty, limit_s=limit_s)
    try:
        rc = await daemon.run()
    finally:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
            signal.signal(sig, signal.SIG_IGN)  # exiting now; a late signal changes nothing
    if daemon.abandoned:
        # asyncio.run would wait for these forever; the outbox is closed, so leaving
        # now loses nothing (every unacknowledged item is queued on disk).
        logging.shutdown()
        os._exit(rc)
    return rc
