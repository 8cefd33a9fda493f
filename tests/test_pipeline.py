"""The staged pipeline (slurm/pipeline.py) without training: stage hashes and reuse, the directory marker
and --fresh, `alit status`; and on the dev cluster (marker `slurm`) the stages as chained Slurm jobs."""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from slurm.cli import main as alit
from slurm.pipeline import (
    MARKER,
    STAGE_NAMES,
    DemoConfig,
    _write_json,
    apply_plan,
    output_identity,
    plan,
    prepare_root,
    record_entry,
    stage_record_path,
    write_record,
)
from tests.slurm_fixtures import wait_until
from tests.test_demo import TINY
from tokenizer.core.config import load_config
from tokenizer.core.errors import UserError

EMOJI = "configs/demo/emoji_cpu.yaml"


def _cfg(root: Path, *overrides: str, config: str = EMOJI) -> DemoConfig:
    return load_config(DemoConfig, config, [f"out={root}", *overrides])


def _finish_all(cfg: DemoConfig) -> None:
    """Pretend every stage that runs finished: its done file, its output and its record."""
    root = prepare_root(cfg)
    plans = plan(cfg)
    apply_plan(root, plans)
    for p in plans:
        if p.reuse:
            continue
        done = root / p.stage.done
        done.parent.mkdir(parents=True, exist_ok=True)
        done.write_text(json.dumps({"stage": p.stage.name, "hash": p.hash}))
        (root / p.stage.output).parent.mkdir(parents=True, exist_ok=True)
        if not (root / p.stage.output).exists():
            (root / p.stage.output).write_text("{}")
        record = json.loads(stage_record_path(root, p.stage.name).read_text())
        _write_json(stage_record_path(root, p.stage.name),
                    {**record, "state": "done", "output": output_identity(root / p.stage.output)})
    write_record(root, "none", [record_entry(p) for p in plans])


def test_a_changed_stage_reruns_with_the_ones_after_it(tmp_path: Path) -> None:
    root = tmp_path / "pipe"
    _finish_all(_cfg(root))
    assert all(p.reuse for p in plan(_cfg(root)))
    changed = _cfg(root, "distill.overrides=[train.max_steps=7]")
    plans = {p.stage.name: p for p in plan(changed)}
    assert plans["vq"].reuse
    assert not plans["distill"].reuse and "train.max_steps" in plans["distill"].reason
    assert plans["distill"].reason.startswith("config changed")
    for later in ("finetune", "tokenize", "prior", "eval"):
        assert not plans[later].reuse and "runs again" in plans[later].reason, plans[later].reason
    # the changed stage's folder is removed before it reruns; the reused one is kept
    (root / "distill" / "checkpoints").mkdir(parents=True)
    apply_plan(root, list(plans.values()))
    assert not (root / "distill").exists() and (root / "vq" / "final" / "manifest.json").is_file()
    # an output edited after its run is not reused either
    _finish_all(changed)
    (root / "prior" / "final" / "weights.json").write_text("{}")
    plans = {p.stage.name: p for p in plan(changed)}
    assert [n for n, p in plans.items() if not p.reuse] == ["prior", "eval"]
    assert "output prior/final changed" in plans["prior"].reason


def test_the_demo_seed_seeds_every_training_stage_and_reruns_them(tmp_path: Path) -> None:
    from slurm.pipeline import _prior_run, _tokenizer_run

    root = tmp_path / "pipe"
    seeded = _cfg(root, "seed=3")
    assert [_tokenizer_run(seeded, s, root).train.seed for s in ("vq", "distill", "finetune")] == [3, 3, 3]
    assert _prior_run(seeded, root).train.seed == 3
    # a stage's own override wins over the demo's seed
    own = _cfg(root, "seed=3", "distill.overrides=[train.seed=5]")
    assert _tokenizer_run(own, "distill", root).train.seed == 5
    _finish_all(_cfg(root))
    assert all(p.reuse for p in plan(_cfg(root, "seed=0")))  # the default seed is the configs' own
    plans = {p.stage.name: p for p in plan(seeded)}
    assert not plans["vq"].reuse and "train.seed" in plans["vq"].reason


def test_the_imagenet_demo_never_reuses_the_emoji_demo(tmp_path: Path) -> None:
    emoji = load_config(DemoConfig, EMOJI)
    imagenet = load_config(DemoConfig, "configs/demo/imagenet_gpu.yaml", ["data.source=emoji"])
    assert emoji.root() != imagenet.root()
    root = tmp_path / "shared"
    _finish_all(_cfg(root))
    plans = plan(_cfg(root, "data.source=emoji", config="configs/demo/imagenet_gpu.yaml"))
    assert not any(p.reuse for p in plans)
    assert plans[0].reason.startswith("config changed (data.")


