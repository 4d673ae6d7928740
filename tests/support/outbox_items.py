"""Readings encoded as the outbox stores them, and one lease of a batch."""

from __future__ import annotations

from edged._proto.app.datasync.v1 import data_sync_pb2 as pb
from edged.daemon.outbox import Item, Outbox


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
