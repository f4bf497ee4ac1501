"""Curation: every edit journalled then saved atomically; recovery after kills, torn lines, lag.

The crash test is real: a writer subprocess edits a dataset in a loop and is killed with SIGKILL
at random moments. The journal is checked with an oracle written here (not the module's replay).
"""

import copy
import getpass
import json
import os
import random
import signal
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from LymphNodeClassifierLib import cli
from LymphNodeClassifierLib.curation import JOURNAL_FILE, CurationSession, read_journal, rebuild_manifest, review_list
from LymphNodeClassifierLib.dataset import Dataset
from LymphNodeClassifierLib.errors import InputError

MODULE_DIR = Path(__file__).resolve().parent.parent / "LymphNodeClassifier"
CASES = ["P0001-S1", "P0001-S2", "P0002-S1"]
LABELS = [1, 2, 5]


def make_dataset(folder: Path) -> Dataset:
    """A manifest only (the edits never read images): 3 cases with 3 nodes each."""
    dataset = Dataset.create(folder, "curation test", created="2024-01-01T00:00:00+00:00")
    for case_id in CASES:
        dataset.add_case(case_id, case_id.split("-")[0], f"images/{case_id}_ct.nrrd", f"images/{case_id}_labels.nrrd")
        for index, value in enumerate(LABELS):
            dataset.add_node(case_id, value, index % 2, true_metastatic=index % 2, label_flipped=False, custom={"kept": value})
    dataset.extra["site"] = "unit test"  # an unknown top-level key must survive curation
    dataset.save()
    return dataset


@pytest.fixture()
def folder(tmp_path) -> Path:
    make_dataset(tmp_path / "ds")
    return tmp_path / "ds"


def journal_lines(folder: Path) -> list[dict]:
    data = (folder / JOURNAL_FILE).read_bytes()
    assert data.endswith(b"\n")
    return [json.loads(line) for line in data.split(b"\n")[:-1]]


def manifest(folder: Path) -> dict:
    return json.loads((folder / "dataset.json").read_text(encoding="utf-8"))


def node_of(data: dict, case_id: str, label_value: int) -> dict:
    return next(n for n in data["nodes"] if n["case_id"] == case_id and n["label_value"] == label_value)


def case_of(data: dict, case_id: str) -> dict:
    return next(c for c in data["cases"] if c["case_id"] == case_id)


# --------------------------------------------------------------------------------------------
# an oracle for the journal, independent of curation.py's replay


def oracle(entries: list[dict]) -> dict:
    """The manifest the journal describes: the last snapshot, then each edit applied to the dicts."""
    start = max(i for i, entry in enumerate(entries) if entry["field"] == "manifest")
    state = copy.deepcopy(entries[start]["new"])
    for entry in entries[start + 1:]:
        target = entry["target"]
        if target["label_value"] is None:
            record = case_of(state, target["case_id"])
        else:
            record = node_of(state, target["case_id"], target["label_value"])
        if entry["field"] == "read":  # one reader's read; the line records the dataset label that followed
            reads = record.setdefault("reads", {})
            assert reads.get(entry["user"]) == entry["old"], f"journal line {entry['seq']}: old read does not match the state"
            if entry["new"] is None:
                del reads[entry["user"]]
            else:
                reads[entry["user"]] = entry["new"]
            record["metastatic"], record["label_source"] = entry["label"], entry["label_source"]
            continue
        assert record[entry["field"]] == entry["old"], f"journal line {entry['seq']}: old value does not match the state"
        record[entry["field"]] = entry["new"]
        if entry["field"] == "excluded":
            record["exclude_reason"] = entry["reason"] if entry["new"] else ""
        if entry["field"] == "metastatic" and "label_source" in entry:
            record["label_source"] = entry["label_source"]
    return state


def split_journal(data: bytes) -> tuple[list[dict], bytes]:
    lines = data.split(b"\n")
    tail = lines.pop()
    return [json.loads(line) for line in lines], tail


# --------------------------------------------------------------------------------------------
# edits and audit fields


