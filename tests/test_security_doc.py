"""docs/security.md lists every limit an operator can set on `edged ingest`."""

from __future__ import annotations

from pathlib import Path

from edged.cli.main import build_parser

DOC = Path(__file__).resolve().parents[1] / "docs" / "security.md"
# Flags that are not limits: where to listen, whom to trust, where to store.
NOT_LIMITS = {
    "--help",
    "--data",
    "--database",
    "--listen",
    "--api-key-id",
    "--api-key-file",
    "--org-id",
    "--location-id",
    "--tls-cert",
    "--tls-key",
    "--debug",
    "--log-format",
    "--log-level",
    "--synchronous",
    "--no-migrate",
}


def test_every_ingest_limit_flag_is_documented() -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command" or a.choices)
    assert isinstance(sub.choices, dict)
    ingest = sub.choices["ingest"]
    flags = {s for a in ingest._actions for s in a.option_strings if s.startswith("--")}
    text = DOC.read_text()
    missing = sorted(f for f in flags - NOT_LIMITS if f"`{f}`" not in text)
    assert not missing, f"docs/security.md does not list {missing}"
