"""Config options declared once: a dataclass field per key, its metadata the key's spec.

`option(default, kind, help)` is the whole declaration of a key: its name (the field),
its kind (type and unit: text, path, bool, int range, size, duration, choice, string
list, nested section), its default, an optional one-value check and one line of help.
Everything else is derived from the declarations: reading YAML (`Reader`, `read_fields`,
`parse_document`), turning a config back into file spelling (`dump`) and the key
reference in the README (`reference`). Cross-field rules are a config class's
`problems(given)` method, or small named functions of whoever composes the sections.

The reader walks the composed YAML node graph (not plain dicts) so each value keeps its
line, and it collects every problem before one `ConfigErrors` is raised: an operator on
a robot fixes the whole file in one edit instead of one error per restart.

Base layer: the SDK (`edged.wire.cloud`) and the daemon read their sections with it.
"""

from __future__ import annotations

import difflib
import math
import os
import re
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import MISSING, Field, dataclass, field, fields
from pathlib import Path
from typing import Any, Protocol, TypeVar, runtime_checkable

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from edged.errors import ConfigErrors

T = TypeVar("T")

KIB = 1 << 10
MIB = 1 << 20
GIB = 1 << 30
TIB = 1 << 40

OPTION = "edged.option"
"""Metadata key of a declared field."""

# --------------------------------------------------------------------------- sizes, durations

_SIZE_UNITS = {"": 1, "b": 1, "kib": KIB, "mib": MIB, "gib": GIB, "tib": TIB}
_SIZE_DECIMAL = {"k": "KiB", "kb": "KiB", "m": "MiB", "mb": "MiB", "g": "GiB", "gb": "GiB"}
_SIZE_DECIMAL |= {"t": "TiB", "tb": "TiB"}
_SIZE_RE = re.compile(r"(\d+)\s*([A-Za-z]*)")
_SIZE_EXAMPLES = "e.g. 64KiB, 1MiB, 2GiB, or a number of bytes"


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


def parse_rate(value: str | int) -> int:
    """Bytes per second from a size with an optional `/s`: `2MiB/s`, `512KiB`, `100000`."""
    text = value.strip() if isinstance(value, str) else value
    if isinstance(text, str) and text.lower().endswith("/s"):
        text = text[:-2]
    try:
        return parse_size(text)
    except ValueError as exc:
        units = str(exc).partition(": use ")[2]  # a decimal unit: say which binary one
        why = f"use {units}/s" if units else "e.g. 2MiB/s, 512KiB/s, or bytes per second"
        raise ValueError(f"{value!r} is not a rate ({why})") from None


def format_rate(n: int) -> str:
    """The spelling `parse_rate` reads back: `2MiB/s`, `0B/s`."""
    return f"{format_size(n)}/s"


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


# --------------------------------------------------------------------------- declarations


class Kind(Protocol):
    """A key's type and unit: how to read it from YAML, write it back and show it."""

    def read(self, r: Reader, node: Node, path: str) -> Any:
        """The value, or BAD after reporting the problem with `r.problem`."""

    def dump(self, value: Any) -> Any:
        """Plain YAML/JSON data in config-file spelling; reads back to `value`."""

    def show(self, value: Any) -> str:
        """`value` as the README's key reference spells a default."""


Check = Callable[[Any], str | None]


@dataclass(frozen=True)
class Option:
    """The spec of one key; lives in its dataclass field's metadata under OPTION."""

    kind: Kind
    help: str
    required: str | None = None
    """Set for a key without default: what to tell the user it is for."""
    check: Check | None = None
    """One-value rule beyond the kind's (reported at the key's line)."""
    shown: str | None = None
    """The default as documented, where the field's default is filled in by the loader."""


def option(
    default: Any, kind: Kind, help: str, *, check: Check | None = None, shown: str | None = None
) -> Any:
    """A key with a default (`None` for optional values); `shown` documents a default
    the loader fills in where the field's own (e.g. "") means "derive it"."""
    return field(default=default, metadata={OPTION: Option(kind, help, check=check, shown=shown)})


