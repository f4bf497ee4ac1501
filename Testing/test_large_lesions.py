"""Large lesions and slice edges: air padding beyond the image, and the field-of-view rule.

Independent truths: SimpleITK's physical -> continuous index transform says which patch pixels lie
outside the CT; the node's reach is recomputed from its voxel indices with numpy; spheres of a
known radius say how big the node must look.
"""

import numpy as np
import pytest
import SimpleITK as sitk
from helpers import rotation

from LymphNodeClassifierLib.dataset import Dataset
from LymphNodeClassifierLib.errors import InputError
from LymphNodeClassifierLib.model import build_model, export_torchscript, load_model, new_card
from LymphNodeClassifierLib.nodes import extract_nodes
from LymphNodeClassifierLib.patches import PatchSpec, extract_patches, fov_scale
from LymphNodeClassifierLib.patchset import _spec_dict, build_patchset
from LymphNodeClassifierLib.pipeline import classify_images, patch_spec_from_card
from LymphNodeClassifierLib.training import TrainingConfig

LUNG_WINDOW = (-1000.0, 400.0)
LUNG_HU, LESION_HU = -800.0, 40.0  # lung windows to ~0.14, so air padding (0) stands out


def sphere_case(size, spacing, centre_index, radius_mm, direction=np.eye(3)):
    """(ct, label) with a sphere of `radius_mm` around the continuous index `centre_index`."""
    direction = np.asarray(direction, dtype=float)
    affine = direction @ np.diag(spacing)
    origin = np.array([-20.3, 31.7, -140.2])
    k, j, i = np.indices(size[::-1])
    ijk = np.stack([i, j, k], axis=-1).astype(float)
    points = ijk @ affine.T + origin
    centre = np.asarray(centre_index, dtype=float) @ affine.T + origin
    inside = np.linalg.norm(points - centre, axis=-1) <= radius_mm
    hu = np.where(inside, LESION_HU, LUNG_HU).astype(np.int16)
    ct, label = sitk.GetImageFromArray(hu), sitk.GetImageFromArray(inside.astype(np.uint8))
    for image in (ct, label):
        image.SetSpacing(tuple(float(s) for s in spacing))
        image.SetDirection(tuple(direction.ravel()))
        image.SetOrigin(tuple(origin))
    return ct, label


def patches_of(ct, label, spec, window=LUNG_WINDOW):
    nodes, components = extract_nodes(label)
    assert len(nodes) == 1
    return extract_patches(ct, components, nodes, spec, window)[0], nodes[0], components


def outside_ct(ct, plane, size):
    rows, cols = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    points = plane.pixel_to_lps(rows, cols).reshape(-1, 3)
    indices = np.array([ct.TransformPhysicalPointToContinuousIndex(tuple(map(float, p))) for p in points])
    outside = ((indices < -0.5) | (indices > np.array(ct.GetSize()) - 0.5)).any(axis=1)
    return outside.reshape(size, size)


def mask_centre(mask):
    rows, cols = np.nonzero(mask)
    return rows.mean(), cols.mean()


# --------------------------------------------------------------------------------------------
# crops that end at the lesion


