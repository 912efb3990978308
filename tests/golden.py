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
