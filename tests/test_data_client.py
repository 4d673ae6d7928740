"""`edged.client.DataClient`: every seed method against a real `edged ingest` on loopback
(TLS, API key), checking what comes back and what the server stored, not just that a
call returned.

Data goes in through the client's own seed upload calls, so the tests also show that a
seed script's uploads are readable by its queries.
"""

from __future__ import annotations

import ast
import datetime as dt
import inspect
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import bson
import pytest
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from edged.client import (
    AuthError,
    BinaryID,
    DataClient,
    Filter,
    Order,
    TabularData,
    UploadError,
    connect,
    create_filter,
)
from edged.errors import ConfigError
from edged.ingest import ApiKey, IngestServer, IngestSettings
from tests.support.credentials import Certs, KeyFile, make_key_file
from tests.support.seed_signatures import REQUIRED, SEED_SIGNATURES

ORG, LOC, PART = "org-1", "loc-1", "part-1"
INVALID = Status.INVALID_ARGUMENT
T0 = dt.datetime(2026, 3, 1, 12, 0, 0, tzinfo=dt.UTC)
NAIVE_T0 = T0.replace(tzinfo=None)  # what the seed's TabularData carries: naive UTC
READINGS, IMAGES = 6, 4


def at(seconds: float) -> dt.datetime:
    return T0 + dt.timedelta(seconds=seconds)


@dataclass
class Env:
    server: IngestServer
    key: KeyFile
    certs: Certs


@pytest.fixture
async def env(tmp_path: Path, certs: Certs) -> AsyncIterator[Env]:
    key = make_key_file(tmp_path)
    other = make_key_file(tmp_path)
    settings = IngestSettings(
        data_dir=tmp_path / "ingest",
        keys=(
            ApiKey(key.key_id, key.secret, ORG, LOC),
            ApiKey(other.key_id, other.secret, "org-2"),
        ),
        tls_cert=certs.cert_file,
        tls_key=certs.key_file,
        shutdown_grace_s=2.0,
        synchronous="OFF",
    )
    async with IngestServer(settings) as server:
        yield Env(server, key, certs)


@pytest.fixture
async def dc(env: Env) -> AsyncIterator[DataClient]:
    async with connect(
        env.server.address,
        api_key_id=env.key.key_id,
        api_key=env.key.secret,
        ca_file=env.certs.ca_file,
    ) as client:
        yield client


@dataclass
class Seeded:
    file_id: str
    images: list[str]  # binary_data_ids, in capture order


async def seed(dc: DataClient) -> Seeded:
    """READINGS thermo readings (seq 0..), 2 imu readings, IMAGES camera images."""
    file_id = await dc.tabular_data_capture_upload(
        [{"seq": i, "ok": i % 2 == 0, "nested": {"v": [i, "x"]}} for i in range(READINGS)],
        PART,
        "rdk:component:sensor",
        "thermo",
        "Readings",
        method_parameters={"unit": "C"},
        tags=["lab"],
        data_request_times=[(at(i), at(i + 0.5)) for i in range(READINGS)],
    )
    await dc.tabular_data_capture_upload(
        [{"a": 1.5}, {"a": 2.5}],
        PART,
        "rdk:component:movement_sensor",
        "imu",
        "Readings",
        data_request_times=[(at(100), at(100)), (at(101), at(101))],
    )
    images = [
        await dc.binary_data_capture_upload(
            f"jpeg-{n}".encode() * 50,
            PART,
            "rdk:component:camera",
            "cam",
            "GetImages",
            ".jpg",
            tags=["night"] if n % 2 else ["day"],
            data_request_times=(at(n), at(n + 0.25)),
        )
        for n in range(IMAGES)
    ]
    return Seeded(file_id, images)


# -- connect --------------------------------------------------------------------------------


async def test_connect_awaited_returns_an_authenticated_client_usable_like_a_viam_client(
    env: Env,
) -> None:
    client = await connect(
        env.server.address, api_key_id=env.key.key_id, api_key=env.key.secret,
        ca_file=str(env.certs.ca_file),
    )  # fmt: skip
    try:
        assert client.data_client is client
        assert await client.list_datasets_by_organization_id(ORG) == []
    finally:
        client.close()


