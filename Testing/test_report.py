"""Report tiles rendered through real Slicer slice views (offscreen), the report PNG and the patch montage.

A small synthetic CT with a tilted direction matrix and anisotropic voxels holds two spherical
nodes at known physical points, a bright marker 15 mm to the patient's left of each node and
another 10 mm anterior to it, and a Grad-CAM blob on node 1 only. The tiles must be centred on
their node (the outline in the node's probability colour surrounds the tile centre), show the heat
overlay on node 1 and not on node 2, and follow the radiological convention (patient left on the
image's right, anterior at the top) at the requested field of view.
"""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from helpers import rotation

from LymphNodeClassifierLib.geometry import physical_points_of_indices
from LymphNodeClassifierLib.nodes import extract_nodes
from LymphNodeClassifierLib.patches import PatchSpec, extract_patches
from LymphNodeClassifierLib.report import (
    TILE_SOURCE_PATCHES,
    TILE_SOURCE_SLICER,
    patch_montage,
    write_report,
)
from LymphNodeClassifierLib.segfile import probability_color

WINDOW = (-135.0, 215.0)
SIZE_PX = 320
FOV_MM = 60.0
NODE_RADIUS_MM = 7.0
LEFT_MARKER_MM = 15.0  # towards the patient's left (+x in LPS)
ANTERIOR_MARKER_MM = 10.0  # towards the patient's front (-y in LPS)
CENTRES_LPS = (np.array([-10.0, 5.0, 0.0]), np.array([25.0, 20.0, 5.0]))
PROBABILITIES = np.array([0.87, 0.10])
PIXELS_PER_MM = SIZE_PX / FOV_MM
CENTRE_PX = (SIZE_PX - 1) / 2.0


def synthetic_case():
    """(ct, labels, cam): tilted, anisotropic grid; nodes, markers and CAM placed in physical space."""
    reference = sitk.Image((96, 90, 34), sitk.sitkInt16)
    reference.SetSpacing((0.8, 0.9, 2.5))
    reference.SetDirection(tuple((rotation(0, 12) @ rotation(2, -9)).ravel()))
    reference.SetOrigin((-42.0, -30.0, -40.0))
    size = reference.GetSize()
    ijk = np.stack(np.meshgrid(*(np.arange(n) for n in size), indexing="ij"), axis=-1).reshape(-1, 3)
    lps = physical_points_of_indices(reference, ijk.astype(float)).reshape(*size, 3).transpose(2, 1, 0, 3)  # [k, j, i]
    hu = np.full(lps.shape[:3], 40.0)
    labels = np.zeros(lps.shape[:3], np.uint16)
    for value, centre in enumerate(CENTRES_LPS, start=1):
        inside = np.linalg.norm(lps - centre, axis=-1) <= NODE_RADIUS_MM
        labels[inside], hu[inside] = value, 70.0
        hu[np.linalg.norm(lps - (centre + [LEFT_MARKER_MM, 0, 0]), axis=-1) <= 3.0] = 1500.0
        hu[np.linalg.norm(lps - (centre + [0, -ANTERIOR_MARKER_MM, 0]), axis=-1) <= 2.5] = 1500.0
    cam = np.clip(1.0 - np.linalg.norm(lps - CENTRES_LPS[0], axis=-1) / 10.0, 0.0, 1.0).astype(np.float32)
    images = []
    for array in (hu.astype(np.int16), labels, cam):
        image = sitk.GetImageFromArray(array)
        image.CopyInformation(reference)
        images.append(image)
    return tuple(images)


@pytest.fixture(scope="module")
def case():
    ct, labels, cam = synthetic_case()
    nodes, components = extract_nodes(labels)
    # node ids follow memory order; map them back to the centres they were drawn at
    order = [int(np.argmin([np.linalg.norm(np.subtract(n.centroid_lps, c)) for c in CENTRES_LPS])) for n in nodes]
    assert sorted(order) == [0, 1]
    nodes = [nodes[order.index(0)], nodes[order.index(1)]]
    for node, centre in zip(nodes, CENTRES_LPS):
        np.testing.assert_allclose(node.centroid_lps, centre, atol=0.5)
    return {"ct": ct, "cam": cam, "nodes": nodes, "components": components}


