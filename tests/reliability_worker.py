"""``alit`` in a subprocess, with one fault (or a delay) injected, for tests/test_reliability.py.

    python -m tests.reliability_worker [options] -- train tokenizer --config ... key=value ...

Everything after ``--`` goes to ``slurm.cli.main`` unchanged; the exit code is its return code (an
uncaught exception exits 1 with a traceback, as the ``alit`` console script does). Options:

``--step-delay S``       sleep S seconds at the start of every training step (slows a run down so that a
                         test can act while it is running; the numbers are unchanged)
``--hang-in-save STEP``  inside the checkpoint write of step STEP, after its first file is written, touch
                         ``--marker`` and sleep, so that the test can SIGKILL the process mid-write
``--nan-from-step K``    make the training loss of every step >= K non-finite (NaN)
``--marker PATH``        file touched when the process reaches the injected point

The process always runs on one CPU thread (deterministic and fast for tiny models).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tests.reliability_worker", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--step-delay", type=float, default=0.0)
    p.add_argument("--hang-in-save", type=int, default=None)
    p.add_argument("--nan-from-step", type=int, default=None)
    p.add_argument("--marker", type=Path, default=None)
    return p


def _touch(marker: Path | None, text: str) -> None:
    if marker is not None:
        marker.write_text(text)


def _install(opts: argparse.Namespace) -> None:
    """Monkeypatch the library in this process only."""
    import tokenizer.core.checkpoint as ck
    import tokenizer.core.trainer as tr

    if opts.step_delay > 0:
        step_seed = tr.step_seed

        def slow_step_seed(seed: int, step: int, rank: int) -> int:  # called once at the start of every step
            time.sleep(opts.step_delay)
            return step_seed(seed, step, rank)

        tr.step_seed = slow_step_seed

    if opts.hang_in_save is not None:
        save_tensors = ck.save_tensors
        tmp_prefix = f".{ck.PREFIX}{opts.hang_in_save:08d}.tmp-"

        def hanging_save_tensors(path, tensors, metadata=None) -> None:
            save_tensors(path, tensors, metadata)
            if Path(path).parent.name.startswith(tmp_prefix):  # only the checkpoint of that step
                _touch(opts.marker, str(path))
                time.sleep(600)  # the test SIGKILLs us here

        ck.save_tensors = hanging_save_tensors

    if opts.nan_from_step is not None:
        from tokenizer.train import TASKS

        def poisoned(train_step):
            def train_step_nan(self, batch, step: int):
                for phase in train_step(self, batch, step):
                    if step >= opts.nan_from_step:
                        phase.loss = phase.loss * float("nan")
                    yield phase
            return train_step_nan

        for task in TASKS.values():
            task.train_step = poisoned(task.train_step)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" not in argv:
        _parser().error("separate the worker options from the alit arguments with --")
    cut = argv.index("--")
    opts = _parser().parse_args(argv[:cut])

    import torch

    torch.set_num_threads(1)
    _install(opts)
    from slurm.cli import main as alit

    return alit(argv[cut + 1:])


if __name__ == "__main__":
    raise SystemExit(main())
