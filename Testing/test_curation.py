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


def curate(folder: Path, *args: str) -> int:
    return cli.main(["curate", "--dataset", str(folder), *args])


def test_curate_command(folder, capsys):
    with CurationSession(folder, user="dr.b") as session:
        session.set_node_label("P0001-S1", 1, 1, "biopsy")
    expected = manifest(folder)
    (folder / "dataset.json").write_text("{ half")
    assert curate(folder, "--note", "x", "--case", "P0001-S1") == 2
    assert "rebuild it from the curation journal" in capsys.readouterr().err
    assert curate(folder, "--history") == 0  # the history needs the journal only (and no lock: works beside an open session)
    assert "dr.b: P0001-S1 node 1 metastatic 0 -> 1 (biopsy) [adjudicated by dr.b]" in capsys.readouterr().out
    assert curate(folder, "--rebuild") == 0
    out = capsys.readouterr().out
    assert manifest(folder) == expected
    kept = list(folder.glob("dataset.json.unreadable-*"))
    assert len(kept) == 1 and kept[0].read_text() == "{ half" and str(kept[0]) in out  # a broken hand edit is kept, not lost


def test_curate_edits_from_the_command_line(folder, capsys):
    assert curate(folder, "--read", "benign", "--case", "P0001-S1", "--node", "2", "--reader", "dr.a") == 0
    assert curate(folder, "--read", "m", "--case", "P0001-S1", "--node", "2", "--reader", "dr.b", "--reason", "spiculated") == 0
    assert curate(folder, "--read", "1", "--case", "P0001-S1", "--node", "2", "--reader", "dr.c") == 0
    assert curate(folder, "--relabel", "benign", "--case", "P0002-S1", "--node", "5", "--reason", "biopsy", "--reader", "dr.chief") == 0
    assert curate(folder, "--exclude", "--case", "P0001-S1", "--node", "5", "--reason", "motion", "--reader", "dr.a") == 0
    assert curate(folder, "--exclude", "--case", "P0001-S2", "--reason", "duplicate series") == 0
    assert curate(folder, "--include", "--case", "P0001-S2", "--reason", "not a duplicate") == 0
    assert curate(folder, "--note", "check the hilum", "--case", "P0002-S1", "--node", "1", "--reader", "dr.b") == 0
    assert curate(folder, "--note", "late phase", "--case", "P0002-S1") == 0
    out = capsys.readouterr().out
    assert "dr.c: P0001-S1 node 2 read None -> 1 [dataset label 1: majority of 3 readers]" in out
    assert "dr.chief: P0002-S1 node 5 metastatic 0 -> 0" not in out and "nothing changed" in out  # node 5 (index 2) is benign already
    lines = journal_lines(folder)[1:]
    got = [(line["user"], line["target"]["case_id"], line["target"]["label_value"], line["field"], line["old"], line["new"], line["reason"])
           for line in lines]
    me = getpass.getuser()
    assert got == [
        ("dr.a", "P0001-S1", 2, "read", None, 0, ""),
        ("dr.b", "P0001-S1", 2, "read", None, 1, "spiculated"),
        ("dr.c", "P0001-S1", 2, "read", None, 1, ""),
        ("dr.a", "P0001-S1", 5, "excluded", False, True, "motion"),
        (me, "P0001-S2", None, "excluded", False, True, "duplicate series"),
        (me, "P0001-S2", None, "excluded", True, False, "not a duplicate"),
        ("dr.b", "P0002-S1", 1, "note", "", "check the hilum", ""),
        (me, "P0002-S1", None, "note", "", "late phase", ""),
    ]
    data = manifest(folder)
    assert node_of(data, "P0001-S1", 2)["reads"] == {"dr.a": 0, "dr.b": 1, "dr.c": 1} and node_of(data, "P0001-S1", 2)["metastatic"] == 1
    assert node_of(data, "P0001-S1", 5)["exclude_reason"] == "motion" and case_of(data, "P0002-S1")["note"] == "late phase"
    assert data == oracle(journal_lines(folder))


