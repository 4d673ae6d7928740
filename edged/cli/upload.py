"""`edged upload PATH...`: send files and directory trees to a server once, now.

For the operator at a robot or a laptop, not the daemon: no outbox, no deletion. Each
file is one FileUpload stream (`UploadClient.upload_file`) with its own item id, so a
retry after a lost reply is de-duplicated by the server. Transient failures (no
answer, UNAVAILABLE, ...) are retried with the daemon's backoff (`daemon.policy`); a
refusal of one file (too big, unreadable) is reported and the rest go on; refused
credentials stop the run. The exit code says whether everything arrived.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import stat
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edged._proto.app.datasync.v1 import data_sync_pb2 as pb
from edged.cli.args import seconds, whole
from edged.cli.progress import Progress
from edged.cli.target import add_flags, hint, open_target
from edged.client.api import FileSlice, UploadClient, upload_metadata
from edged.daemon.policy import Verdict, backoff_delay, classify
from edged.daemon.status_view import human_bytes
from edged.errors import AuthError, ConfigError, SourceError, UploadError

EXIT_PARTIAL = 1


@dataclass
class Outcome:
    """What happened to every path the command was given."""

    sent: list[dict[str, Any]] = field(default_factory=list)
    failed: list[dict[str, str]] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"uploaded": self.sent, "failed": self.failed, "skipped": self.skipped}


def collect(paths: list[Path], out: Outcome) -> list[Path]:
    """Regular files under `paths`, sorted per tree; symlinks are never followed (listed
    as skipped), missing or unreadable paths are failures."""
    files: list[Path] = []
    for top in paths:
        st = _look(top, out)
        if st is None:
            continue
        if stat.S_ISREG(st.st_mode):
            files.append(top)
        elif stat.S_ISDIR(st.st_mode):
            files += _walk(top, out)
        else:
            out.skipped.append({"path": str(top), "reason": "not a regular file"})
    return files


def _look(path: Path, out: Outcome) -> os.stat_result | None:
    """`path`'s own stat; None, recorded in `out`, if it cannot be read or is a symlink."""
    try:
        st = path.lstat()
    except OSError as exc:
        out.failed.append({"path": str(path), "reason": exc.strerror or str(exc)})
        return None
    if stat.S_ISLNK(st.st_mode):
        out.skipped.append({"path": str(path), "reason": "symlink (not followed)"})
        return None
    return st


def _walk(top: Path, out: Outcome) -> list[Path]:
    found: list[Path] = []

    def unreadable(exc: OSError) -> None:
        out.failed.append({"path": str(exc.filename), "reason": exc.strerror or str(exc)})

    for root, dirs, names in os.walk(top, onerror=unreadable, followlinks=False):
        dirs.sort()
        here = Path(root)
        for name in [*dirs, *names]:
            path = here / name
            st = _look(path, out)
            if st is None or name not in names:
                continue
            if stat.S_ISREG(st.st_mode):
                found.append(path)
            else:
                out.skipped.append({"path": str(path), "reason": "not a regular file"})
    return sorted(found)


