"""The daemon's config file -> frozen dataclasses, each key declared once.

Every key is one field declaration (`edged.options.option`: kind and unit, default,
check, one-line help); reading with every problem named by key path, file and line,
`to_dict`, and the README's key reference are derived from the declarations. Each
source kind declares its own keys in its module (`sources/capture.py`, ...) and
registers there (`sources.base.register`); this module knows no kind by name. The
`cloud` section is declared in `edged.wire.cloud`, where the SDK reads it too.

To add a key: add one field `name: type = option(default, Kind(...), "help")` to the
dataclass of its section (a key every source has: `SourceConfig`; one kind's key: that
kind's config class), a rule over several keys to the section's `problems()`; then
paste `key_table()` into the README and add the key to config/edged.example.yaml
(tests/test_config.py checks both).
"""

from __future__ import annotations

import os
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

from yaml.nodes import MappingNode, Node, SequenceNode

from edged.daemon.schedule import window_problem
from edged.errors import ConfigError
from edged.options import (
    BAD,
    GIB,
    KIB,
    MIB,
    TIB,
    Bad,
    Choice,
    Duration,
    FilePath,
    Int,
    Map,
    Rate,
    Reader,
    Section,
    Size,
    Strings,
    Text,
    build,
    declared,
    derived,
    describe,
    dump,
    format_duration,
    format_size,
    join,
    keys,
    line_of,
    option,
    parse_document,
    parse_duration,
    parse_size,
    read_fields,
    read_text,
    reference,
    required,
    section,
)
from edged.wire.cloud import CloudConfig
from edged.wire.keyfile import api_key

__all__ = [
    "GIB",
    "KIB",
    "MIB",
    "TIB",
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
    "key_reference",
    "key_table",
    "load_config",
    "parse_config",
    "parse_duration",
    "parse_size",
    "split_listen",
]

# gRPC's default message cap is 4 MiB; edged never sends more, leaving 1 KiB for framing.
MAX_MESSAGE = 4 * MIB
MAX_CHUNK = MAX_MESSAGE - KIB
# sun_path is 108 bytes on Linux, one of them the terminating NUL.
MAX_SOCKET_PATH = 107

ON_FULL = ("backpressure", "drop_oldest")
SYNCHRONOUS = ("FULL", "NORMAL")
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")


def absolute_path(text: str) -> Path:
    """A command-line path anchored to the working directory at start-up.

    Resolved once, here: later users (SQLite URIs, blob paths, re-reads of key or TLS
    files) then never depend on the process's current directory."""
    if not text:
        raise ValueError("a path cannot be empty")
    if "\0" in text:
        raise ValueError(f"{text!r}: paths cannot contain NUL characters")
    return Path(os.path.abspath(text))


# --------------------------------------------------------------------------- sources


@dataclass(frozen=True)
class ConditionConfig:
    """Upload only while this holds (both, when both are given): a command exits 0
    (run without a shell, with a timeout; a failure or hang means no), or a file exists."""

    command: tuple[str, ...] = option(
        (), Strings(), "upload only while this command (argv, no shell) exits 0; [] for none"
    )
    every: float = option(30.0, Duration(positive=True), "how often the command is run")
    timeout: float = option(
        10.0, Duration(positive=True), "a command running longer counts as failed (killed)"
    )
    file: Path | None = option(
        None, FilePath(), "upload only while this file exists (e.g. written when on Wi-Fi)"
    )


@dataclass(frozen=True, kw_only=True)
class SourceConfig:
    """The keys every source kind accepts. Each kind subclasses it with its own keys,
    sets `kind`, and registers the class with its factory (`sources.base.register`)."""

    kind: ClassVar[str] = ""
    one_per_tree: ClassVar[bool] = True
    """Two sources of this kind over nested directories would upload the same files twice."""

    path: Path = required(
        FilePath(),
        "the directory to watch (jsonl: the file, or a glob of files)",
        "the directory or file to watch",
    )
    name: str = option(
        "", Text(), "label in status and logs; unique in the file", shown="<kind>:<path>"
    )
    tags: tuple[str, ...] = option((), Strings(), "tags added to everything this source uploads")
    dataset_ids: tuple[str, ...] = option(
        (), Strings(), "datasets everything from this source is added to"
    )
    priority: int = option(
        0,
        Int(-100, 100),
        "higher goes first when the uplink cannot carry everything (aged by"
        " outbox.priority_aging, so lower ones are delayed, never starved)",
    )
    max_age: float | None = option(
        None,
        Duration(positive=True),
        "data waiting longer is dropped (counted and logged), not uploaded; none: kept",
    )
    windows: tuple[str, ...] = option(
        (),
        Strings(),
        "upload only inside these local times of day, e.g. 22:00-06:00; []: always",
        check=window_problem,
    )
    condition: ConditionConfig = section(ConditionConfig, "upload only while this holds")

    def watched_dir(self) -> Path:
        """The directory this source watches (must exist for it to upload anything)."""
        return self.path


