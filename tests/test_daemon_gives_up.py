"""When the daemon stops trying and says why: a server certificate that fails
verification is a state of its own (not OFFLINE with retries), and `edged run
--until-empty LIMIT` exits 1 naming what stayed queued instead of retrying forever."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

import trustme

from tests.support.credentials import Certs, KeyFile
from tests.support.daemon import base_config, daemon, status, write_config
from tests.support.processes import edged_cmd, ingest_process
from tests.support.waiting import wait_for


def _run_until_empty(cfg: Path, limit: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        edged_cmd("run", "-c", str(cfg), "--until-empty", limit),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_rejected_certificate_is_tls_failed_with_the_reason(
    tmp_path: Path, key: KeyFile, certs: Certs
) -> None:
    (tmp_path / "uploads").mkdir()
    (tmp_path / "uploads" / "frame.bin").write_bytes(b"f" * 64)
    stranger = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(stranger))  # not the CA that signed the server
    tls = ["--tls-cert", str(certs.cert_file), "--tls-key", str(certs.key_file)]
    auth = ["--api-key-id", key.key_id, "--api-key-file", str(key.path)]
    with ingest_process(tmp_path / "ingest", [*auth, *tls]) as (_, port):
        body = base_config(tmp_path, port, key).replace(
            "  tls: false\n", f"  tls: true\n  ca_file: {stranger}\n"
        )
        cfg = write_config(tmp_path / "edged.yaml", body)
        with daemon(cfg) as proc:
            sock = tmp_path / "edged.sock"
            wait_for("the status socket", sock.exists)
            wait_for("tls_failed", lambda: status(cfg)["state"] == "tls_failed")
            s = status(cfg)
            assert "certificate failed verification" in s["cloud"]["last_error"]
            assert "unable to get local issuer certificate" in s["cloud"]["last_error"]
            assert s["cloud"]["next_retry_in_s"] is None  # no probing: waits for an operator
            proc.terminate()
            assert proc.wait(30) == 0
        res = _run_until_empty(cfg, "5m")  # gives up at once: nothing can succeed
    assert res.returncode == 1, res.stderr
    assert "--until-empty stopped: uploads are tls_failed" in res.stderr
    assert f"file {tmp_path / 'uploads' / 'frame.bin'} (64 B)" in res.stderr
    assert (tmp_path / "uploads" / "frame.bin").exists()


def test_until_empty_gives_up_after_its_limit_naming_what_stayed(
    tmp_path: Path, key: KeyFile
) -> None:
    (tmp_path / "uploads").mkdir()
    (tmp_path / "uploads" / "a.bin").write_bytes(b"a" * 10)
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = write_config(tmp_path / "edged.yaml", base_config(tmp_path, port, key))
    res = _run_until_empty(cfg, "2s")
    assert res.returncode == 1, res.stderr
    assert "--until-empty stopped: time limit of 2s reached" in res.stderr
    assert "UNAVAILABLE" in res.stderr
    assert f"file {tmp_path / 'uploads' / 'a.bin'} (10 B)" in res.stderr
    bad = subprocess.run(
        edged_cmd("run", "-c", str(cfg), "--until-empty", "soon"),
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert bad.returncode == 2 and "is not a duration" in bad.stderr
