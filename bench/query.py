"""query: filter latency over a large index and binary export throughput, over gRPC.

Setup writes the index directly (plain sqlite3, same columns the upload path fills)
for speed: N readings (1M; --quick 100k) from 20 components on 4 parts, tagged on every
7th, one per 10 ms of capture time; and B binary files of 1 MiB. Then a real
`edged ingest` (in this process, plaintext, open) serves them and a grpclib client on
loopback asks each scenario REPS times; latency = the call's wall time at the client.

Scenarios (limit 100 unless said):
- first page: no filter (the whole organisation), ascending;
- component: one component's first page (1/20 of the rows);
- component+interval: one component within a 1% window of capture time;
- tags: MATCH_BY_OR on a tag 1/7 of the rows carry;
- deep page: the page after a `last` token from the middle of the index;
- count component: count_only over one component (scans its 1/20 of the index);
- export: every binary with include_binary, pages of 16, as `edged query
  export-binaries` does (without writing files): MB/s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sqlite3
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from grpclib.client import Channel

from bench import common
from edged._proto.app.data.v1 import data_pb2 as dpb
from edged._proto.app.data.v1.data_grpc import DataServiceStub
from edged.ingest import IngestServer, IngestSettings
from edged.ingest.blobs import blob_key
from edged.ingest.storage import SCHEMA, migrate

NAME = "query"
T0_NS = 1_767_225_600 * 1_000_000_000  # 2026-01-01
STEP_NS = 10_000_000
COMPONENTS = 20
BLOB_BYTES = 1 * common.MiB


def _populate(root: Path, readings: int, blobs: int) -> None:
    """The index as the upload path would leave it, written in bulk."""
    root.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(root / "ingest.sqlite3", isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=OFF")
    db.executescript(SCHEMA)
    migrate(db)
    db.execute("BEGIN")
    batch: list[tuple[Any, ...]] = []
    for i in range(readings):
        t = T0_NS + i * STEP_NS
        batch.append(
            (
                "bench-upload",
                "",
                f"part-{i % 4}",
                "rdk:component:sensor",
                f"sensor-{i % COMPONENTS}",
                "Readings",
                "{}",
                '["calibrate"]' if i % 7 == 0 else "[]",
                "[]",
                t,
                t + 1_000,
                json.dumps({"readings": {"seq": i, "temp_c": 20 + (i % 100) / 10}}),
                t,
                t,
            )
        )
        if len(batch) == 50_000:
            _insert_readings(db, batch)
            batch.clear()
    _insert_readings(db, batch)
    payload = os.urandom(BLOB_BYTES)
    for i in range(blobs):
        bid = uuid.uuid4().hex
        key = blob_key("", bid)
        (root / key).parent.mkdir(parents=True, exist_ok=True)
        (root / key).write_bytes(payload)
        t = T0_NS + i * STEP_NS
        db.execute(
            "INSERT INTO binaries(binary_data_id, file_id, upload_id, org_id, kind, part_id,"
            " component_type, component_name, method_name, method_parameters, file_name,"
            " file_extension, mime_type, tags, dataset_ids, time_requested_ns,"
            " time_received_ns, size, sha256, blob_path, received_at_ns, time_captured_ns)"
            " VALUES (?,?,?,'','binary','part-0','rdk:component:camera','cam','GetImages',"
            " '{}','','.jpg','image/jpeg','[]','[]',?,?,?,'',?,?,?)",
            (bid, bid, bid, t, t, BLOB_BYTES, key, t, t),
        )
    db.execute("COMMIT")
    db.execute("ANALYZE")
    db.close()


def _insert_readings(db: sqlite3.Connection, rows: list[tuple[Any, ...]]) -> None:
    db.executemany(
        "INSERT INTO readings(upload_id, org_id, part_id, component_type, component_name,"
        " method_name, method_parameters, tags, dataset_ids, time_requested_ns,"
        " time_received_ns, data, received_at_ns, time_captured_ns)"
        " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
        rows,
    )


def _req(f: dpb.Filter | None = None, **kw: Any) -> dpb.TabularDataByFilterRequest:
    last = kw.pop("last", "")
    dr = dpb.DataRequest(filter=f or dpb.Filter(), limit=100, last=last)
    return dpb.TabularDataByFilterRequest(data_request=dr, **kw)


async def _latency(call: Callable[[], Awaitable[Any]], reps: int) -> common.Figures:
    await call()  # warm the page cache and the connection
    times: list[float] = []
    for _ in range(reps):
        start = time.perf_counter()
        await call()
        times.append((time.perf_counter() - start) * 1000)
    return {
        "p50_ms": common.percentile(times, 50),
        "p99_ms": common.percentile(times, 99),
        "reps": reps,
    }


async def _measure(root: Path, readings: int, reps: int) -> list[dict[str, Any]]:
    settings = IngestSettings(data_dir=root, synchronous="OFF")
    async with IngestServer(settings) as server:
        channel = Channel("127.0.0.1", server.port)
        stub = DataServiceStub(channel)
        try:
            middle = T0_NS + readings // 2 * STEP_NS
            window = dpb.CaptureInterval()
            window.start.FromNanoseconds(middle)
            window.end.FromNanoseconds(middle + readings // 100 * STEP_NS)
            skip = dpb.CaptureInterval()  # a real token from the middle of the index
            skip.start.FromNanoseconds(middle)
            deep_last = (await stub.TabularDataByFilter(_req(dpb.Filter(interval=skip)))).last
            tags = dpb.TagsFilter(type=dpb.TAGS_FILTER_TYPE_MATCH_BY_OR, tags=["calibrate"])
            scenarios: list[tuple[str, Callable[[], Awaitable[Any]]]] = [
                ("first page", lambda: stub.TabularDataByFilter(_req())),
                (
                    "component",
                    lambda: stub.TabularDataByFilter(_req(dpb.Filter(component_name="sensor-7"))),
                ),
                (
                    "component+interval",
                    lambda: stub.TabularDataByFilter(
                        _req(dpb.Filter(component_name="sensor-7", interval=window))
                    ),
                ),
                ("tags", lambda: stub.TabularDataByFilter(_req(dpb.Filter(tags_filter=tags)))),
                ("deep page", lambda: stub.TabularDataByFilter(_req(last=deep_last))),
                (
                    "count component",
                    lambda: stub.TabularDataByFilter(
                        _req(dpb.Filter(component_name="sensor-7"), count_only=True)
                    ),
                ),
            ]
            rows: list[dict[str, Any]] = []
            for name, call in scenarios:
                figures = await _latency(call, reps)
                rows.append({"scenario": name, **figures})
                print(f"  {name}: p50 {figures['p50_ms']:.1f} ms", file=sys.stderr, flush=True)
            rows.append({"scenario": "export", **await _export(stub)})
        finally:
            channel.close()
    return rows


async def _export(stub: DataServiceStub) -> common.Figures:
    dr = dpb.DataRequest(limit=16)
    total = 0
    start = time.perf_counter()
    while True:
        resp = await stub.BinaryDataByFilter(
            dpb.BinaryDataByFilterRequest(data_request=dr, include_binary=True)
        )
        if not resp.data:
            break
        total += sum(len(d.binary) for d in resp.data)
        dr.last = resp.last
    seconds = time.perf_counter() - start
    return {"mb_per_s": total / 1e6 / seconds, "export_mib": total / common.MiB}


def run(quick: bool = False, runs: int | None = None) -> Path:
    readings = 100_000 if quick else 1_000_000
    blobs = 64 if quick else 256
    reps = runs or (30 if quick else 100)
    machine = common.machine_info()
    with tempfile.TemporaryDirectory(prefix="edged-bench-query-") as tmp:
        root = Path(tmp) / "ingest"
        start = time.perf_counter()
        _populate(root, readings, blobs)
        setup_s = time.perf_counter() - start
        print(f"query: {readings:,} readings indexed in {setup_s:.1f}s", file=sys.stderr)
        rows = asyncio.run(_measure(root, readings, reps))
    columns: list[common.Column] = [
        ("scenario", "scenario", ""),
        ("p50_ms", "p50 ms", ".1f"),
        ("p99_ms", "p99 ms", ".1f"),
        ("mb_per_s", "MB/s", ".0f"),
    ]
    print(f"\nquery ({readings:,} readings, {blobs} x 1 MiB binaries, {reps} reps)")
    print(common.format_table(rows, columns))
    return common.write_result(
        NAME,
        {"readings": readings, "binaries": blobs, "reps": reps, "rows": rows},
        machine,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.query")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--runs", type=int)
    args = parser.parse_args(argv)
    run(args.quick, args.runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
