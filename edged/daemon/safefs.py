"""Open, stat, move and delete robot files without ever following a symlink below a root.

Writers of watched directories are not trusted. Between the moment a file is queued and
the moment it is read, moved or deleted, the file or any directory above it (below the
configured root) may be swapped for a symlink to something outside. So every access
here starts from the root (opened normally: it comes from the config) and walks one
component at a time with `O_NOFOLLOW` (plus `O_DIRECTORY` for directories) through
directory fds; a link anywhere on the way fails the walk. The file found is then compared
with the (device, inode) recorded when it was queued, and a delete or move acts on the
name inside the pinned parent directory fd, which never follows the last component.

What is promised: nothing outside `root` is ever opened, moved or deleted through a path
handed to these functions. What is not: the root itself and the directories above it
are trusted (they are the operator's), and a file that is hard-linked into the tree is
a regular file like any other.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path, PurePath
from typing import NamedTuple

from edged.errors import SourceError

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: opening a FIFO someone put in place of a file must not hang a worker.
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_SWAP_ERRNOS = (errno.ELOOP, errno.ENOTDIR)


class Identity(NamedTuple):
    """Which file a path named when it was queued: (device, inode)."""

    dev: int
    ino: int

    @classmethod
    def of(cls, st: os.stat_result) -> Identity:
        return cls(st.st_dev, st.st_ino)


class Swapped(SourceError):
    """A path no longer leads to the file that was queued (a symlink, a directory, or
    another file took its place); nothing is read from or done to what it leads to."""


def locate(path: str, root: str | None) -> tuple[str, str]:
    """(root, path relative to it) for a stored path. Rows queued before roots were
    recorded have none: their parent directory then stands in for the root, so at least
    the file itself is never reached through a link."""
    if root is None:
        return os.path.dirname(path) or "/", os.path.basename(path)
    return root, PurePath(path).relative_to(root).as_posix()


def _parts(rel: str | PurePath) -> list[str]:
    parts = [p for p in PurePath(rel).parts if p != "."]
    if not parts or ".." in parts or PurePath(rel).is_absolute():
        raise ValueError(f"{rel!s} is not a path below a root")
    return parts


def _swapped(root: str | PurePath, rel: str | PurePath, why: str) -> Swapped:
    return Swapped(f"{PurePath(root, rel)} {why}; not following it")


@contextlib.contextmanager
def _parent(root: str | PurePath, rel: str | PurePath) -> Iterator[tuple[int, str]]:
    """(fd of the directory holding `rel`, the last component); walked without links."""
    parts = _parts(rel)
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for name in parts[:-1]:
            try:
                nxt = os.open(name, _DIR_FLAGS, dir_fd=fd)
            except OSError as exc:
                if exc.errno in _SWAP_ERRNOS:
                    why = f"has a symlink or non-directory at {name!r}"
                    raise _swapped(root, rel, why) from exc
                raise
            os.close(fd)
            fd = nxt
        yield fd, parts[-1]
    finally:
        os.close(fd)


def _check(
    root: str | PurePath, rel: str | PurePath, st: os.stat_result, expect: Identity | None
) -> None:
    if stat.S_ISLNK(st.st_mode):
        raise _swapped(root, rel, "is now a symlink")
    if not stat.S_ISREG(st.st_mode):
        raise _swapped(root, rel, "is no longer a regular file")
    if expect is not None and Identity.of(st) != expect:
        raise _swapped(root, rel, "is another file than the one queued (its inode changed)")


def stat_under(root: str | PurePath, rel: str | PurePath) -> os.stat_result:
    """lstat of `root/rel`, reached without following a link (the entry may be one)."""
    with _parent(root, rel) as (dfd, name):
        return os.stat(name, dir_fd=dfd, follow_symlinks=False)


def open_under(root: str | PurePath, rel: str | PurePath, expect: Identity | None = None) -> int:
    """A read-only fd of the regular file `root/rel`; Swapped if a link is on the way,
    it is not a regular file, or it is not `expect`. The caller closes the fd."""
    with _parent(root, rel) as (dfd, name):
        try:
            fd = os.open(name, _FILE_FLAGS, dir_fd=dfd)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise _swapped(root, rel, "is now a symlink") from exc
            raise
    try:
        _check(root, rel, os.fstat(fd), expect)
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def unlink_under(root: str | PurePath, rel: str | PurePath, expect: Identity | None = None) -> bool:
    """Delete the regular file `root/rel` if it is still `expect`; False if it is gone.
    The name is removed from the pinned parent fd, so only the entry itself can go:
    should it be swapped between the check and the unlink, a link is removed, never
    what it points to."""
    with _parent(root, rel) as (dfd, name):
        try:
            st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
        except FileNotFoundError:
            return False
        _check(root, rel, st, expect)
        try:
            os.unlink(name, dir_fd=dfd)
        except FileNotFoundError:
            return False
        return True


def copy_out(
    root: str | PurePath, rel: str | PurePath, target: Path, expect: Identity | None = None
) -> Identity:
    """Copy the regular file `root/rel` to a new file `target` (outside the tree);
    returns the identity of the file copied."""
    src = open_under(root, rel, expect)
    with os.fdopen(src, "rb") as fin:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "wb") as fout:
            shutil.copyfileobj(fin, fout)
            fout.flush()
            st = os.fstat(fin.fileno())
            os.utime(fout.fileno(), ns=(st.st_atime_ns, st.st_mtime_ns))
            os.fsync(fout.fileno())
        return Identity.of(st)


def move_out(
    root: str | PurePath, rel: str | PurePath, target: Path, expect: Identity | None = None
) -> None:
    """Move the regular file `root/rel` to `target` (e.g. quarantine): a rename from the
    pinned parent fd, or on another filesystem a copy from a checked fd and an unlink."""
    with _parent(root, rel) as (dfd, name):
        _check(root, rel, os.stat(name, dir_fd=dfd, follow_symlinks=False), expect)
        try:
            os.rename(name, target, src_dir_fd=dfd)
            return
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
    unlink_under(root, rel, copy_out(root, rel, target, expect))
