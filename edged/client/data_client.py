"""The seed `DataClient`'s query, curation and dataset calls, on our own protobuf types.

Same method names, parameters (order and defaults) and return shapes as the seed
client, so a script written for it runs after changing its imports and its connect
call. Where the seed returns SDK types we return the generated `edged._proto` message
of the same name and fields (`Filter`, `BinaryID`, `BinaryData`, `Dataset`, ...);
`edged.client` re-exports them. Arguments the server would refuse anyway (no ids, no
tags, a box outside the image) raise `InvalidArgument` before anything is sent; what
the server refuses raises `UploadError`/`AuthError` with its gRPC status. All three are
grpclib `GRPCError`s, as the seed documents (`InvalidArgument` is a ValueError too).

`DataQueries` holds only the calls: the connection, authentication and error mapping
come from `UploadClient` (see `edged.client.DataClient`, which combines the two).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TextIO, TypeVar

from google.protobuf.message import Message
from google.protobuf.struct_pb2 import Struct, Value
from google.protobuf.timestamp_pb2 import Timestamp

from edged._proto.app.data.v1 import data_pb2 as dpb
from edged._proto.app.dataset.v1 import dataset_pb2 as spb
from edged.errors import InvalidArgument, MissingExtra

BinaryData = dpb.BinaryData
BinaryID = dpb.BinaryID
BinaryMetadata = dpb.BinaryMetadata
CaptureInterval = dpb.CaptureInterval
CaptureMetadata = dpb.CaptureMetadata
Filter = dpb.Filter
Order = dpb.Order
TagsFilter = dpb.TagsFilter
TagsFilterType = dpb.TagsFilterType
Dataset = spb.Dataset

_DATA = "/viam.app.data.v1.DataService/"
_DATASET = "/viam.app.dataset.v1.DatasetService/"
_Msg = TypeVar("_Msg", bound=Message)


def load_bson(call: str) -> Any:
    """pymongo's bson, imported on first use: the robot install (no `ingest` extra)
    uploads and queries without it; only SQL/MQL rows, which are BSON, need it."""
    try:
        import bson
    except ImportError:
        raise MissingExtra(f"{call} (its rows are BSON)") from None
    return bson


@dataclass
class TabularData:  # noqa: PLW1641 - mutable, so unhashable, like the seed's
    """One reading and its capture metadata, as `tabular_data_by_filter` returns it.

    Equality compares the printed form, like the seed's, so two readings with the same
    values, metadata and times are equal whatever object they came from."""

    data: Mapping[str, Any]
    """The reading's fields."""
    metadata: CaptureMetadata
    """Who captured it: part, component, method, tags, organisation and location."""
    time_requested: dt.datetime
    """When the robot asked for the reading (naive, UTC)."""
    time_received: dt.datetime
    """When the robot got it back (naive, UTC)."""

    def __str__(self) -> str:
        return (
            f"{self.data}\n{self.metadata}Time requested: {self.time_requested}\n"
            f"Time received: {self.time_received}\n"
        )

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TabularData) and str(self) == str(other)


def _timestamp(when: dt.datetime | None) -> Timestamp | None:
    if when is None:
        return None
    ts = Timestamp()
    ts.FromDatetime(when)
    return ts


def create_filter(
    component_name: str | None = None,
    component_type: str | None = None,
    method: str | None = None,
    robot_name: str | None = None,
    robot_id: str | None = None,
    part_name: str | None = None,
    part_id: str | None = None,
    location_ids: list[str] | None = None,
    organization_ids: list[str] | None = None,
    mime_type: list[str] | None = None,
    start_time: dt.datetime | None = None,
    end_time: dt.datetime | None = None,
    tags: list[str] | None = None,
    bbox_labels: list[str] | None = None,
    dataset_id: str | None = None,
) -> Filter:
    """Build a `Filter` from keyword arguments; every field left out matches anything.

    `tags` match data carrying at least one of them; `start_time`/`end_time` bound the
    capture time (naive datetimes are taken as UTC, as the seed does).

    Example::

        f = create_filter(component_name="cam", tags=["field-test"])
        images, count, last = await data_client.binary_data_by_filter(f)
    """
    interval = None
    if start_time or end_time:
        interval = CaptureInterval(start=_timestamp(start_time), end=_timestamp(end_time))
    return Filter(
        component_name=component_name or "",
        component_type=component_type or "",
        method=method or "",
        robot_name=robot_name or "",
        robot_id=robot_id or "",
        part_name=part_name or "",
        part_id=part_id or "",
        location_ids=location_ids,
        organization_ids=organization_ids,
        mime_type=mime_type,
        interval=interval,
        tags_filter=TagsFilter(tags=tags),
        bbox_labels=bbox_labels,
        dataset_id=dataset_id or "",
    )


