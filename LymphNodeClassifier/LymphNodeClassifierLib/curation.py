"""Dataset curation: every edit saved at once, atomically, with an append-only journal.

A `CurationSession` edits one dataset folder (labels, exclusions and notes of nodes and cases).
Each edit is made durable in two steps, always in this order:

1. one JSON line is appended to `journal.jsonl` in the dataset folder, then flushed and fsync'ed:
   ``{"seq", "time" (UTC ISO), "user", "target": {"case_id", "label_value" (null for a case)},
   "field", "old", "new", "reason"}``;
2. dataset.json is rewritten atomically (`Dataset.save` -> `fileio.atomic_write_json`: temporary
   file, fsync, `os.replace`), so it is always the old manifest or the new one, never half of one.

Edits whose new value equals the old one write nothing.

Journal fields (`field`, and what replaying the line does):

- ``metastatic`` (node): the label, 0 / 1 / null (`label_flipped` is the phantom generator's record
  of injected noise and is left as it is; compare `metastatic` with `true_metastatic` instead);
- ``excluded`` (node or case): true / false; excluding sets `exclude_reason` to the line's
  `reason`, including clears it;
- ``exclude_reason`` (node or case): a new reason for something already excluded;
- ``note`` (node or case): the free-text note;
- ``manifest`` (target null): `new` is a complete dataset.json snapshot that replaces the state.

The journal's base is stored in its first line (seq 0): a ``manifest`` line holding dataset.json as
it was when the journal started. The journal file is created with that line in one atomic write
(`fileio.atomic_write_text`), so it exists complete or not at all. When dataset.json is found
changed by something other than a curation session (e.g. cases added by another tool), a new
``manifest`` line records its state and later lines build on it; the history before stays.
So the journal alone rebuilds the manifest: start from the last ``manifest`` line and replay the
edits after it (`rebuild_manifest`).

Crash safety (a crash or a kill at any moment loses nothing that was reported as saved):

- killed during step 2: dataset.json is still the previous manifest (the atomic replace did not
  happen) while the journal already holds the edit. Opening a session notices that dataset.json
  equals the journal's state without its last line and replays that line.
- killed during step 1: the last journal line may be torn (no final newline, or not valid JSON).
  Dropping it is safe because step 2 starts only after the line is complete and fsync'ed: an edit
  whose line is torn was never applied to dataset.json, and no later line can exist (every line is
  fsync'ed before the next edit starts, so only the last line can be torn). Opening a session
  truncates the file after its last complete line so the next append starts on a fresh line; a
  damaged line that is *not* the last one is never dropped silently (`InputError`).
- The history is append-only: lines are only ever added at the end.

One session at a time per dataset: a session holds an exclusive lock on `journal.lock` (`flock`,
released by the operating system when the process dies, so a killed session leaves no stale lock).

`review_list(dataset)` runs the automatic checks of `explore.check_case` on every case and returns
one dict per problem, ready for a list in the GUI.
"""

from __future__ import annotations

import copy
import getpass
import json
import os
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from .dataset import DATASET_FILE, CaseRecord, Dataset, NodeRecord
from .errors import InputError
from .fileio import atomic_write_text

JOURNAL_FILE = "journal.jsonl"
LOCK_FILE = "journal.lock"
ENTRY_KEYS = ("seq", "time", "user", "target", "field", "old", "new", "reason")
NODE_FIELDS = ("metastatic", "excluded", "exclude_reason", "note")
CASE_FIELDS = ("excluded", "exclude_reason", "note")
STALE_TEMP_SECONDS = 60.0  # leftovers of a killed atomic write older than this are removed


# --------------------------------------------------------------------------------------------
# journal reading and replay


def _now_utc() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _default_user() -> str:
    try:
        user = getpass.getuser()
    except Exception:  # noqa: BLE001 - no login name (e.g. a container without a passwd entry)
        user = ""
    return user or "unknown"


def _is_entry(entry: Any, seq: int) -> bool:
    if not isinstance(entry, dict) or any(key not in entry for key in ENTRY_KEYS) or entry["seq"] != seq:
        return False
    if entry["field"] == "manifest":
        return entry["target"] is None and isinstance(entry["new"], dict)
    target = entry["target"]
    return isinstance(target, dict) and isinstance(target.get("case_id"), str) and entry["field"] in NODE_FIELDS


