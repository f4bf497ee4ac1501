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
- ``manifest`` (target null): `new` is a complete dataset.json snapshot that replaces the state;
- ``read`` (node): one reader's read of the node (the line's `user` is the reader): `old` / `new`
  are that reader's previous and new label (0 / 1, null = no read); the line also holds the
  dataset label that follows from the reads, `label` (0 / 1 / null), and `label_source`.

Several readers. Each node keeps every reader's current read in its `reads` field
(``{"dr.a": 1, "dr.b": 0}``; the journal keeps every read ever made) and, beside it, the dataset
label `metastatic` with `label_source` saying how it was decided. The label follows the reads by
one rule (`label_from_reads`):

- an explicit label edit (`set_node_label` / `adjudicate`: the panel's relabel, `curate
  --relabel`, accepted suspect suggestions) is an adjudication: the label is set,
  `label_source` becomes "adjudicated by X", and later reads do not move it (only another
  adjudication does); a ``metastatic`` line holds its `label_source`;
- otherwise one reader's read sets the label ("single reader X"); with two or more readers the
  strict majority sets it ("majority of N readers"); a tie leaves the label as it was, with
  `label_source` "tie of N readers: adjudicate" until someone adjudicates.

A node without `label_source` (every dataset before readers existed) reads as "original"; the
fields are written only for nodes that were read or relabelled, so older tools still read the
file.

The journal's base is stored in its first line (seq 0): a ``manifest`` line holding dataset.json as
it was when the journal started. The journal file is created with that line in one atomic write
(`fileio.atomic_write_text`), so it exists complete or not at all. When dataset.json is found
changed by something other than a curation session (a hand edit, cases added by another tool),
by a session or by `curate --rebuild`, nothing in it is lost (`journal_outside_changes`): changed
labels, exclusions and notes become ordinary edit lines by the user "hand edit of dataset.json";
anything else (cases or nodes added or removed, other fields) is recorded whole as a new
``manifest`` line that later lines build on; the history before stays. So the journal alone
rebuilds the manifest: start from the last ``manifest`` line and replay the edits after it
(`rebuild_manifest`); an unreadable dataset.json is kept beside the rebuilt one.

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

import argparse
import copy
import csv
import getpass
import json
import os
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from .dataset import DATASET_FILE, CaseRecord, Dataset, NodeRecord
from .errors import InputError, OneLineArgumentParser
from .fileio import atomic_write_bytes, atomic_write_text

JOURNAL_FILE = "journal.jsonl"
LOCK_FILE = "journal.lock"
ENTRY_KEYS = ("seq", "time", "user", "target", "field", "old", "new", "reason")
NODE_FIELDS = ("metastatic", "excluded", "exclude_reason", "note", "read")
CASE_FIELDS = ("excluded", "exclude_reason", "note")
STALE_TEMP_SECONDS = 60.0  # leftovers of a killed atomic write older than this are removed
READS_KEY = "reads"  # node field: {reader: 0 / 1}, every reader's current read
SOURCE_KEY = "label_source"  # node field: how the dataset label was decided
ORIGINAL_SOURCE = "original"  # a node never read nor relabelled
ADJUDICATED_PREFIX = "adjudicated by "
READ_STATUSES = ("unread", "read by me", "read by others", "excluded")
HAND_EDITOR = "hand edit of dataset.json"  # the journal's `user` for changes found in dataset.json


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
    elif field == "read":
        if target.get("label_value") is None:
            raise InputError(f"Line {entry['seq'] + 1} of {JOURNAL_FILE} records a read of a case; restore the journal from a backup.")
        reads = dict(node_reads(record))
        if new is None:
            reads.pop(entry["user"], None)
        else:
            reads[entry["user"]] = new
        record.extra[READS_KEY] = reads
        record.metastatic = entry["label"]
        record.extra[SOURCE_KEY] = entry[SOURCE_KEY]
    else:
        setattr(record, field, new)
        if field == "metastatic" and SOURCE_KEY in entry:  # lines written before readers existed have none
            record.extra[SOURCE_KEY] = entry[SOURCE_KEY]
    return dataset


# --------------------------------------------------------------------------------------------
# several readers


def node_reads(record: NodeRecord) -> dict[str, int]:
    """{reader: 0 / 1} of a node ({} for a node nobody read, e.g. in a dataset older than readers)."""
    reads = record.extra.get(READS_KEY, {})
    if not isinstance(reads, dict) or any(not isinstance(name, str) or isinstance(v, bool) or v not in (0, 1) for name, v in reads.items()):
        raise InputError(
            f"Node {record.label_value} of case '{record.case_id}' has '{READS_KEY}' = {reads!r} but it must map reader names to 0 or 1; "
            f"fix dataset.json or rebuild it from the journal (curate --rebuild)."
        )
    return dict(reads)


def label_source(record: NodeRecord) -> str:
    """How the node's dataset label was decided ("original" when it never changed)."""
    source = record.extra.get(SOURCE_KEY, ORIGINAL_SOURCE)
    return source if isinstance(source, str) and source else ORIGINAL_SOURCE


def label_from_reads(label: int | None, source: str, reads: dict[str, int]) -> tuple[int | None, str]:
    """(dataset label, label_source) after a change of `reads`, from the current label and source.

    An adjudication stands; no reads leave the label as it is; one reader decides alone; two or
    more: the strict majority, a tie keeps the label and asks for adjudication.
    """
    if source.startswith(ADJUDICATED_PREFIX) or not reads:
        return label, source
    if len(reads) == 1:
        (reader, value), = reads.items()
        return value, f"single reader {reader}"
    metastatic = sum(reads.values())
    benign = len(reads) - metastatic
    if metastatic == benign:
        return label, f"tie of {len(reads)} readers: adjudicate"
    return int(metastatic > benign), f"majority of {len(reads)} readers"


def _label_argument(metastatic: Any) -> int | None:
    if hasattr(metastatic, "item"):  # numpy scalar
        metastatic = metastatic.item()
    if metastatic is not None and (isinstance(metastatic, bool) or metastatic not in (0, 1) or not isinstance(metastatic, (int, float))):
        raise InputError(f"The label {metastatic!r} is not valid; use 1 (metastatic), 0 (benign) or None (not labelled).")
    return None if metastatic is None else int(metastatic)


def replay(entries: list[dict], folder: str | os.PathLike) -> Dataset:
    """The dataset that the journal entries describe (from the last snapshot on)."""
    starts = [index for index, entry in enumerate(entries) if entry["field"] == "manifest"]
    if not starts:
        raise InputError(f"The curation journal in {folder} has no manifest snapshot; move it away to start a new journal from dataset.json.")
    dataset = Dataset(folder)
    for entry in entries[starts[-1]:]:
        dataset = _apply(dataset, entry)
    return dataset


@dataclass
class Rebuild:
    """What `rebuild` did: the dataset written, the hand edits of dataset.json it journalled first
    (one description each), and where an unreadable dataset.json was kept (None: none was)."""

    dataset: Dataset
    hand_edits: list[str]
    kept_unreadable: Path | None


def rebuild(dataset_folder: str | os.PathLike) -> Rebuild:
    """Rebuild dataset.json from the journal (last snapshot + the edits after it) and write it,
    losing nothing a user wrote into dataset.json by hand:

    - a readable dataset.json that differs from the journal (other than by a crash's one missing
      edit) holds hand edits: they are journalled first (`journal_outside_changes`), so the rebuilt
      file keeps them and the history shows them;
    - an unreadable one (half-written by hand, not JSON) is kept beside it as
      ``dataset.json.unreadable-<UTC time>`` before the journal's state replaces it.

    Refused while a session holds the dataset. A torn last journal line is dropped (and cut off).
    """
    folder = Path(dataset_folder).resolve()
    with _DatasetLock(folder):
        entries, length, torn = read_journal(folder)
        if not entries:
            raise InputError(f"There is no curation journal ({JOURNAL_FILE}) in {folder}; nothing to rebuild dataset.json from.")
        if torn:
            _truncate(folder / JOURNAL_FILE, length)
        dataset = replay(entries, folder)
        manifest = folder / DATASET_FILE
        hand_edits: list[str] = []
        kept = None
        if manifest.is_file():
            try:
                on_disk = Dataset.load(folder)
            except InputError:
                kept = folder / f"{DATASET_FILE}.unreadable-{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%S.%fZ')}"
                atomic_write_bytes(kept, manifest.read_bytes())
            else:
                if not _is_journal_state(on_disk, entries, folder):
                    dataset, _, hand_edits = journal_outside_changes(folder, dataset, on_disk, len(entries), _default_user(),
                                                                     "found in dataset.json by curate --rebuild")
        dataset.save()
        return Rebuild(dataset, hand_edits, kept)


def rebuild_manifest(dataset_folder: str | os.PathLike) -> Dataset:
    """`rebuild` and return the dataset it wrote."""
    return rebuild(dataset_folder).dataset


def _is_journal_state(on_disk: Dataset, entries: list[dict], folder: Path) -> bool:
    """Whether dataset.json is the journal's state, or one edit behind it (a kill between the
    journal line and the manifest write), i.e. holds nothing the journal does not."""
    current = on_disk.to_dict()
    if current == replay(entries, folder).to_dict():
        return True
    return len(entries) > 1 and entries[-1]["field"] != "manifest" and current == replay(entries[:-1], folder).to_dict()


# --------------------------------------------------------------------------------------------
# changes made to dataset.json outside a session (by hand or by another tool)


def _record_changes(what: str, old: dict, new: dict, fields: tuple[str, ...]) -> tuple[list[tuple[str, Any, Any]], list[str], bool]:
    """(editable field changes, descriptions, whether anything else changed) of one record."""
    changes, descriptions, other = [], [], False
    for key in list(old) + [key for key in new if key not in old]:
        if old.get(key) == new.get(key):
            continue
        descriptions.append(f"{what} {key} {old.get(key)!r} -> {new.get(key)!r}")
        if key in fields and key in old and key in new:
            changes.append((key, old[key], new[key]))
        else:
            other = True
    return changes, descriptions, other


def outside_changes(before: Dataset, after: Dataset) -> tuple[list[tuple[dict, str, Any, Any, str]], list[str], bool]:
    """How `after` differs from `before`: (edits as (target, field, old, new, reason or None) for the
    fields a session edits, one description per difference, whether there is more than those edits, e.g.
    cases or nodes added, removed or reordered, or other fields)."""
    old, new = before.to_dict(), after.to_dict()
    edits: list = []
    descriptions: list[str] = []
    structural = False
    for key in set(old) | set(new):
        if key not in ("cases", "nodes") and old.get(key) != new.get(key):
            descriptions.append(f"top-level '{key}' changed")
            structural = True
    for kind, fields, key_of, name_of in (
        ("cases", CASE_FIELDS, lambda r: (r["case_id"], None), lambda k: f"case {k[0]}"),
        ("nodes", NODE_FIELDS, lambda r: (r["case_id"], r["label_value"]), lambda k: f"{k[0]} node {k[1]}"),
    ):
        old_records = {key_of(r): r for r in old[kind]}
        new_records = {key_of(r): r for r in new[kind]}
        for key in old_records.keys() - new_records.keys():
            descriptions.append(f"{name_of(key)} removed")
        for key in new_records.keys() - old_records.keys():
            descriptions.append(f"{name_of(key)} added")
        common = [key for key in old_records if key in new_records]
        if old_records.keys() != new_records.keys() or common != [key for key in new_records if key in old_records]:
            structural = True
        for key in common:
            changes, text, other = _record_changes(name_of(key), old_records[key], new_records[key], fields)
            descriptions += text
            structural |= other
            target = {"case_id": key[0], "label_value": key[1]}
            changed = {field for field, _, _ in changes}
            for field, before_value, after_value in changes:
                if field == "exclude_reason" and "excluded" in changed:
                    continue  # the exclusion line sets the reason
                if field == "excluded" and after_value or field == "exclude_reason":  # replaying the line sets the reason
                    reason = new_records[key]["exclude_reason"]
                else:
                    reason = None
                edits.append((target, field, before_value, after_value, reason))
    return edits, descriptions, structural


def journal_outside_changes(folder: Path, journal_state: Dataset, on_disk: Dataset, next_seq: int, user: str,
                            why: str) -> tuple[Dataset, list[dict], list[str]]:
    """Journal how dataset.json (`on_disk`) differs from the journal's state, so nothing in it is lost.

    Changes of the fields a session edits become ordinary edit lines by "hand edit of
    dataset.json" (a hand-changed label's `label_source` becomes "adjudicated by hand edit of
    dataset.json"); anything else (cases or nodes added or removed, other fields) is kept whole as
    a ``manifest`` snapshot line. Returns (the resulting state, the lines appended, descriptions).
    """
    edits, descriptions, structural = outside_changes(journal_state, on_disk)
    lines = []
    state = Dataset.from_dict(copy.deepcopy(journal_state.to_dict()), folder)
    if not structural:
        for seq, (target, field, old, new, reason) in enumerate(edits, start=next_seq):
            entry = {"seq": seq, "time": _now_utc(), "user": HAND_EDITOR, "target": target, "field": field, "old": old, "new": new,
                     "reason": why if reason is None else reason}
            if field == "metastatic":
                entry[SOURCE_KEY] = ADJUDICATED_PREFIX + HAND_EDITOR
            lines.append(entry)
            state = _apply(state, entry)
        expected = on_disk.to_dict()
        for node in expected["nodes"]:
            if any(e["field"] == "metastatic" and e["target"] == {"case_id": node["case_id"], "label_value": node["label_value"]} for e in lines):
                node[SOURCE_KEY] = ADJUDICATED_PREFIX + HAND_EDITOR
        if state.to_dict() != expected:  # e.g. an inclusion that kept its reason: keep the file whole instead
            structural = True
    if structural:
        entry = {"seq": next_seq, "time": _now_utc(), "user": user, "target": None, "field": "manifest", "old": None,
                 "new": on_disk.to_dict(), "reason": why}
        lines = [entry]
        state = _apply(state, entry)
    for entry in lines:
        _append_line(folder / JOURNAL_FILE, entry)
    return state, lines, descriptions


def _append_line(path: Path, entry: dict) -> None:
    """Append one complete journal line and make it durable (flush + fsync) before returning."""
    line = (json.dumps(entry, ensure_ascii=False) + "\n").encode("utf-8")
    try:
        with open(path, "ab") as handle:
            handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as error:
        raise InputError(f"Cannot write the curation journal {path} ({error.strerror}); check the disk space and permissions.") from None


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
    been changed by hand or by another tool: the changes were journalled, `outside_changes`
    describes them) or "started" (new journal).
    """

    def __init__(self, dataset_folder: str | os.PathLike, user: str | None = None) -> None:
        self.user = _default_user() if user is None else _text(user, "user name").strip()
        if not self.user:
            raise InputError("The user name is empty; pass the reader's name or leave it out to use the login name.")
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
            self.outside_changes: list[str] = []  # what dataset.json held that the journal did not (now journalled)
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
            if on_disk.to_dict() != journal_state.to_dict():
                if _is_journal_state(on_disk, entries, self.folder):  # killed between the journal line and the manifest write
                    journal_state.save()
                    notes.append("replayed")
                else:  # changed by hand or by another tool: journal the changes (nothing in dataset.json is lost)
                    journal_state = self._journal_outside_changes(journal_state, on_disk)
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
            self.dataset = self._journal_outside_changes(self.dataset, on_disk)
        self._manifest_stat = _stat_key(self.folder / DATASET_FILE)

    def _journal_outside_changes(self, journal_state: Dataset, on_disk: Dataset) -> Dataset:
        state, lines, descriptions = journal_outside_changes(self.folder, journal_state, on_disk, self._next_seq, self.user,
                                                             "dataset.json was changed outside the curation session")
        self._next_seq += len(lines)
        self.outside_changes += descriptions
        if state.to_dict() != on_disk.to_dict():  # a hand-changed label now names its source
            state.save()
        return state

    # ---- writing -------------------------------------------------------------------------------

    def _entry(self, target: dict | None, field: str, old: Any, new: Any, reason: str, user: str | None = None) -> dict:
        return {"seq": self._next_seq, "time": _now_utc(), "user": self.user if user is None else user, "target": target,
                "field": field, "old": old, "new": new, "reason": reason}

    def _reader(self, reader: str | None) -> str:
        """The name on an edit: `reader`, or the session's user when None."""
        if reader is None:
            return self.user
        name = _text(reader, "reader name").strip()
        if not name:
            raise InputError("The reader name is empty; pass the reader's name or leave it out to use the session's user.")
        return name

    def _append(self, entry: dict) -> None:
        _append_line(self.journal_path, entry)
        self._next_seq += 1

    def _commit(self, target: dict, field: str, old: Any, new: Any, reason: str, reader: str | None = None,
                more: dict | None = None) -> dict | None:
        """Journal one edit, then save; `more` adds keys to the line (a label's `label_source`)."""
        if old == new and not more:
            return None
        entry = self._entry(target, field, old, new, reason, self._reader(reader))
        entry.update(more or {})
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

    def _exclude(self, record, target: dict, reason: str, what: str, reader: str | None) -> dict | None:
        reason = _text(reason, "reason").strip()
        if not reason:
            raise InputError(f"Give a reason for excluding {what} (e.g. 'motion artefact'); it goes into the audit journal.")
        if record.excluded:
            return self._commit(target, "exclude_reason", record.exclude_reason, reason, reason, reader)
        return self._commit(target, "excluded", False, True, reason, reader)

    def _include(self, record, target: dict, reason: str, reader: str | None) -> dict | None:
        return self._commit(target, "excluded", record.excluded, False, _text(reason, "reason").strip(), reader)

    # ---- edits (each returns the journal entry written, or None for a no-op) ---------------------
    # `reader` names who made the edit (the journal line's `user`); None: the session's user.

    def set_node_label(self, case_id: str, label_value: int, metastatic: int | None, reason: str = "",
                       reader: str | None = None) -> dict | None:
        """Set the dataset label, 1 (metastatic), 0 (benign) or None (not labelled): an adjudication.

        `label_source` becomes "adjudicated by <reader>". Setting the label it already has is a
        no-op, except on a node with reads whose label was not yet adjudicated by this reader: there
        confirming the label is a decision, and is journalled.
        """
        record, target = self._node(case_id, label_value)
        new = _label_argument(metastatic)
        name = self._reader(reader)
        source = ADJUDICATED_PREFIX + name
        if new == record.metastatic and (not node_reads(record) or label_source(record) == source):
            return None
        return self._commit(target, "metastatic", record.metastatic, new, _text(reason, "reason").strip(), name, {SOURCE_KEY: source})

    adjudicate = set_node_label  # the name for a several-readers workflow

    def read_node(self, case_id: str, label_value: int, metastatic: int | None, reader: str | None = None,
                  reason: str = "") -> dict | None:
        """Record `reader`'s read of a node, 1 (metastatic) or 0 (benign); None withdraws the read.

        Every reader's read is kept beside the others; the dataset label follows `label_from_reads`
        (one reader decides alone, several by majority, an adjudication stands). Returns the line
        (with the resulting `label` and `label_source`), or None when the reader's read is unchanged.
        """
        record, target = self._node(case_id, label_value)
        new = _label_argument(metastatic)
        name = self._reader(reader)
        reads = node_reads(record)
        old = reads.get(name)
        if old == new:
            return None
        if new is None:
            reads.pop(name)
        else:
            reads[name] = new
        label, source = label_from_reads(record.metastatic, label_source(record), reads)
        return self._commit(target, "read", old, new, _text(reason, "reason").strip(), name, {"label": label, SOURCE_KEY: source})

    def exclude_node(self, case_id: str, label_value: int, reason: str, reader: str | None = None) -> dict | None:
        record, target = self._node(case_id, label_value)
        return self._exclude(record, target, reason, f"node {record.label_value} of case '{record.case_id}'", reader)

    def include_node(self, case_id: str, label_value: int, reason: str = "", reader: str | None = None) -> dict | None:
        record, target = self._node(case_id, label_value)
        return self._include(record, target, reason, reader)

    def set_node_note(self, case_id: str, label_value: int, note: str, reader: str | None = None) -> dict | None:
        record, target = self._node(case_id, label_value)
        return self._commit(target, "note", record.note, _text(note, "note"), "", reader)

    def exclude_case(self, case_id: str, reason: str, reader: str | None = None) -> dict | None:
        record, target = self._case(case_id)
        return self._exclude(record, target, reason, f"case '{record.case_id}'", reader)

    def include_case(self, case_id: str, reason: str = "", reader: str | None = None) -> dict | None:
        record, target = self._case(case_id)
        return self._include(record, target, reason, reader)

    def set_case_note(self, case_id: str, note: str, reader: str | None = None) -> dict | None:
        record, target = self._case(case_id)
        return self._commit(target, "note", record.note, _text(note, "note"), "", reader)

    # ---- several readers: what the station and the panel show -------------------------------------

    def reader_labels(self, case_id: str, label_value: int) -> dict[str, int]:
        """{reader: 0 / 1}: every reader's current read of the node (a copy)."""
        record, _ = self._node(case_id, label_value)
        return node_reads(record)

    def label_source(self, case_id: str, label_value: int) -> str:
        """How the node's dataset label was decided: "original", "single reader X", "majority of N
        readers", "tie of N readers: adjudicate" or "adjudicated by X"."""
        record, _ = self._node(case_id, label_value)
        return label_source(record)

    def case_read_status(self, case_id: str, reader: str | None = None) -> str:
        """'excluded' (the case, or all its nodes), 'read by me' (`reader` read every node that is not
        excluded), 'read by others' (not all by `reader`, but another reader read some node) or
        'unread'."""
        record, _ = self._case(case_id)
        name = self._reader(reader)
        nodes = [node for node in self.dataset.nodes_of(record.case_id) if not node.excluded]
        if record.excluded or (not nodes and self.dataset.nodes_of(record.case_id)):
            return "excluded"
        reads = [node_reads(node) for node in nodes]
        if nodes and all(name in node for node in reads):
            return "read by me"
        if any(reader_name != name for node in reads for reader_name in node):
            return "read by others"
        return "unread"

    # ---- history and lifetime --------------------------------------------------------------------

    def history(self, case_id: str | None = None, label_value: int | None = None) -> list[dict]:
        """The journal's edit lines (oldest first), optionally of one case (and one of its nodes)."""
        return journal_history(self.folder, case_id, label_value)

    def _check_open(self) -> None:
        if self._lock._handle is None:
            raise InputError("This curation session is closed; open a new CurationSession to edit the dataset.")

    def close(self) -> None:
        self._lock.release()

    def __enter__(self) -> "CurationSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def journal_history(dataset_folder: str | os.PathLike, case_id: str | None = None, label_value: int | None = None,
                    snapshots: bool = False) -> list[dict]:
    """The journal's edit lines (oldest first), optionally of one case (and one of its nodes);
    with `snapshots` (and no filter) also its ``manifest`` lines.

    Reads the journal only (no lock), so it works while a session (the panel, the station) is open.
    """
    out = []
    for entry in read_journal(dataset_folder)[0]:
        target = entry["target"]
        if target is None:
            if snapshots and case_id is None:
                out.append(entry)
            continue
        if case_id is not None and target["case_id"] != case_id:
            continue
        if label_value is not None and target["label_value"] != label_value:
            continue
        out.append(entry)
    return out


def format_entry(entry: dict) -> str:
    """One journal line as text: seq, time, who: what field old -> new (why) [how the label was decided]."""
    target = entry["target"]
    if target is None:
        manifest = entry["new"]
        return (f"{entry['seq']:>6} {entry['time']} {entry['user']}: dataset.json as a whole, {len(manifest.get('cases', []))} cases, "
                f"{len(manifest.get('nodes', []))} nodes ({entry['reason']})")
    what = target["case_id"] + ("" if target["label_value"] is None else f" node {target['label_value']}")
    why = f" ({entry['reason']})" if entry["reason"] else ""
    if entry["field"] == "read":
        label = f" [dataset label {entry['label']!r}: {entry[SOURCE_KEY]}]"
    else:
        label = f" [{entry[SOURCE_KEY]}]" if SOURCE_KEY in entry else ""
    return f"{entry['seq']:>6} {entry['time']} {entry['user']}: {what} {entry['field']} {entry['old']!r} -> {entry['new']!r}{why}{label}"


# --------------------------------------------------------------------------------------------
# suspect suggestions


def read_table(path: Path, what: str, columns: set[str], fix: str) -> list[dict]:
    """The rows of a CSV file that must have `columns`; one line naming the problem and `fix` otherwise."""
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            missing = columns - set(reader.fieldnames or [])
            rows = list(reader)
    except FileNotFoundError:
        raise InputError(f"The {what} {path} does not exist; {fix}.") from None
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise InputError(f"Cannot read the {what} {path} ({error}); {fix}.") from None
    if missing:
        raise InputError(f"The {what} {path} has no {', '.join(sorted(missing))} column; {fix}.")
    return rows


def apply_suggestions(session: CurationSession, suspects_csv: str | os.PathLike, top: int, reader: str | None = None) -> list[dict]:
    """Set the suggested label of the `top` highest-ranked nodes of a suspects.csv (`suspects`
    command), each an adjudication journalled with the reason "suspects rank N".

    The whole list is checked before any edit (a node the dataset does not have is an error). A
    node is left as it is, and says why, when it is excluded, already has the suggested label, or
    was relabelled since the ranking (its label is no longer the list's `given_label`). Returns one
    dict per row taken: `rank`, `case_id`, `label_value`, `suggested_label`, `entry` (the journal
    line, or None) and `skipped` (why not, or "").
    """
    if isinstance(top, bool) or not isinstance(top, int) or top < 1:
        raise InputError(f"--top {top!r} must be a whole number of at least 1 (how many of the most suspect nodes to relabel).")
    path = Path(suspects_csv)
    records = read_table(path, "suspects list", {"rank", "case_id", "label_value", "given_label", "suggested_label"},
                         "run the suspects command first (suspects --dataset D --out D)")
    rows = []
    for number, record in enumerate(records, start=2):
        try:
            row = {"rank": int(record["rank"]), "case_id": record["case_id"], "label_value": int(record["label_value"]),
                   "given_label": int(record["given_label"]), "suggested_label": int(record["suggested_label"])}
        except (TypeError, ValueError):
            raise InputError(f"Row {number} of {path} has no whole-number rank, label_value, given_label or suggested_label; run the suspects command again.") from None
        if row["suggested_label"] not in (0, 1):
            raise InputError(f"Row {number} of {path} suggests the label {row['suggested_label']}; a label is 0 or 1: run the suspects command again.")
        rows.append(row)
    rows = sorted(rows, key=lambda row: row["rank"])[:top]
    for row in rows:  # every node first: nothing is changed when one of them is not in the dataset
        try:
            session.dataset.node(row["case_id"], row["label_value"])
        except InputError:
            raise InputError(
                f"{path} ranks as {row['rank']} node {row['label_value']} of case '{row['case_id']}', which the dataset does not have; "
                "run the suspects command again on this dataset."
            ) from None
    out = []
    for row in rows:
        node = session.dataset.node(row["case_id"], row["label_value"])
        skipped = ""
        if node.excluded or session.dataset.case(node.case_id).excluded:
            skipped = "excluded"
        elif node.metastatic == row["suggested_label"]:
            skipped = f"already labelled {row['suggested_label']}"
        elif node.metastatic != row["given_label"]:
            skipped = f"relabelled since the ranking (ranked as {row['given_label']}, now {node.metastatic!r})"
        entry = None if skipped else session.set_node_label(
            node.case_id, node.label_value, row["suggested_label"], f"suspects rank {row['rank']}", reader=reader)
        out.append({**{key: row[key] for key in ("rank", "case_id", "label_value", "suggested_label")}, "entry": entry, "skipped": skipped})
    return out


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


LABEL_WORDS = {"metastatic": 1, "m": 1, "1": 1, "benign": 0, "b": 0, "0": 0, "none": None, "unlabelled": None}


def _label_word(text: str, option: str, allow_none: bool) -> int | None:
    words = [word for word, value in LABEL_WORDS.items() if allow_none or value is not None]
    try:
        value = LABEL_WORDS[text.strip().lower()]
    except KeyError:
        value = -1
    if value == -1 or (value is None and not allow_none):
        raise InputError(f"{option} {text!r} is not a label; use one of: {', '.join(words)}.")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineArgumentParser(
        prog="python -m LymphNodeClassifierLib curate",
        description="Journalled curation of a dataset from the command line: edits (with the reader's name), suspect suggestions, "
                    "the readers' agreement, the edit history, the review list and dataset.json rebuilt from the journal.",
    )
    parser.add_argument("--dataset", required=True, help="dataset folder (with dataset.json / journal.jsonl)")
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--relabel", metavar="LABEL", help="set the dataset label of --case/--node (metastatic, benign or none): an adjudication")
    action.add_argument("--read", metavar="LABEL", help="record --reader's read of --case/--node (metastatic or benign; none withdraws it); "
                                                         "the dataset label follows the readers (one alone, several by majority)")
    action.add_argument("--exclude", action="store_true", help="exclude --case, or its --node, with --reason")
    action.add_argument("--include", action="store_true", help="include --case, or its --node, again")
    action.add_argument("--note", metavar="TEXT", help="set the note of --case, or of its --node ('' clears it)")
    action.add_argument("--apply-suggestions", metavar="SUSPECTS_CSV", help="set the suggested labels of the --top K nodes of a suspects.csv")
    action.add_argument("--agreement", action="store_true", help="Cohen's kappa between the readers and between the model and each reader; "
                                                                 "writes agreement.json and disagreements.csv")
    action.add_argument("--history", action="store_true", help="print the journal's edits (who, when, old -> new, why)")
    action.add_argument("--review", action="store_true", help="list the problems the automatic checks find")
    action.add_argument("--rebuild", action="store_true", help="rewrite dataset.json from the journal (hand edits in it are journalled first)")
    parser.add_argument("--case", help="the case to edit; with --history: only this case")
    parser.add_argument("--node", type=int, metavar="LABEL_VALUE", help="the node (its value in the label map) of --case to edit")
    parser.add_argument("--reason", default="", help="why (required with --exclude); goes into the journal")
    parser.add_argument("--reader", help="the reader's name on the edits (default: the login name)")
    parser.add_argument("--top", type=int, metavar="K", help="with --apply-suggestions: how many of the most suspect nodes")
    parser.add_argument("--predictions", help="with --agreement: the model's predictions (evaluate's predictions.csv or classify --dataset's nodes.csv)")
    parser.add_argument("--threshold", type=float, help="with --agreement: metastatic when probability >= this (default: the table's "
                                                        "prediction column, else 0.5)")
    parser.add_argument("--out", help="with --agreement: folder for agreement.json and disagreements.csv (default: the dataset folder)")
    return parser


_OPTION_ACTIONS = {  # option -> the actions it goes with
    "case": ("relabel", "read", "exclude", "include", "note", "history"), "node": ("relabel", "read", "exclude", "include", "note", "history"),
    "reason": ("relabel", "read", "exclude", "include"), "reader": ("relabel", "read", "exclude", "include", "note", "apply_suggestions"),
    "top": ("apply_suggestions",), "predictions": ("agreement",), "threshold": ("agreement",), "out": ("agreement",),
}
_NODE_ACTIONS = ("relabel", "read")


def _check_options(args) -> str:
    """The action chosen; one line for an option that does not go with it or a missing target."""
    actions = ("relabel", "read", "exclude", "include", "note", "apply_suggestions", "agreement", "history", "review", "rebuild")
    chosen = next(name for name in actions if getattr(args, name) not in (None, False))
    flag = "--" + chosen.replace("_", "-")
    for option, allowed in _OPTION_ACTIONS.items():
        if getattr(args, option) not in (None, "") and chosen not in allowed:
            raise InputError(f"--{option} does not go with {flag}; see `curate --help`.")
    if chosen in _NODE_ACTIONS + ("exclude", "include", "note") and args.case is None:
        raise InputError(f"{flag} needs --case (and --node for a node); see `curate --help`.")
    if chosen in _NODE_ACTIONS and args.node is None:
        raise InputError(f"{flag} labels a node: add --node LABEL_VALUE; see `curate --help`.")
    if chosen == "history" and args.node is not None and args.case is None:
        raise InputError("--history --node needs --case; see `curate --help`.")
    if chosen == "apply_suggestions" and args.top is None:
        raise InputError("--apply-suggestions needs --top K (how many of the most suspect nodes to relabel); see `curate --help`.")
    return chosen


def _edit(session: CurationSession, chosen: str, args) -> dict | None:
    case_id, value, reader = args.case, args.node, args.reader
    if chosen == "relabel":
        return session.set_node_label(case_id, value, _label_word(args.relabel, "--relabel", True), args.reason, reader=reader)
    if chosen == "read":
        return session.read_node(case_id, value, _label_word(args.read, "--read", True), reader=reader, reason=args.reason)
    if chosen == "exclude":
        if value is None:
            return session.exclude_case(case_id, args.reason, reader=reader)
        return session.exclude_node(case_id, value, args.reason, reader=reader)
    if chosen == "include":
        if value is None:
            return session.include_case(case_id, args.reason, reader=reader)
        return session.include_node(case_id, value, args.reason, reader=reader)
    if value is None:
        return session.set_case_note(case_id, args.note, reader=reader)
    return session.set_node_note(case_id, value, args.note, reader=reader)


def main(argv: list[str] | None = None) -> int:
    """`curate --dataset DIR <action> [options]` (`curate --help` lists them)."""
    args = build_parser().parse_args(argv)
    chosen = _check_options(args)
    if chosen == "rebuild":
        result = rebuild(args.dataset)
        if result.kept_unreadable is not None:
            print(f"note: the unreadable dataset.json was kept as {result.kept_unreadable}")
        if result.hand_edits:
            print(f"kept {len(result.hand_edits)} change(s) made to dataset.json by hand, journalled first: {'; '.join(result.hand_edits)}")
        dataset = result.dataset
        print(f"rebuilt {dataset.path} from {JOURNAL_FILE}: {len(dataset.cases)} cases, {len(dataset.nodes)} nodes")
    elif chosen == "history":
        for entry in journal_history(_dataset_folder(args.dataset), args.case, args.node, snapshots=True):
            print(format_entry(entry))
    elif chosen == "agreement":
        from .agreement import agreement_report, read_predictions, report_lines, write_agreement

        if args.predictions is None and args.threshold is not None:
            raise InputError("--threshold needs --predictions (the model's probabilities); see `curate --help`.")
        folder = _dataset_folder(args.dataset)
        model = read_predictions(args.predictions, args.threshold) if args.predictions else (None, None, None)
        report, disagreements = agreement_report(Dataset.load(folder), *model)
        paths = write_agreement(report, disagreements, folder if args.out is None else args.out)
        for line in report_lines(report):
            print(line)
        print(f"wrote {paths[0]} and {paths[1]}")
    else:
        with CurationSession(args.dataset, user=args.reader) as session:
            if session.recovered:
                print(f"note: {session.recovered}" + (f" ({'; '.join(session.outside_changes)})" if session.outside_changes else ""))
            if chosen == "review":
                dataset = session.dataset
            elif chosen == "apply_suggestions":
                results = apply_suggestions(session, args.apply_suggestions, args.top, reader=args.reader)
                for row in results:
                    print(format_entry(row["entry"]) if row["entry"] else f"rank {row['rank']}: {row['case_id']} node {row['label_value']} "
                                                                          f"left as it is ({row['skipped']})")
                print(f"relabelled {sum(row['entry'] is not None for row in results)} of the top {len(results)} suspects")
            else:
                entry = _edit(session, chosen, args)
                print(format_entry(entry) if entry else "nothing changed: the dataset already says so")
        if chosen == "review":
            rows = review_list(dataset)
            for row in rows:
                print(f"{'[excluded] ' if row['excluded'] else ''}{row['message']}")
            print(f"{len({row['case_id'] for row in rows})} of {len(dataset.cases)} cases to review ({len(rows)} problems)")
    sys.stdout.flush()  # a closed pipe (`| head -1`) shows here, inside the command, where cli.exit_code handles it
    return 0


def _dataset_folder(path: str) -> Path:
    folder = Path(path)
    if folder.name == DATASET_FILE:
        folder = folder.parent
    if not folder.is_dir():
        raise InputError(f"The dataset folder {folder} does not exist; choose a folder with a dataset.json.")
    return folder
