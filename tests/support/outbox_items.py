"""Readings encoded as the outbox stores them, a whole file queued as a source would queue
it, and one lease of a batch."""

from __future__ import annotations

from pathlib import Path

from edged._proto.app.datasync.v1 import data_sync_pb2 as pb
from edged.daemon.outbox import KIND_FILE, Claim, FileRef, Item, Outbox


def meta(name: str = "s1") -> bytes:
    """Upload metadata of a tabular sensor named `name`, encoded."""
    return pb.UploadMetadata(
        part_id="p", component_name=name, type=pb.DATA_TYPE_TABULAR_SENSOR
    ).SerializeToString()


def reading(i: int) -> bytes:
    """Reading number `i`, encoded."""
    r = pb.SensorData()
    r.struct.update({"seq": i})
    return r.SerializeToString()


async def take(box: Outbox) -> Item | None:
    """Lease the next batch (a minute's lease, up to 1000 readings or 1 MiB)."""
    return await box.lease(lease_s=60.0, max_readings=1000, max_bytes=1 << 20)


async def enqueue_file(
    box: Outbox, path: Path, metadata: bytes = b"", *, delete_after: bool = True
) -> str:
    """Queue all of `path` by reference, claimed as it looks now (its size and mtime)."""
    st = path.stat()
    return await box.enqueue_item(
        KIND_FILE,
        metadata,
        FileRef(str(path), 0, st.st_size),
        claim=Claim(str(path), st.st_size, st.st_mtime_ns, delete_after=delete_after),
    )