def read_journal(dataset_folder: str | os.PathLike) -> tuple[list[dict], int, bool]:
    """(complete entries, byte length of the complete lines, whether a torn last line was dropped).

    Only the last line may be torn (see the module docstring); a damaged line before it, or lines
    out of sequence, raise `InputError`. A missing journal gives ``([], 0, False)``.
    """
    path = Path(dataset_folder) / JOURNAL_FILE
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return [], 0, False
    except OSError as error:
        raise InputError(f"Cannot read the curation journal {path} ({error.strerror}); check the file's permissions.") from None
    entries: list[dict] = []
    offset = 0
    lines = data.split(b"\n")
    tail = lines.pop()  # the bytes after the last newline: empty, or a torn line
    for number, line in enumerate(lines, start=1):
        try:
            entry = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            entry = None
        if not _is_entry(entry, len(entries)):
            if number == len(lines) and not tail:  # a damaged last line (e.g. zeros after a power loss)
                return entries, offset, True
            raise InputError(
                f"Line {number} of the curation journal {path} is damaged or out of sequence; restore the journal from a backup "
                "(or move it away to start a new journal from the current dataset.json)."
            )
        entries.append(entry)
        offset += len(line) + 1
    return entries, offset, bool(tail)


def _apply(dataset: Dataset, entry: dict) -> Dataset:
    """Apply one journal entry to `dataset` (in place) and return it (a new one for a snapshot)."""
    field, new = entry["field"], entry["new"]
    if field == "manifest":
        return Dataset.from_dict(copy.deepcopy(new), dataset.folder, source=f"line {entry['seq'] + 1} of {JOURNAL_FILE}")
    target = entry["target"]
    record: CaseRecord | NodeRecord
    if target.get("label_value") is None:
        record = dataset.case(target["case_id"])
        if field == "metastatic":
            raise InputError(f"Line {entry['seq'] + 1} of {JOURNAL_FILE} sets a label on a case; restore the journal from a backup.")
    else:
        record = dataset.node(target["case_id"], target["label_value"])
    if field == "excluded":
        record.excluded = bool(new)
        record.exclude_reason = entry["reason"] if new else ""
    else:
        setattr(record, field, new)
    return dataset


def replay(entries: list[dict], folder: str | os.PathLike) -> Dataset:
    """The dataset that the journal entries describe (from the last snapshot on)."""
    starts = [index for index, entry in enumerate(entries) if entry["field"] == "manifest"]
    if not starts:
        raise InputError(f"The curation journal in {folder} has no manifest snapshot; move it away to start a new journal from dataset.json.")
    dataset = Dataset(folder)
    for entry in entries[starts[-1]:]:
        dataset = _apply(dataset, entry)
    return dataset


def rebuild_manifest(dataset_folder: str | os.PathLike) -> Dataset:
    """Rebuild dataset.json from the journal alone (last snapshot + the edits after it) and write it.

    Refused while a session holds the dataset. A torn last journal line is dropped (and cut off
    the file); returns the rebuilt dataset.
    """
    folder = Path(dataset_folder).resolve()
    with _DatasetLock(folder):
        entries, length, torn = read_journal(folder)
        if not entries:
            raise InputError(f"There is no curation journal ({JOURNAL_FILE}) in {folder}; nothing to rebuild dataset.json from.")
        if torn:
            _truncate(folder / JOURNAL_FILE, length)
        dataset = replay(entries, folder)
        dataset.save()
        return dataset


def _truncate(path: Path, length: int) -> None:
    with open(path, "r+b") as handle:
        handle.truncate(length)
        handle.flush()
        os.fsync(handle.fileno())


# --------------------------------------------------------------------------------------------
# lock