async def test_connect_with_a_wrong_key_fails_at_connect_with_auth_error(env: Env) -> None:
    with pytest.raises(AuthError) as info:
        async with connect(
            env.server.address, api_key_id=env.key.key_id, api_key="wrong",
            ca_file=env.certs.ca_file,
        ):  # fmt: skip
            pass
    assert info.value.status is Status.UNAUTHENTICATED


async def test_connect_verifies_the_certificate_by_default(env: Env) -> None:
    with pytest.raises(UploadError) as info:
        await connect(env.server.address, api_key_id=env.key.key_id, api_key=env.key.secret)
    assert info.value.status is Status.UNAVAILABLE  # the test CA is not a system root


def test_connect_needs_exactly_one_of_address_and_config_path(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="either an address or config_path"):
        connect()
    with pytest.raises(ValueError, match="either an address or config_path"):
        connect("127.0.0.1:1", config_path=tmp_path / "c.yaml")
    with pytest.raises(ValueError, match="config_path supplies"):
        connect(config_path=tmp_path / "c.yaml", api_key="k")


def _config(tmp_path: Path, cloud: str) -> Path:
    path = tmp_path / "edged.yaml"
    path.write_text(f"part_id: {PART}\nstate_dir: {tmp_path / 'state'}\ncloud:\n{cloud}")
    return path


async def test_from_config_uses_the_daemons_address_key_file_and_ca(
    env: Env, tmp_path: Path
) -> None:
    path = _config(
        tmp_path,
        f"  address: {env.server.address}\n  api_key_id: {env.key.key_id}\n"
        f"  api_key_file: {env.key.path}\n  ca_file: {env.certs.ca_file}\n",
    )
    async with connect(config_path=path) as client:
        assert await client.create_dataset("from-config", ORG)
    async with DataClient.from_config(str(path)) as client:
        [ds] = await client.list_datasets_by_organization_id(ORG)
        assert ds.name == "from-config"


