"""Config loading: every value, default and problem, each problem naming key, file and line."""

from __future__ import annotations

import json
import math
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from edged.daemon.config import (
    GIB,
    KIB,
    MIB,
    BackoffConfig,
    CloudConfig,
    Config,
    LogConfig,
    OutboxConfig,
    SourceConfig,
    StatusConfig,
    UploadConfig,
    check_host,
    format_duration,
    format_size,
    key_reference,
    key_table,
    load_config,
    parse_config,
    parse_duration,
    parse_size,
)
from edged.daemon.sources.base import KINDS, SourceKind
from edged.daemon.sources.capture import CaptureConfig, CaptureSource
from edged.daemon.sources.files import FilesConfig
from edged.daemon.sources.jsonl import JsonlConfig
from edged.errors import ConfigError, ConfigErrors
from edged.options import (
    Choice,
    Duration,
    Int,
    Map,
    Reader,
    Size,
    build,
    dump,
    keys,
    option,
    parse_document,
    parse_rate,
    reference,
)
from edged.wire.cloud import load_cloud

REPO = Path(__file__).resolve().parents[1]
SOURCE = "conf/edged.yaml"
BASE = Path("/etc/edged")

MINIMAL = """\
part_id: robot-1
state_dir: /var/lib/edged
"""


def parse(text: str) -> Config:
    return parse_config(textwrap.dedent(text), SOURCE, base_dir=BASE)


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigErrors) as info:
        parse(text)
    assert str(info.value) == "\n".join(info.value.problems)
    return info.value.problems


def line_of(text: str, needle: str) -> int:
    """1-based line of the only line of `text` containing `needle`."""
    lines = [i for i, line in enumerate(textwrap.dedent(text).splitlines(), 1) if needle in line]
    assert len(lines) == 1, (needle, lines)
    return lines[0]


def only_problem(text: str, needle: str, key_path: str, *fragments: str) -> str:
    """Assert exactly one problem, on the line holding `needle`, naming `key_path`."""
    found = problems(text)
    assert len(found) == 1, found
    message = found[0]
    assert message.startswith(f"{SOURCE}:{line_of(text, needle)}: {key_path}: "), message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    return message


# --------------------------------------------------------------------------- sizes, durations


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("64KiB", 64 * KIB),
        ("1MiB", MIB),
        ("2GiB", 2 * GIB),
        ("512MiB", 512 * MIB),
        ("1TiB", 1 << 40),
        ("4096", 4096),
        ("4096B", 4096),
        ("0", 0),
        (" 64 KiB ", 64 * KIB),
        ("64kib", 64 * KIB),
        (1000, 1000),
        (0, 0),
    ],
)
def test_parse_size_accepts(text: str | int, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("1MB", "use binary units (KiB, MiB, GiB, TiB), e.g. 1MiB"),
        ("64KB", "e.g. 64KiB"),
        ("2G", "e.g. 2GiB"),
        ("1.5GiB", "is not a size"),
        ("-1", "is not a size"),
        ("", "is not a size"),
        ("MiB", "is not a size"),
        ("10 parsecs", "is not a size"),
        ("1 MiB 2", "is not a size"),
        (-5, "cannot be negative"),
        (True, "is not a size"),
        (1.5, "is not a size"),
    ],
)
def test_parse_size_rejects(value: object, fragment: str) -> None:
    with pytest.raises(ValueError, match="size") as info:
        parse_size(value)  # type: ignore[arg-type]
    assert fragment in str(info.value)


@pytest.mark.parametrize(
    ("n", "text"),
    [(64 * KIB, "64KiB"), (MIB, "1MiB"), (2 * GIB, "2GiB"), (1000, "1000B"), (0, "0B")],
)
def test_format_size(n: int, text: str) -> None:
    assert format_size(n) == text


@given(st.integers(min_value=0, max_value=1 << 20), st.sampled_from(["B", "KiB", "MiB", "GiB"]))
def test_size_round_trips_through_binary_units(k: int, unit: str) -> None:
    n = parse_size(f"{k}{unit}")
    assert n == k * {"B": 1, "KiB": KIB, "MiB": MIB, "GiB": GIB}[unit]
    assert parse_size(format_size(n)) == n


@given(st.integers(min_value=0, max_value=1 << 50))
def test_format_size_round_trips(n: int) -> None:
    assert parse_size(format_size(n)) == n


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("200ms", 0.2),
        ("10s", 10.0),
        ("5m", 300.0),
        ("1h", 3600.0),
        ("1.5s", 1.5),
        ("0.5h", 1800.0),
        ("1m30s", 90.0),
        ("1h 2m", 3720.0),
        (" 10 s ", 10.0),
        ("10", 10.0),
        ("2.5", 2.5),
        ("0", 0.0),
        (10, 10.0),
        (0.25, 0.25),
    ],
)
def test_parse_duration_accepts(text: str | float, expected: float) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize(
    "value",
    [
        *("10 parsecs", "", "s", "10sec", "5min", "1d", "-1s", "1h-", "ms10"),
        *(-1, math.inf, math.nan, True, None),
    ],
)
def test_parse_duration_rejects(value: object) -> None:
    with pytest.raises(ValueError, match="is not a duration"):
        parse_duration(value)  # type: ignore[arg-type]


