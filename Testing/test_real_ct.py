"""Real-data smoke tests on two chest CTs with tumour masks (pyradiomics test data, BSD-3).

Not about accuracy: real geometry and HU, 5 mm slices, and a lesion bigger than the patch. The data
lies beside the clone in ../shared (present in CI); a user's clone skips these tests.
"""

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from LymphNodeClassifierLib.geometry import continuous_indices_of_physical_points, prepare_label_image, ras_to_lps
from LymphNodeClassifierLib.nodes import extract_nodes
from LymphNodeClassifierLib.patches import PatchSpec, extract_patches

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "pyradiomics-lung"
pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason=f"real chest CTs not found at {DATA} (only CI has ../shared beside the clone)")
WINDOW = (-1000.0, 400.0)  # lung + soft tissue: the lesions are in the lung


def load(case: int):
    ct = sitk.ReadImage(str(DATA / f"lung{case}_image.nrrd"))
    labels = sitk.ReadImage(str(DATA / f"lung{case}_label.nrrd"))
    labels_on_ct, _, _ = prepare_label_image(ct, labels)
    nodes, components = extract_nodes(labels_on_ct)
    return ct, labels_on_ct, nodes, components


@pytest.mark.parametrize("case", [1, 2])
def test_real_ct_is_hu_with_5mm_slices_and_one_lesion(case):
    ct, labels, nodes, _ = load(case)
    assert ct.GetSpacing()[2] == pytest.approx(5.0)
    values = sitk.GetArrayViewFromImage(ct)
    assert values.min() <= -1000 and values.max() > 500, "not HU: no air or no bone"
    assert len(nodes) == 1
    node = nodes[0]
    # The centroid (RAS -> LPS -> index) falls inside the tumour mask.
    ijk = np.round(continuous_indices_of_physical_points(labels, ras_to_lps(np.array(node.centroid_ras)))).astype(int)
    assert sitk.GetArrayViewFromImage(labels)[ijk[2], ijk[1], ijk[0]] == 1
    # A tumour in lung: median HU inside the mask is soft tissue, its surroundings mostly air-filled lung.
    inside = values[sitk.GetArrayViewFromImage(labels) > 0]
    assert -300 < np.median(inside) < 150


def test_thick_slices_are_interpolated_into_isotropic_patches():
    ct, _, nodes, components = load(1)
    (patch,) = extract_patches(ct, components, nodes, PatchSpec(), WINDOW)
    axial, coronal, _ = patch.mask
    # Through-plane extent on the coronal view (rows = S-I) at 0.79 mm matches the mask's slices at 5 mm.
    rows_with_mask = np.flatnonzero(coronal.any(axis=1))
    extent_mm = (rows_with_mask.max() - rows_with_mask.min() + 1) * 0.79
    bbox = nodes[0].bbox_index
    node_slices = bbox[5] - bbox[2] + 1
    assert abs(extent_mm - node_slices * 5.0) <= 5.0 + 1.6
    # The node sits in the middle of the axial view.
    size = PatchSpec().size
    assert axial[size // 2 - 2 : size // 2 + 2, size // 2 - 2 : size // 2 + 2].all()


def test_lesion_bigger_than_the_patch_is_kept_and_reaches_the_border():
    ct, _, nodes, components = load(2)
    node = nodes[0]
    spec = PatchSpec()
    assert node.long_axis_mm > spec.size * spec.spacing_mm[0], "this lesion should exceed the 50 mm field of view"
    (patch,) = extract_patches(ct, components, nodes, spec, WINDOW)
    touches_border = [view[0, :].any() or view[-1, :].any() or view[:, 0].any() or view[:, -1].any() for view in patch.mask]
    assert any(touches_border), "a fixed 50 mm patch cannot hold a 56 mm lesion"
