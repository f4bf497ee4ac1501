"""The suspect-label search run as a background process by the Curation tab: JSON-line events on stdout.

    python -m LymphNodeClassifierLib.suspects_worker --dataset D [--folds 5] [--seed 0]

Runs the `suspects` command's default finder (`suspects.find_suspects_in_dataset`: node
features, patient-grouped out-of-fold logistic regressions, cleanlab ranking) on the dataset's
labelled, non-excluded nodes and writes `suspects.csv` and `suspects.json` into the dataset
folder (each atomically), where the Curation tab lists them. Events, one JSON object per line:
`started`, `progress` (`stage` "patches" or "features", `done`, `total`), then one of `done`
(`csv_path`, `json_path`, `n`, `n_issues`, `seconds`), `cancelled` or `error` (one line).

Cancel: SIGTERM / SIGINT (CTRL_BREAK on Windows) as for the training worker (`train_worker`):
the search stops at the next case or fold and writes nothing, so a list written before stays. A
cancel that arrives once the list is being written (`Cancellation.commit`, the one step a cancel
cannot split) is too late: the new list is written whole (atomically) and `done` is reported.
Exit codes: 0 done, 1 unexpected error, 2 bad input, 130 cancelled.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Sequence, TextIO

from .errors import CancelledError, InputError, OneLineArgumentParser
from .train_worker import serve

CANCEL_MESSAGE = "The suspect search was stopped; the previous list (if any) is unchanged."



def build_parser() -> argparse.ArgumentParser:
    parser = OneLineArgumentParser(prog="python -m LymphNodeClassifierLib.suspects_worker", description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", required=True, help="dataset folder (with dataset.json); the list is written into it")
    parser.add_argument("--folds", type=int, default=5, help="patient-grouped folds (default 5)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the folds (default 0)")
    return parser


def run(args: argparse.Namespace, emit, is_cancelled) -> None:
    from .dataset import Dataset
    from .patchset import build_patchset
    from .suspects import find_suspects_in_dataset, suspect_config, write_outputs

    started = time.perf_counter()
    dataset = Dataset.load(args.dataset)
    config = suspect_config()  # only its small patch spec: the rows, labels and patients of the nodes

    def progress(stage: str):
        return lambda done, total: emit({"event": "progress", "stage": stage, "done": done, "total": total})

    patchset = build_patchset(dataset, config.patch_spec(), config.window, progress=progress("patches"), is_cancelled=is_cancelled)
    result = find_suspects_in_dataset(dataset, patchset, folds=args.folds, seed=args.seed, progress=progress("features"),
                                      is_cancelled=is_cancelled)
    commit = getattr(is_cancelled, "commit", None)  # serve's Cancellation: a cancel either stops it here or is too late
    if commit is not None:
        commit()
    elif is_cancelled():
        raise CancelledError(CANCEL_MESSAGE)  # the finder returned between its checks
    csv_path, json_path = write_outputs(result, dataset.folder, extra={"dataset_folder": str(dataset.folder)})
    summary = result.summary()
    emit({"event": "done", "csv_path": str(csv_path), "json_path": str(json_path), "n": summary["n"],
          "n_issues": summary["n_issues"], "problems": len(patchset.problems), "seconds": round(time.perf_counter() - started, 1)})


def _checked_args(argv: list[str]) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    if not (Path(args.dataset) / "dataset.json").is_file():
        raise InputError(f"There is no dataset.json in '{args.dataset}'; open a dataset folder first.")
    return args


def main(argv: Sequence[str] | None = None, stream: TextIO | None = None) -> int:
    """Run one search; events go to `stream` (default: the process's stdout, claimed for events only)."""
    return serve(list(sys.argv[1:] if argv is None else argv), stream, _checked_args, run, CANCEL_MESSAGE, cancel_reason_from_error=False)


if __name__ == "__main__":
    sys.exit(main())