def test_each_edit_is_journalled_then_saved(folder):
    before = datetime.now(timezone.utc)
    with CurationSession(folder, user="dr.a") as session:
        assert session.recovered == "started"
        entries = [
            session.set_node_label("P0001-S1", 2, 0, reason="pathology report"),
            session.exclude_node("P0001-S1", 5, "motion artefact"),
            session.exclude_node("P0001-S1", 5, "streak artefact"),  # a new reason for an excluded node
            session.set_node_note("P0002-S1", 1, "check the hilum"),
            session.exclude_case("P0001-S2", "wrong series"),
            session.set_case_note("P0002-S1", "contrast late"),
            session.include_node("P0001-S1", 5, "artefact is tolerable"),
            session.include_case("P0001-S2", "right series after all"),
            session.set_node_label("P0002-S1", 1, None),  # back to "not labelled"
        ]
        # dataset.json on disk follows every edit at once
        data = manifest(folder)
        assert node_of(data, "P0001-S1", 2)["metastatic"] == 0
        assert node_of(data, "P0001-S1", 5)["excluded"] is False and node_of(data, "P0001-S1", 5)["exclude_reason"] == ""
        assert node_of(data, "P0002-S1", 1)["note"] == "check the hilum" and node_of(data, "P0002-S1", 1)["metastatic"] is None
        assert case_of(data, "P0001-S2")["excluded"] is False and case_of(data, "P0001-S2")["exclude_reason"] == ""
        assert case_of(data, "P0002-S1")["note"] == "contrast late"
        assert data["site"] == "unit test" and node_of(data, "P0001-S1", 1)["custom"] == {"kept": 1}
        assert session.dataset.to_dict() == data

    lines = journal_lines(folder)
    assert lines[0]["field"] == "manifest" and lines[0]["target"] is None and lines[0]["reason"] == "journal started"
    assert lines[1:] == entries
    assert [line["seq"] for line in lines] == list(range(len(lines)))
    for line in lines:
        label_keys = {"label_source"} if line["field"] == "metastatic" else set()  # a label edit says how the label was decided
        assert set(line) == {"seq", "time", "user", "target", "field", "old", "new", "reason"} | label_keys
        if label_keys:
            assert line["label_source"] == "adjudicated by dr.a"
        moment = datetime.fromisoformat(line["time"])
        assert moment.utcoffset().total_seconds() == 0 and before.replace(microsecond=0) <= moment <= datetime.now(timezone.utc)
        assert line["user"] == "dr.a"
    expected = [
        ({"case_id": "P0001-S1", "label_value": 2}, "metastatic", 1, 0, "pathology report"),
        ({"case_id": "P0001-S1", "label_value": 5}, "excluded", False, True, "motion artefact"),
        ({"case_id": "P0001-S1", "label_value": 5}, "exclude_reason", "motion artefact", "streak artefact", "streak artefact"),
        ({"case_id": "P0002-S1", "label_value": 1}, "note", "", "check the hilum", ""),
        ({"case_id": "P0001-S2", "label_value": None}, "excluded", False, True, "wrong series"),
        ({"case_id": "P0002-S1", "label_value": None}, "note", "", "contrast late", ""),
        ({"case_id": "P0001-S1", "label_value": 5}, "excluded", True, False, "artefact is tolerable"),
        ({"case_id": "P0001-S2", "label_value": None}, "excluded", True, False, "right series after all"),
        ({"case_id": "P0002-S1", "label_value": 1}, "metastatic", 0, None, ""),
    ]
    assert [(e["target"], e["field"], e["old"], e["new"], e["reason"]) for e in entries] == expected
    assert oracle(lines) == manifest(folder)
    assert rebuild_manifest(folder).to_dict() == manifest(folder)


def test_exclusion_reason_is_in_the_manifest(folder):
    with CurationSession(folder, user="u") as session:
        session.exclude_node("P0001-S1", 1, "  touches the edge ")
        session.exclude_case("P0002-S1", "no contrast")
    data = manifest(folder)
    assert node_of(data, "P0001-S1", 1)["excluded"] is True and node_of(data, "P0001-S1", 1)["exclude_reason"] == "touches the edge"
    assert case_of(data, "P0002-S1")["exclude_reason"] == "no contrast"
    assert Dataset.load(folder).node("P0001-S1", 1).excluded


def test_default_user_is_the_login_name(folder):
    with CurationSession(folder) as session:
        entry = session.set_node_note("P0001-S1", 1, "x")
    assert entry["user"] == getpass.getuser()


