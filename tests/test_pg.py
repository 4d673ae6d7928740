"""What only the PostgreSQL index has: the dialect translation, the versioned migration
under an advisory lock, capture-time partitions and retention, and replicas sharing one
database. Behaviours both backends share are in test_storage_contract.py."""

from __future__ import annotations

import asyncio
import hashlib
import json
import subprocess
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import bson
import psycopg
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from grpclib.client import Channel
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from edged._proto.app.data.v1 import data_pb2 as dpb
from edged._proto.app.data.v1.data_grpc import DataServiceStub
from edged._proto.app.datasync.v1 import data_sync_pb2 as pb
from edged._proto.proto.rpc.v1 import auth_grpc, auth_pb2
from edged.client import UploadClient, connect, upload_metadata
from edged.errors import ConfigError
from edged.ingest import ApiKey, IngestServer, IngestSettings, IngestStore, catalog, pg
from edged.ingest.auth import AuthLimits
from edged.ingest.filters import Cursor, decode_token, encode_token, reading_where
from edged.ingest.limits import QueryLimits
from tests.support.credentials import KeyFile
from tests.support.processes import edged_cmd, ingest_process

ORG = "org-a"


@pytest.mark.parametrize(
    ("sqlite", "postgres"),
    [
        ("SELECT a FROM t WHERE b = ? AND c IN (?,?)",
         "SELECT a FROM t WHERE b = %s AND c IN (%s,%s)"),
        ("SELECT 5 % 2", "SELECT 5 %% 2"),
        (
            "INSERT OR IGNORE INTO binary_tags(binary_data_id, tag) VALUES (?, ?)",
            "INSERT INTO binary_tags(binary_data_id, tag) VALUES (%s, %s) ON CONFLICT DO NOTHING",
        ),
        (
            "EXISTS (SELECT 1 FROM json_each(readings.tags) WHERE value IN (?))",
            "EXISTS (SELECT 1 FROM jsonb_array_elements_text((readings.tags)::jsonb) AS je(value)"
            " WHERE value IN (%s))",
        ),
        ("INSERT INTO uploads(a) VALUES (?) ON CONFLICT DO NOTHING",
         "INSERT INTO uploads(a) VALUES (%s) ON CONFLICT DO NOTHING"),
    ],
)  # fmt: skip
def test_pg_sql(sqlite: str, postgres: str) -> None:
    assert pg.pg_sql(sqlite) == postgres


def _ns(year: int, month: int, day: int, hour: int = 0, minute: int = 0, sec: int = 0) -> int:
    when = datetime(year, month, day, hour, minute, sec, tzinfo=UTC)
    return int(when.timestamp()) * 1_000_000_000


@pytest.mark.parametrize(
    ("captured", "expected"),
    [
        (_ns(2026, 1, 15), ("readings_y2026m01", _ns(2026, 1, 1), _ns(2026, 2, 1))),
        (_ns(2026, 12, 31, 23, 59, 59), ("readings_y2026m12", _ns(2026, 12, 1), _ns(2027, 1, 1))),
        (_ns(2000, 1, 1), ("readings_y2000m01", _ns(2000, 1, 1), _ns(2000, 2, 1))),
        (_ns(2000, 1, 1) - 1, None),
        (_ns(2099, 12, 31), ("readings_y2099m12", _ns(2099, 12, 1), _ns(2100, 1, 1))),
        (_ns(2100, 1, 1), None),
        (-(2**63), None),
        (2**63 - 1, None),
    ],
)
def test_month_partition(captured: int, expected: tuple[str, int, int] | None) -> None:
    assert pg.month_partition(captured) == expected
    if expected is not None:
        assert pg.partition_end_ns(expected[0]) == expected[2]


def test_partition_end_of_other_tables_is_none() -> None:
    assert pg.partition_end_ns("readings_before") is None
    assert pg.partition_end_ns("readings_y2026m1") is None


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://u:secret@db.example:5432/edged", "postgresql://u:***@db.example:5432/edged"),
        ("postgresql://u@db/edged", "postgresql://u@db/edged"),
        ("postgresql:///edged?host=/run/pg", "postgresql:///edged?host=/run/pg"),
    ],
)
def test_redact(url: str, shown: str) -> None:
    assert pg.redact(url) == shown


