"""Sampler settings and sampling presets (sampling/presets.py): one table of settings, the prior's
``sampling.json`` (defaults < its ``default`` < its budget's entry < the command line), what reaches the
samplers, what the sample folders record, and bad presets and flags refused in one line.

Tiny untrained models (tests/test_sampling_eval.py); no Inception: nothing here computes FID.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from generator.maskgit import arccos, cosine
from sampling import presets
from sampling.generate import SAMPLES, SampleSettings, load_image_set, load_models, make_sampler
from sampling.maskgit_sampler import MaskGITSampler
from sampling.report import SAMPLER_KEYS, EvalSettings
from sampling.schedules import Ramp
from slurm.cli import main as alit
from tests.test_sampling_eval import _prior, _tokenizer
from tokenizer.core.checkpoint import tokenizer_identity

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ckpts")
    tok = _tokenizer(root / "tok", 0)
    return {"tok": tok, "prior": _prior(root / "prior", tok), "ar": _prior(root / "ar", tok, kind="ar")}


@pytest.fixture()
def prior(ckpts: dict[str, Path], tmp_path: Path) -> Path:
    """A copy of the MaskGIT prior that a test may give a sampling.json."""
    return Path(shutil.copytree(ckpts["prior"], tmp_path / "prior"))


def _write(prior: Path, preset: dict) -> None:
    (prior / presets.PRESET_FILE).write_text(json.dumps(preset))


def _sample(ckpts: dict[str, Path], prior: Path, out: Path, *extra: str) -> int:
    return alit(["sample", "--tokenizer", str(ckpts["tok"]), "--prior", str(prior), "--budgets", "4,8",
                 "--num-images", "3", "--batch-size", "3", "--seed", "5", "--out", str(out), "--no-png",
                 "--device", "cpu", "--no-progress", *extra])


def _folders(out: Path) -> dict[int, Path]:
    """Budget -> the folder ``alit sample`` wrote for it (one request per budget)."""
    found = {}
    for meta in out.glob(f"*/*/{SAMPLES}.json"):
        found[json.loads(meta.read_text())["settings"]["budget"]] = meta.parent
    return found


# ============================================================================ the table
def test_one_table_of_settings_and_unchanged_defaults() -> None:
    # the report's sampler fields, the sample request's and the evaluation's defaults are the table's
    assert tuple(k.name for k in presets.KNOBS) == SAMPLER_KEYS
    assert {k: getattr(EvalSettings(), k) for k in SAMPLER_KEYS} == presets.DEFAULTS
    assert SampleSettings(budget=8).sampler_settings() == presets.DEFAULTS
    # a request at the defaults keeps the cache keys and folder names of before the new settings existed
    assert set(SampleSettings(budget=8).to_dict()) == {"budget", "num_images", "cfg_scale", "temperature", "steps",
                                                       "seed", "classes", "chunk_size", "top_k", "top_p"}
    assert SampleSettings(budget=8, cfg_scale=1.5).folder_name() == "budget008-cfg1.5-seed0"
    other = SampleSettings(budget=8, cfg_scale=1.5, mask_schedule="arccos")
    assert other.folder_name().startswith("budget008-cfg1.5-seed0-s") and other.to_dict()["mask_schedule"] == "arccos"
    # value schedules
    assert presets.value_schedule("constant", 2.0) == 2.0
    assert presets.value_schedule("linear", 2.0) == Ramp(0.0, 2.0)
    assert presets.value_schedule("linear-down", 4.5) == Ramp(4.5, 0.0)


def test_settings_reach_the_samplers(ckpts: dict[str, Path]) -> None:
    models = load_models(ckpts["tok"], ckpts["prior"])
    default = make_sampler(models.prior, SampleSettings(budget=8))
    reference = MaskGITSampler()  # the sampler's own defaults: a default request samples as before
    assert (default.steps, default.schedule, default.choice_temperature, default.temperature(0.3),
            default.cfg_scale(0.3)) == (reference.steps, reference.schedule, reference.choice_temperature,
                                        reference.temperature(0.3), reference.cfg_scale(0.3))
    s = make_sampler(models.prior, SampleSettings(budget=8, cfg_scale=2.0, cfg_schedule="linear", temperature=0.8,
                                                  temperature_schedule="linear-down", choice_temperature=2.0,
                                                  choice_schedule="constant", steps=5, mask_schedule="arccos"))
    assert isinstance(s, MaskGITSampler) and s.steps == 5 and s.schedule is arccos and s.schedule is not cosine
    assert (s.cfg_scale(0.0), s.cfg_scale(1.0), s.temperature(0.0), s.temperature(1.0)) == (0.0, 2.0, 0.8, 0.0)
    assert (s.choice_temperature(0.0), s.choice_temperature(1.0)) == (2.0, 2.0)
    ar = load_models(ckpts["tok"], ckpts["ar"])
    a = make_sampler(ar.prior, SampleSettings(budget=8, top_k=7, top_p=0.9, cfg_scale=1.0, cfg_schedule="linear"))
    assert (a.top_k, a.top_p, a.cfg_scale(0.5)) == (7, 0.9, 0.5)
    with pytest.raises(ValueError, match=r"top_k \(--top-k\) in the settings only applies to ar priors"):
        make_sampler(models.prior, SampleSettings(budget=8, top_k=5))
    with pytest.raises(ValueError, match=r"mask_schedule \(--mask-schedule\) .* only applies to maskgit"):
        make_sampler(ar.prior, SampleSettings(budget=8, mask_schedule="linear"))


# ============================================================================ sampling.json
def test_precedence_defaults_preset_budget_flags(ckpts: dict[str, Path], prior: Path, tmp_path: Path) -> None:
    _write(prior, {"default": {"cfg": 1.5, "mask_schedule": "arccos"}, "budgets": {"8": {"temperature": 0.5}}})
    assert tokenizer_identity(prior)["id"] == tokenizer_identity(ckpts["prior"])["id"]  # a preset is not the model
    assert _sample(ckpts, prior, tmp_path / "a") == 0
    used = {b: json.loads((f / f"{SAMPLES}.json").read_text())["sampler"] for b, f in _folders(tmp_path / "a").items()}
    expected = {k: v for k, v in presets.DEFAULTS.items() if k in presets.names_for("maskgit")}
    assert used[4] == {"kind": "maskgit", **expected, "cfg_scale": 1.5, "mask_schedule": "arccos"}
    assert used[8] == {**used[4], "temperature": 0.5}
    # a flag beats the preset, for every budget (the budget's own entry included)
    assert _sample(ckpts, prior, tmp_path / "b", "--cfg", "0.5", "--temperature", "0.9") == 0
    used = {b: json.loads((f / f"{SAMPLES}.json").read_text())["sampler"] for b, f in _folders(tmp_path / "b").items()}
    assert used[4]["cfg_scale"] == used[8]["cfg_scale"] == 0.5 and used[4]["temperature"] == used[8]["temperature"] == 0.9
    assert used[8]["mask_schedule"] == "arccos"
    # --no-preset ignores the file (budget 8 at the default temperature); the preset decides the images, not
    # only the record: budget 4 from the preset equals budget 4 from the same settings given as flags
    assert _sample(ckpts, prior, tmp_path / "c", "--no-preset", "--cfg", "1.5", "--mask-schedule", "arccos") == 0
    assert json.loads((_folders(tmp_path / "c")[8] / f"{SAMPLES}.json").read_text())["sampler"]["temperature"] == 1.0
    preset_run = load_image_set(_folders(tmp_path / "a")[4] / f"{SAMPLES}.npz")
    flag_run = load_image_set(_folders(tmp_path / "c")[4] / f"{SAMPLES}.npz")
    assert np.array_equal(preset_run["images"], flag_run["images"])
    assert _folders(tmp_path / "a")[4].name == _folders(tmp_path / "c")[4].name != _folders(tmp_path / "a")[8].name


@pytest.mark.parametrize(("preset", "message"), [
    ({"default": {"guidance": 2}}, "'guidance' is not a sampler setting: use one of cfg, cfg_schedule"),
    ({"default": {"top_p": 0.9}}, "top_p (--top-p) in " ),
    ({"default": {"temperature": -1}}, "default.temperature=-1 is out of range: use a number >= 0"),
    ({"default": {"steps": 2.5}}, "default.steps=2.5 is not valid: use an integer >= 1"),
    ({"default": {"cfg_schedule": "cosine"}}, "is out of range: use one of constant, linear, linear-down"),
    ({"budgets": {"7": {"cfg": 1}}}, "budget '7' is not one of the prior's budgets"),
    ({"defaults": {}}, "unexpected ['defaults']"),
])
def test_bad_presets_are_refused_in_one_line(ckpts: dict[str, Path], prior: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture, preset: dict, message: str) -> None:
    _write(prior, preset)
    assert _sample(ckpts, prior, tmp_path / "s") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("alit sample: ") and message in err[0], err
    assert not (tmp_path / "s").exists()


def test_flags_the_prior_kind_does_not_use_are_refused(ckpts: dict[str, Path], tmp_path: Path,
                                                       capsys: pytest.CaptureFixture) -> None:
    cases = [(ckpts["ar"], ["--steps", "4"], "steps (--steps) in the command line only applies to maskgit priors"),
             (ckpts["prior"], ["--top-k", "5"], "top_k (--top-k) in the command line only applies to ar priors"),
             (ckpts["prior"], ["--choice-temperature", "-1"], "--choice-temperature=-1.0 is out of range"),
             (ckpts["prior"], ["--preset", str(tmp_path / "none.json")], "does not exist")]
    for prior, extra, message in cases:
        assert _sample(ckpts, prior, tmp_path / "s", *extra) == 2, extra
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (extra, err)
    assert not (tmp_path / "s").exists()


def test_save_best_keeps_the_rest_of_the_preset(prior: Path) -> None:
    _write(prior, {"default": {"cfg": 1.5}, "budgets": {"4": {"steps": 4}, "8": {"temperature": 0.5}}})
    presets.save_best(prior, {"8": {"cfg_scale": 3.0, "steps": 6}}, {"8": {"gfid": 1.0}})
    again = presets.load_preset(prior / presets.PRESET_FILE, "maskgit", [4, 8])
    assert again.default == {"cfg_scale": 1.5} and again.budgets == {"4": {"steps": 4},
                                                                      "8": {"cfg_scale": 3.0, "steps": 6}}
    assert again.notes == {"8": {"gfid": 1.0}}
    base, per_budget = presets.resolve(again, {"steps": 10})
    assert presets.for_budget(base, per_budget, 8) == {**presets.DEFAULTS, "cfg_scale": 3.0, "steps": 10}
    assert presets.for_budget(base, per_budget, 4) == {**presets.DEFAULTS, "cfg_scale": 1.5, "steps": 10}
