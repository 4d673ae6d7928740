"""`edged run` as operators run it: a config file, a real subprocess, the status socket."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tests.support.credentials import KeyFile
from tests.support.processes import edged_cmd


def write_config(path: Path, body: str) -> Path:
    path.write_text(body)
    return path


def cloud_section(port: int, key: KeyFile) -> str:
    """The `cloud:` section of a config: 127.0.0.1:`port` with `key`, without TLS."""
    return f"""\
cloud:
  address: 127.0.0.1:{port}
  api_key_id: {key.key_id}
  api_key_file: {key.path}
  tls: false
"""


def base_config(tmp: Path, port: int, key: KeyFile, extra_sources: str = "") -> str:
    """A capture and a files source under `tmp`, uploading to 127.0.0.1:`port` without TLS."""
    return f"""\
part_id: robot-e2e
state_dir: {tmp / "state"}
{cloud_section(port, key)}sources:
  - kind: capture
    path: {tmp / "capture"}
  - kind: files
    path: {tmp / "uploads"}
    settle: 0s
{extra_sources}upload:
  backoff: {{initial: 50ms, max: 500ms}}
status:
  socket: {tmp / "edged.sock"}
"""


@contextmanager
def daemon(
    config: Path,
    env: dict[str, str] | None = None,
    args: tuple[str, ...] = (),
    *,
    wrapper: Sequence[str] = (),
) -> Iterator[subprocess.Popen[bytes]]:
    """`edged run -c config` (under `wrapper`, e.g. a capability-dropping command), its
    output in `config`.log; killed on exit if the test did not stop it."""
    log = config.with_suffix(".log").open("ab")
    proc = subprocess.Popen(
        [*wrapper, *edged_cmd("run", "-c", str(config), *args)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, **(env or {})},
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)
        log.close()


def edged_ctl(cfg: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """An `edged` control command against the status socket next to `cfg`."""
    return subprocess.run(
        edged_cmd(*args, "--socket", str(cfg.parent / "edged.sock")),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def status(config: Path) -> dict[str, Any]:
    """`edged status --json` against the socket next to `config` (named explicitly, so a
    test may break the config file while the daemon runs)."""
    out = edged_ctl(config, "status", "--json")
    assert out.returncode == 0, out.stderr
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def socket_up(path: Path) -> bool:
    return path.exists()


def embedded_config(tmp: Path, sources: str) -> Path:
    return write_config(
        tmp / "edged.yaml",
        f"part_id: robot-e2e\nstate_dir: {tmp / 'state'}\nsources:\n{sources}"
        f"status:\n  socket: {tmp / 'edged.sock'}\n",
    )