def test_no_op_edits_write_nothing(folder):
    with CurationSession(folder, user="u") as session:
        session.exclude_node("P0001-S1", 1, "blurred")
        session.set_node_note("P0001-S1", 2, "n")
        journal, data = (folder / JOURNAL_FILE).read_bytes(), (folder / "dataset.json").read_bytes()
        stamp = (folder / "dataset.json").stat().st_mtime_ns
        assert session.set_node_label("P0001-S1", 1, 0) is None  # already 0
        assert session.set_node_label("P0001-S1", 2, 1.0) is None  # already 1
        assert session.exclude_node("P0001-S1", 1, "blurred") is None
        assert session.include_node("P0001-S1", 2) is None
        assert session.set_node_note("P0001-S1", 2, "n") is None
        assert session.include_case("P0001-S1") is None
        assert session.set_case_note("P0001-S1", "") is None
        assert (folder / JOURNAL_FILE).read_bytes() == journal and (folder / "dataset.json").read_bytes() == data
        assert (folder / "dataset.json").stat().st_mtime_ns == stamp


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda s: s.set_node_label("nope", 1, 1), "no case 'nope'"),
        (lambda s: s.set_node_label("P0001-S1", 9, 1), "no node 9"),
        (lambda s: s.set_node_label("P0001-S1", "1", 1), "not a whole number"),
        (lambda s: s.set_node_label("P0001-S1", 1, 2), "is not valid; use 1"),
        (lambda s: s.set_node_label("P0001-S1", 1, "1"), "is not valid; use 1"),
        (lambda s: s.set_node_label("P0001-S1", 1, True), "is not valid; use 1"),
        (lambda s: s.exclude_node("P0001-S1", 1, "  "), "Give a reason"),
        (lambda s: s.exclude_case("P0001-S1", ""), "Give a reason"),
        (lambda s: s.exclude_case("P0009-S1", "x"), "no case"),
        (lambda s: s.set_node_note("P0001-S1", 1, None), "must be text"),
        (lambda s: s.set_case_note("P0001-S1", 3), "must be text"),
    ],
)
def test_bad_edits_are_refused_and_write_nothing(folder, edit, message):
    with CurationSession(folder, user="u") as session:
        journal, data = (folder / JOURNAL_FILE).read_bytes(), (folder / "dataset.json").read_bytes()
        with pytest.raises(InputError, match=message) as error:
            edit(session)
        assert "\n" not in str(error.value)
        assert (folder / JOURNAL_FILE).read_bytes() == journal and (folder / "dataset.json").read_bytes() == data


def test_one_session_at_a_time_and_closed_sessions_refuse_edits(folder):
    session = CurationSession(folder, user="a")
    with pytest.raises(InputError, match="another session"):
        CurationSession(folder, user="b")
    with pytest.raises(InputError, match="another session"):
        rebuild_manifest(folder)
    session.close()
    with pytest.raises(InputError, match="closed"):
        session.set_node_note("P0001-S1", 1, "late")
    with CurationSession(folder, user="b") as second:
        assert second.set_node_note("P0001-S1", 1, "now") is not None
    with pytest.raises(InputError, match="user name is empty"):
        CurationSession(folder, user=" ")
    with pytest.raises(InputError, match="does not exist"):
        CurationSession(folder / "missing")


def test_journal_is_append_only(folder):
    history = []
    with CurationSession(folder, user="u") as session:
        for i in range(12):
            session.set_node_note("P0001-S1", 1, f"note {i}")
            session.set_node_label("P0002-S1", 2, i % 2)
            history.append((folder / JOURNAL_FILE).read_bytes())
    with CurationSession(folder, user="v") as session:  # reopening appends, never rewrites
        session.exclude_case("P0001-S2", "duplicate")
    history.append((folder / JOURNAL_FILE).read_bytes())
    for earlier, later in zip(history, history[1:]):
        assert len(later) > len(earlier) and later.startswith(earlier)
    lines = journal_lines(folder)
    assert [line["seq"] for line in lines] == list(range(len(lines)))
    assert sum(1 for line in lines if line["field"] == "manifest") == 1  # one base, never re-snapshotted
    assert [line["new"] for line in lines if line["field"] == "note"] == [f"note {i}" for i in range(12)]


def test_history_filters_by_case_and_node(folder):
    with CurationSession(folder, user="u") as session:
        session.set_node_note("P0001-S1", 1, "a")
        session.set_node_note("P0001-S1", 2, "b")
        session.set_case_note("P0002-S1", "c")
        assert [e["new"] for e in session.history()] == ["a", "b", "c"]
        assert [e["new"] for e in session.history("P0001-S1")] == ["a", "b"]
        assert [e["new"] for e in session.history("P0001-S1", 2)] == ["b"]


# --------------------------------------------------------------------------------------------
# several readers


