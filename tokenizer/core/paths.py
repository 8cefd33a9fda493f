"""Where results, caches and runs live: never in the source tree.

``ALIT_HOME`` (default ``~/.cache/alit``) holds the weight cache (``weights/``), feature caches
(``features/``) and, unless a config says otherwise, run directories (``runs/``).
"""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parents[1]
ASSETS = PACKAGE_ROOT / "assets"


def alit_home() -> Path:
    """The root of every cache and run directory (``$ALIT_HOME``, default ``~/.cache/alit``)."""
    root = os.environ.get("ALIT_HOME")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "alit"


def cache_dir(kind: str) -> Path:
    """A named cache folder under :func:`alit_home`, created on demand."""
    path = alit_home() / kind
    path.mkdir(parents=True, exist_ok=True)
    return path


def runs_dir() -> Path:
    """Default parent of run directories (``$ALIT_RUNS``, default ``$ALIT_HOME/runs``)."""
    root = os.environ.get("ALIT_RUNS")
    return Path(root).expanduser() if root else alit_home() / "runs"
