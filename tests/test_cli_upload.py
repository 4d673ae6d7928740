"""`edged upload` as an operator runs it: a real `edged upload` process against a real
`edged ingest` process; what arrived is read back through the query API."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
from pathlib import Path

from edged.cli.progress import Progress
from edged.client import connect
from tests.support.processes import edged_cmd, ingest_process


def _upload(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        edged_cmd("upload", *args), capture_output=True, text=True, timeout=90, check=False
    )


def _tree(root: Path) -> dict[str, bytes]:
    """A directory with nested files, a symlink and a file over the server's limit."""
    files = {
        "a.txt": b"alpha\n",
        "sub/b.bin": bytes(range(256)) * 3,
        "sub/deeper/c.json": b'{"c": 1}',
        "big.dat": b"x" * 5000,
    }
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    outside = root.parent / "outside.txt"
    outside.write_bytes(b"must not be read through the link")
    (root / "link.txt").symlink_to(outside)
    (root / "linkdir").symlink_to(root / "sub", target_is_directory=True)
    return files


async def test_directory_upload_sends_every_file_and_lists_what_did_not_arrive(
    tmp_path: Path,
) -> None:
    root = tmp_path / "tree"
    root.mkdir()
    files = _tree(root)
    with ingest_process(tmp_path / "ingest", ["--max-upload-bytes", "4KiB"]) as (_, port):
        address = f"127.0.0.1:{port}"
        async with connect(address, tls=False) as dc:
            dataset = await dc.create_dataset("runs", "")
        res = _upload(
            str(root), "--address", address, "--insecure", "--part-id", "robot-7",
            "--tag", "field-test", "--tag", "day-2", "--dataset", dataset, "--retries", "1",
        )  # fmt: skip
        async with connect(address, tls=False) as dc:
            got, _, _ = await dc.binary_data_by_filter(include_binary_data=True)

    assert res.returncode == 1, res.stderr
    assert "\r" not in res.stderr  # not a terminal: plain progress lines
    assert "uploaded 3 of 4 file(s)" in res.stdout
    assert f"  {root / 'big.dat'}: INVALID_ARGUMENT: upload exceeds" in res.stdout
    assert f"  {root / 'link.txt'}: symlink (not followed)" in res.stdout
    assert f"  {root / 'linkdir'}: symlink (not followed)" in res.stdout
    assert "retry" not in res.stderr  # a refusal is not retried
    arrived = {b.metadata.file_name + b.metadata.file_ext: b for b in got}
    assert set(arrived) == {"a.txt", "b.bin", "c.json"}
    for rel in ("a.txt", "sub/b.bin", "sub/deeper/c.json"):
        b = arrived[Path(rel).name]
        assert b.binary == files[rel]
        assert sorted(b.metadata.capture_metadata.tags) == ["day-2", "field-test"]
        assert list(b.metadata.dataset_ids) == [dataset]
        assert b.metadata.capture_metadata.part_id == "robot-7"


async def test_everything_arrived_exits_0_and_json_lists_ids(tmp_path: Path) -> None:
    one = tmp_path / "one.txt"
    one.write_bytes(b"1")
    with ingest_process(tmp_path / "ingest") as (_, port):
        address = f"127.0.0.1:{port}"
        res = _upload(str(one), "--address", address, "--insecure", "--json", "--part-id", "p")
        no_part = _upload(str(one), "--address", address, "--insecure")
    assert no_part.returncode == 2 and "--part-id" in no_part.stderr
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert [u["path"] for u in out["uploaded"]] == [str(one)]
    assert out["failed"] == [] and out["uploaded"][0]["binary_data_id"]


def test_unreachable_server_is_retried_then_reported(tmp_path: Path) -> None:
    f = tmp_path / "f.bin"
    f.write_bytes(b"data")
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    res = _upload(
        str(f), str(tmp_path / "missing"), "--address", f"127.0.0.1:{port}", "--insecure",
        "--part-id", "p", "--retries", "2", "--backoff", "0.01", "--backoff-max", "0.02",
    )  # fmt: skip
    assert res.returncode == 1
    assert "retry 1 of 2" in res.stderr and "retry 2 of 2" in res.stderr
    assert f"  {f}: UNAVAILABLE" in res.stdout
    assert f"  {tmp_path / 'missing'}: No such file or directory" in res.stdout
    assert "uploaded 0 of 2 file(s)" in res.stdout
    assert os.path.exists(f)  # never deleted


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_redraws_only_on_a_terminal() -> None:
    tty, pipe = _Terminal(), io.StringIO()
    for out in (tty, pipe):
        p = Progress(2, out)
        p.update(1, 10, "first")
        p.update(2, 20, "second")
        p.close()
    assert tty.getvalue().count("\r") == 2 and tty.getvalue().endswith("\n")
    assert pipe.getvalue() == "[1/2] first\n[2/2] second\n"


def test_tls_to_a_plaintext_server_stops_at_once_and_hints_insecure(tmp_path: Path) -> None:
    for name in ("a", "b"):
        (tmp_path / "d").mkdir(exist_ok=True)
        (tmp_path / "d" / name).write_bytes(b"x")
    with ingest_process(tmp_path / "ingest") as (_, port):
        res = _upload(str(tmp_path / "d"), "--address", f"127.0.0.1:{port}", "--part-id", "p")
    assert res.returncode == 1
    assert "retry" not in res.stderr  # the same for every file: not retried
    assert "add --insecure" in res.stdout
    assert "not uploaded (2):" in res.stdout
