"""The dataset format (version 1): a folder with `dataset.json` and the images it points to.

```json
{
  "format": "LymphNodeClassifier-dataset", "version": 1, "name": "...", "created": "ISO time",
  "generator": {"name": "phantoms", "seed": 1, "label_noise": 0.0, ...},
  "cases": [{"case_id": "P0001-S1", "patient_id": "P0001", "ct": "images/P0001-S1_ct.nrrd",
             "labels": "images/P0001-S1_labels.nrrd", "excluded": false, "exclude_reason": "", "note": ""}],
  "nodes": [{"case_id": "P0001-S1", "label_value": 3, "metastatic": 1, "excluded": false,
             "exclude_reason": "", "note": "", "true_metastatic": 1, "label_flipped": false}]
}
```

- Image paths are relative to the dataset folder (`ct_path` / `labels_path` resolve them).
- A case id is also the name of the case's output folder (`classify --dataset`): no path
  separator, control character or leading dot (`fileio.name_problem`).
- `node_definition` (per case) says what one node of its label map is, for every command
  (`classify`, `evaluate`, `train`, `explore`, ...): "label_value" (the default: all voxels of one
  label value, however many connected components they form, e.g. an imported file that holds one
  lesion) or "component" (each 26-connected component is its own node). A case without the key
  means "label_value" (the key is written only when set, e.g. by `import`).
- A node is identified by `(case_id, label_value)`; its label value is its voxel value in the
  case's label map.
- `metastatic` is 0, 1 or null (not yet labelled); `true_metastatic` and `label_flipped` exist
  for phantoms only (null for real data).
- Keys this version does not know are kept (in `extra`) and written back unchanged, so a file
  written by a later version of the tool loses nothing when this version saves it.
- `save()` always rewrites the file atomically (`fileio.atomic_write_json`).

Required keys: top level `format`, `version`, `cases`, `nodes`; case `case_id`, `patient_id`,
`ct`, `labels`; node `case_id`, `label_value`, `metastatic`. Optional keys get their defaults
(`excluded` false, `exclude_reason` / `note` "", `true_metastatic` / `label_flipped` null,
`name` "", `created` "", `generator` null) and are written out on the next save.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable

from .errors import InputError
from .fileio import atomic_write_json, name_problem

FORMAT_NAME = "LymphNodeClassifier-dataset"
FORMAT_VERSION = 1
DATASET_FILE = "dataset.json"

_TOP_FIELDS = ("format", "version", "name", "created", "generator", "cases", "nodes")
_CASE_FIELDS = ("case_id", "patient_id", "ct", "labels", "excluded", "exclude_reason", "note", "node_definition")
NODE_DEFINITIONS = ("label_value", "component")  # what one node of a case's label map is
_NODE_FIELDS = ("case_id", "label_value", "metastatic", "excluded", "exclude_reason", "note", "true_metastatic", "label_flipped")
_MAX_LABEL_VALUE = 65535  # label maps are stored as uint16


# --------------------------------------------------------------------------------------------
# validation helpers (each raises InputError with one sentence: the problem and the fix)


def _fix_hint() -> str:
    return "fix the file or recreate the dataset"


def _require(record: dict, key: str, where: str) -> Any:
    if key not in record:
        raise InputError(f"{where} has no '{key}' field; add it or {_fix_hint()}.")
    return record[key]


def _check_str(value: Any, key: str, where: str, allow_empty: bool = True) -> str:
    if not isinstance(value, str) or (not allow_empty and not value.strip()):
        kind = "a non-empty text" if not allow_empty else "a text"
        raise InputError(f"{where} has '{key}' = {value!r} but it must be {kind}; {_fix_hint()}.")
    return value


def _check_bool(value: Any, key: str, where: str, allow_null: bool = False) -> bool | None:
    if value is None and allow_null:
        return None
    if not isinstance(value, bool):
        allowed = "true, false or null" if allow_null else "true or false"
        raise InputError(f"{where} has '{key}' = {value!r} but it must be {allowed}; {_fix_hint()}.")
    return value


def _check_class(value: Any, key: str, where: str) -> int | None:
    """0, 1 or None (JSON true/false are accepted and stored as 1/0)."""
    if value is None:
        return None
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int) and value in (0, 1):
        return value
    if isinstance(value, float) and value in (0.0, 1.0):
        return int(value)
    raise InputError(f"{where} has '{key}' = {value!r} but it must be 0, 1 or null; {_fix_hint()}.")


def _check_label_value(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= _MAX_LABEL_VALUE:
        raise InputError(
            f"{where} has 'label_value' = {value!r} but it must be an integer from 1 to {_MAX_LABEL_VALUE}; {_fix_hint()}."
        )
    return value


def _as_dict(value: Any, where: str) -> dict:
    if not isinstance(value, dict):
        raise InputError(f"{where} is not a JSON object; {_fix_hint()}.")
    return value


# --------------------------------------------------------------------------------------------
# records


@dataclass
class CaseRecord:
    """One CT study with its label map (paths relative to the dataset folder)."""

    case_id: str
    patient_id: str
    ct: str
    labels: str
    excluded: bool = False
    exclude_reason: str = ""
    note: str = ""
    node_definition: str | None = None  # one of NODE_DEFINITIONS; None (not in the file) means "label_value"
    extra: dict[str, Any] = field(default_factory=dict)  # keys this version does not know

    @property
    def per_label_value(self) -> bool:
        """`nodes.extract_nodes`' mode for this case's label map (see `node_definition`)."""
        return self.node_definition in (None, "label_value")

    def to_dict(self) -> dict[str, Any]:
        # node_definition is written only when set, so files without it read back byte for byte
        out = {key: getattr(self, key) for key in _CASE_FIELDS if key != "node_definition" or self.node_definition is not None}
        out.update(self.extra)
        return out

    @classmethod
    def from_dict(cls, record: Any, where: str = "a case") -> "CaseRecord":
        record = _as_dict(record, where)
        case_id = _check_str(_require(record, "case_id", where), "case_id", where, allow_empty=False)
        problem = name_problem(case_id)
        if problem is not None:
            raise InputError(f"{where} has the case id {case_id!r}, which cannot name its output folder ({problem}); rename the case.")
        where = f"case '{case_id}'"
        node_definition = record.get("node_definition")
        if node_definition is not None and node_definition not in NODE_DEFINITIONS:
            raise InputError(f"{where} has 'node_definition' = {node_definition!r} but it must be one of: {', '.join(NODE_DEFINITIONS)}; {_fix_hint()}.")
        return cls(
            case_id=case_id,
            patient_id=_check_str(_require(record, "patient_id", where), "patient_id", where, allow_empty=False),
            ct=_check_str(_require(record, "ct", where), "ct", where, allow_empty=False),
            labels=_check_str(_require(record, "labels", where), "labels", where, allow_empty=False),
            excluded=_check_bool(record.get("excluded", False), "excluded", where),
            exclude_reason=_check_str(record.get("exclude_reason", ""), "exclude_reason", where),
            note=_check_str(record.get("note", ""), "note", where),
            node_definition=node_definition,
            extra={key: value for key, value in record.items() if key not in _CASE_FIELDS},
        )


@dataclass
class NodeRecord:
    """One lymph node: the voxels of value `label_value` in the label map of case `case_id`."""

    case_id: str
    label_value: int
    metastatic: int | None  # 0 benign, 1 metastatic, None not labelled yet
    excluded: bool = False
    exclude_reason: str = ""
    note: str = ""
    true_metastatic: int | None = None  # phantoms only: the class before label noise
    label_flipped: bool | None = None  # phantoms only: metastatic != true_metastatic
    extra: dict[str, Any] = field(default_factory=dict)  # keys this version does not know

    @property
    def key(self) -> tuple[str, int]:
        return (self.case_id, self.label_value)

    def to_dict(self) -> dict[str, Any]:
        out = {key: getattr(self, key) for key in _NODE_FIELDS}
        out.update(self.extra)
        return out

    @classmethod
    def from_dict(cls, record: Any, where: str = "a node") -> "NodeRecord":
        record = _as_dict(record, where)
        case_id = _check_str(_require(record, "case_id", where), "case_id", where, allow_empty=False)
        label_value = _check_label_value(_require(record, "label_value", where), f"{where} of case '{case_id}'")
        where = f"node {label_value} of case '{case_id}'"
        return cls(
            case_id=case_id,
            label_value=label_value,
            metastatic=_check_class(_require(record, "metastatic", where), "metastatic", where),
            excluded=_check_bool(record.get("excluded", False), "excluded", where),
            exclude_reason=_check_str(record.get("exclude_reason", ""), "exclude_reason", where),
            note=_check_str(record.get("note", ""), "note", where),
            true_metastatic=_check_class(record.get("true_metastatic"), "true_metastatic", where),
            label_flipped=_check_bool(record.get("label_flipped"), "label_flipped", where, allow_null=True),
            extra={key: value for key, value in record.items() if key not in _NODE_FIELDS},
        )


# --------------------------------------------------------------------------------------------
# the dataset


def _now_iso() -> str:
    """Current UTC time; honours SOURCE_DATE_EPOCH so that reproducible builds get a fixed stamp."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    if epoch is not None and epoch.strip().isdigit():
        moment = datetime.fromtimestamp(int(epoch), tz=timezone.utc)
    else:
        moment = datetime.now(timezone.utc)
    return moment.isoformat(timespec="seconds")