class _DatasetLock:
    """Exclusive, non-blocking lock on `<folder>/journal.lock`; the OS drops it when the process dies."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / LOCK_FILE
        self._handle = None

    def acquire(self) -> None:
        try:
            handle = open(self.path, "a+b")
        except OSError as error:
            raise InputError(f"Cannot create {self.path} ({error.strerror}); curate a dataset in a writable folder.") from None
        try:
            if os.name == "nt":
                import msvcrt

                handle.seek(0)
                msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)
            else:
                import fcntl

                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            raise InputError(
                f"The dataset {self.path.parent} is being curated in another session; close that session (or wait for it) and try again."
            ) from None
        self._handle = handle

    def release(self) -> None:
        if self._handle is not None:
            self._handle.close()  # closing the file drops the lock
            self._handle = None

    def __enter__(self) -> "_DatasetLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


# --------------------------------------------------------------------------------------------
# the session


def _stat_key(path: Path) -> tuple | None:
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return (stat.st_ino, stat.st_size, stat.st_mtime_ns)


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise InputError(f"The {what} must be text, got {value!r}; pass a string.")
    return value


class CurationSession:
    """Edits of one dataset folder, each saved at once (journal line first, then dataset.json).

    Use as a context manager or call `close()`: a session holds the dataset's lock while open.
    Opening a session recovers from a crash of an earlier one (see the module docstring).
    `recovered` says what was done on opening: "" (nothing), "replayed" (dataset.json lagged the
    journal), "dropped torn line" (possibly both, joined by ", "), "rebased" (dataset.json had
    been changed by something else: a snapshot line was added) or "started" (new journal).
    """

    def __init__(self, dataset_folder: str | os.PathLike, user: str | None = None) -> None:
        self.user = _default_user() if user is None else _text(user, "user name").strip()
        if not self.user:
            raise InputError("The user name is empty; pass the curator's name or leave it out to use the login name.")
        folder = Path(dataset_folder)
        if folder.name == DATASET_FILE:
            folder = folder.parent
        if not folder.is_dir():
            raise InputError(f"The dataset folder {folder} does not exist; choose a folder with a dataset.json.")
        self.folder = folder.resolve()
        self.journal_path = self.folder / JOURNAL_FILE
        self._lock = _DatasetLock(self.folder)
        self._lock.acquire()
        try:
            self._next_seq = 0
            self.recovered = ""
            self.dataset = self._open()
            self._remove_stale_temporaries()
        except BaseException:
            self._lock.release()
            raise

    # ---- opening and recovery ------------------------------------------------------------------

    def _open(self) -> Dataset:
        entries, length, torn = read_journal(self.folder)
        notes = []
        if torn:
            _truncate(self.journal_path, length)
            notes.append("dropped torn line")
        manifest = self.folder / DATASET_FILE
        if not entries:
            dataset = Dataset.load(self.folder)
            self._start_journal(dataset)
            self.recovered = "started"
            return dataset
        self._next_seq = len(entries)
        journal_state = replay(entries, self.folder)
        if not manifest.is_file():  # dataset.json deleted: the journal has everything
            journal_state.save()
            notes.append("replayed")
        else:
            try:
                on_disk = Dataset.load(self.folder)
            except InputError as error:
                raise InputError(
                    f"{str(error).rstrip('.')}, or rebuild it from the curation journal "
                    f"(python -m LymphNodeClassifierLib curate --dataset {self.folder} --rebuild)."
                ) from None
            current = on_disk.to_dict()
            if current != journal_state.to_dict():
                without_last = replay(entries[:-1], self.folder).to_dict() if len(entries) > 1 and entries[-1]["field"] != "manifest" else None
                if current == without_last:  # killed between the journal line and the manifest write
                    journal_state.save()
                    notes.append("replayed")
                else:  # changed by another tool: record its state as the new base
                    self._append(self._entry(None, "manifest", None, current, "dataset.json was changed outside the curation session"))
                    journal_state = on_disk
                    notes.append("rebased")
        self.recovered = ", ".join(notes)
        self._manifest_stat = _stat_key(manifest)
        return journal_state

    def _start_journal(self, dataset: Dataset) -> None:
        entry = self._entry(None, "manifest", None, dataset.to_dict(), "journal started")
        atomic_write_text(self.journal_path, json.dumps(entry, ensure_ascii=False) + "\n")
        self._next_seq = 1
        self._manifest_stat = _stat_key(dataset.path)

    def _remove_stale_temporaries(self) -> None:
        # A kill during an atomic write leaves its temporary file (".dataset.json.XXXX.tmp.json").
        horizon = time.time() - STALE_TEMP_SECONDS
        for pattern in (f".{DATASET_FILE}.*.tmp*", f".{JOURNAL_FILE}.*.tmp*"):
            for leftover in self.folder.glob(pattern):
                try:
                    if leftover.stat().st_mtime < horizon:
                        leftover.unlink()
                except OSError:
                    pass

    def _check_not_changed_outside(self) -> None:
        """Rebase onto dataset.json when another tool rewrote it while this session was open."""
        if _stat_key(self.folder / DATASET_FILE) == self._manifest_stat:
            return
        on_disk = Dataset.load(self.folder)
        if on_disk.to_dict() != self.dataset.to_dict():
            self._append(self._entry(None, "manifest", None, on_disk.to_dict(), "dataset.json was changed outside the curation session"))
            self.dataset = on_disk
        self._manifest_stat = _stat_key(self.folder / DATASET_FILE)

    # ---- writing -------------------------------------------------------------------------------

    def _entry(self, target: dict | None, field: str, old: Any, new: Any, reason: str) -> dict:
        return {"seq": self._next_seq, "time": _now_utc(), "user": self.user, "target": target, "field": field, "old": old, "new": new, "reason": reason}

    def _append(self, entry: dict) -> None:
        """Append one complete line and make it durable (flush + fsync) before returning."""
        line = (json.dumps(entry, ensure_ascii=False) + "\n").encode("utf-8")
        try:
            with open(self.journal_path, "ab") as handle:
                handle.write(line)
                handle.flush()
                os.fsync(handle.fileno())
        except OSError as error:
            raise InputError(f"Cannot write the curation journal {self.journal_path} ({error.strerror}); check the disk space and permissions.") from None
        self._next_seq += 1

    def _commit(self, target: dict, field: str, old: Any, new: Any, reason: str) -> dict | None:
        if old == new:
            return None
        entry = self._entry(target, field, old, new, reason)
        self._append(entry)  # (1) the journal line is durable ...
        self.dataset = _apply(self.dataset, entry)
        self.dataset.save()  # (2) ... before dataset.json is replaced
        self._manifest_stat = _stat_key(self.dataset.path)
        return entry

    def _node(self, case_id: str, label_value: Any) -> tuple[NodeRecord, dict]:
        self._check_open()
        self._check_not_changed_outside()
        if isinstance(label_value, bool) or not isinstance(label_value, int):
            if hasattr(label_value, "item") and isinstance(label_value.item(), int):  # numpy integer
                label_value = label_value.item()
            else:
                raise InputError(f"The label value {label_value!r} is not a whole number; pass the node's value in the label map.")
        self.dataset.case(_text(case_id, "case id"))  # "no case X" rather than "no node N in case X"
        record = self.dataset.node(case_id, label_value)
        return record, {"case_id": record.case_id, "label_value": record.label_value}

    def _case(self, case_id: str) -> tuple[CaseRecord, dict]:
        self._check_open()
        self._check_not_changed_outside()
        record = self.dataset.case(_text(case_id, "case id"))
        return record, {"case_id": record.case_id, "label_value": None}

    def _exclude(self, record, target: dict, reason: str, what: str) -> dict | None:
        reason = _text(reason, "reason").strip()
        if not reason:
            raise InputError(f"Give a reason for excluding {what} (e.g. 'motion artefact'); it goes into the audit journal.")
        if record.excluded:
            return self._commit(target, "exclude_reason", record.exclude_reason, reason, reason)
        return self._commit(target, "excluded", False, True, reason)

    def _include(self, record, target: dict, reason: str) -> dict | None:
        return self._commit(target, "excluded", record.excluded, False, _text(reason, "reason").strip())

    # ---- edits (each returns the journal entry written, or None for a no-op) ---------------------

    def set_node_label(self, case_id: str, label_value: int, metastatic: int | None, reason: str = "") -> dict | None:
        """Label a node 1 (metastatic) or 0 (benign); None marks it not labelled yet."""
        record, target = self._node(case_id, label_value)
        if hasattr(metastatic, "item"):
            metastatic = metastatic.item()
        if metastatic is not None and (isinstance(metastatic, bool) or metastatic not in (0, 1) or not isinstance(metastatic, (int, float))):
            raise InputError(f"The label {metastatic!r} is not valid; use 1 (metastatic), 0 (benign) or None (not labelled).")
        new = None if metastatic is None else int(metastatic)
        return self._commit(target, "metastatic", record.metastatic, new, _text(reason, "reason").strip())

    def exclude_node(self, case_id: str, label_value: int, reason: str) -> dict | None:
        record, target = self._node(case_id, label_value)
        return self._exclude(record, target, reason, f"node {record.label_value} of case '{record.case_id}'")

    def include_node(self, case_id: str, label_value: int, reason: str = "") -> dict | None:
        record, target = self._node(case_id, label_value)
        return self._include(record, target, reason)

    def set_node_note(self, case_id: str, label_value: int, note: str) -> dict | None:
        record, target = self._node(case_id, label_value)
        return self._commit(target, "note", record.note, _text(note, "note"), "")

    def exclude_case(self, case_id: str, reason: str) -> dict | None:
        record, target = self._case(case_id)
        return self._exclude(record, target, reason, f"case '{record.case_id}'")

    def include_case(self, case_id: str, reason: str = "") -> dict | None:
        record, target = self._case(case_id)
        return self._include(record, target, reason)

    def set_case_note(self, case_id: str, note: str) -> dict | None:
        record, target = self._case(case_id)
        return self._commit(target, "note", record.note, _text(note, "note"), "")

    # ---- history and lifetime --------------------------------------------------------------------

    def history(self, case_id: str | None = None, label_value: int | None = None) -> list[dict]:
        """The journal's edit lines (oldest first), optionally of one case (and one of its nodes)."""
        entries, _, _ = read_journal(self.folder)
        out = []
        for entry in entries:
            target = entry["target"]
            if target is None:
                continue
            if case_id is not None and target["case_id"] != case_id:
                continue
            if label_value is not None and target["label_value"] != label_value:
                continue
            out.append(entry)
        return out

    def _check_open(self) -> None:
        if self._lock._handle is None:
            raise InputError("This curation session is closed; open a new CurationSession to edit the dataset.")

    def close(self) -> None:
        self._lock.release()

    def __enter__(self) -> "CurationSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --------------------------------------------------------------------------------------------
