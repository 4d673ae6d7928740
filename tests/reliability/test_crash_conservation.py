"""Conservation under crashes: SIGKILL edged at random moments while a writer produces
uniquely numbered readings and files; at the end the ingest holds every one of them.

Quick profile in `make test`; `make torture` runs the full one (EDGED_TORTURE=1).
"""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import time
from pathlib import Path

import psutil

from tests.reliability.common import cycles, finish_writer, record, start_writer, stop_writer
from tests.support.credentials import KeyFile
from tests.support.daemon import base_config, daemon, write_config
from tests.support.ingest_db import stored_seqs
from tests.support.processes import ingest_process

REPO = Path(__file__).resolve().parents[2]


def test_sigkill_at_random_moments_loses_nothing(tmp_path: Path, key: KeyFile) -> None:
    n_cycles = cycles(quick=12, full=200)
    files, per_file, plain = (60, 100, 15) if n_cycles < 100 else (400, 100, 60)
    rng = random.Random(int(os.environ.get("EDGED_TORTURE_SEED", "1")))
    data = tmp_path / "ingest"
    max_rss = 0
    with ingest_process(data, key.ingest_args()) as (_, port):
        cfg = write_config(tmp_path / "edged.yaml", base_config(tmp_path, port, key))
        writer = start_writer(tmp_path, files, per_file, plain)
        try:
            for _ in range(n_cycles):
                with daemon(cfg) as proc:
                    # Chaos timing on purpose: the kill must land at arbitrary instants
                    # (start-up, mid-commit, mid-upload, mid-ack).
                    deadline = time.monotonic() + rng.uniform(0.2, 1.5)
                    while time.monotonic() < deadline and proc.poll() is None:
                        with_rss = psutil.Process(proc.pid).memory_info().rss
                        max_rss = max(max_rss, with_rss)
                        time.sleep(0.02)
                    proc.send_signal(signal.SIGKILL)
        except BaseException:
            stop_writer(writer)
            raise
        written = finish_writer(writer)
        with daemon(cfg, args=("--until-empty",)) as proc:
            assert proc.wait(180) == 0
    db = sqlite3.connect(f"file:{data / 'ingest.sqlite3'}?mode=ro", uri=True)
    seqs = stored_seqs(db)
    names = [r[0] for r in db.execute("SELECT file_name FROM binaries")]
    db.close()
    missing = set(range(written)) - set(seqs)
    duplicates = len(seqs) - len(set(seqs))
    record(
        "sigkill-conservation",
        cycles=n_cycles,
        readings_offered=written,
        files_offered=plain,
        missing=len(missing),
        duplicates=duplicates,
        files_missing=plain - len(set(names)),
        file_duplicates=len(names) - len(set(names)),
        max_rss_mib=round(max_rss / 2**20, 1),
    )
    assert not missing, f"{len(missing)} readings lost, e.g. {sorted(missing)[:10]}"
    assert sorted(set(names)) == sorted(f"file-{n}" for n in range(plain))
    # Only items in flight at a kill may repeat (the server de-duplicates by item id, so
    # in practice this is zero); bound: one batch per worker per cycle.
    assert duplicates <= n_cycles * 4 * 1000
    assert not list((tmp_path / "capture").rglob("*.capture"))
