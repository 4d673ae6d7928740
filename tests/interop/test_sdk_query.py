"""Wire compatibility of the query API: the stock SDK's DataClient reads back, curates and
deletes through a real `edged ingest` process (TLS, one API key), on both backends
(conftest.py): on PostgreSQL + S3 it uploads through one replica and queries, downloads
and curates through another.

`tests/interop/sdk_query.py` runs under the interop interpreter, uploads a small data
set with the SDK, calls every query/tag/box/dataset/delete method and prints one JSON
summary, which this test checks value by value.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.support.credentials import Certs, KeyFile
from tests.support.interop import INTEROP_PYTHON, ORG, SDK_TIMEOUT_S, Backend, ingest_pair

SCRIPT = Path(__file__).with_name("sdk_query.py")
READING_COUNT, IMAGE_COUNT = 6, 5

pytestmark = [
    pytest.mark.interop,
    pytest.mark.skipif(
        not INTEROP_PYTHON,
        reason="EDGED_INTEROP_PYTHON is not set; `make interop` installs the stock viam-sdk",
    ),
]


def _engine(name: str) -> bool:
    return importlib.util.find_spec(f"edged.ingest.{name}") is not None


def test_stock_sdk_queries_curates_and_deletes(
    tmp_path: Path, key: KeyFile, certs: Certs, backend: Backend
) -> None:
    with ingest_pair(tmp_path, key, certs, backend) as (uploads, server):
        cmd = [INTEROP_PYTHON, "-I", str(SCRIPT), uploads.address, server.address]
        cmd += [key.key_id, str(key.path), ORG]
        result = subprocess.run(
            cmd, capture_output=True, text=True, timeout=SDK_TIMEOUT_S, check=False
        )
        procs = [uploads] if uploads is server else [uploads, server]
        codes = [p.stop()[0] for p in procs]
        blobs = backend.blob_names(server.data_dir)
        logs = "".join(f"\n{p.address} stderr:\n{p.stderr()}" for p in procs)
    assert result.returncode == 0, f"{result.stderr}{logs}"
    assert codes == [0] * len(procs), logs
    assert "Traceback" not in logs, logs
    out: dict[str, Any] = json.loads(result.stdout.splitlines()[-1])
    ids: list[str] = out["ids"]
    assert len(set(ids)) == IMAGE_COUNT

    tab = out["tabular_data_by_filter"]
    assert "error" not in tab, tab
    assert tab["pages"] == [[0, 1, 2, 3], [4, 5], 0]  # paging with `last`, then an empty page
    assert tab["counts"] == [4, 2, READING_COUNT]
    assert tab["metadata"] == {
        "organization_id": ORG,
        "part_id": "edged-query-part",
        "component_name": "thermo",
        "method_name": "Readings",
        "tags": ["query"],
    }
    assert tab["time_requested"] == "2025-02-03T04:05:06+00:00"
    assert tab["data"] == {"seq": 1, "temp_c": 21.0}

    if _engine("sql"):
        assert out["tabular_data_by_sql"] == [{"component_name": "thermo", "n": READING_COUNT}]
    else:
        assert out["tabular_data_by_sql"]["error"].startswith("UNIMPLEMENTED")
    if _engine("mql"):
        assert out["tabular_data_by_mql"] == [{"n": READING_COUNT}]
    else:
        assert out["tabular_data_by_mql"]["error"].startswith("UNIMPLEMENTED")

    binf = out["binary_data_by_filter"]
    assert "error" not in binf, binf
    assert binf["paged"] == ids  # capture-time order, two per page
    assert binf["count"] == 3 and binf["first_binary_ok"]
    assert binf["metadata"]["binary_data_id"] == ids[0]
    assert binf["metadata"]["file_ext"] == ".jpg"
    assert binf["metadata"]["organization_id"] == ORG
    assert binf["metadata"]["mime_type"] == "image/jpeg"
    assert binf["metadata"]["tags"] == ["query"]
    assert out["binary_data_by_ids"] == {
        "ids": [ids[2], ids[1]],
        "binary_ok": True,
        "legacy": [ids[0]],
    }

    assert out["tags"] == {
        "after_add": ["cam2", "day", "good", "query"],
        "removed_by_ids": 2,
        "removed_by_filter": 2 + 2,  # "day" on two images, "cam2" on two
        "after_remove": ["query"],
    }

    boxes = out["bounding_boxes"]
    assert "error" not in boxes, boxes
    cat, dog = boxes["ids"]
    assert cat and dog and cat != dog
    assert boxes["labels"] == ["cat", "dog"]
    assert boxes["stored"] == [[cat, "cat", 0.1, 0.4]]
    assert boxes["after"] == ["dog"]
    assert boxes["bad"]["error"].startswith("INVALID_ARGUMENT")
    assert "x_min_normalized" in boxes["bad"]["error"]

    assert out["database"] == {"hostname": server.address}

    ds = out["datasets"]
    assert "error" not in ds, ds
    assert ds["duplicate"]["error"].startswith("ALREADY_EXISTS")
    assert ds["members"] == ids[1:3]
    assert ds["by_ids"] == [[ds["id"], "interop-train-v2", ORG]]
    assert ds["by_org"] == ["interop-train-v2"]
    assert ds["after_delete"] == []
    assert ds["gone"]["error"].startswith("NOT_FOUND")

    dels = out["deletes"]
    assert dels["by_ids"] == 1
    assert dels["by_filter"] == 2  # the two "cam2" images
    assert dels["binary_left"] == 2
    assert (dels["tabular"], dels["tabular_left"]) == (READING_COUNT, 0)
    assert dels["missing"]["error"].startswith("NOT_FOUND")
    assert len(blobs) == 2  # deleted blobs are gone from the disk or bucket too