async def test_unreachable_database_is_a_config_error_without_the_password(
    tmp_path: Path,
) -> None:
    url = f"postgresql://edged:hunter2@/nodb?host={tmp_path}&connect_timeout=2"
    with pytest.raises(ConfigError, match=r"--database postgresql://edged:\*\*\*@") as err:
        await IngestStore.open(tmp_path / "ingest", database=url)
    assert "hunter2" not in str(err.value)


# -- migration --------------------------------------------------------------------------------


# Digests of the shipped steps: a database migrated by an older edged must hold what a new
# one builds, so a step's text (derived from storage.py's declarations) never changes.
SHIPPED_STEPS = ["8357e32b32eff646", "feb95a415c76411c", "296c475ff63a5518"]


def test_shipped_migration_steps_never_change() -> None:
    digests = [hashlib.sha256(step.encode()).hexdigest()[:16] for step in pg.MIGRATIONS]
    assert digests[: len(SHIPPED_STEPS)] == SHIPPED_STEPS


async def test_replicas_starting_at_once_migrate_once(pg_url: str) -> None:
    indexes = await asyncio.gather(*(pg.PgIndex.open(pg_url) for _ in range(4)))
    for index in indexes:
        await index.close()
    with psycopg.connect(pg_url) as conn:
        rows = conn.execute("SELECT version FROM edged_schema ORDER BY version").fetchall()
    assert rows == [(v,) for v in range(1, pg.SCHEMA_VERSION + 1)]  # each step ran once


async def test_a_newer_schema_is_refused(pg_url: str) -> None:
    await (await pg.PgIndex.open(pg_url)).close()
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("INSERT INTO edged_schema(version) VALUES (%s)", (pg.SCHEMA_VERSION + 1,))
    with pytest.raises(ConfigError, match="newer than this edged"):
        await pg.PgIndex.open(pg_url)


def _migrate_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        edged_cmd("ingest", "migrate", *args),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _open_without_migrating(root: Path, url: str) -> None:
    async def go() -> None:
        await (await IngestStore.open(root, database=url, migrate=False)).close()

    asyncio.run(go())


