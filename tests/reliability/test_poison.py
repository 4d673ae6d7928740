"""One item the server keeps failing (a server bug on one component's readings, as a NaN
once caused) must not wedge the pipeline: other readings flow, edged never goes
offline for it, and the item ends as a dead letter carrying the server's message.
Real `edged run` and a real fault-injecting ingest subprocess."""

from __future__ import annotations

import json
from pathlib import Path

from edged.capture import CaptureWriter
from tests.reliability.common import faulty_ingest
from tests.support.capture_files import tabular_metadata, tabular_reading
from tests.support.credentials import KeyFile
from tests.support.daemon import base_config, daemon, edged_ctl, status, write_config
from tests.support.ingest_db import ingest_count
from tests.support.waiting import wait_for

MAX_ATTEMPTS = 5


def write_component(root: Path, component: str, first: int, n: int) -> None:
    with CaptureWriter(root, tabular_metadata(component_name=component)) as w:
        for seq in range(first, first + n):
            w.write(tabular_reading(seq))


def test_poison_item_becomes_a_dead_letter_while_others_flow(tmp_path: Path, key: KeyFile) -> None:
    with faulty_ingest(tmp_path / "ingest", key, ["--poison-component", "nan-sensor"]) as server:
        body = base_config(tmp_path, server.port, key).replace(
            "upload:\n", f"upload:\n  max_attempts: {MAX_ATTEMPTS}\n"
        )
        cfg = write_config(tmp_path / "edged.yaml", body)
        with daemon(cfg) as proc:
            wait_for("status socket", (tmp_path / "edged.sock").exists)
            write_component(tmp_path / "capture", "nan-sensor", 0, 10)
            states = set()
            for batch in range(8):  # good data keeps arriving while the poison retries
                write_component(tmp_path / "capture", "thermo", 1000 + batch * 50, 50)
                wait_for(
                    "good batch stored",
                    lambda b=batch: (
                        ingest_count(tmp_path / "ingest", "readings")  # type: ignore[misc]
                        == (b + 1) * 50
                    ),
                )
                states.add(status(cfg)["state"])
            wait_for("dead letter", lambda: status(cfg)["dead_letters"] == 1)
            listing = edged_ctl(cfg, "dead-letters", "--json")
            [dead] = json.loads(listing.stdout)
            assert dead["status"] == "UNKNOWN"
            assert dead["message"] == "injected: cannot store readings of nan-sensor"
            assert dead["count"] == 10
            assert "offline" not in states, states
            proc.terminate()
            assert proc.wait(30) == 0
    assert server.counts["poisoned"] == MAX_ATTEMPTS  # bounded, and no extra probes
    assert ingest_count(tmp_path / "ingest", "readings") == 8 * 50
    log = cfg.with_suffix(".log").read_text()
    assert "next probe" not in log  # the gate never closed for it