def _open(path: Path) -> tuple[int, int]:
    """(fd, size) of a regular file, never through a symlink swapped in since the walk."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise SourceError(f"{path} is no longer a regular file")
    return fd, st.st_size


class _Stop(Exception):
    """No file can get through (credentials, TLS): the rest are not tried."""

    def __init__(self, exc: UploadError) -> None:
        super().__init__(f"{exc.status.name}: {exc.message}{hint(exc)}")


async def _send_one(
    client: UploadClient,
    path: Path,
    args: argparse.Namespace,
    part_id: str,
    rng: random.Random,
    progress: Progress,
) -> tuple[str, int]:
    """(binary_data_id, bytes) after up to --retries retries of transient failures."""
    try:
        fd, size = _open(path)
    except OSError as exc:
        raise SourceError(f"cannot read: {exc.strerror}") from exc
    try:
        stem, ext = os.path.splitext(path.name)
        meta = upload_metadata(
            part_id,
            pb.DATA_TYPE_FILE,
            tags=args.tag,
            dataset_ids=[args.dataset] if args.dataset else None,
            file_name=stem,
            file_extension=ext,
        )
        piece = FileSlice(path, 0, size, opener=lambda: os.dup(fd))
        item_id = str(uuid.uuid4())  # same id on every retry: the server keeps one copy
        for attempt in range(1, args.retries + 2):
            try:
                result = await client.upload_file(meta, piece, item_id=item_id)
                return result.binary_data_id, size
            except AuthError:
                raise
            except UploadError as exc:
                if hint(exc):  # a TLS set-up problem: the same for every file
                    raise _Stop(exc) from exc
                retryable = exc.transport or classify(exc.status) is Verdict.TRANSIENT
                if not retryable or attempt > args.retries:
                    raise
                delay = backoff_delay(attempt, args.backoff, args.backoff_max, rng)
                progress.line(
                    f"{path}: {exc.status.name}: {exc.message}; retry {attempt} of"
                    f" {args.retries} in {delay:.1f}s"
                )
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")
    finally:
        os.close(fd)


async def run(args: argparse.Namespace) -> int:
    if args.backoff > args.backoff_max:
        raise ConfigError("--backoff must not be larger than --backoff-max")
    out = Outcome()
    files = collect(args.paths, out)
    client, config_part = open_target(args, UploadClient, timeout=args.timeout)
    part_id = args.part_id or config_part
    if not part_id:
        client.close()
        raise ConfigError("say which robot part the files belong to: --part-id ID (or -c CONFIG)")
    progress = Progress(len(files))
    rng = random.Random()
    total = 0
    try:
        for n, path in enumerate(files, 1):
            try:
                binary_id, size = await _send_one(client, path, args, part_id, rng, progress)
            except (AuthError, _Stop) as exc:
                progress.close()
                reason = str(_Stop(exc) if isinstance(exc, AuthError) else exc)
                progress.line(f"{path}: not uploaded, nor the rest: {reason}")
                out.failed += [{"path": str(p), "reason": reason} for p in files[n - 1 :]]
                break
            except UploadError as exc:
                out.failed.append(
                    {"path": str(path), "reason": f"{exc.status.name}: {exc.message}"}
                )
                progress.line(f"{path}: not uploaded: {exc.status.name}: {exc.message}")
            except SourceError as exc:
                out.failed.append({"path": str(path), "reason": str(exc)})
                progress.line(f"{path}: not uploaded: {exc}")
            else:
                total += size
                out.sent.append({"path": str(path), "binary_data_id": binary_id, "bytes": size})
                progress.update(n, total, f"uploaded {path} ({human_bytes(size)})")
                continue
            progress.update(n, total)
        progress.close()
    finally:
        client.close()
        await asyncio.sleep(0.05)  # let the closed connection's TLS transport finish closing
    _report(args, out, total)
    return EXIT_PARTIAL if out.failed else 0


def _report(args: argparse.Namespace, out: Outcome, total: int) -> None:
    if args.json:
        print(json.dumps(out.as_dict()))
        return
    tried = len(out.sent) + len(out.failed)
    print(f"uploaded {len(out.sent)} of {tried} file(s), {human_bytes(total)}")
    if out.failed:
        print(f"not uploaded ({len(out.failed)}):")
        for f in out.failed:
            print(f"  {f['path']}: {f['reason']}")
    if out.skipped:
        print(f"skipped ({len(out.skipped)}):")
        for s in out.skipped:
            print(f"  {s['path']}: {s['reason']}")


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """`edged upload ...`; the caller sets the handler."""
    p: argparse.ArgumentParser = sub.add_parser(
        "upload",
        help="upload files and directories (recursively) once, now",
        description="Upload files and directory trees (symlinks are not followed). Exit"
        " status 0 when every file arrived, 1 when some did not (they are listed).",
    )
    p.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="file or directory")
    p.add_argument("--tag", action="append", help="tag every file with T (repeatable)")
    p.add_argument("--dataset", metavar="ID", help="add every file to this dataset")
    p.add_argument("--part-id", help="robot part to file them under (default: the config's)")
    add_flags(p)
    p.add_argument(
        "--retries", type=whole, default=5, help="retries of a transient failure (default 5)"
    )
    p.add_argument("--backoff", type=seconds, default=1.0, help="first retry wait cap (1s)")
    p.add_argument("--backoff-max", type=seconds, default=30.0, help="retry wait cap (30s)")
    p.add_argument(
        "--timeout",
        type=seconds,
        default=60.0,
        help="give up on a file after this many seconds without progress (default 60)",
    )
    p.add_argument("--json", action="store_true", help="print the outcome as one JSON object")
    return p
