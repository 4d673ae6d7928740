"""docs/client.md is generated from the client's docstrings and must be up to date, and
it must cover every seed method."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

from tests.support.seed_signatures import SEED_SIGNATURES

GENERATOR = Path(__file__).resolve().parents[1] / "docs" / "gen_client_md.py"


def _generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_client_md", GENERATOR)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_client_md_is_generated_from_the_current_docstrings() -> None:
    gen = _generator()
    assert gen.OUT.read_text() == gen.render(), (
        "docs/client.md is stale: run .venv/bin/python docs/gen_client_md.py"
    )


def test_client_md_documents_every_seed_method() -> None:
    documented = {name for _, names in _generator().SECTIONS for name in names}
    assert set(SEED_SIGNATURES) <= documented
