"""The Python SDK: the seed `DataClient` API (`connect()`, uploads, queries, datasets) over
one wire `Connection`. Public import path: `from edged.client import ...`.

The public names are listed once, in `edged.client.api.__all__`."""

from edged.client import api as _api
from edged.client.api import *  # noqa: F403

__all__ = _api.__all__
