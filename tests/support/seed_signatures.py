"""The seed SDK's DataClient methods and their parameters: what `edged.client.DataClient`
must offer (tests/test_data_client.py) and what docs/client.md must document."""

from __future__ import annotations

from typing import Any

REQUIRED = object()
"""Marks a parameter without a default."""

# Each seed method's parameters (name, default or REQUIRED), from the seed reference.
SEED_SIGNATURES: dict[str, list[tuple[str, Any]]] = {
    "tabular_data_by_filter": [
        ("filter", None), ("limit", None), ("sort_order", None), ("last", None),
        ("count_only", False), ("include_internal_data", False), ("dest", None),
    ],
    "tabular_data_by_sql": [("organization_id", REQUIRED), ("sql_query", REQUIRED)],
    "tabular_data_by_mql": [("organization_id", REQUIRED), ("mql_binary", REQUIRED)],
    "binary_data_by_filter": [
        ("filter", None), ("limit", None), ("sort_order", None), ("last", None),
        ("include_binary_data", True), ("count_only", False),
        ("include_internal_data", False), ("dest", None),
    ],
    "binary_data_by_ids": [("binary_ids", REQUIRED), ("dest", None)],
    "delete_tabular_data": [("organization_id", REQUIRED), ("delete_older_than_days", REQUIRED)],
    "delete_tabular_data_by_filter": [("filter", REQUIRED)],
    "delete_binary_data_by_filter": [("filter", REQUIRED)],
    "delete_binary_data_by_ids": [("binary_ids", REQUIRED)],
    "add_tags_to_binary_data_by_ids": [("tags", REQUIRED), ("binary_ids", REQUIRED)],
    "add_tags_to_binary_data_by_filter": [("tags", REQUIRED), ("filter", None)],
    "remove_tags_from_binary_data_by_ids": [("tags", REQUIRED), ("binary_ids", REQUIRED)],
    "remove_tags_from_binary_data_by_filter": [("tags", REQUIRED), ("filter", None)],
    "tags_by_filter": [("filter", None)],
    "add_bounding_box_to_image_by_id": [
        ("binary_id", REQUIRED), ("label", REQUIRED), ("x_min_normalized", REQUIRED),
        ("y_min_normalized", REQUIRED), ("x_max_normalized", REQUIRED),
        ("y_max_normalized", REQUIRED),
    ],
    "remove_bounding_box_from_image_by_id": [("bbox_id", REQUIRED), ("binary_id", REQUIRED)],
    "bounding_box_labels_by_filter": [("filter", None)],
    "get_database_connection": [("organization_id", REQUIRED)],
    "configure_database_user": [("organization_id", REQUIRED), ("password", REQUIRED)],
    "create_dataset": [("name", REQUIRED), ("organization_id", REQUIRED)],
    "list_dataset_by_ids": [("ids", REQUIRED)],
    "list_datasets_by_organization_id": [("organization_id", REQUIRED)],
    "rename_dataset": [("id", REQUIRED), ("name", REQUIRED)],
    "delete_dataset": [("id", REQUIRED)],
    "add_binary_data_to_dataset_by_ids": [("binary_ids", REQUIRED), ("dataset_id", REQUIRED)],
    "remove_binary_data_from_dataset_by_ids": [
        ("binary_ids", REQUIRED), ("dataset_id", REQUIRED),
    ],
    "binary_data_capture_upload": [
        ("binary_data", REQUIRED), ("part_id", REQUIRED), ("component_type", REQUIRED),
        ("component_name", REQUIRED), ("method_name", REQUIRED), ("file_extension", REQUIRED),
        ("method_parameters", None), ("tags", None), ("data_request_times", None),
    ],
    "tabular_data_capture_upload": [
        ("tabular_data", REQUIRED), ("part_id", REQUIRED), ("component_type", REQUIRED),
        ("component_name", REQUIRED), ("method_name", REQUIRED), ("method_parameters", None),
        ("tags", None), ("data_request_times", None),
    ],
    "streaming_data_capture_upload": [
        ("data", REQUIRED), ("part_id", REQUIRED), ("file_ext", REQUIRED),
        ("component_type", None), ("component_name", None), ("method_name", None),
        ("method_parameters", None), ("data_request_times", None), ("tags", None),
    ],
    "file_upload": [
        ("part_id", REQUIRED), ("data", REQUIRED), ("component_type", None),
        ("component_name", None), ("method_name", None), ("file_name", None),
        ("method_parameters", None), ("file_extension", None), ("tags", None),
    ],
    "file_upload_from_path": [
        ("filepath", REQUIRED), ("part_id", REQUIRED), ("component_type", None),
        ("component_name", None), ("method_name", None), ("method_parameters", None),
        ("tags", None),
    ],
    "create_filter": [
        (name, None)
        for name in (
            "component_name", "component_type", "method", "robot_name", "robot_id",
            "part_name", "part_id", "location_ids", "organization_ids", "mime_type",
            "start_time", "end_time", "tags", "bbox_labels", "dataset_id",
        )
    ],
}  # fmt: skip
