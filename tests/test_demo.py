"""`alit demo`: every stage runs on the embedded data (at toy length here), re-runs reuse finished
stages, and the report page is self-contained (figures embedded, no server needed)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from slurm.cli import main as alit

TINY = [
    "data.max_images=96", "data.val_fraction=0.25",
    "vq.overrides=[train.max_steps=4,train.batch_size=8,train.eval_every=0,train.progress=false,"
    "train.tensorboard=false,loss.gan_start_step=2]",
    "distill.overrides=[alit_size=tiny,train.max_steps=4,train.batch_size=8,train.eval_every=0,"
    "train.progress=false,train.tensorboard=false]",
    "finetune.overrides=[train.max_steps=4,train.batch_size=4,train.eval_every=0,train.progress=false,"
    "train.tensorboard=false,loss.gan_start_step=2]",
    "prior.overrides=[train.max_steps=4,train.batch_size=16,train.eval_every=0,train.progress=false,"
    "train.tensorboard=false,model.width=32,model.depth=1]",
    "eval.num_images=12", "eval.budgets=[4,16]", "adaptive_threshold=0.2",
]


def test_demo_runs_every_stage_then_reuses_them(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Five toy trainings and an Inception evaluation: about two minutes on 2 cores."""
    args = ["demo", f"out={tmp_path / 'demo'}", *TINY]
    assert alit(args) == 0
    out = capsys.readouterr()
    page = Path(re.search(r"report: (\S+report\.html)", out.out).group(1))
    report = json.loads((page.parent / "report.json").read_text())
    assert [e["budget"] for e in report["budgets"]] == [4, 16]
    assert all(e["gfid"] is not None and e["rfid"] > 0 for e in report["budgets"])
    html = page.read_text()
    assert html.count("data:image/png;base64,") >= 4 and not re.search(r'src="(?!data:)', html)
    for stage in ("vq", "distill", "finetune", "prior"):
        assert (tmp_path / "demo" / stage / "final" / "manifest.json").is_file()
    assert alit(args) == 0  # the second run reuses every stage and every evaluation piece
    err = capsys.readouterr().err
    assert err.count(": reused (finished earlier") == 5
    assert "reused cached features" in err


def test_demo_as_a_job_then_reused_here(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """`alit demo --cluster local`: the whole pipeline runs as one submitit job in another process (paths made
    absolute, logs under the demo directory); running the demo here afterwards reuses every stage it wrote."""
    out = tmp_path / "demo"
    assert alit(["demo", f"out={out}", *TINY, "--cluster", "local", "--cpus", "2", "--fresh"]) == 0
    captured = capsys.readouterr()
    page = Path(re.search(r"report: (\S+report\.html)", captured.out).group(1))
    assert page.is_file() and page.parent == out / "report"
    job_logs = list((out / "slurm").glob("*/*_log.err"))
    assert job_logs and "run_demo_job" in job_logs[0].read_text()
    assert alit(["demo", f"out={out}", *TINY]) == 0
    assert capsys.readouterr().err.count(": reused (finished earlier") == 5


def test_demo_cluster_flags_need_a_cluster(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert alit(["demo", f"out={tmp_path / 'demo'}", "--gpus", "1"]) == 2
    assert "--gpus only apply to a job" in capsys.readouterr().err
    assert not (tmp_path / "demo").exists()
