"""The committed generated code must be exactly what `make proto` makes from protos/."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from tests.support.paths import REPO


def _load_generator() -> object:
    spec = importlib.util.spec_from_file_location("generate", REPO / "protos" / "generate.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _tree(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): p.read_text()
        for p in sorted(root.rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts
    }


@pytest.mark.skipif(
    importlib.util.find_spec("grpc_tools") is None, reason="grpcio-tools (dev extra) missing"
)
def test_generated_code_matches_protos(tmp_path: Path) -> None:
    gen = _load_generator()
    gen.generate(tmp_path / "_proto")  # type: ignore[attr-defined]
    fresh, committed = _tree(tmp_path / "_proto"), _tree(REPO / "edged" / "_proto")
    assert sorted(fresh) == sorted(committed), "file set differs: run `make proto`"
    stale = [name for name in fresh if fresh[name] != committed[name]]
    assert not stale, f"generated code is stale for {stale}: run `make proto` and commit"


def test_product_never_imports_the_sdk() -> None:
    """The SDK's descriptors clash with ours in one process; interop runs it elsewhere."""
    import edged.cli
    import edged.client
    import edged.ingest  # noqa: F401

    assert not any(name == "viam" or name.startswith("viam.") for name in sys.modules)
    offenders = [
        str(p.relative_to(REPO))
        for p in (REPO / "edged").rglob("*.py")
        if any(
            line.strip().startswith(("import viam", "from viam"))
            for line in p.read_text().splitlines()
        )
    ]
    assert offenders == []
