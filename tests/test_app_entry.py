"""app.py as users start it: flags are documented and unknown arguments (reload mode, Spaces) are tolerated."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_app_help_lists_the_studio_flags():
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"}
    result = subprocess.run([sys.executable, "app.py", "--help"], cwd=REPO, capture_output=True, text=True,
                            timeout=180, env=env)
    assert result.returncode == 0, result.stderr
    for flag in ("--preset", "--share", "--host", "--port", "--device", "--offload", "--compile", "--output-dir",
                 "--weights-dir", "--queue-size", "--root-path", "--public", "--no-metadata", "--mcp"):
        assert flag in result.stdout


@pytest.mark.skipif(importlib.util.find_spec("mcp") is not None, reason="the MCP extra is installed here")
def test_mcp_flag_without_the_extra_says_what_to_install():
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"}
    result = subprocess.run([sys.executable, "app.py", "--mcp"], cwd=REPO, capture_output=True, text=True,
                            timeout=180, env=env)
    assert result.returncode == 2
    assert "pip install 'gradio[mcp]'" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("args, message", [(["--preset", "sora-9000"], "unknown preset"),
                                           (["--device", "gpu"], "unknown device 'gpu'")])
def test_a_bad_start_says_why_without_a_traceback_and_tolerates_unknown_arguments(tmp_path, args, message):
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"}
    result = subprocess.run([sys.executable, "app.py", *args, "--output-dir", str(tmp_path), "--some-future-flag"],
                            cwd=REPO, capture_output=True, text=True, timeout=180, env=env)
    assert result.returncode != 0 and "cannot start the studio" in result.stderr and message in result.stderr
    assert "Traceback" not in result.stderr

