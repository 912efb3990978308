"""Where checkpoint weights live: turn what a user typed into one local weights file (or index JSON).

Accepted: a weights file; a folder holding an HF index, ``model.safetensors`` or a training checkpoint's
``model/`` subfolder; ``hf://owner/repo/path`` Hub files (an index brings its shards), and bare
``owner/repo/path.safetensors`` when no such local path exists. Hub downloads honour ``HF_HUB_OFFLINE`` and
fail with the command that would fetch the file. Reading and assigning the tensors is ``pipelines.loading``'s.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)

INDEX_NAME = "model.safetensors.index.json"
SAFETENSORS_NAME = "model.safetensors"
TRAINING_MODEL_DIR = "model"  # training writes <ckpt_dir>/model/ (index + shards) beside ema.safetensors
HUB_SCHEME = "hf://"
TORCH_SUFFIXES = (".pt", ".pth", ".bin")
MAX_LISTED = 10


class CheckpointError(ValueError):
    """A checkpoint could not be found, read, or matched against a model."""


def locate_checkpoint(text: str, cache_dir: str | os.PathLike | None) -> Path:
    """Turn what the user typed into one local file: a weights file or an index JSON."""
    if text.startswith(HUB_SCHEME):
        return _fetch_from_hub(*_split_hub_reference(text[len(HUB_SCHEME):], text), cache_dir)
    local = Path(text).expanduser()
    if local.exists():
        return find_checkpoint_file(local)
    hub_reference = _guess_hub_reference(text)
    if hub_reference is None:
        raise CheckpointError(
            f"Checkpoint not found: '{local.resolve()}' does not exist. Check the path, or use "
            f"'{HUB_SCHEME}owner/repo/file.safetensors' for a file on the Hugging Face Hub."
        )
    logger.info("no local file at %s; treating '%s' as a Hub reference", local.resolve(), text)
    return _fetch_from_hub(*hub_reference, cache_dir, local_hint=local.resolve())


def _split_hub_reference(reference: str, original: str) -> tuple[str, str]:
    parts = [p for p in reference.split("/") if p]
    if len(parts) < 3:
        raise CheckpointError(
            f"Hub reference '{original}' needs a file inside the repository: "
            f"'{HUB_SCHEME}owner/repo/path/to/weights.safetensors'."
        )
    return "/".join(parts[:2]), "/".join(parts[2:])


def _guess_hub_reference(text: str) -> tuple[str, str] | None:
    """`owner/repo/file.safetensors` that is not a local path; None when it cannot be a Hub file."""
    parts = text.split("/")
    looks_relative = not text.startswith(("/", "~", ".")) and all(p and p not in (".", "..") for p in parts)
    known_suffix = text.endswith((".safetensors", ".index.json", *TORCH_SUFFIXES))
    if len(parts) >= 3 and looks_relative and known_suffix:
        return "/".join(parts[:2]), "/".join(parts[2:])
    return None


def _hub_is_offline() -> bool:
    # huggingface_hub reads HF_HUB_OFFLINE once at import; read it again so a later change still counts.
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _fetch_from_hub(repo_id: str, filename: str, cache_dir, local_hint: Path | None = None) -> Path:
    """Download (or find in the cache) one Hub file; an index JSON also brings its shards."""
    file = _download_hub_file(repo_id, filename, cache_dir, local_hint)
    if file.name.endswith(".index.json"):
        folder = filename.rsplit("/", 1)[0] + "/" if "/" in filename else ""
        for shard in sorted(set(read_weight_map(file).values())):
            # Shards land in the same snapshot folder as the index, so the local sharded reader finds them.
            _download_hub_file(repo_id, folder + shard, cache_dir, local_hint)
    return file


def _download_hub_file(repo_id: str, filename: str, cache_dir, local_hint: Path | None) -> Path:
    import huggingface_hub
    from huggingface_hub import errors as hub_errors

    offline = _hub_is_offline()
    try:
        return Path(huggingface_hub.hf_hub_download(repo_id, filename, cache_dir=cache_dir, local_files_only=offline))
    except hub_errors.HFValidationError as exc:
        raise CheckpointError(f"'{repo_id}' is not a valid Hugging Face repository id ({exc}).") from exc
    except (hub_errors.EntryNotFoundError, hub_errors.HfHubHTTPError, OSError) as exc:
        reason = "HF_HUB_OFFLINE is set" if offline else f"the download failed: {type(exc).__name__}: {exc}"
        also = f" There is no local file at '{local_hint}' either." if local_hint else ""
        cache_option = f" --cache-dir {cache_dir}" if cache_dir else ""
        raise CheckpointError(
            f"'{filename}' from Hub repo '{repo_id}' is not cached and cannot be fetched ({reason}).{also} "
            f"Download it while online with `hf download {repo_id} {filename}{cache_option}`, "
            "or point to a local file or folder instead."
        ) from exc


def find_checkpoint_file(path: Path) -> Path:
    """A file is used as is; a folder is searched for an index, model.safetensors, or a model/ subfolder."""
    if path.is_file():
        return path
    for candidate in (path / INDEX_NAME, path / SAFETENSORS_NAME):
        if candidate.is_file():
            return candidate
    indexes = sorted(path.glob("*.safetensors.index.json"))
    if len(indexes) == 1:
        return indexes[0]
    if (path / TRAINING_MODEL_DIR).is_dir():
        return find_checkpoint_file(path / TRAINING_MODEL_DIR)
    found = sorted(p.name for p in path.iterdir())[:MAX_LISTED]
    raise CheckpointError(
        f"No checkpoint found in folder '{path}': expected {INDEX_NAME}, {SAFETENSORS_NAME}, one "
        f"*.safetensors.index.json, or a '{TRAINING_MODEL_DIR}/' subfolder (found: {found or 'nothing'}). "
        "Point to the weights file itself, e.g. '<ckpt_dir>/ema.safetensors'."
    )


def read_weight_map(index_file: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(index_file.read_text(encoding="utf-8"))["weight_map"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
        raise CheckpointError(
            f"Index '{index_file}' is not a valid safetensors index: it needs a JSON object with a "
            f"'weight_map' of tensor name -> shard file ({type(exc).__name__}: {exc})."
        ) from exc
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"Index '{index_file}': 'weight_map' must map tensor names to shard file names.")
    return weight_map
