"""Robot capture files: a streaming reader for edged and a writer for robot code.

A capture file is a varint-length-delimited `DataCaptureMetadata` header followed by
delimited `SensorData` readings (docs: shared/spec/capture-format.md). The reader never
holds more than one record plus a 64 KiB window in memory, so a large video or a long
backlog cannot exhaust RAM, and it tells a power-cut file (truncated: keep what is
whole) apart from garbage (corrupt: quarantine) so that neither is retried forever.
The writer produces files the existing robot tooling reads, with the same layout,
names, permissions and 4 KiB write-through buffering.

Reader guarantees (`open_capture`, `CaptureReader`):
- Every record it yields was framed by a whole length prefix and a whole body that
  parsed as `SensorData`; `raw` is that body byte for byte (no re-encoding).
- `offset`/`end` are absolute byte offsets of the record's length prefix and of the
  byte after its body; `read_from(end)` resumes exactly after it.
- A file that ends mid-record (cut length prefix, or a length pointing past the end) is
  truncated, not an error: all whole records before it are yielded, then iteration
  stops and `truncated_at` holds the offset of the cut record.
- A length prefix longer than 5 bytes (or above 32 bits) or a whole body that does not
  parse is corrupt: records before it have been yielded, then `CaptureFormatError`
  (path, offset of the bad record, reason) is raised.
- A missing, cut or unparsable header is corrupt (`open_capture` raises). A file that
  ends before its header does (zero-length included) raises `IncompleteHeader`: it
  holds no readings. A finished `.capture` like that is quarantined; a `.prog` like
  that is what a writer killed before its first 4 KiB flush leaves, and is removed.
- On arbitrary bytes nothing but `CaptureFormatError` (and `OSError` for I/O) escapes,
  and a length prefix is checked against the file size before anything is allocated.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Final, Self

from google.protobuf import struct_pb2

from edged._proto.app.datasync.v1 import data_sync_pb2 as pb
from edged.durable import fsync_dir
from edged.errors import CaptureFormatError, IncompleteHeader

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

MAX_PREFIX_BYTES: Final = 5
"""The robot's reader accepts a varint32 length prefix: at most 5 bytes."""

READ_CHUNK: Final = 64 * 1024
WRITE_BUFFER: Final = 4096
PROG_SUFFIX: Final = ".prog"
CAPTURE_SUFFIX: Final = ".capture"

_MAX_VARINT32: Final = (1 << 32) - 1
_MAX_VARINT64: Final = (1 << 64) - 1
_MORE: Final = object()
"""`_frame_batch`: records were framed; more may follow."""
_EDGE: Final = object()
"""`_frame_batch`: no record lies whole in the window (big body, cut or growing file)."""


# --------------------------------------------------------------------------- framing


def encode_varint(value: int) -> bytes:
    """Unsigned base-128 varint, as protobuf's delimited framing writes lengths."""
    if not 0 <= value <= _MAX_VARINT64:
        raise ValueError(f"varint out of range: {value}")
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def decode_varint32(buf: bytes | bytearray | memoryview, pos: int = 0) -> tuple[int, int] | None:
    """Decode a length prefix at `buf[pos:]` as `(value, position after it)`.

    Returns None when `buf` ends before the varint does (a cut prefix: truncation).
    Raises ValueError when the varint runs past 5 bytes or past 32 bits (corruption),
    judged from the bytes present, so the answer never depends on how much was read.
    """
    value = 0
    for i in range(MAX_PREFIX_BYTES):
        if pos + i >= len(buf):
            return None
        byte = buf[pos + i]
        value |= (byte & 0x7F) << (7 * i)
        if not byte & 0x80:
            if value > _MAX_VARINT32:
                raise ValueError(f"length prefix {value} does not fit in 32 bits")
            return value, pos + i + 1
    raise ValueError(f"length prefix longer than {MAX_PREFIX_BYTES} bytes")


