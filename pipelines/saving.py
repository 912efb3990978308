"""Saving results: a unique file name per job, the media file, and a JSON recipe beside it (never with secrets).

A result is the pair `<stem>.mp4` (or `<stem>.png` for one frame) and `<stem>.json`, where the stem is
`<YYYYmmdd-HHMMSS>_<mode>_s<seed>[_<name>]`. Stems are reserved with an exclusive lock file, so two jobs finishing
in the same second never share a name; everything is written through hidden temp files, so the history gallery
only ever sees complete pairs.
"""

from __future__ import annotations

import dataclasses
import enum
import errno
import json
import logging
import os
import re
import secrets
import shutil
import unicodedata
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import torch

from pipelines.atomic_io import write_atomically
from pipelines.media import write_png, write_video

logger = logging.getLogger(__name__)

_LOCK_SUFFIX = ".lock"
_MAX_NAME_BYTES = 120  # a stem plus this stays well under the 255-byte file-name limit of common filesystems
_MAX_COMMENT_CHARS = 4096
_WINDOWS_RESERVED = {"CON", "PRN", "AUX", "NUL"} | {
    f"{prefix}{digit}" for prefix in ("COM", "LPT") for digit in "0123456789¹²³"
}
# Keys dropped from recipes: api_key, openai_api_key, key, token, access_token, secret, password, authorization...
# "max_tokens" or "keyframes" stay: only a whole word at the end of the key counts.
_SECRET_KEY = re.compile(r"(^|_)(api_?key|key|token|secret|password|passwd|authorization|auth|bearer|credentials?)$")
_SECRET_VALUE = re.compile(r"^(sk-[A-Za-z0-9_-]{16,}|Bearer\s+\S+)$")
_SAVE_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT}
_MODE_PATTERN = re.compile(r"^[A-Za-z0-9_-]+$")


class SaveError(OSError):
    """The result could not be written where asked (permissions, read-only or full disk); the message says why."""


@dataclass(frozen=True)
class SavedResult:
    """One finished result: its media file and its JSON recipe."""

    video_path: Path
    recipe_path: Path


def sanitize_name(text: str, max_len: int = 60) -> str:
    """A file-name-safe version of a prompt: letters, digits, '-' and '_' only; 'untitled' when nothing is left."""
    if max_len < 1:
        raise ValueError(f"max_len must be at least 1, got {max_len}.")
    text = unicodedata.normalize("NFC", str(text))
    # Letters, marks (accents, Indic vowel signs) and digits of any script survive; everything else is a separator.
    kept = "".join(ch if unicodedata.category(ch)[0] in "LMN" or ch in "-_" else " " for ch in text)
    name = re.sub(r"_+", "_", "_".join(kept.split()))[:max_len]
    while len(name.encode("utf-8")) > _MAX_NAME_BYTES:
        name = name[:-1]
    name = name.strip("._- ")
    if not name:
        return "untitled"
    if name.upper() in _WINDOWS_RESERVED:
        name = f"{name}_"  # CON is unusable on Windows, CON_ is fine
    return name