def source_kinds() -> Mapping[str, type[SourceConfig]]:
    """Every registered source kind -> its config class, in registration order."""
    # Importing the package imports every kind's module, whose last lines register it;
    # lazily, as those modules import this one.
    from edged.daemon.sources.base import KINDS

    return {kind: k.config for kind, k in KINDS.items()}


def _either(words: Collection[str]) -> str:
    *most, last = words
    return f"{', '.join(most)} or {last}" if most else last


def _nested(a: Path, b: Path) -> bool:
    """One directory is the other or lies inside it (paths are resolved already)."""
    return a == b or a.is_relative_to(b) or b.is_relative_to(a)


@dataclass(frozen=True)
class SourceList:
    """The `sources` list: each item's `kind` picks the config class its keys belong to."""

    def read(self, r: Reader, node: Node, path: str) -> tuple[SourceConfig, ...] | Bad:
        if not isinstance(node, SequenceNode):
            got = "a mapping" if isinstance(node, MappingNode) else describe(r.scalar(node, path))
            r.problem(line_of(node), path, f"expected a list of sources (- kind: ...), got {got}")
            return BAD
        sources: list[SourceConfig] = []
        names: dict[str, int] = {}
        for i, item in enumerate(node.value):
            src = _read_source(r, item, f"{path}[{i}]")
            if src is None:
                continue
            if src.name in names:
                r.problem(
                    line_of(item),
                    f"{path}[{i}]",
                    f"has the same name {src.name!r} as {path}[{names[src.name]}];"
                    " give each source a distinct name (or path)",
                )
            names.setdefault(src.name, i)
            for j, other in enumerate(sources):
                if _overlap(src, other):
                    r.problem(
                        line_of(item),
                        f"{path}[{i}].path",
                        f"{src.path} overlaps {path}[{j}].path {other.path}; two directory"
                        " sources over the same files would upload them twice",
                    )
            sources.append(src)
        return tuple(sources)

    def dump(self, value: tuple[SourceConfig, ...]) -> Any:
        return [{"kind": s.kind, **dump(s)} for s in value]

    def show(self, value: Any) -> str:
        return "[]"

    def reference(self, path: str) -> Iterator[tuple[str, str, str]]:
        kinds = source_kinds()
        yield f"{path}[].kind", "required", f"what to watch: {_either(list(kinds))}"
        yield from reference(SourceConfig, f"{path}[]")
        common = set(keys(SourceConfig))
        for kind, cls in kinds.items():
            for key, shown, help in reference(cls, f"{path}[]"):
                if key.removeprefix(f"{path}[].").split(".", 1)[0] not in common:
                    yield key, shown, f"{kind} only: {help}"


def _overlap(a: SourceConfig, b: SourceConfig) -> bool:
    """Same kind only: a capture and a files source may share a directory (the files
    source leaves .capture/.prog files to the capture source)."""
    same = type(a) is type(b) and a.one_per_tree and a.name != b.name
    return same and _nested(a.path, b.path)


def _read_source(r: Reader, node: Node, path: str) -> SourceConfig | None:
    m = r.mapping(node, path)
    if m is None:
        return None
    kinds = source_kinds()
    kind: str | None = None
    kind_node = m.get("kind")
    if kind_node is None:
        r.problem(m.key_line("kind"), join(path, "kind"), f"is required ({_either(list(kinds))})")
    elif not isinstance(value := r.choice(kind_node, join(path, "kind"), tuple(kinds)), Bad):
        kind = value
    cls = kinds[kind] if kind is not None else SourceConfig
    every = tuple(dict.fromkeys(k for c in kinds.values() for k in keys(c)))
    own = ("kind", *keys(cls)) if kind is not None else ("kind", *keys(SourceConfig), *every)
    wrong = {k: n for k, (n, _) in m.entries.items() if k in every and k not in own}
    for key, key_node in wrong.items():
        owners = [k for k, c in kinds.items() if key in keys(c)]
        r.problem(
            line_of(key_node),
            join(path, key),
            f"applies only to kind {' or '.join(owners)}; this source is kind {kind}",
        )
    m.check_keys(own, ignore=wrong)
    if kind is None:
        read_fields(r, m, SourceConfig)  # for their problems
        return None
    src = build(r, m, cls)
    if src is not None and not src.name:
        src = replace(src, name=f"{kind}:{src.path}")
    return src


