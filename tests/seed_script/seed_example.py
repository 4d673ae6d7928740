"""A data script as a seed user wrote it for the seed SDK's DataClient (canonical source).

tests/test_seed_script.py runs it against `edged ingest` after changing only the SDK
import lines and the body of `connect()`; everything else runs as written. It takes
its settings from the environment and prints one JSON summary line at the end.
Not imported by anything: the seed SDK is not installed in the dev venv.
"""

import asyncio
import json
import os
import tempfile
from datetime import datetime, timedelta

from viam.app.viam_client import ViamClient
from viam.proto.app.data import BinaryID
from viam.rpc.dial import DialOptions
from viam.utils import create_filter

ADDRESS = os.environ["DATA_ADDRESS"]
API_KEY_ID = os.environ["DATA_API_KEY_ID"]
API_KEY = os.environ["DATA_API_KEY"]
ORG_ID = os.environ["DATA_ORG_ID"]
PART_ID = "seed-robot-main"


async def connect():
    dial_options = DialOptions.with_api_key(API_KEY, API_KEY_ID)
    return await ViamClient.create_from_dial_options(dial_options, app_url=ADDRESS)


async def main():
    viam_client = await connect()
    data_client = viam_client.data_client
    summary = {}

    # -- uploads ---------------------------------------------------------------------------
    time_requested = datetime(2023, 6, 5, 11)
    time_received = datetime(2023, 6, 5, 11, 0, 3)
    summary["tabular_file_id"] = await data_client.tabular_data_capture_upload(
        part_id=PART_ID,
        component_type="rdk:component:motor",
        component_name="left_motor",
        method_name="IsPowered",
        tags=["tag_1", "tag_2"],
        data_request_times=[
            (time_requested + timedelta(seconds=i), time_received + timedelta(seconds=i))
            for i in range(3)
        ],
        tabular_data=[{"PowerPCT": i * 10, "IsPowered": i > 0} for i in range(3)],
    )
    image_ids = []
    for n in range(2):
        image_ids.append(
            await data_client.binary_data_capture_upload(
                part_id=PART_ID,
                component_type="rdk:component:camera",
                component_name="my_camera",
                method_name="GetImages",
                method_parameters=None,
                tags=["tag_1"],
                data_request_times=(time_requested, time_received),
                file_extension=".jpg",
                binary_data=b"Encoded image bytes %d" % n,
            )
        )
    summary["image_ids"] = image_ids
    summary["file_id"] = await data_client.file_upload(
        data=b"Encoded file bytes",
        part_id=PART_ID,
        tags=["tag_1", "tag_2"],
        file_name="your-file",
        file_extension=".txt",
    )
    with tempfile.NamedTemporaryFile("wb", suffix=".log", delete=False) as f:
        f.write(b"log line\n" * 1000)
    summary["path_file_id"] = await data_client.file_upload_from_path(
        part_id=PART_ID, tags=["tag_3"], filepath=f.name
    )
    os.unlink(f.name)

    # -- tabular data, page by page ---------------------------------------------------------
    my_data = []
    last = None
    my_filter = create_filter(component_name="left_motor")
    while True:
        tabular_data, _count, last = await data_client.tabular_data_by_filter(
            my_filter, limit=2, last=last
        )
        if not tabular_data:
            break
        my_data.extend(tabular_data)
    summary["tabular"] = [
        {
            "data": d.data,
            "component_name": d.metadata.component_name,
            "tags": list(d.metadata.tags),
            "time_requested": d.time_requested.isoformat(),
        }
        for d in my_data
    ]

    # -- tags and bounding boxes on the camera images ---------------------------------------
    binary_metadata, _count, _last = await data_client.binary_data_by_filter(
        create_filter(component_name="my_camera"), include_binary_data=False
    )
    my_ids = []
    for obj in binary_metadata:
        my_ids.append(
            BinaryID(
                file_id=obj.metadata.id,
                organization_id=obj.metadata.capture_metadata.organization_id,
                location_id=obj.metadata.capture_metadata.location_id,
            )
        )
    await data_client.add_tags_to_binary_data_by_ids(["reviewed", "outdoor"], my_ids)
    summary["tags"] = sorted(
        await data_client.tags_by_filter(create_filter(component_name="my_camera"))
    )
    summary["bbox_id"] = await data_client.add_bounding_box_to_image_by_id(
        binary_id=my_ids[0],
        label="person",
        x_min_normalized=0,
        y_min_normalized=0.1,
        x_max_normalized=0.2,
        y_max_normalized=0.3,
    )
    summary["bbox_labels"] = await data_client.bounding_box_labels_by_filter(
        create_filter(component_name="my_camera")
    )

    # -- a dataset of the images -----------------------------------------------------------
    dataset_id = await data_client.create_dataset(name="seed-dataset", organization_id=ORG_ID)
    await data_client.add_binary_data_to_dataset_by_ids(binary_ids=my_ids, dataset_id=dataset_id)
    datasets = await data_client.list_dataset_by_ids(ids=[dataset_id])
    summary["dataset"] = {"id": datasets[0].id, "name": datasets[0].name}
    summary["org_datasets"] = [
        d.name for d in await data_client.list_datasets_by_organization_id(organization_id=ORG_ID)
    ]
    members, _count, _last = await data_client.binary_data_by_filter(
        create_filter(dataset_id=dataset_id)
    )
    summary["dataset_members"] = sorted(m.metadata.binary_data_id for m in members)
    summary["member_bytes"] = sorted(m.binary.decode() for m in members)

    viam_client.close()
    print(json.dumps(summary))


if __name__ == "__main__":
    asyncio.run(main())