def unique_output_stem(
    out_dir: str | os.PathLike, mode: str, seed: int, name: str | None = None, now: datetime | None = None
) -> Path:
    """Reserve `out_dir/<YYYYmmdd-HHMMSS>_<mode>_s<seed>[_<name>][-N]`; free it with release_output_stem."""
    if not _MODE_PATTERN.match(str(mode)):
        raise ValueError(f"mode must be letters, digits, '-' or '_', got {mode!r}.")
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}.")
    out_dir = Path(out_dir)
    base = f"{(now or datetime.now()):%Y%m%d-%H%M%S}_{mode}_s{seed}"
    if name:
        base = f"{base}_{sanitize_name(name)}"
    for index in range(1, 10_000):
        stem = base if index == 1 else f"{base}-{index}"
        if _stem_taken(out_dir, stem):
            continue
        lock = out_dir / f".{stem}{_LOCK_SUFFIX}"
        try:
            # O_EXCL makes the reservation atomic: of two jobs racing for one stem, exactly one wins.
            os.close(os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
        except FileExistsError:
            continue
        # A job that reserved this stem may have finished and released it between our check and our lock.
        if _stem_taken(out_dir, stem, ignore_lock=True):
            lock.unlink(missing_ok=True)
            continue
        return out_dir / stem
    raise SaveError(f"could not find a free file name for {base} in {out_dir}.")


def release_output_stem(stem: Path) -> None:
    """Drop the reservation made by unique_output_stem (the saved files now keep the name taken)."""
    (stem.parent / f".{stem.name}{_LOCK_SUFFIX}").unlink(missing_ok=True)


def _release_quietly(stem: Path) -> None:
    """Release a reservation without masking the error that may be on its way out."""
    try:
        release_output_stem(stem)
    except OSError as exc:
        logger.warning("could not remove the name reservation for %s: %s", stem, exc)


def _stem_taken(out_dir: Path, stem: str, ignore_lock: bool = False) -> bool:
    """True when any file, visible or hidden temp, already uses this stem."""
    lock = f".{stem}{_LOCK_SUFFIX}"
    with os.scandir(out_dir) as entries:
        for entry in entries:
            if entry.name.startswith((f"{stem}.", f".{stem}.")) and not (ignore_lock and entry.name == lock):
                return True
    return False


def redact_secrets(obj):
    """A copy of a JSON-like object without keys that name secrets (api_key, token, authorization...) at any depth."""
    if isinstance(obj, dict):
        return {
            key: redact_secrets(value)
            for key, value in obj.items()
            if not _SECRET_KEY.search(str(key).lower().replace("-", "_"))
        }
    if isinstance(obj, (list, tuple)):
        return [redact_secrets(item) for item in obj]
    if isinstance(obj, str) and _SECRET_VALUE.match(obj.strip()):
        return "<redacted>"  # a key pasted under an innocent name, e.g. into a prompt field
    return obj


def write_json_atomic(obj, path: str | os.PathLike) -> Path:
    """Write JSON through a hidden temp file and fsync; raise FileExistsError instead of overwriting."""
    path = Path(path)
    if path.exists():
        raise FileExistsError(errno.EEXIST, "refusing to overwrite an existing file", str(path))
    text = json.dumps(obj, indent=2, ensure_ascii=False, allow_nan=False, default=_json_default) + "\n"
    tmp = path.parent / f".{path.stem}.{secrets.token_hex(4)}.partial.json"
    try:
        with open(tmp, "x", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        _link_without_overwrite(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _link_without_overwrite(tmp: Path, path: Path) -> None:
    """Move tmp to path atomically unless path exists (a hard link fails on an existing target; rename would not)."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK, errno.ENOSYS, errno.EXDEV):
            raise
        # Filesystems without hard links (FAT, some network mounts): check, then rename.
        if path.exists():
            raise FileExistsError(errno.EEXIST, "refusing to overwrite an existing file", str(path)) from exc
        os.replace(tmp, path)


def _json_default(value):
    """JSON fallback for the types recipes carry: paths, enums, dataclasses, torch dtypes and devices."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, enum.Enum):
        return value.value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, (torch.dtype, torch.device)):
        return str(value)
    if hasattr(value, "item") and callable(value.item):  # numpy and torch scalars
        return value.item()
    raise TypeError(f"cannot store a {type(value).__name__} in a recipe.")


def save_result(
    frames: torch.Tensor,
    out_dir: str | os.PathLike,
    recipe: dict,
    fps: float,
    mode: str,
    seed: int,
    name: str | None = None,
    references: tuple[str | os.PathLike, ...] = (),
    embed_recipe: bool = True,
) -> SavedResult:
    """Save (3, T, H, W) frames in [-1, 1] as `<stem>.mp4` (`.png` when T == 1) plus a redacted `<stem>.json`.

    `references` (the images or clip the run was conditioned on) are copied beside it as `<stem>.ref<i><suffix>`
    and named in the recipe's `references_saved`, so the result can be made again after the upload cache is
    cleared. `embed_recipe=False` leaves the recipe out of the file's own comment tag (the JSON beside it stays:
    the history needs it)."""
    if frames.ndim != 4:
        raise ValueError(f"expected (3, T, H, W) frames, got shape {tuple(frames.shape)}.")
    # Round-trip through JSON first: dataclasses become dicts, so their secret fields are redacted too.
    clean = redact_secrets(json.loads(json.dumps(recipe, allow_nan=False, default=_json_default)))
    out_dir = Path(out_dir)
    written: list[Path] = []
    stem = None
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        stem = unique_output_stem(out_dir, mode, seed, name=name)
        media_path = stem.with_name(stem.name + (".png" if frames.shape[1] == 1 else ".mp4"))
        recipe_path = stem.with_name(stem.name + ".json")
        copies = _copy_references(references, stem)
        written.extend(copies)
        if copies:
            clean["references_saved"] = [copy.name for copy in copies]
        comment = _recipe_comment(clean, recipe_path.name) if embed_recipe else None
        if frames.shape[1] == 1:
            written.append(write_png(frames, media_path, metadata={"Comment": comment} if comment else None))
        else:
            written.append(write_video(frames, media_path, fps, metadata={"comment": comment} if comment else None))
        # The JSON goes last: its presence is what makes a result complete (pipelines.results.list_results).
        written.append(write_json_atomic(clean, recipe_path))
    except OSError as exc:
        for path in written:
            path.unlink(missing_ok=True)  # no half result (a video without its recipe) stays visible
        if exc.errno in _SAVE_ERRNOS and not isinstance(exc, SaveError):
            error = SaveError(_explain_save_error(exc, out_dir))
            error.errno = exc.errno
            raise error from exc
        raise
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise
    finally:
        if stem is not None:
            _release_quietly(stem)
    logger.info("saved %s", written[-2])
    return SavedResult(video_path=written[-2], recipe_path=written[-1])


def _copy_references(references, stem: Path) -> list[Path]:
    """Copy each reference beside the result as `<stem>.ref<i><suffix>` (a hard link when it already lies in the
    output folder, e.g. a result sent to Extend). Best effort: a reference that cannot be copied is logged and
    left out, never a reason to lose the finished video."""
    copies = []
    for i, ref in enumerate(r for r in references if r):
        source = Path(ref)
        suffix = source.suffix.lower() if re.fullmatch(r"\.[a-z0-9]{1,8}", source.suffix.lower()) else ""
        copy = stem.with_name(f"{stem.name}.ref{i}{suffix}")
        try:
            if source.parent.resolve() == stem.parent.resolve():
                os.link(source, copy)
            else:
                write_atomically(copy, f".partial{suffix}", lambda tmp, src=source: shutil.copyfile(src, tmp))
        except OSError as exc:
            logger.warning("reference %s not kept beside the result: %s", source.name, exc)
            continue
        copies.append(copy)
    return copies


def _recipe_comment(recipe: dict, recipe_name: str) -> str:
    """The compact recipe for the file's comment tag, or a pointer to the sidecar when it is too long."""
    text = json.dumps(recipe, separators=(",", ":"), ensure_ascii=False)
    return text if len(text) <= _MAX_COMMENT_CHARS else f"recipe: {recipe_name}"


def _explain_save_error(exc: OSError, out_dir: Path) -> str:
    """A one-line, user-facing reason for a failed save."""
    reasons = {
        errno.ENOSPC: "the disk is full",
        errno.EDQUOT: "the disk quota is exhausted",
        errno.EROFS: "the folder is on a read-only filesystem",
    }
    reason = reasons.get(exc.errno, "permission denied")
    return f"Cannot save to {out_dir}: {reason}. Choose another output folder."