def test_parse_duration_message_gives_examples() -> None:
    with pytest.raises(ValueError) as info:
        parse_duration("10 parsecs")
    assert str(info.value) == "'10 parsecs' is not a duration (e.g. 200ms, 10s, 5m, 1h)"


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        *[(0.2, "200ms"), (10.0, "10s"), (300.0, "5m"), (3600.0, "1h"), (90.0, "90s")],
        *[(0, "0s"), (1.5, "1500ms"), (0.0001, "0.0001s")],
    ],
)
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text
    assert parse_duration(text) == seconds


@given(st.integers(min_value=0, max_value=10**9))
def test_duration_round_trips_in_milliseconds(ms: int) -> None:
    seconds = ms / 1000
    assert parse_duration(format_duration(seconds)) == seconds


# --------------------------------------------------------------------------- valid configs

FULL = """\
part_id: robot-1-main
state_dir: state
cloud:
  address: sync.example.com:443
  api_key_id: 5b3c9f4e-0000-4000-8000-000000000000
  api_key_file: secrets/api-key
  tls: true
  ca_file: /etc/ssl/private-ca.pem
sources:
  - kind: capture
    path: /var/lib/robot/capture
    prog_grace: 2m
    tags: [a]
  - kind: jsonl
    path: logs/imu.jsonl
    component_type: rdk:component:movement_sensor
    component_name: imu
    method: LinearAcceleration
    dataset_ids: [ds1, ds2]
  - kind: files
    name: videos
    path: /var/lib/robot/uploads
    patterns: ["*.mp4", "*.bag"]
    settle: 10s
    delete_after_upload: false
    tags: [field-test]
upload:
  workers: 8
  batch_max_readings: 500
  batch_max_bytes: 2MiB
  chunk_size: 128KiB
  backoff: {initial: 100ms, max: 1m}
  call_timeout: 30s
  lease: 10m
outbox:
  max_bytes: 1GiB
  on_full: drop_oldest
  min_free_disk: 256MiB
  synchronous: NORMAL
status:
  socket: /run/edged/edged.sock
log: {level: debug, format: json}
"""


def test_full_config_parses_to_dataclasses() -> None:
    assert parse(FULL) == Config(
        part_id="robot-1-main",
        state_dir=BASE / "state",
        cloud=CloudConfig(
            address="sync.example.com:443",
            api_key_id="5b3c9f4e-0000-4000-8000-000000000000",
            api_key_file=BASE / "secrets/api-key",
            tls=True,
            ca_file=Path("/etc/ssl/private-ca.pem"),
        ),
        sources=(
            CaptureConfig(
                path=Path("/var/lib/robot/capture"),
                prog_grace=120.0,
                tags=("a",),
                name="capture:/var/lib/robot/capture",
            ),
            JsonlConfig(
                path=BASE / "logs/imu.jsonl",
                component_type="rdk:component:movement_sensor",
                component_name="imu",
                method="LinearAcceleration",
                dataset_ids=("ds1", "ds2"),
                name="jsonl:/etc/edged/logs/imu.jsonl",
            ),
            FilesConfig(
                path=Path("/var/lib/robot/uploads"),
                patterns=("*.mp4", "*.bag"),
                settle=10.0,
                delete_after_upload=False,
                tags=("field-test",),
                name="videos",
            ),
        ),
        upload=UploadConfig(
            workers=8,
            batch_max_readings=500,
            batch_max_bytes=2 * MIB,
            chunk_size=128 * KIB,
            backoff=BackoffConfig(initial=0.1, max=60.0),
            call_timeout=30.0,
            lease=600.0,
        ),
        outbox=OutboxConfig(
            max_bytes=GIB, on_full="drop_oldest", min_free_disk=256 * MIB, synchronous="NORMAL"
        ),
        status=StatusConfig(Path("/run/edged/edged.sock")),
        log=LogConfig(level="debug", format="json"),
    )


def test_minimal_config_takes_every_default() -> None:
    config = parse(MINIMAL)
    assert config == Config(
        part_id="robot-1",
        state_dir=Path("/var/lib/edged"),
        status=StatusConfig(Path("/var/lib/edged/edged.sock")),
    )
    assert config.cloud == CloudConfig(address="embedded")
    assert config.upload == UploadConfig(
        workers=4,
        batch_max_readings=1000,
        batch_max_bytes=MIB,
        chunk_size=64 * KIB,
        backoff=BackoffConfig(0.2, 300.0),
        call_timeout=60.0,
        lease=300.0,
    )
    assert config.outbox == OutboxConfig(2 * GIB, "backpressure", 512 * MIB, "FULL")
    assert config.log == LogConfig("info", "text")
    assert config.sources == ()
    assert config.source_file is None


