"""`edged query`: read back what an ingest server stored, from the command line.

Thin on purpose: DataService calls over `edged.wire.connect()`, the connection uploads
use (same address, TLS, API-key handshake, re-authentication and error mapping).
Everything pages with the server's `last` token, so memory is bounded by one page
whatever the result size.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import mimetypes
import os
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from edged._proto.app.data.v1 import data_pb2 as dpb
from edged.cli.progress import Progress
from edged.cli.target import add_flags, hint, open_target
from edged.client.data_client import load_bson, struct_to_dict
from edged.daemon.config import absolute_path
from edged.errors import EdgedError, UploadError
from edged.wire.connection import Connection

_DATA = "/viam.app.data.v1.DataService/"
PAGE = 1000
EXPORT_PAGE = 16  # binaries per page while exporting: bounds memory to 16 payloads


def parse_time(text: str) -> Timestamp:
    """RFC 3339 (a trailing Z is fine; naive = UTC) or epoch seconds."""
    try:
        when = dt.datetime.fromtimestamp(float(text), dt.UTC)
    except ValueError:
        try:
            when = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is neither RFC 3339 nor epoch seconds"
            ) from None
    ts = Timestamp()
    ts.FromDatetime(when if when.tzinfo else when.replace(tzinfo=dt.UTC))
    return ts


def build_filter(args: argparse.Namespace) -> dpb.Filter:
    f = dpb.Filter(
        component_name=args.component_name or "",
        component_type=args.component_type or "",
        method=args.method or "",
        part_id=args.part_id or "",
    )
    if args.tag:
        f.tags_filter.CopyFrom(dpb.TagsFilter(type=dpb.TAGS_FILTER_TYPE_MATCH_BY_OR, tags=args.tag))
    if args.start is not None:
        f.interval.start.CopyFrom(args.start)
    if args.end is not None:
        f.interval.end.CopyFrom(args.end)
    return f


def _client(args: argparse.Namespace) -> Connection:
    # No call deadline: a page of binaries may take long on a slow link.
    conn, _ = open_target(args, Connection, timeout=None)
    return conn


def _ts_text(ts: Timestamp, present: bool) -> str:
    return ts.ToDatetime(dt.UTC).isoformat() if present else "-"


async def _pages(conn: Connection, args: argparse.Namespace, *, binary: bool) -> AsyncIterator[Any]:
    """Each item of every page, up to --limit items in all."""
    want = args.limit or None
    page_size = EXPORT_PAGE if getattr(args, "dir", None) else PAGE
    dr = dpb.DataRequest(filter=build_filter(args), limit=page_size)
    got = 0
    while want is None or got < want:
        dr.limit = min(page_size, want - got) if want is not None else page_size
        resp: Any
        if binary:
            include = getattr(args, "dir", None) is not None
            resp = await conn.unary(
                _DATA + "BinaryDataByFilter",
                dpb.BinaryDataByFilterRequest(data_request=dr, include_binary=include),
                dpb.BinaryDataByFilterResponse,
            )
        else:
            resp = await conn.unary(
                _DATA + "TabularDataByFilter",
                dpb.TabularDataByFilterRequest(data_request=dr),
                dpb.TabularDataByFilterResponse,
            )
        if not resp.data:
            return
        for item in resp.data:
            yield resp, item
        got += len(resp.data)
        dr.last = resp.last


async def tabular(args: argparse.Namespace) -> int:
    async with _client(args) as conn:
        async for resp, item in _pages(conn, args, binary=False):
            meta = resp.metadata[item.metadata_index]
            data = struct_to_dict(item.data)
            when = _ts_text(item.time_requested, item.HasField("time_requested"))
            if args.json:
                row = {
                    "time_requested": when,
                    "part_id": meta.part_id,
                    "component_name": meta.component_name,
                    "method_name": meta.method_name,
                    "tags": list(meta.tags),
                    "data": data,
                }
                print(json.dumps(row))
            else:
                print(f"{when}  {meta.component_name}/{meta.method_name}  {json.dumps(data)}")
    return 0


async def binary(args: argparse.Namespace) -> int:
    async with _client(args) as conn:
        async for _, item in _pages(conn, args, binary=True):
            m = item.metadata
            when = _ts_text(m.time_requested, m.HasField("time_requested"))
            cm = m.capture_metadata
            if args.json:
                row = {
                    "binary_data_id": m.binary_data_id,
                    "time_requested": when,
                    "component_name": cm.component_name,
                    "mime_type": cm.mime_type,
                    "file_name": m.file_name + m.file_ext,
                    "size": m.file_size_bytes,
                    "tags": list(cm.tags),
                    "dataset_ids": list(m.dataset_ids),
                }
                print(json.dumps(row))
            else:
                print(
                    f"{m.binary_data_id}  {when}  {cm.component_name}  {cm.mime_type}"
                    f"  {m.file_size_bytes} B  {m.file_name}{m.file_ext}"
                )
    return 0


async def sql(args: argparse.Namespace) -> int:
    async with _client(args) as conn:
        resp = await conn.unary(
            _DATA + "TabularDataBySQL",
            dpb.TabularDataBySQLRequest(organization_id=args.org_id or "", sql_query=args.query),
            dpb.TabularDataBySQLResponse,
        )
        bson = load_bson("edged query sql")
        for raw in resp.raw_data:
            print(json.dumps(bson.decode(raw), default=str))
    return 0


MANIFEST = "manifest.jsonl"


def export_name(meta: dpb.BinaryMetadata) -> str:
    """<binary_data_id><ext>: unique, and never a path the server could steer."""
    ext = meta.file_ext or mimetypes.guess_extension(meta.capture_metadata.mime_type) or ""
    ext = ext if ext.startswith(".") or not ext else f".{ext}"
    safe = "".join(c for c in ext if c.isalnum() or c == ".")
    return f"{meta.binary_data_id}{safe}"


def original_name(meta: dpb.BinaryMetadata) -> str | None:
    """The name the file was uploaded with, if it is a plain file name (no directory, not
    hidden, printable, at most 255 bytes); None when the server's text could steer a path."""
    name = meta.file_name + meta.file_ext if meta.file_name else ""
    if (
        not name
        or name in (".", "..", MANIFEST)
        or name.startswith(".")
        or any(c in name for c in "/\\\0")
        or not name.isprintable()
        or len(name.encode("utf-8", "surrogateescape")) > 255
    ):
        return None
    return name


