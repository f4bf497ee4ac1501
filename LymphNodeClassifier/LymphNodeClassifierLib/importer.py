"""Import a table of (image, mask, label) rows into the dataset format: the `import` command.

    python -m LymphNodeClassifierLib import --labels labels.csv --root DIR --out DATASET \\
        --label-col Diagnosis --positive Malign --negative Benign \\
        --patient-col patient_id --case-col case

Each CSV row is one case: a CT image and a mask on the same voxel grid (paths in `--image-col` /
`--mask-col`, relative to `--root` or absolute).

- Nodes: by default (`--merge-components`) every non-zero voxel of a row's mask is ONE node
  (label value 1), however many connected components the mask has: one file = one lesion.
  With `--components` each 26-connected component is its own node, label values 1..n in the
  order of `nodes.extract_nodes` (first voxel in memory order). All nodes of a row get the
  row's label. The choice is recorded on each case (`node_definition`: "label_value" when merging,
  "component" with `--components`), and every command (`classify`, `evaluate`, `train`, ...) follows it.
- Labels: a `--label-col` value equal to `--positive` is metastatic/malignant (1); one of the
  `--negative` values (repeatable) is benign (0); matching ignores case and surrounding spaces.
  Any other value, an empty one included, is an unknown label and the row is skipped; a
  `--positive` or `--negative` value that matches no row is an error (a typo would otherwise make a
  dataset without positives). Without `--label-col` the nodes are imported unlabelled (`metastatic`
  null, to be labelled later).
- Ids: `case_id` comes from `--case-col` (else the image file name without its extension);
  `patient_id` from `--patient-col` (else the case id: every case its own patient, which a
  patient-level split cannot then group). A case id names the case's output folder later, so one
  with a path separator, a control character or a leading dot (`../../escaped`) is made safe
  (`fileio.safe_file_name`: `escaped`) and the table's text kept as `source_case_id`.
- Files (default: reference): the dataset points at the original images; paths are stored
  relative to the dataset folder (the dataset format's rule), so keep the dataset folder and the
  source folder where they are relative to each other. `--copy` copies the image and mask into
  `DATASET/images/`, `--link` makes symbolic links there instead. A mask is referenced (or
  copied) as it is when it already holds the node values (0/1 when merging, or a single
  component); otherwise the relabelled map is written to `DATASET/labels/<case>_labels.nrrd`
  (NRRD keeps the grid exactly).
- Skipped rows, never silently: a missing or unreadable file, an image that is not a usable CT,
  a mask that is not a label map, a mask outside the image or, with `--strict-geometry`, on another grid (the `validate` verdicts
  every command gives; a mask on another grid inside the image is kept and listed as a note), an empty
  mask, an unknown label or a duplicate / empty case id. They are written to
  `DATASET/import_report.csv` (`row`: 1-based data row, the header not counted; `case_id`;
  `reason`) and summarised on stdout.
- Extra columns: every CSV column other than the image, mask, case and patient columns is kept on
  each node record of the row (the dataset keeps unknown keys), numbers as JSON numbers, empty
  cells as null; a column named like a node field gets the prefix `csv_`. Each node also records
  `source_row` and `mask_components` (26-connected components of its mask).

Nothing is written unless the table can be read; `dataset.json` is written once at the end.
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import os
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import SimpleITK as sitk

from .dataset import _NODE_FIELDS, DATASET_FILE, Dataset, _now_iso
from .errors import InputError, OneLineArgumentParser
from .fileio import atomic_path, atomic_write_text, check_writable_folder, name_problem, safe_file_name
from .geometry import as_label_pixel_type, check_label_image
from .nodes import NodeInfo, extract_nodes
from .patches import PatchSpec, fov_scale
from .validate import InputPolicy, add_input_options, check_ct, labels_on_ct, read_image

REPORT_FILE = "import_report.csv"
FILE_MODES = ("reference", "copy", "link")
_NIFTI_OR_DOUBLE_SUFFIXES = (".nii.gz", ".nrrd.gz", ".mha.gz")


@dataclass
class SkippedRow:
    row: int  # 1-based data row (header not counted)
    case_id: str
    reason: str


@dataclass
class ImportedNode:
    """What the import measured on one node (for the summary; the dataset keeps only the records)."""

    case_id: str
    label_value: int
    metastatic: int | None
    info: NodeInfo
    touches_first_or_last_slice: bool  # the mask reaches the first or last k slice of its image
    fov_scale_default: float  # grow_to_fit factor for the default 64 px x 0.79 mm patch (1 = fits)


@dataclass
class ImportResult:
    dataset: Dataset
    rows: int
    imported_rows: int
    skipped: list[SkippedRow] = field(default_factory=list)
    nodes: list[ImportedNode] = field(default_factory=list)
    report_path: Path | None = None
    notes: list[str] = field(default_factory=list)  # e.g. a mask on another grid, resampled onto the CT by every command

    def reason_counts(self) -> dict[str, int]:
        """Skip reasons grouped by their kind (the text before the first colon)."""
        counts: dict[str, int] = {}
        for skip in self.skipped:
            kind = skip.reason.split(":", 1)[0]
            counts[kind] = counts.get(kind, 0) + 1
        return counts

    def summary_lines(self) -> list[str]:
        positives = sum(1 for n in self.nodes if n.metastatic == 1)
        negatives = sum(1 for n in self.nodes if n.metastatic == 0)
        unlabelled = sum(1 for n in self.nodes if n.metastatic is None)
        lines = [
            f"imported {self.imported_rows} of {self.rows} rows: {len(self.dataset.cases)} cases, "
            f"{len(self.nodes)} nodes ({positives} positive, {negatives} negative"
            + (f", {unlabelled} unlabelled" if unlabelled else "") + f") into {self.dataset.folder}",
        ]
        if self.skipped:
            kinds = ", ".join(f"{count} {kind}" for kind, count in sorted(self.reason_counts().items(), key=lambda kv: -kv[1]))
            lines.append(f"skipped {len(self.skipped)} rows ({kinds}); see {self.report_path}")
        else:
            lines.append("skipped 0 rows")
        edge = sum(n.touches_first_or_last_slice for n in self.nodes)
        lines.append(f"{edge} of {len(self.nodes)} masks touch the first or last slice of their image (patches pad with air there)")
        spec = PatchSpec()
        large = sum(n.fov_scale_default > 1.0 for n in self.nodes)
        lines.append(
            f"{large} nodes need more than the default {spec.size} px x {spec.spacing_mm[0]:g} mm = {spec.size * spec.spacing_mm[0]:.1f} mm "
            f"field of view with a {spec.fov_margin:.0%} margin (train with fov_rule grow_to_fit to see them whole)"
        )
        return lines


# --------------------------------------------------------------------------------------------
# table parsing


def _read_table(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    if not path.is_file():
        raise InputError(f"The label table {path} does not exist; give the CSV file with --labels.")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(f"Cannot read the label table {path} ({error}); save it as a UTF-8 CSV file.") from None
    try:
        dialect = csv.Sniffer().sniff(text[:4096], delimiters=",;\t")
    except csv.Error:
        dialect = csv.excel
    reader = csv.DictReader(io.StringIO(text), dialect=dialect)
    columns = [c.strip() for c in (reader.fieldnames or [])]
    if not columns:
        raise InputError(f"The label table {path} has no header row; add one naming the columns (e.g. image,mask,label).")
    if len(set(columns)) != len(columns):
        raise InputError(f"The label table {path} has two columns with the same name; give every column its own name.")
    rows = []
    for raw in reader:
        row = {(k or "").strip(): (v if isinstance(v, str) else "").strip() for k, v in raw.items() if k is not None}
        if any(row.values()):
            rows.append(row)
    return columns, rows


_INT = re.compile(r"[+-]?(0|[1-9][0-9]*)")
_FLOAT = re.compile(r"[+-]?(0|[1-9][0-9]*)?(\.[0-9]*)?([eE][+-]?[0-9]+)?")


def _parse_value(text: str) -> Any:
    """A CSV cell as JSON: null when empty, an int or float when it is a plain decimal number,
    else the text (so ids with leading zeros such as 0012, and nan / inf, stay text)."""
    if text == "":
        return None
    if _INT.fullmatch(text):
        return int(text)
    if _FLOAT.fullmatch(text) and any(ch.isdigit() for ch in text):
        number = float(text)
        if math.isfinite(number):
            return number
    return text


def _suffix(path: Path) -> str:
    name = path.name.lower()
    for double in _NIFTI_OR_DOUBLE_SUFFIXES:
        if name.endswith(double):
            return path.name[-len(double):]
    return path.suffix


def _copy_name(base: str, what: str, source: Path) -> str:
    """`<base>_<what><suffix>`, the name of a copy or link in DATASET/images: `base` is a safe case
    name and the source's suffix (.nii.gz, .nrrd, ...) keeps only letters, digits and dots."""
    return f"{base}_{what}{re.sub(r'[^A-Za-z0-9.]', '_', _suffix(source))}"


