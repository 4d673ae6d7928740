"""Pure translation of the query API's filters and page tokens into SQL.

Each function returns a WHERE clause over `readings` or `binaries` (columns qualified by
table name, so it also fits UPDATE/DELETE and subqueries) plus its parameters. The
caller's organisation is always the first condition and comes from its API key, never
from the request: a filter naming other organisations matches nothing.

Semantics where the wire leaves room:
- strings match exactly; an empty field means "any";
- `interval` is [start, end) on the capture time (time requested, else received, else
  arrival);
- tags: MATCH_BY_OR (or unspecified with tags given) = at least one of the tags; TAGGED =
  any tag; UNTAGGED = none. Binary tags are the live, editable set;
- `mime_type` and `bbox_labels` concern binary data: on readings, mime types are
  ignored and bounding-box labels match nothing (readings have no boxes).
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass, field
from typing import Any

from edged._proto.app.data.v1 import data_pb2 as dpb

READINGS = "readings"
BINARIES = "binaries"
_TOKEN_PREFIX = "e1."


class FilterError(ValueError):
    """A filter or token the server cannot honour; the message names the field."""


@dataclass(frozen=True)
class Where:
    sql: str
    params: tuple[Any, ...]


@dataclass
class _Builder:
    """Conditions ANDed together; the first is always the caller's organisation, so no
    `Where` can leave this module unscoped."""

    table: str
    org_id: str
    parts: list[str] = field(default_factory=list)
    params: list[Any] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.add("$.org_id = ?", self.org_id)

    def add(self, sql: str, *params: Any) -> None:
        for value in params:  # no index can hold one, and PostgreSQL refuses to look one up
            if isinstance(value, str) and "\x00" in value:
                raise FilterError(f"filter value {value!r} contains a NUL character (U+0000)")
        self.parts.append(sql.replace("$", self.table))
        self.params.extend(params)

    def equal(self, column: str, value: str) -> None:
        if value:
            self.add(f"$.{column} = ?", value)

    def one_of(self, column: str, values: list[str]) -> None:
        if values:
            self.add(f"$.{column} IN ({_marks(values)})", *values)

    def build(self) -> Where:
        return Where(" AND ".join(self.parts), tuple(self.params))


def _marks(values: list[str]) -> str:
    return ",".join("?" * len(values))


# google.protobuf.Timestamp's valid range, 0001-01-01 to 9999-12-31; int64 ns reach only
# 1677-2262, so an instant outside that is clamped (it compares the same against any
# stored time).
_TS_SECONDS = (-62_135_596_800, 253_402_300_799)
_INT64 = (-(2**63), 2**63 - 1)


def _ns(ts: Any, where: str = "filter.interval") -> int:
    """Timestamp as ns, clamped into int64; FilterError outside Timestamp's own range."""
    if not _TS_SECONDS[0] <= ts.seconds <= _TS_SECONDS[1] or not 0 <= ts.nanos < 10**9:
        raise FilterError(f"{where} is outside the valid timestamp range (years 1 to 9999)")
    return min(max(int(ts.seconds) * 1_000_000_000 + int(ts.nanos), _INT64[0]), _INT64[1])


def _scope(b: _Builder, organization_ids: list[str]) -> None:
    """A filter naming only other organisations matches nothing (the builder already
    holds the caller's org)."""
    if organization_ids and b.org_id not in organization_ids:
        b.add("1 = 0")  # not a bare 0: PostgreSQL wants a boolean


def _tags(b: _Builder, tf: dpb.TagsFilter, where: str) -> None:
    kind, tags = tf.type, [t for t in tf.tags if t]
    if kind not in dpb.TagsFilterType.values():
        raise FilterError(f"{where}.type {kind} is not a TagsFilterType")
    if kind == dpb.TAGS_FILTER_TYPE_TAGGED:
        sql = "$.tags <> '[]'" if b.table == READINGS else _has_tag("EXISTS")
        b.add(sql)
    elif kind == dpb.TAGS_FILTER_TYPE_UNTAGGED:
        sql = "$.tags = '[]'" if b.table == READINGS else _has_tag("NOT EXISTS")
        b.add(sql)
    elif tags:  # MATCH_BY_OR, or unspecified with tags given
        if b.table == READINGS:
            b.add(
                f"EXISTS (SELECT 1 FROM json_each($.tags) WHERE value IN ({_marks(tags)}))", *tags
            )
        else:
            b.add(
                f"$.binary_data_id IN (SELECT binary_data_id FROM binary_tags"
                f" WHERE tag IN ({_marks(tags)}))",
                *tags,
            )


def _has_tag(op: str) -> str:
    return f"{op} (SELECT 1 FROM binary_tags t WHERE t.binary_data_id = $.binary_data_id)"


