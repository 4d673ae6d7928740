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
        " up and everything drains.",
        "tests/reliability/test_disk_full.py",
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
