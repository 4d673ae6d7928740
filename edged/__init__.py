"""edged: get robot capture data to the cloud and lose nothing."""

from __future__ import annotations

__version__ = "0.1.0"