def test_two_readers_reads_are_both_kept_and_the_label_follows_the_rule(folder):
    with CurationSession(folder, user="curator") as session:
        assert session.label_source("P0001-S1", 2) == "original" and session.reader_labels("P0001-S1", 2) == {}
        first = session.read_node("P0001-S1", 2, 0, reader="dr.a")  # original label 1
        assert (first["user"], first["old"], first["new"], first["label"], first["label_source"]) == ("dr.a", None, 0, 0, "single reader dr.a")
        assert session.read_node("P0001-S1", 2, 0, reader="dr.a") is None  # the same read again: nothing written
        second = session.read_node("P0001-S1", 2, 1, reader="dr.b")
        # a tie keeps the label (dr.a's) and asks for adjudication; dr.a's read is not overwritten
        assert (second["label"], second["label_source"]) == (0, "tie of 2 readers: adjudicate")
        assert session.reader_labels("P0001-S1", 2) == {"dr.a": 0, "dr.b": 1}
        third = session.read_node("P0001-S1", 2, 1, reader="dr.c")
        assert (third["label"], third["label_source"]) == (1, "majority of 3 readers")
        changed = session.read_node("P0001-S1", 2, 0, reader="dr.b")  # dr.b changes their mind: 2 benign vs 1
        assert (changed["old"], changed["new"], changed["label"]) == (1, 0, 0)
        assert session.reader_labels("P0001-S1", 2) == {"dr.a": 0, "dr.b": 0, "dr.c": 1}
        adjudication = session.adjudicate("P0001-S1", 2, 1, "consensus meeting", reader="dr.chief")
        assert adjudication["user"] == "dr.chief" and adjudication["label_source"] == "adjudicated by dr.chief"
        later = session.read_node("P0001-S1", 2, 0, reader="dr.d")  # an adjudication stands
        assert (later["label"], later["label_source"]) == (1, "adjudicated by dr.chief")
        assert session.reader_labels("P0001-S1", 2) == {"dr.a": 0, "dr.b": 0, "dr.c": 1, "dr.d": 0}
        withdrawn = session.read_node("P0001-S1", 2, None, reader="dr.d")
        assert withdrawn["old"] == 0 and "dr.d" not in session.reader_labels("P0001-S1", 2)
        # confirming the label a disputed node already has is a decision; on a node nobody read it is a no-op
        assert session.adjudicate("P0001-S1", 2, 1, reader="dr.other")["label_source"] == "adjudicated by dr.other"
        assert session.adjudicate("P0001-S1", 2, 1, reader="dr.other") is None
        assert session.set_node_label("P0001-S1", 1, 0) is None

    data = manifest(folder)
    node = node_of(data, "P0001-S1", 2)
    assert node["reads"] == {"dr.a": 0, "dr.b": 0, "dr.c": 1} and node["metastatic"] == 1 and node["label_source"] == "adjudicated by dr.other"
    untouched = node_of(data, "P0002-S1", 5)
    assert "reads" not in untouched and "label_source" not in untouched  # old-format nodes stay as they were
    lines = journal_lines(folder)
    reads = [(line["user"], line["new"]) for line in lines if line["field"] == "read"]
    assert reads == [("dr.a", 0), ("dr.b", 1), ("dr.c", 1), ("dr.b", 0), ("dr.d", 0), ("dr.d", None)]  # every read, in order
    assert data == oracle(lines) == rebuild_manifest(folder).to_dict()


def majority_rule(reads: list[tuple[str, int]], start_label):
    """The label rule written out independently: the reads in order, no adjudication."""
    label, current = start_label, {}
    for reader, value in reads:
        current[reader] = value
        ones = sum(current.values())
        if len(current) == 1 or ones * 2 != len(current):
            label = value if len(current) == 1 else int(ones * 2 > len(current))
    return label, current


def test_random_reads_match_an_independent_majority_rule(folder):
    rng = random.Random(7)
    history: dict = {}
    with CurationSession(folder, user="u") as session:
        for _ in range(120):
            case_id, value, reader = rng.choice(CASES), rng.choice(LABELS), rng.choice(["r1", "r2", "r3", "r4"])
            session.read_node(case_id, value, rng.randrange(2), reader=reader)
            history.setdefault((case_id, value), []).append((reader, session.reader_labels(case_id, value)[reader]))
    data = manifest(folder)
    start = {(n["case_id"], n["label_value"]): n["metastatic"] for n in journal_lines(folder)[0]["new"]["nodes"]}
    for key, reads in history.items():
        label, current = majority_rule(reads, start[key])
        node = node_of(data, *key)
        assert node["reads"] == current and node["metastatic"] == label, key
        ones = sum(current.values())
        expected_source = (f"single reader {next(iter(current))}" if len(current) == 1 else
                           f"tie of {len(current)} readers: adjudicate" if ones * 2 == len(current) else f"majority of {len(current)} readers")
        assert node["label_source"] == expected_source
    assert data == oracle(journal_lines(folder))


