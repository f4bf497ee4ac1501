"""The one input check (validate.py): complete files, DICOM series, CT in HU, the geometry policy,
node-size and out-of-experience warnings -- and the same verdict from every command."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from LymphNodeClassifierLib import validate
from LymphNodeClassifierLib.cli import main as cli_main
from LymphNodeClassifierLib.dataset import Dataset
from LymphNodeClassifierLib.errors import InputError
from LymphNodeClassifierLib.explore import check_case
from LymphNodeClassifierLib.geometry import prepare_label_image
from LymphNodeClassifierLib.importer import import_table
from LymphNodeClassifierLib.model import load_model
from LymphNodeClassifierLib.nodes import extract_nodes
from LymphNodeClassifierLib.patchset import case_nodes
from LymphNodeClassifierLib.pipeline import classify_images
from helpers import TILTED, export_untrained_model, rotation

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
REAL_CT = SHARED / "totalsegmentator-ct" / "example_ct.nii.gz"
DICOM = SHARED / "totalsegmentator-ct" / "dicom"
needs_real_ct = pytest.mark.skipif(not REAL_CT.is_file(), reason=f"real CT not found at {REAL_CT} (only CI has ../shared beside the clone)")
needs_dicom = pytest.mark.skipif(not DICOM.is_dir(), reason=f"DICOM series not found at {DICOM} (only CI has ../shared beside the clone)")

SPACING = (0.9, 0.7, 2.5)  # anisotropic
DIRECTION = TILTED  # non-identity


def image(array: np.ndarray, spacing=SPACING, origin=(-40.0, -30.0, 10.0), direction=DIRECTION) -> sitk.Image:
    out = sitk.GetImageFromArray(array)
    out.SetSpacing(spacing)
    out.SetOrigin(origin)
    out.SetDirection(tuple(np.asarray(direction, dtype=float).ravel()))
    return out


def ct_array(shape=(24, 96, 96), seed=0) -> np.ndarray:
    """Air outside a soft-tissue body (HU), with noise: passes the HU check."""
    rng = np.random.default_rng(seed)
    k, j, i = np.indices(shape)
    body = ((j - shape[1] / 2) ** 2 + (i - shape[2] / 2) ** 2) < (0.4 * shape[1]) ** 2
    return np.where(body, 40.0, -1000.0).astype(np.int16) + rng.normal(0, 10, shape).astype(np.int16)


def ball_mask(shape=(24, 96, 96), centre=(12, 48, 48), radius_vox=(3, 8, 8)) -> np.ndarray:
    k, j, i = np.indices(shape)
    r = ((k - centre[0]) / radius_vox[0]) ** 2 + ((j - centre[1]) / radius_vox[1]) ** 2 + ((i - centre[2]) / radius_vox[2]) ** 2
    return (r <= 1.0).astype(np.uint8)


@pytest.fixture(scope="module")
def untrained_model(tmp_path_factory) -> Path:
    return export_untrained_model(tmp_path_factory.mktemp("model") / "m.pt", size=32, spacing_mm=1.0)


def run_cli(argv, capsys) -> tuple[int, str, str]:
    code = cli_main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code: int, err: str, *words: str) -> None:
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith(("note:", "warning:"))]
    assert code == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith("error:") and "Traceback" not in err
    for word in words:
        assert word in lines[0], (word, lines[0])


# ---------------------------------------------------------------------------- complete files


@pytest.mark.parametrize("suffix, compress", [(".nii.gz", True), (".nrrd", True), (".mha", True), (".nrrd", False)])
def test_truncated_image_is_refused_not_read_as_zeros(tmp_path, suffix, compress):
    full = tmp_path / f"ct{suffix}"
    sitk.WriteImage(image(ct_array()), str(full), compress)
    data = full.read_bytes()
    half = tmp_path / f"half{suffix}"
    half.write_bytes(data[: len(data) // 2])
    assert validate.read_image(full).GetSize() == (96, 96, 24)
    with pytest.raises(InputError, match="incomplete or corrupt") as error:
        validate.read_image(half, "CT")
    assert str(half) in str(error.value) and "copy the file again" in str(error.value)


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".mha"])
def test_damaged_compressed_image_is_refused(tmp_path, suffix):
    """Same length, 64 bytes zeroed inside the stream: ITK reads it as garbage without an error; the checksum does not pass."""
    path = tmp_path / f"ct{suffix}"
    sitk.WriteImage(image(ct_array()), str(path), True)
    data = bytearray(path.read_bytes())
    data[len(data) // 2: len(data) // 2 + 64] = bytes(64)
    path.write_bytes(bytes(data))
    with pytest.raises(InputError, match="incomplete or corrupt"):
        validate.read_image(path)


@needs_real_ct
def test_first_half_of_a_real_ct_is_refused_everywhere(tmp_path, untrained_model, capsys):
    half = tmp_path / "half.nii.gz"
    data = REAL_CT.read_bytes()
    half.write_bytes(data[: len(data) // 2])
    silently = sitk.ReadImage(str(half))  # what happened before: no error, the missing slices are 0
    assert (sitk.GetArrayViewFromImage(silently)[-1] == 0).all()
    labels = tmp_path / "labels.nrrd"
    ct = sitk.ReadImage(str(REAL_CT))
    mask = sitk.GetImageFromArray(ball_mask(sitk.GetArrayViewFromImage(ct).shape, tuple(s // 2 for s in sitk.GetArrayViewFromImage(ct).shape), (4, 6, 6)))
    mask.CopyInformation(ct)
    sitk.WriteImage(mask, str(labels))
    out = tmp_path / "out"
    code, _, err = run_cli(["classify", "--ct", half, "--labels", labels, "--out", out, "--model", untrained_model, "--no-report"], capsys)
    assert_one_line_error(code, err, "incomplete or corrupt", str(half))
    assert not out.exists() or not any(out.iterdir())


# ---------------------------------------------------------------------------- HU


@pytest.mark.parametrize("kind", ["hu_plus_1024", "mr_like"])
def test_ct_not_in_hu_is_refused_with_what_was_seen_and_override(kind):
    array = ct_array().astype(np.int32) + 1024 if kind == "hu_plus_1024" else np.random.default_rng(1).uniform(0, 4000, (24, 96, 96)).astype(np.int16)
    ct = image(array.astype(np.int16))
    with pytest.raises(InputError) as error:
        validate.check_ct(ct, "scan.nrrd")
    message = str(error.value)
    assert "scan.nrrd" in message and "rescale slope/intercept" in message and validate.NOT_HU_OPTION in message
    assert f"values {int(array.min())}.." in message
    validate.check_ct(ct, "scan.nrrd", validate.InputPolicy(not_hu_ok=True))  # the explicit override
    validate.check_ct(image(ct_array()))  # a real HU volume passes


def test_tight_crop_with_a_little_air_or_fat_passes_and_a_padding_value_does_not_count_as_air():
    array = np.full((24, 96, 96), 40, np.int16)
    array[0, :10, :10] = -1000  # 100 voxels of air: 0.05 % of the volume
    validate.check_ct(image(array))
    fat = np.full((24, 96, 96), 40, np.int16)
    fat[:, :5, :] = -100  # 5 % fat, no air: a tight abdominal crop
    validate.check_ct(image(fat))
    few = np.full((24, 96, 96), 40, np.int16)
    few.flat[np.random.default_rng(4).choice(few.size, few.size // 200, replace=False)] = -100  # 0.5 % fat: noise, not a fat layer
    with pytest.raises(InputError, match="Hounsfield"):
        validate.check_ct(image(few))
    stored = ct_array().astype(np.int32) + 1024
    stored[:, :5, :] = -2000  # HU+1024 with a padding value far below air: still no voxel in the air/lung range
    with pytest.raises(InputError, match="Hounsfield"):
        validate.check_ct(image(stored.astype(np.int16)))


# ---------------------------------------------------------------------------- geometry policy


def _centroid_lps(label: sitk.Image) -> np.ndarray:
    nodes, _ = extract_nodes(label)
    assert len(nodes) == 1
    return np.array(nodes[0].centroid_lps)


def _label_moved(ct: sitk.Image, mask: np.ndarray, how: str) -> sitk.Image:
    """The CT's own mask on another grid: resampled from the CT grid (nearest), so it marks the same physical voxels."""
    ct_mask = image(mask, ct.GetSpacing(), ct.GetOrigin(), np.array(ct.GetDirection()).reshape(3, 3))
    direction = np.array(ct.GetDirection()).reshape(3, 3)
    spacing, origin, size = np.array(ct.GetSpacing()), np.array(ct.GetOrigin()), np.array(ct.GetSize())
    if how == "shift30":
        origin = origin + direction @ np.array([30.0, 0.0, 0.0])
        size = size - np.array([int(np.ceil(30.0 / spacing[0])), 0, 0])
    elif how == "rot30":
        centre = np.array(ct.TransformContinuousIndexToPhysicalPoint(tuple((size - 1) / 2.0)))
        direction = rotation(2, 30) @ direction
        origin = centre - direction @ (spacing * (size - 1) / 2.0)
    elif how == "spacing1.5":
        spacing = spacing * 1.5
        size = np.floor(size / 1.5).astype(int)
    reference = sitk.Image([int(s) for s in size], sitk.sitkUInt8)
    reference.SetSpacing(tuple(spacing))
    reference.SetOrigin(tuple(origin))
    reference.SetDirection(tuple(direction.ravel()))
    return sitk.Resample(ct_mask, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)


