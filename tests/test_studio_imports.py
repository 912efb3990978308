"""The studio is Gradio only: importing it must not pull in torch (app.py builds the engines)."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_importing_studio_does_not_import_torch():
    code = ("import sys, studio, studio.layout, studio.handlers, studio.jobs, studio.panels, studio.history, "
            "studio.tabs, studio.controls, studio.media_info, studio.export; print('torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                            env={"GRADIO_ANALYTICS_ENABLED": "False", "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
