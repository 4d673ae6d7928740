"""The `edged` command line. Exit codes: 0 ok, 1 runtime failure, 2 usage/config error."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from edged import __version__
from edged.cli.args import positive_int, seconds, whole
from edged.daemon.config import (
    absolute_path,
    check_host,
    format_size,
    load_config,
    parse_duration,
    parse_size,
)
from edged.daemon.logs import setup_logging
from edged.errors import ConfigError, ConfigErrors, EdgedError
from edged.ingest import require_server
from edged.ingest.auth import ApiKey, AuthLimits, short_key_problem
from edged.ingest.flags import flagged
from edged.ingest.guard import Limits
from edged.ingest.limits import QueryLimits
from edged.options import parse_rate
from edged.wire.keyfile import read_secret_file

if TYPE_CHECKING:  # the server needs the `ingest` extra: loaded by `edged ingest` only
    from edged.ingest.server import IngestSettings

EXIT_OK, EXIT_RUNTIME, EXIT_USAGE = 0, 1, 2
_L = TypeVar("_L")
DEFAULT_CONFIG = Path("/etc/edged/edged.yaml")


def _size_arg(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _duration_arg(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _retention_arg(text: str) -> float:
    from edged.ingest.retention import parse_retention

    try:
        return parse_retention(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


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
    locations: list[str] = args.location_id or []
    if locations and len(locations) != len(ids):
        raise ConfigError("--location-id must be given once per --api-key-id, or not at all")
    keys = tuple(
        ApiKey(
            key_id,
            _strong_secret(path),
            orgs[i] if orgs else "",
            locations[i] if locations else "",
        )
        for i, (key_id, path) in enumerate(zip(ids, files, strict=True))
    )
    if (args.tls_cert is None) != (args.tls_key is None):
        raise ConfigError("--tls-cert and --tls-key go together")
    require_server()
    from edged.ingest.server import IngestSettings

    host, port = args.listen
    if args.data is None:
        raise ConfigError("edged ingest needs --data DIR (the index, unless --database, and blobs)")
    return IngestSettings(
        data_dir=args.data,
        blobs=args.blobs,
        s3_endpoint=args.s3_endpoint,
        database=_database_url(args),
        migrate=not args.no_migrate,
        retention_s=args.retention,
        host=host,
        port=port,
        keys=keys,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        max_upload_bytes=args.max_upload_bytes,
        shutdown_grace_s=args.grace,
        limits=_limits(Limits, args),
        auth=_limits(AuthLimits, args),
        query_limits=_limits(QueryLimits, args),
        metrics_listen=args.metrics_listen,
    )


def _database_url(args: argparse.Namespace) -> str | None:
    url: str | None = args.database
    if url is not None and not url.startswith(("postgresql://", "postgres://")):
        raise ConfigError(
            "--database must be a postgresql:// URL (password via PGPASSWORD or the URL)"
        )
    return url


def _cmd_ingest_migrate(args: argparse.Namespace) -> int:
    """Create or upgrade the index's schema and exit (deploy pipelines: `--check`)."""
    database = _database_url(args)
    if (database is None) == (args.data is None):
        raise ConfigError("edged ingest migrate needs --database URL or --data DIR (one)")
    require_server()
    from edged.ingest.storage import IngestStore

    found, now, code = asyncio.run(
        IngestStore.upgrade_schema(args.data, database, apply=not args.check)
    )
    if database:
        from edged.ingest.pg import redact

        where = f"--database {redact(database)}"
    else:
        where = f"--data {args.data}"
    if args.check:
        if found < code:
            print(f"edged ingest migrate: {where}: schema {found} -> {code} pending", flush=True)
            return EXIT_RUNTIME
        print(f"edged ingest migrate: {where}: schema {found}, up to date", flush=True)
        return EXIT_OK
    print(f"edged ingest migrate: {where}: schema {found} -> {now}", flush=True)
    return EXIT_OK


def _strong_secret(path: Path) -> str:
    secret = read_secret_file(path)
    problem = short_key_problem(secret)
    if problem:
        raise ConfigError(f"API key file {path} {problem}")
    return secret


_LIMIT_KINDS: dict[str, Callable[[str], object]] = {
    "size": _size_arg,
    "int": whole,  # 0 allowed where it means "derive it" (--max-connections)
    "count": positive_int,
    "float": seconds,
}


def _limits(cls: type[_L], args: argparse.Namespace) -> _L:
    """The limits dataclass `cls` from the flags `_add_limit_flags` declared for it."""
    return cls(**{name: getattr(args, name) for name, *_ in flagged(cls)})