def test_fresh_refuses_a_directory_it_did_not_create(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    home = tmp_path / "home"
    (home / "docs").mkdir(parents=True)
    (home / "docs" / "thesis.txt").write_text("years of work")
    before = sorted(p.relative_to(home) for p in home.rglob("*"))
    assert alit(["demo", f"out={home}", "--fresh"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--fresh refused" in err and MARKER in err and "out=" in err, err
    assert sorted(p.relative_to(home) for p in home.rglob("*")) == before
    assert (home / "docs" / "thesis.txt").read_text() == "years of work"
    assert alit(["demo", f"out={home}"]) == 2  # nor is such a directory written into
    assert "not empty and has no" in capsys.readouterr().err
    assert sorted(p.relative_to(home) for p in home.rglob("*")) == before


def test_fresh_empties_its_own_directory_without_following_links(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("keep")
    cfg = _cfg(tmp_path / "pipe")
    root = prepare_root(cfg)
    assert (root / MARKER).is_file()
    (root / "vq").mkdir()
    (root / "vq" / "link").symlink_to(outside)
    (root / "tokens").symlink_to(outside)
    (root / "stray.txt").write_text("x")
    prepare_root(cfg, fresh=True)
    assert sorted(p.name for p in root.iterdir()) == [MARKER]
    assert (outside / "keep.txt").read_text() == "keep"
    link = tmp_path / "link"
    link.symlink_to(root)
    with pytest.raises(UserError, match="symbolic link"):
        prepare_root(_cfg(link), fresh=True)
    # an empty directory is adopted (marked), so a later --fresh may empty it
    empty = tmp_path / "empty"
    empty.mkdir()
    prepare_root(_cfg(empty))
    assert (empty / MARKER).is_file()


def test_status_shows_each_stage(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = tmp_path / "pipe"
    _finish_all(_cfg(root))
    _finish_all(_cfg(root, "prior.overrides=[train.max_steps=9]"))
    assert alit(["status", str(root)]) == 0
    out = capsys.readouterr().out
    for stage in STAGE_NAMES:
        assert re.search(rf"^\s+{stage}\s", out, re.M), out
    assert re.search(r"^\s+vq\s+reused", out, re.M) and re.search(r"^\s+prior\s+COMPLETED.*config changed", out,
                                                                   re.M), out
    assert alit(["status", str(tmp_path)]) == 2
    assert "not a pipeline directory" in capsys.readouterr().err


# ============================================================================ on the dev cluster
def _job_ids(out: str) -> list[str]:
    return [line.strip() for line in out.splitlines() if re.fullmatch(r"\d+", line.strip())]


@pytest.mark.slurm
def test_staged_demo_queues_one_job_per_stage_chained_by_afterok(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture) -> None:
    """--no-wait: six stage jobs queued at once, each held by afterok on the one before (then cancelled)."""
    root = tmp_path / "demo"
    assert alit(["demo", f"out={root}", *TINY, "--cluster", "slurm", "--no-wait", "--time", "5",
                 "--job-name", "alit-test-stages"]) == 0
    ids = _job_ids(capsys.readouterr().out)
    try:
        assert len(ids) == 6
        record = json.loads((root / "pipeline.json").read_text())
        assert [e["jobs"] for e in record["stages"]] == [[i] for i in ids]
        for stage, previous, job in zip(STAGE_NAMES[1:], ids, ids[1:]):
            script = (root / "stages" / stage / "slurm" / job / f"{job}_submission.sh").read_text()
            assert f"#SBATCH --dependency=afterok:{previous}\n" in script
            assert "#SBATCH --kill-on-invalid-dep=yes\n" in script
            assert f"#SBATCH --job-name=alit-test-stages-{stage}\n" in script
        assert alit(["status", str(root)]) == 0
        status = capsys.readouterr().out
        assert all(i in status for i in ids)
    finally:
        subprocess.run(["scancel", *ids], check=False)


@pytest.mark.slurm
@pytest.mark.slow
def test_staged_demo_on_slurm_runs_stage_after_stage(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The whole tiny pipeline as six Slurm jobs: each starts after the one before ended (sacct)."""
    root = tmp_path / "demo"
    assert alit(["demo", f"out={root}", *TINY, "--cluster", "slurm", "--time", "10",
                 "--job-name", "alit-test-chain"]) == 0
    assert "report: " in capsys.readouterr().out
    ids = [e["jobs"][0] for e in json.loads((root / "pipeline.json").read_text())["stages"]]
    assert len(ids) == 6
    rows: dict[str, list[str]] = {}

    def accounted() -> bool:  # the last job's result file comes before accounting says COMPLETED
        acct = subprocess.run(["sacct", "-X", "-n", "-P", "-o", "JobID,State,Start,End", "-j", ",".join(ids)],
                              capture_output=True, text=True, check=True, env=os.environ).stdout
        rows.update({r.split("|")[0]: r.split("|")[1:] for r in acct.splitlines() if r.strip()})
        return all(rows.get(i, [""])[0] == "COMPLETED" for i in ids)

    wait_until(accounted, 60, "sacct to show every stage job COMPLETED")
    for previous, job in itertools.pairwise(ids):
        assert rows[job][1] >= rows[previous][2], (previous, job, rows)  # ISO times compare as strings
    assert alit(["demo", f"out={root}", *TINY]) == 0  # here afterwards: every stage reused
    assert capsys.readouterr().err.count(": reused (finished earlier") == 6


def test_ranks_split_each_stage_batch_so_the_global_batch_stays(tmp_path: Path, monkeypatch) -> None:
    from slurm.pipeline import _prior_run, _tokenizer_run, local_ranks

    root = tmp_path / "pipe"
    one, two = _cfg(root, "ranks=1"), _cfg(root, "ranks=2")
    for stage in ("vq", "distill", "finetune"):
        a, b = _tokenizer_run(one, stage, root).train, _tokenizer_run(two, stage, root).train
        assert b.global_batch == a.batch_size and b.batch_size * 2 == a.batch_size, stage
    assert _prior_run(two, root).train.global_batch == _prior_run(one, root).train.batch_size
    with pytest.raises(Exception, match="ranks=3 does not divide the vq stage's batch of 16"):
        _tokenizer_run(_cfg(root, "ranks=3"), "vq", root)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    assert local_ranks(two) == 1  # never more processes than CPUs: one process then accumulates
