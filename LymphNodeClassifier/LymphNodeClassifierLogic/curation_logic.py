"""The Curation tab's logic: a dataset as table nodes, its cases in the scene, and saved edits (no Qt).

- `open_dataset(folder)` opens a `curation.CurationSession` on the folder (it holds the dataset's
  lock until `close()`) and fills a vtkMRMLTableNode with one row per node record: case_id,
  patient_id, label_value, metastatic ("1", "0" or "" when not labelled), excluded (1 when the node
  or its case is excluded), reason (a case's reason is shown as "case: ..."), note, probability
  (after the case was classified here, else NaN) and review (the automatic problems of
  `curation.review_list`, after `review()`). A case without node records gets one row with
  label_value 0 (0 is background in a label map, so it never names a node).
- Edits (`set_label`, `exclude_node`, `include_node`, `set_node_note`, `exclude_case`,
  `include_case`, `set_case_note`) go straight to the session, which journals and saves each one
  at once (see `curation.py`); the table rows of that case are refreshed in place.
- `load_case(case_id)` reads the case's CT and label map into the scene (`convert.load_volume_node`),
  replacing the previously loaded case, and runs `ClassificationLogic.classify` with the chosen
  model; the probabilities go into the table. Without a usable model the case is still loaded and
  `LoadedCase.message` says why it was not classified.
- `suspects_table()`: `suspects.csv` of the dataset folder (written by the `suspects` command) as a
  table node with a `since_ranked` column (what curation changed since the ranking: relabelled,
  excluded), or None when there is none; `suspect_key(row)` gives the (case_id, label_value) to
  load and jump to (`node_centroid_ras`).
"""

from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import slicer
import vtk

from LymphNodeClassifierLib.curation import CurationSession, review_list
from LymphNodeClassifierLib.errors import InputError

from .convert import load_volume_node, sitk_image_from_volume_node
from .logic import GRADCAM_REFERENCE, SEGMENTATION_REFERENCE, TABLE_REFERENCE, ClassificationLogic, show_ct_window

SUSPECTS_FILE = "suspects.csv"
SINCE_RANKED = "since_ranked"  # column added to the suspects table: what curation changed since the ranking
CASE_ROW_LABEL = 0  # label_value of the row of a case without node records
NODE_COLUMNS = (
    ("case_id", "string"), ("patient_id", "string"), ("label_value", "int"), ("metastatic", "string"),
    ("excluded", "int"), ("reason", "string"), ("note", "string"), ("probability", "double"), ("review", "string"),
)
REVIEW_COLUMNS = (
    ("case_id", "string"), ("patient_id", "string"), ("label_value", "int"), ("kind", "string"),
    ("message", "string"), ("excluded", "int"),
)
DISPLAY_WINDOW = (-135.0, 215.0)
Key = tuple  # (case_id, label_value or None for the whole case)


@dataclass
class LoadedCase:
    """The case currently shown in the scene."""

    case_id: str
    ct_node: Any
    labels_node: Any
    outputs: Any = None  # logic.ClassificationOutputs, or None when not classified
    message: str = ""  # why it was not classified
    probabilities: dict = field(default_factory=dict)  # label value -> probability


def _new_table(columns) -> tuple[vtk.vtkTable, dict]:
    table = vtk.vtkTable()
    arrays = {}
    for name, kind in columns:
        array = {"int": vtk.vtkIntArray, "double": vtk.vtkDoubleArray, "string": vtk.vtkStringArray}[kind]()
        array.SetName(name)
        table.AddColumn(array)
        arrays[name] = array
    return table, arrays


def _cell(table, row: int, column: str):
    array = table.GetColumnByName(column)
    return None if array is None else array.GetValue(row)