def test_source_defaults_per_kind() -> None:
    config = parse(
        MINIMAL
        + """\
sources:
  - {kind: capture, path: cap}
  - {kind: jsonl, path: imu.jsonl, component_name: imu}
  - {kind: files, path: up}
"""
    )
    capture, jsonl, files = config.sources
    assert isinstance(capture, CaptureConfig)
    assert isinstance(jsonl, JsonlConfig)
    assert isinstance(files, FilesConfig)
    assert capture == CaptureConfig(path=BASE / "cap", name="capture:/etc/edged/cap")
    assert capture.prog_grace == 60.0
    assert (jsonl.component_type, jsonl.component_name, jsonl.method) == (
        "rdk:component:sensor",
        "imu",
        "Readings",
    )
    assert not hasattr(jsonl, "patterns")  # each kind has only its own keys
    assert (files.patterns, files.settle, files.delete_after_upload) == (("*",), 10.0, True)
    assert files.name == "files:/etc/edged/up"


def test_null_and_empty_values_take_defaults() -> None:
    config = parse(MINIMAL + "cloud:\n  tls:\n  ca_file: null\nupload:\nlog: {level: null}\n")
    assert config.cloud == CloudConfig()
    assert config.upload == UploadConfig()
    assert config.log == LogConfig()


def test_enums_are_case_insensitive_and_canonicalised() -> None:
    config = parse(MINIMAL + "log: {level: INFO, format: JSON}\noutbox: {synchronous: normal}\n")
    assert config.log == LogConfig("info", "json")
    assert config.outbox.synchronous == "NORMAL"


def test_plain_numbers_are_bytes_and_seconds() -> None:
    config = parse(MINIMAL + "upload: {chunk_size: 4096, call_timeout: 1.5, lease: 90}\n")
    assert config.upload.chunk_size == 4096
    assert config.upload.call_timeout == 1.5
    assert config.upload.lease == 90.0


def test_yaml_anchors_and_merge_keys_work() -> None:
    config = parse(
        MINIMAL
        + """\
sources:
  - &base {kind: files, path: a, settle: 3s, tags: [t]}
  - {<<: *base, path: b}
"""
    )
    assert all(isinstance(s, FilesConfig) for s in config.sources)
    assert [(s.path.name, s.settle, s.tags) for s in config.sources] == [  # type: ignore[attr-defined]
        ("a", 3.0, ("t",)),
        ("b", 3.0, ("t",)),
    ]


def test_merged_keys_are_not_duplicates_even_when_a_node_is_reused() -> None:
    text = MINIMAL + (
        "sources:\n  - &b {kind: files, path: a}\n  - {<<: *b, name: x, path: b}\n  - *b\n"
    )
    # (An alias shares its anchor's node, so the line is the anchor's: the best YAML gives.)
    found = problems(text)
    assert len(found) == 1, found
    assert "sources[2]: has the same name 'files:/etc/edged/a' as sources[0]" in found[0]


@pytest.mark.parametrize(
    ("address", "tls", "expected"),
    [
        ("embedded", None, False),
        ("sync.example.com:443", None, True),
        ("127.0.0.1:8080", None, True),
        ("localhost:8080", False, False),
        ("[::1]:8080", None, True),
        ("embedded", True, True),
    ],
)
def test_use_tls(address: str, tls: bool | None, expected: bool) -> None:
    text = MINIMAL + f"cloud: {{address: '{address}', tls: {json.dumps(tls)}}}\n"
    assert parse(text).cloud.use_tls() is expected


def test_relative_paths_resolve_against_the_config_dir(tmp_path: Path) -> None:
    conf = tmp_path / "etc" / "edged.yaml"
    conf.parent.mkdir()
    conf.write_text(
        "part_id: p\nstate_dir: ../state\ncloud: {api_key_id: k, api_key_file: key}\n"
        "sources: [{kind: capture, path: ./cap}, {kind: files, path: /abs/up}]\n"
    )
    config = load_config(conf)
    assert config.source_file == conf
    assert config.state_dir == tmp_path / "state"
    assert config.cloud.api_key_file == tmp_path / "etc" / "key"
    assert config.sources[0].path == tmp_path / "etc" / "cap"
    assert config.sources[1].path == Path("/abs/up")
    assert config.status.socket == tmp_path / "state" / "edged.sock"


