"""The robot's capture file format: a delimited `DataCaptureMetadata` header, then
delimited `SensorData` readings (spec/capture-format.md). Reader and writer live in
`codec`; this package is the public import path (`from edged.capture import ...`)."""

from edged.capture.codec import (
    CaptureReader,
    CaptureRecord,
    CaptureWriter,
    LegacyImage,
    capture_file_stem,
    capture_subdir,
    decode_varint32,
    encode_varint,
    field_span,
    frame,
    open_capture,
    split_legacy_images,
)

__all__ = [
    "CaptureReader",
    "CaptureRecord",
    "CaptureWriter",
    "LegacyImage",
    "capture_file_stem",
    "capture_subdir",
    "decode_varint32",
    "encode_varint",
    "field_span",
    "frame",
    "open_capture",
    "split_legacy_images",
]