def _stem(path: Path) -> str:
    suffix = _suffix(path)
    return path.name[: -len(suffix)] if suffix else path.name


# --------------------------------------------------------------------------------------------
# one row


class _Skip(Exception):
    """A row that cannot be imported; the message is the report's reason."""


def _read(path: Path, what: str) -> sitk.Image:
    """`validate.read_image` (complete files; an image cell may name a DICOM series folder), as a skip reason."""
    if not path.exists():
        raise _Skip(f"missing file: the {what} {path} does not exist")
    try:
        return read_image(path, what)
    except InputError as error:
        raise _Skip(_reason("incomplete file" if "incomplete" in str(error) else "unreadable file", error)) from None


def _reason(kind: str, error: InputError) -> str:
    return f"{kind}: {str(error).rstrip('.')}"


def _label_of(value: str, positive: str | None, negatives: Sequence[str]) -> int | None:
    key = value.strip().casefold()
    if positive is not None and key == positive.strip().casefold():
        return 1
    if key in {n.strip().casefold() for n in negatives}:
        return 0
    raise _Skip(f"unknown label: {value!r} is neither the positive value nor one of the negative values" if value else "unknown label: the label cell is empty")


def _components(mask: sitk.Image, merge: bool) -> tuple[sitk.Image, list[NodeInfo], int, bool]:
    """(label map with the node values, nodes, number of 26-connected components, whether the map
    differs from the original mask's values)."""
    try:
        check_label_image(mask)
    except InputError as error:
        if "empty" in str(error):
            raise _Skip("empty mask: the mask has no non-zero voxel") from None
        raise _Skip(_reason("bad mask", error)) from None
    mask = as_label_pixel_type(mask)
    foreground = sitk.NotEqual(mask, 0)
    stats = sitk.MinimumMaximumImageFilter()
    stats.Execute(mask)
    is_binary = stats.GetMaximum() == 1
    if merge:
        components = sitk.ConnectedComponent(foreground, True)
        n_components = int(sitk.GetArrayViewFromImage(components).max())
        label_map = sitk.Cast(foreground, sitk.sitkUInt8)
        label_map.CopyInformation(mask)
        infos, _ = extract_nodes(label_map, per_label_value=True)
        return label_map, infos, n_components, not is_binary
    infos, label_map = extract_nodes(sitk.Cast(foreground, sitk.sitkUInt8))  # node ids 1..n are the label values
    return label_map, infos, len(infos), not (is_binary and len(infos) == 1)


