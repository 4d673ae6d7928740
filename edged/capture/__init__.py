"""The robot's capture file format: a delimited `DataCaptureMetadata` header, then
delimited `SensorData` readings (spec/capture-format.md). Reader and writer live in
`codec`; this package is the public import path (`from edged.capture import ...`).

The public names are listed once, in `edged.capture.codec.__all__`."""

from edged.capture import codec as _codec
from edged.capture.codec import *  # noqa: F403

__all__ = _codec.__all__
