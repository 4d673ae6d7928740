"""Every exception edged raises on purpose, in one hierarchy.

Callers catch `EdgedError` at the edges (CLI, status socket) and print its one-line
message; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

from grpclib.const import Status


class EdgedError(Exception):
    """Base of all deliberate edged failures; `str()` is a one-sentence user message."""


class ConfigError(EdgedError):
    """A config file or command-line value is invalid (message names key, file and line)."""


class CaptureFormatError(EdgedError):
    """A capture file does not follow the robot's on-disk format."""

    def __init__(self, path: str, offset: int, reason: str) -> None:
        self.path = path
        self.offset = offset
        self.reason = reason
        super().__init__(f"{path}: bad capture data at byte offset {offset}: {reason}")


class UploadError(EdgedError):
    """A call to the server failed; `status` is the gRPC status (transport faults map to
    UNAVAILABLE). Query calls raise it too, with `call` naming the RPC, so a client
    script handles one error type whichever call it made. `transport` is True when no
    server answered (connection refused/reset, local deadline): an outage, whatever the
    status, rather than something about this item."""

    def __init__(
        self,
        status: Status,
        message: str,
        *,
        item_id: str | None = None,
        call: str = "upload",
        transport: bool = False,
    ) -> None:
        self.status = status
        self.transport = transport
        self.message = message
        self.item_id = item_id
        self.call = call
        where = f" for item {item_id}" if item_id else ""
        super().__init__(f"{call}{where} failed with {status.name}: {message}")


class AuthError(UploadError):
    """The server refused our credentials (UNAUTHENTICATED or PERMISSION_DENIED)."""


class OutboxFull(EdgedError):
    """The outbox is at its size or free-disk limit; the source should leave data in place."""


class SourceError(EdgedError):
    """A queued item's source file vanished or changed before it was uploaded."""


class ConfigErrors(ConfigError):
    """Every problem found in one config file, so the operator can fix them in one edit.

    `str()` is the problems one per line (`file:line: key.path: message`); `problems`
    keeps them as a list.
    """

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))
