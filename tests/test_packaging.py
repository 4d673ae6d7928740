"""What a robot installs: the daemon, `edged upload` and `edged status` work without the
`ingest` extra (pymongo/bson), the server says which extra it needs, and the wheel
carries the systemd units and the example config that `edged install-units` writes."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.support.credentials import KeyFile
from tests.support.daemon import base_config, write_config
from tests.support.ingest_db import ingest_count
from tests.support.processes import ingest_process

REPO = Path(__file__).resolve().parents[1]
NO_BSON = (
    "import sys; sys.modules['bson'] = None; sys.modules['pymongo'] = None;"
    " from edged.cli import main; code = main(sys.argv[1:]);"
    " assert 'bson' not in [m for m in sys.modules if sys.modules[m] is not None], 'bson loaded';"
    " sys.exit(code)"
)


def _without_bson(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """`edged ARGS` in an interpreter where `import bson`/`import pymongo` fail."""
    return subprocess.run(
        [sys.executable, "-c", NO_BSON, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        cwd=REPO,
    )


def test_server_without_its_extra_says_which_to_install(tmp_path: Path) -> None:
    res = _without_bson("ingest", "--data", str(tmp_path / "d"))
    assert res.returncode == 2, res.stderr
    assert res.stderr.strip().splitlines() == [
        "edged: edged ingest needs dependencies this install lacks: pip install 'edged[ingest]'"
    ]
    cfg = write_config(
        tmp_path / "e.yaml",
        f"part_id: p\nstate_dir: {tmp_path / 's'}\nstatus:\n  socket: {tmp_path / 'sock'}\n",
    )
    res = _without_bson("run", "-c", str(cfg), "--until-empty")
    assert res.returncode == 2 and "cloud.address: embedded needs" in res.stderr
    assert "edged[ingest]" in res.stderr and "Traceback" not in res.stderr


def test_robot_commands_run_without_pymongo(tmp_path: Path, key: KeyFile) -> None:
    """run, upload and status against a real server, in an interpreter without bson."""
    (tmp_path / "uploads").mkdir()
    (tmp_path / "uploads" / "a.bin").write_bytes(b"a" * 100)
    (tmp_path / "one.txt").write_bytes(b"one")
    auth = ["--api-key-id", key.key_id, "--api-key-file", str(key.path)]
    with ingest_process(tmp_path / "ingest", auth) as (_, port):
        cfg = write_config(tmp_path / "edged.yaml", base_config(tmp_path, port, key))
        res = _without_bson("run", "-c", str(cfg), "--until-empty")
        assert res.returncode == 0, res.stderr
        res = _without_bson("upload", str(tmp_path / "one.txt"), "-c", str(cfg))
        assert res.returncode == 0, res.stderr
        assert ingest_count(tmp_path / "ingest", "binaries") == 2
    res = _without_bson("status", "--socket", str(tmp_path / "edged.sock"))
    assert res.returncode == 1 and "is edged running?" in res.stderr, res.stderr
    res = _without_bson("query", "sql", "SELECT 1", "--address", f"127.0.0.1:{port}")
    assert res.returncode in (1, 2) and "Traceback" not in res.stderr


def test_sql_rows_without_bson_name_the_extra() -> None:
    code = (
        "import sys; sys.modules['bson'] = None\n"
        "from edged.client.data_client import load_bson\n"
        "from edged.errors import MissingExtra\n"
        "try:\n    load_bson('tabular_data_by_sql')\n"
        "except MissingExtra as exc:\n    print(exc)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert "pip install 'edged[ingest]'" in out.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A wheel built from a copy of the tree (the build writes build/ and egg-info)."""
    src = tmp_path_factory.mktemp("src")
    for name in ("edged", "systemd", "config"):
        shutil.copytree(
            REPO / name, src / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__")
        )
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(out), str(src)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    (whl,) = out.glob("edged-*.whl")
    return whl


def test_wheel_ships_units_and_config_and_needs_no_pymongo(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        for shipped, source in (
            ("edged.service", "systemd/edged.service"),
            ("edged-ingest.service", "systemd/edged-ingest.service"),
            ("edged-dedicated-user.conf", "systemd/edged-dedicated-user.conf"),
            ("edged.example.yaml", "config/edged.example.yaml"),
        ):
            assert z.read(f"edged/_share/{shipped}") == (REPO / source).read_bytes()
        (meta,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        requires = [
            line for line in z.read(meta).decode().splitlines() if line.startswith("Requires-Dist")
        ]
    pymongo = [r for r in requires if "pymongo" in r]
    assert pymongo and all('extra == "ingest"' in r for r in pymongo), requires


def test_install_units_writes_units_and_keeps_a_config(tmp_path: Path) -> None:
    from edged.cli import main

    prefix, etc = tmp_path / "units", tmp_path / "etc"
    argv = ["install-units", "--prefix", str(prefix), "--config-dir", str(etc)]
    assert main([*argv, "--dry-run"]) == 0
    assert not prefix.exists() and not etc.exists()
    assert main([*argv, "--bin", "/opt/edged/bin/edged", "--dedicated-user"]) == 0
    unit = (prefix / "edged.service").read_text()
    assert "ExecStart=/opt/edged/bin/edged run -c /etc/edged/edged.yaml" in unit
    assert (prefix / "edged.service.d" / "dedicated-user.conf").is_file()
    assert not (prefix / "edged-ingest.service").exists()
    assert (etc / "edged.yaml").read_text() == (REPO / "config/edged.example.yaml").read_text()
    (etc / "edged.yaml").write_text("part_id: mine\n")
    (prefix / "edged.service").write_text(unit + "# local edit\n")
    assert main([*argv, "--bin", "/opt/edged/bin/edged"]) == 2  # a changed unit: --force
    assert main([*argv, "--bin", "/opt/edged/bin/edged", "--force"]) == 0
    assert (prefix / "edged.service").read_text() == unit
    assert (etc / "edged.yaml").read_text() == "part_id: mine\n"  # never replaced