@pytest.mark.parametrize("how, words", [
    ("shift30", ["origin offset", "(30.0 mm)"]),
    ("rot30", ["rotated 30.0 deg"]),
    ("spacing1.5", ["spacing (1.35, 1.05, 3.75) mm vs the CT's (0.9, 0.7, 2.5) mm"]),
])
def test_label_on_another_grid_inside_the_ct_is_resampled_with_an_exact_note(how, words):
    ct = image(ct_array())
    mask = ball_mask(centre=(12, 50, 60))
    moved = _label_moved(ct, mask, how)
    on_ct, notes = validate.labels_on_ct(ct, moved)
    assert len(notes) == 1
    for word in words:
        assert word in notes[0], notes[0]
    assert "resampled onto the CT grid" in notes[0]
    # Independent truth: the node stays where it was in physical space (within a CT voxel).
    want = _centroid_lps(image(mask, SPACING, ct.GetOrigin(), DIRECTION))
    assert np.linalg.norm(_centroid_lps(on_ct) - want) < max(SPACING)
    assert on_ct.GetSize() == ct.GetSize() and on_ct.GetOrigin() == ct.GetOrigin()
    with pytest.raises(InputError, match="--strict-geometry refuses") as error:
        validate.labels_on_ct(ct, moved, "labels.nrrd", validate.InputPolicy(strict_geometry=True))
    assert words[0] in str(error.value) and "labels.nrrd" in str(error.value)


