"""Reliability: every fault is injected for real (SIGKILL, a full or read-only disk, corrupt files, a second
run on the same directory) and the test asserts that nothing was lost.

Training runs are real ``alit train`` processes (``python -m slurm.cli`` or ``tests/reliability_worker.py``,
which adds a delay or a fault by monkeypatching in its own process) on one CPU thread, so an interrupted
and resumed run can be compared **bit for bit** with an uninterrupted one: the final export (the EMA
weights), the last checkpoint (model, EMA, optimizer) and the training losses of every step.

Metrics comparison: ``metrics.jsonl`` of a killed run also holds the rows it logged after its last
checkpoint; the resumed run logs those steps again. The test requires *every* row (the early copy and
the re-logged one) to equal the uninterrupted run's row of that step (``images_per_s`` left out), the
steps logged twice to be exactly those between the checkpoint resumed from and the kill, and the
steps covered to be all of the reference's.

Already proven elsewhere, not repeated here:
    tests/test_trainer.py       in-process bit-exact resume after a requested stop (Preempted); a
                                non-finite step skipped, TrainingDiverged after max_bad_steps naming the step
                                and the last good checkpoint; RunLock naming its holder (same process);
                                checkpoint integrity at the function level (partial and manifest-less
                                directories ignored, truncation/tampering/newer format refused,
                                latest_checkpoint(verify=True) falling back); chmod read-only (non-root) and
                                a failing writer keeping the previous checkpoint.
    tests/test_data.py          the dataset alone: corrupt/empty/truncated/huge/odd-mode files, a file broken
                                after the scan substituted and counted.
    tests/test_alit.py          an exported tokenizer's config/weights mismatch and newer format version.
    tests/test_token_cache.py   the token cache and the prior/tokenizer identity checks.

"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from slurm.cli import main as alit
from tokenizer.core import trainer as trainer_mod
from tokenizer.core.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    list_checkpoints,
    save_checkpoint,
    verify_checkpoint,
    write_manifest,
)
from tokenizer.core.trainer import RunLock

ROOT = Path(__file__).resolve().parents[1]
TOK_CONFIG = "configs/tokenizer/distill_emoji_cpu.yaml"
PRIOR_CONFIG = "configs/prior/maskgit_emoji_cpu.yaml"
MAX_STEPS, CKPT_EVERY = 12, 3
LOOP = ["train.batch_size=8", f"train.ckpt_every={CKPT_EVERY}", f"train.max_steps={MAX_STEPS}",
        "train.eval_every=0", "train.log_every=1", "train.progress=false", "train.tensorboard=false"]
TIMEOUT = 240  # seconds a subprocess may take before the test fails (normally 5-15 s)


# ============================================================================ subprocess plumbing
def _env(home: Path) -> dict[str, str]:
    """The environment of a training subprocess: its own ALIT_HOME, one thread, no launcher variables."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("SLURM_") and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(ALIT_HOME=str(home), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env  # ALIT_WEIGHTS_CACHE is kept as it is


@dataclass
class Proc:
    """A started ``alit`` subprocess whose stdout and stderr go to ``log``."""

    popen: subprocess.Popen
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def finish(self, timeout: float = TIMEOUT) -> int:
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            pytest.fail(f"subprocess {self.pid} did not finish in {timeout} s:\n{self.output()[-3000:]}")

    def kill9(self) -> None:
        """SIGKILL (no handler, no cleanup, no flush) and reap."""
        os.kill(self.pid, signal.SIGKILL)
        self.popen.wait(30)

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(30)


def _spawn(env: dict[str, str], log: Path, args: list[str], worker: list[str] | None = None) -> Proc:
    """``python -m slurm.cli ARGS`` (the real CLI), or the fault-injecting worker when ``worker`` is given."""
    cmd = [sys.executable, "-m", "slurm.cli", *args] if worker is None else \
        [sys.executable, "-m", "tests.reliability_worker", *worker, "--", *args]
    fh = open(log, "w")  # noqa: SIM115 - the child owns it; closed here right after the fork
    try:
        popen = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT)
    finally:
        fh.close()
    return Proc(popen, log)


@pytest.fixture
def procs() -> Iterator[list[Proc]]:
    """Processes a test starts; any still running at the end are killed (by pid, ours only)."""
    started: list[Proc] = []
    yield started
    for p in started:
        p.stop()


def _wait_for(cond: Callable[[], bool], proc: Proc, what: str, timeout: float = TIMEOUT) -> None:
    """Poll ``cond`` every 20 ms while ``proc`` runs; fail if it exits first or time runs out."""
    t0 = time.monotonic()
    while not cond():
        if proc.popen.poll() is not None:
            rc = proc.popen.returncode
            pytest.fail(f"process exited (rc {rc}) before {what}:\n{proc.output()[-3000:]}")
        if time.monotonic() - t0 > timeout:
            proc.stop()
            pytest.fail(f"timed out waiting for {what}:\n{proc.output()[-3000:]}")
        time.sleep(0.02)


def _tok_args(run_dir: Path, base_dir: Path, *extra: str) -> list[str]:
    """A tiny distillation run (untrained tiny base VQ, tiny ALIT, 64 emoji) of MAX_STEPS steps."""
    return ["train", "tokenizer", "--config", TOK_CONFIG, f"base={base_dir}", "alit_size=tiny",
            "data.max_images=64", *LOOP, f"run_dir={run_dir}", *extra]


def _prior_args(run_dir: Path, cache: Path, *extra: str) -> list[str]:
    """A tiny MaskGIT run (random masking and class dropout in every step) on the module's token cache."""
    return ["train", "prior", "--config", PRIOR_CONFIG, f"tokens={cache}", "model.width=32", "model.depth=1",
            "model.heads=2", *LOOP, f"run_dir={run_dir}", *extra]