@pytest.fixture(scope="module")
def slice_views():
    pytest.importorskip("slicer", reason="slicer-core is not installed (pip install slicer-core)")
    pytest.importorskip("trame_slicer", reason="trame-slicer is not installed: Slicer slice views cannot be rendered")
    from LymphNodeClassifierLogic import slice_views

    try:
        slice_views.renderer_info()
    except slice_views.SliceViewsUnavailable as error:
        pytest.skip(f"Slicer slice views unavailable here: {error}")
    return slice_views


@pytest.fixture(scope="module")
def tiles(case, slice_views):
    return slice_views.render_node_tiles(
        case["ct"], case["components"], case["nodes"], PROBABILITIES, case["cam"],
        window=WINDOW, size_px=SIZE_PX, field_of_view_mm=FOV_MM, cam_opacity=0.4,
    )


def colour_mask(tile: np.ndarray, colour, tolerance: int = 30) -> np.ndarray:
    target = np.round(np.asarray(colour) * 255)
    return np.abs(tile.astype(int) - target).max(axis=-1) <= tolerance


def centroid(mask: np.ndarray) -> np.ndarray:
    rows, columns = np.nonzero(mask)
    return np.array([rows.mean(), columns.mean()])


def test_tiles_are_rgb_images_of_the_requested_size(tiles):
    assert len(tiles) == 2
    for tile in tiles:
        assert tile.shape == (SIZE_PX, SIZE_PX, 3) and tile.dtype == np.uint8


def test_each_tile_is_centred_on_its_node_outline(tiles):
    for tile, probability in zip(tiles, PROBABILITIES):
        outline = colour_mask(tile, probability_color(probability))
        assert outline.sum() > 100, "the node outline is missing"
        rows, columns = np.nonzero(outline)
        radii = np.hypot(rows - CENTRE_PX, columns - CENTRE_PX)
        # the outline is a ring of the node's radius around the centre, in every direction
        assert np.median(radii) == pytest.approx(NODE_RADIUS_MM * PIXELS_PER_MM, rel=0.15)
        angles = np.arctan2(rows - CENTRE_PX, columns - CENTRE_PX)
        assert len(np.unique(np.floor((angles + np.pi) / (np.pi / 4)))) >= 8
        np.testing.assert_allclose(centroid(outline), [CENTRE_PX, CENTRE_PX], atol=3.0)


def test_heat_overlay_only_on_the_node_with_the_cam_blob(tiles):
    rows, columns = np.mgrid[0:SIZE_PX, 0:SIZE_PX]
    inside = np.hypot(rows - CENTRE_PX, columns - CENTRE_PX) < 0.6 * NODE_RADIUS_MM * PIXELS_PER_MM
    warmth = [(tile[..., 0].astype(int) - tile[..., 2].astype(int))[inside].mean() for tile in tiles]
    assert warmth[0] > 40, f"no heat overlay on node 1 (mean R - B {warmth[0]:.1f})"
    assert abs(warmth[1]) < 3, f"heat overlay on node 2, which has no CAM (mean R - B {warmth[1]:.1f})"


def test_patient_left_is_on_the_right_and_anterior_at_the_top(tiles):
    for tile in tiles:
        bright = (tile.min(axis=-1) > 230)
        bright[-40:] = False  # the ruler
        # left marker: on the centre row band, right of the centre by 15 mm
        row_band = bright.copy()
        row_band[np.abs(np.arange(SIZE_PX) - CENTRE_PX) > 20] = False
        row_band[:, np.abs(np.arange(SIZE_PX) - CENTRE_PX) < 30] = False
        assert row_band.sum() > 50
        expected_left = [CENTRE_PX, CENTRE_PX + LEFT_MARKER_MM * PIXELS_PER_MM]
        np.testing.assert_allclose(centroid(row_band), expected_left, atol=4.0)
        assert not row_band[:, : int(CENTRE_PX)].any(), "bright marker on the patient's right side"
        # anterior marker: on the centre column band, above the centre by 10 mm
        column_band = bright.copy()
        column_band[:, np.abs(np.arange(SIZE_PX) - CENTRE_PX) > 20] = False
        column_band[np.abs(np.arange(SIZE_PX) - CENTRE_PX) < 30] = False
        expected_anterior = [CENTRE_PX - ANTERIOR_MARKER_MM * PIXELS_PER_MM, CENTRE_PX]
        np.testing.assert_allclose(centroid(column_band), expected_anterior, atol=4.0)