def test_identical_grid_passes_without_a_note_and_a_crop_says_so():
    ct = image(ct_array())
    mask = ball_mask()
    same, notes = validate.labels_on_ct(ct, image(mask, SPACING, ct.GetOrigin(), DIRECTION), policy=validate.InputPolicy(strict_geometry=True))
    assert notes == [] and np.array_equal(sitk.GetArrayViewFromImage(same), mask)
    crop = image(mask, SPACING, ct.GetOrigin(), DIRECTION)[10:80, 5:90, 2:20]
    _, notes = validate.labels_on_ct(ct, crop)
    assert "(10, 5, 2) whole CT voxels (a crop of the CT grid)" in notes[0]


def test_label_partly_or_wholly_outside_the_ct_is_refused():
    ct = image(ct_array())
    near_edge = ball_mask(shape=(24, 96, 106), centre=(12, 48, 90))  # reaches i = 98, beyond the CT's last column 95
    wide = image(near_edge, SPACING, ct.GetOrigin(), DIRECTION)
    with pytest.raises(InputError, match=r"labelled voxels \(\d+\.\d %\) lie outside the CT"):
        prepare_label_image(ct, wide)
    far = image(ball_mask(), SPACING, (960.0, 0.0, 0.0), DIRECTION)
    with pytest.raises(InputError, match="does not overlap the CT"):
        prepare_label_image(ct, far)


