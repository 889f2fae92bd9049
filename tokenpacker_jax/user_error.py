"""Mistakes a person running a command can fix, and how every command reports them.

``UserError`` is the base of the project's errors whose message is the whole report: it names
the thing (file, flag, config field, checkpoint step) and says what is wrong or what to do.
``configuration.ConfigError``, ``data.errors.DataError``, ``data.image.ImageError`` and the
checkpoint errors derive from it. An ``OSError`` (a path the command cannot open or create,
a full disk) and a flag absl or argparse rejects count too (``is_user_error``).

Every entry point runs its ``main`` through ``run_absl`` or ``run_argparse``: such an error is
printed as one line on stderr, ``PROG: error: MESSAGE``, and the command exits with status 2;
anything else (a bug) keeps its traceback and exits with 1. The traceback of a user error is
shown with absl's ``--verbosity=1`` (``-v 1``) or argparse commands' ``--verbose``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any

EXIT_STATUS = 2


class UserError(Exception):
    """Something the person running the command must fix; the message says what and where."""


class InputError(UserError, ValueError):
    """A file or flag value the command cannot use (not a config field, not a data record)."""


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be restored: none in the directory, no such step, damaged
    files, or one of another model."""


class CheckpointNotFound(CheckpointError, FileNotFoundError):
    """No checkpoint (or no such step) in a directory."""


def is_user_error(err: BaseException) -> bool:
    """UserError, an OSError (a path that cannot be opened or created, a full disk, ...), or
    a flag absl rejected."""
    # absl's error types where absl was imported (argparse commands need not have it).
    absl = [getattr(sys.modules[module], name) for module, name in
            (("absl.flags", "Error"), ("absl.app", "UsageError")) if module in sys.modules]
    return isinstance(err, (UserError, OSError, *absl))


def one_line(err: BaseException) -> str:
    """The error's message on one line (an OSError: its reason and file)."""
    if isinstance(err, OSError) and err.filename is not None and err.strerror:
        text = f"{err.filename}: {err.strerror}"
    else:
        text = str(err) or type(err).__name__
    return " ".join(text.split())


def report(prog: str, err: BaseException) -> None:
    print(f"{prog}: error: {one_line(err)}", file=sys.stderr, flush=True)


def _guarded(prog: str, main: Callable[..., Any], verbose: Callable[[], bool],
             *args: Any) -> Any:
    try:
        return main(*args)
    except Exception as err:
        if not is_user_error(err) or verbose():
            raise
        report(prog, err)
        sys.exit(EXIT_STATUS)


def _flag_error(argv: Sequence[str], err: Exception) -> str:
    """One line for an error raised while absl parsed ``argv``."""
    text = str(err)
    if "Traceback (most recent call last)" in text:  # config_flags: a config file's error
        flag = text.split(": Error whilst", 1)[0]
        text = f"{flag}: {text.strip().splitlines()[-1]}"
    elif isinstance(err, (AttributeError, KeyError)):  # config_flags: an unknown field
        field = text.strip("\"'")
        for arg in argv:
            name = arg.split("=")[0]
            if name.startswith("--") and field in name.lstrip("-").split("."):
                return f"{name}: the config has no field {field!r}"
    return " ".join(text.split())


def run_absl(main: Callable[[list[str]], Any], prog: str) -> None:
    """``absl.app.run(main)``, with flag errors and user errors as one line each."""
    from absl import app, flags  # noqa: PLC0415 (absl: launch/*.py run without it)

    def parse_flags(argv: list[str]) -> list[str]:
        try:
            return flags.FLAGS(argv)
        except Exception as err:  # anything the command line's parsing raises is about it
            if any(a.startswith(("--verbosity", "-v")) for a in argv[1:]):
                raise
            print(f"{prog}: error: {_flag_error(argv, err)}", file=sys.stderr, flush=True)
            sys.exit(EXIT_STATUS)

    def verbose() -> bool:
        return flags.FLAGS["verbosity"].value >= 1

    app.run(lambda argv: _guarded(prog, main, verbose, argv), flags_parser=parse_flags)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with ``--verbose`` (tracebacks of user errors) and one-line usage errors."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.add_argument("--verbose", action="store_true",
                          help="On an error, show its traceback.")

    def error(self, message: str):
        print(f"{self.prog}: error: {' '.join(message.split())} (--help for usage)",
              file=sys.stderr, flush=True)
        sys.exit(EXIT_STATUS)


def run_argparse(main: Callable[[Sequence[str]], Any], prog: str,
                 argv: Sequence[str] | None = None) -> Any:
    """``main(argv)`` (default: the command line) with user errors as one line; ``main``
    parses with an ``ArgumentParser`` above, so ``--verbose`` is among its flags."""
    argv = list(sys.argv[1:] if argv is None else argv)
    return _guarded(prog, main, lambda: "--verbose" in argv, argv)
