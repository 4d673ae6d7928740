"""YAML config -> frozen dataclasses, with every problem named by key path, file and line.

The loader walks the composed YAML node graph (not plain dicts) so each value keeps its
line, and it collects every problem before raising one `ConfigErrors`: an operator on a
robot fixes the whole file in one edit instead of one error per restart.
"""

from __future__ import annotations

import difflib
import math
import os
import re
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from edged.errors import ConfigError, ConfigErrors
from edged.wire.keyfile import api_key

__all__ = [
    "GIB",
    "KIB",
    "MIB",
    "BackoffConfig",
    "CloudConfig",
    "Config",
    "LogConfig",
    "OutboxConfig",
    "SourceConfig",
    "StatusConfig",
    "UploadConfig",
    "check_host",
    "format_duration",
    "format_size",
    "load_config",
    "parse_config",
    "parse_duration",
    "parse_size",
]

T = TypeVar("T")

KIB = 1 << 10
MIB = 1 << 20
GIB = 1 << 30
TIB = 1 << 40

# gRPC's default message cap is 4 MiB; edged never sends more, leaving 1 KiB for framing.
MAX_MESSAGE = 4 * MIB
MAX_CHUNK = MAX_MESSAGE - KIB
# sun_path is 108 bytes on Linux, one of them the terminating NUL.
MAX_SOCKET_PATH = 107

SOURCE_KINDS = ("capture", "jsonl", "files")
ON_FULL = ("backpressure", "drop_oldest")
SYNCHRONOUS = ("FULL", "NORMAL")
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")


# --------------------------------------------------------------------------- sizes, durations

_SIZE_UNITS = {"": 1, "b": 1, "kib": KIB, "mib": MIB, "gib": GIB, "tib": TIB}
_SIZE_DECIMAL = {"k": "KiB", "kb": "KiB", "m": "MiB", "mb": "MiB", "g": "GiB", "gb": "GiB"}
_SIZE_DECIMAL |= {"t": "TiB", "tb": "TiB"}
_SIZE_RE = re.compile(r"(\d+)\s*([A-Za-z]*)")
_SIZE_EXAMPLES = "e.g. 64KiB, 1MiB, 2GiB, or a number of bytes"


def absolute_path(text: str) -> Path:
    """A command-line path anchored to the working directory at start-up.

    Resolved once, here: later users (SQLite URIs, blob paths, re-reads of key or TLS
    files) then never depend on the process's current directory."""
    if not text:
        raise ValueError("a path cannot be empty")
    if "\0" in text:
        raise ValueError(f"{text!r}: paths cannot contain NUL characters")
    return Path(os.path.abspath(text))


def parse_size(value: str | int) -> int:
    """Bytes from `64KiB`, `1MiB`, `2GiB`, `512MiB`, `4096B` or a plain byte count.

    Only binary units: `MB` means 10^6 to some and 2^20 to others, so it is refused
    with the binary spelling to use instead. Raises ValueError with a user sentence.
    """
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"{value!r} is not a size ({_SIZE_EXAMPLES})")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"{value} is not a size: sizes cannot be negative")
        return value
    m = _SIZE_RE.fullmatch(value.strip())
    if m is None:
        raise ValueError(f"{value!r} is not a size ({_SIZE_EXAMPLES})")
    number, unit = int(m.group(1)), m.group(2).lower()
    if unit in _SIZE_UNITS:
        return number * _SIZE_UNITS[unit]
    if unit in _SIZE_DECIMAL:
        raise ValueError(
            f"{value!r} is not a size: use binary units (KiB, MiB, GiB, TiB),"
            f" e.g. {number}{_SIZE_DECIMAL[unit]}"
        )
    raise ValueError(f"{value!r} is not a size ({_SIZE_EXAMPLES})")


def format_size(n: int) -> str:
    """The shortest exact spelling `parse_size` reads back: `64KiB`, `2GiB`, `1000B`."""
    for unit, mult in (("TiB", TIB), ("GiB", GIB), ("MiB", MIB), ("KiB", KIB)):
        if n and n % mult == 0:
            return f"{n // mult}{unit}"
    return f"{n}B"


_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION_PART = r"(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|h)"
_DURATION_RE = re.compile(rf"(?:{_DURATION_PART}\s*)+")
_DURATION_PART_RE = re.compile(_DURATION_PART)
_NUMBER_RE = re.compile(r"\d+(?:\.\d*)?|\.\d+")
_DURATION_EXAMPLES = "e.g. 200ms, 10s, 5m, 1h"


