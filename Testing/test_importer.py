"""The `import` command: CSV of image / mask / label rows -> dataset.

Synthetic image/mask pairs are written to tmp with known components, grids and labels; a few real
LIDC-IDRI nodule crops from ../shared are imported when present (skipped otherwise).
"""

import csv
import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from LymphNodeClassifierLib import cli
from LymphNodeClassifierLib.dataset import Dataset
from LymphNodeClassifierLib.errors import InputError
from LymphNodeClassifierLib.importer import REPORT_FILE, import_table, main
from LymphNodeClassifierLib.nodes import extract_nodes
from LymphNodeClassifierLib.patches import PatchSpec
from LymphNodeClassifierLib.patchset import build_patchset

LIDC = Path(__file__).resolve().parents[2] / "shared" / "data" / "lidc-nodules"
SPACING = (0.7, 0.7, 2.5)
ORIGIN = (12.5, -40.25, -130.0)


def image(array, spacing=SPACING, origin=ORIGIN):
    img = sitk.GetImageFromArray(array)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    return img


def two_blob_mask(value=1):
    """A 40 x 40 x 8 mask with two separate blobs (26-connectivity cannot join them)."""
    mask = np.zeros((8, 40, 40), np.int16)
    mask[2:5, 5:12, 5:12] = value  # 3 * 7 * 7 = 147 voxels, first in memory order
    mask[3:7, 25:35, 22:30] = value  # 4 * 10 * 8 = 320 voxels
    return mask


def ct_array(seed=0):
    rng = np.random.default_rng(seed)
    return (rng.normal(-700, 50, (8, 40, 40))).astype(np.int16)


def write(path: Path, img: sitk.Image) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(path), True)
    return path.name


@pytest.fixture()
def table(tmp_path):
    """A source folder with a labels.csv covering every outcome; returns (csv path, root)."""
    root = tmp_path / "source"
    (root / "img").mkdir(parents=True)
    (root / "msk").mkdir()
    cases = {
        "good": (ct_array(1), two_blob_mask(), "Malign"),
        "benign": (ct_array(2), two_blob_mask()[:, ::-1].copy(), " benign "),  # case and spaces ignored
        "mask255": (ct_array(3), two_blob_mask(255), "Benign"),
        "empty": (ct_array(4), np.zeros((8, 40, 40), np.int16), "Malign"),
        "unknown": (ct_array(5), two_blob_mask(), "Indeterminate"),
        "nolabel": (ct_array(6), two_blob_mask(), ""),
    }
    for name, (ct, mask, _) in cases.items():
        write(root / "img" / f"{name}.nii.gz", image(ct))
        write(root / "msk" / f"{name}.nii.gz", image(mask))
    # a mask outside its image (origin 1 m away: the geometry policy refuses it) and one whose image file is missing
    write(root / "img" / "shifted.nii.gz", image(ct_array(7)))
    write(root / "msk" / "shifted.nii.gz", image(two_blob_mask(), origin=(ORIGIN[0] + 1000.0, ORIGIN[1], ORIGIN[2])))
    write(root / "msk" / "lost.nii.gz", image(two_blob_mask()))
    rows = [
        # case, patient, image, mask, Diagnosis, diameter_mm, Malignancy_value, note
        ("C-good", "P1", "img/good.nii.gz", "msk/good.nii.gz", "Malign", "12.5", "5", "first"),
        ("C-benign", "P1", "img/benign.nii.gz", "msk/benign.nii.gz", cases["benign"][2], "7.25", "2", ""),
        ("C-255", "P2", "img/mask255.nii.gz", "msk/mask255.nii.gz", "Benign", "9", "1", "0012"),
        ("C-empty", "P3", "img/empty.nii.gz", "msk/empty.nii.gz", "Malign", "4", "3", ""),
        ("C-unknown", "P4", "img/unknown.nii.gz", "msk/unknown.nii.gz", "Indeterminate", "4", "3", ""),
        ("C-nolabel", "P4", "img/nolabel.nii.gz", "msk/nolabel.nii.gz", "", "4", "3", ""),
        ("C-shifted", "P5", "img/shifted.nii.gz", "msk/shifted.nii.gz", "Malign", "4", "3", ""),
        ("C-lost", "P6", "img/lost.nii.gz", "msk/lost.nii.gz", "Malign", "4", "3", ""),
        ("C-good", "P7", "img/good.nii.gz", "msk/good.nii.gz", "Benign", "4", "3", ""),  # duplicate case id
    ]
    labels = root / "labels.csv"
    with open(labels, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["case", "patient_id", "image", "mask", "Diagnosis", "diameter_mm", "Malignancy_value", "note"])
        writer.writerows(rows)
    return labels, root