def test_relative_config_path_still_gives_absolute_paths(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "e.yaml").write_text("part_id: p\nstate_dir: s\nfoo: 1\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigErrors) as info:
        load_config(Path("conf/e.yaml"))
    # Messages name the file as the operator gave it.
    assert info.value.problems[0].startswith("conf/e.yaml:3: foo: unknown key 'foo'")
    (tmp_path / "conf" / "e.yaml").write_text("part_id: p\nstate_dir: s\n")
    assert load_config(Path("conf/e.yaml")).state_dir == tmp_path / "conf" / "s"


def test_to_dict_is_json_and_parses_back_to_the_same_config() -> None:
    config = parse(FULL)
    data = config.to_dict()
    json.dumps(data)  # JSON-able
    assert data["upload"]["batch_max_bytes"] == "2MiB"
    assert data["upload"]["backoff"] == {"initial": "100ms", "max": "1m"}
    assert data["outbox"]["max_bytes"] == "1GiB"
    assert data["state_dir"] == "/etc/edged/state"
    again = parse_config(yaml.safe_dump(data), "resolved.yaml", base_dir=Path("/elsewhere"))
    assert again == config
    assert again.to_dict() == data


def test_to_dict_shows_effective_tls() -> None:
    data = parse(MINIMAL + "cloud: {address: 'h:1'}\n").to_dict()
    assert data["cloud"]["tls"] is True
    assert "source_file" not in data


def test_repo_configs_load() -> None:
    default = load_config(REPO / "config" / "edged.yaml")
    var = REPO / "var"
    assert default.part_id == "demo-robot"
    assert default.state_dir == var / "state"
    assert default.cloud.address == "embedded"
    assert not default.cloud.use_tls()
    assert [(s.kind, s.path) for s in default.sources] == [
        ("capture", var / "capture"),
        ("files", var / "uploads"),
    ]
    assert default.sources[1] == FilesConfig(
        path=var / "uploads", name=f"files:{var / 'uploads'}", settle=2.0
    )
    assert default.status.socket == var / "edged.sock"
    assert default.log == LogConfig("info", "text")

    example = load_config(REPO / "config" / "edged.example.yaml")
    assert [s.kind for s in example.sources] == ["capture", "jsonl", "files"]
    assert example.upload.backoff == BackoffConfig(0.2, 300.0)


def key_paths(node: object, path: str = "") -> set[str]:
    """Every key path in plain YAML data, list items of `sources` folded to `sources[]`."""
    found: set[str] = set()
    if isinstance(node, dict):
        for key, value in node.items():
            here = f"{path}.{key}" if path else str(key)
            found |= {here} | key_paths(value, here)
    elif isinstance(node, list) and path == "sources":
        for item in node:
            found |= key_paths(item, "sources[]")
    return found


def leaf_key_paths(node: object) -> set[str]:
    """`key_paths` without the sections (keys whose value is a mapping or the source list)."""
    sections = {"sources"}
    for path in key_paths(node):
        values: list[object] = [node]
        for part in path.split("."):
            if part == "sources[]":  # a section inside any of the sources
                found = [v.get("sources") for v in values if isinstance(v, dict)]
                values = [s for lst in found if isinstance(lst, list) for s in lst]
            else:
                values = [v.get(part) for v in values if isinstance(v, dict)]
        if any(isinstance(v, dict) for v in values):
            sections.add(path)
    return key_paths(node) - sections


def test_example_config_has_exactly_the_declared_keys() -> None:
    """The example is the user documentation: every declared key is in it, and no other."""
    example = yaml.safe_load((REPO / "config" / "edged.example.yaml").read_text())
    declared = {key for key, _, _ in key_reference()}
    found = leaf_key_paths(example)
    assert declared - found == set(), "keys missing from config/edged.example.yaml"
    assert found - declared == set(), "keys in config/edged.example.yaml that do not exist"


def readme_key_table() -> list[str]:
    lines = (REPO / "README.md").read_text().splitlines()
    start = lines.index(key_table()[0])
    end = next(i for i in range(start, len(lines)) if not lines[i].startswith("|"))
    return lines[start:end]


def test_readme_key_table_is_the_declarations() -> None:
    """Every declared key is in the README's table with its default and help, and no other
    key is: the table is derived from the declarations (paste the expected one)."""
    expected = key_table()
    assert readme_key_table() == expected, "README.md key table:\n" + "\n".join(expected)


def test_key_reference_gives_each_kind_its_own_keys() -> None:
    rows = {key: (shown, help) for key, shown, help in key_reference()}
    assert rows["sources[].kind"] == ("required", "what to watch: capture, files or jsonl")
    assert rows["sources[].prog_grace"][0] == "1m"
    assert rows["sources[].prog_grace"][1].startswith("capture only: ")
    assert rows["sources[].component_name"][0] == "required"
    assert rows["status.socket"][0] == "state_dir/edged.sock"
    assert rows["upload.batch_max_bytes"][0] == "1MiB"
    assert rows["log.level"] == ("info", "log verbosity (one of: debug, info, warning, error)")


@dataclass(frozen=True)
class _Toy:
    """A section declared as every section is: one field a key."""

    size: int = option(KIB, Size(1, MIB), "a size")
    wait: float = option(1.0, Duration(positive=True), "a wait")
    mode: str = option("a", Choice(("a", "b")), "a mode")
    limit: float | None = option(None, Duration(), "an optional limit")


def _read_toy(text: str) -> _Toy:
    def read(r: Reader, top: Map) -> _Toy | None:
        top.check_keys(keys(_Toy))
        return build(r, top, _Toy)

    return parse_document(text, "toy.yaml", Path("/"), read)


def test_one_declaration_gives_reading_errors_dump_and_reference() -> None:
    assert _read_toy("") == _Toy()
    assert dump(_Toy()) == {"size": "1KiB", "wait": "1s", "mode": "a", "limit": None}
    toy = _read_toy("size: 2KiB\nwait: 200ms\nmode: B\nlimit: 1m\n")
    assert toy == _Toy(2 * KIB, 0.2, "b", 60.0)
    assert dump(toy) == {"size": "2KiB", "wait": "200ms", "mode": "b", "limit": "1m"}
    assert list(reference(_Toy, "toy")) == [
        ("toy.size", "1KiB", "a size"),
        ("toy.wait", "1s", "a wait"),
        ("toy.mode", "a", "a mode (one of: a, b)"),
        ("toy.limit", "none", "an optional limit"),
    ]
    with pytest.raises(ConfigErrors) as info:
        _read_toy("size: 2MiB\nwiat: 1s\nmode: c\n")
    assert info.value.problems == [
        "toy.yaml:1: size: must be between 1B and 1MiB, got 2MiB",
        "toy.yaml:2: wiat: unknown key 'wiat' (did you mean 'wait'?)",
        "toy.yaml:3: mode: 'c' is not one of a, b",
    ]


@dataclass(frozen=True, kw_only=True)
class _ToyConfig(SourceConfig):
    kind = "toy"
    speed: int = option(3, Int(1, 9), "how fast")


def test_a_registered_kind_brings_its_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    """config.py names no kind: registering one is all it takes to read, refuse and
    document its keys."""
    monkeypatch.setitem(KINDS, "toy", SourceKind(_ToyConfig, CaptureSource))
    config = parse(MINIMAL + "sources:\n  - {kind: toy, path: /t, speed: 5}\n")
    assert config.sources == (_ToyConfig(path=Path("/t"), speed=5, name="toy:/t"),)
    assert config.to_dict()["sources"][0]["speed"] == 5
    assert ("sources[].speed", "3", "toy only: how fast") in key_reference()
    text = MINIMAL + "sources:\n  - {kind: files, path: /f, speed: 2}\n"
    only_problem(
        text, "speed", "sources[0].speed", "applies only to kind toy; this source is kind files"
    )
    text = MINIMAL + "sources:\n  - {kind: toy, path: /t, speed: 10}\n"
    only_problem(text, "speed", "sources[0].speed", "must be between 1 and 9, got 10")


def test_sdk_reads_the_cloud_section_with_the_daemons_messages(tmp_path: Path) -> None:
    """`DataClient.from_config` reads `cloud` through `edged.wire.cloud`: same keys,
    same file:line messages, other sections left to the daemon."""
    conf = tmp_path / "edged.yaml"
    conf.write_text(
        "part_id: p\nsources: [{kind: nope}]\ncloud:\n  adress: h:1\n  ca_file: ca.pem\n"
        "  tls: false\n"
    )
    with pytest.raises(ConfigErrors) as info:
        load_cloud(conf)
    assert info.value.problems == [
        f"{conf}:4: cloud.adress: unknown key 'adress' (did you mean 'address'?)",
        f"{conf}:5: cloud.ca_file: is set but cloud.tls is false",
    ]
    conf.write_text("cloud:\n  address: ' h:1 '\n  api_key_id: k\n  api_key_file: key\n")
    assert load_cloud(conf) == CloudConfig("h:1", "k", tmp_path / "key")


# --------------------------------------------------------------------------- problems


def test_unknown_top_level_key_suggests_the_close_one() -> None:
    text = MINIMAL + "stat_dir: /x\n"
    only_problem(
        text, "stat_dir", "stat_dir", "unknown key 'stat_dir'", "did you mean 'state_dir'?"
    )


def test_misplaced_top_level_key_says_where_it_belongs() -> None:
    text = MINIMAL + "workers: 3\n"
    only_problem(text, "workers", "workers", "belongs under 'upload'")


def test_unknown_key_without_a_close_match_lists_the_allowed_keys() -> None:
    text = MINIMAL + "log:\n  colour: red\n"
    only_problem(text, "colour", "log.colour", "allowed: level, format")


def test_unknown_nested_key_suggests_the_close_one() -> None:
    text = MINIMAL + "upload:\n  workers: 2\n  backoff:\n    initail: 1s\n"
    only_problem(text, "initail", "upload.backoff.initail", "did you mean 'initial'?")


def test_unknown_source_key_suggests_the_close_one() -> None:
    text = MINIMAL + "sources:\n  - kind: files\n    path: /up\n    paterns: ['*.mp4']\n"
    only_problem(text, "paterns", "sources[0].paterns", "did you mean 'patterns'?")


def test_key_for_another_source_kind_is_named() -> None:
    text = MINIMAL + "sources:\n  - kind: files\n    path: /a\n  - kind: capture\n"
    text += "    path: /b\n    settle: 5s\n"
    only_problem(
        text, "settle", "sources[1].settle", "applies only to kind files", "is kind capture"
    )


@pytest.mark.parametrize(
    ("key", "value", "owner"),
    [
        ("component_name", "imu", "jsonl"),
        ("method", "Readings", "jsonl"),
        ("prog_grace", "1m", "capture"),
        ("delete_after_upload", "false", "files"),
    ],
)
def test_each_kind_specific_key_is_refused_elsewhere(key: str, value: str, owner: str) -> None:
    other = "files" if owner != "files" else "capture"
    text = MINIMAL + f"sources:\n  - kind: {other}\n    path: /a\n    {key}: {value}\n"
    only_problem(text, f"{key}:", f"sources[0].{key}", f"applies only to kind {owner}")


def test_inline_api_key_is_refused_with_the_alternatives() -> None:
    text = MINIMAL + "cloud:\n  api_key_id: k\n  api_key: s3cret\n"
    message = only_problem(
        text, "api_key:", "cloud.api_key", "api_key_file", "EDGED_API_KEY", "never"
    )
    assert "s3cret" not in message


def test_api_key_file_needs_an_id() -> None:
    text = MINIMAL + "cloud:\n  api_key_file: /etc/edged/key\n"
    only_problem(text, "api_key_file", "cloud.api_key_file", "needs cloud.api_key_id")


@pytest.mark.parametrize(
    ("body", "needle", "key_path", "fragment"),
    [
        ("cloud: {tls: 'yes'}", "tls", "cloud.tls", "expected true or false, got string 'yes'"),
        ("upload: {workers: true}", "workers", "upload.workers", "expected an integer, got bool"),
        ("upload: {workers: '4'}", "workers", "upload.workers", "got string '4'"),
        ("upload: {workers: 100}", "workers", "upload.workers", "between 1 and 64, got 100"),
        ("upload: {workers: 0}", "workers", "upload.workers", "between 1 and 64"),
        ("cloud: {address: 3}", "address", "cloud.address", "expected a string, got integer 3"),
        (
            "cloud: {api_key_id: no}",
            "api_key_id",
            "cloud.api_key_id",
            'boolean false (quote it: "no")',
        ),
        ("cloud: {api_key_id: 12}", "api_key_id", "cloud.api_key_id", 'quote it: "12"'),
        ("sources: {kind: capture}", "sources", "sources", "expected a list of sources"),
        ("sources: [nope]", "sources", "sources[0]", "expected a mapping of keys"),
        ("upload: [1, 2]", "upload", "upload", "expected a mapping of keys, got a list"),
        ("log: {level: [info]}", "level", "log.level", "expected a single value, got a list"),
        (
            "sources: [{kind: files, path: /a, tags: x}]",
            "sources",
            "sources[0].tags",
            "expected a list of strings",
        ),
        (
            "sources: [{kind: files, path: /a, tags: [ok, 7]}]",
            "sources",
            "sources[0].tags[1]",
            "expected a string, got integer 7",
        ),
        (
            "sources: [{kind: files, path: /a, patterns: []}]",
            "sources",
            "sources[0].patterns",
            "at least one pattern",
        ),
    ],
)
def test_wrong_types_are_named(body: str, needle: str, key_path: str, fragment: str) -> None:
    only_problem(MINIMAL + body + "\n", needle, key_path, fragment)


def test_bad_size() -> None:
    text = MINIMAL + "outbox:\n  max_bytes: 2GB\n"
    only_problem(text, "max_bytes", "outbox.max_bytes", "'2GB' is not a size", "e.g. 2GiB")


@pytest.mark.parametrize(
    ("value", "rate"), [("2MiB/s", 2 * MIB), ("512KiB", 512 * KIB), ("0", 0), ("100000", 100_000)]
)
def test_max_bandwidth_is_a_rate_per_second(value: str, rate: int) -> None:
    config = parse(MINIMAL + f"upload: {{max_bandwidth: {value}}}\n")
    assert config.upload.max_bandwidth == rate
    assert parse(MINIMAL).upload.max_bandwidth == 0  # unlimited by default
    assert parse_rate(config.to_dict()["upload"]["max_bandwidth"]) == rate  # round trip


@pytest.mark.parametrize(
    ("value", "fragment"),
    [("2MB/s", "use binary units (KiB, MiB, GiB, TiB), e.g. 2MiB/s"), ("fast", "e.g. 2MiB/s")],
)
def test_bad_max_bandwidth_is_named(value: str, fragment: str) -> None:
    text = MINIMAL + f"upload:\n  max_bandwidth: {value}\n"
    key = "upload.max_bandwidth"
    only_problem(text, "max_bandwidth", key, f"{value!r} is not a rate", fragment)


@pytest.mark.parametrize(
    ("body", "needle", "key_path", "fragment"),
    [
        ("upload: {chunk_size: 4MiB}", "chunk_size", "upload.chunk_size", "and 4095KiB, got 4MiB"),
        ("upload: {batch_max_bytes: 5MiB}", "batch_max", "upload.batch_max_bytes", "4MiB"),
        ("upload: {chunk_size: 0}", "chunk_size", "upload.chunk_size", "between 1B and"),
        ("outbox: {max_bytes: 1KiB}", "max_bytes", "outbox.max_bytes", "at least 1MiB"),
    ],
)
def test_sizes_out_of_range(body: str, needle: str, key_path: str, fragment: str) -> None:
    only_problem(MINIMAL + body + "\n", needle, key_path, fragment)


def test_bad_duration_has_the_example_message() -> None:
    text = (
        MINIMAL
        + "sources:\n  - kind: capture\n    path: /c\n  - kind: files\n    path: /u\n"
        + "    settle: 10 parsecs\n"
    )
    message = only_problem(text, "parsecs", "sources[1].settle")
    assert message == (
        f"{SOURCE}:{line_of(text, 'parsecs')}: sources[1].settle:"
        " '10 parsecs' is not a duration (e.g. 200ms, 10s, 5m, 1h)"
    )


@pytest.mark.parametrize(
    ("body", "needle", "key_path", "fragment"),
    [
        ("upload: {backoff: {initial: 0s}}", "initial", "upload.backoff.initial", "longer than 0s"),
        ("upload: {backoff: {initial: 1m, max: 1s}}", "max", "upload.backoff.max", "shorter than"),
        ("upload: {call_timeout: 10m}", "call_timeout", "upload.lease", "call_timeout (10m)"),
        ("upload: {lease: -5}", "lease", "upload.lease", "not a duration"),
        ("upload: {lease: .inf}", "lease", "upload.lease", "finite"),
    ],
)
def test_durations_out_of_range(body: str, needle: str, key_path: str, fragment: str) -> None:
    only_problem(MINIMAL + body + "\n", needle, key_path, fragment)


@pytest.mark.parametrize(
    ("body", "needle", "key_path", "fragment"),
    [
        ("outbox: {on_full: drop}", "on_full", "outbox.on_full", "not one of backpressure, drop"),
        ("outbox: {synchronous: OFF}", "synchronous", "outbox.synchronous", "'OFF' is not one of"),
        ("log: {level: 3}", "level", "log.level", "'3' is not one of debug, info"),
        ("log: {level: warn}", "level", "log.level", "did you mean 'warning'?"),
        ("log: {format: yaml}", "format", "log.format", "'yaml' is not one of text, json"),
        ("sources: [{kind: file, path: /a}]", "sources", "sources[0].kind", "'files'?"),
    ],
)
def test_bad_enum(body: str, needle: str, key_path: str, fragment: str) -> None:
    only_problem(MINIMAL + body + "\n", needle, key_path, fragment)


@pytest.mark.parametrize(
    "address",
    ["https://sync.example.com:443", "sync.example.com", "host:port", "host:70000", "::1:80"],
)
def test_bad_cloud_address(address: str) -> None:
    text = MINIMAL + f"cloud:\n  address: '{address}'\n"
    only_problem(text, "address", "cloud.address", "host:port")


def test_missing_part_id_points_at_the_top() -> None:
    text = "# edged\nstate_dir: /x\n"
    found = problems(text)
    assert found == [f"{SOURCE}:2: part_id: is required (the robot part this data belongs to)"]


def test_empty_file_reports_both_required_keys() -> None:
    assert problems("") == [
        f"{SOURCE}:1: part_id: is required (the robot part this data belongs to)",
        f"{SOURCE}:1: state_dir: is required (where the outbox and spool live)",
    ]


def test_blank_part_id_is_refused() -> None:
    only_problem("part_id: ''\nstate_dir: /x\n", "part_id", "part_id", "must not be empty")


def test_source_missing_kind_and_path() -> None:
    text = MINIMAL + "sources:\n  - tags: [a]\n"
    found = problems(text)
    line = line_of(text, "tags")
    assert found == [
        f"{SOURCE}:{line}: sources[0].kind: is required (capture, files or jsonl)",
        f"{SOURCE}:{line}: sources[0].path: is required (the directory or file to watch)",
    ]


def test_jsonl_needs_component_name() -> None:
    text = MINIMAL + "sources:\n  - kind: jsonl\n    path: /x.jsonl\n"
    only_problem(text, "kind: jsonl", "sources[0].component_name", "is required")


def test_duplicate_source_names() -> None:
    text = MINIMAL + "sources:\n  - {kind: files, path: /a}\n  - {kind: files, path: /a}\n"
    found = problems(text)
    assert len(found) == 1
    assert found[0].startswith(f"{SOURCE}:5: sources[1]: has the same name 'files:/a'")


def test_overlapping_directory_sources_of_one_kind() -> None:
    text = MINIMAL + (
        "sources:\n  - {kind: capture, path: /x}\n  - {kind: capture, path: /x/sub}\n"
        "  - {kind: files, path: /x}\n"  # a files source may share a capture directory
    )
    found = problems(text)
    assert len(found) == 1
    assert "sources[1].path: /x/sub overlaps sources[0].path /x" in found[0]


def test_duplicate_keys() -> None:
    text = MINIMAL + "log:\n  level: info\n  level: debug\n"
    only_problem(text, "level: debug", "log.level", "duplicate key (first set on line 4)")


def test_socket_path_too_long() -> None:
    text = f"part_id: p\nstate_dir: /{'x' * 120}\n"
    only_problem(text, "state_dir", "status.socket", "longer than 107 bytes")


def test_ca_file_with_tls_off() -> None:
    text = MINIMAL + "cloud:\n  address: h:1\n  tls: false\n  ca_file: /ca.pem\n"
    only_problem(text, "ca_file", "cloud.ca_file", "cloud.tls is false")


def test_tilde_paths_are_refused() -> None:
    only_problem("part_id: p\nstate_dir: ~/edged\n", "state_dir", "state_dir", "not expanded")


def test_unsafe_yaml_tags_are_refused() -> None:
    text = MINIMAL + "log: {level: !!python/name:os.system info}\n"
    only_problem(text, "level", "log.level", "cannot read value")


def test_invalid_yaml_names_the_line() -> None:
    found = problems("part_id: p\nstate_dir: /x\nlog: {level: info\n")
    assert len(found) == 1
    assert found[0].startswith(f"{SOURCE}:4: invalid YAML: ")


def test_top_level_must_be_a_mapping() -> None:
    found = problems("- a\n- b\n")
    assert found[0] == f"{SOURCE}:1: expected a mapping of keys, got a list"


def test_every_problem_is_reported_at_once_in_line_order() -> None:
    text = """\
stat_dir: /x
cloud:
  adress: h:1
  api_key: s3cret
sources:
  - kind: capture
    path: /c
    settle: 1s
  - kind: files
    path: /u
    settle: soon
upload:
  workers: many
  chunk_size: 1MB
log: {level: loud}
"""
    found = problems(text)
    lines = [int(p.split(":")[1]) for p in found]
    assert lines == sorted(lines)
    expected = [
        (1, "stat_dir: unknown key"),
        (1, "part_id: is required"),
        (1, "state_dir: is required"),
        (3, "cloud.adress: unknown key 'adress' (did you mean 'address'?)"),
        (4, "cloud.api_key: never put"),
        (8, "sources[0].settle: applies only to kind files"),
        (11, "sources[1].settle: 'soon' is not a duration"),
        (13, "upload.workers: expected an integer, got string 'many'"),
        (14, "upload.chunk_size: '1MB' is not a size"),
        (15, "log.level: 'loud' is not one of"),
    ]
    assert len(found) == len(expected), found
    for (line, fragment), message in zip(expected, found, strict=True):
        assert message.startswith(f"{SOURCE}:{line}: "), message
        assert fragment in message, (fragment, message)


def test_load_config_reports_unreadable_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=r"nope\.yaml: cannot read config: No such file"):
        load_config(missing)


