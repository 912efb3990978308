"""Where the upstream golden files live (../shared/reference/golden beside the project root)."""

import json
from pathlib import Path

import pytest

GOLDEN_DIR = Path(__file__).resolve().parents[2] / "shared" / "reference" / "golden"


def load_golden_json(name: str):
    path = GOLDEN_DIR / name
    if not path.exists():
        pytest.skip(f"golden file {path} is not available")
    return json.loads(path.read_text())


def read_manifest(name: str) -> list[tuple[str, tuple[int, ...]]]:
    """A key manifest (`key<TAB>AxBxC` rows, `#` comments) as (key, shape) pairs in file order."""
    lines = (GOLDEN_DIR / name).read_text().splitlines()
    rows = [line.split("\t") for line in lines if line and not line.startswith("#")]
    return [(key, tuple(int(s) for s in shape.split("x"))) for key, shape in rows]