# review list


def review_list(dataset: Dataset, progress: Callable[[int, int], None] | None = None) -> list[dict]:
    """One dict per problem that `explore.check_case` finds, case by case in dataset order.

    Keys: `case_id`, `patient_id`, `label_value` (None for a problem of the whole case), `kind`
    (e.g. "empty_image", "missing_mask", "empty_mask", "mask_outside_ct", "geometry_mismatch",
    "implausible_hu", "node_too_small"), `message` (one sentence), `excluded` (whether the case, or
    the node, is already excluded, so a GUI can grey it out).
    """
    from .explore import check_case  # reads images: imported only when a review is asked for

    rows = []
    cases = dataset.cases
    for index, case in enumerate(cases):
        check = check_case(dataset, case)
        for problem in check.problems:
            excluded = case.excluded
            if problem.label_value is not None and not excluded:
                try:
                    excluded = dataset.node(case.case_id, problem.label_value).excluded
                except InputError:  # a label value without a node record
                    excluded = False
            rows.append({
                "case_id": case.case_id, "patient_id": case.patient_id, "label_value": problem.label_value,
                "kind": problem.kind, "message": problem.message, "excluded": bool(excluded),
            })
        if progress is not None:
            progress(index + 1, len(cases))
    return rows


# --------------------------------------------------------------------------------------------
# command line


