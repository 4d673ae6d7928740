"""What edged adds to the seed's wire protocol, declared once for the client (`wire`)
and the server (`ingest`), which may not import each other."""

from __future__ import annotations

ITEM_ID_KEY = "edged-item-id"
"""Request metadata naming the outbox item an upload carries: the server stores an item
id once, so a resend after a lost ack is answered with the first upload's ids."""