def test_case_read_status(folder):
    with CurationSession(folder, user="dr.a") as session:
        assert session.case_read_status("P0001-S1") == "unread"
        session.read_node("P0001-S1", 1, 1)
        session.read_node("P0001-S1", 2, 0)
        assert session.case_read_status("P0001-S1") == "unread"  # node 5 is still to be read
        assert session.case_read_status("P0001-S1", "dr.b") == "read by others"
        session.exclude_node("P0001-S1", 5, "out of the field of view")
        assert session.case_read_status("P0001-S1") == "read by me"  # every node that counts is read
        assert session.case_read_status("P0001-S1", "dr.b") == "read by others"
        session.exclude_case("P0001-S2", "duplicate series")
        assert session.case_read_status("P0001-S2") == "excluded"
        for value in LABELS:
            session.exclude_node("P0002-S1", value, "not nodes")
        assert session.case_read_status("P0002-S1", "dr.b") == "excluded"
        with pytest.raises(InputError, match="no case 'nope'"):
            session.case_read_status("nope")


def test_every_edit_carries_its_reader(folder):
    with CurationSession(folder, user="session-user") as session:
        entries = [
            session.set_node_label("P0001-S1", 1, 1, reader="r1"),
            session.exclude_node("P0001-S1", 2, "blur", reader="r2"),
            session.include_node("P0001-S1", 2, reader="r3"),
            session.set_node_note("P0001-S1", 2, "n", reader="r4"),
            session.exclude_case("P0001-S2", "dup", reader="r5"),
            session.include_case("P0001-S2", reader="r6"),
            session.set_case_note("P0001-S2", "c", reader="r7"),
            session.read_node("P0002-S1", 1, 1, reader="r8"),
            session.set_node_note("P0002-S1", 1, "by the session's user"),
        ]
        with pytest.raises(InputError, match="reader name is empty"):
            session.read_node("P0002-S1", 1, 0, reader="  ")
        with pytest.raises(InputError, match="label 2 is not valid"):
            session.read_node("P0002-S1", 1, 2, reader="r1")
    assert [entry["user"] for entry in entries] == ["r1", "r2", "r3", "r4", "r5", "r6", "r7", "r8", "session-user"]
    assert [line["user"] for line in journal_lines(folder)[1:]] == [entry["user"] for entry in entries]


def test_old_dataset_without_reader_fields_reads_fine(folder):
    data = manifest(folder)
    assert all("reads" not in node and "label_source" not in node for node in data["nodes"])
    with CurationSession(folder, user="u") as session:
        assert all(session.label_source(n.case_id, n.label_value) == "original" for n in session.dataset.nodes)
        assert session.case_read_status("P0001-S1") == "unread"
    data["nodes"][0]["reads"] = {"dr.a": "yes"}
    (folder / "dataset.json").write_text(json.dumps(data))
    with CurationSession(folder, user="u") as session:
        with pytest.raises(InputError, match="must map reader names to 0 or 1") as error:
            session.reader_labels(data["nodes"][0]["case_id"], data["nodes"][0]["label_value"])
        assert "\n" not in str(error.value)


# --------------------------------------------------------------------------------------------
# recovery


def test_lagging_manifest_is_replayed_on_open(folder):
    with CurationSession(folder, user="u") as session:
        session.set_node_note("P0001-S1", 1, "first")
        before = (folder / "dataset.json").read_bytes()
        session.set_node_label("P0001-S1", 1, 1, "second opinion")
    # a crash after the journal line and before the manifest write: dataset.json is the old one
    (folder / "dataset.json").write_bytes(before)
    assert node_of(manifest(folder), "P0001-S1", 1)["metastatic"] == 0
    with CurationSession(folder, user="u") as session:
        assert session.recovered == "replayed"
        assert session.dataset.node("P0001-S1", 1).metastatic == 1
    assert node_of(manifest(folder), "P0001-S1", 1)["metastatic"] == 1
    assert manifest(folder) == oracle(journal_lines(folder))


