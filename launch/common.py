"""What the launch scripts share: their command line (steps, --dry-run, --config.* overrides)
and running (or, with --dry-run, printing) commands.

A dry run prints each command exactly as it would run it, one per line (``shlex.join``
quoting, so the output can be pasted into a shell); lines starting with ``#`` say what a
real run would do besides (wait, poll, write a file).
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

# The repository, where the package is not installed; its user_error imports no dependency.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tokenpacker_jax import user_error

# For gpu.py and tpu.py:
from tokenpacker_jax.user_error import ArgumentParser, UserError  # noqa: F401

# Pinned like requirements.txt; the accelerator's jax build replaces the CPU one.
JAX_TPU = "jax[tpu]==0.10.2"
JAX_CUDA = "jax[cuda13]==0.10.2"
REMOTE_DIR = "tokenpacker-jax"  # the repository's copy on each machine (relative to $HOME)


class Runner:
    """Runs commands, or prints them when ``dry_run``."""

    def __init__(self, dry_run: bool, out=None):
        self.dry_run = dry_run
        self.out = out or sys.stdout

    def say(self, text: str) -> None:
        for line in text.splitlines():
            print(f"# {line}", file=self.out)

    def run(self, argv: Sequence[str], *, capture: bool = False, check: bool = True) -> str:
        """Runs ``argv`` (no shell); returns its stdout when ``capture``."""
        print(shlex.join(argv), file=self.out, flush=True)
        if self.dry_run:
            return ""
        result = subprocess.run(list(argv), check=check, text=True,
                                stdout=subprocess.PIPE if capture else None)
        return result.stdout or ""

    def wait_until(self, argv: Sequence[str], done: Callable[[str], bool], *, what: str,
                   every_s: float = 30.0, timeout_s: float = 3600.0) -> None:
        """Reruns ``argv`` until ``done(its output)``; a dry run prints it once."""
        if self.dry_run:
            self.say(f"repeated every {every_s:g} s until {what}:")
            self.run(argv)
            return
        deadline = time.monotonic() + timeout_s
        while True:
            output = self.run(argv, capture=True, check=False).strip()
            if done(output):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"gave up after {timeout_s:g} s waiting until {what} "
                                   f"(last: {output!r})")
            time.sleep(every_s)


def add_common_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dry-run", action="store_true",
                        help="Print the commands instead of running them.")


def parse_with_overrides(parser: argparse.ArgumentParser, argv: Sequence[str]
                         ) -> argparse.Namespace:
    """``parser.parse_args(argv)``, except that ``--config.a.b=value`` flags are passed on
    to training as ``args.overrides``; any other unknown flag is an error."""
    args, extra = parser.parse_known_args(argv)
    args.overrides = extra
    bad = [e for e in extra if not e.startswith("--config.")]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)}")
    return args


def main(steps: dict[str, Callable[[argparse.Namespace, Runner], None]],
         parse_args: Callable[[list[str]], argparse.Namespace], prog: str,
         argv: list[str] | None = None) -> None:
    """Runs the step ``argv`` (default: the command line) names, for real or as a dry run;
    a mistake (a flag, a command that failed) is one line on stderr."""
    def run(argv: list[str]) -> None:
        args = parse_args(argv)
        try:
            steps[args.step](args, Runner(args.dry_run))
        except subprocess.CalledProcessError as err:
            raise UserError(f"{shlex.join(err.cmd)} failed (exit status {err.returncode})"
                            ) from err

    user_error.run_argparse(run, prog, argv)


def train_command(config: str, workdir: str, overrides: Sequence[str],
                  distributed: bool, python: str = "python") -> list[str]:
    """``python -m tokenpacker_jax.train`` with the config, workdir and overrides."""
    argv = [python, "-m", "tokenpacker_jax.train", f"--config={config}",
            f"--workdir={workdir}"]
    if distributed:
        argv.append("--config.distributed.initialize=true")
    for override in overrides:
        if not override.startswith("--config."):
            raise UserError(f"overrides must look like --config.a.b=value, got {override!r}")
        argv.append(override)
    return argv


def pip_install(jax_package: str, python: str = "python3") -> str:
    """Shell line installing the repository in the current directory with ``jax_package``
    (the accelerator's jax build on top of requirements.txt's pins)."""
    pip = f"{python} -m pip install -q"
    return (f"{pip} -r requirements.txt && {pip} {shlex.quote(jax_package)} "
            f"&& {pip} --no-deps -e .")