# ============================================================================ what a run left behind
def _train_rows(run_dir: Path) -> list[tuple[int, dict]]:
    """``(step, row)`` of every training row of ``metrics.jsonl`` in file order (``images_per_s`` dropped)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    text = path.read_text()
    lines = text.split("\n")[:-1]  # a line still being written (no newline yet, while polling) is left out
    rows = [json.loads(line) for line in lines]
    return [(r["step"], {k: v for k, v in r.items() if k != "images_per_s"})
            for r in rows if r["kind"] == "train"]


def _last_logged(run_dir: Path) -> int:
    return max((s for s, _ in _train_rows(run_dir)), default=0)


def _ckpt_step(run_dir: Path) -> int:
    """The step of the checkpoint ``latest`` points at (0 when there is none)."""
    pointer = run_dir / "checkpoints" / "latest"
    return int(pointer.read_text().strip().removeprefix("step_")) if pointer.is_file() else 0


def _re(text: object) -> str:
    """``text`` (a path, a name) as a literal regex."""
    return re.escape(str(text))


def _tensors(directory: Path) -> dict[str, dict[str, torch.Tensor]]:
    files = sorted(directory.rglob("*.safetensors"))
    return {p.relative_to(directory).as_posix(): load_file(str(p)) for p in files}


def _assert_same_tensors(a: Path, b: Path) -> None:
    ta, tb = _tensors(a), _tensors(b)
    assert ta and ta.keys() == tb.keys(), (sorted(ta), sorted(tb))
    for name in ta:
        assert ta[name].keys() == tb[name].keys(), name
        for k, v in ta[name].items():
            same = v.dtype == tb[name][k].dtype and torch.equal(v, tb[name][k])
            assert same, f"{a.name}/{name}: tensor {k} differs from {b}"


def _assert_same_run(run: Path, ref: Path, relogged: set[int]) -> None:
    """``run`` (interrupted and resumed) ended exactly where the uninterrupted ``ref`` did."""
    # final export (the EMA weights, and for a tokenizer its base) and its configs
    _assert_same_tensors(run / "final", ref / "final")
    for cfg in sorted((ref / "final").rglob("*.json")):
        rel = cfg.relative_to(ref / "final")
        assert (run / "final" / rel).read_text() == cfg.read_text(), rel
    # the last checkpoint: live model, EMA shadow, optimizer moments, data position
    last_run, last_ref = latest_checkpoint(run, verify=True), latest_checkpoint(ref, verify=True)
    assert last_run is not None and last_ref is not None and last_run.name == last_ref.name
    _assert_same_tensors(last_run, last_ref)
    assert {"model.safetensors", "ema.safetensors"} <= set(_tensors(last_run))
    s_run, s_ref = (json.loads((p / "state.json").read_text()) for p in (last_run, last_ref))
    assert (s_run["step"], s_run["sampler"]) == (s_ref["step"], s_ref["sampler"])
    # the per-step training losses (see the module docstring for how re-logged rows are compared)
    ref_rows = dict(_train_rows(ref))
    assert sorted(ref_rows) == list(range(1, MAX_STEPS + 1))
    rows = _train_rows(run)
    steps = [s for s, _ in rows]
    assert sorted(set(steps)) == sorted(ref_rows)
    assert {s for s in steps if steps.count(s) > 1} == relogged
    for step, row in rows:
        assert row == ref_rows[step], f"step {step}: {row} != {ref_rows[step]}"


# ============================================================================ shared inputs
@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """In-process work on one thread, like the subprocesses: bit-identical results (the disk-full and
    read-only runs are compared with a subprocess reference), and no slowdown from two busy threads."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("alit_home_sub")


@pytest.fixture(scope="module")
def env(home: Path) -> dict[str, str]:
    return _env(home)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A freshly saved, untrained tiny base VQ (what stage distill starts from)."""
    from tokenizer.vq import BaseVQ, base_vq_config

    torch.manual_seed(0)
    return BaseVQ(base_vq_config("tiny")).save_pretrained(tmp_path_factory.mktemp("base") / "vq")


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny untrained ALIT tokenizer with a spread-out init (so its codes depend on the image)."""
    from tokenizer.alit import ALITTokenizer
    from tokenizer.vq import BaseVQ, base_vq_config

    torch.manual_seed(1)
    tok = ALITTokenizer.build(BaseVQ(base_vq_config("tiny")), "tiny", image_size=64)
    with torch.no_grad():
        for p in tok.parameters():
            if p.ndim > 1:
                p.normal_(0, 0.2)
    return tok.eval().save_pretrained(tmp_path_factory.mktemp("tok") / "tok")


