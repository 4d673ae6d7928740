"""Upload into `edged ingest` with the STOCK Python SDK (viam-sdk), all five upload calls.

Run by the interop interpreter (`.venv-interop/bin/python`), never by the product:

    sdk_upload.py ADDRESS API_KEY_ID API_KEY_FILE WORK_DIR

On success prints exactly ONE JSON line to stdout, the ids the SDK returned per call
and, under `dataset:<name>`, the id of each dataset it created (the SDK's own log lines
go to stderr). On failure prints `sdk_upload: <call> failed:
...` to stderr and exits 1.

The payloads are defined here, at module level with the standard library only, so the
test (which runs in the dev venv, where `viam` is not importable) imports this module
for the expected content; `viam` is imported inside `upload_all` only. This file must
never import `edged`.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

PART_ID = "edged-interop-part-7f3c"
ORG = "org-interop"  # the organisation of the test's API key (edged ingest --org-id)

# -- tabular_data_capture_upload --------------------------------------------------------
TABULAR_COMPONENT_TYPE = "rdk:component:sensor"
TABULAR_COMPONENT_NAME = "interop-thermo"
TABULAR_METHOD = "Readings"
TABULAR_TAGS = ["interop", "tabular", "ünïcode-tag"]
# Struct numbers are doubles on the wire: only values a double holds exactly.
TABULAR_READINGS: list[dict[str, Any]] = [
    {
        "readings": {
            "temperature_c": 21.5,
            "humidity": 40.25,
            "label": "bench-1",
            "ok": True,
            "missing": None,
            "xs": [1.0, 2.0, 3.5],
            "nested": {"deep": {"deeper": "yes"}},
        }
    },
    {"readings": {"temperature_c": -3.125, "label": "bench-2", "ok": False, "xs": []}},
    {"readings": {"temperature_c": 1e-3, "label": "😀 emoji", "count": 123456789.0}},
]
_T0 = datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=UTC)
TABULAR_TIMES: list[tuple[datetime, datetime]] = [
    (_T0 + timedelta(seconds=i), _T0 + timedelta(seconds=i, microseconds=250_001))
    for i in range(len(TABULAR_READINGS))
]

# -- binary_data_capture_upload ---------------------------------------------------------
BINARY_COMPONENT_TYPE = "rdk:component:camera"
BINARY_COMPONENT_NAME = "interop-cam"
BINARY_METHOD = "GetImages"
BINARY_EXTENSION = ".jpg"
BINARY_TAGS = ["interop", "binary"]
BINARY_DATASETS = ["dataset-interop-a"]  # names: created first, uploads carry their ids
BINARY_TIMES = (
    datetime(2024, 6, 1, 0, 0, 1, 1, tzinfo=UTC),
    datetime(2024, 6, 1, 0, 0, 2, 999999, tzinfo=UTC),
)

# -- streaming_data_capture_upload ------------------------------------------------------
STREAM_COMPONENT_TYPE = "rdk:component:camera"
STREAM_COMPONENT_NAME = "interop-lidar"
STREAM_METHOD = "NextPointCloud"
STREAM_FILE_EXT = "pcd"  # without the dot: the SDK adds it
STREAM_TAGS = ["interop", "streaming"]
STREAM_DATASETS = ["dataset-interop-a", "dataset-interop-b"]
STREAM_TIMES = (
    datetime(2024, 7, 2, 12, 30, 0, 500000, tzinfo=UTC),
    datetime(2024, 7, 2, 12, 30, 1, tzinfo=UTC),
)
STREAM_MIME = "pointcloud/pcd"

# -- file_upload ------------------------------------------------------------------------
FILE_COMPONENT_TYPE = "rdk:service:interop"
FILE_COMPONENT_NAME = "interop-notes-writer"
FILE_METHOD = "WriteNotes"
FILE_NAME = "interop-notes"
FILE_EXTENSION = ".txt"
FILE_TAGS = ["interop", "file"]
FILE_DATASETS = ["dataset-interop-c"]

# -- file_upload_from_path --------------------------------------------------------------
PATH_FILE_NAME = "interop-big.bin"  # the SDK stores stem "interop-big", extension ".bin"
PATH_TAGS = ["interop", "from-path"]
PATH_MIME = "application/x-edged-interop"
PATH_SIZE = 20 * 1024 * 1024 + 7


class UploadFailed(Exception):
    """One SDK call failed; the message names the call and the gRPC status."""


def _stream_bytes(label: bytes, size: int) -> bytes:
    """Deterministic, incompressible bytes (the same in both venvs)."""
    return hashlib.shake_256(b"edged-interop/" + label).digest(size)


def binary_payload() -> bytes:
    """A small fake JPEG: SOI marker, 64 KiB + 3 of noise, EOI marker."""
    return b"\xff\xd8\xff\xe0" + _stream_bytes(b"binary", 64 * 1024 + 3) + b"\xff\xd9"


def streaming_payload() -> bytes:
    """~3 MB: a PCD header, then binary points (bigger than one HTTP/2 frame and window)."""
    header = b"# .PCD v0.7 - edged interop\nFIELDS x y z\nSIZE 4 4 4\nTYPE F F F\nDATA binary\n"
    return header + _stream_bytes(b"streaming", 3 * 1000 * 1000 + 11)


def file_payload() -> bytes:
    return "".join(f"edged interop note {i:05d}: ✓ file_upload\n" for i in range(2000)).encode()


def path_payload() -> bytes:
    return _stream_bytes(b"from-path", PATH_SIZE)


async def upload_all(address: str, key_id: str, key: str, work_dir: Path) -> dict[str, str]:
    from viam.app.viam_client import ViamClient  # type: ignore[import-not-found]
    from viam.rpc.dial import DialOptions  # type: ignore[import-not-found]

    ids: dict[str, str] = {}
    step = "connect (Authenticate)"
    client: Any = None
    try:
        client = await ViamClient.create_from_dial_options(
            DialOptions.with_api_key(api_key=key, api_key_id=key_id), app_url=address
        )
        data = client.data_client

        # Uploads may only name datasets of the key's organisation: create them first.
        step = "create_dataset"
        names = sorted({*BINARY_DATASETS, *STREAM_DATASETS, *FILE_DATASETS})
        datasets = {name: await data.create_dataset(name, ORG) for name in names}
        ids.update({f"dataset:{name}": ds for name, ds in datasets.items()})

        step = "tabular_data_capture_upload"
        ids["tabular"] = await data.tabular_data_capture_upload(
            tabular_data=TABULAR_READINGS,
            part_id=PART_ID,
            component_type=TABULAR_COMPONENT_TYPE,
            component_name=TABULAR_COMPONENT_NAME,
            method_name=TABULAR_METHOD,
            data_request_times=TABULAR_TIMES,
            tags=TABULAR_TAGS,
        )

        step = "binary_data_capture_upload"
        ids["binary"] = await data.binary_data_capture_upload(
            binary_data=binary_payload(),
            part_id=PART_ID,
            component_type=BINARY_COMPONENT_TYPE,
            component_name=BINARY_COMPONENT_NAME,
            method_name=BINARY_METHOD,
            file_extension=BINARY_EXTENSION,
            tags=BINARY_TAGS,
            dataset_ids=[datasets[n] for n in BINARY_DATASETS],
            data_request_times=BINARY_TIMES,
        )

        step = "streaming_data_capture_upload"
        ids["streaming"] = await data.streaming_data_capture_upload(
            data=streaming_payload(),
            part_id=PART_ID,
            file_ext=STREAM_FILE_EXT,
            component_type=STREAM_COMPONENT_TYPE,
            component_name=STREAM_COMPONENT_NAME,
            method_name=STREAM_METHOD,
            data_request_times=STREAM_TIMES,
            tags=STREAM_TAGS,
            dataset_ids=[datasets[n] for n in STREAM_DATASETS],
            mime_type=STREAM_MIME,
        )

        step = "file_upload"
        ids["file"] = await data.file_upload(
            part_id=PART_ID,
            data=file_payload(),
            component_type=FILE_COMPONENT_TYPE,
            component_name=FILE_COMPONENT_NAME,
            method_name=FILE_METHOD,
            file_name=FILE_NAME,
            file_extension=FILE_EXTENSION,
            tags=FILE_TAGS,
            dataset_ids=[datasets[n] for n in FILE_DATASETS],
        )

        step = "file_upload_from_path"
        big = work_dir / PATH_FILE_NAME
        big.write_bytes(path_payload())
        ids["from_path"] = await data.file_upload_from_path(
            filepath=str(big), part_id=PART_ID, tags=PATH_TAGS, mime_type=PATH_MIME
        )
    except Exception as exc:
        status = getattr(exc, "status", None)
        detail = (
            f"gRPC status {getattr(status, 'name', status)}: {getattr(exc, 'message', '')}"
            if status is not None
            else f"{type(exc).__name__}: {exc}"
        )
        raise UploadFailed(f"sdk_upload: {step} failed: {detail}") from exc
    finally:
        if client is not None:
            client.close()
    return ids


def main(argv: list[str]) -> int:
    if len(argv) != 4:
        print("usage: sdk_upload.py ADDRESS API_KEY_ID API_KEY_FILE WORK_DIR", file=sys.stderr)
        return 2
    address, key_id, key_file, work_dir = argv
    key = Path(key_file).read_text().splitlines()[0].strip()
    # The SDK logs INFO to stdout; keep stdout for the one result line.
    real_stdout, sys.stdout = sys.stdout, sys.stderr
    try:
        ids = asyncio.run(upload_all(address, key_id, key, Path(work_dir)))
    except UploadFailed as exc:
        print(exc, file=sys.stderr)
        return 1
    finally:
        sys.stdout = real_stdout
    print(json.dumps(ids, sort_keys=True), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
