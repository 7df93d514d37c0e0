"""Stage 3 of the GPU check: the GPU-marked tests, the kernel tests and the launch-grid tests.

Runs pytest in this process, spread over up to 8 workers where pytest-xdist is installed (each
new kernel specialisation is a Triton compile; workers compile in parallel), with a per-test time
limit where pytest-timeout is installed.  Counts outcomes as they arrive, so a run stopped by the
stage's time limit still reports them; the JUnit XML goes where --junit says.  A dry run leaves
out tests/test_kernels.py, which the CPU suite already runs under the interpreter.

    PYTHONPATH=. python3 benchmarks/run_tests.py [--junit PATH] [--dry-run]
"""

from __future__ import annotations

import importlib.util
import os
from collections import Counter

import pytest
from stage_util import figures, run_stage, stage_parser

TEST_FILES = ["tests/test_gpu.py", "tests/test_kernels.py", "tests/test_launch_grids.py"]
PER_TEST_SECONDS = 120
DRY_RUN_SCALE = 20  # as the stage limits of a dry run (stages.sh)


class Tally:
    """A pytest plugin that counts outcomes and names failures as they happen."""

    def __init__(self):
        self.counts = Counter()
        self.failed: list[str] = []

    def pytest_runtest_logreport(self, report):
        if report.when == "call" or report.outcome != "passed":
            if report.when != "call" and report.outcome == "failed":
                outcome = "error"
            else:
                outcome = report.outcome
            self.counts[outcome] += 1
            if report.outcome == "failed":
                self.failed.append(report.nodeid.split("::", 1)[-1])
            if report.outcome == "failed" or sum(self.counts.values()) % 20 == 0:
                figures(self.line())

    def line(self) -> str:
        text = ", ".join(f"{self.counts[k]} {k}" for k in ("passed", "failed", "error", "skipped"))
        if self.failed:
            text += "; failed: " + ", ".join(self.failed[:5]) + (" ..." if len(self.failed) > 5 else "")
        return text


def main() -> int:
    parser = stage_parser(__doc__.splitlines()[0])
    parser.add_argument("--junit", help="write the JUnit XML report here")
    args = parser.parse_args()
    files = [f for f in TEST_FILES if not (args.dry_run and f.endswith("test_kernels.py"))]
    options = ["-q", "-rfE", "-p", "no:cacheprovider", *files]
    if args.junit:
        options.append(f"--junitxml={args.junit}")
    if importlib.util.find_spec("pytest_timeout"):  # a hang guard; a dry run's CPU may be slow or loaded
        options.append(f"--timeout={PER_TEST_SECONDS * (DRY_RUN_SCALE if args.dry_run else 1)}")
    if importlib.util.find_spec("xdist"):  # the project's addopts say -n auto: choose here instead
        workers = min(8, os.cpu_count() or 1) if not args.dry_run and (os.cpu_count() or 1) >= 4 else 0
        options += ["-n", str(workers)]
    else:  # without pytest-xdist the project's "-n auto" would be an unknown option
        options += ["-o", "addopts=-ra"]
    if args.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    tally = Tally()
    code = int(pytest.main(options, plugins=[tally]))
    figures(tally.line() + f" (pytest exit {code})")
    return code


if __name__ == "__main__":
    run_stage(main)
