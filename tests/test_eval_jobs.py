"""``alit eval --cluster ...`` (slurm/eval_jobs.py): an evaluation as a (budget x shard) job array + a merge job.

Tiny but real models (the untrained tiny tokenizer and prior of tests/test_sampling_eval.py), the real emoji
data and the real offline FID Inception. The Slurm test runs on the dev cluster (tests/slurm_fixtures.py).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from slurm.cli import main as alit
from slurm.eval_jobs import EvalRequest, merge_report, submit_evaluation
from tests.test_sampling_eval import _prior, _tokenizer

NUMBERS = ("rfid", "gfid", "l1", "lpips", "n_images", "n_samples")
ADAPTIVE_NUMBERS = (*NUMBERS, "mean_tokens", "histogram", "threshold")


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """One intra-op thread, as in the jobs (``--cpus 1``): the same arithmetic, and no oversubscribed cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ckpts")
    tok = _tokenizer(root / "tok", 0)
    return {"tok": tok, "prior": _prior(root / "prior", tok)}


def _close(a: object, b: object, rel: float) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return a == pytest.approx(b, rel=rel, abs=1e-9)
    return a == b


def assert_same_numbers(local: dict, jobs: dict, rel: float) -> None:
    """Every number of the two reports agrees (to ``rel``), entry by entry."""
    assert [e["budget"] for e in jobs["budgets"]] == [e["budget"] for e in local["budgets"]]
    for mine, ref in zip(jobs["budgets"], local["budgets"]):
        for key in NUMBERS:
            assert _close(mine[key], ref[key], rel), (mine["budget"], key, mine[key], ref[key])
    assert (jobs["adaptive"] is None) == (local["adaptive"] is None)
    if local["adaptive"] is not None:
        for key in ADAPTIVE_NUMBERS:
            assert _close(jobs["adaptive"][key], local["adaptive"][key], rel), (key, jobs["adaptive"][key])
    assert jobs["tokenizer"]["id"] == local["tokenizer"]["id"] and jobs["protocol"] == local["protocol"]


def _report(folder: Path) -> dict:
    return json.loads((folder / "report.json").read_text())


