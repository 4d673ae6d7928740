"""`edged query` against a real in-process ingest server (TLS, API key)."""

from __future__ import annotations

import asyncio
import datetime as dt
import importlib.util
import json
from pathlib import Path

import pytest

from edged.cli import main
from edged.cli.query import MANIFEST
from edged.client import UploadClient
from edged.ingest import IngestServer
from tests.support.credentials import Certs, KeyFile

T0 = dt.datetime(2026, 4, 1, tzinfo=dt.UTC)


def _base(ingest: IngestServer, key: KeyFile, certs: Certs) -> list[str]:
    return [
        "--address", ingest.address, "--api-key-id", key.key_id,
        "--api-key-file", str(key.path), "--ca-file", str(certs.ca_file),
    ]  # fmt: skip


async def _seed(client: UploadClient) -> list[str]:
    for name in ("temp", "hum"):
        await client.tabular_data_capture_upload(
            [{"v": i} for i in range(3)],
            "part-1",
            "rdk:component:sensor",
            name,
            "Readings",
            data_request_times=[(T0 + dt.timedelta(seconds=i),) * 2 for i in range(3)],
        )
    return [
        await client.binary_data_capture_upload(
            f"img{i}".encode() * 1000, "part-1", "rdk:component:camera", "cam", "GetImages", ".png",
            tags=["odd"] if i % 2 else None,
            data_request_times=(T0 + dt.timedelta(seconds=i), T0 + dt.timedelta(seconds=i)),
        )
        for i in range(5)
    ]  # fmt: skip


async def test_tabular_and_binary_listing(
    ingest: IngestServer, client: UploadClient, key: KeyFile, certs: Certs,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    ids = await _seed(client)
    base = _base(ingest, key, certs)
    argv = ["query", "tabular", *base, "--component-name", "hum", "--json", "--limit", "2"]
    assert await asyncio.to_thread(main, argv) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["component_name"], r["data"]) for r in rows] == [
        ("hum", {"v": 0}),
        ("hum", {"v": 1}),
    ]

    argv = ["query", "binary", *base, "--tag", "odd", "--json"]
    assert await asyncio.to_thread(main, argv) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["binary_data_id"] for r in rows] == [ids[1], ids[3]]
    assert rows[0]["mime_type"] == "image/png" and rows[0]["size"] == 4000

    start = (T0 + dt.timedelta(seconds=2)).isoformat()
    argv = ["query", "binary", *base, "--start", start]
    assert await asyncio.to_thread(main, argv) == 0
    assert [line.split()[0] for line in capsys.readouterr().out.splitlines()] == ids[2:]