def _interval(b: _Builder, f: dpb.Filter) -> None:
    if not f.HasField("interval"):
        return
    iv = f.interval  # a zero timestamp means "unset", as some clients send it
    start = _ns(iv.start, "filter.interval.start") or None if iv.HasField("start") else None
    end = _ns(iv.end, "filter.interval.end") or None if iv.HasField("end") else None
    if start is not None and end is not None and start >= end:
        raise FilterError("filter.interval.start must be before filter.interval.end")
    if start is not None:
        b.add("$.time_captured_ns >= ?", start)
    if end is not None:
        b.add("$.time_captured_ns < ?", end)


def _common(b: _Builder, f: dpb.Filter) -> None:
    _scope(b, list(f.organization_ids))
    b.equal("component_name", f.component_name)
    b.equal("component_type", f.component_type)
    b.equal("method_name", f.method)
    b.equal("robot_name", f.robot_name)
    b.equal("robot_id", f.robot_id)
    b.equal("part_name", f.part_name)
    b.equal("part_id", f.part_id)
    b.one_of("location_id", list(f.location_ids))
    _interval(b, f)
    if f.HasField("tags_filter"):
        _tags(b, f.tags_filter, "filter.tags_filter")


def reading_where(f: dpb.Filter | None, org_id: str) -> Where:
    """Tabular readings matching `f` within the caller's organisation."""
    b = _Builder(READINGS, org_id)
    f = f if f is not None else dpb.Filter()
    _common(b, f)
    if [x for x in f.bbox_labels if x]:
        b.add("1 = 0")  # not a bare 0: PostgreSQL wants a boolean
    if f.dataset_id:
        b.add("EXISTS (SELECT 1 FROM json_each($.dataset_ids) WHERE value = ?)", f.dataset_id)
    return b.build()


def binary_where(f: dpb.Filter | None, org_id: str) -> Where:
    """Binary data (images, point clouds, files) matching `f` within the organisation."""
    b = _Builder(BINARIES, org_id)
    f = f if f is not None else dpb.Filter()
    _common(b, f)
    b.one_of("mime_type", [m for m in f.mime_type if m])
    labels = [x for x in f.bbox_labels if x]
    if labels:
        b.add(
            f"$.binary_data_id IN (SELECT binary_data_id FROM bboxes"
            f" WHERE label IN ({_marks(labels)}))",
            *labels,
        )
    if f.dataset_id:
        b.add(
            "$.binary_data_id IN (SELECT binary_data_id FROM dataset_members WHERE dataset_id = ?)",
            f.dataset_id,
        )
    return b.build()


def delete_tabular_where(
    f: dpb.DeleteTabularFilter | None, org_id: str, captured_before_ns: int | None
) -> Where:
    """DeleteTabularData: readings captured before the cutoff (None = any time) in scope."""
    b = _Builder(READINGS, org_id)
    if captured_before_ns is not None:
        b.add("$.time_captured_ns < ?", captured_before_ns)
    if f is not None:
        b.one_of("location_id", list(f.location_ids))
        b.equal("robot_id", f.robot_id)
        b.equal("part_id", f.part_id)
        b.equal("component_type", f.component_type)
        b.equal("component_name", f.component_name)
        b.equal("method_name", f.method)
        if f.HasField("tags_filter"):
            _tags(b, f.tags_filter, "filter.tags_filter")
    return b.build()


# -- paging ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cursor:
    """Position after the last item returned: (capture time, rowid) is unique and fixed
    once stored, so pages stay free of duplicates and gaps while uploads continue."""

    time_captured_ns: int
    rowid: int


def encode_token(cursor: Cursor) -> str:
    raw = f"{cursor.time_captured_ns}:{cursor.rowid}".encode()
    return _TOKEN_PREFIX + base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_token(token: str) -> Cursor | None:
    """The cursor in a `last` token; None for ""; FilterError for anything we did not issue."""
    if not token:
        return None
    bad = FilterError("data_request.last is not a page token this server issued")
    if not token.startswith(_TOKEN_PREFIX):
        raise bad
    body = token[len(_TOKEN_PREFIX) :]
    try:
        text = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)).decode()
        when, _, rowid = text.partition(":")
        cursor = Cursor(int(when), int(rowid))
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise bad from None
    if not all(_INT64[0] <= v <= _INT64[1] for v in (cursor.time_captured_ns, cursor.rowid)):
        raise bad
    return cursor


def page_clause(table: str, order: int, cursor: Cursor | None) -> tuple[str, tuple[Any, ...], str]:
    """(extra WHERE, its params, ORDER BY) for one page; ascending unless told otherwise."""
    if order not in dpb.Order.values():
        raise FilterError(f"data_request.sort_order {order} is not an Order")
    desc = order == dpb.ORDER_DESCENDING
    direction = "DESC" if desc else "ASC"
    order_by = f"{table}.time_captured_ns {direction}, {table}.rowid {direction}"
    if cursor is None:
        return "", (), order_by
    op = "<" if desc else ">"
    return (
        f"({table}.time_captured_ns, {table}.rowid) {op} (?, ?)",
        (cursor.time_captured_ns, cursor.rowid),
        order_by,
    )
