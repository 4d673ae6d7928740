"""The `edged` command line. Exit codes: 0 ok, 1 runtime failure, 2 usage/config error."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from edged import __version__
from edged.errors import ConfigError, EdgedError
from edged.ingest import ApiKey, IngestServer, IngestSettings
from edged.keyfile import read_secret_file

EXIT_OK, EXIT_RUNTIME, EXIT_USAGE = 0, 1, 2


def parse_size(text: str) -> int:
    """`64KiB`, `1MiB`, `2GiB`, or a plain byte count."""
    units = {"KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "TIB": 1 << 40, "B": 1}
    raw = text.strip().upper()
    for suffix, mult in units.items():
        if raw.endswith(suffix) and raw[: -len(suffix)].strip().isdigit():
            return int(raw[: -len(suffix)]) * mult
    if raw.isdigit():
        return int(raw)
    raise argparse.ArgumentTypeError(f"{text!r} is not a size such as 4096, 64KiB, 1MiB or 2GiB")


def parse_listen(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT (e.g. 127.0.0.1:8080)")
    return host.strip("[]"), int(port)


def _ingest_settings(args: argparse.Namespace) -> IngestSettings:
    ids: list[str] = args.api_key_id or []
    files: list[Path] = args.api_key_file or []
    if len(ids) != len(files):
        raise ConfigError(
            f"--api-key-id was given {len(ids)} times and --api-key-file {len(files)} times;"
            " give them in pairs"
        )
    orgs: list[str] = args.org_id or []
    if orgs and len(orgs) != len(ids):
        raise ConfigError("--org-id must be given once per --api-key-id, or not at all")
    keys = tuple(
        ApiKey(key_id, read_secret_file(path), orgs[i] if orgs else "")
        for i, (key_id, path) in enumerate(zip(ids, files, strict=True))
    )
    if (args.tls_cert is None) != (args.tls_key is None):
        raise ConfigError("--tls-cert and --tls-key go together")
    host, port = args.listen
    return IngestSettings(
        data_dir=args.data,
        host=host,
        port=port,
        keys=keys,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        max_message_bytes=args.max_message_bytes,
        max_upload_bytes=args.max_upload_bytes,
        shutdown_grace_s=args.grace,
    )


async def _serve_ingest(settings: IngestSettings) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with IngestServer(settings) as server:
        mode = "tls" if server.tls else "plaintext"
        auth = f"{len(settings.keys)} API key(s)" if settings.keys else "no auth (open)"
        print(
            f"edged ingest: listening on {server.address} ({mode}, {auth}), data in"
            f" {settings.data_dir}",
            flush=True,
        )
        await stop.wait()
        print("edged ingest: stopping; finishing in-flight uploads", flush=True)


def _cmd_ingest(args: argparse.Namespace) -> int:
    settings = _ingest_settings(args)
    asyncio.run(_serve_ingest(settings))
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edged", description="Edge data-sync daemon.")
    parser.add_argument("--version", action="version", version=f"edged {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True)

    ing = sub.add_parser("ingest", help="run the reference DataSync + auth server")
    ing.add_argument(
        "--listen",
        type=parse_listen,
        default=("127.0.0.1", 8080),
        help="HOST:PORT to bind (default 127.0.0.1:8080; port 0 picks one)",
    )
    ing.add_argument("--data", type=Path, required=True, help="directory for the index and blobs")
    ing.add_argument("--api-key-id", action="append", help="API key id (repeatable)")
    ing.add_argument(
        "--api-key-file",
        action="append",
        type=Path,
        help="file (mode 0600) holding the key for the matching --api-key-id",
    )
    ing.add_argument("--org-id", action="append", help="organisation of the matching key")
    ing.add_argument("--tls-cert", type=Path, help="PEM certificate chain (enables TLS)")
    ing.add_argument("--tls-key", type=Path, help="PEM private key for --tls-cert")
    ing.add_argument(
        "--max-message-bytes",
        type=parse_size,
        default=512 << 20,
        help="largest single gRPC message accepted (default 512MiB)",
    )
    ing.add_argument(
        "--max-upload-bytes",
        type=parse_size,
        default=64 << 30,
        help="largest streamed upload accepted (default 64GiB)",
    )
    ing.add_argument(
        "--grace",
        type=float,
        default=10.0,
        help="seconds to let in-flight uploads finish on SIGTERM (default 10)",
    )
    ing.set_defaults(func=_cmd_ingest)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.func(args)
        return code
    except ConfigError as exc:
        if args.debug:
            raise
        print(f"edged: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except EdgedError as exc:
        if args.debug:
            raise
        print(f"edged: {exc}", file=sys.stderr)
        return EXIT_RUNTIME
    except OSError as exc:
        if args.debug:
            raise
        print(f"edged: {exc}", file=sys.stderr)
        return EXIT_RUNTIME


if __name__ == "__main__":  # pragma: no cover
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