@pytest.mark.parametrize(
    "args, message",
    [
        (["--exclude", "--case", "P0001-S1", "--node", "1"], "Give a reason"),
        (["--read", "benign", "--case", "P0001-S1"], "add --node"),
        (["--relabel", "maybe", "--case", "P0001-S1", "--node", "1"], "'maybe' is not a label"),
        (["--relabel", "1", "--node", "1"], "needs --case"),
        (["--relabel", "1", "--case", "P0001-S1", "--node", "x"], "invalid int value"),
        (["--relabel", "1", "--case", "P0001-S1", "--node", "9"], "no node 9"),
        (["--note", "x", "--case", "P0001-S1", "--top", "3"], "--top does not go with --note"),
        (["--history", "--predictions", "p.csv"], "--predictions does not go with --history"),
        (["--apply-suggestions", "s.csv"], "needs --top"),
        (["--read", "b", "--case", "P0001-S1", "--node", "1", "--reader", " "], "name is empty"),
        (["--relabel", "1", "--exclude", "--case", "P0001-S1"], "not allowed with argument"),
    ],
)
def test_curate_bad_options_are_one_line_and_write_nothing(folder, capsys, args, message):
    assert curate(folder, "--note", "first", "--case", "P0001-S1") == 0  # a journal exists
    before = {path.name: path.read_bytes() for path in folder.iterdir()}
    capsys.readouterr()
    assert curate(folder, *args) == 2
    captured = capsys.readouterr()
    assert message in captured.err and captured.err.count("\n") == 1 and captured.err.startswith("error: ") and captured.out == ""
    assert {path.name: path.read_bytes() for path in folder.iterdir()} == before


def test_history_and_agreement_work_beside_an_open_session(folder, capsys):
    with CurationSession(folder, user="station") as session:  # e.g. the review station holds the dataset
        session.read_node("P0001-S1", 1, 1, reader="dr.a")
        assert curate(folder, "--history") == 0 and curate(folder, "--agreement") == 0
        assert "dr.a: P0001-S1 node 1 read None -> 1" in capsys.readouterr().out
        assert curate(folder, "--note", "x", "--case", "P0001-S1") == 2  # an edit waits for the other session
        assert "being curated in another session" in capsys.readouterr().err


SUSPECT_COLUMNS = ["rank", "case_id", "patient_id", "label_value", "given_label", "oof_probability", "suspicion", "cleanlab_issue",
                   "suggested_label", "fold", "true_label", "label_flipped"]  # what `suspects` writes (suspects.CSV_COLUMNS)


def write_suspects(path: Path, rows: list[tuple]) -> None:
    """rows: (rank, case_id, label_value, given_label, suggested_label), in any order."""
    lines = [",".join(SUSPECT_COLUMNS)]
    for rank, case_id, value, given, suggested in rows:
        lines.append(f"{rank},{case_id},{case_id.split('-')[0]},{value},{given},0.5,0.9,True,{suggested},0,,")
    path.write_text("\n".join(lines) + "\n")