def required(kind: Kind, help: str, what: str, *, check: Check | None = None) -> Any:
    """A key the file must give; `what` completes "is required (...)"."""
    return field(metadata={OPTION: Option(kind, help, required=what, check=check)})


def derived(kind: Kind, help: str, shown: str) -> Any:
    """A key whose default depends on other keys (no field default): the loader passes
    it to `read_fields` in `fill`; `shown` documents it."""
    return field(metadata={OPTION: Option(kind, help, shown=shown)})


def section(cls: type, help: str, *, default: bool = True) -> Any:
    """A nested mapping of keys declared by the dataclass `cls` (absent: `cls()`, unless
    `default` is false because some of its defaults are derived)."""
    spec = {OPTION: Option(Section(cls), help)}
    return field(default_factory=cls, metadata=spec) if default else field(metadata=spec)


def declared(cls: type) -> list[tuple[Field[Any], Option]]:
    """(field, option) of every declared key of a config dataclass, in file order."""
    return [(f, f.metadata[OPTION]) for f in fields(cls) if OPTION in f.metadata]


def keys(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f, _ in declared(cls))


def default_of(f: Field[Any]) -> Any:
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    return MISSING


def dump(config: object) -> dict[str, Any]:
    """A config dataclass as plain data in config-file spelling (it parses back); an
    unset optional value (None) is null whatever its kind."""
    return {
        f.name: None if (v := getattr(config, f.name)) is None else opt.kind.dump(v)
        for f, opt in declared(type(config))
    }


def reference(cls: type, prefix: str = "") -> Iterator[tuple[str, str, str]]:
    """(key path, default as documented, help) of every key under `cls`, in file order;
    a choice's help ends with its words."""
    for f, opt in declared(cls):
        path = f"{prefix}.{f.name}" if prefix else f.name
        children = getattr(opt.kind, "reference", None)
        if children is not None:
            yield from children(path)
            continue
        if opt.required is not None:
            shown = "required"
        elif opt.shown is not None:
            shown = opt.shown
        elif (default := default_of(f)) is None:
            shown = "none"
        else:
            shown = opt.kind.show(default)
        choices = getattr(opt.kind, "choices", None)
        yield path, shown, opt.help + (f" (one of: {', '.join(choices)})" if choices else "")


# --------------------------------------------------------------------------- kinds


@dataclass(frozen=True)
class Text:
    """A non-empty string; `strip` drops surrounding spaces."""

    strip: bool = False

    def read(self, r: Reader, node: Node, path: str) -> Any:
        value = r.string(node, path)
        return value.strip() if self.strip and isinstance(value, str) else value

    def dump(self, value: Any) -> Any:
        return value

    def show(self, value: Any) -> str:
        return str(value)


@dataclass(frozen=True)
class FilePath:
    """A path; relative ones resolve against the config file's directory."""

    def read(self, r: Reader, node: Node, path: str) -> Any:
        return r.path(node, path)

    def dump(self, value: Any) -> Any:
        return str(value)

    def show(self, value: Any) -> str:
        return str(value)


@dataclass(frozen=True)
class Flag:
    """true or false."""

    def read(self, r: Reader, node: Node, path: str) -> Any:
        return r.boolean(node, path)

    def dump(self, value: Any) -> Any:
        return value

    def show(self, value: Any) -> str:
        return "true" if value else "false"


@dataclass(frozen=True)
class Int:
    """An integer in [lo, hi] (no upper bound when hi is None)."""

    lo: int
    hi: int | None = None

    def read(self, r: Reader, node: Node, path: str) -> Any:
        return r.integer(node, path, self.lo, self.hi)

    def dump(self, value: Any) -> Any:
        return value

    def show(self, value: Any) -> str:
        return str(value)


