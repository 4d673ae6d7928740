"""Secrets and modes, end to end: a real `edged run` with an API key file (0600) against a
real `edged ingest` with keys.

Phases: a wrong key in the key file (every call refused: state `auth_failed`, nothing
lost), then the file is fixed and `edged resume` (the documented remedy: README's
troubleshooting table) drains everything. Afterwards neither secret appears in any
captured output (daemon log, ingest stdout/stderr, `edged status --json`,
`edged dead-letters --json`) nor in the state files; raw grpclib calls without a token,
with a forged token and with a wrong key all get UNAUTHENTICATED; and the state and
ingest files have their documented modes.
"""

from __future__ import annotations

import asyncio
import os
import stat
from pathlib import Path

import pytest
from grpclib.client import Channel
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from edged._proto.app.datasync.v1 import data_sync_grpc, data_sync_pb2
from edged._proto.proto.rpc.v1 import auth_grpc, auth_pb2
from edged.capture import CaptureWriter
from tests.reliability.common import cycles, record
from tests.support.capture_files import tabular_metadata, tabular_reading, write_capture
from tests.support.credentials import KeyFile
from tests.support.daemon import base_config, daemon, edged_ctl, status, write_config
from tests.support.ingest_db import ingest_count, ingest_seqs
from tests.support.processes import ingest_process
from tests.support.waiting import wait_for

WRONG = "wrong-" + "0123456789abcdef" * 4  # a plausible secret the server does not know


def set_secret(path: Path, secret: str) -> None:
    """Rewrite the key file in place, keeping it 0600 (what an operator's editor does)."""
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
    with os.fdopen(fd, "w") as f:
        f.write(secret + "\n")


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


async def raw_calls(port: int, key: KeyFile) -> dict[str, Status | None]:
    """What the ingest answers callers that lack valid credentials (plain grpclib)."""
    out: dict[str, Status | None] = {}
    async with Channel("127.0.0.1", port) as channel:
        sync = data_sync_grpc.DataSyncServiceStub(channel)
        req = data_sync_pb2.DataCaptureUploadRequest(
            metadata=data_sync_pb2.UploadMetadata(part_id="intruder")
        )
        auth = auth_grpc.AuthServiceStub(channel)
        calls = {
            "no token": sync.DataCaptureUpload(req, timeout=10),
            "forged token": sync.DataCaptureUpload(
                req, timeout=10, metadata={"authorization": "Bearer forged"}
            ),
            "wrong key": auth.Authenticate(
                auth_pb2.AuthenticateRequest(
                    entity=key.key_id,
                    credentials=auth_pb2.Credentials(type="api-key", payload=WRONG),
                ),
                timeout=10,
            ),
            "unknown key id": auth.Authenticate(
                auth_pb2.AuthenticateRequest(
                    entity="00000000-0000-0000-0000-000000000000",
                    credentials=auth_pb2.Credentials(type="api-key", payload=key.secret),
                ),
                timeout=10,
            ),
        }
        for name, call in calls.items():
            try:
                await call
                out[name] = None
            except GRPCError as exc:
                out[name] = exc.status
    return out


