"""S3 blob storage behind `edged ingest`: flags and credentials, failures as gRPC statuses,
and uploads through a real server into a real (moto) endpoint. The store's own contract
is tests/test_blob_contract.py."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError
from grpclib.const import Status

from edged.client import connect
from edged.errors import ConfigError, UploadError
from edged.ingest import ApiKey, IngestServer, IngestSettings
from edged.ingest.blobs import BlobStoreError, blob_key, open_blob_store
from edged.ingest.s3blobs import (
    S3BlobStore,
    S3Credentials,
    S3Location,
    credentials_from_env,
    parse_s3_url,
    s3_status,
)
from tests.support.credentials import KeyFile
from tests.support.s3server import ENV, S3Endpoint, s3_server

MiB = 1024 * 1024


@pytest.mark.parametrize(
    ("url", "bucket", "prefix"),
    [
        ("s3://fleet-data/edged", "fleet-data", "edged/"),
        ("s3://fleet-data", "fleet-data", ""),
        ("s3://fleet-data/a//b/", "fleet-data", "a/b/"),
    ],
)
def test_blob_urls(url: str, bucket: str, prefix: str) -> None:
    assert parse_s3_url(url) == S3Location(bucket, prefix)


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("/var/blobs", "is not s3://BUCKET[/PREFIX]"),
        ("s3://", "is not s3://BUCKET[/PREFIX]"),
        ("s3://Fleet_Data/x", "is not an S3 bucket name"),
        ("s3://fleet-data/../other", "'.' and '..' are not allowed"),
        ("s3://fleet-data/x?versionId=1", "no query or fragment"),
    ],
)
def test_bad_blob_urls_name_the_flag(url: str, problem: str) -> None:
    with pytest.raises(ConfigError, match=r"^--blobs .*" + problem.replace("[", r"\[")):
        parse_s3_url(url)


def test_credentials_come_from_aws_env_only_and_never_show() -> None:
    with pytest.raises(ConfigError, match="needs AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"):
        credentials_from_env({"AWS_ACCESS_KEY_ID": "id"})
    creds = credentials_from_env({**ENV, "AWS_SESSION_TOKEN": "token-secret"})
    assert creds.region == "us-east-1" and creds.session_token == "token-secret"
    shown = repr(creds) + str(creds)
    assert "never-logged" not in shown and "token-secret" not in shown


def test_s3_endpoint_needs_s3_blobs(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--s3-endpoint needs --blobs"):
        open_blob_store(None, tmp_path, "http://127.0.0.1:9")
    with pytest.raises(ConfigError, match="is not an http"):
        open_blob_store("s3://fleet-data", tmp_path, "ftp://x", ENV)


def _client_error(code: str, http: int) -> ClientError:
    response: Any = {"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": http}}
    return ClientError(response, "PutObject")


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (EndpointConnectionError(endpoint_url="http://x"), Status.UNAVAILABLE),
        (ConnectionRefusedError(), Status.UNAVAILABLE),
        (_client_error("SlowDown", 503), Status.UNAVAILABLE),
        (_client_error("InternalError", 500), Status.UNAVAILABLE),
        (_client_error("AccessDenied", 403), Status.INTERNAL),
        (_client_error("NoSuchBucket", 404), Status.INTERNAL),
        (ValueError("ours"), None),
    ],
)
def test_store_failures_map_to_statuses(error: BaseException, status: Status | None) -> None:
    assert s3_status(error) is status


def _dead_endpoint() -> str:
    with socket.socket() as s:  # a loopback port with nothing listening on it
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


async def test_unreachable_store_is_unavailable_naming_bucket_and_key() -> None:
    store = S3BlobStore(
        S3Location("fleet-data", "edged/"),
        S3Credentials("id", "secret-never-logged"),
        _dead_endpoint(),
    )
    await store.open()
    try:
        with pytest.raises(BlobStoreError) as err:
            await store.begin("acme")
        key = blob_key("acme", "ab" + "0" * 30)
        with pytest.raises(BlobStoreError) as read_err:
            await store.read(key)
    finally:
        await store.close()
    assert err.value.status is Status.UNAVAILABLE
    assert err.value.message.startswith("could not write s3://fleet-data/edged/pending/o_acme/")
    assert "is unavailable" in err.value.message and "secret" not in err.value.message
    assert read_err.value.status is Status.UNAVAILABLE
    assert f"s3://fleet-data/edged/{key}" in read_err.value.message


async def _objects(s3: S3Endpoint, bucket: str) -> list[str]:
    async with s3.client() as c:
        listed = await c.list_objects_v2(Bucket=bucket)
    return sorted(o["Key"] for o in listed.get("Contents", []))


@pytest.fixture
async def s3_ingest(
    tmp_path: Path, key: KeyFile, s3: S3Endpoint, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[IngestServer, str]]:
    for name, value in s3.env.items():
        monkeypatch.setenv(name, value)
    bucket = await s3.new_bucket()
    settings = IngestSettings(
        data_dir=tmp_path / "ingest",
        blobs=f"s3://{bucket}/edged",
        s3_endpoint=s3.url,
        keys=(ApiKey(key.key_id, key.secret, "acme"),),
        shutdown_grace_s=2.0,
    )
    async with IngestServer(settings) as server:
        yield server, bucket


async def test_uploads_land_in_the_bucket_and_read_and_delete_through_it(
    s3_ingest: tuple[IngestServer, str], s3: S3Endpoint, key: KeyFile
) -> None:
    server, bucket = s3_ingest
    big = bytes(range(256)) * (9 * MiB // 256)  # more than one 8 MiB part
    async with connect(
        server.address, api_key_id=key.key_id, api_key=key.secret, tls=False
    ) as client:
        small = await client.file_upload("part-1", b"notes", file_name="n", file_extension=".txt")
        streamed = await client.streaming_data_capture_upload(big, "part-1", ".bin")
        got = await client.binary_data_by_ids([small, streamed])
        assert [g.binary for g in got] == [b"notes", big]
        assert not (server.settings.data_dir / "blobs").exists()  # nothing kept locally
        assert await _objects(s3, bucket) == sorted(
            f"edged/{blob_key('acme', bid)}" for bid in (small, streamed)
        )  # no pending marker outlives its commit
        assert await client.delete_binary_data_by_ids([small]) == 1
        assert await _objects(s3, bucket) == [f"edged/{blob_key('acme', streamed)}"]


async def test_an_unreachable_store_answers_unavailable_so_daemons_retry(
    tmp_path: Path, key: KeyFile, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in ENV.items():
        monkeypatch.setenv(name, value)
    settings = IngestSettings(
        data_dir=tmp_path / "ingest",
        blobs="s3://fleet-data/edged",
        s3_endpoint=_dead_endpoint(),
        keys=(ApiKey(key.key_id, key.secret, "acme"),),
        shutdown_grace_s=2.0,
    )
    async with (
        IngestServer(settings) as server,
        connect(server.address, api_key_id=key.key_id, api_key=key.secret, tls=False) as client,
    ):
        with pytest.raises(UploadError) as err:
            await client.file_upload("part-1", b"notes", file_name="n")
    assert err.value.status is Status.UNAVAILABLE
    assert "s3://fleet-data/edged/pending/o_acme/" in str(err.value)
    assert "never-logged" not in str(err.value)


async def test_delete_succeeds_when_the_store_fails_after_the_rows_are_gone(
    tmp_path: Path, key: KeyFile, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The rows are deleted first; a store that fails then leaves an orphan (logged), and
    the call still succeeds instead of inviting a retry of a delete already done."""
    for name, value in ENV.items():
        monkeypatch.setenv(name, value)
    with contextlib.ExitStack() as endpoint:
        own = endpoint.enter_context(s3_server())  # this test stops its endpoint half-way
        bucket = await own.new_bucket()
        settings = IngestSettings(
            data_dir=tmp_path / "ingest",
            blobs=f"s3://{bucket}/edged",
            s3_endpoint=own.url,
            keys=(ApiKey(key.key_id, key.secret, "acme"),),
            shutdown_grace_s=2.0,
        )
        async with (
            IngestServer(settings) as server,
            connect(server.address, api_key_id=key.key_id, api_key=key.secret, tls=False) as c,
        ):
            bid = await c.file_upload("part-1", b"x", file_name="x")
            endpoint.close()  # the store is gone
            assert await c.delete_binary_data_by_ids([bid]) == 1
            assert await server.store.binaries() == []
    assert f"s3://{bucket}/edged/{blob_key('acme', bid)}" in caplog.text
    assert "orphans" in caplog.text
