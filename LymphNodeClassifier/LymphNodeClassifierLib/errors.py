"""Errors a user can act on, and the argument parser every command uses to report bad options.

Every problem with the user's input is raised as `InputError` with one sentence that names the
problem and what to do about it. The CLI prints that sentence (no traceback) and exits with 2;
the Slicer module shows it in an error dialog.
"""

import argparse


class InputError(ValueError):
    """Bad input from the user: a one-line message naming the problem and the fix."""


class CancelledError(RuntimeError):
    """A long task (training, cohort classification) was cancelled by the user."""


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse without the usage dump: a bad option raises InputError ("<problem>; see `<prog> --help`."),
    which the CLI prints as one line with exit code 2 and a worker reports as its error event."""

    def error(self, message: str) -> None:
        raise InputError(f"{message}; see `{self.prog} --help`.")