# ---------------------------------------------------------------------------- DICOM


def _copy_series_with_new_uid(source: Path, target: Path, uid: str) -> None:
    pydicom = pytest.importorskip("pydicom")
    target.mkdir(parents=True, exist_ok=True)
    for path in sorted(source.iterdir()):
        dataset = pydicom.dcmread(path)
        dataset.SeriesInstanceUID = uid
        dataset.SOPInstanceUID = pydicom.uid.generate_uid()
        dataset.save_as(target / (path.name + ".copy"))


@needs_dicom
def test_dicom_series_folder_is_read_in_slice_order_with_rescale_applied():
    pydicom = pytest.importorskip("pydicom")
    ct = validate.read_image(DICOM)
    files = sorted(DICOM.iterdir())
    slices = sorted((pydicom.dcmread(f) for f in files), key=lambda d: float(d.ImagePositionPatient[2]))
    assert ct.GetSize()[2] == len(files) == 20
    array = sitk.GetArrayViewFromImage(ct)
    for index in (0, 7, 19):  # independent truth: pydicom's pixels x slope + intercept, by position
        want = slices[index].pixel_array * float(slices[index].RescaleSlope) + float(slices[index].RescaleIntercept)
        np.testing.assert_array_equal(array[index], want)
    np.testing.assert_allclose(ct.GetOrigin(), [float(v) for v in slices[0].ImagePositionPatient], atol=1e-3)
    validate.check_ct(ct)  # HU: the rescale was applied


@needs_dicom
def test_folder_with_two_series_lists_them_and_asks_for_series_uid(tmp_path, untrained_model, capsys):
    folder = tmp_path / "two"
    shutil.copytree(DICOM, folder)
    _copy_series_with_new_uid(DICOM, folder, "1.2.826.0.1.3680043.8.498.1")
    with pytest.raises(InputError, match="holds 2 DICOM series") as error:
        validate.read_image(folder)
    assert "--series-uid" in str(error.value) and "1.2.826.0.1.3680043.8.498.1 (20 files" in str(error.value)
    chosen = validate.read_image(folder, series_uid="1.2.826.0.1.3680043.8.498.1")
    assert chosen.GetSize()[2] == 20
    labels = tmp_path / "labels.nrrd"
    mask = sitk.GetImageFromArray(ball_mask(sitk.GetArrayViewFromImage(chosen).shape, (10, 256, 256), (3, 8, 8)))
    mask.CopyInformation(chosen)
    sitk.WriteImage(mask, str(labels))
    out = tmp_path / "out"
    code, _, err = run_cli(["classify", "--ct", folder, "--labels", labels, "--out", out, "--model", untrained_model, "--no-report", "--no-gradcam"], capsys)
    assert_one_line_error(code, err, "--series-uid", "holds 2 DICOM series")
    code, out_text, err = run_cli(["classify", "--ct", folder, "--series-uid", "1.2.826.0.1.3680043.8.498.1", "--labels", labels,
                                   "--out", out, "--model", untrained_model, "--no-report", "--no-gradcam"], capsys)
    assert code == 0, err
    assert (out / "nodes.csv").is_file()


# ---------------------------------------------------------------------------- node warnings