def test_load_config_names_the_file_in_problems(tmp_path: Path) -> None:
    conf = tmp_path / "edged.yaml"
    conf.write_text("part_id: p\nstate_dir: s\nupload:\n  chunk_size: 10 parsecs\n")
    with pytest.raises(ConfigErrors) as info:
        load_config(conf)
    assert info.value.problems == [
        f"{conf}:4: upload.chunk_size: '10 parsecs' is not a size"
        " (e.g. 64KiB, 1MiB, 2GiB, or a number of bytes)"
    ]
    assert isinstance(info.value, ConfigError)


def test_check_host_names_what_run_would_refuse_or_miss_with_file_and_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`edged run` exits 2 on an unreadable or group-readable key file and uploads
    nothing from a missing source directory: check-config must say so, file:line."""
    monkeypatch.delenv("EDGED_API_KEY", raising=False)
    (tmp_path / "capture").mkdir()
    loose = tmp_path / "loose-key"
    loose.write_text("secret\n")
    loose.chmod(0o644)
    conf = tmp_path / "edged.yaml"
    body = f"""\
part_id: p
state_dir: {tmp_path / "state"}
cloud:
  address: sync.example.com:443
  api_key_id: k1
  api_key_file: {tmp_path / "no-such-key"}
sources:
  - kind: capture
    path: {tmp_path / "capture"}
  - kind: files
    path: {tmp_path / "not-there"}
  - kind: jsonl
    path: {tmp_path / "logs" / "imu.jsonl"}
    component_name: imu
