"""/metrics and structured logs as operators see them: a real daemon and a real ingest
server (subprocesses), scraped over HTTP while they upload; their JSON log lines read
back; the endpoint's bounds against a hostile peer; no secret in any ingest log."""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil
import pytest
from grpclib.client import Channel
from grpclib.const import Status
from grpclib.exceptions import GRPCError
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.parser import text_string_to_metric_families

from edged._proto.app.data.v1 import data_grpc, data_pb2
from edged._proto.app.datasync.v1 import data_sync_grpc
from edged._proto.app.datasync.v1 import data_sync_pb2 as pb
from edged._proto.proto.rpc.v1 import auth_grpc, auth_pb2
from edged.capture import CaptureWriter
from edged.client import UploadClient
from edged.ingest import ApiKey, IngestServer, IngestSettings
from edged.ingest import metrics as ingest_metrics
from edged.ingest.metrics import MetricsServer, route
from tests.support.credentials import KeyFile
from tests.support.processes import edged_cmd, ingest_process, read_line

REPO = Path(__file__).resolve().parents[1]
DASHBOARD = REPO / "docs" / "grafana-dashboard.json"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


# --------------------------------------------------------------------------- helpers


def wait_for(what: str, check: Callable[[], bool], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def scrape_text(address: str) -> str:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        text: str = resp.read().decode()
        return text


def samples(text: str) -> Samples:
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(found: Samples, name: str, **labels: str) -> float:
    """A sample's value; 0 when absent (a labelled counter before its first event)."""
    return found.get((name, frozenset(labels.items())), 0.0)


def names_in(text: str) -> set[str]:
    """Every series name a scrape offers, also for families without samples yet."""
    names: set[str] = set()
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum")}
    for family in text_string_to_metric_families(text):
        names.add(family.name)
        names.update(family.name + s for s in suffixes.get(family.type, ()))
        names.update(s.name for s in family.samples)
    return names


def write_capture(root: Path, start: int, n: int) -> None:
    meta = pb.DataCaptureMetadata(
        component_type="rdk:component:sensor",
        component_name="temp1",
        method_name="Readings",
        type=pb.DATA_TYPE_TABULAR_SENSOR,
        file_extension=".dat",
    )
    with CaptureWriter(root, meta) as w:
        for seq in range(start, start + n):
            reading = pb.SensorData()
            reading.struct.update({"seq": seq})
            reading.metadata.time_requested.FromDatetime(datetime(2026, 1, 1, tzinfo=UTC))
            reading.metadata.time_received.FromDatetime(datetime(2026, 1, 1, tzinfo=UTC))
            w.write(reading)


def edged(*args: str) -> dict[str, Any]:
    out = subprocess.run(edged_cmd(*args), capture_output=True, text=True, timeout=30, check=False)
    assert out.returncode == 0, out.stderr
    result: dict[str, Any] = json.loads(out.stdout) if "--json" in args else {}
    return result


@contextmanager
def daemon(config: Path, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("ab") as out:
        proc = subprocess.Popen(
            edged_cmd("run", "-c", str(config)), stdout=out, stderr=subprocess.STDOUT
        )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def json_lines(path: Path) -> list[dict[str, Any]]:
    """Every line must be one JSON object (that is what `format: json` promises)."""
    docs = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        try:
            docs.append(json.loads(line))
        except ValueError:
            raise AssertionError(f"{path}:{n} is not a JSON object: {line!r}") from None
    return docs


def ingest_count(data: Path) -> int:
    import sqlite3

    db_path = data / "ingest.sqlite3"
    if not db_path.exists():
        return 0
    db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        return int(db.execute("SELECT count(*) FROM readings").fetchone()[0])
    finally:
        db.close()


# --------------------------------------------------------------------------- pure


@pytest.mark.parametrize(
    ("head", "status"),
    [
        (b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n", 200),
        (b"HEAD /metrics HTTP/1.0\r\n\r\n", 200),
        (b"GET /metrics?name[]=x HTTP/1.1\r\n\r\n", 200),
        (b"POST /metrics HTTP/1.1\r\n\r\n", 405),
        (b"GET / HTTP/1.1\r\n\r\n", 404),
        (b"GET /metrics/../x HTTP/1.1\r\n\r\n", 404),
        (b"GET /metrics\r\n\r\n", 400),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", 400),  # a TLS hello
        (b"", 400),
    ],
)
def test_route_serves_only_get_metrics(head: bytes, status: int) -> None:
    assert route(head) == status


# --------------------------------------------------------------------------- endpoint


async def _exchange(address: str, request: bytes) -> bytes:
    host, port = address.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        if request:
            writer.write(request)
            await writer.drain()
        async with asyncio.timeout(10):
            return await reader.read()
    finally:
        writer.close()
        await writer.wait_closed()


async def test_endpoint_bounds_a_hostile_peer_and_stops_clean(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(ingest_metrics, "HEAD_TIMEOUT_S", 0.3)
    registry = CollectorRegistry()
    Counter("edged_test_events", "test", registry=registry).inc(3)
    server = MetricsServer(registry, "127.0.0.1", 0)
    await server.start()
    idle: list[asyncio.StreamWriter] = []
    try:
        ok = await _exchange(server.address, b"GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n")
        assert ok.startswith(b"HTTP/1.1 200 ") and b"edged_test_events_total 3.0" in ok
        head = await _exchange(server.address, b"HEAD /metrics HTTP/1.1\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ") and head.endswith(b"\r\n\r\n")
        assert (await _exchange(server.address, b"GET /x HTTP/1.1\r\n\r\n")).startswith(
            b"HTTP/1.1 404 "
        )
        big = b"GET /metrics HTTP/1.1\r\nX: " + b"a" * (ingest_metrics.MAX_HEAD + 10)
        assert (await _exchange(server.address, big)).startswith(b"HTTP/1.1 431 ")
        # A peer that never finishes its head is answered 408 and let go.
        assert (await _exchange(server.address, b"GET /metrics HTTP/1.1\r\n")).startswith(
            b"HTTP/1.1 408 "
        )
        # Connections beyond the cap are answered 503 while the others are held open.
        monkeypatch.setattr(ingest_metrics, "HEAD_TIMEOUT_S", 30.0)
        host, port = server.address.rsplit(":", 1)
        for _ in range(ingest_metrics.MAX_CONNECTIONS):
            _, w = await asyncio.open_connection(host, int(port))
            idle.append(w)
        deadline = time.monotonic() + 10
        while len(server._tasks) < ingest_metrics.MAX_CONNECTIONS:  # accepted, all of them
            assert time.monotonic() < deadline, "idle connections were not accepted"
            await asyncio.sleep(0.01)
        # (It sends nothing: the answer comes before any request is read, and unread
        # request bytes would turn the close into a reset.)
        busy = await _exchange(server.address, b"")
        assert busy.startswith(b"HTTP/1.1 503 ")
    finally:
        await server.stop()  # also ends the idle connections' handlers
        for w in idle:
            w.close()
    with pytest.raises(OSError):  # nothing listens any more
        socket.create_connection(("127.0.0.1", server.port), timeout=2).close()


async def test_ingest_counts_calls_refusals_and_stored_readings(
    tmp_path: Path, key: KeyFile
) -> None:
    settings = IngestSettings(
        data_dir=tmp_path / "ingest",
        keys=(ApiKey(key.key_id, key.secret, "org-1"),),
        metrics_listen=("127.0.0.1", 0),
        synchronous="NORMAL",
    )
    async with IngestServer(settings) as server:
        assert server.metrics_server is not None
        address = server.metrics_server.address
        method = "/viam.app.datasync.v1.DataSyncService/DataCaptureUpload"
        before = samples(await asyncio.to_thread(scrape_text, address))
        assert value(before, "edged_ingest_calls_total", method=method, status="OK") == 0
        meta = pb.UploadMetadata(
            part_id="p",
            component_name="c",
            method_name="Readings",
            type=pb.DATA_TYPE_TABULAR_SENSOR,
        )
        readings = []
        for i in range(5):
            r = pb.SensorData()
            r.struct.update({"i": i})
            readings.append(r.SerializeToString())
        async with UploadClient(
            server.address, api_key_id=key.key_id, api_key=key.secret, tls=False
        ) as client:
            await client.upload_readings(meta, readings, item_id="a")
            after_one = samples(await asyncio.to_thread(scrape_text, address))
            await client.upload_readings(meta, readings[:3], item_id="b")
            await client.upload_readings(meta, readings[:3], item_id="b")  # a repeat
        after = samples(await asyncio.to_thread(scrape_text, address))
        assert value(after_one, "edged_ingest_calls_total", method=method, status="OK") == 1
        assert value(after_one, "edged_ingest_stored_readings_total", kind="tabular") == 5
        assert value(after, "edged_ingest_calls_total", method=method, status="OK") == 3
        # The repeat stores nothing, so it adds no readings.
        assert value(after, "edged_ingest_stored_readings_total", kind="tabular") == 8
        assert value(after, "edged_ingest_stored_bytes_total", kind="tabular") == sum(
            len(r) for r in readings
        ) + sum(len(r) for r in readings[:3])
        assert value(after, "edged_ingest_call_duration_seconds_count", method=method) == 3
        assert value(after, "edged_ingest_received_bytes_total", method=method) > 0
        # A call with a bad token is refused before any handler: counted all the same.
        async with Channel("127.0.0.1", server.port) as channel:
            stub = data_sync_grpc.DataSyncServiceStub(channel)
            with pytest.raises(GRPCError) as refused:
                await stub.DataCaptureUpload(
                    pb.DataCaptureUploadRequest(metadata=meta),
                    metadata={"authorization": "Bearer not-a-token"},
                )
            assert refused.value.status is Status.UNAUTHENTICATED
        last = samples(await asyncio.to_thread(scrape_text, address))
        assert value(last, "edged_ingest_calls_total", method=method, status="UNAUTHENTICATED") == 1


# --------------------------------------------------------------------------- end to end


def test_daemon_and_ingest_metrics_move_with_uploads_and_logs_carry_fields(
    tmp_path: Path, key: KeyFile
) -> None:
    (tmp_path / "capture").mkdir()
    (tmp_path / "uploads").mkdir()
    (tmp_path / "bad").mkdir()
    ingest_log = tmp_path / "ingest.log"
    with ingest_process(
        tmp_path / "ingest",
        [
            *key.ingest_args(),
            "--org-id",
            "org-1",
            "--metrics-listen",
            "127.0.0.1:0",
            "--log-format",
            "json",
        ],
        log=ingest_log,
    ) as (ingest, port):
        line = read_line(ingest, 30).decode()
        match = re.search(r"metrics on http://([^/]+)/metrics", line)
        assert match, line
        ingest_metrics_at = match[1]
        cfg = tmp_path / "edged.yaml"
        cfg.write_text(f"""\
part_id: robot-metrics
state_dir: {tmp_path / "state"}
cloud:
  address: 127.0.0.1:{port}
  api_key_id: {key.key_id}
  api_key_file: {key.path}
  tls: false
sources:
  - kind: capture
    name: cams
    path: {tmp_path / "capture"}
  - kind: files
    name: bags
    path: {tmp_path / "uploads"}
    settle: 0s
  - kind: files
    name: broken
    path: {tmp_path / "bad"}
    settle: 0s
    dataset_ids: [no-such-dataset]
upload:
  backoff: {{initial: 50ms, max: 500ms}}
status:
  socket: {tmp_path / "edged.sock"}
  metrics_listen: 127.0.0.1:0
log:
  level: debug
  format: json
""")
        sock = str(tmp_path / "edged.sock")
        daemon_log = tmp_path / "edged.log"
        with daemon(cfg, daemon_log) as proc:
            wait_for("status socket", (tmp_path / "edged.sock").exists)
            at = edged("status", "--socket", sock, "--json")["metrics"]
            assert at and at.startswith("127.0.0.1:")

            def daemon_now() -> Samples:
                return samples(scrape_text(at))

            first = daemon_now()
            assert value(first, "edged_state", state="running") == 1
            assert value(first, "edged_uploaded_readings_total", kind="tabular") == 0
            assert value(first, "edged_upload_bandwidth_limit_bytes_per_second") == 0
            assert value(first, "edged_upload_bandwidth_override") == 0

            # Paused: what the sources take in shows as enqueued and as backlog.
            edged("pause", "--socket", sock)
            write_capture(tmp_path / "capture", 0, 300)
            (tmp_path / "uploads" / "run1.bag").write_bytes(b"b" * 50_000)
            wait_for(
                "enqueued while paused",
                lambda: (
                    value(
                        daemon_now(), "edged_enqueued_readings_total", source="cams", kind="tabular"
                    )
                    == 300
                    and value(daemon_now(), "edged_backlog_items", kind="file") == 1
                ),
            )
            paused = daemon_now()
            assert value(paused, "edged_state", state="paused") == 1
            assert value(paused, "edged_backlog_items", kind="tabular") == 300
            assert value(paused, "edged_backlog_bytes", kind="file") == 50_000
            assert value(paused, "edged_backlog_oldest_age_seconds") >= 0
            assert value(paused, "edged_enqueued_bytes_total", source="bags", kind="file") == 50_000
            assert value(paused, "edged_uploaded_readings_total", kind="tabular") == 0
            assert value(paused, "edged_disk_free_bytes") > 0
            assert value(paused, "edged_outbox_file_bytes") > 0
            assert value(paused, "edged_source_files_total", source="cams") >= 1

            # Resumed: the backlog drains into uploads, at both ends.
            edged("resume", "--socket", sock)
            wait_for("readings at ingest", lambda: ingest_count(tmp_path / "ingest") == 300)
            wait_for(
                "uploads counted",
                lambda: (
                    value(daemon_now(), "edged_uploaded_readings_total", kind="tabular") == 300
                    and value(daemon_now(), "edged_uploaded_items_total", kind="file") == 1
                    and value(daemon_now(), "edged_backlog_items", kind="tabular") == 0
                ),
            )
            done = daemon_now()
            assert value(done, "edged_uploaded_bytes_total", kind="file") == 50_000
            assert value(done, "edged_upload_duration_seconds_count", kind="tabular") >= 1
            assert value(done, "edged_state", state="running") == 1
            assert value(done, "edged_upload_sent_bytes_total") > 50_000  # file + batches
            assert value(done, "edged_upload_bandwidth_wait_seconds_total") == 0  # no cap
            stored = samples(scrape_text(ingest_metrics_at))
            assert value(stored, "edged_ingest_stored_readings_total", kind="tabular") == 300
            assert value(stored, "edged_ingest_stored_readings_total", kind="file") == 1
            assert value(stored, "edged_ingest_stored_bytes_total", kind="file") == 50_000
            upload = "/viam.app.datasync.v1.DataSyncService/DataCaptureUpload"
            calls = value(stored, "edged_ingest_calls_total", method=upload, status="OK")
            assert calls >= 1

            # More data: every counter moves again by exactly that much.
            write_capture(tmp_path / "capture", 300, 200)
            wait_for(
                "second round",
                lambda: value(daemon_now(), "edged_uploaded_readings_total", kind="tabular") == 500,
            )
            again = samples(scrape_text(ingest_metrics_at))
            assert value(again, "edged_ingest_stored_readings_total", kind="tabular") == 500
            assert value(again, "edged_ingest_calls_total", method=upload, status="OK") > calls

            # A file the server refuses: a failure by status, then a dead letter.
            (tmp_path / "bad" / "x.bin").write_bytes(b"x" * 10)
            wait_for(
                "dead letter counted",
                lambda: value(daemon_now(), "edged_dead_letters") == 1,
            )
            bad = daemon_now()
            assert (
                value(bad, "edged_upload_failures_total", kind="file", status="INVALID_ARGUMENT")
                == 1
            )
            assert value(bad, "edged_dead_lettered_total", status="INVALID_ARGUMENT") == 1
            daemon_text = scrape_text(at)
            ingest_text = scrape_text(ingest_metrics_at)
            proc.terminate()
            assert proc.wait(30) == 0

    # ---- the dashboard only uses names these scrapes offer
    offered = names_in(daemon_text) | names_in(ingest_text)
    used = set(re.findall(r"\bedged_[a-z_]+", DASHBOARD.read_text()))
    assert used, "the dashboard queries no edged metric"
    assert not used - offered, f"dashboard uses metrics no scrape offers: {used - offered}"
    assert {
        "edged_upload_bandwidth_limit_bytes_per_second",
        "edged_upload_bandwidth_override",
        "edged_upload_bandwidth_waiting",
    } <= offered

    # ---- daemon JSON log lines carry fields
    lines = json_lines(daemon_log)
    uploaded = [d for d in lines if d.get("event") == "uploaded"]
    file_line = next(d for d in uploaded if d["kind"] == "file")
    assert file_line["level"] == "info"
    assert file_line["path"] == str(tmp_path / "uploads" / "run1.bag")
    assert file_line["bytes"] == 50_000 and file_line["readings"] == 1
    assert file_line["attempt"] == 1 and file_line["status"] == "OK"
    assert isinstance(file_line["item_id"], str) and file_line["duration_ms"] >= 0
    batches = [d for d in uploaded if d["kind"] == "tabular"]
    assert batches and all(d["level"] == "debug" for d in batches)
    assert sum(d["readings"] for d in batches) == 500
    failed = next(d for d in lines if d.get("event") == "dead_lettered")
    assert failed["status"] == "INVALID_ARGUMENT" and failed["kind"] == "file"
    assert failed["path"] == str(tmp_path / "bad" / "x.bin")
    assert {"item_id", "attempt", "bytes", "duration_ms"} <= failed.keys()
    # Lines logged from a source's own task name it: one per batch enqueued, at debug.
    enqueued = [d for d in lines if d.get("event") == "enqueued"]
    assert {d["source"] for d in enqueued} == {"cams", "bags", "broken"}
    cams = [d for d in enqueued if d["source"] == "cams" and d["kind"] == "tabular"]
    assert sum(d["readings"] for d in cams) == 500 and all(d["level"] == "debug" for d in cams)
    assert key.secret not in daemon_log.read_text()

    # ---- ingest: one access line per call, with fields, and never a secret
    access = [d for d in json_lines(ingest_log) if d.get("event") == "call"]
    uploads = [d for d in access if d["method"] == upload and d["status"] == "OK"]
    assert len(uploads) == value(
        samples(ingest_text), "edged_ingest_calls_total", method=upload, status="OK"
    )
    for d in uploads:
        assert d["org"] == "org-1" and d["peer"].startswith("127.0.0.1:")
        assert d["duration_ms"] >= 0 and d["bytes_in"] > 0 and d["level"] == "info"
    assert any(d["method"].endswith("/Authenticate") for d in access)
    assert key.secret not in ingest_log.read_text()


def test_ingest_logs_never_hold_a_key_token_or_wrong_secret(tmp_path: Path, key: KeyFile) -> None:
    """Every credential that crosses the wire, right or wrong, stays out of the logs, at
    debug level too (the level that shows most)."""
    log = tmp_path / "ingest.log"
    wrong = "w" * 20 + os.urandom(8).hex()
    with ingest_process(
        tmp_path / "ingest",
        [
            *key.ingest_args(),
            "--log-format",
            "json",
            "--log-level",
            "debug",
        ],
        log=log,
    ) as (_, port):
        token = asyncio.run(_use_credentials(port, key, wrong))
    text = log.read_text()
    lines = json_lines(log)
    assert len([d for d in lines if d.get("event") == "call"]) >= 4
    for secret in (key.secret, wrong, token):
        assert secret not in text
    assert "Bearer" not in text and "authorization" not in text.lower()


async def _use_credentials(port: int, key: KeyFile, wrong: str) -> str:
    """Authenticate right and wrong, then call with the token and with a wrong token."""
    async with Channel("127.0.0.1", port) as channel:
        auth = auth_grpc.AuthServiceStub(channel)

        def request(secret: str) -> auth_pb2.AuthenticateRequest:
            return auth_pb2.AuthenticateRequest(
                entity=key.key_id,
                credentials=auth_pb2.Credentials(type="api-key", payload=secret),
            )

        with pytest.raises(GRPCError) as bad:
            await auth.Authenticate(request(wrong))
        assert bad.value.status is Status.UNAUTHENTICATED
        token = (await auth.Authenticate(request(key.secret))).access_token
        data = data_grpc.DataServiceStub(channel)
        query = data_pb2.TabularDataByFilterRequest()
        await data.TabularDataByFilter(query, metadata={"authorization": f"Bearer {token}"})
        with pytest.raises(GRPCError) as refused:
            await data.TabularDataByFilter(query, metadata={"authorization": f"Bearer {wrong}"})
        assert refused.value.status is Status.UNAUTHENTICATED
        return token


def test_metrics_endpoint_is_off_unless_configured(tmp_path: Path) -> None:
    """No port nobody asked for: the server listens once it has said so, on one port."""
    with ingest_process(tmp_path / "ingest") as (proc, port):
        listening = [
            c.laddr.port
            for c in psutil.Process(proc.pid).net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN
        ]
    assert listening == [port]


def test_metrics_listen_config_key_is_checked_and_round_trips(tmp_path: Path) -> None:
    from edged.daemon.config import load_config
    from edged.errors import ConfigErrors

    body = f"part_id: p\nstate_dir: {tmp_path / 's'}\nstatus:\n  metrics_listen: %s\n"
    cfg = tmp_path / "edged.yaml"
    cfg.write_text(body % "127.0.0.1:9464")
    config = load_config(cfg)
    assert config.status.metrics_listen == "127.0.0.1:9464"
    assert config.to_dict()["status"]["metrics_listen"] == "127.0.0.1:9464"
    cfg.write_text(body % "localhost")
    with pytest.raises(ConfigErrors) as bad:
        load_config(cfg)
    assert "edged.yaml:4: status.metrics_listen: 'localhost' is not HOST:PORT" in str(bad.value)
    cfg.write_text(f"part_id: p\nstate_dir: {tmp_path / 's'}\n")
    assert load_config(cfg).status.metrics_listen is None  # off by default


def test_json_lines_carry_extra_fields_and_the_running_source() -> None:
    import logging

    from edged.daemon.logs import _JsonFormatter, current_source

    record = logging.LogRecord("edged.x", logging.INFO, __file__, 1, "m %s", ("a",), None)
    record.__dict__.update({"event": "uploaded", "item_id": "i1", "bytes": 3})
    token = current_source.set("cams")
    try:
        doc = json.loads(_JsonFormatter().format(record))
    finally:
        current_source.reset(token)
    assert doc["msg"] == "m a" and doc["event"] == "uploaded" and doc["item_id"] == "i1"
    assert doc["bytes"] == 3 and doc["source"] == "cams"
    for internal in ("args", "pathname", "lineno", "msecs", "exc_info"):
        assert internal not in doc


def test_json_format_turns_python_warnings_into_json_lines() -> None:
    """A library's warning (watchdog warns on a re-added inotify watch) must not be the one
    raw line in a JSON log."""
    script = (
        "import warnings\n"
        "from edged.daemon.logs import setup_logging\n"
        "setup_logging('info', 'json')\n"
        "warnings.warn('callback already exists', RuntimeWarning)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    lines = out.stderr.splitlines()
    assert len(lines) == 1, out.stderr
    doc = json.loads(lines[0])
    assert doc["level"] == "warning" and "callback already exists" in doc["msg"]
