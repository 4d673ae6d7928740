"""The stock SDK's side of the interop tests: which interpreter runs it, and the real
`edged ingest` (the console script users run, TLS, one API key) it talks to."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.interop import sdk_upload as sdk
from tests.support.credentials import Certs, KeyFile
from tests.support.processes import read_line

INTEROP_PYTHON = os.environ.get("EDGED_INTEROP_PYTHON", "")
"""The interpreter with the stock viam-sdk (`make interop` sets it); empty: skip."""
ORG = sdk.ORG
START_DEADLINE_S = 30.0
SDK_TIMEOUT_S = 90.0
STOP_TIMEOUT_S = 30.0
_LISTENING = re.compile(
    r"edged ingest: listening on 127\.0\.0\.1:(\d+) \(tls, 1 API key\(s\)\), data in (.+)"
)


def _edged_console() -> list[str]:
    script = Path(sys.executable).with_name("edged")  # the console script users run
    return [str(script)] if script.exists() else [sys.executable, "-m", "edged"]


@dataclass
class IngestProcess:
    proc: subprocess.Popen[bytes]
    port: int
    data_dir: Path
    stderr_path: Path

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def stop(self) -> tuple[int, str]:
        """SIGTERM, then wait for the graceful exit; returns (exit code, rest of stdout)."""
        self.proc.send_signal(signal.SIGTERM)
        out, _ = self.proc.communicate(timeout=STOP_TIMEOUT_S)
        return self.proc.returncode, out.decode(errors="replace")


@contextlib.contextmanager
def running_ingest(tmp_path: Path, key: KeyFile, certs: Certs) -> Iterator[IngestProcess]:
    data_dir = tmp_path / "ingest-data"
    stderr_path = tmp_path / "ingest.stderr"
    args = [
        *_edged_console(), "ingest", "--listen", "127.0.0.1:0", "--data", str(data_dir),
        "--api-key-id", key.key_id, "--api-key-file", str(key.path), "--org-id", ORG,
        "--tls-cert", str(certs.cert_file), "--tls-key", str(certs.key_file),
    ]  # fmt: skip
    with stderr_path.open("wb") as err:
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=err, bufsize=0)
    try:
        try:
            line = read_line(proc, START_DEADLINE_S).decode().rstrip("\n")
        except (TimeoutError, RuntimeError) as exc:
            raise AssertionError(f"{exc}\nstderr:\n{stderr_path.read_text()}") from None
        match = _LISTENING.fullmatch(line)
        assert match, f"unexpected first line from edged ingest: {line!r}"
        assert match[2] == str(data_dir)
        yield IngestProcess(proc, int(match[1]), data_dir, stderr_path)
    finally:
        if proc.poll() is None:  # the test failed before stopping it
            proc.kill()
            proc.communicate()
        assert proc.stdout is not None
        proc.stdout.close()
