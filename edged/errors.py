"""Every exception edged raises on purpose, in one hierarchy.

Callers catch `EdgedError` at the edges (CLI, status socket) and print its one-line
message; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

from grpclib.const import Status
from grpclib.exceptions import GRPCError


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


class IncompleteHeader(CaptureFormatError):
    """The file ends before its header does (empty, or cut inside it): a writer that died
    before its first flush left it, and it holds no readings."""


class UploadError(EdgedError, GRPCError):
    """A call to the server failed; `status` is the gRPC status (transport faults map to
    UNAVAILABLE). Query calls raise it too, with `call` naming the RPC, so a client
    script handles one error type whichever call it made. It is also grpclib's
    `GRPCError` (same `status`/`message`), which the seed client documents, so a seed
    script's `except GRPCError:` keeps working. `transport` is True when no server
    answered (connection refused/reset, local deadline): an outage, whatever the status,
    rather than something about this item."""

    message: str  # never None here, unlike GRPCError's

    def __init__(
        self,
        status: Status,
        message: str,
        *,
        item_id: str | None = None,
        call: str = "upload",
        transport: bool = False,
    ) -> None:
        GRPCError.__init__(self, status, message)
        self.transport = transport
        self.item_id = item_id
        self.call = call
        where = f" for item {item_id}" if item_id else ""
        self.args = (f"{call}{where} failed with {status.name}: {message}",)


class AuthError(UploadError):
    """The server refused our credentials (UNAUTHENTICATED or PERMISSION_DENIED)."""


class InvalidArgument(UploadError, ValueError):
    """An argument the server would refuse with INVALID_ARGUMENT, caught before sending.

    Still a ValueError, as these were before they became GRPCErrors."""

    def __init__(self, call: str, message: str) -> None:
        super().__init__(Status.INVALID_ARGUMENT, message, call=call)


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


class MissingExtra(ConfigError):
    """A feature needs an optional dependency this install lacks: the robot install
    carries only what the daemon needs; the server and BSON results come with
    `pip install 'edged[ingest]'`."""

    def __init__(self, what: str, extra: str = "ingest") -> None:
        self.extra = extra
        super().__init__(
            f"{what} needs dependencies this install lacks: pip install 'edged[{extra}]'"
        )
