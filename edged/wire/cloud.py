"""The config file's `cloud` section: where to upload and how to connect.

Declared here, below the SDK, so that the daemon and `DataClient.from_config` read the
same keys with the same rules and messages, and the SDK never imports the daemon.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from edged.errors import ConfigError
from edged.options import Bad, FilePath, Flag, Map, Reader, Section, Text, option, parse_document
from edged.options import read_text as _read_text
from edged.wire.connection import Connection, connect
from edged.wire.keyfile import api_key

_C = TypeVar("_C", bound=Connection)

EMBEDDED = "embedded"


def address_problem(address: str) -> str | None:
    """Why `address` is not `host:port` (or 'embedded'), or None."""
    if address == EMBEDDED:
        return None
    example = "(e.g. sync.example.com:443, or 'embedded')"
    if "://" in address:
        return f"{address!r}: drop the scheme and give host:port {example}; cloud.tls sets TLS"
    host, sep, port = address.rpartition(":")
    if host.startswith("["):
        host_ok = host.endswith("]") and len(host) > 2
    else:
        host_ok = bool(host) and ":" not in host
    if (
        not sep
        or not host_ok
        or any(c.isspace() or c == "/" for c in host)
        or not port.isdigit()
        or not 0 < int(port) < 65536
    ):
        return f"{address!r} is not host:port {example}"
    return None


@dataclass(frozen=True)
class CloudConfig:
    """Where to upload and how to authenticate; the key itself never lives in config."""

    address: str = option(
        EMBEDDED,
        Text(strip=True),
        "host:port of the DataSync server (no scheme), or `embedded`: the in-process"
        " ingest server under state_dir/ingest",
        check=address_problem,
    )
    api_key_id: str | None = option(
        None, Text(), "API key id; the key comes from api_key_file or EDGED_API_KEY (wins)"
    )
    api_key_file: Path | None = option(
        None, FilePath(), "file holding the API key on its first line, mode 0600"
    )
    tls: bool | None = option(
        None, Flag(), "TLS with server certificate verification; none: on unless embedded"
    )
    ca_file: Path | None = option(
        None, FilePath(), "PEM bundle of CAs to trust instead of the system store"
    )

    @property
    def embedded(self) -> bool:
        """True when uploads go to the in-process ingest server under state_dir/ingest."""
        return self.address == EMBEDDED

    def use_tls(self) -> bool:
        """Explicit `tls` wins; otherwise TLS for every remote address, none in-process."""
        if self.tls is not None:
            return self.tls
        return not self.embedded

    def problems(self, given: Collection[str]) -> Iterator[tuple[str, str]]:
        if self.api_key_file is not None and "api_key_id" not in given:
            yield "api_key_file", "needs cloud.api_key_id (the id the key file's key belongs to)"
        if self.ca_file is not None and self.tls is False:
            yield "ca_file", "is set but cloud.tls is false"


def read_cloud(r: Reader, top: Map) -> CloudConfig | None:
    """The `cloud` section of a config's top mapping (absent: every default)."""
    node = top.get("cloud")
    if node is None:
        return CloudConfig()
    value = Section(CloudConfig).read(r, node, "cloud")
    return None if isinstance(value, Bad) else value


def load_cloud(path: Path) -> CloudConfig:
    """The `cloud` section of the daemon's config file at `path`, read and checked as the
    daemon reads it (relative paths against the file's directory). Other sections are
    not the SDK's business and are not read. Raises ConfigErrors."""
    text = _read_text(path)
    return parse_document(text, str(path), path.absolute().parent, read_cloud)


def connect_cloud(
    cloud: CloudConfig, *, kind: type[_C], timeout: float | None, where: str = "", **options: Any
) -> _C:
    """A connection to the remote server a `cloud` section names, for the daemon, `edged
    ... -c CONFIG` and `DataClient.from_config` alike: the key from EDGED_API_KEY or
    cloud.api_key_file, TLS and CA as configured. `where` (the config file) prefixes a
    missing key's ConfigError. 'embedded' is the caller's business: it has no address."""
    assert not cloud.embedded, "an embedded server is started in-process, not connected to"
    try:
        secret = api_key(cloud.api_key_id, cloud.api_key_file)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}" if where else str(exc)) from None
    return connect(
        cloud.address,
        kind=kind,
        api_key_id=cloud.api_key_id if secret else None,
        api_key=secret,
        tls=cloud.use_tls(),
        ca_file=cloud.ca_file,
        timeout=timeout,
        **options,
    )
