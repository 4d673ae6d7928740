"""The blob-store contract (edged/ingest/blobs.py), run unchanged against every store:
the data directory and S3-compatible storage (a real moto endpoint on loopback)."""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from edged.ingest.blobs import (
    BlobStore,
    BlobStoreError,
    BlobWriter,
    LocalBlobStore,
    blob_key,
    check_key,
    marker_key,
)
from edged.ingest.s3blobs import S3BlobStore, S3Credentials, S3Location
from tests.support.s3server import S3Endpoint

MiB = 1024 * 1024
PART = 5 * MiB  # the smallest part S3 allows, so a test blob spans several
CHUNK = 256 * 1024
ORG, ORG2 = "acme", "globex"


@dataclass
class Env:
    """A store under test, how to make a second one on the same place (another server,
    or the same one restarted after a crash), and what the place holds."""

    kind: str
    root: Path
    s3: S3Endpoint | None = None
    bucket: str = ""

    def make(self) -> BlobStore:
        if self.s3 is None:
            return LocalBlobStore(self.root)
        creds = S3Credentials(
            self.s3.env["AWS_ACCESS_KEY_ID"], self.s3.env["AWS_SECRET_ACCESS_KEY"]
        )
        return S3BlobStore(S3Location(self.bucket, "edged/"), creds, self.s3.url, part_size=PART)

    async def contents(self) -> list[str]:
        """Every file or object the store's place holds, plus multipart uploads in progress
        (as `upload:<key>`): what a leak would show up in."""
        if self.s3 is None:
            return sorted(
                str(p.relative_to(self.root))
                for p in (self.root / "blobs").rglob("*")
                if p.is_file()
            )
        async with self.s3.client() as c:
            objs = await c.list_objects_v2(Bucket=self.bucket)
            ups = await c.list_multipart_uploads(Bucket=self.bucket)
        return sorted(
            [o["Key"] for o in objs.get("Contents", [])]
            + [f"upload:{u['Key']}" for u in ups.get("Uploads", [])]
        )

    def name(self, key: str) -> str:
        """Where a blob key lives in this place."""
        return key if self.s3 is None else f"edged/{key}"


@pytest.fixture(params=["local", "s3"])
async def env(request: pytest.FixtureRequest, tmp_path: Path, s3: S3Endpoint) -> Env:
    if request.param == "local":
        return Env("local", tmp_path / "data")
    return Env("s3", tmp_path, s3, await s3.new_bucket())


@pytest.fixture
async def store(env: Env) -> AsyncIterator[BlobStore]:
    s = env.make()
    await s.open()
    try:
        yield s
    finally:
        await s.close()


