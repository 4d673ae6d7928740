"""Human views of status answers (pure: dict in, text out)."""

from __future__ import annotations

import time
from typing import Any


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def human_age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def _ago(ts: float | None) -> str:
    return "never" if ts is None else f"{human_age(time.time() - ts)} ago"


def render(s: dict[str, Any]) -> str:
    ob, up, rates, cloud = s["outbox"], s["uploaded"], s["rates"], s["cloud"]
    lines = [
        f"edged {s['version']}  state: {s['state'].upper()}  up {human_age(s['uptime_s'])}"
        f"  part: {s.get('part_id', '-')}",
        f"cloud     {cloud['address']}  last success {_ago(cloud['last_success_at'])}",
    ]
    if cloud.get("last_error"):
        lines.append(f"          last error: {cloud['last_error']}")
    if cloud.get("next_retry_in_s") is not None:
        lines.append(f"          next retry in {cloud['next_retry_in_s']:.1f}s")
    lines += [
        f"backlog   {ob['items']} items, {human_bytes(ob['bytes'])},"
        f" oldest {human_age(ob['oldest_age_s'])}",
    ]
    for kind, k in sorted(ob["per_kind"].items()):
        lines.append(f"            {kind:<8} {k['items']:>9} {human_bytes(k['bytes']):>11}")
    lines += [
        f"uploaded  {up['items']} items, {up['readings']} readings, {human_bytes(up['bytes'])}",
        f"rate      {rates['readings_per_s']:.1f} readings/s,"
        f" {human_bytes(rates['bytes_per_s'])}/s",
        f"problems  dead letters {s['dead_letters']}, quarantined {s['quarantined']},"
        f" dropped {s['dropped']['readings']} readings",
    ]
    if s["sources"]:
        lines.append("sources")
        for src in s["sources"]:
            last = _ago(src.get("last_event_at"))
            lines.append(
                f"  {src['name']:<40} seen {src['files_seen']:>7}  last {last}"
                + (f"  error: {src['last_error']}" if src.get("last_error") else "")
            )
    # Paths that are not UTF-8 arrive as lone surrogates: show their bytes as \xNN
    # rather than fail to print.
    return "\n".join(lines).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def render_dead_letters(letters: list[dict[str, Any]]) -> str:
    if not letters:
        return "no dead letters"
    rows = ["   id  kind     items      bytes  status              message"]
    for d in letters:
        rows.append(
            f"{d['id']:>5}  {d['kind']:<7} {d['count']:>6} {d['bytes']:>10}  {d['status']:<18}"
            f"  {d['message']}"
        )
    rows.append("requeue with: edged retry-dead ID ... | edged retry-dead --all")
    return "\n".join(rows)