def test_apply_suggestions_of_the_top_k(folder, capsys):
    with CurationSession(folder, user="u") as session:
        session.set_node_label("P0002-S1", 2, None)  # relabelled after the ranking (ranked as 1)
        session.exclude_node("P0001-S2", 1, "artefact")
    # node labels: value 1 -> 0, 2 -> 1, 5 -> 0 (make_dataset)
    write_suspects(folder / "suspects.csv", [
        (3, "P0002-S1", 2, 1, 0),  # relabelled since the ranking: left alone
        (8, "P0002-S1", 5, 1, 0),  # ranked as 1 but 0 now, and 0 is the suggestion: already done (beyond the top 5)
        (1, "P0001-S1", 2, 1, 0),
        (2, "P0001-S2", 1, 0, 1),  # excluded: left alone
        (5, "P0001-S1", 5, 0, 1),
        (4, "P0002-S1", 1, 0, 0),  # already has the suggested label
        (6, "P0001-S2", 5, 0, 1),  # beyond the top 5
        (7, "P9999-S1", 1, 0, 1),  # not in the dataset, but beyond the top 5: harmless
    ])
    assert curate(folder, "--apply-suggestions", str(folder / "suspects.csv"), "--top", "5", "--reader", "dr.s") == 0
    out = capsys.readouterr().out
    assert "relabelled 2 of the top 5 suspects" in out and "rank 3: P0002-S1 node 2 left as it is (relabelled since the ranking" in out
    edits = [line for line in journal_lines(folder) if line["user"] == "dr.s"]
    assert [(e["target"]["case_id"], e["target"]["label_value"], e["old"], e["new"], e["reason"], e["label_source"]) for e in edits] == [
        ("P0001-S1", 2, 1, 0, "suspects rank 1", "adjudicated by dr.s"),
        ("P0001-S1", 5, 0, 1, "suspects rank 5", "adjudicated by dr.s"),
    ]
    data = manifest(folder)
    assert node_of(data, "P0001-S2", 1)["metastatic"] == 0 and node_of(data, "P0001-S2", 5)["metastatic"] == 0
    assert node_of(data, "P0002-S1", 2)["metastatic"] is None
    capsys.readouterr()
    assert curate(folder, "--apply-suggestions", str(folder / "suspects.csv"), "--top", "8", "--reader", "dr.s") == 2  # rank 7 is unknown
    write_suspects(folder / "later.csv", [(1, "P0002-S1", 5, 1, 0)])
    assert curate(folder, "--apply-suggestions", str(folder / "later.csv"), "--top", "3") == 0
    assert "rank 1: P0002-S1 node 5 left as it is (already labelled 0)" in capsys.readouterr().out
    assert data == oracle(journal_lines(folder))
    # a node the dataset lacks inside the top K: one line, and nothing is changed (not even the nodes before it)
    journal = (folder / JOURNAL_FILE).read_bytes()
    assert curate(folder, "--apply-suggestions", str(folder / "suspects.csv"), "--top", "7") == 2
    assert "ranks as 7 node 1 of case 'P9999-S1', which the dataset does not have" in capsys.readouterr().err
    assert (folder / JOURNAL_FILE).read_bytes() == journal
    write_suspects(folder / "bad.csv", [(1, "P0001-S1", 1, 0, 2)])
    assert curate(folder, "--apply-suggestions", str(folder / "bad.csv"), "--top", "1") == 2
    assert "suggests the label 2" in capsys.readouterr().err
    assert curate(folder, "--apply-suggestions", str(folder / "missing.csv"), "--top", "1") == 2
    assert "run the suspects command first" in capsys.readouterr().err
    assert curate(folder, "--apply-suggestions", str(folder / "suspects.csv"), "--top", "0") == 2
    assert (folder / JOURNAL_FILE).read_bytes() == journal


def hand_edit(folder: Path, change) -> None:
    data = manifest(folder)
    change(data)
    (folder / "dataset.json").write_text(json.dumps(data, indent=1))