@pytest.mark.parametrize("keep", [0.0, 0.3, 0.97, "all-but-newline"])
def test_torn_last_line_is_dropped(folder, keep):
    with CurationSession(folder, user="u") as session:
        session.set_node_note("P0001-S1", 1, "kept")
        journal_before = (folder / JOURNAL_FILE).read_bytes()
        manifest_before = (folder / "dataset.json").read_bytes()
        session.set_node_note("P0001-S1", 1, "torn " + "x" * 300)
    full = (folder / JOURNAL_FILE).read_bytes()
    last = len(full) - len(journal_before)
    cut = len(journal_before) + (last - 1 if keep == "all-but-newline" else max(1, int(keep * last)))
    # a kill mid-append: the line is incomplete and the manifest was never written
    (folder / JOURNAL_FILE).write_bytes(full[:cut])
    (folder / "dataset.json").write_bytes(manifest_before)
    assert read_journal(folder)[2] is True
    with CurationSession(folder, user="u") as session:
        assert session.recovered == "dropped torn line"
        assert (folder / JOURNAL_FILE).read_bytes() == journal_before  # the fragment is cut off
        assert (folder / "dataset.json").read_bytes() == manifest_before
        entry = session.set_node_note("P0001-S1", 1, "after the crash")
    lines = journal_lines(folder)
    assert lines[-1] == entry and entry["seq"] == len(lines) - 1 and entry["old"] == "kept"
    assert manifest(folder) == oracle(lines) == rebuild_manifest(folder).to_dict()


def test_damaged_line_before_the_end_is_an_error(folder):
    with CurationSession(folder, user="u") as session:
        session.set_node_note("P0001-S1", 1, "a")
        session.set_node_note("P0001-S1", 1, "b")
    lines = (folder / JOURNAL_FILE).read_bytes().split(b"\n")
    lines[1] = lines[1][:20]
    (folder / JOURNAL_FILE).write_bytes(b"\n".join(lines))
    with pytest.raises(InputError, match="Line 2 of the curation journal .* damaged"):
        CurationSession(folder, user="u")


def test_external_change_is_recorded_as_a_new_base(folder):
    with CurationSession(folder, user="u") as session:
        session.set_node_note("P0001-S1", 1, "before")
    other = Dataset.load(folder)  # another tool adds a case
    other.add_case("P0003-S1", "P0003", "images/c.nrrd", "images/l.nrrd")
    other.add_node("P0003-S1", 1, 1)
    other.save()
    with CurationSession(folder, user="u") as session:
        assert session.recovered == "rebased"
        session.set_node_label("P0003-S1", 1, 0)
        # and while a session is open
        third = Dataset.load(folder)
        third.add_case("P0004-S1", "P0004", "images/d.nrrd", "images/m.nrrd")
        third.save()
        session.set_case_note("P0004-S1", "added elsewhere")
    lines = journal_lines(folder)
    assert [line["field"] for line in lines].count("manifest") == 3
    data = manifest(folder)
    assert case_of(data, "P0004-S1")["note"] == "added elsewhere" and node_of(data, "P0003-S1", 1)["metastatic"] == 0
    assert node_of(data, "P0001-S1", 1)["note"] == "before"
    assert data == oracle(lines) == rebuild_manifest(folder).to_dict()


def test_deleted_manifest_is_rebuilt_from_the_journal(folder):
    with CurationSession(folder, user="u") as session:
        session.exclude_case("P0001-S2", "duplicate")
    expected = manifest(folder)
    (folder / "dataset.json").unlink()
    assert rebuild_manifest(folder).to_dict() == expected == manifest(folder)
    (folder / "dataset.json").unlink()
    with CurationSession(folder, user="u") as session:
        assert session.recovered == "replayed"
    assert manifest(folder) == expected


def test_rebuild_without_journal_and_stale_temporaries(folder, tmp_path):
    with pytest.raises(InputError, match="no curation journal"):
        rebuild_manifest(folder)
    stale = folder / ".dataset.json.abc123.tmp.json"
    fresh = folder / ".dataset.json.def456.tmp.json"
    stale.write_text("{")
    fresh.write_text("{")
    os.utime(stale, (time.time() - 3600, time.time() - 3600))
    with CurationSession(folder, user="u"):
        pass
    assert not stale.exists() and fresh.exists()  # a fresh one may belong to a writer still running


def test_curate_command(folder, capsys):
    with CurationSession(folder, user="dr.b") as session:
        session.set_node_label("P0001-S1", 1, 1, "biopsy")
    expected = manifest(folder)
    (folder / "dataset.json").write_text("{ half")
    assert cli.main(["curate", "--dataset", str(folder), "--history"]) == 2
    assert "rebuild it from the curation journal" in capsys.readouterr().err
    assert cli.main(["curate", "--dataset", str(folder), "--rebuild"]) == 0
    assert manifest(folder) == expected
    assert cli.main(["curate", "--dataset", str(folder), "--history"]) == 0
    out = capsys.readouterr().out
    assert "dr.b: P0001-S1 node 1 metastatic 0 -> 1 (biopsy)" in out


# --------------------------------------------------------------------------------------------
# review list