# --------------------------------------------------------------------------- sections


@dataclass(frozen=True)
class BackoffConfig:
    """Exponential backoff bounds (seconds); the jitter itself lives in policy.py."""

    initial: float = option(
        0.2, Duration(positive=True), "first retry delay; delays grow exponentially, with jitter"
    )
    max: float = option(
        300.0, Duration(positive=True), "longest retry delay (and probe interval when offline)"
    )

    def problems(self, given: Collection[str]) -> Iterator[tuple[str, str]]:
        if self.max < self.initial:
            yield (
                "max",
                f"({format_duration(self.max)}) must not be shorter than"
                f" upload.backoff.initial ({format_duration(self.initial)})",
            )


@dataclass(frozen=True)
class UploadConfig:
    """How the uploader batches, chunks and paces calls."""

    workers: int = option(4, Int(1, 64), "concurrent upload workers")
    batch_max_readings: int = option(1000, Int(1), "most readings in one tabular upload call")
    batch_max_bytes: int = option(
        MIB, Size(1, MAX_MESSAGE), "largest encoded batch in one call (gRPC limit: 4MiB)"
    )
    chunk_size: int = option(
        64 * KIB, Size(1, MAX_CHUNK), "piece size of streamed binaries and files"
    )
    backoff: BackoffConfig = section(BackoffConfig, "retry delays")
    call_timeout: float = option(
        60.0,
        Duration(positive=True),
        "deadline of a unary call; a stream fails only after this long without progress",
    )
    lease: float = option(
        300.0,
        Duration(positive=True),
        "how long a worker owns an item (renewed while its call runs); >= call_timeout",
    )
    max_attempts: int = option(
        5, Int(1, 1000), "attempts before an item the server keeps failing is dead-lettered"
    )
    max_bandwidth: int = option(
        0,
        Rate(),
        "cap on upload bytes per second, shared by all workers (e.g. 2MiB/s); 0: unlimited;"
        " `edged limit` overrides it until a reload",
    )

    def problems(self, given: Collection[str]) -> Iterator[tuple[str, str]]:
        if self.lease < self.call_timeout:
            yield (
                "lease",
                f"({format_duration(self.lease)}) must not be shorter than upload.call_timeout"
                f" ({format_duration(self.call_timeout)}), or a slow call loses its lease"
                " mid-flight",
            )


@dataclass(frozen=True)
class OutboxConfig:
    """Outbox limits and durability; `synchronous` is SQLite's PRAGMA of that name."""

    max_bytes: int = option(2 * GIB, Size(MIB), "cap on data waiting in the outbox")
    on_full: str = option(
        "backpressure",
        Choice(ON_FULL),
        "at the cap or below min_free_disk: sources leave data on disk, or the oldest"
        " items are dropped and counted",
    )
    min_free_disk: int = option(
        512 * MIB, Size(0), "free space kept on the state_dir filesystem (same effect as the cap)"
    )
    synchronous: str = option(
        "FULL", Choice(SYNCHRONOUS), "SQLite durability: FULL survives power loss, NORMAL is faster"
    )
    priority_aging: float = option(
        300.0,
        Duration(),
        "an item's priority grows by one per this much waiting (0: no aging)",
    )


def split_listen(text: str) -> tuple[str, int] | None:
    """HOST:PORT to listen on (port 0 picks one) as (host, port), or None if it is not."""
    host, _, port = text.rpartition(":")
    host = host.strip("[]")
    if not host or any(c.isspace() for c in host) or not port.isdigit() or int(port) > 65535:
        return None
    return host, int(port)


def _listen_problem(text: str) -> str | None:
    if split_listen(text) is None:
        return f"{text!r} is not HOST:PORT (e.g. 127.0.0.1:9464; port 0 picks one)"
    return None


@dataclass(frozen=True)
class StatusConfig:
    """The local control socket."""

    socket: Path = derived(
        FilePath(),
        "Unix socket of `edged status`, `sync-now`, ... (at most 107 bytes)",
        "state_dir/edged.sock",
    )
    metrics_listen: str | None = option(
        None,
        Text(),
        "HOST:PORT of Prometheus `/metrics` (port 0 picks one); none: off",
        check=_listen_problem,
    )


@dataclass(frozen=True)
class LogConfig:
    """Log verbosity and shape (`json` for journald/log shippers)."""

    level: str = option("info", Choice(LOG_LEVELS), "log verbosity")
    format: str = option("text", Choice(LOG_FORMATS), "log shape; json: one object a line")


