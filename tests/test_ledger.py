"""The ledger: claim transitions as a table, typed claims, and the one robot-file delete."""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest

from edged.daemon import outbox as outbox_module
from edged.daemon.ledger import (
    ClaimRecord,
    ClaimState,
    Retired,
    claim_after_retire,
    claim_on_enqueue,
    claim_on_finish,
    retire_file,
)
from edged.daemon.outbox import Claim, Outbox, Progress
from edged.daemon.safefs import Identity

PKG = Path(__file__).resolve().parents[1] / "edged"


@pytest.mark.parametrize(
    ("by_reference", "more", "state"),
    [
        (False, False, ClaimState.COMMITTED),
        (True, False, ClaimState.PENDING),
        (True, True, ClaimState.COMMITTING),
    ],
)
def test_claim_on_enqueue(by_reference: bool, more: bool, state: ClaimState) -> None:
    assert claim_on_enqueue(by_reference=by_reference, more=more) is state


@pytest.mark.parametrize(
    ("before", "after"),
    [
        (ClaimState.COMMITTING, ClaimState.PENDING),
        (ClaimState.PENDING, ClaimState.PENDING),
        (ClaimState.COMMITTED, ClaimState.COMMITTED),
        (ClaimState.DONE, ClaimState.DONE),
    ],
)
def test_claim_on_finish(before: ClaimState, after: ClaimState) -> None:
    assert claim_on_finish(before) is after


@pytest.mark.parametrize(
    ("outcome", "after"),
    [
        (Retired.DELETED, None),
        (Retired.GONE, None),
        (Retired.CHANGED, None),  # a new version: its source may queue it
        (Retired.KEPT, ClaimState.DONE),  # delete_after=False: never send it again
        (Retired.REFUSED, ClaimState.DONE),  # a link in its place: never touched, not resent
    ],
)
def test_claim_after_retire(outcome: Retired, after: ClaimState | None) -> None:
    assert claim_after_retire(outcome) is after


def test_claim_record_decisions() -> None:
    done = ClaimRecord("/d/f", ClaimState.DONE, 10, 5)
    assert not done.send_again(10, 5) and done.send_again(11, 5) and done.send_again(10, 6)
    assert not ClaimRecord("/d/f", ClaimState.PENDING, 10, 5).send_again(11, 5)
    assert ClaimRecord("/d/f", ClaimState.COMMITTING, 1, 1).referenced
    assert not ClaimRecord("/d/f", ClaimState.COMMITTED, 1, 1).referenced


def test_retire_file_deletes_only_the_file_that_was_queued(tmp_path: Path) -> None:
    f = tmp_path / "a.capture"
    f.write_bytes(b"x" * 10)
    st = f.stat()
    me = Identity.of(st)
    assert retire_file(str(f), str(tmp_path), Identity(me.dev, me.ino + 1)) is Retired.CHANGED
    assert f.exists()
    assert retire_file(str(f), str(tmp_path), me, size=11, mtime_ns=st.st_mtime_ns) is (
        Retired.CHANGED
    )
    assert retire_file(str(f), str(tmp_path), me, delete=False) is Retired.KEPT
    assert f.exists()
    outside = tmp_path / "outside"
    outside.write_bytes(b"keep")
    link = tmp_path / "link.capture"
    link.symlink_to(outside)
    assert retire_file(str(link), str(tmp_path), None) is Retired.REFUSED
    assert outside.exists() and link.is_symlink()
    assert retire_file(str(f), str(tmp_path), me) is Retired.DELETED
    assert not f.exists()
    assert retire_file(str(f), str(tmp_path), me) is Retired.GONE