def test_two_litre_component_gets_a_size_warning_not_a_plain_probability(tmp_path, untrained_model, capsys):
    shape = (40, 80, 80)
    spacing = (3.0, 3.0, 3.0)
    array = np.full(shape, -1000, np.int16)
    array[:, 5:75, 5:75] = 40
    mask = np.zeros(shape, np.uint8)
    mask[10:26, 4:76, 4:76] = 1  # 72 x 72 x 16 voxels of 27 mm3: 2.24 litres, 216 mm across
    ct_path, labels_path = tmp_path / "ct.nrrd", tmp_path / "labels.nrrd"
    sitk.WriteImage(image(array, spacing, direction=np.eye(3)), str(ct_path))
    sitk.WriteImage(image(mask, spacing, direction=np.eye(3)), str(labels_path))
    out = tmp_path / "out"
    code, _, err = run_cli(["classify", "--ct", ct_path, "--labels", labels_path, "--out", out, "--model", untrained_model, "--no-report", "--no-gradcam"], capsys)
    assert code == 0, err
    rows = list(csv.DictReader((out / "nodes.csv").open()))
    assert len(rows) == 1 and float(rows[0]["volume_mm3"]) == pytest.approx(72 * 72 * 16 * 27)
    assert "implausible size for one lymph node" in rows[0]["warnings"]
    assert "implausible size" in err


def test_experience_warnings_from_the_card():
    node = type("Node", (), {"short_axis_mm": 8.0, "volume_mm3": 300.0, "node_id": 1})()
    rng = np.random.default_rng(5)
    training = rng.uniform(0.3, 0.6, (40, 3, 8, 8)).astype(np.float32)  # soft tissue in the window
    card = {"experience": validate.training_experience(rng.uniform(4, 20, 40), rng.uniform(5, 25, 40), training, 3, "test")}
    inside = rng.uniform(0.3, 0.6, (3, 8, 8)).astype(np.float32)
    assert validate.experience_warnings(card, node, inside) == []
    lung_like = np.zeros((3, 8, 8), np.float32)
    lung_like[:, 3:5, 3:5] = 0.45  # a small nodule in air, which the abdominal window shows as 0
    [warning] = validate.experience_warnings(card, node, lung_like)
    assert "patch intensities unlike every training patch (histogram distance 0.94 >" in warning
    with_mask = np.concatenate([inside, np.ones((1, 8, 8), np.float32)])  # the mask channel is not an intensity
    assert validate.experience_warnings(card, node, with_mask) == []
    low, high = card["experience"]["short_axis_mm"]
    big = type("Node", (), {"short_axis_mm": 31.0, "volume_mm3": 9000.0, "node_id": 1})()
    assert f"outside the model's training range {low:g}..{high:g} mm" in validate.experience_warnings(card, big, inside)[0]
    assert validate.experience_warnings({}, big, inside) == []  # an older card: nothing to compare with


def test_training_experience_matches_numpy():
    rng = np.random.default_rng(3)
    images = rng.uniform(0, 1, (50, 4, 8, 8)).astype(np.float32)
    short, long = rng.uniform(3, 30, 50), rng.uniform(5, 40, 50)
    block = validate.training_experience(short, long, images, 3, "test")
    means = images[:, :3].mean(axis=(1, 2, 3))
    assert block["short_axis_mm"] == [round(short.min(), 3), round(short.max(), 3)]
    assert block["patch_mean"]["range"] == [round(float(means.min()), 3), round(float(means.max()), 3)]
    assert block["patch_mean"]["sd"] == pytest.approx(means.std(), abs=1e-4)
    histograms = np.stack([np.histogram(patch[:3], bins=10, range=(0.0, 1.0))[0] / patch[:3].size for patch in images])
    np.testing.assert_allclose(block["patch_histogram"]["mean"], histograms.mean(axis=0), atol=1e-5)
    distances = 0.5 * np.abs(histograms - histograms.mean(axis=0)).sum(axis=1)
    assert block["patch_histogram"]["distance_max"] == pytest.approx(distances.max(), abs=1e-4)
    assert block["nodes"] == 50


# ---------------------------------------------------------------------------- one verdict everywhere


