"""``alit eval --sweep`` (slurm/guidance_sweep.py): a 2 x 2 grid of sampler settings over two budgets, here and
as one job array + a merge job on the dev cluster; ``--save-best`` and the preset it writes; bad sweep specs.

Tiny untrained models (tests/test_sampling_eval.py), the real emoji data and the offline FID Inception.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from sampling import presets
from slurm.cli import main as alit
from tests.test_eval_jobs import _sacct
from tests.test_sampling_eval import _prior, _tokenizer
from tokenizer.core.checkpoint import tokenizer_identity

pytestmark = pytest.mark.usefixtures("one_thread")

GRID = ["cfg=0,2", "temperature=0.5,1"]  # 2 x 2 points


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ckpts")
    tok = _tokenizer(root / "tok", 0)
    return {"tok": tok, "prior": _prior(root / "prior", tok), "ar": _prior(root / "ar", tok, kind="ar")}


def _copy(prior: Path, where: Path) -> Path:
    return Path(shutil.copytree(prior, where / "prior"))


def _common(ckpts: dict[str, Path], prior: Path | None, budgets: str = "4") -> list[str]:
    return ["eval", "--tokenizer", str(ckpts["tok"]), *(["--prior", str(prior)] if prior else []), "--budgets",
            budgets, "--num-images", "4", "--batch-size", "2", "--adaptive-threshold", "none", "--device", "cpu",
            "--no-progress"]


def _sweep_here(ckpts: dict[str, Path], root: Path, budgets: str) -> dict:
    """The sweep run in this process with --save-best, on a copy of the prior."""
    prior = _copy(ckpts["prior"], root)
    rc = alit([*_common(ckpts, prior, budgets), "--sweep", *GRID, "--save-best", "--out", str(root / "sweep")])
    assert rc == 0
    return {"prior": prior, "out": root / "sweep", "report": json.loads((root / "sweep" / "sweep.json").read_text())}


def check_sweep(report: dict, prior: Path, budgets: tuple[int, ...]) -> None:
    """One row per (setting, budget); the preset written holds each budget's lowest-gFID settings."""
    points = [{"cfg_scale": c, "temperature": t} for c in (0.0, 2.0) for t in (0.5, 1.0)]
    rows = report["rows"]
    assert sorted((r["budget"], r["point"]) for r in rows) == [(b, j) for b in budgets for j in range(4)]
    assert all(r["setting"] == points[r["point"]] and r["n_samples"] == 4 for r in rows)
    saved = json.loads((prior / presets.PRESET_FILE).read_text())
    for b in budgets:
        mine = [r for r in rows if r["budget"] == b]
        assert len({round(r["gfid"], 6) for r in mine}) == 4  # the settings do change the samples
        lowest = min(mine, key=lambda r: r["gfid"])
        assert [r["best"] for r in mine] == [r is lowest for r in mine]
        assert report["best"][str(b)]["setting"] == lowest["setting"]
        # the full settings sampled with: the swept ones at the best point, every other at its default
        assert saved["budgets"][str(b)] == {**{k: presets.DEFAULTS[k] for k in presets.names_for("maskgit")},
                                            **lowest["setting"]}
        assert saved["notes"][str(b)]["gfid"] == pytest.approx(lowest["gfid"])
    assert report["saved"] == str(prior / presets.PRESET_FILE)


# ============================================================================ here
def test_sweep_rows_save_best_and_the_preset_it_writes(ckpts: dict[str, Path], tmp_path: Path,
                                                       capsys: pytest.CaptureFixture) -> None:
    here = _sweep_here(ckpts, tmp_path, "4")
    report, out, prior = here["report"], here["out"], here["prior"]
    check_sweep(report, prior, (4,))
    assert report["files"] == ["sweep.json", "sweep.md", "sweep.csv", "gfid_vs_cfg.png", "gfid_vs_temperature.png"]
    assert all((out / name).is_file() for name in report["files"])
    assert len((out / "sweep.csv").read_text().splitlines()) == 1 + 4
    assert tokenizer_identity(prior)["id"] == tokenizer_identity(ckpts["prior"])["id"]  # sampling.json is not the model
    # alit eval now samples with the saved settings: every piece is the sweep's (reconstructions included) and
    # each budget's gFID is the sweep's best
    capsys.readouterr()
    assert alit([*_common(ckpts, prior), "--out", str(tmp_path / "report")]) == 0
    err = capsys.readouterr().err
    assert f"sampler settings from {prior / presets.PRESET_FILE}" in err
    assert err.count("reused cached features") == 2  # recon and gen: nothing sampled or reconstructed again
    final = json.loads((tmp_path / "report" / "report.json").read_text())
    for entry in final["budgets"]:
        assert entry["gfid"] == pytest.approx(report["best"][str(entry["budget"])]["gfid"], rel=1e-9)
    assert final["settings"]["per_budget"]["4"]["cfg_scale"] == report["best"]["4"]["setting"]["cfg_scale"]


