"""The `jsonl` source on real files and a real outbox: line conversion, partial lines,
quarantine, exact resume, rotation (rename and copytruncate), globs, and kill -9."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from edged._proto.app.datasync.v1 import data_sync_pb2 as pb
from edged.daemon.config import OutboxConfig
from edged.daemon.outbox import Outbox
from edged.daemon.sources.base import SourceContext
from edged.daemon.sources.jsonl import BadLine, JsonlConfig, JsonlSource, parse_line, parse_time
from tests.support.processes import read_line

REPO = Path(__file__).resolve().parents[1]
NOW = 1_700_000_000.25
NOW_NS = 1_700_000_000_250_000_000
S = 1_000_000_000


@pytest.fixture
def logs(tmp_path: Path) -> Path:
    d = tmp_path / "log"
    d.mkdir()
    return d


def source(
    box: Outbox, path: Path, clock: Callable[[], float] = lambda: NOW, name: str = "imu"
) -> JsonlSource:
    config = JsonlConfig(
        path=path,
        name=name,
        component_type="rdk:component:movement_sensor",
        component_name="imu",
        method="Readings",
        tags=("t1",),
        dataset_ids=("ds",),
    )
    return JsonlSource(config, SourceContext("part-1", box, box.state_dir, clock=clock))


def lines(*seqs: int) -> bytes:
    return b"".join(b'{"seq": %d}\n' % i for i in seqs)


def append(path: Path, data: bytes) -> None:
    with path.open("ab") as f:
        f.write(data)


async def readings(box: Outbox) -> list[pb.SensorData]:
    """Everything committed since the last call (leased, so not returned again)."""
    out: list[pb.SensorData] = []
    while (
        item := await box.lease(lease_s=86400, max_readings=10000, max_bytes=1 << 30)
    ) is not None:
        out += [pb.SensorData.FromString(b) for b in await box.readings_of(item)]
    return out


async def seqs(box: Outbox) -> list[int]:
    return [int(r.struct.fields["seq"].number_value) for r in await readings(box)]


def times(r: pb.SensorData) -> tuple[int, int]:
    return r.metadata.time_requested.ToNanoseconds(), r.metadata.time_received.ToNanoseconds()


# --------------------------------------------------------------------------- pure helpers


@pytest.mark.parametrize(
    ("value", "ns"),
    [
        ("2023-11-14T22:13:20Z", 1_700_000_000 * S),
        ("2023-11-14T22:13:20.5Z", 1_700_000_000 * S + S // 2),
        ("2023-11-14T22:13:20.123456789Z", 1_700_000_000 * S + 123_456_789),
        ("2023-11-14T22:13:20.1234567891234z", 1_700_000_000 * S + 123_456_789),
        ("2023-11-15T00:13:20+02:00", 1_700_000_000 * S),
        ("2023-11-14 17:13:20.25-05:00", 1_700_000_000 * S + S // 4),
        (1_700_000_000, 1_700_000_000 * S),
        (1_700_000_000.5, 1_700_000_000 * S + S // 2),
        (0, 0),
        (-1.5, -(S + S // 2)),
    ],
)
def test_parse_time(value: Any, ns: int) -> None:
    assert parse_time(value) == ns


@pytest.mark.parametrize(
    "value",
    [
        "2023-11-14T22:13:20",  # RFC 3339 needs an offset
        "2023-11-14",
        "yesterday",
        "2023-02-30T00:00:00Z",
        "2023-11-14T24:00:00Z",
        True,
        None,
        [1],
        float("nan"),
        1e300,
        10**20,
    ],
)
def test_parse_time_refuses(value: Any) -> None:
    with pytest.raises(ValueError):
        parse_time(value)


@pytest.mark.parametrize(
    ("line", "want_times", "want_data"),
    [
        (b'{"a": 1}', (NOW_NS, NOW_NS), {"a": 1}),
        (b'{"a": 1, "time": 5}', (5 * S, 5 * S), {"a": 1, "time": 5}),
        (
            b'{"time": "1970-01-01T00:00:07Z", "data": {"x": [1, "y"]}}',
            (7 * S, 7 * S),
            {"x": [1, "y"]},
        ),
        (b'{"time_requested": 1, "time_received": 2.5, "data": {}}', (S, 2 * S + S // 2), {}),
        (b'{"time": 9, "time_received": 10, "data": {"v": null}}', (9 * S, 10 * S), {"v": None}),
        (b'{"time_requested": 3}', (3 * S, NOW_NS), {"time_requested": 3}),
        (b'{"data": 5, "b": true}', (NOW_NS, NOW_NS), {"data": 5, "b": True}),
        (
            b'{"time": null, "n": {"deep": {"er": 1.5}}}\r',
            (NOW_NS, NOW_NS),
            {"time": None, "n": {"deep": {"er": 1.5}}},
        ),
    ],
)
def test_parse_line(line: bytes, want_times: tuple[int, int], want_data: dict[str, Any]) -> None:
    from google.protobuf.json_format import MessageToDict

    r = parse_line(line, NOW_NS)
    assert times(r) == want_times
    assert MessageToDict(r.struct) == want_data


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        (b"not json", "not JSON"),
        (b'{"a": 1', "not JSON"),
        (b"[1, 2]", "not a JSON object"),
        (b'"text"', "not a JSON object"),
        (b'{"a": NaN}', "not JSON"),
        (b'{"a": 1}\xff', "not JSON"),
        (b'{"time": "noon"}', "not RFC 3339"),
        (b'{"time_received": true}', "time True"),
        (b"[" * 100_000, "nested too deeply"),
    ],
)
def test_parse_line_refuses(line: bytes, reason: str) -> None:
    with pytest.raises(BadLine, match=reason):
        parse_line(line, NOW_NS)


# --------------------------------------------------------------------------- tailing


async def test_lines_become_readings_with_metadata(box: Outbox, logs: Path) -> None:
    f = logs / "imu.jsonl"
    f.write_bytes(
        b'{"time": "2023-11-14T22:13:20Z", "data": {"x": 1}}\n\n{"time": 1700000001.5, "y": 2}\n'
    )
    src = source(box, f)
    await src.scan_once()
    item = await box.lease(lease_s=60, max_readings=100, max_bytes=1 << 20)
    assert item is not None
    meta = pb.UploadMetadata.FromString(item.metadata)
    assert (meta.part_id, meta.type, meta.component_name, meta.method_name) == (
        "part-1",
        pb.DATA_TYPE_TABULAR_SENSOR,
        "imu",
        "Readings",
    )
    assert meta.component_type == "rdk:component:movement_sensor"
    assert list(meta.tags) == ["t1"] and list(meta.dataset_ids) == ["ds"]
    r1, r2 = [pb.SensorData.FromString(b) for b in await box.readings_of(item)]
    assert times(r1) == (1_700_000_000 * S,) * 2 and r1.struct.fields["x"].number_value == 1
    assert times(r2) == (1_700_000_001 * S + S // 2,) * 2 and set(r2.struct.fields) == {"time", "y"}
    progress = await box.progress_of("imu", str(f))
    assert progress is not None
    assert (progress.offset, progress.line, progress.inode) == (
        f.stat().st_size,
        3,
        f.stat().st_ino,
    )
    assert src.stats.readings == 2 and src.stats.files_seen == 1


async def test_partial_line_waits_for_its_newline(box: Outbox, logs: Path) -> None:
    f = logs / "imu.jsonl"
    f.write_bytes(lines(0, 1) + b'{"seq": ')
    src = source(box, f)
    await src.scan_once()
    assert await seqs(box) == [0, 1]
    await src.scan_once()
    assert await seqs(box) == []
    append(f, b"2}\n" + lines(3) + b'{"seq"')
    await src.scan_once()
    assert await seqs(box) == [2, 3]


async def test_bad_line_quarantined_and_tailing_continues(box: Outbox, logs: Path) -> None:
    f = logs / "imu.jsonl"
    good = lines(0)
    f.write_bytes(good + b"oops {\n" + lines(1) + b"[1]\n" + lines(2))
    src = source(box, f, name="imu/left arm")
    await src.scan_once()
    assert await seqs(box) == [0, 1, 2]
    bad_file = box.state_dir / "quarantine" / "imu_left_arm.badlines.jsonl"
    assert bad_file.stat().st_mode & 0o777 == 0o600
    records = [json.loads(x) for x in bad_file.read_text().splitlines()]
    assert [(r["file"], r["line"], r["reason"][:8], r["text"]) for r in records] == [
        (str(f), 2, "not JSON", "oops {"),
        (str(f), 4, "not a JS", "[1]"),
    ]
    assert records[0]["offset"] == len(good)
    assert f.read_bytes()[records[1]["offset"] :].startswith(b"[1]\n")
    assert src.stats.quarantined == 2
    append(f, b"\xff\xfe nope\n" + lines(3))
    await src.scan_once()
    assert await seqs(box) == [3]
    last = json.loads(bad_file.read_text().splitlines()[-1])
    assert last["line"] == 6 and "\ufffd" in last["text"]


async def test_only_bad_lines_still_advance(box: Outbox, logs: Path) -> None:
    f = logs / "imu.jsonl"
    f.write_bytes(b"x\n\ny\n")
    await source(box, f).scan_once()
    progress = await box.progress_of("imu", str(f))
    assert progress is not None and (progress.offset, progress.line) == (5, 3)
    await source(box, f).scan_once()  # a restart does not quarantine them again
    bad = box.state_dir / "quarantine" / "imu.badlines.jsonl"
    assert len(bad.read_text().splitlines()) == 2


async def test_overlong_line_quarantined(
    box: Outbox, logs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from edged.daemon.sources import jsonl

    monkeypatch.setattr(jsonl, "CHUNK", 64)
    monkeypatch.setattr(jsonl, "MAX_LINE", 200)
    f = logs / "imu.jsonl"
    f.write_bytes(lines(0) + b'{"pad": "' + b"p" * 500 + b'"}\n' + lines(1) + b'{"seq": 2}')
    src = source(box, f)
    await src.scan_once()
    assert await seqs(box) == [0, 1]
    assert src.stats.quarantined == 1
    append(f, b"\n")
    await src.scan_once()
    assert await seqs(box) == [2]


async def test_restart_resumes_exactly(box: Outbox, logs: Path) -> None:
    f = logs / "imu.jsonl"
    f.write_bytes(lines(*range(5)))
    await source(box, f).scan_once()
    append(f, lines(*range(5, 9)) + b'{"seq": 9')
    await source(box, f).scan_once()
    append(f, b"}\n")
    again = source(box, f)
    await again.scan_once()
    await again.scan_once()
    assert await seqs(box) == list(range(10))


async def test_rotation_by_rename_keeps_late_lines(box: Outbox, logs: Path) -> None:
    f = logs / "imu.jsonl"
    f.write_bytes(lines(*range(3)))
    src = source(box, f)
    await src.scan_once()
    append(f, lines(3, 4) + b'{"seq": 5}')  # unread, and a last line without newline
    f.rename(logs / "imu.jsonl.1")
    f.write_bytes(lines(6, 7))
    await src.scan_once()
    assert await seqs(box) == list(range(8))
    progress = await box.progress_of("imu", str(f))
    assert progress is not None and progress.inode == f.stat().st_ino
    await source(box, f).scan_once()  # restart after rotation
    assert await seqs(box) == []


async def test_rotation_waits_while_new_file_is_empty(box: Outbox, logs: Path) -> None:
    f = logs / "imu.jsonl"
    f.write_bytes(lines(0))
    src = source(box, f)
    await src.scan_once()
    old = logs / "imu.jsonl.1"
    f.rename(old)
    f.touch()  # logrotate's `create`; the writer still holds the old file
    append(old, lines(1))
    await src.scan_once()
    append(old, lines(2))
    restarted = source(box, f)
    await restarted.scan_once()
    assert await seqs(box) == [0, 1, 2]
    progress = await box.progress_of("imu", str(f))
    assert progress is not None and progress.inode == old.stat().st_ino  # not switched yet
    append(old, lines(3))
    f.write_bytes(lines(4))  # the writer reopened
    await restarted.scan_once()
    assert await seqs(box) == [3, 4]


async def test_rotated_file_gone(box: Outbox, logs: Path) -> None:
    f = logs / "imu.jsonl"
    f.write_bytes(lines(0))
    src = source(box, f)
    await src.scan_once()
    f.unlink()
    await src.scan_once()
    f.write_bytes(lines(1))
    await src.scan_once()
    assert await seqs(box) == [0, 1]


async def test_copytruncate(box: Outbox, logs: Path) -> None:
    f = logs / "imu.jsonl"
    f.write_bytes(lines(*range(10)))
    src = source(box, f)
    await src.scan_once()
    inode = f.stat().st_ino
    with f.open("r+b") as fh:
        fh.truncate(0)
    append(f, lines(10, 11))
    assert f.stat().st_ino == inode
    await src.scan_once()
    assert await seqs(box) == list(range(12))
    assert src.stats.truncated == 1


async def test_glob_picks_up_files_and_rotated_names(box: Outbox, logs: Path) -> None:
    a = logs / "a.jsonl"
    a.write_bytes(lines(0))
    (logs / "ignored.txt").write_bytes(lines(100))
    (logs / ".hidden.jsonl").write_bytes(lines(101))
    (logs / "link.jsonl").symlink_to(a)
    src = source(box, logs / "*.jsonl")
    await src.scan_once()
    assert await seqs(box) == [0]
    (logs / "b.jsonl").write_bytes(lines(1))
    append(a, lines(2))
    await src.scan_once()
    assert sorted(await seqs(box)) == [1, 2]
    append(a, lines(3))
    a.rename(logs / "a-old.jsonl")  # the rotated name matches the glob too
    a.write_bytes(lines(4))
    await src.scan_once()
    append(logs / "a-old.jsonl", lines(5))  # a late write to the old file
    await src.scan_once()
    await source(box, logs / "*.jsonl").scan_once()
    assert sorted(await seqs(box)) == [3, 4, 5]
    assert src.stats.files_seen == 3


async def test_backpressure_keeps_offset(tmp_path: Path, logs: Path) -> None:
    free = {"bytes": 0}
    box = await Outbox.open(
        tmp_path / "state", OutboxConfig(min_free_disk=1 << 20), free_disk=lambda _: free["bytes"]
    )
    try:
        f = logs / "imu.jsonl"
        f.write_bytes(lines(0, 1))
        src = source(box, f)
        await src.scan_once()
        assert src.stats.backpressure and await seqs(box) == []
        free["bytes"] = 1 << 40
        await src.scan_once()
        assert await seqs(box) == [0, 1] and not src.stats.backpressure
    finally:
        await box.close()


async def test_run_follows_appends_and_new_files(box: Outbox, logs: Path) -> None:
    src = source(box, logs / "*.jsonl", time.time)
    task = asyncio.create_task(src.run())
    got: list[int] = []

    async def until(n: int) -> None:
        end = time.monotonic() + 10
        while len(got) < n:
            assert time.monotonic() < end, f"only {got} within 10 s"
            got.extend(await seqs(box))
            await asyncio.sleep(0.02)

    try:
        (logs / "a.jsonl").write_bytes(lines(0))
        await until(1)
        append(logs / "a.jsonl", lines(1))
        (logs / "b.jsonl").write_bytes(lines(2))
        await until(3)
        assert sorted(got) == [0, 1, 2]
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


CHILD = """
import asyncio, sys
from pathlib import Path
import edged.daemon.sources.jsonl as jsonl
from edged.daemon.outbox import Outbox
from edged.daemon.sources.base import SourceContext

