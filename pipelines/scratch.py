"""Scratch files handed to a viewer (an extension's video so far, a result's last frame for another tab): each
batch goes in a private temporary folder that is removed a little later, once the viewer has fetched its copy.

No torch here: the studio uses it too.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
from pathlib import Path

LINGER_S = 60.0  # long enough for a browser (or Gradio's cache copy) to fetch the file


def scratch_folder(prefix: str) -> Path:
    """A new private folder under the system's temporary directory."""
    return Path(tempfile.mkdtemp(prefix=prefix))


def remove_later(folder: Path, delay_s: float = LINGER_S) -> None:
    """Remove `folder` and what it holds after `delay_s` seconds, in a daemon timer (best effort)."""
    timer = threading.Timer(delay_s, shutil.rmtree, args=(folder,), kwargs={"ignore_errors": True})
    timer.daemon = True
    timer.start()