async def test_export_binaries_writes_every_file_with_progress(
    ingest: IngestServer, client: UploadClient, key: KeyFile, certs: Certs, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    ids = await _seed(client)
    out = tmp_path / "export"
    argv = ["query", "export-binaries", str(out), *_base(ingest, key, certs)]
    assert await asyncio.to_thread(main, argv) == 0
    captured = capsys.readouterr()
    assert sorted(p.name for p in out.iterdir()) == sorted([*(f"{i}.png" for i in ids), MANIFEST])
    for n, i in enumerate(ids):
        assert (out / f"{i}.png").read_bytes() == f"img{n}".encode() * 1000
    assert "5/5" in captured.err and "[" in captured.err
    assert "\r" not in captured.err  # not a terminal: lines, no redrawn bar
    assert "exported 5 file(s), 20000 bytes" in captured.out


async def test_sql_and_errors(
    ingest: IngestServer, client: UploadClient, key: KeyFile, certs: Certs,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    await _seed(client)
    base = _base(ingest, key, certs)
    code = await asyncio.to_thread(
        main, ["query", "sql", "SELECT count(*) AS n FROM readings", *base]
    )
    captured = capsys.readouterr()
    if importlib.util.find_spec("edged.ingest.sql") is not None:
        assert code == 0 and json.loads(captured.out) == {"n": 6}
    else:
        assert code == 1 and "UNIMPLEMENTED" in captured.err
    code = await asyncio.to_thread(
        main, ["query", "sql", "SELECT 1", "--org-id", "someone-else", *base]
    )
    assert code == 1 and "PERMISSION_DENIED" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["query", "tabular", *base, "--start", "nope"])
    assert exit_info.value.code == 2
    assert "--start: 'nope' is neither RFC 3339 nor epoch seconds" in capsys.readouterr().err


def test_query_maps_transport_faults_like_every_call(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`edged query` goes through the one connection, so a server that is not there is a
    mapped `UploadError` named as a query failure, not a bare socket error."""
    import socket

    with socket.socket() as s:  # a loopback port with nothing listening on it
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"
    assert main(["query", "tabular", "--address", address, "--insecure"]) != 0
    err = capsys.readouterr().err
    assert "query failed: UNAVAILABLE" in err, err
    assert "upload" not in err


async def test_export_keeps_unique_original_names_and_writes_a_manifest(
    ingest: IngestServer, client: UploadClient, key: KeyFile, certs: Certs, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    ids = {}
    for name, ext, data in (
        ("run-1", ".mp4", b"video"),
        ("notes", ".txt", b"first notes"),
        ("notes", ".txt", b"other notes"),  # the same name twice: both get their ids
        ("../../etc/passwd", "", b"hostile"),  # a name that would leave the directory
    ):
        ids[data] = await client.file_upload(
            "part-1", data, component_name="cam", file_name=name, file_extension=ext,
            tags=["t"],
        )  # fmt: skip
    out = tmp_path / "export"
    argv = ["query", "export-binaries", str(out), *_base(ingest, key, certs), "--json"]
    assert await asyncio.to_thread(main, argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["exported"] == 4 and summary["manifest"] == str(out / MANIFEST)
    assert (out / "run-1.mp4").read_bytes() == b"video"
    for data in (b"first notes", b"other notes"):
        assert (out / f"{ids[data]}.txt").read_bytes() == data
    assert not (out / "notes.txt").exists()
    assert not (tmp_path / "etc").exists()
    rows = [json.loads(line) for line in (out / MANIFEST).read_text().splitlines()]
    by_id = {r["binary_data_id"]: r for r in rows}
    assert set(by_id) == set(ids.values())
    video = by_id[ids[b"video"]]
    assert video["file"] == "run-1.mp4" and video["original_name"] == "run-1.mp4"
    assert video["component_name"] == "cam" and video["tags"] == ["t"] and video["size"] == 5
    hostile = by_id[ids[b"hostile"]]
    assert hostile["original_name"] == "../../etc/passwd"
    assert hostile["file"].startswith(ids[b"hostile"])
    assert (out / hostile["file"]).read_bytes() == b"hostile"


async def test_query_takes_the_daemon_config(
    ingest: IngestServer, client: UploadClient, key: KeyFile, certs: Certs, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    ids = await _seed(client)
    cfg = tmp_path / "edged.yaml"
    cfg.write_text(
        f"part_id: p\nstate_dir: {tmp_path / 'state'}\ncloud:\n  address: {ingest.address}\n"
        f"  api_key_id: {key.key_id}\n  api_key_file: {key.path}\n  ca_file: {certs.ca_file}\n"
    )
    argv = ["query", "binary", "-c", str(cfg), "--tag", "odd", "--json"]
    assert await asyncio.to_thread(main, argv) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["binary_data_id"] for r in rows] == [ids[1], ids[3]]
    mixed = ["query", "binary", "-c", str(cfg), "--address", ingest.address]
    assert await asyncio.to_thread(main, mixed) == 2
    assert "drop --address" in capsys.readouterr().err


async def test_tls_to_a_plaintext_server_says_query_failed_and_hints_insecure(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from edged.ingest import IngestSettings

    async with IngestServer(IngestSettings(data_dir=tmp_path / "plain")) as plain:
        argv = ["query", "tabular", "--address", plain.address]
        assert await asyncio.to_thread(main, argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("edged: query failed: UNAVAILABLE:"), err
    assert "upload failed" not in err and "--insecure" in err