def parse_duration(value: str | float) -> float:
    """Seconds from `200ms`, `10s`, `5m`, `1h`, `1m30s`, or a plain number of seconds.

    Raises ValueError with a user sentence; negative and non-finite values are refused.
    """
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"{value!r} is not a duration ({_DURATION_EXAMPLES})")
    if isinstance(value, int | float):
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"{value!r} is not a duration: it must be a finite number >= 0")
        return float(value)
    text = value.strip()
    if _NUMBER_RE.fullmatch(text):
        return float(text)
    if not _DURATION_RE.fullmatch(text):
        raise ValueError(f"{value!r} is not a duration ({_DURATION_EXAMPLES})")
    total = 0.0
    for number, unit in _DURATION_PART_RE.findall(text):
        # Divide for ms so that "200ms" gives exactly the float 0.2.
        total += float(number) / 1000 if unit == "ms" else float(number) * _DURATION_UNITS[unit]
    return total


def format_duration(seconds: float) -> str:
    """The shortest spelling `parse_duration` reads back: `200ms`, `10s`, `5m`, `1h`."""
    if seconds == 0:
        return "0s"
    ms = round(seconds * 1000)
    if ms == 0 or abs(ms - seconds * 1000) > 1e-6:
        return f"{seconds!r}s"
    for unit, mult in (("h", 3_600_000), ("m", 60_000), ("s", 1000)):
        if ms % mult == 0:
            return f"{ms // mult}{unit}"
    return f"{ms}ms"


# --------------------------------------------------------------------------- dataclasses


@dataclass(frozen=True)
class CloudConfig:
    """Where to upload and how to authenticate; the key itself never lives in config."""

    address: str = "embedded"
    api_key_id: str | None = None
    api_key_file: Path | None = None
    tls: bool | None = None
    ca_file: Path | None = None

    @property
    def embedded(self) -> bool:
        """True when uploads go to the in-process ingest server under state_dir/ingest."""
        return self.address == "embedded"

    def use_tls(self) -> bool:
        """Explicit `tls` wins; otherwise TLS for every remote address, none in-process."""
        if self.tls is not None:
            return self.tls
        return not self.embedded


@dataclass(frozen=True)
class SourceConfig:
    """One watched directory (capture, files) or tailed file (jsonl)."""

    kind: str
    path: Path
    patterns: tuple[str, ...] = ()
    settle: float = 10.0
    tags: tuple[str, ...] = ()
    dataset_ids: tuple[str, ...] = ()
    component_type: str = ""
    component_name: str = ""
    method: str = ""
    delete_after_upload: bool = True
    prog_grace: float = 60.0
    name: str = ""


@dataclass(frozen=True)
class BackoffConfig:
    """Exponential backoff bounds (seconds); the jitter itself lives in policy.py."""

    initial: float = 0.2
    max: float = 300.0


@dataclass(frozen=True)
class UploadConfig:
    """How the uploader batches, chunks and paces calls."""

    workers: int = 4
    batch_max_readings: int = 1000
    batch_max_bytes: int = MIB
    chunk_size: int = 64 * KIB
    backoff: BackoffConfig = field(default_factory=BackoffConfig)
    call_timeout: float = 60.0
    lease: float = 300.0
    max_attempts: int = 5


@dataclass(frozen=True)
class OutboxConfig:
    """Outbox limits and durability; `synchronous` is SQLite's PRAGMA of that name."""

    max_bytes: int = 2 * GIB
    on_full: str = "backpressure"
    min_free_disk: int = 512 * MIB
    synchronous: str = "FULL"


@dataclass(frozen=True)
class StatusConfig:
    """The local control socket; the default (state_dir/edged.sock) is filled in by the loader.
    `metrics_listen`: HOST:PORT of Prometheus /metrics (None: off, the default)."""

    socket: Path
    metrics_listen: str | None = None


@dataclass(frozen=True)
class LogConfig:
    """Log verbosity and shape (`json` for journald/log shippers)."""

    level: str = "info"
    format: str = "text"


