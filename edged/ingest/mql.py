"""A documented subset of MongoDB aggregation over the ingest readings (TabularDataByMQL).

Each reading of the organisation is one document shaped like the cloud's readings
collection. A leading `$match` is translated, conservatively, into SQL on the indexed
table so selective queries do not parse every row; every stage (that `$match` too) is
then evaluated in Python over rows streamed from a cursor, so SQL only ever narrows
and the answer is the pure evaluator's. See docs/query-language.md.
"""

from __future__ import annotations

import heapq
import itertools
import math
import re
import sqlite3
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import bson
from bson.codec_options import CodecOptions
from bson.errors import BSONError

from edged.ingest.limits import LimitExceeded, QueryControl, QueryLimits
from edged.ingest.sql import DEFAULT_TIMEOUT_S, loads_json, open_readonly
from edged.ingest.values import decode_python

Doc = dict[str, Any]
Pred = Callable[[Doc], bool]
Expr = Callable[[Doc], Any]
Stage = Callable[[Iterator[Doc]], Iterator[Doc]]

MAX_SORT_DOCS = 500_000  # a $sort without a following $limit holds this many at most
MAX_STAGES = 200  # stages chain generators: far below the recursion limit
MAX_DEPTH = 64  # nesting of a stage document: compiling it recurses
_DEFAULTS = QueryLimits()
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_US = timedelta(microseconds=1)
_INT64 = (-(2**63), 2**63 - 1)
_CODEC: CodecOptions[dict[str, Any]] = CodecOptions(tz_aware=True, tzinfo=UTC)


class MqlRejected(Exception):
    """The pipeline uses something unsupported or is malformed; the message says what."""


class MqlLimitExceeded(MqlRejected, LimitExceeded):
    """The pipeline or its answer ran into a bound (size, nesting, time); RESOURCE_EXHAUSTED."""


class _Missing:
    """A path that leads nowhere (distinct from null, as in MongoDB)."""

    def __repr__(self) -> str:
        return "MISSING"


MISSING: Any = _Missing()

STAGES = (
    "$match",
    "$project",
    "$addFields",
    "$set",
    "$unset",
    "$sort",
    "$limit",
    "$skip",
    "$count",
    "$group",
)
QUERY_OPERATORS = (
    "$eq",
    "$ne",
    "$gt",
    "$gte",
    "$lt",
    "$lte",
    "$in",
    "$nin",
    "$exists",
    "$not",
    "$and",
    "$or",
    "$nor",
)
ACCUMULATORS = ("$sum", "$avg", "$min", "$max", "$count", "$first", "$last", "$push", "$addToSet")

# Document fields stored as plain columns: pushdown targets.
STRING_COLUMNS = {
    "organization_id": "org_id",
    "location_id": "location_id",
    "robot_id": "robot_id",
    "robot_name": "robot_name",
    "part_id": "part_id",
    "part_name": "part_name",
    "component_type": "component_type",
    "component_name": "component_name",
    "method_name": "method_name",
}
TIME_COLUMNS = {"time_requested": "time_requested_ns", "time_received": "time_received_ns"}
_ROW_COLUMNS = (
    "id, org_id, location_id, robot_id, robot_name, part_id, part_name, component_type,"
    " component_name, method_name, time_requested_ns, time_received_ns, tags, data, data_exact"
)


def _supported(kind: str, names: Iterable[str]) -> str:
    return f"supported {kind}: {', '.join(names)}"


# ---------------------------------------------------------------- decoding


def decode_pipeline(mql_binary: list[bytes]) -> list[Doc]:
    """BSON stage documents as dicts; datetimes come back UTC-aware."""
    out: list[Doc] = []
    for i, raw in enumerate(mql_binary):
        try:
            out.append(dict(bson.decode(raw, codec_options=_CODEC)))
        except (BSONError, ValueError, TypeError, OverflowError, IndexError) as e:
            raise MqlRejected(f"pipeline stage {i} is not a valid BSON document ({e})") from None
    return out


