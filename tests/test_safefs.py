"""`edged.safefs` on real files: links anywhere below the root are refused, identities
are checked, deletes and moves act on the entry and never on what a link points to; and
an outbox written before identities were recorded keeps working."""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from edged.daemon.outbox import ADDED_COLUMNS, ADDED_INDEXES, KIND_FILE, Claim, FileRef, Outbox
from edged.daemon.safefs import (
    Identity,
    Swapped,
    copy_out,
    locate,
    move_out,
    open_under,
    stat_under,
    unlink_under,
)


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """root/sub/f (inside) and outside/f, outside/sub/f (what links lead to)."""
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "f").write_bytes(b"inside")
    (tmp_path / "outside" / "sub").mkdir(parents=True)
    (tmp_path / "outside" / "f").write_bytes(b"outside")
    (tmp_path / "outside" / "sub" / "f").write_bytes(b"outside")
    return root


def ident(path: Path) -> Identity:
    return Identity.of(path.lstat())


def read(fd: int) -> bytes:
    with os.fdopen(fd, "rb") as f:
        return f.read()


def test_reads_and_deletes_a_plain_file(tree: Path) -> None:
    me = ident(tree / "sub" / "f")
    assert read(open_under(tree, "sub/f", me)) == b"inside"
    assert stat_under(tree, "sub/f").st_ino == me.ino
    assert unlink_under(tree, "sub/f", me) is True
    assert unlink_under(tree, "sub/f", me) is False  # gone already
    assert not (tree / "sub" / "f").exists()


def _file_link(tree: Path) -> None:
    (tree / "sub" / "f").unlink()
    (tree / "sub" / "f").symlink_to(tree.parent / "outside" / "f")


def _dir_link(tree: Path) -> None:
    (tree / "sub").rename(tree / "sub.moved")
    (tree / "sub").symlink_to(tree.parent / "outside" / "sub", target_is_directory=True)


def _other_file(tree: Path) -> None:
    (tree / "sub" / "g").write_bytes(b"other")
    os.replace(tree / "sub" / "g", tree / "sub" / "f")


def _fifo(tree: Path) -> None:
    (tree / "sub" / "f").unlink()
    os.mkfifo(tree / "sub" / "f")


@pytest.mark.parametrize("swap", [_file_link, _dir_link, _other_file, _fifo])
@pytest.mark.parametrize(
    "act",
    [
        lambda root, me: open_under(root, "sub/f", me),
        lambda root, me: unlink_under(root, "sub/f", me),
        lambda root, me: move_out(root, "sub/f", root.parent / "q", me),
        lambda root, me: copy_out(root, "sub/f", root.parent / "q", me),
    ],
    ids=["open", "unlink", "move", "copy"],
)
def test_swapped_paths_are_refused_and_nothing_outside_changes(
    tree: Path, swap: Callable[[Path], None], act: Callable[[Path, Identity], Any]
) -> None:
    me = ident(tree / "sub" / "f")
    swap(tree)
    with pytest.raises(Swapped, match=r"sub/f "):
        act(tree, me)
    assert (tree.parent / "outside" / "f").read_bytes() == b"outside"
    assert (tree.parent / "outside" / "sub" / "f").read_bytes() == b"outside"
    assert not (tree.parent / "q").exists()
    assert os.path.lexists(tree / "sub" / "f")  # the swapped entry itself is left alone


def test_without_identity_a_link_is_still_refused(tree: Path) -> None:
    _file_link(tree)
    assert stat_under(tree, "sub/f").st_mode & 0o170000 == 0o120000  # the link, not its target
    with pytest.raises(Swapped, match="is now a symlink"):
        open_under(tree, "sub/f")
    with pytest.raises(Swapped):
        unlink_under(tree, "sub/f")


@pytest.mark.parametrize("rel", ["../outside/f", "/etc/passwd", "", "sub/../../outside/f"])
def test_paths_that_leave_the_root_are_refused(tree: Path, rel: str) -> None:
    with pytest.raises(ValueError, match="not a path below a root"):
        open_under(tree, rel)


def test_move_and_copy_out(tree: Path) -> None:
    me = ident(tree / "sub" / "f")
    copy_out(tree, "sub/f", tree.parent / "copy", me)
    move_out(tree, "sub/f", tree.parent / "moved", me)
    assert (tree.parent / "copy").read_bytes() == (tree.parent / "moved").read_bytes() == b"inside"
    assert not (tree / "sub" / "f").exists()


def test_locate() -> None:
    assert locate("/r/a/b", "/r") == ("/r", "a/b")
    assert locate("/r/a/b", None) == ("/r/a", "b")  # rows from before roots were stored


async def test_outbox_from_before_identities_gains_columns_and_keeps_working(
    tmp_path: Path,
) -> None:
    """An outbox file without the identity columns (an older edged) opens, its old file
    reference is still deleted after the ack, and new references record root and
    identity."""
    state = tmp_path / "state"
    box = await Outbox.open(state)
    await box.close()
    db = sqlite3.connect(state / "outbox.sqlite3")
    for index in ADDED_INDEXES:  # an indexed column cannot be dropped
        db.execute(f"DROP INDEX {index.split()[5]}")
    for table, column, _ in ADDED_COLUMNS:
        db.execute(f"ALTER TABLE {table} DROP COLUMN {column}")
    db.commit()
    db.close()
    old = tmp_path / "old.bin"
    old.write_bytes(b"o" * 10)
    db = sqlite3.connect(state / "outbox.sqlite3")
    db.execute("INSERT INTO meta(digest, metadata) VALUES (x'00', x'')")
    db.execute(
        "INSERT INTO items(uid, kind, meta_id, path, offset, length, count, bytes, enqueued_at)"
        " VALUES ('u1', 'file', 1, ?, 0, 10, 1, 10, 0)",
        (str(old),),
    )
    db.execute(
        "INSERT INTO claims(path, size, mtime_ns, state, delete_after) VALUES (?,?,?,?,1)",
        (str(old), 10, old.stat().st_mtime_ns, "pending"),
    )
    db.commit()
    db.close()
    box = await Outbox.open(state)
    try:
        item = await box.lease(lease_s=60, max_readings=10, max_bytes=1 << 20)
        assert item is not None and (item.root, item.ident) == (None, None)
        await box.ack(item)
        assert not old.exists()
        new = tmp_path / "root" / "new.bin"
        new.parent.mkdir()
        new.write_bytes(b"n" * 10)
        me = ident(new)
        root = str(new.parent)
        await box.enqueue_item(
            KIND_FILE,
            b"m",
            FileRef(str(new), 0, 10, root, me),
            claim=Claim(str(new), 10, new.stat().st_mtime_ns, True, root, me),
        )
        item = await box.lease(lease_s=60, max_readings=10, max_bytes=1 << 20)
        assert item is not None and (item.root, item.ident) == (root, me)
    finally:
        await box.close()