OPTIONS = dict(label_col="Diagnosis", positive="Malign", negative=["Benign"], patient_col="patient_id", case_col="case")
EXPECTED_SKIPS = {
    4: ("C-empty", "empty mask"),
    5: ("C-unknown", "unknown label"),
    6: ("C-nolabel", "unknown label"),
    7: ("C-shifted", "outside the CT"),
    8: ("C-lost", "missing file"),
    9: ("C-good", "duplicate case id"),
}


def read_report(folder: Path) -> list[dict]:
    with open(folder / REPORT_FILE, newline="") as f:
        return list(csv.DictReader(f))


def test_merge_components_makes_one_node_per_file_and_reports_every_skip(table, tmp_path):
    labels, root = table
    result = import_table(labels, root, tmp_path / "ds", **OPTIONS)
    dataset = Dataset.load(tmp_path / "ds")
    assert [c.case_id for c in dataset.cases] == ["C-good", "C-benign", "C-255"]
    assert [c.patient_id for c in dataset.cases] == ["P1", "P1", "P2"]
    assert [(n.case_id, n.label_value, n.metastatic) for n in dataset.nodes] == [("C-good", 1, 1), ("C-benign", 1, 0), ("C-255", 1, 0)]
    assert [n.extra["mask_components"] for n in dataset.nodes] == [2, 2, 2]
    # skipped rows: each listed with its row number, case id and reason
    report = read_report(tmp_path / "ds")
    assert {int(r["row"]): (r["case_id"], r["reason"].split(":")[0]) for r in report} == EXPECTED_SKIPS
    assert all(len(r["reason"]) > len(r["reason"].split(":")[0]) + 5 for r in report)  # says more than the kind
    assert result.rows == 9 and result.imported_rows == 3 and len(result.skipped) == 6
    # a 0/1 mask is referenced in place, untouched; the 0/255 one is rewritten as 0/1
    good, c255 = dataset.case("C-good"), dataset.case("C-255")
    assert dataset.ct_path(good).samefile(root / "img" / "good.nii.gz")
    assert dataset.labels_path(good).samefile(root / "msk" / "good.nii.gz")
    assert not (tmp_path / "ds" / "images").exists()
    rewritten = sitk.ReadImage(str(dataset.labels_path(c255)))
    assert dataset.labels_path(c255).parent.name == "labels"
    np.testing.assert_array_equal(sitk.GetArrayFromImage(rewritten), (two_blob_mask() > 0).astype(np.uint8))
    assert rewritten.GetOrigin() == pytest.approx(ORIGIN) and rewritten.GetSpacing() == pytest.approx(SPACING)
    # every node of a merged file is ONE node for training: both blobs are in its patch's mask
    patchset = build_patchset(dataset, PatchSpec(size=48), (-1000, 400))
    assert patchset.problems == [] and patchset.y.tolist() == [1, 0, 0]
    assert patchset.label_values.tolist() == [1, 1, 1]


def test_components_makes_one_node_per_26_connected_component(table, tmp_path):
    labels, root = table
    import_table(labels, root, tmp_path / "ds", merge_components=False, **OPTIONS)
    dataset = Dataset.load(tmp_path / "ds")
    assert [(n.case_id, n.label_value, n.metastatic) for n in dataset.nodes] == [
        ("C-good", 1, 1), ("C-good", 2, 1), ("C-benign", 1, 0), ("C-benign", 2, 0), ("C-255", 1, 0), ("C-255", 2, 0),
    ]
    written = sitk.GetArrayFromImage(sitk.ReadImage(str(dataset.labels_path("C-good"))))
    source = two_blob_mask()
    assert set(np.unique(written)) == {0, 1, 2}
    np.testing.assert_array_equal(written > 0, source > 0)
    assert (written == 1).sum() == 147 and (written == 2).sum() == 320  # first blob in memory order is node 1
    # diagonal neighbours are one component (26-connectivity)
    diagonal = np.zeros((8, 40, 40), np.int16)
    diagonal[2, 5, 5] = diagonal[3, 6, 6] = 1
    src = tmp_path / "diag"
    write(src / "ct.nii.gz", image(ct_array()))
    write(src / "m.nii.gz", image(diagonal))
    (src / "t.csv").write_text("image,mask\nct.nii.gz,m.nii.gz\n")
    result = import_table(src / "t.csv", src, tmp_path / "ds2", merge_components=False)
    assert len(result.nodes) == 1 and result.nodes[0].metastatic is None  # no --label-col: unlabelled
    node = Dataset.load(tmp_path / "ds2").nodes[0]
    assert node.case_id == "ct" and node.metastatic is None  # case id from the image file name


