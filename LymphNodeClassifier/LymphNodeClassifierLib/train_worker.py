"""The training command run as a background process by the Training tab: JSON-line events on stdout.

    python -m LymphNodeClassifierLib.train_worker --dataset D --out-folder F --job-id ID
        [--<TrainingConfig field> VALUE ...] [--folds K] [--bootstrap N] [--compare-model PATH|auto|none]

Every `training.TrainingConfig` field is an option named after it (`--learning-rate`,
`--rotation-degrees`, `--split-fractions 0.8 0.1 0.1`, `--flips` / `--no-flips`, ...); an option
left out keeps the field's default. `options_to_argv(dict)` builds these arguments.

What it does, in order:

1. emits `{"event": "started", "job_id", "pid"}` at once, then `config`;
2. builds the patch set (`patchset.build_patchset`; `patches` events per case, then `data`);
3. trains with `training.train`: every event of the run is relayed as it happens (`start`,
   `epoch`; training's own `done` becomes `trained`). With `--folds K` (k-fold) the project's
   cross-validation runs (`crossval.cross_validate`: K patient-grouped folds, each tested by a
   model that never saw its patients, inner validation part `--inner-val-fraction`), then the
   model that is exported is trained on all nodes (`crossval.export_final_model`, the
   cross-validated metrics in its card); events carry `fold` (1..K, K+1 for the final model),
   `folds` (K) and `stage`;
4. compares, on the SAME nodes, the new model, the current model (`--compare-model`, default
   `auto`: the active model of the output folder, else the bundled default model) and the
   short-axis size rule: accuracy, AUC, sensitivity, specificity, PPV, NPV with patient-level
   bootstrap 95 % CIs. With one split the nodes are the test split (`evaluate.evaluate_predictions`,
   the size rule being short axis >= 10 mm); with k-fold they are all nodes, the new model's
   numbers are the pooled out-of-fold ones and the size rule's cut-off is chosen per fold
   (`crossval.cv_metrics`). The current model is run with its own card's preprocessing and
   threshold (`evaluate.evaluate_patchset`). Each of the three also gets its calibration
   (`calibration`: Brier score, expected calibration error with patient-level bootstrap CIs, the
   reliability curve; `metrics.calibration`) and `threshold_rule`, how its decision threshold was
   chosen. The size rule's probability is its own 0/1 prediction: a rule states certainty, so its
   Brier score is its error rate, and its reliability curve has the bins 0 and 1 only;
5. exports the model to a hidden temporary file in the output folder; then, in one step that a
   cancel cannot split (`Cancellation.commit`: a cancel that came first stops the run here, one
   that comes later is ignored), the run commits, moves the model into place as `<job>.pt`
   (`model_registry.install_model`, never replacing a file) and writes `<job>.metrics.json`
   (atomically) -- nothing that a cancel could interrupt comes after the install;
6. emits `{"event": "done", "job_id", "model_path", "metrics_path", "comparison", "training"}`.

One JSON object per line on stdout, flushed; anything else the process prints goes to stderr (the
worker moves file descriptor 1 onto stderr and keeps a private copy of stdout for the events).

Cancel: SIGTERM (and SIGINT; CTRL_BREAK on Windows) sets a flag that training checks before every
batch (`is_cancelled` -> `errors.CancelledError`); the worker removes its temporary files, emits
`{"event": "cancelled", "message"}` and exits with 130. With the environment variable
`LYMPHNODE_WORKER_CANCEL_ON_STDIN=1` (set by `training_process`) a `cancel` line on stdin, or
stdin's end (the parent is gone), does the same: the one polite stop that also works on Windows,
where a GUI without a console cannot send CTRL_BREAK. Before the model is moved into place a
cancelled or failed run never leaves a model file; once the run has committed, a cancel is
ignored and the run finishes. A broken stdout (the parent is gone) cancels the run too.

Errors: `{"event": "error", "message": one line}`; exit 2 for bad input (`InputError`), 1 otherwise.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import shlex
import signal
import sys
import threading
import time
import traceback
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence, TextIO

from .errors import CancelledError, InputError, OneLineArgumentParser

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_INPUT = 2
EXIT_CANCELLED = 130
TERMINAL_EVENTS = ("done", "cancelled", "error")
STDIN_CANCEL_ENV = "LYMPHNODE_WORKER_CANCEL_ON_STDIN"
STDIN_CANCEL_LINE = "cancel"
_JOB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


def new_job_id(prefix: str = "train") -> str:
    """A job id from the local time and the process id, e.g. `train-20240607-153012-4711`."""
    return f"{prefix}-{datetime.now().strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"


def options_to_argv(options: Mapping[str, Any] | None) -> list[str]:
    """Command-line arguments of an options dict (TrainingConfig field names and worker options).

    True / False -> `--name` / `--no-name`; a list or tuple -> several values; None is left out.
    """
    argv: list[str] = []
    for key, value in (options or {}).items():
        if value is None:
            continue
        flag = key.replace("_", "-")
        if isinstance(value, bool):
            argv.append(f"--{flag}" if value else f"--no-{flag}")
        elif isinstance(value, (list, tuple)):
            argv += [f"--{flag}", *(_value_text(v) for v in value)]
        else:
            argv += [f"--{flag}", _value_text(value)]
    return argv


def _value_text(value: Any) -> str:
    return repr(float(value)) if isinstance(value, float) else str(value)


def one_line(text: Any) -> str:
    return " ".join(str(text).split()) or "unknown error"


# --------------------------------------------------------------------------------------------
# cancellation and events


class Cancellation:
    """The cancel flag; callable as `is_cancelled()`.

    While `raise_now` is set (start-up, before anything checks the flag) a signal raises
    `CancelledError` at once; once `committed` (the model is being put in place) requests are ignored.
    """

    def __init__(self) -> None:
        self.requested = False
        self.raise_now = True
        self.committed = False
        self._lock = threading.Lock()  # between `commit` and a request from the stdin thread

    def __call__(self) -> bool:
        return self.requested and not self.committed

    def request(self, signum: int | None = None, frame: Any = None) -> None:
        """A signal handler (runs in the main thread, between two bytecodes of whatever it interrupts)."""
        if self.committed:
            return
        self.requested = True
        if self.raise_now:
            self.raise_now = False
            raise CancelledError("Training cancelled before it started; no model was written.")

    def request_from_thread(self) -> None:
        """A cancel request from another thread (stdin): sets the flag; the main thread acts on it."""
        with self._lock:
            if not self.committed:
                self.requested = True

    def check(self) -> None:
        if self():
            raise CancelledError("Training cancelled; no model was written.")

    def commit(self) -> None:
        """From here on the run finishes; raises `CancelledError` if a cancel came first.

        `committed` is set before the flag is read: a signal handler that runs between the two sees
        `committed` and ignores itself; one that ran before has set `requested`, which is then seen.
        """
        with self._lock:
            self.committed = True
            if self.requested:
                self.committed = False
                raise CancelledError("Training cancelled; no model was written.")

    def watch_stdin(self, fd: int = 0) -> threading.Thread:
        """Treat a `cancel` line on file descriptor `fd` (stdin), or its end, as a cancel request.

        A daemon thread reads the raw descriptor (os.read, not sys.stdin: a daemon thread blocked
        inside a buffered stream's lock can abort the interpreter's shutdown).
        """

        def watch() -> None:
            received = b""
            try:
                while True:
                    chunk = os.read(fd, 256)
                    if not chunk:
                        break
                    received = (received + chunk)[-256:]
                    if STDIN_CANCEL_LINE.encode("ascii") in received.splitlines():
                        break
            except OSError:
                pass
            self.request_from_thread()  # a cancel line, or the parent closed (or lost) the pipe

        thread = threading.Thread(target=watch, name="cancel on stdin", daemon=True)
        thread.start()
        return thread

    def install(self) -> None:
        """Handle SIGTERM / SIGINT (and SIGBREAK on Windows) as cancel requests (main thread only)."""
        for name in ("SIGTERM", "SIGINT", "SIGBREAK"):
            number = getattr(signal, name, None)
            if number is not None:
                try:
                    signal.signal(number, self.request)
                except (ValueError, OSError):  # not the main thread, or not supported here
                    pass


class EventWriter:
    """Writes each event as one JSON line and flushes; a broken stream requests cancellation."""

    def __init__(self, stream: TextIO, cancellation: Cancellation | None = None) -> None:
        self.stream = stream
        self.cancellation = cancellation
        self.broken = False

    def __call__(self, event: Mapping[str, Any]) -> None:
        if self.broken:
            return
        line = json.dumps(_json_safe(dict(event)), allow_nan=False, separators=(",", ":"))
        try:
            self.stream.write(line + "\n")
            self.stream.flush()
        except (BrokenPipeError, OSError, ValueError):  # the reader is gone: stop working for nobody
            self.broken = True
            if self.cancellation is not None:
                self.cancellation.requested = True


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 1) == 0:  # numpy scalar
        value = value.item()
    if hasattr(value, "tolist") and callable(value.tolist):  # numpy array
        return _json_safe(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def _claim_stdout() -> TextIO:
    """A private text stream on the real stdout; fd 1 (and print) then go to stderr."""
    sys.stdout.flush()
    fd = os.dup(1)
    os.dup2(2, 1)
    return os.fdopen(fd, "w", encoding="utf-8", buffering=1)


# --------------------------------------------------------------------------------------------
# arguments



def _field_type(field: dataclasses.Field, default: Any) -> Callable[[str], Any]:
    if isinstance(default, int) and not isinstance(default, bool):
        return int
    if isinstance(default, float):
        return float
    annotation = str(field.type)
    if "int" in annotation:
        return int
    if "float" in annotation:
        return float
    return str


def build_parser() -> argparse.ArgumentParser:
    from .training import TrainingConfig

    parser = OneLineArgumentParser(prog="python -m LymphNodeClassifierLib.train_worker",
                     description="Train a model in the background, streaming JSON-line events on stdout.")
    parser.add_argument("--dataset", required=True, help="dataset folder (with dataset.json)")
    parser.add_argument("--out-folder", required=True, help="model folder: <job>.pt and <job>.metrics.json are written here")
    parser.add_argument("--job-id", default=None, help="names the outputs (letters, digits, '.', '_', '-'); default: time-based")
    parser.add_argument("--folds", type=int, default=0, help="k-fold by patient (K >= 2); 0 (default): one split by --split-fractions")
    parser.add_argument("--inner-val-fraction", type=float, default=0.2,
                        help="k-fold: share of the other folds' patients that picks each fold's epoch and threshold (default 0.2)")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the 95%% CIs (0: none)")
    parser.add_argument("--compare-model", default="auto",
                        help="model to compare with: a .pt path, 'auto' (the folder's active model, else the bundled one) or 'none'")
    parser.add_argument("--cache", default=None, help="folder for cached patch arrays")
    parser.add_argument("--workers", type=int, default=1, help="processes for patch extraction")
    parser.add_argument("--name", default=None, help="model name in the card (default: 'LymphNodeClassifier model <job>')")
    parser.add_argument("--description", default="")
    defaults = TrainingConfig()
    group = parser.add_argument_group("training options (training.TrainingConfig fields)")
    for field in dataclasses.fields(TrainingConfig):
        default = getattr(defaults, field.name)
        flag = "--" + field.name.replace("_", "-")
        if isinstance(default, bool):
            group.add_argument(flag, dest=field.name, action=argparse.BooleanOptionalAction, default=None)
        elif isinstance(default, tuple):
            group.add_argument(flag, dest=field.name, nargs=len(default), type=float, default=None, metavar="V")
        else:
            group.add_argument(flag, dest=field.name, type=_field_type(field, default), default=None)
    return parser


def config_from_args(args: argparse.Namespace):
    from .training import TrainingConfig

    values = {}
    for field in dataclasses.fields(TrainingConfig):
        value = getattr(args, field.name, None)
        if value is not None:
            values[field.name] = tuple(value) if isinstance(value, list) else value
    return TrainingConfig(**values)


# --------------------------------------------------------------------------------------------
# the run


def _subset_dataset(dataset, case_ids: set[str]):
    from .dataset import Dataset

    data = dataset.to_dict()
    data["cases"] = [c for c in data["cases"] if c["case_id"] in case_ids]
    data["nodes"] = [n for n in data["nodes"] if n["case_id"] in case_ids]
    return Dataset.from_dict(data, dataset.folder)


def _node_keys(patchset) -> list[tuple[str, int]]:
    return [(str(c), int(v)) for c, v in zip(patchset.case_ids.tolist(), patchset.label_values.tolist())]


def resolve_compare_model(choice: str | None, out_folder: Path) -> Path | None:
    from . import model_registry

    if choice in (None, "", "none"):
        return None
    if choice == "auto":
        return model_registry.resolve_model(out_folder)
    return Path(choice)


def evaluate_other_model(model_path: Path, dataset, test, n_boot: int, seed: int, cache_dir, is_cancelled) -> dict:
    """Metrics of another model on exactly the nodes of the PatchSet `test` (its own preprocessing)."""
    from .evaluate import evaluate_patchset
    from .model import load_model
    from .fusion import attach_features
    from .patchset import build_patchset
    from .pipeline import patch_spec_from_card, window_from_card

    info = {"path": str(model_path)}
    try:
        loaded = load_model(model_path, "cpu")
        info["name"] = str(loaded.card.get("name", ""))
        sub = _subset_dataset(dataset, set(test.case_ids.tolist()))
        patchset = build_patchset(sub, patch_spec_from_card(loaded.card), window_from_card(loaded.card), cache_dir=cache_dir, is_cancelled=is_cancelled)
        attach_features(sub, patchset, loaded.card, cache_dir, is_cancelled=is_cancelled)  # a fused model's card asks for them
        index = {key: i for i, key in enumerate(_node_keys(patchset))}
        missing = [key for key in _node_keys(test) if key not in index]
        if missing:
            case_id, value = missing[0]
            return {**info, "error": f"{len(missing)} test node(s) could not be extracted with this model's preprocessing (e.g. node {value} of case '{case_id}')."}
        import numpy as np

        order = np.array([index[key] for key in _node_keys(test)], dtype=np.int64)
        evaluation = evaluate_patchset(loaded, patchset.subset(order), n_boot=n_boot, seed=seed)
    except CancelledError:
        raise
    except InputError as error:
        return {**info, "error": one_line(error)}
    metrics = dict(evaluation.metrics)
    metrics.pop("size_rule", None)
    metrics.pop("skipped", None)
    metrics.update(info)
    return metrics


def rule_calibration(y, prediction, patient_ids, n_boot: int, seed: int) -> dict:
    """The calibration block of a 0/1 rule, its prediction taken as the probability it states."""
    from .metrics import calibration

    import numpy as np

    block = calibration(np.asarray(y, dtype=np.int64), np.asarray(prediction, dtype=np.float64), n_boot=n_boot, seed=seed,
                        groups=np.asarray(patient_ids).astype(str))
    block["probability"] = "the rule's 0/1 prediction (a rule states certainty: Brier = its error rate)"
    return block


def compare_on_test_set(patchset, test_idx, probability, threshold: float, compare_path: Path | None, dataset,
                        n_boot: int, seed: int, cache_dir=None, is_cancelled=None, split: str = "test split",
                        threshold_rule: str = "youden", threshold_source: str = "validation (Youden's J)") -> dict:
    """New model vs `compare_path` vs the short-axis size rule on the same test nodes (with each one's calibration)."""
    from .evaluate import evaluate_predictions

    import numpy as np

    test_idx = np.asarray(test_idx, dtype=np.int64)
    if test_idx.size == 0:
        return {"error": "There is no test set (the test fraction is 0), so the models were not compared.", "test_set": {"nodes": 0}}
    test = patchset.subset(test_idx)
    new = evaluate_predictions(test, probability, threshold, n_boot=n_boot, seed=seed)
    size_rule = new.pop("size_rule")
    new["threshold_source"] = threshold_source
    new["threshold_rule"] = threshold_rule
    size_prediction = np.asarray(test.short_axis_mm, dtype=np.float64) >= float(size_rule["threshold_mm"])
    size_rule["calibration"] = rule_calibration(test.y, size_prediction, test.patient_ids, n_boot, seed)
    size_rule["threshold_rule"] = size_rule["rule"]
    comparison = {
        "test_set": {
            "split": split, "nodes": len(test), "metastatic": int(test.y.sum()), "patients": int(len(set(test.patient_ids.tolist()))),
            "cases": int(len(set(test.case_ids.tolist()))),
        },
        "new_model": new,
        "active_model": None,
        "size_rule": size_rule,
    }
    if compare_path is not None:
        comparison["active_model"] = evaluate_other_model(compare_path, dataset, test, n_boot, seed, cache_dir, is_cancelled)
    return comparison


def run(args: argparse.Namespace, emit: Callable[[dict], None], cancel: Cancellation, command: str) -> dict:
    """The whole job; returns the `done` event (also emitted)."""
    import numpy as np

    from . import model_registry
    from .dataset import Dataset
    from .fileio import atomic_write_json
    from .fusion import attach_features
    from .patchset import build_patchset
    from .training import export_trained_model, train

    started = time.perf_counter()
    job = args.job_id or new_job_id()
    if not _JOB_ID.match(job):
        raise InputError(f"The job id '{job}' may only hold letters, digits, '.', '_' and '-'; choose another.")
    config = config_from_args(args)
    if args.bootstrap < 0:
        raise InputError(f"The number of bootstrap resamples must be at least 0, got {args.bootstrap}; use e.g. 1000.")
    out_folder = Path(args.out_folder)
    if out_folder.exists() and not out_folder.is_dir():
        raise InputError(f"--out-folder {out_folder} is a file; give the model folder.")
    out_folder.mkdir(parents=True, exist_ok=True)
    final_name = out_folder / f"{model_registry.safe_name(job)}{model_registry.MODEL_SUFFIX}"
    metrics_path = out_folder / f"{model_registry.safe_name(job)}.metrics.json"
    if final_name.exists() or metrics_path.exists():
        raise InputError(f"The model folder already holds the outputs of job '{job}'; choose another job id.")
    partial = out_folder / f".{model_registry.safe_name(job)}.partial.pt"
    compare_path = resolve_compare_model(args.compare_model, out_folder)
    if compare_path is not None and not compare_path.is_file():
        raise InputError(f"The model to compare with, {compare_path}, does not exist; choose a model file or 'none'.")
    emit({"event": "config", "job_id": job, "config": config.to_dict(), "folds": int(args.folds),
          "compare_model": None if compare_path is None else str(compare_path)})

    dataset = Dataset.load(args.dataset)
    cancel.check()
    patchset = build_patchset(
        dataset, config.patch_spec(), config.window, cache_dir=args.cache, workers=args.workers,
        progress=lambda done, total: emit({"event": "patches", "done": int(done), "total": int(total)}),
        is_cancelled=cancel,
    )
    attach_features(dataset, patchset, config, args.cache, is_cancelled=cancel)  # --fusion: the nodes' measured features
    emit({"event": "data", **patchset.summary(), "problems": len(patchset.problems), "problem_examples": patchset.problems[:20]})

    folds = int(args.folds)

    def relay(fold: int | None = None, stage: str | None = None) -> Callable[[dict], None]:
        def forward(event: dict) -> None:
            event = dict(event)
            if event.get("event") == "done":
                event["event"] = "trained"
            if fold is not None:
                event.update(fold=fold, folds=folds, stage=stage)
            elif "fold" in event:  # crossval's folds are numbered from 0
                event.update(fold=int(event["fold"]) + 1, folds=folds, stage=f"fold {int(event['fold']) + 1} of {folds}")
            emit(event)
        return forward

    cross_validation = None
    try:
        if folds:
            from .crossval import cross_validate

            if folds < 2:
                raise InputError(f"k-fold needs at least 2 folds, got {folds}; use e.g. --folds 5.")
            cross_validation = cross_validate(patchset, config, folds, inner_val_fraction=args.inner_val_fraction, n_boot=args.bootstrap,
                                              on_event=relay(), is_cancelled=cancel)
            cancel.check()
            result = _train_on_all_nodes(patchset, config, args.inner_val_fraction, relay(folds + 1, "final model on all nodes"), cancel)
        else:
            result = train(patchset, config, on_event=relay(), is_cancelled=cancel)
        cancel.check()
        emit({"event": "comparing"})
        if cross_validation is not None:
            comparison = compare_cross_validation(cross_validation, compare_path, dataset, args.bootstrap, config.seed, args.cache, cancel)
        else:
            comparison = compare_on_test_set(
                patchset, result.splits["test"], result.probabilities.get("test", np.zeros(0)), result.decision_threshold,
                compare_path, dataset, args.bootstrap, config.seed, cache_dir=args.cache, is_cancelled=cancel,
                split="test split (patient-level)", threshold_rule=config.threshold_rule,
                threshold_source=f"validation split: {result.threshold_method}",
            )
        cancel.check()
        name = args.name or f"LymphNodeClassifier model {job}"
        if cross_validation is not None:
            from .crossval import export_final_model

            export_final_model(result, patchset, config, partial, command, cross_validation.metrics, name=name, description=args.description)
        else:
            export_trained_model(result, patchset.summary(), config, partial, command, name=name, description=args.description)
        cancel.commit()  # the last point a cancel stops the run; from here on it finishes
        model_path = model_registry.install_model(out_folder, partial, make_active=False, name=job, move=True)
    finally:
        partial.unlink(missing_ok=True)

    training = {
        "best_epoch": result.best_epoch, "epochs_run": result.epochs_run, "stopped_early": result.stopped_early,
        "decision_threshold": result.decision_threshold, "history": result.history,
        "validation": result.metrics["validation"], "test": result.metrics["test"],
        "folds": None if cross_validation is None else cross_validation.folds,
        "seconds": round(time.perf_counter() - started, 2), "data": patchset.summary(),
    }
    report = {
        "job_id": job, "model_path": str(model_path), "dataset": str(Path(args.dataset).resolve()),
        "config": config.to_dict(), "folds": folds, "command": command, "comparison": comparison, "training": training,
    }
    atomic_write_json(metrics_path, _json_safe(report))
    done = {"event": "done", "job_id": job, "model_path": str(model_path), "metrics_path": str(metrics_path),
            "comparison": comparison, "training": training}
    emit(done)
    return done


def _train_on_all_nodes(patchset, config, inner_val_fraction: float, on_event, is_cancelled):
    """The k-fold run's exported model: every node, a patient-level inner validation part (early
    stopping and threshold only), no test part (as `crossval.train_final_model`, but cancellable)."""
    import numpy as np

    from .training import _one_fold, train

    y = np.asarray(patchset.y, dtype=np.int64)
    groups = np.asarray(patchset.patient_ids).astype(str)
    everything = np.arange(y.size)
    validation = _one_fold(everything, y, groups, float(inner_val_fraction), config.seed + 1)
    train_idx = np.setdiff1d(everything, validation)
    return train(patchset, config, on_event=on_event, is_cancelled=is_cancelled, splits=(train_idx, validation, np.zeros(0, dtype=np.int64)))


def compare_cross_validation(cross_validation, compare_path: Path | None, dataset, n_boot: int, seed: int, cache_dir, is_cancelled) -> dict:
    """Pooled out-of-fold metrics of the new configuration vs the current model vs the short-axis rule, on all nodes."""
    from .crossval import size_rule_predictions
    from .metrics import METRIC_NAMES

    import numpy as np

    metrics = cross_validation.metrics
    patchset = cross_validation.patchset
    keys = ("n", "n_positive", "n_negative", *METRIC_NAMES, "tn", "fp", "fn", "tp", "confusion_matrix", "undefined", "ci95",
            "roc", "prediction_rule", "threshold_rule", "calibration", "per_fold_auc", "patients", "bootstrap")
    new = {key: metrics[key] for key in keys if key in metrics}
    size_rule = dict(metrics["size_rules"]["short_axis_mm"])
    y = np.asarray(patchset.y, dtype=np.int64)
    size_prediction, _ = size_rule_predictions(y, np.asarray(patchset.short_axis_mm, dtype=np.float64), cross_validation.fold)
    size_rule["calibration"] = rule_calibration(y, size_prediction, patchset.patient_ids, n_boot, seed)
    size_rule["threshold_rule"] = size_rule.get("rule", "")
    comparison = {
        "test_set": {
            "split": f"out-of-fold ({metrics['folds']}-fold by patient): every node, predicted by a model that never saw its patient",
            "nodes": len(patchset), "metastatic": int(patchset.y.sum()), "patients": int(len(set(patchset.patient_ids.tolist()))),
            "cases": int(len(set(patchset.case_ids.tolist()))),
        },
        "new_model": new,
        "active_model": None,
        "size_rule": size_rule,
    }
    if compare_path is not None:
        comparison["active_model"] = evaluate_other_model(compare_path, dataset, patchset, n_boot, seed, cache_dir, is_cancelled)
    return comparison


def serve(
    argv: Sequence[str],
    stream: TextIO | None,
    parse: Callable[[list[str]], argparse.Namespace],
    body: Callable[[argparse.Namespace, EventWriter, Cancellation], None],
    cancelled_message: str,
    cancel_reason_from_error: bool = True,
) -> int:
    """Run one background job: `started`, then `body(args, emit, cancel)`; every ending becomes one
    terminal event (`cancelled`, `error`) and an exit code. Shared by the training and suspect workers.

    Events go to `stream` (default: the process's stdout, claimed for events only, with SIGTERM /
    SIGINT handled as cancel requests). A `CancelledError` reports its own message (with
    `cancel_reason_from_error`, else `cancelled_message`); an interrupt, or any error after a cancel
    request, reports `cancelled_message`.
    """
    cancel = Cancellation()
    if stream is None:
        cancel.install()
        if os.environ.get(STDIN_CANCEL_ENV) == "1":
            cancel.watch_stdin()
        stream = _claim_stdout()
    emit = EventWriter(stream, cancel)
    try:
        emit({"event": "started", "pid": os.getpid(), "time": datetime.now().astimezone().isoformat(timespec="seconds")})
        args = parse(list(argv))  # may import torch: a signal cancels at once
        cancel.raise_now = False
        body(args, emit, cancel)
        return EXIT_OK
    except (CancelledError, KeyboardInterrupt) as error:
        cancel.raise_now = False  # a second signal must not interrupt the report
        message = one_line(error) if cancel_reason_from_error and isinstance(error, CancelledError) else cancelled_message
        emit({"event": "cancelled", "message": message})
        return EXIT_CANCELLED
    except Exception as error:  # noqa: BLE001 - reported as one line; the traceback goes to stderr
        cancel.raise_now = False
        if cancel.requested and not cancel.committed:  # whatever broke after a cancel request is part of stopping
            emit({"event": "cancelled", "message": cancelled_message})
            return EXIT_CANCELLED
        if isinstance(error, InputError):
            emit({"event": "error", "message": one_line(error)})
            return EXIT_INPUT
        traceback.print_exc(file=sys.stderr)
        emit({"event": "error", "message": one_line(f"{type(error).__name__}: {error}")})
        return EXIT_ERROR
    finally:
        try:
            stream.flush()
        except (OSError, ValueError):
            pass


def main(argv: Sequence[str] | None = None, stream: TextIO | None = None) -> int:
    """Run one job; events go to `stream` (default: the process's stdout, claimed for events only)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = "python -m LymphNodeClassifierLib.train_worker " + shlex.join(argv)
    return serve(argv, stream, build_parser().parse_args, lambda args, emit, cancel: run(args, emit, cancel, command),
                 "Training cancelled; no model was written.")


if __name__ == "__main__":
    sys.exit(main())
