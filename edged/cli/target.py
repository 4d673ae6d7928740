"""Which server a one-shot command (`edged upload`, `edged query`) talks to: the flags
(`--address`, `--api-key-id`, `--api-key-file`, `--insecure`, `--ca-file`), or the
daemon's config file (`-c`), read by the daemon's own reader so both agree on address,
key, TLS and CA. The connection itself is `edged.wire.connect()`'s."""

from __future__ import annotations

import argparse
import ssl
from pathlib import Path
from typing import TypeVar

from edged.daemon.config import absolute_path, load_config
from edged.errors import ConfigError, UploadError
from edged.wire.cloud import connect_cloud
from edged.wire.connection import Connection, connect
from edged.wire.keyfile import API_KEY_ENV, resolve_api_key

_C = TypeVar("_C", bound=Connection)


def add_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-c",
        "--config",
        type=absolute_path,
        help="take address, API key, TLS and CA from this daemon config file (cloud.*)",
    )
    p.add_argument("--address", help="HOST:PORT of the ingest server (or give -c)")
    p.add_argument("--api-key-id", help="API key id")
    p.add_argument(
        "--api-key-file",
        type=absolute_path,
        help=f"file (0600) with the key; or set {API_KEY_ENV}",
    )
    p.add_argument("--insecure", action="store_true", help="plaintext (no TLS)")
    p.add_argument("--tls", action="store_false", dest="insecure", help="TLS (the default)")
    p.add_argument("--ca-file", type=absolute_path, help="CA bundle to verify the server with")


def _flags_given(args: argparse.Namespace) -> list[str]:
    named = {
        "--address": args.address,
        "--api-key-id": args.api_key_id,
        "--api-key-file": args.api_key_file,
        "--insecure": args.insecure or None,
        "--ca-file": args.ca_file,
    }
    return [flag for flag, value in named.items() if value is not None]


def open_target(
    args: argparse.Namespace, kind: type[_C], *, timeout: float | None
) -> tuple[_C, str | None]:
    """(connection, the config's part_id or None) for `args`; ConfigError when the
    flags and `-c` are mixed or say too little."""
    config: Path | None = args.config
    if config is not None:
        if given := _flags_given(args):
            raise ConfigError(f"-c takes the server from {config}; drop {', '.join(given)}")
        cfg = load_config(config)
        cloud = cfg.cloud
        if cloud.embedded:
            raise ConfigError(
                f"{config}: cloud.address is 'embedded', which runs inside the daemon's own"
                " process and takes no connections; give --address of an `edged ingest`"
            )
        conn = connect_cloud(cloud, kind=kind, timeout=timeout)
        return conn, cfg.part_id
    if args.address is None:
        raise ConfigError("say which server: --address HOST:PORT or -c CONFIG")
    key = resolve_api_key(args.api_key_file)
    if (key is None) != (args.api_key_id is None):
        raise ConfigError(
            f"--api-key-id needs a key (--api-key-file or {API_KEY_ENV}), and a key needs"
            " --api-key-id"
        )
    conn = connect(
        args.address,
        kind=kind,
        api_key_id=args.api_key_id,
        api_key=key,
        tls=not args.insecure,
        ca_file=args.ca_file,
        timeout=timeout,
    )
    return conn, None


def hint(exc: UploadError) -> str:
    """A next step for a TLS handshake that failed, appended to the error sentence."""
    cause: BaseException | None = exc
    for _ in range(16):
        if cause is None:
            return ""
        if isinstance(cause, ssl.SSLCertVerificationError):
            return " (the server's certificate is not trusted: --ca-file names its CA)"
        if isinstance(cause, ssl.SSLError) and cause.reason == "WRONG_VERSION_NUMBER":
            return " (the server does not speak TLS: is it plaintext? then add --insecure)"
        cause = cause.__cause__ or cause.__context__
    return ""