def frame(body: bytes) -> bytes:
    """One delimited record: the body's length as a varint, then the body."""
    return encode_varint(len(body)) + body


def field_span(body: bytes, field_number: int) -> tuple[int, int] | None:
    """(offset, length) of the last length-delimited `field_number` inside an encoded
    message, found by walking tags only; lets a binary payload be uploaded straight
    from the capture file without copying it."""
    pos, found = 0, None
    while pos < len(body):
        tag = _read_varint(body, pos)
        if tag is None:
            return None
        key, pos = tag
        wire = key & 7
        if wire == 0:
            skipped = _read_varint(body, pos)
            if skipped is None:
                return None
            pos = skipped[1]
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        elif wire == 2:
            length = _read_varint(body, pos)
            if length is None:
                return None
            size, pos = length
            if key >> 3 == field_number:
                found = (pos, size)
            pos += size
        else:
            return None
    return found if pos == len(body) else None


def _read_varint(buf: bytes, pos: int) -> tuple[int, int] | None:
    value = shift = 0
    while pos < len(buf) and shift < 64:
        byte = buf[pos]
        value |= (byte & 0x7F) << shift
        pos += 1
        if not byte & 0x80:
            return value, pos
        shift += 7
    return None


# ---------------------------------------------------------------------------- reader


class CaptureRecord:
    """One whole reading; `raw` is stored as is so the outbox never re-encodes.

    `reading` is parsed from `raw` on first use (the bytes were already checked to parse
    as `SensorData`): tabular readings are forwarded as `raw` and never need the message.
    """

    __slots__ = ("_reading", "end", "offset", "raw")

    def __init__(
        self, offset: int, end: int, raw: bytes, reading: pb.SensorData | None = None
    ) -> None:
        self.offset = offset
        """Byte offset of the record's length prefix."""
        self.end = end
        """Byte offset just past the body: where the next record (or resumption) starts."""
        self.raw = raw
        """The encoded `SensorData` body exactly as it is in the file."""
        self._reading = reading

    @property
    def reading(self) -> pb.SensorData:
        """The parsed `SensorData` (parsed once, on first access)."""
        if self._reading is None:
            self._reading = pb.SensorData.FromString(self.raw)
        return self._reading

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, CaptureRecord):
            return NotImplemented
        return (self.offset, self.end, self.raw) == (other.offset, other.end, other.raw)

    def __hash__(self) -> int:
        return hash((self.offset, self.end, self.raw))

    def __repr__(self) -> str:
        return f"CaptureRecord(offset={self.offset}, end={self.end}, raw=<{len(self.raw)} bytes>)"


def _parse_into(record: CaptureRecord) -> tuple[int, str] | None:
    """Parse one record and keep its message; (0, reason) if it does not parse."""
    try:
        record._reading = pb.SensorData.FromString(record.raw)
    except Exception as exc:  # upb raises DecodeError; any parse failure is the bytes'
        return 0, str(exc) or type(exc).__name__
    return None


def first_unparsable(bodies: list[bytes]) -> tuple[int, str] | None:
    """(index, reason) of the first body that does not parse as `SensorData`, or None."""
    return _first_unparsable(bodies, [encode_varint(len(body)) + body for body in bodies])


def _first_unparsable(bodies: list[bytes], frames: list[bytes]) -> tuple[int, str] | None:
    """`first_unparsable`, given each body's frame (length prefix + body) too.

    All bodies are checked in one C-level parse, as the `sensor_contents` of a
    `DataCaptureUploadRequest` (tag 0x12 before each frame; no Python message per
    body). Only when that fails is each body parsed alone, so the answer is exactly
    what a parse of each body alone says (nested one level deeper, a body can only
    fail more, e.g. on the recursion limit, and then its own parse decides).
    """
    if not bodies:
        return None
    try:
        pb.DataCaptureUploadRequest.FromString(b"\x12" + b"\x12".join(frames))
        return None
    except Exception:  # upb raises DecodeError; find the body, and say why
        pass
    for i, body in enumerate(bodies):
        try:
            pb.SensorData.FromString(body)
        except Exception as exc:  # any parse failure is the bytes'
            return i, str(exc) or type(exc).__name__
    return None


