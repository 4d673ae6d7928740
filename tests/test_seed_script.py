"""A script written for the seed SDK runs on `edged.client` with only its SDK imports and
the body of its `connect()` helper changed.

`tests/seed_script/seed_example.py` is the canonical seed-style source. The test makes
the substitution explicitly (and proves nothing else changed), runs the result as a
subprocess in the dev venv (where `viam` is not importable) against a real
`edged ingest` process (TLS with a private CA, one API key), and checks both what the
script printed and what the server stored.
"""

from __future__ import annotations

import difflib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.support.credentials import Certs, KeyFile
from tests.support.ingest_db import read_index
from tests.support.interop import ORG, running_ingest

SEED_SOURCE = Path(__file__).with_name("seed_script") / "seed_example.py"

SEED_IMPORTS = """\
from viam.app.viam_client import ViamClient
from viam.proto.app.data import BinaryID
from viam.rpc.dial import DialOptions
from viam.utils import create_filter
"""
EDGED_IMPORTS = """\
from edged.client import BinaryID, create_filter
from edged.client import connect as edged_connect
"""
SEED_CONNECT = """\
    dial_options = DialOptions.with_api_key(API_KEY, API_KEY_ID)
    return await ViamClient.create_from_dial_options(dial_options, app_url=ADDRESS)
"""
EDGED_CONNECT = """\
    return await edged_connect(ADDRESS, api_key_id=API_KEY_ID, api_key=API_KEY)
"""


def switched_source() -> str:
    seed = SEED_SOURCE.read_text()
    assert seed.count(SEED_IMPORTS) == 1 and seed.count(SEED_CONNECT) == 1
    edged = seed.replace(SEED_IMPORTS, EDGED_IMPORTS).replace(SEED_CONNECT, EDGED_CONNECT)
    changed = [
        line[1:]
        for line in difflib.unified_diff(seed.splitlines(), edged.splitlines(), n=0, lineterm="")
        if line[:1] in "+-" and not line.startswith(("+++", "---"))
    ]
    allowed = (SEED_IMPORTS + EDGED_IMPORTS + SEED_CONNECT + EDGED_CONNECT).splitlines()
    assert changed and all(line in allowed for line in changed), changed
    assert "viam" not in edged.replace("viam_client", "")
    return edged


def test_seed_script_runs_on_edged_client(tmp_path: Path, key: KeyFile, certs: Certs) -> None:
    script = tmp_path / "seed_on_edged.py"
    script.write_text(switched_source())
    with running_ingest(tmp_path, key, certs) as server:
        env = {
            **os.environ,
            "DATA_ADDRESS": server.address,
            "DATA_API_KEY_ID": key.key_id,
            "DATA_API_KEY": key.secret,
            "DATA_ORG_ID": ORG,
            "SSL_CERT_FILE": str(certs.ca_file),  # how a script trusts a private CA
        }
        result = subprocess.run(
            [sys.executable, str(script)],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        rc, _ = server.stop()
    assert result.returncode == 0, f"{result.stderr}\nserver:\n{server.stderr()}"
    assert rc == 0
    out: dict[str, Any] = json.loads(result.stdout.splitlines()[-1])

    assert out["tabular"] == [
        {
            "data": {"PowerPCT": float(i * 10), "IsPowered": i > 0},
            "component_name": "left_motor",
            "tags": ["tag_1", "tag_2"],
            "time_requested": f"2023-06-05T11:00:0{i}",
        }
        for i in range(3)
    ]
    images = out["image_ids"]
    assert len(set(images)) == 2
    assert out["tags"] == ["outdoor", "reviewed", "tag_1"]
    assert out["bbox_id"] and out["bbox_labels"] == ["person"]
    assert out["dataset"]["name"] == "seed-dataset" and out["org_datasets"] == ["seed-dataset"]
    assert out["dataset_members"] == sorted(images)
    assert out["member_bytes"] == ["Encoded image bytes 0", "Encoded image bytes 1"]

    index = read_index(server.data_dir)
    assert len(index["readings"]) == 3
    binaries = sorted(
        (b["component_name"], b["file_extension"], b["file_name"], b["size"])
        for b in index["binaries"]
    )
    log_stem = next(b["file_name"] for b in index["binaries"] if b["file_extension"] == ".log")
    assert binaries == sorted(
        [
            ("", ".log", log_stem, len(b"log line\n") * 1000),
            ("", ".txt", "your-file", len(b"Encoded file bytes")),
            ("my_camera", ".jpg", "", len(b"Encoded image bytes 0")),
            ("my_camera", ".jpg", "", len(b"Encoded image bytes 1")),
        ]
    )