def test_migrate_commands_started_at_once_all_succeed_with_one_schema(pg_url: str) -> None:
    """N replicas' deploy steps at once: the advisory lock lets one migrate, the rest wait
    and find the schema current; every step ran once."""
    procs = [
        subprocess.Popen(
            edged_cmd("ingest", "migrate", "--database", pg_url),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    outs = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=120)
            assert proc.returncode == 0, err
            outs.append(out)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    latest = pg.SCHEMA_VERSION
    assert sum(f"schema 0 -> {latest}" in out for out in outs) == 1, outs
    assert sum(f"schema {latest} -> {latest}" in out for out in outs) == 3, outs
    with psycopg.connect(pg_url) as conn:
        rows = conn.execute("SELECT version FROM edged_schema ORDER BY version").fetchall()
    assert rows == [(v,) for v in range(1, latest + 1)]


def test_no_migrate_refuses_an_older_schema_until_migrate_runs(pg_url: str, tmp_path: Path) -> None:
    older = pg.SCHEMA_VERSION - 1
    with psycopg.connect(pg_url, autocommit=True) as conn:  # what an older edged built
        conn.execute("CREATE TABLE edged_schema(version INTEGER NOT NULL)")
        for version in range(1, older + 1):
            conn.execute(pg.MIGRATIONS[version - 1])
            conn.execute("INSERT INTO edged_schema(version) VALUES (%s)", (version,))
    with pytest.raises(ConfigError) as err:
        _open_without_migrating(tmp_path / "a", pg_url)
    assert str(err.value) == (
        f"--database {pg.redact(pg_url)} is at schema version {older}, older than this"
        f" edged's {pg.SCHEMA_VERSION}, and --no-migrate is set; run"
        f" `edged ingest migrate --database {pg.redact(pg_url)}` first"
    )
    cli = subprocess.run(
        edged_cmd(
            "ingest", "--listen", "127.0.0.1:0", "--data", str(tmp_path / "b"),
            "--database", pg_url, "--no-migrate",
        ),
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert cli.returncode == 2 and "--no-migrate is set" in cli.stderr, cli.stderr
    check = _migrate_cli("--database", pg_url, "--check")
    assert check.returncode == 1, check.stderr
    assert f"schema {older} -> {pg.SCHEMA_VERSION} pending" in check.stdout
    done = _migrate_cli("--database", pg_url)
    assert done.returncode == 0, done.stderr
    assert f"schema {older} -> {pg.SCHEMA_VERSION}" in done.stdout
    assert _migrate_cli("--database", pg_url, "--check").returncode == 0
    _open_without_migrating(tmp_path / "a", pg_url)


def test_migrate_refuses_a_newer_schema(pg_url: str) -> None:
    assert _migrate_cli("--database", pg_url).returncode == 0
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("INSERT INTO edged_schema(version) VALUES (%s)", (pg.SCHEMA_VERSION + 1,))
    for args in ([], ["--check"]):
        res = _migrate_cli("--database", pg_url, *args)
        assert res.returncode == 2
        assert f"newer than this edged's {pg.SCHEMA_VERSION}" in res.stderr
    with psycopg.connect(pg_url) as conn:
        assert conn.execute("SELECT max(version) FROM edged_schema").fetchone() == (
            pg.SCHEMA_VERSION + 1,
        )


# -- replicas ---------------------------------------------------------------------------------


@pytest.fixture
async def replicas(pg_url: str, tmp_path: Path) -> AsyncIterator[tuple[IngestStore, IngestStore]]:
    a = await IngestStore.open(tmp_path / "a", database=pg_url)
    try:
        b = await IngestStore.open(tmp_path / "b", database=pg_url)
        try:
            yield a, b
        finally:
            await b.close()
    finally:
        await a.close()


def tabular_meta() -> pb.UploadMetadata:
    return upload_metadata("part-1", pb.DATA_TYPE_TABULAR_SENSOR, component_name="imu")


def _reading(v: float, at_s: int) -> pb.SensorData:
    r = pb.SensorData()
    r.struct.update({"v": v})
    r.metadata.time_requested.CopyFrom(Timestamp(seconds=at_s))
    return r


async def test_an_item_retried_on_another_replica_is_stored_once(
    replicas: tuple[IngestStore, IngestStore],
) -> None:
    a, b = replicas
    results = await asyncio.gather(
        *(
            (a if i % 2 else b).store_tabular(ORG, "item", tabular_meta(), [_reading(i, i)])
            for i in range(10)
        )
    )
    assert len(set(results)) == 1
    assert len(await a.readings(ORG)) == 1


async def test_a_page_token_of_one_replica_pages_on_another(
    replicas: tuple[IngestStore, IngestStore],
) -> None:
    a, b = replicas
    await a.store_tabular(ORG, None, tabular_meta(), [_reading(i, 1000 + i) for i in range(6)])
    where = reading_where(None, ORG)
    first = await a.read(lambda c: catalog.page_readings(c, where, 0, None, 3))
    token = encode_token(Cursor(first[-1].time_captured_ns, first[-1].rowid))
    rest = await b.read(lambda c: catalog.page_readings(c, where, 0, decode_token(token), 10))
    assert [json.loads(r.data)["v"] for r in first + rest] == [0, 1, 2, 3, 4, 5]


# -- partitions and retention -----------------------------------------------------------------


async def test_readings_land_in_month_partitions_and_retention_drops_old_months(
    pg_url: str, tmp_path: Path
) -> None:
    store = await IngestStore.open(tmp_path / "ingest", database=pg_url)
    try:
        times = [
            _ns(2026, 1, 5),
            _ns(2026, 1, 20),
            _ns(2026, 3, 1),
            _ns(1990, 1, 1),
            _ns(2200, 1, 1),
        ]
        readings = [_reading(i, t // 10**9) for i, t in enumerate(times)]
        # two uploads at once need the same new partitions: neither may fail
        await asyncio.gather(
            store.store_tabular(ORG, None, tabular_meta(), readings),
            store.store_tabular(ORG, None, tabular_meta(), readings),
        )
        with psycopg.connect(pg_url) as conn:
            counts: dict[str, int] = dict(
                conn.execute(
                    "SELECT tableoid::regclass::text, count(*) FROM readings GROUP BY 1"
                ).fetchall()
            )
        assert counts == {
            "readings_y2026m01": 4,
            "readings_y2026m03": 2,
            "readings_before": 2,
            "readings_after": 2,
        }
        assert isinstance(store.index, pg.PgIndex)
        dropped = await store.index.drop_readings_before(_ns(2026, 3, 15))
        assert dropped == ["readings_y2026m01"]  # March still holds readings inside the window
        left = sorted(r.data["v"] for r in await store.readings(ORG))
        assert left == [2.0, 2.0, 4.0, 4.0]  # and 1990's (readings_before) went too
        # a late reading of a dropped month recreates its partition rather than failing
        await store.store_tabular(
            ORG, None, tabular_meta(), [_reading(9, _ns(2026, 1, 7) // 10**9)]
        )
        assert len(await store.readings(ORG)) == 5
    finally:
        await store.close()


async def test_two_replicas_running_retention_at_once(
    replicas: tuple[IngestStore, IngestStore],
) -> None:
    a, b = replicas
    times = [_ns(2026, 1, 5), _ns(2026, 2, 5), _ns(1999, 5, 1), _ns(2026, 4, 2)]
    await a.store_tabular(
        ORG, None, tabular_meta(), [_reading(i, t // 10**9) for i, t in enumerate(times)]
    )
    await b.store_tabular("org-b", None, tabular_meta(), [_reading(9, _ns(2026, 4, 3) // 10**9)])
    results = await asyncio.gather(
        a.expire_readings(_ns(2026, 3, 1)), b.expire_readings(_ns(2026, 3, 1))
    )
    assert sum(r.readings for r in results) == 3  # each aged row counted once
    assert sum(r.partitions for r in results) == 2  # January and February, dropped once
    assert [r.data["v"] for r in await b.readings(ORG)] == [3.0]
    assert [r.data["v"] for r in await a.readings("org-b")] == [9.0]


# -- two `edged ingest` processes on one database --------------------------------------------


async def test_two_ingest_processes_serve_one_database(
    pg_url: str, tmp_path: Path, key: KeyFile
) -> None:
    """Upload through one replica, retry the same item through the other, read back and
    page through either: the database is the only thing they share."""
    args = ["--database", pg_url, "--api-key-id", key.key_id, "--api-key-file", str(key.path)]
    readings = [_reading(i, 1000 + i).SerializeToString() for i in range(5)]
    with (
        ingest_process(tmp_path / "a", args) as (_, port_a),
        ingest_process(tmp_path / "b", args) as (_, port_b),
    ):
        ids = []
        for port in (port_a, port_b):
            async with UploadClient(
                f"127.0.0.1:{port}", api_key_id=key.key_id, api_key=key.secret, tls=False
            ) as up:
                ids.append(await up.upload_readings(tabular_meta(), readings, item_id="item-1"))
        assert ids[0] == ids[1]
        seen: list[float] = []
        last: str | None = None
        for port in (port_b, port_a, port_b, port_a):  # each page from the other replica
            async with connect(
                f"127.0.0.1:{port}", api_key_id=key.key_id, api_key=key.secret, tls=False
            ) as client:
                page, _, last = await client.tabular_data_by_filter(limit=2, last=last)
            seen += [row.data["v"] for row in page]
        assert seen == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert not (tmp_path / "a" / "ingest.sqlite3").exists()


# -- tokens shared by replicas ----------------------------------------------------------------


async def _token(port: int, key_id: str, secret: str) -> str:
    async with Channel("127.0.0.1", port) as channel:
        reply = await auth_grpc.AuthServiceStub(channel).Authenticate(
            auth_pb2.AuthenticateRequest(
                entity=key_id, credentials=auth_pb2.Credentials(type="api-key", payload=secret)
            )
        )
    return reply.access_token


async def _count_with(port: int, token: str) -> int | Status:
    async with Channel("127.0.0.1", port) as channel:
        try:
            reply = await DataServiceStub(channel).TabularDataByFilter(
                dpb.TabularDataByFilterRequest(count_only=True),
                metadata={"authorization": f"Bearer {token}"},
            )
        except GRPCError as exc:
            return exc.status
    return reply.count


async def test_a_token_issued_by_one_replica_is_accepted_by_another(
    pg_url: str, tmp_path: Path
) -> None:
    key = ApiKey("key-1", "s" * 40, ORG)
    changed = ApiKey("key-1", "t" * 40, ORG)
    auth = AuthLimits(max_tokens_per_key=3)

    def settings(name: str, k: ApiKey) -> IngestSettings:
        return IngestSettings(
            data_dir=tmp_path / name, database=pg_url, keys=(k,), auth=auth, shutdown_grace_s=1
        )

    async with (
        IngestServer(settings("a", key)) as a,
        IngestServer(settings("b", key)) as b,
        IngestServer(settings("c", changed)) as c,
    ):
        tokens = [await _token(a.port, key.key_id, key.secret) for _ in range(5)]
        assert await _count_with(b.port, tokens[-1]) == 0
        assert await _count_with(a.port, tokens[-1]) == 0
        # the key was changed on c: tokens of the old key are not its key's tokens
        assert await _count_with(c.port, tokens[-1]) == Status.UNAUTHENTICATED
        assert await _count_with(b.port, "made-up") == Status.UNAUTHENTICATED
        # evicted across replicas: b never saw the oldest token, the table no longer has it
        assert await _count_with(b.port, tokens[0]) == Status.UNAUTHENTICATED
    with psycopg.connect(pg_url) as conn:
        row = conn.execute("SELECT count(*) FROM auth_tokens").fetchone()
    assert row is not None and row[0] == 3  # at most max_tokens_per_key per key, all replicas


# -- TabularDataBySQL inside PostgreSQL: isolation by the engine ------------------------------

ORG_B = "org-b"
KEY_A = ApiKey("key-a", "a" * 40, ORG)
KEY_B = ApiKey("key-b", "b" * 40, ORG_B)


@pytest.fixture
async def sql_server(pg_url: str, tmp_path: Path) -> AsyncIterator[IngestServer]:
    limits = QueryLimits(timeout_s=2, max_rows=1000, max_value_bytes=100_000)
    settings = IngestSettings(
        data_dir=tmp_path / "ingest",
        database=pg_url,
        keys=(KEY_A, KEY_B),
        query_limits=limits,
        shutdown_grace_s=1,
    )
    async with IngestServer(settings) as server:
        for key, values in ((KEY_A, [1, 2]), (KEY_B, [100])):
            async with UploadClient(
                server.address, api_key_id=key.key_id, api_key=key.secret, tls=False
            ) as up:
                readings = [_reading(v, 1000 + v).SerializeToString() for v in values]
                await up.upload_readings(tabular_meta(), readings)
        yield server


async def _sql(server: IngestServer, key: ApiKey, query: str) -> list[dict[str, Any]] | Status:
    token = await _token(server.port, key.key_id, key.secret)
    async with Channel("127.0.0.1", server.port) as channel:
        try:
            reply = await DataServiceStub(channel).TabularDataBySQL(
                dpb.TabularDataBySQLRequest(organization_id=key.org_id, sql_query=query),
                metadata={"authorization": f"Bearer {token}"},
            )
        except GRPCError as exc:
            return exc.status
    return [dict(bson.decode(raw)) for raw in reply.raw_data]


async def test_sql_runs_in_postgresql_on_the_callers_rows(sql_server: IngestServer) -> None:
    rows = await _sql(
        sql_server,
        KEY_A,
        "SELECT organization_id, component_name, time_requested, data FROM readings"
        " ORDER BY time_requested",
    )
    assert rows == [
        {
            "organization_id": ORG,
            "component_name": "imu",
            "time_requested": f"1970-01-01T00:16:4{i}.000000Z",
            "data": {"v": float(i)},
        }
        for i in (1, 2)
    ]
    assert await _sql(sql_server, KEY_B, "SELECT count(*) AS n FROM readings") == [{"n": 1}]


@pytest.mark.parametrize(
    "query",
    [
        "SELECT count(*) AS n FROM readings WHERE organization_id = 'org-b'",
        "SELECT count(*) AS n FROM public.readings WHERE org_id = 'org-b'",
        "SELECT count(*) AS n FROM (SELECT org_id FROM public.readings) r WHERE org_id <> 'org-a'",
    ],
)
async def test_sql_never_sees_another_orgs_rows(sql_server: IngestServer, query: str) -> None:
    assert await _sql(sql_server, KEY_A, query) == [{"n": 0}]


@pytest.mark.parametrize(
    "query",
    [
        "SELECT * FROM public.readings",  # columns the view does not show
        "SELECT * FROM public.binaries",
        "SELECT * FROM public.auth_tokens",
        "SELECT * FROM public.uploads",
        "SELECT * FROM readings_before",  # a partition, around the parent's policy
        "SELECT set_config('role', 'postgres', false)",
        "SELECT 1 AS a; COMMIT; SELECT org_id FROM public.readings",
        "SELECT 1 AS a) AS q) AS rows; COMMIT; SELECT (1",
        "WITH d AS (DELETE FROM public.readings RETURNING 1) SELECT count(*) FROM d",
        "DELETE FROM public.readings",
        "SELECT pg_read_file('/etc/passwd')",
        "SELECT query_to_xml('SELECT * FROM public.binaries', true, true, '')",
        "SELECT query_to_xml('SET ROLE postgres', true, true, '')",
    ],
)
async def test_sql_cannot_reach_past_its_view(sql_server: IngestServer, query: str) -> None:
    assert await _sql(sql_server, KEY_A, query) == Status.INVALID_ARGUMENT
    assert await _sql(sql_server, KEY_B, "SELECT count(*) AS n FROM readings") == [{"n": 1}]


@pytest.mark.parametrize(
    "query",
    [
        "SELECT pg_sleep(30)",  # --query-timeout is 2 s here: statement_timeout ends it
        # raising its own statement_timeout does not help: the runner's timer cancels it
        "SELECT set_config('statement_timeout', '0', false) AS s, pg_sleep(30) AS z",
        "SELECT repeat('x', 1000000) AS big",  # one value past --query-max-value-bytes
        "SELECT g FROM generate_series(1, 100000) AS g",  # past --query-max-rows
    ],
)
async def test_sql_bounds(sql_server: IngestServer, query: str) -> None:
    assert await _sql(sql_server, KEY_A, query) == Status.RESOURCE_EXHAUSTED


async def _mql(
    server: IngestServer, key: ApiKey, pipeline: list[dict[str, Any]]
) -> list[dict[str, Any]] | Status:
    token = await _token(server.port, key.key_id, key.secret)
    async with Channel("127.0.0.1", server.port) as channel:
        try:
            reply = await DataServiceStub(channel).TabularDataByMQL(
                dpb.TabularDataByMQLRequest(
                    organization_id=key.org_id, mql_binary=[bson.encode(s) for s in pipeline]
                ),
                metadata={"authorization": f"Bearer {token}"},
            )
        except GRPCError as exc:
            return exc.status
    return [dict(bson.decode(raw)) for raw in reply.raw_data]


async def test_mql_runs_on_postgresql_on_the_callers_rows(sql_server: IngestServer) -> None:
    rows = await _mql(
        sql_server,
        KEY_A,
        [{"$match": {"data.v": {"$gte": 2}}}, {"$project": {"_id": 0, "v": "$data.v"}}],
    )
    assert rows == [{"v": 2.0}]
    assert await _mql(sql_server, KEY_B, [{"$count": "n"}]) == [{"n": 1}]


@pytest.mark.parametrize(
    "pipeline",
    [
        [{"$match": {"organization_id": ORG_B}}],
        [{"$match": {"organization_id": {"$ne": ORG}}}],
        [{"$match": {"data.v": 100}}],
        [{"$group": {"_id": "$organization_id", "n": {"$sum": 1}}}, {"$match": {"_id": ORG_B}}],
    ],
)
async def test_mql_never_sees_another_orgs_rows(
    sql_server: IngestServer, pipeline: list[dict[str, Any]]
) -> None:
    assert await _mql(sql_server, KEY_A, pipeline) == []


@pytest.mark.parametrize(
    ("pipeline", "status"),
    [
        ([{"$lookup": {"from": "x"}}], Status.INVALID_ARGUMENT),
        ([{"$project": {"b": {"$literal": "x" * 60_000}}}, {"$set": {"c": ["$b", "$b"]}}],
         Status.RESOURCE_EXHAUSTED),  # a document past --query-max-value-bytes
    ],
)  # fmt: skip
async def test_mql_bounds_and_rejections(
    sql_server: IngestServer, pipeline: list[dict[str, Any]], status: Status
) -> None:
    assert await _mql(sql_server, KEY_A, pipeline) == status


# -- the command line -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("database", "says"),
    [
        ("mysql://u@h/db", "--database must be a postgresql:// URL"),
        (
            "postgresql://edged:hunter2@/nodb?host=/nonexistent&connect_timeout=2",
            "--database postgresql://edged:***@/nodb",
        ),
    ],
)
def test_cli_database_errors_are_usage_errors_without_the_password(
    tmp_path: Path, database: str, says: str
) -> None:
    proc = subprocess.run(
        edged_cmd(
            "ingest", "--listen", "127.0.0.1:0", "--data", str(tmp_path), "--database", database
        ),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2, proc.stderr
    assert says in proc.stderr
    assert "hunter2" not in proc.stderr + proc.stdout