def test_same_input_same_verdict_in_every_command(tmp_path, untrained_model, capsys):
    """A CT stored as HU + 1024: classify, import, explore and the training data loader all refuse it with the same words."""
    root = tmp_path / "src"
    root.mkdir()
    sitk.WriteImage(image((ct_array().astype(np.int32) + 1024).astype(np.int16)), str(root / "ct.nrrd"))
    sitk.WriteImage(image(ball_mask()), str(root / "mask.nrrd"))
    (root / "table.csv").write_text("image,mask,label\nct.nrrd,mask.nrrd,1\n")
    verdict = "does not look like a CT in Hounsfield units"
    code, _, err = run_cli(["classify", "--ct", root / "ct.nrrd", "--labels", root / "mask.nrrd", "--out", tmp_path / "o", "--model", untrained_model], capsys)
    assert_one_line_error(code, err, verdict)
    result = import_table(root / "table.csv", root, tmp_path / "refused")
    assert len(result.skipped) == 1 and verdict in result.skipped[0].reason
    # With the override the import keeps the case, and records the verdict on it for every later command.
    result = import_table(root / "table.csv", root, tmp_path / "ds",
                          policy=validate.InputPolicy(not_hu_ok=True))
    dataset = Dataset.load(tmp_path / "ds")
    case = dataset.cases[0]
    assert case.extra.get("not_hu_ok") is True
    assert not [p for p in check_case(dataset, case).problems if p.kind == "implausible_hu"]
    case_nodes(dataset.ct_path(case), dataset.labels_path(case), case)  # train / evaluate / suspects load it
    case.extra.pop("not_hu_ok")
    assert [p for p in check_case(dataset, case).problems if p.kind == "implausible_hu" and verdict in p.message]
    with pytest.raises(InputError, match=verdict):
        case_nodes(dataset.ct_path(case), dataset.labels_path(case), case)


def test_import_keeps_a_mask_on_another_grid_inside_the_ct_with_a_note(tmp_path):
    root = tmp_path / "src"
    root.mkdir()
    ct = image(ct_array())
    sitk.WriteImage(ct, str(root / "ct.nrrd"))
    sitk.WriteImage(_label_moved(ct, ball_mask(), "shift30"), str(root / "mask.nrrd"))
    (root / "table.csv").write_text("image,mask,label\nct.nrrd,mask.nrrd,1\n")
    result = import_table(root / "table.csv", root, tmp_path / "ds")
    assert not result.skipped and len(result.notes) == 1 and "(30.0 mm)" in result.notes[0]
    strict = import_table(root / "table.csv", root, tmp_path / "strict",
                          policy=validate.InputPolicy(strict_geometry=True))
    assert len(strict.skipped) == 1 and "--strict-geometry" in strict.skipped[0].reason


def test_classify_shows_the_geometry_note_in_nodes_csv_and_result(tmp_path, untrained_model, capsys):
    ct = image(ct_array())
    ct_path, labels_path = tmp_path / "ct.nrrd", tmp_path / "labels.nrrd"
    sitk.WriteImage(ct, str(ct_path))
    sitk.WriteImage(_label_moved(ct, ball_mask(centre=(12, 50, 60)), "rot30"), str(labels_path))
    out = tmp_path / "out"
    code, _, err = run_cli(["classify", "--ct", ct_path, "--labels", labels_path, "--out", out, "--model", untrained_model, "--no-report", "--no-gradcam"], capsys)
    assert code == 0, err
    assert "rotated 30.0 deg" in err
    rows = list(csv.DictReader((out / "nodes.csv").open()))
    assert rows and all("rotated 30.0 deg" in row["notes"] for row in rows)
    result = classify_images(ct, sitk.ReadImage(str(labels_path)), load_model(untrained_model), with_gradcam=False)
    assert any("rotated 30.0 deg" in message for message in result.messages)  # what the panel shows
    strict_out = tmp_path / "strict"
    code, _, err = run_cli(["classify", "--ct", ct_path, "--labels", labels_path, "--out", strict_out, "--model", untrained_model, "--strict-geometry"], capsys)
    assert_one_line_error(code, err, "--strict-geometry", "rotated 30.0 deg")
    assert not strict_out.exists() or not any(strict_out.iterdir())