def _place(source: Path, folder: Path, name: str, mode: str) -> Path:
    """The path the dataset stores for `source`: the file itself, or a copy / link in `folder`."""
    if mode == "reference":
        return source
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / name
    if target.exists() or target.is_symlink():
        target.unlink()
    try:
        if mode == "copy":
            with atomic_path(target) as tmp:
                shutil.copyfile(source, tmp)
        else:
            target.symlink_to(source.resolve())
    except OSError as error:
        raise InputError(f"Cannot {mode} {source} to {target} ({error.strerror}); check that the dataset folder is writable.") from None
    return target


# --------------------------------------------------------------------------------------------
# the import


def import_table(
    labels_csv: str | os.PathLike,
    root: str | os.PathLike | None,
    out: str | os.PathLike,
    *,
    image_col: str = "image",
    mask_col: str = "mask",
    label_col: str | None = None,
    positive: str | None = None,
    negative: Sequence[str] = (),
    patient_col: str | None = None,
    case_col: str | None = None,
    merge_components: bool = True,
    files: str = "reference",
    name: str | None = None,
    policy: InputPolicy = InputPolicy(),
) -> ImportResult:
    """Import the rows of `labels_csv` into a new dataset in `out` (see the module docstring).

    `root` is the folder that relative image/mask paths start from (default: the CSV's folder);
    `files` is "reference" (default), "copy" or "link".
    """
    labels_csv = Path(labels_csv)
    root = Path(root) if root is not None else labels_csv.parent
    out = Path(out)
    if files not in FILE_MODES:
        raise InputError(f"Unknown file mode {files!r}; use one of: {', '.join(FILE_MODES)}.")
    if not root.is_dir():
        raise InputError(f"The image root {root} is not a folder; give the folder the CSV's paths start from with --root.")
    if label_col is not None and positive is None:
        raise InputError("--label-col needs --positive (the value meaning metastatic/malignant), e.g. --positive Malign.")
    if label_col is not None and not negative:
        raise InputError("--label-col needs at least one --negative value (benign), e.g. --negative Benign; other values are skipped as unknown.")
    if label_col is None and (positive is not None or negative):
        raise InputError("--positive / --negative need --label-col, the column holding the labels.")
    if positive is not None and positive.strip().casefold() in {n.strip().casefold() for n in negative}:
        raise InputError(f"The value {positive!r} is both --positive and --negative; give each label value one meaning.")
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file; choose a new folder for the dataset.")
    if (out / DATASET_FILE).exists():
        raise InputError(f"{out} already holds a dataset; choose a new folder for the import.")

    columns, rows = _read_table(labels_csv)
    named = {"--image-col": image_col, "--mask-col": mask_col, "--label-col": label_col, "--patient-col": patient_col, "--case-col": case_col}
    for option, column in named.items():
        if column is not None and column not in columns:
            raise InputError(f"The label table has no column '{column}' ({option}); its columns are: {', '.join(columns)}.")
    if not rows:
        raise InputError(f"The label table {labels_csv} has no data rows; add one row per case.")
    consumed = {c for c in (image_col, mask_col, patient_col, case_col) if c is not None}
    extra_columns = [c for c in columns if c not in consumed]
    if label_col is not None:
        _check_label_values_occur(rows, label_col, positive, negative)

    check_writable_folder(out, what="dataset folder")
    generator = {
        "name": "import",
        "labels_csv": str(labels_csv.resolve()),
        "root": str(root.resolve()),
        "image_col": image_col, "mask_col": mask_col, "label_col": label_col, "positive": positive,
        "negative": list(negative), "patient_col": patient_col, "case_col": case_col,
        "merge_components": bool(merge_components), "files": files,
    }
    node_definition = "label_value" if merge_components else "component"
    dataset = Dataset(out, name=name if name is not None else _stem(labels_csv), created=_now_iso(), generator=generator)
    result = ImportResult(dataset=dataset, rows=len(rows), imported_rows=0)
    used_names: set[str] = set()

    for number, row in enumerate(rows, start=1):
        image_text, mask_text = row.get(image_col, ""), row.get(mask_col, "")
        case_id = row.get(case_col, "") if case_col is not None else (_stem(Path(image_text)) if image_text else "")
        source_case_id = case_id
        if case_id and name_problem(case_id) is not None:
            case_id = safe_file_name(case_id)
        try:
            if not case_id:
                raise _Skip("no case id: the case id is empty" if case_col else "no case id: the image cell is empty")
            if dataset.has_case(case_id):
                raise _Skip(f"duplicate case id: case '{case_id}' was already imported from an earlier row")
            patient_id = row.get(patient_col, "") if patient_col is not None else case_id
            if not patient_id:
                raise _Skip("no patient id: the patient cell is empty")
            metastatic = _label_of(row.get(label_col, ""), positive, negative) if label_col is not None else None
            if not image_text or not mask_text:
                raise _Skip(f"missing file: the {'image' if not image_text else 'mask'} cell is empty")
            image_path = Path(image_text) if Path(image_text).is_absolute() else root / image_text
            mask_path = Path(mask_text) if Path(mask_text).is_absolute() else root / mask_text
            ct = _read(image_path, "image")
            mask = _read(mask_path, "mask")
            # The verdicts of validate, the same as every later command's (geometry policy, HU).
            not_hu = False
            try:
                check_ct(ct, image_path)
            except InputError as error:
                if not (policy.not_hu_ok and "Hounsfield" in str(error)):
                    raise _Skip(_reason("bad image", error)) from None
                not_hu = True  # recorded on the case, so every command accepts it the same way
            label_map, infos, n_components, rewrite = _components(mask, merge_components)
            try:
                _, geometry_notes = labels_on_ct(ct, mask, mask_path, policy)
            except InputError as error:
                raise _Skip(_reason("outside the CT" if "outside the CT" in str(error) or "overlap" in str(error) else "grid mismatch", error)) from None
            result.notes.extend(f"row {number} ({case_id}): {note}" for note in geometry_notes)
        except _Skip as skip:
            result.skipped.append(SkippedRow(number, case_id, str(skip)))
            continue

        base = safe_file_name(case_id)
        if base in used_names:
            base = f"{base}_row{number}"
        used_names.add(base)
        if image_path.is_dir() and files != "reference":  # a DICOM series is copied as one NRRD volume
            ct_stored = out / "images" / f"{base}_ct.nrrd"
            ct_stored.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(ct_stored) as tmp:
                sitk.WriteImage(ct, str(tmp), True)
        else:
            ct_stored = _place(image_path, out / "images", _copy_name(base, "ct", image_path), files)
        if rewrite:
            labels_stored = out / "labels" / f"{base}_labels.nrrd"
            labels_stored.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(labels_stored) as tmp:  # tmp ends with .nrrd too
                sitk.WriteImage(label_map, str(tmp), True)
        else:
            labels_stored = _place(mask_path, out / "images", _copy_name(base, "mask", mask_path), files)
        origin = {"source_case_id": source_case_id} if source_case_id != case_id else {}
        dataset.add_case(case_id, patient_id, ct_stored.absolute(), labels_stored.absolute(), node_definition=node_definition,
                         source_row=number, **origin, **({"not_hu_ok": True} if not_hu else {}))
        extras = {}
        for column in extra_columns:
            key = f"csv_{column}" if column in _NODE_FIELDS or column in ("source_row", "mask_components") else column
            extras[key] = _parse_value(row.get(column, ""))
        size_k = ct.GetSize()[2]
        for info in infos:
            value = 1 if merge_components else info.node_id
            dataset.add_node(case_id, value, metastatic, source_row=number, mask_components=n_components, **extras)
            result.nodes.append(
                ImportedNode(
                    case_id=case_id, label_value=value, metastatic=metastatic, info=info,
                    touches_first_or_last_slice=bool(info.bbox_index[2] == 0 or info.bbox_index[5] == size_k - 1),
                    fov_scale_default=fov_scale(info, label_map, PatchSpec(fov_rule="grow_to_fit")),
                )
            )
        result.imported_rows += 1

    result.report_path = out / REPORT_FILE
    _write_report(result.report_path, result.skipped)
    dataset.save()
    return result