class _Window:
    """Read-ahead over a file descriptor by absolute offset (pread: no shared position)."""

    def __init__(self, fd: int, chunk: int) -> None:
        self._fd = fd
        self._chunk = chunk
        self._start = 0
        self._data = b""

    def get(self, offset: int, n: int) -> bytes:
        """Up to `n` bytes at `offset`; fewer only where the file ends."""
        rel = offset - self._start
        if rel >= 0 and rel + n <= len(self._data):
            return self._data[rel : rel + n]
        if n > self._chunk:
            return self._pread(offset, n)  # a big body: read it once, don't cache it
        self._start = offset
        self._data = self._pread(offset, self._chunk)
        return self._data[:n]

    def _pread(self, offset: int, n: int) -> bytes:
        parts: list[bytes] = []
        got = 0
        while got < n:
            part = os.pread(self._fd, n - got, offset + got)
            if not part:
                break
            parts.append(part)
            got += len(part)
        return parts[0] if len(parts) == 1 else b"".join(parts)


class CaptureReader:
    """An open capture file: its header, then its readings streamed on demand.

    Iterate it (from the first reading) or call `read_from(offset)` to resume at a
    record boundary recorded earlier (a `CaptureRecord.end`). After an iteration runs
    to its end, `truncated_at` is None for a clean end or the offset of the cut
    record. See the module docstring for the full guarantees. Close it (or use `with`):
    it holds one file descriptor.
    """

    def __init__(self, path: str, fd: int, chunk_size: int) -> None:
        """Use `open_capture`; this reads and checks the header of an opened file."""
        self.path = path
        self._fd = fd
        self._chunk = chunk_size
        self.truncated_at: int | None = None
        """After an iteration ran to its end: None (clean end) or the cut record's offset."""
        self.metadata: pb.DataCaptureMetadata
        self.data_offset: int
        """Offset of the first reading (just past the header)."""
        self.metadata, self.data_offset = self._read_header()

    def _read_header(self) -> tuple[pb.DataCaptureMetadata, int]:
        size = os.fstat(self._fd).st_size
        if size == 0:
            raise IncompleteHeader(self.path, 0, "empty file: no DataCaptureMetadata header")
        window = _Window(self._fd, self._chunk)
        prefix = window.get(0, MAX_PREFIX_BYTES)
        try:
            decoded = decode_varint32(prefix)
        except ValueError as exc:
            raise CaptureFormatError(self.path, 0, f"header: {exc}") from exc
        if decoded is None or decoded[0] > size - decoded[1]:
            raise IncompleteHeader(
                self.path, 0, f"file ends inside the DataCaptureMetadata header ({size} bytes)"
            )
        length, body_start = decoded
        body = window.get(body_start, length)
        if len(body) < length:  # the file shrank since fstat
            raise IncompleteHeader(self.path, 0, "file ends inside the DataCaptureMetadata header")
        metadata = pb.DataCaptureMetadata()
        try:
            metadata.ParseFromString(body)
        except Exception as exc:  # upb raises DecodeError; any parse failure is the bytes'
            raise CaptureFormatError(
                self.path, 0, f"header does not parse as DataCaptureMetadata: {exc}"
            ) from exc
        return metadata, body_start + length

    def __iter__(self) -> Iterator[CaptureRecord]:
        return self.read_from(self.data_offset)

    def read_from(self, offset: int) -> Iterator[CaptureRecord]:
        """Yield the records from `offset` (a record boundary) to the end of the file.

        An offset before the first reading is a caller bug (ValueError); one past the
        end of the file means the file is not the one the offset was recorded for
        (CaptureFormatError). An offset inside a record cannot be detected in general:
        it reads as corrupt or, by chance, as other records.
        """
        if offset < self.data_offset:
            raise ValueError(f"offset {offset} is inside the header (ends at {self.data_offset})")
        size = os.fstat(self._fd).st_size
        if offset > size:
            raise CaptureFormatError(
                self.path, offset, f"resume offset is past the end of the file ({size} bytes)"
            )
        return self._records(offset, size)

    def _records(self, pos: int, size: int) -> Iterator[CaptureRecord]:
        self.truncated_at = None
        window = _Window(self._fd, self._chunk)
        while True:
            batch, frames, pos, stop = self._frame_batch(window, pos)
            if stop is _EDGE:
                record, size = self._edge_record(window, pos, size)
                if record is None:
                    self.truncated_at = pos
                    return
                batch, pos, stop = [record], record.end, _MORE
            if len(batch) == 1:  # a lone record (a big binary one): parse it once, keep it
                bad = _parse_into(batch[0])
            else:
                bad = _first_unparsable([r.raw for r in batch], frames)
            if bad is not None:
                index, reason = bad
                yield from batch[:index]
                why = f"reading does not parse as SensorData: {reason}"
                raise CaptureFormatError(self.path, batch[index].offset, why)
            yield from batch
            if stop is None:
                return  # clean end on a record boundary

    def _frame_batch(
        self, window: _Window, pos: int
    ) -> tuple[list[CaptureRecord], list[bytes], int, object]:
        """Frame the records that lie whole in one read window at `pos`, unparsed.

        Returns (records, their frames, position after them, stop): stop is `_MORE`
        (call again from the position), None (clean end of file at the position) or
        `_EDGE` (no whole record in the window: `_cut_or_corrupt` decides).
        Raises CaptureFormatError for a bad length prefix when no record precedes it.
        """
        data = window.get(pos, self._chunk)
        n, i = len(data), 0
        batch: list[CaptureRecord] = []
        frames: list[bytes] = []
        while i < n:
            first = data[i]
            if first < 0x80:  # a one-byte prefix, decoded inline: the common case
                length, body = first, i + 1
            else:
                try:
                    decoded = decode_varint32(data, i)
                except ValueError as exc:
                    if batch:
                        break  # yield what precedes it first; the next call raises
                    raise CaptureFormatError(self.path, pos, str(exc)) from exc
                if decoded is None:
                    break  # the prefix crosses the window's end
                length, body = decoded
            end = body + length
            if end > n:
                break  # the body crosses the window's end
            batch.append(CaptureRecord(pos + i, pos + end, data[body:end]))
            frames.append(data[i:end])
            i = end
        if batch:
            return batch, frames, pos + i, _MORE
        return batch, frames, pos, None if n == 0 else _EDGE

    def _edge_record(
        self, window: _Window, pos: int, size: int
    ) -> tuple[CaptureRecord | None, int]:
        """The record at `pos` that no read window holds whole: (record, size) if the
        file holds it (a big body, or the file grew), else (None, size): truncated."""
        prefix = window.get(pos, MAX_PREFIX_BYTES)
        try:
            decoded = decode_varint32(prefix)
        except ValueError as exc:
            raise CaptureFormatError(self.path, pos, str(exc)) from exc
        if decoded is None:
            return None, size  # the file ends inside the length prefix
        length, used = decoded
        body_start = pos + used
        if length > size - body_start:
            size = os.fstat(self._fd).st_size  # a live file may have grown since
            if length > size - body_start:
                return None, size  # never allocate what the file cannot hold
        raw = window.get(body_start, length)
        if len(raw) < length:
            return None, size  # the file shrank under us
        return CaptureRecord(pos, body_start + length, raw), size

    def close(self) -> None:
        """Release the file descriptor (idempotent)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_capture(
    path: str | os.PathLike[str], *, chunk_size: int = READ_CHUNK, fd: int | None = None
) -> CaptureReader:
    """Open a capture file and read its header; raises CaptureFormatError if it has none.
    `fd`: the file already opened (edged opens robot files through `safefs`); the reader
    owns it from then on, also when this raises."""
    name = os.fspath(path)
    if fd is None:
        fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return CaptureReader(name, fd, chunk_size)
    except BaseException:
        os.close(fd)
        raise


# ------------------------------------------------------------------ legacy GetImages

_FORMAT_MIME: Final[dict[str | float, str]] = {
    # camera.v1.Format as protojson writes it (name), as a number, or as a short name.
    "FORMAT_RAW_RGBA": "image/vnd.viam.rgba",
    "FORMAT_RAW_DEPTH": "image/vnd.viam.dep",
    "FORMAT_JPEG": "image/jpeg",
    "FORMAT_PNG": "image/png",
    1.0: "image/vnd.viam.rgba",
    2.0: "image/vnd.viam.dep",
    3.0: "image/jpeg",
    4.0: "image/png",
    "jpeg": "image/jpeg",
    "jpg": "image/jpeg",
    "png": "image/png",
}

_MIME_ENUM: Final[dict[str, pb.MimeType.ValueType]] = {
    "image/jpeg": pb.MIME_TYPE_IMAGE_JPEG,
    "image/png": pb.MIME_TYPE_IMAGE_PNG,
    "pointcloud/pcd": pb.MIME_TYPE_APPLICATION_PCD,
    "video/mp4": pb.MIME_TYPE_VIDEO_MP4,
}


@dataclass(frozen=True, slots=True)
class LegacyImage:
    """One image split out of a legacy GetImages reading, to upload as its own binary."""

    data: bytes
    mime_type: str
    """e.g. "image/jpeg"; "" when the reading did not say."""
    source_name: str

    @property
    def mime_type_enum(self) -> pb.MimeType.ValueType:
        """The `SensorMetadata.mime_type` for this image (UNSPECIFIED if unknown)."""
        return _MIME_ENUM.get(self.mime_type, pb.MIME_TYPE_UNSPECIFIED)


def split_legacy_images(
    metadata: pb.DataCaptureMetadata, reading: pb.SensorData
) -> list[LegacyImage] | None:
    """Split an old GetImages reading (a struct in a binary file) into its images.

    Returns None when the reading is not of that legacy kind (a binary header with a
    struct reading), so the caller uploads it normally. Raises ValueError with the
    reason when it is, but its shape is not understood: the caller dead-letters it.
    Assumed shape (`GetImagesResponse` through protojson): a top-level list `images` of
    objects with `image` (base64 bytes), `format` (`FORMAT_JPEG`, a number, or a mime
    string in `mime_type`/`mimeType`) and `source_name`/`sourceName`.
    """
    if metadata.type != pb.DATA_TYPE_BINARY_SENSOR or reading.WhichOneof("data") != "struct":
        return None
    images = reading.struct.fields.get("images")
    if images is None or images.WhichOneof("kind") != "list_value":
        raise ValueError("legacy GetImages struct has no list field 'images'")
    out: list[LegacyImage] = []
    for i, item in enumerate(images.list_value.values):
        if item.WhichOneof("kind") != "struct_value":
            raise ValueError(f"images[{i}] is not an object")
        fields = item.struct_value.fields
        encoded = _string_field(fields, "image")
        if encoded is None:
            raise ValueError(f"images[{i}] has no string field 'image'")
        out.append(
            LegacyImage(
                data=_b64decode(encoded, i),
                mime_type=_legacy_mime(fields),
                source_name=_string_field(fields, "source_name", "sourceName") or "",
            )
        )
    return out


def _string_field(fields: Mapping[str, struct_pb2.Value], *names: str) -> str | None:
    for name in names:
        value = fields.get(name)
        if value is not None and value.WhichOneof("kind") == "string_value":
            return value.string_value
    return None


def _legacy_mime(fields: Mapping[str, struct_pb2.Value]) -> str:
    mime = _string_field(fields, "mime_type", "mimeType")
    if mime:
        return mime
    fmt = fields.get("format")
    if fmt is None:
        return ""
    kind = fmt.WhichOneof("kind")
    if kind == "string_value":
        name = fmt.string_value
        if "/" in name:
            return name  # already a mime type
        return _FORMAT_MIME.get(name, _FORMAT_MIME.get(name.lower(), ""))
    if kind == "number_value":
        return _FORMAT_MIME.get(fmt.number_value, "")
    return ""


def _b64decode(text: str, index: int) -> bytes:
    # protojson writes standard base64 and accepts URL-safe; padding may be dropped.
    padded = text + "=" * (-len(text) % 4)
    try:
        altchars = b"-_" if ("-" in text or "_" in text) else None
        return base64.b64decode(padded, altchars=altchars, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"images[{index}].image is not base64: {exc}") from exc


# ---------------------------------------------------------------------------- writer

_SEGMENT_OK = re.compile(r"[^/\x00]+")


def capture_file_stem(when: datetime) -> str:
    """File name without suffix: local time, 6 fractional digits, ':' replaced by '_'.

    Go layout `2006-01-02T15:04:05.000000Z07:00`: `Z` for a zero offset, else ±hh:mm.
    A naive `when` is taken as local time.
    """
    if when.tzinfo is None:
        when = when.astimezone()
    offset = when.utcoffset() or timedelta(0)
    if offset == timedelta(0):
        zone = "Z"
    else:
        sign = "-" if offset < timedelta(0) else "+"
        minutes = int(abs(offset).total_seconds()) // 60
        zone = f"{sign}{minutes // 60:02d}:{minutes % 60:02d}"
    return (when.strftime("%Y-%m-%dT%H:%M:%S.%f") + zone).replace(":", "_")


def capture_subdir(capture_dir: str | os.PathLike[str], metadata: pb.DataCaptureMetadata) -> Path:
    """`<capture_dir>/<component api>/<name>/<method>` with ':' replaced by '_'.

    Only the part below `capture_dir` is rewritten: the caller's own directory is used
    as given. Raises ValueError for a part that is empty or would escape the layout.
    """
    parts = [metadata.component_type, metadata.component_name, metadata.method_name]
    out = Path(capture_dir)
    for part in parts:
        segment = part.replace(":", "_")
        if not _SEGMENT_OK.fullmatch(segment) or segment in (".", ".."):
            raise ValueError(f"unusable path component in capture metadata: {part!r}")
        out /= segment
    return out


def _local_now() -> datetime:
    return datetime.now().astimezone()


class _OpenFile:
    """The `.prog` file being written: its descriptor, block buffer and bookkeeping."""

    def __init__(self, fd: int, prog: Path, opened_at: datetime) -> None:
        self.fd = fd
        self.prog = prog
        self.opened_at = opened_at
        self.buffer = bytearray()
        self.size = 0
        self.readings = 0
        self.dirs_to_sync: set[Path] = set()

    def append(self, data: bytes, block: int) -> None:
        """Buffer `data`, writing out whole blocks like Go's bufio.Writer does."""
        self.buffer += data
        self.size += len(data)
        full = len(self.buffer) - len(self.buffer) % block
        if full:
            self._write(full)

    def flush(self) -> None:
        self._write(len(self.buffer))

    def _write(self, n: int) -> None:
        view = memoryview(self.buffer)
        try:
            done = 0
            while done < n:
                done += os.write(self.fd, view[done:n])
        finally:
            view.release()
        del self.buffer[:n]