jsonl.CHUNK = 1024  # many small transactions: more places for the kill to land

async def main() -> None:
    box = await Outbox.open(Path(sys.argv[1]))
    config = jsonl.JsonlConfig(path=Path(sys.argv[2]), name="imu", component_name="imu")
    src = jsonl.JsonlSource(config, SourceContext("p", box, Path(sys.argv[1])))
    print("ready", flush=True)
    await src.scan_once()
    await box.close()
    print(f"done {src.stats.readings}", flush=True)

asyncio.run(main())
"""


def kill_children_mid_run(state: Path, f: Path, rounds: int) -> tuple[int, set[str]]:
    """Append lines (and one bad line) per round; a child tails them and is SIGKILLed at a
    random moment of its run. Returns (lines written, bad line texts)."""
    script = state.parent / "child.py"
    script.write_text(CHILD)
    rng = random.Random(7)
    total, bad_lines, kills = 0, set(), 0
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for round_ in range(rounds):
        chunk = bytearray()
        for _ in range(3000):
            chunk += b'{"seq": %d, "pad": "%s"}\n' % (total, b"x" * rng.randrange(40))
            total += 1
        bad_lines.add(f"bad-{round_}")
        chunk += f"bad-{round_}\n".encode()
        append(f, bytes(chunk))
        proc = subprocess.Popen(
            [sys.executable, str(script), str(state), str(f)], env=env, stdout=subprocess.PIPE
        )
        assert read_line(proc, 20) == b"ready\n"
        try:
            proc.wait(timeout=rng.uniform(0.0, 0.2))
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait(timeout=10)
        assert proc.stdout is not None
        proc.stdout.close()
    assert kills >= 2, "the kills never landed mid-run; make the work longer"
    return total, bad_lines


async def test_kill_9_loses_and_repeats_nothing(tmp_path: Path, logs: Path) -> None:
    state, f = tmp_path / "state", logs / "imu.jsonl"
    total, bad_lines = kill_children_mid_run(state, f, rounds=6)
    box = await Outbox.open(state)
    try:
        await source(box, f).scan_once()
        got = await seqs(box)
        assert len(got) == total and set(got) == set(range(total))
        bad = box.state_dir / "quarantine" / "imu.badlines.jsonl"
        texts = {json.loads(x)["text"] for x in bad.read_text().splitlines()}
        assert texts == bad_lines  # each at least once (a kill may repeat a record)
    finally:
        await box.close()


async def test_run_waits_for_missing_directory(box: Outbox, tmp_path: Path) -> None:
    d = tmp_path / "not-yet"
    src = source(box, d / "*.jsonl", time.time)
    task = asyncio.create_task(src.run())
    try:
        await asyncio.sleep(0.1)  # let it start while the directory is missing
        assert not task.done()
        d.mkdir()
        (d / "a.jsonl").write_bytes(lines(0, 1))
        end = time.monotonic() + 10
        got: list[int] = []
        while len(got) < 2:
            assert time.monotonic() < end, f"only {got} within 10 s"
            got += await seqs(box)
            await asyncio.sleep(0.02)
        assert got == [0, 1]
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