@pytest.fixture(scope="module")
def cache(tok_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from generator.cache import build_token_cache
    from tokenizer.core.data import DataConfig

    data = DataConfig(source="emoji", max_images=24, val_fraction=0.25)  # 18 train images x 4 budgets
    out = tmp_path_factory.mktemp("cache") / "c"
    return build_token_cache(tok_dir, data, out, batch_size=32, progress=False)


class RefRun:
    """An uninterrupted run, started when first requested (so it overlaps the test that asked for it)."""

    def __init__(self, env: dict[str, str], run_dir: Path, args: list[str]) -> None:
        self.run_dir = run_dir
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        self.proc = _spawn(env, run_dir.parent / f"{run_dir.name}.log", args)
        self.rc: int | None = None

    def result(self) -> Path:
        if self.rc is None:
            self.rc = self.proc.finish()
        assert self.rc == 0, f"reference run failed:\n{self.proc.output()[-3000:]}"
        return self.run_dir


@pytest.fixture(scope="module")
def tok_ref(env: dict[str, str], base_dir: Path,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[RefRun]:
    run = tmp_path_factory.mktemp("tok_ref") / "run"
    ref = RefRun(env, run, _tok_args(run, base_dir))
    yield ref
    ref.proc.stop()


@pytest.fixture(scope="module")
def prior_ref(env: dict[str, str], cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RefRun]:
    run = tmp_path_factory.mktemp("prior_ref") / "run"
    ref = RefRun(env, run, _prior_args(run, cache))
    yield ref
    ref.proc.stop()


# ============================================================================ 1. kill -9 mid-training
def _kill_mid_training_then_resume(env: dict[str, str], procs: list[Proc], tmp_path: Path, args: list[str],
                                   step_delay: str) -> tuple[Path, set[int]]:
    """Start ``args``, SIGKILL it once a checkpoint exists and two more steps were logged, rerun it.

    Returns the run directory and the steps the resumed run logged a second time.
    """
    run = tmp_path / "run"
    victim = _spawn(env, tmp_path / "killed.log", args, ["--step-delay", step_delay])
    procs.append(victim)
    _wait_for(lambda: _ckpt_step(run) > 0 and _last_logged(run) >= _ckpt_step(run) + 2, victim,
              "a checkpoint and two later steps")
    victim.kill9()
    assert victim.popen.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (run / "final").exists()
    resumed_from, killed_at = _ckpt_step(run), _last_logged(run)
    assert 0 < resumed_from < killed_at < MAX_STEPS

    again = _spawn(env, tmp_path / "resumed.log", args)  # the same command, plain CLI
    procs.append(again)
    assert again.finish() == 0, again.output()[-3000:]
    assert f"resumed from {run / 'checkpoints' / f'step_{resumed_from:08d}'} at step {resumed_from}" \
        in again.output()
    return run, set(range(resumed_from + 1, killed_at + 1))


def test_kill9_mid_training_tokenizer_resumes_bit_exact(env: dict[str, str], base_dir: Path, tok_ref: RefRun,
                                                        procs: list[Proc], tmp_path: Path) -> None:
    """Item 1: SIGKILL a distillation run between checkpoints; the rerun ends bit-identical to an
    uninterrupted run."""
    args = _tok_args(tmp_path / "run", base_dir)
    run, relogged = _kill_mid_training_then_resume(env, procs, tmp_path, args, step_delay="0.05")
    _assert_same_run(run, tok_ref.result(), relogged)
    assert [p.name for p in list_checkpoints(run)] == ["step_00000006", "step_00000009", "step_00000012"]


def test_kill9_mid_training_prior_resumes_bit_exact(env: dict[str, str], cache: Path, prior_ref: RefRun,
                                                    procs: list[Proc], tmp_path: Path) -> None:
    """Item 1: the same for a MaskGIT prior on a token cache built from a tiny untrained tokenizer."""
    args = _prior_args(tmp_path / "run", cache)
    run, relogged = _kill_mid_training_then_resume(env, procs, tmp_path, args, step_delay="0.15")
    ref = prior_ref.result()
    _assert_same_run(run, ref, relogged)
    from generator.tasks import load_prior

    a, b = load_prior(run / "final"), load_prior(ref / "final")
    pairs = zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    assert all(torch.equal(x, y) for x, y in pairs)


def test_kill9_mid_training_with_two_workers_resumes_bit_exact(env: dict[str, str], base_dir: Path,
                                                               tok_ref: RefRun, procs: list[Proc],
                                                               tmp_path: Path) -> None:
    """Item 1 with ``num_workers: 2`` and persistent workers: the DataLoader reads batches ahead of training,
    but the data position saved is the one trained, so the rerun ends bit-identical to the uninterrupted
    run, which used no workers at all (the worker count changes nothing)."""
    args = _tok_args(tmp_path / "run", base_dir, "train.num_workers=2", "train.persistent_workers=true")
    run, relogged = _kill_mid_training_then_resume(env, procs, tmp_path, args, step_delay="0.05")
    _assert_same_run(run, tok_ref.result(), relogged)
    ref = tok_ref.result()
    for ckpt in list_checkpoints(run):  # no workers reads nothing ahead: its saved positions are the trained ones
        state, ref_state = (json.loads((d / ckpt.name / "state.json").read_text())
                            for d in (run / "checkpoints", ref / "checkpoints"))
        assert state["sampler"] == ref_state["sampler"], ckpt.name


def test_kill9_mid_training_prior_with_two_workers_resumes_bit_exact(env: dict[str, str], cache: Path,
                                                                     prior_ref: RefRun, procs: list[Proc],
                                                                     tmp_path: Path) -> None:
    """Item 1 for a prior with ``num_workers: 2`` and persistent workers: the token dataset is read by two
    worker processes (each with its own copy of the cache's arrays), the run is SIGKILLed between
    checkpoints and rerun with the same command; final weights, EMA, optimizer moments, data positions and
    per-step losses equal the uninterrupted run's, which used no workers."""
    args = _prior_args(tmp_path / "run", cache, "train.num_workers=2", "train.persistent_workers=true")
    run, relogged = _kill_mid_training_then_resume(env, procs, tmp_path, args, step_delay="0.15")
    ref = prior_ref.result()
    _assert_same_run(run, ref, relogged)
    for ckpt in list_checkpoints(run):  # the positions saved are the trained ones, not the workers' read-ahead
        state, ref_state = (json.loads((d / ckpt.name / "state.json").read_text())
                            for d in (run / "checkpoints", ref / "checkpoints"))
        assert state["sampler"] == ref_state["sampler"], ckpt.name
    from generator.tasks import load_prior

    a, b = load_prior(run / "final"), load_prior(ref / "final")
    pairs = zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    assert all(torch.equal(x, y) for x, y in pairs)


# ====================================================================== 2. kill -9 during a checkpoint write
def test_kill9_during_checkpoint_write(env: dict[str, str], base_dir: Path, tok_ref: RefRun,
                                       procs: list[Proc], tmp_path: Path) -> None:
    """Item 2: SIGKILL inside the write of the second checkpoint: the first survives, resumption is exact."""
    run, marker = tmp_path / "run", tmp_path / "in_save"
    args = _tok_args(run, base_dir)
    victim = _spawn(env, tmp_path / "killed.log", args, ["--hang-in-save", "6", "--marker", str(marker)])
    procs.append(victim)
    _wait_for(marker.is_file, victim, "the checkpoint write of step 6")
    victim.kill9()  # after model.safetensors of step 6, before its other files and manifest

    root = run / "checkpoints"
    partial = [p for p in root.iterdir() if p.name.startswith(".step_00000006.tmp-")]
    assert len(partial) == 1 and (partial[0] / "model.safetensors").is_file()
    assert not (partial[0] / "manifest.json").exists() and not (root / "step_00000006").exists()
    first = root / "step_00000003"
    assert verify_checkpoint(first)["step"] == 3
    assert list_checkpoints(run) == [first]  # the partial directory is never taken for a checkpoint
    assert latest_checkpoint(run) == first and latest_checkpoint(run, verify=True) == first
    assert (root / "latest").read_text().strip() == "step_00000003"

    again = _spawn(env, tmp_path / "resumed.log", args)
    procs.append(again)
    assert again.finish() == 0, again.output()[-3000:]
    assert f"resumed from {first} at step 3" in again.output()
    _assert_same_run(run, tok_ref.result(), relogged={4, 5, 6})
    # rotation kept the last three and removed the dead writer's temporary directory
    left = sorted(p.name for p in root.iterdir())
    assert left == ["latest", "step_00000006", "step_00000009", "step_00000012"]


# ====================================================================== 3. non-finite loss through the CLI
def test_nonfinite_loss_via_cli_stops_nonzero_with_checkpoint_intact(
        env: dict[str, str], base_dir: Path, procs: list[Proc], tmp_path: Path) -> None:
    """Item 3: NaN losses through the real CLI: non-zero exit, the step and terms named, checkpoint intact."""
    run = tmp_path / "run"
    proc = _spawn(env, tmp_path / "nan.log", _tok_args(run, base_dir), ["--nan-from-step", "4"])
    procs.append(proc)
    rc = proc.finish()
    out = proc.output()
    assert rc != 0, out[-3000:]
    first = run / "checkpoints" / "step_00000003"
    assert "TrainingDiverged: non-finite loss at step 6 for 3 consecutive steps" in out, out[-3000:]
    assert "loss/model=nan" in out and "ce/iter0=" in out  # the loss terms are listed
    assert f"Last good checkpoint: {first}" in out
    assert out.count("non-finite loss, update skipped") == 2
    assert latest_checkpoint(run, verify=True) == first and list_checkpoints(run) == [first]
    assert verify_checkpoint(first)["step"] == 3
    assert _last_logged(run) == 4 and not (run / "final").exists()  # no row for a skipped step


# ================================================================ 4. bad files through the public loaders
def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _break_header(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes((2**62).to_bytes(8, "little") + data[8:])  # the safetensors header length


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x40
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [_truncate, _break_header])
def test_exported_tokenizer_with_damaged_weights_is_refused(tok_dir: Path, tmp_path: Path, damage) -> None:
    from tokenizer.alit import ALITTokenizer

    copy = shutil.copytree(tok_dir, tmp_path / "tok")
    damage(copy / "model.safetensors")
    message = rf"{_re(copy / 'model.safetensors')} (is .*truncated or modified|does not match its sha256)"
    with pytest.raises(CheckpointError, match=message):
        ALITTokenizer.from_pretrained(copy)


def test_exported_tokenizer_with_damaged_base_is_refused(tok_dir: Path, tmp_path: Path) -> None:
    from tokenizer.alit import ALITTokenizer

    copy = shutil.copytree(tok_dir, tmp_path / "tok")
    _truncate(copy / "base" / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"base/model\.safetensors"):
        ALITTokenizer.from_pretrained(copy)


@pytest.fixture
def prior_dir(tmp_path: Path) -> Path:
    from generator.tasks import build_prior

    torch.manual_seed(0)
    model = build_prior("maskgit", "tiny", codebook_size=64, tokens_per_iter=4, num_budgets=2, num_classes=3,
                        width=32, depth=1, heads=2)
    return model.save_pretrained(tmp_path / "prior")


@pytest.mark.parametrize("damage", [_truncate, _break_header])
def test_exported_prior_with_damaged_weights_is_refused(prior_dir: Path, damage) -> None:
    from generator.tasks import load_prior

    damage(prior_dir / "model.safetensors")
    with pytest.raises(CheckpointError, match=rf"{_re(prior_dir / 'model.safetensors')} (is .*truncated or modified|does not match its sha256)"):
        load_prior(prior_dir)


def test_exported_prior_config_weights_mismatch_names_the_file(prior_dir: Path) -> None:
    from generator.tasks import load_prior

    cfg = json.loads((prior_dir / "config.json").read_text())
    cfg["config"]["width"] = 64
    (prior_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"config\.json .*manifest"):  # an edited config is refused
        load_prior(prior_dir)
    write_manifest(prior_dir, ["model.safetensors", "config.json"])  # consistent files, mismatched shapes
    with pytest.raises(CheckpointError, match=rf"{_re(prior_dir / 'model.safetensors')} does not match .*"
                                              r"other shapes .*\(4, 32\) vs model \(4, 64\)"):
        load_prior(prior_dir)


def test_exported_prior_newer_format_or_corrupt_config_is_refused(prior_dir: Path) -> None:
    from generator.tasks import load_prior

    good = (prior_dir / "config.json").read_text()
    (prior_dir / "config.json").write_text(json.dumps({**json.loads(good), "format_version": 99}))
    write_manifest(prior_dir, ["model.safetensors", "config.json"])
    with pytest.raises(CheckpointError, match="format version 99"):
        load_prior(prior_dir)
    (prior_dir / "config.json").write_text(good[:40])
    with pytest.raises(CheckpointError, match=r"config\.json"):
        load_prior(prior_dir)


def test_exported_models_with_a_flipped_weight_byte_are_refused(tok_dir: Path, prior_dir: Path,
                                                                tmp_path: Path) -> None:
    from generator.tasks import load_prior
    from tokenizer.alit import ALITTokenizer

    _flip_last_byte(prior_dir / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        load_prior(prior_dir)
    copy = shutil.copytree(tok_dir, tmp_path / "tok")
    _flip_last_byte(copy / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        ALITTokenizer.from_pretrained(copy)


def test_tampered_training_checkpoint_is_refused_and_resume_falls_back(
        cache: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """Item 4: a resume refuses a tampered checkpoint (saying so) and continues from the previous one."""
    run = tmp_path / "run"
    args = _prior_args(run, cache, "train.max_steps=6", "train.ckpt_every=2")
    assert alit(args) == 0
    ckpts = list_checkpoints(run)
    assert [p.name for p in ckpts] == ["step_00000002", "step_00000004", "step_00000006"]
    _flip_last_byte(ckpts[-1] / "ema.safetensors")
    capfd.readouterr()
    assert alit([*args, "train.max_steps=8"]) == 0
    err = capfd.readouterr().err
    assert f"refusing checkpoint {ckpts[-1]}" in err and "sha256" in err  # the refused one, and why
    assert f"resumed from {ckpts[1]} at step 4" in err
    assert [p.name for p in list_checkpoints(run)] == ["step_00000004", "step_00000006", "step_00000008"]
    assert all(verify_checkpoint(p) for p in list_checkpoints(run))  # step 6 was written again, good
    assert [s for s, _ in _train_rows(run)] == [1, 2, 3, 4, 5, 6, 5, 6, 7, 8]

    for p in list_checkpoints(run):  # nothing usable left: a clear error, never a silent fresh start
        _truncate(p / "model.safetensors")
    message = rf"alit train: no checkpoint in {_re(run / 'checkpoints')} passes verification"
    assert alit([*args, "train.max_steps=10"]) == 2  # a CheckpointError is bad input: one line, exit 2
    assert re.search(message, capfd.readouterr().err)


# -- loading never unpickles
PICKLE_MODULES = {"pickle", "_pickle", "cPickle", "dill", "joblib", "cloudpickle"}
HARMLESS = {"dump", "dumps", "HIGHEST_PROTOCOL", "DEFAULT_PROTOCOL", "PickleError", "PicklingError",
            "UnpicklingError"}
ALLOWED_UNPICKLERS = {("tokenizer/core/weights.py", "_NumpyOnlyUnpickler")}  # numpy arrays only


def _unsafe_loads(source: str, filename: str) -> list[str]:
    """Uses that can unpickle arbitrary objects: ``torch.load`` without ``weights_only=True``, anything that
    reads through a pickle module (except subclassing Unpickler in an allowed restricted class), and
    ``np.load`` with ``allow_pickle`` other than False."""
    tree = ast.parse(source)
    allowed = {name for f, name in ALLOWED_UNPICKLERS if f == filename}
    allowed_bases = {id(b) for node in ast.walk(tree)
                     if isinstance(node, ast.ClassDef) and node.name in allowed for b in node.bases}
    found = []
    for node in ast.walk(tree):
        where = f"{filename}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.ImportFrom) and node.module in PICKLE_MODULES:
            found += [f"{where}: from {node.module} import {a.name}"
                      for a in node.names if a.name not in HARMLESS]
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) \
                and node.value.id in PICKLE_MODULES and node.attr not in HARMLESS \
                and id(node) not in allowed_bases:
            found.append(f"{where}: {node.value.id}.{node.attr}")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                and isinstance(node.func.value, ast.Name) and node.func.attr == "load":
            kw = {k.arg: k.value for k in node.keywords}
            owner = node.func.value.id
            if owner == "torch" and not (isinstance(kw.get("weights_only"), ast.Constant)
                                         and kw["weights_only"].value is True):
                found.append(f"{where}: torch.load without weights_only=True")
            if owner in ("np", "numpy") and "allow_pickle" in kw and not (
                    isinstance(kw["allow_pickle"], ast.Constant) and kw["allow_pickle"].value is False):
                found.append(f"{where}: np.load with allow_pickle")
    return found


def test_scanner_finds_unsafe_loads() -> None:
    bad = ("import pickle\nimport torch, numpy as np\nx = pickle.load(f)\ny = torch.load(p)\n"
           "z = torch.load(p, weights_only=False)\nw = np.load(p, allow_pickle=True)\n"
           "from pickle import loads\nclass U(pickle.Unpickler): pass\n")
    found = _unsafe_loads(bad, "x.py")
    assert len(found) == 6, found
    ok = ("import torch\nt = torch.load(p, weights_only=True)\n"
          "import numpy as np\na = np.load(p, allow_pickle=False)\n")
    assert _unsafe_loads(ok, "x.py") == []
    allowed = "import pickle\nclass _NumpyOnlyUnpickler(pickle.Unpickler): pass\nE = pickle.UnpicklingError\n"
    assert _unsafe_loads(allowed, "tokenizer/core/weights.py") == []
    assert _unsafe_loads(allowed, "generator/other.py") != []


def test_packages_never_unpickle_without_restriction() -> None:
    """Item 4: no loader can unpickle arbitrary objects (only the numpy-only unpickler of weights.py)."""
    packages = ("tokenizer", "generator", "sampling", "slurm")
    files = [p for pkg in packages for p in sorted((ROOT / pkg).rglob("*.py"))]
    assert len(files) > 20
    found = [f for p in files for f in _unsafe_loads(p.read_text(), p.relative_to(ROOT).as_posix())]
    assert found == [], "\n".join(found)


# ============================================================================ 5. bad data during a real run
def _write_folder(root: Path) -> dict[str, Path]:
    """Two class folders of 64x64 images (some in odd pixel modes) and four files that must be skipped."""
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(5):
            Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(root / c / f"rgb{i}.png")
    Image.fromarray(rng.integers(0, 65536, (64, 64), dtype=np.uint16)).save(root / "a" / "grey16.png")
    rgba = Image.fromarray(rng.integers(0, 256, (64, 64, 4), dtype=np.uint8), "RGBA")
    rgba.convert("P").save(root / "a" / "pal.gif")
    Image.fromarray(rng.integers(0, 256, (64, 64, 2), dtype=np.uint8), "LA").save(root / "b" / "la.png")
    rgb = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    rgb.convert("CMYK").save(root / "b" / "cmyk.jpg")
    bad = {"corrupt": root / "a" / "corrupt.png", "empty": root / "b" / "empty.jpg",
           "truncated": root / "a" / "truncated.png", "huge": root / "b" / "huge.png"}
    bad["corrupt"].write_bytes(b"\x89PNG\r\n\x1a\n" + b"not an image" * 20)
    bad["empty"].write_bytes(b"")
    good = (root / "a" / "rgb0.png").read_bytes()
    bad["truncated"].write_bytes(good[: len(good) // 2])
    Image.new("1", (8200, 8200)).save(bad["huge"])  # 67 megapixels (a small file): above the 64 MP guard
    return bad


def test_bad_files_and_files_broken_mid_run_do_not_stop_training(
        base_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture) -> None:
    """Item 5: a real run on a folder with bad files and two more broken while it trains: they are skipped,
    counted and reported, and the run finishes."""
    import tokenizer.train as train_mod

    bad = _write_folder(tmp_path / "images")
    datasets = []
    build = train_mod.build_dataset

    def keep(cfg, split="train", **kw):
        ds = build(cfg, split, **kw)
        datasets.append(ds)
        return ds

    monkeypatch.setattr(train_mod, "build_dataset", keep)
    broken: list[Path] = []
    step_seed = trainer_mod.step_seed

    def break_files_at_step_1(seed: int, step: int, rank: int) -> int:  # after the scan, during the run
        if step == 1:
            train = next(d for d in datasets if d.split == "train")
            a, b = (train.source.paths[int(i)] for i in train.indices[[0, -1]])
            a.write_bytes(b"garbage now")
            b.unlink()
            broken.extend([a, b])
        return step_seed(seed, step, rank)

    monkeypatch.setattr(trainer_mod, "step_seed", break_files_at_step_1)
    run = tmp_path / "run"
    rc = alit(["train", "tokenizer", "--config", TOK_CONFIG, f"base={base_dir}", "alit_size=tiny",
               f"data.source={tmp_path / 'images'}", "data.val_fraction=0.15", "data.hflip=false",
               "train.batch_size=4", "train.max_steps=6", "train.ckpt_every=3", "train.eval_every=0",
               "train.log_every=1", "train.progress=false", "train.tensorboard=false", f"run_dir={run}"])
    assert rc == 0
    err = capfd.readouterr().err
    train = next(d for d in datasets if d.split == "train")
    assert len(train) == 12  # three batches of four per epoch: the six steps read every training file twice
    assert "4 files skipped" in err  # the run reports what the scan left out, with the count
    for name, path in bad.items():
        assert str(path) in caplog.text, name
    reasons = dict(train.source.skipped)
    assert "0 bytes" in reasons[str(bad["empty"])] and "too large" in reasons[str(bad["huge"])]
    # the two files broken during the run were substituted and counted, never a crash
    assert sorted(train.source.paths[i] for i in train.runtime_failures) == sorted(broken)
    assert "FileNotFoundError" in " ".join(train.runtime_failures.values())
    assert sum("substituting the next image" in r.getMessage() for r in caplog.records) == 2
    assert len(train.skipped) == 6
    losses = [row["loss/model"] for _, row in _train_rows(run)]
    assert len(losses) == 6 and all(np.isfinite(losses))
    assert (run / "final" / "model.safetensors").is_file()


# ================================================================ 6. disk full / read-only run directory
def _mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True, capture_output=True, text=True)


def _is_mount(path: Path) -> bool:
    """Whether ``path`` is a mount point, bind mounts of the same filesystem included (os.path.ismount
    compares device numbers, so it misses those)."""
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == str(path) for line in f)


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 13 MiB tmpfs (one ~9 MB tiny-distill checkpoint fits, a second does not); skips when not root."""
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (the disk-full and read-only runs are not tested)")
    try:
        _mount("-t", "tmpfs", "-o", "size=13m", "tmpfs", str(mnt))
    except (subprocess.CalledProcessError, FileNotFoundError) as e:
        pytest.skip(f"cannot mount a tmpfs here: {getattr(e, 'stderr', '') or e}")
    try:
        yield mnt
    finally:
        for target in (mnt / "run" / "checkpoints", mnt):  # the read-only bind first, if it is still there
            if _is_mount(target):  # lazy: a failed test's traceback may still hold mmapped safetensors
                subprocess.run(["umount", "--lazy", str(target)], check=False, capture_output=True)


def _assert_stopped_at_first_checkpoint(err: str, run: Path, reason: str) -> None:
    first = run / "checkpoints" / "step_00000003"
    assert reason in str(err) and "step 6" in str(err)
    assert f"Previous checkpoint intact: {first}" in str(err)
    assert verify_checkpoint(first)["step"] == 3
    assert latest_checkpoint(run, verify=True) == first
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]  # no partial left


def test_disk_full_while_saving_stops_clearly_and_resumes(base_dir: Path, tok_ref: RefRun, tmpfs: Path,
                                                          capfd: pytest.CaptureFixture[str]) -> None:
    """Item 6: the second checkpoint does not fit: a clear error naming the first, which resumes exactly."""
    run = tmpfs / "run"
    assert alit(_tok_args(run, base_dir)) != 0
    err = capfd.readouterr().err
    assert "alit train: could not write checkpoint" in err and "Traceback" not in err  # one line, exit 2
    _assert_stopped_at_first_checkpoint(err, run, "No space left on device")
    _mount("-o", "remount,size=64m", str(tmpfs))  # space freed: the same command resumes
    assert alit(_tok_args(run, base_dir)) == 0
    _assert_same_run(run, tok_ref.result(), relogged={4, 5, 6})


def test_read_only_run_directory_while_saving_stops_clearly_and_resumes(
        base_dir: Path, tok_ref: RefRun, tmpfs: Path, monkeypatch: pytest.MonkeyPatch,
        capfd: pytest.CaptureFixture[str]) -> None:
    """Item 6: checkpoints/ turns read-only mid-run (a read-only bind mount; chmod does not stop root)."""
    _mount("-o", "remount,size=64m", str(tmpfs))
    run = tmpfs / "run"
    ckpts = run / "checkpoints"
    step_seed = trainer_mod.step_seed

    def read_only_from_step_4(seed: int, step: int, rank: int) -> int:
        if step == 4:  # no checkpoint file is open now: make checkpoints/ a read-only bind of itself
            _mount("--bind", str(ckpts), str(ckpts))
            _mount("-o", "remount,bind,ro", str(ckpts))
        return step_seed(seed, step, rank)

    monkeypatch.setattr(trainer_mod, "step_seed", read_only_from_step_4)
    assert alit(_tok_args(run, base_dir)) != 0
    err = capfd.readouterr().err
    assert "alit train: could not write checkpoint" in err and "Traceback" not in err  # one line, exit 2
    assert _is_mount(ckpts)
    _assert_stopped_at_first_checkpoint(err, run, "Read-only file system")
    monkeypatch.setattr(trainer_mod, "step_seed", step_seed)
    subprocess.run(["umount", str(ckpts)], check=True)
    assert alit(_tok_args(run, base_dir)) == 0
    _assert_same_run(run, tok_ref.result(), relogged={4, 5, 6})


# ============================================================================ 7. concurrent runs
def test_second_run_on_the_same_directory_fails_fast(env: dict[str, str], base_dir: Path, tok_ref: RefRun,
                                                     procs: list[Proc], tmp_path: Path,
                                                     capfd: pytest.CaptureFixture[str]) -> None:
    """Item 7: a second run on a running run's directory fails at once, naming the holder; the first run
    is unharmed."""
    run = tmp_path / "run"
    first = _spawn(env, tmp_path / "first.log", _tok_args(run, base_dir), ["--step-delay", "0.4"])
    procs.append(first)
    holder = f"pid {first.pid} on {socket.gethostname()}"
    lock = run / ".lock"
    _wait_for(lambda: lock.is_file() and holder in lock.read_text(), first, "the run lock")

    t0 = time.monotonic()
    assert alit(_tok_args(run, base_dir)) != 0  # the second run, on the same directory, is refused
    assert re.search(rf"RunLocked: run directory {_re(run)} is in use by {_re(holder)} since", capfd.readouterr().err)
    assert time.monotonic() - t0 < 30
    assert first.popen.poll() is None, "the first run ended before the second was refused"
    assert holder in (run / ".lock").read_text()  # the lock file still names the first run

    assert first.finish() == 0, first.output()[-3000:]
    # the first run's checkpoints, metrics and export are exactly an undisturbed run's
    _assert_same_run(run, tok_ref.result(), relogged=set())


def test_locked_run_directory_keeps_its_config(base_dir: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("the running run's config\n")
    with RunLock(run):
        assert alit(_tok_args(run, base_dir, "train.lr=0.5")) != 0  # refused (RunLocked, reported by the CLI)
    assert (run / "config.yaml").read_text() == "the running run's config\n"


def test_cli_reports_training_failures_without_a_traceback(
        base_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capfd: pytest.CaptureFixture[str]) -> None:
    def check(args: list[str], message: str) -> None:
        capfd.readouterr()
        try:
            rc = alit(args)
        except Exception as e:
            raise AssertionError(f"{type(e).__name__} escaped the CLI: {e}") from e
        assert rc not in (0, None) and message in capfd.readouterr().err

    with RunLock(tmp_path / "locked"):
        check(_tok_args(tmp_path / "locked", base_dir), "is in use by")
    check(_tok_args(tmp_path / "x", base_dir, f"data.source={tmp_path / 'nowhere'}"), "does not exist")
    bad = save_checkpoint(tmp_path / "bad", 3, {"model": {"w": torch.zeros(2)}}, {}, {"sampler": {}})
    _truncate(bad / "model.safetensors")
    check(_tok_args(tmp_path / "bad", base_dir), "passes verification")
    from tokenizer.train import DistillTask

    def nan_step(self, batch, step):
        yield trainer_mod.Phase("model", torch.tensor(float("nan"), requires_grad=True))

    monkeypatch.setattr(DistillTask, "train_step", nan_step)
    check(_tok_args(tmp_path / "nan", base_dir), "non-finite loss")


# ============================================================================ 8. resume safety
def test_resume_with_a_changed_config_is_refused_unless_allowed(env: dict[str, str], cache: Path,
                                                               procs: list[Proc], tmp_path: Path) -> None:
    """A resume whose config differs from the run's config.yaml exits 2 with one line naming the changed key;
    ``--allow-config-change`` lists it, and the resume goes on and records the change. train.max_steps and
    the git commit may change freely."""
    run = tmp_path / "run"
    args = _prior_args(run, cache, "train.max_steps=4", "train.ckpt_every=2")
    assert alit(args) == 0
    saved = (run / "config.yaml").read_text()
    lr, beta2 = (float(yaml.safe_load(saved)["config"]["train"][k]) for k in ("lr", "beta2"))

    changed = [*args, "train.max_steps=6", "train.lr=0.002", "train.beta2=0.9"]
    refused = _spawn(env, tmp_path / "refused.log", changed)
    procs.append(refused)
    assert refused.finish() == 2, refused.output()[-3000:]
    out = refused.output()
    assert "Traceback" not in out, out
    [err] = [line for line in out.splitlines() if line.startswith("alit train:")]  # one line, the last
    assert out.rstrip().endswith(err) and not (run / "checkpoints" / "step_00000006").exists()
    assert err.startswith(f"alit train: run directory {run} was started with another config: ")
    assert f"train.lr ({lr} -> 0.002)" in err and f"train.beta2 ({beta2} -> 0.9)" in err
    assert "max_steps" not in err and "--allow-config-change train.beta2,train.lr" in err
    assert (run / "config.yaml").read_text() == saved and len(list_checkpoints(run)) == 2

    partly = _spawn(env, tmp_path / "partly.log", ["train", "prior", "--allow-config-change", "train.lr",
                                                   *changed[2:]])
    procs.append(partly)
    assert partly.finish() == 2 and f"train.beta2 ({beta2} -> 0.9)" in partly.output()  # every key, or none
    assert "train.lr (" not in partly.output()

    body = yaml.safe_load(saved)
    body["git_commit"] = "0" * 40  # the run started at another commit: noted, never refused
    (run / "config.yaml").write_text(yaml.safe_dump(body, sort_keys=False))
    allowed = _spawn(env, tmp_path / "allowed.log", ["train", "prior", "--allow-config-change",
                                                     "train.lr,train.beta2", *changed[2:]])
    procs.append(allowed)
    assert allowed.finish() == 0, allowed.output()[-3000:]
    out = allowed.output()
    assert f"resumed from {run / 'checkpoints' / 'step_00000004'} at step 4" in out
    assert f"resuming at step 4 with a changed config: train.beta2 ({beta2} -> 0.9), train.lr ({lr} -> 0.002), " \
           "train.max_steps (4 -> 6)" in out
    assert "the code changed since the run started (git 0000000000000000000000000000000000000000 -> " in out
    [record] = [json.loads(line) for line in (run / "config_changes.jsonl").read_text().splitlines()]
    assert record["step"] == 4 and record["git_commit"]["old"] == "0" * 40
    assert record["changes"] == {"train.beta2": {"old": beta2, "new": 0.9}, "train.lr": {"old": lr, "new": 0.002},
                                 "train.max_steps": {"old": 4, "new": 6}}
    new = yaml.safe_load((run / "config.yaml").read_text())["config"]
    assert (new["train"]["lr"], new["train"]["max_steps"]) == (0.002, 6)
    assert [s for s, _ in _train_rows(run)] == [1, 2, 3, 4, 5, 6]


def test_sigint_checkpoints_and_stops_then_resumes_bit_exact(env: dict[str, str], base_dir: Path,
                                                             tok_ref: RefRun, procs: list[Proc],
                                                             tmp_path: Path) -> None:
    """Ctrl-C (SIGINT) mid-run: the step in progress finishes, a checkpoint of it is written, the command
    exits 1 without a traceback; the same command resumes from it and ends as the uninterrupted run."""
    run = tmp_path / "run"
    args = _tok_args(run, base_dir)
    victim = _spawn(env, tmp_path / "interrupted.log", args, ["--step-delay", "0.1"])
    procs.append(victim)
    _wait_for(lambda: _last_logged(run) >= 4, victim, "four logged steps")
    os.kill(victim.pid, signal.SIGINT)
    assert victim.finish() == 1, victim.output()[-3000:]
    out = victim.output()
    stopped = _ckpt_step(run)
    assert 4 <= stopped < MAX_STEPS and _last_logged(run) == stopped  # checkpointed where it stopped
    assert f"alit train: Preempted: stopped at step {stopped} of {MAX_STEPS} on request (SIGINT)" in out
    assert "Traceback" not in out and "KeyboardInterrupt" not in out
    assert verify_checkpoint(run / "checkpoints" / f"step_{stopped:08d}")["step"] == stopped
    assert not (run / "final").exists()

    again = _spawn(env, tmp_path / "resumed.log", args)
    procs.append(again)
    assert again.finish() == 0, again.output()[-3000:]
    assert f"resumed from {run / 'checkpoints' / f'step_{stopped:08d}'} at step {stopped}" in again.output()
    _assert_same_run(run, tok_ref.result(), relogged=set())
