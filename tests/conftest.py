"""Test-session setup: caches go to a temporary ALIT_HOME, except the converted-weight cache, which is
shared across sessions (converting the carriers' weights is slow and read-only afterwards)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

pytest_plugins = ["tests.slurm_fixtures"]

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "tests" / "assets"


def pytest_configure(config: pytest.Config) -> None:
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    # precision auto trains in fp32 here whatever the CPU (the suite's reference numbers are fp32 ones);
    # tests/test_hardware.py tests the bf16 decision itself. Subprocesses and jobs inherit it.
    os.environ.setdefault("ALIT_CPU_BF16", "off")


@pytest.fixture(autouse=True, scope="session")
def _alit_home(tmp_path_factory: pytest.TempPathFactory) -> None:
    home = tmp_path_factory.mktemp("alit_home")
    os.environ["ALIT_HOME"] = str(home)
    # Reuse converted pretrained weights between test sessions (a cache, never results).
    os.environ.setdefault("ALIT_WEIGHTS_CACHE", str(Path.home() / ".cache" / "alit" / "weights"))


@pytest.fixture(scope="module")
def base_vq(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A freshly saved, untrained tiny base VQ (what the distill stage distils), once per test module."""
    from tokenizer.vq import BaseVQ, base_vq_config

    path = tmp_path_factory.mktemp("base_vq") / "final"
    torch.manual_seed(0)
    BaseVQ(base_vq_config("tiny")).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One intra-op thread for a module of tiny models: faster than two, and far faster on a busy machine
    (``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
