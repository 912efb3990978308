"""Durable, atomic file writes: hidden temp file -> fsync -> rename, shared by media, recipes and checkpoints."""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path


def fsync_file(path: Path) -> None:
    """Flush one file's data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Flush a folder's entries (new names, renames); best effort, as some filesystems refuse to open folders."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def create_hidden_temp(folder: Path, stem: str, suffix: str) -> Path:
    """Exclusively create `.<stem>.<random><suffix>` (hidden from galleries; the umask applies, unlike mkstemp)."""
    while True:
        candidate = folder / f".{stem}.{secrets.token_hex(4)}{suffix}"
        try:
            os.close(os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return candidate
        except FileExistsError:
            continue


def write_atomically(path: Path, suffix: str, encode: Callable[[Path], None]) -> Path:
    """Run `encode(tmp)` on a hidden temp file beside `path`, fsync it, then rename it into place.

    Readers see either nothing or the whole file; on any error the temp file is removed and the error re-raised.
    """
    folder = path.parent
    tmp_path = create_hidden_temp(folder, path.stem, suffix)
    try:
        encode(tmp_path)
        fsync_file(tmp_path)
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    fsync_dir(folder)
    return path