def test_rebuild_journals_hand_edits_instead_of_dropping_them(folder, capsys):
    with CurationSession(folder, user="dr.a") as session:
        session.set_node_note("P0001-S1", 1, "from the session")
        session.read_node("P0001-S1", 2, 0)

    def by_hand(data):
        node_of(data, "P0002-S1", 2)["metastatic"] = 0
        node_of(data, "P0001-S2", 5).update(excluded=True, exclude_reason="calcified")
        case_of(data, "P0002-S1")["note"] = "typed into the file"

    hand_edit(folder, by_hand)
    expected = manifest(folder)
    assert curate(folder, "--rebuild") == 0
    out = capsys.readouterr().out
    assert "kept 4 change(s) made to dataset.json by hand" in out and "P0002-S1 node 2 metastatic 1 -> 0" in out and "case P0002-S1 note '' -> 'typed into the file'" in out
    data = manifest(folder)
    node_of(expected, "P0002-S1", 2)["label_source"] = "adjudicated by hand edit of dataset.json"  # the label now says how it was set
    assert data == expected
    lines = journal_lines(folder)
    hand = [line for line in lines if line["user"] == "hand edit of dataset.json"]
    assert sorted((line["field"], line["new"]) for line in hand) == [("excluded", True), ("metastatic", 0), ("note", "typed into the file")]
    assert next(line for line in hand if line["field"] == "excluded")["reason"] == "calcified"
    assert data == oracle(lines) == rebuild_manifest(folder).to_dict()  # and a second rebuild finds nothing new
    assert len(journal_lines(folder)) == len(lines)
    assert curate(folder, "--history", "--case", "P0002-S1") == 0
    assert "hand edit of dataset.json: P0002-S1 node 2 metastatic 1 -> 0" in capsys.readouterr().out

    # a hand edit that is not a field edit (a case added) is kept whole, as a snapshot line
    def add_case(data):
        data["cases"].append({"case_id": "P0003-S1", "patient_id": "P0003", "ct": "images/c.nrrd", "labels": "images/l.nrrd"})
        data["nodes"].append({"case_id": "P0003-S1", "label_value": 4, "metastatic": 1})
        node_of(data, "P0001-S1", 1)["note"] = "changed as well"

    hand_edit(folder, add_case)
    assert curate(folder, "--rebuild") == 0
    out = capsys.readouterr().out
    assert "case P0003-S1 added" in out and "P0003-S1 node 4 added" in out and "P0001-S1 node 1 note" in out
    data = manifest(folder)
    assert node_of(data, "P0003-S1", 4)["metastatic"] == 1 and node_of(data, "P0001-S1", 1)["note"] == "changed as well"
    lines = journal_lines(folder)
    assert lines[-1]["field"] == "manifest" and lines[-1]["new"] == data == oracle(lines)
    assert curate(folder, "--history") == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].endswith("dataset.json as a whole, 3 cases, 9 nodes (journal started)")
    assert out[-1].endswith("dataset.json as a whole, 4 cases, 10 nodes (found in dataset.json by curate --rebuild)")


def test_rebuild_after_a_crash_adds_nothing(folder):
    with CurationSession(folder, user="u") as session:
        session.set_node_note("P0001-S1", 1, "first")
        before = (folder / "dataset.json").read_bytes()
        session.set_node_note("P0001-S1", 1, "second")
    (folder / "dataset.json").write_bytes(before)  # killed between the journal line and the manifest write
    lines = journal_lines(folder)
    assert node_of(rebuild_manifest(folder).to_dict(), "P0001-S1", 1)["note"] == "second"
    assert journal_lines(folder) == lines  # the lagging manifest is not taken for a hand edit


def test_session_journals_hand_edits_as_edits(folder):
    with CurationSession(folder, user="u") as session:
        session.set_node_note("P0001-S1", 1, "a")
    hand_edit(folder, lambda data: node_of(data, "P0001-S1", 1).update(metastatic=1))
    with CurationSession(folder, user="u") as session:
        assert session.recovered == "rebased" and session.outside_changes == ["P0001-S1 node 1 metastatic 0 -> 1"]
        assert session.label_source("P0001-S1", 1) == "adjudicated by hand edit of dataset.json"
        # and while a session is open
        hand_edit(folder, lambda data: case_of(data, "P0002-S1").update(note="by hand"))
        session.set_node_note("P0001-S1", 2, "b")
    lines = journal_lines(folder)
    assert [(line["user"], line["field"]) for line in lines[2:]] == [
        ("hand edit of dataset.json", "metastatic"), ("hand edit of dataset.json", "note"), ("u", "note")]
    assert manifest(folder) == oracle(lines)


# --------------------------------------------------------------------------------------------
# a reader that stops reading: `curate --history | head -1`