def _check_label_values_occur(rows: Sequence[dict[str, str]], label_col: str, positive: str | None, negative: Sequence[str]) -> None:
    """Every --positive / --negative value matches at least one row (same matching as `_label_of`)."""
    seen = {row.get(label_col, "").strip().casefold(): row.get(label_col, "").strip() for row in rows}
    for option, value in [("--positive", positive)] + [("--negative", value) for value in negative]:
        if value is not None and value.strip().casefold() not in seen:
            shown = ", ".join(repr(v) for v in sorted(v for v in seen.values() if v)[:10]) or "none"
            raise InputError(f"{option} {value!r} matches no row of column '{label_col}' (its values: {shown}); give one of those values.")


def _write_report(path: Path, skipped: list[SkippedRow]) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["row", "case_id", "reason"])
    for skip in skipped:
        writer.writerow([skip.row, skip.case_id, skip.reason])
    atomic_write_text(path, buffer.getvalue())


# --------------------------------------------------------------------------------------------
# command line



def _parser() -> argparse.ArgumentParser:
    parser = OneLineArgumentParser(
        prog="python -m LymphNodeClassifierLib import",
        description="Import a CSV of image / mask / label rows into a LymphNodeClassifier dataset (one case per row).",
    )
    parser.add_argument("--labels", required=True, help="CSV table, one row per case")
    parser.add_argument("--root", default=None, help="folder the CSV's relative paths start from (default: the CSV's folder)")
    parser.add_argument("--out", required=True, help="new dataset folder")
    parser.add_argument("--image-col", default="image", help="column with the CT image path (default: image)")
    parser.add_argument("--mask-col", default="mask", help="column with the mask path (default: mask)")
    parser.add_argument("--label-col", default=None, help="column with the class label (without it: nodes are unlabelled)")
    parser.add_argument("--positive", default=None, help="label value meaning metastatic / malignant (class 1)")
    parser.add_argument("--negative", action="append", default=[], help="label value meaning benign (class 0); repeatable")
    parser.add_argument("--patient-col", default=None, help="column with the patient id (default: the case id)")
    parser.add_argument("--case-col", default=None, help="column with the case id (default: the image file name)")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--merge-components", dest="merge", action="store_true", default=True,
                       help="all components of a mask are ONE node, label value 1 (default)")
    group.add_argument("--components", dest="merge", action="store_false",
                       help="each 26-connected component of a mask is its own node (label values 1..n)")
    files = parser.add_mutually_exclusive_group()
    files.add_argument("--copy", dest="files", action="store_const", const="copy", default="reference",
                       help="copy images and masks into DATASET/images (default: reference the originals by relative path)")
    files.add_argument("--link", dest="files", action="store_const", const="link", help="symbolic links in DATASET/images instead of copies")
    parser.add_argument("--name", default=None, help="dataset name (default: the CSV's file name)")
    add_input_options(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """`import --labels CSV --root DIR --out DATASET [...]`; returns the exit code."""
    args = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    result = import_table(
        args.labels, args.root, args.out, image_col=args.image_col, mask_col=args.mask_col, label_col=args.label_col,
        positive=args.positive, negative=args.negative, patient_col=args.patient_col, case_col=args.case_col,
        merge_components=args.merge, files=args.files, name=args.name, policy=InputPolicy.from_args(args),
    )
    for line in result.summary_lines():
        print(line)
    for note in result.notes:
        print(f"  note: {note}")
    for skip in result.skipped[:10]:
        print(f"  row {skip.row} ({skip.case_id or 'no id'}): {skip.reason}")
    if len(result.skipped) > 10:
        print(f"  ... and {len(result.skipped) - 10} more in {result.report_path}")
    return 0
