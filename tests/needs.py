"""What a test needs from the machine (a Slurm cluster, a browser): skipped with the reason where it is
missing, or failed where it is required, so a broken environment cannot pass as "skipped"."""

from __future__ import annotations

import os
import sys
from typing import NoReturn

import pytest


def unavailable(what: str, reason: str, require_env: str) -> NoReturn:
    """Skip (the reason is printed, and shown by ``-ra``), or fail when ``require_env=1`` or ``CI=true``."""
    message = f"{what} unavailable: {reason}"
    print(f"\n[{what}] {message}", file=sys.stderr)
    if os.environ.get(require_env) == "1" or os.environ.get("CI") == "true":
        pytest.fail(f"{message} ({require_env}=1 or CI=true requires it)", pytrace=False)
    pytest.skip(message)
