"""app.py as users start it: flags are documented and unknown arguments (reload mode, Spaces) are tolerated."""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_app_help_lists_the_studio_flags():
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"}
    result = subprocess.run([sys.executable, "app.py", "--help"], cwd=REPO, capture_output=True, text=True,
                            timeout=180, env=env)
    assert result.returncode == 0, result.stderr
    for flag in ("--preset", "--share", "--host", "--port", "--device", "--offload", "--output-dir", "--weights-dir"):
        assert flag in result.stdout
