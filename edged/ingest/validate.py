"""Pure checks of incoming upload messages.

Each returns nothing or raises INVALID_ARGUMENT with a message that names the field,
so a client can dead-letter the item with a reason a person can act on.
"""

from __future__ import annotations

import mimetypes
from collections.abc import Collection, Sequence
from typing import Any, cast

from grpclib.const import Status
from grpclib.exceptions import GRPCError

from edged._proto.app.datasync.v1 import data_sync_pb2 as pb

_ENUM_MIME = {
    pb.MIME_TYPE_IMAGE_JPEG: "image/jpeg",
    pb.MIME_TYPE_IMAGE_PNG: "image/png",
    pb.MIME_TYPE_APPLICATION_PCD: "pointcloud/pcd",
    pb.MIME_TYPE_VIDEO_MP4: "video/mp4",
}
_EXT_MIME = {".pcd": "pointcloud/pcd", ".jpeg": "image/jpeg", ".jpg": "image/jpeg"}


def invalid(message: str) -> GRPCError:
    return GRPCError(Status.INVALID_ARGUMENT, message)


def _type_name(value: int) -> str:
    return str(pb.DataType.Name(cast(Any, value))) if value in pb.DataType.values() else str(value)


# UploadMetadata's text fields: stored as text (PostgreSQL's text cannot hold NUL) and,
# for tags and dataset ids, as JSON that PostgreSQL reads back as jsonb (no \u0000 either).
_TEXT_FIELDS = (
    "part_id", "component_type", "component_name", "method_name", "file_name",
    "file_extension", "mime_type",
)  # fmt: skip


def _no_nul(value: str, where: str) -> None:
    if "\x00" in value:
        raise invalid(f"{where} contains a NUL character (U+0000), which cannot be stored")


def check_upload_metadata(
    meta: pb.UploadMetadata, allowed: Collection[int], where: str = "metadata"
) -> None:
    """Required fields, the call's data types, and text that every index can store."""
    if not meta.part_id:
        raise invalid(f"{where}.part_id is required")
    for name in _TEXT_FIELDS:
        _no_nul(getattr(meta, name), f"{where}.{name}")
    for name in ("tags", "dataset_ids"):
        for i, value in enumerate(getattr(meta, name)):
            _no_nul(value, f"{where}.{name}[{i}]")
    if meta.type not in allowed:
        names = ", ".join(_type_name(t) for t in sorted(allowed))
        raise invalid(f"{where}.type is {_type_name(meta.type)}; this call takes {names}")


def check_capture_upload(req: pb.DataCaptureUploadRequest) -> None:
    if not req.HasField("metadata"):
        raise invalid("metadata is required")
    check_upload_metadata(req.metadata, (pb.DATA_TYPE_TABULAR_SENSOR, pb.DATA_TYPE_BINARY_SENSOR))
    check_sensor_contents(req.metadata.type, req.sensor_contents)


def check_sensor_contents(data_type: int, contents: Sequence[pb.SensorData]) -> None:
    if not contents:
        raise invalid("sensor_contents is empty; send at least one reading")
    if data_type == pb.DATA_TYPE_BINARY_SENSOR:
        if len(contents) != 1:
            raise invalid(
                f"sensor_contents has {len(contents)} readings; a binary upload takes exactly one"
            )
        if contents[0].WhichOneof("data") != "binary":
            raise invalid("sensor_contents[0] must carry binary data in a binary upload")
        check_bbox_ids(contents[0].metadata, "sensor_contents[0].metadata")
        return
    for i, reading in enumerate(contents):
        if reading.WhichOneof("data") != "struct":
            raise invalid(f"sensor_contents[{i}] must carry struct data in a tabular upload")


def check_bbox_ids(sensor: pb.SensorMetadata, where: str) -> None:
    """Bounding-box ids are unique per binary: refuse a repeat rather than keep one box."""
    first: dict[str, int] = {}
    for i, box in enumerate(sensor.annotations.bboxes):
        _no_nul(box.id, f"{where}.annotations.bboxes[{i}].id")
        _no_nul(box.label, f"{where}.annotations.bboxes[{i}].label")
        if box.id in first:
            raise invalid(
                f"{where}.annotations.bboxes[{i}].id {box.id!r} repeats bboxes[{first[box.id]}];"
                " bounding-box ids must be unique within one binary"
            )
        if box.id:
            first[box.id] = i


def mime_type_for(meta: pb.UploadMetadata, sensor: pb.SensorMetadata | None) -> str:
    """Explicit mime type first, then the sensor enum, then a guess from the extension."""
    if meta.mime_type:
        return meta.mime_type
    if sensor is not None and sensor.mime_type in _ENUM_MIME:
        return _ENUM_MIME[sensor.mime_type]
    ext = meta.file_extension if meta.file_extension.startswith(".") else f".{meta.file_extension}"
    if ext.lower() in _EXT_MIME:
        return _EXT_MIME[ext.lower()]
    guess, _ = mimetypes.guess_type(f"x{ext}") if meta.file_extension else (None, None)
    return guess or "application/octet-stream"