def _primitive(value: Value) -> Any:
    kind = value.WhichOneof("kind")
    if kind == "list_value":
        return [_primitive(v) for v in value.list_value.values]
    if kind == "struct_value":
        return {k: _primitive(v) for k, v in value.struct_value.fields.items()}
    if kind in ("string_value", "number_value", "bool_value"):
        return getattr(value, kind)
    return None


def struct_to_dict(struct: Struct) -> dict[str, Any]:
    """A Struct as the seed's dict (numbers are floats; NaN and ±Inf included, which
    `json_format.MessageToDict` refuses)."""
    return {k: _primitive(v) for k, v in struct.fields.items()}


def _ids(call: str, binary_ids: Sequence[BinaryID] | Sequence[str]) -> dict[str, Any]:
    """Request fields for a list of ids: binary_data_ids for strings, else legacy BinaryIDs."""
    if isinstance(binary_ids, str) or not binary_ids:
        raise InvalidArgument(
            call, "binary_ids must be a non-empty list of BinaryID objects or ids"
        )
    if all(isinstance(b, str) for b in binary_ids):
        return {"binary_data_ids": list(binary_ids)}
    if all(isinstance(b, BinaryID) for b in binary_ids):
        return {"binary_ids": list(binary_ids)}
    raise InvalidArgument(call, "binary_ids mixes BinaryID objects and strings; use one kind")


def _one_id(binary_id: BinaryID | str) -> dict[str, Any]:
    return {"binary_data_id": binary_id} if isinstance(binary_id, str) else {"binary_id": binary_id}


def _tags(call: str, tags: Sequence[str]) -> list[str]:
    if isinstance(tags, str) or not tags:
        raise InvalidArgument(call, "tags must be a non-empty list of tags")
    return list(tags)


def _write_list(dest: str, items: Iterable[str]) -> None:
    """Write `[a, b, ...]` one item at a time, so the file's text is never built whole."""
    with open(dest, "w", encoding="utf-8") as f:
        _write_items(f, items)


def _write_items(f: TextIO, items: Iterable[str]) -> None:
    f.write("[")
    for i, text in enumerate(items):
        if i:
            f.write(", ")
        f.write(text)
    f.write("]")


def _data_request(
    call: str,
    filter: Filter | None,
    limit: int | None,
    sort_order: Order.ValueType | None,
    last: str | None,
) -> dpb.DataRequest:
    if limit is not None and limit < 0:
        raise InvalidArgument(call, f"limit must not be negative, got {limit}")
    return dpb.DataRequest(
        filter=filter or Filter(),
        limit=limit or 0,
        sort_order=sort_order or Order.ORDER_UNSPECIFIED,
        last=last or "",
    )


