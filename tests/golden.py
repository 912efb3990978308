"""Where the upstream golden files live (../shared/reference/golden beside the project root, or
$OPENSORA_GOLDEN_DIR). Tests that need a file skip, with its path, when it is not there."""

import json
import os
from pathlib import Path

import pytest

GOLDEN_DIR = Path(os.environ.get("OPENSORA_GOLDEN_DIR")
                  or Path(__file__).resolve().parents[2] / "shared" / "reference" / "golden")


def golden_file(name: str) -> Path:
    """The golden file's path; skips the calling test when it is missing."""
    path = GOLDEN_DIR / name
    if not path.exists():
        pytest.skip(f"golden file {path} is not available")
    return path


def load_golden_json(name: str):
    return json.loads(golden_file(name).read_text())


def golden_cases(name: str, *keys: str) -> list:
    """Cases inside a golden JSON file for `parametrize` (at collection time, where skipping is not allowed): an
    empty list, which pytest reports as skipped, when the file is missing."""
    path = GOLDEN_DIR / name
    if not path.exists():
        return []
    data = json.loads(path.read_text())
    for key in keys:
        data = data[key]
    return data


def read_manifest(name: str) -> list[tuple[str, tuple[int, ...]]]:
    """A key manifest (`key<TAB>AxBxC` rows, `#` comments) as (key, shape) pairs in file order."""
    lines = golden_file(name).read_text().splitlines()
    rows = [line.split("\t") for line in lines if line and not line.startswith("#")]
    return [(key, tuple(int(s) for s in shape.split("x"))) for key, shape in rows]