def test_review_list_lists_every_automatic_check(tmp_path):
    dataset = Dataset.create(tmp_path / "ds", "messy")
    images = dataset.folder / "images"
    images.mkdir()
    rng = np.random.default_rng(0)

    def ct(array=None, spacing=(0.8, 0.8, 2.0)):
        if array is None:
            array = rng.normal(40, 10, size=(10, 40, 40)).astype(np.int16)
            array[:, :3, :] = -1000
        image = sitk.GetImageFromArray(array)
        image.SetSpacing(spacing)
        return image

    def labels(boxes, shape=(10, 40, 40), spacing=(0.8, 0.8, 2.0), origin=(0.0, 0.0, 0.0)):
        array = np.zeros(shape, np.uint16)
        for value, (k0, k1, j0, j1, i0, i1) in boxes.items():
            array[k0:k1, j0:j1, i0:i1] = value
        image = sitk.GetImageFromArray(array)
        image.SetSpacing(spacing)
        image.SetOrigin(origin)
        return image

    boxes = {1: (2, 6, 10, 22, 10, 20), 2: (3, 7, 25, 35, 25, 37)}

    def add(case_id, ct_image, label_image, nodes, excluded=False):
        ct_path, labels_path = images / f"{case_id}_ct.nrrd", images / f"{case_id}_labels.nrrd"
        if ct_image is not None:
            sitk.WriteImage(ct_image, str(ct_path))
        if label_image is not None:
            sitk.WriteImage(label_image, str(labels_path))
        dataset.add_case(case_id, case_id.split("-")[0], ct_path, labels_path, excluded=excluded, exclude_reason="x" if excluded else "")
        for value in nodes:
            dataset.add_node(case_id, value, 0, excluded=(case_id == "tiny-1" and value == 3), exclude_reason="small" if value == 3 else "")

    add("good-1", ct(), labels(boxes), [1, 2])
    add("blank-1", ct(np.zeros((10, 40, 40), np.int16)), labels(boxes), [1])
    add("nomask-1", ct(), None, [1])
    add("emptymask-1", ct(), labels({}), [1])
    add("outside-1", ct(), labels(boxes, origin=(500.0, 500.0, 500.0)), [1, 2], excluded=True)
    add("raw-1", ct(np.full((10, 40, 40), 1000, np.int16) + np.arange(40, dtype=np.int16)), labels(boxes), [1, 2])
    add("tiny-1", ct(), labels({1: (2, 6, 10, 22, 10, 20), 3: (4, 5, 30, 32, 30, 32)}), [1, 3])
    add("shifted-1", ct(), labels(boxes, spacing=(0.8, 0.8, 1.0), shape=(20, 40, 40)), [1, 2])
    dataset.save()

    calls = []
    rows = review_list(Dataset.load(dataset.folder), progress=lambda done, total: calls.append((done, total)))
    assert calls[-1] == (8, 8)
    kinds = {(row["case_id"], row["kind"]) for row in rows}
    assert kinds >= {
        ("blank-1", "empty_image"), ("nomask-1", "missing_mask"), ("emptymask-1", "empty_mask"), ("outside-1", "mask_outside_ct"),
        ("raw-1", "implausible_hu"), ("tiny-1", "node_too_small"), ("shifted-1", "geometry_mismatch"),
    }
    assert not any(row["case_id"] == "good-1" for row in rows)
    for row in rows:
        assert set(row) == {"case_id", "patient_id", "label_value", "kind", "message", "excluded"}
        assert isinstance(row["message"], str) and row["case_id"] in row["message"]
    tiny = next(row for row in rows if row["kind"] == "node_too_small")
    assert tiny["label_value"] == 3 and tiny["excluded"] is True
    assert next(row for row in rows if row["kind"] == "mask_outside_ct")["excluded"] is True
    assert next(row for row in rows if row["kind"] == "empty_image")["excluded"] is False
    json.dumps(rows)  # ready for a GUI / JSON


# --------------------------------------------------------------------------------------------
# the crash guarantee, for real: SIGKILL a writer at random moments