class CurationLogic:
    """One open dataset (one curation session) and the case loaded from it."""

    def __init__(self, scene=None, classification: ClassificationLogic | None = None, user: str | None = None) -> None:
        self.scene = scene or getattr(slicer, "mrmlScene", None) or slicer.vtkMRMLScene()
        self.classification = classification or ClassificationLogic()
        self.user = user
        self.session: CurationSession | None = None
        self.table_node = None
        self.review_node = None
        self.suspects_node = None
        self.loaded: LoadedCase | None = None
        self.model_path: str | None = None  # None: ClassificationLogic's default model
        self.device = "auto"
        self._keys: list[Key] = []
        self._probabilities: dict[Key, float] = {}
        self._problems: dict[Key, list[str]] = {}
        self._review_rows: list[dict] = []

    # ---- dataset ---------------------------------------------------------------------------

    @property
    def is_open(self) -> bool:
        return self.session is not None

    @property
    def dataset(self):
        if self.session is None:
            raise InputError("No dataset is open; choose a dataset folder and open it first.")
        return self.session.dataset

    @property
    def folder(self) -> Path | None:
        return None if self.session is None else self.session.folder

    def open_dataset(self, folder: str | os.PathLike):
        """Open `folder` (with dataset.json) for curation; returns the table node of its nodes."""
        if not str(folder).strip():
            raise InputError("Choose a dataset folder (a folder with a dataset.json) first.")
        target = Path(folder)
        if target.name == "dataset.json":
            target = target.parent
        if self.session is not None and target.resolve() == self.session.folder:
            self.close()  # opening the open dataset again: re-read it (the lock allows one session)
        session = CurationSession(folder, user=self.user)  # InputError for a bad folder; holds the lock
        self.close()
        self.session = session
        self._probabilities, self._problems, self._review_rows = {}, {}, []
        if self.table_node is None or self.table_node.GetScene() is not self.scene:
            self.table_node = self.scene.AddNewNodeByClass("vtkMRMLTableNode", "Curation nodes")
        self.table_node.SetName(f"{session.dataset.name or session.folder.name} nodes")
        self._fill_table()
        return self.table_node

    def close(self) -> None:
        """Release the dataset (its lock); the table stays in the scene until the next open."""
        if self.session is not None:
            self.session.close()
            self.session = None

    def summary(self) -> str:
        dataset = self.dataset
        nodes = dataset.nodes
        labelled = [n for n in nodes if n.metastatic is not None]
        excluded_cases = sum(1 for c in dataset.cases if c.excluded)
        excluded_nodes = sum(1 for n in nodes if n.excluded)
        return (f"{len(dataset.cases)} cases of {len(dataset.patient_groups())} patients, {len(nodes)} nodes "
                f"({sum(n.metastatic == 1 for n in labelled)} metastatic, {sum(n.metastatic == 0 for n in labelled)} benign, "
                f"{len(nodes) - len(labelled)} unlabelled); excluded: {excluded_cases} cases, {excluded_nodes} nodes.")

    def _row_keys(self) -> list[Key]:
        dataset = self.dataset
        keys: list[Key] = []
        for case in dataset.cases:
            nodes = dataset.nodes_of(case.case_id)
            keys += [(case.case_id, node.label_value) for node in nodes] or [(case.case_id, None)]
        return keys

    def _row_values(self, key: Key) -> dict:
        dataset = self.dataset
        case_id, label_value = key
        case = dataset.case(case_id)
        problems = list(self._problems.get(key, []))
        if label_value is not None:
            problems += [f"case: {p}" for p in self._problems.get((case_id, None), [])]
        values = {
            "case_id": case.case_id, "patient_id": case.patient_id, "label_value": CASE_ROW_LABEL,
            "metastatic": "", "excluded": int(case.excluded), "reason": f"case: {case.exclude_reason}" if case.excluded else "",
            "note": case.note, "probability": self._probabilities.get(key, math.nan), "review": "; ".join(problems),
        }
        if label_value is not None:
            node = dataset.node(case_id, label_value)
            values["label_value"] = node.label_value
            values["metastatic"] = "" if node.metastatic is None else str(int(node.metastatic))
            if node.excluded:
                values["excluded"] = 1
                values["reason"] = node.exclude_reason
            values["note"] = node.note
        return values

    def _fill_table(self) -> None:
        self._keys = self._row_keys()
        table, arrays = _new_table(NODE_COLUMNS)
        for key in self._keys:
            values = self._row_values(key)
            for name, _ in NODE_COLUMNS:
                arrays[name].InsertNextValue(values[name])
        self.table_node.SetAndObserveTable(table)
        self.table_node.SetUseColumnTitleAsColumnHeader(True)
        self.table_node.SetLocked(True)

    def refresh(self, case_id: str | None = None) -> None:
        """Update the rows of `case_id` (all rows when None) from the session's dataset."""
        if self.table_node is None or self.session is None:
            return
        if self._row_keys() != self._keys:  # records added or removed (e.g. the file changed outside)
            self._fill_table()
            return
        table = self.table_node.GetTable()
        for row, key in enumerate(self._keys):
            if case_id is not None and key[0] != case_id:
                continue
            values = self._row_values(key)
            for name, _ in NODE_COLUMNS:
                table.GetColumnByName(name).SetValue(row, values[name])
        table.Modified()
        self.table_node.Modified()

    def row_key(self, row: int) -> Key | None:
        """(case_id, label_value or None for a case row) of a row of the node table."""
        return self._keys[row] if 0 <= row < len(self._keys) else None

    def row_info(self, row: int) -> dict | None:
        """The values shown in a row of the node table (see NODE_COLUMNS), or None."""
        key = self.row_key(row)
        return None if key is None or self.session is None else self._row_values(key)

    def row_of(self, case_id: str, label_value: int | None = None) -> int:
        """The row of a node, or the first row of a case when `label_value` is None (-1 if absent)."""
        for row, (case, value) in enumerate(self._keys):
            if case == case_id and (label_value is None or value == label_value):
                return row
        return -1

    # ---- edits (each saved at once by the session) -------------------------------------------

    def _edit(self, case_id: str, action: Callable[[], Any]):
        entry = action()
        self.refresh(case_id)
        return entry

    def set_label(self, case_id: str, label_value: int, metastatic: int | None, reason: str = ""):
        """1 metastatic, 0 benign, None not labelled."""
        return self._edit(case_id, lambda: self.session_or_fail().set_node_label(case_id, label_value, metastatic, reason))

    def read_node(self, case_id: str, label_value: int, metastatic: int | None, reason: str = ""):
        """The session user's read of a node (1, 0; None withdraws it), kept beside other readers' reads;
        the dataset label follows the reads (curation.label_from_reads). The browser station's buttons."""
        return self._edit(case_id, lambda: self.session_or_fail().read_node(case_id, label_value, metastatic, reason=reason))

    def exclude_node(self, case_id: str, label_value: int, reason: str):
        return self._edit(case_id, lambda: self.session_or_fail().exclude_node(case_id, label_value, reason))

    def include_node(self, case_id: str, label_value: int, reason: str = ""):
        return self._edit(case_id, lambda: self.session_or_fail().include_node(case_id, label_value, reason))

    def set_node_note(self, case_id: str, label_value: int, note: str):
        return self._edit(case_id, lambda: self.session_or_fail().set_node_note(case_id, label_value, note))

    def exclude_case(self, case_id: str, reason: str):
        return self._edit(case_id, lambda: self.session_or_fail().exclude_case(case_id, reason))

    def include_case(self, case_id: str, reason: str = ""):
        return self._edit(case_id, lambda: self.session_or_fail().include_case(case_id, reason))

    def set_case_note(self, case_id: str, note: str):
        return self._edit(case_id, lambda: self.session_or_fail().set_case_note(case_id, note))

    def session_or_fail(self) -> CurationSession:
        if self.session is None:
            raise InputError("No dataset is open; choose a dataset folder and open it first.")
        return self.session

    def history(self, case_id: str | None = None, label_value: int | None = None) -> list[dict]:
        return self.session_or_fail().history(case_id, label_value)

    # ---- automatic review -----------------------------------------------------------------------

    def review(self, progress: Callable[[int, int], None] | None = None):
        """Run the automatic checks on every case; returns the review table node (one row per problem)."""
        rows = review_list(self.dataset, progress=progress)
        self._review_rows = rows
        self._problems = {}
        for problem in rows:
            self._problems.setdefault((problem["case_id"], problem["label_value"]), []).append(problem["kind"])
        table, arrays = _new_table(REVIEW_COLUMNS)
        for problem in rows:
            arrays["case_id"].InsertNextValue(problem["case_id"])
            arrays["patient_id"].InsertNextValue(problem["patient_id"])
            arrays["label_value"].InsertNextValue(CASE_ROW_LABEL if problem["label_value"] is None else int(problem["label_value"]))
            arrays["kind"].InsertNextValue(problem["kind"])
            arrays["message"].InsertNextValue(problem["message"])
            arrays["excluded"].InsertNextValue(int(bool(problem["excluded"])))
        if self.review_node is None or self.review_node.GetScene() is not self.scene:
            self.review_node = self.scene.AddNewNodeByClass("vtkMRMLTableNode", "Curation review")
        self.review_node.SetAndObserveTable(table)
        self.review_node.SetUseColumnTitleAsColumnHeader(True)
        self.review_node.SetLocked(True)
        self.refresh()
        return self.review_node

    def review_key(self, row: int) -> Key | None:
        if not 0 <= row < len(self._review_rows):
            return None
        problem = self._review_rows[row]
        return problem["case_id"], problem["label_value"]

    # ---- suspects --------------------------------------------------------------------------------

    def suspects_path(self) -> Path | None:
        return None if self.session is None else self.session.folder / SUSPECTS_FILE

    def has_suspects(self) -> bool:
        path = self.suspects_path()
        return path is not None and path.is_file()

    def suspects_table(self):
        """`suspects.csv` as a table node (numbers as numeric columns), or None when there is none."""
        path = self.suspects_path()
        if path is None or not path.is_file():
            return None
        try:
            with open(path, newline="", encoding="utf-8") as handle:
                reader = csv.DictReader(handle)
                columns = list(reader.fieldnames or [])
                records = list(reader)
        except (OSError, UnicodeDecodeError, csv.Error) as error:
            raise InputError(f"Cannot read {path} ({error}); run the suspects command again.") from None
        if not {"case_id", "label_value"} <= set(columns):
            raise InputError(f"{path} has no case_id and label_value columns; run the suspects command again.")
        if "given_label" in columns:  # the list was ranked on the labels of its time: say what changed since
            for record in records:
                record[SINCE_RANKED] = self._since_ranked(record)
            if SINCE_RANKED not in columns:  # a list written with the column keeps its place, with today's values
                columns.insert(columns.index("given_label") + 1, SINCE_RANKED)
        kinds = {name: _column_kind([record.get(name) or "" for record in records]) for name in columns}
        table, arrays = _new_table([(name, kinds[name]) for name in columns])
        for record in records:
            for name in columns:
                text = (record.get(name) or "").strip()
                if kinds[name] == "int":
                    arrays[name].InsertNextValue(int(float(text)) if text else 0)
                elif kinds[name] == "double":
                    arrays[name].InsertNextValue(float(text) if text else math.nan)
                else:
                    arrays[name].InsertNextValue(text)
        if self.suspects_node is None or self.suspects_node.GetScene() is not self.scene:
            self.suspects_node = self.scene.AddNewNodeByClass("vtkMRMLTableNode", "Suspect labels")
        self.suspects_node.SetAndObserveTable(table)
        self.suspects_node.SetUseColumnTitleAsColumnHeader(True)
        self.suspects_node.SetLocked(True)
        return self.suspects_node

    def _since_ranked(self, record: dict) -> str:
        """'' when the node is as it was ranked, else what changed (relabelled, excluded, gone)."""
        try:
            node = self.session.dataset.node(str(record.get("case_id", "")), int(float(record.get("label_value") or "nan")))
        except (KeyError, ValueError, InputError):
            return "not in the dataset"
        case = self.session.dataset.case(node.case_id)
        if node.excluded or case.excluded:
            return "excluded"
        given = (record.get("given_label") or "").strip()
        if node.metastatic is None:
            return "unlabelled"
        if given in ("0", "1") and int(given) != int(node.metastatic):
            return "relabelled " + ("metastatic" if node.metastatic else "benign")
        return ""

    def suspect_key(self, row: int) -> Key | None:
        """(case_id, label_value) of a row of the suspects table."""
        if self.suspects_node is None:
            return None
        table = self.suspects_node.GetTable()
        if not 0 <= row < table.GetNumberOfRows():
            return None
        case_id = str(_cell(table, row, "case_id"))
        value = _cell(table, row, "label_value")
        try:
            label_value = int(float(value))
        except (TypeError, ValueError):
            return case_id, None
        return case_id, label_value

    # ---- loading a case ----------------------------------------------------------------------------

    def load_case(self, case_id: str, classify: bool = True, model_path: str | os.PathLike | None = None, gradcam: bool = True) -> LoadedCase:
        """Put the case's CT and labels in the scene (replacing the last loaded case) and classify it."""
        dataset = self.dataset
        case = dataset.case(case_id)
        ct_path, labels_path = dataset.ct_path(case), dataset.labels_path(case)
        for path, what in ((ct_path, "CT"), (labels_path, "label")):
            if not path.is_file():
                raise InputError(f"The {what} image of case '{case_id}' ({path}) does not exist; restore the file or exclude the case.")
        self.unload_case()
        ct_node = load_volume_node(self.scene, str(ct_path), f"{case_id} CT")
        labels_node = load_volume_node(self.scene, str(labels_path), f"{case_id} labels", labelmap=True)
        show_ct_window(ct_node, DISPLAY_WINDOW)
        loaded = LoadedCase(case_id, ct_node, labels_node)
        self.loaded = loaded
        if classify:
            path = model_path if model_path not in (None, "") else self.model_path
            try:
                loaded.outputs = self.classification.classify(ct_node, labels_node, model_path=path or None, device=self.device, gradcam=gradcam,
                                                              per_label_value=case.per_label_value)  # the case's node definition
            except InputError as error:
                loaded.message = f"Not classified: {error}"
            if loaded.outputs is not None:
                for node, probability in zip(loaded.outputs.nodes, loaded.outputs.result.probabilities):
                    value = int(node.label_value)  # a label value split in pieces: its most suspicious piece
                    loaded.probabilities[value] = max(float(probability), loaded.probabilities.get(value, -1.0))
                for value, probability in loaded.probabilities.items():
                    self._probabilities[(case_id, value)] = probability
                self.refresh(case_id)
        return loaded

    def unload_case(self) -> None:
        """Remove the loaded case's volumes and classification outputs from the scene."""
        loaded, self.loaded = self.loaded, None
        if loaded is None:
            return
        nodes = [loaded.labels_node]
        if loaded.ct_node is not None:
            nodes += [loaded.ct_node.GetNodeReference(role) for role in (SEGMENTATION_REFERENCE, TABLE_REFERENCE, GRADCAM_REFERENCE)]
            nodes.append(loaded.ct_node)
        for node in nodes:
            if node is not None and node.GetScene() is self.scene:
                self.scene.RemoveNode(node)

    def node_centroid_ras(self, case_id: str, label_value: int) -> tuple[float, float, float] | None:
        """RAS centroid of a node of the loaded case (loading the case first if needed)."""
        if self.loaded is None or self.loaded.case_id != case_id:
            self.load_case(case_id)
        loaded = self.loaded
        if loaded.outputs is not None:
            nodes = [n for n in loaded.outputs.nodes if int(n.label_value) == int(label_value)]
        else:
            from LymphNodeClassifierLib.nodes import extract_nodes

            nodes, _ = extract_nodes(sitk_image_from_volume_node(loaded.labels_node), per_label_value=True)
            nodes = [n for n in nodes if int(n.label_value) == int(label_value)]
        if not nodes:
            return None
        largest = max(nodes, key=lambda n: n.volume_mm3)
        return tuple(float(v) for v in largest.centroid_ras)

    def probability(self, case_id: str, label_value: int) -> float | None:
        value = self._probabilities.get((case_id, label_value))
        return None if value is None else float(value)

    def cleanup(self) -> None:
        """Unload the case, release the dataset and remove this logic's table nodes."""
        self.unload_case()
        self.close()
        for node in (self.table_node, self.review_node, self.suspects_node):
            if node is not None and node.GetScene() is self.scene:
                self.scene.RemoveNode(node)
        self.table_node = self.review_node = self.suspects_node = None


def _column_kind(values: list[str]) -> str:
    texts = [v.strip() for v in values if v is not None and v.strip()]
    if not texts:
        return "string"
    try:
        numbers = [float(t) for t in texts]
    except ValueError:
        return "string"
    complete = len(texts) == len(values)  # an empty cell becomes NaN in a double column, never 0
    if complete and all(n.is_integer() and "." not in t and "e" not in t.lower() for n, t in zip(numbers, texts)):
        return "int"
    return "double"