# ============================================================================ no cluster needed
def test_flag_conflicts_are_refused(ckpts: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    base = ["eval", "--tokenizer", str(ckpts["tok"]), "--out", str(tmp_path / "r"), "--device", "cpu"]
    cases = [(["--shard", "0/2", "--cluster", "debug"], "cannot be combined with --cluster"),
             (["--partition", "gpu"], "--partition only apply to jobs: add --cluster"),
             (["slurm.time_min=5"], "slurm.time_min=5 only apply to jobs"),
             (["--shards", "2"], "--shards only apply to jobs"),
             (["--cluster", "local", "--no-wait"], "--no-wait needs --cluster slurm"),
             (["--cluster", "debug", "--shards", "0"], "--shards must be >= 1"),
             (["--cluster", "debug", "--tasks", "2"], "spread the work with --shards N instead"),
             (["--cluster", "debug", "--num-images", "8", "--batch-size", "4", "--shards", "3"],
              "a shard would own no images; use --shards <= 2")]
    for extra, message in cases:
        assert alit([*base, *extra]) == 2, extra
        assert message in capsys.readouterr().err, extra
    assert not (tmp_path / "r").exists(), "something was submitted or written"


def test_debug_jobs_write_the_local_report(ckpts: dict[str, Path], tmp_path: Path,
                                           capsys: pytest.CaptureFixture) -> None:
    common = ["eval", "--tokenizer", str(ckpts["tok"]), "--budgets", "4", "--num-images", "4",
              "--adaptive-threshold", "0.2", "--batch-size", "2", "--device", "cpu", "--no-progress"]
    assert alit([*common, "--out", str(tmp_path / "local")]) == 0
    local_table = capsys.readouterr().out
    assert alit([*common, "--out", str(tmp_path / "jobs"), "--cluster", "debug", "--shards", "2"]) == 0
    out = capsys.readouterr()
    assert "4 task(s): budgets 4, adaptive x 2 shard(s)" in out.err
    local, jobs = _report(tmp_path / "local"), _report(tmp_path / "jobs")
    assert local["settings"]["shards"] == 1 and jobs["settings"]["shards"] == 2
    assert_same_numbers(local, jobs, rel=1e-6)
    # the same table as the local run, apart from the report folder on its first line
    assert out.out.splitlines()[1:] == local_table.splitlines()[1:] and len(local_table.splitlines()) == 4
    assert (tmp_path / "jobs" / "slurm").is_dir()  # submitit's job folders live in the report folder


def test_merge_job_refuses_missing_pieces(ckpts: dict[str, Path], tmp_path: Path) -> None:
    from sampling.report import EvalSettings
    from tokenizer.core.data import DataConfig

    settings = EvalSettings(budgets=(8,), num_images=6, adaptive_threshold=None, chunk_size=3, seed=7)
    request = EvalRequest.from_parts(ckpts["tok"], None, DataConfig(), settings, device="cpu")
    assert EvalRequest.from_dict(json.loads(json.dumps(request.__dict__))) == request  # travels as plain values
    with pytest.raises(ValueError, match=r"2 of 2 pieces are not in the feature cache .*recon budget008 \[0/2\]"):
        merge_report(request.__dict__, 2, str(tmp_path / "out"))
    assert not (tmp_path / "out" / "report.json").exists()


def test_failed_task_stops_before_the_merge(ckpts: dict[str, Path], tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    import pdb

    from sampling.report import EvalSettings
    from tokenizer.core.data import DataConfig

    tok = tmp_path / "tok"
    shutil.copytree(ckpts["tok"], tok)
    settings = EvalSettings(budgets=(4,), num_images=4, adaptive_threshold=None, chunk_size=2)
    request = EvalRequest.from_parts(tok, None, DataConfig(), settings, device="cpu")
    sub = submit_evaluation(request, request.build(), shards=2, out=tmp_path / "out", cluster="debug")
    assert sub.tasks == [(4, 0), (4, 1)] and len(sub.array) == 2 and sub.merge is None
    assert sub.slurm.env["ALIT_HOME"] == os.environ["ALIT_HOME"]  # every job shares the submitter's cache
    shutil.rmtree(tok)  # the jobs (run when waited for, in debug) cannot load the tokenizer any more
    monkeypatch.setattr(pdb, "post_mortem", lambda *a: None)  # submitit's debug jobs open pdb on a failure
    with pytest.raises(FileNotFoundError, match="holds no tokenizer"):  # debug jobs raise the job's own error
        sub.wait()
    assert sub.merge is None and not (tmp_path / "out" / "report.json").exists()  # no merge after a failure


# ============================================================================ on the dev cluster
def _sacct(job_ids: list[str]) -> dict[str, dict[str, str]]:
    proc = subprocess.run(["sacct", "-n", "-P", "-X", "-j", ",".join(job_ids), "-o", "JobID,State,Start,End"],
                          capture_output=True, text=True, timeout=60, check=True)
    rows = [line.split("|") for line in proc.stdout.splitlines() if line.strip()]
    return {r[0]: {"state": r[1], "start": r[2], "end": r[3]} for r in rows}


@pytest.mark.slurm
def test_slurm_jobs_reproduce_the_local_report(ckpts: dict[str, Path], tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    # 2 budgets x 2 shards = 4 array tasks, each evaluating reconstructions and samples of 2 images
    common = ["eval", "--tokenizer", str(ckpts["tok"]), "--prior", str(ckpts["prior"]), "--budgets", "4,8",
              "--num-images", "4", "--adaptive-threshold", "none", "--batch-size", "2", "--device", "cpu",
              "--no-progress"]
    assert alit([*common, "--out", str(tmp_path / "local")]) == 0
    local_table = capsys.readouterr().out
    # the jobs get their own ALIT_HOME (exported to them): they cannot reuse the local run's pieces
    job_home = tmp_path / "job_home"
    monkeypatch.setenv("ALIT_HOME", str(job_home))
    assert alit([*common, "--out", str(tmp_path / "jobs"), "--cluster", "slurm", "--shards", "2", "--time", "5",
                 "--job-name", "alit-test-eval"]) == 0
    out = capsys.readouterr()
    local, jobs = _report(tmp_path / "local"), _report(tmp_path / "jobs")
    assert_same_numbers(local, jobs, rel=1e-6)
    assert all(e["gfid"] is not None for e in jobs["budgets"]) and jobs["settings"]["shards"] == 2
    assert out.out.splitlines()[1:] == local_table.splitlines()[1:]

    # the jobs computed every piece, shard by shard, in their own cache
    pieces = sorted("-".join(p.name.split("-")[:4])
                    for p in (job_home / "features" / "eval").glob("*-shard000?-of-0002-*.stats.safetensors"))
    assert pieces == [f"{kind}-budget{b:03d}-shard000{i}-of" for kind in ("gen", "recon") for b in (4, 8)
                      for i in (0, 1)]

    # one array of budgets x shards = 2 x 2 tasks, and a merge job held until all of them succeeded
    found = re.search(r"submitted array (\d+) \(slurm; 4 task\(s\): budgets 4, 8 x 2 shard\(s\)\) and "
                      r"merge job (\d+)", out.err)
    assert found, out.err
    array_id, merge_id = found[1], found[2]
    folders = {p.name for p in (tmp_path / "jobs" / "slurm").iterdir() if not p.name.startswith(".")}
    assert folders == {f"{array_id}_{i}" for i in range(4)} | {array_id, merge_id}  # array_id: its script
    assert "#SBATCH --array=0-3" in (tmp_path / "jobs" / "slurm" / array_id / f"{array_id}_submission.sh").read_text()
    script = (tmp_path / "jobs" / "slurm" / merge_id / f"{merge_id}_submission.sh").read_text()
    assert f"#SBATCH --dependency=afterok:{array_id}\n" in script
    states = _sacct([array_id, merge_id])
    tasks = {k: v for k, v in states.items() if k.startswith(f"{array_id}_")}
    assert sorted(tasks) == [f"{array_id}_{i}" for i in range(4)], states
    assert all(v["state"] == "COMPLETED" for v in tasks.values()), states
    # the merge job (which may still be ending: its result is written before it exits) started after them
    assert states[merge_id]["start"] >= max(v["end"] for v in tasks.values()), states  # ISO times compare as text
