"""3D context: 2.5D slice stacks (views "triplanar_stack") and 3D blocks (views "volume").

Analytic truth: a bright bar with a Gaussian profile along an oblique axis, in a CT with a tilted
direction matrix and anisotropic voxels. A plane parallel to a view, shifted by d along its normal,
cuts the bar's axis at one known point; the bar's cross-section there is symmetric about that
point, so the intensity centroid of that channel must sit at it, in the documented view
orientation (docs/ARCHITECTURE.md). The same holds for every axial slice of a 3D block.
"""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from LymphNodeClassifierLib.crossval import main as crossval_main
from LymphNodeClassifierLib.errors import InputError
from LymphNodeClassifierLib.model import build_model, export_torchscript, load_model, new_card, validate_card
from LymphNodeClassifierLib.nodes import extract_nodes
from LymphNodeClassifierLib.patches import PatchSpec, extract_patches
from LymphNodeClassifierLib.patchset import PatchSet
from LymphNodeClassifierLib.pipeline import classify_images, patch_spec_from_card
from LymphNodeClassifierLib.training import TrainingConfig, augment_volume_batch, train
from LymphNodeClassifierLib.training import main as train_main
from helpers import TILTED

WINDOW = (-1000.0, 400.0)
SPACING = (0.7, 0.9, 1.6)  # anisotropic CT voxels
AXIS = np.array([0.5, 0.4, 0.8]) / np.linalg.norm([0.5, 0.4, 0.8])  # oblique bar axis (LPS)
CENTRE = np.array([12.0, -30.0, 55.0])  # LPS point on the bar's axis
SIGMA_MM = 1.2  # the bar's Gaussian profile
BAR_HU = 1100.0  # above air at the axis


def bar_case():
    """(CT, label map) of an oblique Gaussian bar in air; the node is the bar within 7 mm of CENTRE."""
    size = (80, 70, 40)
    affine = TILTED @ np.diag(SPACING)
    origin = CENTRE - affine @ ((np.array(size) - 1) / 2 + (0.31, 0.17, 0.42))  # centre off the voxel lattice
    k, j, i = np.indices(size[::-1])
    points = np.stack([i, j, k], axis=-1) @ affine.T + origin
    offset = points - CENTRE
    along = offset @ AXIS
    radial = np.linalg.norm(offset - along[..., None] * AXIS, axis=-1)
    hu = -1000.0 + BAR_HU * np.exp(-0.5 * (radial / SIGMA_MM) ** 2)
    mask = ((radial <= 2.5) & (np.linalg.norm(offset, axis=-1) <= 7.0)).astype(np.uint8)
    images = []
    for array in (hu.astype(np.float32), mask):
        image = sitk.GetImageFromArray(array)
        image.SetSpacing(SPACING)
        image.SetDirection(tuple(TILTED.ravel()))
        image.SetOrigin(tuple(origin))
        images.append(image)
    return images


def axis_point_on_plane(point_on_plane: np.ndarray, normal: np.ndarray) -> np.ndarray:
    """Where the bar's axis crosses the plane through `point_on_plane` with unit `normal`."""
    t = ((point_on_plane - CENTRE) @ normal) / (AXIS @ normal)
    return CENTRE + t * AXIS


def intensity_centroid(image: np.ndarray) -> tuple[float, float]:
    rows, cols = np.indices(image.shape)
    weight = image.sum()
    return float((rows * image).sum() / weight), float((cols * image).sum() / weight)


# view -> (unit normal, LPS axis of the rows and its sign, LPS axis of the columns and its sign), from ARCHITECTURE.md:
# axial rows A->P (+y) columns R->L (+x); coronal rows S->I (-z) columns +x; sagittal rows -z columns +y;
# +d lies along column x row: axial +z (superior), coronal +y (posterior), sagittal -x (patient right).
VIEWS = {
    "axial": (np.array([0.0, 0.0, 1.0]), (1, 1.0), (0, 1.0)),
    "coronal": (np.array([0.0, 1.0, 0.0]), (2, -1.0), (0, 1.0)),
    "sagittal": (np.array([-1.0, 0.0, 0.0]), (2, -1.0), (1, 1.0)),
}


@pytest.fixture(scope="module")
def bar():
    ct, labels = bar_case()
    nodes, components = extract_nodes(labels)
    assert len(nodes) == 1
    return ct, labels, nodes, components