class Dataset:
    """A dataset folder in memory. Create with `Dataset.create` or `Dataset.load`."""

    def __init__(
        self,
        folder: str | os.PathLike,
        name: str = "",
        created: str = "",
        generator: dict | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        self.folder = Path(folder).resolve()
        self.name = name
        self.created = created
        self.generator = generator
        self.extra: dict[str, Any] = dict(extra or {})  # top-level keys this version does not know
        self._cases: list[CaseRecord] = []
        self._nodes: list[NodeRecord] = []
        self._case_index: dict[str, CaseRecord] = {}
        self._node_index: dict[tuple[str, int], NodeRecord] = {}
        self._nodes_by_case: dict[str, list[NodeRecord]] = {}

    # ---- construction ------------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        folder: str | os.PathLike,
        name: str,
        generator: dict | None = None,
        *,
        created: str | None = None,
    ) -> "Dataset":
        """Start an empty dataset in `folder` (created if needed) and write its dataset.json."""
        folder = Path(folder)
        if folder.exists() and not folder.is_dir():
            raise InputError(f"{folder} is a file, not a folder; choose a folder for the dataset.")
        if (folder / DATASET_FILE).exists():
            raise InputError(f"{folder} already holds a dataset; load it or choose an empty folder.")
        if generator is not None and not isinstance(generator, dict):
            raise InputError("The dataset generator must be a JSON object (dict) or None; pass a dict.")
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise InputError(f"Cannot create the dataset folder {folder} ({error.strerror}); choose a writable folder.") from error
        dataset = cls(folder, name=str(name), created=_now_iso() if created is None else created, generator=generator)
        dataset.save()
        return dataset

    @classmethod
    def load(cls, folder: str | os.PathLike) -> "Dataset":
        """Read and validate `folder/dataset.json` (a path to the dataset.json file itself works too)."""
        folder = Path(folder)
        if folder.name == DATASET_FILE and folder.is_file():
            folder = folder.parent
        path = folder / DATASET_FILE
        if not path.is_file():
            raise InputError(f"There is no {DATASET_FILE} in {folder}; choose a dataset folder or create one (e.g. with the phantoms command).")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise InputError(f"Cannot read {path} ({error}); check the file's permissions or restore it.") from error
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise InputError(f"{path} is not valid JSON ({error.msg} at line {error.lineno}); fix the file or restore it from a backup.") from error
        return cls.from_dict(data, folder, source=str(path))

    @classmethod
    def from_dict(cls, data: Any, folder: str | os.PathLike, source: str = DATASET_FILE) -> "Dataset":
        """Validate a parsed dataset.json (`source` names it in error messages)."""
        if not isinstance(data, dict):
            raise InputError(f"{source} does not hold a JSON object; choose a LymphNodeClassifier dataset.json.")
        if data.get("format") != FORMAT_NAME:
            raise InputError(
                f"{source} is not a LymphNodeClassifier dataset (format {data.get('format')!r}); choose a dataset folder written by this tool."
            )
        version = _require(data, "version", source)
        if isinstance(version, bool) or not isinstance(version, int):
            raise InputError(f"{source} has version {version!r} but it must be an integer; {_fix_hint()}.")
        if version != FORMAT_VERSION:
            newer = "a newer" if version > FORMAT_VERSION else "an unknown"
            raise InputError(
                f"{source} uses {newer} dataset format version {version} but this tool reads version {FORMAT_VERSION}; update the LymphNodeClassifier extension or convert the dataset."
            )
        cases = _require(data, "cases", source)
        nodes = _require(data, "nodes", source)
        if not isinstance(cases, list) or not isinstance(nodes, list):
            raise InputError(f"{source} must hold lists under 'cases' and 'nodes'; {_fix_hint()}.")
        generator = data.get("generator")
        if generator is not None and not isinstance(generator, dict):
            raise InputError(f"{source} has a 'generator' that is not an object; {_fix_hint()}.")
        dataset = cls(
            folder,
            name=_check_str(data.get("name", ""), "name", source),
            created=_check_str(data.get("created", ""), "created", source),
            generator=generator,
            extra={key: value for key, value in data.items() if key not in _TOP_FIELDS},
        )
        for number, record in enumerate(cases, start=1):
            dataset._insert_case(CaseRecord.from_dict(record, f"case #{number} in {source}"), source)
        for number, record in enumerate(nodes, start=1):
            dataset._insert_node(NodeRecord.from_dict(record, f"node #{number} in {source}"), source)
        return dataset

    # ---- persistence ---------------------------------------------------------------------------

    @property
    def path(self) -> Path:
        """The dataset.json file."""
        return self.folder / DATASET_FILE

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "name": self.name,
            "created": self.created,
            "generator": self.generator,
        }
        out.update(self.extra)
        out["cases"] = [case.to_dict() for case in self._cases]
        out["nodes"] = [node.to_dict() for node in self._nodes]
        return out

    def save(self) -> None:
        """Rewrite dataset.json atomically (the old file or the new one, never half of one)."""
        atomic_write_json(self.path, self.to_dict())

    # ---- access --------------------------------------------------------------------------------

    @property
    def cases(self) -> list[CaseRecord]:
        """The cases in file order (a new list; the records themselves are the live ones)."""
        return list(self._cases)

    @property
    def nodes(self) -> list[NodeRecord]:
        """All nodes in file order (a new list; the records themselves are the live ones)."""
        return list(self._nodes)

    def __len__(self) -> int:
        return len(self._cases)

    def case(self, case_id: str) -> CaseRecord:
        try:
            return self._case_index[case_id]
        except KeyError:
            raise InputError(f"The dataset has no case '{case_id}'; check the case id.") from None

    def has_case(self, case_id: str) -> bool:
        return case_id in self._case_index

    def node(self, case_id: str, label_value: int) -> NodeRecord:
        try:
            return self._node_index[(case_id, int(label_value))]
        except KeyError:
            raise InputError(f"The dataset has no node {label_value} in case '{case_id}'; check the case id and label value.") from None

    def nodes_of(self, case_id: str) -> list[NodeRecord]:
        """The nodes of one case in file order (empty for a case without nodes)."""
        self.case(case_id)
        return list(self._nodes_by_case.get(case_id, ()))

    def ct_path(self, case: CaseRecord | str) -> Path:
        """Absolute path of the case's CT image."""
        record = self.case(case) if isinstance(case, str) else case
        return self._absolute(record.ct)

    def labels_path(self, case: CaseRecord | str) -> Path:
        """Absolute path of the case's label map."""
        record = self.case(case) if isinstance(case, str) else case
        return self._absolute(record.labels)

    def missing_file(self, case: CaseRecord | str) -> str | None:
        """None when the case's CT and label files exist, else one sentence naming the missing one
        (image paths are relative to the dataset folder, so a moved image folder shows here)."""
        record = self.case(case) if isinstance(case, str) else case
        for what, path in (("CT", self.ct_path(record)), ("label", self.labels_path(record))):
            if not path.is_file():
                return (f"the {what} file {path} of case '{record.case_id}' does not exist (dataset.json's path {getattr(record, 'ct' if what == 'CT' else 'labels')!r} "
                        f"is relative to {self.folder}); move the images back or fix the paths")
        return None

    def patient_groups(self) -> dict[str, list[str]]:
        """patient_id -> the case ids of that patient (first-seen order), e.g. for grouped splits."""
        groups: dict[str, list[str]] = {}
        for case in self._cases:
            groups.setdefault(case.patient_id, []).append(case.case_id)
        return groups

    # ---- editing -------------------------------------------------------------------------------

    def add_case(
        self,
        case_id: str,
        patient_id: str,
        ct: str | os.PathLike,
        labels: str | os.PathLike,
        *,
        excluded: bool = False,
        exclude_reason: str = "",
        note: str = "",
        node_definition: str | None = None,
        **extra: Any,
    ) -> CaseRecord:
        """Add a case (image paths absolute or relative to the folder; stored relative). Call save() after."""
        record = CaseRecord.from_dict(
            {
                "case_id": case_id,
                "patient_id": patient_id,
                "ct": self._relative(ct),
                "labels": self._relative(labels),
                "excluded": excluded,
                "exclude_reason": exclude_reason,
                "note": note,
                "node_definition": node_definition,
                **extra,
            },
            f"new case {case_id!r}",
        )
        self._insert_case(record, "the dataset")
        return record

    def add_node(
        self,
        case_id: str,
        label_value: int,
        metastatic: int | None,
        *,
        excluded: bool = False,
        exclude_reason: str = "",
        note: str = "",
        true_metastatic: int | None = None,
        label_flipped: bool | None = None,
        **extra: Any,
    ) -> NodeRecord:
        """Add a node of an existing case. Call save() after."""
        if hasattr(label_value, "item"):  # numpy integer
            label_value = label_value.item()
        if hasattr(metastatic, "item"):
            metastatic = metastatic.item()
        if hasattr(true_metastatic, "item"):
            true_metastatic = true_metastatic.item()
        if hasattr(label_flipped, "item"):
            label_flipped = label_flipped.item()
        record = NodeRecord.from_dict(
            {
                "case_id": case_id,
                "label_value": label_value,
                "metastatic": metastatic,
                "excluded": excluded,
                "exclude_reason": exclude_reason,
                "note": note,
                "true_metastatic": true_metastatic,
                "label_flipped": label_flipped,
                **extra,
            },
            f"new node {label_value!r} of case {case_id!r}",
        )
        self._insert_node(record, "the dataset")
        return record

    # ---- internals -----------------------------------------------------------------------------

    def _insert_case(self, record: CaseRecord, source: str) -> None:
        if record.case_id in self._case_index:
            raise InputError(f"{source} has two cases with id '{record.case_id}'; give every case its own id.")
        self._cases.append(record)
        self._case_index[record.case_id] = record

    def _insert_node(self, record: NodeRecord, source: str) -> None:
        if record.case_id not in self._case_index:
            raise InputError(
                f"{source} has node {record.label_value} of case '{record.case_id}' but no such case; add the case or remove the node."
            )
        if record.key in self._node_index:
            raise InputError(
                f"{source} has two nodes with label value {record.label_value} in case '{record.case_id}'; give every node its own label value."
            )
        self._nodes.append(record)
        self._node_index[record.key] = record
        self._nodes_by_case.setdefault(record.case_id, []).append(record)

    def _absolute(self, stored: str) -> Path:
        return Path(os.path.normpath(self.folder / stored))

    def _relative(self, path: str | os.PathLike) -> str:
        path = Path(path)
        if path.is_absolute():
            try:
                path = Path(os.path.relpath(path, self.folder))
            except ValueError:  # another drive on Windows: keep it absolute
                return path.as_posix()
        return path.as_posix()


def iter_case_nodes(dataset: Dataset) -> Iterable[tuple[CaseRecord, list[NodeRecord]]]:
    """(case, its nodes) for every case in file order."""
    for case in dataset.cases:
        yield case, dataset.nodes_of(case.case_id)
