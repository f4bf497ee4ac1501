"""Node features (shape and attenuation) against analytic ellipsoids, and the features' suspect finder.

The ellipsoids are rendered with partial volume (each voxel's HU is the fat / node mix of the
fraction of the voxel inside the ellipsoid, from 4 x 4 x 8 sub-samples), on anisotropic grids
with and without a tilted direction matrix, so the expected values are the ellipsoid's own:
the second moment of a solid ellipsoid along a semi-axis a is a^2 / 5, so half the log ratio of
two eigenvalues is log(a / b); its volume is 4/3 pi a b c.
"""

import csv
import json
import math

import numpy as np
import pytest
import SimpleITK as sitk
from helpers import TILTED, rotation
from scipy.stats import hypergeom

from LymphNodeClassifierLib import cli
from LymphNodeClassifierLib.errors import InputError
from LymphNodeClassifierLib.node_features import FEATURE_NAMES, feature_matrix, feret_diameter, node_features
from LymphNodeClassifierLib.nodes import extract_nodes
from LymphNodeClassifierLib.patchset import build_patchset
from LymphNodeClassifierLib.phantoms import generate_cohort
from LymphNodeClassifierLib.suspects import find_suspects_from_features, suspect_config

FAT_HU, NODE_HU = -100.0, 40.0
SEMI_AXES_MM = np.array([6.0, 4.0, 2.5])


def ellipsoid_ct(spacing, direction, axes=np.eye(3), semi=SEMI_AXES_MM, core_scale=0.0, core_hu=0.0, size_mm=32.0):
    """(CT, label map) of one ellipsoid node centred in a fat block; partial volume in the CT, mask = fraction >= 0.5."""
    spacing = np.asarray(spacing, dtype=float)
    size = np.ceil(size_mm / spacing).astype(int)
    direction = np.asarray(direction, dtype=float)
    origin = -direction @ (spacing * (size - 1) / 2.0)  # the block's centre at LPS (0, 0, 0)
    sub = (4, 4, 8)
    offsets = [(np.arange(n) + 0.5) / n - 0.5 for n in sub]
    fraction = np.zeros(size[::-1])
    core = np.zeros(size[::-1])
    k, j, i = np.meshgrid(*[np.arange(n, dtype=float) for n in size[::-1]], indexing="ij")
    for dk in offsets[2]:
        for dj in offsets[1]:
            for di in offsets[0]:
                index = np.stack([i + di, j + dj, k + dk], axis=-1)
                lps = index * spacing @ direction.T + origin
                local = lps @ axes  # coordinates along the ellipsoid's axes
                r2 = ((local / semi) ** 2).sum(axis=-1)
                fraction += r2 <= 1.0
                if core_scale:
                    core += r2 <= core_scale ** 2
    n = np.prod(sub)
    fraction, core = fraction / n, core / n
    hu = FAT_HU + fraction * (NODE_HU - FAT_HU) + core * (core_hu - NODE_HU)
    ct = sitk.GetImageFromArray(np.round(hu).astype(np.int16))
    labels = sitk.GetImageFromArray((fraction >= 0.5).astype(np.uint16))
    for image in (ct, labels):
        image.SetSpacing(tuple(spacing))
        image.SetDirection(tuple(direction.ravel()))
        image.SetOrigin(tuple(origin))
    return ct, labels


def features_of(ct, labels):
    nodes, components = extract_nodes(labels)
    assert len(nodes) == 1
    return node_features(ct, components, nodes[0])


@pytest.fixture(scope="module")
def oblique_node():
    axes = rotation(2, 30) @ rotation(0, 20)  # the ellipsoid's long axis is neither axial nor along a voxel axis
    return features_of(*ellipsoid_ct((0.7, 0.8, 2.0), TILTED, axes))


def test_partial_volume_moments_give_the_ellipsoid_axis_ratios(oblique_node):
    a, b, c = SEMI_AXES_MM
    assert oblique_node["pv_elongation_major_minor"] == pytest.approx(math.log(a / c), abs=0.08)
    assert oblique_node["pv_elongation_major_middle"] == pytest.approx(math.log(a / b), abs=0.08)
    assert oblique_node["pv_elongation_middle_minor"] == pytest.approx(math.log(b / c), abs=0.08)