def _add_limit_flags(p: argparse.ArgumentParser, cls: type) -> None:
    """One flag per limit, derived from the dataclass that declares it."""
    kinds = _LIMIT_KINDS
    for name, flag, text, kind, default in flagged(cls):
        shown = format_size(default) if kind == "size" else f"{default:g}"
        p.add_argument(
            flag, dest=name, type=kinds[kind], default=default, help=f"{text} (default {shown})"
        )


async def _serve_ingest(settings: IngestSettings) -> None:
    from edged.ingest.server import IngestServer

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with IngestServer(settings) as server:
        mode = "tls" if server.tls else "plaintext"
        auth = f"{len(settings.keys)} API key(s)" if settings.keys else "no auth (open)"
        where = f"data in {settings.data_dir}"
        if settings.database:
            from edged.ingest.pg import redact

            where = f"index in {redact(settings.database)}, data in {settings.data_dir}"
        if settings.blobs:
            where += f"; blobs in {server.store.blobs.description}"
        print(f"edged ingest: listening on {server.address} ({mode}, {auth}), {where}", flush=True)
        if server.metrics_server is not None:
            print(
                f"edged ingest: metrics on http://{server.metrics_server.address}/metrics",
                flush=True,
            )
        await stop.wait()
        print("edged ingest: stopping; finishing in-flight uploads", flush=True)


def _cmd_ingest(args: argparse.Namespace) -> int:
    settings = _ingest_settings(args)
    setup_logging(args.log_level, args.log_format)
    asyncio.run(_serve_ingest(settings))
    return EXIT_OK


def _cmd_run(args: argparse.Namespace) -> int:
    # A SIGHUP (reload) before the daemon's own handler exists must not kill it: ignored
    # until then, and queued once the handler is in place (Daemon._on_reload_signal).
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    from edged.daemon.app import run_daemon

    limit = args.until_empty
    return asyncio.run(
        run_daemon(
            args.config,
            until_empty=limit is not None,
            limit_s=None if limit is None or limit == math.inf else limit,
        )
    )


def _cmd_check_config(args: argparse.Namespace) -> int:
    import yaml

    config = load_config(args.config)
    if problems := check_host(config):
        raise ConfigErrors(problems)
    print(yaml.safe_dump(config.to_dict(), sort_keys=False), end="")
    return EXIT_OK


def _socket_of(args: argparse.Namespace) -> Path:
    if args.socket is not None:
        return Path(args.socket)
    return load_config(args.config).status.socket


def _ask(args: argparse.Namespace, req: dict[str, object]) -> dict[str, object]:
    from edged.daemon.status import request

    answer = request(_socket_of(args), req)
    if not answer.get("ok"):
        raise EdgedError(str(answer.get("error", "the daemon refused the request")))
    return answer


def _cmd_status(args: argparse.Namespace) -> int:
    import json
    import time

    from edged.daemon.status import request
    from edged.daemon.status_view import render

    if args.interval <= 0:
        raise ConfigError(f"--interval must be a positive number of seconds, not {args.interval}")
    sock = _socket_of(args)  # once: a bad config file ends --watch, a missing daemon not
    clear = "\x1b[2J\x1b[H" if args.watch and sys.stdout.isatty() else ""
    for n in range(1_000_000 if args.watch else 1):
        try:
            answer = request(sock, {"cmd": "status"})
        except EdgedError as exc:
            if not args.watch:
                raise
            # A restart, an upgrade, a crash: keep watching for the daemon to come back.
            answer = {"ok": False, "error": str(exc)}
        if not answer.get("ok") and not args.watch:
            raise EdgedError(str(answer.get("error", "the daemon refused the request")))
        if args.json:
            print(json.dumps(answer, indent=None if args.watch else 2), flush=True)
        elif not answer.get("ok"):
            print(f"{clear}edged: {answer.get('error')}", flush=True)
            print("waiting for the daemon to answer (Ctrl-C to leave)", flush=True)
        else:
            print(f"{clear}{render(answer)}", flush=True)
        if args.watch and n < 999_999:
            time.sleep(args.interval)
    return EXIT_OK


def _cmd_simple(args: argparse.Namespace) -> int:
    request: dict[str, object] = {"cmd": args.command}
    if getattr(args, "source", None) is not None:
        request["source"] = args.source
    answer = _ask(args, request)
    state = answer.get("state")
    what = f" --source {args.source}" if getattr(args, "source", None) is not None else ""
    print(f"{args.command}{what}: ok" + (f" (state: {state})" if state else ""))
    return EXIT_OK