async def test_from_config_takes_the_key_from_the_environment(
    env: Env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _config(
        tmp_path,
        f"  address: {env.server.address}\n  api_key_id: {env.key.key_id}\n"
        f"  ca_file: {env.certs.ca_file}\n",
    )
    monkeypatch.setenv("EDGED_API_KEY", env.key.secret)
    async with connect(config_path=path) as client:
        assert await client.tags_by_filter() == []
    monkeypatch.delenv("EDGED_API_KEY")
    with pytest.raises(ConfigError, match="no key was found"):
        DataClient.from_config(path)


def test_from_config_refuses_the_embedded_server(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="'embedded'"):
        DataClient.from_config(_config(tmp_path, "  address: embedded\n"))


# -- tabular --------------------------------------------------------------------------------


async def test_tabular_data_by_filter_returns_values_metadata_and_times(dc: DataClient) -> None:
    await seed(dc)
    rows, count, last = await dc.tabular_data_by_filter(create_filter(component_name="thermo"))
    assert count == READINGS and last
    assert [r.data["seq"] for r in rows] == [float(i) for i in range(READINGS)]
    first = rows[0]
    assert isinstance(first, TabularData) and isinstance(first, DataClient.TabularData)
    assert first.data == {"seq": 0.0, "ok": True, "nested": {"v": [0.0, "x"]}}
    assert first.time_requested == NAIVE_T0
    assert first.time_received == NAIVE_T0 + dt.timedelta(seconds=0.5)
    m = first.metadata
    assert (m.organization_id, m.location_id, m.part_id) == (ORG, LOC, PART)
    assert (m.component_type, m.component_name, m.method_name) == (
        "rdk:component:sensor",
        "thermo",
        "Readings",
    )
    assert list(m.tags) == ["lab"]
    assert set(m.method_parameters) == {"unit"}
    # the seed's equality: same printed form
    again, _, _ = await dc.tabular_data_by_filter(create_filter(component_name="thermo"))
    assert again == rows and rows[0] != rows[1]
    assert str(first).startswith(f"{first.data}\n{first.metadata}Time requested: ")
    assert "Time requested: 2026-03-01 12:00:00\n" in str(first)


async def test_tabular_paging_with_last_limit_sort_order_and_count_only(dc: DataClient) -> None:
    await seed(dc)
    f = create_filter(component_name="thermo")
    seen: list[float] = []
    last: str | None = None
    pages = 0
    while True:
        page, count, last = await dc.tabular_data_by_filter(f, limit=4, last=last)
        if not page:
            break
        assert count == len(page)
        seen += [r.data["seq"] for r in page]
        pages += 1
    assert pages == 2 and seen == [float(i) for i in range(READINGS)]

    desc, _, _ = await dc.tabular_data_by_filter(f, 3, Order.ORDER_DESCENDING)
    assert [r.data["seq"] for r in desc] == [5.0, 4.0, 3.0]

    none, total, _ = await dc.tabular_data_by_filter(count_only=True)
    assert none == [] and total == READINGS + 2

    window = create_filter(start_time=at(2), end_time=at(4))
    rows, _, _ = await dc.tabular_data_by_filter(window)
    assert [r.data["seq"] for r in rows] == [2.0, 3.0]
    tagged, _, _ = await dc.tabular_data_by_filter(create_filter(tags=["lab"]))
    assert len(tagged) == READINGS


async def test_tabular_dest_writes_the_page_as_the_seed_does(
    dc: DataClient, tmp_path: Path
) -> None:
    await seed(dc)
    dest = tmp_path / "tabular.txt"
    dest.write_text("old content that must go " * 100)
    rows, _, _ = await dc.tabular_data_by_filter(
        create_filter(component_name="imu"), dest=str(dest)
    )
    assert len(rows) == 2
    assert dest.read_text() == f"{[str(r) for r in rows]}"


async def test_sql_and_mql_return_decoded_rows(dc: DataClient) -> None:
    await seed(dc)
    rows = await dc.tabular_data_by_sql(
        ORG,
        "SELECT component_name, count(*) AS n FROM readings GROUP BY component_name"
        " ORDER BY component_name",
    )
    assert rows == [{"component_name": "imu", "n": 2}, {"component_name": "thermo", "n": 6}]
    stages: list[bytes] = [
        bson.encode({"$match": {"component_name": "thermo"}}),
        bson.encode({"$sort": {"time_received": -1}}),
        bson.encode({"$limit": 2}),
        bson.encode({"$project": {"_id": 0, "seq": "$data.seq"}}),
    ]
    assert await dc.tabular_data_by_mql(ORG, stages) == [{"seq": 5}, {"seq": 4}]
    as_dicts: list[dict[str, Any]] = [{"$match": {"component_name": "imu"}}, {"$count": "n"}]
    assert await dc.tabular_data_by_mql(organization_id=ORG, mql_binary=as_dicts) == [{"n": 2}]
    with pytest.raises(ValueError, match="non-empty"):
        await dc.tabular_data_by_mql(ORG, [])
    with pytest.raises(AuthError) as info:
        await dc.tabular_data_by_sql("org-2", "SELECT 1")
    assert info.value.status is Status.PERMISSION_DENIED
    assert info.value.call == "TabularDataBySQL"


async def test_delete_tabular_data_by_age(dc: DataClient) -> None:
    now = dt.datetime.now(dt.UTC)
    ages = {"old": now - dt.timedelta(days=10), "fresh": now - dt.timedelta(hours=1)}
    for name, when in ages.items():
        await dc.tabular_data_capture_upload(
            [{"n": 1}, {"n": 2}], PART, "t", name, "Readings", data_request_times=[(when, when)] * 2
        )
    assert await dc.delete_tabular_data(ORG, 5) == 2
    rows, _, _ = await dc.tabular_data_by_filter()
    assert [r.metadata.component_name for r in rows] == ["fresh", "fresh"]
    assert await dc.delete_tabular_data(ORG, 0) == 2
    assert (await dc.tabular_data_by_filter(count_only=True))[1] == 0
    with pytest.raises(ValueError):
        await dc.delete_tabular_data(ORG, -1)
    with pytest.raises(NotImplementedError):
        await dc.delete_tabular_data_by_filter(None)


# -- binary ---------------------------------------------------------------------------------


async def test_binary_data_by_filter_pages_and_omits_payloads_on_request(
    dc: DataClient, tmp_path: Path
) -> None:
    s = await seed(dc)
    f = create_filter(component_name="cam")
    got: list[str] = []
    last: str | None = None
    while True:
        page, count, last = await dc.binary_data_by_filter(f, limit=3, last=last)
        if not page:
            break
        assert count == len(page)
        for item in page:
            n = s.images.index(item.metadata.binary_data_id)
            assert item.binary == f"jpeg-{n}".encode() * 50
        got += [item.metadata.binary_data_id for item in page]
    assert got == s.images

    meta_only, _, _ = await dc.binary_data_by_filter(f, include_binary_data=False)
    assert [i.binary for i in meta_only] == [b""] * IMAGES
    m = meta_only[0].metadata
    assert (m.capture_metadata.organization_id, m.capture_metadata.location_id) == (ORG, LOC)
    assert m.file_ext == ".jpg" and m.file_size_bytes == len(b"jpeg-0") * 50
    assert m.time_requested.ToDatetime() == NAIVE_T0

    _, total, _ = await dc.binary_data_by_filter(count_only=True)
    assert total == IMAGES
    desc, _, _ = await dc.binary_data_by_filter(f, 1, Order.ORDER_DESCENDING)
    assert desc[0].metadata.binary_data_id == s.images[-1]

    dest = tmp_path / "binary.txt"
    page, _, _ = await dc.binary_data_by_filter(f, limit=2, dest=str(dest))
    assert dest.read_text() == f"{[str(d) for d in page]}"


async def test_binary_data_by_ids_with_ids_binary_ids_and_dest(
    dc: DataClient, tmp_path: Path
) -> None:
    s = await seed(dc)
    wanted = [s.images[2], s.images[0]]
    data = await dc.binary_data_by_ids(wanted)
    assert sorted(d.metadata.binary_data_id for d in data) == sorted(wanted)
    assert {d.binary for d in data} == {b"jpeg-2" * 50, b"jpeg-0" * 50}

    # the seed's way: legacy BinaryIDs built from metadata, as its examples show
    meta, _, _ = await dc.binary_data_by_filter(include_binary_data=False)
    legacy = [
        BinaryID(
            file_id=obj.metadata.id,
            organization_id=obj.metadata.capture_metadata.organization_id,
            location_id=obj.metadata.capture_metadata.location_id,
        )
        for obj in meta
    ]
    dest = tmp_path / "out" / "ids.txt"
    dest.parent.mkdir()
    by_legacy = await dc.binary_data_by_ids(legacy, dest=str(dest))
    assert sorted(d.metadata.binary_data_id for d in by_legacy) == sorted(s.images)
    assert dest.read_text() == f"[{', '.join(str(d) for d in by_legacy)}]"
    assert 'binary: "jpeg-0jpeg-0' in dest.read_text()

    with pytest.raises(ValueError, match="non-empty"):
        await dc.binary_data_by_ids([])
    with pytest.raises(ValueError, match="mixes"):
        await dc.binary_data_by_ids([s.images[0], legacy[0]])  # type: ignore[arg-type]
    with pytest.raises(UploadError) as info:
        await dc.binary_data_by_ids(["no-such-id"])
    assert info.value.status is Status.NOT_FOUND
    assert "BinaryDataByIDs failed with NOT_FOUND" in str(info.value)


async def test_delete_binary_data_by_ids_and_by_filter(dc: DataClient) -> None:
    s = await seed(dc)
    assert await dc.delete_binary_data_by_ids([s.images[0]]) == 1
    assert await dc.delete_binary_data_by_filter(create_filter(tags=["night"])) == 2
    left, _, _ = await dc.binary_data_by_filter(include_binary_data=False)
    assert [d.metadata.binary_data_id for d in left] == [s.images[2]]
    with pytest.raises(UploadError) as info:
        await dc.delete_binary_data_by_ids([s.images[0]])
    assert info.value.status is Status.NOT_FOUND
    assert await dc.delete_binary_data_by_filter(None) == 1
    assert (await dc.binary_data_by_filter(count_only=True))[1] == 0


# -- tags -----------------------------------------------------------------------------------


async def test_tags_add_remove_and_list(dc: DataClient) -> None:
    s = await seed(dc)
    assert sorted(await dc.tags_by_filter()) == ["day", "night"]

    await dc.add_tags_to_binary_data_by_ids(["blurry", "review"], [s.images[0], s.images[1]])
    await dc.add_tags_to_binary_data_by_ids(["blurry"], [s.images[0]])  # already there
    tagged, _, _ = await dc.binary_data_by_filter(create_filter(tags=["blurry"]))
    assert sorted(d.metadata.binary_data_id for d in tagged) == sorted(s.images[:2])
    assert sorted(tagged[0].metadata.capture_metadata.tags) in (
        ["blurry", "day", "review"],
        ["blurry", "night", "review"],
    )

    await dc.add_tags_to_binary_data_by_filter(["cam"], create_filter(component_name="cam"))
    assert sorted(await dc.tags_by_filter()) == ["blurry", "cam", "day", "night", "review"]
    assert sorted(await dc.tags_by_filter(create_filter(tags=["day"]))) == [
        "blurry",
        "cam",
        "day",
        "review",
    ]

    assert await dc.remove_tags_from_binary_data_by_ids(["blurry", "review"], [s.images[0]]) == 2
    assert await dc.remove_tags_from_binary_data_by_filter(["cam"]) == IMAGES
    assert await dc.remove_tags_from_binary_data_by_filter(["review"], Filter()) == 1
    assert sorted(await dc.tags_by_filter()) == ["blurry", "day", "night"]

    bad_tags: list[Any] = [[], "blurry"]
    for bad in bad_tags:
        with pytest.raises(ValueError, match="tags"):
            await dc.add_tags_to_binary_data_by_ids(bad, [s.images[0]])
    with pytest.raises(ValueError, match="tags"):
        await dc.remove_tags_from_binary_data_by_filter([])
    with pytest.raises(ValueError, match="binary_ids"):
        await dc.remove_tags_from_binary_data_by_ids(["x"], [])


# -- bounding boxes -------------------------------------------------------------------------


async def test_bounding_boxes_add_list_filter_and_remove(dc: DataClient) -> None:
    s = await seed(dc)
    box = await dc.add_bounding_box_to_image_by_id(s.images[1], "person", 0.1, 0.2, 0.5, 0.9)
    meta, _, _ = await dc.binary_data_by_filter(include_binary_data=False)
    legacy = BinaryID(file_id=meta[3].metadata.id, organization_id=ORG, location_id=LOC)
    box2 = await dc.add_bounding_box_to_image_by_id(
        binary_id=legacy,
        label="dog",
        x_min_normalized=0,
        y_min_normalized=0,
        x_max_normalized=1,
        y_max_normalized=1,
    )
    assert box and box2 and box != box2

    [item] = await dc.binary_data_by_ids([s.images[1]])
    [bbox] = item.metadata.annotations.bboxes
    assert (bbox.id, bbox.label) == (box, "person")
    corners = [bbox.x_min_normalized, bbox.y_min_normalized]
    assert [*corners, bbox.x_max_normalized, bbox.y_max_normalized] == [0.1, 0.2, 0.5, 0.9]

    assert sorted(await dc.bounding_box_labels_by_filter()) == ["dog", "person"]
    with_person, _, _ = await dc.binary_data_by_filter(create_filter(bbox_labels=["person"]))
    assert [d.metadata.binary_data_id for d in with_person] == [s.images[1]]

    await dc.remove_bounding_box_from_image_by_id(box, s.images[1])
    await dc.remove_bounding_box_from_image_by_id(bbox_id=box2, binary_id=legacy)
    assert await dc.bounding_box_labels_by_filter(create_filter(component_name="cam")) == []

    with pytest.raises(ValueError, match=r"x_max_normalized must be within \[0, 1\]"):
        await dc.add_bounding_box_to_image_by_id(s.images[0], "x", 0, 0, 1.5, 1)
    with pytest.raises(UploadError) as info:
        await dc.add_bounding_box_to_image_by_id(s.images[0], "x", 0.5, 0, 0.2, 1)
    assert info.value.status is Status.INVALID_ARGUMENT


# -- database access ------------------------------------------------------------------------


async def test_database_connection_and_user(dc: DataClient, env: Env) -> None:
    assert await dc.get_database_connection(ORG) == env.server.address
    await dc.configure_database_user(ORG, "s3cret-pass")
    with pytest.raises(UploadError) as info:
        await dc.configure_database_user(ORG, "")
    assert info.value.status is Status.INVALID_ARGUMENT
    with pytest.raises(AuthError):
        await dc.get_database_connection("org-2")


# -- datasets -------------------------------------------------------------------------------


async def test_datasets_lifecycle_and_membership(dc: DataClient) -> None:
    s = await seed(dc)
    before = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=1)
    ds = await dc.create_dataset("training", ORG)
    other = await dc.create_dataset(name="holdout", organization_id=ORG)
    [got] = await dc.list_dataset_by_ids([ds])
    assert (got.id, got.name, got.organization_id) == (ds, "training", ORG)
    assert got.time_created.ToDatetime(dt.UTC) > before
    listed = await dc.list_datasets_by_organization_id(ORG)
    assert sorted(d.name for d in listed) == ["holdout", "training"]

    await dc.rename_dataset(ds, "training-v2")
    assert [d.name for d in await dc.list_dataset_by_ids(ids=[ds])] == ["training-v2"]
    with pytest.raises(UploadError) as info:
        await dc.rename_dataset(other, "training-v2")
    assert info.value.status is Status.ALREADY_EXISTS

    await dc.add_binary_data_to_dataset_by_ids(s.images[:3], ds)
    meta, _, _ = await dc.binary_data_by_filter(include_binary_data=False)
    legacy = BinaryID(file_id=meta[3].metadata.id, organization_id=ORG, location_id=LOC)
    await dc.add_binary_data_to_dataset_by_ids(binary_ids=[legacy], dataset_id=other)
    members, _, _ = await dc.binary_data_by_filter(create_filter(dataset_id=ds))
    assert [d.metadata.binary_data_id for d in members] == s.images[:3]
    assert list(members[0].metadata.dataset_ids) == [ds]

    await dc.remove_binary_data_from_dataset_by_ids([s.images[0]], ds)
    await dc.remove_binary_data_from_dataset_by_ids([legacy], other)
    members, _, _ = await dc.binary_data_by_filter(create_filter(dataset_id=ds))
    assert [d.metadata.binary_data_id for d in members] == s.images[1:3]
    assert (await dc.binary_data_by_filter(create_filter(dataset_id=other)))[0] == []

    await dc.delete_dataset(ds)
    assert [d.id for d in await dc.list_datasets_by_organization_id(ORG)] == [other]
    with pytest.raises(UploadError) as info:
        await dc.list_dataset_by_ids([ds])
    assert info.value.status is Status.NOT_FOUND
    assert (await dc.binary_data_by_filter(count_only=True))[1] == IMAGES  # data stays


