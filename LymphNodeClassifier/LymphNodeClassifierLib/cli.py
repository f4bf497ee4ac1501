"""Command line: `python -m LymphNodeClassifierLib <command> ...` (or `lymphnode-classifier <command>`).

Every command is a small module with a `main(argv) -> exit code`; this file only dispatches and
turns user errors into one line on stderr (exit 2) instead of a traceback.
"""

from __future__ import annotations

import importlib
import sys
from typing import Callable, Sequence

from .errors import CancelledError, InputError

# command -> (module, function, one-line help)
COMMANDS = {
    "demo": ("classify", "demo_main", "classify the bundled sample case into demo-output/"),
    "classify": ("classify", "main", "classify one case (--ct/--labels) or a dataset (--dataset)"),
    "phantoms": ("phantoms", "main", "generate a CT phantom cohort in the dataset format"),
    "explore": ("explore", "main", "summarise a dataset and list cases to review"),
    "train": ("training", "main", "train a model on a dataset and export it as TorchScript"),
    "suspects": ("suspects", "main", "rank node labels that out-of-fold models disagree with"),
    "curate": ("curation", "main", "rebuild dataset.json from the curation journal, list cases to review, show edit history"),
    "evaluate": ("evaluate", "main", "evaluate a model on a dataset: metrics.json, predictions.csv, roc.png"),
    "import": ("importer", "main", "import a CSV of image / mask / label rows as a dataset"),
    "crossval": ("crossval", "main", "patient-grouped k-fold cross-validation: out-of-fold metrics vs the size rules"),
}


def usage() -> str:
    lines = ["usage: python -m LymphNodeClassifierLib <command> [options]", "", "commands:"]
    lines += [f"  {name:<10} {help_text}" for name, (_, _, help_text) in COMMANDS.items()]
    lines += ["", "`<command> --help` lists a command's options."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"error: unknown command '{command}'; choose one of: {', '.join(COMMANDS)}.", file=sys.stderr)
        return 2
    module_name, function_name, _ = COMMANDS[command]
    function = getattr(importlib.import_module(f"{__package__}.{module_name}"), function_name)
    return exit_code(lambda: function(rest))


def exit_code(command: Callable[[], int | None]) -> int:
    """Run `command()` and return its exit code; a user's error becomes one line on stderr and 2,
    a cancel 130 (for commands that are also called directly, not only through `main`)."""
    try:
        return int(command() or 0)
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except CancelledError as error:
        print(f"cancelled: {error}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("cancelled.", file=sys.stderr)
        return 130
