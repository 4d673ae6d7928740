"""`edged install-units`: put the shipped systemd units (and a starting config) where
systemd looks, from the installed package, so a robot needs no source checkout.

The files live once, in `systemd/` and `config/` of the source tree; the package
carries them as `edged/_share/*` (links there, copies in the wheel). ExecStart names
this install's `edged` (a venv's, or /usr/bin/edged). Units are replaced only when
they differ and `--force` is given; an existing config is never replaced.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from edged.errors import ConfigError

DEFAULT_PREFIX = Path("/etc/systemd/system")
DEFAULT_CONFIG_DIR = Path("/etc/edged")
UNIT_BIN = "/usr/bin/edged"


@dataclass(frozen=True)
class Copy:
    """One file to write: `text` to `dest` with `mode`; `keep` = never replace."""

    name: str
    text: str
    dest: Path
    mode: int
    keep: bool = False


def shipped(name: str) -> str:
    return (resources.files("edged") / "_share" / name).read_text()


def this_edged() -> str:
    """The `edged` next to this interpreter (a venv's), else the units' /usr/bin/edged."""
    beside = Path(sys.executable).parent / "edged"
    return str(beside) if beside.is_file() else UNIT_BIN


def plan(args: argparse.Namespace) -> list[Copy]:
    """What to write (pure apart from reading the package's files)."""
    prefix: Path = args.prefix
    edged_bin: str = args.bin

    def unit(name: str) -> str:
        return shipped(name).replace(UNIT_BIN, edged_bin)

    copies = [Copy("edged.service", unit("edged.service"), prefix / "edged.service", 0o644)]
    if args.dedicated_user:
        dest = prefix / "edged.service.d" / "dedicated-user.conf"
        copies.append(
            Copy("edged-dedicated-user.conf", unit("edged-dedicated-user.conf"), dest, 0o644)
        )
    if args.ingest:
        dest = prefix / "edged-ingest.service"
        copies.append(Copy("edged-ingest.service", unit("edged-ingest.service"), dest, 0o644))
    if args.config_dir is not None:
        dest = args.config_dir / "edged.yaml"
        copies.append(Copy("edged.example.yaml", shipped("edged.example.yaml"), dest, 0o640, True))
    return copies


def decide(copy: Copy, force: bool) -> str:
    """'write', 'same', 'keep' (existing config) or 'differs' (a unit edited locally)."""
    try:
        current = copy.dest.read_text()
    except FileNotFoundError:
        return "write"
    except (OSError, UnicodeDecodeError):
        current = None
    if current == copy.text:
        return "same"
    if copy.keep:
        return "keep"
    return "write" if force else "differs"


def run(args: argparse.Namespace) -> int:
    copies = plan(args)
    verdicts = [(c, decide(c, args.force)) for c in copies]
    if differs := [c for c, v in verdicts if v == "differs"]:
        names = ", ".join(str(c.dest) for c in differs)
        raise ConfigError(f"{names} differ from the shipped files; --force replaces them")
    prefix = "would " if args.dry_run else ""
    for c, verdict in verdicts:
        if verdict == "write":
            if not args.dry_run:
                _write(c)
            print(f"{prefix}install {c.dest} (from {c.name}, mode {c.mode:04o})")
        elif verdict == "same":
            print(f"{c.dest} is up to date")
        else:
            print(f"{c.dest} exists; kept (the shipped example is {c.name})")
    print(
        "next: edit the config, put the API key in /etc/edged/api-key (0600), then"
        " `systemctl daemon-reload && systemctl enable --now edged`"
    )
    return 0


def _write(c: Copy) -> None:
    """Atomically, so a unit is never half-written for a concurrent daemon-reload."""
    c.dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = c.dest.with_name(f".{c.dest.name}.edged-tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, c.mode)
    with os.fdopen(fd, "w") as f:
        f.write(c.text)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, c.mode)
    os.replace(tmp, c.dest)


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """`edged install-units ...`; the caller sets the handler."""
    p: argparse.ArgumentParser = sub.add_parser(
        "install-units",
        help="install the systemd unit(s) and a starting config from the package",
    )
    p.add_argument(
        "--prefix",
        type=Path,
        default=DEFAULT_PREFIX,
        help=f"unit directory (default {DEFAULT_PREFIX})",
    )
    p.add_argument(
        "--config-dir",
        type=Path,
        default=DEFAULT_CONFIG_DIR,
        help=f"where edged.yaml goes if absent (default {DEFAULT_CONFIG_DIR})",
    )
    p.add_argument("--no-config", dest="config_dir", action="store_const", const=None)
    p.add_argument(
        "--bin", default=this_edged(), help="edged executable for ExecStart (default: this one)"
    )
    p.add_argument(
        "--dedicated-user", action="store_true", help="also the drop-in running as user edged"
    )
    p.add_argument("--ingest", action="store_true", help="also edged-ingest.service")
    p.add_argument("--force", action="store_true", help="replace units that differ")
    p.add_argument("--dry-run", action="store_true", help="say what would be written")
    return p
