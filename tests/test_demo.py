"""`alit demo`: every stage runs on the embedded data (at toy length here), re-runs reuse unchanged
stages (a changed stage reruns with the ones after it), and the report page is self-contained (figures
embedded, no server needed)."""

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
REUSED = ": reused (finished earlier"


def finished_at(root: Path) -> dict[str, float]:
    """When each stage's last run finished (its record in <out>/stages/<stage>.json)."""
    stages = ("vq", "distill", "finetune", "tokenize", "prior", "eval")
    return {s: json.loads((root / "stages" / f"{s}.json").read_text())["finished"] for s in stages}


def test_demo_runs_every_stage_then_reuses_them(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Five toy trainings and an Inception evaluation: about two minutes on 2 cores; then the same command
    reuses every stage, and a changed prior config reruns the prior and the evaluation only."""
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
    first = finished_at(tmp_path / "demo")
    assert alit(args) == 0  # the second run reuses every stage
    assert capsys.readouterr().err.count(REUSED) == 6
    assert finished_at(tmp_path / "demo") == first

    changed = [a.replace("train.max_steps=4,train.batch_size=16", "train.max_steps=5,train.batch_size=16")
               for a in args]
    assert changed != args
    assert alit(changed) == 0
    err = capsys.readouterr().err
    assert err.count(REUSED) == 4
    assert "5/6 prior: runs (config changed (train.max_steps: 4 -> 5))" in err
    assert "6/6 evaluation: runs (input prior runs again)" in err
    assert "reused cached features" in err  # the reconstructions' pieces: same tokenizer, same data
    again = finished_at(tmp_path / "demo")
    assert all(again[s] == first[s] for s in ("vq", "distill", "finetune", "tokenize"))
    assert all(again[s] > first[s] for s in ("prior", "eval"))
    record = json.loads((tmp_path / "demo" / "pipeline.json").read_text())
    assert [e["reused"] for e in record["stages"]] == [True, True, True, True, False, False]


@pytest.mark.slow  # 83 s: six stage jobs through submitit's local executor; the Slurm-queued variant is in the suite
def test_demo_as_a_job_then_reused_here(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """`alit demo --cluster local`: each stage runs as its own submitit job in another process, one after
    another (paths made absolute, logs under each stage's directory); running the demo here afterwards
    reuses every stage they wrote."""
    out = tmp_path / "demo"
    assert alit(["demo", f"out={out}", *TINY, "--cluster", "local", "--cpus", "2", "--fresh"]) == 0
    captured = capsys.readouterr()
    page = Path(re.search(r"report: (\S+report\.html)", captured.out).group(1))
    assert page.is_file() and page.parent == out / "report"
    for stage in ("vq", "distill", "finetune", "tokenize", "prior", "eval"):
        job_logs = list((out / "stages" / stage / "slurm").glob("*/*_log.err"))
        assert len(job_logs) == 1 and "run_stage_job" in job_logs[0].read_text()
    record = json.loads((out / "pipeline.json").read_text())
    assert len({e["jobs"][0] for e in record["stages"]}) == 6
    assert alit(["demo", f"out={out}", *TINY]) == 0
    assert capsys.readouterr().err.count(REUSED) == 6


def test_demo_cluster_flags_need_a_cluster(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert alit(["demo", f"out={tmp_path / 'demo'}", "--gpus", "1"]) == 2
    assert "--gpus only apply to stage jobs" in capsys.readouterr().err
    assert not (tmp_path / "demo").exists()
