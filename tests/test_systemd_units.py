"""The shipped systemd units load cleanly and stay hardened.

Both checks run `systemd-analyze` offline on copies of the unit files, so they need no
running systemd (this also works in a container without one as PID 1).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

SYSTEMD_ANALYZE = Path("/usr/bin/systemd-analyze")
UNIT_DIR = Path(__file__).resolve().parents[1] / "systemd"
UNITS = sorted(p.name for p in UNIT_DIR.glob("*.service"))
DEDICATED_USER = "edged-dedicated-user.conf"
MAX_EXPOSURE = 2.5

pytestmark = pytest.mark.skipif(
    not SYSTEMD_ANALYZE.exists(), reason="systemd-analyze is not installed"
)


def install_unit(unit_dir: Path, name: str, dropins: tuple[str, ...] = ()) -> Path:
    """Copy a unit (and drop-ins into NAME.d/) with ExecStart pointing at this venv's
    edged: `verify` checks that the binaries exist."""
    unit_dir.mkdir(parents=True, exist_ok=True)
    text = (UNIT_DIR / name).read_text()
    unit = unit_dir / name
    unit.write_text(text.replace("/usr/bin/edged", str(Path(sys.executable).parent / "edged")))
    for dropin in dropins:
        target = unit_dir / f"{name}.d" / dropin
        target.parent.mkdir(exist_ok=True)
        target.write_text((UNIT_DIR / dropin).read_text())
    return unit


def analyze(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(SYSTEMD_ANALYZE), *args], capture_output=True, text=True, timeout=60, check=False
    )


def verify_problems(unit: Path, *names: str) -> list[str]:
    """stderr lines of `systemd-analyze verify` about our files (the host's own units,
    or their absence in a container, are not ours to judge)."""
    res = analyze("verify", str(unit))
    return [ln for ln in res.stderr.splitlines() if any(n in ln for n in names)]


def exposure(output: str) -> float:
    found = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", output)
    assert found, output
    return float(found.group(1))


def test_units_are_shipped() -> None:
    assert {"edged.service", "edged-ingest.service"} <= set(UNITS)


@pytest.mark.parametrize("name", UNITS)
def test_unit_passes_verify(tmp_path: Path, name: str) -> None:
    unit = install_unit(tmp_path, name)
    problems = verify_problems(unit, name)
    assert not problems, "\n".join(problems)


def test_dedicated_user_dropin_passes_verify(tmp_path: Path) -> None:
    unit = install_unit(tmp_path, "edged.service", (DEDICATED_USER,))
    problems = verify_problems(unit, "edged.service", DEDICATED_USER)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("name", UNITS)
def test_unit_security_exposure(tmp_path: Path, name: str) -> None:
    unit = install_unit(tmp_path, name)
    res = analyze("security", "--offline=true", "--no-pager", str(unit))
    assert res.returncode == 0, res.stderr
    assert exposure(res.stdout) <= MAX_EXPOSURE, res.stdout


def test_dedicated_user_dropin_exposure_and_capabilities(tmp_path: Path) -> None:
    """The drop-in is read as installed (under /etc/systemd/system of --root), runs as a
    non-root user, and replaces the root variant's capability set instead of adding to it."""
    install_unit(tmp_path / "etc/systemd/system", "edged.service", (DEDICATED_USER,))
    res = analyze("security", "--offline=true", "--no-pager", f"--root={tmp_path}", "edged.service")
    assert res.returncode == 0, res.stderr
    checks = {
        m.group(2): m.group(1)
        for m in re.finditer(r"^([✓✗]) (\S+)", res.stdout, flags=re.MULTILINE)
    }
    assert checks.get("User=/DynamicUser=") == "✓", res.stdout
    assert checks.get("CapabilityBoundingSet=~CAP_(DAC_*|FOWNER|IPC_OWNER)") == "✓", res.stdout
    assert exposure(res.stdout) <= MAX_EXPOSURE, res.stdout
