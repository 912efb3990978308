"""Finding finished results in an output folder. No torch: the studio's gallery lists them too.

A result is `<stem>.mp4` (or `.png` for a single frame) beside its `<stem>.json` recipe, written by
`pipelines.saving`; the recipe goes last, so a result without it is still being written (or was abandoned).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Collection

MEDIA_SUFFIXES = (".mp4", ".png")


@dataclass(frozen=True)
class ResultFiles:
    """One finished result: its media file and its JSON recipe."""

    media: Path
    recipe: Path


def list_results(out_dir: str | os.PathLike, limit: int = 50,
                 stems: Collection[str] | None = None) -> list[ResultFiles]:
    """Complete results (media and recipe) in out_dir, newest first; hidden, temporary and partial files are
    skipped. `stems`: only the results with these file stems (e.g. one session's own)."""
    if not isinstance(limit, int) or limit < 0:
        raise ValueError(f"limit must be a non-negative integer, got {limit!r}.")
    folder = Path(out_dir)
    if not folder.is_dir():
        return []
    with os.scandir(folder) as entries:
        names = {entry.name for entry in entries if entry.is_file() and not entry.name.startswith(".")}
    found = []
    for name in names:
        if not name.endswith(".json") or ".partial." in name:
            continue
        stem = name[: -len(".json")]
        if stems is not None and stem not in stems:
            continue
        media = next((stem + suffix for suffix in MEDIA_SUFFIXES if stem + suffix in names), None)
        if media is None:
            continue
        try:
            mtime = (folder / name).stat().st_mtime_ns
        except FileNotFoundError:  # deleted while we looked
            continue
        found.append((mtime, stem, ResultFiles(folder / media, folder / name)))
    found.sort(key=lambda item: (item[0], item[1]), reverse=True)
    return [item for _, _, item in found[:limit]]