# -- uploads, filters, the API's shape ------------------------------------------------------


async def test_file_uploads_are_readable_back(dc: DataClient, tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_bytes(b"from disk " * 1000)
    from_path = await dc.file_upload_from_path(str(path), PART, tags=["files"])
    in_memory = await dc.file_upload(
        PART, b"in memory", file_name="mem", file_extension=".bin", tags=["files"]
    )
    streamed = await dc.streaming_data_capture_upload(
        b"\x00\x01" * 70_000, PART, ".pcd", component_name="lidar", tags=["files"]
    )
    data = {d.metadata.binary_data_id: d for d in await dc.binary_data_by_ids([from_path])}
    data.update({d.metadata.binary_data_id: d for d in await dc.binary_data_by_ids([in_memory])})
    data.update({d.metadata.binary_data_id: d for d in await dc.binary_data_by_ids([streamed])})
    assert data[from_path].binary == b"from disk " * 1000
    assert (data[from_path].metadata.file_name, data[from_path].metadata.file_ext) == (
        "notes",
        ".txt",
    )
    assert data[in_memory].binary == b"in memory"
    assert data[streamed].binary == b"\x00\x01" * 70_000
    assert data[streamed].metadata.capture_metadata.component_name == "lidar"
    assert (await dc.binary_data_by_filter(create_filter(tags=["files"]), count_only=True))[1] == 3


# What a seed script catches: each seed method given arguments the service refuses, and
# the status the service gives. The three filter-only calls have no refusable argument.
BAD_CALLS: dict[str, tuple[Callable[[DataClient, Path], Awaitable[Any]], Status]] = {
    "tabular_data_by_filter": (lambda dc, _: dc.tabular_data_by_filter(limit=-1), INVALID),
    "tabular_data_by_sql": (lambda dc, _: dc.tabular_data_by_sql(ORG, " "), INVALID),
    "tabular_data_by_mql": (lambda dc, _: dc.tabular_data_by_mql(ORG, []), INVALID),
    "delete_tabular_data": (lambda dc, _: dc.delete_tabular_data(ORG, -1), INVALID),
    "binary_data_by_filter": (lambda dc, _: dc.binary_data_by_filter(limit=-1), INVALID),
    "binary_data_by_ids": (lambda dc, _: dc.binary_data_by_ids([]), INVALID),
    "delete_binary_data_by_ids": (lambda dc, _: dc.delete_binary_data_by_ids([]), INVALID),
    "add_tags_to_binary_data_by_ids": (
        lambda dc, _: dc.add_tags_to_binary_data_by_ids([], ["id"]), INVALID,
    ),
    "add_tags_to_binary_data_by_filter": (
        lambda dc, _: dc.add_tags_to_binary_data_by_filter([]), INVALID,
    ),
    "remove_tags_from_binary_data_by_ids": (
        lambda dc, _: dc.remove_tags_from_binary_data_by_ids(["t"], []), INVALID,
    ),
    "remove_tags_from_binary_data_by_filter": (
        lambda dc, _: dc.remove_tags_from_binary_data_by_filter([]), INVALID,
    ),
    "add_bounding_box_to_image_by_id": (
        lambda dc, _: dc.add_bounding_box_to_image_by_id("id", "l", 0.1, 0.1, 1.5, 0.9), INVALID,
    ),
    "remove_bounding_box_from_image_by_id": (
        lambda dc, _: dc.remove_bounding_box_from_image_by_id("nope", "nope"), Status.NOT_FOUND,
    ),
    "get_database_connection": (
        lambda dc, _: dc.get_database_connection("org-2"), Status.PERMISSION_DENIED,
    ),
    "configure_database_user": (lambda dc, _: dc.configure_database_user(ORG, ""), INVALID),
    "create_dataset": (lambda dc, _: dc.create_dataset("", ORG), INVALID),
    "list_dataset_by_ids": (lambda dc, _: dc.list_dataset_by_ids([]), INVALID),
    "list_datasets_by_organization_id": (
        lambda dc, _: dc.list_datasets_by_organization_id("org-2"), Status.PERMISSION_DENIED,
    ),
    "rename_dataset": (lambda dc, _: dc.rename_dataset("nope", "x"), Status.NOT_FOUND),
    "delete_dataset": (lambda dc, _: dc.delete_dataset("nope"), Status.NOT_FOUND),
    "add_binary_data_to_dataset_by_ids": (
        lambda dc, _: dc.add_binary_data_to_dataset_by_ids([], "ds"), INVALID,
    ),
    "remove_binary_data_from_dataset_by_ids": (
        lambda dc, _: dc.remove_binary_data_from_dataset_by_ids([], "ds"), INVALID,
    ),
    "binary_data_capture_upload": (
        lambda dc, _: dc.binary_data_capture_upload(b"x", "", "t", "n", "m", ".bin"), INVALID,
    ),
    "tabular_data_capture_upload": (
        lambda dc, _: dc.tabular_data_capture_upload([{"a": 1}], "", "t", "n", "m"), INVALID,
    ),
    "tabular_data_capture_upload/value": (
        lambda dc, _: dc.tabular_data_capture_upload([{"a": object()}], PART, "t", "n", "m"),
        INVALID,
    ),
    "tabular_data_capture_upload/times": (
        lambda dc, _: dc.tabular_data_capture_upload(
            [{"a": 1}], PART, "t", "n", "m", data_request_times=[]
        ),
        INVALID,
    ),
    "streaming_data_capture_upload": (
        lambda dc, _: dc.streaming_data_capture_upload(b"x", "", ".bin"), INVALID,
    ),
    "file_upload": (lambda dc, _: dc.file_upload("", b"x"), INVALID),
    "file_upload_from_path": (lambda dc, f: dc.file_upload_from_path(str(f), ""), INVALID),
}  # fmt: skip


def test_bad_calls_cover_every_seed_method_that_takes_a_refusable_argument() -> None:
    no_refusable = {"create_filter", "delete_tabular_data_by_filter", "tags_by_filter",
                    "bounding_box_labels_by_filter", "delete_binary_data_by_filter"}  # fmt: skip
    tried = {name.split("/")[0] for name in BAD_CALLS}
    assert tried == set(SEED_SIGNATURES) - no_refusable


@pytest.mark.parametrize("name", sorted(BAD_CALLS))
async def test_every_seed_method_raises_grpc_error_with_the_service_status(
    name: str, dc: DataClient, tmp_path: Path
) -> None:
    call, status = BAD_CALLS[name]
    path = tmp_path / "f.bin"
    path.write_bytes(b"x")
    with pytest.raises(GRPCError) as info:
        await call(dc, path)
    assert info.value.status is status, info.value
    assert isinstance(info.value, UploadError)  # our fields stay: call, item_id, message
    assert info.value.message


async def test_an_unreachable_server_is_a_grpc_error_too(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port nothing listens on: bound, never listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        async with DataClient(f"127.0.0.1:{port}", tls=False, timeout=10) as dc:
            with pytest.raises(GRPCError) as info:
                await dc.tags_by_filter()
    assert info.value.status is Status.UNAVAILABLE


def test_create_filter_sets_every_field_like_the_seed() -> None:
    f = create_filter(
        component_name="cam", component_type="camera", method="GetImages", robot_name="r",
        robot_id="rid", part_name="pn", part_id="pid", location_ids=["l1"],
        organization_ids=["o1"], mime_type=["image/jpeg"], start_time=at(0), end_time=at(5),
        tags=["a", "b"], bbox_labels=["person"], dataset_id="ds",
    )  # fmt: skip
    assert isinstance(f, Filter)
    assert (f.component_name, f.component_type, f.method) == ("cam", "camera", "GetImages")
    assert (f.robot_name, f.robot_id, f.part_name, f.part_id) == ("r", "rid", "pn", "pid")
    assert list(f.location_ids) == ["l1"] and list(f.organization_ids) == ["o1"]
    assert list(f.mime_type) == ["image/jpeg"] and list(f.bbox_labels) == ["person"]
    assert f.interval.start.ToDatetime(dt.UTC) == at(0)
    assert f.interval.end.ToDatetime(dt.UTC) == at(5)
    assert list(f.tags_filter.tags) == ["a", "b"] and f.dataset_id == "ds"
    assert not create_filter().HasField("interval")
    assert DataClient.create_filter(component_name="x") == create_filter(component_name="x")


@pytest.mark.parametrize("name", sorted(SEED_SIGNATURES))
def test_every_seed_method_has_the_seed_parameters_and_an_example(name: str) -> None:
    method = inspect.getattr_static(DataClient, name)
    is_static = isinstance(method, staticmethod)
    assert is_static == (name == "create_filter")
    fn = getattr(DataClient, name)
    params = list(inspect.signature(fn).parameters.values())[0 if is_static else 1 :]
    got = [(p.name, REQUIRED if p.default is p.empty else p.default) for p in params]
    assert got == SEED_SIGNATURES[name]
    assert all(p.kind is p.POSITIONAL_OR_KEYWORD for p in params)
    assert is_static or inspect.iscoroutinefunction(fn)
    doc = inspect.getdoc(fn) or ""
    assert "Example::" in doc, f"{name} has no example"
    example = doc.split("Example::", 1)[1]
    ast.parse(_dedent_example(example))  # the example is valid Python


def _dedent_example(text: str) -> str:
    lines = [ln for ln in text.splitlines() if ln.strip()]
    indent = min(len(ln) - len(ln.lstrip()) for ln in lines)
    body = "\n".join(ln[indent:] for ln in lines)
    return "async def _():\n" + "\n".join("    " + ln for ln in body.splitlines())
