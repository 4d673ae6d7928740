"""Read back, curate and delete through `edged ingest` with the STOCK SDK's DataClient.

Run by the interop interpreter (`.venv-interop/bin/python`), never by the product:

    sdk_query.py UPLOAD_ADDRESS QUERY_ADDRESS API_KEY_ID API_KEY_FILE ORG_ID

Uploads a small fixed data set with the SDK through UPLOAD_ADDRESS, then, through
QUERY_ADDRESS (the same server or another replica of it), calls every query, tag, bounding-box,
dataset and delete method of `DataClient` and prints ONE JSON line to stdout: what each
call returned, reduced to plain values (the test in test_sdk_query.py checks them). A
call that fails records {"error": "<STATUS>: <message>"} in its slot instead, so one
failure does not hide the others; connecting or uploading failing exits 1.
This file must never import `edged`.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

PART_ID = "edged-query-part"
T0 = datetime(2025, 2, 3, 4, 5, 6, tzinfo=UTC)
READINGS = [{"seq": i, "temp_c": 20.0 + i} for i in range(6)]
IMAGES = 5


def image(n: int) -> bytes:
    return b"\xff\xd8\xff\xe0" + f"edged query image {n}".encode() * 50 + b"\xff\xd9"


async def run(upload_address: str, address: str, key_id: str, key: str, org: str) -> dict[str, Any]:
    from viam.app.viam_client import ViamClient  # type: ignore[import-not-found]
    from viam.proto.app.data import BinaryID  # type: ignore[import-not-found]
    from viam.rpc.dial import DialOptions  # type: ignore[import-not-found]
    from viam.utils import create_filter  # type: ignore[import-not-found]

    out: dict[str, Any] = {}

    async def call(name: str, fn: Callable[[], Awaitable[Any]]) -> Any:
        """fn's value, or {"error": "STATUS: message"}: one failure hides no other."""
        try:
            return await fn()
        except Exception as exc:
            status = getattr(exc, "status", None)
            detail = getattr(exc, "message", None) or str(exc)
            return {"error": f"{getattr(status, 'name', status)}: {detail}", "call": name}

    dial = DialOptions.with_api_key(api_key=key, api_key_id=key_id)
    uploader = await ViamClient.create_from_dial_options(dial, app_url=upload_address)
    try:
        client = await ViamClient.create_from_dial_options(dial, app_url=address)
    except BaseException:
        uploader.close()
        raise
    try:
        up = uploader.data_client
        data = client.data_client
        await up.tabular_data_capture_upload(
            tabular_data=READINGS,
            part_id=PART_ID,
            component_type="rdk:component:sensor",
            component_name="thermo",
            method_name="Readings",
            data_request_times=[
                (T0 + timedelta(seconds=i), T0 + timedelta(seconds=i, milliseconds=5))
                for i in range(len(READINGS))
            ],
            tags=["query"],
        )
        ids = [
            await up.binary_data_capture_upload(
                binary_data=image(n),
                part_id=PART_ID,
                component_type="rdk:component:camera",
                component_name="cam" if n < 3 else "cam2",
                method_name="GetImages",
                file_extension=".jpg",
                tags=["query"],
                data_request_times=(
                    T0 + timedelta(seconds=n),
                    T0 + timedelta(seconds=n, milliseconds=9),
                ),
            )
            for n in range(IMAGES)
        ]
        out["ids"] = ids

        # -- tabular ------------------------------------------------------------------
        async def tabular() -> Any:
            rows, count, last = await data.tabular_data_by_filter(
                create_filter(component_name="thermo"), limit=4
            )
            rest, count2, last2 = await data.tabular_data_by_filter(
                create_filter(component_name="thermo"), limit=4, last=last
            )
            done, _, _ = await data.tabular_data_by_filter(
                create_filter(component_name="thermo"), limit=4, last=last2
            )
            _, total, _ = await data.tabular_data_by_filter(count_only=True)
            first = rows[0]
            return {
                "pages": [[r.data["seq"] for r in rows], [r.data["seq"] for r in rest], len(done)],
                "counts": [count, count2, total],
                "metadata": {
                    "organization_id": first.metadata.organization_id,
                    "part_id": first.metadata.part_id,
                    "component_name": first.metadata.component_name,
                    "method_name": first.metadata.method_name,
                    "tags": list(first.metadata.tags),
                },
                "time_requested": first.time_requested.replace(tzinfo=UTC).isoformat(),
                "data": rows[1].data,
            }

        out["tabular_data_by_filter"] = await call("tabular_data_by_filter", tabular)

        async def sql() -> Any:
            rows = await data.tabular_data_by_sql(
                org, "SELECT component_name, count(*) AS n FROM readings GROUP BY component_name"
            )
            return [{k: v for k, v in r.items() if k in ("component_name", "n")} for r in rows]

        out["tabular_data_by_sql"] = await call("tabular_data_by_sql", sql)

        async def mql() -> Any:
            rows = await data.tabular_data_by_mql(
                org, [{"$match": {"component_name": "thermo"}}, {"$count": "n"}]
            )
            return rows

        out["tabular_data_by_mql"] = await call("tabular_data_by_mql", mql)

        # -- binary -------------------------------------------------------------------
        async def by_filter() -> Any:
            seen: list[str] = []
            last = None
            while True:
                page, _, last = await data.binary_data_by_filter(
                    create_filter(mime_type=["image/jpeg"]), limit=2, last=last
                )
                if not page:
                    break
                seen += [d.metadata.binary_data_id for d in page]
            first, count, _ = await data.binary_data_by_filter(
                create_filter(component_name="cam"), include_binary_data=True
            )
            m = first[0].metadata
            return {
                "paged": seen,
                "count": count,
                "first_binary_ok": first[0].binary == image(0),
                "metadata": {
                    "binary_data_id": m.binary_data_id,
                    "file_ext": m.file_ext,
                    "size": m.file_size_bytes,
                    "organization_id": m.capture_metadata.organization_id,
                    "mime_type": m.capture_metadata.mime_type,
                    "tags": list(m.capture_metadata.tags),
                },
            }

        out["binary_data_by_filter"] = await call("binary_data_by_filter", by_filter)

        async def by_ids() -> Any:
            got = await data.binary_data_by_ids([ids[2], ids[1]])
            legacy = await data.binary_data_by_ids(
                [BinaryID(file_id=ids[0], organization_id=org, location_id="")],
                include_binary_data=False,
            )
            return {
                "ids": [d.metadata.binary_data_id for d in got],
                "binary_ok": got[0].binary == image(2),
                "legacy": [d.metadata.binary_data_id for d in legacy],
            }

        out["binary_data_by_ids"] = await call("binary_data_by_ids", by_ids)

        # -- tags ---------------------------------------------------------------------
        async def tags() -> Any:
            await data.add_tags_to_binary_data_by_ids(["good", "day"], ids[:2])
            await data.add_tags_to_binary_data_by_filter(
                ["cam2"], create_filter(component_name="cam2")
            )
            after_add = await data.tags_by_filter()
            removed_ids = await data.remove_tags_from_binary_data_by_ids(["good"], ids[:2])
            removed_filter = await data.remove_tags_from_binary_data_by_filter(
                ["day", "cam2"], create_filter()
            )
            after_remove = await data.tags_by_filter(create_filter())
            return {
                "after_add": after_add,
                "removed_by_ids": removed_ids,
                "removed_by_filter": removed_filter,
                "after_remove": after_remove,
            }

        out["tags"] = await call("tags", tags)

        # -- bounding boxes -----------------------------------------------------------
        async def boxes() -> Any:
            cat = await data.add_bounding_box_to_image_by_id(ids[0], "cat", 0.1, 0.2, 0.3, 0.4)
            dog = await data.add_bounding_box_to_image_by_id(ids[1], "dog", 0.0, 0.0, 1.0, 1.0)
            labels = await data.bounding_box_labels_by_filter()
            got = await data.binary_data_by_ids([ids[0]], include_binary_data=False)
            stored = [
                [b.id, b.label, b.x_min_normalized, b.y_max_normalized]
                for b in got[0].metadata.annotations.bboxes
            ]
            await data.remove_bounding_box_from_image_by_id(cat, ids[0])
            after = await data.bounding_box_labels_by_filter(create_filter())
            bad = await call(
                "bad_box",
                lambda: data.add_bounding_box_to_image_by_id(ids[0], "x", 0.5, 0.1, 0.2, 0.9),
            )
            return {
                "ids": [cat, dog],
                "labels": labels,
                "stored": stored,
                "after": after,
                "bad": bad,
            }

        out["bounding_boxes"] = await call("bounding_boxes", boxes)

        # -- database ----------------------------------------------------------------
        async def database() -> Any:
            host = await data.get_database_connection(org)
            await data.configure_database_user(org, "interop-Passw0rd!")
            return {"hostname": host}

        out["database"] = await call("database", database)

        # -- datasets -----------------------------------------------------------------
        async def datasets() -> Any:
            ds = await data.create_dataset("interop-train", org)
            dup = await call("dataset_duplicate", lambda: data.create_dataset("interop-train", org))
            await data.add_binary_data_to_dataset_by_ids(ids[:3], ds)
            await data.remove_binary_data_from_dataset_by_ids([ids[0]], ds)
            members, _, _ = await data.binary_data_by_filter(
                create_filter(dataset_id=ds), include_binary_data=False
            )
            await data.rename_dataset(ds, "interop-train-v2")
            by_ids = await data.list_dataset_by_ids([ds])
            by_org = await data.list_datasets_by_organization_id(org)
            await data.delete_dataset(ds)
            after = await data.list_datasets_by_organization_id(org)
            gone = await call("dataset_gone", lambda: data.list_dataset_by_ids([ds]))
            return {
                "id": ds,
                "duplicate": dup,
                "members": [d.metadata.binary_data_id for d in members],
                "by_ids": [[d.id, d.name, d.organization_id] for d in by_ids],
                "by_org": [d.name for d in by_org],
                "after_delete": [d.name for d in after],
                "gone": gone,
            }

        out["datasets"] = await call("datasets", datasets)

        # -- deletes ------------------------------------------------------------------
        async def deletes() -> Any:
            by_ids = await data.delete_binary_data_by_ids([ids[0]])
            by_filter = await data.delete_binary_data_by_filter(
                create_filter(component_name="cam2")
            )
            _, left, _ = await data.binary_data_by_filter(count_only=True)
            tab = await data.delete_tabular_data(org, 0)
            _, tab_left, _ = await data.tabular_data_by_filter(count_only=True)
            missing = await call("delete_missing", lambda: data.binary_data_by_ids([ids[0]]))
            return {
                "by_ids": by_ids,
                "by_filter": by_filter,
                "binary_left": left,
                "tabular": tab,
                "tabular_left": tab_left,
                "missing": missing,
            }

        out["deletes"] = await call("deletes", deletes)
    finally:
        client.close()
        uploader.close()
    return out


def main(argv: list[str]) -> int:
    if len(argv) != 5:
        print(
            "usage: sdk_query.py UPLOAD_ADDRESS QUERY_ADDRESS API_KEY_ID API_KEY_FILE ORG_ID",
            file=sys.stderr,
        )
        return 2
    upload_address, address, key_id, key_file, org = argv
    key = Path(key_file).read_text().splitlines()[0].strip()
    real_stdout, sys.stdout = sys.stdout, sys.stderr  # the SDK logs to stdout
    try:
        result = asyncio.run(run(upload_address, address, key_id, key, org))
    except Exception as exc:
        print(f"sdk_query: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    finally:
        sys.stdout = real_stdout
    print(json.dumps(result, sort_keys=True, default=str), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
