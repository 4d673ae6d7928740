"""Wire compatibility: the stock Python SDK (viam-sdk) uploads into a real `edged ingest`.

Everything runs as real processes: `edged ingest` (the CLI, TLS with a throwaway CA,
one API key) and `tests/interop/sdk_upload.py` under the interop interpreter
(EDGED_INTEROP_PYTHON, set by `make interop`), which makes all five SDK upload calls.
After the server stopped gracefully we read its index (SQLite, or PostgreSQL with the
blobs in S3: conftest.py's backends) and compare every stored field and blob with what
the SDK was given.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from edged.ingest.values import decode_python
from tests.interop import sdk_upload as sdk
from tests.support.credentials import Certs, KeyFile, make_key_file
from tests.support.interop import (
    INTEROP_PYTHON,
    ORG,
    SDK_TIMEOUT_S,
    Backend,
    IngestProcess,
    running_ingest,
)

SCRIPT = Path(__file__).with_name("sdk_upload.py")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

pytestmark = [
    pytest.mark.interop,
    pytest.mark.skipif(
        not INTEROP_PYTHON,
        reason="EDGED_INTEROP_PYTHON is not set; `make interop` installs the stock viam-sdk"
        " in .venv-interop and runs these tests with it",
    ),
]


def ns(dt: datetime) -> int:
    return (dt - _EPOCH) // timedelta(microseconds=1) * 1000


def run_sdk(server: IngestProcess, key_id: str, key_file: Path, work_dir: Path) -> Any:
    work_dir.mkdir(exist_ok=True)
    # -I: the SDK interpreter sees neither PYTHONPATH nor the dev venv, only its own packages.
    cmd = [INTEROP_PYTHON, "-I", str(SCRIPT), server.address, key_id, str(key_file), str(work_dir)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=SDK_TIMEOUT_S, check=False)


@pytest.fixture(scope="module")
def interop_python() -> str:
    path = Path(INTEROP_PYTHON)
    assert path.is_file(), f"EDGED_INTEROP_PYTHON={INTEROP_PYTHON} does not exist"
    version = "import importlib.metadata as m; print(m.version('viam-sdk'))"
    probe = subprocess.run(
        [INTEROP_PYTHON, "-I", "-c", version],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert probe.returncode == 0, f"viam-sdk is not installed in {INTEROP_PYTHON}: {probe.stderr}"
    return probe.stdout.strip()


def test_stock_sdk_uploads_all_five_kinds(
    interop_python: str, tmp_path: Path, key: KeyFile, certs: Certs, backend: Backend
) -> None:
    work = tmp_path / "sdk-work"
    with running_ingest(tmp_path, key, certs, backend) as server:
        result = run_sdk(server, key.key_id, key.path, work)
        rc, out = server.stop()
    assert result.returncode == 0, (
        f"viam-sdk {interop_python} failed (exit {result.returncode}):\n{result.stderr}\n"
        f"server stderr:\n{server.stderr()}"
    )
    assert rc == 0, f"edged ingest exited {rc} on SIGTERM:\n{server.stderr()}"
    assert "stopping" in out
    assert "Traceback" not in server.stderr(), server.stderr()
    assert "viam" not in sys.modules  # the product side never imports the SDK

    lines = result.stdout.splitlines()
    assert len(lines) == 1, f"expected one JSON line on stdout, got {result.stdout!r}"
    ids: dict[str, str] = json.loads(lines[0])
    datasets = {k.removeprefix("dataset:"): ids.pop(k) for k in list(ids) if ":" in k}
    assert set(datasets) == {*sdk.BINARY_DATASETS, *sdk.STREAM_DATASETS, *sdk.FILE_DATASETS}
    assert set(ids) == {"tabular", "binary", "streaming", "file", "from_path"}
    assert all(ids.values()) and len(set(ids.values())) == 5, ids

    index = backend.stored(server.data_dir)

    # One upload row per SDK call, all in the key's organisation.
    kinds = {row["upload_id"]: row["kind"] for row in index["uploads"]}
    assert kinds == {
        ids["tabular"]: "tabular",
        ids["binary"]: "binary",
        ids["streaming"]: "binary",
        ids["file"]: "file",
        ids["from_path"]: "file",
    }
    assert {row["org_id"] for row in index["uploads"]} == {ORG}
    assert all(row["item_id"] is None for row in index["uploads"])  # the SDK sends no item id

    # tabular_data_capture_upload: the returned file_id names the readings' upload.
    readings = index["readings"]
    assert len(readings) == len(sdk.TABULAR_READINGS)
    for row, sent, (requested, received) in zip(
        readings, sdk.TABULAR_READINGS, sdk.TABULAR_TIMES, strict=True
    ):
        assert row["upload_id"] == ids["tabular"]
        assert row["org_id"] == ORG
        assert row["part_id"] == sdk.PART_ID
        assert row["component_type"] == sdk.TABULAR_COMPONENT_TYPE == "rdk:component:sensor"
        assert row["component_name"] == sdk.TABULAR_COMPONENT_NAME
        assert row["method_name"] == sdk.TABULAR_METHOD
        assert json.loads(row["tags"]) == sdk.TABULAR_TAGS
        assert json.loads(row["dataset_ids"]) == []
        assert json.loads(row["method_parameters"]) == {}
        assert row["time_requested_ns"] == ns(requested)
        assert row["time_received_ns"] == ns(received)
        assert decode_python(row["data"], row["data_exact"]) == sent  # kept as Struct bytes
    assert (
        readings[0]["time_requested_ns"] == 1_714_979_289_123_456_000
    )  # 2024-05-06T07:08:09.123456Z

    # The four blob calls: the returned binary_data_id names the stored blob.
    blobs = {row["binary_data_id"]: row for row in index["binaries"]}
    assert set(blobs) == {ids["binary"], ids["streaming"], ids["file"], ids["from_path"]}
    big_file = work / sdk.PATH_FILE_NAME
    expected: dict[str, dict[str, Any]] = {
        "binary": dict(
            kind="binary", component_type=sdk.BINARY_COMPONENT_TYPE,
            component_name=sdk.BINARY_COMPONENT_NAME, method_name=sdk.BINARY_METHOD,
            file_name="", file_extension=".jpg", mime_type="image/jpeg",
            tags=sdk.BINARY_TAGS, dataset_ids=[datasets[n] for n in sdk.BINARY_DATASETS],
            time_requested_ns=ns(sdk.BINARY_TIMES[0]), time_received_ns=ns(sdk.BINARY_TIMES[1]),
            payload=sdk.binary_payload(),
        ),
        "streaming": dict(
            kind="binary", component_type=sdk.STREAM_COMPONENT_TYPE,
            component_name=sdk.STREAM_COMPONENT_NAME, method_name=sdk.STREAM_METHOD,
            file_name="", file_extension=".pcd", mime_type=sdk.STREAM_MIME,
            tags=sdk.STREAM_TAGS, dataset_ids=[datasets[n] for n in sdk.STREAM_DATASETS],
            time_requested_ns=ns(sdk.STREAM_TIMES[0]), time_received_ns=ns(sdk.STREAM_TIMES[1]),
            payload=sdk.streaming_payload(),
        ),
        "file": dict(
            kind="file", component_type=sdk.FILE_COMPONENT_TYPE,
            component_name=sdk.FILE_COMPONENT_NAME, method_name=sdk.FILE_METHOD,
            file_name="interop-notes", file_extension=".txt", mime_type="text/plain",
            tags=sdk.FILE_TAGS, dataset_ids=[datasets[n] for n in sdk.FILE_DATASETS],
            time_requested_ns=None, time_received_ns=None, payload=sdk.file_payload(),
        ),
        "from_path": dict(
            kind="file", component_type="", component_name="", method_name="",
            file_name="interop-big", file_extension=".bin", mime_type=sdk.PATH_MIME,
            tags=sdk.PATH_TAGS, dataset_ids=[],
            time_requested_ns=None, time_received_ns=None, payload=big_file.read_bytes(),
        ),
    }  # fmt: skip
    assert expected["from_path"]["payload"] == sdk.path_payload()  # what the SDK read
    assert len(sdk.streaming_payload()) > 3_000_000
    assert len(sdk.path_payload()) > 20 * 1024 * 1024

    for call, want in expected.items():
        row = blobs[ids[call]]
        payload: bytes = want.pop("payload")
        got = {
            **{k: row[k] for k in want if k not in ("tags", "dataset_ids")},
            "tags": json.loads(row["tags"]),
            "dataset_ids": json.loads(row["dataset_ids"]),
        }
        assert got == want, call
        assert row["file_id"] == row["upload_id"] == ids[call], call
        assert (row["org_id"], row["part_id"]) == (ORG, sdk.PART_ID), call
        assert json.loads(row["method_parameters"]) == {}, call
        assert row["size"] == len(payload), call
        assert row["sha256"] == hashlib.sha256(payload).hexdigest(), call
        stored = backend.blob(server.data_dir, row["blob_path"])
        assert stored == payload, f"{call}: the stored blob differs from what was sent"

    # Nothing half-written left behind.
    assert backend.half_written(server.data_dir) == []


@pytest.mark.parametrize("wrong", ["secret", "key-id"])
def test_stock_sdk_with_a_wrong_key_is_refused(
    interop_python: str, tmp_path: Path, key: KeyFile, certs: Certs, wrong: str, backend: Backend
) -> None:
    if wrong == "secret":  # the right key id with a different key
        (tmp_path / "bad").mkdir()
        bad = make_key_file(tmp_path / "bad")
        key_id, key_file = key.key_id, bad.path
    else:  # an unknown key id (still a UUID, which the SDK insists on) with the right key
        key_id, key_file = str(uuid.uuid4()), key.path
    with running_ingest(tmp_path, key, certs, backend) as server:
        result = run_sdk(server, key_id, key_file, tmp_path / "sdk-work")
        rc, _ = server.stop()
    assert rc == 0, f"edged ingest exited {rc} on SIGTERM:\n{server.stderr()}"
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    assert result.stdout == ""
    assert "sdk_upload: connect (Authenticate) failed" in result.stderr, result.stderr
    assert "UNAUTHENTICATED" in result.stderr, result.stderr
    assert "invalid API key id or key" in result.stderr, result.stderr
    assert key.secret not in result.stderr + server.stderr()

    assert backend.stored(server.data_dir) == {"uploads": [], "readings": [], "binaries": []}
    assert backend.blob_names(server.data_dir) == []
