"""The report page in a real browser: headless Chromium renders ``report.html`` of a real evaluation.

It asserts that every figure decoded (natural width > 0), that the page logged no errors, and that every
table names the evaluation protocol; the screenshot stays in the report folder (``report.png``).
Chromium is Debian's ``chromium``, installed here like the Slurm packages when missing (root + apt-get);
without it the test says why it was skipped, and under CI (or ALIT_REQUIRE_BROWSER=1) it fails instead.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import NoReturn

import pytest
from PIL import Image

from sampling.html import check_in_browser, find_chromium, render_html
from tests.needs import unavailable
from tests.test_protocol import evaluate, models  # noqa: F401  (the module fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


def _unavailable(reason: str) -> NoReturn:
    unavailable("headless Chromium", reason, "ALIT_REQUIRE_BROWSER")


@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's chromium, apt-get installed on first use (root only)."""
    found = find_chromium()
    if found:
        return found
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        _unavailable("not installed, and installing it needs root and apt-get (apt-get install chromium)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "--no-install-recommends",
                                               "chromium"]):
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
        if done.returncode != 0:
            _unavailable(f"{' '.join(cmd)} failed: {done.stderr.strip()[-300:]}")
    return find_chromium() or _unavailable("apt-get installed chromium but it is not on PATH")  # type: ignore[return-value]


def test_report_html_in_headless_chromium(models: dict[str, Path], tmp_path: Path, chromium: str) -> None:  # noqa: F811
    out = tmp_path / "report"
    report = evaluate(models, out, seeds=1, num_images=4)  # small: the page, not the numbers, is under test
    page = render_html(out, title="browser check")
    result = check_in_browser(page, chromium=chromium)
    assert result["images"], "the page shows no figure"
    for image in result["images"]:
        assert image["complete"] and image["width"] > 0 and image["height"] > 0, image
    assert len(result["images"]) == len([f for f in report["files"] if f.endswith(".png")])
    assert not result["errors"], result["errors"]
    assert not result["console"], result["console"]
    name = report["protocol"]["eval"]["name"]
    assert len(result["tables"]) >= 3 and all(c and f"protocol {name}" in c for c in result["tables"]), \
        result["tables"]
    shot = Path(result["screenshot"])
    assert shot == out / "report.png"
    with Image.open(shot) as im:
        low, high = im.convert("L").getextrema()
        assert im.size == (1200, 4000) and high - low > 100  # not a blank page