class CaptureWriter:
    """Write readings as robot capture files, rotating by size, age and count.

    Files appear as `<capture_subdir>/<capture_file_stem>.prog` (0600, directories
    0700) and are renamed to `.capture` when closed, so only finished files carry that
    name. Bytes go out in 4 KiB blocks as on the robot: `flush()` pushes the rest to
    the OS (survives a process crash), `sync()` also fsyncs (survives a power cut).
    A file is opened at the first reading written into it, so no header-only files are
    left behind. Not thread-safe.
    """

    def __init__(
        self,
        capture_dir: str | os.PathLike[str],
        metadata: pb.DataCaptureMetadata,
        *,
        max_file_bytes: int = 256 * 1024,
        max_file_age_s: float | None = None,
        max_file_readings: int | None = None,
        clock: Callable[[], datetime] = _local_now,
        buffer_size: int = WRITE_BUFFER,
        file_mode: int = 0o600,
        dir_mode: int = 0o700,
    ) -> None:
        """`max_file_readings` defaults to 1 for binary data (one image per file, as the
        robot does) and to unlimited otherwise; bounds apply before each write, so a file
        ends up at most one reading past its size or age bound.

        `file_mode`/`dir_mode` are set exactly, whatever the umask: private by default;
        0o640/0o2770 share files with a daemon running as its own user in the directory's
        group (systemd/edged-dedicated-user.conf)."""
        if max_file_bytes <= 0 or buffer_size <= 0:
            raise ValueError("max_file_bytes and buffer_size must be positive")
        if file_mode & ~0o7777 or dir_mode & ~0o7777:
            raise ValueError("file_mode and dir_mode are permission bits (at most 0o7777)")
        self._file_mode = file_mode
        self._dir_mode = dir_mode
        self.capture_dir = Path(capture_dir)
        self.directory = capture_subdir(self.capture_dir, metadata)
        self.metadata = pb.DataCaptureMetadata()
        self.metadata.CopyFrom(metadata)
        self._header = frame(self.metadata.SerializeToString(deterministic=True))
        self._max_bytes = max_file_bytes
        self._max_age = None if max_file_age_s is None else timedelta(seconds=max_file_age_s)
        if max_file_readings is None and metadata.type == pb.DATA_TYPE_BINARY_SENSOR:
            max_file_readings = 1
        self._max_readings = max_file_readings
        self._clock = clock
        self._block = buffer_size
        self._file: _OpenFile | None = None
        self._last_stamp: datetime | None = None
        self._closed = False
        self.closed_paths: list[Path] = []
        """Every `.capture` file this writer finished, in the order written."""

    @property
    def path(self) -> Path | None:
        """The `.prog` file currently open, if any."""
        return None if self._file is None else self._file.prog

    def write(self, reading: pb.SensorData) -> None:
        """Append one reading (rotating first if the current file is past a bound)."""
        if self._closed:
            raise ValueError("write to a closed CaptureWriter")
        kind = reading.WhichOneof("data")
        if self.metadata.type == pb.DATA_TYPE_TABULAR_SENSOR and kind != "struct":
            raise ValueError("a tabular capture file holds struct readings")
        if self.metadata.type == pb.DATA_TYPE_BINARY_SENSOR and kind != "binary":
            raise ValueError("a binary capture file holds binary readings")
        record = frame(reading.SerializeToString(deterministic=True))
        now = self._clock()
        current = self._file
        if current is not None and self._full(current, now):
            self.rotate()
            current = None
        if current is None:
            current = self._file = self._open(now)
        current.append(record, self._block)
        current.readings += 1

    def write_tabular(
        self,
        data: Mapping[str, Any],
        *,
        time_requested: datetime | None = None,
        time_received: datetime | None = None,
    ) -> None:
        """Append one tabular reading from a JSON-like dict (numbers become doubles)."""
        reading = pb.SensorData()
        reading.struct.SetInParent()  # {} is a reading too
        reading.struct.update(dict(data))  # Struct rejects values JSON cannot hold
        self._stamp(reading, time_requested, time_received)
        self.write(reading)

    def write_binary(
        self,
        payload: bytes,
        *,
        time_requested: datetime | None = None,
        time_received: datetime | None = None,
        mime_type: pb.MimeType.ValueType = pb.MIME_TYPE_UNSPECIFIED,
    ) -> None:
        """Append one binary reading (an image, a point cloud)."""
        reading = pb.SensorData(binary=payload)
        reading.metadata.mime_type = mime_type
        self._stamp(reading, time_requested, time_received)
        self.write(reading)

    def _stamp(
        self, reading: pb.SensorData, requested: datetime | None, received: datetime | None
    ) -> None:
        if requested is None or received is None:
            now = self._clock()
            requested = now if requested is None else requested
            received = now if received is None else received
        reading.metadata.time_requested.FromDatetime(requested)
        reading.metadata.time_received.FromDatetime(received)

    def flush(self) -> None:
        """Hand buffered bytes to the OS: a process crash now loses nothing written."""
        if self._file is not None:
            self._file.flush()

    def sync(self) -> None:
        """Flush and fsync the file (and its new directories): survives a power cut."""
        current = self._file
        if current is None:
            return
        current.flush()
        os.fsync(current.fd)
        for directory in sorted(current.dirs_to_sync, key=lambda p: len(p.parts), reverse=True):
            fsync_dir(directory)
        current.dirs_to_sync.clear()

    def rotate(self) -> Path | None:
        """Finish the current file (fsync, rename to `.capture`, fsync the directory).

        Returns the finished path, or None if no file was open. The next write opens
        a new file; call this at every sync round, as robot writers do.
        """
        current = self._file
        if current is None:
            return None
        self._file = None
        try:
            current.flush()
            os.fsync(current.fd)
        finally:
            os.close(current.fd)
        final = current.prog.with_suffix(CAPTURE_SUFFIX)
        os.replace(current.prog, final)
        for directory in {*current.dirs_to_sync, current.prog.parent}:
            fsync_dir(directory)
        self.closed_paths.append(final)
        return final

    def close(self) -> Path | None:
        """Finish the current file and refuse further writes; returns its final path."""
        if self._closed:
            return None
        self._closed = True
        return self.rotate()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _full(self, current: _OpenFile, now: datetime) -> bool:
        if current.readings == 0:
            return False
        if current.size >= self._max_bytes:
            return True
        if self._max_readings is not None and current.readings >= self._max_readings:
            return True
        return self._max_age is not None and now - current.opened_at >= self._max_age

    def _open(self, now: datetime) -> _OpenFile:
        created = self._make_dirs()
        stamp = now
        if self._last_stamp is not None and stamp <= self._last_stamp:
            stamp = self._last_stamp + timedelta(microseconds=1)  # names stay unique
        while True:
            stem = capture_file_stem(stamp)
            prog = self.directory / (stem + PROG_SUFFIX)
            if not prog.with_suffix(CAPTURE_SUFFIX).exists():
                try:
                    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
                    fd = os.open(prog, flags, self._file_mode & 0o777)
                    break
                except FileExistsError:
                    pass
            stamp += timedelta(microseconds=1)
        self._last_stamp = stamp
        opened = _OpenFile(fd, prog, now)
        try:
            os.fchmod(fd, self._file_mode)  # exact mode whatever the umask
            opened.dirs_to_sync = {self.directory, *(d.parent for d in created)}
            opened.append(self._header, self._block)
        except BaseException:
            os.close(fd)
            raise
        return opened

    def _make_dirs(self) -> list[Path]:
        """Create missing directories down to `self.directory` with `dir_mode`; return them."""
        missing: list[Path] = []
        path = self.directory
        while not path.is_dir():
            missing.append(path)
            if path.parent == path:
                break
            path = path.parent
        created: list[Path] = []
        for directory in reversed(missing):
            try:
                directory.mkdir(mode=self._dir_mode & 0o777)
            except FileExistsError:
                continue
            directory.chmod(self._dir_mode)
            created.append(directory)
        return created