"""
    conf.write_text(body)
    found = check_host(load_config(conf))
    assert [p.split(": ", 2)[:2] for p in found] == [
        [f"{conf}:6", "cloud.api_key_file"],
        [f"{conf}:11", "sources[1].path"],
        [f"{conf}:13", "sources[2].path"],
    ]
    assert "cannot read API key file" in found[0] and "No such file" in found[0]
    assert f"{tmp_path / 'not-there'} does not exist" in found[1]
    assert f"{tmp_path / 'logs'} does not exist" in found[2]  # a jsonl file's directory

    conf.write_text(body.replace(str(tmp_path / "no-such-key"), str(loose)))
    [mode] = [p for p in check_host(load_config(conf)) if "cloud." in p]
    assert mode.startswith(f"{conf}:6: cloud.api_key_file: ") and "mode 0644" in mode

    loose.chmod(0o600)
    (tmp_path / "not-there").mkdir()
    (tmp_path / "logs").mkdir()
    assert check_host(load_config(conf)) == []
    conf.write_text(body.replace(f"  api_key_file: {tmp_path / 'no-such-key'}\n", ""))
    [no_key] = check_host(load_config(conf))
    assert no_key.startswith(f"{conf}:5: cloud.api_key_id: ") and "no key was found" in no_key
    monkeypatch.setenv("EDGED_API_KEY", "from-the-environment")  # run would use this
    assert check_host(load_config(conf)) == []