@pytest.mark.parametrize("centre_k", [2.5, 4.0])  # symmetric in z, and touching only the last slice
def test_crop_ending_at_the_lesion_is_padded_with_air_and_stays_centred(centre_k):
    # an LIDC-like crop: 44 x 44 x 6 voxels at 0.7 x 0.7 x 2.5 mm, the lesion cut by the crop in z
    ct, label = sphere_case((44, 44, 6), (0.7, 0.7, 2.5), (21.6, 22.3, centre_k), 8.0)
    spec = PatchSpec()  # 64 px x 0.79 mm: larger than the 31 mm crop in every direction
    patch, node, _ = patches_of(ct, label, spec)
    z = sitk.GetArrayViewFromImage(label).any(axis=(1, 2))
    assert z[-1] and (z[0] == (centre_k == 2.5)), "the mask must touch the last (and maybe the first) slice"
    centre_px = (spec.size - 1) / 2
    for view, plane in enumerate(patch.planes):
        np.testing.assert_allclose(plane.pixel_to_lps(centre_px, centre_px), node.centroid_lps, atol=1e-9)
        outside = outside_ct(ct, plane, spec.size)
        assert 0.1 < outside.mean() < 0.95, plane.name
        np.testing.assert_array_equal(patch.image[view][outside], 0.0)  # air, windowed
        assert (patch.image[view][~outside] > 0.1).all(), plane.name  # lung or lesion inside the CT
        assert not patch.mask[view][outside].any()
        rows, cols = mask_centre(patch.mask[view])
        assert abs(cols - centre_px) < 0.75, plane.name  # in-plane the mask is centred
        if plane.name == "axial":
            assert abs(rows - centre_px) < 0.75
    # coronal rows run superior -> inferior: the crop ends above the lesion's top, the air above
    # it starts right where the mask does (the patch is centred on the cut lesion's centroid)
    coronal_outside = outside_ct(ct, patch.planes[1], spec.size)[:, spec.size // 2]
    first_mask_row = np.flatnonzero(patch.mask[1].any(axis=1))[0]
    assert coronal_outside[: first_mask_row - 2].all() and not coronal_outside[first_mask_row + 1]
    if centre_k == 4.0:  # lesion cut only at the top: more air above the centre than below
        assert coronal_outside[: spec.size // 2].sum() > coronal_outside[spec.size // 2 :].sum()


# --------------------------------------------------------------------------------------------
# the field-of-view rule


BIG = dict(size=(130, 130, 50), spacing=(0.8, 0.8, 2.0), centre_index=(64.3, 65.1, 24.6), radius_mm=40.0)  # 80 mm lesion


def touches_border(mask, ring=1):
    return bool(mask[:ring].any() or mask[-ring:].any() or mask[:, :ring].any() or mask[:, -ring:].any())


def expected_scale(label, spec):
    """The rule recomputed from the voxel indices: reach to the outer voxel faces, per patient axis."""
    array = sitk.GetArrayViewFromImage(label)
    k, j, i = np.nonzero(array)
    spacing, origin = np.array(label.GetSpacing()), np.array(label.GetOrigin())
    centroid = origin + np.array([i.mean(), j.mean(), k.mean()]) * spacing
    low = origin + (np.array([i.min(), j.min(), k.min()]) - 0.5) * spacing
    high = origin + (np.array([i.max(), j.max(), k.max()]) + 0.5) * spacing
    reach = np.maximum(centroid - low, high - centroid)
    return max(1.0, float((reach * (1 + spec.fov_margin) / (spec.size / 2 * np.array(spec.spacing_mm))).max()))


def test_80mm_lesion_is_cut_off_with_the_fixed_rule():
    ct, label = sphere_case(**BIG)
    spec = PatchSpec()
    assert spec.fov_rule == "fixed"
    patch, node, components = patches_of(ct, label, spec)
    assert node.long_axis_mm > 78 and spec.size * spec.spacing_mm[0] < 51
    assert all(touches_border(mask) for mask in patch.mask)
    assert not patch.fov_grown and patch.fov_scale == 1.0 and patch.spacing_mm == spec.spacing_mm
    assert fov_scale(node, components, spec) == 1.0


@pytest.mark.parametrize("views", ["triplanar", "axial"])
def test_80mm_lesion_is_seen_whole_with_grow_to_fit(views):
    ct, label = sphere_case(**BIG)
    spec = PatchSpec(fov_rule="grow_to_fit", views=views)
    patch, node, components = patches_of(ct, label, spec)
    scale = expected_scale(label, spec)
    assert 1.8 < scale < 2.1
    assert patch.fov_grown and patch.fov_scale == pytest.approx(scale, rel=1e-9)
    assert fov_scale(node, components, spec) == pytest.approx(scale, rel=1e-9)
    np.testing.assert_allclose(patch.spacing_mm, np.array(spec.spacing_mm) * scale, rtol=1e-12)
    centre_px = (spec.size - 1) / 2
    pixel_mm = spec.spacing_mm[0] * scale
    for view, plane in enumerate(patch.planes):
        np.testing.assert_allclose(np.linalg.norm(plane.row_step_lps), pixel_mm, rtol=1e-12)
        mask = patch.mask[view]
        assert not touches_border(mask, ring=3), f"{plane.name}: the lesion must fit with a margin"
        rows, cols = mask_centre(mask)
        assert abs(rows - centre_px) < 0.5 and abs(cols - centre_px) < 0.5, plane.name
        # the whole 80 mm disc is there: its area matches pi r^2 within 4 %
        area_mm2 = mask.sum() * pixel_mm**2
        radius = BIG["radius_mm"]
        if views == "triplanar":
            assert area_mm2 == pytest.approx(np.pi * radius**2, rel=0.04), plane.name
        # the image shows the lesion (40 HU) where the mask is
        lesion_value = (LESION_HU - LUNG_WINDOW[0]) / (LUNG_WINDOW[1] - LUNG_WINDOW[0])
        assert np.median(patch.image[view][mask.astype(bool)]) == pytest.approx(lesion_value, abs=0.02)


def test_grow_to_fit_on_a_tilted_anisotropic_ct_keeps_the_lesion_whole_and_centred():
    ct, label = sphere_case(**{**BIG, "direction": rotation(0, 15) @ rotation(1, 10)})
    spec = PatchSpec(fov_rule="grow_to_fit")
    patch, node, _ = patches_of(ct, label, spec)
    assert patch.fov_grown
    centre_px = (spec.size - 1) / 2
    for view, plane in enumerate(patch.planes):
        np.testing.assert_allclose(plane.pixel_to_lps(centre_px, centre_px), node.centroid_lps, atol=1e-9)
        assert not touches_border(patch.mask[view], ring=2), plane.name
        rows, cols = mask_centre(patch.mask[view])
        assert abs(rows - centre_px) < 0.6 and abs(cols - centre_px) < 0.6, plane.name


@pytest.mark.parametrize("views", ["triplanar", "axial"])
def test_small_node_is_unaffected_by_the_rule(views):
    ct, label = sphere_case((60, 60, 30), (0.7, 0.7, 1.25), (29.2, 30.4, 14.7), 7.0)
    nodes, components = extract_nodes(label)
    fixed = extract_patches(ct, components, nodes, PatchSpec(views=views, mask_channel=True), LUNG_WINDOW)[0]
    grow = extract_patches(ct, components, nodes, PatchSpec(views=views, mask_channel=True, fov_rule="grow_to_fit"), LUNG_WINDOW)[0]
    assert not grow.fov_grown and grow.fov_scale == 1.0 and grow.spacing_mm == fixed.spacing_mm
    np.testing.assert_array_equal(grow.image, fixed.image)
    np.testing.assert_array_equal(grow.mask, fixed.mask)
    assert grow.planes == fixed.planes and grow.largest_axial_z_lps == fixed.largest_axial_z_lps


def test_node_just_inside_the_margin_is_not_grown_and_just_outside_is():
    spec = PatchSpec(fov_rule="grow_to_fit", size=32, spacing_mm=(1.0, 1.0, 1.0))  # half FOV 16 mm
    for radius, grown in ((11.5, False), (14.5, True)):  # reach ~12 mm * 1.2 < 16 mm; ~15 mm * 1.2 > 16 mm
        ct, label = sphere_case((40, 40, 40), (1.0, 1.0, 1.0), (19.5, 19.5, 19.5), radius)
        patch, _, _ = patches_of(ct, label, spec)
        assert patch.fov_grown is grown
        assert patch.fov_scale == pytest.approx(expected_scale(label, spec), rel=1e-9)


def test_patch_spec_checks_the_rule():
    with pytest.raises(InputError, match="field-of-view rule"):
        PatchSpec(fov_rule="grow")
    with pytest.raises(InputError, match="margin"):
        PatchSpec(fov_rule="grow_to_fit", fov_margin=-0.1)
    assert PatchSpec(fov_margin=1).fov_margin == 1.0


# --------------------------------------------------------------------------------------------
# the rule in the model card, training and inference


def card_for(config: TrainingConfig) -> dict:
    return new_card(
        architecture=config.model_name, preprocessing=config.preprocessing(),
        training={"command": "test", "seed": 0, "epochs": 0, "dataset": {}},
    )


def test_card_records_the_rule_and_old_cards_mean_fixed():
    config = TrainingConfig(fov_rule="grow_to_fit")
    card = card_for(config)
    assert card["preprocessing"]["fov_rule"] == "grow_to_fit" and card["preprocessing"]["fov_margin"] == 0.2
    assert patch_spec_from_card(card) == config.patch_spec()
    old = card_for(TrainingConfig())
    del old["preprocessing"]["fov_rule"], old["preprocessing"]["fov_margin"]  # a card written before the rule
    assert patch_spec_from_card(old) == PatchSpec()
    bad = card_for(TrainingConfig())
    bad["preprocessing"]["fov_rule"] = "zoom"
    with pytest.raises(InputError, match="field-of-view rule"):
        patch_spec_from_card(bad)
    with pytest.raises(InputError, match="field-of-view rule"):
        TrainingConfig(fov_rule="zoom")


def test_fixed_specs_keep_their_cache_fingerprint_keys():
    assert "fov_rule" not in _spec_dict(PatchSpec())
    assert _spec_dict(PatchSpec(fov_rule="grow_to_fit"))["fov_rule"] == "grow_to_fit"


def test_training_and_inference_sample_a_large_lesion_the_same_way(tmp_path):
    ct, label = sphere_case(**BIG)
    dataset = Dataset.create(tmp_path / "d", "big lesion")
    sitk.WriteImage(ct, str(tmp_path / "d" / "ct.nrrd"))
    sitk.WriteImage(label, str(tmp_path / "d" / "labels.nrrd"))
    dataset.add_case("c1", "p1", "ct.nrrd", "labels.nrrd")
    dataset.add_node("c1", 1, 1)
    dataset.save()
    config = TrainingConfig(fov_rule="grow_to_fit", window=LUNG_WINDOW)
    patchset = build_patchset(Dataset.load(tmp_path / "d"), config.patch_spec(), config.window)
    assert patchset.fov_grown.tolist() == [True] and patchset.summary()["fov_grown"] == 1
    assert "fov_grown" not in build_patchset(Dataset.load(tmp_path / "d"), PatchSpec(), config.window).summary()

    model = build_model(config.model_name, 3, config.patch_size)
    export_torchscript(model, card_for(config), tmp_path / "m.pt")
    result = classify_images(ct, label, load_model(tmp_path / "m.pt"), with_gradcam=False)
    (patch,) = result.patches
    assert patch.fov_grown
    np.testing.assert_array_equal(patch.image, patchset.x[0])
    assert any("fov_rule grow_to_fit" in message for message in result.messages)