def _aware(value: Any) -> Any:
    """Naive datetimes (pymongo's default decoding) are UTC, as BSON dates always are."""
    if isinstance(value, datetime):
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    if isinstance(value, dict):
        return {k: _aware(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_aware(v) for v in value]
    return value


def ns_to_datetime(ns: int | None) -> datetime | None:
    return None if ns is None else _EPOCH + timedelta(microseconds=ns // 1000)


def row_to_doc(row: tuple[Any, ...]) -> Doc:
    """A `readings` row (in _ROW_COLUMNS order) as the cloud-shaped document."""
    return {
        "_id": str(row[0]),
        "organization_id": row[1],
        "location_id": row[2],
        "robot_id": row[3],
        "robot_name": row[4],
        "part_id": row[5],
        "part_name": row[6],
        "component_type": row[7],
        "component_name": row[8],
        "method_name": row[9],
        "time_requested": ns_to_datetime(row[10]),
        "time_received": ns_to_datetime(row[11]),
        "tags": loads_json(row[12]),
        "data": decode_python(row[13], row[14]),
    }


# ---------------------------------------------------------------- bounds


def check_pipeline_size(pipeline: Any, max_nodes: int) -> None:
    """Refuse pipelines too large or deep to compile safely, before compiling (which
    recurses). Walks iteratively, so any input is safe to measure; a refusal names the
    stage (`mql_binary[i]`) it found too big or deep."""
    if isinstance(pipeline, list) and len(pipeline) > MAX_STAGES:
        raise MqlLimitExceeded(f"mql_binary: the pipeline has more than {MAX_STAGES} stages")
    stages = list(pipeline) if isinstance(pipeline, list) else [pipeline]
    nodes = 1
    stack: list[tuple[Any, int, int]] = [(stage, 1, i) for i, stage in enumerate(stages)]
    while stack:
        value, depth, stage = stack.pop()
        nodes += 1
        if nodes > max_nodes:
            raise MqlLimitExceeded(
                f"mql_binary[{stage}]: the pipeline has more than {max_nodes} values"
                " (--query-max-pipeline-nodes)"
            )
        if depth > MAX_DEPTH:
            raise MqlLimitExceeded(
                f"mql_binary[{stage}]: the pipeline nests deeper than {MAX_DEPTH} levels"
            )
        if isinstance(value, dict):
            stack.extend((v, depth + 1, stage) for v in value.values())
        elif isinstance(value, list | tuple):
            stack.extend((v, depth + 1, stage) for v in value)


def _leaf_size(v: Any) -> int:
    if isinstance(v, str):
        return 6 + (len(v) if v.isascii() else len(v.encode("utf-8", "surrogatepass")))
    if isinstance(v, bytes):
        return 6 + len(v)
    return 10


def encoded_size(value: Any, limit: int) -> int:
    """About the BSON size of `value`, counting a shared subtree every time it occurs
    (as encoding would) but measuring it once: cost is the number of distinct nodes, so
    expressions that reference each other cannot make measuring explode. Sizes are
    clipped at limit + 1."""
    sizes: dict[int, int] = {}
    stack: list[tuple[Any, bool]] = [(value, False)]
    while stack:
        node, ready = stack.pop()
        if not isinstance(node, dict | list | tuple):
            continue
        if not ready:
            if id(node) in sizes:
                continue
            sizes[id(node)] = 0
            stack.append((node, True))
            children = node.values() if isinstance(node, dict) else node
            stack.extend((c, False) for c in children if isinstance(c, dict | list | tuple))
            continue
        total = 5
        if isinstance(node, dict):
            items: Iterable[tuple[Any, Any]] = node.items()
        else:
            items = enumerate(node)
        for k, c in items:
            total += len(str(k)) + 2
            total += sizes[id(c)] if isinstance(c, dict | list | tuple) else _leaf_size(c)
            if total > limit:
                break
        sizes[id(node)] = min(total, limit + 1)
    if isinstance(value, dict | list | tuple):
        return sizes[id(value)]
    return min(_leaf_size(value), limit + 1)


def _bounded_docs(stage: Stage, index: int, name: str, max_doc_bytes: int) -> Stage:
    """A computing stage whose every output document must stay under `max_doc_bytes`."""

    def run(docs: Iterator[Doc]) -> Iterator[Doc]:
        for doc in stage(docs):
            if encoded_size(doc, max_doc_bytes) > max_doc_bytes:
                raise MqlLimitExceeded(
                    f"stage {index} ({name}) would make a document larger than"
                    f" {max_doc_bytes} bytes (--query-max-value-bytes)"
                )
            yield doc

    return run


# ---------------------------------------------------------------- value semantics

# MongoDB's cross-type order: null < numbers < strings < objects < arrays < binary < bool
# < dates; anything else BSON can carry sorts last.
_R_NULL = 1
_R_NUM = 2
_R_STR = 3
_R_DOC = 4
_R_ARR = 5
_R_BIN = 6
_R_BOOL = 8
_R_DATE = 9
_R_OTHER = 10


# Python type -> rank, tried in this order: bool first, as a bool is also an int.
_RANK_OF_TYPE: tuple[tuple[type | tuple[type, ...], int], ...] = (
    (bool, _R_BOOL),
    ((int, float), _R_NUM),
    (str, _R_STR),
    (dict, _R_DOC),
    ((list, tuple), _R_ARR),
    (bytes, _R_BIN),
    (datetime, _R_DATE),
)


def _rank(v: Any) -> int:
    """MongoDB's cross-type order: null < numbers < strings < objects < arrays < ... < dates."""
    if v is None or v is MISSING:
        return _R_NULL
    for types, rank in _RANK_OF_TYPE:
        if isinstance(v, types):
            return rank
    return _R_OTHER


def sort_key(v: Any) -> tuple[Any, ...]:
    """A total order over BSON-ish values (NaN first among numbers, as MongoDB does)."""
    return _key(v, tuple)


def _key(v: Any, fields: Callable[[Iterator[tuple[str, Any]]], Any]) -> tuple[Any, ...]:
    """sort_key, or freeze's hashable key: the same but for how `fields` holds a
    document's (name, key) pairs (in order for sorting, as a set for equality)."""
    r = _rank(v)
    if r == _R_NUM:
        return (r, 0, 0) if _is_nan(v) else (r, 1, v)
    if r == _R_DOC:
        return (r, fields((k, _key(x, fields)) for k, x in v.items()))
    if r == _R_ARR:
        return (r, tuple(_key(x, fields) for x in v))
    if r == _R_NULL:
        return (r,)
    if r == _R_OTHER:
        return (r, type(v).__name__, str(v))
    return (r, v)


def _is_nan(v: Any) -> bool:
    return isinstance(v, float) and math.isnan(v)


def values_equal(a: Any, b: Any) -> bool:
    """MongoDB equality: 1 == 1.0, True != 1, NaN == NaN, documents compared key by key."""
    ra, rb = _rank(a), _rank(b)
    if ra != rb:
        return False
    if ra == _R_ARR:
        return len(a) == len(b) and all(values_equal(x, y) for x, y in zip(a, b, strict=True))
    if ra == _R_DOC:
        return a.keys() == b.keys() and all(values_equal(a[k], b[k]) for k in a)
    if ra == _R_NULL:
        return True
    if _is_nan(a):
        return _is_nan(b)
    return bool(a == b)


def freeze(v: Any) -> Any:
    """A hashable stand-in with the same equality as values_equal (group keys, sets):
    field order does not matter and every NaN is one key."""
    return _key(v, frozenset)


def lookup(value: Any, parts: list[str]) -> list[Any]:
    """Every value a dotted query path reaches (arrays traversed as MongoDB does)."""
    if not parts:
        return [value]
    head, rest = parts[0], parts[1:]
    if isinstance(value, dict):
        return lookup(value[head], rest) if head in value else []
    if isinstance(value, list):
        out: list[Any] = []
        if head.isdigit() and int(head) < len(value):
            out.extend(lookup(value[int(head)], rest))
        for el in value:
            if isinstance(el, dict):
                out.extend(lookup(el, parts))
        return out
    return []


def get_path(value: Any, parts: list[str]) -> Any:
    """A `$a.b` expression's value: dict keys; through arrays, the array of results."""
    for i, part in enumerate(parts):
        if isinstance(value, dict):
            if part not in value:
                return MISSING
            value = value[part]
        elif isinstance(value, list):
            got = [get_path(el, parts[i:]) for el in value if isinstance(el, dict)]
            return [g for g in got if g is not MISSING]
        else:
            return MISSING
    return value


def set_path(doc: Doc, parts: list[str], value: Any) -> None:
    for part in parts[:-1]:
        nxt = doc.get(part)
        if not isinstance(nxt, dict):
            nxt = {}
            doc[part] = nxt
        doc = nxt
    doc[parts[-1]] = value


def _split(path: Any, what: str) -> list[str]:
    if not isinstance(path, str) or not path or path.startswith("$") or "" in path.split("."):
        raise MqlRejected(f"{what} {path!r} is not a valid field path")
    return path.split(".")


# ---------------------------------------------------------------- $match


def _is_operator_doc(cond: Any) -> bool:
    if not isinstance(cond, dict) or not cond:
        return False
    dollar = [k.startswith("$") for k in cond]
    if any(dollar) and not all(dollar):
        raise MqlRejected("a condition cannot mix $operators and field names")
    return all(dollar)


def compile_filter(spec: Any) -> Pred:
    """A $match document as a predicate; unknown operators are rejected up front."""
    if not isinstance(spec, dict):
        raise MqlRejected("$match takes a document")
    preds: list[Pred] = []
    for key, cond in spec.items():
        if key in ("$and", "$or", "$nor"):
            if not isinstance(cond, list) or not cond:
                raise MqlRejected(f"{key} takes a non-empty array of documents")
            subs = [compile_filter(c) for c in cond]
            preds.append(_combine(key, subs))
        elif key.startswith("$"):
            raise MqlRejected(
                f"query operator {key} is not supported; {_supported('operators', QUERY_OPERATORS)}"
            )
        else:
            preds.append(_field_pred(_split(key, "field"), cond))
    if len(preds) == 1:
        return preds[0]
    return lambda d: all(p(d) for p in preds)


def _combine(op: str, subs: list[Pred]) -> Pred:
    if op == "$and":
        return lambda d: all(p(d) for p in subs)
    if op == "$or":
        return lambda d: any(p(d) for p in subs)
    return lambda d: not any(p(d) for p in subs)


def _field_pred(parts: list[str], cond: Any) -> Pred:
    if _is_operator_doc(cond):
        ops = [_operator_pred(parts, op, arg) for op, arg in cond.items()]
        return ops[0] if len(ops) == 1 else (lambda d: all(p(d) for p in ops))
    return _positive(parts, lambda v: values_equal(v, cond), on_missing=cond is None)


def _positive(parts: list[str], match: Callable[[Any], bool], *, on_missing: bool) -> Pred:
    """Field-level test: any reached value (or, for arrays, any element) matches."""

    def pred(doc: Doc) -> bool:
        found = lookup(doc, parts)
        if not found:
            return on_missing
        for v in found:
            if match(v):
                return True
            if isinstance(v, list) and any(match(e) for e in v):
                return True
        return False

    return pred


_CMP: dict[str, Callable[[tuple[Any, ...], tuple[Any, ...]], bool]] = {
    "$gt": lambda a, b: a > b,
    "$gte": lambda a, b: a >= b,
    "$lt": lambda a, b: a < b,
    "$lte": lambda a, b: a <= b,
}


def _operator_pred(parts: list[str], op: str, arg: Any) -> Pred:
    if op == "$eq":
        return _positive(parts, lambda v: values_equal(v, arg), on_missing=arg is None)
    if op == "$ne":
        eq = _positive(parts, lambda v: values_equal(v, arg), on_missing=arg is None)
        return lambda d: not eq(d)
    if op in _CMP:
        cmp = _CMP[op]
        if arg is None:  # {$gte: null} is equality with null; {$gt: null} matches nothing
            if op in ("$gte", "$lte"):
                return _positive(parts, lambda v: v is None, on_missing=True)
            return lambda d: False
        key, rank = sort_key(arg), _rank(arg)
        return _positive(
            parts, lambda v: _rank(v) == rank and cmp(sort_key(v), key), on_missing=False
        )
    if op in ("$in", "$nin"):
        if not isinstance(arg, list):
            raise MqlRejected(f"{op} takes an array")
        frozen = {freeze(a) for a in arg}
        has_null = any(a is None for a in arg)
        pos = _positive(parts, lambda v: freeze(v) in frozen, on_missing=has_null)
        return pos if op == "$in" else (lambda d: not pos(d))
    if op == "$exists":
        want = bool(arg)
        return lambda d: bool(lookup(d, parts)) == want
    if op == "$not":
        if not _is_operator_doc(arg):
            raise MqlRejected("$not takes a document of operators, e.g. {'$not': {'$gt': 5}}")
        inner = _field_pred(parts, arg)
        return lambda d: not inner(d)
    raise MqlRejected(
        f"query operator {op} is not supported; {_supported('operators', QUERY_OPERATORS)}"
    )


# ---------------------------------------------------------------- expressions


def compile_expr(expr: Any) -> Expr:
    """'$path', {'$literal': x}, an object of expressions, an array, or a constant."""
    if isinstance(expr, str) and expr.startswith("$$"):
        raise MqlRejected(f"variable {expr} is not supported")
    if isinstance(expr, str) and expr.startswith("$"):
        parts = _split(expr[1:], "expression")
        return lambda d: get_path(d, parts)
    if isinstance(expr, dict):
        keys = list(expr)
        if keys and keys[0].startswith("$"):
            if keys == ["$literal"]:
                lit = expr["$literal"]
                return lambda d: lit
            raise MqlRejected(
                f"expression operator {keys[0]} is not supported;"
                " use '$field' paths or {'$literal': value}"
            )
        fields = [(k, compile_expr(v)) for k, v in expr.items()]
        return lambda d: {k: v for k, f in fields if (v := f(d)) is not MISSING}
    if isinstance(expr, list):
        items = [compile_expr(e) for e in expr]
        return lambda d: [None if (v := f(d)) is MISSING else v for f in items]
    return lambda d: expr


# ---------------------------------------------------------------- stages


def _flatten(spec: Doc, prefix: str = "") -> list[tuple[str, Any]]:
    """{'data': {'readings': 1}} -> [('data.readings', 1)]; operator docs stay values."""
    out: list[tuple[str, Any]] = []
    for k, v in spec.items():
        path = f"{prefix}{k}"
        if isinstance(v, dict) and v and not any(str(x).startswith("$") for x in v):
            out.extend(_flatten(v, path + "."))
        else:
            out.append((path, v))
    return out


def _extract(value: Any, parts: list[str]) -> Any:
    if not parts:
        return value
    if isinstance(value, dict) and parts[0] in value:
        sub = _extract(value[parts[0]], parts[1:])
        return MISSING if sub is MISSING else {parts[0]: sub}
    return MISSING


def _merge(into: Doc, piece: Doc) -> None:
    for k, v in piece.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            _merge(into[k], v)
        else:
            into[k] = v


def _copy_without(doc: Any, parts: list[str]) -> Any:
    if not isinstance(doc, dict) or parts[0] not in doc:
        return doc
    out = dict(doc)
    if len(parts) == 1:
        del out[parts[0]]
    else:
        out[parts[0]] = _copy_without(out[parts[0]], parts[1:])
    return out


def _exclusion(paths: list[list[str]]) -> Stage:
    def run(docs: Iterator[Doc]) -> Iterator[Doc]:
        for doc in docs:
            out = doc
            for p in paths:
                out = _copy_without(out, p)
            yield out

    return run


def _project(spec: Any) -> Stage:
    if not isinstance(spec, dict) or not spec:
        raise MqlRejected("$project takes a non-empty document")
    include: list[list[str]] = []
    exclude: list[list[str]] = []
    computed: list[tuple[list[str], Expr]] = []
    keep_id = True
    for path, v in _flatten(spec):
        parts = _split(path, "field")
        flag = v if isinstance(v, bool) else (v != 0 if isinstance(v, int | float) else None)
        if path == "_id" and flag is not None:
            keep_id = bool(flag)
        elif flag is True:
            include.append(parts)
        elif flag is False:
            exclude.append(parts)
        else:
            computed.append((parts, compile_expr(v)))
    if exclude and (include or computed):
        raise MqlRejected("$project cannot mix inclusion and exclusion (except of _id)")
    if not include and not computed:
        return _exclusion(exclude + ([] if keep_id else [["_id"]]))

    def run(docs: Iterator[Doc]) -> Iterator[Doc]:
        for d in docs:
            out: Doc = {"_id": d["_id"]} if keep_id and "_id" in d else {}
            for parts in include:
                piece = _extract(d, parts)
                if piece is not MISSING:
                    _merge(out, piece)
            _set_computed(out, d, computed)
            yield out

    return run


def _add_fields(spec: Any, name: str) -> Stage:
    if not isinstance(spec, dict) or not spec:
        raise MqlRejected(f"{name} takes a non-empty document")
    fields = [(_split(path, "field"), compile_expr(v)) for path, v in _flatten(spec)]

    def run(docs: Iterator[Doc]) -> Iterator[Doc]:
        for d in docs:
            out = json_copy(d)
            _set_computed(out, d, fields)
            yield out

    return run


def _set_computed(out: Doc, d: Doc, fields: list[tuple[list[str], Expr]]) -> None:
    """Each field computed from `d` into `out`; one that comes out missing is left unset."""
    for parts, fn in fields:
        value = fn(d)
        if value is not MISSING:
            set_path(out, parts, value)


def json_copy(d: Doc) -> Doc:
    """Copy the nested dicts a stage may write into; leaves are immutable or fresh."""
    return {k: json_copy(v) if isinstance(v, dict) else v for k, v in d.items()}


def _unset(spec: Any) -> Stage:
    paths = spec if isinstance(spec, list) else [spec]
    if not paths:
        raise MqlRejected("$unset takes a field path or a non-empty array of them")
    return _exclusion([_split(p, "field") for p in paths])


class SortKey:
    """Orders documents by several (path, direction) keys; usable by sorted and heapq."""

    __slots__ = ("dirs", "keys")

    def __init__(self, keys: tuple[tuple[Any, ...], ...], dirs: tuple[int, ...]) -> None:
        self.keys, self.dirs = keys, dirs

    def __lt__(self, other: SortKey) -> bool:
        for a, b, direction in zip(self.keys, other.keys, self.dirs, strict=True):
            if a != b:
                return (a < b) if direction > 0 else (a > b)
        return False


def _sort_spec(spec: Any) -> Callable[[Doc], SortKey]:
    if not isinstance(spec, dict) or not spec:
        raise MqlRejected("$sort takes a non-empty document of field: 1 or -1")
    paths: list[list[str]] = []
    dirs: list[int] = []
    for path, direction in spec.items():
        if isinstance(direction, bool) or direction not in (1, -1):
            raise MqlRejected(f"$sort direction for {path!r} must be 1 or -1")
        paths.append(_split(path, "field"))
        dirs.append(int(direction))
    frozen_dirs = tuple(dirs)

    def key(d: Doc) -> SortKey:
        return SortKey(tuple(sort_key(get_path(d, p)) for p in paths), frozen_dirs)

    return key


def _sort(spec: Any, limit: int | None) -> Stage:
    key = _sort_spec(spec)

    def run(docs: Iterator[Doc]) -> Iterator[Doc]:
        if limit is not None:  # top-k: memory bounded by the limit
            yield from heapq.nsmallest(limit, docs, key=key)
            return
        held = list(itertools.islice(docs, MAX_SORT_DOCS + 1))
        if len(held) > MAX_SORT_DOCS:
            raise MqlRejected(
                f"$sort would hold more than {MAX_SORT_DOCS} documents;"
                " narrow it with $match or follow it with $limit"
            )
        held.sort(key=key)
        yield from held

    return run


def _count_arg(value: Any, name: str, minimum: int) -> int:
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if ok and isinstance(value, float):
        ok = value.is_integer()
    if not ok or not minimum <= int(value) <= _INT64[1]:
        raise MqlRejected(f"{name} takes an integer from {minimum} to {_INT64[1]}")
    return int(value)


def _count(name: Any) -> Stage:
    if not isinstance(name, str) or not name or name.startswith("$") or "." in name:
        raise MqlRejected("$count takes a field name (not empty, no '$' prefix, no '.')")

    def run(docs: Iterator[Doc]) -> Iterator[Doc]:
        n = sum(1 for _ in docs)
        if n:  # as MongoDB: no input, no output document
            yield {name: n}

    return run


def _number_total(total: float, all_int: bool) -> int | float:
    if all_int and _INT64[0] <= total <= _INT64[1]:
        return int(total)
    return float(total)


class _Acc:
    """One accumulator's state for one group."""

    __slots__ = ("count", "has", "ints", "items", "op", "seen", "total", "value")

    def __init__(self, op: str) -> None:
        self.op = op
        self.total: int | float = 0
        self.ints = True
        self.count = 0
        self.has = False
        self.value: Any = None
        self.items: list[Any] = []
        self.seen: set[Any] = set()

    def add(self, v: Any) -> None:
        op = self.op
        if op == "$count":
            self.count += 1
        elif op in ("$sum", "$avg"):
            if _rank(v) == _R_NUM:
                self.total += v
                self.ints = self.ints and isinstance(v, int)
                self.count += 1
        elif op in ("$min", "$max"):
            if v is not None and v is not MISSING:
                better = (
                    not self.has
                    or (op == "$min" and sort_key(v) < sort_key(self.value))
                    or (op == "$max" and sort_key(v) > sort_key(self.value))
                )
                if better:
                    self.value, self.has = v, True
        elif op == "$first":
            if not self.has:
                self.value, self.has = (None if v is MISSING else v), True
        elif op == "$last":
            self.value = None if v is MISSING else v
        elif op == "$push":
            if v is not MISSING:
                self.items.append(v)
        elif op == "$addToSet" and v is not MISSING:
            k = freeze(v)
            if k not in self.seen:
                self.seen.add(k)
                self.items.append(v)

    def result(self) -> Any:
        op = self.op
        if op == "$count":
            return self.count
        if op == "$sum":
            return _number_total(self.total, self.ints)
        if op == "$avg":
            return self.total / self.count if self.count else None
        if op in ("$push", "$addToSet"):
            return self.items
        return self.value


def _group(spec: Any) -> Stage:
    if not isinstance(spec, dict) or "_id" not in spec:
        raise MqlRejected("$group takes a document with an _id expression")
    id_fn = compile_expr(spec["_id"])
    accs: list[tuple[str, str, Expr]] = []
    for name, acc in spec.items():
        if name == "_id":
            continue
        if "." in name or name.startswith("$"):
            raise MqlRejected(f"$group output field {name!r} cannot contain '.' or start with '$'")
        if not isinstance(acc, dict) or len(acc) != 1:
            raise MqlRejected(f"$group field {name!r} takes one accumulator, e.g. {{'$sum': 1}}")
        ((op, arg),) = acc.items()
        if op not in ACCUMULATORS:
            raise MqlRejected(
                f"accumulator {op} is not supported; {_supported('accumulators', ACCUMULATORS)}"
            )
        if op == "$count" and arg != {}:
            raise MqlRejected("$count as an accumulator takes {}")
        accs.append((name, op, compile_expr(arg)))

    def run(docs: Iterator[Doc]) -> Iterator[Doc]:
        groups: dict[Any, tuple[Any, list[_Acc]]] = {}
        for d in docs:
            gid = id_fn(d)
            gid = None if gid is MISSING else gid
            k = freeze(gid)
            entry = groups.get(k)
            if entry is None:
                entry = groups[k] = (gid, [_Acc(op) for _, op, _ in accs])
            for state, (_, _, fn) in zip(entry[1], accs, strict=True):
                state.add(fn(d))
        for gid, states in groups.values():
            out: Doc = {"_id": gid}
            for state, (name, _, _) in zip(states, accs, strict=True):
                out[name] = state.result()
            yield out

    return run


def _slice(start: int, stop: int | None) -> Stage:
    return lambda docs: itertools.islice(docs, start, stop)


def _match(spec: Any) -> Stage:
    pred = compile_filter(spec)
    return lambda docs: (d for d in docs if pred(d))


_COMPUTING = frozenset({"$project", "$addFields", "$set", "$group"})


def compile_pipeline(
    pipeline: list[Doc], max_doc_bytes: int = _DEFAULTS.max_value_bytes
) -> list[Stage]:
    """Validate every stage before any row is read; each stage maps a doc stream.

    Stages that compute values have each output document's size checked, so values
    that reference each other cannot grow a document without bound."""
    if not isinstance(pipeline, list):
        raise MqlRejected("the pipeline must be a list of stage documents")
    stages: list[Stage] = []
    i = 0
    while i < len(pipeline):
        stage = pipeline[i]
        if not isinstance(stage, dict) or len(stage) != 1:
            raise MqlRejected(f"pipeline stage {i} must be a document with exactly one $stage key")
        ((name, spec),) = stage.items()
        if name == "$match":
            stages.append(_match(spec))
        elif name == "$project":
            stages.append(_project(spec))
        elif name in ("$addFields", "$set"):
            stages.append(_add_fields(spec, name))
        elif name == "$unset":
            stages.append(_unset(spec))
        elif name == "$sort":
            nxt = pipeline[i + 1] if i + 1 < len(pipeline) else None
            limit = None
            if isinstance(nxt, dict) and list(nxt) == ["$limit"]:
                limit = _count_arg(nxt["$limit"], "$limit", 1)
            stages.append(_sort(spec, limit))
        elif name == "$limit":
            stages.append(_slice(0, _count_arg(spec, "$limit", 1)))
        elif name == "$skip":
            stages.append(_slice(_count_arg(spec, "$skip", 0), None))
        elif name == "$count":
            stages.append(_count(spec))
        elif name == "$group":
            stages.append(_group(spec))
        else:
            raise MqlRejected(f"stage {name} is not supported; {_supported('stages', STAGES)}")
        if name in _COMPUTING:
            stages[-1] = _bounded_docs(stages[-1], i, name, max_doc_bytes)
        i += 1
    return stages


def run_pipeline(docs: Iterable[Doc], pipeline: list[Doc]) -> Iterator[Doc]:
    """The pure evaluator: the pipeline over any document stream, lazily."""
    stream: Iterator[Doc] = iter(docs)
    for stage in compile_pipeline(_aware(pipeline)):
        stream = stage(stream)
    return stream


# ---------------------------------------------------------------- pushdown


def _micros(dt: datetime) -> int:
    return (dt - _EPOCH) // _US


def _string_sql(col: str, cond: Any) -> list[tuple[str, list[Any]]]:
    """Conditions on a TEXT NOT NULL column: exact for str arguments, else left to Python."""
    if isinstance(cond, str):
        return [(f"{col} = ?", [cond])]
    if not isinstance(cond, dict) or not cond or not all(k.startswith("$") for k in cond):
        return []
    out: list[tuple[str, list[Any]]] = []
    sql_op = {"$eq": "=", "$ne": "<>", "$gt": ">", "$gte": ">=", "$lt": "<", "$lte": "<="}
    for op, arg in cond.items():
        if op in sql_op and isinstance(arg, str):
            out.append((f"{col} {sql_op[op]} ?", [arg]))
        elif op == "$in" and arg == []:
            out.append(("1 = 0", []))  # `IN ()` is SQLite's only; $nin [] restricts nothing
        elif (
            op in ("$in", "$nin")
            and isinstance(arg, list)
            and arg
            and all(isinstance(a, str) for a in arg)
        ):
            marks = ", ".join("?" * len(arg))
            neg = "NOT " if op == "$nin" else ""
            out.append((f"{col} {neg}IN ({marks})", list(arg)))
    return out


def _time_sql(col: str, cond: Any) -> list[tuple[str, list[Any]]]:
    """Conditions on a nullable ns column shown as a microsecond datetime (floor)."""
    if cond is None:
        return [(f"{col} IS NULL", [])]
    if isinstance(cond, datetime):
        cond = {"$eq": cond}
    if not isinstance(cond, dict) or not cond or not all(k.startswith("$") for k in cond):
        return []
    out: list[tuple[str, list[Any]]] = []
    for op, arg in cond.items():
        if op == "$ne" and arg is None:
            out.append((f"{col} IS NOT NULL", []))
        elif op == "$eq" and arg is None:
            out.append((f"{col} IS NULL", []))
        elif isinstance(arg, datetime):
            us = _micros(arg)
            lo, hi = us * 1000, (us + 1) * 1000  # the ns that floor to this microsecond
            if op == "$eq":
                out.append((f"{col} >= ? AND {col} < ?", [lo, hi]))
            elif op == "$gt":
                out.append((f"{col} >= ?", [hi]))
            elif op == "$gte":
                out.append((f"{col} >= ?", [lo]))
            elif op == "$lt":
                out.append((f"{col} < ?", [lo]))
            elif op == "$lte":
                out.append((f"{col} < ?", [hi]))
    return out


_JSON_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_JSON_CMP = {"$eq": "=", "$gt": ">", "$gte": ">=", "$lt": "<", "$lte": "<="}
_JSON_OPAQUE = "instr(data, '[') OR data_exact IS NOT NULL"  # rows json_extract may misjudge


def _is_scalar(v: Any) -> bool:
    return isinstance(v, str) or (isinstance(v, int | float) and not isinstance(v, bool))


def _data_sql(parts: list[str], cond: Any, dialect: str) -> list[tuple[str, list[Any]]]:
    """Conditions under `data.` for str/number arguments: json_extract in SQLite, jsonb
    path operators in PostgreSQL (`_pg_data_sql`).

    Neither traverses arrays the way MongoDB paths do, so every condition also passes
    rows whose JSON holds any '[' at all, and rows whose `data` reads NaN as null
    (data_exact set, see edged/ingest/values.py): SQL stays a superset.
    """
    if not parts or not all(_JSON_KEY.fullmatch(p) for p in parts):
        return []
    if _is_scalar(cond):
        cond = {"$eq": cond}
    if not isinstance(cond, dict) or not cond or not all(k.startswith("$") for k in cond):
        return []
    if dialect == "postgresql":
        return _pg_data_sql(parts, cond)
    target = "json_extract(data, '$." + ".".join(parts) + "')"
    out: list[tuple[str, list[Any]]] = []
    for op, arg in cond.items():
        if op in _JSON_CMP and _is_scalar(arg):
            out.append((f"{target} {_JSON_CMP[op]} ? OR {_JSON_OPAQUE}", [arg]))
        elif op == "$in" and isinstance(arg, list) and arg and all(_is_scalar(a) for a in arg):
            marks = ", ".join("?" * len(arg))
            out.append((f"{target} IN ({marks}) OR {_JSON_OPAQUE}", list(arg)))
    return out


_PG_OPAQUE = "strpos(data, '[') > 0 OR data_exact IS NOT NULL"


def _pg_scalar(parts: list[str], op: str, arg: Any) -> tuple[str, list[Any]] | None:
    """One comparison with a str or finite number, exact for values of that type and true
    for no other type MongoDB would match: strings compare as text bytewise (COLLATE "C",
    as MongoDB and SQLite do), numbers as jsonb numerics (1 = 1.0; the argument sent as
    its shortest decimal text, so a float compares exactly). None: not translatable."""
    sql_op = _JSON_CMP[op]
    if isinstance(arg, str):
        return f'(data::jsonb #>> ?::text[]) COLLATE "C" {sql_op} ?', [parts, arg]
    if isinstance(arg, float) and not math.isfinite(arg):
        return None
    return f"(data::jsonb #> ?::text[]) {sql_op} to_jsonb(?::numeric)", [parts, repr(arg)]


def _pg_data_sql(parts: list[str], cond: Doc) -> list[tuple[str, list[Any]]]:
    out: list[tuple[str, list[Any]]] = []
    for op, arg in cond.items():
        if op in _JSON_CMP and _is_scalar(arg):
            tests = [_pg_scalar(parts, op, arg)]
        elif op == "$in" and isinstance(arg, list) and arg and all(_is_scalar(a) for a in arg):
            tests = [_pg_scalar(parts, "$eq", a) for a in arg]
        else:
            continue
        if any(t is None for t in tests):
            continue
        sql = " OR ".join(t[0] for t in tests if t is not None)
        out.append((f"{sql} OR {_PG_OPAQUE}", [a for t in tests if t is not None for a in t[1]]))
    return out


def pushdown(spec: Any, dialect: str = "sqlite") -> tuple[str, list[Any]]:
    """SQL implied by a $match: never stricter than the filter (Python re-checks all).

    `dialect` is "sqlite" or "postgresql" (`?` placeholders either way). Returns ("", [])
    when nothing translates. Conjunctions keep whichever parts translate; an $or
    translates only if every branch restricts something.
    """
    parts = _pushdown_parts(spec, dialect)
    return " AND ".join(f"({s})" for s, _ in parts), [a for _, args in parts for a in args]


def _pushdown_parts(spec: Any, dialect: str) -> list[tuple[str, list[Any]]]:
    if not isinstance(spec, dict):
        return []
    out: list[tuple[str, list[Any]]] = []
    for key, cond in spec.items():
        if key == "$and" and isinstance(cond, list):
            for sub in cond:
                out.extend(_pushdown_parts(sub, dialect))
        elif key == "$or" and isinstance(cond, list) and cond:
            branches = [pushdown(sub, dialect) for sub in cond]
            if all(sql for sql, _ in branches):
                sql = " OR ".join(f"({s})" for s, _ in branches)
                out.append((sql, [a for _, args in branches for a in args]))
        elif key in STRING_COLUMNS:
            out.extend(_string_sql(STRING_COLUMNS[key], cond))
        elif key in TIME_COLUMNS:
            out.extend(_time_sql(TIME_COLUMNS[key], cond))
        elif key.startswith("data."):
            out.extend(_data_sql(key.split(".")[1:], cond, dialect))
    return out


# ---------------------------------------------------------------- I/O

Rows = Callable[[str, list[Any]], Iterator[tuple[Any, ...]]]


def evaluate(
    pipeline: list[Doc],
    read_rows: Rows,
    *,
    dialect: str,
    control: QueryControl,
    max_docs: int,
    max_result_bytes: int,
    max_doc_bytes: int,
    max_nodes: int,
) -> list[Doc]:
    """The one MQL run both backends share: validate and compile every stage, push a
    leading $match down as SQL in `dialect`, then stream the rows `read_rows(where, args)`
    yields (the org's readings in _ROW_COLUMNS order, by id) through the stages, bounded
    by `max_docs`, `max_result_bytes` and the control's deadline."""
    check_pipeline_size(pipeline, max_nodes)
    try:
        stream = _stream(_aware(pipeline), read_rows, dialect, control, max_doc_bytes)
        return _collect(stream, control, max_docs, max_result_bytes)
    except RecursionError:
        raise MqlLimitExceeded("the pipeline or a document nests too deeply") from None


def too_long(control: QueryControl) -> MqlLimitExceeded:
    return MqlLimitExceeded(str(control.too_long("add a leading $match")))


def _check(control: QueryControl) -> None:
    if control.stopped():
        raise too_long(control) if control.timed_out else MqlRejected("query cancelled")


def _stream(
    pipeline: list[Doc], read_rows: Rows, dialect: str, control: QueryControl, max_doc_bytes: int
) -> Iterator[Doc]:
    """The pipeline's output, lazily: the rows its leading $match selects, through its stages."""
    stages = compile_pipeline(pipeline, max_doc_bytes)
    where, args = "", list[Any]()
    if pipeline and isinstance(pipeline[0], dict) and "$match" in pipeline[0]:
        where, args = pushdown(pipeline[0]["$match"], dialect)

    def docs() -> Iterator[Doc]:
        for row in read_rows(where, args):
            _check(control)
            yield row_to_doc(row)

    stream: Iterator[Doc] = docs()
    for stage in stages:
        stream = stage(stream)
    return stream


def _collect(
    stream: Iterator[Doc], control: QueryControl, max_docs: int, max_result_bytes: int
) -> list[Doc]:
    """The stream's documents, refused past `max_docs` or `max_result_bytes`."""
    out: list[Doc] = []
    size = 0
    for doc in stream:
        out.append(doc)
        if len(out) > max_docs:
            raise MqlLimitExceeded(
                f"the result has more than {max_docs} documents (--query-max-rows);"
                " add $limit or $group"
            )
        size += encoded_size(doc, max_result_bytes - size)
        if size > max_result_bytes:
            raise MqlLimitExceeded(
                f"the result is larger than {max_result_bytes} bytes after"
                f" {len(out) - 1} documents (--query-max-result-bytes);"
                " add $limit, $project or $group"
            )
        _check(control)
    return out


def stored_too_big(max_doc_bytes: int) -> MqlLimitExceeded:
    return MqlLimitExceeded(
        f"a stored reading is larger than {max_doc_bytes} bytes (--query-max-value-bytes)"
    )


def run_mql(
    db_path: Path,
    org_id: str,
    pipeline: list[Doc],
    *,
    max_docs: int = _DEFAULTS.max_rows,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    max_result_bytes: int = _DEFAULTS.max_result_bytes,
    max_doc_bytes: int = _DEFAULTS.max_value_bytes,
    max_nodes: int = _DEFAULTS.max_pipeline_nodes,
    control: QueryControl | None = None,
) -> list[Doc]:
    """Run the pipeline over the org's readings in the SQLite index; documents are
    BSON-encodable dicts. (PostgreSQL: pgsql.run_pg_mql, the same `evaluate`.)

    Raises MqlRejected (caller's fault) for unsupported or malformed stages, and
    MqlLimitExceeded for a pipeline past `max_nodes`, a run past its deadline, a
    document past `max_doc_bytes`, or an answer past `max_docs` / `max_result_bytes`
    (sizes measured as documents are produced); sqlite3 errors propagate.
    Blocking: call from a worker thread.
    """
    control = control if control is not None else QueryControl(timeout_s)
    conn: sqlite3.Connection | None = None

    def read_rows(where: str, args: list[Any]) -> Iterator[tuple[Any, ...]]:
        nonlocal conn
        sql = f"SELECT {_ROW_COLUMNS} FROM readings WHERE org_id = ?"
        if where:
            sql += f" AND ({where})"
        conn = open_readonly(db_path, max_doc_bytes)
        conn.execute("PRAGMA query_only=ON")
        conn.set_progress_handler(control.progress, 1_000)
        control.attach(conn)
        cur = conn.execute(sql + " ORDER BY id", [org_id, *args])
        while batch := cur.fetchmany(512):
            yield from batch

    try:
        return evaluate(
            pipeline,
            read_rows,
            dialect="sqlite",
            control=control,
            max_docs=max_docs,
            max_result_bytes=max_result_bytes,
            max_doc_bytes=max_doc_bytes,
            max_nodes=max_nodes,
        )
    except sqlite3.Error as err:
        if control.timed_out:
            raise too_long(control) from None
        if control.cancelled:
            raise MqlRejected("query cancelled") from None
        if getattr(err, "sqlite_errorname", "") == "SQLITE_TOOBIG":
            raise stored_too_big(max_doc_bytes) from None
        raise
    finally:
        control.attach(None)
        if conn is not None:
            conn.close()
