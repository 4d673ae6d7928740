"""Turn the reliability suite's records (JSON lines) into docs/reliability.md.

`make torture` (full profile) and `make reliability` (quick profile) call this.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

SCENARIOS = {
    "sigkill-conservation": (
        "Conservation under crashes",
        "A writer produces uniquely numbered readings (capture files) and files while edged"
        " drains to a loopback `edged ingest`; edged is SIGKILLed at random moments (0.2-1.5 s"
        " after each start), restarted each time, then run `--until-empty`.",
        "tests/reliability/test_crash_conservation.py",
    ),
    "disk-full": (
        "Disk full",
        "state_dir on a 3 MiB tmpfs the test mounts; the server is down at first, so the"
        " outbox fills: sources must stay on disk and the daemon alive; then the server comes"
        " up and everything drains."
        " When SQLite itself hits ENOSPC (another writer filled the disk), an upload-path"
        " write truncates the WAL, then spends the reserve (sized for a full WAL checkpoint),"
        " and puts the reserve back once acks free as much"
        " (`tests/test_outbox_disk_full.py` fills a tmpfs that way twice).",
        "tests/reliability/test_disk_full.py",
    ),
    "fault-unavailable": (
        "Half of all calls UNAVAILABLE",
        "A real `edged run` uploads to `faulty_ingest.py` (the real ingest with a seeded"
        " injector answering 50% of DataSync calls UNAVAILABLE) while a writer produces"
        " numbered readings and files: all delivered, failures at most 4x successes + 20,"
        " the daemon's call counter agrees with the server's, RSS flat.",
        "tests/reliability/test_faults.py",
    ),
    "fault-down-then-up": (
        "Server down, then up",
        "edged starts with nothing listening on its port (backoff 50 ms..500 ms, full"
        " jitter) and stays `offline` for the outage: it may only probe, 0.5-12 calls/s"
        " (about 4/s expected), counted with `edged status --json` `cloud.calls`; then the"
        " server comes up on that port: first success within one capped backoff, all"
        " delivered, RSS flat.",
        "tests/reliability/test_faults.py",
    ),
    "fault-slow-server": (
        "Slow server (DEADLINE_EXCEEDED)",
        "`upload.call_timeout: 1s`; the server holds 30% of calls for 1.5 s before handling"
        " them (the late handler still stores, so the ingest's de-duplication by item id is"
        " exercised): all delivered exactly once, held calls at most 4x successes + 20,"
        " RSS flat.",
        "tests/reliability/test_faults.py",
    ),
    "bad-inputs": (
        "Bad inputs",
        "Against a running daemon: corrupt, truncated and zero-length capture files; a 5 GiB"
        " sparse file (queued by reference, streamed until the server's --max-upload-bytes"
        " refuses it: dead letter, flat RSS); unreadable plain and capture files (as root the"
        " daemon runs under setpriv without CAP_DAC_OVERRIDE); FIFOs, directories named like"
        " files; non-UTF-8 names; symlink loops. Each ends as documented and `edged status`"
        " keeps answering.",
        "tests/reliability/test_bad_inputs.py",
    ),
    "security": (
        "Secrets and modes",
        "Wrong key in the key file (state auth_failed, input still committed), then the file"
        " is fixed and `edged resume` drains everything. Neither secret appears in the daemon"
        " log, ingest stdout/stderr, status/dead-letter output or state files; raw calls"
        " without a token, with a forged token, a wrong key or an unknown key id get"
        " UNAUTHENTICATED; state, socket and ingest files have their documented modes.",
        "tests/reliability/test_security.py",
    ),
}

HEADER = """# Reliability

Every promise of the design (no loss, bounded duplicates, never wedged, bounded
resources, polite retries) has a scenario that runs for real: subprocesses, SIGKILL,
SQLite files, loopback gRPC, a tmpfs that fills up. The quick profile runs in
`make test`; `make torture` runs the full profile and rewrites this file
(`make reliability` does the same with the quick profile).

"""

STATIC = Path(__file__).with_name("reliability_scenarios.md")


def render(records: list[dict[str, Any]]) -> str:
    out = [HEADER, "## Figures of the last run\n"]
    for key, (title, text, where) in SCENARIOS.items():
        runs = [r for r in records if r.get("scenario") == key]
        out.append(f"### {title}\n\n{text} (`{where}`)\n")
        if not runs:
            out.append("_not run in the last collection_\n")
            continue
        last = runs[-1]
        figures = {k: v for k, v in last.items() if k not in ("scenario",)}
        out.append("| " + " | ".join(figures) + " |")
        out.append("|" + "---|" * len(figures))
        out.append("| " + " | ".join(str(v) for v in figures.values()) + " |\n")
    out.append("\n" + STATIC.read_text())
    return "\n".join(out)


def main() -> None:
    src, dst = Path(sys.argv[1]), Path(sys.argv[2])
    records = [json.loads(line) for line in src.read_text().splitlines() if line.strip()]
    dst.write_text(render(records))
    print(f"wrote {dst} from {len(records)} record(s)")


if __name__ == "__main__":
    main()
