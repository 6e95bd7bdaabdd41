"""Atomic creation of files and directories: write under a hidden name, then rename.

A product is written under a hidden temporary name in its final directory,
``.<name>.tmp-<32 hex digits>``, and renamed into place only once it is complete. A rename within
one directory is atomic on POSIX file systems (local disks, Lustre, GPFS), so a reader sees
either the old product, the new one, or nothing, never a half-written one; a worker killed in
the middle of a write leaves only a hidden temporary, which :func:`cleanup_stale` removes.

Replacing an existing *directory* (a zarr store) takes two renames: the old one is moved aside
to ``.<name>.old-<hex>``, the new one is renamed in, then the old one is deleted. If the process
dies between the two renames, :func:`cleanup_stale` moves the old product back.

Examples
--------
>>> from daskdiff.io.atomic import atomic_path
>>> with atomic_path("out/difference.fits", overwrite=True) as tmp:  # doctest: +SKIP
...     write_something(tmp)
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from ..errors import InputError

__all__ = ["atomic_path", "cleanup_stale", "is_temporary", "remove_path", "temporary_name"]

_STALE = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-[0-9a-f]{32}$")


def temporary_name(final_path: str | os.PathLike[str], *, kind: str = "tmp") -> Path:
    """Return a fresh hidden sibling path ``.<name>.<kind>-<uuid>`` of ``final_path``.

    Parameters
    ----------
    final_path : path-like
        The path the product will finally have.
    kind : {"tmp", "old"}, optional
        ``"tmp"`` for a product being written, ``"old"`` for one being replaced.
    """
    final = Path(final_path)
    return final.parent / f".{final.name}.{kind}-{uuid.uuid4().hex}"


def is_temporary(path: str | os.PathLike[str]) -> bool:
    """Return whether ``path`` is named like a temporary of :func:`atomic_path`."""
    return _STALE.match(Path(path).name) is not None


def remove_path(path: str | os.PathLike[str]) -> None:
    """Remove a file, link or directory tree; a missing path is not an error."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


@contextlib.contextmanager
def atomic_path(final_path: str | os.PathLike[str], *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path to write a product to, and rename it to ``final_path`` on success.

    The temporary is a hidden sibling of ``final_path`` (same directory, so the rename is
    atomic). Write either a file or a directory there. When the block ends normally the
    product replaces ``final_path``; when it raises, the temporary is deleted and
    ``final_path`` is left as it was.

    Parameters
    ----------
    final_path : path-like
        Where the product must appear. Its parent directory is created if missing.
    overwrite : bool, optional
        Whether an existing product at ``final_path`` may be replaced.

    Yields
    ------
    pathlib.Path
        The temporary path (nothing exists there yet).

    Raises
    ------
    InputError
        If ``final_path`` exists and ``overwrite`` is false (checked before and after the
        write), or if the block wrote nothing at the temporary path.
    """
    final = Path(final_path)
    _refuse_existing(final, overwrite)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(final)
    try:
        yield tmp
        if not os.path.lexists(tmp):
            raise InputError(
                f"nothing was written to the temporary path {tmp} for {final}; the writer must "
                "create the file or directory it is given"
            )
        _refuse_existing(final, overwrite)
        _commit(tmp, final)
    except BaseException:
        remove_path(tmp)
        raise


def _refuse_existing(final: Path, overwrite: bool) -> None:
    if not overwrite and os.path.lexists(final):
        raise InputError(
            f"{final} already exists; pass overwrite=True to replace it, or choose another path"
        )


def _commit(tmp: Path, final: Path) -> None:
    """Move a finished temporary into place (the old product, if any, is replaced)."""
    replacing_dir = final.is_dir() and not final.is_symlink()
    if not replacing_dir:
        if tmp.is_dir() and os.path.lexists(final):
            # A directory cannot replace a file with one rename: remove the file first.
            final.unlink()
        os.replace(tmp, final)  # atomic, replaces an existing file
        return
    old = temporary_name(final, kind="old")
    os.replace(final, old)
    try:
        os.replace(tmp, final)
    except BaseException:
        os.replace(old, final)  # put the old product back
        raise
    remove_path(old)


def cleanup_stale(directory: str | os.PathLike[str], *, min_age: float = 0.0,
                  recursive: bool = False) -> list[Path]:
    """Remove temporaries left by interrupted :func:`atomic_path` writes.

    A leftover ``.<name>.tmp-<hex>`` is deleted. A leftover ``.<name>.old-<hex>`` (a writer
    died between moving the old product aside and moving the new one in) is moved back to
    ``<name>`` when nothing is there, and deleted otherwise.

    Parameters
    ----------
    directory : path-like
        The directory to clean.
    min_age : float, optional
        Only touch temporaries whose modification time is at least this many seconds old.
        The default (0) removes every temporary: use it when no writer is running (e.g. when a
        campaign starts or resumes); pass a margin when other writers may be active.
    recursive : bool, optional
        Also clean sub-directories (not the inside of the temporaries themselves).

    Returns
    -------
    list of pathlib.Path
        The temporaries that were removed or restored.

    Raises
    ------
    InputError
        If ``directory`` is not a directory.
    """
    root = Path(directory)
    if not root.is_dir():
        raise InputError(f"cannot clean {root}: it is not a directory")
    now = time.time()
    handled: list[Path] = []
    for entry in sorted(root.iterdir()):
        match = _STALE.match(entry.name)
        if match is None:
            if recursive and entry.is_dir() and not entry.is_symlink():
                handled.extend(cleanup_stale(entry, min_age=min_age, recursive=True))
            continue
        try:
            age = now - entry.lstat().st_mtime
        except FileNotFoundError:
            continue
        if age < min_age:
            continue
        target = root / match["name"]
        if match["kind"] == "old" and not os.path.lexists(target):
            os.replace(entry, target)
        else:
            remove_path(entry)
        handled.append(entry)
    return handled