def test_extra_columns_are_kept_on_the_nodes_as_json_values(table, tmp_path):
    labels, root = table
    import_table(labels, root, tmp_path / "ds", **OPTIONS)
    nodes = {n.case_id: n for n in Dataset.load(tmp_path / "ds").nodes}
    good = nodes["C-good"]
    assert good.extra["diameter_mm"] == 12.5 and good.extra["Malignancy_value"] == 5
    assert good.extra["Diagnosis"] == "Malign" and good.extra["source_row"] == 1
    assert good.extra["csv_note"] == "first" and good.note == ""  # a column named like a node field is prefixed
    assert nodes["C-255"].extra["csv_note"] == "0012"  # leading zeros: kept as text
    assert nodes["C-benign"].extra["csv_note"] is None and nodes["C-benign"].extra["diameter_mm"] == 7.25
    assert "case" not in good.extra and "image" not in good.extra  # consumed columns are on the case


@pytest.mark.parametrize("mode", ["copy", "link"])
def test_copy_and_link_put_the_files_in_the_dataset(table, tmp_path, mode):
    labels, root = table
    import_table(labels, root, tmp_path / "ds", files=mode, **OPTIONS)
    dataset = Dataset.load(tmp_path / "ds")
    path = dataset.ct_path("C-good")
    assert path.parent == (tmp_path / "ds" / "images").resolve()
    assert path.is_symlink() is (mode == "link")
    assert path.read_bytes() == (root / "img" / "good.nii.gz").read_bytes()
    if mode == "copy":
        os.rename(root, tmp_path / "moved")  # the copies do not need the source any more
        patchset = build_patchset(dataset, PatchSpec(size=32), (-1000, 400))
        assert len(patchset) == 3


def test_command_line_prints_a_summary_and_refuses_bad_options(table, tmp_path, capsys):
    labels, root = table
    argv = ["--labels", str(labels), "--root", str(root), "--out", str(tmp_path / "ds"), "--label-col", "Diagnosis",
            "--positive", "Malign", "--negative", "Benign", "--patient-col", "patient_id", "--case-col", "case"]
    assert cli.main(["import", *argv]) == 0
    out = capsys.readouterr().out
    assert "imported 3 of 9 rows" in out and "skipped 6 rows" in out and "2 unknown label" in out
    assert "row 8 (C-lost): missing file" in out
    assert "masks touch the first or last slice" in out
    # the folder holds a dataset now: a second import is refused, in one line, exit 2
    assert cli.main(["import", *argv]) == 2
    assert "already holds a dataset" in capsys.readouterr().err
    for bad, message in [
        (dict(label_col="Nope"), "no column 'Nope'"),
        (dict(negative=[]), "--negative"),
        (dict(negative=["malign"]), "both --positive and --negative"),
    ]:
        with pytest.raises(InputError, match=message):
            import_table(labels, root, tmp_path / "other", **{**OPTIONS, **bad})
    with pytest.raises(InputError, match="does not exist"):
        import_table(tmp_path / "none.csv", root, tmp_path / "other")
    assert not (tmp_path / "other" / "dataset.json").exists()
    assert main(["--labels", str(labels), "--out", str(tmp_path / "ds3")]) == 0  # --root defaults to the CSV's folder


def test_rows_with_a_bad_image_or_an_unreadable_file_are_skipped_not_fatal(tmp_path):
    src = tmp_path / "src"
    write(src / "flat.nii.gz", image(np.zeros((8, 40, 40), np.int16)))  # a blank "CT"
    write(src / "m.nii.gz", image(two_blob_mask()))
    (src / "junk.nii.gz").write_bytes(b"not an image")
    write(src / "ct.nii.gz", image(ct_array()))
    (src / "t.csv").write_text("image,mask\nflat.nii.gz,m.nii.gz\nct.nii.gz,junk.nii.gz\nct.nii.gz,m.nii.gz\n")
    result = import_table(src / "t.csv", src, tmp_path / "ds")
    assert [(s.row, s.reason.split(":")[0]) for s in result.skipped] == [(1, "bad image"), (2, "unreadable file")]
    assert [c.case_id for c in Dataset.load(tmp_path / "ds").cases] == ["ct"]