def test_bad_sweep_specs_are_refused_in_one_line(ckpts: dict[str, Path], tmp_path: Path,
                                                 capsys: pytest.CaptureFixture) -> None:
    yaml_file = tmp_path / "sweep.yaml"
    yaml_file.write_text("cfg: []\n")
    cases = [(ckpts["prior"], ["--sweep", "guidance=1,2"], "'guidance' is not a sampler setting: use one of cfg,"),
             (ckpts["prior"], ["--sweep", "cfg="], "--sweep cfg: no values"),
             (ckpts["prior"], ["--sweep", str(yaml_file)], "--sweep cfg: no values"),
             (ckpts["prior"], ["--sweep", "temperature=1,-0.5"], "--sweep temperature='-0.5' is out of range"),
             (ckpts["prior"], ["--sweep", "steps=4,x"], "--sweep steps='x' is not valid: use an integer >= 1"),
             (ckpts["prior"], ["--sweep", "top_k=1,2"], "top_k (--top-k) in --sweep only applies to ar priors"),
             (ckpts["ar"], ["--sweep", "steps=4,8"], "steps (--steps) in --sweep only applies to maskgit priors"),
             (ckpts["prior"], ["--sweep", "cfg=1", "cfg=2"], "--sweep: cfg is given twice"),
             (ckpts["prior"], ["--save-best"], "--save-best writes the best settings of a sweep"),
             (None, ["--sweep", "cfg=1,2"], "--sweep varies the sampler settings of gFID: pass --prior DIR")]
    for prior, extra, message in cases:
        assert alit([*_common(ckpts, prior), "--out", str(tmp_path / "out"), *extra]) == 2, extra
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("alit eval: ") and message in err[0], (extra, err)
    assert not (tmp_path / "out").exists()


# ============================================================================ on the dev cluster
@pytest.mark.slow
@pytest.mark.slurm
def test_sweep_on_the_dev_cluster(ckpts: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                  capsys: pytest.CaptureFixture) -> None:
    here = _sweep_here(ckpts, tmp_path / "here", "4,8")  # the reference: the same sweep in this process
    check_sweep(here["report"], here["prior"], (4, 8))
    prior = _copy(ckpts["prior"], tmp_path)
    monkeypatch.setenv("ALIT_HOME", str(tmp_path / "job_home"))  # the jobs compute every piece themselves
    out = tmp_path / "sweep"
    capsys.readouterr()
    assert alit([*_common(ckpts, prior, "4,8"), "--sweep", *GRID, "--save-best", "--out", str(out), "--cluster", "slurm",
                 "--time", "10", "--job-name", "alit-test-sweep"]) == 0
    err = capsys.readouterr().err
    found = re.search(r"submitted array (\d+) \(slurm; 10 task\(s\): 2 recon \+ 4 point\(s\) x budgets 4, 8 x 1 "
                      r"shard\(s\)\) and merge job (\d+)", err)
    assert found, err
    array_id, merge_id = found[1], found[2]
    assert "#SBATCH --array=0-9" in (out / "slurm" / array_id / f"{array_id}_submission.sh").read_text()
    assert f"#SBATCH --dependency=afterok:{array_id}\n" in (out / "slurm" / merge_id /
                                                             f"{merge_id}_submission.sh").read_text()
    states = _sacct([array_id, merge_id])
    assert all(v["state"] == "COMPLETED" for k, v in states.items() if k.startswith(f"{array_id}_")), states
    report = json.loads((out / "sweep.json").read_text())
    check_sweep(report, prior, (4, 8))
    # the same numbers as the sweep run in one process, and the reconstructions computed once
    local = {(r["budget"], r["point"]): r["gfid"] for r in here["report"]["rows"]}
    assert {(r["budget"], r["point"]): r["gfid"] for r in report["rows"]} == pytest.approx(local, rel=1e-6)
    pieces = sorted(p.name.split("-")[0] for p in (tmp_path / "job_home" / "features" / "eval").glob("*.stats.safetensors"))
    assert pieces == ["gen"] * 8 + ["recon"] * 2
