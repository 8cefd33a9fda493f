"""The ``alit`` command line as a user meets it: bad input is one line and exit code 2 in every command,
``--version``, and help and configs from any working directory.

The bad-input cases call the console script's entry point (:func:`slurm.cli.main`) in this process, from a
temporary directory (not the repository) with ``ALIT_HOME`` under it, and fail before any model is built.
A subprocess per case cost 5-16 s of imports (torch, diffusers, torch-fidelity) and tested nothing more:
an exception escaping ``main`` fails the test here as a traceback would there. What needs a real process
(``--version``, ``--help`` from another directory, one bad input end to end) still runs ``python -m slurm.cli``.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import io
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from tokenizer.core.errors import UsageError

REPO = Path(__file__).resolve().parents[1]
VQ_CONFIG = REPO / "configs" / "tokenizer" / "vq_emoji_cpu.yaml"


def alit(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "ALIT_HOME": str(cwd / "home"), "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "slurm.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def alit_here(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """``alit args`` in this process as :func:`alit` runs it: from ``cwd``, ``ALIT_HOME`` under it, warnings
    ignored; exit code and output as a CompletedProcess."""
    from slurm.cli import main

    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), \
            warnings.catch_warnings():
        mp.chdir(cwd)
        mp.setenv("ALIT_HOME", str(cwd / "home"))
        warnings.simplefilter("ignore")
        try:
            rc = main(args)
        except SystemExit as e:  # argparse's own errors and --help
            rc = e.code if isinstance(e.code, int) else 1
    return subprocess.CompletedProcess(["alit", *args], rc, out.getvalue(), err.getvalue())


def bad_input(args: list[str], cwd: Path, *expected: str, run=alit_here) -> str:
    """Run ``alit args``: exit code 2 and one line ``alit <command>: ...`` on stderr naming ``expected``."""
    proc = run(args, cwd)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"alit {args[0]}: "), proc.stderr
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


def fake_tokenizer(path: Path) -> Path:
    """A directory that passes the tokenizer-identity hash (it is never loaded: the commands fail first)."""
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    return path


# ============================================================================ bad input, per command
def test_demo_bad_data_and_bad_override(tmp_path: Path) -> None:
    bad_input(["demo", f"out={tmp_path / 'demo'}", f"data.source={tmp_path / 'nowhere'}"], tmp_path,
              "does not exist")
    assert not (tmp_path / "demo").exists()  # refused before any stage wrote anything
    bad_input(["demo", "notakey=1"], tmp_path, "'notakey'")
    bad_input(["demo", "--gpus", "1"], tmp_path, "--gpus", "--cluster")


def test_train_missing_config_and_bad_override(tmp_path: Path) -> None:
    bad_input(["train", "tokenizer", "--config", str(tmp_path / "missing.yaml")], tmp_path, "not found")
    # a repository-relative config is found from another working directory; the misspelled key is named
    bad_input(["train", "tokenizer", "--config", "configs/tokenizer/vq_emoji_cpu.yaml", "train.nokey=1"],
              tmp_path, "train.nokey")


def test_data_missing_source(tmp_path: Path) -> None:
    bad_input(["data", "--source", str(tmp_path / "missing")], tmp_path, "does not exist")
    bad_input(["data", "--resolution", "3"], tmp_path, "resolution")


def test_weights_unknown_argument(tmp_path: Path) -> None:
    bad_input(["weights", "--no-such-flag"], tmp_path, "unrecognized arguments: --no-such-flag")


def test_bad_input_in_a_real_process(tmp_path: Path) -> None:
    """End to end as a user meets it: ``python -m slurm.cli`` (imports, warnings and all) prints one line."""
    bad_input(["train", "tokenizer", "--config", "configs/tokenizer/vq_emoji_cpu.yaml", "train.nokey=1"],
              tmp_path, "train.nokey", run=alit)


def test_sweep_missing_file_and_status_of_a_foreign_directory(tmp_path: Path) -> None:
    bad_input(["sweep", str(tmp_path / "missing.yaml")], tmp_path, "sweep file not found")
    bad_input(["sweep", "--status", str(tmp_path)], tmp_path, "holds no sweep")


def test_tokenize_into_a_foreign_directory(tmp_path: Path) -> None:
    tok = fake_tokenizer(tmp_path / "tok")
    foreign = tmp_path / "model"
    foreign.mkdir()
    (foreign / "manifest.json").write_text(json.dumps({"format": "something-else"}))
    bad_input(["tokenize", "--tokenizer", str(tok), "--out", str(foreign)], tmp_path, "not a token cache")
    other = tmp_path / "other_cache"
    other.mkdir()
    (other / "manifest.json").write_text(json.dumps({"format": "alit-token-cache", "format_version": 1,
                                                     "tokenizer": {"id": "0" * 64}, "request": {}}))
    bad_input(["tokenize", "--tokenizer", str(tok), "--out", str(other)], tmp_path, "other inputs")
    bad_input(["tokenize", "--tokenizer", str(tok), "--out", str(tmp_path / "c"), "data.nokey=1"], tmp_path,
              "data.nokey")


def test_sample_bad_shard_and_missing_tokenizer(tmp_path: Path) -> None:
    bad_input(["sample", "--tokenizer", str(tmp_path / "none"), "--prior", str(tmp_path / "none"), "--out",
               str(tmp_path / "s")], tmp_path, "holds no tokenizer")
    bad_input(["sample", "--tokenizer", "t", "--prior", "p", "--out", "o", "--shard", "3"], tmp_path, "i/n")


def test_reconstruct_bad_override_and_missing_tokenizer(tmp_path: Path) -> None:
    bad_input(["reconstruct", "--tokenizer", str(tmp_path / "none"), "--out", str(tmp_path / "r"),
               "data.resolution=abc"], tmp_path, "data.resolution")
    bad_input(["reconstruct", "--tokenizer", str(tmp_path / "none"), "--out", str(tmp_path / "r")], tmp_path,
              "holds no tokenizer")


def test_eval_bad_flags_and_missing_config(tmp_path: Path) -> None:
    bad_input(["eval", "--tokenizer", str(tmp_path / "none"), "--config", str(tmp_path / "missing.yaml")],
              tmp_path, "not found")
    bad_input(["eval", "--tokenizer", "t", "--shards", "2"], tmp_path, "--shards", "--cluster")


# ============================================================================ version, help, configs from anywhere
def test_version(tmp_path: Path) -> None:
    proc = alit(["--version"], tmp_path)
    assert proc.returncode == 0 and proc.stdout.strip() == f"alit {importlib.metadata.version('alit-stack')}"


def test_help_from_another_directory(tmp_path: Path) -> None:
    for args in (["demo", "--help"], ["train", "--config", str(VQ_CONFIG), "--help"], ["--help"]):
        proc = alit(args, tmp_path)
        assert proc.returncode == 0 and proc.stdout.startswith("usage: alit"), proc.stderr[-2000:]


def test_configs_are_found_relative_to_the_repository(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from slurm.pipeline import DemoConfig, check_inputs
    from tokenizer.core.config import load_config, locate_config

    monkeypatch.chdir(tmp_path)
    assert locate_config("configs/demo/emoji_cpu.yaml") == REPO / "configs" / "demo" / "emoji_cpu.yaml"
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "mine.yaml").write_text("out: here\n")
    assert locate_config("configs/mine.yaml") == Path("configs/mine.yaml")  # the working directory first
    cfg = load_config(DemoConfig, "configs/demo/emoji_cpu.yaml")
    check_inputs(cfg)  # every stage config of the demo is found from here


# ============================================================================ one way to say a budget
def test_parse_budgets_is_the_one_reading_of_a_budget() -> None:
    from sampling.generate import ADAPTIVE, parse_budgets

    valid = [8, 16, 24, 32]
    assert parse_budgets("16,8", valid) == [16, 8]
    assert parse_budgets("all", valid) == valid and parse_budgets("max", valid) == [32]
    assert parse_budgets("8, adaptive ,max,8", valid) == [8, ADAPTIVE, 32]
    assert parse_budgets([8, 16], valid) == [8, 16] and parse_budgets(["all"], valid) == valid
    for bad in ("7", "adaptive", "", "eight", [True]):
        with pytest.raises(UsageError):
            parse_budgets(bad, valid, allow_adaptive=False)
