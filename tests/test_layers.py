"""The tree is the architecture (docs/architecture.md): which layer may import which.

Checked on the source with `ast` (every import, also those inside functions), and once
for real in a fresh interpreter, so a lazy import cannot hide an edge. Tests and benches
share helpers through `tests/support/` only: no module imports a test module, conftest,
or (from tests) `bench`."""

from __future__ import annotations

import ast
import contextlib
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PKG = REPO / "edged"
BASE = {
    "edged",
    "edged.errors",
    "edged.durable",
    "edged._proto",
    "edged.options",
    "edged.protocol",
    "edged.rows",
}
"""Foundation every layer may use: the exception hierarchy, fsync, generated protos,
config keys declared once (`options`: the daemon's file, the SDK's `cloud` section), and
what edged adds to the wire protocol (`protocol`: client and server both speak it), and
the multi-row INSERT both SQLite writers use (`rows`)."""

ALLOWED: dict[str, set[str]] = {
    "base": set(),
    "wire": {"wire"},
    "capture": {"wire", "capture"},
    "client": {"wire", "capture", "client"},
    "ingest": {"ingest"},
    "daemon": {"wire", "capture", "client", "ingest", "daemon"},
    "cli": {"wire", "capture", "client", "ingest", "daemon", "cli"},
}
"""Layer -> layers it may import (besides BASE). The SDK (wire, capture, client) never
imports the daemon, the ingest server or the CLI, not even lazily inside a function;
ingest never imports the daemon."""


def _module(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> str:
    parts = module.split(".")
    if len(parts) < 2 or module in BASE or parts[1] == "_proto":
        return "base"
    if parts[1] == "__main__":
        return "cli"
    return parts[1]


def _target(module: str) -> str:
    """`edged.x.y` -> the name the layer rules talk about (`edged._proto...` is BASE)."""
    parts = module.split(".")
    return "edged._proto" if parts[1:2] == ["_proto"] else module


def imports(path: Path) -> list[tuple[str, bool]]:
    """(imported edged module, at module top level?) for every import in `path`."""
    tree = ast.parse(path.read_text(), str(path))
    top = {id(node) for node in tree.body}
    found: list[tuple[str, bool]] = []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
            if node.module == "edged":  # `from edged import x`: x may be a module
                names = [
                    f"edged.{a.name}"
                    if (PKG / f"{a.name}.py").exists() or (PKG / a.name).is_dir()
                    else "edged"
                    for a in node.names
                ]
        found += [(_target(n), id(node) in top) for n in names if n.split(".")[0] == "edged"]
    return found


def violations() -> list[str]:
    bad = []
    for path in sorted(PKG.rglob("*.py")):
        mod = _module(path)
        if layer_of(mod) == "base" and "_proto" in mod:
            continue
        own = layer_of(mod)
        for target, _ in imports(path):
            their = layer_of(target)
            if their == "base" and target in BASE | {"edged"}:
                continue
            if their in ALLOWED[own]:
                continue
            bad.append(f"{mod} ({own}) imports {target} ({their})")
    return bad


def test_layers_import_only_downwards() -> None:
    assert violations() == []


def test_every_module_belongs_to_a_layer() -> None:
    """A new top-level module must be placed in a layer (or added to BASE on purpose)."""
    stray = [
        _module(p) for p in PKG.glob("*.py") if _module(p) not in BASE | {"edged.__main__", "edged"}
    ]
    assert stray == []


def test_the_checker_sees_a_violation(tmp_path: Path) -> None:
    """The rule is live: an SDK module importing the daemon, even lazily, is reported."""
    fake = tmp_path / "m.py"
    fake.write_text("def f():\n    from edged.daemon.outbox import Outbox\n")
    assert imports(fake) == [("edged.daemon.outbox", False)]
    assert layer_of("edged.daemon.outbox") not in ALLOWED["client"]


def test_importing_the_sdk_loads_no_daemon_ingest_or_cli() -> None:
    code = (
        "import sys, edged.client, edged.wire, edged.capture;"
        "print(sorted(m for m in sys.modules"
        " if m.split('.')[:2] in (['edged', 'daemon'], ['edged', 'ingest'], ['edged', 'cli'])))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip() == "[]", out.stdout


def test_from_config_loads_no_daemon_code(tmp_path: Path) -> None:
    """`DataClient.from_config` reads the daemon's config file without the daemon: the
    `cloud` section is declared in wire (`edged.wire.cloud`)."""
    conf = tmp_path / "edged.yaml"
    conf.write_text("part_id: p\nstate_dir: s\ncloud:\n  address: embedded\n")
    code = (
        "import sys\nfrom edged.client import DataClient\nfrom edged.errors import ConfigError\n"
        f"try:\n    DataClient.from_config({str(conf)!r})\n"
        "except ConfigError as exc:\n    assert 'embedded' in str(exc), exc\n"
        "print(sorted(m for m in sys.modules"
        " if m.split('.')[:2] in (['edged', 'daemon'], ['edged', 'ingest'], ['edged', 'cli'])))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip() == "[]", out.stdout


# -- tests and benches --------------------------------------------------------------------


def _imported(tree: ast.AST) -> list[str]:
    """Every module an import in `tree` names, also `from pkg import module` and imports
    in code strings run as child processes (`python -c CODE`)."""
    found: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found += [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            with contextlib.suppress(SyntaxError):  # prose, not code
                found += _imported(ast.parse(node.value)) if "import " in node.value else []
    return found


def bad_imports(code: str, *, from_tests: bool) -> list[str]:
    """Modules `code` (from tests/ or bench/) may not import: a test module or conftest,
    and from tests also bench. A helper two files need belongs in tests/support/."""

    def bad(name: str) -> bool:
        parts = name.split(".")
        top, last = parts[0], parts[-1]
        test_module = top == "tests" and (last.startswith("test_") or last == "conftest")
        return test_module or (from_tests and top == "bench")

    return [name for name in _imported(ast.parse(code)) if bad(name)]


def test_no_test_module_imports_another_test_module_or_bench() -> None:
    bad = [
        f"{path.relative_to(REPO)} imports {name}"
        for top in ("tests", "bench")
        for path in sorted((REPO / top).rglob("*.py"))
        if path != Path(__file__).resolve()  # its own examples of what is refused
        for name in bad_imports(path.read_text(), from_tests=top == "tests")
    ]
    assert bad == []


def test_the_test_import_checker_sees_a_violation() -> None:
    """The rule is live: bench, a test module (also via `from tests import`), and one
    imported inside a child process's code string; support modules are fine."""
    code = (
        "import bench.common\n"
        "from tests import test_daemon\n"
        "CHILD = 'from tests.test_outbox import meta\\nprint(meta())'\n"
        "from tests.support.waiting import wait_for\n"
    )
    assert bad_imports(code, from_tests=True) == [
        "bench.common",
        "tests.test_daemon",
        "tests.test_outbox",
    ]
    assert bad_imports("import bench.common\n", from_tests=False) == []