def main(argv: list[str] | None = None) -> int:
    """`curate --dataset DIR (--rebuild | --review | --history [--case ID])`."""
    import argparse

    parser = argparse.ArgumentParser(prog="curate", description="Curation journal tools: rebuild dataset.json, list cases to review, show the edit history.")
    parser.add_argument("--dataset", required=True, help="dataset folder (with dataset.json / journal.jsonl)")
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--rebuild", action="store_true", help="rewrite dataset.json from the journal alone")
    action.add_argument("--review", action="store_true", help="list the problems the automatic checks find")
    action.add_argument("--history", action="store_true", help="print the journal's edits (who, when, old -> new, why)")
    parser.add_argument("--case", help="with --history: only this case")
    args = parser.parse_args(argv)
    if args.rebuild:
        dataset = rebuild_manifest(args.dataset)
        print(f"rebuilt {dataset.path} from {JOURNAL_FILE}: {len(dataset.cases)} cases, {len(dataset.nodes)} nodes")
        return 0
    with CurationSession(args.dataset) as session:
        if session.recovered:
            print(f"note: {session.recovered}")
        if args.history:
            for entry in session.history(args.case):
                target = entry["target"]
                what = target["case_id"] + ("" if target["label_value"] is None else f" node {target['label_value']}")
                why = f" ({entry['reason']})" if entry["reason"] else ""
                print(f"{entry['seq']:>6} {entry['time']} {entry['user']}: {what} {entry['field']} {entry['old']!r} -> {entry['new']!r}{why}")
            return 0
        dataset = session.dataset
    rows = review_list(dataset)
    for row in rows:
        print(f"{'[excluded] ' if row['excluded'] else ''}{row['message']}")
    print(f"{len({row['case_id'] for row in rows})} of {len(dataset.cases)} cases to review ({len(rows)} problems)")
    return 0