def test_a_node_wider_than_the_field_of_view_is_shown_whole(slice_views):
    """A 40 mm-radius lesion in a 60 mm view: the tile widens to 1.3x the lesion's extent, so its whole outline shows."""
    radius_mm = 40.0
    reference = sitk.Image((150, 140, 24), sitk.sitkInt16)
    reference.SetSpacing((0.8, 0.85, 5.0))  # anisotropic, thick slices, tilted: as for a large lung tumour
    reference.SetDirection(tuple(rotation(2, 7).ravel()))
    reference.SetOrigin((-58.0, -58.0, -55.0))
    size = reference.GetSize()
    ijk = np.stack(np.meshgrid(*(np.arange(n) for n in size), indexing="ij"), axis=-1).reshape(-1, 3)
    lps = physical_points_of_indices(reference, ijk.astype(float)).reshape(*size, 3).transpose(2, 1, 0, 3)
    inside = np.linalg.norm(lps - np.array([2.0, 3.0, 4.0]), axis=-1) <= radius_mm
    images = []
    for array in (np.where(inside, 60, -100).astype(np.int16), inside.astype(np.uint16)):
        image = sitk.GetImageFromArray(array)
        image.CopyInformation(reference)
        images.append(image)
    nodes, components = extract_nodes(images[1])
    field_of_view = slice_views.tile_field_of_view_mm(nodes[0], components, FOV_MM)
    # 1.3 x the 80 mm diameter, a little more: the bounding box of voxels on a grid turned by 7 degrees
    assert 1.3 * 2 * radius_mm <= field_of_view <= 1.3 * 2 * radius_mm * 1.2
    (tile,) = slice_views.render_node_tiles(images[0], components, nodes, [0.9], None, window=WINDOW, size_px=SIZE_PX, field_of_view_mm=FOV_MM)
    outline = colour_mask(tile, probability_color(0.9))
    rows, columns = np.nonzero(outline)
    radii = np.hypot(rows - CENTRE_PX, columns - CENTRE_PX)
    angles = np.arctan2(rows - CENTRE_PX, columns - CENTRE_PX)
    assert len(np.unique(np.floor((angles + np.pi) / (np.pi / 4)))) == 8, "the outline is cut off on some side"
    assert np.median(radii) == pytest.approx(radius_mm * SIZE_PX / field_of_view, rel=0.1)
    assert radii.max() < SIZE_PX / 2 - 5, "the outline reaches the tile's edge"


def test_repeated_renders_leave_the_scene_as_they_found_it(case, slice_views, tiles):
    scene = slice_views._get_renderer().scene
    before = scene.GetNumberOfNodes()
    again = slice_views.render_node_tiles(case["ct"], case["components"], case["nodes"], PROBABILITIES, None, window=WINDOW)
    assert scene.GetNumberOfNodes() == before
    # without a CAM, node 1 has no heat overlay: its interior is grey again
    centre = again[0][150:170, 150:170].astype(int)
    assert np.abs(centre[..., 0] - centre[..., 2]).max() <= 2


def test_missing_trame_slicer_raises_slice_views_unavailable(monkeypatch, slice_views):
    monkeypatch.setitem(__import__("sys").modules, "trame_slicer.core", None)
    monkeypatch.setattr(slice_views, "_renderer", None)
    monkeypatch.setattr(slice_views, "_renderer_error", None)
    with pytest.raises(slice_views.SliceViewsUnavailable, match="trame-slicer"):
        slice_views.render_node_tiles(
            sitk.Image(4, 4, 4, sitk.sitkInt16), sitk.Image(4, 4, 4, sitk.sitkUInt16), [object()], [0.5], None, WINDOW
        )


def read_png(path) -> np.ndarray:
    import matplotlib.image

    return matplotlib.image.imread(str(path))