def _deleters(path: Path) -> list[str]:
    """Calls of `unlink_under` (the robot-file delete) made in `path`."""
    tree = ast.parse(path.read_text(), str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            fn = node.func
            name = fn.attr if isinstance(fn, ast.Attribute) else getattr(fn, "id", "")
            if name == "unlink_under":
                found.append(name)
    return found


def test_only_the_ledger_deletes_robot_files() -> None:
    """One place owns "commit before delete": no source or outbox code unlinks a
    watched file itself (safefs is the mechanism, the ledger the only caller)."""
    callers = {
        str(p.relative_to(PKG)) for p in PKG.rglob("*.py") if _deleters(p) and p.name != "safefs.py"
    }
    assert callers == {os.path.join("daemon", "ledger.py")}


async def test_retiring_a_capture_forgets_its_claim_and_both_offsets(tmp_path: Path) -> None:
    root = tmp_path / "cap"
    root.mkdir()
    f = root / "a.capture"
    f.write_bytes(b"x" * 10)
    st = f.stat()
    box = await Outbox.open(tmp_path / "state")
    try:
        prog = str(f.with_suffix(".prog"))
        await box.save_progress(Progress("cap", prog, st.st_ino, 4, 0))
        await box.enqueue_readings(
            b"m",
            [b"r"],
            claim=Claim(str(f), st.st_size, st.st_mtime_ns, root=str(root)),
            progress=Progress("cap", str(f), st.st_ino, 10, 0),
        )
        record = await box.claim_of(str(f))
        assert record is not None and record.state is ClaimState.COMMITTED
        outcome = await box.retire_committed(
            str(f), str(root), Identity.of(st), source="cap", also=[prog]
        )
        assert outcome is Retired.DELETED and not f.exists()
        assert await box.claim_of(str(f)) is None
        assert await box.progress_of("cap", str(f)) is None
        assert await box.progress_of("cap", prog) is None
    finally:
        await box.close()


async def test_the_tidy_up_after_a_retire_rides_in_the_next_transaction(tmp_path: Path) -> None:
    """Forgetting a retired file's claim costs no commit of its own: reads see it at once,
    the next write (or close) stores it, and if it is lost (a crash) `recover` sweeps the
    committed claim of a file that is gone."""
    root = tmp_path / "cap"
    root.mkdir()
    state = tmp_path / "state"
    box = await Outbox.open(state)
    try:
        for name in ("a", "b"):
            f = root / f"{name}.capture"
            f.write_bytes(b"x")
            st = f.stat()
            claim = Claim(str(f), st.st_size, st.st_mtime_ns, root=str(root))
            await box.enqueue_readings(
                b"m", [b"r"], claim=claim, progress=Progress("cap", str(f), st.st_ino, 1, 0)
            )
            await box.retire_committed(str(f), str(root), Identity.of(st), source="cap")
            assert await box.claim_of(str(f)) is None
            assert await box.progress_of("cap", str(f)) is None
        box._tidy.clear()  # as if the process died before its next write: b's is lost
    finally:
        await box.close()
    box = await Outbox.open(state)
    try:
        a, b = str(root / "a.capture"), str(root / "b.capture")
        assert await box.claim_of(a) is None  # written by b's transaction
        record = await box.claim_of(b)
        assert record is not None and record.state is ClaimState.COMMITTED
        # A committed claim below a root that is not there (an unmounted card) is kept.
        elsewhere = tmp_path / "unmounted" / "c.capture"
        await box.enqueue_readings(
            b"m", [], claim=Claim(str(elsewhere), 1, 1, root=str(elsewhere.parent))
        )
        assert (await box.recover())["claims_swept"] == 1
        assert await box.claim_of(b) is None and await box.progress_of("cap", b) is None
        assert await box.claim_of(str(elsewhere)) is not None
    finally:
        await box.close()


async def test_waiting_tidy_ups_are_bounded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(outbox_module, "TIDY_MAX", 3)
    box = await Outbox.open(tmp_path / "state")
    try:
        for n in range(3):
            f = tmp_path / f"{n}.capture"
            f.write_bytes(b"x")
            st = f.stat()
            await box.retire_committed(str(f), str(tmp_path), Identity.of(st), source="cap")
            assert len(box._tidy) == (n + 1) % 3  # the third is written at once, with all
    finally:
        await box.close()
