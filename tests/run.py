"""The test command behind ``make test`` (and CI): lint, then the suite, then what was skipped and why.

    python -m tests.run            # ruff + every test not marked slow
    python -m tests.run --slow     # also the slow tests
    python -m tests.run -- -k lpips   # extra arguments after -- go to pytest
    python -m tests.run --jobs 1   # in one process (default: one pytest-xdist worker per core, at most 4)

The workers take whole test files (``--dist loadfile``: a module's fixtures are built once). About half of the
suite's wall time on 2 cores was one busy core or none (imports of subprocesses and jobs, Slurm scheduling,
waiting for a process to reach a step): two workers fill it (2 cores, AMD Zen 4: 903 s in one process,
623 s on two workers).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slow", action="store_true", help="also run tests marked slow")
    parser.add_argument("--jobs", type=int, default=min(4, len(os.sched_getaffinity(0))), metavar="N",
                        help="pytest-xdist workers (default: one per usable core, at most 4; 1: one process)")
    parser.add_argument("pytest_args", nargs="*", help="passed to pytest (after --)")
    args = parser.parse_args(argv)

    print("== ruff check", flush=True)
    lint = subprocess.run([sys.executable, "-m", "ruff", "check", "."], cwd=ROOT)
    if lint.returncode != 0:
        print("ruff found problems (fix them or run `.venv/bin/ruff check --fix .`)", file=sys.stderr)
        return lint.returncode

    marker = [] if args.slow else ["-m", "not slow"]
    # --durations: the slowest tests of this machine, so the suite's budget (15 min) is checked where it runs.
    workers = ["-n", str(args.jobs), "--dist", "loadfile"] if args.jobs > 1 else []
    cmd = [sys.executable, "-m", "pytest", "-ra", "--durations=25", *workers, *marker, *args.pytest_args]
    print("== " + " ".join(cmd[2:]), flush=True)
    if not args.slow:
        print("   (tests marked 'slow' are deselected here: run `make test-slow` for them)", flush=True)
    # Idle OpenMP threads sleep instead of spinning: tests start subprocesses and Slurm jobs beside
    # pytest on few cores, where spinning threads slow everything down many times over.
    env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    rc = subprocess.run(cmd, cwd=ROOT, env=env).returncode
    if rc == 5:
        print("pytest collected no tests: treating as a failure", file=sys.stderr)
        return 1
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