@dataclass(frozen=True, kw_only=True)
class Config:
    """The whole resolved config; relative paths are already resolved against the file's dir."""

    part_id: str
    state_dir: Path
    cloud: CloudConfig = field(default_factory=CloudConfig)
    sources: tuple[SourceConfig, ...] = ()
    upload: UploadConfig = field(default_factory=UploadConfig)
    outbox: OutboxConfig = field(default_factory=OutboxConfig)
    status: StatusConfig
    log: LogConfig = field(default_factory=LogConfig)
    source_file: Path | None = None
    lines: Mapping[str, int] = field(default_factory=dict, compare=False, repr=False)
    """Line of each key path given in the file (`cloud.api_key_file`, `sources[0].path`)."""

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/YAML-able data in config-file spelling; it parses back to this config.

        `cloud.tls` is the effective value (auto resolved); `source_file` is left out
        because it is not a key.
        """
        c = self.cloud
        u = self.upload
        o = self.outbox
        return {
            "part_id": self.part_id,
            "state_dir": str(self.state_dir),
            "cloud": {
                "address": c.address,
                "api_key_id": c.api_key_id,
                "api_key_file": _opt_str(c.api_key_file),
                "tls": c.use_tls(),
                "ca_file": _opt_str(c.ca_file),
            },
            "sources": [_source_dict(s) for s in self.sources],
            "upload": {
                "workers": u.workers,
                "batch_max_readings": u.batch_max_readings,
                "batch_max_bytes": format_size(u.batch_max_bytes),
                "chunk_size": format_size(u.chunk_size),
                "backoff": {
                    "initial": format_duration(u.backoff.initial),
                    "max": format_duration(u.backoff.max),
                },
                "call_timeout": format_duration(u.call_timeout),
                "lease": format_duration(u.lease),
                "max_attempts": u.max_attempts,
            },
            "outbox": {
                "max_bytes": format_size(o.max_bytes),
                "on_full": o.on_full,
                "min_free_disk": format_size(o.min_free_disk),
                "synchronous": o.synchronous,
            },
            "status": {"socket": str(self.status.socket)}
            | ({"metrics_listen": m} if (m := self.status.metrics_listen) else {}),
            "log": {"level": self.log.level, "format": self.log.format},
        }


def _opt_str(p: Path | None) -> str | None:
    return None if p is None else str(p)


def _source_dict(s: SourceConfig) -> dict[str, Any]:
    d: dict[str, Any] = {"kind": s.kind, "path": str(s.path), "name": s.name}
    if s.kind == "capture":
        d["prog_grace"] = format_duration(s.prog_grace)
    elif s.kind == "jsonl":
        d |= {
            "component_type": s.component_type,
            "component_name": s.component_name,
            "method": s.method,
        }
    elif s.kind == "files":
        d |= {
            "patterns": list(s.patterns),
            "settle": format_duration(s.settle),
            "delete_after_upload": s.delete_after_upload,
        }
    d |= {"tags": list(s.tags), "dataset_ids": list(s.dataset_ids)}
    return d


# --------------------------------------------------------------------------- key tables

TOP_KEYS = ("part_id", "state_dir", "cloud", "sources", "upload", "outbox", "status", "log")
CLOUD_KEYS = ("address", "api_key_id", "api_key_file", "tls", "ca_file")
SOURCE_COMMON_KEYS = ("kind", "path", "name", "tags", "dataset_ids")
SOURCE_KIND_KEYS: Mapping[str, tuple[str, ...]] = {
    "capture": ("prog_grace",),
    "jsonl": ("component_type", "component_name", "method"),
    "files": ("patterns", "settle", "delete_after_upload"),
}
SOURCE_KEYS = SOURCE_COMMON_KEYS + tuple(k for ks in SOURCE_KIND_KEYS.values() for k in ks)
UPLOAD_KEYS = (
    "workers",
    "batch_max_readings",
    "batch_max_bytes",
    "chunk_size",
    "backoff",
    "call_timeout",
    "lease",
    "max_attempts",
)
BACKOFF_KEYS = ("initial", "max")
OUTBOX_KEYS = ("max_bytes", "on_full", "min_free_disk", "synchronous")
STATUS_KEYS = ("socket", "metrics_listen")
LOG_KEYS = ("level", "format")

# Where a misplaced top-level key belongs, for the hint.
_SECTION_OF = {
    key: section
    for section, keys in (
        ("cloud", CLOUD_KEYS),
        ("upload", UPLOAD_KEYS),
        ("outbox", OUTBOX_KEYS),
        ("status", STATUS_KEYS),
        ("log", LOG_KEYS),
    )
    for key in keys
}
_SECRET_KEYS = ("api_key", "api_key_secret", "api_secret")
_SECRET_HINT = (
    "never put the API key itself in the config; name a file (mode 0600) with"
    " cloud.api_key_file, or set EDGED_API_KEY in the environment"
)

_NULL_TAG = "tag:yaml.org,2002:null"
_WORDLIKE_TAGS = ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:int", "tag:yaml.org,2002:float")
_NO_STRINGS: tuple[str, ...] = ()
_ALL_FILES: tuple[str, ...] = ("*",)


# --------------------------------------------------------------------------- loading


class _MarkedLoader(yaml.SafeLoader):
    """SafeLoader used only to compose nodes: nodes carry start marks, so values keep lines."""


def _line(node: Node) -> int:
    return int(node.start_mark.line) + 1


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _describe(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean {'true' if value else 'false'}"
    if isinstance(value, int):
        return f"integer {value}"
    if isinstance(value, float):
        return f"number {value!r}"
    if isinstance(value, str):
        return f"string {value!r}"
    return f"{type(value).__name__} {value!s}"


class _Bad:
    """Marker for a value that was reported as a problem; callers fall back to the default."""


_BAD = _Bad()


class _Reader:
    """Schema-driven walk over YAML nodes, collecting problems instead of raising."""

    def __init__(self, loader: _MarkedLoader, source: str, base_dir: Path) -> None:
        self.loader = loader
        self.source = source
        self.base_dir = base_dir
        self.problems: list[tuple[int, str]] = []
        self.own_keys: dict[int, set[int]] = {}
        self.lines: dict[str, int] = {}  # key path -> line of its value

    def problem(self, line: int, path: str, message: str) -> None:
        where = f"{path}: " if path else ""
        self.problems.append((line, f"{self.source}:{line}: {where}{message}"))

    # ---- scalars

    def scalar(self, node: Node, path: str) -> object:
        """The Python value of a scalar node, or _BAD (reported) for a mapping or list."""
        if isinstance(node, MappingNode):
            self.problem(_line(node), path, "expected a single value, got a mapping")
            return _BAD
        if isinstance(node, SequenceNode):
            self.problem(_line(node), path, "expected a single value, got a list")
            return _BAD
        try:
            value: object = self.loader.construct_object(node, deep=True)
        except yaml.YAMLError as exc:
            self.problem(_line(node), path, f"cannot read value: {exc}")
            return _BAD
        return value

    def string(self, node: Node, path: str, *, allow_empty: bool = False) -> str | _Bad:
        value = self.scalar(node, path)
        if isinstance(value, _Bad):
            return value
        if not isinstance(value, str):
            raw = node.value if isinstance(node, ScalarNode) else ""
            hint = f' (quote it: "{raw}")' if raw and value is not None else ""
            self.problem(_line(node), path, f"expected a string, got {_describe(value)}{hint}")
            return _BAD
        if not allow_empty and not value.strip():
            self.problem(_line(node), path, "must not be empty")
            return _BAD
        return value

    def boolean(self, node: Node, path: str) -> bool | _Bad:
        value = self.scalar(node, path)
        if isinstance(value, _Bad):
            return value
        if not isinstance(value, bool):
            self.problem(_line(node), path, f"expected true or false, got {_describe(value)}")
            return _BAD
        return value

    def integer(self, node: Node, path: str, lo: int, hi: int | None = None) -> int | _Bad:
        value = self.scalar(node, path)
        if isinstance(value, _Bad):
            return value
        if isinstance(value, bool) or not isinstance(value, int):
            self.problem(_line(node), path, f"expected an integer, got {_describe(value)}")
            return _BAD
        if value < lo or (hi is not None and value > hi):
            limit = f"between {lo} and {hi}" if hi is not None else f"at least {lo}"
            self.problem(_line(node), path, f"must be {limit}, got {value}")
            return _BAD
        return value

    def size(self, node: Node, path: str, lo: int, hi: int | None = None) -> int | _Bad:
        value = self.scalar(node, path)
        if isinstance(value, _Bad):
            return value
        try:
            n = parse_size(value)  # type: ignore[arg-type]  # parse_size rejects other types
        except ValueError as exc:
            self.problem(_line(node), path, str(exc))
            return _BAD
        if n < lo or (hi is not None and n > hi):
            limit = (
                f"between {format_size(lo)} and {format_size(hi)}"
                if hi is not None
                else f"at least {format_size(lo)}"
            )
            self.problem(_line(node), path, f"must be {limit}, got {format_size(n)}")
            return _BAD
        return n

    def duration(self, node: Node, path: str, *, positive: bool = False) -> float | _Bad:
        value = self.scalar(node, path)
        if isinstance(value, _Bad):
            return value
        try:
            seconds = parse_duration(value)  # type: ignore[arg-type]  # rejects other types
        except ValueError as exc:
            self.problem(_line(node), path, str(exc))
            return _BAD
        if positive and seconds <= 0:
            self.problem(_line(node), path, f"must be longer than 0s, got {value!r}")
            return _BAD
        return seconds

    def choice(self, node: Node, path: str, choices: Collection[str]) -> str | _Bad:
        value: object
        if isinstance(node, ScalarNode) and node.style is None and node.tag in _WORDLIKE_TAGS:
            # Plain text as written: `synchronous: OFF` is YAML's false, but the user meant
            # the word and should hear which words are allowed.
            value = node.value
        else:
            value = self.string(node, path)
            if isinstance(value, _Bad):
                return value
        assert isinstance(value, str)
        by_lower = {c.lower(): c for c in choices}
        if value.strip().lower() in by_lower:
            return by_lower[value.strip().lower()]
        self.problem(
            _line(node),
            path,
            f"{value!r} is not one of {', '.join(choices)}{_hint(value, choices)}",
        )
        return _BAD

    def path(self, node: Node, path: str) -> Path | _Bad:
        value = self.string(node, path)
        if isinstance(value, _Bad):
            return value
        if "\0" in value:
            self.problem(_line(node), path, "paths cannot contain NUL characters")
            return _BAD
        if value.startswith("~"):
            self.problem(_line(node), path, f"{value!r}: '~' is not expanded; use a full path")
            return _BAD
        return self.resolve(Path(value))

    def resolve(self, p: Path) -> Path:
        """Relative paths are relative to the config file, not to wherever edged started."""
        return Path(os.path.normpath(self.base_dir / p))

    def strings(self, node: Node, path: str) -> tuple[str, ...] | _Bad:
        if not isinstance(node, SequenceNode):
            got = (
                "a mapping" if isinstance(node, MappingNode) else _describe(self.scalar(node, path))
            )
            self.problem(
                _line(node), path, f'expected a list of strings (e.g. ["a", "b"]), got {got}'
            )
            return _BAD
        out: list[str] = []
        ok = True
        for i, item in enumerate(node.value):
            s = self.string(item, f"{path}[{i}]")
            if isinstance(s, _Bad):
                ok = False
            else:
                out.append(s)
        return tuple(out) if ok else _BAD

    # ---- mappings

    def mapping(self, node: Node, path: str) -> _Map | None:
        if not isinstance(node, MappingNode):
            got = "a list" if isinstance(node, SequenceNode) else _describe(self.scalar(node, path))
            self.problem(_line(node), path, f"expected a mapping of keys, got {got}")
            return None
        # Flattening resolves `<<: *anchor` merges in place (merged pairs first, so the
        # mapping's own keys win); remember the own keys first, as an aliased node may be
        # visited again already flattened.
        own = self.own_keys.setdefault(id(node), {id(k) for k, _ in node.value})
        try:
            self.loader.flatten_mapping(node)
        except yaml.YAMLError as exc:
            self.problem(_line(node), path, f"cannot merge: {exc}")
            return None
        return _Map(self, node, path, own)


def _hint(word: str, allowed: Collection[str]) -> str:
    by_lower = {a.lower(): a for a in allowed}
    close = difflib.get_close_matches(word.lower(), list(by_lower), n=1, cutoff=0.6)
    return f" (did you mean {by_lower[close[0]]!r}?)" if close else ""


class _Map:
    """One YAML mapping: its keys with their nodes, read once against a key table."""

    def __init__(self, reader: _Reader, node: MappingNode, path: str, own: set[int]) -> None:
        self.r = reader
        self.node = node
        self.path = path
        self.line = _line(node)
        self.entries: dict[str, tuple[Node, Node]] = {}
        written_here: set[str] = set()
        for key_node, value_node in node.value:
            key = reader.scalar(key_node, path)
            if isinstance(key, _Bad):
                continue
            if not isinstance(key, str):
                reader.problem(_line(key_node), path, f"keys must be strings, got {_describe(key)}")
                continue
            if id(key_node) not in own:  # merged in from an anchor: overridable
                self.entries[key] = (key_node, value_node)
                continue
            if key in written_here:
                first = _line(self.entries[key][0])
                reader.problem(
                    _line(key_node), _join(path, key), f"duplicate key (first set on line {first})"
                )
                continue
            written_here.add(key)
            self.entries[key] = (key_node, value_node)

    def check_keys(
        self,
        allowed: Collection[str],
        elsewhere: Mapping[str, str] | None = None,
        ignore: Collection[str] = (),
    ) -> None:
        """Report keys outside `allowed`, with a did-you-mean or where the key belongs."""
        for key, (key_node, _) in self.entries.items():
            if key in allowed or key in ignore:
                continue
            where = _join(self.path, key)
            if key in _SECRET_KEYS:
                self.r.problem(_line(key_node), where, _SECRET_HINT)
                continue
            hint = _hint(key, allowed)
            if not hint and elsewhere and key in elsewhere:
                hint = f" (it belongs under {elsewhere[key]!r})"
            if not hint:
                hint = f" (allowed: {', '.join(allowed)})"
            self.r.problem(_line(key_node), where, f"unknown key {key!r}{hint}")

    def get(self, key: str) -> Node | None:
        """The value node, or None when absent or null (null means "use the default")."""
        entry = self.entries.get(key)
        if entry is None:
            return None
        node = entry[1]
        if isinstance(node, ScalarNode) and node.tag == _NULL_TAG:
            return None
        self.r.lines.setdefault(_join(self.path, key), _line(node))
        return node

    def key_line(self, key: str) -> int:
        entry = self.entries.get(key)
        return _line(entry[0]) if entry else self.line

    def read(self, key: str, conv: Callable[[Node, str], T | _Bad], default: T) -> T:
        node = self.get(key)
        if node is None:
            return default
        value = conv(node, _join(self.path, key))
        return default if isinstance(value, _Bad) else value

    def require(self, key: str, conv: Callable[[Node, str], T | _Bad], what: str) -> T | None:
        node = self.get(key)
        if node is None:
            self.r.problem(self.key_line(key), _join(self.path, key), f"is required ({what})")
            return None
        value = conv(node, _join(self.path, key))
        return None if isinstance(value, _Bad) else value

    def section(self, key: str) -> _Map | None:
        node = self.get(key)
        return None if node is None else self.r.mapping(node, _join(self.path, key))


def _empty_map(reader: _Reader, path: str) -> _Map:
    node = MappingNode("tag:yaml.org,2002:map", [])
    node.start_mark = yaml.Mark(reader.source, 0, 0, 0, None, 0)
    return _Map(reader, node, path, set())


def _read_cloud(r: _Reader, m: _Map | None) -> CloudConfig:
    if m is None:
        return CloudConfig()
    m.check_keys(CLOUD_KEYS)
    address = m.read("address", r.string, "embedded").strip()
    if address != "embedded" and (err := _address_problem(address)):
        r.problem(m.key_line("address"), "cloud.address", err)
    key_id = m.read("api_key_id", r.string, None)
    key_file = m.read("api_key_file", r.path, None)
    tls = m.read("tls", r.boolean, None)
    ca_file = m.read("ca_file", r.path, None)
    if key_file is not None and key_id is None and m.get("api_key_id") is None:
        r.problem(
            m.key_line("api_key_file"),
            "cloud.api_key_file",
            "needs cloud.api_key_id (the id the key file's key belongs to)",
        )
    if ca_file is not None and tls is False:
        r.problem(m.key_line("ca_file"), "cloud.ca_file", "is set but cloud.tls is false")
    return CloudConfig(address, key_id, key_file, tls, ca_file)


def split_listen(text: str) -> tuple[str, int] | None:
    """HOST:PORT to listen on (port 0 picks one) as (host, port), or None if it is not."""
    host, _, port = text.rpartition(":")
    host = host.strip("[]")
    if not host or any(c.isspace() for c in host) or not port.isdigit() or int(port) > 65535:
        return None
    return host, int(port)


def _address_problem(address: str) -> str | None:
    example = "(e.g. sync.example.com:443, or 'embedded')"
    if "://" in address:
        return f"{address!r}: drop the scheme and give host:port {example}; cloud.tls sets TLS"
    host, sep, port = address.rpartition(":")
    if host.startswith("["):
        host_ok = host.endswith("]") and len(host) > 2
    else:
        host_ok = bool(host) and ":" not in host
    if (
        not sep
        or not host_ok
        or any(c.isspace() or c == "/" for c in host)
        or not port.isdigit()
        or not 0 < int(port) < 65536
    ):
        return f"{address!r} is not host:port {example}"
    return None


def _read_source(r: _Reader, node: Node, index: int) -> SourceConfig | None:
    path = f"sources[{index}]"
    m = r.mapping(node, path)
    if m is None:
        return None
    kind = m.require("kind", lambda n, p: r.choice(n, p, SOURCE_KINDS), "capture, jsonl or files")
    own = SOURCE_COMMON_KEYS + SOURCE_KIND_KEYS[kind] if kind else SOURCE_KEYS
    wrong = {k: key_node for k, (key_node, _) in m.entries.items() if k in SOURCE_KEYS}
    wrong = {k: n for k, n in wrong.items() if k not in own}
    for key, key_node in wrong.items():
        owners = [k for k, ks in SOURCE_KIND_KEYS.items() if key in ks]
        r.problem(
            _line(key_node),
            _join(path, key),
            f"applies only to kind {' or '.join(owners)}; this source is kind {kind}",
        )
    m.check_keys(own, ignore=wrong)
    where = m.require("path", r.path, "the directory or file to watch")
    tags = m.read("tags", r.strings, _NO_STRINGS)
    dataset_ids = m.read("dataset_ids", r.strings, _NO_STRINGS)
    name = m.read("name", r.string, "")
    if kind is None or where is None:
        return None
    src = SourceConfig(
        kind=kind,
        path=where,
        tags=tags,
        dataset_ids=dataset_ids,
        name=name or f"{kind}:{where}",
        prog_grace=m.read("prog_grace", r.duration, 60.0) if kind == "capture" else 60.0,
    )
    if kind == "jsonl":
        component_name = m.require("component_name", r.string, "the component's name, e.g. imu")
        src = replace(
            src,
            component_type=m.read("component_type", r.string, "rdk:component:sensor"),
            component_name=component_name or "",
            method=m.read("method", r.string, "Readings"),
        )
    elif kind == "files":
        patterns = m.read("patterns", r.strings, _ALL_FILES)
        if not patterns:
            r.problem(m.key_line("patterns"), _join(path, "patterns"), "needs at least one pattern")
        src = replace(
            src,
            patterns=patterns or ("*",),
            settle=m.read("settle", r.duration, 10.0),
            delete_after_upload=m.read("delete_after_upload", r.boolean, True),
        )
    return src


def _read_sources(r: _Reader, top: _Map) -> tuple[SourceConfig, ...]:
    node = top.get("sources")
    if node is None:
        return ()
    if not isinstance(node, SequenceNode):
        got = "a mapping" if isinstance(node, MappingNode) else _describe(r.scalar(node, "sources"))
        r.problem(_line(node), "sources", f"expected a list of sources (- kind: ...), got {got}")
        return ()
    sources: list[SourceConfig] = []
    names: dict[str, int] = {}
    for i, item in enumerate(node.value):
        src = _read_source(r, item, i)
        if src is None:
            continue
        if src.name in names:
            r.problem(
                _line(item),
                f"sources[{i}]",
                f"has the same name {src.name!r} as sources[{names[src.name]}];"
                " give each source a distinct name (or path)",
            )
        names.setdefault(src.name, i)
        for j, other in enumerate(sources):
            # Same kind only: a capture and a files source may share a directory (the
            # files source leaves .capture/.prog files to the capture source).
            same_kind = src.kind == other.kind != "jsonl" and src.name != other.name
            if same_kind and _nested(src.path, other.path):
                r.problem(
                    _line(item),
                    f"sources[{i}].path",
                    f"{src.path} overlaps sources[{j}].path {other.path}; two directory"
                    " sources over the same files would upload them twice",
                )
        sources.append(src)
    return tuple(sources)


def _nested(a: Path, b: Path) -> bool:
    """One directory is the other or lies inside it (paths are resolved already)."""
    return a == b or a.is_relative_to(b) or b.is_relative_to(a)


def _read_upload(r: _Reader, m: _Map | None) -> UploadConfig:
    if m is None:
        return UploadConfig()
    m.check_keys(UPLOAD_KEYS)
    d = UploadConfig()
    backoff = d.backoff
    b = m.section("backoff")
    if b is not None:
        b.check_keys(BACKOFF_KEYS)
        initial = b.read("initial", lambda n, p: r.duration(n, p, positive=True), backoff.initial)
        maximum = b.read("max", lambda n, p: r.duration(n, p, positive=True), backoff.max)
        if maximum < initial:
            r.problem(
                b.key_line("max"),
                "upload.backoff.max",
                f"({format_duration(maximum)}) must not be shorter than"
                f" upload.backoff.initial ({format_duration(initial)})",
            )
        backoff = BackoffConfig(initial, maximum)
    call_timeout = m.read("call_timeout", lambda n, p: r.duration(n, p, positive=True), 60.0)
    lease = m.read("lease", lambda n, p: r.duration(n, p, positive=True), 300.0)
    if lease < call_timeout:
        r.problem(
            m.key_line("lease"),
            "upload.lease",
            f"({format_duration(lease)}) must not be shorter than upload.call_timeout"
            f" ({format_duration(call_timeout)}), or a slow call loses its lease mid-flight",
        )
    return UploadConfig(
        workers=m.read("workers", lambda n, p: r.integer(n, p, 1, 64), d.workers),
        batch_max_readings=m.read(
            "batch_max_readings", lambda n, p: r.integer(n, p, 1), d.batch_max_readings
        ),
        batch_max_bytes=m.read(
            "batch_max_bytes", lambda n, p: r.size(n, p, 1, MAX_MESSAGE), d.batch_max_bytes
        ),
        chunk_size=m.read("chunk_size", lambda n, p: r.size(n, p, 1, MAX_CHUNK), d.chunk_size),
        backoff=backoff,
        call_timeout=call_timeout,
        lease=lease,
        max_attempts=m.read("max_attempts", lambda n, p: r.integer(n, p, 1, 1000), d.max_attempts),
    )


def _read_outbox(r: _Reader, m: _Map | None) -> OutboxConfig:
    if m is None:
        return OutboxConfig()
    m.check_keys(OUTBOX_KEYS)
    d = OutboxConfig()
    return OutboxConfig(
        max_bytes=m.read("max_bytes", lambda n, p: r.size(n, p, MIB), d.max_bytes),
        on_full=m.read("on_full", lambda n, p: r.choice(n, p, ON_FULL), d.on_full),
        min_free_disk=m.read("min_free_disk", lambda n, p: r.size(n, p, 0), d.min_free_disk),
        synchronous=m.read("synchronous", lambda n, p: r.choice(n, p, SYNCHRONOUS), d.synchronous),
    )


def _read_log(r: _Reader, m: _Map | None) -> LogConfig:
    if m is None:
        return LogConfig()
    m.check_keys(LOG_KEYS)
    d = LogConfig()
    return LogConfig(
        level=m.read("level", lambda n, p: r.choice(n, p, LOG_LEVELS), d.level),
        format=m.read("format", lambda n, p: r.choice(n, p, LOG_FORMATS), d.format),
    )


def _read_config(r: _Reader, top: _Map) -> Config | None:
    top.check_keys(TOP_KEYS, _SECTION_OF)
    part_id = top.require("part_id", r.string, "the robot part this data belongs to")
    if part_id is not None and part_id != part_id.strip():
        r.problem(top.key_line("part_id"), "part_id", f"{part_id!r} has surrounding spaces")
    state_dir = top.require("state_dir", r.path, "where the outbox and spool live")
    cloud = _read_cloud(r, top.section("cloud"))
    sources = _read_sources(r, top)
    upload = _read_upload(r, top.section("upload"))
    outbox = _read_outbox(r, top.section("outbox"))
    log = _read_log(r, top.section("log"))
    status_map = top.section("status")
    socket: Path | None = None
    metrics_listen: str | None = None
    if status_map is not None:
        status_map.check_keys(STATUS_KEYS)
        socket = status_map.read("socket", r.path, None)
        metrics_listen = status_map.read("metrics_listen", r.string, None)
        if metrics_listen is not None and split_listen(metrics_listen) is None:
            r.problem(
                status_map.key_line("metrics_listen"),
                "status.metrics_listen",
                f"{metrics_listen!r} is not HOST:PORT (e.g. 127.0.0.1:9464; port 0 picks one)",
            )
    if socket is None and state_dir is not None:
        socket = state_dir / "edged.sock"
    if socket is not None and len(os.fsencode(socket)) > MAX_SOCKET_PATH:
        line = status_map.key_line("socket") if status_map else top.key_line("state_dir")
        r.problem(
            line,
            "status.socket",
            f"{str(socket)!r} is longer than {MAX_SOCKET_PATH} bytes, the limit for a"
            " Unix socket path; set status.socket to a shorter path",
        )
    if part_id is None or state_dir is None or socket is None:
        return None
    return Config(
        part_id=part_id,
        state_dir=state_dir,
        cloud=cloud,
        sources=sources,
        upload=upload,
        outbox=outbox,
        status=StatusConfig(socket, metrics_listen),
        log=log,
        lines=r.lines,
    )


def _raise(problems: list[tuple[int, str]]) -> None:
    if problems:
        raise ConfigErrors([msg for _, msg in sorted(problems, key=lambda p: p[0])])


def parse_config(text: str, source: str = "<config>", *, base_dir: Path | None = None) -> Config:
    """Parse config text; `source` names the file in messages, `base_dir` anchors relative paths.

    `base_dir` defaults to the directory of `source`. Raises ConfigErrors listing every
    problem at once.
    """
    base = base_dir if base_dir is not None else Path(source).parent
    loader = _MarkedLoader(text)
    reader = _Reader(loader, source, base)
    try:
        try:
            root = loader.get_single_node()
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            line = int(mark.line) + 1 if mark is not None else 1
            what = " ".join(s for s in (exc.context, exc.problem) if s)
            reader.problem(line, "", f"invalid YAML: {what}")
            _raise(reader.problems)
            raise AssertionError("unreachable") from exc  # pragma: no cover
        except yaml.YAMLError as exc:
            reader.problem(1, "", f"invalid YAML: {exc}")
            _raise(reader.problems)
            raise AssertionError("unreachable") from exc  # pragma: no cover
        if root is None:
            top = _empty_map(reader, "")
        else:
            top = reader.mapping(root, "") or _empty_map(reader, "")
        config = _read_config(reader, top)
    finally:
        loader.dispose()
    _raise(reader.problems)
    assert config is not None  # every path that yields None reports a problem first
    return config


def load_config(path: Path) -> Config:
    """Read and parse `path`; relative paths inside resolve against its directory."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigErrors([f"{path}: cannot read config: {reason}"]) from exc
    config = parse_config(text, str(path), base_dir=path.absolute().parent)
    return replace(config, source_file=path.absolute())


