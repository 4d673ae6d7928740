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


NAME_WIDTH = 40
_HINTS = {
    "auth_failed": "fix the API key, then `edged resume` (or reload)",
    "tls_failed": "fix cloud.ca_file or the server's certificate, then `edged resume`",
}


def _ago(d: dict[str, Any], key: str) -> str:
    """`3m ago` from the daemon's `<key>_age_s` (its own monotonic clock); the wall-clock
    `<key>_at` only from a daemon too old to report ages."""
    age = d.get(f"{key}_age_s")
    if age is None and d.get(f"{key}_at") is not None:
        age = max(0.0, time.time() - d[f"{key}_at"])
    return "never" if age is None else f"{human_age(age)} ago"


def _name_cell(name: str) -> tuple[str, str]:
    """(line before, cell): a name too long for its column gets a line of its own."""
    if len(name) <= NAME_WIDTH:
        return "", f"{name:<{NAME_WIDTH}}"
    return f"  {name}\n", " " * NAME_WIDTH


def render(s: dict[str, Any]) -> str:
    ob, up, rates, cloud = s["outbox"], s["uploaded"], s["rates"], s["cloud"]
    lines = [
        f"edged {s['version']}  state: {s['state'].upper()}  up {human_age(s['uptime_s'])}"
        f"  part: {s.get('part_id', '-')}",
        f"cloud     {cloud['address']}  last success {_ago(cloud, 'last_success')}",
    ]
    if cloud.get("last_error"):
        when = _ago(cloud, "last_error") if "last_error_age_s" in cloud else ""
        lines.append(f"          last error{' ' + when if when else ''}: {cloud['last_error']}")
    if hint := _HINTS.get(s["state"]):
        lines.append(f"          {hint}")
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
        *([render_bandwidth(s["bandwidth"])] if "bandwidth" in s else []),
        f"problems  dead letters {s['dead_letters']}, quarantined {s['quarantined']},"
        f" dropped {s['dropped']['readings']} readings,"
        f" expired {s.get('expired', {}).get('readings', 0)} readings",
    ]
    if s["sources"]:
        lines.append("sources")
        for src in s["sources"]:
            last = _ago(src, "last_event")
            before, cell = _name_cell(src["name"])
            lines.append(
                f"{before}  {cell} seen {src['files_seen']:>7}  last {last}"
                + (f"  error: {src['last_error']}" if src.get("last_error") else "")
            )
            if gate := _gate_line(src):
                lines.append(f"  {'':<{NAME_WIDTH}} {gate}")
    # Paths that are not UTF-8 arrive as lone surrogates: show their bytes as \xNN
    # rather than fail to print.
    return "\n".join(lines).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def render_bandwidth(b: dict[str, Any]) -> str:
    """The `bandwidth` line: the cap, where it comes from, and the measured send rate."""
    limit = b["limit_bytes_per_s"]
    cap = "unlimited" if not limit else f"cap {human_bytes(limit)}/s"
    if b["source"] == "config":
        where = "upload.max_bandwidth"
    else:
        configured = b["config_bytes_per_s"]
        was = "unlimited" if not configured else f"{human_bytes(configured)}/s"
        where = (
            f"`edged limit`, over upload.max_bandwidth ({was}) until"
            " `edged limit config` or a reload"
        )
    line = f"bandwidth {cap} ({where}); sending {human_bytes(b['bytes_per_s'])}/s"
    if b.get("waiting"):
        line += f", {b['waiting']} waiting"
    return line


def _gate_line(src: dict[str, Any]) -> str:
    """Priority, window, condition, pause and expiries of one source, when any is set."""
    parts = []
    if src.get("priority"):
        parts.append(f"priority {src['priority']}")
    if (w := src.get("window")) is not None:
        change = w.get("next_change")
        until = f" until {change[11:16]}" if change else ""
        parts.append(f"window {'open' if w['open'] else 'closed'}{until}")
    if (c := src.get("condition")) is not None:
        parts.append(f"condition {'holds' if c['ok'] else 'fails'} ({c['why']})")
    if src.get("paused"):
        parts.append("PAUSED (edged resume --source)")
    expired = src.get("expired") or {}
    if expired.get("items") or expired.get("readings"):
        parts.append(f"expired {expired['items']} items / {expired['readings']} readings")
    if "upload_allowed" in src and not src["upload_allowed"] and parts:
        parts.insert(0, "uploads held:")
    return "  ".join(parts)


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