def pick_name(meta: dpb.BinaryMetadata, counts: Counter[str], used: set[str]) -> str:
    """The original name when exactly one item of the export has it, else the id name."""
    name = original_name(meta)
    if name is None or counts[name] != 1 or name in used:
        name = export_name(meta)
    used.add(name)
    return name


def manifest_row(meta: dpb.BinaryMetadata, file: str, size: int) -> dict[str, Any]:
    cm = meta.capture_metadata
    return {
        "file": file,
        "binary_data_id": meta.binary_data_id,
        "original_name": meta.file_name + meta.file_ext,
        "size": size,
        "time_requested": _ts_text(meta.time_requested, meta.HasField("time_requested")),
        "part_id": cm.part_id,
        "component_type": cm.component_type,
        "component_name": cm.component_name,
        "method_name": cm.method_name,
        "mime_type": cm.mime_type,
        "tags": list(cm.tags),
        "dataset_ids": list(meta.dataset_ids),
    }


def _write_new(path: Path, data: bytes) -> None:
    """Write `path`, never through a symlink planted in the export directory."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


async def _name_counts(conn: Connection, args: argparse.Namespace) -> Counter[str]:
    """How often each original name occurs among the items to export (metadata only)."""
    counts: Counter[str] = Counter()
    listing = argparse.Namespace(**{**vars(args), "dir": None})
    async for _, item in _pages(conn, listing, binary=True):
        if name := original_name(item.metadata):
            counts[name] += 1
    return counts


async def export_binaries(args: argparse.Namespace) -> int:
    out: Path = args.dir
    out.mkdir(parents=True, exist_ok=True)
    async with _client(args) as conn:
        count = await conn.unary(
            _DATA + "BinaryDataByFilter",
            dpb.BinaryDataByFilterRequest(
                data_request=dpb.DataRequest(filter=build_filter(args)), count_only=True
            ),
            dpb.BinaryDataByFilterResponse,
        )
        total = min(count.count, args.limit) if args.limit else count.count
        counts = await _name_counts(conn, args)
        used: set[str] = set()
        done = nbytes = 0
        progress = Progress(total)
        progress.update(done, nbytes)
        with open(out / MANIFEST, "w", encoding="utf-8") as manifest:
            async for _, item in _pages(conn, args, binary=True):
                name = pick_name(item.metadata, counts, used)
                if "/" in name or name.startswith(".") or name == MANIFEST:
                    raise EdgedError(f"server sent an unusable binary data id {name!r}")
                _write_new(out / name, item.binary)
                row = manifest_row(item.metadata, name, len(item.binary))
                manifest.write(json.dumps(row) + "\n")
                done += 1
                nbytes += len(item.binary)
                progress.update(done, nbytes, f"{name} ({len(item.binary)} B)")
        progress.close()
    summary = {"exported": done, "bytes": nbytes, "dir": str(out), "manifest": str(out / MANIFEST)}
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"exported {done} file(s), {nbytes} bytes, to {out} (list: {out / MANIFEST})")
    return 0


COMMANDS = {
    "tabular": tabular,
    "binary": binary,
    "sql": sql,
    "export-binaries": export_binaries,
}


async def run(args: argparse.Namespace) -> int:
    try:
        return await COMMANDS[args.query_command](args)
    except UploadError as exc:  # re-authentication already tried, transport faults mapped
        raise EdgedError(f"query failed: {exc.status.name}: {exc.message}{hint(exc)}") from exc
    finally:
        await asyncio.sleep(0.05)  # let the closed connection's TLS transport finish closing


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """`edged query ...`; the caller sets the handler."""
    q: argparse.ArgumentParser = sub.add_parser(
        "query", help="read back what an ingest server stored"
    )
    qs = q.add_subparsers(dest="query_command", required=True)

    def common(p: argparse.ArgumentParser, *, filters: bool = True) -> None:
        add_flags(p)
        p.add_argument("--json", action="store_true", help="one JSON object per line")
        if filters:
            p.add_argument("--component-name")
            p.add_argument("--component-type")
            p.add_argument("--method")
            p.add_argument("--part-id")
            p.add_argument("--tag", action="append", help="match any of these tags (repeatable)")
            p.add_argument("--start", type=parse_time, help="captured at or after (RFC 3339)")
            p.add_argument("--end", type=parse_time, help="captured before (RFC 3339)")
            p.add_argument("--limit", type=int, default=0, help="stop after N items (default all)")

    common(qs.add_parser("tabular", help="readings matching the filters"))
    common(qs.add_parser("binary", help="binary data (metadata) matching the filters"))
    s = qs.add_parser("sql", help="run a SQL query over the organisation's readings")
    s.add_argument("query", help='e.g. "SELECT * FROM readings LIMIT 5"')
    s.add_argument("--org-id", help="organisation (default: the API key's)")
    common(s, filters=False)
    e = qs.add_parser("export-binaries", help="download matching binary data into DIR")
    e.add_argument(
        "dir",
        type=absolute_path,
        help="directory to write the files into (original names where unique, else"
        " <binary_data_id><ext>) with manifest.jsonl listing each",
    )
    common(e)
    return q