@pytest.mark.parametrize("offset_mm", [2.0, 3.5])
def test_stack_neighbours_cut_the_bar_where_the_geometry_says(bar, offset_mm):
    ct, _, nodes, components = bar
    spec = PatchSpec(spacing_mm=(0.8, 0.6, 1.1), size=48, views="triplanar_stack", mask_channel=True, stack_offset_mm=offset_mm)
    (patch,) = extract_patches(ct, components, nodes, spec, WINDOW)
    assert patch.image.shape == (10, 48, 48) and spec.channel_names[-1] == "mask"
    assert [p.name for p in patch.planes] == ["axial", "coronal", "sagittal"]  # Grad-CAM's planes: the centre views
    centre = np.asarray(patch.centre_lps)
    half = (spec.size - 1) / 2
    checked = 0
    for channel, name in enumerate(spec.image_channel_names):
        view, sign = name.rstrip("-+d"), {"-d": -1.0, "+d": 1.0}.get(name[-2:], 0.0)
        normal, (row_axis, row_sign), (col_axis, col_sign) = VIEWS[view]
        expected_lps = axis_point_on_plane(centre + sign * offset_mm * normal, normal)
        expected_row = half + row_sign * (expected_lps[row_axis] - centre[row_axis]) / spec.spacing_mm[row_axis]
        expected_col = half + col_sign * (expected_lps[col_axis] - centre[col_axis]) / spec.spacing_mm[col_axis]
        row, col = intensity_centroid(patch.image[channel])
        assert abs(row - expected_row) < 0.25 and abs(col - expected_col) < 0.25, (name, (row, col), (expected_row, expected_col))
        # and the channel's recorded plane says the same
        np.testing.assert_allclose(patch.channel_planes[channel].pixel_to_lps(expected_row, expected_col), expected_lps, atol=1e-6)
        checked += 1
    assert checked == 9
    # the neighbours really moved: at 2 mm the axial centroid shifts by 2 * tan(tilt of the bar) mm
    moved = np.subtract(intensity_centroid(patch.image[4]), intensity_centroid(patch.image[3]))
    assert np.hypot(moved[0] * 0.6, moved[1] * 0.8) == pytest.approx(2 * offset_mm * np.hypot(AXIS[0], AXIS[1]) / AXIS[2], rel=0.05)


def test_volume_block_slices_follow_the_bar(bar):
    ct, _, nodes, components = bar
    spec = PatchSpec(spacing_mm=(0.8, 0.6, 1.1), size=20, views="volume", mask_channel=True)
    (patch,) = extract_patches(ct, components, nodes, spec, WINDOW)
    assert patch.image.shape == (2, 20, 20, 20) == spec.patch_shape
    centre = np.asarray(patch.centre_lps)
    origin = np.asarray(patch.volume_origin_lps)
    np.testing.assert_allclose(origin + 9.5 * np.asarray(spec.spacing_mm), centre, atol=1e-9)  # centred on the centroid
    checked = 0
    for k in range(20):  # axial slices k: z = origin z + k * spacing z; rows +y, columns +x
        expected = axis_point_on_plane(origin + k * np.array([0, 0, spec.spacing_mm[2]]), np.array([0.0, 0.0, 1.0]))
        expected_row, expected_col = (expected[1] - origin[1]) / spec.spacing_mm[1], (expected[0] - origin[0]) / spec.spacing_mm[0]
        if not (6 <= expected_row <= 13 and 6 <= expected_col <= 13):
            continue  # the block's edge would cut the bar's cross-section there
        row, col = intensity_centroid(patch.image[0][k])
        assert abs(row - expected_row) < 0.25 and abs(col - expected_col) < 0.25, (k, (row, col), (expected_row, expected_col))
        checked += 1
    assert checked >= 6
    # the mask channel is the node on the same grid: its centroid is the node's centroid
    k, j, i = np.nonzero(patch.image[1])
    mask_centroid = origin + np.array([i.mean(), j.mean(), k.mean()]) * spec.spacing_mm
    np.testing.assert_allclose(mask_centroid, centre, atol=0.5)
    np.testing.assert_array_equal(patch.mask[0], patch.image[1])


def _stack_card(size: int):
    config = TrainingConfig(architecture="resnet", views="triplanar_stack", stack_offset_mm=2.5, mask_channel=True, patch_size=size, translation_px=3,
                            spacing_mm=(0.8,) * 3, window=WINDOW)
    card = new_card(architecture="small_resnet", preprocessing=config.preprocessing(),
                    training={"command": "test", "seed": 0, "epochs": 0, "dataset": {}})
    return config, card


def test_stack_card_classifies_a_ct_with_gradcam_through_the_pipeline(bar, tmp_path):
    ct, labels, _, _ = bar
    config, card = _stack_card(32)
    assert card["preprocessing"]["channels"][3:5] == ["axial-d", "axial+d"] and card["preprocessing"]["stack_offset_mm"] == 2.5
    assert patch_spec_from_card(card) == config.patch_spec()
    torch.manual_seed(0)
    eager = build_model("small_resnet", 10, 32).eval()
    loaded = load_model(export_torchscript(eager, card, tmp_path / "stack.pt"))
    non_empty = 0
    for target in ("metastatic", "benign"):  # an untrained network's evidence: one of the two maps has some
        result = classify_images(ct, labels, loaded, gradcam_target=target)
        assert result.patches[0].image.shape == (10, 32, 32)
        with torch.no_grad():
            expected = torch.sigmoid(eager(torch.from_numpy(np.stack([p.image for p in result.patches])))).numpy()
        np.testing.assert_allclose(result.probabilities, expected, atol=1e-5)
        # the Grad-CAM volume lies on the CT grid, within the patch's cube around the node (mapped back through the centre planes)
        cam = result.cam_volume
        np.testing.assert_allclose(cam.GetDirection(), ct.GetDirection())
        np.testing.assert_allclose(cam.GetSpacing(), ct.GetSpacing())
        values = sitk.GetArrayFromImage(cam)
        if values.max() > 0:
            non_empty += 1
            k, j, i = np.nonzero(values)
            points = np.array([cam.TransformIndexToPhysicalPoint((int(a), int(b), int(c))) for a, b, c in zip(i, j, k)])
            assert np.abs(points - np.asarray(result.patches[0].centre_lps)).max() <= 32 * 0.8 / 2 + 2.0
    assert non_empty >= 1