# --------------------------------------------------------------------------------------------
# real LIDC-IDRI crops


lidc = pytest.mark.skipif(not (LIDC / "labels.csv").is_file(), reason=f"LIDC nodule crops not found at {LIDC} (only CI has ../shared beside the clone)")


@lidc
def test_ten_real_lidc_rows_import_load_measure_and_patch(tmp_path):
    with open(LIDC / "labels.csv", newline="") as f:
        lines = f.read().splitlines()
    subset = tmp_path / "labels10.csv"
    subset.write_text("\n".join(lines[:11]) + "\n")
    result = import_table(subset, LIDC, tmp_path / "lidc", **{**OPTIONS, "negative": ["Benign"]})
    assert result.imported_rows == 10 and not result.skipped
    dataset = Dataset.load(tmp_path / "lidc")
    assert len(dataset.cases) == 10 and len(dataset.nodes) == 10
    rows = {r["case"]: r for r in csv.DictReader(open(subset, newline=""))}
    for case, nodes in ((c, dataset.nodes_of(c.case_id)) for c in dataset.cases):
        row = rows[case.case_id]
        assert case.patient_id == row["patient_id"]
        (node,) = nodes
        assert node.metastatic == (row["Diagnosis"] == "Malign")
        assert node.extra["diameter_mm"] == pytest.approx(float(row["diameter_mm"]))
        assert dataset.labels_path(case).samefile(LIDC / row["mask"])  # 0/1 masks are referenced, not copied
        label = sitk.Cast(sitk.ReadImage(str(dataset.labels_path(case))), sitk.sitkUInt8)
        (info,) = extract_nodes(label, per_label_value=True)[0]
        ratio = info.short_axis_mm / node.extra["diameter_mm"]
        assert 1 / 3 < ratio < 3, f"{case.case_id}: short axis {info.short_axis_mm:.1f} mm vs diameter {node.extra['diameter_mm']:.1f} mm"
    # patches with padding: the crops are ~31-45 mm wide and a few slices thick, the patch 50.6 mm
    patchset = build_patchset(dataset, PatchSpec(), (-1000.0, 400.0))
    assert patchset.x.shape == (10, 3, 64, 64) and patchset.problems == []
    assert np.isfinite(patchset.x).all() and patchset.x.min() >= 0 and patchset.x.max() <= 1
    coronal_air_rows = (patchset.x[:, 1] == 0).all(axis=2)  # whole rows of air above / below the crop
    assert coronal_air_rows[:, :5].all() and coronal_air_rows[:, -5:].all()
    assert (patchset.x[:, 0, 28:36, 28:36] > 0).all()  # the middle of the axial view is inside the CT
    edge = sum(n.touches_first_or_last_slice for n in result.nodes)
    assert 0 < edge <= 10


@pytest.mark.parametrize("merge, definition", [(True, "label_value"), (False, "component")])
def test_each_case_records_the_node_definition_and_every_reader_follows_it(table, tmp_path, merge, definition):
    labels, root = table
    import_table(labels, root, tmp_path / "ds", merge_components=merge, **OPTIONS)
    dataset = Dataset.load(tmp_path / "ds")
    assert {case.node_definition for case in dataset.cases} == {definition}
    patchset = build_patchset(dataset, PatchSpec(size=16, spacing_mm=(2.0, 2.0, 2.0)), (-1000.0, 400.0))
    assert len(patchset) == len(dataset.nodes) == (3 if merge else 6) and patchset.problems == []


def test_a_label_value_that_matches_no_row_is_an_error_before_anything_is_written(table, tmp_path):
    labels, root = table
    for option, value in (("positive", "malignant"), ("negative", ["Benign", "bening"])):
        with pytest.raises(InputError, match=f"--{option} '{'malignant' if option == 'positive' else 'bening'}' matches no row of column 'Diagnosis'"):
            import_table(labels, root, tmp_path / "ds", **{**OPTIONS, option: value})
        assert not (tmp_path / "ds").exists()