def _rate_arg(text: str) -> int | str:
    """`edged limit` RATE: a rate (2MiB/s), `off` (unlimited) or `config` (end the override)."""
    word = text.strip().lower()
    if word in ("off", "config"):
        return 0 if word == "off" else "config"
    try:
        return parse_rate(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{exc}; or off, or config") from None


def _cmd_limit(args: argparse.Namespace) -> int:
    from edged.daemon.status_view import render_bandwidth

    answer = _ask(args, {"cmd": "limit", "rate": args.rate})
    bandwidth = answer.get("bandwidth")
    assert isinstance(bandwidth, dict)
    print(render_bandwidth(bandwidth))
    return EXIT_OK


def _cmd_dead_letters(args: argparse.Namespace) -> int:
    import json

    from edged.daemon.status_view import render_dead_letters

    answer = _ask(args, {"cmd": "dead-letters"})
    letters = answer.get("dead_letters", [])
    assert isinstance(letters, list)
    print(json.dumps(letters, indent=2) if args.json else render_dead_letters(letters))
    return EXIT_OK


def _cmd_retry_dead(args: argparse.Namespace) -> int:
    if not args.all and not args.ids:
        raise ConfigError("retry-dead needs item ids or --all")
    req: dict[str, object] = {"cmd": "retry-dead"}
    if args.all:
        req["all"] = True
    else:
        req["ids"] = args.ids
    answer = _ask(args, req)
    print(f"requeued {answer.get('requeued', 0)} item(s)")
    return EXIT_OK


def _add_target(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-c",
        "--config",
        type=absolute_path,
        default=DEFAULT_CONFIG,
        help=f"config file naming the status socket (default {DEFAULT_CONFIG})",
    )
    p.add_argument("--socket", help="status socket path (overrides the config's)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edged", description="Edge data-sync daemon.")
    parser.add_argument("--version", action="version", version=f"edged {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the daemon in the foreground (what systemd starts)")
    run.add_argument("-c", "--config", type=absolute_path, default=DEFAULT_CONFIG)
    run.add_argument(
        "--until-empty",
        nargs="?",
        const=math.inf,
        type=_duration_arg,
        metavar="LIMIT",
        help="scan every source once, upload everything, then exit; with LIMIT (e.g. 10m)"
        " give up after that long, and at once on refused credentials or certificate,"
        " exiting 1 with what stayed queued",
    )
    run.set_defaults(func=_cmd_run)

    chk = sub.add_parser("check-config", help="validate a config file and print it resolved")
    chk.add_argument("-c", "--config", type=absolute_path, default=DEFAULT_CONFIG)
    chk.set_defaults(func=_cmd_check_config)

    st = sub.add_parser("status", help="state, backlog, rates, last error of a running daemon")
    _add_target(st)
    st.add_argument("--json", action="store_true", help="machine-readable output")
    st.add_argument("--watch", action="store_true", help="refresh until interrupted")
    st.add_argument("--interval", type=float, default=1.0, help="--watch refresh seconds")
    st.set_defaults(func=_cmd_status)

    for name, text in (
        ("sync-now", "scan sources and retry everything now (skip backoff)"),
        ("pause", "stop uploading (capture continues into the outbox)"),
        ("resume", "resume uploading (also after an auth failure)"),
    ):
        p = sub.add_parser(name, help=text)
        _add_target(p)
        if name != "sync-now":
            p.add_argument(
                "--source", metavar="NAME", help="only this source's uploads (see edged status)"
            )
        p.set_defaults(func=_cmd_simple)

    lim = sub.add_parser(
        "limit",
        help="cap upload bandwidth now, over upload.max_bandwidth until a reload",
        description="RATE (e.g. 2MiB/s, 512KiB) caps the bytes per second all uploads"
        " share; `off` lifts the cap; both override upload.max_bandwidth until a reload"
        " (SIGHUP) or a restart. `config` ends the override.",
    )
    _add_target(lim)
    lim.add_argument("rate", type=_rate_arg, metavar="RATE|off|config")
    lim.set_defaults(func=_cmd_limit)

    dl = sub.add_parser("dead-letters", help="list items the server rejected")
    _add_target(dl)
    dl.add_argument("--json", action="store_true")
    dl.set_defaults(func=_cmd_dead_letters)

    rd = sub.add_parser("retry-dead", help="requeue dead letters")
    _add_target(rd)
    rd.add_argument("ids", nargs="*", type=int, help="item ids (see dead-letters)")
    rd.add_argument("--all", action="store_true", help="requeue every dead letter")
    rd.set_defaults(func=_cmd_retry_dead)

    ing = sub.add_parser("ingest", help="run the reference DataSync + auth server")
    ing.add_argument(
        "--listen",
        type=parse_listen,
        default=("127.0.0.1", 8080),
        help="HOST:PORT to bind (default 127.0.0.1:8080; port 0 picks one)",
    )
    ing.add_argument(
        "--data",
        type=absolute_path,
        help="directory for the index (and blobs, unless --blobs); required",
    )
    ing.add_argument(
        "--blobs",
        metavar="S3_URL",
        help="s3://BUCKET[/PREFIX]: keep blob bytes in S3-compatible object storage (AWS_*"
        " environment credentials) instead of under --data",
    )
    ing.add_argument(
        "--s3-endpoint", metavar="URL", help="S3-compatible endpoint for --blobs (default AWS)"
    )
    ing.add_argument(
        "--database",
        help="postgresql://USER@HOST/DB: keep the index there, shared by every replica"
        " (password from PGPASSWORD or the URL; needs edged[postgres]); blobs stay in --data",
    )
    ing.add_argument(
        "--no-migrate",
        action="store_true",
        help="do not upgrade the index's schema at start; refuse one older than this edged"
        " (replicas whose schema `edged ingest migrate` upgrades)",
    )
    ing.add_argument(
        "--retention",
        type=_retention_arg,
        default=None,
        metavar="DURATION",
        help="delete tabular readings captured longer ago than this (e.g. 400d), hourly;"
        " binary data and files are kept (default: keep everything)",
    )
    ing.add_argument("--api-key-id", action="append", help="API key id (repeatable)")
    ing.add_argument(
        "--api-key-file",
        action="append",
        type=absolute_path,
        help="file (mode 0600) holding the key for the matching --api-key-id",
    )
    ing.add_argument(
        "--org-id",
        action="append",
        help="organisation of the matching key: its uploads and queries are scoped to it"
        ' (an open server, without keys, serves organisation "")',
    )
    ing.add_argument(
        "--location-id", action="append", help="location stamped on the matching key's uploads"
    )
    ing.add_argument("--tls-cert", type=absolute_path, help="PEM certificate chain (enables TLS)")
    ing.add_argument("--tls-key", type=absolute_path, help="PEM private key for --tls-cert")
    ing.add_argument(
        "--max-upload-bytes",
        type=_size_arg,
        default=64 << 30,
        help="largest streamed upload accepted (default 64GiB)",
    )
    ing.add_argument(
        "--metrics-listen",
        type=parse_listen,
        default=None,
        help="HOST:PORT to serve Prometheus /metrics on (default: off; port 0 picks one)",
    )
    ing.add_argument(
        "--log-format",
        choices=("text", "json"),
        default="text",
        help="text, or json: one object per line with fields (default text)",
    )
    ing.add_argument(
        "--log-level",
        choices=("debug", "info", "warning", "error"),
        default="info",
        help="info logs one access line per call (default info)",
    )
    ing.add_argument(
        "--grace",
        type=float,
        default=10.0,
        help="seconds to let in-flight uploads finish on SIGTERM (default 10)",
    )
    _add_limit_flags(ing, Limits)
    _add_limit_flags(ing, AuthLimits)
    _add_limit_flags(ing, QueryLimits)
    ing.set_defaults(func=_cmd_ingest)
    ing_sub = ing.add_subparsers(dest="ingest_command", metavar="{migrate}")
    mig = ing_sub.add_parser(
        "migrate", help="create or upgrade the index's schema, print from -> to, and exit"
    )
    mig.add_argument("--data", type=absolute_path, help="the SQLite index under this directory")
    mig.add_argument(
        "--database", help="postgresql://USER@HOST/DB (password: PGPASSWORD, ~/.pgpass)"
    )
    mig.add_argument(
        "--check",
        action="store_true",
        help="change nothing; exit 1 if a migration is pending (deploy pipelines)",
    )
    mig.set_defaults(func=_cmd_ingest_migrate)

    from edged.cli import query as query_cli

    query_cli.add_parser(sub).set_defaults(func=_cmd_query)
    from edged.cli import upload as upload_cli

    upload_cli.add_parser(sub).set_defaults(func=_cmd_upload)
    from edged.cli import units

    units.add_parser(sub).set_defaults(func=units.run)
    return parser


def _cmd_upload(args: argparse.Namespace) -> int:
    from edged.cli import upload as upload_cli

    return asyncio.run(upload_cli.run(args))


def _cmd_query(args: argparse.Namespace) -> int:
    from edged.cli import query as query_cli

    return asyncio.run(query_cli.run(args))


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
    except KeyboardInterrupt:
        return 130  # Ctrl-C (e.g. leaving `status --watch`): no traceback


if __name__ == "__main__":  # pragma: no cover
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