class DataQueries:
    """The query API half of `DataClient`; needs a connection's `unary` to run."""

    async def unary(
        self, path: str, request: Message, resp_type: type[_Msg], *, timeout: float | None = None
    ) -> _Msg:
        raise NotImplementedError  # provided by UploadClient

    # -- tabular ----------------------------------------------------------------------------

    async def tabular_data_by_filter(
        self,
        filter: Filter | None = None,
        limit: int | None = None,
        sort_order: Order.ValueType | None = None,
        last: str | None = None,
        count_only: bool = False,
        include_internal_data: bool = False,
        dest: str | None = None,
    ) -> tuple[list[TabularData], int, str]:
        """One page of readings matching `filter`, with the page's count and its `last`
        token; pass the token back to get the next page (an empty page ends the walk).

        `limit` defaults to 50 on the server; `count_only` returns no readings, only the
        number of all matches. With `dest` the page is also written to that file
        (overwritten) as the list of each reading's printed form.

        Example::

            last, rows = None, []
            while True:
                page, count, last = await data_client.tabular_data_by_filter(
                    create_filter(component_name="imu"), limit=500, last=last
                )
                if not page:
                    break
                rows.extend(page)
        """
        request = dpb.TabularDataByFilterRequest(
            data_request=_data_request("tabular_data_by_filter", filter, limit, sort_order, last),
            count_only=count_only,
            include_internal_data=include_internal_data,
        )
        resp = await self.unary(
            _DATA + "TabularDataByFilter", request, dpb.TabularDataByFilterResponse
        )
        data = [
            TabularData(
                struct_to_dict(item.data),
                resp.metadata[item.metadata_index],
                item.time_requested.ToDatetime(),
                item.time_received.ToDatetime(),
            )
            for item in resp.data
        ]
        if dest:
            _write_list(dest, (repr(str(d)) for d in data))
        return data, resp.count, resp.last

    async def tabular_data_by_sql(
        self, organization_id: str, sql_query: str
    ) -> list[dict[str, Any]]:
        """Rows of a SQL query over the organisation's readings, each decoded from BSON.

        Example::

            rows = await data_client.tabular_data_by_sql(
                "org-1", "SELECT component_name, count(*) AS n FROM readings GROUP BY 1"
            )
        """
        request = dpb.TabularDataBySQLRequest(organization_id=organization_id, sql_query=sql_query)
        resp = await self.unary(_DATA + "TabularDataBySQL", request, dpb.TabularDataBySQLResponse)
        bson = load_bson("tabular_data_by_sql")
        return [bson.decode(raw) for raw in resp.raw_data]

    async def tabular_data_by_mql(
        self, organization_id: str, mql_binary: list[bytes] | list[dict[str, Any]]
    ) -> list[dict[str, Any]]:
        """Rows of an MQL aggregation pipeline over the organisation's readings.

        Stages are BSON-encoded documents, as in the seed; plain dicts are encoded for you.

        Example::

            rows = await data_client.tabular_data_by_mql(
                "org-1", [bson.encode({"$match": {"component_name": "imu"}}), {"$limit": 5}]
            )
        """
        if isinstance(mql_binary, bytes | str) or not mql_binary:
            raise InvalidArgument(
                "tabular_data_by_mql", "mql_binary must be a non-empty list of pipeline stages"
            )
        bson = load_bson("tabular_data_by_mql")
        stages = [s if isinstance(s, bytes) else bson.encode(s) for s in mql_binary]
        request = dpb.TabularDataByMQLRequest(organization_id=organization_id, mql_binary=stages)
        resp = await self.unary(_DATA + "TabularDataByMQL", request, dpb.TabularDataByMQLResponse)
        return [bson.decode(raw) for raw in resp.raw_data]

    async def delete_tabular_data(self, organization_id: str, delete_older_than_days: int) -> int:
        """Delete the organisation's readings captured more than this many days ago (0 =
        all of them); returns how many were deleted.

        Example::

            deleted = await data_client.delete_tabular_data("org-1", 30)
        """
        if delete_older_than_days < 0:
            raise InvalidArgument(
                "delete_tabular_data",
                f"delete_older_than_days must be >= 0, got {delete_older_than_days}",
            )
        request = dpb.DeleteTabularDataRequest(
            organization_id=organization_id, delete_older_than_days=delete_older_than_days
        )
        resp = await self.unary(_DATA + "DeleteTabularData", request, dpb.DeleteTabularDataResponse)
        return resp.deleted_count

    async def delete_tabular_data_by_filter(self, filter: Filter | None) -> int:
        """Deprecated in the seed, where it raises too: use `delete_tabular_data`.

        Example::

            await data_client.delete_tabular_data("org-1", 0)  # instead
        """
        raise NotImplementedError(
            "delete_tabular_data_by_filter is deprecated; use delete_tabular_data"
        )

    # -- binary ----------------------------------------------------------------------------

    async def binary_data_by_filter(
        self,
        filter: Filter | None = None,
        limit: int | None = None,
        sort_order: Order.ValueType | None = None,
        last: str | None = None,
        include_binary_data: bool = True,
        count_only: bool = False,
        include_internal_data: bool = False,
        dest: str | None = None,
    ) -> tuple[list[BinaryData], int, str]:
        """One page of binary data matching `filter`, with the page's count and its `last`
        token (page like `tabular_data_by_filter`).

        `include_binary_data=False` returns metadata only, which is much cheaper when you
        only want ids. With `dest` the page is also written to that file (overwritten).

        Example::

            page, count, last = await data_client.binary_data_by_filter(
                create_filter(component_name="cam"), limit=10, include_binary_data=False
            )
            ids = [item.metadata.binary_data_id for item in page]
        """
        request = dpb.BinaryDataByFilterRequest(
            data_request=_data_request("binary_data_by_filter", filter, limit, sort_order, last),
            include_binary=include_binary_data,
            count_only=count_only,
            include_internal_data=include_internal_data,
        )
        resp = await self.unary(
            _DATA + "BinaryDataByFilter", request, dpb.BinaryDataByFilterResponse
        )
        data = list(resp.data)
        if dest:
            _write_list(dest, (repr(str(d)) for d in data))
        return data, resp.count, resp.last

    async def binary_data_by_ids(
        self, binary_ids: list[BinaryID] | list[str], dest: str | None = None
    ) -> list[BinaryData]:
        """The binary data (payload and metadata) of these ids, legacy `BinaryID`s or
        binary_data_id strings.

        With `dest` the items are also written to that file (overwritten), one at a time,
        so the file's text is never held whole next to the response.

        Example::

            [image] = await data_client.binary_data_by_ids([binary_data_id], dest="img.txt")
            Path("img.jpg").write_bytes(image.binary)
        """
        request = dpb.BinaryDataByIDsRequest(
            include_binary=True, **_ids("binary_data_by_ids", binary_ids)
        )
        resp = await self.unary(_DATA + "BinaryDataByIDs", request, dpb.BinaryDataByIDsResponse)
        if dest:
            _write_list(dest, (str(d) for d in resp.data))
        return list(resp.data)

    async def delete_binary_data_by_filter(self, filter: Filter | None) -> int:
        """Delete the binary data matching `filter` (None or an empty Filter: all of it);
        returns how many items were deleted.

        Example::

            gone = await data_client.delete_binary_data_by_filter(create_filter(tags=["junk"]))
        """
        request = dpb.DeleteBinaryDataByFilterRequest(filter=filter or Filter())
        resp = await self.unary(
            _DATA + "DeleteBinaryDataByFilter", request, dpb.DeleteBinaryDataByFilterResponse
        )
        return resp.deleted_count

    async def delete_binary_data_by_ids(self, binary_ids: list[BinaryID] | list[str]) -> int:
        """Delete these binary data items; returns how many were deleted.

        Example::

            gone = await data_client.delete_binary_data_by_ids([binary_data_id])
        """
        request = dpb.DeleteBinaryDataByIDsRequest(**_ids("delete_binary_data_by_ids", binary_ids))
        resp = await self.unary(
            _DATA + "DeleteBinaryDataByIDs", request, dpb.DeleteBinaryDataByIDsResponse
        )
        return resp.deleted_count

    # -- tags ------------------------------------------------------------------------------

    async def add_tags_to_binary_data_by_ids(
        self, tags: list[str], binary_ids: list[BinaryID] | list[str]
    ) -> None:
        """Add tags to these binary data items (tags already there stay once).

        Example::

            await data_client.add_tags_to_binary_data_by_ids(["blurry"], [binary_data_id])
        """
        request = dpb.AddTagsToBinaryDataByIDsRequest(
            tags=_tags("add_tags_to_binary_data_by_ids", tags),
            **_ids("add_tags_to_binary_data_by_ids", binary_ids),
        )
        await self.unary(
            _DATA + "AddTagsToBinaryDataByIDs", request, dpb.AddTagsToBinaryDataByIDsResponse
        )

    async def add_tags_to_binary_data_by_filter(
        self, tags: list[str], filter: Filter | None = None
    ) -> None:
        """Add tags to every binary data item matching `filter` (None: all of them).

        Example::

            await data_client.add_tags_to_binary_data_by_filter(
                ["night"], create_filter(component_name="cam")
            )
        """
        request = dpb.AddTagsToBinaryDataByFilterRequest(
            filter=filter or Filter(), tags=_tags("add_tags_to_binary_data_by_filter", tags)
        )
        await self.unary(
            _DATA + "AddTagsToBinaryDataByFilter", request, dpb.AddTagsToBinaryDataByFilterResponse
        )

    async def remove_tags_from_binary_data_by_ids(
        self, tags: list[str], binary_ids: list[BinaryID] | list[str]
    ) -> int:
        """Remove tags from these items; returns how many tags were removed.

        Example::

            removed = await data_client.remove_tags_from_binary_data_by_ids(
                ["blurry"], [binary_data_id]
            )
        """
        request = dpb.RemoveTagsFromBinaryDataByIDsRequest(
            tags=_tags("remove_tags_from_binary_data_by_ids", tags),
            **_ids("remove_tags_from_binary_data_by_ids", binary_ids),
        )
        resp = await self.unary(
            _DATA + "RemoveTagsFromBinaryDataByIDs",
            request,
            dpb.RemoveTagsFromBinaryDataByIDsResponse,
        )
        return resp.deleted_count

    async def remove_tags_from_binary_data_by_filter(
        self, tags: list[str], filter: Filter | None = None
    ) -> int:
        """Remove tags from every item matching `filter` (None: all of them); returns how
        many tags were removed.

        Example::

            removed = await data_client.remove_tags_from_binary_data_by_filter(["night"])
        """
        request = dpb.RemoveTagsFromBinaryDataByFilterRequest(
            filter=filter or Filter(), tags=_tags("remove_tags_from_binary_data_by_filter", tags)
        )
        resp = await self.unary(
            _DATA + "RemoveTagsFromBinaryDataByFilter",
            request,
            dpb.RemoveTagsFromBinaryDataByFilterResponse,
        )
        return resp.deleted_count

    async def tags_by_filter(self, filter: Filter | None = None) -> list[str]:
        """The distinct tags on the binary data matching `filter` (None: all of it).

        Example::

            tags = await data_client.tags_by_filter(create_filter(component_name="cam"))
        """
        request = dpb.TagsByFilterRequest(filter=filter or Filter())
        resp = await self.unary(_DATA + "TagsByFilter", request, dpb.TagsByFilterResponse)
        return list(resp.tags)

    # -- bounding boxes --------------------------------------------------------------------

    async def add_bounding_box_to_image_by_id(
        self,
        binary_id: BinaryID | str,
        label: str,
        x_min_normalized: float,
        y_min_normalized: float,
        x_max_normalized: float,
        y_max_normalized: float,
    ) -> str:
        """Draw a labelled box on an image, corners as fractions of its width and height
        (0 to 1); returns the new box's id.

        Example::

            bbox_id = await data_client.add_bounding_box_to_image_by_id(
                binary_data_id, "person", 0.1, 0.2, 0.5, 0.9
            )
        """
        corners: dict[str, Any] = {
            "x_min_normalized": x_min_normalized,
            "y_min_normalized": y_min_normalized,
            "x_max_normalized": x_max_normalized,
            "y_max_normalized": y_max_normalized,
        }
        for name, value in corners.items():
            if not 0.0 <= value <= 1.0:
                raise InvalidArgument(
                    "add_bounding_box_to_image_by_id", f"{name} must be within [0, 1], got {value}"
                )
        request = dpb.AddBoundingBoxToImageByIDRequest(label=label, **corners, **_one_id(binary_id))
        resp = await self.unary(
            _DATA + "AddBoundingBoxToImageByID", request, dpb.AddBoundingBoxToImageByIDResponse
        )
        return resp.bbox_id

    async def remove_bounding_box_from_image_by_id(
        self, bbox_id: str, binary_id: BinaryID | str
    ) -> None:
        """Remove one box from an image.

        Example::

            await data_client.remove_bounding_box_from_image_by_id(bbox_id, binary_data_id)
        """
        request = dpb.RemoveBoundingBoxFromImageByIDRequest(bbox_id=bbox_id, **_one_id(binary_id))
        await self.unary(
            _DATA + "RemoveBoundingBoxFromImageByID",
            request,
            dpb.RemoveBoundingBoxFromImageByIDResponse,
        )

    async def bounding_box_labels_by_filter(self, filter: Filter | None = None) -> list[str]:
        """The distinct box labels on the images matching `filter` (None: all of them).

        Example::

            labels = await data_client.bounding_box_labels_by_filter()
        """
        request = dpb.BoundingBoxLabelsByFilterRequest(filter=filter or Filter())
        resp = await self.unary(
            _DATA + "BoundingBoxLabelsByFilter", request, dpb.BoundingBoxLabelsByFilterResponse
        )
        return list(resp.labels)

    # -- database access -------------------------------------------------------------------

    async def get_database_connection(self, organization_id: str) -> str:
        """The host to query the organisation's data on; for `edged ingest` that is the
        server's own address (SQL and MQL run through this API, not a database port).

        Example::

            host = await data_client.get_database_connection("org-1")
        """
        request = dpb.GetDatabaseConnectionRequest(organization_id=organization_id)
        resp = await self.unary(
            _DATA + "GetDatabaseConnection", request, dpb.GetDatabaseConnectionResponse
        )
        return resp.hostname

    async def configure_database_user(self, organization_id: str, password: str) -> None:
        """Set (or reset) the organisation's database user password; the server keeps
        only a salted hash of it.

        Example::

            await data_client.configure_database_user("org-1", os.environ["DB_PASSWORD"])
        """
        request = dpb.ConfigureDatabaseUserRequest(
            organization_id=organization_id, password=password
        )
        await self.unary(
            _DATA + "ConfigureDatabaseUser", request, dpb.ConfigureDatabaseUserResponse
        )

    # -- datasets --------------------------------------------------------------------------

    async def create_dataset(self, name: str, organization_id: str) -> str:
        """Create an empty dataset (names are unique per organisation); returns its id.

        Example::

            dataset_id = await data_client.create_dataset("training-v1", "org-1")
        """
        request = spb.CreateDatasetRequest(name=name, organization_id=organization_id)
        resp = await self.unary(_DATASET + "CreateDataset", request, spb.CreateDatasetResponse)
        return resp.id

    async def list_dataset_by_ids(self, ids: list[str]) -> Sequence[Dataset]:
        """The datasets with these ids (an unknown id is an error, not a gap).

        Example::

            [ds] = await data_client.list_dataset_by_ids([dataset_id])
            print(ds.name, ds.time_created.ToDatetime())
        """
        request = spb.ListDatasetsByIDsRequest(ids=ids)
        resp = await self.unary(
            _DATASET + "ListDatasetsByIDs", request, spb.ListDatasetsByIDsResponse
        )
        return list(resp.datasets)

    async def list_datasets_by_organization_id(self, organization_id: str) -> Sequence[Dataset]:
        """Every dataset of the organisation.

        Example::

            names = [d.name for d in await data_client.list_datasets_by_organization_id("org-1")]
        """
        request = spb.ListDatasetsByOrganizationIDRequest(organization_id=organization_id)
        resp = await self.unary(
            _DATASET + "ListDatasetsByOrganizationID",
            request,
            spb.ListDatasetsByOrganizationIDResponse,
        )
        return list(resp.datasets)

    async def rename_dataset(self, id: str, name: str) -> None:
        """Give a dataset a new name (still unique in its organisation).

        Example::

            await data_client.rename_dataset(dataset_id, "training-v2")
        """
        request = spb.RenameDatasetRequest(id=id, name=name)
        await self.unary(_DATASET + "RenameDataset", request, spb.RenameDatasetResponse)

    async def delete_dataset(self, id: str) -> None:
        """Delete a dataset; its binary data stays, only the membership goes.

        Example::

            await data_client.delete_dataset(dataset_id)
        """
        request = spb.DeleteDatasetRequest(id=id)
        await self.unary(_DATASET + "DeleteDataset", request, spb.DeleteDatasetResponse)

    async def add_binary_data_to_dataset_by_ids(
        self, binary_ids: list[BinaryID] | list[str], dataset_id: str
    ) -> None:
        """Add these binary data items to a dataset (already-members stay once).

        Example::

            await data_client.add_binary_data_to_dataset_by_ids([binary_data_id], dataset_id)
        """
        request = dpb.AddBinaryDataToDatasetByIDsRequest(
            dataset_id=dataset_id, **_ids("add_binary_data_to_dataset_by_ids", binary_ids)
        )
        await self.unary(
            _DATA + "AddBinaryDataToDatasetByIDs", request, dpb.AddBinaryDataToDatasetByIDsResponse
        )

    async def remove_binary_data_from_dataset_by_ids(
        self, binary_ids: list[BinaryID] | list[str], dataset_id: str
    ) -> None:
        """Take these items out of a dataset (the data itself stays).

        Example::

            await data_client.remove_binary_data_from_dataset_by_ids([binary_data_id], dataset_id)
        """
        request = dpb.RemoveBinaryDataFromDatasetByIDsRequest(
            dataset_id=dataset_id, **_ids("remove_binary_data_from_dataset_by_ids", binary_ids)
        )
        await self.unary(
            _DATA + "RemoveBinaryDataFromDatasetByIDs",
            request,
            dpb.RemoveBinaryDataFromDatasetByIDsResponse,
        )

    create_filter = staticmethod(create_filter)