@dataclass(frozen=True)
class Size:
    """Bytes, written 64KiB / 1MiB / 2GiB or as a number, in [lo, hi]."""

    lo: int
    hi: int | None = None

    def read(self, r: Reader, node: Node, path: str) -> Any:
        return r.size(node, path, self.lo, self.hi)

    def dump(self, value: Any) -> Any:
        return format_size(value)

    def show(self, value: Any) -> str:
        return format_size(value)


@dataclass(frozen=True)
class Rate:
    """Bytes per second, written 2MiB/s (or 2MiB) or as a number, at least `lo`."""

    lo: int = 0

    def read(self, r: Reader, node: Node, path: str) -> Any:
        value = r.scalar(node, path)
        if isinstance(value, Bad):
            return value
        try:
            n = parse_rate(value)  # type: ignore[arg-type]  # parse_rate rejects other types
        except ValueError as exc:
            r.problem(line_of(node), path, str(exc))
            return BAD
        if n < self.lo:
            r.problem(line_of(node), path, f"must be at least {format_rate(self.lo)}")
            return BAD
        return n

    def dump(self, value: Any) -> Any:
        return format_rate(value)

    def show(self, value: Any) -> str:
        return format_rate(value)


@dataclass(frozen=True)
class Duration:
    """Seconds, written 200ms / 10s / 5m / 1h or as a number; `positive` refuses 0."""

    positive: bool = False

    def read(self, r: Reader, node: Node, path: str) -> Any:
        return r.duration(node, path, positive=self.positive)

    def dump(self, value: Any) -> Any:
        return format_duration(value)

    def show(self, value: Any) -> str:
        return format_duration(value)


@dataclass(frozen=True)
class Choice:
    """One of a few words, matched case-insensitively and stored as spelled here."""

    choices: tuple[str, ...]

    def read(self, r: Reader, node: Node, path: str) -> Any:
        return r.choice(node, path, self.choices)

    def dump(self, value: Any) -> Any:
        return value

    def show(self, value: Any) -> str:
        return str(value)


@dataclass(frozen=True)
class Strings:
    """A list of strings, kept as a tuple."""

    def read(self, r: Reader, node: Node, path: str) -> Any:
        return r.strings(node, path)

    def dump(self, value: Any) -> Any:
        return list(value)

    def show(self, value: Any) -> str:
        return "[" + ", ".join(f'"{v}"' for v in value) + "]"


@dataclass(frozen=True)
class Section:
    """A nested mapping declared by the dataclass `cls`; an absent one takes `cls()`."""

    cls: type

    def read(self, r: Reader, node: Node, path: str) -> Any:
        m = r.mapping(node, path)
        if m is None:
            return BAD
        m.check_keys(keys(self.cls))
        value = build(r, m, self.cls)
        return BAD if value is None else value

    def dump(self, value: Any) -> Any:
        return dump(value)

    def show(self, value: Any) -> str:  # pragma: no cover - sections list their keys
        return ""

    def reference(self, path: str) -> Iterator[tuple[str, str, str]]:
        return reference(self.cls, path)


# --------------------------------------------------------------------------- reading


class Bad:
    """Marker for a value that was reported as a problem; callers fall back to the default."""


BAD = Bad()

_NULL_TAG = "tag:yaml.org,2002:null"
_WORDLIKE_TAGS = ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:int", "tag:yaml.org,2002:float")
_SECRET_KEYS = ("api_key", "api_key_secret", "api_secret")
_SECRET_HINT = (
    "never put the API key itself in the config; name a file (mode 0600) with"
    " cloud.api_key_file, or set EDGED_API_KEY in the environment"
)


class _MarkedLoader(yaml.SafeLoader):
    """SafeLoader used only to compose nodes: nodes carry start marks, so values keep lines."""


def line_of(node: Node) -> int:
    return int(node.start_mark.line) + 1


def join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def describe(value: object) -> str:
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