def test_report_with_slice_view_tiles(tmp_path, case, tiles):
    nodes = case["nodes"]
    layout = write_report(
        tmp_path / "report.png", nodes, PROBABILITIES, [1, 0], tiles=tiles,
        threshold=0.5, title="Synthetic case", window=WINDOW, field_of_view_mm=FOV_MM,
    )
    image = read_png(tmp_path / "report.png")
    assert layout.tile_source == TILE_SOURCE_SLICER
    assert (layout.rows, layout.columns) == (1, 2)
    assert image.shape[:2] == (layout.height_px, layout.width_px)
    assert image.shape[1] >= 2 * SIZE_PX and image.shape[0] > SIZE_PX + 200  # tiles above a table
    # more nodes: more tile rows, each a tile high and more, and one table row more per node
    six = write_report(tmp_path / "six.png", nodes * 3, np.tile(PROBABILITIES, 3), [1, 0] * 3, tiles=tiles * 3, threshold=0.5)
    assert (six.rows, six.columns) == (2, 4)
    assert six.height_px - layout.height_px > SIZE_PX
    assert not list(tmp_path.glob(".*.tmp*")), "temporary files left behind"


def test_report_falls_back_to_patches(tmp_path, case):
    spec = PatchSpec(size=48)
    patches = extract_patches(case["ct"], case["components"], case["nodes"], spec, WINDOW)
    cams = np.zeros((2, 48, 48), np.float32)
    cams[0, 16:32, 16:32] = 1.0
    layout = write_report(tmp_path / "report.png", case["nodes"], PROBABILITIES, [1, 0], patches=patches, cams=cams, threshold=0.5)
    assert layout.tile_source == TILE_SOURCE_PATCHES
    assert read_png(tmp_path / "report.png").shape[:2] == (layout.height_px, layout.width_px)
    table_only = write_report(tmp_path / "table.png", case["nodes"], PROBABILITIES, [1, 0], threshold=0.5)
    assert table_only.rows == 0 and table_only.height_px < layout.height_px


def test_patch_montage_has_one_row_per_node(tmp_path, case):
    patches = extract_patches(case["ct"], case["components"], case["nodes"], PatchSpec(size=48), WINDOW)
    two = patch_montage(patches, tmp_path / "two.png", probabilities=PROBABILITIES)
    three = patch_montage(patches + patches[:1], tmp_path / "three.png", cams=np.ones((3, 48, 48), np.float32))
    assert (two.rows, two.columns) == (2, 3) and (three.rows, three.columns) == (3, 3)
    heights = [read_png(tmp_path / name).shape[0] for name in ("two.png", "three.png")]
    assert heights == [two.height_px, three.height_px]
    row_px = heights[1] - heights[0]
    assert row_px > 100 and abs(heights[0] - 2 * row_px) < row_px  # height grows by one row per node
    axial = patch_montage(
        extract_patches(case["ct"], case["components"], case["nodes"], PatchSpec(size=48, views="axial"), WINDOW),
        tmp_path / "axial.png",
    )
    assert (axial.rows, axial.columns) == (2, 1)


def test_long_title_is_wrapped_not_cut_and_tiles_name_the_class_their_map_explains(tmp_path, case):
    patches = extract_patches(case["ct"], case["components"], case["nodes"], PatchSpec(size=48), WINDOW)
    title = "lung_case_0001: 2 nodes, model Lymph node metastasis (abdominal CT phantoms, seed 1000, 200 studies)"
    short = write_report(tmp_path / "short.png", case["nodes"], PROBABILITIES, [1, 0], patches=patches, threshold=0.5, title="Case 1")
    layout = write_report(tmp_path / "long.png", case["nodes"], PROBABILITIES, [1, 0], patches=patches, threshold=0.5,
                          title=title, cam_classes=[1, 0])
    assert " ".join(layout.title_lines) == title and len(layout.title_lines) in (2, 3)
    assert len(short.title_lines) == 1
    assert layout.width_px == short.width_px and layout.height_px > short.height_px  # one more line, not a wider page
    assert layout.tile_captions[0].endswith("CAM: metastatic") and layout.tile_captions[1].endswith("CAM: benign")
    assert not any("CAM" in caption for caption in short.tile_captions)
    with pytest.raises(ValueError, match="Grad-CAM classes"):
        write_report(tmp_path / "bad.png", case["nodes"], PROBABILITIES, [1, 0], patches=patches, cam_classes=[1])