@needs_dicom
@pytest.mark.parametrize("files", ["reference", "copy"])
def test_import_accepts_a_dicom_series_folder_in_the_image_column(tmp_path, files):
    series = validate.read_image(DICOM)
    root = tmp_path / "src"
    root.mkdir()
    mask = sitk.GetImageFromArray(ball_mask(sitk.GetArrayViewFromImage(series).shape, (10, 256, 256), (3, 8, 8)))
    mask.CopyInformation(series)
    sitk.WriteImage(mask, str(root / "mask.nrrd"))
    (root / "table.csv").write_text(f"image,mask,case\n{DICOM},mask.nrrd,C1\n")
    result = import_table(root / "table.csv", root, tmp_path / "ds", case_col="case", files=files)
    assert not result.skipped, result.skipped
    dataset = Dataset.load(tmp_path / "ds")
    stored = dataset.ct_path(dataset.cases[0])
    assert stored.is_dir() if files == "reference" else stored.suffix == ".nrrd"
    np.testing.assert_array_equal(sitk.GetArrayFromImage(validate.read_image(stored)), sitk.GetArrayFromImage(series))


@pytest.mark.parametrize("case, words", [
    ("truncated", ["incomplete or corrupt"]),
    ("mr_like", ["does not look like a CT in Hounsfield units", "--not-hu-ok"]),
    ("outside", ["does not overlap the CT"]),
    ("strict_shift", ["--strict-geometry", "(30.0 mm)"]),
    ("strict_spacing", ["--strict-geometry", "spacing (1.35, 1.05, 3.75) mm"]),
])
def test_bad_inputs_exit_2_with_one_line_and_write_nothing(tmp_path, untrained_model, capsys, case, words):
    ct = image(ct_array())
    mask = ball_mask(centre=(12, 50, 60))
    ct_path, labels_path = tmp_path / "ct.nii.gz", tmp_path / "labels.nrrd"
    extra = []
    if case == "mr_like":
        ct = image(np.random.default_rng(1).uniform(0, 4000, (24, 96, 96)).astype(np.int16))
    sitk.WriteImage(ct, str(ct_path), True)
    if case == "truncated":
        data = ct_path.read_bytes()
        ct_path.write_bytes(data[: len(data) // 2])
    label = image(mask, SPACING, ct.GetOrigin(), DIRECTION)
    if case == "outside":
        label = image(mask, SPACING, (2000.0, 0.0, 0.0), DIRECTION)
    elif case.startswith("strict"):
        label = _label_moved(ct, mask, "shift30" if case == "strict_shift" else "spacing1.5")
        extra = ["--strict-geometry"]
    sitk.WriteImage(label, str(labels_path))
    out = tmp_path / "out"
    code, _, err = run_cli(["classify", "--ct", ct_path, "--labels", labels_path, "--out", out, "--model", untrained_model, *extra], capsys)
    assert_one_line_error(code, err, *words)
    assert not out.exists() or not [p for p in out.rglob("*") if p.is_file()]


def test_training_data_follow_the_same_geometry_policy(tmp_path):
    """train / evaluate / crossval / suspects build their patches through build_patchset(policy=...)."""
    from LymphNodeClassifierLib.patches import PatchSpec
    from LymphNodeClassifierLib.patchset import build_patchset

    root = tmp_path / "src"
    root.mkdir()
    ct = image(ct_array())
    sitk.WriteImage(ct, str(root / "ct.nrrd"))
    sitk.WriteImage(_label_moved(ct, ball_mask(centre=(12, 50, 60)), "spacing1.5"), str(root / "mask.nrrd"))
    dataset = Dataset.create(tmp_path / "ds", "moved")
    dataset.add_case("C1", "P1", root / "ct.nrrd", root / "mask.nrrd")
    dataset.add_node("C1", 1, 1)
    dataset.save()
    spec = PatchSpec(spacing_mm=(1.0, 1.0, 1.0), size=16)
    assert len(build_patchset(dataset, spec)) == 1  # resampled, as classify does
    with pytest.raises(InputError, match=r"Case 'C1': .*spacing \(1.35, 1.05, 3.75\) mm .*--strict-geometry refuses"):
        build_patchset(dataset, spec, policy=validate.InputPolicy(strict_geometry=True))