def test_stack_card_without_its_offset_is_refused():
    _, card = _stack_card(16)
    del card["preprocessing"]["stack_offset_mm"]
    with pytest.raises(InputError, match="stack_offset_mm is missing"):
        validate_card(card)


def test_volume_needs_a_3d_architecture_and_back():
    with pytest.raises(InputError, match="resnet3d"):
        TrainingConfig(architecture="resnet", views="volume")
    with pytest.raises(InputError, match="resnet3d"):
        TrainingConfig(architecture="resnet3d", views="triplanar")
    with pytest.raises(InputError, match="Appearance augmentation"):
        TrainingConfig(architecture="resnet3d", views="volume", noise_std=0.02)
    config = TrainingConfig(architecture="resnet3d", views="volume", patch_size=16, translation_px=2)
    with pytest.raises(InputError, match="3D architectures"):
        new_card(architecture="small_resnet", preprocessing=config.preprocessing(), training={"command": "t", "seed": 0, "epochs": 0, "dataset": {}})


def test_volume_export_is_refused_before_any_work(tmp_path, capsys):
    argv = ["--dataset", str(tmp_path / "no-such-dataset"), "--out", str(tmp_path / "cv"), "--architecture", "resnet3d", "--views", "volume",
            "--patch-size", "16", "--translation", "2", "--export-model", str(tmp_path / "m.pt")]
    with pytest.raises(InputError, match="cross-validated only"):
        crossval_main(argv)
    assert not (tmp_path / "m.pt").exists()
    # `train` always exports: it answers with the same one line and exit code 2
    code = train_main(["--dataset", str(tmp_path / "no-such-dataset"), "--out", str(tmp_path / "m.pt"), "--architecture", "resnet3d",
                       "--views", "volume", "--patch-size", "16", "--translation", "2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "cross-validated only" in err[0] and "Traceback" not in err[0]
    assert not (tmp_path / "m.pt").exists()


def test_volume_augmentation_is_one_rigid_motion_per_node():
    """A z-invariant block stays z-invariant (every slice got the same turn and shift), the mask stays binary,
    and a turn about z moves an off-centre spot to another place."""
    config = TrainingConfig(architecture="resnet3d", views="volume", patch_size=16, mask_channel=True, translation_px=3, rotation_degrees=180)
    x = torch.zeros((6, 2, 16, 16, 16))
    x[:, 0, :, 3:6, 9:13] = 0.8
    x[:, 1, :, 3:6, 9:13] = 1.0
    out = augment_volume_batch(x, torch.Generator().manual_seed(3), config)
    assert out.shape == x.shape
    torch.testing.assert_close(out, out[:, :, :1].expand_as(out))
    assert set(torch.unique(out[:, 1]).tolist()) <= {0.0, 1.0}
    assert not torch.equal(out[:, 0, 0], x[:, 0, 0])


def test_small_3d_network_trains_on_volume_patches():
    """End to end through training.train: 3D blocks, the 3D network, its augmentation; the bright-block class is learnt."""
    config = TrainingConfig(architecture="resnet3d", views="volume", patch_size=12, mask_channel=True, translation_px=1, epochs=6,
                            patience=6, batch_size=8, learning_rate=3e-3, window=WINDOW, num_threads=1)
    rng = np.random.default_rng(0)
    n = 40
    y = np.arange(n) % 2
    x = (rng.random((n, 2, 12, 12, 12)) * 0.2).astype(np.float32)
    x[:, 1] = 0.0
    x[:, 1, 4:8, 4:8, 4:8] = 1.0
    x[y == 1, 0, 3:9, 3:9, 3:9] += 0.6
    patchset = PatchSet(x=x, y=y.astype(np.int64), patient_ids=np.array([f"P{i}" for i in range(n)]), case_ids=np.array([f"C{i}" for i in range(n)]),
                        label_values=np.ones(n, np.int64), short_axis_mm=np.full(n, 5.0), long_axis_mm=np.full(n, 6.0), true_y=np.full(n, -1),
                        spec=config.patch_spec(), window=config.window)
    result = train(patchset, config)
    assert result.metrics["validation"]["auc"] > 0.9