@pytest.fixture()
def long_history(folder) -> Path:
    with CurationSession(folder, user="u") as session:
        for i in range(80):  # ~2 kB a line: far more than a pipe's buffer (64 kB), so the writer meets the closed pipe
            session.set_node_note(CASES[i % 3], LABELS[i % 3], f"note {i} " + "x" * 2000)
    return folder


def cli_env() -> dict:
    return dict(os.environ, PYTHONPATH=str(MODULE_DIR) + os.pathsep + os.environ.get("PYTHONPATH", ""))


def test_history_into_a_closed_pipe_gives_no_traceback(long_history):
    writer = subprocess.Popen([sys.executable, "-m", "LymphNodeClassifierLib", "curate", "--dataset", str(long_history), "--history"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=cli_env())
    first, second = writer.stdout.readline(), writer.stdout.readline()
    writer.stdout.close()  # what `head -2` does after its lines
    stderr = writer.stderr.read().decode()
    writer.wait(timeout=60)
    assert first.endswith(b"(journal started)\n") and b"u: P0001-S1 node 1 note '' -> 'note 0 x" in second
    assert stderr == "" and writer.returncode not in (0, 1, 2)  # quiet, and not "success" for a truncated listing


def test_history_piped_to_head_in_a_shell(long_history, tmp_path):
    command = f"{sys.executable} -m LymphNodeClassifierLib curate --dataset {long_history} --history | head -1"
    done = subprocess.run(["bash", "-c", command], capture_output=True, env=cli_env(), timeout=60)
    assert done.returncode == 0 and done.stderr == b""
    assert done.stdout.count(b"\n") == 1 and done.stdout.endswith(b"(journal started)\n")
    short = tmp_path / "short"  # a history that fits in the pipe's buffer: the error would come at exit, when Python flushes
    make_dataset(short)
    with CurationSession(short, user="u") as session:
        session.set_node_note("P0001-S1", 1, "one")
        session.set_node_note("P0001-S1", 1, "two")
    done = subprocess.run(["bash", "-c", f"{sys.executable} -m LymphNodeClassifierLib curate --dataset {short} --history | (sleep 0; exec 0<&-)"],
                          capture_output=True, env=cli_env(), timeout=60)
    assert done.stderr == b""


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
    kind = rng.randrange(6)
    if kind == 5:
        session.read_node(case_id, value, rng.randrange(2), reader=f"reader-{rng.randrange(3)}")
    elif kind == 0:
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

        # 4. every edit with a complete journal line is in the rebuilt manifest (its last value wins; a label
        #    edit is an adjudication, so later reads do not move it)
        final = rebuilt.to_dict()
        last: dict = {}
        for entry in entries:
            if entry["target"] is not None:
                reader = entry["user"] if entry["field"] == "read" else None
                last[(entry["target"]["case_id"], entry["target"]["label_value"], entry["field"], reader)] = entry
        for (case_id, value, field, reader), entry in last.items():
            record = case_of(final, case_id) if value is None else node_of(final, case_id, value)
            if field == "read":  # every reader's last read is kept beside the others
                assert record["reads"].get(reader) == entry["new"], f"read {entry['seq']} is missing from the rebuilt manifest"
                continue
            later_exclusion = last.get((case_id, value, "excluded", None))
            if field == "exclude_reason" and later_exclusion is not None and later_exclusion["seq"] > entry["seq"]:
                continue  # a later exclusion or inclusion set the reason
            assert record[field] == entry["new"], f"edit {entry['seq']} is missing from the rebuilt manifest"
        total_edits = sum(1 for e in entries if e["target"] is not None)
        previous_journal = (folder / JOURNAL_FILE).read_bytes()
        assert previous_journal == data[: len(data) - len(tail)]

    print(f"\n{KILLS} kills, {total_edits} edits journalled: {outcomes}")
    assert total_edits > KILLS  # the writers did real work between kills
    assert outcomes["consistent"] + outcomes["manifest one edit behind"] == KILLS