def hint(word: str, allowed: Collection[str]) -> str:
    """` (did you mean 'x'?)` for the closest allowed word, or nothing."""
    by_lower = {a.lower(): a for a in allowed}
    close = difflib.get_close_matches(word.lower(), list(by_lower), n=1, cutoff=0.6)
    return f" (did you mean {by_lower[close[0]]!r}?)" if close else ""


class Reader:
    """Walk over YAML nodes that reads each kind of value, collecting problems instead
    of raising."""

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
        """The Python value of a scalar node, or BAD (reported) for a mapping or list."""
        if isinstance(node, MappingNode):
            self.problem(line_of(node), path, "expected a single value, got a mapping")
            return BAD
        if isinstance(node, SequenceNode):
            self.problem(line_of(node), path, "expected a single value, got a list")
            return BAD
        try:
            value: object = self.loader.construct_object(node, deep=True)
        except yaml.YAMLError as exc:
            self.problem(line_of(node), path, f"cannot read value: {exc}")
            return BAD
        return value

    def string(self, node: Node, path: str, *, allow_empty: bool = False) -> str | Bad:
        value = self.scalar(node, path)
        if isinstance(value, Bad):
            return value
        if not isinstance(value, str):
            raw = node.value if isinstance(node, ScalarNode) else ""
            quote = f' (quote it: "{raw}")' if raw and value is not None else ""
            self.problem(line_of(node), path, f"expected a string, got {describe(value)}{quote}")
            return BAD
        if not allow_empty and not value.strip():
            self.problem(line_of(node), path, "must not be empty")
            return BAD
        return value

    def boolean(self, node: Node, path: str) -> bool | Bad:
        value = self.scalar(node, path)
        if isinstance(value, Bad):
            return value
        if not isinstance(value, bool):
            self.problem(line_of(node), path, f"expected true or false, got {describe(value)}")
            return BAD
        return value

    def integer(self, node: Node, path: str, lo: int, hi: int | None = None) -> int | Bad:
        value = self.scalar(node, path)
        if isinstance(value, Bad):
            return value
        if isinstance(value, bool) or not isinstance(value, int):
            self.problem(line_of(node), path, f"expected an integer, got {describe(value)}")
            return BAD
        if value < lo or (hi is not None and value > hi):
            limit = f"between {lo} and {hi}" if hi is not None else f"at least {lo}"
            self.problem(line_of(node), path, f"must be {limit}, got {value}")
            return BAD
        return value

    def size(self, node: Node, path: str, lo: int, hi: int | None = None) -> int | Bad:
        value = self.scalar(node, path)
        if isinstance(value, Bad):
            return value
        try:
            n = parse_size(value)  # type: ignore[arg-type]  # parse_size rejects other types
        except ValueError as exc:
            self.problem(line_of(node), path, str(exc))
            return BAD
        if n < lo or (hi is not None and n > hi):
            limit = (
                f"between {format_size(lo)} and {format_size(hi)}"
                if hi is not None
                else f"at least {format_size(lo)}"
            )
            self.problem(line_of(node), path, f"must be {limit}, got {format_size(n)}")
            return BAD
        return n

    def duration(self, node: Node, path: str, *, positive: bool = False) -> float | Bad:
        value = self.scalar(node, path)
        if isinstance(value, Bad):
            return value
        try:
            seconds = parse_duration(value)  # type: ignore[arg-type]  # rejects other types
        except ValueError as exc:
            self.problem(line_of(node), path, str(exc))
            return BAD
        if positive and seconds <= 0:
            self.problem(line_of(node), path, f"must be longer than 0s, got {value!r}")
            return BAD
        return seconds

    def choice(self, node: Node, path: str, choices: Collection[str]) -> str | Bad:
        value: object
        if isinstance(node, ScalarNode) and node.style is None and node.tag in _WORDLIKE_TAGS:
            # Plain text as written: `synchronous: OFF` is YAML's false, but the user meant
            # the word and should hear which words are allowed.
            value = node.value
        else:
            value = self.string(node, path)
            if isinstance(value, Bad):
                return value
        assert isinstance(value, str)
        by_lower = {c.lower(): c for c in choices}
        if value.strip().lower() in by_lower:
            return by_lower[value.strip().lower()]
        self.problem(
            line_of(node),
            path,
            f"{value!r} is not one of {', '.join(choices)}{hint(value, choices)}",
        )
        return BAD

    def path(self, node: Node, path: str) -> Path | Bad:
        value = self.string(node, path)
        if isinstance(value, Bad):
            return value
        if "\0" in value:
            self.problem(line_of(node), path, "paths cannot contain NUL characters")
            return BAD
        if value.startswith("~"):
            self.problem(line_of(node), path, f"{value!r}: '~' is not expanded; use a full path")
            return BAD
        return self.resolve(Path(value))

    def resolve(self, p: Path) -> Path:
        """Relative paths are relative to the config file, not to wherever edged started."""
        return Path(os.path.normpath(self.base_dir / p))

    def strings(self, node: Node, path: str) -> tuple[str, ...] | Bad:
        if not isinstance(node, SequenceNode):
            got = (
                "a mapping" if isinstance(node, MappingNode) else describe(self.scalar(node, path))
            )
            self.problem(
                line_of(node), path, f'expected a list of strings (e.g. ["a", "b"]), got {got}'
            )
            return BAD
        out: list[str] = []
        ok = True
        for i, item in enumerate(node.value):
            s = self.string(item, f"{path}[{i}]")
            if isinstance(s, Bad):
                ok = False
            else:
                out.append(s)
        return tuple(out) if ok else BAD

    # ---- mappings

    def mapping(self, node: Node, path: str) -> Map | None:
        if not isinstance(node, MappingNode):
            got = "a list" if isinstance(node, SequenceNode) else describe(self.scalar(node, path))
            self.problem(line_of(node), path, f"expected a mapping of keys, got {got}")
            return None
        # Flattening resolves `<<: *anchor` merges in place (merged pairs first, so the
        # mapping's own keys win); remember the own keys first, as an aliased node may be
        # visited again already flattened.
        own = self.own_keys.setdefault(id(node), {id(k) for k, _ in node.value})
        try:
            self.loader.flatten_mapping(node)
        except yaml.YAMLError as exc:
            self.problem(line_of(node), path, f"cannot merge: {exc}")
            return None
        return Map(self, node, path, own)

    def empty_map(self, path: str) -> Map:
        """Stands for an absent section: every key takes its default."""
        node = MappingNode("tag:yaml.org,2002:map", [])
        node.start_mark = yaml.Mark(self.source, 0, 0, 0, None, 0)
        return Map(self, node, path, set())