def test_mask_shape_statistics_match_the_ellipsoid(oblique_node):
    a, b, c = SEMI_AXES_MM
    assert oblique_node["log_volume_mm3"] == pytest.approx(math.log(4 / 3 * math.pi * a * b * c), abs=0.12)
    # SimpleITK's elongation is the ratio of the two largest principal axes (>= 1)
    assert oblique_node["elongation"] == pytest.approx(a / b, rel=0.15)
    assert oblique_node["flatness"] == pytest.approx(b / c, rel=0.2)
    assert 0.6 < oblique_node["sphericity"] < 1.0
    assert oblique_node["fat_fraction"] < 0.05  # the node holds no fat


def test_features_do_not_depend_on_the_direction_matrix_or_slice_thickness():
    axes = rotation(1, 40)
    reference = features_of(*ellipsoid_ct((0.6, 0.6, 0.6), np.eye(3), axes))
    for spacing, direction in (((0.7, 0.8, 2.0), TILTED), ((0.9, 0.9, 3.0), rotation(2, 90))):
        other = features_of(*ellipsoid_ct(spacing, direction, axes))
        for name in ("pv_elongation_major_minor", "pv_elongation_major_middle"):
            assert other[name] == pytest.approx(reference[name], abs=0.1), (name, spacing)
        assert other["log_volume_mm3"] == pytest.approx(reference["log_volume_mm3"], abs=0.12)


def _itk_feret_diameter(binary):
    statistics = sitk.LabelShapeStatisticsImageFilter()
    statistics.ComputeFeretDiameterOn()
    statistics.Execute(binary)
    return statistics.GetFeretDiameter(1)


@pytest.mark.parametrize("shape", ["ellipsoid", "slab", "line", "touches_border", "two_blobs"])
def test_feret_diameter_is_itks_on_the_hull(shape):
    """The hull's farthest pair equals ITK's all-pairs Feret diameter, flat and collinear masks included."""
    rng = np.random.default_rng(7)
    mask = np.zeros((12, 30, 26), dtype=np.uint8)  # (k, j, i)
    k, j, i = np.meshgrid(*[np.arange(n) for n in mask.shape], indexing="ij")
    if shape == "ellipsoid":
        mask[((i - 13) / 9.3) ** 2 + ((j - 15) / 6.1) ** 2 + ((k - 6) / 4.2) ** 2 <= 1] = 1
        mask[rng.random(mask.shape) < 0.05] = 0  # holes and a ragged outline
    elif shape == "slab":  # one slice thick: coplanar boundary, no 3-D hull
        mask[5, 4:25, 3:20] = 1
    elif shape == "line":
        mask[6, 10, 2:23] = 1
    elif shape == "touches_border":  # voxels on the image border count as boundary
        mask[0:5, 0:30, 10:26] = 1
    else:
        mask[2:5, 2:6, 2:6] = 1
        mask[8:11, 22:27, 19:24] = 1
    binary = sitk.GetImageFromArray(mask)
    binary.SetSpacing((0.5, 0.7, 1.3))
    assert feret_diameter(binary) == pytest.approx(_itk_feret_diameter(binary), abs=1e-9)


def test_a_round_node_is_less_elongated_than_an_oval_one(oblique_node):
    round_node = features_of(*ellipsoid_ct((0.7, 0.8, 2.0), TILTED, semi=np.array([4.5, 4.2, 4.0])))
    assert round_node["pv_elongation_major_minor"] < 0.2 < oblique_node["pv_elongation_major_minor"]
    assert round_node["sphericity"] > oblique_node["sphericity"]


def test_a_necrotic_core_shows_as_low_attenuation_and_heterogeneity():
    semi = np.array([7.0, 6.5, 6.0])
    solid = features_of(*ellipsoid_ct((0.7, 0.7, 1.0), np.eye(3), semi=semi))
    necrotic = features_of(*ellipsoid_ct((0.7, 0.7, 1.0), np.eye(3), semi=semi, core_scale=0.6, core_hu=5.0))
    # the core holds 0.6^3 = 22 % of the volume at 5 HU
    assert necrotic["low_attenuation_fraction"] > solid["low_attenuation_fraction"] + 0.15
    assert necrotic["core_std_hu"] > solid["core_std_hu"] + 10
    assert necrotic["core_mean_hu"] < solid["core_mean_hu"] - 5
    assert solid["core_mean_hu"] == pytest.approx(NODE_HU, abs=3)