# --------------------------------------------------------------------------- this machine


def check_host(config: Config) -> list[str]:
    """What `edged run` would find wrong on this machine that the file alone cannot show:
    an API key it cannot read (run exits 2), and a source directory that does not exist
    (run waits for it, uploading nothing). Same `file:line: key: message` shape as parse
    problems, in line order; `edged check-config` reports them."""
    where = str(config.source_file) if config.source_file else "<config>"
    problems: list[tuple[int, str]] = []

    def problem(key: str, message: str) -> None:
        line = config.lines.get(key, 1)
        problems.append((line, f"{where}:{line}: {key}: {message}"))

    cloud = config.cloud
    if not cloud.embedded:
        try:
            api_key(cloud.api_key_id, cloud.api_key_file)
        except ConfigError as exc:
            problem("cloud.api_key_file" if cloud.api_key_file else "cloud.api_key_id", str(exc))
    for i, src in enumerate(config.sources):
        if err := _source_dir_problem(src):
            problem(f"sources[{i}].path", err)
    return [message for _, message in sorted(problems, key=lambda p: p[0])]


def source_dir(src: SourceConfig) -> Path:
    """The directory a source watches: its path, or a jsonl file's (or glob's) parent."""
    return src.path.parent if src.kind == "jsonl" else src.path


def _source_dir_problem(src: SourceConfig) -> str | None:
    d = source_dir(src)
    if not d.exists():
        return f"{d} does not exist; edged would upload nothing from it until it appears"
    if not d.is_dir():
        return f"{d} is not a directory"
    if not os.access(d, os.R_OK | os.X_OK):
        return f"{d} cannot be listed by this user"
    return None
