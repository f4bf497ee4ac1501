"""What makes a first classification cheap must not change it (issue 11).

- Nodes, patches and the segmentation file come from the component image on the nodes' region of
  the CT grid (`nodes.extract_nodes_cropped`); each is compared with the same thing made from the
  full-grid image of `nodes.extract_nodes`, on tilted CTs with anisotropic voxels, and the crop's
  voxels are placed against SimpleITK's own index-to-physical transform of the full grid. A mask
  pixel may differ only at a tie (its centre on a voxel face), which nearest-neighbour sampling
  rounds by the float error of the image origin; the CT channels are identical.
- The full-grid component image of a result is built only when asked for, and equals extract_nodes'.
- `validate.read_ct_and_labels` reads in one background thread while the model loads: same images,
  the errors in the sequential order (model, CT, label map).
- `classify_case_files` with a model loader writes byte-identical outputs to one with a loaded model.
"""

from __future__ import annotations

import threading
import zlib
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import slicerio

from LymphNodeClassifierLib import validate
from LymphNodeClassifierLib.classify import classify_case_files
from LymphNodeClassifierLib.errors import InputError
from LymphNodeClassifierLib.model import load_model
from LymphNodeClassifierLib.nodes import components_on_grid, crop_start_index, extract_nodes, extract_nodes_cropped
from LymphNodeClassifierLib.patches import PatchSpec, extract_patches
from LymphNodeClassifierLib.phantoms import generate_case, write_case
from LymphNodeClassifierLib.pipeline import StageTimer, classify_images
from LymphNodeClassifierLib.segfile import write_segmentation_file
from helpers import TILTED, export_untrained_model


@pytest.fixture(scope="module")
def tilted_case():
    """A phantom study on a tilted grid with anisotropic voxels (several nodes, HU)."""
    case = generate_case(5150, tilt=True)
    assert not np.allclose(case.ct.GetDirection(), np.eye(3).ravel())
    assert len(set(np.round(case.ct.GetSpacing(), 4))) > 1
    return case


@pytest.fixture(scope="module")
def untrained(tmp_path_factory) -> Path:
    return export_untrained_model(tmp_path_factory.mktemp("model") / "untrained.pt", size=32, spacing_mm=1.2)


def _blobs_label() -> sitk.Image:
    """Three nodes (values 3, 5, 7; 5 in two pieces) away from the edges of a tilted, anisotropic grid."""
    array = np.zeros((30, 70, 60), dtype=np.uint16)
    array[5:9, 10:16, 12:20] = 3
    array[12:15, 40:52, 30:36] = 5
    array[22:25, 50:55, 8:12] = 5
    array[18:21, 20:24, 40:47] = 7
    label = sitk.GetImageFromArray(array)
    label.SetSpacing((0.6, 0.8, 2.5))
    label.SetOrigin((-12.5, 30.25, 101.0))
    label.SetDirection(tuple(TILTED.ravel()))
    return label


@pytest.mark.parametrize("per_label_value", [False, True])
def test_cropped_nodes_and_components_are_those_of_the_full_grid(per_label_value):
    label = _blobs_label()
    full_nodes, full_components = extract_nodes(label, per_label_value=per_label_value)
    nodes, crop = extract_nodes_cropped(label, per_label_value=per_label_value)
    assert len(nodes) == (3 if per_label_value else 4)
    assert nodes == full_nodes  # every field: bounding boxes and edge flags on the full grid
    assert crop.GetSize() == (47 - 8, 55 - 10, 25 - 5)  # the foreground's bounding box (i, j, k)
    start = crop_start_index(crop, label)
    assert start == (8, 10, 5)
    # the crop's voxels sit where the full grid's do (SimpleITK's transforms, not the Lib's)
    for index in [(0, 0, 0), (31, 44, 19), (5, 17, 9)]:
        full_index = tuple(a + b for a, b in zip(index, start))
        np.testing.assert_allclose(crop.TransformIndexToPhysicalPoint(index), label.TransformIndexToPhysicalPoint(full_index), atol=1e-9)
        assert crop[index] == full_components[full_index]
    rebuilt = components_on_grid(crop, label)
    assert np.array_equal(sitk.GetArrayViewFromImage(rebuilt), sitk.GetArrayViewFromImage(full_components))
    assert (rebuilt.GetOrigin(), rebuilt.GetSpacing(), rebuilt.GetDirection()) == (label.GetOrigin(), label.GetSpacing(), label.GetDirection())
    assert rebuilt.GetPixelID() == full_components.GetPixelID()
    # every node voxel lies inside the crop: nothing of a node is outside it
    assert int(np.count_nonzero(sitk.GetArrayViewFromImage(crop))) == sum(node.voxel_count for node in nodes)


