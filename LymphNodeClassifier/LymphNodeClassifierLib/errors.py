"""Errors a user can act on.

Every problem with the user's input is raised as `InputError` with one sentence that names the
problem and what to do about it. The CLI prints that sentence (no traceback) and exits with 2;
the Slicer module shows it in an error dialog.
"""


class InputError(ValueError):
    """Bad input from the user: a one-line message naming the problem and the fix."""


class CancelledError(RuntimeError):
    """A long task (training, cohort classification) was cancelled by the user."""