def test_secret_never_leaks_wrong_key_then_fixed_and_modes(tmp_path: Path, key: KeyFile) -> None:
    readings = cycles(2000, 20_000)
    daemon_key = tmp_path / "daemon-key"
    fd = os.open(daemon_key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(WRONG + "\n")
    stdout_path, stderr_path = tmp_path / "ingest.out", tmp_path / "ingest.err"
    outputs: list[str] = []
    with ingest_process(tmp_path / "ingest", key.ingest_args(), log=stderr_path) as (
        ingest,
        port,
    ):
        body = base_config(tmp_path, port, key).replace(str(key.path), str(daemon_key))
        cfg = write_config(tmp_path / "edged.yaml", body)
        write_capture(tmp_path / "capture", 0, readings // 2)
        with daemon(cfg) as proc:
            wait_for("status socket", (tmp_path / "edged.sock").exists)
            wait_for("auth refused", lambda: status(cfg)["state"] == "auth_failed")
            st = status(cfg)
            assert "UNAUTHENTICATED" in (st["cloud"]["last_error"] or "")
            assert ingest_count(tmp_path / "ingest", "readings") == 0
            # Input keeps being committed while uploads are stopped: nothing is lost.
            write_capture(tmp_path / "capture", readings // 2, readings // 2)
            (tmp_path / "uploads").mkdir(exist_ok=True)
            (tmp_path / "uploads" / "doc.txt").write_bytes(b"d" * 5000)
            # A corrupt capture file, so the quarantine exists for the mode checks.
            with CaptureWriter(tmp_path / "stage", tabular_metadata()) as w:
                w.write(tabular_reading(10**6))
            [staged] = w.closed_paths
            (tmp_path / "capture" / "corrupt.tmp").write_bytes(
                staged.read_bytes() + b"\x03\xff\xff\xff"
            )
            os.rename(
                tmp_path / "capture" / "corrupt.tmp", tmp_path / "capture" / "corrupt.capture"
            )
            wait_for("capture files committed", lambda: status(cfg)["outbox"]["readings"] > 0)
            wait_for("quarantine", lambda: status(cfg)["quarantined"] == 1)
            wait_for("file queued", lambda: status(cfg)["outbox"]["per_kind"].get("file"))
            assert status(cfg)["state"] == "auth_failed"
            outputs += [edged_ctl(cfg, "status", "--json").stdout, edged_ctl(cfg, "status").stdout]

            # The operator fixes the key file and resumes, as the README says.
            set_secret(daemon_key, key.secret)
            resumed = edged_ctl(cfg, "resume")
            assert resumed.returncode == 0, resumed.stderr
            wait_for(
                "everything delivered after resume",
                lambda: ingest_count(tmp_path / "ingest", "readings") == readings + 1,
                timeout=cycles(60, 300),
            )
            wait_for("file delivered", lambda: ingest_count(tmp_path / "ingest", "binaries") == 1)
            assert status(cfg)["state"] == "running"
            outputs += [
                edged_ctl(cfg, "status", "--json").stdout,
                edged_ctl(cfg, "status").stdout,
                edged_ctl(cfg, "dead-letters", "--json").stdout,
            ]
            state = tmp_path / "state"
            modes = {
                "state_dir": mode(state),
                "outbox.sqlite3": mode(state / "outbox.sqlite3"),
                "spool": mode(state / "spool"),
                "quarantine": mode(state / "quarantine"),
                "socket": mode(tmp_path / "edged.sock"),
            }
            quarantined = sorted((state / "quarantine").iterdir())
            proc.terminate()
            assert proc.wait(30) == 0
        refused = asyncio.run(raw_calls(port, key))
        data = tmp_path / "ingest"
        modes |= {
            "ingest data": mode(data),
            "ingest.sqlite3": mode(data / "ingest.sqlite3"),
            "blobs": mode(data / "blobs"),
        }
        blob_dirs = [p for p in (data / "blobs").rglob("*") if p.is_dir()]
        blob_files = [p for p in (data / "blobs").rglob("*") if p.is_file()]
        ingest.terminate()
        ingest_out, _ = ingest.communicate(timeout=30)
    stdout_path.write_bytes(ingest_out)
    ingest_err = stderr_path.read_bytes()  # one access line per call, among the rest
    # (10**6: the one whole reading before the corrupt file's garbage)
    assert ingest_seqs(tmp_path / "ingest") == [*range(readings), 10**6]

    # No secret anywhere: logs, CLI output, and the files the daemon keeps.
    captured = {
        "daemon log": cfg.with_suffix(".log").read_bytes(),
        "ingest stdout": ingest_out,
        "ingest stderr": ingest_err,
        "CLI output": "\n".join(outputs).encode(),
    }
    for p in (tmp_path / "state").rglob("*"):
        if p.is_file():
            captured[str(p)] = p.read_bytes()
    for secret in (key.secret, WRONG):
        leaks = [where for where, text in captured.items() if secret.encode() in text]
        assert not leaks, f"secret found in {leaks}"
    assert b"the server refused our credentials" in captured["daemon log"]

    assert refused == {
        "no token": Status.UNAUTHENTICATED,
        "forged token": Status.UNAUTHENTICATED,
        "wrong key": Status.UNAUTHENTICATED,
        "unknown key id": Status.UNAUTHENTICATED,
    }
    assert modes == {
        "state_dir": 0o700,
        "outbox.sqlite3": 0o600,
        "spool": 0o700,
        "quarantine": 0o700,
        "socket": 0o660,
        "ingest data": 0o700,
        "ingest.sqlite3": 0o600,
        "blobs": 0o700,
    }
    # The .reason is 0600; the quarantined file keeps the mode its writer gave it (moved,
    # not rewritten), and the 0700 quarantine directory keeps everyone else out.
    [reason] = [p for p in quarantined if p.name.endswith(".reason")]
    assert len(quarantined) == 2 and mode(reason) == 0o600
    assert blob_dirs and all(mode(p) == 0o700 for p in blob_dirs)
    assert blob_files and all(mode(p) & 0o077 == 0 for p in blob_files)
    record(
        "security",
        readings=readings,
        secret_leaks=0,
        places_searched=len(captured),
        raw_calls_refused=sum(s is Status.UNAUTHENTICATED for s in refused.values()),
        modes_checked=len(modes) + len(quarantined) + len(blob_dirs) + len(blob_files),
    )


@pytest.fixture(autouse=True)
def _no_env_key(monkeypatch: pytest.MonkeyPatch) -> None:
    """The daemon must read the key file, not an inherited EDGED_API_KEY."""
    monkeypatch.delenv("EDGED_API_KEY", raising=False)