# --------------------------------------------------------------------------------------------
# a phantom cohort with label noise (the default, realistic PhantomConfig)


@pytest.fixture(scope="module")
def noisy(tmp_path_factory):
    dataset = generate_cohort(tmp_path_factory.mktemp("features") / "cohort", cases=30, seed=21, label_noise=0.2)
    config = suspect_config()
    patchset = build_patchset(dataset, config.patch_spec(), config.window)
    features = feature_matrix(dataset, patchset.case_ids, patchset.label_values)
    return {"dataset": dataset, "patchset": patchset, "features": features}


def test_feature_rows_follow_the_requested_nodes(noisy):
    dataset, patchset, features = noisy["dataset"], noisy["patchset"], noisy["features"]
    assert features.shape == (len(patchset), len(FEATURE_NAMES)) and np.isfinite(features).all()
    rows = np.random.default_rng(0).permutation(len(patchset))[:12]
    again = feature_matrix(dataset, patchset.case_ids[rows], patchset.label_values[rows])
    np.testing.assert_allclose(again, features[rows])
    with pytest.raises(InputError, match="not in the dataset"):
        feature_matrix(dataset, ["no-such-case"], [1])
    with pytest.raises(InputError, match="no voxels"):
        feature_matrix(dataset, [patchset.case_ids[0]], [999])


def test_features_finder_ranks_flipped_labels_far_above_chance(noisy):
    patchset, features = noisy["patchset"], noisy["features"]
    result = find_suspects_from_features(patchset, features, folds=5, seed=0, feature_names=FEATURE_NAMES)
    flipped = patchset.y != patchset.true_y
    top = result.top(0.2)
    hits, n, k, drawn = int(flipped[top].sum()), len(patchset), int(flipped.sum()), int(top.size)
    p_value = float(hypergeom.sf(hits - 1, n, k, drawn))
    assert hits / k > 2.5 * (drawn / n), f"{hits} of {k} flips in the top {drawn}"
    assert p_value < 1e-6
    summary = result.summary()
    assert summary["method"] == "features" and summary["config"] is None and summary["features"] == list(FEATURE_NAMES)
    assert summary["oof_auc_vs_true"] > summary["oof_auc_vs_given"] > 0.6
    # out of fold: no fold's regression saw a patient it predicts; round 2 left the flagged nodes out
    for split in result.fold_splits:
        assert not set(patchset.patient_ids[split["train"]].tolist()) & set(patchset.patient_ids[split["predict"]].tolist())
    assert sum(r["left_out_flagged"] for r in result.fold_reports) > 0
    again = find_suspects_from_features(patchset, features, folds=5, seed=0)
    assert np.array_equal(again.order, result.order), "deterministic"


def test_features_finder_rejects_a_misaligned_table(noisy):
    patchset, features = noisy["patchset"], noisy["features"]
    with pytest.raises(InputError, match="one row per node"):
        find_suspects_from_features(patchset, features[:-1])
    bad = features.copy()
    bad[0, 0] = np.inf
    with pytest.raises(InputError, match="infinite"):
        find_suspects_from_features(patchset, bad)


def test_suspects_command_uses_the_features_by_default(noisy, tmp_path, capsys):
    out = tmp_path / "suspects"
    manifest = (noisy["dataset"].folder / "dataset.json").read_bytes()
    code = cli.main(["suspects", "--dataset", str(noisy["dataset"].folder), "--out", str(out), "--folds", "4"])
    assert code == 0, capsys.readouterr().err
    summary = json.loads((out / "suspects.json").read_text(encoding="utf-8"))
    rows = list(csv.DictReader(open(out / "suspects.csv", newline="", encoding="utf-8")))
    assert summary["method"] == "features" and summary["folds"] == 4 and len(rows) == len(noisy["patchset"])
    assert summary["flipped_found_in_top"] > 0.4
    assert f"features: {len(FEATURE_NAMES)} per node" in capsys.readouterr().out
    assert (noisy["dataset"].folder / "dataset.json").read_bytes() == manifest, "the finder never edits labels"
