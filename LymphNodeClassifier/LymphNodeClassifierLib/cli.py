"""Command line: `python -m LymphNodeClassifierLib <command> ...` (or `lymphnode-classifier <command>`).

Every command is a small module with a `main(argv) -> exit code`; this file dispatches and holds
what every command shares, so a stage module keeps only its stage:

- one error path (`exit_code`): a user's error is one line on stderr, "error: <problem>; <what to
  do>", exit 2 (bad options too: every parser is an `errors.OneLineArgumentParser`); a closed stdout
  pipe ends quietly (141); a cancel 130;
- one progress line (`ProgressLine`), always ended before any other output;
- `--version`. The other shared pieces live with what they check: `fileio.check_writable_folder` /
  `check_writable_file` (the output place, before any work) and `model_registry.choose_model`
  (`--model`: a file, a bundled model's name, or the active model).
"""

from __future__ import annotations

import importlib
import os
import sys
import time
from typing import Callable, Sequence

from . import __version__
from .errors import CancelledError, InputError

# command -> (module, function, one-line help)
COMMANDS = {
    "demo": ("classify", "demo_main", "classify the bundled sample case into demo-output/"),
    "classify": ("classify", "main", "classify one case (--ct/--labels) or a dataset (--dataset)"),
    "merge-results": ("cohort", "merge_main", "join the outputs of 'classify --dataset --shard I/N' runs into one nodes.csv and summary.json"),
    "phantoms": ("phantoms", "main", "generate a CT phantom cohort in the dataset format"),
    "explore": ("explore", "main", "summarise a dataset and list cases to review"),
    "train": ("training", "main", "train a model on a dataset and export it as TorchScript"),
    "suspects": ("suspects", "main", "rank node labels that out-of-fold models disagree with"),
    "curate": ("curation", "main", "journalled curation edits (--reader), suspect suggestions, readers' agreement (kappa), history, review, rebuild"),
    "evaluate": ("evaluate", "main", "evaluate a model on a dataset: metrics.json, predictions.csv, roc.png"),
    "import": ("importer", "main", "import a CSV of image / mask / label rows as a dataset"),
    "crossval": ("crossval", "main", "patient-grouped k-fold cross-validation: out-of-fold metrics vs the size rules"),
    # needs slicer-core and trame-slicer, so it lives in the MRML logic package (a dotted name is absolute)
    "review": ("LymphNodeClassifierLogic.review_app", "main", "serve a dataset to a browser for reading and relabelling (real Slicer views)"),
}


# torch's OpenMP threads otherwise spin between parallel regions: on a machine whose other core is
# busy, the model and Grad-CAM stages of a classify took ~8x longer (load 8-9: 2.5-2.9 s and 1.5 s
# vs 0.3-0.4 s and 0.3-0.5 s for 10 nodes); on an idle machine passive waiting costs a thread wake-up
# per parallel region (microseconds). Set before torch is imported (libgomp reads it once, when
# loaded); a user's own setting wins. Inherited by --workers.
OPENMP_SETTINGS = {"OMP_WAIT_POLICY": "PASSIVE"}
OPENMP_COMMANDS = ("classify", "demo")


def usage() -> str:
    lines = ["usage: python -m LymphNodeClassifierLib <command> [options]", "", "commands:"]
    lines += [f"  {name:<10} {help_text}" for name, (_, _, help_text) in COMMANDS.items()]
    lines += ["", "`<command> --help` lists a command's options."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """The command line's entry point (`python -m LymphNodeClassifierLib`, the `lymphnode-classifier` script)."""
    try:
        code = _dispatch(argv)
        sys.stdout.flush()  # a closed pipe shows here at the latest, not in the interpreter's exit
        return code
    except BrokenPipeError:
        return _stdout_closed()


def _dispatch(argv: Sequence[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    if argv[0] == "--version":
        print(f"LymphNodeClassifierLib {__version__}")
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"error: unknown command '{command}'; choose one of: {', '.join(COMMANDS)} (see --help).", file=sys.stderr)
        return 2
    module_name, function_name, _ = COMMANDS[command]
    if command in OPENMP_COMMANDS:
        for name, value in OPENMP_SETTINGS.items():
            os.environ.setdefault(name, value)
    module_path = module_name if "." in module_name else f"{__package__}.{module_name}"
    function = getattr(importlib.import_module(module_path), function_name)
    return exit_code(lambda: function(rest))


def exit_code(command: Callable[[], int | None]) -> int:
    """Run `command()` and return its exit code, for `main` and for the commands also called directly
    (train, suspects, phantoms). A user's error becomes one line on stderr, "error: <problem>; <what
    to do>", and exit 2 (bad options too: every parser is an errors.OneLineArgumentParser); an OS
    error on a named file (no space, read-only, no permission) the same; a cancel 130; a reader that
    closed the pipe (`... | head -1`) ends the run quietly."""
    try:
        return int(command() or 0)
    except InputError as error:
        _error_line(f"error: {error}")
        return 2
    except BrokenPipeError:
        return _stdout_closed()
    except CancelledError as error:
        _error_line(f"cancelled: {error}")
        return 130
    except KeyboardInterrupt:
        _error_line("cancelled.")
        return 130
    except OSError as error:
        if error.filename is None:
            raise
        reason = error.strerror or type(error).__name__
        _error_line(f"error: cannot use {error.filename} ({reason}); check that the path exists and is writable, and the free space.")
        return 2


def _stdout_closed() -> int:
    """The reader of stdout went away (`... | head -1`): no traceback, and none at the interpreter's
    exit either (it flushes stdout once more), so stdout now points at /dev/null."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # stdout without a file descriptor (captured in tests)
        pass
    return 141  # what a shell reports for a process ended by SIGPIPE


def _error_line(text: str) -> None:
    ProgressLine.end_open()
    print(text, file=sys.stderr, flush=True)


class ProgressLine:
    """A progress line on stderr: redrawn in place on a terminal, one line per `every` steps elsewhere
    (logs, pipes). The line is always ended (newline) before anything else is printed: `note()`,
    `done()`, or the command line's error path (`end_open`)."""

    _open: "ProgressLine | None" = None

    def __init__(self, label: str, total: int, every: int | None = None, stream=None) -> None:
        self.label, self.total = label, max(int(total), 0)
        self.stream = stream if stream is not None else sys.stderr
        self.terminal = bool(getattr(self.stream, "isatty", lambda: False)())
        self.every = every if every is not None else max(1, self.total // 10)
        self.started = time.perf_counter()

    def update(self, done: int) -> None:
        elapsed = time.perf_counter() - self.started
        width = 30
        filled = int(width * done / max(self.total, 1))
        text = f"[{'#' * filled}{'.' * (width - filled)}] {done}/{self.total} {self.label} {elapsed:5.0f} s"
        if self.terminal:
            print(f"\r{text}", end="", file=self.stream, flush=True)
            ProgressLine._open = self
        elif done == self.total or done % self.every == 0:
            print(text, file=self.stream, flush=True)

    def note(self, text: str) -> None:
        """Print `text` (one line on stderr) after ending the progress line."""
        ProgressLine.end_open()
        print(text, file=self.stream, flush=True)

    def done(self) -> None:
        ProgressLine.end_open()

    @classmethod
    def end_open(cls) -> None:
        if cls._open is not None:
            print(file=cls._open.stream, flush=True)
            cls._open = None