WRITER = r"""
import random, sys
from LymphNodeClassifierLib.curation import CurationSession
folder, seed = sys.argv[1], int(sys.argv[2])
rng = random.Random(seed)
session = CurationSession(folder, user=f"writer-{seed}")
print("ready", session.recovered, flush=True)
i = 0
while True:
    i += 1
    case_id = rng.choice(CASES)
    value = rng.choice(LABELS)
    node = session.dataset.node(case_id, value)
    kind = rng.randrange(5)
    if kind == 0:
        session.set_node_label(case_id, value, 1 - (node.metastatic or 0), reason=f"edit {seed}.{i}")
    elif kind == 1:
        session.set_node_note(case_id, value, f"note {seed}.{i} " + "n" * rng.randrange(2000))
    elif kind == 2:
        if node.excluded:
            session.include_node(case_id, value, f"include {seed}.{i}")
        else:
            session.exclude_node(case_id, value, f"exclude {seed}.{i}")
    elif kind == 3:
        session.set_case_note(case_id, f"case note {seed}.{i}")
    else:
        case = session.dataset.case(case_id)
        if case.excluded:
            session.include_case(case_id, f"include {seed}.{i}")
        else:
            session.exclude_case(case_id, f"exclude {seed}.{i}")
""".replace("CASES", repr(CASES)).replace("LABELS", repr(LABELS))

KILLS = 20


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="SIGKILL is POSIX only")
def test_sigkill_at_random_moments_loses_nothing(folder):
    env = dict(os.environ, PYTHONPATH=str(MODULE_DIR) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    rng = random.Random(2024)
    # "manifest one edit behind": killed after the journal line was written (mostly during its fsync)
    # and before dataset.json was replaced; some of those inside the manifest's atomic write.
    outcomes = {"consistent": 0, "manifest one edit behind": 0, "torn last line": 0, "killed inside the manifest's atomic write": 0}
    seen_temporaries: set = set()
    previous_journal = b""
    total_edits = 0
    for round_number in range(KILLS):
        writer = subprocess.Popen([sys.executable, "-c", WRITER, str(folder), str(round_number)], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        ready = writer.stdout.readline()
        assert ready.startswith(b"ready"), writer.stderr.read().decode()
        time.sleep(rng.uniform(0.0, 0.25))
        writer.send_signal(signal.SIGKILL)
        writer.wait()
        assert writer.returncode == -signal.SIGKILL, writer.stderr.read().decode()

        # 1. the journal: complete lines parse; only the tail after the last newline may be torn
        data = (folder / JOURNAL_FILE).read_bytes()
        assert data.startswith(previous_journal), "the journal's history was rewritten"
        entries, tail = split_journal(data)
        assert [e["seq"] for e in entries] == list(range(len(entries)))
        outcomes["torn last line"] += bool(tail)
        temporaries = set(folder.glob(".dataset.json.*"))
        outcomes["killed inside the manifest's atomic write"] += bool(temporaries - seen_temporaries)
        seen_temporaries |= temporaries

        # 2. dataset.json as the kill left it: valid, and the journal's state or one edit behind it
        Dataset.load(folder)
        on_disk = manifest(folder)
        if on_disk == oracle(entries):
            outcomes["consistent"] += 1
        else:
            assert entries[-1]["field"] != "manifest" and on_disk == oracle(entries[:-1]), "dataset.json is neither the journal's state nor one edit behind"
            outcomes["manifest one edit behind"] += 1

        # 3. opening a session recovers; rebuild_manifest reproduces dataset.json exactly
        with CurationSession(folder, user="checker") as session:
            assert session.dataset.to_dict() == oracle(entries)
        recovered_bytes = (folder / "dataset.json").read_bytes()
        assert json.loads(recovered_bytes) == oracle(entries)
        rebuilt = rebuild_manifest(folder)
        assert rebuilt.to_dict() == json.loads(recovered_bytes)
        assert (folder / "dataset.json").read_bytes() == recovered_bytes

        # 4. every edit with a complete journal line is in the rebuilt manifest (its last value wins)
        final = rebuilt.to_dict()
        last: dict = {}
        for entry in entries:
            if entry["target"] is not None:
                last[(entry["target"]["case_id"], entry["target"]["label_value"], entry["field"])] = entry
        for (case_id, value, field), entry in last.items():
            record = case_of(final, case_id) if value is None else node_of(final, case_id, value)
            later_exclusion = last.get((case_id, value, "excluded"))
            if field == "exclude_reason" and later_exclusion is not None and later_exclusion["seq"] > entry["seq"]:
                continue  # a later exclusion or inclusion set the reason
            assert record[field] == entry["new"], f"edit {entry['seq']} is missing from the rebuilt manifest"
        total_edits = sum(1 for e in entries if e["target"] is not None)
        previous_journal = (folder / JOURNAL_FILE).read_bytes()
        assert previous_journal == data[: len(data) - len(tail)]

    print(f"\n{KILLS} kills, {total_edits} edits journalled: {outcomes}")
    assert total_edits > KILLS  # the writers did real work between kills
    assert outcomes["consistent"] + outcomes["manifest one edit behind"] == KILLS