def test_a_crop_that_is_not_a_sub_grid_is_refused():
    label = _blobs_label()
    _, crop = extract_nodes_cropped(label)
    moved = sitk.Image(crop)
    moved.SetOrigin(tuple(np.asarray(label.GetOrigin()) - 100.0))
    with pytest.raises(ValueError, match="sub-grid"):
        crop_start_index(moved, label)
    rescaled = sitk.Image(crop)
    rescaled.SetSpacing((1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="sub-grid"):
        components_on_grid(rescaled, label)


@pytest.mark.parametrize("views", ["triplanar", "axial"])
def test_patches_from_the_crop_equal_those_from_the_full_grid(tilted_case, views):
    nodes, full_components = extract_nodes(tilted_case.labels)
    cropped_nodes, crop = extract_nodes_cropped(tilted_case.labels)
    assert crop.GetNumberOfPixels() < full_components.GetNumberOfPixels() / 4
    spec = PatchSpec(spacing_mm=(0.9, 0.9, 0.9), size=40, views=views, mask_channel=True)
    full = extract_patches(tilted_case.ct, full_components, nodes, spec, (-135.0, 215.0))
    cropped = extract_patches(tilted_case.ct, crop, cropped_nodes, spec, (-135.0, 215.0))
    assert len(full) == len(cropped) == len(nodes) >= 2
    differing = 0
    for a, b in zip(full, cropped):
        assert a.planes == b.planes and a.fov_scale == b.fov_scale
        assert np.array_equal(a.image[:-1], b.image[:-1])  # the CT channels: the same samples of the same CT
        assert np.array_equal(a.image[-1], a.mask[0]) and np.array_equal(b.image[-1], b.mask[0])  # the mask channel is the axial mask
        assert a.mask.any()  # the node's own mask was found in the crop
        for view, plane in enumerate(a.planes):
            for r, c in np.argwhere(a.mask[view] != b.mask[view]):
                # Only a tie can differ: a pixel centre on a voxel face (index x.5), which nearest-neighbour
                # sampling rounds one way or the other depending on the float error of its origin.
                point = np.asarray(plane.origin_lps) + r * np.asarray(plane.row_step_lps) + c * np.asarray(plane.col_step_lps)
                index = np.asarray(full_components.TransformPhysicalPointToContinuousIndex(tuple(point)))
                assert np.any(np.abs(np.abs(index - np.floor(index)) - 0.5) < 1e-6), (a.node.node_id, view, r, c, index)
                differing += 1
    assert differing <= 0.01 * sum(int(p.mask.sum()) for p in full)


def test_segmentation_file_from_the_crop_equals_the_one_from_the_full_grid(tilted_case, tmp_path):
    nodes, full_components = extract_nodes(tilted_case.labels)
    _, crop = extract_nodes_cropped(tilted_case.labels)
    probabilities = np.linspace(0.1, 0.9, len(nodes))
    write_segmentation_file(tmp_path / "full.seg.nrrd", full_components, nodes, probabilities)
    write_segmentation_file(tmp_path / "crop.seg.nrrd", crop, nodes, probabilities, grid=tilted_case.labels)
    full, cropped = (slicerio.read_segmentation(str(tmp_path / name)) for name in ("full.seg.nrrd", "crop.seg.nrrd"))
    assert np.array_equal(full["voxels"], cropped["voxels"])
    np.testing.assert_array_equal(full["ijkToLPS"], cropped["ijkToLPS"])
    assert full["segments"] == cropped["segments"]
    # the file holds every node voxel, each at the physical point of its CT-grid voxel
    assert int(np.count_nonzero(cropped["voxels"])) == sum(node.voxel_count for node in nodes)
    i, j, k = np.argwhere(cropped["voxels"] > 0)[0]
    lps = cropped["ijkToLPS"] @ np.array([i, j, k, 1.0])
    full_index = tilted_case.labels.TransformPhysicalPointToIndex(tuple(lps[:3]))
    assert full_components[full_index] == cropped["voxels"][i, j, k]


def test_the_full_grid_component_image_is_built_only_when_asked_for(tilted_case, untrained):
    model = load_model(untrained)
    result = classify_images(tilted_case.ct, tilted_case.labels, model, with_gradcam=False)
    assert result._component_image is None  # classifying did not need it
    _, full_components = extract_nodes(tilted_case.labels)
    image = result.component_image
    assert np.array_equal(sitk.GetArrayViewFromImage(image), sitk.GetArrayViewFromImage(full_components))
    assert (image.GetOrigin(), image.GetSpacing(), image.GetDirection()) == (
        tilted_case.ct.GetOrigin(), tilted_case.ct.GetSpacing(), tilted_case.ct.GetDirection())
    assert result.component_image is image  # built once


def _write(case, folder: Path) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    ct_path, labels_path = folder / "ct.nrrd", folder / "labels.nrrd"
    write_case(case, ct_path, labels_path)
    return ct_path, labels_path


def test_reads_run_in_one_other_thread_while_the_model_loads(tilted_case, tmp_path, monkeypatch):
    ct_path, labels_path = _write(tilted_case, tmp_path)
    threads = []
    real_read = validate.read_image
    monkeypatch.setattr(validate, "read_image", lambda *args: threads.append(threading.get_ident()) or real_read(*args))
    ct, labels, value = validate.read_ct_and_labels(ct_path, labels_path, meanwhile=lambda: threading.get_ident())
    assert value == threading.get_ident()  # the meanwhile function ran on the calling thread
    assert len(threads) == 2 and threads[0] == threads[1] != threading.get_ident()  # both reads on one other thread
    for read, original in ((ct, tilted_case.ct), (labels, tilted_case.labels)):
        assert np.array_equal(sitk.GetArrayViewFromImage(read), sitk.GetArrayViewFromImage(original))
        assert read.GetOrigin() == pytest.approx(original.GetOrigin()) and read.GetDirection() == pytest.approx(original.GetDirection())
    without = validate.read_ct_and_labels(ct_path, labels_path)
    assert without[2] is None and np.array_equal(sitk.GetArrayViewFromImage(without[0]), sitk.GetArrayViewFromImage(ct))


def test_read_errors_come_in_the_sequential_order(tilted_case, tmp_path):
    ct_path, labels_path = _write(tilted_case, tmp_path)
    cut = tmp_path / "cut.nrrd"
    cut.write_bytes(ct_path.read_bytes()[: ct_path.stat().st_size // 2])
    missing = tmp_path / "missing.nrrd"

    def broken_model():
        raise InputError("model refused")

    with pytest.raises(InputError, match="model refused"):  # the model's error first, as when it loaded before the reads
        validate.read_ct_and_labels(cut, missing, meanwhile=broken_model)
    with pytest.raises(InputError, match=r"CT file .*cut\.nrrd is incomplete"):
        validate.read_ct_and_labels(cut, missing, meanwhile=lambda: None)
    with pytest.raises(InputError, match=r"label file .*missing\.nrrd does not exist"):
        validate.read_ct_and_labels(ct_path, missing, meanwhile=lambda: None)


def test_a_model_loader_gives_the_same_outputs_as_a_loaded_model(tilted_case, untrained, tmp_path):
    ct_path, labels_path = _write(tilted_case, tmp_path / "in")
    timer = StageTimer()
    rows_loaded, _ = classify_case_files(ct_path, labels_path, tmp_path / "loaded", load_model(untrained), with_report=False, note=lambda text: None)
    rows_lazy, _ = classify_case_files(ct_path, labels_path, tmp_path / "lazy", lambda: load_model(untrained), with_report=False, timer=timer,
                                       note=lambda text: None)
    assert rows_lazy == rows_loaded and len(rows_lazy) >= 2
    for name in ("nodes.csv", "gradcam.nrrd"):
        assert (tmp_path / "lazy" / name).read_bytes() == (tmp_path / "loaded" / name).read_bytes(), name
    lazy, loaded = (slicerio.read_segmentation(str(tmp_path / run / "nodes.seg.nrrd")) for run in ("lazy", "loaded"))  # its header has a time
    assert np.array_equal(lazy["voxels"], loaded["voxels"]) and lazy["segments"] == loaded["segments"]
    np.testing.assert_array_equal(lazy["ijkToLPS"], loaded["ijkToLPS"])
    assert timer.seconds["model"] > 0 and timer.seconds["read"] >= 0  # the load is timed as the model stage
    header = (tmp_path / "lazy" / "gradcam.nrrd").read_bytes().split(b"\n\n", 1)[0]
    assert b"encoding: gzip" in header  # the fast level still writes a compressed NRRD


def test_the_fast_checksums_are_zlibs():
    data = np.random.default_rng(7).integers(0, 255, 1 << 20, dtype=np.uint8)
    assert validate._crc32(data, validate._crc32(b"head")) == zlib.crc32(data, zlib.crc32(b"head"))
    assert validate._adler32(data, validate._adler32(b"head")) == zlib.adler32(data, zlib.adler32(b"head"))