def payload(size: int, seed: int = 0) -> bytes:
    block = hashlib.sha256(seed.to_bytes(4, "big")).digest() * (CHUNK // 32)
    return (block * (size // len(block) + 1))[:size]


async def put(store: BlobStore, org: str, data: bytes) -> BlobWriter:
    """A whole upload as the index drives it: write, finish, place, commit."""
    w = await store.begin(org)
    for i in range(0, len(data), CHUNK):
        await w.write(data[i : i + CHUNK])
    await w.finish()
    w.place()
    await w.committed()
    await w.discard()  # what datasync's `finally` does: nothing, once placed
    return w


async def nothing_indexed(file_ids: list[str]) -> set[str]:
    return set()


async def test_roundtrip_keeps_bytes_size_and_digest(env: Env, store: BlobStore) -> None:
    data = payload(100_000)
    w = await put(store, ORG, data)
    assert await store.read(w.key) == data
    assert (w.size, w.sha256) == (len(data), hashlib.sha256(data).hexdigest())
    assert await env.contents() == [env.name(w.key)]  # no temp file, no marker left


async def test_empty_blob_roundtrips(store: BlobStore) -> None:
    w = await put(store, ORG, b"")
    assert await store.read(w.key) == b""


async def test_large_blob_streams_with_at_most_one_part_in_memory(
    env: Env, store: BlobStore
) -> None:
    """24 MiB in 256 KiB chunks: never more than one part plus one chunk buffered."""
    data = payload(24 * MiB + 12345, seed=1)
    w = await put(store, ORG, data)
    assert w.peak_buffered <= PART + CHUNK
    got = await store.read(w.key)
    assert hashlib.sha256(got).hexdigest() == hashlib.sha256(data).hexdigest()
    assert await env.contents() == [env.name(w.key)]


@pytest.mark.parametrize("size", [1000, 7 * MiB], ids=["one-put", "multipart"])
async def test_discard_before_finish_leaves_nothing(env: Env, store: BlobStore, size: int) -> None:
    w = await store.begin(ORG)
    await w.write(payload(size))
    await w.discard()
    assert await env.contents() == []


async def test_discard_after_finish_leaves_nothing(env: Env, store: BlobStore) -> None:
    """A repeat upload, or a failed index transaction: the finished blob goes again."""
    w = await store.begin(ORG)
    await w.write(payload(6 * MiB))
    await w.finish()
    await w.discard()
    assert await env.contents() == []


async def test_placed_blob_survives_discard_and_drop_removes_it(env: Env, store: BlobStore) -> None:
    """After `place` the row may still commit (a cancelled caller): discard keeps the
    blob; a failed commit's `drop` removes it."""
    w = await store.begin(ORG)
    await w.write(b"bytes")
    await w.finish()
    w.place()
    await w.discard()
    assert await store.read(w.key) == b"bytes"
    await w.drop()
    assert await env.contents() == []


async def test_delete_removes_blobs_and_ignores_missing_ones(env: Env, store: BlobStore) -> None:
    a = await put(store, ORG, b"a")
    b = await put(store, ORG, b"b")
    await store.delete([a.key, blob_key(ORG, uuid.uuid4().hex)])
    assert await env.contents() == [env.name(b.key)]


async def test_sweep_removes_what_a_crashed_server_left(env: Env, store: BlobStore) -> None:
    """A crash mid-stream (parts uploaded), one after the blob was complete but before its
    row committed, and one after the commit but before its marker went: a server started
    afterwards removes the first two and keeps the indexed one."""
    mid = await store.begin(ORG)
    await mid.write(payload(6 * MiB))
    done = await store.begin(ORG)
    await done.write(b"never indexed")
    await done.finish()
    kept = await store.begin(ORG)
    await kept.write(b"indexed")
    await kept.finish()
    kept.place()
    assert await env.contents()  # the crash left something behind

    async def indexed(file_ids: list[str]) -> set[str]:
        return {kept.file_id} & set(file_ids)

    restarted = env.make()
    await restarted.open()
    try:
        await restarted.sweep(indexed, grace_s=0)
        assert await env.contents() == [env.name(kept.key)]
        assert await restarted.read(kept.key) == b"indexed"
    finally:
        await restarted.close()
        for w in (mid, done):
            await w.discard()  # only frees what the crashed writer held (file handles)


async def test_sweep_leaves_uploads_in_progress_alone(env: Env, store: BlobStore) -> None:
    live = await store.begin(ORG)
    await live.write(payload(6 * MiB))
    swept = await store.sweep(nothing_indexed)  # the default grace period
    assert swept.blobs == swept.temp_files == swept.multipart_uploads == 0
    await live.write(b"tail")
    await live.finish()
    live.place()
    await live.committed()
    assert await store.read(live.key) == payload(6 * MiB) + b"tail"
    assert await env.contents() == [env.name(live.key)]


async def test_keys_are_scoped_per_organisation(env: Env, store: BlobStore) -> None:
    a = await put(store, ORG, b"a")
    b = await put(store, ORG2, b"b")
    assert a.key.startswith("blobs/o_acme/") and b.key.startswith("blobs/o_globex/")
    assert await env.contents() == sorted([env.name(a.key), env.name(b.key)])
    if env.s3 is None:  # private on disk, however deep: directories 0700, blobs 0600
        for p in (env.root / "blobs").rglob("*"):
            assert p.stat().st_mode & 0o777 == (0o700 if p.is_dir() else 0o600), p


HOSTILE_ORGS = ["../..", "a/../../b", "/etc", ".", "", "x" * 5000, "é\x00/"]


async def test_hostile_organisation_ids_stay_one_segment_under_blobs(
    env: Env, store: BlobStore
) -> None:
    for org in HOSTILE_ORGS:
        w = await put(store, org, b"x")
        seg = w.key.split("/")
        assert len(seg) == 4 and seg[0] == "blobs" and seg[1] not in ("", ".", ".."), org
        assert await store.read(w.key) == b"x"
        assert env.name(w.key) in await env.contents()
        await store.delete([w.key])
    where = [env.root / "blobs"] if env.s3 is None else []
    for d in where:  # nothing was made outside blobs/ on the way
        assert sorted(p.name for p in env.root.iterdir()) == ["blobs"]
        assert all(p.resolve().is_relative_to(d.resolve()) for p in d.rglob("*"))


HOSTILE_KEYS = [
    "../ingest.sqlite3",
    "blobs/../ingest.sqlite3",
    "blobs/ab/../../ingest.sqlite3",
    "/etc/passwd",
    "blobs/o_acme/../../../x/" + "0" * 32,
    "pending/o_acme/ab/" + "a" * 32,
    "blobs/o_acme/ab/" + "a" * 31 + "/",
    "blobs\\..\\ingest.sqlite3",
    "",
]


async def test_hostile_keys_are_refused_by_read_and_delete(env: Env, store: BlobStore) -> None:
    w = await put(store, ORG, b"keep")
    before = await env.contents()
    if env.s3 is None:
        (env.root / "ingest.sqlite3").write_bytes(b"index")
    for key in HOSTILE_KEYS:
        with pytest.raises(ValueError, match="is not a blob key"):
            await store.read(key)
        with pytest.raises(ValueError, match="is not a blob key"):
            await store.delete([w.key, key])  # checked before anything goes
    assert await env.contents() == before
    if env.s3 is None:
        assert (env.root / "ingest.sqlite3").read_bytes() == b"index"


def test_key_shapes() -> None:
    fid = "ab" + "0" * 30
    assert blob_key("acme", fid) == f"blobs/o_acme/ab/{fid}"
    assert blob_key("a/b", fid) == f"blobs/o_a%2Fb/ab/{fid}"
    assert blob_key("x" * 300, fid).startswith("blobs/h_")
    assert check_key(f"blobs/ab/{fid}")  # stored before keys were scoped per organisation
    assert marker_key(blob_key("acme", fid)) == f"pending/o_acme/ab/{fid}"


async def test_reading_a_missing_blob_fails_naming_it(store: BlobStore) -> None:
    key = blob_key(ORG, os.urandom(16).hex())
    with pytest.raises((FileNotFoundError, BlobStoreError), match=key):
        await store.read(key)