def _no_surrounding_spaces(value: str) -> str | None:
    return f"{value!r} has surrounding spaces" if value != value.strip() else None


@dataclass(frozen=True, kw_only=True)
class Config:
    """The whole resolved config; relative paths are already resolved against the file's dir."""

    part_id: str = required(
        Text(),
        "the robot part this data belongs to (UploadMetadata.part_id)",
        "the robot part this data belongs to",
        check=_no_surrounding_spaces,
    )
    state_dir: Path = required(
        FilePath(),
        "edged's own data: outbox, spool, quarantine; must survive reboots",
        "where the outbox and spool live",
    )
    cloud: CloudConfig = section(CloudConfig, "where to upload")
    sources: tuple[SourceConfig, ...] = option((), SourceList(), "what to watch")
    upload: UploadConfig = section(UploadConfig, "batching and pacing")
    outbox: OutboxConfig = section(OutboxConfig, "outbox limits")
    status: StatusConfig = section(StatusConfig, "control socket", default=False)
    log: LogConfig = section(LogConfig, "logging")
    source_file: Path | None = None
    lines: Mapping[str, int] = field(default_factory=dict, compare=False, repr=False)
    """Line of each key path given in the file (`cloud.api_key_file`, `sources[0].path`)."""

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/YAML-able data in config-file spelling; it parses back to this config.

        `cloud.tls` is the effective value (auto resolved); `source_file` is left out
        because it is not a key.
        """
        data = dump(self)
        data["cloud"]["tls"] = self.cloud.use_tls()
        return data


def key_reference() -> list[tuple[str, str, str]]:
    """(key path, default, help) of every key, in file order."""
    return list(reference(Config))


def key_table() -> list[str]:
    """The README's key table (tests/test_config.py keeps the README equal to it)."""
    rows = ["| key | default | what |", "|---|---|---|"]
    for key, shown, help in key_reference():
        default = shown if shown in ("required", "none") else f"`{shown}`"
        rows.append(f"| `{key}` | {default} | {help} |")
    return rows


# --------------------------------------------------------------------------- loading


def _section_of() -> dict[str, str]:
    """Where a misplaced top-level key belongs, for the hint."""
    return {
        key: f.name
        for f, opt in declared(Config)
        if isinstance(opt.kind, Section)
        for key in keys(opt.kind.cls)
    }


def _read_status(r: Reader, top: Map, state_dir: Path | None) -> StatusConfig | None:
    """`status`, whose socket defaults to state_dir/edged.sock and must fit sun_path."""
    node = top.get("status")
    m = None if node is None else r.mapping(node, "status")
    if m is not None:
        m.check_keys(keys(StatusConfig))
    fill = {} if state_dir is None else {"socket": state_dir / "edged.sock"}
    status = build(r, m or r.empty_map("status"), StatusConfig, fill)
    if status is not None and len(os.fsencode(status.socket)) > MAX_SOCKET_PATH:
        r.problem(
            m.key_line("socket") if m else top.key_line("state_dir"),
            "status.socket",
            f"{str(status.socket)!r} is longer than {MAX_SOCKET_PATH} bytes, the limit for a"
            " Unix socket path; set status.socket to a shorter path",
        )
    return status


def _read_config(r: Reader, top: Map) -> Config | None:
    top.check_keys(keys(Config), _section_of())
    found = read_fields(r, top, Config, skip=("status",))
    status = _read_status(r, top, found.values.get("state_dir"))
    if not found.complete or status is None:
        return None
    return Config(**found.values, status=status, lines=r.lines)


def parse_config(text: str, source: str = "<config>", *, base_dir: Path | None = None) -> Config:
    """Parse config text; `source` names the file in messages, `base_dir` anchors relative paths.

    `base_dir` defaults to the directory of `source`. Raises ConfigErrors listing every
    problem at once.
    """
    base = base_dir if base_dir is not None else Path(source).parent
    return parse_document(text, source, base, _read_config)


def load_config(path: Path) -> Config:
    """Read and parse `path`; relative paths inside resolve against its directory."""
    config = parse_config(read_text(path), str(path), base_dir=path.absolute().parent)
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


def _source_dir_problem(src: SourceConfig) -> str | None:
    d = src.watched_dir()
    if not d.exists():
        return f"{d} does not exist; edged would upload nothing from it until it appears"
    if not d.is_dir():
        return f"{d} is not a directory"
    if not os.access(d, os.R_OK | os.X_OK):
        return f"{d} cannot be listed by this user"
    return None