class Map:
    """One YAML mapping: its keys with their nodes, read once against a key table."""

    def __init__(self, reader: Reader, node: MappingNode, path: str, own: set[int]) -> None:
        self.r = reader
        self.node = node
        self.path = path
        self.line = line_of(node)
        self.entries: dict[str, tuple[Node, Node]] = {}
        written_here: set[str] = set()
        for key_node, value_node in node.value:
            key = reader.scalar(key_node, path)
            if isinstance(key, Bad):
                continue
            if not isinstance(key, str):
                reader.problem(
                    line_of(key_node), path, f"keys must be strings, got {describe(key)}"
                )
                continue
            if id(key_node) not in own:  # merged in from an anchor: overridable
                self.entries[key] = (key_node, value_node)
                continue
            if key in written_here:
                first = line_of(self.entries[key][0])
                reader.problem(
                    line_of(key_node), join(path, key), f"duplicate key (first set on line {first})"
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
            where = join(self.path, key)
            if key in _SECRET_KEYS:
                self.r.problem(line_of(key_node), where, _SECRET_HINT)
                continue
            more = hint(key, allowed)
            if not more and elsewhere and key in elsewhere:
                more = f" (it belongs under {elsewhere[key]!r})"
            if not more:
                more = f" (allowed: {', '.join(allowed)})"
            self.r.problem(line_of(key_node), where, f"unknown key {key!r}{more}")

    def get(self, key: str) -> Node | None:
        """The value node, or None when absent or null (null means "use the default")."""
        entry = self.entries.get(key)
        if entry is None:
            return None
        node = entry[1]
        if isinstance(node, ScalarNode) and node.tag == _NULL_TAG:
            return None
        self.r.lines.setdefault(join(self.path, key), line_of(node))
        return node

    def key_line(self, key: str) -> int:
        entry = self.entries.get(key)
        return line_of(entry[0]) if entry else self.line


@runtime_checkable
class HasProblems(Protocol):
    def problems(self, given: Collection[str]) -> Iterator[tuple[str, str]]:
        """(key, message) for each cross-field rule broken; `given` are the keys the
        file set (to tell "absent" from "given but invalid, so defaulted")."""


@dataclass
class Fields:
    """What `read_fields` found: values to build with, keys the file set, and whether
    every key without a default got a value."""

    values: dict[str, Any]
    given: set[str]
    complete: bool


def read_fields(
    r: Reader, m: Map, cls: type, fill: Mapping[str, Any] | None = None, skip: Collection[str] = ()
) -> Fields:
    """Every declared key of `cls` (but `skip`) read from `m`; unknown keys are the
    caller's to check. Absent or invalid keys take their default, or `fill[key]` for
    derived ones; a missing required key is reported."""
    values: dict[str, Any] = {}
    given: set[str] = set()
    complete = True
    for f, opt in declared(cls):
        if f.name in skip:
            continue
        node = m.get(f.name)
        path = join(m.path, f.name)
        if node is not None:
            given.add(f.name)
            value = opt.kind.read(r, node, path)
            if not isinstance(value, Bad):
                if opt.check is not None and (err := opt.check(value)):
                    r.problem(m.key_line(f.name), path, err)
                values[f.name] = value
                continue
            if opt.required is not None:
                complete = False
        elif opt.required is not None:
            r.problem(m.key_line(f.name), path, f"is required ({opt.required})")
            complete = False
        if fill is not None and f.name in fill:
            values[f.name] = fill[f.name]
        elif default_of(f) is MISSING:
            complete = False
    return Fields(values, given, complete)


def build(r: Reader, m: Map, cls: type[T], fill: Mapping[str, Any] | None = None) -> T | None:
    """`cls` read from `m`, then its cross-field `problems` reported at their keys' lines;
    None when a key without default has no value (already reported, or derived from a
    key that was)."""
    found = read_fields(r, m, cls, fill)
    if not found.complete:
        return None
    value = cls(**found.values)
    if isinstance(value, HasProblems):
        for key, message in value.problems(found.given):
            r.problem(m.key_line(key), join(m.path, key), message)
    return value


def _raise(problems: list[tuple[int, str]]) -> None:
    if problems:
        raise ConfigErrors([msg for _, msg in sorted(problems, key=lambda p: p[0])])


def parse_document(
    text: str, source: str, base_dir: Path, read: Callable[[Reader, Map], T | None]
) -> T:
    """`read` applied to the top mapping of the YAML `text`; raises ConfigErrors listing
    every problem, in line order, each as `source:line: key.path: message`."""
    loader = _MarkedLoader(text)
    reader = Reader(loader, source, base_dir)
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
            top = reader.empty_map("")
        else:
            top = reader.mapping(root, "") or reader.empty_map("")
        result = read(reader, top)
    finally:
        loader.dispose()
    _raise(reader.problems)
    assert result is not None  # every path that yields None reports a problem first
    return result


def read_text(path: Path) -> str:
    """The config file's text, or ConfigErrors naming the file and the reason."""
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigErrors([f"{path}: cannot read config: {reason}"]) from exc
